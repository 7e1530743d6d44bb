"""Handler loading errors say what to fix; handlers are plain Python, testable without Prefect or Dask."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from slurmctl.handler import BatchContext, HandlerError, call_once, load_handler, normalise_output
from slurmctl.handlers import echo, http_json


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        return name
    return make


def test_loads_the_echo_handler():
    assert load_handler("slurmctl.handlers.echo:handle") is echo.handle


@pytest.mark.parametrize("spec, message", [
    ("handlers.does_not_exist:handle", "cannot import module 'handlers.does_not_exist'"),
    ("slurmctl.handlers.echo:nope", "has no attribute 'nope'"),
    ("slurmctl.handlers.echo", "must be 'module:function'"),
])
def test_load_errors(spec, message):
    with pytest.raises(HandlerError, match=message):
        load_handler(spec)


def test_not_callable_and_wrong_arity(user_module):
    mod = user_module("h_bad", "value = 3\ndef one(item):\n    return item\n")
    with pytest.raises(HandlerError, match="not callable"):
        load_handler(f"{mod}:value")
    with pytest.raises(HandlerError, match=r"two arguments \(item, ctx\)"):
        load_handler(f"{mod}:one")


def test_an_async_generator_is_refused_at_load_with_what_to_write_instead(user_module):
    # It would otherwise pass submit and fail every item with "'async_generator' object is not iterable".
    mod = user_module("h_agen", "async def rows(item, ctx):\n    yield item\n"
                                "def each(item, ctx):\n    yield item\n    yield item\n"
                                "class Geo:\n    def __init__(self, params):\n        pass\n"
                                "    async def __call__(self, item, ctx):\n        yield item\n")
    for name in ("rows", "Geo"):
        with pytest.raises(HandlerError, match="async generator .* return them \\(a list of dicts\\)"):
            load_handler(f"{mod}:{name}")
    each = load_handler(f"{mod}:each")  # a sync generator's rows are the item's rows
    assert normalise_output(each({"id": 1}, None), {"id": 1}, "id") == [{"id": 1}, {"id": 1}]


def test_module_that_raises_on_import_shows_why(user_module):
    mod = user_module("h_boom", "raise RuntimeError('missing API key')\n")
    with pytest.raises(HandlerError, match="RuntimeError: missing API key"):
        load_handler(f"{mod}:handle")


def test_context_counts_metrics():
    ctx = BatchContext(job_id="j", batch_id="b", params={"x": 1})
    ctx.count("api_requests")
    ctx.count("api_requests", 2)
    assert ctx.metrics == {"api_requests": 3} and ctx.params == {"x": 1}


def test_a_unit_tests_context_lets_any_limit_through_and_counts_it():
    # README: unit-test a handler with BatchContext(job_id=..., batch_id=...). Its ctx.limit used to raise KeyError
    # ("declare it in the job config"), which a unit test cannot do.
    def handle(item, ctx):
        with ctx.limit("geo"):
            return {"id": item["id"]}

    async def ahandle(item, ctx):
        async with ctx.limit("geo", tokens=2):
            return {"id": item["id"]}

    for h, tokens in ((handle, 1), (ahandle, 2)):
        ctx = BatchContext(job_id="t", batch_id="b")
        assert call_once(h, {"id": 7}, ctx) == {"id": 7} and ctx.metrics["ratelimit_geo_tokens"] == tokens
    with pytest.raises(KeyError, match="no rate limit 'geo': declare it in the job config"):  # a job's context
        BatchContext(job_id="t", batch_id="b", limiters={}).limit("geo")


def test_a_sync_limit_in_an_async_handler_is_refused_with_what_to_write_instead():
    # `with ctx.limit` in an async handler waits for its tokens on the event loop: every other item of the worker
    # would wait too. It is refused at once, naming the fix; the same `with` is fine in a thread the handler hands
    # its blocking work to, and in a sync handler called where a loop runs (a notebook's cell).
    async def wrong(item, ctx):
        with ctx.limit("api"):
            return {"id": item["id"]}

    with pytest.raises(TypeError, match=r"Use `async with ctx.limit\('api'\):`"):
        call_once(wrong, {"id": 1}, BatchContext(job_id="t", batch_id="b"))

    def blocking(item, ctx):
        with ctx.limit("api"):
            return {"id": item["id"]}

    async def handing_off(item, ctx):
        return await asyncio.to_thread(blocking, item, ctx)

    assert call_once(handing_off, {"id": 2}, BatchContext(job_id="t", batch_id="b")) == {"id": 2}

    async def notebook_cell():
        return blocking({"id": 3}, BatchContext(job_id="t", batch_id="b"))

    assert asyncio.run(notebook_cell()) == {"id": 3}


def test_output_normalisation_keeps_the_id():
    item = {"id": 7, "name": "a"}
    assert normalise_output(None, item, "id") == []
    assert normalise_output({"score": 1}, item, "id") == [{"id": 7, "score": 1}]
    assert normalise_output([{"x": 1}, {"id": 7, "x": 2}], item, "id") == [{"id": 7, "x": 1}, {"id": 7, "x": 2}]
    with pytest.raises(TypeError, match="must return a dict"):
        normalise_output(["nope"], item, "id")


def test_an_output_row_carries_its_items_id_whatever_the_handler_returned():
    # an API answering with its own record id (a place shared by many users): the row is the item's, the API's id
    # is kept beside it
    user = {"id": "user-7", "zip": "10115"}
    assert normalise_output({"id": "place-3", "city": "Berlin"}, user, "id") == [
        {"id": "user-7", "handler_id": "place-3", "city": "Berlin"}]
    # the same id written differently (a CSV's text "7", a handler's int 7) is the item's, as the input wrote it
    assert normalise_output({"id": 7, "v": 1}, {"id": "7"}, "id") == [{"id": "7", "v": 1}]
    assert normalise_output({"id": "7"}, {"id": 7}, "id") == [{"id": 7}]
    assert normalise_output({"id": True}, {"id": 1}, "id") == [{"id": 1, "handler_id": True}]
    # both would not fit: the item fails (class handler) rather than losing one
    with pytest.raises(TypeError, match="'handler_id' column too"):
        normalise_output({"id": "place-3", "handler_id": "x"}, user, "id")


def test_http_handler_against_a_local_api(item_api):
    url, state = item_api
    ctx = BatchContext("j", "b", params={"base_url": url})
    assert http_json.handle({"id": 21}, ctx) == {"id": 21, "value": 42}
    assert ctx.metrics["api_requests"] == 1 and state.requests == 1


def test_the_async_http_handler_gives_each_request_a_connection_of_its_own():
    """An httpx pool checks every idle connection it holds on every request and every answer: 64 in one pool cost 12
    ms of CPU per request here, and pools of 8 still a quarter of a worker's loop at 1,000 requests/s. Each client
    holds one connection; a request takes the client freed last (its connection warm), else opens one, and beyond
    ``max_connections`` queues at the least busy."""
    import asyncio

    handler = http_json.AsyncClient({"base_url": "http://127.0.0.1:9", "max_connections": 3})
    first, second, third, *queued = [handler._take() for _ in range(5)]
    assert handler.clients == [first, second, third] and queued == [first, second]
    assert [n for _, n in handler.clients] == [2, 2, 1]
    handler._give(second)
    assert handler.free == []  # one of its two requests still in flight
    handler._give(second)
    handler._give(third)
    assert handler.free == [second, third]
    assert handler._take() is third  # the one freed last
    assert handler._take() is second
    asyncio.run(handler.aclose())
    assert handler.clients == [] and handler.free == []


def test_the_async_http_handlers_clients_share_one_tls_context(monkeypatch):
    """Building a TLS context loads the CA bundle (~20 ms): the handler builds one when it is built (on the batch's
    thread, before any item is on the worker's event loop, which would wait for it) and gives it to every client it
    opens."""
    import asyncio

    import httpx

    built: list[Any] = []
    real = httpx.create_ssl_context
    monkeypatch.setattr(httpx, "create_ssl_context", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    handler = http_json.AsyncClient({"base_url": "https://127.0.0.1:9", "max_connections": 24})
    assert len(built) == 1  # built with the handler, not by its first request on the loop
    for _ in range(24):
        handler._take()
    assert len(handler.clients) == 24 and len(built) == 1
    asyncio.run(handler.aclose())


def test_call_once_keeps_a_class_handlers_async_client_working_from_call_to_call_and_closes_it(item_api):
    # A unit test calls one instance of the shipped AsyncClient several times, as a worker would. Each call used to
    # run on a fresh event loop, and every second one failed (`Event loop is closed`): httpx keeps its connection on
    # the loop that opened it. call_once keeps one loop per thread until close_handlers closes the instance there.
    from slurmctl.handler import close_handlers, handler_for

    url, api = item_api
    close_handlers()  # what earlier tests in this process built
    client = handler_for("slurmctl.handlers.http_json:AsyncClient", {"base_url": url})
    ctx = BatchContext(job_id="t", batch_id="b")
    assert [call_once(client, {"id": i}, ctx)["value"] for i in range(4)] == [0, 2, 4, 6]
    assert close_handlers() == 1  # aclose on the loop its connection lives on: nothing logged, nothing raised
    assert call_once(handler_for("slurmctl.handlers.http_json:AsyncClient", {"base_url": url}),
                     {"id": 5}, ctx)["value"] == 10  # a new instance, a new loop
    assert close_handlers() == 1
