"""Handler loading errors say what to fix; handlers are plain Python, testable without Prefect or Dask."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from slurmctl.handler import BatchContext, HandlerError, load_handler, normalise_output
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


def test_module_that_raises_on_import_shows_why(user_module):
    mod = user_module("h_boom", "raise RuntimeError('missing API key')\n")
    with pytest.raises(HandlerError, match="RuntimeError: missing API key"):
        load_handler(f"{mod}:handle")


def test_context_counts_metrics():
    ctx = BatchContext(job_id="j", batch_id="b", params={"x": 1})
    ctx.count("api_requests")
    ctx.count("api_requests", 2)
    assert ctx.metrics == {"api_requests": 3} and ctx.params == {"x": 1}


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


def test_the_async_http_handler_spreads_its_requests_over_small_connection_pools():
    """One httpx pool scans all its connections on every request: 64 in one pool cost 12 ms of CPU per request here,
    pools of 8 cost 1.1 ms. Requests go to the least busy pool; a pool opens only when every pool is full."""
    import asyncio

    handler = http_json.AsyncClient({"base_url": "http://127.0.0.1:9", "max_connections": 24})
    for _ in range(30):
        handler._pool()[1] += 1  # a request in flight on the pool it was given
    assert [n for _, n in handler.pools] == [10, 10, 10]  # 24 connections: 3 pools of 8, then the least busy
    handler.pools[1][1] = 0
    assert handler._pool() is handler.pools[1]
    asyncio.run(handler.aclose())
    assert handler.pools == []


def test_the_async_http_handlers_pools_share_one_tls_context(monkeypatch):
    """Building a TLS context loads the CA bundle (~20 ms, on the worker's loop while other requests wait for their
    slots): the handler builds one and gives it to every pool it opens."""
    import asyncio

    import httpx

    built: list[Any] = []
    real = httpx.create_ssl_context
    monkeypatch.setattr(httpx, "create_ssl_context", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    handler = http_json.AsyncClient({"base_url": "https://127.0.0.1:9", "max_connections": 24})
    for _ in range(24):
        handler._pool()[1] += 1
    assert len(handler.pools) == 3 and len(built) == 1
    asyncio.run(handler.aclose())
