"""Rate-limit signals that cannot be read or published are never swallowed.

A worker that cannot read its limit's signal retries soon, logs once per outage, counts the failures in its batch's
metrics, and keeps spending the leases it holds (the backend, which every lease goes through, is the truth). A signal
that cannot be written raises ``SignalNotPublished``, and ``slurmctl pause`` exits 1 saying what to do.

Unit tests run the real SQLite backend on a fake clock; the others use a moto server over HTTP with a FaultProxy in
front of the S3 signal store.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from support.fault_proxy import FaultProxy
from support.jobs import run_cli

from slurmctl.blocks import rate_limiter
from slurmctl.blocks.manifest_store import store_from_uri
from slurmctl.blocks.rate_limiter import DynamoDBRateLimiter, LocalRateLimiter, limiter_from_config
from slurmctl.handler import BatchContext
from slurmctl.ratelimit.lanes import US, LimitSpec, Signal, SignalNotPublished
from slurmctl.ratelimit.leaser import Leaser


# --- a worker's side, on a fake clock ------------------------------------------------------------------------------
class Clock:
    """Fake time in µs; ``sleep`` advances it. Past ``stop_at`` a sleep raises ``Stop``, ending a blocked acquire."""

    class Stop(Exception):
        pass

    def __init__(self) -> None:
        self.us = 1_700_000_000 * US
        self.stop_at: int | None = None
        self.events: list[tuple[int, Any]] = []  # (time, callback): what happens elsewhere meanwhile

    def __call__(self) -> int:
        return self.us

    def at(self, seconds_from_now: float, callback: Any) -> None:
        self.events.append((self.us + int(seconds_from_now * US), callback))

    def sleep(self, seconds: float) -> None:
        self.us += int(seconds * US)
        for event in sorted(e for e in self.events if e[0] <= self.us):
            self.events.remove(event)
            event[1]()
        if self.stop_at is not None and self.us > self.stop_at:
            raise Clock.Stop


class FlakyBackend:
    """A real backend whose signal reads (or throttle reports) fail while told to, as in an S3 outage.

    ``stale_signal``: what the signal object says instead of the truth (a signal whose update was not published).
    """

    def __init__(self, backend: Any, clock: Clock):
        self.backend, self.clock = backend, clock
        self.signal_fails = self.report_fails = False
        self.stale_signal: Signal | None = None
        self.signal_reads: list[int] = []

    def signal(self, key: str) -> Signal | None:
        self.signal_reads.append(self.clock())
        if self.signal_fails:
            raise ConnectionError("S3 is unreachable")
        return self.stale_signal or self.backend.signal(key)

    def report_throttle(self, key: str, spec: LimitSpec, retry_after_s: float | None) -> Any:
        if self.report_fails:
            raise ConnectionError("DynamoDB is unreachable")
        return self.backend.report_throttle(key, spec, retry_after_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(rate_limiter, "now_us", clock)  # the backend's time is the worker's
    return clock


@pytest.fixture
def flaky(tmp_path: Path, clock: Clock) -> FlakyBackend:
    return FlakyBackend(LocalRateLimiter(path=str(tmp_path / "limits.sqlite")), clock)


def spend(leaser: Leaser, clock: Clock, seconds: float, **kw: Any) -> list[int]:
    """Take one token at a time for ``seconds`` of fake time (a blocked acquire ends then); the times granted."""
    stamps: list[int] = []
    clock.stop_at = clock() + int(seconds * US)
    try:
        while clock() < clock.stop_at:
            leaser.acquire(**kw)
            stamps.append(clock())
    except Clock.Stop:
        pass
    clock.stop_at = None
    return stamps


def ratelimit_records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "slurmctl.ratelimit" and r.levelno == level and text in r.message]


def test_an_unreadable_signal_is_retried_soon_logged_once_counted_and_leases_are_still_spent(
        flaky: FlakyBackend, clock: Clock, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="slurmctl.ratelimit")
    spec = LimitSpec(per_second=10, lanes=1, lease_size=100, signal_s=1.0)  # one lease: 10 s of slots
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    spend(leaser, clock, 2.0)
    assert leaser.signal_errors == 0

    flaky.signal_fails = True
    first = len(flaky.signal_reads)
    during = spend(leaser, clock, 6.0)
    failed = flaky.signal_reads[first:]
    assert leaser.signal_errors == len(failed) >= 5
    assert failed[1] - failed[0] <= 0.3 * US  # retried soon, not a whole signal_s later
    assert all(b - a <= spec.signal_s * US + 0.15 * US for a, b in zip(failed, failed[1:]))  # and then every second
    assert len(during) >= 0.9 * 10 * 6  # the leases it holds are still spent at the rate
    warnings = ratelimit_records(caplog, logging.WARNING, "reading the signal of rate limit 'job/api' failed")
    assert len(warnings) == 1 and "S3 is unreachable" in warnings[0].message  # once, not once per attempt

    flaky.signal_fails = False
    spend(leaser, clock, 2.0)
    assert leaser.signal_errors == len(failed)  # counting stopped with the outage
    assert ratelimit_records(caplog, logging.INFO, "works again")
    assert leaser.metrics("api")["ratelimit_api_signal_errors"] == len(failed)


def test_a_pause_reaches_a_worker_asleep_until_a_slot_booked_before_it(flaky: FlakyBackend, clock: Clock):
    """A slot can lie a lease span ahead (here 4 s: both lanes are booked by another worker); the pause, signalled
    while this worker sleeps towards it, voids it: no token until the limit is resumed."""
    spec = LimitSpec(per_second=4, lanes=2, lease_size=8, signal_s=1.0)
    for _ in range(2):  # another worker holds both lanes for the next 4 s
        flaky.backend.lease("job/api", spec, spec.lease_size)
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    start = clock()
    clock.at(0.3, lambda: flaky.backend.set_paused("job/api", spec, True))
    clock.at(8.0, lambda: flaky.backend.set_paused("job/api", spec, False))
    leaser.acquire()
    assert clock() - start >= 8.0 * US + spec.grace_us  # not at ~4 s, in the middle of the pause
    assert leaser.paused_s > 0


def test_a_long_outage_is_reminded_about_once_a_minute(flaky: FlakyBackend, clock: Clock,
                                                      caplog: pytest.LogCaptureFixture):
    spec = LimitSpec(per_second=10, lanes=1, lease_size=32, signal_s=1.0)
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    flaky.signal_fails = True
    spend(leaser, clock, 150.0)
    assert leaser.signal_errors >= 140
    assert len(ratelimit_records(caplog, logging.WARNING, "signal of rate limit 'job/api'")) == 3  # 0, 60, 120 s


def test_without_the_signal_a_pause_still_reaches_a_worker_at_its_next_lease(flaky: FlakyBackend, clock: Clock):
    spec = LimitSpec(per_second=10, lanes=1, lease_size=20, signal_s=1.0)  # a lease spans 2 s
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    spend(leaser, clock, 1.0)
    flaky.signal_fails = True
    flaky.backend.set_paused("job/api", spec, True)
    paused_at = clock()
    stamps = spend(leaser, clock, 10.0)
    assert stamps and max(stamps) <= paused_at + 2 * US + 0.1 * US  # what it held, then nothing
    assert leaser.paused_s > 0

    flaky.signal_fails = False
    flaky.backend.set_paused("job/api", spec, False)
    resumed_at = clock()
    assert min(spend(leaser, clock, 5.0)) <= resumed_at + 4 * US  # and it goes again


def test_a_stale_paused_signal_does_not_hold_workers_once_the_backend_is_resumed(flaky: FlakyBackend, clock: Clock):
    # A resume whose signal could not be published: DynamoDB runs again, the signal object still says paused.
    spec = LimitSpec(per_second=10, lanes=1, lease_size=20, signal_s=1.0)
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    spend(leaser, clock, 1.0)
    paused = flaky.backend.set_paused("job/api", spec, True)
    paused_at = clock()
    assert [t for t in spend(leaser, clock, 15.0) if t > paused_at + 2 * US] == []  # paused
    flaky.stale_signal = Signal(paused.epoch, True)
    flaky.backend.set_paused("job/api", spec, False)
    resumed_at = clock()
    stamps = spend(leaser, clock, 30.0)
    assert stamps and stamps[0] <= resumed_at + (Leaser.PAUSE_RECHECK_S + 3) * US  # the backend is asked ...
    late = [t for t in stamps if t > stamps[0] + 2 * US]
    assert len(late) >= 0.9 * 10 * (stamps[-1] - stamps[0] - 2 * US) / US  # ... and the stale signal ignored


def test_signal_errors_land_in_the_metrics_of_the_batch_that_met_them(flaky: FlakyBackend, clock: Clock):
    spec = LimitSpec(per_second=10, lanes=1, lease_size=100, signal_s=1.0)
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    before = BatchContext("job", "batch-0", limiters={"api": leaser})
    during = BatchContext("job", "batch-1", limiters={"api": leaser})
    for _ in range(10):
        with before.limit("api"):
            clock.sleep(0.1)
    flaky.signal_fails = True
    for _ in range(30):
        with during.limit("api"):
            clock.sleep(0.1)
    assert "ratelimit_api_signal_errors" not in before.metrics
    assert during.metrics["ratelimit_api_signal_errors"] == leaser.signal_errors >= 3
    assert during.metrics["ratelimit_api_tokens"] == 30


def test_a_throttle_report_that_fails_is_counted_and_logged_and_the_api_error_is_raised(
        flaky: FlakyBackend, clock: Clock, caplog: pytest.LogCaptureFixture):
    spec = LimitSpec(per_second=10, lanes=1, lease_size=32)
    leaser = Leaser(flaky, "job/api", spec, sleep=clock.sleep, clock=clock)
    ctx = BatchContext("job", "batch-0", limiters={"api": leaser})
    flaky.report_fails = True
    too_many = urllib.error.HTTPError("http://api/x", 429, "Too Many Requests", http.client.HTTPMessage(),
                                      BytesIO(b""))
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as raised:
            with ctx.limit("api"):
                raise too_many
        assert raised.value is too_many  # the API's error, never the limiter's
    assert ctx.metrics["ratelimit_api_throttled"] == 3
    assert ctx.metrics["ratelimit_api_throttle_report_errors"] == 3 == leaser.throttle_report_errors
    assert len(ratelimit_records(caplog, logging.WARNING, "reporting throttling of rate limit 'job/api' failed")) == 1


# --- publishing, against DynamoDB and S3 on a moto server ---------------------------------------------------------
def dynamodb_limiter(moto_endpoint: str, signals_endpoint: str, bucket: str) -> DynamoDBRateLimiter:
    """Limit state straight in moto's DynamoDB; signals in S3 through ``signals_endpoint`` (a FaultProxy)."""
    signals = store_from_uri(f"s3://{bucket}/job", endpoint_url=signals_endpoint, region="us-east-1")
    limiter = limiter_from_config("dynamodb", table=f"limits-{bucket}", endpoint_url=moto_endpoint,
                                  region="us-east-1", signals=signals)
    assert isinstance(limiter, DynamoDBRateLimiter)
    limiter.ensure_table()
    return limiter


