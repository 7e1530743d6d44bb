"""Prefect states that tell the truth about shard task runs whose worker went away.

A shard's task run reports its own states, from its worker. When the worker dies (SIGKILL, ``scancel``, walltime,
preemption), or the coordinator closes the cluster under it (a cancel, a stop signal, a budget pause), nobody reports
its end, and Prefect shows it Running forever (prefect#12969). The coordinator sees the loss, so it records the end:
**Crashed** for a shard whose worker was lost, **Cancelled** for a shard it stopped waiting for. A task run already
in a final state is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

log = logging.getLogger("slurmctl.flows.task_states")

CRASHED, CANCELLED = "crashed", "cancelled"


def settle(task_run_ids: Iterable[Any], kind: str, message: str, even_failed: bool = False) -> int:
    """Move the task runs that are not final yet to Crashed (``kind`` ``crashed``) or Cancelled, with ``message``;
    ``even_failed``: a Failed one too (a shard that raised to hand its batches back, which is no failure).
    Returns how many moved. Never raises: the manifests are the books; this only keeps the Prefect UI honest."""
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
                    if run.state is not None and run.state.is_final() and not (even_failed and
                                                                               run.state.is_failed()):
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


def task_run_id_of(future: Any) -> Any:
    """A Prefect future's task run id (None for anything else)."""
    return getattr(future, "task_run_id", None)
