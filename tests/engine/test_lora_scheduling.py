"""LoRA in the pure-Python core: admission within max_loras adapters, prefix-cache hashes per adapter."""

from __future__ import annotations

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.sampling_params import SamplingParams


def _seq(request_id: str, lora_name: str | None, num_tokens: int = 6, first: int = 1) -> Sequence:
    params = SamplingParams(max_tokens=4, lora_name=lora_name)
    return Sequence(request_id, list(range(first, first + num_tokens)), params, 4)


def _scheduler(max_loras: int) -> Scheduler:
    return Scheduler(BlockManager(64, 4, enable_prefix_caching=True), 8, 64, True, max_loras=max_loras)


def test_a_request_of_a_new_adapter_waits_while_every_slot_is_taken_and_those_behind_it_run():
    scheduler = _scheduler(max_loras=2)
    for i, (request_id, name) in enumerate([("a", "x"), ("b", "y"), ("c", "z"), ("d", "x"), ("e", None)]):
        scheduler.add(_seq(request_id, name, first=10 * i))  # no shared prefix
    out = scheduler.schedule()
    assert [s.request_id for s in out.seqs] == ["a", "b", "d", "e"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]
    scheduler.update_from_output(out, [7] * len(out.sampling_seqs))
    out = scheduler.schedule()
    assert "c" not in [s.request_id for s in out.seqs]
    scheduler.update_from_output(out, [7] * len(out.sampling_seqs))
    scheduler.finish(next(s for s in scheduler.running if s.request_id == "b"), "stop")  # y's last one

    assert "c" in [s.request_id for s in scheduler.schedule().seqs]  # z takes y's slot


def test_no_limit_without_adapters_configured():
    scheduler = _scheduler(max_loras=0)
    for i, name in enumerate(["x", "y", "z"]):
        scheduler.add(_seq(str(i), name))
    assert len(scheduler.schedule().seqs) == 3


def test_the_same_tokens_hash_differently_per_adapter():
    manager = BlockManager(16, 4, enable_prefix_caching=True)
    hashes = {name: manager._prefix_hashes(_seq("r", name, 9), 2) for name in (None, "x", "y")}
    assert len({h[0] for h in hashes.values()}) == 3
    assert len({h[1] for h in hashes.values()}) == 3  # the chain carries it on
    assert manager._prefix_hashes(_seq("s", "x", 9), 2) == hashes["x"]


def test_a_request_of_a_new_adapter_waits_at_most_an_aging_turn_plus_the_running_ones():
    scheduler = Scheduler(BlockManager(256, 4), 8, 64, True, priority_aging_steps=3, max_loras=1)
    scheduler.add(_seq("x0", "x", first=0))
    scheduler.add(_seq("z", "z", first=100))
    admitted, step = {}, 0
    while "z" not in admitted:
        step += 1
        # a new request of the running adapter every step, and one of the base model
        scheduler.add(_seq(f"x{step}", "x", first=1000 + 10 * step))
        scheduler.add(_seq(f"b{step}", None, first=5000 + 10 * step))
        out = scheduler.schedule()
        for seq in out.seqs:
            admitted.setdefault(seq.request_id, step)
        scheduler.update_from_output(out, [7] * len(out.sampling_seqs))
        assert step < 20, "z never got a slot"
    # admitted after 3 steps of waiting, x's stopped joining; the ones running finished (4 tokens each)
    assert max(step for rid, step in admitted.items() if rid.startswith("x")) <= 3
    assert all(f"b{s}" in admitted for s in range(1, step + 1))  # the base model never waited
