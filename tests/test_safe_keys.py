"""Keys built from user input stay inside the store's root and the job's prefix; each bad form says what is wrong.

The store layer (``safe_key``) is the last line: whatever built a key, a local store never touches a path outside its
root and an S3 store never a key outside its prefix. Config validation and the CLI refuse the same inputs earlier,
naming the field or argument.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.jobs import run_cli

from slurmctl.blocks.manifest_store import LocalManifestStore, S3ManifestStore
from slurmctl.books.manifests import Keys
from slurmctl.config import ConfigError, known_storage, parse_config
from slurmctl.safe_keys import UnsafeKey, key_problem, name_problem, safe_key

GOOD = {"handler": "slurmctl.handlers.echo:handle", "input": {"uri": "data/users.jsonl"}, "batch_size": 10}

BAD_KEYS = [
    ("../outside.json", "must not contain '..'"),
    ("jobs/j/../../outside.json", "must not contain '..'"),
    ("jobs/j/./job.json", "must not contain '.' as a path part"),
    ("/etc/passwd", "must be relative (no leading '/')"),
    ("jobs\\..\\x", "must not contain a backslash"),
    ("jobs/j\x00.json", "must not contain a NUL character"),
    ("jobs/j\n.json", "must not contain control characters"),
    ("jobs/j/..%2F..%2Foutside", "decoded, it must not contain '..'"),
    ("jobs/j/..%2f..%2foutside", "decoded, it must not contain '..'"),
    ("%2Fetc/passwd", "decoded, it must be relative"),
    ("jobs/%2e%2e/x", "decoded, it must not contain '..'"),
    ("jobs/a%5Cb", "decoded, it must not contain a backslash"),
    ("jobs/" + "x" * 1020, "must be at most 1024 bytes long (it is 1025)"),
    ("jobs/" + "y" * 256 + "/a", "at most 255 bytes"),
]
GOOD_KEYS = ["", "jobs/", "jobs/j-1/job.json", "jobs/j/tasks/batch-000001.json", "rate-limits/team/api.signal.json",
             "jobs/j/output/city=S%C3%A3o%2FPaulo/part-00000.parquet",  # a hive value 'São/Paulo', as written
             "jobs/j/cache/batch-000001-3f2a", "a..b/c..d"]


@pytest.mark.parametrize("key, message", BAD_KEYS)
def test_each_unsafe_key_is_refused_with_its_reason(key: str, message: str):
    assert message in (key_problem(key) or "")
    with pytest.raises(UnsafeKey, match="refusing store key"):
        safe_key(key)


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_safe_keys_pass_unchanged(key: str):
    assert key_problem(key) is None
    assert safe_key(key) == key


@pytest.mark.parametrize("name, message", [
    ("..", "must not contain '..'"), (".", "'.' as a path part"), ("a/b", "must not contain '/'"),
    ("a%2Fb", "URL-encoded"), ("a%2eb", "URL-encoded"), ("", "must not be empty"), ("n" * 129, "at most 128"),
])
def test_names_from_user_input_are_single_safe_parts(name: str, message: str):
    assert message in (name_problem(name) or "")


def test_job_and_batch_ids_cannot_leave_the_jobs_prefix():
    with pytest.raises(UnsafeKey, match="job id '../other' must not contain '..'"):
        Keys("../other")
    keys = Keys("j-1")
    assert keys.task("batch-000007") == "jobs/j-1/tasks/batch-000007.json"
    with pytest.raises(UnsafeKey, match="batch id"):
        keys.task("../../../outside")
    with pytest.raises(UnsafeKey, match="attempt id"):
        keys.batch_output("batch-000001", "a/../../x")


def test_a_local_store_never_touches_a_path_outside_its_root(tmp_path: Path):
    root = tmp_path / "store"
    store = LocalManifestStore(root=str(root))
    store.put_bytes("jobs/j/job.json", b"{}")
    outside = tmp_path / "outside.json"
    for key in ("../outside.json", "jobs/../../outside.json", str(outside), "..%2Foutside.json"):
        for touch in (lambda k: store.put_bytes(k, b"x"), store.get_bytes, store.delete, store.exists,
                      lambda k: store.put_file(k, str(root / "jobs/j/job.json")), lambda k: list(store.list_keys(k)),
                      lambda k: store.copy("jobs/j/job.json", k), store.delete_prefix):
            with pytest.raises(UnsafeKey):
                touch(key)
    assert not outside.exists() and not (tmp_path / "..%2Foutside.json").exists()
    assert store.get_bytes("jobs/j/job.json") == b"{}"  # good keys unchanged


def test_an_s3_store_never_builds_a_key_outside_its_prefix():
    store = S3ManifestStore(bucket="bucket", prefix="team/runs")
    assert store._key("jobs/j/job.json") == "team/runs/jobs/j/job.json"
    for key, _ in BAD_KEYS:
        with pytest.raises(UnsafeKey, match="s3://bucket/team/runs"):
            store._key(key)
    # 1,024 bytes counts the prefix too
    long_prefix = S3ManifestStore(bucket="bucket", prefix="p" * 600)
    with pytest.raises(UnsafeKey, match="S3 keys are at most 1024"):
        long_prefix._key("jobs/" + "/".join(["k" * 200] * 3))


def test_s3_encryption_settings_go_on_every_write():
    assert S3ManifestStore(bucket="bucket")._sse_args() == {}
    assert S3ManifestStore(bucket="bucket", sse="AES256")._sse_args() == {"ServerSideEncryption": "AES256"}
    kms = S3ManifestStore(bucket="bucket", sse="aws:kms", sse_kms_key_id="alias/jobs")
    assert kms._sse_args() == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/jobs"}
    with pytest.raises(ValueError, match="only used with sse: aws:kms"):
        S3ManifestStore(bucket="bucket", sse="AES256", sse_kms_key_id="alias/jobs")


def errors_of(change: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config({**GOOD, **change})
    return dict(info.value.errors)


@pytest.mark.parametrize("change, field, message", [
    ({"rate_limits": {"api": {"per_second": 5, "key": "../other-team/api"}}}, "rate_limits.api.key",
     "must not contain '..'"),
    ({"rate_limits": {"api": {"per_second": 5, "key": "/api"}}}, "rate_limits.api.key", "must be relative"),
    ({"rate_limits": {"api": {"per_second": 5, "key": "team%2F..%2Fapi"}}}, "rate_limits.api.key", "URL-encoded"),
    ({"rate_limits": {"api": {"per_second": 5, "key": "team//api"}}}, "rate_limits.api.key", "empty part"),
    ({"rate_limits": {"api": {"per_second": 5, "key": "k" * 300}}}, "rate_limits.api.key", "at most 128 bytes"),
    ({"rate_limits": {"..": {"per_second": 5}}}, "rate_limits", "limit name '..' must not contain '..'"),
    ({"storage": {"uri": "s3://bucket/runs/../other"}}, "storage.uri", "prefix after the bucket must not contain"),
    ({"storage": {"uri": "file:///tmp/x", "sse": "AES256"}}, "storage.sse", "s3:// store only"),
    ({"storage": {"uri": "s3://bucket/runs", "sse": "AES128"}}, "storage.sse", "AES256"),
    ({"storage": {"uri": "s3://bucket/runs", "sse": "AES256", "sse_kms_key_id": "k"}}, "storage.sse_kms_key_id",
     "only used with sse: aws:kms"),
])
def test_config_errors_name_the_field(change: dict, field: str, message: str):
    errors = errors_of(change)
    assert field in errors, errors
    assert message in errors[field], errors[field]


def test_good_limit_keys_and_encryption_settings_are_kept():
    cfg = parse_config({**GOOD, "rate_limits": {"api": {"per_second": 5, "key": "team-a/geo.api"}},
                        "storage": {"uri": "s3://bucket/runs", "sse": "aws:kms", "sse_kms_key_id": "alias/jobs"}})
    assert cfg.rate_limits["api"].key == "team-a/geo.api"
    assert (cfg.storage.sse, cfg.storage.sse_kms_key_id) == ("aws:kms", "alias/jobs")


@pytest.mark.parametrize("job_id, why", [("../x", "must not contain '..'"), ("/etc/x", "must be relative"),
                                         ("a%2Fb", "must not contain URL-encoded"), ("Bad_Id", "must match")])
def test_cli_refuses_a_job_id_that_is_not_one_with_exit_2(slurmctl_home: Path, job_id: str, why: str):
    result = run_cli("status", job_id, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"slurmctl: {job_id!r} is not a job id: it {why}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (slurmctl_home / "jobs").exists()


def test_a_job_id_from_a_flow_parameter_never_names_a_pointer_outside_jobs(slurmctl_home: Path):
    """A retry deployment's run gives only a job id: its store is looked up in $SLURMCTL_HOME/jobs/<job_id>.json."""
    (slurmctl_home / "secret.json").parent.mkdir(parents=True, exist_ok=True)
    (slurmctl_home / "secret.json").write_text('{"storage": {"uri": "s3://elsewhere/x"}}')
    with pytest.raises(ConfigError, match="job_id: '../secret' is not a job id: must not contain '..'"):
        known_storage("../secret")
