// Paged attention for CPU: every sequence of a step (prompt chunks and decode rows alike) attends
// over its cached context, read page by page in place from the paged KV cache.
// x86 only: it includes immintrin.h (attention_vectors.h: AVX-512 and AVX512-BF16 intrinsics where
// the CPU has them), so on any other machine engine/kernels/cpu_kernels.py does not build it and
// the engine runs PyTorch's ops.
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
// scale; vdpbf16ps prompt scores, exact bfloat16 products summed in float32, are scaled after),
// the output rounded once to the query's dtype. exp is a polynomial of its own (cpu_common.h),
// within ~2 ulp of std::exp, written so that the compiler vectorises the softmax loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_decode.h"
#include "attention_prompt.h"
#include "attention_state.h"
#include "attention_vectors.h"
#include "cpu_common.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using namespace sluice_cpu;
using namespace sluice_cpu::attention;

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
      case 16: narrow_item<16 / kLanes>(t, st, item, rows, s, first_key, last_pos); break;
      case 32: narrow_item<32 / kLanes>(t, st, item, rows, s, first_key, last_pos); break;
      case 64: narrow_item<64 / kLanes>(t, st, item, rows, s, first_key, last_pos); break;
      case 128: narrow_item<128 / kLanes>(t, st, item, rows, s, first_key, last_pos); break;
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
    const T* keys = t.at(t.k, block, slot0, item.head0 * D);
    if (!rows.pairs) load_tile(t, t.k, st, item, block, slot0, s, s.keys);
    load_tile(t, t.v, st, item, block, slot0, s, s.values);
    wide_tile_of<1>(rows.padded / kLanes, s, rows, keys, t.kv_slot, D, key0, st);
  }
  finish_rows(t, st, item, rows, s);
}

std::vector<WorkItem> plan(const Step& st, int64_t num_seqs, int64_t threads) {
  const int64_t G = st.num_heads / st.num_kv_heads;
  // Query positions per prompt tile: kWideTileRows rows (G per position), more where G is larger.
  const int64_t tile = std::max<int64_t>(1, kWideTileRows / G);
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

