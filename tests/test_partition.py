"""Partitioning streams the input into slice descriptions; reading the slices back gives every record once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import write_jsonl

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.records import BatchSpec, partition, read_batch


def read_all(path: Path, fmt: str, batch_size: int, id_field: str = "id", encoding: str = "utf-8"):
    store = LocalManifestStore(root=str(path.parent))
    with open(path, "rb") as f:
        plan = partition(f, fmt, batch_size)
    items, rejects = [], []
    for spec in plan.batches:
        got = read_batch(store.open_uri, store.read_range, str(path), fmt, spec, id_field, encoding)
        assert len(got.items) + len(got.rejects) == spec.records
        assert got.digest.startswith("sha256:")
        items += got.items
        rejects += got.rejects
    return plan, items, rejects


@pytest.mark.parametrize("n, batch_size, expected_batches", [(10, 3, 4), (9, 3, 3), (1, 100, 1), (0, 5, 0)])
def test_jsonl_batch_boundaries(tmp_path, n, batch_size, expected_batches):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    plan, items, rejects = read_all(path, "jsonl", batch_size)
    assert len(plan.batches) == expected_batches and plan.records == n
    # full batches, then the remainder
    assert [spec.records for spec in plan.batches] == [min(batch_size, n - i) for i in range(0, n, batch_size)]
    assert [item["id"] for _, item in items] == list(range(n))
    assert [line for line, _ in items] == list(range(1, n + 1))
    assert rejects == []
    # slices tile the file: the first starts at 0, each starts where the previous ended, the last ends at EOF
    ends = [spec.end for spec in plan.batches]
    assert [spec.start for spec in plan.batches] == [0, *ends][:len(ends)]
    assert max(ends, default=0) == path.stat().st_size


def test_jsonl_rejects_carry_line_numbers_and_blank_lines_are_not_records(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": 1}, "{broken json", "", {"name": "no id"}, "[1, 2]", {"id": None}, {"id": 2}, "   ", {"id": 3}])
    plan, items, rejects = read_all(path, "jsonl", 2)
    assert plan.records == 7
    assert [item["id"] for _, item in items] == [1, 2, 3]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [
        (2, "invalid JSON"), (4, "missing id field 'id'"), (5, "not a JSON object (list)"), (6, "missing id field 'id'")]
    assert rejects[0]["raw"] == "{broken json"


def test_csv_with_header_quoted_newlines_and_bad_rows(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('id,name,note\n1,a,plain\n2,b,"two\nlines"\n3,c\n4,d,"has ""quotes"", ok"\n,e,no id\n5,f,x\n')
    plan, items, rejects = read_all(path, "csv", 2)
    assert plan.records == 6
    assert [item["id"] for _, item in items] == ["1", "2", "4", "5"]
    assert items[1][1]["note"] == "two\nlines"
    assert items[2][1]["note"] == 'has "quotes", ok'
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (5, "expected 3 columns, found 2"), (7, "missing id field 'id'")]
    assert [line for line, _ in items] == [2, 3, 6, 8]


def test_parquet_row_ranges_across_row_groups(tmp_path):
    path = tmp_path / "in.parquet"
    ids = list(range(25)) + [None]
    pq.write_table(pa.table({"id": ids, "v": [str(i) for i in range(26)]}), path, row_group_size=7)
    plan, items, rejects = read_all(path, "parquet", 4)
    assert len(plan.batches) == 7 and plan.records == 26
    assert [item["id"] for _, item in items] == list(range(25))
    assert [r["line"] for r in rejects] == [26]


def test_partition_streams_and_keeps_only_descriptions(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "pad": "x" * 100} for i in range(2000)])
    seen = []
    with open(path, "rb") as f:
        plan = partition(f, "jsonl", 500, on_batch=seen.append)
    assert seen == plan.batches
    spec = plan.batches[1]
    assert spec == BatchSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert spec.first_line == 501 and spec.end - spec.start == sum(
        len(line) for line in path.read_bytes().splitlines(keepends=True)[500:1000])


def test_partition_works_on_any_binary_stream():
    data = b"".join(json.dumps({"id": i}).encode() + b"\n" for i in range(5))
    plan = partition(io.BytesIO(data), "jsonl", 2)
    assert [b.records for b in plan.batches] == [2, 2, 1] and plan.input_bytes == len(data)


def latin1_in_utf8(path: Path, fmt: str) -> Path:
    """201 records; record 100 holds the latin-1 byte of ``café`` in an otherwise UTF-8 file."""
    rows = [f"{i},n{i}" if fmt == "csv" else json.dumps({"id": i, "name": f"n{i}"}) for i in range(201)]
    data = "\n".join(rows).encode() + b"\n"
    bad = (b"100,caf\xe9" if fmt == "csv" else b'{"id": 100, "name": "caf\xe9"}')
    data = data.replace(rows[100].encode(), bad)
    path.write_bytes((b"id,name\n" if fmt == "csv" else b"") + data)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bytes_not_valid_in_the_encoding_are_rejected_with_line_and_reason_never_repaired(tmp_path, fmt):
    path = latin1_in_utf8(tmp_path / f"in.{fmt}", fmt)
    plan, items, rejects = read_all(path, fmt, 50)
    assert plan.records == 201 and len(items) == 200
    [reject] = rejects
    line = 102 if fmt == "csv" else 101  # the CSV header is line 1
    assert reject["line"] == line and reject["reason"].startswith(f"bytes not valid utf-8 (line {line}, byte ")
    assert "set input.encoding" in reject["reason"]
    assert not any("\ufffd" in json.dumps(item, ensure_ascii=False) for _, item in items)

    plan, items, rejects = read_all(path, fmt, 50, encoding="latin-1")  # the legacy file, declared as such
    assert not rejects and dict(items)[line]["name"] == "café"


def test_a_bad_byte_in_a_quoted_multiline_csv_record_rejects_that_record_only(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,note\n1,"two\nlines\xe9"\n2,fine\n')
    _, items, [reject] = read_all(path, "csv", 10)
    assert [item["id"] for _, item in items] == ["2"] and reject["line"] == 2 and "(line 3, byte 6" in reject["reason"]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1}\n{"id": 2}\n')
    _, items, rejects = read_all(path, "jsonl", 10)
    assert [item["id"] for _, item in items] == [1, 2] and not rejects


def test_each_jsonl_line_is_read_as_json_loads_reads_it_alone():
    """The slice is decoded in one call and each line parsed by the JSON scanner directly (fast); what is accepted,
    the rejects and their messages stay those of ``json.loads`` on the line's own text."""
    from slurmctl.records import read_jsonl

    lines = [b'{"id": 1}', b' {"id": 2}\r', b'\xef\xbb\xbf{"id": 3}', b'{"id": 4}\xc2\xa0', b'{"id": 5}, {"id": 6}',
             b'{"id": 7}\t ', b'', b'{"id": 8', b'{"id": "caf\xc3\xa9"}', b'\xef\xbb\xbf\xef\xbb\xbf{"id": 9}']
    read = read_jsonl(b"\n".join(lines), 1, "id")
    assert [(line, item["id"]) for line, item in read.items] == [(1, 1), (2, 2), (3, 3), (6, 7), (9, "café")]
    why = {r["line"]: r["reason"] for r in read.rejects}
    assert sorted(why) == [4, 5, 8, 10]
    assert why[4].startswith("invalid JSON: Extra data") and why[5].startswith("invalid JSON: Extra data")
    assert why[8].startswith("invalid JSON: Expecting") and "Unexpected UTF-8 BOM" in why[10]
    # one bad byte anywhere: the slice is read line by line, and only that line is rejected
    bad = read_jsonl(b'{"id": 1}\n{"id": "caf\xe9"}\n{"id": 3}', 1, "id")
    assert [line for line, _ in bad.items] == [1, 3] and "not valid utf-8 (line 2" in bad.rejects[0]["reason"]
