// Wide rows (prompt tiles, 16 rows or more per KV head): scores vectorised over the rows, by
// vdpbf16ps where the CPU has AVX512-BF16, then the online softmax and the values.
#pragma once

#include "attention_state.h"

#include <type_traits>

namespace sluice_cpu::attention {

// Wide rows (prompt tiles): vectorised over rows, the query and accumulator held transposed, so a
// key's scores for 16 rows are 16-lane FMAs over the head dimension with the key's values
// broadcast: no horizontal sums, no transposed keys. NB: row vectors (1-4), at compile time, so
// the 2 x NB independent accumulators of each loop stay in registers.
template <int NB>
static inline void wide_scores(Scratch& s, const float* keys_h, int64_t D) {
  const int64_t stride = s.kv_stride;
  // keys per pass: each query vector loaded feeds kKeys FMAs, kKeys x NB accumulators (16 of 32 zmm
  // at most; on AVX2, 8 of 16 ymm from 3 vectors up)
  constexpr int kKeys = kLanes == 16 || NB <= 2 ? 4 : 2;
  for (int j = 0; j < kKeyTile; j += kKeys) {
    vfloat dot[kKeys][NB];
    for (int i = 0; i < kKeys; ++i) {
      for (int b = 0; b < NB; ++b) dot[i][b] = splat(0.0f);
    }
    for (int64_t d = 0; d < D; ++d) {
      float k[kKeys];
      for (int i = 0; i < kKeys; ++i) k[i] = keys_h[(j + i) * stride + d];
      for (int b = 0; b < NB; ++b) {
        const vfloat q = load(s.wide_q(d) + b * kLanes);
        for (int i = 0; i < kKeys; ++i) dot[i][b] += q * k[i];
      }
    }
    for (int i = 0; i < kKeys; ++i) {
      for (int b = 0; b < NB; ++b) store(s.scores[j + i] + b * kLanes, dot[i][b]);
    }
  }
}

#ifdef __AVX512BF16__
// wide_scores for bfloat16 pages on CPUs with AVX512-BF16: each vdpbf16ps multiplies two head
// dimensions (exact bfloat16 products, float32 sums), half the instructions of widening to
// float32 first, and the keys are read in place. The query is held as pairs of its bfloat16
// dimensions (unscaled: scaling first would round it again), the scale applied to the scores.
template <int NB>
static inline void wide_scores_bf16(Scratch& s, const c10::BFloat16* keys, int64_t stride, int64_t D, float scale) {
  constexpr int kKeys = 4;
  for (int j = 0; j < kKeyTile; j += kKeys) {
    __m512 dot[kKeys][NB];
    for (int i = 0; i < kKeys; ++i) {
      for (int b = 0; b < NB; ++b) dot[i][b] = _mm512_setzero_ps();
    }
    for (int64_t d2 = 0; d2 < D / 2; ++d2) {
      __m512bh k[kKeys];
      for (int i = 0; i < kKeys; ++i) {
        uint32_t pair;  // dimensions 2 d2 (low half) and 2 d2 + 1
        std::memcpy(&pair, keys + (j + i) * stride + 2 * d2, sizeof(pair));
        k[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      }
      for (int b = 0; b < NB; ++b) {
        const __m512bh q = (__m512bh)_mm512_loadu_si512(s.wide_qpair(d2) + b * kLanes);
        for (int i = 0; i < kKeys; ++i) dot[i][b] = _mm512_dpbf16_ps(dot[i][b], q, k[i]);
      }
    }
    for (int i = 0; i < kKeys; ++i) {
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(s.scores[j + i] + b * kLanes, _mm512_mul_ps(dot[i][b], _mm512_set1_ps(scale)));
    }
  }
}
constexpr bool kBf16Pairs = true;
#else
constexpr bool kBf16Pairs = false;
#endif

// The tile's softmax update and values for wide rows, from the scores in s.scores.
template <int NB>
static inline void wide_update(Scratch& s, const float* values_h, int64_t D, int64_t key0, int64_t window) {
  const int64_t stride = s.kv_stride;
  vfloat alpha[NB];
  for (int b = 0; b < NB; ++b) {
    const int rb = b * kLanes;
    const vfloat pos = load(s.pos + rb);
    const vfloat old_max = load(s.max + rb);
    vfloat tile_max = old_max;
    // Which rows see key j: computed in each loop, not kept (16 masks would fill AVX2's registers).
    const auto visible = [&](int j) -> vint {
      const float key = static_cast<float>(key0 + j);
      vint seen = key <= pos;
      if (window > 0) seen &= key > pos - static_cast<float>(window);
      return seen;
    };
    for (int j = 0; j < kKeyTile; ++j) {
      const vfloat sc = load(s.scores[j] + rb);
      tile_max = visible(j) ? (sc > tile_max ? sc : tile_max) : tile_max;
    }
    alpha[b] = exp_nonpositive(old_max - tile_max);
    vfloat tile_sum = splat(0.0f);
    for (int j = 0; j < kKeyTile; ++j) {
      const vfloat p = visible(j) ? exp_nonpositive(load(s.scores[j] + rb) - tile_max) : splat(0.0f);
      store(s.scores[j] + rb, p);
      tile_sum += p;
    }
    store(s.sum + rb, load(s.sum + rb) * alpha[b] + tile_sum);
    store(s.max + rb, tile_max);
  }
  // head dimensions per pass: each probability vector feeds kDims FMAs, kDims x NB accumulators
  // (16 of 32 zmm at most; on AVX2, 8 of 16 ymm from 3 vectors up)
  constexpr int kDims = kLanes == 16 || NB <= 2 ? 4 : 2;
  for (int64_t d = 0; d < D; d += kDims) {
    const int dims = static_cast<int>(std::min<int64_t>(kDims, D - d));
    vfloat acc[kDims][NB];
    for (int i = 0; i < kDims; ++i) {
      for (int b = 0; b < NB; ++b) acc[i][b] = i < dims ? load(s.wide_acc(d + i) + b * kLanes) * alpha[b] : splat(0.0f);
    }
    for (int j = 0; j < kKeyTile; ++j) {
      float v[kDims];
      for (int i = 0; i < kDims; ++i) v[i] = i < dims ? values_h[j * stride + d + i] : 0.0f;
      for (int b = 0; b < NB; ++b) {
        const vfloat p = load(s.scores[j] + b * kLanes);
        for (int i = 0; i < kDims; ++i) acc[i][b] += p * v[i];
      }
    }
    for (int i = 0; i < dims; ++i) {
      for (int b = 0; b < NB; ++b) store(s.wide_acc(d + i) + b * kLanes, acc[i][b]);
    }
  }
}

// One key tile for wide rows: scores (from the bfloat16 page in place by vdpbf16ps, or from the
// tile's float32 copy in s.keys), then the softmax update and the values (s.values).
template <int NB, typename T>
void wide_tile(Scratch& s, const Rows& rows, const T* keys, int64_t stride, int64_t D, int64_t key0, const Step& st) {
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (rows.pairs) {
      wide_scores_bf16<NB>(s, keys, stride, D, st.scale);
      wide_update<NB>(s, s.values, D, key0, st.window);
      return;
    }
  }
#endif
  wide_scores<NB>(s, s.keys, D);
  wide_update<NB>(s, s.values, D, key0, st.window);
}

// wide_tile for rows of `vectors` vectors (1 to kMaxWideVectors), each count compiled on its own.
template <int NB, typename T>
void wide_tile_of(int vectors, Scratch& s, const Rows& rows, const T* keys, int64_t stride, int64_t D, int64_t key0,
                  const Step& st) {
  if constexpr (NB < kMaxWideVectors) {
    if (vectors > NB) return wide_tile_of<NB + 1>(vectors, s, rows, keys, stride, D, key0, st);
  }
  wide_tile<NB>(s, rows, keys, stride, D, key0, st);
}

}  // namespace sluice_cpu::attention
