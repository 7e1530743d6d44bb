"""Chaos at the edges: a flaky, throttling API and a faulty S3, during real jobs. Every scenario ends with the
output's id set equal to the input's minus the listed permanent failures, with no duplicates."""

from __future__ import annotations

import json
import threading

import boto3
import pytest
from support.chaos_api import ChaosApi
from support.fault_proxy import FaultProxy
from support.jobs import (
    assert_exactly_once,
    committed_tasks,
    job_manifest,
    log_tail,
    run_cli,
    status,
    wait_for,
    why,
    write_config,
    write_jsonl,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_flaky_api_transient_faults_are_absorbed_and_permanent_ones_listed(tmp_path, prefect_api, slurmctl_home):
    n = 120
    # Retry-After (1 s) is 5x the longest backoff (0.2 s): a wait of 1 s or more can only be the header honoured.
    retry_after, backoff_max = 1.0, 0.2
    fail_ids = {5: ("503", 2), 17: ("429", 1), 29: ("reset", 1), 41: ("timeout", 1), 53: ("500", 9)}
    with ChaosApi(fail_ids=fail_ids, retry_after=retry_after, timeout_sleep=2.0) as api:
        write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)] + [{"id": -7}])  # -7: a 404
        cfg = write_config(tmp_path / "job.yaml", job_id="flaky-api", handler="slurmctl.handlers.http_json:handle",
                           input={"uri": "in.jsonl"}, batch_size=20, storage={"uri": "state"},
                           params={"base_url": api.url, "timeout_s": 0.5},
                           errors={"max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": backoff_max})
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "flaky-api")
        throttled = api.arrivals(17)
    view = status("flaky-api")
    # 53 answers 500 more times than the attempt budget: failed as `server`; -7 is `not_found`.
    assert (view["items_succeeded"], view["items_failed"]) == (n - 1, 2)
    assert_exactly_once(view, set(range(n)) - {53})
    report = json.loads(run_cli("analyze-errors", "flaky-api", "--json").stdout)
    assert report["classes"] == {"server": 1, "not_found": 1}
    failures = {json.loads(line)["id"]: json.loads(line) for line in
                (tmp_path / "state/jobs/flaky-api/failures.jsonl").read_text().splitlines()}
    assert failures[53]["attempts"] == 3 and failures[-7]["attempts"] == 1
    # 17 got one 429 and succeeded on its second attempt, sent no sooner than Retry-After said.
    assert len(throttled) == 2 and throttled[1] - throttled[0] >= retry_after, throttled


