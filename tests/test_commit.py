"""A batch's commit under lost answers: a retried commit never deletes the committed batch, a refusal with no winner
is an error, and a store that ignores create-if-absent is refused before any job runs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import boto3
import pytest
from support.fault_proxy import FaultProxy
from support.jobs import log_tail, output_ids, run_cli, write_config, write_jsonl
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore, store_from_uri
from slurmctl.books.admission import JobRefused, create_job
from slurmctl.books.manifests import Keys
from slurmctl.books.parts import committed_output
from slurmctl.config import parse_config
from slurmctl.records import partition
from slurmctl.storage import StoreUnsupported
from slurmctl.tasks.process_batch import CommitUnresolved, run_batch


def one_batch_job(tmp_path: Path, store_uri: str, **storage) -> tuple:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(10)])
    cfg = parse_config({"job_id": "commit", "handler": "support.sample_handlers:counting",
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": 10,
                        "storage": {"uri": store_uri, **storage}, "params": {"calls_file": str(tmp_path / "calls")}})
    with open(tmp_path / "in.jsonl", "rb") as f:
        [spec] = partition(f, "jsonl", 10).batches
    return cfg, spec


class LostCommitAnswer(LocalManifestStore):
    """A store whose first create-if-absent write takes effect but answers "refused", as a retried request whose
    first answer was lost would: the retry finds the object (ours) already there."""

    _block_type_slug = "test-lost-commit-answer"
    lost: int = 0

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        written = super().put_bytes(key, data, if_absent=if_absent)
        if if_absent and written and not self.lost:
            self.lost += 1
            return False
        return written


class RefusesWithNoWinner(LocalManifestStore):
    """A store that refuses every create-if-absent write yet has nothing under the key."""

    _block_type_slug = "test-refuses-with-no-winner"

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return False if if_absent else super().put_bytes(key, data)


def test_a_refusal_answering_our_own_commit_keeps_the_batch(tmp_path):
    cfg, spec = one_batch_job(tmp_path, str(tmp_path / "store"))
    store = LostCommitAnswer(root=str(tmp_path / "store"))
    summary = run_batch(cfg, store, spec)
    assert store.lost == 1
    assert not summary.get("duplicate") and summary["items_succeeded"] == 10
    task = store.get_json(Keys("commit").task(spec.batch_id))
    committed_output(store, task, str(tmp_path))  # still there, and it is what was committed


def test_a_refusal_with_no_readable_winner_is_an_error_not_a_done_batch(tmp_path):
    cfg, spec = one_batch_job(tmp_path, str(tmp_path / "store"))
    store = RefusesWithNoWinner(root=str(tmp_path / "store"))
    with pytest.raises(CommitUnresolved, match="refused the commit"):
        run_batch(cfg, store, spec)


def test_a_retransmitted_link_that_finds_our_own_file_counts_as_written(tmp_path, monkeypatch):
    """NFS: a LINK whose reply was lost is sent again and fails with EEXIST although the first one made the link."""
    real_link = os.link

    def link_then_eexist(src, dst):
        real_link(src, dst)
        raise FileExistsError(errno.EEXIST, "File exists", dst)

    store = LocalManifestStore(root=str(tmp_path))
    monkeypatch.setattr(os, "link", link_then_eexist)
    assert store.put_bytes("commit.json", b"ours", if_absent=True)
    monkeypatch.setattr(os, "link", real_link)
    assert not store.put_bytes("commit.json", b"theirs", if_absent=True)  # someone else's file: refused
    assert store.get_bytes("commit.json") == b"ours"


def test_a_store_that_ignores_create_if_absent_is_refused(tmp_path, monkeypatch):
    store = LocalManifestStore(root=str(tmp_path))
    store.check_conditional_writes()  # a real filesystem honours it
    monkeypatch.setattr(os, "link", lambda src, dst: os.replace(src, dst))  # "link" that overwrites
    with pytest.raises(StoreUnsupported, match="does not honour create-if-absent"):
        store.check_conditional_writes()
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(PermissionError(1, "Operation not "
                                                                                           "permitted")))
    with pytest.raises(StoreUnsupported, match="hard links"):
        store.check_conditional_writes()
    assert list(store.list_keys("")) == []  # the probes leave nothing behind


@pytest.mark.integration
@pytest.mark.aws
def test_s3_commit_whose_answer_is_lost_after_the_write_keeps_the_batch(tmp_path, moto_endpoint, s3_bucket):
    """botocore retries a conditional PUT whose answer was a 500 after the store wrote it; the retry gets 412."""
    with FaultProxy(moto_endpoint) as proxy:
        proxy.lose_responses(method="PUT", path_contains="/tasks/", header="If-None-Match", times=1)
        cfg, spec = one_batch_job(tmp_path, f"s3://{s3_bucket}/runs", endpoint_url=proxy.url, region="us-east-1")
        store = store_from_uri(f"s3://{s3_bucket}/runs", endpoint_url=proxy.url, region="us-east-1")
        summary = run_batch(cfg, store, spec)
        assert proxy.stats()["responses_lost"] == 1
        retried = [r for r in proxy.history if r["method"] == "PUT" and "/tasks/" in r["path"]]
        assert [r["outcome"] for r in retried] == ["200, answered 500", 412]  # what the client went through
    assert not summary.get("duplicate") and summary["items_succeeded"] == 10
    direct = store_from_uri(f"s3://{s3_bucket}/runs", endpoint_url=moto_endpoint, region="us-east-1")
    committed_output(direct, direct.get_json(Keys("commit").task(spec.batch_id)), str(tmp_path))
    assert len(calls(str(tmp_path / "calls"))) == 10


@pytest.mark.integration
@pytest.mark.aws
def test_a_job_whose_commit_answers_are_lost_completes_exactly_once(tmp_path, prefect_api, slurmctl_home,
                                                                     moto_endpoint, s3_bucket):
    n = 160
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="in/users.jsonl",
                  Body=b"".join(f'{{"id": {i}}}\n'.encode() for i in range(n)))
    with FaultProxy(moto_endpoint) as proxy:
        proxy.lose_responses(method="PUT", path_contains="/tasks/", header="If-None-Match", times=8)
        cfg = write_config(tmp_path / "job.yaml", job_id="lost-answers", handler="slurmctl.handlers.echo:handle",
                           input={"uri": f"s3://{s3_bucket}/in/users.jsonl"}, batch_size=10,
                           storage={"uri": f"s3://{s3_bucket}/runs", "endpoint_url": proxy.url,
                                    "region": "us-east-1"})
        result = run_cli("submit", str(cfg), "--wait")
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "lost-answers")
        assert proxy.stats()["responses_lost"] == 8
    view = {"job_id": "lost-answers", "output": f"s3://{s3_bucket}/runs/jobs/lost-answers/output/data.parquet"}
    assert sorted(output_ids(view, moto_endpoint)) == list(range(n))  # every item exactly once


@pytest.mark.integration
@pytest.mark.aws
def test_submit_refuses_an_s3_store_that_ignores_conditional_writes(tmp_path, slurmctl_home, moto_endpoint,
                                                                    s3_bucket):
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1}])
    with FaultProxy(moto_endpoint) as proxy:
        proxy.ignore_request_headers("If-None-Match")
        storage = {"uri": f"s3://{s3_bucket}/runs", "endpoint_url": proxy.url, "region": "us-east-1"}
        cfg = write_config(tmp_path / "job.yaml", job_id="no-cas", handler="slurmctl.handlers.echo:handle",
                           input={"uri": "in.jsonl"}, storage=storage)
        result = run_cli("submit", str(cfg))
        assert result.returncode == 2, result.stderr
        assert "storage.uri" in result.stderr and "does not honour create-if-absent" in result.stderr
        # Every way of starting a job goes through create_job (deployments, schedules): refused there too.
        with pytest.raises(JobRefused, match="last-writer-wins"):
            create_job(parse_config({"job_id": "no-cas-2", "handler": "slurmctl.handlers.echo:handle",
                                     "input": {"uri": str(tmp_path / "in.jsonl")}, "storage": storage}), None)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/").get("Contents", [])]
    assert not [k for k in keys if k.startswith("runs/jobs/")]  # nothing was submitted
