"""Job configuration: the YAML a user writes, validated before anything is submitted.

Every model forbids unknown keys, so a typo (``batchsize:``) is an error that names the field rather than a
setting silently ignored. ``load_config`` turns pydantic's errors into ``ConfigError`` whose message lists each
bad field by its dotted path (``cluster.max_jobs: must be >= cluster.min_jobs``), which the CLI prints before
exiting 2.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from slurmctl.safe_keys import key_problem, name_problem, path_problem
from slurmctl.slurm import duration_s

JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
FORMATS = ("jsonl", "csv", "parquet")
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
                   ".pq": "parquet"}


class ConfigError(ValueError):
    """A job config that cannot run. ``errors`` is a list of ``(field_path, message)``."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{where}invalid job config\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_yes_for_a_number(cls, data: Any) -> Any:
        """``batch_size: true`` (YAML's ``yes`` too) is a mistake, not 1, as pydantic would take it: it is passed on
        as its text, which a number field refuses, under the field's own name."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(value, bool) else None
                kinds = _kinds(field.annotation) if field else set()
                if kinds & {int, float} and not kinds & {bool, str, Any}:
                    data = {**data, name: json.dumps(value)}
        return data


def _kinds(annotation: Any) -> set[Any]:
    """The types an annotation names, through unions, ``Annotated`` and containers' arguments."""
    return {annotation}.union(*(_kinds(a) for a in get_args(annotation)))


def suffixes_of(name: str) -> tuple[str | None, str | None]:
    """The format and the compression a file name's suffixes say (``users.jsonl.gz``: jsonl, gzip)."""
    path = Path(name.split("?", 1)[0].rstrip("*") if "://" in name else name.rstrip("*?"))  # a glob's `.jsonl*`
    compression = COMPRESSIONS.get(path.suffix.lower())
    if compression:
        path = path.with_suffix("")
    return _SUFFIX_FORMATS.get(path.suffix.lower()), compression


def has_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


class InputConfig(_Strict):
    """Where the items come from: one file, a glob, a directory or S3 prefix (``uri``), or a list (``files``).
    ``format`` is inferred from the suffix when absent."""

    uri: str = ""
    # Many files: a list of paths or URIs, or the path or URI of a file listing them (one per line, relative ones
    # against its folder, ``#`` comments). Listed once at partition, in this order (a glob's or a folder's: sorted).
    files: list[str] | str | None = None
    format: Literal["jsonl", "csv", "parquet"] | None = None
    id_field: str = Field(default="id", min_length=1)
    # How JSONL and CSV bytes are decoded. A record whose bytes are not valid in it is rejected with its line and
    # reason, never "repaired" into U+FFFD. Legacy files: latin-1, cp1252, ... (Parquet strings are UTF-8 by spec.)
    encoding: str = "utf-8"
    # A JSONL or CSV file compressed whole (``users.jsonl.gz``): inferred from the suffix (.gz, .zst, .bz2); "none"
    # for a file whose suffix says otherwise. Streamed once at partition (``slurmctl.books.input_chunks``).
    compression: Literal["gzip", "zstd", "bz2", "none"] | None = None

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            name = codecs.lookup(v).name
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}; e.g. utf-8, latin-1, cp1252") from None
        probe = '\n\r,"{}:[]'
        try:
            ascii_compatible = probe.encode(name) == probe.encode("ascii")
        except (UnicodeError, LookupError):
            ascii_compatible = False
        if not ascii_compatible:
            raise ValueError(f"{v!r} is not ASCII-compatible (lines, commas and quotes are found in the bytes); "
                             f"convert UTF-16/32 input to UTF-8 first")
        return name

    @model_validator(mode="after")
    def _infer_format(self) -> "InputConfig":
        if bool(self.uri) == (self.files is not None):
            raise ValueError("set one of input.uri (a file, a glob, a folder or S3 prefix) and input.files")
        if isinstance(self.files, list) and not self.files:
            raise ValueError("input.files is an empty list")
        named = self.uri or (self.files[0] if isinstance(self.files, list) else "")
        fmt, compression = suffixes_of(named) if named else (None, None)
        if self.compression is None and not self.many:
            self.compression = compression
        if self.format is None:
            if fmt is None:
                where = "a folder or prefix" if self.uri.endswith("/") else "a list file" if not named else None
                raise ValueError((f"cannot infer the format of {where}" if where else
                                  f"cannot infer format from suffix {Path(named.split('?', 1)[0]).suffix!r}") +
                                 f"; set input.format to one of {', '.join(FORMATS)}")
            self.format = fmt
        if self.format == "parquet" and self.compressed:
            raise ValueError("a Parquet input compresses its own columns: set input.compression only for JSONL or "
                             "CSV")
        return self

    @property
    def many(self) -> bool:
        """Many files: a list, a glob, a folder or an S3 prefix (listed at partition, ``books.input_files``)."""
        if self.files is not None or has_glob(self.uri) or self.uri.endswith("/"):
            return True
        return "://" not in self.uri and Path(self.uri).is_dir()

    @property
    def compressed(self) -> bool:
        return self.compression not in (None, "none")

    def compression_of(self, uri: str) -> str | None:
        """A file's compression: the configured one, else what its suffix says (files of one input may differ)."""
        if self.compression is not None:
            return None if self.compression == "none" else self.compression
        return suffixes_of(uri)[1]

    def describe(self) -> str:
        """The input, for messages."""
        if self.uri:
            return self.uri
        return f"the {len(self.files)} files of input.files" if isinstance(self.files, list) else \
            f"the files listed in {self.files}"


