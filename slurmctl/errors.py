"""Classifying item errors, and retrying one item with backoff: plain Python, no Prefect, Dask or AWS types.

Every exception a handler raises for an item gets an error class. Built in:

=============  ======================================================  =========
class          what                                                    default
=============  ======================================================  =========
``network``    connection refused/reset, DNS, broken pipe              transient
``timeout``    socket/HTTP timeouts, HTTP 408                          transient
``throttle``   HTTP 429, AWS throttling codes                          transient
``server``     HTTP 5xx                                                transient
``not_found``  HTTP 404                                                permanent
``client``     other HTTP 4xx                                          permanent
``handler``    anything else (a bug, bad data)                         permanent
=============  ======================================================  =========

The job config (``errors:``) maps exception types and HTTP codes to classes (built-in or new ones) and says which
classes are transient. A handler can also raise ``ItemError(..., error_class="quota")`` to classify explicitly.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

BUILTIN_CLASSES = ("network", "timeout", "throttle", "server", "not_found", "client", "handler")
DEFAULT_TRANSIENT = frozenset({"network", "timeout", "throttle", "server"})
AWS_THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException", "SlowDown",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestThrottled", "LimitExceededException", "TransactionInProgressException"})


class ItemError(Exception):
    """Raise from a handler to classify an item's failure explicitly (and optionally ask for a delay)."""

    def __init__(self, message: str, *, error_class: str | None = None, status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Classified:
    error_class: str
    transient: bool
    error_type: str
    message: str
    status: int | None = None
    retry_after: float | None = None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, for urllib, requests, httpx, botocore and look-alikes."""
    for candidate in (getattr(exc, "status", None), getattr(exc, "status_code", None), getattr(exc, "code", None)):
        if isinstance(candidate, int) and 100 <= candidate <= 599:
            return candidate
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    status = getattr(response, "status_code", None) or getattr(response, "status", None)
    return status if isinstance(status, int) else None


def _headers(exc: BaseException) -> Any:
    headers = getattr(exc, "headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        if headers is None and isinstance(response, dict):
            headers = response.get("ResponseMetadata", {}).get("HTTPHeaders")
    return headers


def retry_after_seconds(exc: BaseException) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), from the exception's response headers."""
    explicit = getattr(exc, "retry_after", None)
    if isinstance(explicit, (int, float)):
        return float(explicit)
    headers = _headers(exc)
    if headers is None:
        return None
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")
    except Exception:
        return None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _aws_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _mro_names(exc: BaseException) -> list[str]:
    names = []
    for cls in type(exc).__mro__:
        names += [f"{cls.__module__}.{cls.__qualname__}", cls.__name__]
    return names


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    reason = getattr(exc, "reason", None)  # urllib.error.URLError wraps the socket error
    if isinstance(reason, BaseException) and reason is not exc:
        return _is_timeout(reason)
    return any("Timeout" in n for n in _mro_names(exc)[1::2])


def _is_network(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, BrokenPipeError)):
        return True
    import http.client
    import urllib.error

    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return True
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return True  # DNS failure, refused connection, ...
    if isinstance(exc, OSError) and exc.errno is not None and getattr(exc, "errno", None) in (
            101, 104, 110, 111, 113):  # unreachable, reset, timed out, refused, no route
        return True
    return any(n in ("ConnectionError", "EndpointConnectionError", "ConnectError", "ProtocolError", "ReadError",
                     "RemoteProtocolError") for n in _mro_names(exc)[1::2])


def status_class(status: int) -> str | None:
    if status == 429:
        return "throttle"
    if status == 408:
        return "timeout"
    if status == 404:
        return "not_found"
    if 500 <= status <= 599:
        return "server"
    if 400 <= status <= 499:
        return "client"
    return None


