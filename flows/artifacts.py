"""The job in the Prefect UI: artifacts on the job's flow run, kept current while it runs.

* ``<job>-progress``: Prefect's progress artifact (one number: the share of batches committed), its description the
  one-line state (items, items/s, ETA, the most items in flight per worker process).
* ``<job>-status``: a markdown table beside it — phase, batches and items by outcome, items/s, ETA, updated at —
  because a progress artifact holds one number only; below it, while it applies, what ``slurmctl status`` notes about
  the job's pace (a handler holding its event loop, items run one at a time below a limit's need), so whoever
  watches the run in the UI can act before it ends.
* at the end, ``<job>-errors`` (failed items by class, top messages, example ids) and ``<job>-summary`` (outcome,
  counts, what it spent — API calls, core-hours, cost when priced — against its budget, output, failures file,
  manifests, rate limits, time per phase).

Both live artifacts are created once on the job's flow run and then updated in place by the coordinator's loop
(``flows.process.run_batches`` updates them with the counters it saves, every ``HEARTBEAT_S``): the UI lags a batch
commit by a few seconds. The coordinator is one process, so the subflows find the job's artifacts here (``live``)
rather than through parameters. The UI is a view: a Prefect API that does not answer costs a warning, never the job.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    MarkdownArtifact,
    ProgressArtifact,
    TableArtifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.logging import get_logger

from slurmctl.books.budget import fmt, usage_view
from slurmctl.books.manifests import Counts, JobManifest
from slurmctl.books.progress import job_progress
from slurmctl.books.status import pace_view

_live: dict[str, "JobArtifacts"] = {}
logger = get_logger("slurmctl.artifacts")


def live(job_id: str) -> "JobArtifacts | None":
    """The artifacts of the job this coordinator runs (None outside a job flow: tests calling subflows directly)."""
    return _live.get(job_id)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def pace_lines(view: dict[str, Any]) -> list[str]:
    """Why the job spends less of its rate limits than it could, and what to do (``slurmctl status``'s notes), as
    markdown: the live table says it while there is time to act, the summary at the end. ``view``: the job
    manifest as JSON."""
    advice = pace_view(view)
    return ["**Pace:**", ""] + [f"- {a}" for a in advice] + [""] if advice else []


def status_table(job: JobManifest, phase: str) -> str:
    """The live ``<job>-status`` artifact: the counts a progress artifact cannot hold, and the pace notes."""
    c, view = job.counts, job.model_dump(mode="json")  # once: the rate, the ETA and the notes read it
    rate, eta = _rate(view)
    at = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S UTC")
    rows = [("status", job.status), ("phase", phase),
            ("batches", f"{c.batches_done:,} of {c.batches_total:,} ({_percent(c):g} %)"),
            ("items", f"{_items_done(c):,} of {c.items_total:,}"),
            ("succeeded", f"{c.items_succeeded:,}"), ("failed", f"{c.items_failed:,}"),
            ("deferred", f"{c.items_deferred:,}"), ("rejected", f"{c.items_rejected:,}"),
            ("batches failed", f"{c.batches_failed:,}"), ("API calls", f"{c.api_calls:,}"),
            ("in flight (per worker, peak)", f"{c.in_flight_max:,}" + (
                f" ({c.concurrency_needed:,} needed)" if c.concurrency_needed > c.in_flight_max else ""))]
    if c.limit_slots:
        rows.append(("rate-limit slots passed late", f"{c.limit_slots_late:,} of {c.limit_slots:,}"))
    if c.loop_held_s:
        rows.append(("event loops held by the handler", f"{c.loop_held_s:,.1f} s"))
    rows += [("items/s", f"{rate:,.1f}" if rate else "—"), ("ETA", _duration(eta)), ("updated", at)]
    table = f"### {job.job_id}\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    pace = pace_lines(view)
    return table + ("\n" + "\n".join(pace) if pace else "")


def _rate(view: dict[str, Any]) -> tuple[float | None, float | None]:
    """Items per second of the work phase, and its seconds left: the numbers `slurmctl status` shows (``view``: the
    job manifest as JSON)."""
    p = job_progress(view)
    return p["items_per_s"], p["eta_s"]


def _percent(c: Counts) -> float:
    return round(100.0 * c.batches_done / c.batches_total, 2) if c.batches_total else 0.0


def _items_done(c: Counts) -> int:
    return c.items_succeeded + c.items_failed + c.items_deferred + c.items_rejected


class JobArtifacts:
    """Creates and updates one job run's artifacts (see the module docstring)."""

    def __init__(self, job: JobManifest, flow_run_id: str) -> None:
        self.job_id, self.flow_run_id = job.job_id, UUID(flow_run_id)
        self.phase_started = time.monotonic()
        self.phase = job.phase
        self.phase_seconds: dict[str, float] = {}
        self.progress_id: UUID | None = None
        self.status_id: UUID | None = None
        self.warned = False
        self._safely(self._create, job)
        _live[self.job_id] = self

    def _safely(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # the UI is a view; the manifests hold the truth
            if not self.warned:
                logger.warning("could not update the job's Prefect artifacts (%s: %s); the job goes on",
                               type(exc).__name__, exc)
                self.warned = True
            return None

    # --- live ----------------------------------------------------------------------------------------------------
    def _create(self, job: JobManifest) -> None:
        progress = ProgressArtifact(key=f"{self.job_id}-progress", progress=_percent(job.counts),
                                    description=self._line(job), flow_run_id=self.flow_run_id)
        self.progress_id = progress.create().id
        status = MarkdownArtifact(key=f"{self.job_id}-status", markdown=self._table(job),
                                  description=f"{self.job_id}: live status", flow_run_id=self.flow_run_id)
        self.status_id = status.create().id

    def enter(self, phase: str, job: JobManifest) -> None:
        """A new phase starts: time the one that ends, and show the new one."""
        now = time.monotonic()
        self.phase_seconds[self.phase] = self.phase_seconds.get(self.phase, 0.0) + now - self.phase_started
        self.phase, self.phase_started = phase, now
        self.update(job)

    def update(self, job: JobManifest) -> None:
        self._safely(self._update, job)

    def _update(self, job: JobManifest) -> None:
        if self.progress_id is None or self.status_id is None:
            return
        update_progress_artifact(self.progress_id, _percent(job.counts), description=self._line(job))
        get_client(sync_client=True).update_artifact(self.status_id, ArtifactUpdate(data=self._table(job)))

    def _line(self, job: JobManifest) -> str:
        c = job.counts
        rate, eta = _rate(job.model_dump(mode="json"))
        speed = f", {rate:,.0f} items/s, ETA {_duration(eta)}" if rate else ""
        flight = f", {c.in_flight_max:,} in flight per worker" if c.in_flight_max else ""  # what auto reached
        return (f"{self.job_id}: {self.phase}, {c.batches_done:,} of {c.batches_total:,} batches, "
                f"{_items_done(c):,} of {c.items_total:,} items{speed}{flight}")

    def _table(self, job: JobManifest) -> str:
        return status_table(job, self.phase)

    # --- at the end ----------------------------------------------------------------------------------------------
    def finish(self, job: JobManifest, errors: dict[str, Any] | None, links: dict[str, str | None],
               limits: dict[str, Any]) -> None:
        """The final state of the live artifacts, the errors table and the summary."""
        self.enter("done", job)
        _live.pop(self.job_id, None)
        self._safely(self._finish, job, errors, links, limits)

    def _finish(self, job: JobManifest, errors: dict[str, Any] | None, links: dict[str, str | None],
                limits: dict[str, Any]) -> None:
        if errors and errors.get("top_messages"):
            rows = [{"error_class": m["error_class"], "count": m["count"], "example_ids": ", ".join(
                map(str, m["example_ids"])), "message": m["message"]} for m in errors["top_messages"]]
            TableArtifact(key=f"{self.job_id}-errors", table=rows, flow_run_id=self.flow_run_id,
                          description=f"{self.job_id}: failed items by class ({errors['items_failed']} failed; "
                                      f"`slurmctl analyze-errors {self.job_id}`)").create()
        MarkdownArtifact(key=f"{self.job_id}-summary", markdown=self._summary(job, links, limits),
                         description=f"{self.job_id}: {job.status}", flow_run_id=self.flow_run_id).create()

    @staticmethod
    def _spend(job: JobManifest) -> list[str]:
        """What the job spent, against its budget where it has one (``slurmctl.books.budget``)."""
        usage = usage_view(job.model_dump(mode="json"))
        budget = usage["budget"] or {}
        rows = [("API calls", "max_api_calls", job.counts.api_calls), ("core-hours", "max_core_hours",
                                                                        usage["core_hours"])]
        if usage["cost_usd"] is not None:
            rows.append(("cost (USD)", "max_usd", usage["cost_usd"]))
        out = ["| spent | | budget |", "|---|---|---|"]
        for label, key, value in rows:
            limit = budget.get(key)
            share = f"{fmt(key, limit['max'])} ({100 * limit['share']:.0f} %)" if limit else "—"
            out.append(f"| {label} | {fmt(key, value)} | {share} |")
        return out + [""]

    def _summary(self, job: JobManifest, links: dict[str, str | None], limits: dict[str, Any]) -> str:
        c = job.counts
        lines = [f"## {self.job_id}: {job.status}", ""]
        if job.error:
            lines += [f"**Error:** {job.error}", ""]
        lines += pace_lines(job.model_dump(mode="json"))
        lines += ["| items | count |", "|---|---|", f"| total | {c.items_total:,} |",
                  f"| succeeded | {c.items_succeeded:,} |", f"| failed | {c.items_failed:,} |",
                  f"| rejected | {c.items_rejected:,} |", f"| output rows | {c.rows_written - c.duplicates:,} |",
                  f"| duplicate rows dropped | {c.duplicates:,} |",
                  f"| repeated ids superseded by their last occurrence | {c.duplicate_items:,} |", ""]
        lines += self._spend(job)
        lines += ["| where | |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in links.items() if v] + [""]
        phases = {k: v for k, v in self.phase_seconds.items() if k not in ("submitted", "done")}
        if phases:
            lines += ["| phase | time |", "|---|---|"] + [f"| {k} | {_duration(v)} |" for k, v in phases.items()]
            lines += [""]
        if limits:
            lines += ["| rate limit | target /s | granted | throttled (429) |", "|---|---|---|---|"]
            lines += [f"| {name} | {s.get('target_per_s')} | {s.get('granted')} | {s.get('throttled')} |"
                      for name, s in limits.items()]
        return "\n".join(lines) + "\n"