class LocalClusterConfig(_Strict):
    """The embedded default: a dask ``LocalCluster`` on this machine."""

    kind: Literal["local"] = "local"
    n_workers: int = Field(default=2, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    processes: bool = True

    @property
    def worker_threads(self) -> int:
        """Threads each worker process is configured with (before items in flight double Dask's)."""
        return self.threads_per_worker


class _SlurmJob(_Strict):
    """What every Slurm job of ours asks for, checked in one place: the workers' and the coordinator's."""

    memory: str = "1GB"
    walltime: str = "01:00:00"

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|[KMGT])?", v.strip(), flags=re.I):
            raise ValueError("must look like '1GB', '512MB' or '4GiB'")
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}(:\d{2})?", v):
            raise ValueError("must be HH:MM:SS or D-HH:MM:SS")
        return v


class CoordinatorConfig(_SlurmJob):
    """Where the coordinator runs (``cluster.coordinator``): here (``local``), or as a Slurm job of its own
    (``slurm``: ``slurmctl.control.slurm_coordinator``), continued by the next one when its walltime comes."""

    on: Literal["local", "slurm"] = "local"
    walltime: str = "1-00:00:00"
    queue: str | None = Field(default=None, description="default: cluster.queue")
    account: str | None = Field(default=None, description="default: cluster.account")
    cores: int = Field(default=1, gt=0)
    memory: str = "4GB"
    signal_before_s: int = Field(default=120, gt=0, description=(
        "Slurm sends the coordinator SIGTERM this long before its walltime (--signal=B:TERM@N): it stops cleanly "
        "and queues the next coordinator."))
    max_restarts: int = Field(default=20, ge=0, description=(
        "Continuations by a new coordinator (walltime, requeue) before the job fails with the reason."))

    @model_validator(mode="after")
    def _signal(self) -> "CoordinatorConfig":
        if self.signal_before_s >= (duration_s(self.walltime) or 0):
            raise ValueError(f"signal_before_s must be shorter than the walltime ({self.walltime})")
        return self