class ErrorPolicy:
    """How item errors are classified, and which classes are worth retrying."""

    @classmethod
    def of(cls, errors: Any) -> "ErrorPolicy":
        """The policy of a job config's ``errors:`` section (``slurmctl.config.ErrorsConfig``)."""
        return cls(exceptions=errors.exceptions, http_status=errors.http_status, transient=errors.transient)

    def __init__(self, *, exceptions: dict[str, str] | None = None, http_status: dict[int, str] | None = None,
                 transient: Iterable[str] = DEFAULT_TRANSIENT):
        self.exceptions = dict(exceptions or {})
        self.http_status = {int(k): v for k, v in (http_status or {}).items()}
        self.transient = frozenset(transient)

    def classify(self, exc: BaseException) -> Classified:
        status = http_status(exc)
        retry_after = retry_after_seconds(exc)
        error_class = self._class_of(exc, status)
        message = str(exc) or type(exc).__name__
        return Classified(error_class, error_class in self.transient, type(exc).__name__, message[:1000], status,
                          retry_after)

    def _class_of(self, exc: BaseException, status: int | None) -> str:
        for name in _mro_names(exc):  # configured exception types first, most specific class first
            if name in self.exceptions:
                return self.exceptions[name]
        if isinstance(exc, ItemError) and exc.error_class:
            return exc.error_class
        if status is not None and status in self.http_status:
            return self.http_status[status]
        if _aws_code(exc) in AWS_THROTTLING_CODES:
            return "throttle"
        if status is not None and (cls := status_class(status)):
            return cls
        if _is_timeout(exc):
            return "timeout"
        if _is_network(exc):
            return "network"
        return "handler"


@dataclass
class Backoff:
    """Exponential backoff with full jitter, never shorter than the server's ``Retry-After``."""

    base_s: float = 0.5
    max_s: float = 30.0
    retry_after_max_s: float = 120.0
    rng: random.Random | None = None

    @classmethod
    def of(cls, errors: Any) -> "Backoff":
        """The backoff of a job config's ``errors:`` section (``slurmctl.config.ErrorsConfig``)."""
        return cls(errors.backoff_base_s, errors.backoff_max_s, errors.retry_after_max_s)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        delay = (self.rng or random).uniform(cap / 2, cap)  # "equal jitter": spread, but not near zero
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max_s))
        return delay


