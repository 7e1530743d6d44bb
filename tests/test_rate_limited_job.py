"""Rate limits in real jobs, measured where they matter, at the API: declared exactly as a strict API documents its
bucket, the API answers (almost) no 429 and the job uses the whole rate; pause stops requests within the documented
bound and holds; a rate changed at run time is the rate the API sees.

What the limiter guarantees: its *grants* (slot times) lie on one grid ``1/rate`` apart, at most ``rate x T + 1`` in
any window of ``T`` s, and a slot is handed out at most ``late_allowance_s`` (half of ``(burst - 1) / rate``) after
its time. The API's bucket (``burst``) is left for that jitter and the network's.

Pause: workers see it through the limit's signal within ~1 s and take no more tokens — including a worker already
asleep until a slot it booked before the pause (up to a lease span, 16 s, ahead): the pause voids that slot. So no
request reaches the API after the bound until the job is resumed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.chaos_api import ChaosApi
from support.jobs import (
    ReadyCommand,
    assert_exactly_once,
    log_tail,
    run_cli,
    status,
    wait_for,
    wait_until_ended,
    write_config,
    write_jsonl,
)
from support.rates import bucket_needed, max_in_window, read_trace, steady_buckets

from slurmctl.ratelimit.lanes import LimitSpec
from slurmctl.ratelimit.leaser import TRACE_ENV

pytestmark = [pytest.mark.integration]

def late_s(rate: float, burst: int) -> float:
    """How late a slot may still be used."""
    return LimitSpec(per_second=rate, burst=burst).late_allowance_s
PAUSE_BOUND_S = 2.0  # `slurmctl pause`: workers take no more tokens within ~2 s (a 1 s signal period + one slot)


def limited_job(tmp_path: Path, job_id: str, api_url: str, n: int, per_second: float, burst: int = 2,
                lease_size: int | None = None, batch_size: int = 20,
                handler: str = "slurmctl.handlers.http_json:handle", **extra) -> Path:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    fields = {"storage": {"uri": "state"}, **extra}
    limit = {"per_second": per_second, "burst": burst, "floor": 1, "ceiling": 200}
    if lease_size:
        limit["lease_size"] = lease_size
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler=handler,
                        input={"uri": "in.jsonl"}, batch_size=batch_size, params={"base_url": api_url, "limit": "api"},
                        rate_limits={"api": limit}, **fields)


def api_bound(rate: float, window: float, burst: int) -> float:
    """The most requests the API may see in ``window`` s: grants hold ``rate x T`` (+1 fencepost) and a slot may be
    used a little late; the API's burst is the room for that."""
    return rate * window + burst + 1


def test_a_strict_api_sees_no_request_over_its_quota(tmp_path, prefect_api, slurmctl_home):
    n, rate, burst = 160, 20, 2
    capacity = burst + 3  # a bucket with room to spare: not one request over it (the exact bucket: next test)
    with ChaosApi(max_per_second=rate, burst=capacity) as api:
        cfg = limited_job(tmp_path, "strict", api.url, n, rate, burst)
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "strict")
        stats, arrivals = api.stats(), api.arrivals()
    assert stats["over_limit"] == 0 and stats["requests"] == n, (stats, bucket_needed(arrivals, rate))
    view = status("strict")
    assert view["items_succeeded"] == n and view["rate_limits"]["api"]["granted"] >= n
    assert view["rate_limits"]["api"]["throttled"] == 0
    metrics = [json.loads(p.read_text())["metrics"] for p in (tmp_path / "state/jobs/strict/tasks").glob("*.json")]
    assert sum(m.get("ratelimit_api_tokens", 0) for m in metrics) == n
    assert sum(m.get("ratelimit_api_wait_s", 0) for m in metrics) > 0
    # the time each batch was blocked on the limiter (its sleeps, and the lock and backend calls around them)
    assert sum(m["tokens_waited_s"] for m in metrics) > 0
    assert all(m["tokens_waited_s"] >= m["ratelimit_api_wait_s"] for m in metrics)


def test_declared_as_the_api_documents_it_few_429s_and_full_use(tmp_path, prefect_api, slurmctl_home, monkeypatch):
    # The case: an API bucket of 40/s with room for 5, the limit declared exactly so, 2 local workers.
    n, rate, burst = 800, 40, 5
    trace = tmp_path / "trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))  # every grant's slot and hand-out time, per worker process
    with ChaosApi(max_per_second=rate, burst=burst) as api:
        cfg = limited_job(tmp_path, "documented", api.url, n, rate, burst, batch_size=25)
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "documented")
        stats, arrivals = api.stats(), api.arrivals()
    assert stats["over_limit"] <= 0.01 * stats["requests"], (stats, bucket_needed(arrivals, rate))
    steady = steady_buckets(arrivals)  # 1 s buckets counted at the API, the first and last 2 s left out
    assert len(steady) >= 10 and sum(steady) / len(steady) >= 0.9 * rate, steady
    # Grants, checked where the code controls them: every slot on one grid 1/rate apart, none given twice, each
    # handed out at most the late allowance after its time.
    traced = read_trace(trace)
    grants = [g for g in traced if g[2] >= 0]  # lanes -1 and -2: slots that passed unused
    assert len(grants) == stats["requests"] and len({p.name.rsplit(".", 2)[1] for p in trace.glob("*.txt")}) == 2
    slots = sorted(slot for slot, _, _ in grants)
    interval = round(1_000_000 / rate)
    gaps = {b - a for a, b in zip(slots, slots[1:])}
    assert min(gaps) >= interval and all(gap % interval == 0 for gap in gaps), sorted(gaps)[:5]
    late_us = max(handed - slot for slot, handed, _ in grants)
    assert late_us <= (late_s(rate, burst) + 0.005) * 1_000_000, late_us
    view = status("documented")
    assert view["items_succeeded"] == n and view["rate_limits"]["api"]["epoch"] == 0  # no quota change was seen


