"""Calls an HTTP JSON API once per item: ``GET {base_url}/{path}`` with the item's fields substituted.

Plain Python (urllib from the standard library), so it can be unit-tested without Prefect, Dask or AWS. Job
params: ``base_url`` (required), ``path`` (default ``/items/{id}``), ``timeout_s`` (default 10), ``limit`` (the
name of a rate limit declared in the job config; each request spends one token of it). The response's JSON
object becomes the output row, with the item's id (an ``id`` of the API's own, when it differs, is kept as
``handler_id``: ``slurmctl.handler.normalise_output``). HTTP errors propagate as ``urllib.error.HTTPError`` — with the
status and ``Retry-After`` header slurmctl's error classes read.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from typing import Any


def handle(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    params = ctx.params
    url = params["base_url"].rstrip("/") + params.get("path", "/items/{id}").format(**item)
    ctx.count("api_requests")
    limit = params.get("limit")
    with ctx.limit(limit) if limit else contextlib.nullcontext():
        with urllib.request.urlopen(url, timeout=float(params.get("timeout_s", 10))) as resp:
            body = json.loads(resp.read())
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object from {url}, got {type(body).__name__}")
    return body
