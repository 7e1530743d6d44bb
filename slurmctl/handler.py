"""Loading a user's handler and the ``ctx`` it receives.

A handler is plain Python, in one of four forms, and knows nothing of Prefect, Dask or AWS:

* a function, ``def handle(item: dict, ctx) -> dict | list[dict] | None``;
* a coroutine function, ``async def handle(item, ctx)``: a worker process keeps many items in flight on one event
  loop (``concurrency: auto`` by default), spending rate limits with ``async with ctx.limit("api")``;
* a class, ``handler: mypkg.geo:Geocoder``: built once per worker process as ``Geocoder(params)`` (the job's
  ``params``), called per item (``__call__(item, ctx)``, sync or async), closed when the worker stops (``close()`` or
  ``aclose()``), so an HTTP session, a client pool or a model is built once and shared by every item.

A user unit-tests any of them with ``BatchContext(job_id="t", batch_id="b")`` (``call_once`` runs an async one);
such a context, built without ``limiters``, lets ``ctx.limit`` of any name through at once (``Pacer``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import hashlib
import importlib
import inspect
import json
import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

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
    if inspect.isclass(func):
        _check_signature(spec, func, (None,), f"class {func_name} must be built as {func_name}(params)")
        method = next((m for m in ("__call__", BATCH_METHOD) if any(m in vars(c) for c in func.__mro__[:-1])), None)
        if method is None:
            raise HandlerError(f"handler {spec!r}: class {func_name} must define __call__(self, item, ctx) or "
                               f"{BATCH_METHOD}(self, batch, ctx)")
        _check_signature(spec, getattr(func, method), (None, None, None),
                         f"{func_name}.{method} must accept (self, {'batch' if method == BATCH_METHOD else 'item'}, "
                         f"ctx)")
        _refuse_async_generator(spec, getattr(func, method), f"{func_name}.{method}")
    else:
        _check_signature(spec, func, (None, None), "must accept two arguments (item, ctx)")
        _refuse_async_generator(spec, func, func_name)
    return func


def _refuse_async_generator(spec: str, func: Any, name: str) -> None:
    """An ``async def`` that yields returns an async generator, which neither path of a worker runs: the sync one
    would fail every item with "'async_generator' object is not iterable", the async one awaits a coroutine. Said
    at submit, naming what to write instead."""
    try:
        agen = inspect.isasyncgenfunction(inspect.unwrap(func))
    except ValueError:  # a cycle of __wrapped__
        agen = False
    if agen:
        raise HandlerError(f"handler {spec!r}: {name} is an async generator (`async def` with `yield`), which slurmctl "
                           f"does not run: collect the rows and return them (a list of dicts) from the `async def`, "
                           f"or drop `async` to yield them from a sync generator")


def _check_signature(spec: str, func: Any, args: tuple[None, ...], what: str) -> None:
    try:
        inspect.signature(func).bind(*args)
    except TypeError:
        raise HandlerError(f"handler {spec!r}: {what}") from None
    except ValueError:
        pass  # builtins without signatures: trust them


BATCH_METHOD = "handle_batch"


def is_batch_spec(spec: str) -> bool:
    """Does ``spec`` name a batch handler: a function named ``handle_batch``, or a class with that method? (The
    config's ``handler_mode`` decides when set.)"""
    target = _loaded(spec)
    if inspect.isclass(target):
        return hasattr(target, BATCH_METHOD)
    return getattr(target, "__name__", "") == BATCH_METHOD


def batch_callable(handler: Any) -> Any:
    """What a batch is handed to: an instance's ``handle_batch`` method, else the handler itself."""
    return getattr(handler, BATCH_METHOD, handler)


def _coroutine_function(func: Any) -> bool:
    """``async def``, also behind decorators that say what they wrap (``functools.wraps`` sets ``__wrapped__``): a
    sync wrapper that returns its async function's coroutine is async to call."""
    if inspect.iscoroutinefunction(func):
        return True
    try:
        return inspect.iscoroutinefunction(inspect.unwrap(func))
    except ValueError:  # a cycle of __wrapped__
        return False


def is_async(handler: Any) -> bool:
    """Does calling ``handler`` (a function, or an instance of a handler class) return a coroutine?"""
    if _coroutine_function(handler):
        return True
    call = getattr(type(handler), "__call__", None) if not inspect.isfunction(handler) else None
    return call is not None and _coroutine_function(call)


def is_async_spec(spec: str) -> bool:
    """Is the handler ``spec`` names async (a coroutine function, or a class whose ``__call__`` is one)? Answered
    from the code, without building a class handler (the coordinator asks; only workers build)."""
    target = _loaded(spec)
    if inspect.isclass(target):
        return _coroutine_function(getattr(target, "__call__", None))
    return _coroutine_function(target)


# --- worker-scoped handler instances -----------------------------------------------------------------------------
_instances: dict[tuple[str, str], Any] = {}
_instances_lock = threading.Lock()


def handler_for(spec: str, params: dict[str, Any] | None = None) -> Handler:
    """The callable a worker process calls per item: the function ``spec`` names, or the one instance of the class it
    names, built on first use as ``Cls(params)`` and kept until ``close_handlers`` (the worker stops). Built under a
    lock, so the threads of one worker never build two."""
    target = _loaded(spec)
    if not inspect.isclass(target):
        return target
    key = (spec, json.dumps(params or {}, sort_keys=True, default=str))
    with _instances_lock:
        instance = _instances.get(key)
        if instance is None:
            instance = _instances[key] = target(dict(params or {}))
            if len(_instances) == 1:
                atexit.register(close_handlers)
        return instance


@functools.lru_cache(maxsize=16)
def _loaded(spec: str) -> Any:
    return load_handler(spec)  # one import (and check) per worker process, not one per batch


def close_handlers(run: Callable[[Any], Any] | None = None) -> int:
    """Close every handler instance this process built (``aclose()`` awaited, else ``close()``), once each; return how
    many were closed. ``run`` runs a coroutine to completion (the worker's event loop); by default the loop
    ``call_once`` ran this thread's calls on, which an instance's async clients are bound to (then closed). Called
    when a Dask worker stops (``slurmctl.flows.worker_plugin``) and at interpreter exit; a close that raises is
    logged, never raised, so the others are closed too."""
    with _instances_lock:
        instances = list(_instances.values())
        _instances.clear()
    closed = 0
    try:
        for instance in instances:
            try:
                aclose, close = getattr(instance, "aclose", None), getattr(instance, "close", None)
                if callable(aclose):
                    (run or _run_on_calls_loop)(aclose())
                elif callable(close):
                    result = close()
                    if inspect.isawaitable(result):
                        (run or _run_on_calls_loop)(result)
                else:
                    continue
                closed += 1
            except Exception:
                logging.getLogger("slurmctl.handler").exception("closing handler %r failed", instance)
    finally:
        if run is None:
            _close_calls_loop()
    return closed


# ``call_once``'s event loop, one per thread and kept between calls, as a worker keeps its loop: an instance's async
# client (httpx binds its connections to the loop that opened them) serves every call, and its ``aclose``.
_calls = threading.local()


def _run_on_calls_loop(awaitable: Any) -> Any:
    loop = getattr(_calls, "loop", None)
    if loop is None or loop.is_closed():
        loop = _calls.loop = asyncio.new_event_loop()
    return loop.run_until_complete(awaitable)


def _close_calls_loop() -> None:
    loop = getattr(_calls, "loop", None)
    if loop is not None and not loop.is_closed():
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    _calls.loop = None


def call_once(handler: Handler, item: dict[str, Any], ctx: "BatchContext") -> Any:
    """Call a handler of any form on one item and return what it returned: an async one runs to completion on this
    thread's event loop for such calls, kept between them (so one instance's clients serve many calls) until
    ``close_handlers``. For unit tests and samples; a worker keeps many items in flight instead."""
    result = handler(item, ctx)
    if inspect.isawaitable(result):
        ctx.async_handler = True  # before its body runs: a sync ``with ctx.limit`` there fails as in a worker
        return _run_on_calls_loop(result)
    return result


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
        self._any_limit = limiters is None  # a unit test's context: any limit name, not paced (a job's names them)
        # True while an async handler's items use this context: a sync ``with ctx.limit`` on their event loop would
        # block every other item of the worker (set by whoever runs them: ``ItemRun``, ``call_once``, a sample)
        self.async_handler = False
        self.limiter_blocked_s = 0.0  # time spent in ``limit`` acquiring tokens, summed over the batch's items
        # wall time during which at least one of the batch's items was acquiring tokens (the batch's tokens_waited_s:
        # the same as the sum when items run one at a time, at most the batch's duration when many are in flight)
        self.limiter_waiting_s = 0.0
        self._waiting, self._waiting_since = 0, 0.0
        self.observer: Any = None  # the worker's concurrency control, told of token waits and of slots passed unused
        self._lock = threading.Lock()  # items of a sync handler with ``concurrency: N`` count from N threads
        self.failed: dict[Any, tuple[BaseException | str, str | None]] = {}  # a batch handler's ``fail`` calls

    def limit(self, name: str, tokens: int = 1) -> "_Limit":
        """Wrap one request (``tokens`` for several) to an API whose limit the job config declares:
        ``with ctx.limit("api"):`` in a sync handler, ``async with ctx.limit("api"):`` in an async one.

        Waits until this worker's share of the job-wide rate allows it (and while the job is paused); an async
        handler's wait blocks no other item. When the request raises a throttling error (HTTP 429, AWS throttling),
        the shared rate backs off for every worker. What the limiter cost this batch lands in its metrics as
        ``ratelimit_<name>_<counter>``: tokens, wait_s, throttled, late_ms_max (how late after its slot a token was
        handed out: the jitter this side adds), and (when not zero) backend_calls, expired (slots passed unused),
        late (those of them whose caller came later than the allowance: a busy worker), paused_s, signal_errors,
        throttle_report_errors.
        """
        leaser = self.limiters.get(name)
        if leaser is None and self._any_limit:
            leaser = self.limiters.setdefault(name, Pacer())
        if leaser is None:
            raise KeyError(f"no rate limit {name!r}: declare it in the job config under rate_limits "
                           f"(declared: {', '.join(self.limiters) or 'none'})")
        return _Limit(self, name, leaser, tokens)

    def limit_slots(self) -> dict[str, tuple[int, int, float]]:
        """Per declared limit, the slots this batch's calls took or let pass late: ``{name: (late, slots,
        allowance_ms)}``. A late slot passed unused because its caller came later than the allowance: a worker too
        busy to keep the limit's pace (its event loop or threads behind, its core shared) loses it."""
        out = {}
        for name, leaser in self.limiters.items():
            late = int(self.metrics.get(f"ratelimit_{name}_late", 0))
            out[name] = (late, late + int(self.metrics.get(f"ratelimit_{name}_tokens", 0)),
                         getattr(leaser, "late_us", 0) / 1000)
        return out

    def _wait_begins(self) -> None:
        """An item starts waiting for tokens: counted for the batch, and told to the concurrency control, which
        judges the calls in progress at the API as those in flight less those waiting here."""
        with self._lock:
            if self._waiting == 0:
                self._waiting_since = time.perf_counter()
            self._waiting += 1
        if self.observer is not None:
            self.observer.waiting(1)

    def _wait_ends(self, costs: Counter[str]) -> None:
        with self._lock:
            self._waiting -= 1
            if self._waiting == 0:
                self.limiter_waiting_s += time.perf_counter() - self._waiting_since
        if self.observer is not None:
            self.observer.waiting(-1)
            if costs.get("expired"):
                self.observer.expired(int(costs["expired"]))  # slots passed with nobody ready for them

    def _acquired(self, name: str, tokens: int, waited: float, blocked_s: float, costs: Counter[str]) -> None:
        cell = call_blocked.get()
        if cell is not None:
            cell[0] += blocked_s
        with self._lock:
            self.limiter_blocked_s += blocked_s
            self.metrics[f"ratelimit_{name}_tokens"] += tokens
            self.metrics[f"ratelimit_{name}_wait_s"] += waited
        self._add_costs(name, costs)

    def _throttled(self, name: str, exc: BaseException) -> Any:
        """The classified error when ``exc`` says the API throttled (counted), else None."""
        if not isinstance(exc, Exception):
            return None
        from slurmctl.errors import ErrorPolicy

        err = ErrorPolicy().classify(exc)
        if err.error_class != "throttle":
            return None
        self.count(f"ratelimit_{name}_throttled")  # the concurrency control hears of it from the item's retries
        return err

    def _add_costs(self, name: str, costs: Counter[str]) -> None:
        with self._lock:
            for counter, value in costs.items():
                key = f"ratelimit_{name}_{counter}"
                if counter.endswith("_max"):
                    self.metrics[key] = max(self.metrics[key], value)
                else:
                    self.metrics[key] += value

    def fail(self, item_id: Any, error: BaseException | str, error_class: str | None = None) -> None:
        """A batch handler's way to fail one item of its batch (the others keep their rows): ``error`` an exception
        (classified as a raised one would be) or a message; ``error_class`` overrides the class."""
        self.failed[item_id] = (error, error_class)

    def count(self, name: str, n: float = 1) -> None:
        """Add ``n`` to the counter ``name``; counters land in the batch's task manifest ``metrics``. Safe from the
        threads of a sync handler run with ``concurrency: N``."""
        with self._lock:
            self.metrics[name] += n


# The time one handler call spent blocked in ``ctx.limit`` (``BatchMeter`` takes it out of that call's latency):
# a cell per call, since the items of a batch may be in flight together.
call_blocked: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("slurmctl_call_blocked",
                                                                                  default=None)

# One thread per limiter does for async callers what needs the backend or may block (renewals, the signal, a pause,
# waiting for lanes that are all taken): the event loop never blocks, and any number of items can wait for tokens.
_dispensers: dict[int, Any] = {}
_dispensers_lock = threading.Lock()


def _dispenser(leaser: Any) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    with _dispensers_lock:
        pool = _dispensers.get(id(leaser))
        if pool is None:
            pool = _dispensers[id(leaser)] = ThreadPoolExecutor(1, thread_name_prefix="slurmctl-tokens")
        return pool


def _loop_running() -> bool:
    """Is an event loop running in this thread (an async handler's code, not a thread it handed work to)?"""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Pacer:
    """A rate limit paced in this process alone, for a handler run outside a job's workers: ``submit --sample`` (at
    the limit's ``per_second``: the job's shared limiter may not exist yet, and a sample is a few calls) and unit
    tests (``BatchContext`` built without ``limiters``: no pace). ``ctx.limit`` takes its tokens with ``acquire``
    in a sync handler and ``acquire_async`` (an async sleep) in an async one."""

    def __init__(self, per_second: float | None = None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = time.monotonic()
        self._lock = threading.Lock()

    def _take(self, tokens: int) -> float:
        """The wait before ``tokens`` may be spent, and the slot after them booked."""
        with self._lock:
            now = time.monotonic()
            wait = max(0.0, self.next - now)
            self.next = max(self.next, now) + tokens * self.interval
            return wait

    def acquire(self, tokens: int = 1, tally: Any = None) -> float:
        wait = self._take(tokens)
        time.sleep(wait)
        return wait

    async def acquire_async(self, tokens: int = 1, tally: Any = None) -> float:
        wait = self._take(tokens)
        await asyncio.sleep(wait)
        return wait

    def throttled(self, retry_after: float | None = None, tally: Any = None) -> None:
        if self.interval:  # a paced limit waits out the API's Retry-After; a unit test's does not wait
            with self._lock:
                self.next = max(self.next, time.monotonic() + min(retry_after or 1.0, 30.0))


class _Limit:
    """``ctx.limit(name)``: a context manager for sync handlers and an async one for async handlers."""

    def __init__(self, ctx: BatchContext, name: str, leaser: Any, tokens: int):
        self.ctx, self.name, self.leaser, self.tokens = ctx, name, leaser, tokens

    def __enter__(self) -> None:
        if self.ctx.async_handler and _loop_running():
            raise TypeError(f"ctx.limit({self.name!r}) is entered with `with` in an async handler: waiting for its "
                            f"tokens would block the event loop, and with it every other item of the worker. Use "
                            f"`async with ctx.limit({self.name!r}):` (README, \"Many calls in flight\")")
        costs: Counter[str] = Counter()
        blocked = time.perf_counter()
        waited, got = 0.0, 0
        self.ctx._wait_begins()
        try:
            waited, got = self.leaser.acquire(self.tokens, tally=costs), self.tokens
        finally:
            self.ctx._wait_ends(costs)
            self.ctx._acquired(self.name, got, waited, time.perf_counter() - blocked, costs)
        self._offer()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        err = self.ctx._throttled(self.name, exc)
        if err is not None:
            costs: Counter[str] = Counter()
            self.leaser.throttled(err.retry_after, tally=costs)  # never raises: the API's error is what we raise
            self.ctx._add_costs(self.name, costs)

    async def __aenter__(self) -> None:
        costs: Counter[str] = Counter()
        blocked = time.perf_counter()
        waited, got = 0.0, 0
        self.ctx._wait_begins()
        try:
            waited = await self._tokens(costs)
            got = self.tokens
        finally:
            self.ctx._wait_ends(costs)
            self.ctx._acquired(self.name, got, waited, time.perf_counter() - blocked, costs)
        self._offer()

    def _offer(self) -> None:
        """Tell the concurrency control what rate this limit offers the process: with the latency it measures,
        Little's law gives the calls in flight that spend it (one dict write: safe from a handler's thread)."""
        observer, offer = self.ctx.observer, getattr(self.leaser, "offer_per_s", None)
        if observer is not None and offer is not None:
            observer.offered(self.name, offer(), getattr(self.leaser, "even_offer_per_s", offer)())

    RESERVE_AHEAD_S = 0.5  # a slot further ahead is reserved by the dispenser thread, which renews and reads signals
    SIGNAL_CHECK_S = 0.25  # a caller asleep until its slot wakes this often to let a due signal be read

    async def _tokens(self, costs: Counter[str]) -> float:
        """Wait for our tokens on the loop: reserve a slot, sleep until it, claim it right before the request
        (``Leaser.reserve``). Whatever needs the backend (a renewal, the signal, a pause, lanes that are all taken)
        runs in this leaser's dispenser thread, which reserves the slot and leaves the waiting to the loop; a pause
        or rate change signalled meanwhile voids the slot at its claim."""
        if isinstance(self.leaser, Pacer):
            return await self.leaser.acquire_async(self.tokens)
        loop = asyncio.get_running_loop()
        leaser, caller = self.leaser, id(loop)
        waited, got = 0.0, 0
        while got < self.tokens:
            slot = leaser.reserve(self.RESERVE_AHEAD_S, caller, tally=costs)
            if slot is None:
                slot = await loop.run_in_executor(_dispenser(leaser), lambda: leaser.reserve_wait(caller, tally=costs))
            slot_us, lane, epoch = slot
            start = time.monotonic()
            while (delay := (slot_us - leaser.clock()) / 1_000_000) > 0:
                await asyncio.sleep(min(delay, self.SIGNAL_CHECK_S))
                if leaser.signal_due() and leaser.clock() < slot_us:
                    await loop.run_in_executor(_dispenser(leaser), leaser.check_signal)
                    if leaser.epoch != epoch:
                        break  # a pause, a rate change or throttling: the slot is void
            slept = time.monotonic() - start
            waited += slept
            if leaser.claim(slot_us, lane, epoch, slept, tally=costs):
                got += 1
            else:
                leaser.unclaimed(caller)
        return waited

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        err = self.ctx._throttled(self.name, exc)
        if err is not None:  # reported from a thread: the leaser's lock may be held by a caller waiting for a slot
            costs: Counter[str] = Counter()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.leaser.throttled(err.retry_after, tally=costs))
            self.ctx._add_costs(self.name, costs)


def returned_id_column(id_field: str) -> str:
    """Where an output row keeps the id its handler returned when that differs from its input item's id."""
    return f"handler_{id_field}"


def same_id(returned: Any, item_id: Any) -> bool:
    """The handler returned its item's own id (perhaps written differently: ``7`` for the CSV text ``"7"``)."""
    if returned == item_id and type(returned) is type(item_id):
        return True
    return (isinstance(returned, (str, int)) and not isinstance(returned, bool)
            and isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and str(returned) == str(item_id))


_ABSENT = object()


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
    item_id = item[id_field]
    if type(result) is dict and result.get(id_field, _ABSENT) is item_id:
        return [result]  # the common case, decided at once: one row carrying the item's own id
    if inspect.isawaitable(result):  # a sync call returned one: the handler is async, and nothing said so
        if inspect.iscoroutine(result):
            result.close()  # never awaited: no "coroutine was never awaited" warning on top of this error
        raise TypeError("handler returned an awaitable where a sync handler returns rows: make it `async def` (a "
                        "decorator around an async handler must be `async def` too, or use functools.wraps)")
    rows = [result] if isinstance(result, dict) else list(result)
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
