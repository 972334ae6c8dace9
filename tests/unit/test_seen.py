from hypothesis import given
from hypothesis import strategies as st

from processors import seen


@given(st.lists(st.integers(0, 200), max_size=300))
def test_add_reports_exactly_the_duplicates(seqs):
    intervals: list[list[int]] = []
    accepted = set()
    for s in seqs:
        assert seen.add(intervals, s, max_intervals=10_000) == (s not in accepted)
        accepted.add(s)
    # Sorted, disjoint, non-adjacent, covering exactly what was accepted.
    covered = {n for lo, hi in intervals for n in range(lo, hi + 1)}
    assert covered == accepted
    for (_, hi), (lo, _) in zip(intervals, intervals[1:], strict=False):
        assert hi + 1 < lo


@given(st.lists(st.integers(0, 10_000), max_size=500), st.integers(1, 8))
def test_bounded_and_never_accepts_twice(seqs, bound):
    intervals: list[list[int]] = []
    accepted: set[int] = set()
    for s in seqs:
        if seen.add(intervals, s, max_intervals=bound):
            assert s not in accepted
            accepted.add(s)
        assert len(intervals) <= bound


def test_in_order_stream_is_one_interval():
    intervals: list[list[int]] = []
    for s in range(5, 10_005):
        assert seen.add(intervals, s)
    assert intervals == [[5, 10_004]]


def test_resent_batches_after_a_reordering_are_duplicates():
    intervals: list[list[int]] = []
    for s in [1, 2, 4, 5, 3, 4, 5, 6]:
        seen.add(intervals, s)
    assert intervals == [[1, 6]]
    assert not seen.add(intervals, 3)
