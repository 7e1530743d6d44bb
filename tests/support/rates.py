"""Counting requests in time windows: what "at most rate x T + burst in any window of T seconds" is checked with."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def max_in_window(stamps: Iterable[float], window: float = 1.0) -> int:
    """The largest number of ``stamps`` in any half-open window ``(t - window, t]``."""
    stamps = sorted(stamps)
    best, j = 0, 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def rate_bound(rate: float, window: float, burst: float) -> float:
    """The most requests a limit of ``rate``/s with ``burst`` lets into a window: evenly spaced slots put one more
    in a closed window when both of its ends land on a slot (the fencepost)."""
    return rate * window + burst + 1


def bucket_needed(stamps: Iterable[float], rate: float) -> float:
    """The smallest token-bucket capacity (refilling at ``rate``/s, full at the start) that would have let every
    request through: how much burst the requests' arrival pattern really used."""
    stamps = sorted(stamps)
    need, debt = 1.0, 0.0  # debt: tokens taken beyond the refill, i.e. how far below "full" the bucket is
    for prev, t in zip([None, *stamps], stamps):
        if prev is not None:
            debt = max(0.0, debt - (t - prev) * rate)
        debt += 1.0
        need = max(need, debt)
    return need


def steady_buckets(stamps: Iterable[float], edge_s: float = 2.0) -> list[int]:
    """Requests in each whole second of a run, counted where they arrive, the first and last ``edge_s`` left out
    (start-up and the tail, where fewer workers have work)."""
    stamps = sorted(stamps)
    if not stamps:
        return []
    start, end = stamps[0] + edge_s, stamps[-1] - edge_s
    seconds = int(end - start)
    counts = [0] * max(0, seconds)
    for t in stamps:
        k = int(t - start) if t >= start else -1
        if 0 <= k < seconds:
            counts[k] += 1
    return counts


def read_trace(folder: Path) -> list[tuple[int, int, int]]:
    """Every line the workers' ``SLURMCTL_LIMIT_TRACE`` files in ``folder`` hold: (slot µs, hand-out µs, lane), lane
    ``-1`` for a slot whose caller came too late and ``-2`` for one nobody waited for."""
    return [(a, b, c) for f in sorted(folder.glob("*.txt")) for a, b, c in
            (map(int, line.split()) for line in f.read_text().splitlines())]
