"""Server-side encryption of an S3 store: every object a job writes asks for it (moto echoes it in HeadObject)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
from support.jobs import log_tail, run_cli, write_config, write_jsonl

from slurmctl.blocks.manifest_store import store_from_uri

pytestmark = [pytest.mark.integration, pytest.mark.aws]

KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/slurmctl-test-key"


def encryption_of(s3, bucket: str, key: str) -> tuple[str | None, str | None]:
    head = s3.head_object(Bucket=bucket, Key=key)
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_a_job_with_sse_kms_writes_every_object_encrypted_with_its_key(
        tmp_path: Path, prefect_api: str, slurmctl_home: Path, moto_endpoint: str, s3_bucket: str):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    job_id = "sse-kms"
    data = write_jsonl(tmp_path / "items.jsonl", ({"id": f"i{i}", "v": i} for i in range(50)))
    cfg = write_config(tmp_path / "job.yaml", job_id=job_id, handler="slurmctl.handlers.echo:handle",
                       input={"uri": str(data)}, batch_size=20,
                       storage={"uri": f"s3://{s3_bucket}/runs", "endpoint_url": moto_endpoint,
                                "region": "us-east-1", "sse": "aws:kms", "sse_kms_key_id": KMS_KEY})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, job_id)

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/jobs/{job_id}/")["Contents"]]
    # manifests (PutObject), commits (conditional PutObject), batch outputs (managed upload), the dataset (copy)
    for wanted in ("/job.json", "/tasks/batch-", "/outputs/batch-", "/output/data.parquet", "/result.json"):
        assert any(wanted in k for k in keys), (wanted, keys)
    plain = {k: encryption_of(s3, s3_bucket, k) for k in keys}
    assert {k: v for k, v in plain.items() if v != ("aws:kms", KMS_KEY)} == {}


def test_multipart_uploads_and_copies_ask_for_encryption(moto_endpoint: str, s3_bucket: str, tmp_path: Path):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    store = store_from_uri(f"s3://{s3_bucket}/big", endpoint_url=moto_endpoint, region="us-east-1", sse="AES256")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(17 << 20))  # above the 16 MB multipart threshold: CreateMultipartUpload + parts
    store.put_file("jobs/j/outputs/big.bin", str(big))
    store.copy("jobs/j/outputs/big.bin", "jobs/j/output/big.bin")  # above the threshold too: a multipart copy
    store.put_bytes("jobs/j/small.json", b"{}", if_absent=True)
    for key in ("big/jobs/j/outputs/big.bin", "big/jobs/j/output/big.bin", "big/jobs/j/small.json"):
        assert encryption_of(s3, s3_bucket, key)[0] == "AES256", key
