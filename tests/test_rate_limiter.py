"""The rate limiter, one suite run against both backends: SQLite (one machine) and DynamoDB on a moto server."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from blocks.rate_limiter import DynamoDBRateLimiter, limiter_from_config
from slurmctl.ratelimit import US, Lease, Leaser, LimitSpec, Wait, now_us

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "dynamodb"])
def backend_args(request, tmp_path) -> dict:
    if request.param == "local":
        return {"kind": "local", "path": str(tmp_path / "limits.sqlite")}
    endpoint = request.getfixturevalue("moto_endpoint")
    table = f"limits-{os.urandom(3).hex()}"
    args = {"kind": "dynamodb", "table": table, "endpoint_url": endpoint, "region": "us-east-1"}
    limiter = limiter_from_config(**args)
    assert isinstance(limiter, DynamoDBRateLimiter)
    limiter.ensure_table()
    return args


@pytest.fixture
def backend(backend_args):
    return limiter_from_config(**backend_args)


def test_leases_are_consecutive_slots_at_the_rate(backend):
    spec = LimitSpec(per_second=100, burst=1, lease_size=10)
    a = backend.lease("k", spec, 10)
    b = backend.lease("k", spec, 10)
    assert isinstance(a, Lease) and isinstance(b, Lease)
    assert a.interval_us == b.interval_us == 10_000
    assert b.start_us == a.end_us  # disjoint, back to back: the sum of all leases never beats the rate
    assert backend.read("k").granted == 20


def test_an_idle_limit_allows_its_burst_and_no_more(backend):
    spec = LimitSpec(per_second=10, burst=5, lease_size=5)
    first = backend.lease("idle", spec, 5)
    assert abs(first.start_us - (now_us() - 5 * 100_000)) < 50_000  # five slots already due: a burst of 5
    second = backend.lease("idle", spec, 5)
    assert second.start_us == first.end_us  # then back to the rate


def test_a_lease_is_refused_beyond_the_horizon(backend):
    spec = LimitSpec(per_second=10, burst=1, lease_size=10, horizon_s=1.0)
    assert isinstance(backend.lease("far", spec, 10), Lease)  # 1 s of slots
    assert isinstance(backend.lease("far", spec, 10), Lease)  # starts ~1 s ahead: at the horizon
    got = backend.lease("far", spec, 10)
    assert isinstance(got, Wait) and 0.5 < got.seconds <= 1.1


def test_release_gives_back_the_unused_tail(backend):
    spec = LimitSpec(per_second=10, lease_size=10)
    lease = backend.lease("rel", spec, 10)
    assert backend.release("rel", lease, 6)
    nxt = backend.lease("rel", spec, 1)
    assert nxt.start_us == lease.start_us + 4 * lease.interval_us
    assert not backend.release("rel", lease, 6)  # no longer the tail


def test_throttling_halves_the_rate_once_per_second_then_recovers(backend):
    spec = LimitSpec(per_second=100, floor=10, recovery_s=2)
    backend.lease("thr", spec, 1)
    backend.report_throttle("thr", spec, None)
    backend.report_throttle("thr", spec, None)  # same second: one event, not two
    state = backend.read("thr")
    assert state.rate == 50 and state.throttled == 1
    assert 50 <= state.effective_rate(now_us()) < 55
    assert state.effective_rate(now_us() + 3 * US) == 100  # linear recovery to the target
    slow = LimitSpec(per_second=100, floor=10, recovery_s=1000)  # (almost) no recovery between reports
    rates = []
    for _ in range(5):
        backend.report_throttle("thr2", slow, None)
        state = backend.read("thr2")
        rates.append(state.rate)
        backend._update("thr2", slow, lambda s: setattr(s, "changed_at", s.changed_at - 2 * US))  # a while ago
    assert [round(r) for r in rates] == [50, 25, 13, 10, 10]  # multiplicative decrease, never below the floor


def test_retry_after_pushes_every_workers_next_slot(backend):
    spec = LimitSpec(per_second=100)
    backend.lease("ra", spec, 1)
    backend.report_throttle("ra", spec, 2.0)
    got = backend.lease("ra", spec, 1)
    assert isinstance(got, Wait) or got.start_us >= now_us() + 1.5 * US


def test_pause_and_rate_change(backend):
    spec = LimitSpec(per_second=20, floor=1, ceiling=100)
    backend.lease("ctl", spec, 1)
    backend.set_paused("ctl", spec, True)
    got = backend.lease("ctl", spec, 5)
    assert isinstance(got, Wait) and got.paused
    backend.set_paused("ctl", spec, False)
    backend.set_rate("ctl", spec, 50)
    got = backend.lease("ctl", spec, 5)
    assert isinstance(got, Lease) and got.interval_us == 20_000
    with pytest.raises(ValueError, match="outside"):
        backend.set_rate("ctl", spec, 1000)


# --- many processes -------------------------------------------------------------------------------------------
def spend(backend_args: dict, key: str, spec: dict, seconds: float, out: str) -> None:
    """A worker process: acquire tokens as fast as they are granted; log the time each one was used."""
    sys.path.insert(0, str(ROOT))
    from blocks.rate_limiter import limiter_from_config
    from slurmctl.ratelimit import Leaser, LimitSpec

    leaser = Leaser(limiter_from_config(**backend_args), key, LimitSpec(**spec))
    stop = time.time() + seconds
    stamps = []
    while time.time() < stop:
        leaser.acquire()
        stamps.append(time.time())
    with open(out, "w") as f:
        json.dump({"stamps": stamps, "calls": leaser.backend_calls, "granted": leaser.granted}, f)


def max_in_window(stamps: list[float], window: float = 1.0) -> int:
    stamps = sorted(stamps)
    best, j = 0, 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_many_processes_never_exceed_rate_plus_burst(backend_args, tmp_path):
    rate, burst, procs, seconds = 40, 5, 6, 4.0
    spec = {"per_second": rate, "burst": burst, "lease_size": 8}
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=spend, args=(backend_args, "many", spec, seconds, str(tmp_path / f"w{i}.json")))
               for i in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    results = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(procs)]
    stamps = [t for r in results for t in r["stamps"]]
    # Evenly spaced requests: a 1 s window can hold rate + 1 of them when both ends land on one (fencepost).
    assert max_in_window(stamps) <= rate + burst + 1, max_in_window(stamps)
    achieved = len(stamps) / seconds
    assert achieved >= 0.8 * rate, achieved  # and the limit is actually used
    calls = sum(r["calls"] for r in results)
    assert calls / len(stamps) <= 0.5  # leases, not one backend call per request


def test_a_killed_workers_lease_does_not_leak_capacity(backend_args, tmp_path):
    backend = limiter_from_config(**backend_args)
    spec = LimitSpec(per_second=20, burst=1, lease_size=20, horizon_s=1.0)
    ctx = multiprocessing.get_context("spawn")
    hog = ctx.Process(target=spend, args=(backend_args, "hog", {"per_second": 20, "lease_size": 20}, 60.0,
                                          str(tmp_path / "hog.json")))
    hog.start()
    deadline = time.time() + 30
    while (backend.read("hog") is None or backend.read("hog").granted < 20) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(hog.pid, signal.SIGKILL)  # dies holding up to a second of booked slots
    hog.join()
    killed_at = time.time()
    leaser = Leaser(backend, "hog", spec)
    leaser.acquire(10)
    # The dead worker's slots passed with the clock: capacity is back within a lease + the horizon.
    assert time.time() - killed_at < 20 / 20 + 1.0 + 0.5 + 10 / 20
