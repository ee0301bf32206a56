"""OffsetTracker: the committable offset is the contiguous watermark of finished jobs."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.offsets import OffsetTracker

P0, P1 = ("jobs", 0), ("jobs", 1)


def _tracker(partition=P0, offsets=()) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(partition, offset)
    return tracker


def test_unknown_partition_has_no_watermark() -> None:
    assert OffsetTracker().watermark(P0) is None
    assert OffsetTracker().committable() == {}


def test_watermark_starts_at_the_first_tracked_offset() -> None:
    assert _tracker(P0, [100, 101]).watermark(P0) == 100


def test_in_order_completion_advances_the_watermark() -> None:
    tracker = _tracker(P0, [10, 11, 12])
    tracker.done(P0, 10)
    assert tracker.watermark(P0) == 11
    tracker.done(P0, 11)
    assert tracker.watermark(P0) == 12
    tracker.done(P0, 12)
    assert tracker.watermark(P0) == 13


def test_committable_offset_never_passes_an_unfinished_job() -> None:
    tracker = _tracker(P0, [10, 11, 12, 13])
    tracker.done(P0, 12)
    tracker.done(P0, 13)
    assert tracker.watermark(P0) == 10
    tracker.done(P0, 11)
    assert tracker.watermark(P0) == 10
    tracker.done(P0, 10)
    assert tracker.watermark(P0) == 14


def test_out_of_order_completion_holds_at_the_lowest_unfinished_offset() -> None:
    tracker = _tracker(P0, [0, 1, 2, 3, 4])
    tracker.done(P0, 0)
    tracker.done(P0, 3)
    tracker.done(P0, 4)
    assert tracker.watermark(P0) == 1
    tracker.done(P0, 1)
    assert tracker.watermark(P0) == 2


def test_done_jobs_held_behind_an_unfinished_one_are_passed_once_it_finishes() -> None:
    tracker = _tracker(P0, [0, 1, 2])
    tracker.done(P0, 1)
    tracker.done(P0, 2)
    assert tracker.watermark(P0) == 0
    tracker.done(P0, 0)  # only offset 0 was still in flight
    assert tracker.watermark(P0) == 3


def test_gaps_in_offsets_are_skipped_once_the_jobs_around_them_finish() -> None:
    tracker = _tracker(P0, [5, 9, 20])  # compacted topic / transaction markers leave holes
    tracker.done(P0, 9)
    assert tracker.watermark(P0) == 5
    tracker.done(P0, 5)
    assert tracker.watermark(P0) == 20
    tracker.done(P0, 20)
    assert tracker.watermark(P0) == 21


def test_partitions_are_independent() -> None:
    tracker = _tracker(P0, [0, 1])
    tracker.track(P1, 50)
    tracker.done(P1, 50)
    assert (tracker.watermark(P0), tracker.watermark(P1)) == (0, 51)


def test_committable_reports_only_partitions_whose_watermark_moved() -> None:
    tracker = _tracker(P0, [0, 1])
    tracker.track(P1, 7)
    assert tracker.committable() == {P0: 0, P1: 7}
    tracker.mark_committed({P0: 0, P1: 7})
    assert tracker.committable() == {}

    tracker.done(P0, 1)  # out of order: P0's watermark does not move
    assert tracker.committable() == {}
    tracker.done(P0, 0)
    assert tracker.committable() == {P0: 2}
    tracker.mark_committed({P0: 2})
    assert tracker.committable() == {}


def test_tracking_more_records_does_not_move_an_unfinished_watermark() -> None:
    tracker = _tracker(P0, [0])
    tracker.mark_committed(tracker.committable())
    tracker.track(P0, 1)
    assert tracker.committable() == {}


def test_mark_committed_ignores_unknown_partitions() -> None:
    tracker = _tracker(P0, [0])
    tracker.mark_committed({P1: 3})
    assert tracker.committable() == {P0: 0}
    assert tracker.watermark(P1) is None


def test_forget_drops_partitions_and_later_done_calls_are_ignored() -> None:
    tracker = _tracker(P0, [0, 1])
    tracker.track(P1, 0)
    tracker.forget([P0])
    tracker.done(P0, 0)
    assert tracker.watermark(P0) is None
    assert tracker.committable() == {P1: 0}
    tracker.done(P1, 0)  # the partition kept goes on
    assert tracker.watermark(P1) == 1


def test_a_forgotten_partition_starts_afresh_when_assigned_again() -> None:
    tracker = _tracker(P0, [0, 1])
    tracker.forget([P0])
    tracker.track(P0, 1)  # the new assignment resumes from the committed offset
    tracker.done(P0, 1)
    assert tracker.watermark(P0) == 2


def test_a_job_of_an_earlier_assignment_does_not_move_the_new_one() -> None:
    tracker = OffsetTracker()
    old = tracker.track(P0, 5)
    tracker.forget([P0])  # revoked, and assigned here again
    new = tracker.track(P0, 5)
    assert new != old
    tracker.done(P0, 5, old)  # the job consumed before the revoke finishes late
    assert tracker.watermark(P0) == 5
    tracker.done(P0, 5, new)
    assert tracker.watermark(P0) == 6


def test_a_record_consumed_twice_in_one_assignment_is_tracked_once() -> None:
    tracker = OffsetTracker()
    generation = tracker.track(P0, 3)
    assert tracker.track(P0, 4) == generation
    assert tracker.track(P0, 3) is None  # a seek back delivers it again
    tracker.done(P0, 3, generation)
    tracker.done(P0, 4, generation)
    assert tracker.watermark(P0) == 5


def test_a_started_partition_refuses_records_below_its_committed_offset() -> None:
    tracker = OffsetTracker()
    tracker.start(P0, 10)
    assert tracker.committable() == {}  # 10 is what is committed already
    assert tracker.track(P0, 9) is None
    assert tracker.track(P0, 10) == tracker.generation(P0)
    assert tracker.watermark(P0) == 10


def test_a_trailing_transaction_marker_lets_the_watermark_reach_the_partition_end() -> None:
    tracker = _tracker(P0, [0, 1, 2])  # a transaction's jobs; its commit marker sits at 3
    tracker.skip_to(P0, 4)  # the consumer's position after the marker
    assert tracker.watermark(P0) == 0  # the jobs in flight still hold it
    for offset in (0, 1, 2):
        tracker.done(P0, offset)
    assert tracker.committable() == {P0: 4}


def test_skipping_neither_passes_a_job_in_flight_nor_moves_the_watermark_back() -> None:
    tracker = _tracker(P0, [5, 6])
    tracker.skip_to(P0, 9)
    tracker.done(P0, 6)
    assert tracker.watermark(P0) == 5
    tracker.done(P0, 5)
    tracker.skip_to(P0, 7)  # an older position changes nothing
    assert tracker.watermark(P0) == 9
    assert tracker.track(P0, 8) is None  # stepped over: not a record of this assignment


def test_an_unseen_partition_skipped_to_its_position_commits_it() -> None:
    tracker = OffsetTracker()  # at-least-once: a partition whose first fetch held only a marker
    tracker.skip_to(P0, 12)
    assert tracker.committable() == {P0: 12}


class WatermarkMachine(RuleBasedStateMachine):
    """Random interleavings of track (increasing offsets with gaps) and done, over two partitions."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker: OffsetTracker = OffsetTracker()
        self.tracked: dict = {P0: [], P1: []}
        self.unfinished: dict = {P0: set(), P1: set()}
        self.last_mark: dict = {}
        self.previous: dict = {}
        self.position: dict = {}  # where skip_to moved the consumer's position (markers stepped over)

    @rule(
        partition=st.sampled_from([P0, P1]),
        gap=st.integers(min_value=1, max_value=4),
        start=st.integers(0, 10**6),
    )
    def track(self, partition, gap: int, start: int) -> None:
        tracked = self.tracked[partition]
        offset = max(tracked[-1] + gap, self.position.get(partition, 0)) if tracked else start
        self.tracker.track(partition, offset)
        tracked.append(offset)
        self.unfinished[partition].add(offset)

    @precondition(lambda self: self.tracked[P0])
    @rule(skipped=st.integers(min_value=0, max_value=3))
    def skip_markers(self, skipped: int) -> None:
        position = max(self.tracked[P0][-1] + 1, self.position.get(P0, 0)) + skipped
        self.tracker.skip_to(P0, position)
        self.position[P0] = position

    @precondition(lambda self: any(self.unfinished.values()))
    @rule(data=st.data())
    def done(self, data) -> None:
        partition = data.draw(st.sampled_from([p for p in (P0, P1) if self.unfinished[p]]))
        offset = data.draw(st.sampled_from(sorted(self.unfinished[partition])))
        self.tracker.done(partition, offset)
        self.unfinished[partition].discard(offset)

    @rule()
    def commit(self) -> None:
        offsets = self.tracker.committable()
        for partition in (P0, P1):
            mark = self.tracker.watermark(partition)
            if partition in offsets:
                assert offsets[partition] == mark != self.last_mark.get(partition)
            else:
                assert mark == self.last_mark.get(partition)
        self.tracker.mark_committed(offsets)
        self.last_mark.update(offsets)

    @invariant()
    def watermark_is_lowest_unfinished_or_the_position_past_the_highest_tracked(self) -> None:
        for partition in (P0, P1):
            expected = None
            if self.unfinished[partition]:
                expected = min(self.unfinished[partition])
            elif self.tracked[partition]:
                expected = max(self.tracked[partition][-1] + 1, self.position.get(partition, 0))
            assert self.tracker.watermark(partition) == expected

    @invariant()
    def watermark_never_decreases(self) -> None:
        for partition in (P0, P1):
            mark = self.tracker.watermark(partition)
            if partition in self.previous:
                assert mark >= self.previous[partition]
            if mark is not None:
                self.previous[partition] = mark


WatermarkMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_watermark_state_machine = WatermarkMachine.TestCase
