"""Handlers the tests run as real jobs. Plain Python; behaviour is driven by the job's ``params``.

``calls_file``: every call appends ``<pid> <item id>`` to it (O_APPEND: safe across worker processes), so tests count
handler calls across coordinators, workers and Slurm jobs. ``sleep_s`` slows each item down so tests can kill
things mid-run. ``fail`` (or the JSON file ``fail_file``, re-read on every call): ``{id: error_class}`` raises an
``ItemError`` of that class for those ids.

Two params pin down *when* something happens, so tests wait for a condition instead of guessing a moment:

* ``stall_once: {id, marker, seconds}``: the first call for item ``id`` (in any process) creates the file ``marker``
  holding its pid, then sleeps ``seconds`` inside the handler; later calls for that id go on at once. A test waits
  for the marker and knows which process is mid-batch, in which batch.
* ``hold: {id, marker, release}``: the first call for item ``id`` creates ``marker`` (holding its pid) and waits
  inside the handler until the file ``release`` exists: the test looks at the job mid-shard, then lets it go on.
* ``rendezvous: {id, dir, parties, timeout_s}``: each call for item ``id`` registers in ``dir`` and waits until
  ``parties`` calls have registered: that many attempts of one batch are inside the handler at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import time
import uuid
from typing import Any

from slurmctl.errors import ItemError


def record_call(ctx: Any, item: dict[str, Any]) -> None:
    _note(ctx.params.get("calls_file"), str(item["id"]))


def first_call(ctx: Any, item: dict[str, Any], param: str) -> dict[str, Any] | None:
    """The ``param`` spec if this is the first call (in any process) for its item: its ``marker`` file is created
    holding our pid. None for other items and for later calls (the batch running again)."""
    spec = ctx.params.get(param)
    if not spec or item["id"] != spec["id"]:
        return None
    try:
        fd = os.open(spec["marker"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return spec


def stall_once(ctx: Any, item: dict[str, Any]) -> None:
    spec = first_call(ctx, item, "stall_once")
    if spec:
        time.sleep(float(spec.get("seconds", 600)))


def hold(ctx: Any, item: dict[str, Any]) -> None:
    spec = first_call(ctx, item, "hold")
    if not spec:
        return
    deadline = time.monotonic() + 600
    while not os.path.exists(spec["release"]) and time.monotonic() < deadline:
        time.sleep(0.02)


def rendezvous(ctx: Any, item: dict[str, Any]) -> None:
    spec = ctx.params.get("rendezvous")
    if not spec or item["id"] != spec["id"]:
        return
    os.makedirs(spec["dir"], exist_ok=True)
    open(os.path.join(spec["dir"], uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + float(spec.get("timeout_s", 30))
    while len(os.listdir(spec["dir"])) < int(spec["parties"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rendezvous: only {len(os.listdir(spec['dir']))} of {spec['parties']} calls for "
                               f"item {item['id']} arrived within {spec.get('timeout_s', 30)} s")
        time.sleep(0.005)


def counting(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    record_call(ctx, item)
    stall_once(ctx, item)
    hold(ctx, item)
    rendezvous(ctx, item)
    if ctx.params.get("sleep_s"):
        time.sleep(float(ctx.params["sleep_s"]))
    fail = dict(ctx.params.get("fail") or {})
    if ctx.params.get("fail_file") and os.path.exists(ctx.params["fail_file"]):
        with open(ctx.params["fail_file"]) as f:
            fail.update(json.load(f))  # re-read per call: tests change it between runs
    cls = fail.get(str(item["id"]))
    if cls:
        raise ItemError(f"injected {cls} error", error_class=cls)
    return {"id": item["id"], "doubled": item["id"] * 2}


@functools.lru_cache(maxsize=8)
def secret_block_value(name: str) -> str:
    """A Prefect ``Secret`` block's value, loaded once per worker process, as a handler holding an API token does."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def using_secrets(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """``counting``, using secrets the way a real handler does, and writing none of them anywhere: the Prefect
    ``Secret`` block ``params["secret_block"]`` and the environment variables named in ``params["env_sha256"]``
    must hold the values whose sha256 the params give (``secret_sha256``, ``env_sha256: {NAME: hex}``), else the
    item fails naming what did not match (never a value): the job only succeeds if the secrets reached the worker."""
    if sha256(secret_block_value(ctx.params["secret_block"])) != ctx.params["secret_sha256"]:
        raise ItemError(f"Secret block {ctx.params['secret_block']!r} does not hold the expected value",
                        error_class="secret")
    for name, digest in ctx.params.get("env_sha256", {}).items():
        if sha256(os.environ.get(name, "")) != digest:
            raise ItemError(f"environment variable {name} is missing or not the expected value",
                            error_class="secret")
    return counting(item, ctx)


def rows_per_item(item: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    """``item["n"]`` rows (default 1; 0: none), each with the item's other fields and its index ``k``."""
    extra = {k: v for k, v in item.items() if k not in ("id", "n")}
    return [{"id": item["id"], "k": k, **extra} for k in range(item.get("n", 1))]


