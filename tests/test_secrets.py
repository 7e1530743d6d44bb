"""No secret lands in a manifest, an output, a log, the Prefect API or a Slurm job script, and the secrets still
reach the Slurm workers at a site that runs ``--export=NONE``: credentials live in saved blocks and in a 0600 file
the job script sources by path (``slurmctl.secret_env``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import uuid
from pathlib import Path

import boto3
import pytest
from prefect.blocks.system import Secret
from prefect_aws import AwsClientParameters, AwsCredentials
from support.canary import capture_batch_scripts, hits_in_bucket, hits_in_files, hits_in_prefect
from support.jobs import log_tail, run_cli, wait_for, wait_until_ended, write_config, write_jsonl
from support.prefect_runs import flows_reporting_to
from support.sample_handlers import sha256

from slurmctl.blocks import S3ManifestStore
from slurmctl.config import SlurmClusterConfig
from slurmctl.flows.runners import SecretEnvSLURMCluster, slurm_prologue
from slurmctl.secret_env import is_secret, split_env, write_env_file


def test_credential_names_are_secret_and_the_rest_inline():
    assert all(map(is_secret, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PREFECT_API_KEY",
                               "DB_PASSWORD", "GITHUB_TOKEN"]))
    assert not any(map(is_secret, ["PREFECT_API_URL", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "SLURMCTL_HOME"]))
    inline, secret = split_env(["AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "UNSET"],
                               {"AWS_DEFAULT_REGION": "eu-west-1", "AWS_SESSION_TOKEN": "t"})
    assert inline == {"AWS_DEFAULT_REGION": "eu-west-1"} and secret == ["AWS_SESSION_TOKEN"]


def test_the_job_script_sources_secrets_by_path_and_holds_no_value(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-inline")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    secrets = tmp_path / "secrets" / "j.env"
    script = "\n".join(slurm_prologue(SlurmClusterConfig(kind="slurm"), secrets))
    assert "canary-inline" not in script and f". {secrets};" in script
    assert "export AWS_DEFAULT_REGION=eu-west-1" in script


def test_the_secrets_file_is_the_users_alone_and_gone_when_the_cluster_closes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "it's a 'token'\nwith a newline")
    path = tmp_path / "secrets" / "j.env"
    path.parent.mkdir()
    path.write_text("stale")
    os.chmod(path, 0o644)  # a leftover readable file is made private before it gets the new values
    write_env_file(path, {"AWS_SESSION_TOKEN": os.environ["AWS_SESSION_TOKEN"]})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    import subprocess

    sourced = subprocess.run(["bash", "-c", f"set -a; . {path}; set +a; printf %s \"$AWS_SESSION_TOKEN\""],
                             capture_output=True, text=True, env={}).stdout
    assert sourced == os.environ["AWS_SESSION_TOKEN"]

    cluster = SecretEnvSLURMCluster(secrets_file=str(path), secret_names=["AWS_SESSION_TOKEN"], queue="debug",
                                    cores=1, memory="1GB", scheduler_options={"dashboard_address": None})
    assert path.exists() and "newline" not in cluster.job_script()
    cluster.close()
    assert not path.exists()


@pytest.mark.integration
@pytest.mark.slurm
def test_no_secret_leaks_from_a_slurm_job(tmp_path: Path, prefect_api: str, slurmctl_home: Path, moto_endpoint: str,
                                          s3_bucket: str, slurm: None, monkeypatch):
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    tag = uuid.uuid4().hex[:10]
    canary_a, canary_b, canary_c = (f"canary-{x}-{tag}" for x in "ABC")
    creds = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key=canary_a, region_name="us-east-1",
                           aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))
    with flows_reporting_to(prefect_api):  # saved once, as a team does
        S3ManifestStore(bucket=s3_bucket, prefix="team", aws_credentials=creds).save(f"store-{tag}")
        Secret(value=canary_c).save(f"api-token-{tag}")
    monkeypatch.setenv("AWS_SESSION_TOKEN", canary_b)  # moto takes any token; the handler checks it arrived

    job_id, n = f"secrets-{tag}", 40
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    marker, release = tmp_path / "held", tmp_path / "release"
    cfg = write_config(
        tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:using_secrets",
        input={"uri": "in.jsonl"}, batch_size=10, storage={"block": f"store-{tag}"}, batch_retries=0,
        params={"secret_block": f"api-token-{tag}", "secret_sha256": sha256(canary_c),
                "env_sha256": {"AWS_SESSION_TOKEN": sha256(canary_b)},
                "hold": {"id": 15, "marker": str(marker), "release": str(release)}},
        # --export=NONE: the workers get nothing from the submitting environment but what the job script sets
        cluster={"kind": "slurm", "queue": "debug", "cores": 1, "memory": "1GB", "walltime": "00:10:00",
                 "min_jobs": 2, "max_jobs": 2, "job_extra_directives": ["--export=NONE"]})
    assert run_cli("submit", str(cfg)).returncode == 0

    # Mid-run: the job scripts as Slurm stores them, and the secrets file they source.
    wait_for(marker.exists, 600, "a batch holding on a Slurm worker")
    scripts = wait_for(lambda: len(s := capture_batch_scripts(f"slurmctl-{job_id}", tmp_path / "scripts")) >= 2
                       and s, 120, "two worker job scripts")
    secrets_file = slurmctl_home / "secrets" / f"{job_id}.env"
    assert all(f". {secrets_file};" in p.read_text() for p in scripts)
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert canary_b in secrets_file.read_text()  # it is how B reaches the workers
    release.touch()

    view = wait_until_ended(job_id, 600)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    assert view["status"] == "completed" and view["items_succeeded"] == n, (
        view.get("error"), log_tail(slurmctl_home, job_id))
    assert view["output"].startswith(f"s3://{s3_bucket}/team/")  # the workers used the block's credentials (A)
    wait_for(lambda: not secrets_file.exists(), 60, "the secrets file to be removed with the cluster")
    tasks = [json.loads(s3.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read()) for o in s3.list_objects_v2(
        Bucket=s3_bucket, Prefix=f"team/jobs/{job_id}/tasks/batch-")["Contents"] if o["Key"].endswith(".json")]
    assert tasks and all(t["slurm_job_id"] for t in tasks)  # the batches ran in the Slurm worker jobs

    canaries = [canary_a, canary_b, canary_c]
    found = (hits_in_bucket(s3, s3_bucket, canaries)  # manifests (the job's config too) and outputs
             + hits_in_files(tmp_path, canaries)  # coordinator and worker logs, captured job scripts
             + hits_in_prefect(prefect_api, canaries, since=started))  # parameters, logs, artifacts, events
    assert found == []
