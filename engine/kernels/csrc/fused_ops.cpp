// The decoder layer's elementwise work on CPU, one pass each: RMSNorm (with the residual add that
// precedes it), rotary embedding and SiLU-and-multiply; W8A8's per-token activation scaling; and
// greedy decoding's argmax. Eagerly each is 4-9 PyTorch ops, every
// one a pass over the activations and a dispatch (vLLM's CPU build fuses the same three in C++).
// x86 only, as the library it is built into (paged_attention.cpp, immintrin.h).
//
// Each rounds where PyTorch's eager ops round, so bfloat16 results equal theirs bit for bit
// except where a float32 sum runs in another order (RMSNorm's mean of squares) or exp differs by
// an ulp (SiLU): the engine's greedy tokens stay those of Transformers (tests/engine).

// Each eager op rounds its result: a * c - b * s must not become one fused multiply-add here
// (it would round once where PyTorch rounds twice). Only this file's functions: the attention
// kernel's dot products keep their FMAs. Before every include: GCC does not inline a function
// compiled under other optimize options into one under these, so exp_approx (cpu_common.h) or
// c10's bfloat16 conversions defined above the pragma were calls inside the SIMD loops, and the
// loops ran scalar (SiLU-and-multiply at 0.36 G elements/s on a Zen 3 core, 3-4x slower than
// PyTorch's eager silu and mul).
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_vectors.h"  // the library's float32 vectors (8 lanes on AVX2, 16 on AVX-512)
#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using namespace sluice_cpu;

// Loads and stores through float32; bfloat16 by its bits (cpu_common.h).
template <typename T>
struct Io {  // float32 and float16: through their own conversions
  using Raw = T;
  static float load(const Raw* p, int64_t i) { return static_cast<float>(p[i]); }
  static void store(Raw* p, int64_t i, float x) { p[i] = static_cast<T>(x); }
  static float round(float x) { return static_cast<float>(static_cast<T>(x)); }
};
template <>
struct Io<float> {
  using Raw = float;
  static float load(const Raw* p, int64_t i) { return p[i]; }
  static void store(Raw* p, int64_t i, float x) { p[i] = x; }
  static float round(float x) { return x; }
};
template <>
struct Io<c10::BFloat16> {
  using Raw = uint16_t;
  static float load(const Raw* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(Raw* p, int64_t i, float x) { p[i] = float_to_bf16(x); }
  static float round(float x) { return bf16_to_float(float_to_bf16(x)); }
};

template <typename T>
static inline typename Io<T>::Raw* raw(const at::Tensor& t) {
  return reinterpret_cast<typename Io<T>::Raw*>(t.data_ptr<T>());
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* residual, at::Tensor& sum, const at::Tensor& weight,
                   at::Tensor& out, float eps, bool gemma) {
  using io = Io<T>;
  using R = typename io::Raw;
  const int64_t rows = x.size(0), hidden = x.size(1), x_row = x.stride(0);
  const R* xs = raw<T>(x);
  const R* res = residual != nullptr ? raw<T>(*residual) : nullptr;
  R* sums = residual != nullptr ? raw<T>(sum) : nullptr;
  const R* w = raw<T>(weight);
  R* outs = raw<T>(out);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(hidden);
    for (int64_t t = begin; t < end; ++t) {
      const R* xt = xs + t * x_row;
      float squares = 0.0f;
      if (res != nullptr) {  // the residual add in the activations' dtype, as `x + residual`
        const R* rt = res + t * hidden;
        R* st = sums + t * hidden;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) {
          const float v = io::round(io::load(xt, i) + io::load(rt, i));
          io::store(st, i, v);
          row[i] = v;
          squares += v * v;
        }
      } else {
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) {
          const float v = io::load(xt, i);
          row[i] = v;
          squares += v * v;
        }
      }
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
      R* o = outs + t * hidden;
      if (gemma) {  // (x * (1 + w)) in float32, cast once
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) io::store(o, i, row[i] * inv * (1.0f + io::load(w, i)));
      } else {  // cast back before the weight, as transformers' LlamaRMSNorm
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) io::store(o, i, io::load(w, i) * io::round(row[i] * inv));
      }
    }
  });
}

// x [T, hidden] (rows may be strided) -> norm(x); with residual: (norm(x + residual), x + residual).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                           const at::Tensor& weight, double eps, bool gemma) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x [T, hidden] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x of one dtype");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                    residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual as x, contiguous");
  }
  auto out = at::empty(x.sizes(), x.options());
  auto sum = has_residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x, has_residual ? &*residual : nullptr, sum, weight, out, static_cast<float>(eps), gemma);
  };
  dispatch_float(x.scalar_type(), "rms_norm", launch);
  return {out, sum};
}

