"""Calls an HTTP JSON API once per item: ``GET {base_url}/{path}`` with the item's fields substituted.

Plain Python (urllib from the standard library), so it can be unit-tested without Prefect, Dask or AWS. Job
params: ``base_url`` (required), ``path`` (default ``/items/{id}``), ``timeout_s`` (default 10), ``limit`` (the
name of a rate limit declared in the job config; each request spends one token of it). The response's JSON
object becomes the output row, with the item's id (an ``id`` of the API's own, when it differs, is kept as
``handler_id``: ``slurmctl.handler.normalise_output``). HTTP errors propagate as ``urllib.error.HTTPError`` — with the
status and ``Retry-After`` header slurmctl's error classes read.

``AsyncClient`` is the same handler for APIs that need many calls in flight (``handler:
slurmctl.handlers.http_json:AsyncClient``): a class handler, so each worker process builds its ``httpx.AsyncClient``s
once (their connections kept alive) and closes them when the worker stops; its calls are coroutines, so the job runs
them with ``concurrency: auto`` by default. Extra param: ``max_connections`` (default 1000 per worker process).

Why one connection per client and not one pool: httpcore's pool checks every idle connection it holds on every
request and every answer (a syscall or two each), so one pool of 64 connections spent 12 ms of CPU per request (78
requests/s from a whole core) and pools of 8 still spent a quarter of a worker's loop on those checks at 1,000
requests/s (py-spy, ``benchmarks/api_bound.py``, docs/benchmarks.md). A request takes a client whose connection is
free (the one freed last, so its connection is warm), or opens a new one, up to ``max_connections``; beyond that it
queues at the least busy client.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from typing import Any


def handle(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    params = ctx.params
    url = _url(params, item)
    ctx.count("api_requests")
    limit = params.get("limit")
    with ctx.limit(limit) if limit else contextlib.nullcontext():
        with urllib.request.urlopen(url, timeout=float(params.get("timeout_s", 10))) as resp:
            body = json.loads(resp.read())
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object from {url}, got {type(body).__name__}")
    return body


def _url(params: dict[str, Any], item: dict[str, Any]) -> str:
    return params["base_url"].rstrip("/") + params.get("path", "/items/{id}").format(**item)


class AsyncClient:
    """``handle`` on ``httpx.AsyncClient``s of one kept-alive connection each, built once per worker process, many
    requests in flight (see the module doc)."""

    def __init__(self, params: dict[str, Any]) -> None:
        if "base_url" not in params:
            raise ValueError("params.base_url is required by slurmctl.handlers.http_json:AsyncClient")
        import httpx

        self.params = params
        self.clients: list[list[Any]] = []  # [client, requests in flight], built on the worker's loop on first use
        self.free: list[list[Any]] = []  # those with nothing in flight, the one freed last at the end
        # One TLS context for every client (each would load the CA bundle again), built here, on the thread that
        # builds the handler, not by the first request on the worker's loop: loading the bundle takes ~20 ms, and on
        # a busy machine the loop watch found the loop held there for 60 ms, every call of the worker waiting.
        self.tls = httpx.create_ssl_context()

    def _take(self) -> list[Any]:
        """A client for one request: the one freed last, else a new one, else (``max_connections`` open, all
        busy) the least busy."""
        client = self._pick()
        client[1] += 1
        return client

    def _give(self, client: list[Any]) -> None:
        client[1] -= 1
        if client[1] == 0:
            self.free.append(client)

    def _pick(self) -> list[Any]:
        if self.free:
            return self.free.pop()
        if len(self.clients) >= max(1, int(self.params.get("max_connections", 1000))):
            return min(self.clients, key=lambda c: c[1])  # all busy: queue at the least busy one
        import httpx

        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        client = [httpx.AsyncClient(timeout=float(self.params.get("timeout_s", 10)), verify=self.tls, limits=one), 0]
        self.clients.append(client)
        return client

    async def __call__(self, item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        url = _url(self.params, item)
        ctx.count("api_requests")
        limit = self.params.get("limit")
        async with ctx.limit(limit) if limit else contextlib.nullcontext():
            client = self._take()
            try:
                resp = await client[0].get(url)
            finally:
                self._give(client)
            resp.raise_for_status()  # inside the limit: a 429 slows the shared rate down
        body = resp.json()
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object from {url}, got {type(body).__name__}")
        return body

    async def aclose(self) -> None:
        clients, self.clients, self.free = self.clients, [], []
        for client, _ in clients:
            await client.aclose()
