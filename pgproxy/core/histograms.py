"""Histograms the hot path feeds: each duration counted in its bucket as it is observed,
cumulated only when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Sequence

# Bucket upper bounds in seconds.
WAIT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
CONNECT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
)  # fmt: skip
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip


def wait_buckets(query_wait_timeout: float) -> tuple[float, ...]:
    """WAIT_BUCKETS plus the timeout itself and twice it, so that a p99 near the timeout
    (waits ended by query_wait_timeout are observed too) has buckets around it."""
    extra = {query_wait_timeout, 2 * query_wait_timeout} if query_wait_timeout > 0 else set()
    return tuple(sorted(set(WAIT_BUCKETS) | extra))


class Histogram:
    """A Prometheus histogram as plain lists: ``counts[i]`` observations fell in bucket i
    (the last one is +Inf), ``sum`` their total. Cumulated only when scraped.

    ``observe`` counts a value in its bucket at once. Compiled, that is a native call, a
    walk of one to three comparisons and two additions on C fields (no float object is
    made or kept), cheaper than appending the value to a list to sort later.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(bounds)
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (seconds) in its bucket: the first whose upper bound is at
        least ``value`` (Prometheus' ``le``), else +Inf."""
        # A linear walk from the smallest bucket rather than a bisection: almost every
        # observation falls in the first few buckets.
        bounds = self.bounds
        last = len(bounds)  # the index of +Inf
        index = 0
        while index < last and bounds[index] < value:
            index += 1
        counts = self.counts
        # (Not ``counts[index] += 1``: compiled, an augmented assignment to an item is a
        # generic in-place add on objects; this is an add on C integers.)
        counts[index] = counts[index] + 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last."""
        result = []
        running = 0
        for bound, count in zip([*map(_le, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            result.append((bound, float(running)))
        return result


def _le(bound: float) -> str:
    return repr(float(bound))


class PoolHistograms:
    """A pool's four histograms."""

    __slots__ = ("connect", "query", "transaction", "wait")

    def __init__(self, query_wait_timeout: float) -> None:
        self.wait = Histogram(wait_buckets(query_wait_timeout))
        self.connect = Histogram(CONNECT_BUCKETS)
        self.query = Histogram(DURATION_BUCKETS)
        self.transaction = Histogram(DURATION_BUCKETS)
