// What the CPU kernels share: bfloat16 by its bits, an exp without libm, the dtype dispatch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sluice_cpu {

// bfloat16 is the high half of a float32. Through the bits, loops vectorise; c10::BFloat16's
// conversions branch on NaN and do not (decode attention ran 2.6x and SiLU 5x slower with them).
static inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// To nearest even, NaN kept a quiet NaN: c10's rounding.
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return nan ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}

// exp(x) on [-87, 88] (clamped outside) without libm, so that loops calling it vectorise:
// Cody-Waite reduction by ln 2 (rounding by the 1.5 * 2^23 trick), degree-6 Taylor polynomial on
// [-ln2/2, ln2/2] (relative error ~1e-7), 2^n through the exponent bits. The attention kernel's
// 16-lane softmax runs the same steps on vectors (attention_vectors.h, exp_nonpositive).
static inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// f(float{}), f(c10::BFloat16{}) or f(c10::Half{}) for the tensor's dtype; any other is refused.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": float32, bfloat16 or float16 only");
  }
}

}  // namespace sluice_cpu
