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
    fields = {"storage": {"uri": "state"}, **extra}
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler="handlers.http_json:handle",
                        input={"uri": "in.jsonl"}, batch_size=20, params={"base_url": api_url, "limit": "api"},
                        rate_limits={"api": {"per_second": per_second, "burst": 2, "floor": 1, "ceiling": 200}},
                        **fields)


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


@pytest.fixture(params=["local", "dynamodb"])
def shared_state(request) -> dict:
    """Where the job keeps limits and manifests: SQLite + local files, or DynamoDB + S3 on a moto server."""
    if request.param == "local":
        return {}
    endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
    return {"storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": endpoint, "region": "us-east-1"},
            "rate_limiter": {"kind": "dynamodb", "table": f"limits-{bucket}", "endpoint_url": endpoint,
                             "region": "us-east-1"}}


def output_ids(view: dict, storage: dict | None) -> list:
    uri = view["output"]
    if uri.startswith("s3://"):
        import io

        import boto3

        bucket, _, key = uri[5:].partition("/")
        body = boto3.client("s3", endpoint_url=storage["endpoint_url"], region_name="us-east-1").get_object(
            Bucket=bucket, Key=key)["Body"].read()
        return pq.read_table(io.BytesIO(body)).column("id").to_pylist()
    return pq.read_table(uri[len("file://"):]).column("id").to_pylist()


def test_pause_rate_and_resume_from_the_cli(tmp_path, prefect_api, slurmctl_home, shared_state):
    # Default leases (32 slots of a 2/s lane: 16 s each) outlive the 2 s pause deadline: the pause reaches workers
    # through the limit's signal (SQLite row, or an S3 object next to the job's manifests), not through leases.
    n = 400
    with ChaosApi() as api:
        cfg = limited_job(tmp_path, "pausable", api.url, n, 20, **shared_state)
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
        if shared_state:  # DynamoDB: the pause was published where workers poll it
            import boto3

            s3 = boto3.client("s3", endpoint_url=shared_state["storage"]["endpoint_url"], region_name="us-east-1")
            bucket = shared_state["storage"]["uri"][5:].split("/")[0]
            signal = json.loads(s3.get_object(Bucket=bucket, Key="runs/rate-limits/pausable/api.signal.json")
                                ["Body"].read())
            assert signal["paused"] is True

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
    assert sorted(output_ids(view, shared_state.get("storage"))) == list(range(n))
