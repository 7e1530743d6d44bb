"""Batch handlers (``handle_batch(batch, ctx)``), run directly: one call per batch in records, pandas or arrow, and
still one outcome per item: rows matched by id, per-item failures, missing items, a poison item isolated."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.jobs import write_jsonl

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.config import parse_config
from slurmctl.records import partition
from slurmctl.tasks.process_batch import run_batch


def run(tmp_path: Path, n: int = 20, fmt: str = "records", **params) -> tuple[dict, dict, list]:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    cfg = parse_config({"job_id": "bh", "handler": "support.sample_handlers:handle_batch", "batch_format": fmt,
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": n,
                        "storage": {"uri": f"file://{tmp_path / 'store'}"},
                        "errors": {"backoff_base_s": 0, "backoff_max_s": 0},
                        "params": {"calls_file": str(tmp_path / "calls"), **params}})
    store = LocalManifestStore(root=str(tmp_path / "store"))
    with open(tmp_path / "in.jsonl", "rb") as f:
        [spec] = partition(f, "jsonl", n).batches
    summary = run_batch(cfg, store, spec, sleep=lambda s: None)
    [task] = committed_tasks(store, "bh")
    rows = pq.read_table(str(tmp_path / "store" / task["output"])).to_pylist() if task.get("output") else []
    failures = {r["id"]: r["error_class"] for r in failure_state(store, [task]).values()}
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return summary, failures, [rows, calls]


@pytest.mark.parametrize("fmt", ["records", "pandas", "arrow"])
def test_one_call_per_batch_in_each_format_with_per_item_failures_and_missing_items(tmp_path, fmt):
    summary, failures, (rows, calls) = run(tmp_path, fmt=fmt, fail={"3": "not_found"}, drop=[5],
                                           error_rows=[7] if fmt != "arrow" else [])
    assert len(calls) == 1  # the whole batch in one call
    expected_failed = {3: "not_found", 5: "missing", **({7: "handler"} if fmt != "arrow" else {})}
    assert failures == expected_failed
    ok = [i for i in range(20) if i not in expected_failed]
    assert [r["id"] for r in rows] == ok and all(r["doubled"] == 2 * r["id"] for r in rows)  # input order
    assert "errors" not in rows[0] and (summary["items_succeeded"], summary["items_failed"]) == (
        len(ok), len(expected_failed))


def test_a_poison_item_is_isolated_by_halving_and_the_others_keep_their_rows(tmp_path):
    summary, failures, (rows, calls) = run(tmp_path, n=16, poison=11)
    assert failures == {11: "handler"}
    assert [r["id"] for r in rows] == [i for i in range(16) if i != 11]
    assert len(calls) == 1 + 2 * 4  # the whole, then each half down to the single poison item (16 -> 1)


def test_a_batch_handler_is_detected_by_its_name_unless_the_config_says_otherwise(tmp_path):
    from slurmctl.batch_run import is_batch_mode

    cfg = parse_config({"handler": "support.sample_handlers:handle_batch", "input": {"uri": "x.jsonl"}})
    assert is_batch_mode(cfg)
    assert not is_batch_mode(cfg.model_copy(update={"handler_mode": "item"}))


def test_rows_kept_as_arrow_give_the_same_part_and_outcomes_as_row_by_row(tmp_path, monkeypatch):
    """A DataFrame or Table answer is matched to its items without leaving Arrow (``BatchRun.table``); the part it
    writes and the outcomes are those of the row-by-row path (a list of dicts): input order, each item's rows in the
    handler's order, errors rows, ``ctx.fail``, missing items, a repeated id."""
    import slurmctl.batch_run as batch_run

    ids = [*range(40), 3]  # 3 twice: its rows go to its first line, the second fails as missing
    as_rows = batch_run.to_rows

    def rows_only(result):
        assert isinstance(result, list), "a table answer went row by row"
        return as_rows(result)

    results = {}
    for fmt in ("records", "pandas", "arrow"):
        if fmt != "records":
            monkeypatch.setattr(batch_run, "to_rows", rows_only)
        work = tmp_path / fmt
        work.mkdir()
        write_jsonl(work / "in.jsonl", [{"id": i} for i in ids])
        cfg = parse_config({"job_id": "fan", "handler": "support.sample_handlers:fan_out_batch", "handler_mode": "batch",
                            "batch_format": fmt,
                            "input": {"uri": str(work / "in.jsonl")}, "batch_size": len(ids),
                            "storage": {"uri": f"file://{work / 'store'}"}})
        store = LocalManifestStore(root=str(work / "store"))
        with open(work / "in.jsonl", "rb") as f:
            [spec] = partition(f, "jsonl", len(ids)).batches
        summary = run_batch(cfg, store, spec)
        [task] = committed_tasks(store, "fan")
        rows = pq.read_table(str(work / "store" / task["output"])).to_pylist()
        failures = sorted((r["line"], r["error_class"]) for r in failure_state(store, [task]).values())
        results[fmt] = (rows, failures, {k: summary[k] for k in ("items_succeeded", "items_failed", "rows_written")})
    rows, failures, counts = results["records"]
    assert [r["tag"] for r in rows if r["id"] == 5] == ["second", "first"]
    assert [r["id"] for r in rows][:4] == [0, 0, 1, 2] and all(r["id"] % 7 for r in rows if r["id"])
    assert ("missing" in dict(failures).values()) and dict(failures)[41] == "missing"  # the repeated 3
    assert counts["items_succeeded"] + counts["items_failed"] == len(ids) and counts["rows_written"] == len(rows)
    assert results["pandas"] == results["arrow"] == results["records"]
