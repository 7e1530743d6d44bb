"""Prefect states that tell the truth about shard task runs whose worker went away.

A shard's task run reports its own states, from its worker. When the worker dies (SIGKILL, ``scancel``, walltime,
preemption), or the coordinator closes the cluster under it (a cancel, a stop signal, a budget pause), nobody reports
its end, and Prefect shows it Running forever (prefect#12969). The coordinator sees the loss, so it records the end:
**Crashed** for a shard whose worker was lost, **Cancelled** for a shard it stopped waiting for. A task run already
in a final state is left as it is.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any, Iterable

log = logging.getLogger("slurmctl.flows.task_states")

CRASHED, CANCELLED = "crashed", "cancelled"


def settle(task_run_ids: Iterable[Any], kind: str, message: str) -> int:
    """Move the task runs that are not final yet to Crashed (``kind`` ``crashed``) or Cancelled, with ``message``.
    Returns how many moved. Never raises: the manifests are the books; this only
    keeps the Prefect UI honest."""
    ids = [i for i in task_run_ids if i is not None]
    if not ids:
        return 0
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Crashed

        state = Crashed if kind == CRASHED else Cancelled
        moved = 0
        with get_client(sync_client=True) as client:
            for task_run_id in ids:
                try:
                    run = client.read_task_run(task_run_id)
                    if run.state is not None and run.state.is_final():
                        continue
                    client.set_task_run_state(task_run_id, state(message=message[:2000]), force=True)
                    moved += 1
                except Exception as exc:  # not recorded yet (its events are still on their way), or gone
                    log.debug("task run %s left as it is: %s: %s", task_run_id, type(exc).__name__, exc)
        return moved
    except Exception as exc:  # Prefect unreachable: the UI stays behind, nothing else depends on it
        log.warning("could not record the end of %s task run(s) in Prefect: %s: %s", len(ids), type(exc).__name__,
                    exc)
        return 0


_pending: list[threading.Thread] = []
WAIT_FOR_REPORT_S = 8.0  # a stopping coordinator has ~30 s in all: this is part of it


def settle_handed_back(task_run_ids: Iterable[Any], message: str) -> None:
    """A shard that raised to hand its batches back (a budget, a stop, a worker retiring or told to stop) ends
    Cancelled, not Failed. Its worker reports Failed itself, through Prefect's events, which can reach the server
    after the coordinator hears of it (and a state set before them would be overwritten by them). So a thread waits
    for that report, up to ``WAIT_FOR_REPORT_S``, then replaces it; ``wait_settled`` joins such threads."""
    ids = [i for i in task_run_ids if i is not None]
    if ids:
        thread = threading.Thread(target=contextvars.copy_context().run, args=(_after_report, ids, message),
                                  name="settle-handed-back", daemon=True)
        thread.start()
        _pending.append(thread)


def _after_report(ids: list[Any], message: str) -> None:
    deadline = time.monotonic() + WAIT_FOR_REPORT_S
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            for task_run_id in ids:
                while True:
                    try:
                        state = client.read_task_run(task_run_id).state
                    except Exception:  # not recorded yet
                        state = None
                    if state is not None and state.is_final():
                        if state.is_failed():
                            client.set_task_run_state(task_run_id, Cancelled(message=message[:2000]), force=True)
                        break
                    if time.monotonic() >= deadline:  # never reported: it ends here
                        client.set_task_run_state(task_run_id, Cancelled(message=message[:2000]), force=True)
                        break
                    time.sleep(0.25)
    except Exception as exc:  # Prefect unreachable: the UI stays behind, nothing else depends on it
        log.warning("could not record the end of %s handed-back task run(s) in Prefect: %s: %s", len(ids),
                    type(exc).__name__, exc)


def wait_settled(timeout: float = WAIT_FOR_REPORT_S + 2) -> None:
    """Join the threads ``settle_handed_back`` started (a pass ends: its flow run's task runs are final after)."""
    deadline = time.monotonic() + timeout
    while _pending:
        _pending.pop().join(max(0.0, deadline - time.monotonic()))


def task_run_id_of(future: Any) -> Any:
    """A Prefect future's task run id (None for anything else)."""
    return getattr(future, "task_run_id", None)