// x [T, 2I] = [gate | up] -> silu(gate) * up [T, I], rounded as F.silu(gate) * up.
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "silu_and_mul: x [T, 2I]");
  const int64_t rows = x.size(0), inter = x.size(1) / 2, x_row = x.stride(0);
  auto out = at::empty({rows, inter}, x.options());
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    using io = Io<T>;
    const auto* in = raw<T>(x);
    auto* o = raw<T>(out);
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto* gate = in + t * x_row;
        const auto* up = gate + inter;
        auto* ot = o + t * inter;
        int64_t vectorised = 0;
        if constexpr (std::is_same_v<T, float>) {
          // explicit vectors: GCC leaves the loop below scalar (exp_approx's clamp and bit cast),
          // 0.36 G elements/s on a Zen 3 core, 3-4x slower than PyTorch's eager silu and mul
          namespace vec = sluice_cpu::attention;
          for (; vectorised + vec::kLanes <= inter; vectorised += vec::kLanes) {
            const vec::vfloat g = vec::load(gate + vectorised);
            const vec::vfloat silu = g / (1.0f + vec::exp_approx(-g));
            vec::store(ot + vectorised, silu * vec::load(up + vectorised));
          }
        }
#pragma omp simd
        for (int64_t i = vectorised; i < inter; ++i) {
          const float g = io::load(gate, i);
          const float silu = io::round(g / (1.0f + exp_approx(-g)));
          io::store(ot, i, silu * io::load(up, i));
        }
      }
    });
  };
  dispatch_float(x.scalar_type(), "silu_and_mul", launch);
  return out;
}

// Rotates x [T, heads, D] in place (rows and heads may be strided, D contiguous) by the cos/sin of
// each row's position (cos_sin [P, D]: D/2 cosines then D/2 sines, float32), rotate_half style,
// rounding as x1 * cos - x2 * sin, x2 * cos + x1 * sin do with cos and sin cast to x's dtype.
template <typename T>
void rotate(typename Io<T>::Raw* x, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride,
            int64_t head_stride, const float* cos_sin, const int64_t* positions) {
  using io = Io<T>;
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = cos_sin + positions[t] * dim;
      const float* sin = cos + half;
      for (int64_t h = 0; h < heads; ++h) {
        auto* x1 = x + t * row_stride + h * head_stride;
        auto* x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float c = io::round(cos[i]), s = io::round(sin[i]);
          const float a = io::load(x1, i), b = io::load(x2, i);
          io::store(x1, i, io::round(a * c) - io::round(b * s));
          io::store(x2, i, io::round(b * c) + io::round(a * s));
        }
      }
    }
  });
}

void rotary_(at::Tensor& x, const at::Tensor& cos_sin, const at::Tensor& positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary: x [T, heads, D]");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.size(1) == x.size(2),
              "rotary: cos_sin [P, D] float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == x.size(0),
              "rotary: positions [T] int64");
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    rotate<T>(raw<T>(x), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), cos_sin.data_ptr<float>(),
              positions.data_ptr<int64_t>());
  };
  dispatch_float(x.scalar_type(), "rotary", launch);
}

// W8A8's per-token activation scaling (engine.quant.w8a8.linear): x [T, K] float32, rows
// contiguous -> (x * (act_max / amax), amax [T, 1]) with amax = max(max_k |x[t, k]|, min_amax),
// the values of the eager x * (act_max / x.abs().amax(-1, keepdim=True).clamp(min=min_amax)) bit
// for bit, in one pass per row (read twice while it is in cache) where eager takes four passes
// and an [T, K] temporary (abs).
std::tuple<at::Tensor, at::Tensor> scale_rows(const at::Tensor& x, double act_max, double min_amax) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat, "scale_rows: x [T, K] float32");
  const int64_t rows = x.size(0), k = x.size(1), x_row = x.stride(0);
  auto out = at::empty({rows, k}, x.options());
  auto amax = at::empty({rows, 1}, x.options());
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* maxima = amax.data_ptr<float>();
  const float codes = static_cast<float>(act_max), least = static_cast<float>(min_amax);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    namespace vec = sluice_cpu::attention;
    for (int64_t t = begin; t < end; ++t) {
      const float* row = in + t * x_row;
      float* out_row = o + t * k;
      vec::vfloat running = vec::splat(0.0f);
      int64_t i = 0;
      for (; i + vec::kLanes <= k; i += vec::kLanes) {
        const vec::vfloat v = vec::load(row + i);
        const vec::vfloat magnitude = v < 0.0f ? -v : v;
        running = running > magnitude ? running : magnitude;
      }
      float best = vec::hmax(running);
      for (; i < k; ++i) best = std::max(best, std::fabs(row[i]));
      best = std::max(best, least);
      maxima[t] = best;
      const float inverse = (1.0f / best) * codes;  // how eager A / amax rounds: reciprocal, then times A
      const vec::vfloat scale = vec::splat(inverse);
      i = 0;
      for (; i + vec::kLanes <= k; i += vec::kLanes) vec::store(out_row + i, vec::load(row + i) * scale);
      for (; i < k; ++i) out_row[i] = row[i] * inverse;
    }
  });
  return {out, amax};
}

