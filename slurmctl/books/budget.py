"""A job's budget: what it may spend (API calls, core-hours, dollars), what it is projected to, and what it spent.

The config's ``budget:`` (``slurmctl.config.BudgetConfig``) sets the limits and prices. Three places use them:

* **Admission** (``admission_problems``, called by ``create_job``, which every way of starting a job passes): the
  job's projection — its input's items (``count_items``) times the calls and core-seconds per item, declared in the
  config or measured by ``slurmctl submit --sample N`` (``measure_sample``, which calls the real handler) — must stay
  below ``ADMIT_SHARE`` (90 %) of every limit, or the job is refused with the numbers. Without a per-item figure
  there is no projection: the job is admitted and the runtime guard alone holds the limits.
* **The runtime guard** (``flows/budget.py``): the coordinator adds up what the committed batches spent and pauses the
  job when a limit is reached (``reached``, ``pause_reason``).
* **Resuming** (``raise_budget``): ``slurmctl resume JOB --raise-budget KEY=VALUE`` writes the new limits into the job
  manifest's config, which stays the one source of truth.

What is counted:

* **API calls**: handler calls, in-batch retries included: the committed batches' ``metrics.api_calls``, folded into
  ``counts.api_calls`` (each batch once; recounted from the task manifests on resume).
* **Core-hours**: the cores the job's Dask workers held (their threads: a Slurm job's ``cores``, a LocalCluster's
  ``n_workers x threads_per_worker``) times the time they were up while batches were processed, measured by the
  coordinator every couple of seconds (``core_seconds`` in the job manifest, over all its runs). That is what an
  allocation costs, idle threads included; the aggregation's merges and workers still queued in Slurm are not in it.
* **Dollars**: ``api_calls x usd_per_api_call + core_hours x usd_per_core_hour`` (the prices given).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slurmctl.config import BUDGET_LIMITS, BudgetConfig, JobConfig

ADMIT_SHARE = 0.9  # admission refuses a projection at or above this share of a limit
EXACT_COUNT_MAX_BYTES = 64 * 2**20  # an S3 text input above this is not read whole to count its items
ESTIMATE_SAMPLE_BYTES = 2**20  # ... its items are estimated from its size and its first MiB

WHAT = {"max_api_calls": "API calls", "max_core_hours": "core-hours", "max_usd": "USD"}


class BudgetReached(Exception):
    """The job's spend reached a budget limit: the coordinator stops between batches and pauses the job. The message
    says which limit, the numbers and the command that continues it."""


def fmt(key: str, value: float | None) -> str:
    """A limit's quantity as people read it: whole calls, core-hours to 3 decimals, dollars to cents."""
    if value is None:
        return "—"
    if key == "max_api_calls":
        return f"{value:,.0f}"
    if key == "max_usd":
        return f"{value:,.2f}"
    return f"{value:,.3f}"


# --- spend -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spend:
    """What a job spent (or is projected to): API calls and core-hours; dollars follow from the prices."""

    api_calls: float | None = 0
    core_hours: float | None = 0

    def usd(self, budget: BudgetConfig) -> float | None:
        """Dollars at the budget's prices; None when nothing is priced or a priced quantity is unknown."""
        if not budget.priced:
            return None
        parts = [(self.api_calls, budget.usd_per_api_call), (self.core_hours, budget.usd_per_core_hour)]
        if any(price is not None and qty is None for qty, price in parts):
            return None
        return sum(qty * price for qty, price in parts if price is not None)

    def of(self, key: str, budget: BudgetConfig) -> float | None:
        return {"max_api_calls": self.api_calls, "max_core_hours": self.core_hours, "max_usd": self.usd(budget)}[key]


def spent(job: Any) -> Spend:
    """A job manifest's spend so far (a ``JobManifest`` or its dict)."""
    if isinstance(job, dict):
        return Spend(api_calls=(job.get("counts") or {}).get("api_calls") or 0,
                     core_hours=(job.get("core_seconds") or 0.0) / 3600)
    return Spend(api_calls=job.counts.api_calls, core_hours=job.core_seconds / 3600)


def budget_of(config: dict[str, Any]) -> BudgetConfig:
    """The budget in force of a job manifest's ``config`` (a manifest written before budgets: none)."""
    return BudgetConfig.model_validate(config.get("budget") or {})


