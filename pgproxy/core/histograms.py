"""Histograms the hot path feeds: each duration counted in its bucket as it is observed,
cumulated only when Prometheus scrapes."""

from __future__ import annotations

import math
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
    """A Prometheus histogram: observations counted in their bucket as they come, ``sum``
    their total; cumulated only when scraped.

    Almost every observation falls in one of the first three buckets (under 2.5 ms for
    a query or a transaction, none for a wait), so those three are native fields, with
    their upper bounds: compiled, ``observe`` is then one to three float comparisons
    and an add on C integers. The later buckets are a list (``rest``), where a count
    above 256 is a new int object at each add. A histogram of fewer than three bounds
    gives the missing ones +Inf: the field after its last bound is its +Inf bucket.
    """

    __slots__ = ("bounds", "first", "first_le", "rest", "second", "second_le", "sum",
                 "third", "third_le")  # fmt: skip

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(bounds)
        hot = (*self.bounds[:3], math.inf, math.inf, math.inf)
        self.first_le: float = hot[0]
        self.second_le: float = hot[1]
        self.third_le: float = hot[2]
        self.first = 0
        self.second = 0
        self.third = 0
        # The buckets after the third: the fourth bound's and on, +Inf last.
        self.rest: list[int] = [0] * max(len(self.bounds) - 2, 0)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (seconds) in its bucket: the first whose upper bound is at
        least ``value`` (Prometheus' ``le``), else +Inf."""
        self.sum += value
        if value <= self.first_le:
            self.first += 1
        elif value <= self.second_le:
            self.second += 1
        elif value <= self.third_le:
            self.third += 1
        else:
            # A linear walk: the rare later buckets are mostly the first few of them.
            bounds = self.bounds
            last = len(bounds)  # the index of +Inf
            index = 3
            while index < last and bounds[index] < value:
                index += 1
            rest = self.rest
            # (Not ``rest[i] += 1``: compiled, an augmented assignment to an item is a
            # generic in-place add on objects.)
            rest[index - 3] = rest[index - 3] + 1

    @property
    def counts(self) -> list[int]:
        """The observations per bucket, +Inf last."""
        return [self.first, self.second, self.third, *self.rest][: len(self.bounds) + 1]

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
