// Paged attention for CPU: every sequence of a step (prompt chunks and decode rows alike) attends
// over its cached context, read page by page in place from the paged KV cache.
//
// One work item is (sequence, KV head, tile of query positions): the G query heads that share the
// KV head, for up to kQueryTile positions, are R = G * tile rows that read each key and value page
// once (GQA's reuse; a decode row has R = G; with many decode rows, one item takes all KV heads of
// a sequence, so that it reads whole slots). Two ways through the pages, 16 keys at a time, both
// with flash attention's online softmax (running max and sum) in float32:
// - wide rows (prompt tiles, R >= 16): scores vectorised over the rows, from each tile converted
//   to float32 once or, for bfloat16 where the CPU has AVX512-BF16, from the page in place by
//   vdpbf16ps (wide_scores, wide_scores_bf16), then the softmax and values (wide_update);
// - narrow rows (decode): spans of up to 256 keys, every row's scores first, then one softmax
//   update per row, then the values; float32 and bfloat16 pages read in place, the next tile
//   requested into L2 a few lines per row (narrow_item). Decode is bound by reading the cache.
// Items run on ATen's thread pool, taken from a shared counter in order of falling cost, so long
// prompt tiles do not leave a thread idle at the end of the step.
//
// Exact arithmetic: q.k, the softmax and p.v in float32 (the query is pre-multiplied by the
// scale), the output rounded once to the query's dtype. exp is a polynomial of its own (below),
// within ~2 ulp of std::exp, written so that the compiler vectorises the softmax loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <limits>
#include <type_traits>
#include <vector>



