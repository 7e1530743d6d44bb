"""A blocking handler that keeps its connection alive: ``slurmctl.handlers.http_json:handle`` on ``http.client``
with one connection per thread, for ``api_bound.py``'s ``sync-keepalive`` cells.

urllib opens a connection per request, and the connect (the API accepting it) adds to the time between a call's
rate-limit slot and its arrival at the API. A kept-alive connection per thread is what a ``requests.Session`` or
an ``httpx.Client`` gives a real handler; this one uses only the standard library. HTTP errors are raised as
``urllib.error.HTTPError`` with the response's headers, as urllib raises them, so ``Retry-After`` is honoured.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import urllib.error
from typing import Any
from urllib.parse import urlsplit

_local = threading.local()


def _connection(base_url: str, timeout_s: float) -> http.client.HTTPConnection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        url = urlsplit(base_url)
        conn = _local.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout_s)
    return conn


def handle(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    params = ctx.params
    path = urlsplit(params["base_url"]).path.rstrip("/") + params.get("path", "/items/{id}").format(**item)
    conn = _connection(params["base_url"], float(params.get("timeout_s", 10)))
    ctx.count("api_requests")
    limit = params.get("limit")
    with ctx.limit(limit) if limit else contextlib.nullcontext():
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            data = resp.read()
        except Exception:
            conn.close()  # a connection the server dropped is opened again by the next call
            _local.conn = None
            raise
        if resp.status >= 400:
            raise urllib.error.HTTPError(params["base_url"] + path, resp.status, resp.reason, resp.headers, None)
    return json.loads(data)
