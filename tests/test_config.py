"""Config validation: each bad config names the field at fault, and the CLI submits nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.jobs import run_cli, write_config

from slurmctl.config import ConfigError, SlurmClusterConfig, load_config, parse_config

GOOD = {"handler": "slurmctl.handlers.echo:handle", "input": {"uri": "data/users.jsonl"}, "batch_size": 10}


def errors_of(data) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return dict(info.value.errors)


def test_minimal_config_gets_defaults_and_a_generated_job_id():
    cfg = parse_config(GOOD)
    assert cfg.input.format == "jsonl" and cfg.input.id_field == "id"
    assert cfg.cluster.kind == "local"
    assert cfg.job_id.startswith("job-")


@pytest.mark.parametrize("change, field, message", [
    ({"batch_size": 0}, "batch_size", "must be > 0"),
    ({"batch_size": -5}, "batch_size", "must be > 0"),
    ({"batchsize": 10}, "batchsize", "unknown key"),
    ({"job_id": "Bad_ID"}, "job_id", "must match"),
    ({"job_id": "x" * 64}, "job_id", "must match"),
    ({"handler": "slurmctl.handlers.echo.handle"}, "handler", "module:function"),
    ({"input": {"format": "jsonl"}}, "input.uri", "required"),
    ({"input": {"uri": "users.txt"}}, "input", "cannot infer format"),
    ({"input": {"uri": "u.jsonl", "format": "xml"}}, "input.format", "jsonl"),
    ({"input": {"uri": "u.jsonl", "colour": 1}}, "input.colour", "unknown key"),
    ({"cluster": {"kind": "kubernetes"}}, "cluster", "local"),
    ({"cluster": {"kind": "slurm", "min_jobs": 3, "max_jobs": 2}}, "cluster", "max_jobs must be >= min_jobs"),
    ({"cluster": {"kind": "slurm", "memory": "lots"}}, "cluster.memory", "1GB"),
    ({"cluster": {"kind": "slurm", "walltime": "10 minutes"}}, "cluster.walltime", "HH:MM:SS"),
    ({"cluster": {"kind": "slurm", "cores": 0}}, "cluster.cores", "must be > 0"),
    ({"cluster": {"kind": "local", "queue": "debug"}}, "cluster.queue", "unknown key"),
    ({"storage": {"uri": "s3://ab/prefix"}}, "storage.uri", "at least 3"),
    ({"storage": {"uri": "gs://bucket/x"}}, "storage.uri", "file:// or s3://"),
    ({"max_in_flight": 0}, "max_in_flight", "must be > 0"),
])
def test_bad_config_names_the_field(change, field, message):
    errors = errors_of({**GOOD, **change})
    assert field in errors, errors
    assert message in errors[field]


def test_missing_required_keys_are_each_reported():
    errors = errors_of({"batch_size": 5})
    assert errors["handler"] == "required" and errors["input"] == "required"


def test_not_a_mapping():
    assert errors_of(["a", "b"]) == {"(root)": "must be a mapping of keys to values"}


def test_slurm_options_parse():
    cfg = parse_config({**GOOD, "cluster": {"kind": "slurm", "queue": "debug", "cores": 2, "memory": "2GB",
                                            "walltime": "00:10:00", "job_extra_directives": ["--exclusive"],
                                            "min_jobs": 1, "max_jobs": 3}})
    assert isinstance(cfg.cluster, SlurmClusterConfig) and cfg.cluster.max_jobs == 3


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path):
    path = write_config(tmp_path / "job.yaml", **{**GOOD, "storage": {"uri": "state"}})
    cfg = load_config(path)
    assert cfg.input.uri == str(tmp_path / "data" / "users.jsonl")
    assert cfg.storage.uri == f"file://{tmp_path / 'state'}"


def test_invalid_yaml_is_a_config_error(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("handler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_rejects_bad_config_with_exit_2_and_submits_nothing(tmp_path: Path, slurmctl_home: Path):
    path = write_config(tmp_path / "job.yaml", **{**GOOD, "batch_size": 0, "storage": {"uri": "state"}})
    result = run_cli("submit", str(path), "--wait")
    assert result.returncode == 2
    assert "batch_size: must be > 0" in result.stderr
    assert not (tmp_path / "state").exists()
    assert not (slurmctl_home / "logs").exists()


def test_cli_preflight_names_missing_input_and_bad_handler(tmp_path: Path, slurmctl_home: Path):
    path = write_config(tmp_path / "job.yaml", **{**GOOD, "handler": "handlers.nope:handle",
                                                  "storage": {"uri": "state"}})
    result = run_cli("submit", str(path))
    assert result.returncode == 2
    assert "input.uri: no such file" in result.stderr
    assert "handler: handler 'handlers.nope:handle': cannot import module 'handlers.nope'" in result.stderr
    assert not (tmp_path / "state").exists()


def test_cli_bad_arguments_exit_2(slurmctl_home: Path):
    assert run_cli("submit").returncode == 2
    assert run_cli("frobnicate").returncode == 2