namespace {

using namespace sluice_cpu;

constexpr int kKeyTile = 16;       // keys per inner step; the page size must be a multiple
constexpr int kLanes = 16;         // floats per vector (GCC/Clang vector extension: any ISA)
constexpr int kMaxRows = 128;      // rows (query heads x positions) per work item
constexpr int kMaxHeadDim = 256;
constexpr int kMaxKvWidth = 2048;  // KV heads x head size read per key by one work item
constexpr int kWideRows = 16;      // from this many rows per KV head: vectorise over rows
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
__attribute__((always_inline)) static inline vfloat sum_lanes_16(vfloat v[16]) {
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

// exp(x) for x <= 0 (every softmax argument here is a score minus the running max), 16 lanes:
// cpu_common.h's exp_approx step for step, on vectors, and 0 below -87.
static inline vfloat exp_nonpositive(vfloat x) {
  const vint underflow = x < -87.0f;
  x = x < -87.0f ? splat(-87.0f) : x;
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
  const vfloat result = p * reinterpret_cast<const vfloat&>(bits);
  return underflow ? splat(0.0f) : result;
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

struct Step {
  const int32_t* cu_query_lens;  // [B + 1]
  const int32_t* context_lens;   // [B]
  const int32_t* block_tables;   // [B, table_width]
  int64_t table_width;
  int64_t block_size;
  int64_t num_heads, num_kv_heads, head_dim;
  int64_t window;  // keys at positions > pos - window are visible; 0: no window
  float scale;
};

// One sequence's query positions [first, last) of its chunk, for KV heads [head0, head1).
struct WorkItem {
  int32_t seq, head0, head1, first, last;
  int64_t cost;
};

template <typename T>
struct Tensors {
  const T* q;  // [T, H, D] with row stride q_row
  int64_t q_row, q_head;
  const T* k;  // [num_blocks, S, Hkv, D]
  const T* v;
  int64_t kv_block, kv_slot;  // strides of a block and of a slot (the head stride is D)
  T* out;  // [T, H, D] contiguous
};

// Thread-private float32 buffers of one work item. Rows: for each KV head of the item, for each
// query position, for each of the G query heads sharing the KV head.
struct Scratch {
  // The tile's keys and values, the item's heads side by side, rows kv_stride floats apart: the
  // width rounded up to whole vectors plus one, so that rows never sit a multiple of 4 KiB apart
  // (they would share L1 sets: with 8 KiB rows decode ran 1.x times slower).
  float keys[kKeyTile * (kMaxKvWidth + kLanes)];
  float values[kKeyTile * (kMaxKvWidth + kLanes)];
  int64_t kv_stride;
  float q[kMaxRows][kMaxHeadDim];  // narrow: row-major; wide: transposed, [D][wide_stride]
  float acc[kMaxRows][kMaxHeadDim];
  // Wide rows' row length: the padded rows plus one vector, so that the D rows of the transposed
  // query and accumulator are not 1 KiB apart (4 of them shared each L1 set, and the prompt
  // path ran at a third of its FMA rate).
  int64_t wide_stride;
  float* wide_q(int64_t d) { return &q[0][0] + d * wide_stride; }
  // bfloat16 pairs: dimensions 2 d2 and 2 d2 + 1 of each row's query, in the query's storage
  uint32_t* wide_qpair(int64_t d2) { return reinterpret_cast<uint32_t*>(&q[0][0]) + d2 * wide_stride; }
  float* wide_acc(int64_t d) { return &acc[0][0] + d * wide_stride; }
  float scores[kKeyTile][kMaxRows];  // wide: [key][row]
  alignas(64) float max[kMaxRows];
  alignas(64) float sum[kMaxRows];
  alignas(64) float pos[kMaxRows];  // the row's position (float: compared in vectors); -1: padding
  alignas(64) float span_scores[kMaxRows][kSpan];  // narrow: a span's scores, then probabilities
  alignas(64) float span_max[kMaxRows][kLanes];    // narrow: the span's running maximum, lane-wise
};

struct Rows {
  int count;    // rows per KV head
  int padded;   // wide: count rounded up to whole vectors
  bool wide;
  bool pairs;   // wide, bfloat16 scores by vdpbf16ps: the query held as bfloat16 pairs
};

// The keys [lo, hi) of the 16 from key0 that a narrow row sees: those at its position or before,
// within the window.
static inline void visible_keys(const Scratch& s, int row, int64_t key0, int64_t window, int& lo, int& hi) {
  const int64_t pos = static_cast<int64_t>(s.pos[row]);
  hi = static_cast<int>(std::clamp<int64_t>(pos + 1 - key0, 0, kKeyTile));
  lo = window > 0 ? static_cast<int>(std::clamp<int64_t>(pos - window + 1 - key0, 0, kKeyTile)) : 0;
}

// A narrow row's scores for 16 keys (rows `stride` elements apart), each a dot product over the
// head dimension; kNoMax for keys outside [lo, hi). ND: the head size in vectors, known at compile
// time (the query stays in registers; keys may be bfloat16, widened as loaded); 0: any head size,
// float32 keys.
template <int ND, typename P>
__attribute__((always_inline)) static inline vfloat narrow_scores(const float* q, const P* keys, int64_t stride, int64_t D, int lo, int hi) {
  static_assert(ND > 0 || std::is_same_v<P, float>, "any head size: float32 keys");
  vfloat scores;
  if constexpr (ND > 0) {
    vfloat qv[ND], dots[kKeyTile];
    for (int c = 0; c < ND; ++c) qv[c] = load(q + c * kLanes);
    for (int j = 0; j < kKeyTile; ++j) {  // all 16 (the invisible ones are masked below)
      const P* k = keys + j * stride;
      dots[j] = qv[0] * load(k);
      for (int c = 1; c < ND; ++c) dots[j] += qv[c] * load(k + c * kLanes);
    }
    scores = sum_lanes_16(dots);
  } else {
    for (int j = 0; j < kKeyTile; ++j) {
      const float* k = keys + j * stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
      scores[j] = dot;
    }
  }
  vfloat index;
  for (int j = 0; j < kKeyTile; ++j) index[j] = static_cast<float>(j);
  const vint visible = (index >= static_cast<float>(lo)) & (index < static_cast<float>(hi));
  return visible ? scores : splat(kNoMax);
}

// acc += p[j] * value j over the keys [lo, hi), in two chains (even and odd keys) so that the
// FMAs' latency overlaps.
template <int ND, typename P>
__attribute__((always_inline)) static inline void narrow_values(float* acc, const P* values, int64_t stride, int64_t D, const float* p, int lo,
                                 int hi) {
  static_assert(ND > 0 || std::is_same_v<P, float>, "any head size: float32 values");
  if constexpr (ND > 0) {
    vfloat a[ND], b[ND];
    for (int c = 0; c < ND; ++c) {
      a[c] = load(acc + c * kLanes);
      b[c] = splat(0.0f);
    }
    int j = lo;
    for (; j + 1 < hi; j += 2) {
      const P* v0 = values + j * stride;
      const P* v1 = v0 + stride;
      for (int c = 0; c < ND; ++c) {
        a[c] += p[j] * load(v0 + c * kLanes);
        b[c] += p[j + 1] * load(v1 + c * kLanes);
      }
    }
    if (j < hi) {
      for (int c = 0; c < ND; ++c) a[c] += p[j] * load(values + j * stride + c * kLanes);
    }
    for (int c = 0; c < ND; ++c) store(acc + c * kLanes, a[c] + b[c]);
  } else {
    for (int j = lo; j < hi; ++j) {
      const float pj = p[j];
      const float* v = values + j * stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += pj * v[d];
    }
  }
}

// Wide rows (prompt tiles): vectorised over rows, the query and accumulator held transposed, so a
// key's scores for 16 rows are 16-lane FMAs over the head dimension with the key's values
// broadcast: no horizontal sums, no transposed keys. NB: row vectors (1-4), at compile time, so
// the 2 x NB independent accumulators of each loop stay in registers.
template <int NB>
static inline void wide_scores(Scratch& s, const float* keys_h, int64_t D) {
  const int64_t stride = s.kv_stride;
  constexpr int kKeys = 4;  // keys per pass: each query vector loaded feeds 4 FMAs
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
    vint visible[kKeyTile];
    for (int j = 0; j < kKeyTile; ++j) {
      const float key = static_cast<float>(key0 + j);
      visible[j] = key <= pos;
      if (window > 0) visible[j] &= key > pos - static_cast<float>(window);
      const vfloat sc = load(s.scores[j] + rb);
      tile_max = visible[j] ? (sc > tile_max ? sc : tile_max) : tile_max;
    }
    alpha[b] = exp_nonpositive(old_max - tile_max);
    vfloat tile_sum = splat(0.0f);
    for (int j = 0; j < kKeyTile; ++j) {
      const vfloat p = visible[j] ? exp_nonpositive(load(s.scores[j] + rb) - tile_max) : splat(0.0f);
      store(s.scores[j] + rb, p);
      tile_sum += p;
    }
    store(s.sum + rb, load(s.sum + rb) * alpha[b] + tile_sum);
    store(s.max + rb, tile_max);
  }
  constexpr int kDims = 4;  // head dimensions per pass: each probability vector feeds 4 FMAs
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

// The next tile's rows of one cache (keys or values) from memory while this one computes.
template <typename T>
void prefetch_tile(const Tensors<T>& t, const T* cache, int64_t block, int64_t slot0, int64_t column,
                   int64_t width_bytes) {
  for (int j = 0; j < kKeyTile; ++j) {
    const char* row = reinterpret_cast<const char*>(cache + block * t.kv_block + (slot0 + j) * t.kv_slot + column);
    for (int64_t b = 0; b < width_bytes; b += 64) __builtin_prefetch(row + b);
  }
}

// A tile of one cache (keys or values), the item's heads side by side, to float32 rows of
// s.kv_stride floats.
template <typename T>
void load_tile(const Tensors<T>& t, const T* cache, const Step& st, const WorkItem& item, int64_t block,
               int64_t slot0, Scratch& s, float* out) {
  const int64_t width = (item.head1 - item.head0) * st.head_dim;
  s.kv_stride = (width + kLanes - 1) / kLanes * kLanes + kLanes;
  for (int j = 0; j < kKeyTile; ++j) {
    to_float(cache + block * t.kv_block + (slot0 + j) * t.kv_slot + item.head0 * st.head_dim, out + j * s.kv_stride,
             width);
  }
}

template <typename T>
void start_rows(const Tensors<T>& t, const Step& st, const WorkItem& item, const Rows& rows, Scratch& s) {
  const int64_t D = st.head_dim, G = st.num_heads / st.num_kv_heads;
  const int64_t query_start = st.cu_query_lens[item.seq];
  const int64_t query_len = st.cu_query_lens[item.seq + 1] - query_start;
  const int64_t context_len = st.context_lens[item.seq];
  const int total = rows.wide ? rows.padded : rows.count * (item.head1 - item.head0);
  s.wide_stride = rows.padded + kLanes;
  for (int r = 0; r < total; ++r) {
    s.max[r] = kNoMax;
    s.sum[r] = 0.0f;
    s.pos[r] = -1.0f;
  }
  alignas(64) float q[kMaxHeadDim];
  for (int64_t h = item.head0; h < item.head1; ++h) {
    for (int r = 0; r < rows.count; ++r) {
      const int64_t i = item.first + r / G, head = h * G + r % G;
      const int row = static_cast<int>((h - item.head0) * rows.count + r);
      s.pos[row] = static_cast<float>(context_len - query_len + i);  // it sees keys [.., pos]
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (rows.pairs) {
          const T* src = t.q + (query_start + i) * t.q_row + head * t.q_head;
          for (int64_t d2 = 0; d2 < D / 2; ++d2) std::memcpy(s.wide_qpair(d2) + row, src + 2 * d2, sizeof(uint32_t));
          continue;
        }
      }
      float* dst = rows.wide ? q : s.q[row];
      to_float(t.q + (query_start + i) * t.q_row + head * t.q_head, dst, D);
      for (int64_t d = 0; d < D; ++d) dst[d] *= st.scale;
      if (rows.wide) {
        for (int64_t d = 0; d < D; ++d) s.wide_q(d)[row] = q[d];
      }
    }
  }
  if (rows.pairs) {
    for (int64_t d2 = 0; d2 < D / 2; ++d2) std::fill(s.wide_qpair(d2) + rows.count, s.wide_qpair(d2) + rows.padded, 0u);
  }
  if (rows.wide) {
    for (int64_t d = 0; d < D; ++d) {
      if (!rows.pairs) std::fill(s.wide_q(d) + rows.count, s.wide_q(d) + rows.padded, 0.0f);
      std::fill(s.wide_acc(d), s.wide_acc(d) + rows.padded, 0.0f);
    }
  } else {
    for (int r = 0; r < total; ++r) std::fill(s.acc[r], s.acc[r] + D, 0.0f);
  }
}

template <typename T>
void finish_rows(const Tensors<T>& t, const Step& st, const WorkItem& item, const Rows& rows, Scratch& s) {
  const int64_t D = st.head_dim, G = st.num_heads / st.num_kv_heads;
  const int64_t query_start = st.cu_query_lens[item.seq];
  for (int64_t h = item.head0; h < item.head1; ++h) {
    for (int r = 0; r < rows.count; ++r) {
      const int64_t i = item.first + r / G, head = h * G + r % G;
      const int row = static_cast<int>((h - item.head0) * rows.count + r);
      T* out = t.out + ((query_start + i) * st.num_heads + head) * D;
      const float inv = s.sum[row] > 0.0f ? 1.0f / s.sum[row] : 0.0f;
      alignas(64) float result[kMaxHeadDim];
      for (int64_t d = 0; d < D; ++d) result[d] = (rows.wide ? s.wide_acc(d)[row] : s.acc[row][d]) * inv;
      from_float(result, out, D);
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
      return cache + block * t.kv_block + slot0 * t.kv_slot + item.head0 * D;
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
    ahead = reinterpret_cast<const char*>(cache + table[key0 / st.block_size] * t.kv_block +
                                          key0 % st.block_size * t.kv_slot + item.head0 * D);
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
        const vfloat sc = narrow_scores<ND>(s.q[row], k, stride, D, lo, hi);
        store(s.span_scores[row] + (key0 - span0), sc);
        const vfloat m = load(s.span_max[row]);
        store(s.span_max[row], sc > m ? sc : m);
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

template <typename T>
void run_item(const Tensors<T>& t, const Step& st, const WorkItem& item, Scratch& s) {
  const int64_t D = st.head_dim, G = st.num_heads / st.num_kv_heads;
  Rows rows;
  rows.count = static_cast<int>((item.last - item.first) * G);
  rows.wide = rows.count >= kWideRows;  // (planned with one KV head per item)
  rows.padded = (rows.count + kLanes - 1) / kLanes * kLanes;
  rows.pairs = kBf16Pairs && std::is_same_v<T, c10::BFloat16> && rows.wide && D % 2 == 0;
  start_rows(t, st, item, rows, s);
  const int64_t query_len = st.cu_query_lens[item.seq + 1] - st.cu_query_lens[item.seq];
  const int64_t context_len = st.context_lens[item.seq];
  const int64_t first_pos = context_len - query_len + item.first;
  const int64_t last_pos = context_len - query_len + item.last - 1;
  const int64_t first_key = st.window > 0 ? std::max<int64_t>(0, first_pos - st.window + 1) : 0;
  if (!rows.wide) {
    switch (D) {
      case 16: narrow_item<1>(t, st, item, rows, s, first_key, last_pos); break;
      case 32: narrow_item<2>(t, st, item, rows, s, first_key, last_pos); break;
      case 64: narrow_item<4>(t, st, item, rows, s, first_key, last_pos); break;
      case 128: narrow_item<8>(t, st, item, rows, s, first_key, last_pos); break;
      default: narrow_item<0>(t, st, item, rows, s, first_key, last_pos); break;
    }
    finish_rows(t, st, item, rows, s);
    return;
  }
  const int32_t* table = st.block_tables + item.seq * st.table_width;
  const int64_t width_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t key0 = first_key / kKeyTile * kKeyTile; key0 <= last_pos; key0 += kKeyTile) {
    const int64_t block = table[key0 / st.block_size], slot0 = key0 % st.block_size;
    if (key0 + kKeyTile <= last_pos) {  // the next tile's rows from memory while this one computes
      const int64_t next = key0 + kKeyTile;
      for (const T* cache : {t.k, t.v}) {
        prefetch_tile(t, cache, table[next / st.block_size], next % st.block_size, item.head0 * D, width_bytes);
      }
    }
    const T* keys = t.k + block * t.kv_block + slot0 * t.kv_slot + item.head0 * D;
    if (!rows.pairs) load_tile(t, t.k, st, item, block, slot0, s, s.keys);
    load_tile(t, t.v, st, item, block, slot0, s, s.values);
    switch (rows.padded / kLanes) {
      case 1: wide_tile<1>(s, rows, keys, t.kv_slot, D, key0, st); break;
      case 2: wide_tile<2>(s, rows, keys, t.kv_slot, D, key0, st); break;
      case 3: wide_tile<3>(s, rows, keys, t.kv_slot, D, key0, st); break;
      default: wide_tile<4>(s, rows, keys, t.kv_slot, D, key0, st); break;
    }
  }
  finish_rows(t, st, item, rows, s);
}

std::vector<WorkItem> plan(const Step& st, int64_t num_seqs, int64_t threads) {
  const int64_t G = st.num_heads / st.num_kv_heads;
  const int64_t tile = std::max<int64_t>(1, 64 / G);
  // A decode row reads all KV heads of its pages in one item (whole slots, in order) when there
  // are enough sequences to keep every thread busy and the item's rows fit the scratch.
  const bool whole_slots = num_seqs >= 4 * threads && st.num_heads <= kMaxRows &&
                           st.num_kv_heads * st.head_dim <= kMaxKvWidth;
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t query_len = st.cu_query_lens[b + 1] - st.cu_query_lens[b];
    const int64_t context_len = st.context_lens[b];
    for (int64_t first = 0; first < query_len; first += tile) {
      const int64_t last = std::min(query_len, first + tile);
      const int64_t keys = context_len - query_len + last;  // the tile's last row sees these
      const int64_t visible = st.window > 0 ? std::min(keys, st.window + (last - first)) : keys;
      const int64_t step = (query_len == 1 && whole_slots) ? st.num_kv_heads : 1;
      for (int64_t h = 0; h < st.num_kv_heads; h += step) {
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(h + step),
                         static_cast<int32_t>(first), static_cast<int32_t>(last),
                         visible * (last - first + 1) * step});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

template <typename T>
void run(const Tensors<T>& t, const Step& st, const std::vector<WorkItem>& items, int64_t threads) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) {
    thread_local std::unique_ptr<Scratch> scratch(new Scratch);  // ~0.5 MB, once per thread
    for (int64_t i = next++; i < n; i = next++) run_item(t, st, items[i], *scratch);
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                           const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged_attention: q [T, H, D], caches [N, S, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the caches must have one dtype");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes(),
              "paged_attention: k and v caches must have one layout");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3),
              "paged_attention: the head dimension must be contiguous");
  for (const auto* index : {&block_tables, &cu_query_lens, &context_lens}) {
    TORCH_CHECK(index->scalar_type() == at::kInt && index->is_contiguous(),
                "paged_attention: block tables and lengths must be contiguous int32");
  }
  Step st;
  st.cu_query_lens = cu_query_lens.data_ptr<int32_t>();
  st.context_lens = context_lens.data_ptr<int32_t>();
  st.block_tables = block_tables.data_ptr<int32_t>();
  st.table_width = block_tables.size(1);
  st.block_size = k_cache.size(1);
  st.num_heads = q.size(1);
  st.num_kv_heads = k_cache.size(2);
  st.head_dim = q.size(2);
  st.window = window;
  st.scale = static_cast<float>(scale);
  TORCH_CHECK(st.block_size % kKeyTile == 0, "paged_attention: the page size must be a multiple of 16");
  TORCH_CHECK(st.head_dim <= kMaxHeadDim && k_cache.size(3) == st.head_dim, "paged_attention: head size");
  TORCH_CHECK(st.num_heads % st.num_kv_heads == 0 && st.num_heads / st.num_kv_heads <= 64,
              "paged_attention: at most 64 query heads per KV head");
  const int64_t num_seqs = context_lens.size(0);
  TORCH_CHECK(cu_query_lens.size(0) == num_seqs + 1 && block_tables.size(0) >= num_seqs,
              "paged_attention: one block table and length per sequence");
  auto out = at::empty({q.size(0), st.num_heads, st.head_dim}, q.options());
  const int64_t threads = at::get_num_threads();
  const auto items = plan(st, num_seqs, threads);
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    Tensors<T> t{q.data_ptr<T>(), q.stride(0), q.stride(1), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
                 k_cache.stride(0), k_cache.stride(1), out.data_ptr<T>()};
    run(t, st, items, threads);
  };
  dispatch_float(q.scalar_type(), "paged_attention", launch);
  return out;
}

}  // namespace

TORCH_LIBRARY(sluice_cpu, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor cu_query_lens, Tensor context_lens, float scale, int window) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
}
