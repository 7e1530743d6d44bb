"""The API the ``api_bound`` benchmark calls: a bare ASGI app under uvicorn, in its own process, so the API is not
the bottleneck. ``GET /items/{id}`` answers ``{"id": id}`` after ``latency`` seconds, through a token bucket of
``rate``/s with capacity ``burst`` (429 with ``Retry-After`` above it; ``rate`` 0: no bucket). ``POST /config?
latency=&rate=&burst=`` sets them and clears the counters; ``GET /stats`` returns the counters and the arrival second of
every admitted request (as counts per whole second of ``time.monotonic()``).

    python benchmarks/api_server.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import parse_qs

state = {"latency": 0.0, "rate": 0.0, "burst": 5.0, "tokens": 5.0, "at": time.monotonic()}
counts: Counter = Counter()
per_second: Counter = Counter()
in_flight = {"now": 0, "max": 0}


def _reset(latency: float, rate: float, burst: float) -> None:
    state.update(latency=latency, rate=rate, burst=burst, tokens=burst, at=time.monotonic())
    counts.clear()
    per_second.clear()
    in_flight.update(now=0, max=0)


def _admit() -> float | None:
    """None when the bucket has a token (taken), else the seconds until it will."""
    rate = state["rate"]
    if rate <= 0:
        return None
    now = time.monotonic()
    state["tokens"] = min(state["burst"], state["tokens"] + (now - state["at"]) * rate)
    state["at"] = now
    if state["tokens"] >= 1:
        state["tokens"] -= 1
        return None
    return (1 - state["tokens"]) / rate


async def _send(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path.startswith("/items/"):
        counts["requests"] += 1
        wait = _admit()
        if wait is not None:
            counts["429"] += 1
            await _send(send, 429, {"error": "rate limit exceeded"}, [(b"retry-after", f"{wait:.3f}".encode())])
            return
        per_second[int(time.monotonic())] += 1
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        try:
            if state["latency"] > 0:
                await asyncio.sleep(state["latency"])
        finally:
            in_flight["now"] -= 1
        counts["ok"] += 1
        await _send(send, 200, {"id": path.rsplit("/", 1)[1]})
    elif path == "/config":
        q = {k: float(v[0]) for k, v in parse_qs(scope["query_string"].decode()).items()}
        _reset(q.get("latency", 0.0), q.get("rate", 0.0), q.get("burst", 5.0))
        await _send(send, 200, {"ok": True})
    elif path == "/stats":
        await _send(send, 200, {**counts, "in_flight_max": in_flight["max"],
                                "per_second": sorted(per_second.items())})
    else:
        await _send(send, 404, {"error": "not found"})


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                backlog=4096, limit_concurrency=None)
