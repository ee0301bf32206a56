"""Piecewise CUDA graphs (engine/executor/piecewise_graphs.py): a step with prompt tokens runs its
forward in pieces between the attention calls, padded up to a captured token count, with each
layer's attention run on the real rows only. On the CPU the same split, padding and static
buffers run eagerly (use_graphs=False); the capture itself is checked on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.executor.piecewise_graphs import PiecewiseGraphs, piecewise_sizes
from engine.layers.attention import Attention

# prompts of 3 to 70 tokens under a budget of 48 tokens a step: chunked prefills beside decodes
PROMPTS = [[1, *range(10 + i, 10 + i + 3 + 11 * i)] for i in range(7)]


def _engine(checkpoint: Path, **options) -> LLMEngine:
    options = {"dtype": "float32", "max_num_batched_tokens": 48, "max_num_seqs": 8} | options
    return LLMEngine(EngineConfig(model=str(checkpoint), **options))


def _greedy(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def test_piece_sizes_are_powers_of_two_up_to_512_or_the_step_budget() -> None:
    assert piecewise_sizes(2048) == [16, 32, 64, 128, 256, 512]
    assert piecewise_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert piecewise_sizes(100) == [16, 32, 64, 100]
    assert piecewise_sizes(8) == [8]


@pytest.mark.parametrize("backend", ["auto", "sdpa"])  # the C++ paged kernel, and SDPA
def test_mixed_steps_run_in_padded_pieces_and_give_the_eager_engines_tokens(
    tiny_checkpoint: Path, backend: str
) -> None:
    expected = _greedy(_engine(tiny_checkpoint, attention_backend=backend))
    engine = _engine(tiny_checkpoint, attention_backend=backend)
    engine.runner.enable_piecewise_graphs(use_graphs=False)
    pieces = engine.runner.piecewise_graphs
    assert pieces.sizes == [16, 32, 48]
    steps, attention_rows = [], []
    run = pieces.run

    def counting(input_ids, positions, metadata):
        steps.append((input_ids.shape[0], metadata.is_decode_only))
        return run(input_ids, positions, metadata)

    pieces.run = counting
    forward = Attention.forward

    def rows_attended(layer, q, k, v):
        attention_rows.append(q.shape[0])
        return forward(layer, q, k, v)

    Attention.forward = rows_attended
    try:
        tokens = _greedy(engine)
    finally:
        Attention.forward = forward
    assert tokens == expected
    num_layers = len(engine.runner.layers)
    assert len(steps) == engine.stats().steps.num_steps  # every step went through the pieces
    assert any(not decode_only for _, decode_only in steps)  # steps with prompt tokens among them
    assert any(n not in pieces.sizes for n, _ in steps)  # and step sizes that were padded
    # each layer's attention ran twice per step: split off at the padded size, then on the real rows
    real = [n for n, _ in steps for _ in range(num_layers)]
    padded = [next(s for s in pieces.sizes if s >= n) for n in real]
    assert attention_rows == [x for pair in zip(padded, real, strict=True) for x in pair]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_step_larger_than_the_largest_piece_runs_eagerly(tiny_checkpoint: Path) -> None:
    engine = _engine(tiny_checkpoint, max_num_batched_tokens=64)
    engine.runner.piecewise_graphs = PiecewiseGraphs(
        engine.runner.model, [16, 32], engine.runner.device, use_graphs=False
    )
    sizes = []
    run = engine.runner.piecewise_graphs.run
    engine.runner.piecewise_graphs.run = lambda ids, pos, md: (sizes.append(ids.shape[0]), run(ids, pos, md))[
        1
    ]
    assert _greedy(engine) == _greedy(_engine(tiny_checkpoint, max_num_batched_tokens=64))
    assert sizes and max(sizes) <= 32  # the 64-token steps went the eager way


def test_piecewise_cuda_graphs_is_an_option_off_by_default(tiny_checkpoint: Path) -> None:
    assert EngineConfig(model=str(tiny_checkpoint)).piecewise_cuda_graphs is False
    with pytest.raises(ValueError, match="piecewise_cuda_graphs"):
        EngineConfig(model=str(tiny_checkpoint), piecewise_cuda_graphs="yes")
    # on the CPU nothing is captured whatever it says: CUDA graphs need CUDA
    engine = _engine(tiny_checkpoint, piecewise_cuda_graphs=True)
    assert engine.runner.piecewise_graphs is None


@pytest.mark.gpu
def test_piecewise_graphs_on_cuda_give_the_eager_engines_tokens(tiny_checkpoint: Path) -> None:
    outputs = {}
    for piecewise in (False, True):
        engine = _engine(
            tiny_checkpoint, device="cuda", attention_backend="triton", piecewise_cuda_graphs=piecewise
        )
        graphs = engine.runner.piecewise_graphs
        if piecewise:
            num_layers = len(engine.runner.layers)
            assert graphs is not None and graphs.use_graphs
            assert all(len(p.graphs) == num_layers + 1 for p in graphs._pieces.values())
        else:
            assert graphs is None
        outputs[piecewise] = _greedy(engine)
        engine.close()
        del engine
        torch.cuda.empty_cache()
    assert outputs[True] == outputs[False]
