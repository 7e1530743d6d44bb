"""Saved blocks by name in a job config: ``storage: {block: NAME}``, ``rate_limiter: {block: NAME}``. The blocks'
credentials are what the job uses (the environment has none), and none of them lands in a manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest
from prefect_aws import AwsClientParameters, AwsCredentials
from support.jobs import log_tail, run_cli, status, write_config, write_jsonl
from support.prefect_runs import flows_reporting_to

from slurmctl.blocks import DynamoDBRateLimiter, S3ManifestStore

pytestmark = [pytest.mark.integration, pytest.mark.aws]
SECRET = "block-secret-canary-7f3a"


def test_a_job_uses_saved_store_and_limiter_blocks_by_name(tmp_path: Path, prefect_api: str, slurmctl_home: Path,
                                                           moto_endpoint: str, s3_bucket: str, monkeypatch):
    creds = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key=SECRET, region_name="us-east-1",
                           aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))
    suffix = os.urandom(3).hex()
    table = f"team-limits-{suffix}"
    limiter = DynamoDBRateLimiter(table_name=table, aws_credentials=creds)
    limiter.ensure_table()
    with flows_reporting_to(prefect_api):  # saved on the test's Prefect server, as a team does once
        S3ManifestStore(bucket=s3_bucket, prefix="team", aws_credentials=creds).save(f"team-store-{suffix}")
        limiter.save(f"team-limiter-{suffix}")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # only the blocks have credentials now
        monkeypatch.delenv(var, raising=False)

    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(50)])
    cfg = write_config(tmp_path / "job.yaml", job_id="by-name", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "in.jsonl"}, batch_size=10, storage={"block": f"team-store-{suffix}"},
                       rate_limiter={"block": f"team-limiter-{suffix}"}, rate_limits={"api": {"per_second": 200}})
    out = run_cli("submit", str(cfg), "--wait")
    assert out.returncode == 0, out.stderr + log_tail(slurmctl_home, "by-name")
    view = status("by-name")
    assert view["status"] == "completed" and view["items_succeeded"] == 50
    assert view["output"] == f"s3://{s3_bucket}/team/jobs/by-name/output/data.parquet"

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    job = json.loads(s3.get_object(Bucket=s3_bucket, Key="team/jobs/by-name/job.json")["Body"].read())
    assert job["config"]["storage"] == {"uri": f"s3://{s3_bucket}/team", "endpoint_url": moto_endpoint,
                                        "region": "us-east-1", "block": f"team-store-{suffix}", "sse": None,
                                        "sse_kms_key_id": None}
    assert job["config"]["rate_limiter"]["kind"] == "dynamodb" and job["config"]["rate_limiter"]["table"] == table
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="team/")["Contents"]]
    for key in keys:  # no credential in any manifest or output
        assert SECRET.encode() not in s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read(), key
    dynamo = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    assert dynamo.scan(TableName=table)["Count"] >= 1  # the limit lives in the block's table


def test_an_unknown_block_name_is_refused_before_anything_is_submitted(tmp_path: Path, prefect_api: str,
                                                                       slurmctl_home: Path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1}])
    cfg = write_config(tmp_path / "job.yaml", job_id="no-block", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "in.jsonl"}, storage={"block": "nobody-saved-this"})
    out = run_cli("submit", str(cfg))
    assert out.returncode == 2
    assert "storage: block 'nobody-saved-this': no saved block" in out.stderr
    assert not (tmp_path / ".slurmctl").exists() and not (slurmctl_home / "jobs").exists()


def test_the_result_storage_block_is_loaded_when_the_server_holds_the_same_settings_else_saved(prefect_api: str,
                                                                                                monkeypatch):
    """``flows.process.saved_store``: the store the shards' results go to must be a saved block. The last job on the
    same store saved it; a new coordinator loads it (~0.06 s) instead of saving it again (~0.6 s of CPU while the
    cluster starts), unless its settings, secrets included, differ: then it saves its own."""
    from slurmctl.flows import process

    def store(secret: str) -> S3ManifestStore:
        creds = AwsCredentials(aws_access_key_id="AKIA-reuse", aws_secret_access_key=secret)
        return S3ManifestStore(bucket="reuse-bucket", prefix="p", aws_credentials=creds)

    def saved(block: S3ManifestStore) -> S3ManifestStore:
        monkeypatch.setattr(process, "_saved", {})  # as a new coordinator process
        return process.saved_store(block)

    with flows_reporting_to(prefect_api):  # the session's server (else Prefect starts a temporary one of its own)
        first = store("secret-a")
        assert saved(first) is first and first._block_document_id  # saved (this server had no such block)
        same = store("secret-a")
        again = saved(same)
        assert again is not same and again._block_document_id == first._block_document_id  # loaded, not saved
        changed = store("secret-b")
        assert saved(changed) is changed  # another secret: saved over it
        reloaded = S3ManifestStore.load(changed._block_document_name)
        assert reloaded.aws_credentials.aws_secret_access_key.get_secret_value() == "secret-b"
