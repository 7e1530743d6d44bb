"""Cancelling a running job, whichever way it is asked for, with nothing committed lost.

Three ways in, one way out:

- **The Prefect UI or API** (``prefect flow-run cancel``) moves the job's flow run to *Cancelling*. A run started by
  a deployment's worker is then stopped by that worker (SIGTERM, which Prefect's engine turns into a
  ``TerminationSignal`` in the flow), and the worker — or the engine — runs ``on_cancellation``. A run started by
  ``slurmctl submit`` has no Prefect runner watching it: ``CancelWatch`` polls the flow run's state itself.
- **``slurmctl cancel JOB``** writes ``jobs/<id>/cancel.json`` (and asks Prefect too when it can reach it), so a job
  whose Prefect API is down is still cancelled from the manifests.
- Either way the coordinator stops between batches: the phase's subflow ends *Cancelled*, its task runner closes the
  Dask cluster (dask-jobqueue cancels its Slurm jobs), every Slurm job named after the job is cancelled once more by
  name (``slurmctl.slurm``: the cluster may not know a job it was still submitting), and the job manifest says
  ``cancelled``. Batches commit whole or not at all, so ``slurmctl resume`` continues the job from its commits.

``on_cancellation`` needs nothing but the flow run: it may run in a deployment worker's process, where the cluster
object does not exist, so it finds the job from the run's parameters and its Slurm jobs by name.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import logging
import threading
from typing import Any, Callable, TypeVar
from uuid import UUID

from slurmctl.books.heartbeat import HEARTBEAT_S
from slurmctl.books.manifests import TERMINAL_STATUSES, Keys, now, parse_time
from slurmctl.books.store import load_job, store_for, update_job
from slurmctl.flows import local_workers, stop
from slurmctl.slurm import cancel_worker_jobs

log = logging.getLogger("slurmctl.flows.cancel")
T = TypeVar("T")


class JobCancelled(Exception):
    """Raised between batches in the coordinator once a cancellation was asked for; the message says by whom."""


def request_cancel(store: Any, job_id: str, by: str) -> str:
    """Record a request to cancel the job's current run (``slurmctl cancel``); return its key's URI. A run
    started later (``slurmctl resume``) is not cancelled by it: the request is older than that run."""
    key = Keys(job_id).cancel
    store.put_json(key, {"schema_version": 1, "kind": "cancel", "job_id": job_id, "requested_at": now(), "by": by})
    return store.uri(key)


class CancelWatch:
    """A background thread that notices a cancellation asked for while the coordinator runs: the job's flow run
    in Prefect moved to Cancelling/Cancelled, or a ``cancel.json`` newer than this run; or a stop signal
    (``flows/stop.py``). The coordinator asks ``check()`` between batches (every ~2 s)."""

    def __init__(self, store: Any, job_id: str, flow_run_id: str | None, *, interval_s: float = HEARTBEAT_S,
                 kind: str | None = None):
        self.store, self.job_id, self.flow_run_id, self.interval_s = store, job_id, flow_run_id, interval_s
        self.kind = kind  # the cluster's: a stop's last words cancel the Slurm jobs by name
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.reason: str | None = None
        self.stopped: stop.StopRequest | None = None  # a signal's stop request, not a cancellation
        self._unlisten: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "CancelWatch":
        _live[self.job_id] = self
        self._unlisten = stop.listen(self._stop_requested, self._last_words)
        # The thread runs in a copy of this context: Prefect's settings (the API URL of the local server the
        # coordinator chose) live in a context variable, and a bare thread would see only the process's import-time
        # settings, start a throwaway ephemeral server of its own and watch a flow run that is not there.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=f"cancel-watch-{self.job_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._unlisten is not None:
            self._unlisten()
        if _live.get(self.job_id) is self:
            del _live[self.job_id]

    def _stop_requested(self, request: stop.StopRequest) -> None:
        """A signal's handler calls this: set flags only (no I/O, no locks the interrupted code may hold)."""
        self.stopped, self.reason = request, request.reason
        self._cancelled.set()

    def _last_words(self, request: stop.StopRequest) -> None:
        """A second signal, or a stop that overran its bound: record the stop before the process exits (in a thread,
        bounded by the caller). The process ends its local workers first: nothing commits after its ``stopped``."""
        if stop.exit_on_second:  # the coordinator process, about to exit (a notebook's flow closes its cluster)
            ended = local_workers.end_workers()
            if ended:
                log.warning("job %s: ended its %d local worker(s) with it", self.job_id, len(ended))
        try:
            mark_cancelled(self.store, self.job_id, f"{request.reason}, then exited at once {request.how}",
                           self.kind, status="stopped")
        except Exception as exc:  # the books are consistent anyway: the status then reads a dead coordinator
            log.error("recording the stop of %s failed: %s: %s", self.job_id, type(exc).__name__, exc)

    def _run(self) -> None:
        client = None
        try:
            if self.flow_run_id:
                from prefect.client.orchestration import get_client

                client = get_client(sync_client=True)
                client.__enter__()
            while not self._stop.is_set() and not self._cancelled.is_set():
                reason = self._asked_in_store() or self._asked_in_prefect(client)
                if reason:
                    self.reason = reason
                    self._cancelled.set()
                    log.warning("job %s: %s; stopping after the batches in flight", self.job_id, reason)
                    break
                self._stop.wait(self.interval_s)
        finally:
            if client is not None:
                client.__exit__(None, None, None)

    def asked_now(self) -> str | None:
        """Was a cancellation asked for (the store's request, the flow run's state)? Read once, now: a stop signal
        ends the watch's polling, and a deployment's runner that could not announce its cancel sends a bare
        SIGTERM after moving the run to Cancelling, which is a cancellation, not a stop."""
        reason = self._asked_in_store()
        if reason or not self.flow_run_id:
            return reason
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                return self._asked_in_prefect(client)
        except Exception as exc:  # Prefect unreachable: the signal was a stop
            log.debug("reading flow run %s failed: %s", self.flow_run_id, exc)
            return None

    def _asked_in_store(self) -> str | None:
        try:
            body = self.store.get_json(Keys(self.job_id).cancel)
        except Exception as exc:  # an unreachable store: the next poll tries again; Prefect may still tell us
            log.debug("reading the cancel request of %s failed: %s", self.job_id, exc)
            return None
        if body and parse_time(body["requested_at"]) >= self.started:
            return f"cancelled by {body.get('by', 'slurmctl cancel')} at {body['requested_at']}"
        return None

    def _asked_in_prefect(self, client: Any) -> str | None:
        if client is None:
            return None
        try:
            state = client.read_flow_run(UUID(self.flow_run_id)).state
        except Exception as exc:  # the API down: the manifests' request still works
            log.debug("reading flow run %s failed: %s", self.flow_run_id, exc)
            return None
        if state is not None and state.type.value in ("CANCELLING", "CANCELLED"):
            return f"its flow run was cancelled in Prefect ({state.name}{': ' + state.message if state.message else ''})"
        return None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled(self.reason or "cancelled")

    def sleep(self, seconds: float) -> None:
        """Sleep, but end (raising ``JobCancelled``) as soon as the job is cancelled."""
        self._cancelled.wait(seconds)
        self.check()


