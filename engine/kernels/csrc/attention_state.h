// What one step and one work item of the attention kernel hold: the step's lengths and tables,
// the tensors, the thread's float32 scratch, and how a tile of the cache reaches it.
#pragma once

#include "attention_vectors.h"

namespace sluice_cpu::attention {

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

  // Where slot `slot` of block `block` of `cache` (k or v) holds element `column` (head x D + d).
  const T* at(const T* cache, int64_t block, int64_t slot, int64_t column) const {
    return cache + block * kv_block + slot * kv_slot + column;
  }
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

// The next tile's rows of one cache (keys or values) from memory while this one computes.
template <typename T>
void prefetch_tile(const Tensors<T>& t, const T* cache, int64_t block, int64_t slot0, int64_t column,
                   int64_t width_bytes) {
  for (int j = 0; j < kKeyTile; ++j) {
    const char* row = reinterpret_cast<const char*>(t.at(cache, block, slot0 + j, column));
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
    to_float(t.at(cache, block, slot0 + j, item.head0 * st.head_dim), out + j * s.kv_stride, width);
  }
}

}  // namespace sluice_cpu::attention
