"""How far a job is, and how fast it goes: items/s, ETA and per-phase progress, from the job manifest alone.

One function (``job_progress``) serves ``slurmctl status`` (human and ``--json``), the ``--wait`` progress line and
the Prefect UI's progress artifact, so they never disagree. It reads what the coordinator writes every couple of
seconds (``counts``, ``updated_at``), when each phase started and ended (``phase_times``, kept by
``books.store.update_job``) and the retry rounds (``retry_rounds``): no Prefect, no listing of task manifests.

* items/s is measured over the work phase of this run (process, or the running retry round), from its start to the
  counters' last save: items done since the phase started / seconds. After the job, the process phase's rate.
* ETA is the running work phase's: the items it has left at that rate (the aggregation is not in it).
* phases: partition, process, each retry round, aggregate — ``done``, ``running``, ``pending``, ``skipped`` (no
  retry round), or the job's end status (``failed``, ``cancelled``) for the phase it ended in; ``share_done`` where
  the manifests know it (process and retry rounds by batches; partition and aggregate 0 or 1).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

ORDER = ("submitted", "partition", "process", "retry", "aggregate", "done")


def _time(s: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None


def _seconds(start: str | None, end: str | None) -> float | None:
    a, b = _time(start), _time(end)
    return None if a is None or b is None else max(0.0, (b - a).total_seconds())


def items_done(counts: dict[str, Any]) -> int:
    """Items with an outcome: succeeded, failed, deferred (to a retry round) or rejected as malformed."""
    return sum(counts.get(k) or 0 for k in ("items_succeeded", "items_failed", "items_deferred", "items_rejected"))


def _clamp(x: float) -> float:
    return round(min(1.0, max(0.0, x)), 4)


def job_progress(job: dict[str, Any]) -> dict[str, Any]:
    """``items_done``, ``items_per_s``, ``eta_s`` (None when unknown) and ``phases`` of a job manifest (a dict as
    stored). Deterministic: the clock is the manifest's own ``updated_at`` (or ``finished_at``), so the numbers say
    what the last saved counters say."""
    counts = job.get("counts") or {}
    status, phase = job.get("status", "pending"), job.get("phase", "submitted")
    times: dict[str, dict[str, Any]] = job.get("phase_times") or {}
    rounds: list[dict[str, Any]] = job.get("retry_rounds") or []
    as_of = job.get("finished_at") or job.get("updated_at")
    finished = status == "completed" or phase == "done"
    current = ORDER.index(phase) if phase in ORDER else 0
    done_items = items_done(counts)
    batches_total, batches_done = counts.get("batches_total") or 0, counts.get("batches_done") or 0

    def state(name: str) -> str:
        i = ORDER.index(name)
        if finished or i < current:
            return "done"
        if i > current:
            return "pending"
        return "running" if status in ("running", "pending") else status

    def entry(label: str, name: str, share: float | None, extra: dict[str, Any] | None = None,
              t: dict[str, Any] | None = None) -> dict[str, Any]:
        t = times.get(name, {}) if t is None else t
        st = state(name)
        end = t.get("finished_at") or (as_of if st in ("running", status) else None)
        return {"phase": label, "state": st, "share_done": 1.0 if st == "done" and share is None else share,
                "started_at": t.get("started_at"), "finished_at": t.get("finished_at"),
                "seconds": _seconds(t.get("started_at"), end), **(extra or {})}

    # process: the initial batches (the total less the retry rounds' batches)
    initial = batches_total - sum(r.get("batches") or 0 for r in rounds)
    process_share = _clamp(min(batches_done, initial) / initial) if initial > 0 else None
    def whole(name: str) -> float | None:  # a phase whose share the manifests do not follow: 0, unknown, 1
        return {"done": 1.0, "pending": 0.0}.get(state(name))

    phases = [entry("partition", "partition", whole("partition")),
              entry("process", "process", process_share if state("process") != "pending" else 0.0)]

    # retry rounds: one entry each; the unfinished one while the phase runs is the one moving
    running_round: dict[str, Any] | None = None
    for r in rounds:
        if r.get("finished_at"):
            share: float | None = 1.0
            st = "done"
        else:
            st = state("retry") if state("retry") != "done" else "done"
            n = r.get("batches") or 0
            share = _clamp((batches_done - (batches_total - n)) / n) if n else 1.0
            if st == "running":
                running_round = {**r, "share_done": share}
        start = r.get("started_at")
        end = r.get("finished_at") or (as_of if st == "running" else None)
        phases.append({"phase": f"retry {r['round']}", "state": st, "share_done": share, "started_at": start,
                       "finished_at": r.get("finished_at"), "seconds": _seconds(start, end),
                       "round": r["round"], "items": r.get("items"), "batches": r.get("batches")})
    if not rounds:
        retry_state = state("retry")
        phases.append({**entry("retry", "retry", None), "share_done": None,
                       "state": "skipped" if retry_state == "done" else retry_state})
    phases.append(entry("aggregate", "aggregate", whole("aggregate")))

    # items/s and ETA of the work phase
    rate: float | None = None
    eta: float | None = None
    proc = times.get("process") or {}
    if running_round is not None:
        start = max(filter(None, [running_round.get("started_at"), (times.get("retry") or {}).get("started_at")]),
                    key=lambda s: _time(s), default=None)
        elapsed = _seconds(start, as_of)
        done_in_round = running_round["share_done"] * (running_round.get("items") or 0)
        if elapsed and done_in_round > 0:
            rate = done_in_round / elapsed
            eta = ((running_round.get("items") or 0) - done_in_round) / rate
    elif proc.get("started_at") or job.get("started_at"):
        start = proc.get("started_at") or job.get("started_at")
        end = proc.get("finished_at") or as_of
        elapsed = _seconds(start, end)
        moved = done_items - (proc.get("items_at_start") or 0)
        if elapsed and moved > 0:
            rate = moved / elapsed
            if phase == "process" and status == "running":
                eta = max(0, (counts.get("items_total") or 0) - done_items) / rate
    if finished:
        eta = 0.0
    return {"items_done": done_items, "items_per_s": None if rate is None else round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1), "phases": phases}
