"""Backpressure: pause past a high-water mark, resume only below the low-water mark."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.backpressure import Backpressure


def test_pauses_at_the_job_limit_and_resumes_only_below_the_low_water_mark():
    bp = Backpressure(max_jobs=4, max_tokens=1000)
    bp.add(jobs=3)
    assert bp.update() is None
    bp.add(jobs=1)
    assert bp.update() == "pause"
    bp.remove(jobs=1)  # 3 in flight: below the limit, above the low-water mark of 2
    assert bp.update() is None and bp.is_paused
    bp.remove(jobs=1)
    assert bp.update() == "resume"


def test_results_staged_for_a_transaction_count_as_jobs_in_flight():
    bp = Backpressure(max_jobs=4, max_tokens=1000)
    bp.add(jobs=1)
    bp.staged = 3  # finished, held in memory until their partition's transaction
    assert bp.update() == "pause" and bp.free_jobs == 0
    bp.staged = 1
    assert bp.update() == "resume"


def test_tokens_alone_can_pause():
    bp = Backpressure(max_jobs=100, max_tokens=1000)
    bp.add(jobs=1, tokens=1200)
    assert bp.update() == "pause"


@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-500, 500)), max_size=60))
def test_never_runs_above_the_high_water_mark_and_never_pauses_below_the_low(steps):
    bp = Backpressure(max_jobs=8, max_tokens=2000, resume_fraction=0.5)
    for jobs, tokens in steps:
        bp.add(jobs=max(jobs, -bp.jobs), tokens=max(tokens, -bp.tokens))
        bp.update()
        if bp.jobs >= 8 or bp.tokens >= 2000:
            assert bp.is_paused
        if bp.jobs <= 4 and bp.tokens <= 1000:
            assert not bp.is_paused


@pytest.mark.kafka
async def test_the_consumer_pauses_at_max_in_flight_and_every_job_is_still_answered(
    kafka, service_config, run_service, caplog
):
    config = service_config.__class__(**{**_fields(service_config), "max_in_flight": 4})
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    ids = [f"bp-{i}" for i in range(30)]
    jobs = [
        (i.encode(), json.dumps({"custom_id": i, "url": "/v1/completions", "body": body}).encode(), [])
        for i in ids
    ]
    await kafka.post(config.jobs_topics[0], jobs)
    caplog.set_level(logging.INFO, logger="service.app")
    async with run_service(config) as service:
        results = await kafka.read(config.results_topic, len(ids))
    peak = service.backpressure.peak_jobs
    assert {r.key.decode() for r in results} == set(ids)
    assert peak <= 4
    assert any("pause consuming" in m for m in caplog.messages)
    assert any("resume consuming" in m for m in caplog.messages)


def _fields(config) -> dict:
    return {name: getattr(config, name) for name in config.__struct_fields__}
