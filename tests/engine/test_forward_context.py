"""The step's attention metadata is per thread: engines stepping on two threads never see each other's."""

from __future__ import annotations

import threading

from engine.forward_context import attention_metadata, get_attention_metadata


def _metadata(name: str):
    """A stand-in for a step's AttentionMetadata: only its identity matters here."""
    return type("StepMetadata", (), {"__repr__": lambda self: name})()


def test_outside_a_step_there_is_no_metadata():
    assert get_attention_metadata() is None


def test_a_step_sees_its_metadata_and_the_previous_one_comes_back_after_it():
    outer, inner = _metadata("outer"), _metadata("inner")
    with attention_metadata(outer):
        with attention_metadata(inner):
            assert get_attention_metadata() is inner
        assert get_attention_metadata() is outer
    assert get_attention_metadata() is None


def test_a_step_on_another_thread_does_not_see_this_threads_metadata():
    seen_there: list[object] = []
    inside, there = threading.Event(), threading.Event()

    def other_engine():
        inside.wait(5)
        seen_there.append(get_attention_metadata())
        with attention_metadata(_metadata("there")):
            there.set()
            inside.wait(5)

    thread = threading.Thread(target=other_engine)
    thread.start()
    mine = _metadata("mine")
    with attention_metadata(mine):
        inside.set()
        there.wait(5)
        assert get_attention_metadata() is mine  # the other thread's step is running now
    thread.join(5)
    assert seen_there == [None]