class SlurmClusterConfig(_SlurmJob):
    """Options for dask-jobqueue's ``SLURMCluster``; each Slurm job runs ``processes`` Dask workers."""

    kind: Literal["slurm"]
    queue: str | None = None
    account: str | None = None
    cores: int = Field(default=1, gt=0)
    processes: int = Field(default=1, gt=0)
    memory: str = "1GB"
    walltime: str = "01:00:00"
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    min_jobs: int = Field(default=1, ge=0)
    max_jobs: int = Field(default=4, gt=0)
    local_directory: str | None = None
    log_directory: str | None = None
    retire_margin_s: float = Field(default=10.0, ge=0, description=(
        "A worker stops taking batches that would end later than this before its job's walltime, commits what it "
        "holds and leaves (a retirement: its batches are queued again at once, no item runs twice)."))
    retire_stagger_s: float | None = Field(default=None, ge=0, description=(
        "Each worker retires up to this much earlier still, at random, so one wave does not leave at once "
        "(default: 5% of the walltime, at most 120 s)."))
    replace_ahead_s: float = Field(default=30.0, ge=0, description=(
        "Start a worker job's replacement this long before it retires (about a worker job's start-up time), so "
        "throughput does not dip at each walltime; 0 waits until it has gone."))
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Other SLURMCluster keyword arguments, passed through unchanged.")

    @property
    def worker_threads(self) -> int:
        """Threads each worker process is configured with: the job's ``cores`` shared by its ``processes`` (before
        items in flight double Dask's)."""
        return max(1, self.cores // self.processes)

    @model_validator(mode="after")
    def _jobs(self) -> "SlurmClusterConfig":
        if self.max_jobs < self.min_jobs:
            raise ValueError("max_jobs must be >= min_jobs")
        if self.retire_margin_s >= (duration_s(self.walltime) or 0):
            raise ValueError(f"retire_margin_s must be shorter than the walltime ({self.walltime}): a worker would "
                             f"retire before it started")
        return self


ERROR_CLASS_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
ErrorClass = Annotated[str, Field(pattern=ERROR_CLASS_PATTERN)]


class CircuitBreakerConfig(_Strict):
    """Stop a batch when one transient class dominates its last ``window`` attempts (or as many as it, or its worker
    process, had in flight at once, when more: ``slurmctl.errors.CircuitBreaker``); defer the rest."""

    enabled: bool = True
    window: int = Field(default=20, gt=0)
    threshold: float = Field(default=0.8, gt=0, le=1)
    min_attempts: int = Field(default=10, gt=0)


class ErrorsConfig(_Strict):
    """How item errors are classified and retried (see ``slurmctl.errors``)."""

    max_attempts: int = Field(default=3, ge=1, description="Attempts per item inside its batch.")
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    retry_after_max_s: float = Field(default=120.0, ge=0, description="Longest Retry-After honoured.")
    exceptions: dict[str, ErrorClass] = Field(default_factory=dict,
                                              description="Exception type (qualified or bare name) -> class.")
    http_status: dict[int, ErrorClass] = Field(default_factory=dict, description="HTTP status -> class.")
    transient: list[ErrorClass] = Field(default_factory=lambda: ["network", "timeout", "throttle", "server"])
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    auto_retry_rounds: int = Field(default=3, ge=0, description="Rounds that retry items deferred by the breaker.")
    retry_cooldown_s: float = Field(default=10.0, ge=0, description="Wait before a round of deferred items.")

    @field_validator("http_status")
    @classmethod
    def _codes(cls, v: dict[int, str]) -> dict[int, str]:
        bad = [c for c in v if not 100 <= c <= 599]
        if bad:
            raise ValueError(f"not HTTP status codes: {bad}")
        return v


class RateLimitConfig(_Strict):
    """One limit (one API or endpoint): handlers spend it with ``with ctx.limit("name"):``."""

    per_second: float = Field(gt=0)
    burst: int = Field(default=1, ge=1, description="The API's own burst, as it documents it (its bucket's "
                       "capacity). The limiter never spends it: it is the room for the jitter between a grant and "
                       "the request reaching the API, (burst - 1) / per_second seconds.")
    floor: float | None = Field(default=None, gt=0, description="Lowest rate after 429s (default per_second/10).")
    ceiling: float | None = Field(default=None, gt=0, description="Highest rate `slurmctl rate` may set "
                                                                 "(default per_second*10).")
    lease_size: int = Field(default=32, gt=0, description="Slots of each lane a worker leases in one backend write.")
    lanes: int | None = Field(default=None, ge=1, le=64, description="Interleaved schedules a lease is taken from "
                                                                    "(default: one per 1.25 requests/s, at most 64).")
    throttle_strikes: int | None = Field(default=None, ge=1, description="429s within a few seconds (at least 2 s, "
                                         "at least 8 slots) that mean the API lowered its quota: the shared rate "
                                         "then halves. Fewer are sporadic: only their requests wait their "
                                         "Retry-After. Default: 3, or 5 % of those seconds' slots when more.")
    recovery_s: float = Field(default=30, gt=0, description="Time to recover from floor to target after 429s.")
    key: str | None = Field(default=None, min_length=1, description="Share this limit's state across jobs "
                            "(default: private to the job). Names separated by '/', each of letters, digits, '-', "
                            "'_' or '.'; it lives under the shared rate-limits/ prefix, so no '..' or '/' at the ends.")

    @field_validator("key")
    @classmethod
    def _safe_key(cls, v: str | None) -> str | None:
        problem = path_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "RateLimitConfig":
        if self.floor is not None and self.floor > self.per_second:
            raise ValueError("floor must be <= per_second")
        if self.ceiling is not None and self.ceiling < self.per_second:
            raise ValueError("ceiling must be >= per_second")
        return self


class RateLimiterConfig(_Strict):
    """Where limit state lives: ``local`` (SQLite, processes of one machine) or ``dynamodb`` (any number of nodes)."""

    kind: Literal["local", "dynamodb"] = "local"
    path: str | None = Field(default=None, description="local: SQLite file (default: in the local store, or "
                                                       "$SLURMCTL_HOME)")
    table: str = Field(default="slurmctl-rate-limits", min_length=3)
    endpoint_url: str | None = None
    region: str | None = None
    block: str | None = Field(default=None, min_length=1, description=(
        "A saved rate-limiter block (slurmctl DynamoDB or Local Rate Limiter) by name: it sets the fields above."))

    @model_validator(mode="before")
    @classmethod
    def _from_block(cls, data: Any) -> Any:
        return _with_block_fields(data, "limiter", "kind")


def _with_block_fields(data: Any, what: str, own_key: str) -> Any:
    """A ``storage:``/``rate_limiter:`` mapping that names a saved ``block`` gets the block's non-secret settings
    (``slurmctl.blocks.saved``), once: a mapping that already has ``own_key`` (a validated config read back from a
    manifest) is left as it is. A missing block is a config error."""
    if not (isinstance(data, dict) and data.get("block")) or own_key in data:
        return data
    from slurmctl.blocks.saved import BlockNotFound, limiter_settings, store_settings

    try:
        fields = store_settings(data["block"]) if what == "store" else limiter_settings(data["block"])
    except BlockNotFound as exc:
        raise ValueError(str(exc)) from None
    return {**{k: v for k, v in fields.items() if v is not None}, **data}


class OutputConfig(_Strict):
    """What the output rows must look like (``slurmctl.output_schema``)."""

    schema_: dict[str, str] | str | None = Field(default=None, alias="schema", description=(
        "Arrow types by column ({score: double, name: string}; pyarrow's type names), or the path or URI of a "
        "Parquet file whose schema it is. Checked per row at the batch: a row of another type fails its item with "
        "class schema. Without it, the first committed batch's types are recorded and later batches are checked "
        "against them with the merge's promotion rules."))
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _types(cls, v: Any) -> Any:
        if isinstance(v, dict):
            import pyarrow as pa

            for column, name in v.items():
                try:
                    pa.type_for_alias(str(name))
                except (ValueError, KeyError):
                    raise ValueError(f"column {column!r}: unknown Arrow type {name!r} (int64, double, string, bool, "
                                     f"timestamp[ms], date32, ...; for nested types give a Parquet file)") from None
        return v


class AggregateConfig(_Strict):
    """How the committed batch outputs become the job's dataset (``flows/aggregate.py``)."""

    fan_in: int = Field(default=100, ge=2, description=(
        "Files one merge reads: batch outputs at the first level, the previous level's files after that."))
    rows_per_bucket: int = Field(default=500_000, ge=1000, description=(
        "Rows are spread over hash partitions of the item id of about this many rows each, so deduplication "
        "and every merge hold at most one partition in memory."))
    partition_by: str | None = Field(default=None, min_length=1, description=(
        "Write a dataset partitioned by this output column (hive layout: column=value/part-00000.parquet) "
        "instead of one file."))
    max_rows_per_file: int | None = Field(default=None, gt=0, description=(
        "Start a new output file after this many rows (part-00000.parquet, part-00001.parquet, ...)."))
    max_partitions: int = Field(default=1024, gt=0, description=(
        "Distinct values of partition_by allowed (each is a directory with files of its own)."))


class AlertsConfig(_Strict):
    """When the coordinator emits its alert events (``slurmctl.job.error-rate``, ``slurmctl.job.token-wait``); the
    automations ``slurmctl alerts install`` creates act on them. Each is emitted when its share crosses the threshold
    upwards over the last ``window_s`` seconds, once, until it falls back below. The stall bound is the
    automation's own (``slurmctl alerts install --stall-minutes``): the Prefect server watches for missing events."""

    error_rate_pct: float = Field(default=10.0, gt=0, le=100, description=(
        "Failed items as a share of the items finished in the window (succeeded + failed) above which "
        "slurmctl.job.error-rate is emitted."))
    token_wait_pct: float = Field(default=50.0, gt=0, le=100, description=(
        "Share of the worker threads' time spent waiting for rate-limit tokens in the window above which "
        "slurmctl.job.token-wait is emitted."))
    window_s: float = Field(default=60.0, ge=2, description="The recent window the shares are measured over.")
    min_items: int = Field(default=20, ge=1, description=(
        "Items finished in the window below which no error rate is judged (a few failures of a few items is noise)."))


class BudgetConfig(_Strict):
    """What a job may spend (``slurmctl.books.budget``): API calls, core-hours and, with prices, dollars.

    ``submit`` refuses a job whose projection reaches 90 % of a limit; a running job pauses itself when its spend
    reaches 100 % (``slurmctl resume JOB --raise-budget KEY=VALUE`` continues it). API calls are handler calls,
    in-batch retries included (the batches' ``metrics.api_calls``); core-hours are the Dask workers' cores times
    the time they were up while batches ran. The projection takes ``calls_per_item`` and ``core_seconds_per_item``
    (or what ``submit --sample N`` measured) times the input's items."""

    calls_per_item: float | None = Field(default=None, ge=0, description=(
        "API calls (handler calls) each item makes, retries included: the projection's input."))
    core_seconds_per_item: float | None = Field(default=None, ge=0, description=(
        "Seconds of one worker thread (one core) each item takes: the core-hour projection's input."))
    usd_per_api_call: float | None = Field(default=None, ge=0, description="Price of one API call, in USD.")
    usd_per_core_hour: float | None = Field(default=None, ge=0, description="Price of one core-hour, in USD.")
    max_api_calls: int | None = Field(default=None, gt=0, description="API calls the job may make.")
    max_core_hours: float | None = Field(default=None, gt=0, description="Core-hours the job may hold.")
    max_usd: float | None = Field(default=None, gt=0, description=(
        "Dollars the job may cost, from the prices above (at least one is required)."))

    @field_validator("max_usd")
    @classmethod
    def _priced(cls, v: float | None, info: Any) -> float | None:
        # The prices are declared before max_usd, so they are validated (and in info.data) by now; a price that
        # failed its own validation is missing there, and reported on its own.
        prices = ("usd_per_api_call", "usd_per_core_hour")
        if v is not None and all(k in info.data for k in prices) and all(info.data[k] is None for k in prices):
            raise ValueError("needs a price to count dollars: set budget.usd_per_api_call and/or "
                             "budget.usd_per_core_hour")
        return v

    @property
    def limits(self) -> dict[str, float]:
        """The limits set, by key (``max_api_calls``, ``max_core_hours``, ``max_usd``)."""
        return {k: getattr(self, k) for k in BUDGET_LIMITS if getattr(self, k) is not None}

    @property
    def priced(self) -> bool:
        return self.usd_per_api_call is not None or self.usd_per_core_hour is not None


BUDGET_LIMITS = ("max_api_calls", "max_core_hours", "max_usd")


ClusterConfig = Annotated[Union[LocalClusterConfig, SlurmClusterConfig], Field(discriminator="kind")]


class StorageConfig(_Strict):
    """Where manifests and outputs live: ``file://`` path (or plain path) or ``s3://bucket/prefix``.

    ``endpoint_url``/``region`` reach S3-compatible endpoints (the moto server in tests); credentials come from
    the usual AWS environment, like any prefect-aws ``AwsCredentials``.
    """

    uri: str = Field(default="file://./.slurmctl", min_length=1)
    endpoint_url: str | None = None
    region: str | None = None
    block: str | None = Field(default=None, min_length=1, description=(
        "A saved manifest-store block (slurmctl S3 or Local Manifest Store) by name: its URI, endpoint and region "
        "fill the fields above, and its credentials are loaded by name where they are needed."))
    sse: Literal["AES256", "aws:kms"] | None = Field(default=None, description=(
        "s3:// only: server-side encryption of every object written (AES256 = SSE-S3, aws:kms = SSE-KMS)."))
    sse_kms_key_id: str | None = Field(default=None, min_length=1, description=(
        "With sse: aws:kms, the KMS key id, ARN or alias (default: the account's aws/s3 key)."))

    @model_validator(mode="before")
    @classmethod
    def _from_block(cls, data: Any) -> Any:
        return _with_block_fields(data, "store", "uri")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(("file://", "s3://")):
            raise ValueError("must be a file:// or s3:// URI, or a local path")
        if v.startswith("s3://") and len(v[5:].split("/", 1)[0]) < 3:
            raise ValueError("s3 bucket name must have at least 3 characters")
        if v.startswith("s3://"):
            problem = key_problem(v[5:].partition("/")[2].strip("/"))
            if problem:
                raise ValueError(f"the key prefix after the bucket {problem}")
        return v

    @field_validator("sse")
    @classmethod
    def _sse_on_s3(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not str(info.data.get("uri", "")).startswith("s3://"):
            raise ValueError("server-side encryption applies to an s3:// store only; drop it or use an s3:// uri")
        return v

    @field_validator("sse_kms_key_id")
    @classmethod
    def _kms_key_needs_kms(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("sse") != "aws:kms":
            raise ValueError("is only used with sse: aws:kms; set storage.sse to aws:kms or drop the key id")
        return v


class JobConfig(_Strict):
    """One job: which handler runs over which items, in what batches, on which cluster, stored where."""

    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    name: str = Field(default="job", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    handler: str
    input: InputConfig
    batch_size: int = Field(default=100, gt=0)
    cluster: ClusterConfig = Field(default_factory=LocalClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    max_in_flight: int = Field(default=64, gt=0, description=(
        "Shards (task runs, each a run of batches) submitted but not finished, at most; the coordinator submits no "
        "more than two per worker thread either."))
    max_task_runs: int = Field(default=2000, ge=20, description=(
        "Prefect task runs one run of the job creates at most, all phases together; batches are grouped into that "
        "many shards whatever the job's size."))
    batch_retries: int = Field(default=2, ge=0, description=(
        "Prefect task retries of a shard whose batches hit an infrastructure fault (its committed batches are not "
        "run again)."))
    worker_loss_requeues: int = Field(default=5, ge=0, description=(
        "Times a shard whose worker died is queued again with its uncommitted batches (not a retry)."))
    worker_ttl_s: float = Field(default=60, ge=5, description=(
        "A Dask worker silent this long (frozen node, network partition) is taken as lost and its batch re-queued; "
        "a worker that dies is noticed at once."))
    no_workers_timeout_s: float = Field(default=600, gt=0, description=(
        "Fail the run (clearly, not stuck Running) when batches wait this long with no Dask worker alive."))
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig)
    rate_limits: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], RateLimitConfig] = Field(
        default_factory=dict)
    rate_limiter: RateLimiterConfig = Field(default_factory=RateLimiterConfig)
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "Free-form values handed to the handler as ctx.params."))
    concurrency: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(default=None, description=(
        "Items in flight at once: N per worker thread (shared by the two batches a thread runs at once; one batch "
        "at most N), or auto (grows until the declared rate limits "
        "are saturated, or the API's latency says it queues our calls; shrinks on 429). Default: auto for an async "
        "handler, 1 for a sync one (a sync handler run with N > 1 or auto runs in threads and must be "
        "thread-safe)."))
    max_concurrency: int = Field(default=256, gt=0, description=(
        "The most items in flight in one worker process under concurrency: auto (a worker held below what a "
        "declared rate limit needs, its rate x the calls' latency, says so in its log, with the number to set)."))
    handler_mode: Literal["item", "batch"] | None = Field(default=None, description=(
        "item: the handler is called per item (handle(item, ctx)); batch: once per batch (handle_batch(batch, ctx)) "
        "with the batch in batch_format, returning rows that carry the item id. Default: batch when the handler is "
        "a function named handle_batch or a class with a handle_batch method, else item."))
    batch_format: Literal["records", "pandas", "arrow"] = Field(default="records", description=(
        "What a batch handler receives and may return: a list of dicts, a pandas DataFrame or a pyarrow Table."))
    part_format: Literal["parquet", "sqlite"] = Field(default="parquet", description=(
        "How each batch stores its rows before aggregation: Parquet, or a SQLite database (the local scratch "
        "format of the PRD's workers); the aggregation reads either."))
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @field_validator("rate_limits")
    @classmethod
    def _limit_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            problem = name_problem(name)
            if problem:  # the pattern already refuses '/', '%' and control characters; this catches '.' and '..'
                raise ValueError(f"limit name {name!r} {problem}")
        return v

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        """One message for either form (pydantic's names each branch of the union, as two errors)."""
        if v is None or v == "auto":
            return v
        n = int(v) if isinstance(v, str) and v.strip().isdigit() or isinstance(v, float) and v.is_integer() else v
        if type(n) is not int or n <= 0:
            shown = v if isinstance(v, str) else json.dumps(v)
            raise ValueError(f"must be a whole number of items in flight (1 or more) or auto, not {shown}")
        return n

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError("must be 'module:function', e.g. slurmctl.handlers.echo:handle")
        return v

    @model_validator(mode="after")
    def _default_job_id(self) -> "JobConfig":
        if self.job_id is None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            self.job_id = f"{self.name}-{stamp}"
        return self