def signal_object(moto_endpoint: str, bucket: str, key: str) -> dict:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    return json.loads(s3.get_object(Bucket=bucket, Key=f"job/rate-limits/{key}.signal.json")["Body"].read())


@pytest.mark.integration
def test_a_signal_that_cannot_be_written_raises_and_publishing_again_repairs_it(moto_endpoint, s3_bucket):
    spec = LimitSpec(per_second=20)
    with FaultProxy(moto_endpoint) as proxy:
        limiter = dynamodb_limiter(moto_endpoint, proxy.url, s3_bucket)
        limiter.ensure_limit("ctl", spec)
        proxy.outage(600)
        started = time.monotonic()
        with pytest.raises(SignalNotPublished) as raised:
            limiter.set_paused("ctl", spec, True)
        # Seconds, not the minutes the job store's botocore budget would take (10 retries of up to 20 s, 4 times):
        # `slurmctl pause` must answer while the operator waits. A generous bound, for a loaded machine.
        assert time.monotonic() - started < 60
        message = str(raised.value)
        assert f"s3://{s3_bucket}/job/rate-limits/ctl.signal.json could not be written after 4 attempts" in message
        assert "now says paused" in message and "Run the same command again" in message
        assert proxy.stats()["injected"]["outage"] == 4 * 3  # 4 attempts, each with botocore's own 3 tries
        paused = limiter.read("ctl")
        assert paused.paused  # DynamoDB changed: the error says so

        proxy.outage(0)
        again = limiter.set_paused("ctl", spec, True)  # what running `slurmctl pause` again does
    assert again.epoch == paused.epoch  # no new epoch for a limit already paused ...
    body = signal_object(moto_endpoint, s3_bucket, "ctl")
    assert (body["epoch"], body["paused"]) == (paused.epoch, True)  # ... but the signal is there now


