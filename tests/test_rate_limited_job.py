"""Rate limits in real jobs: a strict API never sees more than its quota; pause, rate and resume from the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_cli, write_config, write_jsonl
from support.chaos_api import ChaosApi

pytestmark = [pytest.mark.integration]


def status(job_id: str) -> dict:
    result = run_cli("status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def limited_job(tmp_path: Path, job_id: str, api_url: str, n: int, per_second: float, **extra) -> Path:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler="handlers.http_json:handle",
                        input={"uri": "in.jsonl"}, batch_size=20, storage={"uri": "state"},
                        params={"base_url": api_url, "limit": "api"},
                        rate_limits={"api": {"per_second": per_second, "burst": 2, "lease_size": 5,
                                             "floor": 1, "ceiling": 200}}, **extra)


def test_a_strict_api_sees_no_request_over_its_quota(tmp_path, prefect_api, slurmctl_home):
    n, rate = 160, 20
    with ChaosApi(max_per_second=rate) as api:
        cfg = limited_job(tmp_path, "strict", api.url, n, rate)
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr
        stats = api.stats()
    assert stats["over_limit"] == 0 and stats["requests"] == n
    view = status("strict")
    assert view["items_succeeded"] == n and view["rate_limits"]["api"]["granted"] >= n
    metrics = [json.loads(p.read_text())["metrics"] for p in (tmp_path / "state/jobs/strict/tasks").glob("*.json")]
    assert sum(m.get("ratelimit_api_tokens", 0) for m in metrics) == n
    assert sum(m.get("ratelimit_api_wait_s", 0) for m in metrics) > 0


def test_pause_rate_and_resume_from_the_cli(tmp_path, prefect_api, slurmctl_home):
    n = 400
    with ChaosApi() as api:
        cfg = limited_job(tmp_path, "pausable", api.url, n, 20)
        assert run_cli("submit", str(cfg)).returncode == 0
        deadline = time.monotonic() + 180
        while api.stats()["requests"] < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run_cli("pause", "pausable").returncode == 0
        paused_at = time.monotonic()
        time.sleep(2.0)  # workers stop taking tokens within 2 s
        settled = api.stats()["requests"]
        time.sleep(3.0)
        assert api.stats()["requests"] == settled, "requests went on while paused"
        view = status("pausable")
        assert view["paused"] and view["rate_limits"]["api"]["paused"] and view["status"] == "running"

        result = run_cli("rate", "pausable", "--limit", "api", "--per-second", "50")
        assert result.returncode == 0, result.stderr
        assert run_cli("rate", "pausable", "--limit", "nope", "--per-second", "5").returncode == 2
        assert run_cli("rate", "pausable", "--limit", "api", "--per-second", "5000").returncode == 2  # > ceiling
        result = run_cli("resume", "pausable", "--wait")
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - paused_at > 5
    view = status("pausable")
    assert view["status"] == "completed" and view["items_succeeded"] == n and view["items_failed"] == 0
    assert view["rate_limits"]["api"]["target_per_s"] == 50 and not view["paused"]
    ids = pq.read_table(view["output"][len("file://"):]).column("id").to_pylist()
    assert sorted(ids) == list(range(n))
