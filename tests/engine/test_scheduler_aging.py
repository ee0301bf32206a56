"""Priority aging: a stream of urgent requests delays a waiting one by a bounded number of steps."""

from __future__ import annotations

import itertools

import pytest

from engine import EngineConfig, LLMEngine, RequestRejected, SamplingParams
from engine.core.block_manager import BlockManager
from engine.core.input_processor import MAX_PRIORITY
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence

_ids = itertools.count()


def _seq(priority: int, num_prompt_tokens: int = 2) -> Sequence:
    return Sequence(f"req-{next(_ids)}", [1] * num_prompt_tokens, SamplingParams(max_tokens=1), 1, priority)


def _scheduler(aging: int, num_blocks: int = 64, max_num_seqs: int = 1) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 2), max_num_seqs, 32, True, priority_aging_steps=aging)


def _step(scheduler: Scheduler) -> list[Sequence]:
    out = scheduler.schedule()
    scheduler.update_from_output(out, [7] * len(out.sampling_seqs))  # max_tokens=1: each finishes
    return out.seqs


def _steps_until_admitted(scheduler: Scheduler, patient: Sequence, limit: int = 1000) -> int | None:
    """Each step one more urgent (priority 0) request arrives; the batch takes one request per step."""
    scheduler.add(patient)
    for step in range(1, limit):
        scheduler.add(_seq(priority=0))
        if patient in _step(scheduler):
            return step
    return None


def test_without_aging_a_stream_of_urgent_requests_starves_a_lower_priority_one() -> None:
    assert _steps_until_admitted(_scheduler(aging=0), _seq(priority=3)) is None


def test_with_aging_a_waiting_request_gains_a_level_every_aging_steps() -> None:
    # priority 3 against a stream of priority 0: admitted once it has waited 3 * 5 steps
    assert _steps_until_admitted(_scheduler(aging=5), _seq(priority=3)) == 3 * 5 + 1
    assert _steps_until_admitted(_scheduler(aging=5), _seq(priority=1)) == 1 * 5 + 1


def test_aging_keeps_priority_order_among_requests_that_arrive_together() -> None:
    scheduler = _scheduler(aging=5)
    later, urgent = _seq(priority=2), _seq(priority=-1)
    scheduler.add(later)
    scheduler.add(urgent)
    assert _step(scheduler) == [urgent]
    assert _step(scheduler) == [later]


def test_a_preempted_sequence_keeps_the_age_it_had() -> None:
    scheduler = _scheduler(aging=5)
    old = Sequence("old", [1, 1], SamplingParams(max_tokens=50), 50, priority=1)
    scheduler.add(old)
    for _ in range(10):  # it runs for 10 steps
        out = scheduler.schedule()
        scheduler.update_from_output(out, [7] * len(out.sampling_seqs))
    scheduler.running.remove(old)
    scheduler._preempt(old)  # back to the queue, as when blocks run out
    newer_urgent = _seq(priority=0)
    scheduler.add(newer_urgent)  # queued 10 steps later: 2 levels of age behind `old`
    assert scheduler.waiting == [old, newer_urgent]


def test_the_engine_refuses_a_priority_outside_its_bounds(tiny_checkpoint) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), max_model_len=64))
    with pytest.raises(RequestRejected, match="priority must be in") as e:
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=1), priority=MAX_PRIORITY + 1)
    assert e.value.code == "invalid_request"
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=1), priority=-MAX_PRIORITY)
