"""What a worker process tells its user about its own pace: why a job spends less of a declared rate limit than it
could, when the cause is in this worker and the fix is the user's.

Each warning goes to the batch's task run log (so it shows in the Prefect UI beside the batches), once per worker
process, job and cause, after a pattern rather than a moment:

* ``warn_late_slots``: the worker is too busy (its CPU) to keep the limit's pace: its items come too late for the
  limit's slots, which pass unused. Fix: more worker processes, each with a core of its own.
* ``warn_concurrency_cap``: ``max_concurrency`` holds fewer calls in flight than the limit needs (the rate it offers
  this process x the calls' latency, Little's law), so the limit's slots pass unused. Fix: a higher
  ``max_concurrency``, memory allowing, or more worker processes.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from slurmctl.handler import BatchContext
from slurmctl.inflight import AutoGate

LATE_SHARE = 0.1  # a worker whose callers came too late for this share of a limit's slots is told why ...
LATE_MIN_SLOTS = 500  # ... once it has seen this many of them (one batch's tail is not a pattern)
_late_seen: dict[tuple[str, str], list[int]] = {}  # (job, limit): this worker process's late slots and slots
_late_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()


def warn_late_slots(job_id: str, batch_id: str, ctx: BatchContext, logger: Any) -> None:
    """Say why a job spends less of a rate limit than it could, when the cause is this worker: its items came too
    late for ``LATE_SHARE`` of the limit's slots or more (``BatchContext.limit_slots``), which then passed unused.
    Counted over the worker process's batches of the job; said once per worker process, job and limit."""
    for name, (late, slots, allowance_ms) in ctx.limit_slots().items():
        with _lock:
            seen = _late_seen.setdefault((job_id, name), [0, 0])
            seen[0] += late
            seen[1] += slots
            late, slots = seen
            if slots < LATE_MIN_SLOTS or late < LATE_SHARE * slots or (job_id, name) in _late_warned:
                continue
            _late_warned.add((job_id, name))
        if logger is not None:
            logger.warning(
                "rate limit %r: %d of the %d slots this worker has had (%.0f %%, up to batch %s) passed unused "
                "because the items waiting for them came more than %.0f ms late. This worker is too busy to keep the "
                "limit's pace, so the job spends less of the limit than it could. More worker processes, each with a "
                "core of its own, would spend it (README, \"Cores for a fast limit\"). Said once per worker process.",
                name, late, slots, 100 * late / slots, batch_id, allowance_ms)


def warn_concurrency_cap(batch_id: str, gate: Any, logger: Any) -> None:
    """Say so when ``concurrency: auto`` has held at ``max_concurrency`` for ``AutoGate.CAPPED_S`` while a declared
    limit needed more calls in flight (``AutoGate.short_of``): with 1 s answers, 256 in flight spend 256/s, whatever
    the limit allows. Said once per worker process and job (the gate is theirs)."""
    if not isinstance(gate, AutoGate) or not gate.offers or gate.base_latency is None:
        return
    needed = gate.short_of()
    with _lock:
        if not needed or gate.capped_s < gate.CAPPED_S or gate.cap_told:
            return
        gate.cap_told = True
    name, offer = min(gate.offers.items(), key=lambda kv: kv[1])
    if logger is not None:
        logger.warning(
            "rate limit %r offers this worker %.0f calls/s, and its calls take %.2f s: spending that needs %d calls "
            "in flight (rate x latency), but max_concurrency holds this worker at %d, so it spends at most about "
            "%.0f/s of it (up to batch %s). Set max_concurrency: %d in the job's config (memory allowing: each call "
            "in flight holds its item, request and answer), or run more worker processes. Said once per worker "
            "process.", name, offer, gate.base_latency, needed, gate.maximum, gate.maximum / gate.base_latency,
            batch_id, math.ceil(needed * (1 + gate.QUEUE_SHARE / 2)))
