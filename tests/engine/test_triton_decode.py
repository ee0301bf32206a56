"""The Triton paged decode kernel and the CUDA-graph decode path, checked on CPU.

The kernel runs on CPU under Triton's interpreter, which must be switched on before triton
is imported: each check runs in a fresh interpreter process with TRITON_INTERPRET=1. The
CUDA-graph path runs with use_graphs=False: the same static buffers, padding rows and
scratch slot the captured graphs use, executed eagerly.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.executor.cuda_graphs import capture_sizes
from tests.engine.triton_interpreted import run_interpreted


@pytest.mark.parametrize("block_size", [16, 32])
def test_kernel_matches_the_sdpa_decode_path(block_size):
    out = run_interpreted(
        f"""
        import torch
        from types import SimpleNamespace
        from tests.engine.triton_interpreted import decode_metadata
        from engine.layers.attention_backends import SdpaBackend
        from engine.kernels.triton_attention import paged_decode_attention
        torch.manual_seed(0)
        S, N, H, Hkv, D = {block_size}, 32, 8, 2, 40  # GQA, a head size that is not a power of two
        lens = [1, S - 1, S, 3 * S + 5, 5 * S]
        tables = torch.randperm(N)[: 5 * 5].view(5, 5).to(torch.int32)
        for window, cap in ((None, None), (S + 3, None), (S + 3, 0.5)):  # 0.5: tanh saturates often
            layer = SimpleNamespace(
                k_cache=torch.randn(N, S, Hkv, D), v_cache=torch.randn(N, S, Hkv, D), scale=0.2,
                sliding_window=window, logits_soft_cap=cap,
            )
            q = torch.randn(len(lens), H, D)
            md = decode_metadata(lens, tables)
            ctx = md.context_lens_tensor
            expected = SdpaBackend()._decode(layer, q, md)
            got = paged_decode_attention(q, layer.k_cache, layer.v_cache, tables, ctx, 0.2, window, cap)
            print(window, (got - expected).abs().max().item())
        """
    )
    errors = [float(line.split()[1]) for line in out.splitlines()]
    assert len(errors) == 3 and max(errors) < 1e-5, out


def test_padded_decode_graph_path_with_the_triton_backend_gives_the_sdpa_engine_s_tokens(tiny_checkpoint):
    """Three sequences replay the size-4 path: the padding row writes to the scratch slot and
    attends to nothing, and the real rows' tokens are unchanged."""
    out = run_interpreted(
        f"""
        from engine import EngineConfig, LLMEngine, SamplingParams
        engine = LLMEngine(EngineConfig(dtype="float32", model={str(tiny_checkpoint)!r}, attention_backend="triton", max_model_len=128, max_num_seqs=8))
        engine.runner.enable_decode_graphs(engine.max_model_len, use_graphs=False)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        prompts = [[1, 17, 99, 4, 250], [1, *range(10, 50)], [1, 8]]
        print([o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)])
        """
    )
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), attention_backend="sdpa", max_model_len=128)
    )
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[1, 17, 99, 4, 250], [1, *range(10, 50)], [1, 8]]
    expected = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert out.strip().splitlines()[-1] == str(expected)


@pytest.mark.slow
def test_soft_capped_sliding_window_gemma2_decodes_through_the_triton_graph_path_as_through_sdpa(
    model_cache,
):
    """tiny-gemma2 (attention soft-cap 0.5, windows of 8, GQA) on the path a CUDA engine with
    the triton backend takes: prompt steps on SDPA's explicit path, decode steps in the kernel
    with the graphs' static buffers and padding rows."""
    from engine.demo.checkpoints import ensure_checkpoint

    folder = str(ensure_checkpoint(model_cache, preset="tiny-gemma2"))
    prompts = [[1, *range(10, 30)], [1, 8, 9], [1, 5]]  # past the window, inside it; 3 rows pad to 4
    out = run_interpreted(
        f"""
        from engine import EngineConfig, LLMEngine, SamplingParams
        engine = LLMEngine(EngineConfig(dtype="float32", model={folder!r}, attention_backend="triton", kv_cache_memory_gib=0.05, enforce_eager=True, max_num_seqs=4))
        engine.runner.enable_decode_graphs(engine.max_model_len, use_graphs=False)
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        print([o.token_ids for o in engine.generate({prompts!r}, params, use_tqdm=False)])
        """
    )
    engine = LLMEngine(EngineConfig(dtype="float32", model=folder, kv_cache_memory_gib=0.05))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert out.strip().splitlines()[-1] == str(expected)


def test_capture_sizes_cover_every_batch_up_to_the_maximum():
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_decode_on_cuda(tiny_checkpoint):
    prompts = [[1, 17, 99, 4, 250], [1, *range(10, 70)], [1, 8]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        engine = LLMEngine(
            EngineConfig(
                dtype="float32",
                model=str(tiny_checkpoint),
                device="cuda",
                attention_backend="triton",
                enforce_eager=eager,
            )
        )
        assert (engine.runner.decode_graphs is None) == eager
        outputs[eager] = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        del engine
        torch.cuda.empty_cache()
    assert outputs[True] == outputs[False]
