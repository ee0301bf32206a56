"""Request fields in the engine: logit_bias and min_tokens in the sampler, min_tokens in the
scheduler's stop check, cached prompt tokens in the output (CPU, hand-made logits or the tiny model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, RequestRejected, SamplingParams, SamplingParamsError
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.executor.sampler import Sampler
from engine.executor.sampling_batch import SamplingBatch

V = 8
EOS = 2


def _sample(logits: list[float], params: SamplingParams, output: list[int] | None = None) -> int:
    batch = SamplingBatch.build([params], [[]], [output or []], "cpu", V)
    return Sampler(torch.Generator().manual_seed(0))(torch.tensor([logits]), batch).sampled_token_ids.item()


LOGITS = [0.0, 1.0, 5.0, 2.0, 0.0, 0.0, 0.0, 0.0]  # greedy: 2 (EOS), then 3


def test_logit_bias_adds_to_the_logits_before_greedy_picks() -> None:
    assert _sample(LOGITS, SamplingParams(temperature=0)) == 2
    assert _sample(LOGITS, SamplingParams(temperature=0, logit_bias={6: 10.0})) == 6
    assert _sample(LOGITS, SamplingParams(temperature=0, logit_bias={2: -100.0})) == 3


def test_logit_bias_leaves_the_logprobs_raw() -> None:
    params = SamplingParams(temperature=0, logit_bias={6: 10.0}, logprobs=1)
    batch = SamplingBatch.build([params], [[]], [[]], "cpu", V)
    out = Sampler()(torch.tensor([LOGITS]), batch)
    assert out.logprobs.top_token_ids[0, 0].item() == 2  # the model's own favourite


def test_min_tokens_holds_its_stop_tokens_back_until_it_is_reached() -> None:
    params = dataclasses.replace(
        SamplingParams(temperature=0, min_tokens=2), min_tokens_stop_ids=frozenset({EOS})
    )
    assert _sample(LOGITS, params, output=[5]) == 3  # one token so far: EOS held back
    assert _sample(LOGITS, params, output=[5, 5]) == EOS  # two: free to stop


def test_sampling_params_refuse_min_tokens_above_max_tokens_and_biases_out_of_range() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})


def test_the_scheduler_does_not_stop_on_eos_before_min_tokens() -> None:
    scheduler = Scheduler(BlockManager(16, 4), 4, 64, True, frozenset({EOS}))
    seq = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=8, min_tokens=3), 8)
    scheduler.add(seq)
    for _ in range(3):
        out = scheduler.schedule()
        finished = scheduler.update_from_output(out, [EOS])
        assert finished == [] if seq.num_output_tokens < 3 else finished == [seq]
    assert (seq.finish_reason, seq.num_output_tokens) == ("stop", 3)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint)))


def test_the_engine_gives_at_least_min_tokens_even_when_eos_is_forced(engine: LLMEngine) -> None:
    eos = engine.tokenizer.eos_token_id
    forced = SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0})
    (now,) = engine.generate(["The river"], forced, use_tqdm=False)
    (later,) = engine.generate(["The river"], dataclasses.replace(forced, min_tokens=5), use_tqdm=False)
    assert now.token_ids == [eos]
    assert len(later.token_ids) == 6 and later.token_ids[-1] == eos


def test_eos_ends_with_stop_reason_none_and_a_stop_token_with_itself_as_vllm_does(engine: LLMEngine) -> None:
    """Issue 30, defect 8: EOS gave its own id as the stop_reason; both stay out of the text."""
    eos = engine.tokenizer.eos_token_id
    (by_eos,) = engine.generate(
        ["The river"], SamplingParams(temperature=0, logit_bias={eos: 100.0}), use_tqdm=False
    )
    assert (by_eos.token_ids, by_eos.finish_reason, by_eos.stop_reason, by_eos.text) == (
        [eos],
        "stop",
        None,
        "",
    )
    params = SamplingParams(temperature=0, logit_bias={7: 100.0}, stop_token_ids=[7], ignore_eos=True)
    (by_token,) = engine.generate(["The river"], params, use_tqdm=False)
    assert (by_token.token_ids, by_token.finish_reason, by_token.stop_reason, by_token.text) == (
        [7],
        "stop",
        7,
        "",
    )


def test_a_logit_bias_outside_the_vocabulary_is_rejected(engine: LLMEngine) -> None:
    with pytest.raises(RequestRejected, match="logit_bias"):
        engine.add_request("bias", "Hello", SamplingParams(logit_bias={10**6: 1.0}))


def test_outputs_count_the_prompt_tokens_the_prefix_cache_gave(engine: LLMEngine) -> None:
    prompt = "The river is cold today, and many people went home because the river was cold. " * 2
    (first,) = engine.generate([prompt + "A"], SamplingParams(max_tokens=1), use_tqdm=False)
    (second,) = engine.generate([prompt + "B"], SamplingParams(max_tokens=1), use_tqdm=False)
    assert second.num_cached_tokens > first.num_cached_tokens
    assert second.num_cached_tokens % engine.block_size == 0 and second.num_cached_tokens >= engine.block_size


@pytest.mark.parametrize("stop", [[""], ["end", ""]])
def test_an_empty_stop_string_is_refused_by_name(stop) -> None:
    # it would end every output at its first token, with no stop string to show for it
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(stop=stop)
    assert info.value.field == "stop"
