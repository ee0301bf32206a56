"""The chaos soak's short version (loadtest/chaos.py): kill -9 one of two instances mid-flow and
restart it once the survivor has taken over, so that the survivor's partitions are revoked and
handed straight back to it with jobs in flight, with hostile records among the jobs, in both
delivery modes at once, on the shared single broker (the three-broker cluster is the full soak's)."""

from __future__ import annotations

import asyncio

import pytest

from loadtest import chaos

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_a_killed_and_restarted_instance_loses_no_job_and_exactly_once_repeats_none_nor_a_hostile_record(
    kafka_bootstrap, tiny_checkpoint, tmp_path
):
    reports = await asyncio.gather(
        *(chaos.run(chaos.Settings.short(mode, kafka_bootstrap), tmp_path / mode) for mode in chaos.MODES)
    )
    for report in reports:
        print(report.summary())
    exactly_once, at_least_once = reports
    assert (exactly_once.lost, exactly_once.duplicated, exactly_once.errors) == (0, 0, {})
    assert (at_least_once.lost, at_least_once.errors) == (0, {})
    assert exactly_once.hostile_repeated == 0
    for report in reports:
        # every hostile record dead-lettered; no committed offset moved back
        assert report.hostile_posted > 0 and report.hostile_answered == report.hostile_posted, (
            report.summary()
        )
        assert report.commits_back == [], report.summary()
        # the survivor's partitions went away and came straight back, mid-job
        assert any(aborted for _, _, aborted in report.handbacks), report.summary()