def place_of(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """An API answering with its own record's id: the place a user lives in, shared by many users."""
    return {"id": f"place-{item['zip']}", "user": item["id"], "city": f"city-{item['zip']}"}


def calls(path: str) -> list[tuple[int, Any]]:
    """(pid, id) per recorded call."""
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path).read().splitlines():
        pid, item_id = line.split(" ", 1)
        out.append((int(pid), int(item_id) if item_id.lstrip("-").isdigit() else item_id))
    return out


# --- async and class handlers (issue 22): the same behaviour as ``counting``, in flight together ----------------------
def _injected_failure(ctx: Any, item: dict[str, Any]) -> None:
    cls = dict(ctx.params.get("fail") or {}).get(str(item["id"]))
    if cls:
        raise ItemError(f"injected {cls} error", error_class=cls)


def _first_pass_failure(params: dict[str, Any], item: dict[str, Any], batch_id: str) -> str | None:
    """``fail_first_pass``: ``{"ids": [...], "class": cls}``: the error class the listed ids fail with in the job's
    first pass (not in a retry round's batches, ``r01-...``), else None."""
    spec = params.get("fail_first_pass")
    if not spec or item["id"] not in spec["ids"] or batch_id.startswith("r"):
        return None
    return str(spec["class"])


def _note(path: str | None, text: str) -> None:
    """Append ``<pid> <text>`` to the file ``path`` (O_APPEND: safe across processes), if given."""
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {text}\n".encode())
        finally:
            os.close(fd)


class _InFlight:
    """How many calls are inside a handler at once in this process (the most seen: ``peak``)."""

    def __init__(self) -> None:
        import threading

        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.now -= 1


in_flight = _InFlight()


