"""The coordinator's own Slurm job (``slurmctl.control.slurm_coordinator``): its script and the checks before it runs.
The real thing (Slurm's SIGTERM before the walltime, the next coordinator continuing) is in tests/test_slurm.py."""

from __future__ import annotations

import pytest
from support.jobs import run_cli, write_config, write_jsonl

from slurmctl.config import parse_config
from slurmctl.control.slurm_coordinator import coordinator_job_name, coordinator_script, secrets_path
from slurmctl.slurm import slurm_job_name


def slurm_cfg(**coordinator):
    return parse_config({"job_id": "geo-1", "handler": "m:f", "input": {"uri": "in.jsonl"},
                         "cluster": {"kind": "slurm", "queue": "cpu", "account": "lab",
                                     "coordinator": {"on": "slurm", **coordinator}}})


def test_the_coordinator_script_asks_slurm_for_an_early_sigterm_and_a_requeue(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURMCTL_HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    cfg = slurm_cfg(walltime="12:00:00", memory="2GB", signal_before_s=300)
    script = coordinator_script("geo-1", '{"uri": "s3://b"}', cfg.cluster.coordinator, cfg.cluster.queue,
                                cfg.cluster.account)
    for line in ("#SBATCH --job-name=slurmctl-coordinator_geo-1", "#SBATCH --time=12:00:00",
                 "#SBATCH --signal=B:TERM@300", "#SBATCH --requeue", "#SBATCH --mem=2G", "#SBATCH --partition=cpu",
                 "#SBATCH --account=lab", "export AWS_DEFAULT_REGION=eu-west-1"):
        assert line in script.splitlines(), line
    # exec: the coordinator is the batch shell, which is what B:TERM signals.
    assert script.splitlines()[-1].startswith("exec ") and "-m slurmctl.cli.coordinator geo-1 --slurm-job" in script
    assert "s3cr3t" not in script and str(secrets_path("geo-1")) in script
    assert (secrets_path("geo-1").stat().st_mode & 0o777) == 0o600


def test_cancelling_workers_by_name_never_reaches_the_coordinator():
    assert coordinator_job_name("geo-1") != slurm_job_name("geo-1")
    # Job ids hold no "_": no job's worker name is another job's coordinator name.
    assert "_" in coordinator_job_name("x") and not parse_config(
        {"job_id": "coordinator-x", "handler": "m:f", "input": {"uri": "i.jsonl"}}).job_id.count("_")


@pytest.mark.parametrize("coordinator,message", [
    ({"walltime": "00:01:00", "signal_before_s": 120}, "signal_before_s must be shorter than the walltime"),
    ({"on": "login"}, "cluster.coordinator.on"),
    ({"memory": "lots"}, "cluster.coordinator.memory"),
])
def test_a_bad_coordinator_config_names_its_field(coordinator, message):
    from slurmctl.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        slurm_cfg(**coordinator)


def test_submit_on_slurm_needs_a_slurm_cluster(tmp_path, slurmctl_home):
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1}])
    cfg = write_config(tmp_path / "job.yaml", job_id="local-coord", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "in.jsonl"}, storage={"uri": "state"})
    result = run_cli("submit", str(cfg), "--on", "slurm")
    assert result.returncode == 2 and "cluster.kind: slurm" in result.stderr
    assert not (tmp_path / "state" / "jobs" / "local-coord").exists()  # refused before anything was created
