"""A job's budget: ``budget: {max_api_calls, max_core_hours, max_usd}`` with prices.

* ``submit`` refuses (exit 2, nothing written) a job projected to reach 90 % of a limit — items x calls per item,
  declared in the config or measured by ``--sample N`` — saying the numbers; a deployment's run is refused by the
  same admission, before any batch;
* a running job pauses itself at 100 %, between batches: status and the Prefect UI say so, and the spend passes the
  limit by at most the batch that reached it plus one batch per worker thread (two for items in flight);
* ``slurmctl resume JOB --raise-budget KEY=VALUE`` records the new limit in the job manifest and finishes the job,
  every item exactly once;
* the summary (status, ``status --json``, the summary artifact) reports API calls, core-hours and, priced, the cost.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.alerts import job_events
from support.jobs import (
    assert_exactly_once,
    committed_tasks,
    job_manifest,
    log_tail,
    run_cli,
    status,
    wait_for,
    write_config,
    write_jsonl,
)
from support.prefect_runs import flow_run_final_state, flows_reporting_to, job_artifacts
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books import budget
from slurmctl.books.admission import JobRefused, create_job
from slurmctl.books.manifests import JOB_SCHEMA_VERSION, Counts, Keys
from slurmctl.books.status import status_view
from slurmctl.books.store import load_job, new_job_manifest
from slurmctl.config import ConfigError, parse_config
from slurmctl.flows.budget import BudgetGuard


def job_cfg(tmp_path: Path, n: int = 1000, fmt: str = "jsonl", **budget_cfg):
    """A job over ``n`` items (ids 0..n-1) in ``tmp_path``, with ``budget_cfg`` as its budget."""
    if fmt == "parquet":
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": list(range(n))}), path)
    elif fmt == "csv":
        path = tmp_path / "in.csv"
        path.write_text("id,name\n" + "".join(f"{i},u{i}\n" for i in range(n)))
    else:
        path = write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    return parse_config({"job_id": "budgeted", "handler": "support.sample_handlers:counting",
                         "input": {"uri": str(path)}, "storage": {"uri": str(tmp_path / "state")},
                         "params": {"calls_file": str(tmp_path / "calls")}, "budget": budget_cfg})


# ---- the config -------------------------------------------------------------------------------------------------

def test_a_budget_in_dollars_needs_a_price_and_unknown_keys_are_refused():
    base = {"handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"}}

    def errors(b):
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "budget": b})
        return dict(info.value.errors)

    assert "needs a price" in errors({"max_usd": 50})["budget.max_usd"]
    assert errors({"max_calls": 10}) == {"budget.max_calls": "unknown key"}
    assert errors({"max_api_calls": 0}) == {"budget.max_api_calls": "must be > 0"}
    assert errors({"calls_per_item": -1}) == {"budget.calls_per_item": "must be >= 0.0"}
    ok = parse_config({**base, "budget": {"max_usd": 50, "usd_per_api_call": 0.001, "calls_per_item": 2}}).budget
    assert ok.limits == {"max_usd": 50} and ok.priced
    assert parse_config(base).budget.limits == {}  # no budget: nothing is limited


# ---- projection and admission ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_the_input_is_counted_cheaply(tmp_path, fmt):
    cfg = job_cfg(tmp_path, 1234, fmt)
    count = budget.count_items(cfg, LocalManifestStore(root=str(tmp_path / "state")))
    assert (count.items, count.exact) == (1234, True)


def test_a_projection_at_90_percent_is_refused_with_the_numbers_and_what_to_do(tmp_path):
    store = LocalManifestStore(root=str(tmp_path / "state"))
    # 1,000 items x 2 calls = 2,000 calls: 90.9 % of 2,200 is refused; 88.9 % of 2,250 is admitted.
    refused, projection = budget.admission_problems(job_cfg(tmp_path, max_api_calls=2200, calls_per_item=2), store)
    assert projection.spend.api_calls == 2000
    [(field, message)] = refused
    assert field == "budget.max_api_calls"
    assert "2,000 API calls (1,000 items (lines of the input) x 2 calls per item (budget.calls_per_item))" in message
    assert "91 % of max_api_calls 2,200; submit refuses at 90 %" in message
    assert "Raise budget.max_api_calls above 2,222, or submit at most 989 items" in message
    assert budget.admission_problems(job_cfg(tmp_path, max_api_calls=2250, calls_per_item=2), store)[0] == []

    # Dollars from both prices; core-hours from the declared seconds per item.
    cfg = job_cfg(tmp_path, max_usd=10, usd_per_api_call=0.004, usd_per_core_hour=0.5, calls_per_item=2,
                  core_seconds_per_item=36)
    [(field, message)] = budget.admission_problems(cfg, store)[0]
    assert field == "budget.max_usd" and "projected to use 13.00 USD (2,000 calls x $0.004 + 10.000 core-hours" \
                                          " x $0.5), 130 % of max_usd 10.00" in message

    # Nothing to project from (no per-item figure, no sample): admitted, the runtime guard holds the limit.
    cfg = job_cfg(tmp_path, max_api_calls=10)
    assert budget.admission_problems(cfg, store) == ([], None)
    assert "no projection" in budget.projection_note(cfg, None)


def test_a_sample_runs_the_real_handler_on_the_first_items_and_measures_calls_per_item(tmp_path):
    cfg = job_cfg(tmp_path, max_api_calls=100)
    cfg.params["fail"] = {"3": "network"}  # a transient error: the item is tried errors.max_attempts (3) times
    cfg.errors.backoff_base_s = cfg.errors.backoff_max_s = 0.001
    sample = budget.measure_sample(cfg, LocalManifestStore(root=str(tmp_path / "state")), 10)
    assert [i for _, i in calls(str(tmp_path / "calls"))] == [0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9]
    assert (sample.items, sample.calls, sample.calls_per_item) == (10, 12, 1.2) and sample.errors == {"network": 1}
    # 1,000 items at 1.2 calls each: 1,200 calls, 120 % of the limit, measured rather than declared.
    [(_, message)] = budget.admission_problems(cfg, LocalManifestStore(root=str(tmp_path / "state")), sample)[0]
    assert "1,200 API calls" in message and "measured by --sample 10" in message


@pytest.mark.parametrize("handler", ["counting_threads", "counting_async"])
def test_a_sample_paces_a_declared_limit_for_a_sync_or_an_async_handler(tmp_path, handler):
    # `async with ctx.limit` in an async handler took its tokens the way a job's workers do, which the sample's
    # pacer could not give: every call failed (errors {'handler': 3}) and the sample measured nothing.
    cfg = job_cfg(tmp_path, n=3, max_api_calls=100)
    cfg.handler, cfg.params["limit"] = f"support.sample_handlers:{handler}", "api"
    cfg.rate_limits = parse_config({**cfg.model_dump(), "rate_limits": {"api": {"per_second": 20}}}).rate_limits
    sample = budget.measure_sample(cfg, LocalManifestStore(root=str(tmp_path / "state")), 3)
    assert (sample.items, sample.calls, sample.errors) == (3, 3, {})


def test_create_job_refuses_a_projected_overrun_before_writing_anything(tmp_path):
    """``create_job`` is what ``submit``, ``submit --deployment`` and a deployment's own run all go through."""
    with pytest.raises(JobRefused) as info:
        create_job(job_cfg(tmp_path, max_api_calls=1000, calls_per_item=1), None)
    assert [f for f, _ in info.value.problems] == ["budget.max_api_calls"]
    assert not (tmp_path / "state" / "jobs").exists()

    job = create_job(job_cfg(tmp_path, max_api_calls=2000, calls_per_item=1), None)  # 50 %: admitted
    assert job.budget_projection["api_calls"] == 1000 and job.schema_version == JOB_SCHEMA_VERSION


