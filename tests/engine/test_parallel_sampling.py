"""Parallel samples (n, best_of): forks of the request's own sequence that share its prompt's
KV blocks, each with its own randomness, gathered into one output (tiny model, CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.core.parallel_sampling import ParallelSampler
from engine.core.scheduler import SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.stages import StepResult
from engine.outputs import OutputLogprob, RequestMetrics, RequestOutput
from engine.sampling_params import StructuredOutputs

PROMPT = list(range(4, 4 + 40))  # two full 16-token blocks and a partial one


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), block_size=16, num_kv_blocks=64)
    )


def _one(engine: LLMEngine, params: SamplingParams):
    return engine.generate([PROMPT], params, use_tqdm=False)[0]


def test_n_returns_n_samples_and_the_request_reads_as_the_first(engine: LLMEngine) -> None:
    out = _one(engine, SamplingParams(n=3, max_tokens=6, ignore_eos=True, temperature=1.0))
    assert out.samples is not None and len(out.samples) == 3
    assert all(len(s.token_ids) == 6 and s.finish_reason == "length" for s in out.samples)
    assert (out.token_ids, out.text) == (out.samples[0].token_ids, out.samples[0].text)
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # each its own randomness


def test_a_seeded_requests_sample_i_samples_with_seed_plus_i(engine: LLMEngine) -> None:
    params = dict(max_tokens=6, ignore_eos=True, temperature=1.0)
    out = _one(engine, SamplingParams(n=3, seed=7, **params))
    alone = [_one(engine, SamplingParams(seed=7 + i, **params)).token_ids for i in range(3)]
    assert [s.token_ids for s in out.samples] == alone


def test_the_forks_find_the_prompt_in_the_prefix_cache(engine: LLMEngine) -> None:
    out = _one(engine, SamplingParams(n=4, seed=1, max_tokens=2, temperature=1.0, ignore_eos=True))
    # each fork shares the prompt's two full blocks and computes only the partial third
    assert [s.num_cached_tokens for s in out.samples[1:]] == [32, 32, 32]


def test_best_of_returns_the_n_samples_with_the_highest_logprob_of_equal_lengths(engine: LLMEngine) -> None:
    params = dict(max_tokens=5, ignore_eos=True, temperature=1.0, seed=3)
    drawn = _one(engine, SamplingParams(n=4, logprobs=0, **params)).samples
    best = _one(engine, SamplingParams(n=2, best_of=4, **params))
    ranked = sorted(drawn, key=lambda s: s.cumulative_logprob, reverse=True)[:2]
    assert [s.token_ids for s in best.samples] == [s.token_ids for s in ranked]
    assert all(s.logprobs is None for s in best.samples)  # recorded to rank them, not asked for
    assert best.samples[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob)


def test_every_sample_follows_the_requests_grammar(engine: LLMEngine) -> None:
    spec = StructuredOutputs(regex="[ab]{3}")
    out = _one(engine, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, structured_outputs=spec))
    assert all(re.fullmatch("[ab]{3}", s.text) for s in out.samples)


def test_aborting_a_request_aborts_its_samples_and_returns_every_block(engine: LLMEngine) -> None:
    engine.add_request("many", PROMPT, SamplingParams(n=4, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 4  # the request and its three forks
    assert engine.abort("many")
    (out,) = engine.step()
    assert out.finish_reason == "abort" and not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(count == 0 for count in bm.ref_counts)


def test_greedy_sampling_refuses_n_and_best_of_above_one_as_vllm_does() -> None:
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling, got 2"):
        SamplingParams(temperature=0, n=2)
    with pytest.raises(ValueError, match="best_of must be 1 when using greedy sampling, got 3"):
        SamplingParams(temperature=0, best_of=3)
    with pytest.raises(ValueError, match="best_of must be >= n"):
        SamplingParams(n=3, best_of=2)


def test_best_of_ranks_by_logprob_per_token_as_openai_defines_best() -> None:
    """Issue 30, defect 9: a short sample with a higher sum but a lower mean does not win."""
    seq = Sequence("r", [1, 2, 3], SamplingParams(n=1, best_of=2, temperature=1.0, max_tokens=8), 8)
    sampler = ParallelSampler(grammar_of=lambda fork: None)
    sampler.add(seq)
    seq.num_computed_tokens = 3
    (fork,) = sampler.update(StepResult(SchedulerOutput([seq], [3], [True]), [5], None)).forks

    def output(logprobs: list[float]) -> RequestOutput:
        tokens = [OutputLogprob(5, lp) for lp in logprobs]
        return RequestOutput(
            "r", [1, 2, 3], [5] * len(tokens), "", "stop", RequestMetrics(0.0), logprobs=tokens
        )

    assert sampler.hold(seq, output([-1.0, -1.0])) is None  # sum -2, mean -1
    _, best = sampler.hold(fork, output([-0.6] * 5))  # sum -3, mean -0.6
    assert [len(s.token_ids) for s in best.samples] == [5]
    assert best.samples[0].cumulative_logprob == pytest.approx(-3.0)
