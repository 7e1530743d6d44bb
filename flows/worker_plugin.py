"""Closing the handler instances a Dask worker built (``close()``/``aclose()`` of a class handler, on the event loop
its async clients were built on), and stopping that loop. Also: the worker's memory limit for its items in flight
(``MemoryLimit``), and SIGTERM on Slurm (``GracefulSigterm``).

Two ways, since neither covers every end: a pass that finishes on a cluster its task runner started (and so closes)
asks every live worker to close them at once (``close_on_workers``): a Slurm cluster is torn down with ``scancel``,
whose SIGTERM reaches the worker process before any teardown runs. (The job's early local cluster outlives its passes:
its workers keep their instances through the retry rounds, one per worker process, and close them as they stop.)
And a plugin registered with the cluster (``register``) closes them when a worker stops
gracefully (scale-down, retirement), including workers that joined later. A worker that is killed (SIGKILL, a node
lost, walltime) closes nothing: a handler must not rely on ``close`` for correctness, only for tidiness
(connections, sessions).
"""

from __future__ import annotations

import signal
from typing import Any

from distributed import WorkerPlugin

from slurmctl import inflight

NAME = "slurmctl-close-handlers"
MEMORY_NAME = "slurmctl-memory-limit"
SIGTERM_NAME = "slurmctl-sigterm"


class CloseHandlers(WorkerPlugin):
    """Closes the worker's handler instances as the worker stops. Each pass registers it again (by name), and Dask
    tears the previous registration down first: that is not the worker stopping, so the instances stay."""

    name = NAME

    def teardown(self, worker: Any) -> None:
        from distributed.core import Status

        if getattr(worker, "status", None) in (Status.closing, Status.closed, Status.failed):
            inflight.close_worker()


class MemoryLimit(WorkerPlugin):
    """Tells the worker process its Dask ``memory_limit``, so ``concurrency: auto`` keeps the items in flight within
    it (``inflight.set_memory_limit``): Dask's own memory manager pauses a worker between tasks, and our items in
    flight are all inside one task."""

    name = MEMORY_NAME

    def setup(self, worker: Any) -> None:
        inflight.set_memory_limit(getattr(getattr(worker, "memory_manager", None), "memory_limit", None))


class GracefulSigterm(WorkerPlugin):
    """On a Slurm worker (run without a nanny, ``flows/runners.py``), SIGTERM no longer closes the worker at once
    (dask's handler, which loses the batch running): the worker starts no further batch, and leaves once the
    batches running have committed (``tasks.process_shard.on_sigterm``); Slurm's SIGKILL follows ``KillWait`` later.
    Installed from the worker's event loop, which runs in its main thread, where Python handles signals."""

    name = SIGTERM_NAME

    def setup(self, worker: Any) -> None:
        loop = worker.loop

        def handler(signum: int, frame: Any) -> None:  # signal context: hand over to the event loop at once
            from slurmctl.tasks.process_shard import on_sigterm

            loop.add_callback(on_sigterm, worker)

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (a nanny's worker process does not run its loop there): dask's way
            pass


def register(client: Any, slurm: bool = False) -> None:
    """Register the plugins with ``client``'s cluster (idempotent: registered by name): closing handlers, the
    memory limit; ``slurm``: the SIGTERM one too."""
    client.register_plugin(CloseHandlers(), name=NAME)
    client.register_plugin(MemoryLimit(), name=MEMORY_NAME)
    if slurm:
        client.register_plugin(GracefulSigterm(), name=SIGTERM_NAME)


def close_on_workers(client: Any, logger: Any = None) -> None:
    """The pass is over (no shard runs): every live worker closes its handler instances now. A worker that cannot be
    reached is skipped (its plugin or its exit closes them, if anything does)."""
    try:
        client.run(inflight.close_worker, on_error="ignore")
    except Exception as exc:  # the cluster is going anyway: tidiness, never a reason to fail the pass
        if logger is not None:
            logger.warning("could not ask the workers to close their handlers: %s: %s", type(exc).__name__, exc)