def quiet_for(api: ChaosApi, seconds: float) -> bool:
    """No request has arrived for ``seconds`` (at 20/s a running job sends one every 50 ms)."""
    arrivals = api.arrivals()
    return bool(arrivals) and time.monotonic() - arrivals[-1] >= seconds


def test_pause_rate_and_resume_from_the_cli(tmp_path, prefect_api, slurmctl_home, job_backends):
    # Default leases (32 slots of a 2/s lane: 16 s each) outlive the pause bound: the pause reaches workers through
    # the limit's signal (SQLite row, or an S3 object next to the job's manifests), not by leases running out.
    # About 80 requests before the pause holds (40, then up to the bound at 20/s), and 20 more for each second the
    # `pause` command takes to publish: 0.5-1.5 s on an idle machine, 4-6 s on 2 cores with 2 busy loops beside the
    # suite (160 requests before the pause held). So the job is long (300) and, once the API has seen 6 s at the
    # new rate after the resume (the windows checked below), the rest goes at 100/s.
    n, rate, new_rate, burst = 300, 20, 8, 2
    # On the embedded default the handler is async (many items in flight, waiting for tokens together when the pause
    # comes); with DynamoDB it is the sync one: both ways of waiting for a token must stop at a pause.
    handler = "slurmctl.handlers.http_json:" + ("handle" if job_backends else "AsyncClient")
    with ChaosApi() as api, ReadyCommand("pause", "pausable") as pause:
        cfg = limited_job(tmp_path, "pausable", api.url, n, rate, burst, handler=handler, **job_backends)
        assert run_cli("submit", str(cfg)).returncode == 0
        # refused, changing nothing (checked while the job starts: no need to hold it paused for them)
        assert run_cli("rate", "pausable", "--limit", "nope", "--per-second", "5").returncode == 2
        assert run_cli("rate", "pausable", "--limit", "api", "--per-second", "5000").returncode == 2  # > ceiling
        wait_for(lambda: api.stats()["requests"] >= 40, 180, "the job's first 40 requests")
        assert pause.run().returncode == 0  # `slurmctl pause`, imported ahead: it acts now, not seconds later
        paused_at = time.monotonic()  # `pause` returns once the pause is published
        wait_for(lambda: time.monotonic() >= paused_at + PAUSE_BOUND_S and quiet_for(api, 1.0), 60,
                 "requests to stop after the pause")
        view = status("pausable")
        assert view["paused"] and view["rate_limits"]["api"]["paused"] and view["status"] == "running", view
        if job_backends:  # DynamoDB: the pause was published where workers poll it
            import boto3

            storage = job_backends["storage"]
            s3 = boto3.client("s3", endpoint_url=storage["endpoint_url"], region_name="us-east-1")
            bucket = storage["uri"][5:].split("/")[0]
            signal = json.loads(s3.get_object(Bucket=bucket, Key="runs/rate-limits/pausable/api.signal.json")
                                ["Body"].read())
            assert signal["paused"] is True

        result = run_cli("rate", "pausable", "--limit", "api", "--per-second", str(new_rate))
        assert result.returncode == 0, result.stderr
        resumed_at = time.monotonic()
        late = [round(t - paused_at, 2) for t in api.arrivals() if t > paused_at + PAUSE_BOUND_S]
        assert late == [], f"requests went on while paused, at +{late} s"
        before = len(api.arrivals())
        assert before <= n - 6 * new_rate, f"{before} of {n} requests before the pause held: too few left to check"
        result = run_cli("resume", "pausable")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "pausable")
        after = wait_for(lambda: len(a := [t for t in api.arrivals() if t > resumed_at]) >= 6 * new_rate and a, 120,
                         "6 s of requests at the new rate")
        # The rest at speed: a rate change voids the leases, so it takes effect at once, as the pause did.
        assert run_cli("rate", "pausable", "--limit", "api", "--per-second", "100").returncode == 0
        view = wait_until_ended("pausable", 180)
        arrivals = api.arrivals()
    # Everything after the resume ran at the new rate, as the API counted it (the change took effect while paused,
    # and a resumed worker leases from the new schedule only).
    assert len(arrivals) == n, len(arrivals)
    for window in (1.0, 2.0, 5.0):
        assert max_in_window(after, window) <= api_bound(new_rate, window, burst), (
            window, max_in_window(after, window), api_bound(new_rate, window, burst))
    assert view["status"] == "completed", (view.get("error") or "") + log_tail(slurmctl_home, "pausable")
    assert view["items_succeeded"] == n and view["items_failed"] == 0
    assert view["rate_limits"]["api"]["target_per_s"] == 100 and not view["paused"]
    assert_exactly_once(view, range(n), (job_backends.get("storage") or {}).get("endpoint_url"))
