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
    ({"input": {"format": "jsonl"}}, "input", "set one of input.uri"),
    ({"input": {"uri": "day/", "files": ["a.jsonl"]}}, "input", "set one of input.uri"),
    ({"input": {"uri": "users.txt"}}, "input", "cannot infer format"),
    ({"input": {"uri": "u.jsonl", "format": "xml"}}, "input.format", "jsonl"),
    ({"input": {"uri": "u.jsonl", "colour": 1}}, "input.colour", "unknown key"),
    ({"input": {"uri": "u.jsonl", "encoding": "klingon"}}, "input.encoding", "unknown encoding"),
    ({"input": {"uri": "u.jsonl", "encoding": "utf-16"}}, "input.encoding", "not ASCII-compatible"),
    ({"cluster": {"kind": "kubernetes"}}, "cluster", "local"),
    ({"cluster": {"kind": "slurm", "min_jobs": 3, "max_jobs": 2}}, "cluster", "max_jobs must be >= min_jobs"),
    ({"cluster": {"kind": "slurm", "memory": "lots"}}, "cluster.memory", "1GB"),
    ({"cluster": {"kind": "slurm", "walltime": "10 minutes"}}, "cluster.walltime", "HH:MM:SS"),
    ({"cluster": {"kind": "slurm", "cores": 0}}, "cluster.cores", "must be > 0"),
    ({"cluster": {"kind": "local", "queue": "debug"}}, "cluster.queue", "unknown key"),
    ({"storage": {"uri": "s3://ab/prefix"}}, "storage.uri", "at least 3"),
    ({"storage": {"uri": "gs://bucket/x"}}, "storage.uri", "file:// or s3://"),
    ({"max_in_flight": 0}, "max_in_flight", "must be > 0"),
    ({"batch_size": True}, "batch_size", "must be a number, not true"),  # YAML's `yes`, which pydantic takes as 1
    ({"max_concurrency": False}, "max_concurrency", "must be a number, not false"),
    ({"cluster": {"kind": "slurm", "cores": True}}, "cluster.cores", "must be a number, not true"),
    ({"rate_limits": {"api": {"per_second": True}}}, "rate_limits.api.per_second", "must be a number, not true"),
    ({"batch_size": "ten"}, "batch_size", "must be a number, not ten"),
    ({"max_concurrency": 2.5}, "max_concurrency", "must be a whole number, not 2.5"),
    ({"max_concurrency": None}, "max_concurrency", "has no value (the key with nothing after it)"),  # `key:`
    ({"errors": {"max_attempts": None}}, "errors.max_attempts", "has no value"),
])
def test_bad_config_names_the_field(change, field, message):
    errors = errors_of({**GOOD, **change})
    assert field in errors, errors
    assert message in errors[field]


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "AUTO", "many"])
def test_concurrency_is_a_whole_number_or_auto_in_one_message(value):
    errors = errors_of({**GOOD, "concurrency": value})
    assert list(errors) == ["concurrency"], errors  # not one line per branch of the union (constrained-int, literal)
    assert errors["concurrency"].startswith("must be a whole number of items in flight (1 or more) or auto, not ")


@pytest.mark.parametrize("value, parsed", [(1, 1), (40, 40), ("8", 8), (8.0, 8), ("auto", "auto"), (None, None)])
def test_concurrency_takes_a_number_or_auto(value, parsed):
    assert parse_config({**GOOD, "concurrency": value}).concurrency == parsed


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


# ---- {date} in a config: recurring backfills ---------------------------------------------------------------------

def test_date_fields_are_templated_in_every_string(tmp_path: Path):
    cfg = write_config(tmp_path / "backfill.yaml", name="backfill", job_id="backfill-{date}",
                       handler="slurmctl.handlers.echo:handle", input={"uri": "days/{date:%Y/%m/%d}/users.jsonl"},
                       params={"day": "{date}", "other": "{id} stays"})
    job = load_config(cfg, date="2025-04-12")
    assert job.job_id == "backfill-2025-04-12"
    assert job.input.uri == str(tmp_path / "days/2025/04/12/users.jsonl")
    assert job.params == {"day": "2025-04-12", "other": "{id} stays"}


def test_a_templated_config_without_a_date_names_the_date(tmp_path: Path):
    cfg = write_config(tmp_path / "backfill.yaml", job_id="backfill-{date}", **GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert dict(info.value.errors)["date"].startswith("the config uses {date}")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, date="12/04/2025")
    assert "YYYY-MM-DD" in dict(info.value.errors)["date"]


def test_a_runs_date_is_its_scheduled_day_minus_days_before_in_its_timezone():
    import datetime as dt

    from slurmctl.flows.naming import run_date

    start = dt.datetime(2025, 4, 13, 1, 30, tzinfo=dt.timezone.utc)
    assert run_date({}, start) == dt.date(2025, 4, 13)
    assert run_date({"days_before": 1}, start) == dt.date(2025, 4, 12)
    assert run_date({"timezone": "America/Los_Angeles"}, start) == dt.date(2025, 4, 12)  # still the 12th there
    assert run_date({"date": "2024-02-29", "days_before": 1}, start) == dt.date(2024, 2, 29)  # a re-run of one day
    with pytest.raises(ConfigError) as info:
        run_date({"timezone": "Mars/Olympus"}, start)
    assert "timezone" in dict(info.value.errors)


def test_a_deployment_run_without_a_job_id_is_a_job_of_its_own(tmp_path: Path):
    from slurmctl.flows.naming import job_of_run

    cfg = write_config(tmp_path / "job.yaml", name="geo", **{k: v for k, v in GOOD.items()})
    params = {"config_path": str(cfg)}
    first = job_of_run(params, None, "0a1b2c3d-0000-0000-0000-000000000000")
    assert first[0] == "geo-0a1b2c3d" and first[1]["uri"].startswith("file://")
    assert job_of_run(params, None, "ffffffff-0000-0000-0000-000000000000")[0] == "geo-ffffffff"
    assert job_of_run({**params, "job_id": "geo-1"}, None, "0a1b2c3d")[0] == "geo-1"


def test_submit_templates_the_date_from_the_command_line(tmp_path: Path, slurmctl_home: Path):
    cfg = write_config(tmp_path / "backfill.yaml", job_id="backfill-{date}", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "users-{date}.jsonl"})
    out = run_cli("submit", str(cfg), "--date", "2025-04-12")
    assert out.returncode == 2 and "no such file" in out.stderr and "users-2025-04-12.jsonl" in out.stderr
