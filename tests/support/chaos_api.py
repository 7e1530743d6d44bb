"""A flaky, rate-limited third-party JSON API for tests (standard library only).

``GET /items/<id>`` answers ``200 {"id": id, "value": id * 2}``; negative ids (and any other path) answer
``404 {"error": "not found"}``. On top of that, faults are injected:

* deterministic, per id: ``fail_ids={7: ("503", 2)}`` makes the first 2 requests for item 7 answer 503, then it
  succeeds. Kinds: ``"429"``, ``"503"``, ``"500"``, ``"timeout"``, ``"reset"``.
* random, per request: ``rate_429``, ``rate_503``, ``rate_500``, ``rate_timeout``, ``rate_reset`` are probabilities
  in [0, 1], drawn (one draw per request) from ``random.Random(seed)`` under a lock.
* a strict limiter: ``max_per_second=5`` is a token bucket (capacity ``burst``, by default ``max(1,
  max_per_second)``); requests beyond it answer 429 with a ``Retry-After`` computed from the bucket and are counted
  in ``over_limit`` (not ``faults``). ``burst=2`` makes it as strict as an API documenting "5/s, burst 2".
* a slow API: ``latency_s=0.3`` answers each normal request 300 ms after it arrived (429s and faults at once).
* a storm the test ends on a condition: ``faults_while=lambda: ...`` is asked (under the lock) before each random
  draw; while it returns False no random fault is injected. Ending a storm "when X has happened" cannot race X.

Order of checks for a request: limiter, then ``fail_ids``, then the random faults, then the normal answer.

``arrivals(item_id)`` gives the ``time.monotonic()`` at which each request (for that id, or all) arrived, to
measure the waits a client kept between attempts and the rate the API really saw.

A request arrives when its bytes reach this machine's kernel (Linux's receive timestamps, ``SO_TIMESTAMPNS``), not
when a server thread gets round to it: the API stands for a service on other machines, which the test's own load
does not slow down. On a busy 2-core machine this process's threads woke up to 130 ms after their request came in,
bunching paced requests at the bucket into 429s no real API would have answered. Elsewhere: when it is read.

What a client sees (urllib.request): ``429``/``503``/``500`` -> ``urllib.error.HTTPError`` with that ``.code``
(429 carries ``Retry-After: <seconds>``, possibly fractional, e.g. ``0.2``); ``timeout`` -> the server sleeps
``timeout_sleep`` s before a normal 200, so a client with a shorter timeout gets ``TimeoutError``
(``socket.timeout``); ``reset`` -> the connection is closed with SO_LINGER (1, 0), i.e. a TCP RST and no response:
``ConnectionResetError`` (rarely ``http.client.RemoteDisconnected``).

    with ChaosApi(fail_ids={3: ("429", 1)}, retry_after=0.1) as api:
        urllib.request.urlopen(f"{api.url}/items/3", timeout=1)   # HTTPError 429, Retry-After: 0.1
        urllib.request.urlopen(f"{api.url}/items/3", timeout=1)   # 200 {"id": 3, "value": 6}

Manual use: ``python tests/support/chaos_api.py --port 8080 --rate-429 0.1 --fail-id 3:503:2`` (Ctrl-C stops).
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import math
import random
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

if not __package__:  # run as a script: make `support` importable
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.local_server import LocalHttpServer  # noqa: E402

FAULT_KINDS = ("429", "503", "500", "timeout", "reset")
_RATES = tuple(f"rate_{k}" for k in FAULT_KINDS)  # also the order of the cumulative random draw
_SETTINGS = (*_RATES, "retry_after", "timeout_sleep", "fail_ids", "max_per_second", "burst", "faults_while", "seed",
             "latency_s")
_ITEM = re.compile(r"^/items/(-?\d+)/?$")
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not name it


class _StampedReader(io.RawIOBase):
    """A connection's bytes, and the kernel's receive time (``time.time()`` scale) of the last ones read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.stamp = sock, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(len(buffer), socket.CMSG_SPACE(16))
        except ConnectionResetError:  # the client went away (a killed worker): the end of its requests
            return 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= 16:
                seconds, nanoseconds = struct.unpack("qq", payload[:16])
                self.stamp = seconds + nanoseconds * 1e-9
        buffer[:len(data)] = data
        return len(data)