# ---- spend, pause, raise ---------------------------------------------------------------------------------------

def test_spend_reaches_a_limit_and_the_pause_says_how_to_continue(tmp_path):
    cfg = job_cfg(tmp_path, max_api_calls=1000, max_usd=5, usd_per_core_hour=2)
    job = new_job_manifest(cfg, None)
    job.counts = Counts(items_total=4000, items_succeeded=1000, api_calls=1030)
    job.core_seconds = 1800  # half a core-hour: $1
    hits = budget.reached(cfg.budget, budget.spent(job))
    assert [str(h) for h in hits] == ["budget max_api_calls 1,030/1,000 reached"]
    # 1.03 calls per item so far, 4,000 items, 10 % more: 4,532 -> 4,600.
    assert budget.pause_reason("budgeted", hits, job.counts) == (
        "budget max_api_calls 1,030/1,000 reached; `slurmctl resume budgeted --raise-budget "
        "max_api_calls=4600` continues it (committed batches are kept)")
    view = budget.usage_view(job.model_dump(mode="json"))
    assert (view["core_hours"], view["cost_usd"]) == (0.5, 1.0)
    assert view["budget"]["max_api_calls"] == {"max": 1000, "used": 1030, "share": 1.03}


def test_raising_the_budget_is_recorded_in_the_job_manifest_and_must_clear_what_was_spent(tmp_path):
    cfg = job_cfg(tmp_path, max_api_calls=1000, max_usd=5, usd_per_api_call=0.01)
    job = new_job_manifest(cfg, None)
    job.counts.api_calls = 1030  # $10.30: both limits reached

    with pytest.raises(ValueError, match="max_api_calls 1,010 is not above what the job already spent"):
        budget.raise_budget(job, budget.parse_raises(["max_api_calls=1010,max_usd=20"]), "me@here")
    with pytest.raises(ValueError, match="max_usd 5.00 is not above"):  # one limit raised, the other still reached
        budget.raise_budget(job, budget.parse_raises(["max_api_calls=2000"]), "me@here")
    with pytest.raises(ValueError, match="KEY=VALUE with KEY one of max_api_calls"):
        budget.parse_raises(["calls=3"])
    config = budget.raise_budget(job, budget.parse_raises(["max_api_calls=2000", "max_usd=none"]), "me@here")
    assert config["budget"] == {"usd_per_api_call": 0.01, "max_api_calls": 2000}
    assert job.budget_changes[-1]["by"] == "me@here" and job.budget_changes[-1]["changes"] == {
        "max_api_calls": {"from": 1000, "to": 2000}, "max_usd": {"from": 5.0, "to": None}}


