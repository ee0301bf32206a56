// The attention kernel's sizes and its float32 vectors (GCC/Clang vector extension): 16 lanes
// (one zmm register) where the build targets AVX-512, 8 (one ymm) on AVX2. Loads that widen
// bfloat16, horizontal sums and maxima, exp for the softmax, rows converted to float32 and back.
//
// Why two widths: 16-lane vectors compiled for AVX2 become pairs of ymm registers, and the loops
// written to keep 16 of them in AVX-512's 32 registers spill on AVX2's 16 (the AVX2 machine spent
// 38% of a run in this kernel, against 12% on AVX-512). With kLanes = 8, the loops of
// attention_decode.h and attention_prompt.h size their accumulators for 16 ymm registers.
#pragma once

#include <ATen/ATen.h>

#include "cpu_common.h"

#include <immintrin.h>  // x86 only: the kernels are not built elsewhere (cpu_kernels._not_x86)

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace sluice_cpu::attention {

constexpr int kKeyTile = 16;       // keys per inner step; the page size must be a multiple
#ifdef __AVX512F__
constexpr int kLanes = 16;         // floats per vector: one zmm register
#else
constexpr int kLanes = 8;          // floats per vector: one ymm register (AVX2)
#endif
constexpr int kVectorsPerTile = kKeyTile / kLanes;  // a key tile's scores: 1 vector, or 2 on AVX2
constexpr int kMaxRows = 128;      // rows (query heads x positions) per work item
constexpr int kMaxHeadDim = 256;
constexpr int kMaxKvWidth = 2048;  // KV heads x head size read per key by one work item
constexpr int kWideRows = 16;      // from this many rows per KV head: vectorise over rows
constexpr int kWideTileRows = 4 * kLanes;  // a prompt tile's rows: 4 vectors (64 AVX-512, 32 AVX2)
constexpr int kMaxWideVectors = 64 / kLanes;  // rows of one position (G <= 64 query heads per KV head)
constexpr int kSpan = 256;         // narrow rows: keys scored before each softmax update
constexpr float kNoMax = -std::numeric_limits<float>::max();

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float vfloat_u __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

static inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
// 16 bfloat16 values widened to float32 by their bits (cpu_common.h): decode rows read bfloat16
// pages in place through this.
static inline vfloat load(const c10::BFloat16* p) {
#ifdef __AVX512F__  // one 16-lane widening load (GCC splits the generic form into two 8-lane ones)
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<const vfloat&>(bits);
#else
  typedef uint16_t vbf16_u __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));
  const vint bits = __builtin_convertvector(*reinterpret_cast<const vbf16_u*>(p), vint) << 16;
  return reinterpret_cast<const vfloat&>(bits);
#endif
}
static inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat_u*>(p) = v; }
static inline vfloat splat(float x) { return vfloat{} + x; }

#ifdef __AVX512F__
static inline float hsum(vfloat v) {  // a tree of shuffles: 4 adds, not 15 dependent ones
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

static inline float hmax(vfloat v) {
  auto max = [](vfloat a, vfloat b) { return a > b ? a : b; };
  v = max(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// The lane sums of 16 vectors, lane j of the result holding the sum of v[j]: a transposing tree
// of shuffles (15 steps of 2 shuffles and an add) instead of 16 horizontal sums.
__attribute__((always_inline)) static inline vfloat sum_lanes(vfloat v[16]) {
  vfloat a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // [key 2i: 8 partial sums | key 2i+1: 8]
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // keys 4i..4i+3: 4 partial sums each
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // keys 8i..8i+7: 2 partial sums each
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
static inline float hsum(vfloat v) {  // 3 adds, not 7 dependent ones
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

static inline float hmax(vfloat v) {
  auto max = [](vfloat a, vfloat b) { return a > b ? a : b; };
  v = max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  return v[0];
}

// The lane sums of 8 vectors, lane j of the result holding the sum of v[j]: the same transposing
// tree for 8 lanes (7 steps of 2 shuffles and an add).
__attribute__((always_inline)) static inline vfloat sum_lanes(vfloat v[8]) {
  vfloat a[4], b[2];
  for (int i = 0; i < 4; ++i) {  // [key 2i: 4 partial sums | key 2i+1: 4]
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {  // keys 4i..4i+3: 2 partial sums each
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif

// cpu_common.h's exp_approx step for step on vectors, clamped to [-87, 88] as it is: the same
// float32 result in every lane as the scalar function (SiLU in fused_ops.cpp).
using sluice_cpu::exp_approx;  // the scalar overload stays visible beside this one
static inline vfloat exp_approx(vfloat x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vfloat r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vfloat p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * reinterpret_cast<const vfloat&>(bits);
}

// exp(x) for x <= 0 (every softmax argument here is a score minus the running max): exp_approx,
// and 0 below -87.
static inline vfloat exp_nonpositive(vfloat x) {
  return x < -87.0f ? splat(0.0f) : exp_approx(x);
}

static inline float exp_nonpositive(float x) { return x < -87.0f ? 0.0f : exp_approx(x); }

// n values to float32 and back; bfloat16 by its bits (cpu_common.h).
static inline void to_float(const float* in, float* out, int64_t n) { std::memcpy(out, in, n * sizeof(float)); }
static inline void to_float(const c10::BFloat16* in, float* out, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(in);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(raw[i]);
}
static inline void from_float(const float* in, float* out, int64_t n) { std::memcpy(out, in, n * sizeof(float)); }
static inline void from_float(const float* in, c10::BFloat16* out, int64_t n) {
  uint16_t* raw = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) raw[i] = float_to_bf16(in[i]);
}
static inline void from_float(const float* in, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<c10::Half>(in[i]);
}
static inline void to_float(const c10::Half* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

}  // namespace sluice_cpu::attention