class _ArrivalBucket:
    """A token bucket (``rate`` per second, ``capacity``) that judges requests in the order they arrived, though
    their threads read them in another: admitting one must leave every request admitted after it (in arrival order)
    within the bucket too. The requests of the last ``HORIZON_S`` are kept for that; older ones are folded into the
    bucket's state."""

    HORIZON_S = 1.0  # a request read this long after it arrived is judged as arriving when the last folded one did

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.base_t, self.base_tokens = now, capacity  # the bucket after the folded requests
        self.recent: list[float] = []  # arrival times of the admitted requests not folded yet, in order

    def admit(self, arrived: float, now: float) -> float | None:
        """Admit a request that arrived at ``arrived``: None, or (over the limit) the seconds until it would be."""
        self._fold(now - self.HORIZON_S)
        arrived = max(arrived, self.base_t)
        at = bisect.bisect_right(self.recent, arrived)
        tokens, last = self.base_tokens, self.base_t
        for i, t in enumerate([*self.recent[:at], arrived, *self.recent[at:]]):
            tokens, last = min(self.capacity, tokens + (t - last) * self.rate), t
            if tokens < 1.0 and i >= at:  # this one, or one admitted after it, would be over
                return (1.0 - tokens) / self.rate if i == at else 1.0 / self.rate
            tokens -= 1.0
        self.recent.insert(at, arrived)
        return None

    def _fold(self, before: float) -> None:
        while self.recent and self.recent[0] <= before:
            t = self.recent.pop(0)
            self.base_tokens = min(self.capacity, self.base_tokens + (t - self.base_t) * self.rate) - 1.0
            self.base_t = t


