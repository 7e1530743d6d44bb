"""Jobs from Python: find a job and read its books, in a notebook or a script, without shelling out.

    import slurmctl

    job = slurmctl.submit("jobs/backfill.yaml", date="2025-04-12")   # returns at once; wait=True to block
    job = slurmctl.job("backfill-2025-04-12")      # where `slurmctl status` would look; or storage="s3://..."
    job.status()["items_succeeded"]                  # the view `slurmctl status --json` prints
    job.wait(timeout=3600)                           # until the job completes, fails, pauses or stops
    df = job.to_pandas()                             # the output, every file's sha256 checked first
    job.failures()                                   # failed and deferred items: id, line, class, message
    [j["job_id"] for j in slurmctl.jobs()]           # what `slurmctl list` shows
    job.pause(); job.set_rate("api", 5); job.resume()  # as `slurmctl pause|rate|resume`
    job.retry(["network", "throttle"], wait=True)    # a retry round over those failures
    job.cancel()                                      # until it has stopped (committed batches are kept)

Reading goes through ``slurmctl.storage`` (no Prefect, Dask or pandas until ``to_pandas`` or ``failures`` asks for
a DataFrame), so it is as quick as ``slurmctl status``. Acting runs the code the commands run (``slurmctl.control``)
and raises its errors (``ControlError`` and its kinds, each with the message the command prints).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurmctl.books.manifests import TERMINAL_STATUSES, Keys
from slurmctl.config import StorageConfig, known_storage, known_stores
from slurmctl.storage import ManifestCorrupt, Store

if TYPE_CHECKING:
    import pandas
    import pyarrow.dataset

POLL_S = 1.0  # ``wait`` reads the job manifest this often (one small GET)


def _storage(storage: str | StorageConfig | dict[str, Any] | None, job_id: str | None = None) -> StorageConfig:
    if storage is None:
        return known_storage(job_id) if job_id else StorageConfig()
    if isinstance(storage, str):
        return StorageConfig(uri=storage)
    return storage if isinstance(storage, StorageConfig) else StorageConfig.model_validate(storage)


def job(job_id: str, storage: str | StorageConfig | dict[str, Any] | None = None) -> Job:
    """The job ``job_id``. ``storage``: a store URI (``file://…``, a path, ``s3://bucket/prefix``), a
    ``StorageConfig`` (for an S3 endpoint or region, or a saved block: ``StorageConfig(block="team-store")``) or None:
    the store ``submit`` recorded on this machine, else ``$SLURMCTL_STORAGE``, else ``./.slurmctl``. Raises
    ``JobNotFound`` (saying where it looked) when there is no such job."""
    handle = Job(job_id, _storage(storage, job_id))
    handle.manifest()  # there, and readable: fail here, not at the first use
    return handle


def submit(config: str | Path | dict[str, Any] | Any, *, job_id: str | None = None, date: str | None = None,
           wait: bool = False, timeout: float | None = None, deployment: str | None = None) -> Job:
    """Submit a job, as ``slurmctl submit`` does, and return its handle at once (``wait``: once it has ended, as
    ``Job.wait(timeout)``). ``config``: a YAML path, an inline mapping (relative paths against the working
    directory) or a ``JobConfig``; ``job_id`` and ``date`` as the command's ``--job-id`` and ``--date``. The
    coordinator runs in its own process (it outlives this one); with ``deployment`` (``flow/name``, or a name of
    ``slurmctl-job``) the job is admitted here and runs as a flow run of that Prefect deployment, on its workers.
    Raises ``ConfigError`` for a bad config and
    ``SubmitRefused`` when admission refuses it (each naming the fields), ``SubmitFailed`` when the job exists but
    could not start (the message says what to fix, then ``resume``)."""
    import datetime as dt

    from slurmctl.config import JobConfig, job_config
    from slurmctl.control import launch

    day = date or dt.date.today()
    if isinstance(config, JobConfig):
        cfg, config_file = (config.model_copy(update={"job_id": job_id}) if job_id else config), None
    elif isinstance(config, dict):
        cfg, config_file = job_config(config=config, job_id=job_id, date=day), None
    else:
        cfg, config_file = job_config(config, job_id=job_id, date=day), str(Path(config).resolve())
    if deployment:
        launch.start_as_deployment_run(cfg, config_file, deployment)
    else:
        launch.start(cfg, config_file)
    handle = Job(cfg.job_id, cfg.storage)
    if wait:
        handle.wait(timeout)
    return handle


def jobs(storage: str | StorageConfig | dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The jobs in ``storage`` (None: every store this machine submitted to, and the default one), newest first:
    what ``slurmctl list --json`` prints."""
    from slurmctl.books.catalog import jobs_in

    return jobs_in([_storage(storage)] if storage is not None else known_stores())


def _in_notebook() -> bool:
    """Running in a Jupyter kernel (IPython's ZMQ shell), not a terminal's IPython or a plain interpreter."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Job:
    """A handle on one job's books; every call reads them afresh (the job may be running)."""

    def __init__(self, job_id: str, storage: StorageConfig) -> None:
        self.job_id, self.storage = job_id, storage
        self._store: Store | None = None

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, storage={self.storage.uri!r})"

    @property
    def store(self) -> Store:
        if self._store is None:
            from slurmctl.books.store import reader_for

            self._store = reader_for(self.storage)
        return self._store

    def manifest(self) -> Any:
        """The job manifest (``slurmctl.books.manifests.JobManifest``), verified."""
        from slurmctl.books.store import load_job

        return load_job(self.store, self.job_id)

    def status(self, *, scan: bool = False) -> dict[str, Any]:
        """What ``slurmctl status JOB --json`` prints (``scan``: recount from the task manifests)."""
        from slurmctl.books.status import job_status

        return job_status(self.store, self.manifest(), scan=scan)

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> dict[str, Any]:
        """Block until the job is completed, failed, cancelled, paused or stopped; return its status. Raises
        ``TimeoutError`` after ``timeout`` seconds (None: no limit). ``progress``: a live bar (items done of the
        total, items/s, ETA, phase: ``slurmctl submit --wait``'s), redrawn in place in a terminal, and in a Jupyter
        notebook a line of the cell's output updated in place; None (the default): shown when stderr is a terminal
        or in a notebook."""
        import contextlib
        import sys

        from slurmctl.books.status import status_view

        notebook = _in_notebook()
        display: Any = None
        if progress or (progress is None and (notebook or sys.stderr.isatty())):
            from slurmctl.progress_display import NotebookProgress, TerminalProgress

            display = NotebookProgress(self.job_id) if notebook else TerminalProgress(self.job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with display or contextlib.nullcontext():
            while True:
                job = self.manifest()
                if display is not None:
                    display.update(status_view(job.model_dump(mode="json")))
                if job.status in TERMINAL_STATUSES:
                    return self.status()
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.job_id} is still {job.status} after {timeout:g} s")
                time.sleep(POLL_S)

    def resume(self, *, wait: bool = False, timeout: float | None = None, force: bool = False,
               raise_budget: dict[str, float | None] | None = None) -> dict[str, Any]:
        """Make the job go again, as ``slurmctl resume``: unpause it, and start a coordinator unless one is
        running (committed batches are not run again). ``force``: run a completed job again (it re-aggregates).
        ``raise_budget``: new budget limits (``{"max_api_calls": 200000}``; None removes one), which a job paused at
        its budget needs. ``wait``: as ``wait(timeout)``. Returns the status. Raises ``JobRunning``,
        ``BudgetRefused`` (nothing changed) or ``ControlFailed``."""
        return self._restart(wait, timeout, force=force, raise_budget=raise_budget)

    def retry(self, errors: list[str] | str, *, wait: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """A retry round over the items that failed with these error classes (``["network", "throttle"]`` or
        ``"network,throttle"``), as ``slurmctl retry``; then the output is aggregated again."""
        from slurmctl.control.restart import error_classes

        classes = error_classes(errors)
        if not classes:
            from slurmctl.control.errors import NothingToDo

            raise NothingToDo("errors: give one or more error classes, e.g. ['network', 'throttle']")
        return self._restart(wait, timeout, retry_errors=classes)

    def aggregate(self, *, wait: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Merge the committed batch outputs into the job's dataset again, as ``slurmctl aggregate``."""
        return self._restart(wait, timeout, aggregate_only=True)

    def _restart(self, wait: bool, timeout: float | None, **how: Any) -> dict[str, Any]:
        from slurmctl.control.restart import restart

        if how.get("raise_budget"):
            how["raise_budget"] = [f"{k}={'none' if v is None else v}" for k, v in how["raise_budget"].items()]
        restarted = restart(self.job_id, self.storage, **how)
        if wait and restarted.follow:
            return self.wait(timeout)
        return self.status()

    def cancel(self, *, wait: bool = True, timeout: float = 120) -> str:
        """Stop the job's run, as ``slurmctl cancel``: its coordinator stops after the batches in flight, its Dask
        cluster and Slurm jobs end, committed batches are kept (``resume`` continues it). ``wait``: until it has
        stopped (``ControlFailed`` after ``timeout`` s: the request stands). Returns what happened, in words."""
        from slurmctl.control.cancel import cancel

        return cancel(self.manifest(), self.store, wait=wait, timeout=timeout)

    def pause(self) -> list[str]:
        """Stop the job's workers taking rate-limit tokens (in-flight requests finish, batches wait), as
        ``slurmctl pause``; ``resume()`` continues. Returns the limits paused."""
        from slurmctl.control.limits import pause

        return pause(self.manifest(), self.store)

    def set_rate(self, limit: str, per_second: float) -> float:
        """Change the rate limit ``limit`` while the job runs, as ``slurmctl rate``; returns the new rate."""
        from slurmctl.control.limits import set_rate

        return set_rate(self.manifest(), limit, per_second)

    def errors(self, top: int = 10) -> dict[str, Any]:
        """What ``slurmctl analyze-errors JOB --json`` prints: failed items by class, top messages, hot batches."""
        from slurmctl.books.failures import analyze, committed_tasks, failure_state

        return analyze(self.job_id, failure_state(self.store, committed_tasks(self.store, self.job_id)), top=top)

    def failures(self) -> pandas.DataFrame:
        """Every failed or deferred item, by input line: ``line``, ``id``, ``state``, ``error_class``,
        ``message``, ``batch_id`` (and where known the file, host and attempts)."""
        import pandas as pd

        from slurmctl.books.failures import committed_tasks, failure_state

        state = failure_state(self.store, committed_tasks(self.store, self.job_id))
        rows = [{"line": line, **record} for line, record in sorted(state.items())]
        return pd.DataFrame(rows, columns=None if rows else ["line", "id", "state", "error_class", "message",
                                                              "batch_id"])

    def result(self) -> dict[str, Any]:
        """The completed job's result manifest (its output files, their rows and sha256). Raises ``LookupError``
        while the job has none (not completed yet)."""
        body = self.store.get_json(Keys(self.job_id).result)
        if body is None:
            raise LookupError(f"job {self.job_id} has no output yet (status {self.manifest().status}); "
                              f"`slurmctl status {self.job_id}` says where it is")
        return body

    def output(self, *, verify: bool = True) -> pyarrow.dataset.Dataset:
        """The job's output as a ``pyarrow.dataset.Dataset``. ``verify``: first check every file against the sha256
        its result manifest recorded (one streaming read of each; ``ManifestCorrupt`` names a file that differs)."""
        import pyarrow.dataset as ds

        files = self.result()["outputs"]
        fs, paths = self._filesystem(), [self._path(f["uri"]) for f in files]
        if verify:
            for f, path in zip(files, paths):
                digest = hashlib.sha256()
                with fs.open_input_stream(path) as stream:
                    while chunk := stream.read(8 << 20):
                        digest.update(chunk)
                if "sha256:" + digest.hexdigest() != f["sha256"]:
                    raise ManifestCorrupt(f"{f['uri']}: sha256 differs from the job's result manifest")
        return ds.dataset(paths, format="parquet", filesystem=fs)

    def to_pandas(self, *, verify: bool = True) -> pandas.DataFrame:
        """The job's output in one DataFrame (``output(verify=...).to_table().to_pandas()``)."""
        return self.output(verify=verify).to_table().to_pandas()

    def _filesystem(self) -> Any:
        import pyarrow.fs as pafs

        if not self.storage.uri.startswith("s3://"):
            return pafs.LocalFileSystem()
        endpoint = self.storage.endpoint_url
        return pafs.S3FileSystem(region=self.storage.region or "us-east-1",
                                 endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None,
                                 scheme=endpoint.split("://", 1)[0] if endpoint else "https")

    @staticmethod
    def _path(uri: str) -> str:
        if uri.startswith("s3://"):
            return uri[5:]
        return str(Path(uri[7:] if uri.startswith("file://") else uri))
