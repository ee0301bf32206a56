"""The segmented Triton LoRA kernels (engine.kernels.triton_lora) add exactly each token's own
adapter, as the float64 token-by-token reference of test_lora_mapping says, and nothing to
base-model tokens.

On CPU the kernels run under Triton's interpreter, which must be switched on before triton is
imported: the checks run in one fresh interpreter process with TRITON_INTERPRET=1 (as in
test_triton_moe.py). The `slow` test runs a whole LoRA engine on the kernels under the
interpreter; the `gpu` test runs the compiled kernels in the engine on CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine.lora.mapping import plan_segments, plan_step
from engine.lora.slots import LoRASlots
from tests.engine.test_lora_mapping import make_layer
from tests.engine.triton_interpreted import run_interpreted

# name -> (each sequence's slot, its tokens, the layer): qkv is the fused GQA layer of
# test_lora_mapping (q 8 rows, k and v 4; in 12; ranks 1..4 of max 4, slot 2 without k); wide
# is a gate_up-like layer (2 x 72 rows: two output blocks each, the second projection at row
# 72, not a multiple of the block; in 96; ranks 20..80 of max 80: two rank blocks), with a
# 70-token chunk (two token blocks)
CASES = {
    "decode interleaving adapters": ([0, 1, 3, 0, 1, 3, 0, 1], [1] * 8, "qkv"),
    "decode with base-model tokens": ([2, -1, 1, 2, -1, 1, 2, 1], [1] * 8, "qkv"),
    "prefill runs": ([1, 1, -1, 3, 0], [5, 3, 4, 6, 2], "qkv"),
    "a chunk among decodes": ([0, 1, 2, 0, 1, 2, 3], [1] * 6 + [30], "qkv"),
    "wide layer, long chunk": ([0, -1, 2, 3, 1, 0], [70, 1, 1, 1, 3, 1], "wide"),
}
TOLERANCE = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 2e-2}  # of the largest |output|


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every interpreter check in one process (its start-up is most of the time): name -> result."""
    out = run_interpreted(
        f"""
        import json
        import torch
        from engine.lora.mapping import LoRASegments, plan_step
        from tests.engine.test_lora_mapping import SHARDS, _reference, make_layer

        WIDE = {{0: (0, 72), 1: (72, 72)}}
        layers = {{}}
        results = {{}}
        for dtype in {list(TOLERANCE)!r}:
            layers["qkv"] = make_layer(getattr(torch, dtype))
            layers["wide"] = make_layer(getattr(torch, dtype), WIDE, in_size=96, max_rank=80)
            for name, (seq_slots, query_lens, kind) in {CASES!r}.items():
                (slots, adapters), shards = layers[kind], (SHARDS if kind == "qkv" else WIDE)
                token_slots = [s for s, n in zip(seq_slots, query_lens) for _ in range(n)]
                x = torch.randn(len(token_slots), slots.a.shape[2]).to(getattr(torch, dtype))
                base = torch.randn(len(token_slots), slots.bounds[-1].item()).to(getattr(torch, dtype))
                plan = plan_step(seq_slots, query_lens, torch.device("cpu"), use_triton=True)
                got = plan.apply(slots, x, base.clone()).double()
                expected = base.double() + _reference(x.double(), token_slots, adapters, shards)
                untouched = [t for t, s in enumerate(token_slots) if s < 0]
                results[f"{{dtype}}: {{name}}"] = [
                    ((got - expected).abs().max() / expected.abs().max()).item(),
                    bool((got[untouched] == base[untouched].double()).all()),
                ]
        # a segment of slot -1 (no adapter) given to the kernels: its rows get nothing added
        slots, adapters = make_layer(torch.float32)
        x, base = torch.randn(6, 12), torch.randn(6, 16)
        rows = torch.tensor([1, 4, 0, 2, 3, 5], dtype=torch.int32)
        segments = LoRASegments(rows, torch.tensor([-1, 3], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2, 4], dtype=torch.int32), 4)
        got = segments.apply(slots, x, base.clone())
        expected = base.double() + _reference(x.double(), [3, -1, 3, 3, -1, 3], adapters)
        results["slot -1 segment"] = [((got - expected).abs().max() / expected.abs().max()).item(), bool((got[[1, 4]] == base[[1, 4]]).all())]
        print(json.dumps(results))
        """,
        timeout=300,
    )
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_add_each_token_s_own_adapter_and_nothing_to_base_model_tokens(interpreted, case, dtype):
    error, base_rows_untouched = interpreted[f"{dtype}: {case}"]
    assert error < TOLERANCE[dtype]
    assert base_rows_untouched  # bit for bit


def test_a_segment_of_slot_minus_1_adds_nothing(interpreted):
    error, rows_untouched = interpreted["slot -1 segment"]
    assert error < TOLERANCE["float32"] and rows_untouched