def _stamp_arrivals(sock: socket.socket) -> bool:
    """Have the kernel time-stamp what ``sock`` (a listening socket: its connections inherit it) receives."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        return True
    except OSError:
        return False


def _fmt_seconds(s: float) -> str:
    """``Retry-After`` value: whole seconds as an int ("1"), else up to millisecond precision ("0.2")."""
    s = max(0.0, s)
    if float(s).is_integer():
        return str(int(s))
    return f"{math.ceil(round(s * 1000, 6)) / 1000:.3f}".rstrip("0").rstrip(".")  # round: 0.2 * 1000 may be 200.00..1



class ChaosApi(LocalHttpServer):
    """A threaded HTTP JSON API on 127.0.0.1 with injectable faults. See the module docstring.

    Counters (read them freely; they are updated under a lock): ``requests`` (all requests), ``ok`` (normal 200s,
    i.e. not a fault), ``not_found`` (404s), ``faults`` (``Counter`` fault kind -> count, deterministic and random
    alike), ``by_id`` (``Counter`` item id -> requests, faults included), ``over_limit`` (429s from the limiter),
    ``in_flight_max`` (the most normal requests being answered at once: how many calls a job had in flight).
    """

    def __init__(self, *, rate_429: float = 0.0, rate_503: float = 0.0, rate_500: float = 0.0,
                 rate_timeout: float = 0.0, rate_reset: float = 0.0, retry_after: float = 0.2,
                 timeout_sleep: float = 3.0, seed: int = 0, fail_ids: dict[int, tuple[str, int]] | None = None,
                 max_per_second: float | None = None, burst: float | None = None,
                 faults_while: Callable[[], bool] | None = None, latency_s: float = 0.0, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self._lock = threading.Lock()
        self._stamped = False  # the kernel time-stamps the requests' arrival (``start``)
        super().__init__(host, port)
        self.rate_429 = self.rate_503 = self.rate_500 = self.rate_timeout = self.rate_reset = 0.0
        self.retry_after, self.timeout_sleep = 0.2, 3.0
        self.max_per_second: float | None = None
        self.burst: float | None = None
        self.faults_while: Callable[[], bool] | None = None
        self.latency_s = 0.0
        self._bucket: _ArrivalBucket | None = None
        self._fail_ids: dict[int, list[Any]] = {}
        self._rng = random.Random(seed)
        self.reset_counters()
        self.configure(rate_429=rate_429, rate_503=rate_503, rate_500=rate_500, rate_timeout=rate_timeout,
                       rate_reset=rate_reset, retry_after=retry_after, timeout_sleep=timeout_sleep,
                       fail_ids=fail_ids or {}, max_per_second=max_per_second, burst=burst,
                       faults_while=faults_while, latency_s=latency_s)

    def start(self) -> Any:
        started = self._server is None
        super().start()
        if started:  # before anyone knows the port: every request is stamped
            self._stamped = _stamp_arrivals(self._server.socket)
        return self

    # ---- configuration and counters -------------------------------------------------------------------------

    def configure(self, **settings: Any) -> None:
        """Change settings at run time (thread-safe): any of ``rate_429``, ``rate_503``, ``rate_500``,
        ``rate_timeout``, ``rate_reset``, ``retry_after``, ``timeout_sleep``, ``fail_ids`` (replaces the previous
        map and its remaining counts), ``max_per_second`` (``None`` disables the limiter; setting it refills the
        bucket), ``burst`` (the bucket's capacity; ``None``: ``max(1, max_per_second)``), ``faults_while`` (a
        callable gating the random faults, or ``None``), ``seed`` (re-seeds the random draws)."""
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"unknown ChaosApi setting(s): {sorted(unknown)}; known: {list(_SETTINGS)}")
        for name in _RATES:
            if name in settings and not 0.0 <= float(settings[name]) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {settings[name]!r}")
        fail_ids = None
        if "fail_ids" in settings:
            fail_ids = {}
            for item_id, (kind, times) in (settings["fail_ids"] or {}).items():
                if str(kind) not in FAULT_KINDS:
                    raise ValueError(f"fault kind for id {item_id} must be one of {FAULT_KINDS}, got {kind!r}")
                fail_ids[int(item_id)] = [str(kind), int(times)]
        mps = settings.get("max_per_second")
        if mps is not None and float(mps) <= 0:
            raise ValueError(f"max_per_second must be > 0 or None, got {mps!r}")
        burst = settings.get("burst")
        if burst is not None and float(burst) < 1:
            raise ValueError(f"burst must be >= 1 or None, got {burst!r}")
        with self._lock:
            for name in _RATES:
                if name in settings:
                    setattr(self, name, float(settings[name]))
            if "retry_after" in settings:
                self.retry_after = float(settings["retry_after"])
            if "timeout_sleep" in settings:
                self.timeout_sleep = float(settings["timeout_sleep"])
            if "latency_s" in settings:
                self.latency_s = float(settings["latency_s"])
            if fail_ids is not None:
                self._fail_ids = fail_ids
            if "faults_while" in settings:
                self.faults_while = settings["faults_while"]
            if "burst" in settings:
                self.burst = None if burst is None else float(burst)
            if "max_per_second" in settings or "burst" in settings:
                if "max_per_second" in settings:
                    self.max_per_second = None if mps is None else float(mps)
                self._bucket = None if self.max_per_second is None else \
                    _ArrivalBucket(self.max_per_second, self._capacity(), time.monotonic())
            if "seed" in settings:
                self._rng = random.Random(settings["seed"])

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.ok = self.not_found = self.over_limit = 0
            self.in_flight = self.in_flight_max = 0  # requests being answered (sleeping their latency) at once
            self.faults: Counter[str] = Counter()
            self.by_id: Counter[int] = Counter()
            self._arrivals: list[tuple[float, int | None]] = []

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the counters."""
        with self._lock:
            return {"requests": self.requests, "ok": self.ok, "not_found": self.not_found,
                    "over_limit": self.over_limit, "faults": dict(self.faults), "by_id": dict(self.by_id),
                    "in_flight_max": self.in_flight_max}

    def arrivals(self, item_id: int | None = None) -> list[float]:
        """``time.monotonic()`` of each request's arrival (all requests, or those for ``item_id``), in order."""
        with self._lock:
            return sorted(t for t, i in self._arrivals if item_id is None or i == item_id)

    def fail_ids_remaining(self) -> dict[int, tuple[str, int]]:
        with self._lock:
            return {i: (k, n) for i, (k, n) in self._fail_ids.items()}

    # ---- request handling -----------------------------------------------------------------------------------

    def _capacity(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.max_per_second or 0.0)

    def _decide(self, item_id: int | None, stamp: float | None = None) -> tuple[str, float]:
        """Under the lock: count the request that arrived at ``stamp`` (the kernel's, ``time.time()`` scale; None:
        now) and pick what to do: ("limit", retry_after) | (fault kind, 0) | ("normal", 0)."""
        with self._lock:
            self.requests += 1
            now = time.monotonic()
            arrived = now if stamp is None else min(now, now - (time.time() - stamp))
            self._arrivals.append((arrived, item_id))
            if item_id is not None:
                self.by_id[item_id] += 1
            if self._bucket is not None:
                short = self._bucket.admit(arrived, now)
                if short is not None:
                    self.over_limit += 1
                    return "limit", short
            planned = self._fail_ids.get(item_id) if item_id is not None else None
            if planned is not None and planned[1] > 0:
                planned[1] -= 1
                self.faults[planned[0]] += 1
                return planned[0], 0.0
            if self.faults_while is not None and not self.faults_while():
                return "normal", 0.0
            draw, edge = self._rng.random(), 0.0
            for kind, name in zip(FAULT_KINDS, _RATES):
                edge += getattr(self, name)
                if draw < edge:
                    self.faults[kind] += 1
                    return kind, 0.0
            return "normal", 0.0

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

            def setup(self) -> None:
                super().setup()
                self.stamped = _StampedReader(self.connection) if api._stamped else None
                if self.stamped is not None:
                    self.rfile.close()  # the socket's own reader holds it open (``_reset`` must close it for real)
                    self.rfile = io.BufferedReader(self.stamped)

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reset(self) -> None:
                # RST instead of FIN: linger on, timeout 0, then close the socket for real (drop the rfile's
                # reference too, or close() is deferred). The server's later shutdown()/close() errors are ignored.
                self.close_connection = True
                sock = self.connection
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()
                sock.close()

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                m = _ITEM.match(self.path.split("?", 1)[0])
                item_id = int(m.group(1)) if m else None
                stamp = None
                if self.stamped is not None:  # this request's, not one before it on the connection
                    stamp, self.stamped.stamp = self.stamped.stamp, None
                action, wait = api._decide(item_id, stamp)
                try:
                    if action == "limit":
                        self._json(429, {"error": "rate limit exceeded"}, {"Retry-After": _fmt_seconds(wait)})
                        return
                    if action == "429":
                        self._json(429, {"error": "too many requests"}, {"Retry-After": _fmt_seconds(api.retry_after)})
                        return
                    if action == "503":
                        self._json(503, {"error": "service unavailable"})
                        return
                    if action == "500":
                        self._json(500, {"error": "internal server error"})
                        return
                    if action == "reset":
                        self._reset()
                        return
                    if action == "timeout" and api._stopping.wait(api.timeout_sleep):
                        self.close_connection = True  # stopping: don't bother answering
                        return
                    if item_id is None or item_id < 0:
                        with api._lock:
                            api.not_found += 1
                        self._json(404, {"error": "not found"})
                        return
                    if action == "normal":
                        with api._lock:
                            api.ok += 1
                            api.in_flight += 1
                            api.in_flight_max = max(api.in_flight_max, api.in_flight)
                        try:
                            if api.latency_s > 0:
                                time.sleep(api.latency_s)
                        finally:
                            with api._lock:
                                api.in_flight -= 1
                    self._json(200, {"id": item_id, "value": item_id * 2})
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out)
                    self.close_connection = True

            do_HEAD = do_GET  # noqa: N815

        return Handler