def _field_path(loc: tuple[Any, ...]) -> str:
    # Drop the discriminator tag pydantic inserts for tagged unions (cluster.slurm.max_jobs -> cluster.max_jobs).
    parts = [str(p) for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "cluster" and p in ("local", "slurm"))]
    return ".".join(parts) or "(root)"


def _message(err: dict[str, Any]) -> str:
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in ("int_parsing", "float_parsing"):
        return f"must be a number, not {err.get('input')}"
    if kind == "int_from_float":
        return f"must be a whole number, not {err.get('input')}"
    if kind in ("int_type", "float_type", "string_type", "bool_type", "dict_type", "list_type") \
            and err.get("input", "") is None:  # YAML's `key:` with nothing after it
        return "has no value (the key with nothing after it): give it one, or leave the key out"
    if kind == "missing":
        return "required"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "union_tag_invalid":
        return f"must be one of {ctx.get('expected_tags')}"
    return msg.removeprefix("Value error, ")


def parse_config(data: Any, source: str | None = None) -> JobConfig:
    """Validate a config mapping; raise ``ConfigError`` listing every bad field."""
    if not isinstance(data, dict):
        raise ConfigError([("(root)", "must be a mapping of keys to values")], source)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([(_field_path(e["loc"]), _message(e)) for e in exc.errors()], source) from None