// A step's grammar masks (engine.core.structured_output.GrammarMasks) applied out of place: a copy
// of the logits [N, V] float32 where each constrained row rows[i] has -inf at every token whose bit
// is 0 in bitmask[i] (bit j of word w: token 32 * w + j). PyTorch's version unpacks the bits into a
// bool tensor, gathers the rows and scatters them back: ~0.17-0.3 ms for 16 rows of 2048 on the
// Zen 3 (2 threads). Here: one copy, then one pass over those rows' words, where a grammar's words
// are mostly all-zero (32 tokens at once) or all-one (nothing to do).
at::Tensor apply_token_bitmask(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "apply_token_bitmask: logits [N, V] float32");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "apply_token_bitmask: rows [R] int64");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.size(0) == rows.size(0) &&
                  bitmask.size(1) * 32 >= logits.size(1),
              "apply_token_bitmask: bitmask [R, >= ceil(V / 32)] int32");
  auto out = logits.clone(at::MemoryFormat::Contiguous);
  const auto words = bitmask.contiguous();
  const auto row_ids = rows.contiguous();
  const int64_t n = out.size(0), v = out.size(1), num_words = words.size(1);
  float* data = out.data_ptr<float>();
  const auto* mask = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  const float held_back = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < row_ids.size(0); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "apply_token_bitmask: row ", ids[i], " is not a row of the logits");
    float* row = data + ids[i] * v;
    const uint32_t* row_mask = mask + i * num_words;
    for (int64_t w = 0; w * 32 < v; ++w) {
      const uint32_t word = row_mask[w];
      if (word == UINT32_MAX) continue;
      const int64_t first = w * 32, last = std::min<int64_t>(first + 32, v);
      if (word == 0) {
        std::fill(row + first, row + last, held_back);
        continue;
      }
      for (int64_t j = first; j < last; ++j) {
        if (!((word >> (j - first)) & 1u)) row[j] = held_back;
      }
    }
  }
  return out;
}

// Greedy decoding's token per row: x [N, V] float32, rows contiguous -> [N] int64, torch.argmax's
// answer (the first index of the largest value; a NaN counts as the largest, the first NaN wins).
// PyTorch's CPU argmax tracks an index per element in scalar code: 160 us for 128 x 2048 on a Zen 3
// (2 threads) where amax takes 15. Here each lane keeps its own running maximum and the index
// where it first reached it (updates on strictly greater only, so a lane holds its first maximum);
// the lanes are then reduced by value, ties to the smaller index. One read of the row.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat && x.size(1) > 0 &&
                  x.size(1) < INT32_MAX,
              "argmax_rows: x [N, V] float32, 0 < V < 2**31, rows contiguous");  // lane indices are int32
  const int64_t rows = x.size(0), v = x.size(1), x_row = x.stride(0);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* in = x.data_ptr<float>();
  int64_t* best_index = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    namespace vec = sluice_cpu::attention;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * x_row;
      int64_t best = 0;
      float best_value = row[0];
      int64_t i = 0;
      bool nan = false;
      if (v >= vec::kLanes) {
        vec::vfloat lane_max = vec::load(row);
        vec::vint lane_index, step, any_nan = lane_max != lane_max;
        for (int lane = 0; lane < vec::kLanes; ++lane) lane_index[lane] = lane;
        step = lane_index;
        for (i = vec::kLanes; i + vec::kLanes <= v; i += vec::kLanes) {
          const vec::vfloat value = vec::load(row + i);
          const vec::vint greater = value > lane_max;
          lane_max = greater ? value : lane_max;
          lane_index = greater ? step + static_cast<int32_t>(i) : lane_index;
          any_nan |= value != value;
        }
        for (int lane = 0; lane < vec::kLanes; ++lane) nan |= any_nan[lane] != 0;
        best_value = lane_max[0];
        best = lane_index[0];
        for (int lane = 1; lane < vec::kLanes; ++lane) {
          if (lane_max[lane] > best_value || (lane_max[lane] == best_value && lane_index[lane] < best)) {
            best_value = lane_max[lane];
            best = lane_index[lane];
          }
        }
      } else {
        nan = best_value != best_value;
        i = 1;
      }
      for (; i < v && !nan; ++i) {  // the tail: indices above every lane's
        if (row[i] > best_value) {
          best_value = row[i];
          best = i;
        }
        nan = row[i] != row[i];
      }
      if (nan) {  // rare: the first NaN, as torch.argmax answers
        for (best = 0; best < v && row[best] == row[best]; ++best) {
        }
      }
      best_index[r] = best;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def("apply_token_bitmask(Tensor logits, Tensor rows, Tensor bitmask) -> Tensor");
  m.impl("apply_token_bitmask", c10::DispatchKey::CPU, TORCH_FN(apply_token_bitmask));
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, TORCH_FN(argmax_rows));
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, bool gemma) -> (Tensor, Tensor)");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.def("rotary_(Tensor(a!) x, Tensor cos_sin, Tensor positions) -> ()");
  m.def("scale_rows(Tensor x, float act_max, float min_amax) -> (Tensor, Tensor)");
  m.impl("scale_rows", c10::DispatchKey::CPU, TORCH_FN(scale_rows));
  m.impl("rotary_", c10::DispatchKey::CPU, TORCH_FN(rotary_));
}
