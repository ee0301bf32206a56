"""Async scheduling: step N+1 scheduled and planned while step N runs on the model thread, its
inputs N's sampled tokens. Whatever a request asks for, its output equals the synchronous
engine's; a sequence that a token ends (EOS, a stop token or string) is answered without the
token its step-ahead computed; aborts, preemption and a failing model run lose nothing.
(Tiny checkpoint, CPU, float32.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, PoolingParams, SamplingParams
from engine.core.sequence import SequenceStatus
from engine.core.structured_output import LateGrammarMasks, grammar_masks
from engine.llm_engine import StepFailed
from engine.sampling_params import StructuredOutputs

PROMPTS = [list(range(4 + i, 4 + i + 9 + 3 * i)) for i in range(6)]


def _engine(checkpoint: Path, async_scheduling: bool, **options) -> LLMEngine:
    options = {"block_size": 16, "num_kv_blocks": 96} | options
    config = EngineConfig(
        model=str(checkpoint), dtype="float32", async_scheduling=async_scheduling, **options
    )
    return LLMEngine(config)


def _every_kind_of_request() -> list[tuple[list[int], SamplingParams | PoolingParams]]:
    """One request per stage and per way a request ends, each with a prompt of its own."""
    kinds = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),  # length
        SamplingParams(temperature=0, max_tokens=40),  # EOS may end it
        SamplingParams(temperature=0, max_tokens=40, stop=["e", "a", " "]),  # stop strings
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[7, 11, 13, 17, 19]),
        SamplingParams(temperature=0, max_tokens=20, logprobs=3, min_tokens=5, stop=[" "]),
        SamplingParams(temperature=0.8, seed=7, max_tokens=20, top_p=0.9),  # seeded sampling
        SamplingParams(temperature=0.9, seed=3, n=3, max_tokens=12),  # parallel samples
        SamplingParams(temperature=0.7, seed=5, best_of=3, max_tokens=10),
        SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(
            temperature=0, max_tokens=12, structured_outputs=StructuredOutputs(regex="[a-e]{3,8}")
        ),
        SamplingParams(
            temperature=0, max_tokens=8, structured_outputs=StructuredOutputs(choice=["yes", "no"])
        ),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),  # one token: never ahead
    ]
    requests = [(PROMPTS[i % len(PROMPTS)] + [4 + i], params) for i, params in enumerate(kinds)]
    return [*requests, (PROMPTS[0], PoolingParams())]


def _run(engine: LLMEngine, requests) -> dict[str, object]:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    return outputs


def _comparable(output) -> tuple:
    samples = [_comparable(s) for s in output.samples] if output.samples else None
    logprobs = [(lp.token_id, round(lp.logprob, 4)) for lp in output.logprobs] if output.logprobs else None
    embedding = [round(x, 4) for x in output.embedding] if output.embedding else None
    return (
        output.token_ids,
        output.text,
        output.finish_reason,
        output.stop_reason,
        logprobs,
        samples,
        embedding,
    )


def _count_ahead(engine: LLMEngine) -> list[int]:
    """Wraps the scheduler's schedule_ahead: the number of steps it scheduled ahead, as it runs."""
    counted = [0]
    schedule_ahead = engine.scheduler.schedule_ahead

    def counting(running):
        ahead = schedule_ahead(running)
        counted[0] += ahead is not None
        return ahead

    engine.scheduler.schedule_ahead = counting
    return counted


@pytest.fixture(scope="module")
def sync_outputs(tiny_checkpoint: Path) -> dict[str, tuple]:
    engine = _engine(tiny_checkpoint, async_scheduling=False)
    return {rid: _comparable(o) for rid, o in _run(engine, _every_kind_of_request()).items()}


def test_every_kind_of_request_gives_the_synchronous_engines_output(
    tiny_checkpoint: Path, sync_outputs
) -> None:
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    ahead = _count_ahead(engine)
    outputs = {rid: _comparable(o) for rid, o in _run(engine, _every_kind_of_request()).items()}
    assert outputs == sync_outputs
    assert ahead[0] > 10  # the decode steps were scheduled ahead
    assert {o[2] for o in outputs.values()} >= {"stop", "length"}  # tokens ended some, lengths others
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every block came back
    assert engine.runner.batch.num_sequences <= 1  # the runner's rows were released (the last step's aside)