def usage_view(job: dict[str, Any]) -> dict[str, Any]:
    """For ``slurmctl status`` and the summary: ``core_hours``, ``cost_usd`` (None unless priced), and ``budget``:
    each limit with what is spent and the share (None when the job has no limits)."""
    budget = budget_of(job.get("config") or {})
    spend = spent(job)
    view: dict[str, Any] = {"core_hours": round(spend.core_hours or 0.0, 4), "cost_usd": None, "budget": None}
    usd = spend.usd(budget)
    if usd is not None:
        view["cost_usd"] = round(usd, 4)
    if budget.limits:
        view["budget"] = {key: {"max": limit, "used": spend.of(key, budget),
                                "share": round((spend.of(key, budget) or 0) / limit, 4)}
                          for key, limit in budget.limits.items()}
    return view


@dataclass(frozen=True)
class Reached:
    key: str
    used: float
    limit: float

    def __str__(self) -> str:
        return f"budget {self.key} {fmt(self.key, self.used)}/{fmt(self.key, self.limit)} reached"


def reached(budget: BudgetConfig, spend: Spend) -> list[Reached]:
    """The limits that ``spend`` has reached (100 % or more)."""
    out = []
    for key, limit in budget.limits.items():
        used = spend.of(key, budget)
        if used is not None and used >= limit:
            out.append(Reached(key, used, limit))
    return out


def suggested_limit(hit: Reached, counts: Any) -> float:
    """A limit that should let the job finish: what it spent per item so far, times all its items, plus 10 %
    (twice the limit when nothing is known yet). Rounded up to two significant digits."""
    done = sum(getattr(counts, k, 0) or 0 for k in ("items_succeeded", "items_failed", "items_deferred",
                                                    "items_rejected"))
    total = getattr(counts, "items_total", 0) or 0
    want = hit.used / done * total * 1.1 if done and total > done else 2 * hit.limit
    want = max(want, hit.used * 1.1, hit.limit * 1.1)
    digits = max(0, math.floor(math.log10(want)) - 1)
    step = 10 ** digits
    value = math.ceil(want / step) * step
    return int(value) if hit.key == "max_api_calls" or value >= 10 else round(value, 3)


def pause_reason(job_id: str, hits: list[Reached], counts: Any) -> str:
    """Why a job paused at its budget, and how to continue it: the job manifest's ``error`` (``slurmctl status``), the
    message of its Prefect state, its ``slurmctl.job.paused`` event."""
    raises = " ".join(f"--raise-budget {h.key}={suggested_limit(h, counts):g}" for h in hits)
    return (f"{'; '.join(map(str, hits))}; `slurmctl resume {job_id} {raises}` continues it (committed batches are "
            f"kept)")


# --- projection (admission) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemCount:
    items: int
    how: str  # how the number was found, for the messages
    exact: bool = True


def count_items(cfg: JobConfig, store: Any) -> ItemCount:
    """The input's items, cheaply: a Parquet file's row count (its footer); a JSONL/CSV file's lines (a CSV's header
    aside: an upper bound of its records, blank lines and multi-line CSV fields counted), read whole when it is local
    or at most 64 MiB; a larger S3 object's lines estimated from its size and its first MiB. An input of many files:
    the sum over its files."""
    if not cfg.input.many:
        return _count_file(cfg, store, cfg.input.uri, cfg.input.compression)
    from slurmctl.books.input_files import list_input

    files = list_input(store, cfg.input)
    counts = [_count_file(cfg, store, f.uri, cfg.input.compression_of(f.uri)) for f in files]
    exact = all(c.exact for c in counts)
    return ItemCount(sum(c.items for c in counts), f"{'' if exact else 'estimated '}lines of its {len(files)} files",
                     exact=exact)


