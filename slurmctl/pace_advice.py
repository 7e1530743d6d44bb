"""Why a job spends less of a declared rate limit than it could, when the cause is its workers and the fix is the
user's: said by a worker process in its task run's log (so it shows in the Prefect UI beside the batches), and by
``slurmctl status`` and the run's artifacts from the job's counts (so it stands in the manifests too).

Six causes, each told once a pattern has shown, not at a moment:

* **An async handler that blocks**: a blocking call (``time.sleep``, ``requests``, boto3) or a long computation holds
  the worker's event loop, so the worker's other items wait (``slurmctl.loop_watch``). Its slots pass late too, but
  more worker processes would not help: this cause is said instead of the next. Fix: an async client, blocking work
  off the loop (``asyncio.to_thread``), or a sync handler with ``concurrency: auto``.
* **Late slots**: a worker is too busy (its CPU) to keep the limit's pace; its items come too late for the limit's
  slots, which pass unused. Fix: more worker processes, each with a core of its own.
* **The concurrency cap**: ``max_concurrency``, or the items a worker's batches hold at once (``batch_size`` x two
  per worker thread), holds fewer calls in flight than the limit needs (an equal share of it x the calls' latency,
  Little's law), so its slots pass unused. Fix: a higher ``max_concurrency`` (memory allowing) or ``batch_size``, or
  more worker processes.
* **One at a time**: a sync handler's items run one at a time (``concurrency`` unset or 1), one call in flight per
  batch running, where the limit needs at least twice that: the job the README's "Many calls in flight" is about.
  Fix: ``concurrency: auto`` (a thread-safe handler) or an async handler.
* **A fixed concurrency too low**: ``concurrency: N`` allows N calls in flight per worker thread, where the limit
  needs at least twice that (N chosen for a faster API, or a smaller quota). Fix: ``concurrency: auto``, which
  follows the latency, or a larger N.
* **No limit declared, and the API throttles**: a batch's calls were answered 429 (1 % or more); each costs a retry
  and ``auto`` backs off. Fix: declare the API's limit in ``rate_limits`` and wrap the calls in ``ctx.limit``. Said
  by the worker only (the job's counts keep no tally of 429s).

Plain Python over counters and the gate (it imports only ``slurmctl.inflight``, which imports only the loop's watch),
so the books can ask it too. Each warning is said once per worker process, job and cause (``_first_time``).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

from slurmctl.inflight import AutoGate

if TYPE_CHECKING:
    from slurmctl.handler import BatchContext

LATE_SHARE = 0.1  # callers too late for this share of a limit's slots are a worker too busy ...
LATE_MIN_SLOTS = 500  # ... once there were this many slots (one batch's tail is not a pattern)
HELD_MIN_S = 1.0  # an async handler held its worker's event loop this long in all ...
HELD_PER_CALL_MS = 1.0  # ... and, for a job, this long per call: it blocks the loop (a stall now and then does not)
HELD_SHARE = 0.05  # ... or, in a worker, this share of the time its batches ran
THROTTLED_SHARE = 0.01  # with no rate limit declared, answers of 429 to this share of a batch's calls ...
THROTTLED_MIN = 5  # ... and at least this many of them: the job should declare the API's limit
_late_seen: dict[tuple[str, str], list[int]] = {}  # (job, limit): this worker process's late slots and slots
_told: set[tuple[str, ...]] = set()  # (job, cause[, limit]): what this worker process has said
_lock = threading.Lock()


def _first_time(*key: str) -> bool:
    """True the first time this worker process is about to say ``key`` (job, cause, ...), False after."""
    with _lock:
        if key in _told:
            return False
        _told.add(key)
        return True


def late_slots_matter(late: int, slots: int) -> bool:
    """Enough slots passed late to say the workers are too busy for the limit's pace."""
    return slots >= LATE_MIN_SLOTS and late >= LATE_SHARE * slots


def loop_held_matters(held_s: float, calls: int) -> bool:
    """A job's handler held its workers' event loops long enough, per call, to say it blocks them."""
    return held_s >= HELD_MIN_S and held_s * 1000 >= HELD_PER_CALL_MS * max(calls, 1)


