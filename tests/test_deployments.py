"""The job flow as Prefect deployments (prefect.yaml) on a process work pool, as a user runs them: ``prefect deploy``,
a worker, ``prefect deployment run``, a recurring backfill whose runs each process their own date, ``slurmctl submit
--deployment``, and cancelling a worker's run from the Prefect API."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

import pytest
from support.jobs import (
    ROOT,
    TESTS,
    assert_exactly_once,
    current_status,
    held_job,
    log_tail,
    run_cli,
    status,
    wait_for,
    write_config,
    write_jsonl,
)
from support.prefect_runs import cancel_flow_run, flow_run_state
from support.sample_handlers import calls
from support.servers import BIN, stop

from slurmctl.flows.naming import job_of_run

# Mostly waiting on Prefect workers and its scheduler: run beside the rest (scripts/test.sh)
pytestmark = pytest.mark.waits


def prefect(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pool(_prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The process work pool prefect.yaml names, with the repo's deployments on it (`prefect deploy --all`, as a
    user does) and a worker polling it, started in the repo root."""
    name = "slurmctl"
    home = tmp_path_factory.mktemp("pool")
    env = {**os.environ, "PREFECT_API_URL": _prefect_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "SLURMCTL_HOME": str(home / "slurmctl-home"),
           # the worker looks for runs every second, not every 10 s (Prefect's default): each run a test creates
           # starts when the worker sees it, so a slow poll is only time spent waiting
           "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    made = prefect("work-pool", "create", name, "--type", "process", env=env)
    assert made.returncode == 0 or "already exists" in made.stdout + made.stderr, made.stdout + made.stderr
    deployed = prefect("--no-prompt", "deploy", "--all", env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = home / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", name, "--type", "process"],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"name": name, "env": env, "log": log}
    finally:
        stop(worker)


def _client_call(api_url: str, fn: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call() -> Any:
        async with get_client() as client:
            return await fn(client)

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(call())


def wait_final(api_url: str, flow_run_id: str, pool: dict[str, Any], timeout: float = 400) -> Any:
    run = wait_for(lambda: (r := _client_call(api_url, lambda c: c.read_flow_run(UUID(flow_run_id))))
                   .state.is_final() and r, timeout,
                   f"flow run {flow_run_id} to end (worker log: {pool['log'].read_text()[-2000:]})", interval=1)
    return run


def backfill_config(tmp_path: Path, dates: list[str], n: int) -> Path:
    for d in dates:
        write_jsonl(tmp_path / f"users-{d}.jsonl", [{"id": i, "day": d} for i in range(n)])
    return write_config(tmp_path / "backfill.yaml", name="backfill", job_id="backfill-{date}",
                        handler="support.sample_handlers:counting", input={"uri": "users-{date}.jsonl"},
                        batch_size=10, storage={"uri": "state"}, cluster={"kind": "local", "n_workers": 1},
                        params={"calls_file": str(tmp_path / "calls")})


def test_a_scheduled_backfill_run_processes_its_own_date_and_a_rerun_continues_it(tmp_path, prefect_api, pool):
    cfg = backfill_config(tmp_path, ["2025-04-12"], 30)
    store = str(tmp_path / "state")

    async def scheduled_run(client: Any) -> Any:
        from prefect.states import Scheduled

        dep = await client.read_deployment_by_name("slurmctl-job/backfill-daily")
        # What the scheduler creates for 2025-04-13 02:00 UTC, with this test's config; the deployment's own
        # parameters (days_before: 1) still apply.
        return await client.create_flow_run_from_deployment(
            dep.id, parameters={"config_path": str(cfg)},
            state=Scheduled(scheduled_time=dt.datetime(2025, 4, 13, 2, 0, tzinfo=dt.timezone.utc)))

    created = _client_call(prefect_api, scheduled_run)
    run = wait_final(prefect_api, str(created.id), pool)
    assert run.state.is_completed(), run.state.message
    assert run.name == "backfill-2025-04-12"  # the day before its scheduled date, named in the UI
    view = status("backfill-2025-04-12", "--storage", store)
    assert view["status"] == "completed" and view["flow_run_id"] == str(created.id)
    assert_exactly_once(view, range(30))

    # A manual re-run of that date (`prefect deployment run ... date=...`) continues the same job: nothing is
    # processed again.
    rerun = prefect("deployment", "run", "slurmctl-job/backfill-daily", "--params",
                    json.dumps({"config_path": str(cfg), "date": "2025-04-12"}), "--watch", env=pool["env"],
                    timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr + pool["log"].read_text()[-3000:]
    view = status("backfill-2025-04-12", "--storage", store)
    assert view["status"] == "completed" and view["flow_run_id"] != str(created.id)
    assert sorted(i for _, i in calls(str(tmp_path / "calls"))) == list(range(30))


def test_the_daily_schedule_gives_each_run_its_own_date(prefect_api, pool, monkeypatch):
    async def deployment(client: Any) -> Any:
        return await client.read_deployment_by_name("slurmctl-job/backfill-daily")

    dep = _client_call(prefect_api, deployment)
    (schedule,) = dep.schedules
    assert (schedule.schedule.cron, schedule.active) == ("0 2 * * *", False)  # ships paused
    props = dep.parameter_openapi_schema["properties"]  # the UI's Run form, described
    assert "YYYY-MM-DD" in props["date"]["description"] and props["config_path"]["description"]
    assert {"items": {"type": "string"}, "type": "array"} in props["retry_errors"]["anyOf"]
    assert props["days_before"]["type"] == "integer"

    async def plan_next_runs(client: Any) -> list[Any]:
        """Resume the schedule and have the server plan its next three runs now, with the scheduler service's own
        code (``POST /deployments/{id}/schedule``) instead of waiting up to a minute for its next loop."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        await client.update_deployment_schedule(dep.id, schedule.id, active=True)
        response = await client._client.post(f"/deployments/{dep.id}/schedule", json={"min_runs": 3, "max_runs": 3})
        response.raise_for_status()
        runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        return [r for r in runs if r.state.is_scheduled() and r.auto_scheduled]

    async def pause_schedule(client: Any, runs: list[Any]) -> None:
        await client.update_deployment_schedule(dep.id, schedule.id, active=False)  # deletes its planned runs

    runs = _client_call(prefect_api, plan_next_runs)
    _client_call(prefect_api, lambda c: pause_schedule(c, runs))
    assert len(runs) == 3
    monkeypatch.chdir(ROOT)  # the deployment's config_path is relative to the repo, where its worker runs
    planned = sorted((r.expected_start_time, job_of_run(r.parameters, r.expected_start_time, str(r.id))[0])
                     for r in runs)
    for start, job_id in planned:
        assert (start.hour, start.minute) == (2, 0)
        assert job_id == f"backfill-{(start.date() - dt.timedelta(days=1)).isoformat()}"
    assert len({job_id for _, job_id in planned}) == len(planned)  # one job per day


def test_the_job_flow_loads_off_the_main_thread_as_a_workers_cancellation_hook_does(tmp_path):
    """A deployment worker loads the flow in a worker thread to run its on_cancellation hook (Prefect's
    ``_workspace_runtime_bootstrap``): an import on the way that only works on the main thread (dask_jobqueue's
    ``signal.signal`` at import) made every such load fail ("Runner failed to retrieve flow to execute
    on_cancellation hooks"), and the hook never ran. A fresh interpreter, as the worker's hook subprocess is."""
    import yaml

    entrypoints = sorted({d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]})
    code = textwrap.dedent(f"""
        import threading
        from prefect.flows import load_flow_from_entrypoint

        loaded = []
        def load():
            try:
                loaded.extend(load_flow_from_entrypoint(e).on_cancellation_hooks for e in {entrypoints!r})
            except BaseException as exc:
                loaded.append(f"{{type(exc).__name__}}: {{exc}}")
        thread = threading.Thread(target=load)
        thread.start()
        thread.join()
        print(loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")})
    assert result.returncode == 0, result.stderr[-3000:]
    hooks = result.stdout.strip().splitlines()[-1]
    assert hooks.count("on_cancellation") == len(entrypoints) and "Error" not in hooks, result.stdout + result.stderr


def test_submit_to_a_deployment_then_cancel_the_workers_run_from_prefect(tmp_path, prefect_api, slurmctl_home,
                                                                        pool):
    """The worker's runner stops the run (SIGTERM with a cancel intent) and runs the flow's on_cancellation hook in
    its own process; the coordinator's watch may notice the Cancelling state first: either way the job is
    cancelled."""
    cfg, marker, release = held_job(tmp_path, "dep-cancel", 60)
    out = run_cli("submit", str(cfg), "--deployment", "job")
    assert out.returncode == 0, out.stderr
    assert "of deployment slurmctl-job/job" in out.stderr
    try:
        wait_for(marker.exists, 300, f"the worker's run to hold (worker log: {pool['log']})")
        view = status("dep-cancel")
        run = _client_call(prefect_api, lambda c: c.read_flow_run(UUID(view["flow_run_id"])))
        assert run.deployment_id is not None and run.name == "dep-cancel"  # a run of the deployment, on the worker
        cancel_flow_run(prefect_api, view["flow_run_id"])  # the UI's Cancel button
        wait_for(lambda: current_status("dep-cancel")["status"] == "cancelled", 60, "the job to be cancelled")
        wait_for(lambda: flow_run_state(prefect_api, view["flow_run_id"]) == "CANCELLED", 60,
                 "the flow run to be Cancelled")
        # The hook ran in the worker's process too (its own line; the flow's says "cancelled (<reason>)"): it is what
        # cancels a Slurm job's workers by name when the killed flow process could not.
        wait_for(lambda: "job dep-cancel cancelled; Slurm worker jobs cancelled" in pool["log"].read_text(), 120,
                 f"the worker to run the flow's on_cancellation hook (worker log: {pool['log']})")
        assert "failed to retrieve flow to execute on_cancellation hooks" not in pool["log"].read_text()
    finally:
        release.touch()
    view = status("dep-cancel")
    assert view["batches_done"] == 2 and "slurmctl resume dep-cancel" in view["error"]
    # Resuming the job the worker's run was cancelled in (here, not by a worker): it continues from its two commits
    # and every item is in the output exactly once.
    resumed = run_cli("resume", "dep-cancel", "--wait")
    assert resumed.returncode == 0, resumed.stderr + log_tail(slurmctl_home, "dep-cancel")
    view = status("dep-cancel")
    assert view["status"] == "completed"
    assert_exactly_once(view, range(60))
