"""Reading and updating one job's manifest in its store; building the store a config names: a Prefect block for
flows and tasks (``store_for``), a plain object for commands that only read or mend the books (``reader_for``)."""

from __future__ import annotations

import json
from typing import Any

from slurmctl.books.manifests import JOB_SCHEMA_VERSION, TERMINAL_STATUSES, JobManifest, Keys, now
from slurmctl.config import JobConfig, StorageConfig
from slurmctl.handler import renamed
from slurmctl.records import BatchSpec
from slurmctl.storage import Store, open_store


def store_for(storage: StorageConfig | dict[str, Any]) -> Store:
    """The store block ``storage`` names (Prefect's result storage, saved by the process phase)."""
    return _open(storage, plain=False)


def reader_for(storage: StorageConfig | dict[str, Any]) -> Store:
    """The same store as a plain object, without importing Prefect (unless ``storage`` names a saved block): what
    ``status``, ``list`` and the other commands that read a job's books use, so they answer at once."""
    return _open(storage, plain=True)


def _open(storage: StorageConfig | dict[str, Any], *, plain: bool) -> Store:
    s = _storage(storage)
    if s.block:
        return _saved(s)
    if plain:
        return open_store(s.uri, endpoint_url=s.endpoint_url, region=s.region, sse=s.sse,
                          sse_kms_key_id=s.sse_kms_key_id)
    from slurmctl.blocks.manifest_store import store_from_uri

    return store_from_uri(s.uri, endpoint_url=s.endpoint_url, region=s.region, sse=s.sse,
                          sse_kms_key_id=s.sse_kms_key_id)


def _storage(storage: StorageConfig | dict[str, Any]) -> StorageConfig:
    return storage if isinstance(storage, StorageConfig) else StorageConfig.model_validate(storage)


def _saved(s: StorageConfig) -> Store:
    """A saved store block: its credentials live in it."""
    from slurmctl.blocks.saved import STORE_TYPES, saved_block

    store = saved_block(s.block, STORE_TYPES)
    if s.sse and hasattr(store, "sse"):  # the config's encryption wins over the block's
        store = store.model_copy(update={"sse": s.sse, "sse_kms_key_id": s.sse_kms_key_id})
    return store


class JobNotFound(LookupError):
    pass


class JobExists(ValueError):
    pass


class JobTooNew(RuntimeError):
    """The job manifest was written by a newer slurmctl than this one; the message says to upgrade."""


def upgrade_job(body: dict[str, Any]) -> dict[str, Any]:
    """A job manifest as this release writes it, from one any earlier release wrote, so resume continues old jobs.

    1 -> 2: slurmctl's own handlers moved into the ``slurmctl`` package (``handlers.echo`` is now
    ``slurmctl.handlers.echo``). ``handler_version`` keeps its old text: it only names the batches' cache keys.
    2 -> 3: the budget's fields (``counts.api_calls``, ``core_seconds``, ``budget_changes``) start at zero; an old
    job's committed calls are counted again from its task manifests when it resumes.
    3 -> 4: nothing to change (4 adds the status ``stopped``, which a version-3 job never has).
    """
    version = body.get("schema_version", 1)
    if version > JOB_SCHEMA_VERSION:
        raise JobTooNew(f"job {body.get('job_id')!r} was written by a newer slurmctl (job manifest schema {version}, "
                        f"this slurmctl reads up to {JOB_SCHEMA_VERSION}): upgrade slurmctl to the release that "
                        f"submitted it (pip install -U slurmctl) and run the command again")
    if version < 2:
        new = renamed(body.get("handler", ""))
        if new is not None:
            body = {**body, "handler": new, "config": {**body.get("config", {}), "handler": new}}
        body = {**body, "schema_version": 2}
    if body["schema_version"] < 3:  # 2 -> 3: the budget's fields, which start at zero
        body = {**body, "schema_version": 3}
    if body["schema_version"] < 4:  # 3 -> 4: a new status only
        body = {**body, "schema_version": 4}
    return body


def load_job(store: Store, job_id: str) -> JobManifest:
    body = store.get_json(Keys(job_id).job)
    if body is None:
        raise JobNotFound(f"no job {job_id!r} in {store.uri('jobs/')}")
    return JobManifest.model_validate(upgrade_job(body))


def save_job(store: Store, job: JobManifest) -> None:
    job.updated_at = now()
    store.put_json(Keys(job.job_id).job, job.model_dump(mode="json"))


def update_job(store: Store, job_id: str, **changes: Any) -> JobManifest:
    """Read-modify-write of the job manifest. Only the coordinator writes it, so no lost updates."""
    job = load_job(store, job_id)
    last_seen = job.updated_at
    for k, v in changes.items():
        setattr(job, k, v)
    time_phases(job, changes, last_seen)
    save_job(store, job)
    return job


TIMED_PHASES = ("partition", "process", "retry", "aggregate")


def time_phases(job: JobManifest, changes: dict[str, Any], last_seen: str) -> None:
    """Keep ``job.phase_times`` (what ``slurmctl status`` reads for per-phase progress and items/s) in step with a
    change of phase or status. Entering a phase starts its entry and notes the items already done (the base of its
    items/s); entering the phase that is open again (another retry round) keeps it. Leaving a phase, or the job
    ending, closes the open entry. A new run (status set to ``running``) or a restart (phase ``submitted``) closes
    what an earlier coordinator left open at the last time it wrote the manifest, and starts its phase afresh."""
    at = now()
    entering = changes.get("phase")
    ending = changes.get("status") in TERMINAL_STATUSES
    new_run = changes.get("status") == "running" or entering == "submitted"
    open_ = [name for name, t in job.phase_times.items() if not t.get("finished_at")]
    for name in open_:
        if ending or (entering is not None and (entering != name or new_run)):
            job.phase_times[name] = {**job.phase_times[name], "finished_at": last_seen if new_run else at}
    if entering in TIMED_PHASES and (new_run or entering not in open_):
        c = job.counts
        job.phase_times[entering] = {"started_at": at, "finished_at": None, "items_at_start": (
            c.items_succeeded + c.items_failed + c.items_deferred + c.items_rejected)}


def _read_specs(store: Store, key: str) -> list[BatchSpec] | None:
    data = store.get_bytes(key)
    if data is None:
        return None
    return [BatchSpec.from_dict(json.loads(line)) for line in data.splitlines() if line]


def read_plan(store: Store, job_id: str) -> list[BatchSpec]:
    """The initial batches partitioning planned (empty before partitioning)."""
    return _read_specs(store, Keys(job_id).plan) or []


def read_round_batches(store: Store, job_id: str, round_no: int) -> list[BatchSpec] | None:
    """The batches of retry round ``round_no``, or None when the round was never planned."""
    return _read_specs(store, Keys(job_id).retry_batches(round_no))


def new_job_manifest(cfg: JobConfig, config_file: str | None) -> JobManifest:
    return JobManifest(job_id=cfg.job_id, handler=cfg.handler, input=cfg.input.model_dump(),
                       batch_size=cfg.batch_size, cluster=cfg.cluster.model_dump(), storage=cfg.storage.uri,
                       config=cfg.model_dump(mode="json"), config_file=config_file)
