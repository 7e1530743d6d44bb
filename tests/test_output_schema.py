"""The output's types are checked per item at the batch (``slurmctl.output_schema``): a row of the wrong type fails its
item with class ``schema``, never the whole aggregation later."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.jobs import write_jsonl

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.config import ConfigError, parse_config
from slurmctl.records import partition
from slurmctl.tasks.process_batch import run_batch


def job(tmp_path: Path, n: int, batch_size: int, values: dict, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    cfg = parse_config({"job_id": "typed", "handler": "support.sample_handlers:typed", "batch_size": batch_size,
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "params": {"values": values},
                        "storage": {"uri": f"file://{tmp_path / 'store'}"}, **extra})
    store = LocalManifestStore(root=str(tmp_path / "store"))
    with open(tmp_path / "in.jsonl", "rb") as f:
        specs = partition(f, "jsonl", batch_size).batches
    summaries = [run_batch(cfg, store, spec) for spec in specs]
    failures = failure_state(store, committed_tasks(store, "typed"))
    return summaries, {r["id"]: (r["error_class"], r["message"]) for r in failures.values()}


def test_a_declared_type_fails_the_items_whose_rows_do_not_convert(tmp_path):
    summaries, failed = job(tmp_path, 10, 10, {"3": "three", "4": 4.5, "5": "6", "6": 6.0},
                            output={"schema": {"value": "int64", "id": "string"}})
    # 6.0 converts to int64 exactly; the ids are JSON numbers, not the declared strings: every item fails on them
    assert sorted(failed) == list(range(10)) and {cls for cls, _ in failed.values()} == {"schema"}

    summaries, failed = job(tmp_path / "again", 10, 10, {"3": "three", "4": 4.5, "5": "6", "6": 6.0},
                            output={"schema": {"value": "int64"}})
    assert sorted(failed) == [3, 4, 5] and {cls for cls, _ in failed.values()} == {"schema"}
    assert "column 'value': 'three' (str) does not fit the declared type int64" in failed[3][1]
    assert summaries[0]["items_succeeded"] == 7
    assert "4.5 (float) does not fit the declared type int64" in failed[4][1]


def test_rows_whose_column_has_one_type_are_still_checked_value_by_value(tmp_path):
    # Every value a double: the batch's rows make a table of one type, checked whole first (tasks/process_batch.py,
    # ``fitting_table``); 6.0 converts to int64 and 4.5 does not, so that column does not fit, and only 4.5's item fails
    summaries, failed = job(tmp_path, 10, 10, {str(i): float(i) for i in range(10)} | {"4": 4.5},
                            output={"schema": {"value": "int64"}})
    assert failed == {4: ("schema", failed[4][1])} and summaries[0]["items_succeeded"] == 9
    assert "4.5 (float) does not fit the declared type int64" in failed[4][1]
    summaries, failed = job(tmp_path / "text", 5, 5, {str(i): f"t{i}" for i in range(5)},
                            output={"schema": {"value": "int64"}})
    assert sorted(failed) == list(range(5)) and summaries[0]["rows_written"] == 0


def test_without_a_declaration_the_first_batchs_types_are_recorded_and_later_ones_promote_as_the_merge_does(tmp_path):
    summaries, failed = job(tmp_path, 20, 10, {"12": "twelve", "13": 13.5})
    assert failed.keys() == {12} and failed[12][0] == "schema"  # text where int64 was recorded: refused
    assert "the recorded type int64" in failed[12][1]  # 13.5: int64 and double unify to double (the merge's rule)
    assert [s["items_succeeded"] for s in summaries] == [10, 9]
    assert (tmp_path / "store/jobs/typed/output_schema.json").exists()


def test_an_unknown_type_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="output.schema: column 'value': unknown Arrow type 'integer'"):
        parse_config({"handler": "support.sample_handlers:typed", "input": {"uri": "x.jsonl"},
                      "output": {"schema": {"value": "integer"}}})


def test_rows_kept_as_arrow_are_checked_by_column_type_and_item_by_item_when_a_column_does_not_fit(tmp_path):
    arrow = {"handler": "support.sample_handlers:typed_batch", "handler_mode": "batch", "batch_format": "arrow"}
    # a double column where int64 is declared: 6.0 fits, 4.5 does not, and only its item fails
    summaries, failed = job(tmp_path, 10, 10, {str(i): float(i) for i in range(10)} | {"4": 4.5},
                            output={"schema": {"value": "int64"}}, **arrow)
    assert failed == {4: ("schema", failed[4][1])} and summaries[0]["items_succeeded"] == 9
    assert "4.5 (float) does not fit the declared type int64" in failed[4][1]
    # recorded from the first batch (int64); doubles promote, text does not (each batch's column is of one type)
    summaries, failed = job(tmp_path / "recorded", 30, 10, {str(i): i + 0.5 for i in range(10, 20)}
                            | {str(i): f"t{i}" for i in range(20, 30)}, **arrow)
    assert sorted(failed) == list(range(20, 30)) and {c for c, _ in failed.values()} == {"schema"}
    assert [s["items_succeeded"] for s in summaries] == [10, 10, 0]