@pytest.mark.integration
def test_a_signal_poll_in_an_outage_fails_at_once_instead_of_stalling_the_worker(moto_endpoint, s3_bucket):
    # A poll runs inside a worker's token acquisition; the Leaser retries it 0.2 s later. botocore's retries with
    # backoff (the job store's: about 1.5 min in an outage) would stop the worker for that long instead.
    with FaultProxy(moto_endpoint) as proxy:
        limiter = dynamodb_limiter(moto_endpoint, proxy.url, s3_bucket)
        proxy.outage(600)
        with pytest.raises(ClientError):
            limiter.signal("poll")
        assert proxy.stats()["injected"] == {"outage": 1}


@pytest.mark.integration
def test_a_failed_signal_write_is_retried(moto_endpoint, s3_bucket, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="slurmctl.ratelimit")
    spec = LimitSpec(per_second=20, floor=1)
    with FaultProxy(moto_endpoint) as proxy:
        limiter = dynamodb_limiter(moto_endpoint, proxy.url, s3_bucket)
        limiter.ensure_limit("rt", spec)
        s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="job/rate-limits/rt.signal.json").get("Contents", [])
        assert listed == []  # no signal yet: the one read below can only be set_rate's
        # The first write of the new signal fails: botocore's three tries of it (SIGNAL_WRITE_CONFIG) are answered
        # 503 without reaching the store. Only a write of slurmctl's own (a second attempt) can then publish it.
        proxy.fail_requests(method="PUT", path_contains="rate-limits/rt.signal.json", times=3, kind="503")
        proxy.reset_counters()
        state = limiter.set_rate("rt", spec, 5)  # returns: no SignalNotPublished
        puts = [r["outcome"] for r in proxy.history
                if r["method"] == "PUT" and "rate-limits/rt.signal.json" in r["path"]]
    assert puts == ["503", "503", "503", 200], puts  # attempt 1 (three tries, none reached S3), then attempt 2
    failed = ratelimit_records(caplog, logging.WARNING, "writing its signal")
    assert [r.message.split("(attempt ")[1].split(")")[0] for r in failed] == ["1 of 4"]  # one failed attempt
    body = signal_object(moto_endpoint, s3_bucket, "rt")  # the retry's write is there
    assert (body["epoch"], body["target"]) == (state.epoch, 5)


