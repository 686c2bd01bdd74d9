"""Histograms the hot path feeds: durations appended to plain lists, sorted into buckets
in bulk later (when Prometheus scrapes, and on every janitor pass)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    (the last one is +Inf). Cumulated only when scraped.

    The hot path only appends to ``pending`` (``record`` is its bound ``append``: one C
    call, no Python frame); ``fold`` sorts what was recorded into the buckets in bulk when
    the histogram is read and on every janitor pass, so ``pending`` stays short (a third of
    a second of transactions at most).
    """

    __slots__ = ("_sum", "bounds", "counts", "pending", "record")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self.pending: list[float] = []
        self.record: Callable[[float], None] = self.pending.append

    def observe(self, value: float) -> None:
        """Record one observation (seconds)."""
        self.pending.append(value)

    def fold(self) -> None:
        """Sort the recorded observations into their buckets."""
        pending = self.pending
        if not pending:
            return
        counts = self.counts
        bounds = self.bounds
        last = len(bounds)
        total = 0.0
        # A linear walk from the smallest bucket rather than a bisection: almost every
        # observation falls in the first few buckets, so it takes one to three steps, and
        # it is the faster of the two in both builds (compiled, the loop is plain C).
        for value in pending:
            index = 0
            while index < last and bounds[index] < value:
                index += 1
            counts[index] += 1
            total += value
        self._sum += total
        pending.clear()

    @property
    def sum(self) -> float:
        """The sum of every observation."""
        self.fold()
        return self._sum

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last."""
        self.fold()
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

    def fold(self) -> None:
        """Sort every histogram's recorded observations into its buckets."""
        for histogram in (self.wait, self.connect, self.query, self.transaction):
            histogram.fold()