class CircuitBreaker:
    """Trips when one transient error class dominates the recent attempts of a batch.

    Then the batch stops spending its items against a failing API: the rest are *deferred* to a later retry round
    instead of being marked failed.

    "Recent" is the last ``window`` attempts, or, when more of the batch's calls (or of its worker process's, for
    items in flight) were in flight at once (``in_flight``), the last that many (``min_attempts`` growing in
    proportion). Answers to calls sent together arrive together, and a bunch of them is one moment at the API, not a
    trend: with 128 calls in flight, 16 answers of 429 in a row (the API's burst overrun for an instant, with a
    declared limit pacing the calls) tripped a window of 20, deferring most of the batch to a retry round 10 s later.
    An API that is really down still trips it within one round of the calls in flight, which were sent anyway.
    """

    def __init__(self, window: int = 20, threshold: float = 0.8, min_attempts: int = 10,
                 transient: Iterable[str] = DEFAULT_TRANSIENT):
        self.window, self.min_attempts = window, min_attempts
        self.size, self.needed = window, min_attempts  # the window now, and the attempts it needs before judging
        self.recent: deque[str | None] = deque()
        self.threshold = threshold
        self.transient = frozenset(transient)
        self.tripped_by: str | None = None
        self.counts: Counter[str] = Counter()  # transient outcomes in ``recent`` by class (nearly always none)

    def in_flight(self, calls: int) -> None:
        """``calls`` attempts of the batch are in flight at once: the window spans at least that many."""
        if calls > self.size:
            self.size = calls
            self.needed = -(-self.min_attempts * calls // self.window)

    def record(self, error_class: str | None) -> None:
        self.recent.append(error_class)
        if error_class in self.transient:
            self.counts[error_class] += 1
        while len(self.recent) > self.size:
            old = self.recent.popleft()
            if old in self.transient:
                self.counts[old] -= 1
                if not self.counts[old]:
                    del self.counts[old]
        if len(self.recent) < self.needed or not self.counts:
            return
        cls, n = self.counts.most_common(1)[0]
        if n / len(self.recent) >= self.threshold:
            self.tripped_by = cls

    @property
    def open(self) -> bool:
        return self.tripped_by is not None


@dataclass(slots=True)  # one per item: slots make it a third cheaper to build
class ItemOutcome:
    ok: bool
    result: Any = None
    error: Classified | None = None
    attempts: int = 0


class _Attempts:
    """One item's attempts: what to do after each (succeeded, give up, or wait and try again). Shared by the
    blocking loop (``call_with_retries``) and the async one (``acall_with_retries``), so both retry alike."""

    def __init__(self, policy: ErrorPolicy, backoff: Backoff, max_attempts: int, breaker: CircuitBreaker | None,
                 on_retry: Callable[[Classified, int, float], None] | None):
        self.policy, self.backoff, self.max_attempts = policy, backoff, max_attempts
        self.breaker, self.on_retry = breaker, on_retry
        self.attempt = 0

    def succeeded(self, result: Any) -> ItemOutcome:
        if self.breaker is not None:
            self.breaker.record(None)
        return ItemOutcome(True, result=result, attempts=self.attempt)

    def failed(self, exc: Exception) -> ItemOutcome | float:
        """The outcome when the item gives up; else the seconds to wait before its next attempt."""
        err = self.policy.classify(exc)
        if self.breaker is not None:
            self.breaker.record(err.error_class)
        if (not err.transient or self.attempt >= self.max_attempts
                or (self.breaker is not None and self.breaker.open)):
            return ItemOutcome(False, error=err, attempts=self.attempt)
        wait = self.backoff.delay(self.attempt, err.retry_after)
        if self.on_retry:
            self.on_retry(err, self.attempt, wait)
        return wait


def call_with_retries(func: Callable[[], Any], policy: ErrorPolicy, backoff: Backoff, max_attempts: int,
                      breaker: CircuitBreaker | None = None, sleep: Callable[[float], None] = time.sleep,
                      on_retry: Callable[[Classified, int, float], None] | None = None,
                      first_error: Exception | None = None) -> ItemOutcome:
    """Call ``func`` until it succeeds, fails permanently, exhausts ``max_attempts`` or the breaker opens.

    ``first_error``: the caller made the first attempt itself and it raised this (``ItemRun.one_by_one`` runs each
    item's first attempt inline, since nearly every item succeeds at once); the attempts go on from the second, with
    the same classification, backoff and breaker as if this function had made the first."""
    attempts = _Attempts(policy, backoff, max_attempts, breaker, on_retry)
    if first_error is not None:
        attempts.attempt = 1
        next_step = attempts.failed(first_error)
        if isinstance(next_step, ItemOutcome):
            return next_step
        sleep(next_step)
    while True:
        attempts.attempt += 1
        try:
            result = func()
        except Exception as exc:
            next_step = attempts.failed(exc)
            if isinstance(next_step, ItemOutcome):
                return next_step
            sleep(next_step)
        else:
            return attempts.succeeded(result)


async def acall_with_retries(func: Callable[[], Awaitable[Any]], policy: ErrorPolicy, backoff: Backoff,
                             max_attempts: int, breaker: CircuitBreaker | None = None,
                             sleep: Callable[[float], Awaitable[Any]] | None = None,
                             on_retry: Callable[[Classified, int, float], None] | None = None) -> ItemOutcome:
    """``call_with_retries`` for a coroutine: the backoff is an async sleep, so a retrying item holds up no other."""
    import asyncio

    attempts = _Attempts(policy, backoff, max_attempts, breaker, on_retry)
    while True:
        attempts.attempt += 1
        try:
            result = await func()
        except Exception as exc:
            next_step = attempts.failed(exc)
            if isinstance(next_step, ItemOutcome):
                return next_step
            await (sleep or asyncio.sleep)(next_step)
            if breaker is not None and breaker.open:  # other items tripped it while this one waited: defer it
                return ItemOutcome(False, error=policy.classify(exc), attempts=attempts.attempt)
        else:
            return attempts.succeeded(result)
