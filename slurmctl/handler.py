"""Loading a user's handler and the ``ctx`` it receives.

A handler is plain Python: ``def handle(item: dict, ctx) -> dict | list[dict] | None``. It knows nothing of Prefect,
Dask or AWS, so a user unit-tests it with ``BatchContext(job_id="t", batch_id="b")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

Handler = Callable[[dict[str, Any], "BatchContext"], Any]


class HandlerError(ValueError):
    """The handler spec cannot be turned into a callable; the message says what to fix."""


#: Where slurmctl's own handlers lived before they became subpackages of the one ``slurmctl`` package (0.1). Jobs
#: submitted then name them so; a new config that does gets an error naming the new module.
RENAMED_MODULES = {"handlers.echo": "slurmctl.handlers.echo", "handlers.http_json": "slurmctl.handlers.http_json"}


def renamed(spec: str) -> str | None:
    """The current name of a handler that ``spec`` names by its 0.1 module path, or None.

    A user's own ``handlers`` package with an ``echo.py`` on the import path is theirs, not ours renamed; a folder
    holding our own file (a checkout of slurmctl, whose top-level ``handlers/`` is mapped to ``slurmctl.handlers``)
    is ours. Decided from the file system, without importing user code (``status`` reads manifests only).
    """
    module_name, _, func_name = spec.partition(":")
    new = RENAMED_MODULES.get(module_name)
    if new is None:
        return None
    ours = Path(__file__).resolve().parent.parent / "handlers"  # slurmctl.handlers' folder in a checkout
    relative = Path(*module_name.split("."))
    for entry in [str(Path.cwd()), *sys.path]:
        root = Path(entry or ".")
        for candidate in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
            if candidate.is_file() and candidate.resolve().parent != ours:
                return None
    return f"{new}:{func_name}"


def ensure_import_path(paths: list[str] | None = None) -> None:
    """Put the working directory (and any extra paths) on ``sys.path`` so ``handlers.x`` imports as documented."""
    for p in [str(Path.cwd()), *(paths or [])]:
        if p not in sys.path:
            sys.path.insert(0, p)


def load_handler(spec: str) -> Handler:
    """Import ``module:function`` and check it can take ``(item, ctx)``."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise HandlerError(f"handler {spec!r}: must be 'module:function', e.g. slurmctl.handlers.echo:handle")
    new = renamed(spec)
    if new is not None:
        raise HandlerError(f"handler {spec!r}: slurmctl's handlers are modules of the slurmctl package since 0.2; "
                           f"write handler: {new}")
    ensure_import_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise HandlerError(f"handler {spec!r}: cannot import module {module_name!r} ({exc}); run from the "
                           f"directory that contains it or add it to PYTHONPATH") from None
    except Exception as exc:  # the module itself is broken: show why
        raise HandlerError(f"handler {spec!r}: importing {module_name!r} raised "
                           f"{type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise HandlerError(f"handler {spec!r}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise HandlerError(f"handler {spec!r}: {func_name!r} is not callable")
    try:
        inspect.signature(func).bind(None, None)
    except TypeError:
        raise HandlerError(f"handler {spec!r}: must accept two arguments (item, ctx)") from None
    except ValueError:
        pass  # builtins without signatures: trust them
    return func


def handler_version(spec: str) -> str:
    """Identity of the handler's code: its module's source hash (or ``__version__``), for cache keys."""
    func = load_handler(spec)
    module = inspect.getmodule(func)
    version = getattr(module, "__version__", None)
    if version:
        return f"{spec}@{version}"
    try:
        source = inspect.getsource(module) if module else spec
    except (OSError, TypeError):
        source = spec
    return f"{spec}@sha256:{hashlib.sha256(source.encode()).hexdigest()[:16]}"


class BatchContext:
    """What a handler sees besides the item: identity, a logger, counters, free-form params, rate limits."""

    def __init__(self, job_id: str, batch_id: str, *, params: dict[str, Any] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter | None = None, limiters: dict[str, Any] | None = None):
        self.job_id = job_id
        self.batch_id = batch_id
        self.params = dict(params or {})
        self.logger = logger or logging.getLogger(f"slurmctl.handler.{job_id}")
        self.metrics: Counter[str] = Counter()
        self.limiters = dict(limiters or {})
        self.limiter_blocked_s = 0.0  # wall time spent in ``limit`` acquiring tokens (the batch's tokens_waited_s)

    @contextlib.contextmanager
    def limit(self, name: str, tokens: int = 1) -> Iterator[None]:
        """Wrap one request (``tokens`` for several) to an API whose limit the job config declares.

        Blocks until this worker's share of the job-wide rate allows it (and while the job is paused). When the
        request raises a throttling error (HTTP 429, AWS throttling), the shared rate backs off for every worker.
        What the limiter cost this batch lands in its metrics as ``ratelimit_<name>_<counter>``: tokens, wait_s,
        throttled, late_ms_max (how late after its slot a token was handed out: the jitter this side adds), and (when
        not zero) backend_calls, expired, paused_s, signal_errors, throttle_report_errors.
        """
        leaser = self.limiters.get(name)
        if leaser is None:
            raise KeyError(f"no rate limit {name!r}: declare it in the job config under rate_limits "
                           f"(declared: {', '.join(self.limiters) or 'none'})")
        costs: Counter[str] = Counter()
        blocked = time.perf_counter()
        try:
            waited = leaser.acquire(tokens, tally=costs)
        finally:
            self.limiter_blocked_s += time.perf_counter() - blocked
            self._add_costs(name, costs)
        self.metrics[f"ratelimit_{name}_tokens"] += tokens
        self.metrics[f"ratelimit_{name}_wait_s"] += waited
        try:
            yield
        except Exception as exc:
            from slurmctl.errors import ErrorPolicy

            err = ErrorPolicy().classify(exc)
            if err.error_class == "throttle":
                self.metrics[f"ratelimit_{name}_throttled"] += 1
                costs = Counter()
                leaser.throttled(err.retry_after, tally=costs)  # never raises: the API's error is what we raise
                self._add_costs(name, costs)
            raise

    def _add_costs(self, name: str, costs: Counter[str]) -> None:
        for counter, value in costs.items():
            key = f"ratelimit_{name}_{counter}"
            if counter.endswith("_max"):
                self.metrics[key] = max(self.metrics[key], value)
            else:
                self.metrics[key] += value

    def count(self, name: str, n: float = 1) -> None:
        """Add ``n`` to the counter ``name``; counters land in the batch's task manifest ``metrics``."""
        self.metrics[name] += n


def returned_id_column(id_field: str) -> str:
    """Where an output row keeps the id its handler returned when that differs from its input item's id."""
    return f"handler_{id_field}"


def same_id(returned: Any, item_id: Any) -> bool:
    """The handler returned its item's own id (perhaps written differently: ``7`` for the CSV text ``"7"``)."""
    if returned == item_id and type(returned) is type(item_id):
        return True
    return (isinstance(returned, (str, int)) and not isinstance(returned, bool)
            and isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and str(returned) == str(item_id))


def normalise_output(result: Any, item: dict[str, Any], id_field: str) -> list[dict[str, Any]]:
    """A handler's return value as output rows, each carrying its input item's id in ``id_field``.

    Identity is the input item's, never what a handler returns: the output, its deduplication and its books are
    keyed by the item. A row without ``id_field`` gets the item's id. A row whose ``id_field`` is another value (an
    API answering with its own record id, a place shared by many users) keeps that value under
    ``handler_<id_field>`` and gets the item's id in ``id_field``; a handler that returns both is refused (the item
    fails with class ``handler``), since one of them would be lost. The same id written differently (``7`` for the
    item's ``"7"``) is the item's id, written as the input wrote it.
    """
    if result is None:
        return []
    rows = [result] if isinstance(result, dict) else list(result)
    item_id = item[id_field]
    returned_col = returned_id_column(id_field)
    out = []
    for row in rows:
        if not isinstance(row, dict):
            raise TypeError(f"handler must return a dict, a list of dicts or None, got {type(row).__name__}")
        if id_field not in row:
            row = {id_field: item_id, **row}
        elif not same_id(row[id_field], item_id):
            if returned_col in row:
                raise TypeError(f"handler returned {id_field}={row[id_field]!r} for item {item_id!r} and a "
                                f"{returned_col!r} column too: the output keeps the item's id in {id_field!r} and "
                                f"a differing returned id in {returned_col!r}, so rename one of yours")
            row = {id_field: item_id, returned_col: row[id_field],
                   **{k: v for k, v in row.items() if k != id_field}}
        elif row[id_field] is not item_id and type(row[id_field]) is not type(item_id):
            row = {**row, id_field: item_id}
        out.append(row)
    return out
