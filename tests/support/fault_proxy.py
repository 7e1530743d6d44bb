"""An HTTP reverse proxy that injects AWS-style faults in front of a moto server (standard library only).

Point boto3 at ``proxy.url`` instead of the moto endpoint. Every request is forwarded (method, path + query,
headers, body) to the upstream with ``http.client`` and the upstream answer is returned verbatim (status, headers
except hop-by-hop ones, body). With the configured probabilities the proxy answers instead, without forwarding:

============  ===========================================  ==================================================
kind          S3 (no ``X-Amz-Target`` header)               DynamoDB (``X-Amz-Target: DynamoDB_20120810.*``)
============  ===========================================  ==================================================
``500``       500 ``InternalError`` (XML)                  500 ``InternalServerError`` (JSON)
``503``       503 ``SlowDown``                             503 ``ServiceUnavailable``
``throttle``  503 ``SlowDown``                             400 ``ProvisionedThroughputExceededException``
``outage``    503 ``ServiceUnavailable`` (every request    503 ``ServiceUnavailable``
              for the next N seconds, see ``outage()``)
============  ===========================================  ==================================================

Faults *after* forwarding (the request reached the store and took effect, its answer is lost on the way back — what
a 5xx behind a load balancer or a read timeout looks like to a client): ``lose_responses(method=, path_contains=,
header=, times=, kind=)`` forwards matching requests, then answers ``kind`` (``"500"``/``"503"``, the bodies above)
or, with ``kind="reset"``, closes the connection without an answer. Counted in ``responses_lost``.

Faults on chosen requests, *before* forwarding (they never reach the store): ``fail_requests(method=,
path_contains=, header=, times=, kind=)`` answers the next ``times`` matching requests with ``kind`` (``"500"``,
``"503"``, ``"throttle"``, ``"outage"``: the bodies above) without forwarding them, counted in ``injected`` like the
random ones. Deterministic, where a rate of 1.0 healed by another thread races the client's retries.

A store that ignores a request header (an S3-compatible server without conditional writes):
``ignore_request_headers("If-None-Match")`` drops those headers before forwarding.

Other JSON services (any ``X-Amz-Target``) get the DynamoDB-style JSON bodies without the DynamoDB namespace.
botocore parses these bodies into ``ClientError`` codes, and its ``standard``/``adaptive`` retry modes retry all of
them (5xx statuses and throttling codes), so clients with e.g. ``Config(retries={"mode": "adaptive",
"max_attempts": 8})`` survive moderate fault rates. Requests under ``/moto-api/`` are never faulted.

Request bodies: with ``Content-Length`` they are forwarded as is. A ``Transfer-Encoding: chunked`` body is de-chunked
and forwarded with a ``Content-Length``; if it was also ``Content-Encoding: aws-chunked`` (boto3's unsigned streaming
upload with a trailing checksum, which botocore only uses over https) the aws-chunked markers are removed and the
trailing checksum becomes an ordinary header, so the upstream sees a plain PUT. ``Expect: 100-continue`` is answered
by the proxy itself and not forwarded.

    with FaultProxy(moto_url, rate_503=0.3) as proxy:
        s3 = boto3.client("s3", endpoint_url=proxy.url, config=Config(retries={"mode": "standard", "max_attempts": 10}))
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import random
import socket
import struct
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any

from support.local_server import LocalHttpServer

FAULT_KINDS = ("500", "503", "throttle")  # order of the cumulative random draw
_RATES = tuple(f"rate_{k}" for k in FAULT_KINDS)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade"}
_DDB = "com.amazonaws.dynamodb.v20120810#"

# kind -> (S3 status, S3 code, S3 message), (JSON status, JSON code, JSON message)
_ERRORS: dict[str, tuple[tuple[int, str, str], tuple[int, str, str]]] = {
    "500": ((500, "InternalError", "injected"), (500, "InternalServerError", "injected")),
    "503": ((503, "SlowDown", "injected: please reduce your request rate"),
            (503, "ServiceUnavailable", "injected")),
    "throttle": ((503, "SlowDown", "injected: please reduce your request rate"),
                 (400, "ProvisionedThroughputExceededException", "injected: throughput exceeded")),
    "outage": ((503, "ServiceUnavailable", "injected outage"), (503, "ServiceUnavailable", "injected outage")),
}



@dataclasses.dataclass
class _LoseRule:
    """Forward requests that match, then lose their answers (``times`` of them; None: all)."""

    method: str | None
    path_contains: str | None
    header: str | None
    times: int | None
    kind: str

    def matches(self, method: str, path: str, headers: Any) -> bool:
        return ((self.method is None or method == self.method)
                and (self.path_contains is None or self.path_contains in urllib.parse.unquote(path))
                and (self.header is None or self.header in headers)
                and (self.times is None or self.times > 0))


class FaultProxy(LocalHttpServer):
    """See the module docstring.

    Counters: ``requests`` (all requests received), ``classified`` (per label of the ``classify(method, path)``
    given, if any), ``forwarded`` (answered by the upstream), ``injected``
    (``Counter`` kind -> count: ``"500"``, ``"503"``, ``"throttle"``, ``"outage"``), ``upstream_errors`` (the
    upstream could not be reached: answered 502). ``history`` keeps the last 1000 requests as dicts (method, path,
    target, headers, outcome) for tests that want to see what a client actually sent.
    """

    def __init__(self, upstream_url: str, rate_500: float = 0.0, rate_503: float = 0.0, rate_throttle: float = 0.0,
                 seed: int = 0, *, host: str = "127.0.0.1", port: int = 0, upstream_timeout: float = 60.0,
                 classify: Any = None) -> None:
        u = urllib.parse.urlsplit(upstream_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream_url must be http://host[:port], got {upstream_url!r}")
        self.upstream_url = upstream_url.rstrip("/")
        self._up_host, self._up_port = u.hostname, u.port or 80
        self._up_prefix = u.path.rstrip("/")
        self.upstream_timeout = upstream_timeout
        self.classify = classify  # (method, path) -> a label: ``classified`` counts requests per label
        super().__init__(host, port)
        self._lock = threading.Lock()
        self.rate_500 = self.rate_503 = self.rate_throttle = 0.0
        self._outage_until = 0.0
        self._lose: list[_LoseRule] = []
        self._fail: list[_LoseRule] = []  # fail_requests: the same matching, applied before forwarding
        self._ignored_headers: set[str] = set()
        self._rng = random.Random(seed)
        self.reset_counters()
        self.configure(rate_500=rate_500, rate_503=rate_503, rate_throttle=rate_throttle)

    # ---- configuration and counters -------------------------------------------------------------------------

    def configure(self, **settings: Any) -> None:
        """Change ``rate_500``, ``rate_503``, ``rate_throttle`` (probabilities in [0, 1]) or ``seed`` at run time."""
        unknown = set(settings) - {*_RATES, "seed"}
        if unknown:
            raise TypeError(f"unknown FaultProxy setting(s): {sorted(unknown)}; known: {[*_RATES, 'seed']}")
        for name in _RATES:
            if name in settings and not 0.0 <= float(settings[name]) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {settings[name]!r}")
        with self._lock:
            for name in _RATES:
                if name in settings:
                    setattr(self, name, float(settings[name]))
            if "seed" in settings:
                self._rng = random.Random(settings["seed"])

    def outage(self, seconds: float) -> None:
        """Answer every request with 503 ServiceUnavailable for the next ``seconds`` (0 ends an outage)."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def lose_responses(self, *, method: str | None = None, path_contains: str | None = None,
                       header: str | None = None, times: int | None = None, kind: str = "500") -> None:
        """Forward matching requests, then answer ``kind`` instead of the upstream's answer (see the module doc)."""
        if kind not in ("500", "503", "reset"):
            raise ValueError(f"kind must be '500', '503' or 'reset', got {kind!r}")
        with self._lock:
            self._lose.append(_LoseRule(method, path_contains, header, times, kind))

    def fail_requests(self, *, method: str | None = None, path_contains: str | None = None,
                      header: str | None = None, times: int | None = None, kind: str = "503") -> None:
        """Answer matching requests ``kind`` without forwarding them (``times`` of them; None: all; see the module
        doc). Checked before the random faults."""
        if kind not in _ERRORS:
            raise ValueError(f"kind must be one of {sorted(_ERRORS)}, got {kind!r}")
        with self._lock:
            self._fail.append(_LoseRule(method, path_contains, header, times, kind))

    def ignore_request_headers(self, *names: str) -> None:
        """Drop these request headers before forwarding (case-insensitive)."""
        with self._lock:
            self._ignored_headers |= {n.lower() for n in names}

    def clear_rules(self) -> None:
        """Forget ``lose_responses`` and ``fail_requests`` rules and ignored headers."""
        with self._lock:
            self._lose, self._fail, self._ignored_headers = [], [], set()

    def _lost(self, method: str, path: str, headers: Any) -> str | None:
        """Under the lock: the kind of answer to give instead of the upstream's, for a request already forwarded."""
        with self._lock:
            for rule in self._lose:
                if rule.matches(method, path, headers):
                    if rule.times is not None:
                        rule.times -= 1
                    self.responses_lost += 1
                    return rule.kind
            return None

    @property
    def in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.forwarded = self.upstream_errors = self.responses_lost = 0
            self.classified: Counter[str] = Counter()
            self.injected: Counter[str] = Counter()
            self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "forwarded": self.forwarded, "injected": dict(self.injected),
                    "upstream_errors": self.upstream_errors, "responses_lost": self.responses_lost}

    # ---- request handling -----------------------------------------------------------------------------------

    def _decide(self, path: str, method: str | None = None, headers: Any = None) -> str | None:
        """Under the lock: count the request, return the fault kind to inject or None to forward."""
        with self._lock:
            self.requests += 1
            if path.startswith("/moto-api"):
                return None
            for rule in self._fail:
                if method is not None and rule.matches(method, path, headers if headers is not None else {}):
                    if rule.times is not None:
                        rule.times -= 1
                    self.injected[rule.kind] += 1
                    return rule.kind
            if time.monotonic() < self._outage_until:
                self.injected["outage"] += 1
                return "outage"
            draw, edge = self._rng.random(), 0.0
            for kind, name in zip(FAULT_KINDS, _RATES):
                edge += getattr(self, name)
                if draw < edge:
                    self.injected[kind] += 1
                    return kind
            return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

            def log_message(self, *args: Any) -> None:
                pass

            # -- body ------------------------------------------------------------------------------------------

            def _read_chunked(self) -> tuple[bytes, list[tuple[str, str]]]:
                parts, trailers = [], []
                while True:
                    line = self.rfile.readline(65537)
                    if not line:
                        raise ConnectionError("client closed the connection inside a chunked body")
                    size = int(line.split(b";", 1)[0].strip(), 16)  # chunk extensions (";chunk-signature=") dropped
                    if size == 0:
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline(65537)  # CRLF after the chunk data
                while True:  # trailer fields, then an empty line
                    line = self.rfile.readline(65537)
                    if not line or line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    trailers.append((name.strip(), value.strip()))
                return b"".join(parts), trailers

            def _read_body(self, headers: list[tuple[str, str]]) -> tuple[bytes, list[tuple[str, str]]]:
                """The request body and the headers to forward it with (Content-Length, no Transfer-Encoding)."""
                te = (self.headers.get("Transfer-Encoding") or "").lower()
                if "chunked" in te:
                    body, trailers = self._read_chunked()
                    ce = [t.strip() for t in (self.headers.get("Content-Encoding") or "").split(",") if t.strip()]
                    if "aws-chunked" in ce:  # the HTTP chunks were the aws-chunked framing: make it a plain body
                        ce.remove("aws-chunked")
                        drop = {"content-encoding", "x-amz-decoded-content-length", "x-amz-trailer"}
                        headers = [(k, v) for k, v in headers if k.lower() not in drop]
                        if ce:
                            headers.append(("Content-Encoding", ", ".join(ce)))
                        headers = [(k, "UNSIGNED-PAYLOAD" if k.lower() == "x-amz-content-sha256"
                                    and v.startswith("STREAMING-") else v) for k, v in headers]
                    headers += trailers
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "expect")]
                if body or self.command in ("PUT", "POST", "PATCH"):
                    headers.append(("Content-Length", str(len(body))))
                return body, headers

            # -- answers ---------------------------------------------------------------------------------------

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, reason: str | None = None,
                      keep_length: bool = False) -> None:
                self.send_response_only(status, reason)
                for k, v in headers:
                    if k.lower() in _HOP_BY_HOP or (k.lower() == "content-length" and not keep_length):
                        continue
                    self.send_header(k, v)
                if not keep_length:
                    self.send_header("Content-Length", str(len(body)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(body)

            def _inject(self, kind: str, target: str | None) -> None:
                request_id = uuid.uuid4().hex.upper()[:16]
                (s3_status, s3_code, s3_msg), (j_status, j_code, j_msg) = _ERRORS[kind]
                if target is None:
                    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                            f"<Error><Code>{s3_code}</Code><Message>{s3_msg}</Message>"
                            f"<RequestId>{request_id}</RequestId></Error>").encode()
                    headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
                    status = s3_status
                else:
                    code = (_DDB if target.startswith("DynamoDB_") else "") + j_code
                    body = json.dumps({"__type": code, "message": j_msg}).encode()
                    headers = [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-RequestId", request_id),
                               ("x-amz-crc32", str(zlib.crc32(body)))]
                    status = j_status
                self._send(status, headers, body)

            def _handle(self) -> None:
                target = self.headers.get("X-Amz-Target")
                raw_headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
                record: dict[str, Any] = {"method": self.command, "path": self.path, "target": target,
                                          "headers": dict(self.headers.items())}
                body, fwd_headers = self._read_body(raw_headers)  # always: keeps the connection in sync
                record["body_length"] = len(body)
                kind = proxy._decide(self.path, self.command, self.headers)
                if proxy.classify is not None:
                    label = proxy.classify(self.command, self.path)
                    with proxy._lock:
                        proxy.classified[label] += 1
                if kind is not None:
                    record["outcome"] = kind
                    with proxy._lock:
                        proxy.history.append(record)
                    self._inject(kind, target)
                    return
                with proxy._lock:
                    ignored = proxy._ignored_headers
                fwd_headers = [(k, v) for k, v in fwd_headers if k.lower() not in ignored]
                conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=proxy.upstream_timeout)
                try:
                    conn.putrequest(self.command, proxy._up_prefix + self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    for k, v in fwd_headers:
                        conn.putheader(k, v)
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, reason, headers = resp.status, resp.reason, resp.getheaders()
                except (OSError, http.client.HTTPException) as e:
                    record["outcome"] = f"upstream error: {e!r}"
                    with proxy._lock:
                        proxy.upstream_errors += 1
                        proxy.history.append(record)
                    msg = f"FaultProxy: upstream {proxy.upstream_url} failed: {e!r}".encode()
                    self.close_connection = True
                    self._send(502, [("Content-Type", "text/plain")], msg)
                    return
                finally:
                    conn.close()
                record["outcome"] = status
                with proxy._lock:
                    proxy.forwarded += 1
                    proxy.history.append(record)
                lost = proxy._lost(self.command, self.path, self.headers)
                if lost is not None:  # it took effect upstream; the client never hears so
                    record["outcome"] = f"{status}, answered {lost}"
                    if lost == "reset":
                        self.close_connection = True
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    self._inject(lost, target)
                    return
                # HEAD, 204 and 304 answers have no body: their Content-Length (if any) is the upstream's.
                no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
                self._send(status, headers, data, reason, keep_length=no_body)

            def _guarded(self) -> None:
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionError):
                    self.close_connection = True
                except ValueError as e:  # a malformed chunked body or Content-Length: the connection is out of sync
                    self.close_connection = True
                    self._send(400, [("Content-Type", "text/plain")], f"FaultProxy: bad request body: {e}".encode())

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _guarded  # noqa: N815

        return Handler
