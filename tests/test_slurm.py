"""Batches run in Dask workers that dask-jobqueue's SLURMCluster started with sbatch on the real Slurm."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_cli, write_config, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


def our_slurm_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines() if line.endswith(" slurmctl-on-slurm")]


def test_job_runs_on_slurm_workers(tmp_path: Path, prefect_api: str, slurmctl_home: Path, slurm: None):
    write_jsonl(tmp_path / "users.jsonl", [{"id": i} for i in range(400)])
    cfg = write_config(tmp_path / "job.yaml", job_id="on-slurm", handler="handlers.echo:handle",
                       input={"uri": "users.jsonl"}, batch_size=50, storage={"uri": "state"},
                       cluster={"kind": "slurm", "queue": "debug", "cores": 1, "processes": 1, "memory": "1GB",
                                "walltime": "00:10:00", "min_jobs": 2, "max_jobs": 2,
                                "log_directory": str(tmp_path / "slurm-logs")})
    result = run_cli("submit", str(cfg), "--wait", timeout=900)
    assert result.returncode == 0, result.stderr + (slurmctl_home / "logs" / "on-slurm.log").read_text()[-5000:]

    tasks = [json.loads(p.read_text()) for p in (tmp_path / "state/jobs/on-slurm/tasks").glob("batch-*.json")]
    assert len(tasks) == 8
    slurm_ids = {t["slurm_job_id"] for t in tasks}
    assert None not in slurm_ids and all(s.isdigit() for s in slurm_ids)
    # Those are real Slurm jobs that Slurm accounted for: sacct is off here, so ask the worker logs.
    logs = list((tmp_path / "slurm-logs").glob("*"))
    assert logs, "SLURMCluster wrote no job logs"

    view = json.loads(run_cli("status", "on-slurm", "--json").stdout)
    assert view["status"] == "completed" and view["items_succeeded"] == 400
    assert sorted(pq.read_table(view["output"][len("file://"):]).column("id").to_pylist()) == list(range(400))

    # The cluster is torn down with the flow: no Slurm worker job outlives the run.
    deadline = time.monotonic() + 60
    while our_slurm_jobs() and time.monotonic() < deadline:
        time.sleep(2)
    assert our_slurm_jobs() == []
