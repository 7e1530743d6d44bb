"""slurmctl's own Prefect events, which the automations ``slurmctl alerts install`` creates trigger on.

The open-source Prefect server evaluates event triggers, not metric ones, so the coordinator says what it sees as
events of the resource ``slurmctl.job.<job_id>`` (its flow run a related resource, so they show on the run's page):

* ``slurmctl.job.started`` / ``.completed`` / ``.failed`` / ``.cancelled`` / ``.paused`` — the job flow run begins
  and ends (``paused``: at a budget limit, the reason in ``error``, its spend in ``counts.api_calls``);
* ``slurmctl.job.processing`` / ``.processed`` — a pass over batches (the first, or a retry round) begins and ends;
* ``slurmctl.job.progress`` — batches committed since the last heartbeat (counters in the payload). At most one
  per heartbeat (``flows.process.HEARTBEAT_S``), never one per batch: the stall alert expects it;
* ``slurmctl.job.error-rate`` — the failed share of the items finished in the last ``alerts.window_s`` went above
  ``alerts.error_rate_pct`` (once per crossing);
* ``slurmctl.job.token-wait`` — worker threads spent more than ``alerts.token_wait_pct`` of the window waiting for
  rate-limit tokens (once per crossing).

Emitting never fails or slows the job: ``emit_event`` hands the event to Prefect's background EventsWorker, and any
error costs one warning. The coordinator is one process, so ``run_batches`` finds the job's emitter here (``live``).
"""

from __future__ import annotations

import time
from typing import Any

from prefect.events import emit_event
from prefect.logging import get_logger

from slurmctl.books.manifests import Counts
from slurmctl.config import JobConfig
from slurmctl.job_health import Sample, Window, crossed

PREFIX = "slurmctl.job"
STARTED, COMPLETED, FAILED, CANCELLED, PAUSED, STOPPED = (f"{PREFIX}.{s}" for s in (
    "started", "completed", "failed", "cancelled", "paused", "stopped"))
PROCESSING, PROCESSED, PROGRESS = f"{PREFIX}.processing", f"{PREFIX}.processed", f"{PREFIX}.progress"
ERROR_RATE, TOKEN_WAIT = f"{PREFIX}.error-rate", f"{PREFIX}.token-wait"

_live: dict[str, "JobEvents"] = {}
logger = get_logger("slurmctl.events")


def live(job_id: str) -> "JobEvents | None":
    """The emitter of the job this coordinator runs (None outside a job flow: tests calling subflows directly)."""
    return _live.get(job_id)


def resource_id(job_id: str) -> str:
    return f"{PREFIX}.{job_id}"


def _counts(c: Counts) -> dict[str, int]:
    return {k: getattr(c, k) for k in ("batches_done", "batches_total", "batches_failed", "items_total",
                                       "items_succeeded", "items_failed", "items_deferred", "items_rejected",
                                       "api_calls")}


class JobEvents:
    """Emits one job run's events (see the module docstring) and judges its error rate and token wait per beat."""

    def __init__(self, cfg: JobConfig, flow_run_id: str, worker_threads: int = 1) -> None:
        self.job_id = str(cfg.job_id)
        self.alerts = cfg.alerts
        self.flow_run_id = flow_run_id
        self.worker_threads = worker_threads
        self.warned = False
        self.succeeded = self.failed = 0  # items finished in this run (every attempt's outcome, retry rounds too)
        self.waited_s = 0.0
        self.batches_seen = 0
        self.batches_emitted = 0
        self.window = Window.of(cfg.alerts.window_s)
        self.error_above = self.wait_above = False
        _live[self.job_id] = self

    # --- emitting ------------------------------------------------------------------------------------------------
    def emit(self, event: str, **payload: Any) -> None:
        try:
            emit_event(event, resource={"prefect.resource.id": resource_id(self.job_id),
                                        "prefect.resource.name": self.job_id, "slurmctl.job-id": self.job_id},
                       related=[{"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                                 "prefect.resource.role": "flow-run", "prefect.resource.name": self.job_id}],
                       payload={"job_id": self.job_id, **payload})
        except Exception as exc:  # an alert is a view; the job goes on
            if not self.warned:
                logger.warning("could not emit the job's Prefect events (%s: %s); the job goes on",
                               type(exc).__name__, exc)
                self.warned = True

    def started(self, phase: str) -> None:
        self.emit(STARTED, phase=phase)

    def ended(self, status: str, counts: Counts, error: str | None = None) -> None:
        """The job run ended: ``completed``, ``failed``, ``cancelled``, ``paused`` or ``stopped``."""
        _live.pop(self.job_id, None)
        self.emit(f"{PREFIX}.{status}", counts=_counts(counts), **({"error": error} if error else {}))

    # --- a pass over batches (run_batches) -----------------------------------------------------------------------
    def processing(self, batches: int, worker_threads: int) -> None:
        self.worker_threads = max(1, worker_threads)
        self.window = Window.of(self.alerts.window_s)  # a new pass: its own baseline
        self.window.add(self._sample())
        self.emit(PROCESSING, batches=batches, worker_threads=worker_threads)

    def processed(self, counts: Counts) -> None:
        self.emit(PROCESSED, counts=_counts(counts))

    def batch(self, summary: dict[str, Any]) -> None:
        """One committed batch's summary (cheap: sums only; the judging is per beat)."""
        self.batches_seen += 1
        self.succeeded += summary.get("items_succeeded") or 0
        self.failed += summary.get("items_failed") or 0
        self.waited_s += summary.get("tokens_waited_s") or 0.0

    def beat(self, counts: Counts) -> None:
        """Once per heartbeat: progress if batches committed since the last one, and the thresholds judged."""
        self.window.add(self._sample())
        if self.batches_seen > self.batches_emitted:
            self.emit(PROGRESS, committed=self.batches_seen - self.batches_emitted, counts=_counts(counts))
            self.batches_emitted = self.batches_seen
        rate = self.window.error_rate_pct(self.alerts.min_items)
        self.error_above, fire = crossed(self.error_above, rate, self.alerts.error_rate_pct)
        if fire:
            self.emit(ERROR_RATE, error_rate_pct=round(rate or 0.0, 2), threshold_pct=self.alerts.error_rate_pct,
                      window_s=self.alerts.window_s, counts=_counts(counts))
        wait = self.window.token_wait_pct(self.worker_threads)
        self.wait_above, fire = crossed(self.wait_above, wait, self.alerts.token_wait_pct)
        if fire:
            self.emit(TOKEN_WAIT, token_wait_pct=round(wait or 0.0, 2), threshold_pct=self.alerts.token_wait_pct,
                      window_s=self.alerts.window_s, worker_threads=self.worker_threads)

    def _sample(self) -> Sample:
        return Sample(time.monotonic(), self.succeeded, self.failed, self.waited_s)