def test_a_job_manifest_of_schema_2_loads_with_its_spend_at_zero(tmp_path):
    store = LocalManifestStore(root=str(tmp_path / "state"))
    body = new_job_manifest(job_cfg(tmp_path), None).model_dump(mode="json")
    body["counts"].pop("api_calls")
    for k in ("core_seconds", "budget_changes", "budget_projection"):
        body.pop(k)
    body["config"].pop("budget")
    store.put_json(Keys("budgeted").job, body | {"schema_version": 2})
    job = load_job(store, "budgeted")
    assert (job.schema_version, job.counts.api_calls, job.core_seconds) == (JOB_SCHEMA_VERSION, 0, 0.0)
    assert budget.budget_of(job.config).limits == {}


# ---- a real job on the embedded default ------------------------------------------------------------------------

def test_submit_refuses_a_job_projected_over_budget_and_writes_nothing(tmp_path, slurmctl_home):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(500)])
    cfg = write_config(tmp_path / "job.yaml", job_id="too-dear", handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, storage={"uri": "state"},
                       params={"calls_file": str(tmp_path / "calls")},
                       budget={"max_api_calls": 1000, "calls_per_item": 2})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 2, result.stderr
    assert "budget.max_api_calls: the job is projected to use 1,000 API calls (500 items" in result.stderr
    assert "100 % of max_api_calls 1,000; submit refuses at 90 %" in result.stderr
    assert not (tmp_path / "state" / "jobs").exists() and not (slurmctl_home / "jobs").exists()
    assert not (tmp_path / "calls").exists()  # no handler call: nothing ran

    # --sample calls the real handler, and says so first: 1 call per item measured, 500 projected, 96 % of 520.
    write_config(tmp_path / "job.yaml", **{**yaml.safe_load(cfg.read_text()),
                                           "budget": {"max_api_calls": 520}})
    sampled = run_cli("submit", str(cfg), "--sample", "5")
    assert sampled.returncode == 2, sampled.stderr
    assert "THIS CALLS THE REAL API" in sampled.stderr and "sample: 5 items, 5 handler calls" in sampled.stderr
    assert "500 API calls (500 items (lines of the input) x 1 calls per item (measured by --sample 5))" \
        in sampled.stderr
    assert [i for _, i in calls(str(tmp_path / "calls"))] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "state" / "jobs").exists()