def test_greedy_tokens_are_the_same_with_preemption_in_a_small_pool(tiny_checkpoint: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    requests = [(prompt, params) for prompt in PROMPTS]
    outputs = {}
    for async_scheduling in (False, True):
        engine = _engine(tiny_checkpoint, async_scheduling, num_kv_blocks=12)
        ahead = _count_ahead(engine)
        outputs[async_scheduling] = {rid: o.token_ids for rid, o in _run(engine, requests).items()}
        assert engine.stats().steps.num_preemptions > 0
    assert outputs[True] == outputs[False]
    assert ahead[0] > 0


def test_a_request_aborted_while_its_next_step_runs_ahead_is_answered_once(tiny_checkpoint: Path) -> None:
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("kept", PROMPTS[0], params)
    engine.add_request("aborted", PROMPTS[1], params)
    finished = []
    for _ in range(5):
        finished += engine.step()
    assert engine._running is not None  # a step is on the model thread, ahead
    assert engine.abort("aborted")
    while engine.has_unfinished_requests():
        finished += engine.step()
    by_id = {o.request_id: o for o in finished}
    assert sorted(o.request_id for o in finished) == ["aborted", "kept"]
    assert by_id["aborted"].finish_reason == "abort" and len(by_id["kept"].token_ids) == 30
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_failing_model_run_requeues_the_step_ahead_too_and_loses_no_token(
    tiny_checkpoint: Path, monkeypatch
) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [
        o.token_ids for o in _engine(tiny_checkpoint, False).generate(PROMPTS[:3], params, use_tqdm=False)
    ]
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    execute, calls = engine.executor.execute, [0]

    def failing_once(plan):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("device hiccup")
        return execute(plan)

    monkeypatch.setattr(engine.executor, "execute", failing_once)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, params)
    outputs, failures = {}, 0
    while engine.has_unfinished_requests():
        try:
            outputs.update((o.request_id, o) for o in engine.step())
        except StepFailed:
            failures += 1
    assert failures == 1
    assert [outputs[f"r{i}"].token_ids for i in range(3)] == expected


def _grammar_requests() -> list[tuple[list[int], SamplingParams]]:
    """Every request under a grammar, long enough to run many decode steps."""
    specs = [
        StructuredOutputs(regex="[a-z]{12,30}"),
        StructuredOutputs(regex="([a-e]+ )+[a-e]+"),
        StructuredOutputs(
            json={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        ),
        StructuredOutputs(choice=["a long answer", "another long answer"]),
    ]
    greedy = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=spec) for spec in specs * 2]
    sampled = [  # seeded: the same draws in both engines; n=2 forks the grammar at the first token
        SamplingParams(temperature=0.9, seed=11, max_tokens=24, structured_outputs=specs[3]),
        SamplingParams(temperature=0.9, seed=12, n=2, max_tokens=20, structured_outputs=specs[1]),
    ]
    return [(PROMPTS[i % len(PROMPTS)] + [9 + i], params) for i, params in enumerate(greedy + sampled)]


def _count_late_masks(engine: LLMEngine) -> list[int]:
    """Wraps the executor: the number of steps whose grammar masks came while their forward ran."""
    counted = [0]
    execute = engine.executor.execute

    def counting(plan):
        counted[0] += plan.late_grammar_masks is not None
        return execute(plan)

    engine.executor.execute = counting
    return counted


