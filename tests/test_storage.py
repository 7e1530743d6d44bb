"""The plain stores (``slurmctl.storage``: what commands read with) and the Prefect blocks (what flows write with)
are one store: each sees the other's writes, with the same guarantees; and reading a job's books never imports
Prefect, Dask or pandas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.jobs import ROOT

from slurmctl.blocks.manifest_store import store_from_uri
from slurmctl.books.manifests import Keys
from slurmctl.books.store import new_job_manifest
from slurmctl.config import parse_config
from slurmctl.storage import ManifestCorrupt, open_store


def both(request: pytest.FixtureRequest, tmp_path: Path, kind: str):
    if kind == "local":
        return open_store(str(tmp_path / "store")), store_from_uri(str(tmp_path / "store"))
    endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
    where = dict(endpoint_url=endpoint, region="us-east-1")
    return open_store(f"s3://{bucket}/p", **where), store_from_uri(f"s3://{bucket}/p", **where)


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_a_plain_store_and_its_block_are_one_store(request, tmp_path, kind):
    plain, block = both(request, tmp_path, kind)
    assert plain.uri("jobs/a/job.json") == block.uri("jobs/a/job.json")
    assert block.put_json("jobs/a/tasks/batch-000001.json", {"n": 1}, if_absent=True)
    assert not plain.put_json("jobs/a/tasks/batch-000001.json", {"n": 2}, if_absent=True)  # create-if-absent holds
    assert plain.get_json("jobs/a/tasks/batch-000001.json")["n"] == 1
    plain.put_json("jobs/b/job.json", {"n": 3})
    block.put_bytes("jobs/c/outputs/x.parquet", b"rows")  # a job folder without a job manifest is still a child
    assert list(block.list_children("jobs/")) == list(plain.list_children("jobs/")) == ["a", "b", "c"]
    assert list(plain.list_keys("jobs/a/")) == ["jobs/a/tasks/batch-000001.json"]
    plain.put_bytes("jobs/b/job.json", b'{"n": 4, "checksum": "sha256:0"}')
    with pytest.raises(ManifestCorrupt):
        block.get_json("jobs/b/job.json")  # verified on read, whoever wrote it
    plain.check_conditional_writes()
    plain.delete_prefix("jobs/a/")
    assert list(block.list_keys("jobs/a/")) == []


def test_status_list_and_analyze_errors_read_the_books_without_prefect_dask_or_pandas(tmp_path):
    """What makes them answer at once (benchmarks/status.py: ~0.3 s against 3.7-4.8 s when they imported Prefect
    through the store blocks): the commands run, then nothing heavy is in sys.modules."""
    uri = f"file://{tmp_path}/state"
    cfg = parse_config({"job_id": "light", "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": "users.jsonl"}, "storage": {"uri": uri}})
    open_store(uri).put_json(Keys("light").job, new_job_manifest(cfg, None).model_dump(mode="json"))
    probe = (
        "import json, sys\n"
        "from slurmctl.cli.root import main\n"
        f"assert main(['status', 'light', '--storage', {uri!r}, '--json']) == 0\n"
        f"assert main(['list', '--storage', {uri!r}, '--json']) == 0\n"
        f"assert main(['analyze-errors', 'light', '--storage', {uri!r}, '--json']) == 0\n"
        "heavy = sorted(m for m in ('prefect', 'prefect_aws', 'dask', 'distributed', 'pandas', 'boto3')"
        " if m in sys.modules)\n"
        "print(json.dumps(heavy))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "SLURMCTL_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
