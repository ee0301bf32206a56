"""EngineThread: one long-lived thread runs every torch call it is given, in order, and survives errors."""

from __future__ import annotations

import threading
import time

import pytest

from engine import EngineThread
from tests.engine.loop_ticks import loop_ticks


@pytest.fixture
def engine_thread():
    thread = EngineThread(name="test-engine")
    yield thread
    thread.close()


def test_calls_run_on_the_one_thread_and_return_their_results(engine_thread):
    idents = [engine_thread.call(threading.get_ident) for _ in range(3)]
    assert idents == [engine_thread.ident] * 3
    assert engine_thread.ident != threading.get_ident()
    assert engine_thread.call(pow, 2, 10) == 1024


def test_calls_run_one_at_a_time_in_submission_order(engine_thread):
    order = []
    futures = [
        engine_thread.submit(lambda i=i: (time.sleep(0.01 * (3 - i)), order.append(i))) for i in range(3)
    ]
    for future in futures:
        future.result(timeout=5)
    assert order == [0, 1, 2]


def test_an_exception_reaches_the_caller_and_the_thread_goes_on(engine_thread):
    with pytest.raises(ZeroDivisionError):
        engine_thread.call(lambda: 1 / 0)
    assert engine_thread.call(lambda: "still serving") == "still serving"


def test_a_call_from_the_thread_itself_runs_inline_instead_of_deadlocking(engine_thread):
    assert engine_thread.call(lambda: engine_thread.call(lambda: 7)) == 7


async def test_run_awaits_without_blocking_the_event_loop(engine_thread):
    async with loop_ticks() as ticks:
        assert await engine_thread.run(lambda: (time.sleep(0.1), "done")[1]) == "done"
    assert ticks.count > 5


def test_close_ends_the_thread_after_the_queued_calls():
    thread = EngineThread()
    future = thread.submit(time.sleep, 0.05)
    thread.close()
    future.result(timeout=5)
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not thread.is_alive()