def load_config(path: str | Path, date: str | _dt.date | None = None) -> JobConfig:
    """Read and validate a YAML job config. Relative local paths resolve against the config's directory;
    ``{date}`` fields are templated with ``date`` (see ``job_config``)."""
    return job_config(path, date=date)


def resolve_paths(cfg: JobConfig, base: Path) -> JobConfig:
    """Make local input and storage paths absolute, so workers started elsewhere (Slurm) find them."""
    def absolute(p: str) -> str:
        return p if Path(p).is_absolute() else str((base / p).resolve())

    def local(uri: str) -> str:
        if "://" not in uri:
            return absolute(uri) + ("/" if uri.endswith("/") else "")
        return absolute(uri[len("file://"):]) if uri.startswith("file://") else uri

    if cfg.input.uri:
        cfg.input.uri = local(cfg.input.uri)
    if isinstance(cfg.input.files, list):
        cfg.input.files = [local(f) for f in cfg.input.files]
    elif cfg.input.files:
        cfg.input.files = local(cfg.input.files)
    s = cfg.storage.uri
    if not s.startswith("s3://"):
        cfg.storage.uri = "file://" + absolute(s[len("file://"):] if s.startswith("file://") else s)
    return cfg


# --- dates templated into a config (recurring backfills) ---------------------------------------------------------
_DATE_FIELD = re.compile(r"\{date(?::([^{}]+))?\}")