async def counting_async(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """``counting`` as a coroutine: ``sleep_s`` is an async sleep (``jitter_s`` adds a random part, so items finish
    out of input order); ``fail`` injects errors; ``stall_once`` stalls one item (the others go on); ``release``:
    every call then waits, in flight, until that file exists; ``limit``: the sleep is a call under that declared
    rate limit."""
    import asyncio
    import random

    record_call(ctx, item)
    stalled = first_call(ctx, item, "stall_once")  # as in ``counting``, without blocking the other items
    limit = ctx.limit(ctx.params["limit"]) if ctx.params.get("limit") else contextlib.nullcontext()
    async with limit:
        with in_flight:
            await asyncio.sleep(float(ctx.params.get("sleep_s") or 0) + random.uniform(0, ctx.params.get("jitter_s", 0))
                                + (float(stalled.get("seconds", 600)) if stalled else 0))
            deadline = time.monotonic() + 600
            while ctx.params.get("release") and not os.path.exists(ctx.params["release"]) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
    _injected_failure(ctx, item)
    return {"id": item["id"], "doubled": item["id"] * 2}


def _logged(func: Any) -> Any:
    """A plain decorator, as users write them (logging, timing): a sync wrapper that returns what the function
    returns, which for an async function is its coroutine; ``functools.wraps`` says what it wraps."""
    @functools.wraps(func)
    def wrapper(item: dict[str, Any], ctx: Any) -> Any:
        return func(item, ctx)

    return wrapper


decorated_async = _logged(counting_async)


async def awaits_a_cancelled_future(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Item ``cancelled_id`` awaits a future something else cancelled: its ``CancelledError`` is the handler's own."""
    await asyncio.sleep(0.01)
    if item["id"] == ctx.params.get("cancelled_id"):
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future
    return {"id": item["id"]}


def coroutine_returning(item: dict[str, Any], ctx: Any) -> Any:
    """The mistake that cannot be seen from the code: a sync function handing back an async handler's coroutine."""
    return counting_async(item, ctx)


def counting_threads(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """``counting_async`` as a blocking function, for ``concurrency: N`` in threads; ``limit``: its sleep is a call
    under that declared rate limit; ``spin_s``: it computes that long instead."""
    import random

    record_call(ctx, item)
    with in_flight, ctx.limit(ctx.params["limit"]) if ctx.params.get("limit") else contextlib.nullcontext():
        end = time.thread_time() + float(ctx.params.get("spin_s") or 0)  # CPU, however busy the machine
        while time.thread_time() < end:
            pass
        time.sleep(float(ctx.params.get("sleep_s") or 0) + random.uniform(0, ctx.params.get("jitter_s", 0)))
    _injected_failure(ctx, item)
    return {"id": item["id"], "doubled": item["id"] * 2}


async def blocking_async(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The mistake: an async handler that calls something blocking (``sleep_s`` of ``time.sleep``), holding the
    worker's event loop and every other item on it; ``spin_s`` computes first, for as long, in the same step (a
    blocking request, then parsing its answer)."""
    await asyncio.sleep(0)  # a coroutine, awaited as one
    # the call under the job's rate limit (``limit``), as a real handler's would be
    async with ctx.limit(ctx.params["limit"]) if ctx.params.get("limit") else contextlib.nullcontext():
        if ctx.params.get("spin_s"):
            end = time.perf_counter() + float(ctx.params["spin_s"])
            while time.perf_counter() < end:
                pass
        if ctx.params.get("sleep_s"):
            time.sleep(float(ctx.params["sleep_s"]))
    return {"id": item["id"]}


async def many_short_steps(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Well written and busy: ``steps`` short computations (``step_ms`` each), yielding to the loop between them."""
    for _ in range(int(ctx.params.get("steps") or 1)):
        end = time.perf_counter() + float(ctx.params.get("step_ms") or 0) / 1000
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)
    return {"id": item["id"]}


class Session:
    """A class handler: built once per worker process from the job's params (noted in ``instances_file``), called per
    item, closed once when the worker stops (noted in ``closes_file``)."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.calls = 0
        _note(params.get("instances_file"), "built")

    def __call__(self, item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        self.calls += 1
        record_call(ctx, item)
        _injected_failure(ctx, item)
        return {"id": item["id"], "doubled": item["id"] * 2, "session_calls": self.calls}

    def close(self) -> None:
        _note(self.params.get("closes_file"), "closed")


class AsyncSession(Session):
    """``Session`` whose calls are coroutines and whose close is ``aclose``; ``fail_first_pass`` fails the ids it lists
    in the job's first pass."""

    async def __call__(self, item: dict[str, Any], ctx: Any) -> dict[str, Any]:  # type: ignore[override]
        import asyncio

        self.calls += 1
        calls = self.calls
        record_call(ctx, item)
        first_pass = _first_pass_failure(self.params, item, ctx.batch_id)
        with in_flight:
            await asyncio.sleep(float(self.params.get("sleep_s") or 0))
        if first_pass:
            raise ItemError(f"injected {first_pass} error, first pass", error_class=first_pass)
        _injected_failure(ctx, item)
        return {"id": item["id"], "doubled": item["id"] * 2, "session_calls": calls}

    async def aclose(self) -> None:
        _note(self.params.get("closes_file"), "closed")


def _api_session_class() -> type:
    from slurmctl.handlers.http_json import AsyncClient

    class ApiSession(AsyncClient):
        """The shipped ``http_json:AsyncClient``, noting when a worker process builds it and closes it."""

        def __init__(self, params: dict[str, Any]) -> None:
            super().__init__(params)
            _note(params.get("instances_file"), "built")

        async def aclose(self) -> None:
            await super().aclose()
            _note(self.params.get("closes_file"), "closed")

    return ApiSession


ApiSession = _api_session_class()


_at_capped_api = [0]  # calls ``capped_async``'s API is answering now (one per process: the tests run one batch)


async def capped_async(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """An API that takes at most ``cap`` calls at once, as many APIs cap concurrent calls: above it, 429 at once (no
    ``Retry-After``); else an answer after ``sleep_s``. ``capped_async.peak``: the most it answered at once."""
    record_call(ctx, item)
    if _at_capped_api[0] >= int(ctx.params["cap"]):
        raise ItemError("429: too many concurrent requests", error_class="throttle")
    _at_capped_api[0] += 1
    capped_async.peak = max(capped_async.peak, _at_capped_api[0])
    try:
        await asyncio.sleep(float(ctx.params.get("sleep_s") or 0))
    finally:
        _at_capped_api[0] -= 1
    return {"id": item["id"]}


capped_async.peak = 0


async def flaky_once_async(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Fails the first call of each id listed in the JSON file ``fail_once`` (``{id: class}``), then succeeds.
    A failing call answers after ``fail_after_s``, the others after ``sleep_s`` (both default 0: at once);
    ``limit``: each call, its error included, is made under that declared rate limit."""
    import asyncio

    record_call(ctx, item)
    path = ctx.params["fail_once"]
    with open(path) as f:
        pending = json.load(f)
    cls = pending.pop(str(item["id"]), None)
    if cls:
        with open(path, "w") as f:
            json.dump(pending, f)
    async with ctx.limit(ctx.params["limit"]) if ctx.params.get("limit") else contextlib.nullcontext():
        await asyncio.sleep(float(ctx.params.get("fail_after_s" if cls else "sleep_s") or 0))
        if cls:
            raise ItemError(f"injected {cls} error, once", error_class=cls)
    return {"id": item["id"]}


class NoCall:
    """Not a handler: nothing to call per item."""

    def __init__(self, params: dict[str, Any]) -> None:
        pass


class NeedsTwo:
    """Not a handler: cannot be built from the params alone."""

    def __init__(self, params: dict[str, Any], other: Any) -> None:
        pass

    def __call__(self, item: dict[str, Any], ctx: Any) -> None:
        pass


def handle_batch(batch: Any, ctx: Any) -> Any:
    """A batch handler in any ``batch_format``: doubles each id, vectorised for pandas and arrow. Params: ``fail``
    (``{id: class}``: ``ctx.fail``), ``error_rows`` (ids answered with an ``errors`` row), ``drop`` (ids left out of
    the answer), ``poison`` (an id whose presence makes the whole call raise), ``calls_file`` (one line per call:
    ``<pid> batch:<n items>``)."""
    p = ctx.params
    if isinstance(batch, list):
        ids = [r["id"] for r in batch]
    elif hasattr(batch, "column"):  # arrow
        ids = batch.column("id").to_pylist()
    else:
        ids = batch["id"].tolist()
    _note(p.get("calls_file"), f"batch:{len(ids)}")
    if p.get("poison") is not None and p["poison"] in ids:
        raise ValueError(f"poison item {p['poison']} in the batch")
    for item_id, cls in (p.get("fail") or {}).items():
        if int(item_id) in ids:
            ctx.fail(int(item_id), ItemError(f"injected {cls}", error_class=cls))
    keep = [i for i in ids if i not in set(p.get("drop") or [])]
    if isinstance(batch, list):
        return [{"id": i, "doubled": i * 2, **({"errors": "bad row"} if i in (p.get("error_rows") or []) else {})}
                for i in keep]
    if hasattr(batch, "column"):
        import pyarrow as pa
        import pyarrow.compute as pc

        table = batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(keep, batch.column("id").type)))
        return table.append_column("doubled", pc.multiply(table.column("id"), 2))
    frame = batch[batch["id"].isin(keep)].copy()
    frame["doubled"] = frame["id"] * 2
    if p.get("error_rows"):
        frame["errors"] = [("bad row" if i in p["error_rows"] else None) for i in frame["id"]]
    return frame


def typed(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """``{"id", "value"}``: the value is the id, or ``params["values"][str(id)]`` (a string, a float, ...)."""
    return {"id": item["id"], "value": (ctx.params.get("values") or {}).get(str(item["id"]), item["id"])}


def fan_out_batch(batch: Any, ctx: Any) -> Any:
    """A batch handler whose answer is out of order and uneven, in the ``batch_format`` it was given: two rows for
    ids divisible by 5 (tagged ``second`` then ``first``: an item's rows keep the handler's order), an ``errors`` row
    for ids divisible by 7, nothing for ids divisible by 11, ``ctx.fail`` for id 13; rows in reverse input order."""
    ids = [r["id"] for r in batch] if isinstance(batch, list) else (
        batch.column("id").to_pylist() if hasattr(batch, "column") else batch["id"].tolist())
    if 13 in ids:
        ctx.fail(13, "gone", error_class="not_found")
    rows: list[dict[str, Any]] = []
    for i in reversed(ids):
        if i % 11 == 0 and i:
            continue
        tags = ["second", "first"] if i % 5 == 0 else ["only"]
        rows += [{"id": i, "tag": t, "score": i / 2, "errors": "bad row" if i % 7 == 0 and i else None}
                 for t in tags]
    if isinstance(batch, list):
        return rows
    if hasattr(batch, "column"):
        import pyarrow as pa

        return pa.Table.from_pylist(rows)
    import pandas as pd

    return pd.DataFrame(rows)


def typed_batch(batch: Any, ctx: Any) -> Any:
    """``typed`` as a batch handler answering a pyarrow Table: ``{"id", "value"}`` with ``params["values"]``."""
    import pyarrow as pa

    values = ctx.params.get("values") or {}
    ids = batch.column("id").to_pylist()
    return pa.table({"id": ids, "value": [values.get(str(i), i) for i in ids]})


async def sync_limit_async(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The mistake: ``with ctx.limit`` (the sync form) in an async handler, which would wait on the event loop."""
    with ctx.limit(ctx.params["limit"]):
        await asyncio.sleep(0)
    return {"id": item["id"]}