def warn_loop_held(job_id: str, batch_id: str, held: Any, logger: Any) -> bool:
    """Say so when the job's async handler holds this worker's event loop (``held``: ``slurmctl.loop_watch.Held``)
    for ``HELD_SHARE`` of the time its batches have run, and ``HELD_MIN_S`` in all; said once per worker process
    and job. True from then on: the worker's late slots are then the handler's doing, not a worker too busy
    (``warn_late_slots`` is not said)."""
    if held is None or held.held_s < HELD_MIN_S or held.held_s < HELD_SHARE * held.watched_s:
        return False
    if _first_time(job_id, "loop held") and logger is not None:
        logger.warning(
            "the async handler held this worker's event loop for %.1f s of the %.1f s its batches have run (%.0f %%, "
            "up to batch %s), mostly at %s. It blocks there (a blocking call such as time.sleep, requests, boto3 or "
            "a sync client, or a long computation): every item in flight in this worker runs on that loop, so while "
            "it is held no other call of this worker starts or hears its answer. Await an async client "
            "(httpx.AsyncClient, as slurmctl.handlers.http_json:AsyncClient does) or asyncio.sleep, move blocking "
            "or long work off the loop (await asyncio.to_thread(...)), or make it a sync handler (def, not async "
            "def) with concurrency: auto, which runs its calls in threads. Said once per worker process.",
            held.held_s, held.watched_s, 100 * held.held_s / max(held.watched_s, 1e-9), batch_id,
            held.top_place() or "an unknown place")
    return True


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
        if not late_slots_matter(late, slots) or not _first_time(job_id, "late slots", name):
            continue
        if logger is not None:
            logger.warning(
                "rate limit %r: %d of the %d slots this worker has had (%.0f %%, up to batch %s) passed unused "
                "because the items waiting for them came more than %.0f ms late. This worker is too busy to keep the "
                "limit's pace, so the job spends less of the limit than it could. More worker processes, each with a "
                "core of its own, would spend it (README, \"Cores for a fast limit\"). Said once per worker process.",
                name, late, slots, 100 * late / slots, batch_id, allowance_ms)


def suggested_max_concurrency(needed: int) -> int:
    """The ``max_concurrency`` to set when a limit needs ``needed`` calls in flight: those, and a short queue of
    items waiting for tokens so the limiter never idles (half of ``AutoGate.QUEUE_SHARE``, as its slow start)."""
    return math.ceil(needed * (1 + AutoGate.QUEUE_SHARE / 2))


def warn_undeclared_throttling(job_id: str, batch_id: str, declared: bool, throttled: int, calls: int,
                               logger: Any) -> None:
    """Say so when a job that declares no rate limit has its calls answered 429 (or another throttling error) at
    ``THROTTLED_SHARE`` of a batch's calls or more (at least ``THROTTLED_MIN``): each costs its item a retry after a
    backoff and shrinks ``auto``'s calls in flight by 30 %, so the job runs far below what the API allows (a review
    measured 0.31 of an API's rate with 2.2 % of its answers 429, and nothing said why). Declared, the limit paces
    the calls at the API's rate instead. Said once per worker process and job."""
    if declared or throttled < THROTTLED_MIN or throttled < THROTTLED_SHARE * calls:
        return
    if logger is not None and _first_time(job_id, "undeclared throttling"):
        logger.warning(
            "the API answered %d of this batch's %d calls with 429 or another throttling error (up to batch %s), and "
            "the job declares no rate limit: each such answer costs its item a retry after a backoff, and "
            "concurrency: auto shrinks the calls in flight for it, so the job runs well below what the API allows. "
            "Declare the API's documented limit in the job's config (rate_limits: {api: {per_second: R, burst: B}}) "
            "and wrap each call in ctx.limit(\"api\") (README, \"Rate limits shared by every worker\"): the job then "
            "paces its calls at that rate. Said once per worker process.", throttled, calls, batch_id)


