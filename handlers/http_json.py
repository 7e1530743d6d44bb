"""Calls an HTTP JSON API once per item: ``GET {base_url}/{path}`` with the item's fields substituted.

Plain Python (urllib from the standard library), so it can be unit-tested without Prefect, Dask or AWS. Job
params: ``base_url`` (required), ``path`` (default ``/items/{id}``), ``timeout_s`` (default 10), ``limit`` (the
name of a rate limit declared in the job config; each request spends one token of it). The response's JSON
object becomes the output row, with the item's id (an ``id`` of the API's own, when it differs, is kept as
``handler_id``: ``slurmctl.handler.normalise_output``). HTTP errors propagate as ``urllib.error.HTTPError`` — with the
status and ``Retry-After`` header slurmctl's error classes read.

``AsyncClient`` is the same handler for APIs that need many calls in flight (``handler:
slurmctl.handlers.http_json:AsyncClient``): a class handler, so each worker process builds one ``httpx.AsyncClient``
(one connection pool, kept alive) and closes it when the worker stops; its calls are coroutines, so the job runs them
with ``concurrency: auto`` by default. Extra param: ``max_connections`` (default 1000 per worker process).
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
    """``handle`` on one ``httpx.AsyncClient`` per worker process, many requests in flight (see the module doc)."""

    def __init__(self, params: dict[str, Any]) -> None:
        if "base_url" not in params:
            raise ValueError("params.base_url is required by slurmctl.handlers.http_json:AsyncClient")
        self.params = params
        self.client: Any = None  # built on the worker's event loop, on first use

    async def __call__(self, item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        import httpx

        if self.client is None:
            n = int(self.params.get("max_connections", 1000))
            self.client = httpx.AsyncClient(timeout=float(self.params.get("timeout_s", 10)),
                                            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        url = _url(self.params, item)
        ctx.count("api_requests")
        limit = self.params.get("limit")
        async with ctx.limit(limit) if limit else contextlib.nullcontext():
            resp = await self.client.get(url)
            resp.raise_for_status()  # inside the limit: a 429 slows the shared rate down
        body = resp.json()
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object from {url}, got {type(body).__name__}")
        return body

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