@pytest.mark.integration
def test_a_deployment_run_is_refused_by_the_same_admission_before_any_batch(tmp_path, prefect_api):
    from slurmctl.flows.job import run_job

    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(100)])
    cfg = write_config(tmp_path / "job.yaml", job_id="dear-deploy", handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, storage={"uri": "state"},
                       params={"calls_file": str(tmp_path / "calls")},
                       budget={"max_usd": 1, "usd_per_api_call": 0.01, "calls_per_item": 1})
    with flows_reporting_to(prefect_api), pytest.raises(JobRefused, match="budget.max_usd: the job is projected "
                                                                          "to use 1.00 USD"):
        run_job(config_path=str(cfg))  # as the `job` deployment runs it
    assert not (tmp_path / "state" / "jobs").exists() and not (tmp_path / "calls").exists()


@pytest.mark.integration
def test_a_job_pauses_at_its_budget_and_resume_raise_budget_finishes_it_exactly_once(tmp_path, prefect_api,
                                                                                     slurmctl_home):
    n, limit, batch = 60, 25, 10
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    cfg = write_config(tmp_path / "job.yaml", job_id="capped", handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, batch_size=batch, storage={"uri": "state"},
                       params={"calls_file": str(tmp_path / "calls"), "sleep_s": 0.03},
                       cluster={"kind": "local", "n_workers": 1},
                       budget={"max_api_calls": limit, "usd_per_api_call": 0.5})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 1, result.stderr + log_tail(slurmctl_home, "capped")
    assert "budget: no projection" in result.stderr
    assert "job capped paused: budget max_api_calls" in result.stderr

    view = status("capped")
    assert view["status"] == "paused" and view["paused"] and view["phase"] == "process"
    # At most the batch that reached the limit plus one batch per worker thread (1) past it.
    assert limit <= view["api_calls"] < limit + 2 * batch, view
    assert view["api_calls"] == len(calls(str(tmp_path / "calls"))) == 10 * view["batches_done"] < n
    assert view["error"].startswith(f"budget max_api_calls {view['api_calls']}/25 reached; `slurmctl "
                                    f"resume capped --raise-budget max_api_calls=")
    assert view["cost_usd"] == view["api_calls"] * 0.5 and view["budget"]["max_api_calls"]["max"] == 25
    # The Prefect UI: the run ends Paused (a final, not-failed state) with the reason; the summary and an event.
    kind, name, message = flow_run_final_state(prefect_api, view["flow_run_id"])
    assert (kind, name) == ("CANCELLED", "Paused") and "max_api_calls" in message
    summary = job_artifacts(prefect_api, view["flow_run_id"])["capped-summary"].data
    assert "## capped: paused" in summary and f"| API calls | {view['api_calls']} | 25 (" in summary
    paused = wait_for(lambda: job_events(prefect_api, "capped", "slurmctl.job.paused"), 30, "the paused event")
    assert [e["payload"]["error"] for e in paused] == [view["error"]]

    # A plain resume says what to do; with the budget raised the job finishes, each item once.
    plain = run_cli("resume", "capped")
    assert plain.returncode == 2 and "--raise-budget KEY=VALUE" in plain.stderr
    done = run_cli("resume", "capped", "--raise-budget", "max_api_calls=100", "--wait")
    assert done.returncode == 0, done.stderr + log_tail(slurmctl_home, "capped")
    manifest = job_manifest(tmp_path / "state", "capped")
    view = status_view(manifest)  # what `slurmctl status --json` prints
    assert view["status"] == "completed" and view["api_calls"] == n and view["cost_usd"] == n * 0.5
    assert_exactly_once(view, range(n))
    assert sorted(i for _, i in calls(str(tmp_path / "calls"))) == list(range(n))  # no item called twice
    assert len(committed_tasks(tmp_path / "state", "capped")) == n // batch
    assert manifest["config"]["budget"]["max_api_calls"] == 100 and manifest["budget_changes"][0]["changes"] == {
        "max_api_calls": {"from": 25, "to": 100}}
    assert manifest["core_seconds"] > 0
    summary = job_artifacts(prefect_api, view["flow_run_id"])["capped-summary"].data
    assert f"| API calls | {n} | 100 (60 %) |" in summary and "| cost (USD) | 30.00 |" in summary