def test_steps_with_grammars_run_ahead_their_masks_filled_while_the_forward_runs(
    tiny_checkpoint: Path,
) -> None:
    requests = _grammar_requests()
    expected = {rid: _comparable(o) for rid, o in _run(_engine(tiny_checkpoint, False), requests).items()}
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    ahead, late = _count_ahead(engine), _count_late_masks(engine)
    outputs = {rid: _comparable(o) for rid, o in _run(engine, requests).items()}
    assert outputs == expected
    assert ahead[0] > 10 and late[0] == ahead[0]  # every step ahead took its masks late
    assert sum(len(o[0]) > 3 for o in outputs.values()) >= 6  # the grammars ran for many steps
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("failing_step", [1, 3])
def test_a_failing_model_run_releases_the_step_ahead_waiting_for_its_masks(
    tiny_checkpoint: Path, monkeypatch, failing_step: int
) -> None:
    """The failing step is one with late masks; the step ahead of it waits at sampling for masks
    that the failed step's tokens would have given: it must be released (and requeued with the
    rest), not left waiting for ever."""
    requests = _grammar_requests()
    expected = {rid: _comparable(o) for rid, o in _run(_engine(tiny_checkpoint, False), requests).items()}
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    execute, late_steps, released = engine.executor.execute, [0], []

    def failing_once(plan):
        if plan.late_grammar_masks is not None:
            late_steps[0] += 1
            if late_steps[0] == failing_step:
                raise RuntimeError("device hiccup")
        return execute(plan)

    fail = LateGrammarMasks.fail
    monkeypatch.setattr(LateGrammarMasks, "fail", lambda masks, e: (released.append(str(e)), fail(masks, e)))

    monkeypatch.setattr(engine.executor, "execute", failing_once)
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    outputs, failures = {}, 0
    while engine.has_unfinished_requests():
        try:
            outputs.update((o.request_id, _comparable(o)) for o in engine.step())
        except StepFailed:
            failures += 1
    assert failures == 1 and released[0] == "the step before it failed"
    assert outputs == expected


def test_closing_with_a_grammar_step_ahead_does_not_wait_for_its_masks(tiny_checkpoint: Path) -> None:
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    for i, (prompt, params) in enumerate(_grammar_requests()):
        engine.add_request(f"r{i}", prompt, params)
    while engine._running is None or engine._running.plan.late_grammar_masks is None:
        engine.step()
    engine.close()  # would hang if the step ahead still waited for masks no step() will fill
    assert engine._running.future.done()


@pytest.mark.parametrize("faulty", ["r0", "r6", "r9"])  # plain, n=3 samples, a regex grammar
def test_a_request_whose_own_update_raises_while_a_step_runs_ahead_fails_alone(
    tiny_checkpoint: Path, sync_outputs, faulty: str
) -> None:
    engine = _engine(tiny_checkpoint, async_scheduling=True)
    check_stop = engine.scheduler._check_stop

    def check_stop_failing_for_one_request(seq, token_id):  # as a grammar that lost its state would
        if seq.request_id == faulty and seq.num_output_tokens == 4:
            raise RuntimeError("grammar state lost")
        return check_stop(seq, token_id)

    engine.scheduler._check_stop = check_stop_failing_for_one_request
    outputs = {rid: _comparable(o) for rid, o in _run(engine, _every_kind_of_request()).items()}
    (failure,) = engine.take_failed()
    assert failure.request_id == faulty and str(failure.cause) == "grammar state lost"
    assert outputs == {rid: o for rid, o in sync_outputs.items() if rid != faulty}
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_async_scheduling_is_off_by_default_on_the_cpu_and_refused_with_parallelism(tiny_checkpoint) -> None:
    assert not EngineConfig(model=str(tiny_checkpoint)).uses_async_scheduling
    assert EngineConfig(model=str(tiny_checkpoint), device="cuda").uses_async_scheduling
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model=str(tiny_checkpoint), async_scheduling=True, tensor_parallel_size=2)


def test_late_masks_constrain_only_the_rows_with_a_grammar_still_running(tiny_checkpoint) -> None:
    engine = _engine(tiny_checkpoint, async_scheduling=False)
    regex = SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputs(regex="[a-e]+"))
    plain = SamplingParams(temperature=0, max_tokens=4)
    seqs = [
        engine.input_processor.process(f"r{i}", PROMPTS[i], params, priority=0).seq
        for i, params in enumerate([plain, regex, plain, regex])
    ]
    seqs[3].status = SequenceStatus.FINISHED  # ended by the step before: its token is thrown away
    masks = LateGrammarMasks(seqs, engine.vocab_size)
    masks.fill()
    filled = masks.wait()
    alone = grammar_masks([seqs[1].grammar], engine.vocab_size)
    assert filled.rows.tolist() == [1]
    assert torch.equal(filled.bitmask, alone.bitmask) and not (filled.bitmask == -1).all()
    masks.fail(RuntimeError("too late"))  # settled once: a later failure changes nothing
    assert masks.wait() is filled


def test_late_masks_that_fail_raise_in_the_waiting_sampler_rather_than_hang() -> None:
    masks = LateGrammarMasks([], vocab_size=64)
    masks.fail(RuntimeError("the step before it failed"))
    with pytest.raises(RuntimeError, match="step before it failed"):
        masks.wait()
