"""Admission: everything that can be known wrong about a job before anything runs, checked where every job starts.

``create_job`` is the one way a job comes into being — ``slurmctl submit``, a Prefect deployment run, a scheduled
run — so the checks live here, not in the CLI: a bad handler, a missing input, an unreachable bucket or DynamoDB
table, a manifest store that does not honour create-if-absent (on which every commit would silently become
last-writer-wins), and a job projected to spend 90 % or more of its budget (``slurmctl.books.budget``) all refuse
the job before its manifest is written, each problem naming its config field.
"""

from __future__ import annotations

from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from slurmctl.books import budget
from slurmctl.books.manifests import JobManifest, Keys, now
from slurmctl.books.store import JobExists, new_job_manifest, reader_for
from slurmctl.config import JobConfig
from slurmctl.handler import HandlerError, handler_version, load_handler
from slurmctl.storage import StoreUnsupported

Problem = tuple[str, str]  # (config field, what is wrong and what to do)


class JobRefused(ValueError):
    """The job cannot run as configured; nothing was created. ``problems`` lists (field, message) pairs."""

    def __init__(self, job_id: str, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  {field}: {msg}" for field, msg in problems)
        super().__init__(f"job {job_id!r} cannot be submitted:\n{lines}")


def preflight(cfg: JobConfig) -> list[Problem]:
    """Everything that can be known wrong before submitting, as (field, message) pairs."""
    problems: list[Problem] = []
    try:
        load_handler(cfg.handler)
    except HandlerError as exc:
        problems.append(("handler", str(exc)))
    store = reader_for(cfg.storage)
    uri = cfg.input.uri
    try:
        if cfg.input.many:
            from slurmctl.books.input_files import NoInputFiles, list_input

            try:
                list_input(store, cfg.input)
            except (NoInputFiles, OSError) as exc:
                problems.append(("input.files" if cfg.input.files is not None else "input.uri", str(exc)))
        elif uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            store._s3().head_object(Bucket=bucket, Key=key)
        elif not Path(uri).is_file():
            problems.append(("input.uri", f"no such file: {uri}"))
    except (ClientError, BotoCoreError) as exc:
        problems.append(("input.uri", f"cannot read {uri}: {exc}"))
    # No HeadBucket: it needs ListBucket on the whole bucket, which the job's least-privilege policy (`slurmctl
    # iam-policy`) does not grant; the probe's own write tells a missing or unreachable bucket.
    if not problems:  # the probe writes: only for a job that can otherwise run
        try:
            store.check_conditional_writes()
        except StoreUnsupported as exc:
            problems.append(("storage.uri", str(exc)))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            what = (f"bucket {getattr(store, 'bucket', '?')!r} does not exist" if code == "NoSuchBucket"
                    else f"cannot write to {store.uri('')}: {exc}")
            problems.append(("storage.uri", what))
        except (BotoCoreError, OSError) as exc:
            problems.append(("storage.uri", f"cannot write to {store.uri('')}: {exc}"))
    if cfg.rate_limits and cfg.rate_limiter.kind == "dynamodb":
        from slurmctl.books.limits import backend_for

        try:
            backend_for(cfg).ensure_table()  # created on demand (pay per request) if missing
        except (ClientError, BotoCoreError) as exc:
            problems.append(("rate_limiter.table", f"cannot use DynamoDB table {cfg.rate_limiter.table!r}: {exc}"))
    return problems


def create_job(cfg: JobConfig, config_file: str | None, sample: budget.Sample | None = None) -> JobManifest:
    """Admit a new job and write its manifest; refuse an existing job id (that is what resume is for).

    ``sample``: what ``submit --sample N`` measured, for the budget's projection (else the config's declared
    per-item figures). Raises ``JobExists`` for a job id already in the store, ``JobRefused`` when the preflight
    or the budget finds problems.
    """
    store = reader_for(cfg.storage)
    key = Keys(cfg.job_id).job
    if store.exists(key):
        raise _exists(cfg, store)
    problems = preflight(cfg)
    projection = None
    if not problems:  # the projection reads the input: only once it is known to be there
        problems, projection = budget.admission_problems(cfg, store, sample)
    if problems:
        raise JobRefused(cfg.job_id, problems)
    job = new_job_manifest(cfg, config_file)
    job.budget_projection = projection and projection.as_dict(cfg.budget)
    job.handler_version = handler_version(cfg.handler)
    job.updated_at = now()
    if not store.put_json(key, job.model_dump(mode="json"), if_absent=True):
        raise _exists(cfg, store)
    return job


def _exists(cfg: JobConfig, store) -> JobExists:
    existing = store.get_json(Keys(cfg.job_id).job) or {}
    return JobExists(f"job {cfg.job_id!r} already exists in {store.uri('jobs/')} (status {existing.get('status')}); "
                     f"`slurmctl resume {cfg.job_id}` continues it, or choose another job_id")
