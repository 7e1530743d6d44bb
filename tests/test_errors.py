"""Item error classification, backoff and the circuit breaker: plain Python, no servers."""

from __future__ import annotations

import email.utils
import http.client
import io
import socket
import time
import urllib.error

import pytest
from botocore.exceptions import ClientError

from slurmctl.errors import Backoff, CircuitBreaker, ErrorPolicy, ItemError, call_with_retries


def http_error(code: int, retry_after: str | None = None) -> urllib.error.HTTPError:
    headers = http.client.HTTPMessage()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return urllib.error.HTTPError("http://api/x", code, "msg", headers, io.BytesIO(b""))


def aws_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutItem")


@pytest.mark.parametrize("exc, cls, transient", [
    (http_error(429), "throttle", True),
    (http_error(503), "server", True),
    (http_error(500), "server", True),
    (http_error(404), "not_found", False),
    (http_error(400), "client", False),
    (http_error(408), "timeout", True),
    (socket.timeout("timed out"), "timeout", True),
    (urllib.error.URLError(socket.timeout("timed out")), "timeout", True),
    (ConnectionResetError(104, "reset"), "network", True),
    (ConnectionRefusedError(111, "refused"), "network", True),
    (http.client.RemoteDisconnected("closed"), "network", True),
    (urllib.error.URLError(ConnectionRefusedError(111, "refused")), "network", True),
    (aws_error("ThrottlingException", 400), "throttle", True),
    (aws_error("SlowDown", 503), "throttle", True),
    (aws_error("InternalError", 500), "server", True),
    (aws_error("AccessDenied", 403), "client", False),
    (KeyError("name"), "handler", False),
    (ValueError("bad"), "handler", False),
    (ItemError("over quota", error_class="quota"), "quota", False),
])
def test_builtin_classes(exc, cls, transient):
    got = ErrorPolicy().classify(exc)
    assert (got.error_class, got.transient) == (cls, transient)


def test_config_maps_exception_types_and_status_codes_and_transience():
    class QuotaExceeded(Exception):
        pass

    policy = ErrorPolicy(exceptions={"QuotaExceeded": "throttle", "builtins.KeyError": "not_found"},
                         http_status={402: "quota"}, transient=["network", "quota", "throttle"])
    assert policy.classify(QuotaExceeded()).error_class == "throttle"
    assert policy.classify(KeyError("x")).error_class == "not_found"
    got = policy.classify(http_error(402))
    assert (got.error_class, got.transient, got.status) == ("quota", True, 402)
    assert policy.classify(http_error(503)).transient is False  # server is no longer transient here


def test_retry_after_seconds_and_http_date():
    assert ErrorPolicy().classify(http_error(429, "7")).retry_after == 7.0
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= ErrorPolicy().classify(http_error(503, future)).retry_after <= 31
    assert ErrorPolicy().classify(ItemError("x", retry_after=3)).retry_after == 3


def test_backoff_grows_is_jittered_capped_and_honours_retry_after():
    b = Backoff(base_s=1, max_s=8, retry_after_max_s=60)
    for attempt, cap in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = [b.delay(attempt) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1
    assert b.delay(1, retry_after=20) == 20
    assert b.delay(1, retry_after=600) == 60


def test_call_with_retries_retries_transient_then_succeeds():
    sleeps, calls = [], iter([http_error(503), http_error(429, "2"), "ok"])

    def func():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    out = call_with_retries(func, ErrorPolicy(), Backoff(0.1, 1), max_attempts=3, sleep=sleeps.append)
    assert (out.ok, out.result, out.attempts) == (True, "ok", 3)
    assert len(sleeps) == 2 and sleeps[1] >= 2  # Retry-After honoured


def test_permanent_errors_are_not_retried_and_budget_is_respected():
    sleeps = []
    out = call_with_retries(lambda: (_ for _ in ()).throw(http_error(404)), ErrorPolicy(), Backoff(), 5,
                            sleep=sleeps.append)
    assert (out.ok, out.attempts, out.error.error_class, sleeps) == (False, 1, "not_found", [])
    out = call_with_retries(lambda: (_ for _ in ()).throw(http_error(503)), ErrorPolicy(), Backoff(0, 0), 4,
                            sleep=sleeps.append)
    assert (out.ok, out.attempts, out.error.error_class, len(sleeps)) == (False, 4, "server", 3)


def test_circuit_breaker_trips_when_one_transient_class_dominates():
    breaker = CircuitBreaker(window=10, threshold=0.8, min_attempts=5)
    for _ in range(4):
        breaker.record("throttle")
    assert not breaker.open  # 4 of 4, but fewer than min_attempts attempts
    breaker.record(None)
    assert breaker.open and breaker.tripped_by == "throttle"  # 4 of 5 = 0.8: at the threshold


def test_circuit_breaker_threshold_counts_the_last_window_attempts():
    breaker = CircuitBreaker(window=10, threshold=0.8, min_attempts=5)
    for cls in [None, None, "server", "server", "server"]:
        breaker.record(cls)
    for seen in range(5, 9):  # 3/5, 4/6, 5/7, 6/8 server errors so far: below 0.8
        assert not breaker.open, seen
        breaker.record("server")
    assert not breaker.open  # 7/9
    breaker.record("server")  # 8 of the last 10
    assert breaker.tripped_by == "server"
    stale = CircuitBreaker(window=4, threshold=0.8, min_attempts=4)
    for cls in [None, None, None, None, None, "network", "network", "network"]:
        stale.record(cls)  # old successes slide out of the window: 3 of the last 4 is 0.75
    assert not stale.open
    stale.record("network")  # 4 of the last 4
    assert stale.tripped_by == "network"


def test_circuit_breaker_window_spans_at_least_the_calls_in_flight_at_once():
    # 128 calls in flight: 16 answers of 429 in a row are one moment at the API, not a trend.
    bunched = CircuitBreaker(window=20, threshold=0.8, min_attempts=10)
    bunched.in_flight(128)
    for cls in [None] * 40 + ["throttle"] * 16 + [None] * 40:
        bunched.record(cls)
    assert not bunched.open
    # An API that is down still trips it, once as many answers as half the calls in flight (10 of 20) are in.
    down = CircuitBreaker(window=20, threshold=0.8, min_attempts=10)
    down.in_flight(128)
    for seen in range(63):
        down.record("server")
        assert not down.open, seen
    down.record("server")
    assert down.tripped_by == "server"
    # And the window is the last 128: after 200 successes, 102 failures in a row are not 0.8 of it, 103 are.
    mixed = CircuitBreaker(window=20, threshold=0.8, min_attempts=10)
    mixed.in_flight(128)
    for cls in [None] * 200 + ["network"] * 102:
        mixed.record(cls)
    assert not mixed.open
    mixed.record("network")
    assert mixed.tripped_by == "network"


def test_circuit_breaker_ignores_permanent_classes_and_mixed_errors():
    breaker = CircuitBreaker(window=10, threshold=0.8, min_attempts=5)
    for _ in range(10):
        breaker.record("not_found")
    assert not breaker.open
    for cls in ["throttle", "server", None, "network", "throttle"] * 2:
        breaker.record(cls)
    assert not breaker.open
