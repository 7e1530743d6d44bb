"""The embedded default's cluster as a coordinator runs it: started before the flow partitions, used by the phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from slurmctl.config import parse_config
from slurmctl.flows import local_workers
from slurmctl.flows.job import _runner, scheduler_kwargs


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch):
    """This process as a coordinator of a local job (``--fork-workers``), without the forked workers' template."""
    monkeypatch.setattr(local_workers, "_allowed", True)
    monkeypatch.setattr(local_workers, "_early", None)
    yield
    local_workers.close_cluster()


def job_config(**cluster: Any) -> Any:
    return parse_config({"job_id": "early", "handler": "slurmctl.handlers.echo:handle", "input": {"uri": "x.jsonl"},
                         "worker_ttl_s": 45, "cluster": {"kind": "local", "n_workers": 1, "processes": False,
                                                         **cluster}})


def test_the_phases_run_on_the_cluster_the_coordinator_started_with_the_jobs_scheduler_settings(coordinator):
    cfg = job_config()
    local_workers.start_cluster(_runner(cfg).cluster_kwargs, scheduler_kwargs(cfg))
    runner = _runner(cfg)  # what the process phase and each retry round are given
    cluster = local_workers._early._cluster
    assert runner.address == cluster.scheduler_address and runner.cluster_kwargs == {}
    # Dask's config is not set yet when the coordinator starts it: the settings are the scheduler's own
    assert cluster.scheduler.allowed_failures == 0 and cluster.scheduler.worker_ttl == 45

    other = job_config(n_workers=2)  # not the cluster this job's phases would start: they start their own
    assert _runner(other).address is None and _runner(other).cluster_kwargs["n_workers"] == 2

    local_workers.close_cluster()
    assert cluster.status.name == "closed" and _runner(cfg).address is None
    assert local_workers._early._cluster is None  # not left to be freed at the interpreter's exit


def test_workers_run_without_dasks_profiler_unless_asked(coordinator, monkeypatch: pytest.MonkeyPatch):
    """Dask's profiler samples every worker thread's stack every 10 ms for a dashboard our clusters do not serve: 8 %
    of a worker's core, taken from the loop that claims its rate-limit slots. A local worker's nanny hands it the
    config; a Slurm worker's job script exports it. A user who sets the variable keeps their choice."""
    from distributed import Client

    from slurmctl.config import SlurmClusterConfig
    from slurmctl.flows.runners import PROFILER_ENV, slurm_prologue

    monkeypatch.delenv(PROFILER_ENV, raising=False)
    cfg = job_config(processes=True)
    local_workers.start_cluster(_runner(cfg).cluster_kwargs, scheduler_kwargs(cfg))
    with Client(local_workers._early.address()) as client:
        callbacks = client.run(lambda dask_worker: sorted(dask_worker.periodic_callbacks))
    assert len(callbacks) == 1 and all("profile" not in names and "heartbeat" in names
                                       for names in callbacks.values())
    assert f"export {PROFILER_ENV}=False" in slurm_prologue(SlurmClusterConfig(kind="slurm"))

    monkeypatch.setenv(PROFILER_ENV, "True")
    assert "config" not in _runner(job_config(processes=True, n_workers=2)).cluster_kwargs
    assert not any(PROFILER_ENV in line for line in slurm_prologue(SlurmClusterConfig(kind="slurm")))


def test_only_a_coordinator_starts_a_cluster_early(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(local_workers, "_allowed", False)  # a test session, a notebook: the phases start their own
    monkeypatch.setattr(local_workers, "_early", None)
    cfg = job_config()
    local_workers.start_cluster(_runner(cfg).cluster_kwargs, scheduler_kwargs(cfg))
    assert local_workers._early is None and _runner(cfg).address is None


def test_a_worker_forked_from_the_template_has_its_imports_and_leaves_them_out_of_its_collections(tmp_path):
    """The template imports what a worker needs, pandas included (pyarrow imports it inside the first batch
    otherwise), and freezes it last (``flows/frozen_imports.py``): a no-op job's workers spent ~0.1 s in each full
    collection walking Prefect's and Dask's objects. A forkserver of this test's own (not this session's), as a
    coordinator starts it."""
    script = textwrap.dedent("""
        import multiprocessing
        from slurmctl.flows import local_workers
        from support.worker_probe import state
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(local_workers.PRELOAD))
        with ctx.Pool(1) as pool:
            print(json.dumps(pool.apply(state)))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", "import json\n" + script], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    worker = json.loads(out.stdout.strip().splitlines()[-1])
    assert worker["pandas"] and worker["frozen"] > 100_000, worker