def test_segments_group_the_adapter_tokens_by_slot_in_token_order():
    segments = plan_segments([2, -1, 1, 2, -1, 1, 2, 1], [1, 2, 1, 1, 1, 1, 3, 1], torch.device("cpu"))
    # token rows: 0 | 1 2 | 3 | 4 | 5 | 6 | 7 8 9 | 10
    assert segments.token_rows.tolist() == [3, 6, 10, 0, 4, 7, 8, 9]
    assert segments.slots.tolist() == [1, 2]
    assert (segments.starts.tolist(), segments.lens.tolist(), segments.max_len) == ([0, 3], [3, 5], 5)
    assert plan_segments([-1], [4], torch.device("cpu")) is None


def test_the_cpu_default_is_the_torch_path():
    assert LoRASlots(nn.Linear(2, 2), {}, 1, 4, torch.device("cpu"), torch.float32).use_triton is False
    plan = plan_step([0, 1, 0, 1], [1, 1, 1, 1], torch.device("cpu"))
    assert plan.segments is None and plan.padded is not None


def test_each_projection_s_b_is_a_view_of_the_stacked_b_the_kernel_reads():
    slots, adapters = make_layer(torch.float32)
    _, b = adapters[1][0]["v"]
    assert torch.equal(slots.b_stacked[1, 12:16, : b.shape[1]], (b * adapters[1][1]).float())
    assert slots.bounds.tolist() == [0, 8, 12, 16] and slots.max_rows == 8


@pytest.mark.slow
def test_a_lora_engine_on_the_kernels_gives_the_torch_path_s_tokens(tiny_checkpoint, tmp_path):
    """The whole engine (its layers' hooks, a batch mixing two adapters and the base model,
    prefill and decode steps) on the kernels under the interpreter, forced on CPU, gives the
    tokens of the same engine on the torch path (which test_lora checks against PEFT)."""
    from engine import EngineConfig, LLMEngine, SamplingParams
    from tests.engine.lora_adapters import build_adapter
    from tests.engine.test_lora import ADAPTERS

    for seed, name in enumerate(["all", "mlp"]):
        build_adapter(tiny_checkpoint, tmp_path / name, seed, **ADAPTERS[name])
    config = dict(
        dtype="float32",
        model=str(tiny_checkpoint),
        lora_adapters={name: str(tmp_path / name) for name in ["all", "mlp"]},
        max_model_len=128,
    )
    prompts = [[1, *range(10, 30)], [1, 8, 9], [1, 5, 77, 12]] * 2
    names = ["all", None, "mlp", "all", "mlp", None]
    params = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, lora_name=n) for n in names]
    expected = [
        o.token_ids for o in LLMEngine(EngineConfig(**config)).generate(prompts, params, use_tqdm=False)
    ]
    out = run_interpreted(
        f"""
        from engine import EngineConfig, LLMEngine, SamplingParams
        from engine.kernels import triton_lora
        calls = []
        shrink = triton_lora.lora_shrink
        triton_lora.lora_shrink = lambda *a: calls.append(1) or shrink(*a)
        engine = LLMEngine(EngineConfig(**{config!r}))
        engine.runner.lora.use_triton = True  # on CPU: the kernels under the interpreter
        params = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, lora_name=n) for n in {names!r}]
        print([o.token_ids for o in engine.generate({prompts!r}, params, use_tqdm=False)])
        print(len(calls))
        """,
        timeout=300,
    )
    tokens, num_calls = out.strip().splitlines()[-2:]
    assert tokens == str(expected)
    assert int(num_calls) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_lora_engine_on_cuda_runs_the_kernels_and_matches_peft(
    preset, model_cache, tmp_path_factory, monkeypatch
):
    """test_lora's exactness check (three adapters and the base model in one batch, greedy
    tokens equal Transformers + PEFT's on CPU) with the engine on CUDA, in float32."""
    from engine.kernels import triton_lora
    from tests.engine.test_lora import ADAPTERS, _engine, _mixed_batch, build_family

    calls = []
    shrink = triton_lora.lora_shrink
    monkeypatch.setattr(triton_lora, "lora_shrink", lambda *a: calls.append(1) or shrink(*a))
    checkpoint, folders, prompts, reference = build_family(preset, model_cache, tmp_path_factory)
    engine = _engine(checkpoint, folders, device="cuda")
    batch, params, owners = _mixed_batch(prompts, [None, *ADAPTERS])
    outputs = engine.generate(batch, params, use_tqdm=False)
    got = {owner: o.token_ids for owner, o in zip(owners, outputs, strict=True)}
    assert got == {(name, i): reference[name][i] for name, i in owners}
    assert calls  # the Triton path ran