def has_date_template(data: Any) -> bool:
    """Does the raw config use ``{date}`` (or ``{date:%Y/%m/%d}``) anywhere?"""
    if isinstance(data, str):
        return bool(_DATE_FIELD.search(data))
    if isinstance(data, dict):
        return any(has_date_template(k) or has_date_template(v) for k, v in data.items())
    if isinstance(data, list):
        return any(has_date_template(v) for v in data)
    return False


def render_date(data: Any, date: _dt.date) -> Any:
    """The raw config with ``{date}`` (ISO, ``2025-04-12``) and ``{date:FORMAT}`` (strftime) replaced, in every
    string value, so a recurring deployment's runs each get their own input (``users-{date}.jsonl``) and job id
    (``backfill-{date}``). Only these fields are templated: other braces are left as written."""
    if isinstance(data, str):
        return _DATE_FIELD.sub(lambda m: date.strftime(m.group(1)) if m.group(1) else date.isoformat(), data)
    if isinstance(data, dict):
        return {k: render_date(v, date) for k, v in data.items()}
    if isinstance(data, list):
        return [render_date(v, date) for v in data]
    return data


def parse_date(value: str | _dt.date, field: str = "date") -> _dt.date:
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    try:
        return _dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError([(field, f"must be a date as YYYY-MM-DD, not {value!r}")]) from None