_live: dict[str, CancelWatch] = {}


def stop_deadline(job_id: str) -> float | None:
    """When a stop signal came for this job's run: by when (``time.monotonic()``) the batches running should have
    committed. None: no stop requested (a cancellation does not wait for them)."""
    request = getattr(_live.get(job_id), "stopped", None)
    return request.deadline if request is not None else None


def check(job_id: str) -> None:
    """Raise ``JobCancelled`` if the job's run was asked to stop (no-op outside a coordinator)."""
    watch = _live.get(job_id)
    if watch is not None:
        watch.check()


def sleep(job_id: str, seconds: float) -> None:
    watch = _live.get(job_id)
    if watch is None:
        import time

        time.sleep(seconds)
    else:
        watch.sleep(seconds)


def cancellable(fn: Callable[..., T]) -> Callable[..., Any]:
    """For a phase's subflow: a ``JobCancelled`` ends it *Cancelled* (not Failed) in the Prefect UI, a
    ``BudgetReached`` (``flows/budget.py``) Cancelled-type named *Paused*. The caller gets Prefect's
    ``CancelledRun``. A stop signal during the phase is a stop request (``flows/stop.py``)."""
    import functools

    from slurmctl.books.budget import BudgetReached

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.states import Cancelled

        try:
            with stop.on_signals():  # Prefect put its SIGTERM handler back for this subflow: ours again
                return fn(*args, **kwargs)
        except JobCancelled as exc:
            return Cancelled(message=str(exc))
        except BudgetReached as exc:
            return Cancelled(name="Paused", message=f"paused: {exc}")
    return wrapper


def is_cancellation(exc: BaseException) -> bool:
    """A job run stopped on purpose: our own ``JobCancelled``, a cancelled subflow, or the SIGTERM a Prefect runner
    sends with a *cancel* intent (a deployment run cancelled in the UI)."""
    from prefect.exceptions import CancelledRun, TerminationSignal

    if isinstance(exc, (JobCancelled, CancelledRun)):
        return True
    if isinstance(exc, TerminationSignal):
        try:
            from prefect._internal.control_listener import get_intent

            return get_intent() == "cancel"
        except Exception:  # pinned Prefect has it; a later one may move it: a SIGTERM is then a crash, as before
            return False
    return False


def mark_cancelled(store: Any, job_id: str, reason: str, kind: str | None, status: str = "cancelled") -> list[str]:
    """The cancellation's last steps, safe to repeat from any process: cancel the job's Slurm jobs by name, and
    record ``status`` (``cancelled``; ``stopped`` for a stop signal, ``flows/stop.py``) with how to continue it in
    the job manifest unless the job already ended. Returns the Slurm job ids cancelled."""
    cancelled = cancel_worker_jobs(job_id) if kind == "slurm" else []
    job = load_job(store, job_id)
    if job.status not in TERMINAL_STATUSES:
        update_job(store, job_id, status=status, finished_at=job.finished_at or now(),
                   error=f"{reason}; `slurmctl resume {job_id}` continues it (committed batches are kept)"[:2000])
    return cancelled


def on_cancellation(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect's ``on_cancellation`` hook of the job flow. It may run in the deployment worker that killed the
    coordinator, so it works from the flow run alone: the job from its parameters, its Slurm jobs by name."""
    from slurmctl.flows.naming import job_of_run

    try:
        job_id, storage = job_of_run(flow_run.parameters, flow_run.expected_start_time, flow_run.id)
        store = store_for(storage)
        kind = load_job(store, job_id).cluster.get("kind")
        ids = mark_cancelled(store, job_id, f"cancelled in Prefect ({state.name})", kind)
        log.warning("job %s cancelled; Slurm worker jobs cancelled: %s", job_id, ", ".join(ids) or "none")
    except Exception as exc:  # a hook must not raise into Prefect's runner; the next `resume` cleans up by name
        log.error("cancelling the Slurm jobs of flow run %s failed: %s: %s", flow_run.id, type(exc).__name__, exc)