def _count_file(cfg: JobConfig, store: Any, uri: str, compression: str | None) -> ItemCount:
    fmt_ = cfg.input.format
    if fmt_ == "parquet":
        import pyarrow.parquet as pq

        with store.open_uri(uri) as f:
            return ItemCount(pq.ParquetFile(f).metadata.num_rows, "rows in the Parquet input")
    header = 1 if fmt_ == "csv" else 0
    if compression not in (None, "none"):
        return _count_compressed(store, header, uri, compression)
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        size = int(store._s3().head_object(Bucket=bucket, Key=key)["ContentLength"])
        if size > EXACT_COUNT_MAX_BYTES:
            head = store.read_range(uri, 0, ESTIMATE_SAMPLE_BYTES)
            lines = head.count(b"\n") or 1
            estimate = max(0, round(size * lines / len(head)) - header)
            return ItemCount(estimate, f"lines of the input, estimated from its first MiB and its {size:,} bytes",
                             exact=False)
    lines, last = 0, b"\n"
    with store.open_uri(uri) as f:
        while chunk := f.read(8 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1  # a last line without its newline
    return ItemCount(max(0, lines - header), "lines of the input")


def _count_compressed(store: Any, header: int, uri: str, compression: str) -> ItemCount:
    """A compressed input's lines: decompressed and counted when it is local or at most 64 MiB compressed; a larger
    S3 object's estimated from the lines its first MiB (compressed) holds and its size."""
    from slurmctl.books.input_chunks import decompressing

    size = None
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        size = int(store._s3().head_object(Bucket=bucket, Key=key)["ContentLength"])
    lines, last, read = 0, b"\n", 0
    with store.open_uri(uri) as raw:
        f = decompressing(raw, compression)
        while chunk := f.read(8 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
            read = raw.tell() if hasattr(raw, "tell") else read
            if size is not None and size > EXACT_COUNT_MAX_BYTES and read >= ESTIMATE_SAMPLE_BYTES:
                estimate = max(0, round(size * lines / max(read, 1)) - header)
                return ItemCount(estimate, f"lines of the {compression} input, estimated from its first "
                                           f"{read:,} compressed bytes and its {size:,}", exact=False)
    if last != b"\n":
        lines += 1
    return ItemCount(max(0, lines - header), f"lines of the {compression} input")


@dataclass
class Sample:
    """What ``submit --sample N`` measured on the input's first items with the real handler."""

    items: int
    calls: int
    seconds: float  # wall time in the handler, retries' back-off included, rate-limit pacing not
    errors: Counter = field(default_factory=Counter)

    @property
    def calls_per_item(self) -> float:
        return self.calls / self.items if self.items else 0.0

    @property
    def seconds_per_item(self) -> float:
        return self.seconds / self.items if self.items else 0.0


def first_items(cfg: JobConfig, store: Any, n: int) -> list[dict[str, Any]]:
    """The input's first ``n`` good items (malformed records skipped, as a batch would reject them)."""
    from slurmctl.books.input_chunks import decompressing
    from slurmctl.records import read_csv, read_jsonl, read_parquet_rows

    id_field, enc = cfg.input.id_field, cfg.input.encoding
    uri, compression = cfg.input.uri, cfg.input.compression
    if cfg.input.many:  # the first file's
        from slurmctl.books.input_files import list_input

        uri = list_input(store, cfg.input)[0].uri
        compression = cfg.input.compression_of(uri)
    with store.open_uri(uri) as raw:
        f = decompressing(raw, compression) if compression not in (None, "none") else raw
        if cfg.input.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            return [item for _, item in read_parquet_rows(pf, 0, min(n, pf.metadata.num_rows), id_field).items]
        header = f.readline() if cfg.input.format == "csv" else b""
        items: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for line in f:
            lines.append(line)
            if len(lines) % 64 == 0 or len(lines) >= n:  # parse as we go: stop once there are enough
                data = b"".join(lines)
                read = read_csv(header, data, 2, id_field, enc) if header else read_jsonl(data, 1, id_field, enc)
                items = [item for _, item in read.items]
                if len(items) >= n:
                    break
        else:
            data = b"".join(lines)
            read = read_csv(header, data, 2, id_field, enc) if header else read_jsonl(data, 1, id_field, enc)
            items = [item for _, item in read.items]
    return items[:n]


def measure_sample(cfg: JobConfig, store: Any, n: int) -> Sample:
    """Run the job's handler on the input's first ``n`` items, as a batch would (in-batch retries of transient
    errors included), and measure its calls and time per item. **This calls the real API.** Nothing is written:
    the results are thrown away, and rate limits are paced in this process alone (``handler.Pacer``)."""
    from slurmctl.errors import Backoff, ErrorPolicy, acall_with_retries, call_with_retries
    from slurmctl.handler import BatchContext, Pacer, handler_for, is_async

    handler = handler_for(cfg.handler, cfg.params)
    items = first_items(cfg, store, n)
    ctx = BatchContext(cfg.job_id, "sample", params=cfg.params,
                       limiters={name: Pacer(limit.per_second) for name, limit in cfg.rate_limits.items()})
    async_handler = ctx.async_handler = is_async(handler)
    e = cfg.errors
    policy, backoff = ErrorPolicy.of(e), Backoff.of(e)
    calls = 0
    errors: Counter = Counter()

    def call(item: dict[str, Any]) -> Any:
        nonlocal calls
        calls += 1
        return handler(item, ctx)

    t0 = time.perf_counter()
    if async_handler:  # one item at a time, on this process's item loop (where a class handler's clients live)
        from slurmctl.inflight import worker_loop

        async def run_all() -> None:
            for item in items:
                outcome = await acall_with_retries(lambda item=item: call(item), policy, backoff, e.max_attempts)
                if not outcome.ok:
                    errors[outcome.error.error_class] += 1

        worker_loop().run(run_all())
    else:
        for item in items:
            outcome = call_with_retries(lambda item=item: call(item), policy, backoff, e.max_attempts)
            if not outcome.ok:
                errors[outcome.error.error_class] += 1
    seconds = max(0.0, time.perf_counter() - t0 - ctx.limiter_blocked_s)
    return Sample(items=len(items), calls=calls, seconds=seconds, errors=errors)


@dataclass(frozen=True)
class Projection:
    """What a job is projected to spend, and on what basis (for the messages)."""

    items: ItemCount
    spend: Spend
    calls_basis: str | None = None
    seconds_basis: str | None = None

    def as_dict(self, budget: BudgetConfig) -> dict[str, Any]:
        return {"items": self.items.items, "items_exact": self.items.exact, "api_calls": self.spend.api_calls,
                "core_hours": self.spend.core_hours, "usd": self.spend.usd(budget), "calls_basis": self.calls_basis,
                "seconds_basis": self.seconds_basis}


def project(cfg: JobConfig, items: ItemCount, sample: Sample | None = None) -> Projection:
    """API calls and core-hours for ``items`` at the sample's measured rates, else the config's declared ones (None
    where neither says). Core-hours are a floor: workers starting, waiting and idle at the end add to them."""
    b = cfg.budget
    per_call, calls_basis = b.calls_per_item, "budget.calls_per_item"
    per_second, seconds_basis = b.core_seconds_per_item, "budget.core_seconds_per_item"
    if sample is not None and sample.items:
        per_call, calls_basis = sample.calls_per_item, f"measured by --sample {sample.items}"
        per_second, seconds_basis = sample.seconds_per_item, f"measured by --sample {sample.items}"
    return Projection(items, Spend(
        api_calls=None if per_call is None else items.items * per_call,
        core_hours=None if per_second is None else items.items * per_second / 3600),
        calls_basis if per_call is not None else None, seconds_basis if per_second is not None else None)


def projection_problems(cfg: JobConfig, projection: Projection) -> list[tuple[str, str]]:
    """``(field, message)`` for each limit the projection reaches ``ADMIT_SHARE`` of: the numbers, and what to do."""
    b = cfg.budget
    problems = []
    n = projection.items
    about = "" if n.exact else "about "
    for key, limit in b.limits.items():
        value = projection.spend.of(key, b)
        if value is None or value < ADMIT_SHARE * limit:
            continue
        if key == "max_api_calls":
            how = (f"{about}{n.items:,} items ({n.how}) x {value / max(n.items, 1):.3g} calls per item "
                   f"({projection.calls_basis})")
        elif key == "max_core_hours":
            how = (f"{about}{n.items:,} items ({n.how}) x {value * 3600 / max(n.items, 1):.3g} core-seconds per "
                   f"item ({projection.seconds_basis})")
        else:
            how = " + ".join(part for part in (
                projection.spend.api_calls is not None and b.usd_per_api_call is not None
                and f"{fmt('max_api_calls', projection.spend.api_calls)} calls x ${b.usd_per_api_call:g}",
                projection.spend.core_hours is not None and b.usd_per_core_hour is not None
                and f"{fmt('max_core_hours', projection.spend.core_hours)} core-hours x ${b.usd_per_core_hour:g}")
                if part)
        per_item = value / max(n.items, 1)
        fewer = _most_items(ADMIT_SHARE * limit, per_item) if per_item else n.items
        problems.append((f"budget.{key}", (
            f"the job is projected to use {fmt(key, value)} {WHAT[key]} ({how}), {100 * value / limit:.0f} % of "
            f"{key} {fmt(key, limit)}; submit refuses at {100 * ADMIT_SHARE:.0f} %. Raise budget.{key} above "
            f"{fmt(key, value / ADMIT_SHARE)}, or submit at most {max(fewer, 0):,} items")))
    return problems


def _most_items(bound: float, per_item: float) -> int:
    """The most items whose projection stays below ``bound`` (exact at the boundary, whatever floats do)."""
    n = max(0, math.ceil(bound / per_item) - 1)
    while (n + 1) * per_item < bound:
        n += 1
    while n > 0 and n * per_item >= bound:
        n -= 1
    return n


def admission_problems(cfg: JobConfig, store: Any, sample: Sample | None = None) -> tuple[list[tuple[str, str]],
                                                                                           Projection | None]:
    """The budget's admission check: the problems (empty: admitted) and the projection (None when the config has
    no limit or nothing to project from: the job is then admitted on the runtime guard alone)."""
    b = cfg.budget
    if not b.limits:
        return [], None
    if sample is None and b.calls_per_item is None and b.core_seconds_per_item is None:
        return [], None
    try:
        items = count_items(cfg, store)
    except Exception as exc:  # an input that cannot be read is preflight's to report; this only says why
        return [("budget", f"cannot count the input's items to project the budget: {type(exc).__name__}: {exc}")], None
    projection = project(cfg, items, sample)
    return projection_problems(cfg, projection), projection


def projection_note(cfg: JobConfig, projection: dict[str, Any] | None) -> str:
    """One line for ``submit``: the projection (``Projection.as_dict``, as the job manifest keeps it) against the
    limits, or why there is none."""
    b = cfg.budget
    if not b.limits:
        return ""
    if projection is None:
        return ("budget: no projection (set budget.calls_per_item or core_seconds_per_item, or measure with "
                "--sample N): the job pauses itself when it reaches a limit")
    spend = Spend(api_calls=projection["api_calls"], core_hours=projection["core_hours"])
    parts = []
    for key, limit in b.limits.items():
        value = spend.of(key, b)
        parts.append(f"{key} {fmt(key, limit)}: projected {fmt(key, value)}"
                     + (f" ({100 * value / limit:.0f} %)" if value is not None else ""))
    about = "" if projection.get("items_exact", True) else "about "
    return (f"budget: {about}{projection['items']:,} items; " + "; ".join(parts)
            + "; the job pauses itself if it reaches a limit")


# --- raising the budget (resume) -------------------------------------------------------------------------------
def parse_raises(pairs: list[str]) -> dict[str, float | None]:
    """``["max_api_calls=2000", "max_usd=none"]`` -> ``{"max_api_calls": 2000, "max_usd": None}`` (``none``
    removes a limit). Raises ``ValueError`` naming what is wrong."""
    out: dict[str, float | None] = {}
    for pair in pairs:
        for part in filter(None, (p.strip() for p in pair.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if key not in BUDGET_LIMITS or not sep:
                raise ValueError(f"--raise-budget {part!r}: expected KEY=VALUE with KEY one of "
                                 f"{', '.join(BUDGET_LIMITS)} (VALUE a number, or none to remove the limit)")
            if value.strip().lower() == "none":
                out[key] = None
                continue
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"--raise-budget {part!r}: {value!r} is not a number (or none)") from None
            if not number > 0 or math.isinf(number) or math.isnan(number):
                raise ValueError(f"--raise-budget {part!r}: must be > 0 (or none to remove the limit)")
            out[key] = int(number) if key == "max_api_calls" and number == int(number) else number
    if not out:
        raise ValueError("--raise-budget: give KEY=VALUE, e.g. --raise-budget max_api_calls=2000")
    return out


def raise_budget(job: Any, changes: dict[str, float | None], by: str) -> dict[str, Any]:
    """The job manifest's config with the new limits, after checking them: valid as a config's ``budget`` and above
    what the job already spent (else it would pause again at once). Records the change in ``budget_changes``.
    Raises ``ValueError`` with what to do."""
    from slurmctl.books.manifests import now
    from slurmctl.config import ConfigError, parse_config

    old = dict(job.config.get("budget") or {})
    new = {**old, **changes}
    try:
        budget = parse_config({**job.config, "budget": new}).budget
    except ConfigError as exc:
        raise ValueError("--raise-budget: " + "; ".join(f"{f}: {m}" for f, m in exc.errors)) from None
    spend = spent(job)
    still = reached(budget, spend)
    if still:  # it would pause again at once
        raise ValueError("--raise-budget: " + "; ".join(
            f"{h.key} {fmt(h.key, h.limit)} is not above what the job already spent ({fmt(h.key, h.used)} "
            f"{WHAT[h.key]}): raise it to more than that" for h in still))
    job.budget_changes = [*job.budget_changes, {"at": now(), "by": by, "changes": {
        k: {"from": old.get(k), "to": v} for k, v in changes.items()}}]
    return {**job.config, "budget": budget.model_dump(exclude_none=True)}


def who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in a container: the uid says enough
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"
