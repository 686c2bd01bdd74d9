"""The hot path's histograms: each observation counted in its Prometheus bucket."""

from __future__ import annotations

from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st

from pgproxy.core.histograms import DURATION_BUCKETS, Histogram, wait_buckets

seconds = st.floats(min_value=0.0, max_value=1000.0, allow_nan=False)


@given(st.lists(seconds, max_size=200))
def test_counts_are_prometheus_buckets(values: list[float]) -> None:
    # Each observation lands in the first bucket whose upper bound is >= it (le), or +Inf;
    # bounds themselves included.
    histogram = Histogram(DURATION_BUCKETS)
    expected = [0] * (len(DURATION_BUCKETS) + 1)
    for value in [*values, *DURATION_BUCKETS]:
        histogram.observe(value)
        expected[bisect_left(DURATION_BUCKETS, value)] += 1
    assert histogram.counts == expected
    everything = [*values, *DURATION_BUCKETS]
    assert abs(histogram.sum - sum(everything)) <= 1e-9 * max(1.0, sum(everything))


@given(st.lists(seconds, max_size=50), st.integers(0, 5))
def test_counts_with_few_bounds(values: list[float], size: int) -> None:
    # The first three buckets are fields: with fewer bounds, the field after the last
    # bound counts +Inf.
    bounds = DURATION_BUCKETS[:size]
    histogram = Histogram(bounds)
    expected = [0] * (size + 1)
    for value in values:
        histogram.observe(value)
        expected[bisect_left(bounds, value)] += 1
    assert histogram.counts == expected
    assert histogram.buckets()[-1] == ("+Inf", float(len(values)))


def test_buckets_are_cumulative_with_inf_last() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0, 7.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 6.0)]
    assert histogram.sum == 11.65


def test_wait_buckets_add_the_timeout_and_twice_it() -> None:
    bounds = wait_buckets(7.0)
    assert 7.0 in bounds and 14.0 in bounds and list(bounds) == sorted(set(bounds))
    assert 0.0005 in wait_buckets(0)
