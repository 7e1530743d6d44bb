"""Input, manifests and output on S3, through a moto server over HTTP (real boto3 requests on 127.0.0.1)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import log_tail, run_cli, write_config

pytestmark = [pytest.mark.integration, pytest.mark.aws]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_job_with_input_and_manifests_in_s3(tmp_path: Path, prefect_api: str, slurmctl_home: Path,
                                             moto_endpoint: str, s3_bucket: str, fmt: str):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    n = 600
    if fmt == "jsonl":
        body = b"".join(json.dumps({"uid": f"u{i}", "v": i}).encode() + b"\n" for i in range(n)) + b"not json\n"
    else:
        buf = io.BytesIO()
        pq.write_table(pa.table({"uid": [f"u{i}" for i in range(n)] + [None], "v": list(range(n + 1))}), buf,
                       row_group_size=250)
        body = buf.getvalue()
    s3.put_object(Bucket=s3_bucket, Key=f"input/users.{fmt}", Body=body)

    job_id = f"s3-{fmt}"
    cfg = write_config(tmp_path / "job.yaml", job_id=job_id, handler="slurmctl.handlers.echo:handle",
                       input={"uri": f"s3://{s3_bucket}/input/users.{fmt}", "id_field": "uid"}, batch_size=100,
                       storage={"uri": f"s3://{s3_bucket}/runs", "endpoint_url": moto_endpoint,
                                "region": "us-east-1"})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, job_id)

    # status works from the manifests in S3 alone, from another "machine" (no local pointer, explicit --storage)
    for pointer in (slurmctl_home / "jobs").glob("*.json"):
        pointer.unlink()
    status = run_cli("status", job_id, "--json", "--storage", f"s3://{s3_bucket}/runs",
                     "--endpoint-url", moto_endpoint, "--region", "us-east-1")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["status"] == "completed"
    assert (view["items_total"], view["items_succeeded"], view["items_rejected"]) == (n + 1, n, 1)
    assert view["output"] == f"s3://{s3_bucket}/runs/jobs/{job_id}/output/data.parquet"

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/jobs/{job_id}/")["Contents"]}
    assert f"runs/jobs/{job_id}/job.json" in keys and f"runs/jobs/{job_id}/result.json" in keys
    assert len([k for k in keys if "/tasks/batch-" in k]) == 7  # 601 records / 100
    # Partitioning wrote one plan object, not one object per batch.
    assert len([k for k in keys if "plan" in k]) == 1

    data = s3.get_object(Bucket=s3_bucket, Key=f"runs/jobs/{job_id}/output/data.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(data))
    assert sorted(table.column("uid").to_pylist()) == sorted(f"u{i}" for i in range(n))