def test_throttling_storm_defers_items_and_automatic_rounds_finish_them(tmp_path, prefect_api, slurmctl_home):
    n, batch_size, max_attempts, window = 150, 30, 2, 6
    batches = n // batch_size
    tasks = tmp_path / "state/jobs/storm/tasks"

    def first_pass_running() -> bool:
        """The storm lasts exactly as long as the job's first pass: every request of a first-pass batch comes before
        its commit, every request of a retry round after all of them."""
        return sum(1 for p in tasks.glob("batch-*.json") if not p.name.endswith(".failed.json")) < batches

    with ChaosApi(rate_429=1.0, retry_after=0.05, faults_while=first_pass_running) as api:
        write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
        cfg = write_config(tmp_path / "job.yaml", job_id="storm", handler="slurmctl.handlers.http_json:handle",
                           input={"uri": "in.jsonl"}, batch_size=batch_size, storage={"uri": "state"},
                           params={"base_url": api.url},
                           errors={"max_attempts": max_attempts, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                                   "retry_cooldown_s": 1, "auto_retry_rounds": 4,
                                   "circuit_breaker": {"window": window, "min_attempts": window, "threshold": 0.8}})
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + why(slurmctl_home, "storm", tmp_path / "state")
        stats = api.stats()
    view = status("storm")
    assert (view["status"], view["items_succeeded"], view["items_failed"]) == ("completed", n, 0), view
    assert_exactly_once(view, range(n))
    # First pass: each batch's breaker opened after one window of 429s (3 items x 2 attempts) and deferred all 30
    # items, the 2 that had used up their attempts in the storm included; nothing was marked failed.
    first = committed_tasks(tmp_path / "state", "storm")
    assert len(first) == batches
    assert all((t["status"], t["tripped_by"], t["items_deferred"], t["items_failed"]) ==
               ("throttled", "throttle", batch_size, 0) for t in first.values()), first
    # One window of 429s per batch run, not 30 items x 2 attempts. (A batch whose worker was lost, e.g. restarted
    # by Dask for missing heartbeats on a busy machine, runs again: the job manifest counts it.)
    job = job_manifest(tmp_path / "state", "storm")
    reruns = job["worker_loss_requeues"]
    assert batches * window <= stats["faults"]["429"] <= (batches + reruns) * window, (stats, reruns)
    assert set(stats["faults"]) == {"429"}
    # One automatic round over the deferred items finished them all: every item answered 200 once (plus what a
    # lost worker's batch had asked before it ran again).
    assert [(r["round"], r["classes"], r["items"]) for r in job["retry_rounds"]] == [(1, [], n)]
    retried = committed_tasks(tmp_path / "state", "storm", prefix="r01-")
    assert sum(t["items_succeeded"] for t in retried.values()) == n
    assert n <= stats["ok"] <= n + reruns * batch_size and stats["requests"] == stats["ok"] + stats["faults"]["429"]


def test_s3_faults_and_an_outage_do_not_lose_or_duplicate_anything(tmp_path, prefect_api, slurmctl_home,
                                                                   moto_endpoint, s3_bucket):
    n, batch_size = 400, 25
    batches = n // batch_size
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")  # straight to moto: no faults
    s3.put_object(Bucket=s3_bucket, Key="in/users.jsonl",
                  Body=b"".join(json.dumps({"id": i}).encode() + b"\n" for i in range(n)))

    def committed() -> int:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/jobs/s3-chaos/tasks/batch-")
        return sum(1 for o in listed.get("Contents", []) if not o["Key"].endswith(".failed.json"))

    outage: dict[str, int] = {}

    def outage_mid_run() -> None:
        """S3 goes down for 3 s once some batches have committed and others remain: the job is mid-run."""
        try:
            outage["committed_before"] = wait_for(lambda: (c := committed()) >= 4 and c, 300,
                                                  "4 committed batches", interval=0.05)
            proxy.outage(3.0)
        except AssertionError:
            pass  # the assertions below say what did not happen

    with FaultProxy(moto_endpoint, rate_500=0.05, rate_503=0.05, rate_throttle=0.05, seed=7) as proxy:
        cfg = write_config(tmp_path / "job.yaml", job_id="s3-chaos", handler="slurmctl.handlers.echo:handle",
                           input={"uri": f"s3://{s3_bucket}/in/users.jsonl"}, batch_size=batch_size,
                           storage={"uri": f"s3://{s3_bucket}/runs", "endpoint_url": proxy.url,
                                    "region": "us-east-1"})
        trigger = threading.Thread(target=outage_mid_run, daemon=True)
        trigger.start()
        result = run_cli("submit", str(cfg), "--wait")
        trigger.join(5)
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "s3-chaos")
        injected = proxy.stats()["injected"]
        view = status("s3-chaos")  # the job's storage endpoint is the proxy
    # The outage began with batches still to commit, and the job's requests ran into it.
    assert outage.get("committed_before", batches) < batches, outage
    assert injected.get("outage", 0) > 0, injected
    assert sum(injected.get(kind, 0) for kind in ("500", "503", "throttle")) > 10, injected
    assert view["status"] == "completed" and view["items_succeeded"] == n
    assert_exactly_once(view, range(n), moto_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/jobs/s3-chaos/outputs/")["Contents"]]
    assert len(keys) == batches  # one committed output per batch: no orphaned attempt left behind
