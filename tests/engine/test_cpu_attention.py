"""The CPU paged attention kernel (engine/kernels/csrc/paged_attention.cpp) computes attention as
the SDPA reference over gathered pages does, for every kind of sequence a step holds."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import cpu_kernels
from engine.layers.attention_backends import CpuAttentionBackend, SdpaBackend


def test_the_kernels_build_on_this_machine():
    # the project's machines have a C++ compiler: a failed build is a failure here, never a skip
    assert cpu_kernels.load()


TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_step(seqs, *, heads, kv_heads, head_dim, block_size=16, dtype=torch.float32, num_blocks=256, seed=0):
    """seqs: (context length, query length) per sequence, pages scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    width = max(-(-context // block_size) for context, _ in seqs)
    tables = torch.randperm(num_blocks, generator=gen)[: len(seqs) * width].view(len(seqs), width).int()
    query_lens = torch.tensor([query for _, query in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]).int()
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor([context for context, _ in seqs], dtype=torch.int32)
    return q, k_cache, v_cache, tables, cu, context_lens


def reference(q, k_cache, v_cache, tables, cu, context_lens, scale, window=None):
    """SDPA in float64 over each sequence's gathered pages, causal, bottom-right aligned."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    outs = []
    for b, context in enumerate(context_lens.tolist()):
        queries = q[cu[b] : cu[b + 1]].double()
        pages = tables[b, : -(-context // block_size)].long()
        keys = k_cache[pages].reshape(-1, kv_heads, head_dim)[:context].double()
        values = v_cache[pages].reshape(-1, kv_heads, head_dim)[:context].double()
        query_pos = torch.arange(context - len(queries), context).unsqueeze(1)
        key_pos = torch.arange(context).unsqueeze(0)
        mask = key_pos <= query_pos
        if window:
            mask &= key_pos > query_pos - window
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def check(seqs, window=None, dtype=torch.float32, **shape):
    step = make_step(seqs, dtype=dtype, **shape)
    scale = shape["head_dim"] ** -0.5
    out = cpu_kernels.paged_attention(*step, scale, window)
    expected = reference(*step, scale, window)
    assert out.dtype == dtype and out.shape == step[0].shape
    error = (out.double() - expected).abs().max().item()
    assert error < TOLERANCE[dtype], f"max error {error}"


# (context, query): a fresh prompt, a chunk over cached context, decode rows, a prefix-cache hit
MIXED_STEP = [(37, 37), (300, 1), (5, 1), (16, 16), (200, 70), (129, 1), (64, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_mixed_step_equals_sdpa_over_gathered_pages(dtype):
    check(MIXED_STEP, dtype=dtype, heads=12, kv_heads=4, head_dim=64)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16]
)  # bfloat16: vdpbf16ps prompt scores where the CPU has them
@pytest.mark.parametrize("head_dim", [16, 32, 80, 128])
def test_every_head_size_equals_sdpa(head_dim, dtype):
    check(MIXED_STEP, dtype=dtype, heads=8, kv_heads=2, head_dim=head_dim)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 1), (32, 4), (64, 1)])
def test_multi_query_grouped_and_multi_head_attention_equal_sdpa(heads, kv_heads):
    check(MIXED_STEP, heads=heads, kv_heads=kv_heads, head_dim=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 24, 100])
def test_a_sliding_window_hides_the_keys_before_it(window, dtype):
    check(MIXED_STEP, window=window, dtype=dtype, heads=6, kv_heads=2, head_dim=32)


def test_pages_of_32_keys_are_read_as_two_tiles():
    check(MIXED_STEP, heads=6, kv_heads=2, head_dim=32, block_size=32)


def test_many_decode_rows_read_whole_slots_and_equal_sdpa():
    # >= 4 sequences per thread: one work item per sequence covers all KV heads
    seqs = [(17 + 11 * i, 1) for i in range(40)]  # up to 446 keys: 28 pages each
    check(seqs, dtype=torch.bfloat16, heads=12, kv_heads=4, head_dim=64, num_blocks=1200)


# Decode rows score up to 256 keys before each softmax update: contexts on both sides of those
# spans, windows that start inside one or skip whole spans.
SPAN_STEP = [(255, 1), (256, 1), (257, 1), (512, 1), (513, 2), (700, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 100, 300])
def test_decode_rows_across_score_spans_equal_sdpa(dtype, window):
    check(SPAN_STEP, window=window, dtype=dtype, heads=12, kv_heads=4, head_dim=64, num_blocks=512)


@pytest.mark.parametrize("head_dim", [64, 80])  # in place and through the float32 copy
def test_slots_past_the_context_are_never_read_into_the_result(head_dim):
    # a page's slots past its sequence's context hold whatever was there: NaN must not leak in
    q, k_cache, v_cache, tables, cu, context_lens = make_step(
        [(37, 1), (300, 1), (129, 3)], heads=8, kv_heads=2, head_dim=head_dim, dtype=torch.bfloat16
    )
    expected = reference(q, k_cache, v_cache, tables, cu, context_lens, 0.125)
    for b, context in enumerate(context_lens.tolist()):
        last_page = tables[b, (context - 1) // 16].item()
        k_cache[last_page, context % 16 or 16 :] = float("nan")
        v_cache[last_page, context % 16 or 16 :] = float("nan")
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, tables, cu, context_lens, 0.125, None)
    assert (out.double() - expected).abs().max().item() < TOLERANCE[torch.bfloat16]


def test_the_result_does_not_depend_on_the_thread_count():
    step = make_step(MIXED_STEP, heads=12, kv_heads=4, head_dim=64, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.paged_attention(*step, 0.125, None)
        torch.set_num_threads(2)
        two = cpu_kernels.paged_attention(*step, 0.125, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_a_padding_row_with_no_context_reads_nothing_and_gives_zeros():
    q, k_cache, v_cache, tables, cu, context_lens = make_step(
        [(40, 1), (40, 1)], heads=4, kv_heads=2, head_dim=16
    )
    context_lens[1] = 0  # a padded decode row (CUDA-graph style): no keys
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, tables, cu, context_lens, 0.25, None)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_a_page_size_the_kernel_cannot_tile_is_refused_by_name():
    step = make_step([(20, 20)], heads=2, kv_heads=1, head_dim=16, block_size=8)
    with pytest.raises(RuntimeError, match="page size must be a multiple of 16"):
        cpu_kernels.paged_attention(*step, 0.25, None)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    prompts = [[1, *range(5, 5 + n)] for n in (3, 40, 97, 160)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(**options):
        # max_num_batched_tokens 64: prompts arrive in chunks over cached context
        engine = LLMEngine(
            EngineConfig(model=str(tiny_checkpoint), dtype="float32", max_num_batched_tokens=64, **options)
        )
        outputs = engine.generate(prompts, params, use_tqdm=False)
        return engine, [o.token_ids for o in outputs]

    return run


def test_the_engine_uses_the_kernel_on_cpu_and_decodes_as_sdpa_does(engines):
    with_kernel, tokens = engines()
    without, sdpa_tokens = engines(attention_backend="sdpa")
    assert isinstance(with_kernel.runner.layers[0].backend, CpuAttentionBackend)
    assert type(without.runner.layers[0].backend) is SdpaBackend
    assert tokens == sdpa_tokens


def test_an_engine_where_the_kernel_cannot_be_built_says_why_and_uses_sdpa(engines, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)  # not tried yet in this process
    monkeypatch.setattr(cpu_kernels, "_failure", None)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.INFO):
        engine, tokens = engines()
    assert engine.attention_backend == "sdpa"
    assert type(engine.runner.layers[0].backend) is SdpaBackend
    assert (
        caplog.text.count("CPU kernels unavailable (RuntimeError: no C++ compiler); using PyTorch's ops") == 1
    )
    assert "attention backend: sdpa, not the CPU paged kernel: the kernel is unavailable here" in caplog.text
    assert tokens == engines(attention_backend="sdpa")[1]