@pytest.mark.integration
def test_slurmctl_pause_exits_1_saying_what_to_do_when_the_signal_store_is_down(moto_endpoint, s3_bucket, tmp_path,
                                                                                 slurmctl_home):
    from slurmctl.books.manifests import Keys
    from slurmctl.books.store import new_job_manifest
    from slurmctl.config import parse_config

    job_id = "signals-down"
    with FaultProxy(moto_endpoint) as proxy:
        # The job's own storage (where its signals go) is behind the proxy; the CLI reads the job straight from moto.
        cfg = parse_config({
            "job_id": job_id, "handler": "slurmctl.handlers.echo:handle", "input": {"uri": str(tmp_path / "in.jsonl")},
            "storage": {"uri": f"s3://{s3_bucket}/runs", "endpoint_url": proxy.url, "region": "us-east-1"},
            "rate_limits": {"api": {"per_second": 5}},
            "rate_limiter": {"kind": "dynamodb", "table": f"limits-{s3_bucket}", "endpoint_url": moto_endpoint,
                             "region": "us-east-1"}})
        store = store_from_uri(f"s3://{s3_bucket}/runs", endpoint_url=moto_endpoint, region="us-east-1")
        store.put_json(Keys(job_id).job, new_job_manifest(cfg, None).model_dump(mode="json"))
        limiter_from_config("dynamodb", table=f"limits-{s3_bucket}", endpoint_url=moto_endpoint,
                            region="us-east-1").ensure_table()
        where = ("--storage", f"s3://{s3_bucket}/runs", "--endpoint-url", moto_endpoint, "--region", "us-east-1")
        signal_uri = f"s3://{s3_bucket}/runs/rate-limits/{job_id}/api.signal.json"

        proxy.outage(600)
        paused = run_cli("pause", job_id, *where, timeout=300)
        assert paused.returncode == 1, paused.stderr
        assert "Traceback" not in paused.stderr
        assert f"pause of {job_id} is incomplete: limit api is paused, but its signal is not" in paused.stderr
        assert f"{signal_uri} could not be written" in paused.stderr
        assert f"run `slurmctl pause {job_id}` again" in paused.stderr
        assert store.get_json(Keys(job_id).control)["paused"] is True  # the intent is recorded: resume undoes it

        resumed = run_cli("resume", job_id, *where, timeout=300)  # the unpause cannot be signalled either
        assert resumed.returncode == 1, resumed.stderr
        assert f"could not unpause {job_id}: limit api is unpaused, but its signal is not" in resumed.stderr
        assert f"run `slurmctl resume {job_id}` again" in resumed.stderr
        assert store.get_json(Keys(job_id).control)["paused"] is True  # so resume will try again

        proxy.outage(0)
        repaired = run_cli("pause", job_id, *where, timeout=300)
        assert repaired.returncode == 0, repaired.stderr
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    body = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"runs/rate-limits/{job_id}/api.signal.json")["Body"].read())
    assert body["paused"] is True
