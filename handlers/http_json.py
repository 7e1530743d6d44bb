"""Calls an HTTP JSON API once per item: ``GET {base_url}/{path}`` with the item's fields substituted.

Plain Python (urllib from the standard library), so it can be unit-tested without Prefect, Dask or AWS. Job
params: ``base_url`` (required), ``path`` (default ``/items/{id}``), ``timeout_s`` (default 10), ``limit`` (the
name of a rate limit declared in the job config; each request spends one token of it). The response's JSON
object becomes the output row, with the item's id (an ``id`` of the API's own, when it differs, is kept as
``handler_id``: ``slurmctl.handler.normalise_output``). HTTP errors propagate as ``urllib.error.HTTPError`` — with the
status and ``Retry-After`` header slurmctl's error classes read.

``AsyncClient`` is the same handler for APIs that need many calls in flight (``handler:
slurmctl.handlers.http_json:AsyncClient``): a class handler, so each worker process builds its ``httpx.AsyncClient``
connection pools once (kept alive) and closes them when the worker stops; its calls are coroutines, so the job runs
them with ``concurrency: auto`` by default. Extra param: ``max_connections`` (default 1000 per worker process).

Why several small pools and not one: httpcore's pool scans all of its connections on every request and every
answer, so one pool of 64 connections here spent 12 ms of CPU per request (78 requests/s from a whole core), and
pools of 8 spent 1.1 ms (850/s) for the same 64 in flight (``benchmarks/api_bound.py``, docs/benchmarks.md). A
request goes to the pool with the fewest in flight; a new pool opens when every pool has ``POOL_CONNECTIONS``.
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
    """``handle`` on ``httpx.AsyncClient`` pools built once per worker process, many requests in flight (see the
    module doc)."""

    POOL_CONNECTIONS = 8  # connections per httpx pool: its per-request cost grows with the connections it holds

    def __init__(self, params: dict[str, Any]) -> None:
        if "base_url" not in params:
            raise ValueError("params.base_url is required by slurmctl.handlers.http_json:AsyncClient")
        self.params = params
        self.pools: list[list[Any]] = []  # [client, requests in flight], built on the worker's loop on first use
        self.tls: Any = None  # one TLS context for every pool

    def _pool(self) -> list[Any]:
        import httpx

        pool = min(self.pools, key=lambda p: p[1], default=None)
        most = max(1, -(-int(self.params.get("max_connections", 1000)) // self.POOL_CONNECTIONS))
        if (pool is None or pool[1] >= self.POOL_CONNECTIONS) and len(self.pools) < most:
            size = self.POOL_CONNECTIONS
            if self.tls is None:  # each client would load the CA bundle again: ~20 ms on the loop, per pool
                self.tls = httpx.create_ssl_context()
            pool = [httpx.AsyncClient(timeout=float(self.params.get("timeout_s", 10)), verify=self.tls,
                                      limits=httpx.Limits(max_connections=size, max_keepalive_connections=size)), 0]
            self.pools.append(pool)
        assert pool is not None
        return pool

    async def __call__(self, item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        url = _url(self.params, item)
        ctx.count("api_requests")
        limit = self.params.get("limit")
        async with ctx.limit(limit) if limit else contextlib.nullcontext():
            pool = self._pool()
            pool[1] += 1
            try:
                resp = await pool[0].get(url)
            finally:
                pool[1] -= 1
            resp.raise_for_status()  # inside the limit: a 429 slows the shared rate down
        body = resp.json()
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object from {url}, got {type(body).__name__}")
        return body

    async def aclose(self) -> None:
        pools, self.pools = self.pools, []
        for client, _ in pools:
            await client.aclose()
