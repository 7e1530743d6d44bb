"""The benchmark's comparison handler: each request gated by Prefect's own ``rate_limit()`` (a global concurrency
limit with slot decay on the Prefect server) instead of slurmctl's limiter. Same request as ``http_json``."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from prefect.concurrency.sync import rate_limit


def handle(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    rate_limit(ctx.params["prefect_limit"])
    url = ctx.params["base_url"].rstrip("/") + f"/items/{item['id']}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())
