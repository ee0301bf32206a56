// Narrow rows (decode: G rows per KV head; a prompt chunk's last few positions): dot products over
// spans of up to kSpan keys, float32 and bfloat16 pages read in place.
#pragma once

#include "attention_state.h"

#include <type_traits>

namespace sluice_cpu::attention {

// The keys [lo, hi) of the 16 from key0 that a narrow row sees: those at its position or before,
// within the window.
static inline void visible_keys(const Scratch& s, int row, int64_t key0, int64_t window, int& lo, int& hi) {
  const int64_t pos = static_cast<int64_t>(s.pos[row]);
  hi = static_cast<int>(std::clamp<int64_t>(pos + 1 - key0, 0, kKeyTile));
  lo = window > 0 ? static_cast<int>(std::clamp<int64_t>(pos - window + 1 - key0, 0, kKeyTile)) : 0;
}

// A narrow row's scores for the 16 keys from key0 (rows `stride` elements apart), each a dot
// product over the head dimension, written to out[0, 16); kNoMax for keys outside [lo, hi). The
// row's lane-wise running maximum (one vector) takes them in. ND: the head size in vectors, known
// at compile time (keys may be bfloat16, widened as loaded); 0: any head size, float32 keys.
// AVX-512: the query stays in registers (ND + 16 accumulators of 32 zmm) and one vector holds the
// 16 scores. AVX2: two halves of 8 keys, each with 8 accumulators and one query vector at a time
// (10 of 16 ymm; holding the query too spilled from a head size of 64).
template <int ND, typename P>
__attribute__((always_inline)) static inline void narrow_scores(const float* q, const P* keys, int64_t stride, int64_t D, int lo,
                                                                int hi, float* out, float* running_max) {
  static_assert(ND > 0 || std::is_same_v<P, float>, "any head size: float32 keys");
  for (int half = 0; half < kVectorsPerTile; ++half) {
    const int j0 = half * kLanes;
    vfloat scores;
    if constexpr (ND > 0 && kLanes == 16) {
      vfloat qv[ND], dots[kLanes];
      for (int c = 0; c < ND; ++c) qv[c] = load(q + c * kLanes);
      for (int j = 0; j < kLanes; ++j) {  // all of them (the invisible ones are masked below)
        const P* k = keys + (j0 + j) * stride;
        dots[j] = qv[0] * load(k);
        for (int c = 1; c < ND; ++c) dots[j] += qv[c] * load(k + c * kLanes);
      }
      scores = sum_lanes(dots);
    } else if constexpr (ND > 0) {
      vfloat dots[kLanes];
      const vfloat q0 = load(q);
      for (int j = 0; j < kLanes; ++j) dots[j] = q0 * load(keys + (j0 + j) * stride);
      for (int c = 1; c < ND; ++c) {  // 8 independent chains of FMAs
        const vfloat qc = load(q + c * kLanes);
        for (int j = 0; j < kLanes; ++j) dots[j] += qc * load(keys + (j0 + j) * stride + c * kLanes);
      }
      scores = sum_lanes(dots);
    } else {
      for (int j = 0; j < kLanes; ++j) {
        const float* k = keys + (j0 + j) * stride;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
        scores[j] = dot;
      }
    }
    vfloat index;
    for (int j = 0; j < kLanes; ++j) index[j] = static_cast<float>(j0 + j);
    const vint visible = (index >= static_cast<float>(lo)) & (index < static_cast<float>(hi));
    scores = visible ? scores : splat(kNoMax);
    store(out + j0, scores);
    const vfloat m = load(running_max);
    store(running_max, scores > m ? scores : m);
  }
}

// acc += p[j] * value j over the keys [lo, hi), in two chains (even and odd keys) so that the
// FMAs' latency overlaps.
template <int ND, typename P>
__attribute__((always_inline)) static inline void narrow_values(float* acc, const P* values, int64_t stride, int64_t D, const float* p, int lo,
                                 int hi) {
  static_assert(ND > 0 || std::is_same_v<P, float>, "any head size: float32 values");
  if constexpr (ND > 0) {
    // AVX-512: the whole head (2 ND of 32 zmm); AVX2: 4 vectors at a time (8 of 16 ymm)
    constexpr int kChunk = kLanes == 16 || ND < 4 ? ND : 4;
    for (int c0 = 0; c0 < ND; c0 += kChunk) {
      vfloat a[kChunk], b[kChunk];
      for (int c = 0; c < kChunk; ++c) {
        a[c] = load(acc + (c0 + c) * kLanes);
        b[c] = splat(0.0f);
      }
      int j = lo;
      for (; j + 1 < hi; j += 2) {
        const P* v0 = values + j * stride + c0 * kLanes;
        const P* v1 = v0 + stride;
        for (int c = 0; c < kChunk; ++c) {
          a[c] += p[j] * load(v0 + c * kLanes);
          b[c] += p[j + 1] * load(v1 + c * kLanes);
        }
      }
      if (j < hi) {
        for (int c = 0; c < kChunk; ++c) a[c] += p[j] * load(values + j * stride + (c0 + c) * kLanes);
      }
      for (int c = 0; c < kChunk; ++c) store(acc + (c0 + c) * kLanes, a[c] + b[c]);
    }
  } else {
    for (int j = lo; j < hi; ++j) {
      const float pj = p[j];
      const float* v = values + j * stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += pj * v[d];
    }
  }
}

// Narrow rows (decode: G rows per KV head; a prompt chunk's last few positions), span by span of
// up to kSpan keys: every row's scores first (each key tile read once for all the item's rows),
// then one online-softmax update per row, then the values (each tile read once). The softmax's
// serial steps (maximum, rescale, sum) run once per span, not once per 16 keys. Float32 and
// bfloat16 pages are read in place when the head size is whole vectors; otherwise through the
// tile's float32 copy.
template <int ND, typename T>
void narrow_item(const Tensors<T>& t, const Step& st, const WorkItem& item, const Rows& rows, Scratch& s,
                 int64_t first_key, int64_t last_pos) {
  constexpr bool kInPlace = ND > 0 && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
  using P = std::conditional_t<kInPlace, T, float>;
  const int64_t D = st.head_dim;
  const int heads = item.head1 - item.head0, total = heads * rows.count;
  const int32_t* table = st.block_tables + item.seq * st.table_width;
  const int64_t width_bytes = heads * D * static_cast<int64_t>(sizeof(T));
  // The tile of keys or values from key0: its rows, and the elements between them.
  const auto tile = [&](const T* cache, float* copy, int64_t key0, int64_t& stride) -> const P* {
    const int64_t block = table[key0 / st.block_size], slot0 = key0 % st.block_size;
    if constexpr (kInPlace) {
      stride = t.kv_slot;
      return t.at(cache, block, slot0, item.head0 * D);
    } else {
      load_tile(t, cache, st, item, block, slot0, s, copy);
      stride = s.kv_stride;
      return copy;
    }
  };
  // The next tile's cache lines, requested into L2 a few at a time between rows: all at once,
  // the prefetches stalled on full miss buffers (a third of the decode time went there).
  const int64_t row_lines = (width_bytes + 63) / 64;
  const int64_t lines_per_row = (kKeyTile * row_lines + total - 1) / total;
  const int64_t slot_bytes = t.kv_slot * static_cast<int64_t>(sizeof(T));
  const char* ahead = nullptr;
  int ahead_key = kKeyTile;  // the key (of 16) and line of it to request next
  int64_t ahead_line = 0;
  const auto prefetch = [&](const T* cache, int64_t key0) {
    const T* row = t.at(cache, table[key0 / st.block_size], key0 % st.block_size, item.head0 * D);
    ahead = reinterpret_cast<const char*>(row);
    ahead_key = 0;
    ahead_line = 0;
  };
  const auto prefetch_some = [&]() {
    for (int64_t n = 0; n < lines_per_row && ahead_key < kKeyTile; ++n) {
      __builtin_prefetch(ahead + ahead_key * slot_bytes + ahead_line * 64, 0, 1);  // into L2
      if (++ahead_line == row_lines) {
        ahead_line = 0;
        ++ahead_key;
      }
    }
  };
  for (int64_t span0 = first_key / kKeyTile * kKeyTile; span0 <= last_pos; span0 += kSpan) {
    const int64_t span1 = std::min<int64_t>(span0 + kSpan, last_pos + 1);
    for (int r = 0; r < total; ++r) store(s.span_max[r], splat(kNoMax));
    for (int64_t key0 = span0; key0 < span1; key0 += kKeyTile) {
      if (key0 + kKeyTile < span1) {
        prefetch(t.k, key0 + kKeyTile);
      } else {
        prefetch(t.v, span0);
      }
      int64_t stride;
      const P* keys = tile(t.k, s.keys, key0, stride);
      for (int row = 0; row < total; ++row) {
        prefetch_some();
        int lo, hi;
        visible_keys(s, row, key0, st.window, lo, hi);
        const P* k = keys + (row / rows.count) * D;
        narrow_scores<ND>(s.q[row], k, stride, D, lo, hi, s.span_scores[row] + (key0 - span0), s.span_max[row]);
      }
    }
    const int64_t filled = (span1 - span0 + kKeyTile - 1) / kKeyTile * kKeyTile;
    for (int row = 0; row < total; ++row) {
      const float new_max = std::max(s.max[row], hmax(load(s.span_max[row])));
      if (new_max == kNoMax) continue;  // nothing visible yet: the values below skip it too
      const float alpha = exp_nonpositive(s.max[row] - new_max);
      float* p = s.span_scores[row];
      vfloat sum = splat(0.0f);
      for (int64_t i = 0; i < filled; i += kLanes) {  // invisible keys (kNoMax) give 0
        const vfloat e = exp_nonpositive(load(p + i) - new_max);
        store(p + i, e);
        sum += e;
      }
      s.sum[row] = s.sum[row] * alpha + hsum(sum);
      s.max[row] = new_max;
      for (int64_t d = 0; d < D; ++d) s.acc[row][d] *= alpha;
    }
    for (int64_t key0 = span0; key0 < span1; key0 += kKeyTile) {
      if (key0 + kKeyTile < span1) {
        prefetch(t.v, key0 + kKeyTile);
      } else if (span1 <= last_pos) {
        prefetch(t.k, span1);
      }
      int64_t stride;
      const P* values = tile(t.v, s.values, key0, stride);
      for (int row = 0; row < total; ++row) {
        prefetch_some();
        int lo, hi;
        visible_keys(s, row, key0, st.window, lo, hi);
        if (lo >= hi) continue;
        const P* v = values + (row / rows.count) * D;
        narrow_values<ND>(s.acc[row], v, stride, D, s.span_scores[row] + (key0 - span0), lo, hi);
      }
    }
  }
}

}  // namespace sluice_cpu::attention
