"""``slurmctl iam-policy``: the least-privilege policy of a job — exact ARNs, prefix and partition-key conditions,
only the actions the code calls."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from support.jobs import log_tail, run_cli, status, write_config
from support.servers import free_port, moto_command, stop, wait_http

from slurmctl.config import parse_config
from slurmctl.iam import policy_for

S3_JOB = {"job_id": "geo-1", "handler": "slurmctl.handlers.echo:handle",
          "input": {"uri": "s3://in-bucket/exports/users.jsonl"},
          "storage": {"uri": "s3://team-bucket/runs/", "region": "eu-west-1"},
          "rate_limiter": {"kind": "dynamodb", "table": "team-limits", "region": "eu-west-1"},
          "rate_limits": {"geo": {"per_second": 10}, "shared": {"per_second": 5, "key": "maps-api/quota"}}}


def statements(cfg: dict, **kw) -> dict[str, dict]:
    policy = policy_for(parse_config(cfg), **kw)
    assert policy["Version"] == "2012-10-17"
    return {s["Sid"]: s for s in policy["Statement"]}


def test_an_s3_job_with_a_dynamodb_limiter_gets_exact_arns_and_conditions():
    s = statements(S3_JOB, account="123456789012")
    assert s["JobObjects"]["Resource"] == ["arn:aws:s3:::team-bucket/runs/jobs/geo-1/*",
                                           "arn:aws:s3:::team-bucket/runs/_probes/*",
                                           "arn:aws:s3:::team-bucket/runs/rate-limits/*"]
    assert set(s["JobObjects"]["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                              "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
    assert s["ListJobPrefixes"] == {
        "Sid": "ListJobPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"],
        "Resource": ["arn:aws:s3:::team-bucket"],
        "Condition": {"StringLike": {"s3:prefix": ["runs/jobs/geo-1/*", "runs/_probes/*", "runs/rate-limits/*"]}}}
    assert s["ReadInput"]["Resource"] == ["arn:aws:s3:::in-bucket/exports/users.jsonl"]
    assert s["ReadInput"]["Action"] == ["s3:GetObject"]
    table = "arn:aws:dynamodb:eu-west-1:123456789012:table/team-limits"
    assert s["RateLimitItems"]["Resource"] == [table]
    assert s["RateLimitItems"]["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["geo-1/geo", "maps-api/quota"]}}
    assert s["RateLimitTable"]["Action"] == ["dynamodb:DescribeTable"]  # no CreateTable unless asked
    assert "dynamodb:CreateTable" in statements(S3_JOB, create_table=True)["RateLimitTable"]["Action"]
    every = [a for st in s.values() for a in st["Action"]]
    assert not [a for a in every if "*" in a]  # no wildcard action anywhere


def test_no_rate_limits_means_no_dynamodb_and_no_signal_prefix():
    s = statements({k: v for k, v in S3_JOB.items() if k != "rate_limits"})
    assert set(s) == {"JobObjects", "ListJobPrefixes", "ReadInput"}
    assert not any("rate-limits" in r for r in s["JobObjects"]["Resource"])
    assert statements({**S3_JOB, "storage": {"uri": "s3://b-1"}})["JobObjects"]["Resource"][0] == \
        "arn:aws:s3:::b-1/jobs/geo-1/*"  # a store at the bucket's root


@pytest.mark.parametrize("key_id, resource, condition", [
    ("1234abcd-12ab-34cd-56ef-1234567890ab", "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
     None),
    ("arn:aws:kms:us-east-2:111122223333:key/mrk-1", "arn:aws:kms:us-east-2:111122223333:key/mrk-1", None),
    ("alias/slurmctl", "arn:aws:kms:eu-west-1:123456789012:key/*", {"StringEquals": {"kms:RequestAlias": "alias/slurmctl"}}),
    ("arn:aws:kms:eu-west-1:123456789012:alias/team", "arn:aws:kms:eu-west-1:123456789012:key/*",
     {"StringEquals": {"kms:RequestAlias": "alias/team"}}),
])
def test_an_sse_kms_store_may_use_its_key_by_the_keys_arn(key_id: str, resource: str, condition: dict | None):
    # IAM matches KMS calls against the key's ARN, never the alias's, so an alias becomes a condition on the request.
    storage = {**S3_JOB["storage"], "sse": "aws:kms", "sse_kms_key_id": key_id}
    s = statements({**S3_JOB, "storage": storage}, account="123456789012")["StoreEncryption"]
    assert s["Action"] == ["kms:GenerateDataKey", "kms:Decrypt"]
    assert s["Resource"] == [resource] and s.get("Condition") == condition
    plain = {**S3_JOB["storage"], "sse": "aws:kms"}  # the account's aws/s3 key: its key policy lets S3 use it
    assert "StoreEncryption" not in statements({**S3_JOB, "storage": plain})


def test_a_local_job_needs_nothing(tmp_path: Path, slurmctl_home: Path):
    cfg = write_config(tmp_path / "job.yaml", job_id="local", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "in.jsonl"})
    out = run_cli("iam-policy", str(cfg))
    assert out.returncode == 0 and json.loads(out.stdout) == {"Version": "2012-10-17", "Statement": []}
    assert "uses no AWS service" in out.stderr
    cfg = write_config(tmp_path / "s3.yaml", **S3_JOB)
    policy = json.loads(run_cli("iam-policy", str(cfg), "--account", "123456789012").stdout)
    assert [s["Sid"] for s in policy["Statement"]] == ["JobObjects", "ListJobPrefixes", "ReadInput",
                                                        "RateLimitItems", "RateLimitTable"]


@pytest.fixture
def iam_moto(tmp_path: Path) -> Iterator[str]:
    """A moto server of its own that enforces IAM after the test's setup calls (``INITIAL_NO_AUTH_ACTION_COUNT``)."""
    port = free_port()
    log = tmp_path / "moto-iam.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
    with log.open("wb") as out:
        proc = subprocess.Popen(moto_command(port), env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", 60, proc, log)
        yield url
    finally:
        stop(proc)


def moto_checkable(policy: dict) -> dict:
    """The policy with the same actions, as far as moto can evaluate it: moto authorizes DynamoDB calls against the
    resource ``*`` (it never sees the table's ARN or the item's key), so those statements keep their actions but
    not their resource and condition (checked by the unit test above). S3 statements stay exact."""
    def relaxed(st: dict) -> dict:
        if not any(a.startswith("dynamodb:") for a in st["Action"]):
            return st
        return {k: v for k, v in st.items() if k != "Condition"} | {"Resource": "*"}
    return {**policy, "Statement": [relaxed(st) for st in policy["Statement"]]}


SETUP_ACTIONS = 7  # the unauthenticated calls below, before the job runs as the restricted user


@pytest.mark.integration
@pytest.mark.aws
def test_a_job_runs_as_a_user_with_only_its_policy(tmp_path: Path, prefect_api: str, slurmctl_home: Path,
                                                   iam_moto: str, monkeypatch):
    import boto3

    admin = {"endpoint_url": iam_moto, "region_name": "us-east-1", "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    cfg = write_config(tmp_path / "job.yaml", job_id="least", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "s3://iam-input/users.jsonl"}, batch_size=10,
                       storage={"uri": "s3://iam-store/runs", "endpoint_url": iam_moto, "region": "us-east-1"},
                       rate_limiter={"kind": "dynamodb", "table": "iam-limits", "endpoint_url": iam_moto,
                                     "region": "us-east-1"},
                       rate_limits={"api": {"per_second": 500}})
    policy = moto_checkable(json.loads(run_cli("iam-policy", str(cfg)).stdout))
    s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
    s3.create_bucket(Bucket="iam-store")                                                      # 1
    s3.create_bucket(Bucket="iam-input")                                                      # 2
    s3.put_object(Bucket="iam-input", Key="users.jsonl",                                      # 3
                  Body=b"".join(json.dumps({"id": i}).encode() + b"\n" for i in range(30)))
    boto3.client("dynamodb", **admin).create_table(                                           # 4
        TableName="iam-limits", BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}])
    iam.create_user(UserName="job-runner")                                                    # 5
    iam.put_user_policy(UserName="job-runner", PolicyName="slurmctl-least",                   # 6
                        PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="job-runner")["AccessKey"]                           # 7
    # from here on moto checks every call against the caller's policies
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    out = run_cli("submit", str(cfg), "--wait")
    assert out.returncode == 0, out.stderr + log_tail(slurmctl_home, "least")
    assert status("least")["items_succeeded"] == 30
    # and the policy is what stops anything more: the same user cannot read another bucket
    denied = boto3.client("s3", endpoint_url=iam_moto, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    with pytest.raises(Exception, match="AccessDenied"):
        denied.list_objects_v2(Bucket="iam-input")
