"""The coordinator's heartbeat: ``jobs/<id>/heartbeat.json``, rewritten every ``HEARTBEAT_S`` for the whole run.

``slurmctl status`` reports a running job as ``stale`` when neither its job manifest nor its heartbeat has been
written for ``STALE_AFTER_S``, and ``slurmctl resume`` refuses to start a second coordinator while one on another
host still beats. The job manifest alone is not enough: it is written while batches run and at phase changes, but
not while the coordinator partitions a huge input, sleeps through a retry cooldown or aggregates.

So a daemon thread writes a separate object, from the start of the run to its end, whatever phase the run is in.
One writer per object: no read-modify-write race with the job manifest, which the phases keep updating. A write
that fails is logged (once per outage) and tried again at the next beat; it never stops the run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from slurmctl.books.manifests import Keys, now
from slurmctl.ratelimit.outages import OutageLog
from slurmctl.storage import ManifestCorrupt

HEARTBEAT_S = 2.0
log = logging.getLogger("slurmctl.books.heartbeat")


class Heartbeat:
    """``with Heartbeat(store, job_id): run()`` — beats at once, then every ``interval_s``, and once more at the end."""

    def __init__(self, store: Any, job_id: str, *, flow_run_id: str | None = None,
                 interval_s: float = HEARTBEAT_S):
        self.store, self.job_id, self.flow_run_id, self.interval_s = store, job_id, flow_run_id, interval_s
        self.key = Keys(job_id).heartbeat
        self.beats = 0  # written
        self.failures = OutageLog(log, f"writing the heartbeat of job {job_id!r}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> dict[str, Any]:
        return {"schema_version": 1, "kind": "heartbeat", "job_id": self.job_id, "at": now(), "pid": os.getpid(),
                "host": socket.gethostname(), "flow_run_id": self.flow_run_id,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    def beat(self) -> bool:
        """Write one heartbeat; a failure is logged and counted, never raised."""
        try:
            self.store.put_json(self.key, self.body())
        except Exception as exc:  # anything: the run must not die of its heartbeat
            self.failures.failed(exc)
            return False
        self.failures.succeeded()
        self.beats += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and write a last beat (the run ended: it is not a dead coordinator's)."""
        self._stop.set()
        if self._thread is not None:
            # A write stuck on an unreachable store must not hold up the end of the run (the thread is a daemon).
            self._thread.join(timeout=self.interval_s + 10)
        self.beat()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_heartbeat(store: Any, job_id: str) -> dict[str, Any] | None:
    """The job's last heartbeat, or None (none written yet, or unreadable: the job manifest's time still counts)."""
    try:
        return store.get_json(Keys(job_id).heartbeat)
    except ManifestCorrupt as exc:
        log.warning("ignoring the heartbeat of job %r: %s", job_id, exc)
        return None
