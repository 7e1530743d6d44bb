"""Chaos at the edges: a flaky, throttling API and a faulty S3, during real jobs. Every scenario ends with the
output's id set equal to the input's minus the listed permanent failures, with no duplicates."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, write_config, write_jsonl
from support.chaos_api import ChaosApi
from support.fault_proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def status(job_id: str, *extra: str) -> dict:
    result = run_cli("status", job_id, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def log_tail(home: Path, job_id: str) -> str:
    path = home / "logs" / f"{job_id}.log"
    return path.read_text()[-6000:] if path.exists() else ""


def assert_exactly_once(view: dict, expected: set, store_root: Path | None = None) -> None:
    if view["output"].startswith("file://"):
        table = pq.read_table(view["output"][len("file://"):])
    else:
        import io
        bucket, key = view["output"][5:].split("/", 1)
        table = pq.read_table(io.BytesIO(store_root.get_object(Bucket=bucket, Key=key)["Body"].read()))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicates in the output"
    assert set(ids) == expected


def test_flaky_api_transient_faults_are_absorbed_and_permanent_ones_listed(tmp_path, prefect_api, slurmctl_home):
    n = 120
    fail_ids = {5: ("503", 2), 17: ("429", 1), 29: ("reset", 1), 41: ("timeout", 1), 53: ("500", 9)}
    with ChaosApi(fail_ids=fail_ids, retry_after=0.1, timeout_sleep=2.0) as api:
        write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)] + [{"id": -7}])  # -7: a 404
        cfg = write_config(tmp_path / "job.yaml", job_id="flaky-api", handler="handlers.http_json:handle",
                           input={"uri": "in.jsonl"}, batch_size=20, storage={"uri": "state"},
                           params={"base_url": api.url, "timeout_s": 0.5},
                           errors={"max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2})
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "flaky-api")
    view = status("flaky-api")
    # 53 answers 500 more times than the attempt budget: failed as `server`; -7 is `not_found`.
    assert (view["items_succeeded"], view["items_failed"]) == (n - 1, 2)
    assert_exactly_once(view, set(range(n)) - {53})
    report = json.loads(run_cli("analyze-errors", "flaky-api", "--json").stdout)
    assert report["classes"] == {"server": 1, "not_found": 1}
    failures = {json.loads(line)["id"]: json.loads(line) for line in
                (tmp_path / "state/jobs/flaky-api/failures.jsonl").read_text().splitlines()}
    assert failures[53]["attempts"] == 3 and failures[-7]["attempts"] == 1


def test_throttling_storm_defers_items_and_automatic_rounds_finish_them(tmp_path, prefect_api, slurmctl_home):
    n = 150
    with ChaosApi(rate_429=1.0, retry_after=0.05) as api:
        write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
        cfg = write_config(tmp_path / "job.yaml", job_id="storm", handler="handlers.http_json:handle",
                           input={"uri": "in.jsonl"}, batch_size=30, storage={"uri": "state"},
                           params={"base_url": api.url},
                           errors={"max_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                                   "retry_cooldown_s": 2, "auto_retry_rounds": 4,
                                   "circuit_breaker": {"window": 6, "min_attempts": 6, "threshold": 0.8}})
        def recover_after_a_storm() -> None:  # the API recovers once the first batches have been throttled
            deadline = time.monotonic() + 300
            while api.stats()["faults"].get("429", 0) < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            api.configure(rate_429=0.0)

        threading.Thread(target=recover_after_a_storm, daemon=True).start()
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "storm")
        throttled_calls = api.stats()["faults"].get("429", 0)
    view = status("storm")
    assert (view["items_succeeded"], view["items_failed"]) == (n, 0), view
    assert_exactly_once(view, set(range(n)))
    job = json.loads((tmp_path / "state/jobs/storm/job.json").read_text())
    assert job["retry_rounds"] and all(r["classes"] == [] for r in job["retry_rounds"])
    tasks = [json.loads(p.read_text()) for p in (tmp_path / "state/jobs/storm/tasks").glob("batch-*.json")]
    assert any(t["status"] == "throttled" and t["tripped_by"] == "throttle" for t in tasks)
    # The breaker stopped each throttled batch after a handful of attempts instead of burning all its items.
    assert throttled_calls < n


def test_s3_faults_and_an_outage_do_not_lose_or_duplicate_anything(tmp_path, prefect_api, slurmctl_home,
                                                                   moto_endpoint, s3_bucket):
    n = 400
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="in/users.jsonl",
                  Body=b"".join(json.dumps({"id": i}).encode() + b"\n" for i in range(n)))
    with FaultProxy(moto_endpoint, rate_500=0.05, rate_503=0.05, rate_throttle=0.05, seed=7) as proxy:
        cfg = write_config(tmp_path / "job.yaml", job_id="s3-chaos", handler="handlers.echo:handle",
                           input={"uri": f"s3://{s3_bucket}/in/users.jsonl"}, batch_size=25,
                           storage={"uri": f"s3://{s3_bucket}/runs", "endpoint_url": proxy.url,
                                    "region": "us-east-1"})
        threading.Timer(8.0, lambda: proxy.outage(3.0)).start()  # S3 down for a few seconds mid-run
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "s3-chaos")
        injected = proxy.stats()["injected"]
        view = status("s3-chaos")
    assert sum(injected.values()) > 10, injected
    assert view["status"] == "completed" and view["items_succeeded"] == n
    assert_exactly_once(view, set(range(n)), s3)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/jobs/s3-chaos/outputs/")["Contents"]]
    assert len(keys) == 16  # one committed output per batch: no orphaned attempt left behind