def test_status_reports_the_spend_of_any_job_and_a_budget_against_its_limits(tmp_path):
    store = LocalManifestStore(root=str(tmp_path / "state"))
    base = {"handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"}, "storage": {"uri": store.root}}
    job = new_job_manifest(parse_config({**base, "job_id": "plain"}), None)
    job.counts.api_calls, job.core_seconds = 7, 7200
    store.put_json(Keys("plain").job, job.model_dump(mode="json"))
    view = status_view(load_job(store, "plain").model_dump(mode="json"))  # what `status --json` prints
    assert (view["api_calls"], view["core_hours"], view["cost_usd"], view["budget"]) == (7, 2.0, None, None)

    job = new_job_manifest(parse_config({**base, "job_id": "capped", "budget": {
        "max_api_calls": 25, "max_usd": 100, "usd_per_api_call": 0.5}}), None)
    job.status, job.counts.api_calls, job.error = "paused", 30, "budget max_api_calls 30/25 reached; ..."
    store.put_json(Keys("capped").job, job.model_dump(mode="json"))
    human = run_cli("status", "capped", "--storage", store.root).stdout
    lines = {k: v.strip() for k, _, v in (line.partition(" ") for line in human.splitlines())}
    assert lines["budget"] == "max_api_calls 30/25 (120 %); max_usd 15.00/100.00 (15 %)"
    assert (lines["status"], lines["paused"], lines["cost_usd"]) == ("paused", "True", "15.0")


class _Threads:
    """A Dask client's ``nthreads()``: 2 worker processes, ``per_worker`` Dask threads each."""

    def __init__(self, per_worker: int) -> None:
        self.per_worker = per_worker

    def nthreads(self) -> dict[str, int]:
        return {"tcp://w1": self.per_worker, "tcp://w2": self.per_worker}


@pytest.mark.parametrize("handler,dask_threads", [("slurmctl.handlers.echo:handle", 1),
                                                  ("support.sample_handlers:counting_async", 2)])
def test_core_hours_count_the_cores_booked_not_the_threads_that_hold_items_in_flight(handler, dask_threads):
    # 2 workers x 1 thread book 2 cores. An async handler's workers run two shards per thread on threads that book no
    # more (Slurm's job_cpu): Dask reports 4 threads, and the bill is still 2 cores for the time they are up.
    cfg = parse_config({"handler": handler, "input": {"uri": "in.jsonl"},
                        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1}})
    job = new_job_manifest(cfg, None)
    guard = BudgetGuard(cfg, _Threads(dask_threads), None)
    guard.tick(job, sample_cores=True)
    guard.last -= 1800.0  # half an hour up
    guard.tick(job, sample_cores=False)
    assert job.core_seconds == pytest.approx(2 * 1800.0, rel=0.01)