def job_config(config_path: str | Path | None = None, config: dict[str, Any] | None = None, *,
               job_id: str | None = None, date: str | _dt.date | None = None,
               default_job_id: str | None = None) -> JobConfig:
    """The job config a run starts from: a YAML file (``config_path``) or an inline mapping (``config``, relative
    paths against the working directory), with ``{date}`` templated when ``date`` is given and the ``job_id``
    override applied (else the config's own, else ``default_job_id`` (``{name}``: the
    config's name), else ``<name>-<timestamp>``). A config that uses
    ``{date}`` without a date is an error naming the field."""
    if (config_path is None) == (config is None):
        raise ConfigError([("config_path", "give either config_path or an inline config, not both or neither")])
    source = str(config_path) if config_path is not None else "inline config"
    if config_path is not None:
        path = Path(config_path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError([("(file)", f"no such file: {path}")], source) from None
        except yaml.YAMLError as exc:
            raise ConfigError([("(file)", f"not valid YAML: {exc}")], source) from None
        base = path.resolve().parent
    else:
        data, base = config, Path.cwd()
    if has_date_template(data):
        if date is None:
            raise ConfigError([("date", "the config uses {date}: give a date (a scheduled run takes its own)")],
                              source)
        data = render_date(data, parse_date(date))
    if isinstance(data, dict) and (job_id or (default_job_id and not data.get("job_id"))):
        data = {**data, "job_id": job_id or default_job_id.replace("{name}", str(data.get("name") or "job"))}
    return resolve_paths(parse_config(data, source), base)


def known_stores() -> list[StorageConfig]:
    """Every store this machine submitted jobs to (the pointers in ``$SLURMCTL_HOME/jobs``), then the default one
    (``$SLURMCTL_STORAGE``, else ``./.slurmctl`` when it exists): where ``slurmctl list`` looks."""
    import os

    from slurmctl.paths import home

    found: dict[str, StorageConfig] = {}
    for pointer in sorted((home() / "jobs").glob("*.json")):
        try:
            storage = StorageConfig.model_validate(json.loads(pointer.read_text())["storage"])
        except (OSError, ValueError, KeyError):
            continue  # torn, or of another version: that store is still listed with --storage
        found.setdefault(storage.model_dump_json(), storage)
    default = os.environ.get("SLURMCTL_STORAGE")
    if default or Path(".slurmctl").is_dir():
        storage = StorageConfig(uri=default or "file://" + str(Path(".slurmctl").resolve()),
                                endpoint_url=os.environ.get("SLURMCTL_ENDPOINT_URL"))
        found.setdefault(storage.model_dump_json(), storage)
    return list(found.values())


def known_storage(job_id: str) -> StorageConfig:
    """The store of a job submitted from this machine, for commands given only its id (``slurmctl status JOB``, a
    retry deployment's run): the pointer ``submit`` left in ``$SLURMCTL_HOME/jobs``, else ``$SLURMCTL_STORAGE``
    (with ``$SLURMCTL_ENDPOINT_URL``), else ``./.slurmctl``."""
    import os

    from slurmctl.paths import home

    if not re.fullmatch(JOB_ID_PATTERN, job_id or ""):  # it names a file here: never read one outside jobs/
        raise ConfigError([("job_id", f"{str(job_id)[:200]!r} is not a job id: "
                                      f"{name_problem(job_id or '') or 'must match ' + JOB_ID_PATTERN}")])
    pointer = home() / "jobs" / f"{job_id}.json"
    if pointer.exists():
        return StorageConfig.model_validate(json.loads(pointer.read_text())["storage"])
    uri = os.environ.get("SLURMCTL_STORAGE", "file://" + str(Path(".slurmctl").resolve()))
    return StorageConfig(uri=uri, endpoint_url=os.environ.get("SLURMCTL_ENDPOINT_URL"))
