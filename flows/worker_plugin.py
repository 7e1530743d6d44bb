"""What a Dask worker does for slurmctl when it stops: close the handler instances it built (``close()``/``aclose()``
of a class handler, on the event loop its async clients were built on) and stop that loop.

Registered with the cluster by the process phase (``register``), so every worker, including those that join later
(adaptive Slurm jobs), runs it when it closes. A worker that is killed (SIGKILL, a node lost) closes nothing: a
handler must not rely on ``close`` for correctness, only for tidiness (connections, sessions).
"""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin

from slurmctl import inflight

NAME = "slurmctl-close-handlers"


class CloseHandlers(WorkerPlugin):
    name = NAME

    def teardown(self, worker: Any) -> None:
        inflight.close_worker()


def register(client: Any) -> None:
    """Register the plugin with ``client``'s cluster (idempotent: registered by name)."""
    client.register_plugin(CloseHandlers(), name=NAME)