def _fail_id(text: str) -> tuple[int, tuple[str, int]]:
    try:
        item_id, kind, times = text.split(":")
        return int(item_id), (kind, int(times))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID:KIND:TIMES (e.g. 3:503:2), got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A flaky, rate-limited JSON API: GET /items/<id>.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    for kind in FAULT_KINDS:
        p.add_argument(f"--rate-{kind}", type=float, default=0.0, metavar="P", help=f"probability of a {kind}")
    p.add_argument("--retry-after", type=float, default=0.2, help="Retry-After seconds of injected 429s")
    p.add_argument("--timeout-sleep", type=float, default=3.0, help="seconds a 'timeout' waits before answering")
    p.add_argument("--max-per-second", type=float, default=None, help="strict token-bucket limit")
    p.add_argument("--burst", type=float, default=None, help="the token bucket's capacity (default: the rate)")
    p.add_argument("--fail-id", type=_fail_id, action="append", default=[], metavar="ID:KIND:TIMES")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    api = ChaosApi(**{f"rate_{k}": getattr(a, f"rate_{k}") for k in FAULT_KINDS}, retry_after=a.retry_after,
                   timeout_sleep=a.timeout_sleep, max_per_second=a.max_per_second, burst=a.burst,
                   fail_ids=dict(a.fail_id), seed=a.seed, host=a.host, port=a.port)
    # Ctrl-C (and SIGTERM) stop it, even when started in the background, where SIGINT is inherited as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with api:
        print(f"ChaosApi serving on {api.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    print(api.stats())


if __name__ == "__main__":
    main()