def suggested_batch_size(needed: int, batches: int) -> int:
    """The ``batch_size`` to set when a limit needs ``needed`` calls in flight in a worker process that runs
    ``batches`` at once (two per worker thread): one batch per thread holds them and their queue, so the other
    keeps the rate up through each batch's tail (README, "`batch_size` bounds it too")."""
    return math.ceil(suggested_max_concurrency(needed) / max(1, batches // 2))


def warn_concurrency_cap(job_id: str, batch_id: str, gate: Any, logger: Any) -> None:
    """Say so when ``concurrency: auto`` has held at ``max_concurrency``, or at the items the worker's batches hold
    (``AutoGate.supply``: then the ``batch_size`` to set), for ``AutoGate.CAPPED_S`` while a declared
    limit needed more calls in flight (``capped_need``): with 1 s answers, 256 in flight spend 256/s, whatever the
    limit allows. A fixed gate (``concurrency: N``) has its own warning (``warn_fixed_concurrency``)."""
    needed = gate.capped_need() if isinstance(gate, AutoGate) else 0
    if not needed or not _first_time(job_id, "max_concurrency"):
        return
    name, offer = gate.least_offer(even=True)
    if logger is not None and gate.supply < gate.maximum:
        logger.warning(
            "rate limit %r offers this worker %.0f calls/s, and its calls take %.2f s: spending that needs %d calls "
            "in flight (rate x latency), but this worker's batches hold at most %d items at once (batch_size %d x %d "
            "batches at once), so it spends at most about %.0f/s of it (up to batch %s). Set batch_size: %d in the "
            "job's config (README, \"batch_size bounds it too\"), or run more worker processes. Said once per worker "
            "process.", name, offer, gate.base_latency, needed, gate.supply, gate.batch_size, gate.batches,
            gate.supply / gate.base_latency, batch_id, suggested_batch_size(needed, gate.batches))
    elif logger is not None:
        logger.warning(
            "rate limit %r offers this worker %.0f calls/s, and its calls take %.2f s: spending that needs %d calls "
            "in flight (rate x latency), but max_concurrency holds this worker at %d, so it spends at most about "
            "%.0f/s of it (up to batch %s). Set max_concurrency: %d in the job's config (memory allowing: each call "
            "in flight holds its item, request and answer), or run more worker processes. Said once per worker "
            "process.", name, offer, gate.base_latency, needed, gate.maximum, gate.maximum / gate.base_latency,
            batch_id, suggested_max_concurrency(needed))


def warn_memory_hold(job_id: str, batch_id: str, gate: Any, logger: Any) -> None:
    """Say so when the worker's memory has held ``concurrency: auto`` back (``AutoGate.memory_held``): its items in
    flight then stop growing, whatever the rate limits need."""
    held = gate.memory_held if isinstance(gate, AutoGate) else None
    if held is None or not _first_time(job_id, "memory"):
        return
    if logger is not None:
        logger.warning(
            "this worker process's calls in flight stop growing at %d (up to batch %s): each holds its item, request "
            "and answer, and more would take the process past %.0f %% of its memory limit (it used %.0f %% then; "
            "Dask pauses a worker at 80 %%). If the job spends less of its rate limits than it could, give each "
            "worker process more memory (cluster.memory, or fewer processes per Slurm job) or keep less per call. "
            "Said once per worker process.", held[0], batch_id, 100 * gate.memory_hold, 100 * held[1])


def warn_fixed_concurrency(job_id: str, batch_id: str, run: Any, logger: Any) -> None:
    """Say so when items run under a fixed concurrency (one at a time, or ``concurrency: N``) and a declared limit
    needs at least twice the calls in flight the worker process then makes (``ItemRun.fixed_short``, from
    ``fixed_need``): 200 ms answers at 50/s need 10, where one at a time in 2 batches is 2, so the job spends a
    fifth of the limit, with no error anywhere."""
    need = run.fixed_short
    if need is None or not _first_time(job_id, "fixed concurrency"):
        return
    name, offer, latency, needed = need
    in_flight = max(run.fixed_in_flight, 1)
    if run.cfg.concurrency is None and not run.is_async:  # a sync handler's default, as ``job_advice`` tells it
        how = "the handler runs its items one at a time"
        fix = ("Set concurrency: auto in the job's config to run them in threads (the handler must then be "
               "thread-safe: README, \"Many calls in flight\"), or make the handler async")
    else:  # the user's number (an async handler's included)
        how = f"concurrency: {run.concurrency} allows {run.concurrency} per worker thread"
        threads = " (the handler must then be thread-safe)" if run.concurrency == 1 and not run.is_async else ""
        fix = (f"Set concurrency: auto in the job's config (it follows the limit and the latency it measures)"
               f"{threads}, or a larger concurrency")
    if logger is not None:
        logger.warning(
            "rate limit %r offers this worker %.0f calls/s, and its calls take %.2f s: spending that needs %d calls "
            "in flight (rate x latency), but %s, %d in flight in this worker, so it spends at most about %.0f/s of "
            "it (up to batch %s). %s. Said once per worker process.", name, offer, latency, needed, how, in_flight,
            in_flight / latency, batch_id, fix)


def job_advice(counts: dict[str, Any], max_concurrency: int, concurrency: int | str | None = None,
               batch_size: int = 0, batches: int = 0) -> list[str]:
    """What the job's counts (``books.manifests.Counts``, summed over its committed batches) say about its pace,
    for ``slurmctl status`` and the run's artifacts: one sentence per cause, with what to do. ``max_concurrency``,
    ``concurrency`` and ``batch_size`` are the job's config (``concurrency`` None: unset), ``batches`` the batches a
    worker process runs at once (two per worker thread; 0: not known)."""
    out = []
    held, calls = float(counts.get("loop_held_s") or 0), int(counts.get("api_calls") or 0)
    if loop_held_matters(held, calls):
        per_call = 1000 * held / max(calls, 1)
        out.append(f"the async handler held its workers' event loops for {held:,.0f} s ({per_call:,.0f} ms per "
                   f"call): it blocks (a blocking call or a long computation; the workers' logs name the line), so "
                   f"while it runs no other call of that worker starts or hears its answer. Await an async client "
                   f"(httpx.AsyncClient) or asyncio.sleep, move blocking work off the loop (asyncio.to_thread), or "
                   f"make it a sync handler (def) with concurrency: auto")
    late, slots = int(counts.get("limit_slots_late") or 0), int(counts.get("limit_slots") or 0)
    if late_slots_matter(late, slots) and not out:  # a held loop makes slots late: that is its cause, said above
        out.append(f"{late:,} of {slots:,} rate-limit slots ({100 * late / slots:.0f} %) passed unused because the "
                   f"workers were too busy to take them in time: more worker processes, each with a core of its own, "
                   f"would spend them (README, \"Cores for a fast limit\")")
    needed = int(counts.get("concurrency_needed") or 0)
    short = f"a declared rate limit needed up to {needed:,} calls in flight in a worker process, and "  # held by:
    if needed and isinstance(concurrency, int):  # the user's number, too low for the limit (1: sync or async)
        threads = " (a sync handler must then be thread-safe)" if concurrency == 1 else ""
        out.append(f"{short}concurrency: {concurrency} held each worker thread at {concurrency}: set concurrency: "
                   f"auto (it follows the limit and the latency it measures){threads} or a larger concurrency (README, "
                   f"\"Many calls in flight\")")
    elif needed and int(counts.get("in_flight_max") or 1) <= 1:  # a sync handler's items, one at a time by default
        out.append(f"{short}the handler ran its items one at a time: set concurrency: auto (the handler must then be "
                   f"thread-safe) or make the handler async (README, \"Many calls in flight\")")
    elif needed and batch_size and batches and needed > batch_size * batches and \
            batch_size * batches < max_concurrency:  # the items the batches hold bound it first
        out.append(f"{short}its batches held at most {batch_size * batches:,} items at once (batch_size {batch_size:,} "
                   f"x {batches} batches at once): set batch_size: {suggested_batch_size(needed, batches)} or run more "
                   f"worker processes (README, \"batch_size bounds it too\")")
    elif needed > max_concurrency:  # the number to set as YAML reads it: no thousands separator
        out.append(f"{short}max_concurrency held each at {max_concurrency:,}: set max_concurrency: "
                   f"{suggested_max_concurrency(needed)} (memory allowing) or run more worker processes")
    return out
