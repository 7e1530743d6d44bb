"""Compressed input (``.gz``, ``.zst``, ``.bz2``) is streamed once at partition into chunks of whole batches that a
shard opens alone (``slurmctl.books.input_chunks``); every record is read back once, with its line."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import log_tail, run_cli, status, write_config

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.input_chunks import Chunker, ChunkReader, decompressing
from slurmctl.config import ConfigError, parse_config
from slurmctl.records import partition, read_batch

COMPRESS = {"gzip": gzip.compress, "bz2": bz2.compress, "zstd": lambda b: pa.compress(b, "zstd", asbytes=True)}
SUFFIX = {"gzip": ".gz", "bz2": ".bz2", "zstd": ".zst"}


def csv_bytes(n: int) -> bytes:
    rows = [f'{i},"note {i}"' if i != 7 else f'{i},"two\nlines"' for i in range(n)]
    return ("id,note\n" + "\n".join(rows) + "\n").encode()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "bz2"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_every_record_of_a_compressed_input_is_read_back_once_from_its_chunk(tmp_path, compression, fmt):
    n = 500
    plain = (b"".join(json.dumps({"id": i}).encode() + b"\n" for i in range(n)) if fmt == "jsonl"
             else csv_bytes(n))
    path = tmp_path / f"in.{fmt}{SUFFIX[compression]}"
    path.write_bytes(COMPRESS[compression](plain))
    store = LocalManifestStore(root=str(tmp_path / "store"))
    with open(path, "rb") as raw:
        chunker = Chunker(store, "cz", decompressing(raw, compression), chunk_bytes=1000)  # many small chunks
        plan = partition(chunker, fmt, 30, on_batch=chunker.add)
        chunks = chunker.finish(plan)
    with open(tmp_path / "plain", "wb") as f:
        f.write(plain)
    with open(tmp_path / "plain", "rb") as f:
        reference = partition(f, fmt, 30)  # the same input, uncompressed
    assert chunks > 3 and plan.records == reference.records == n
    assert [s.digest for s in plan.batches] == [s.digest for s in reference.batches]  # the same bytes per batch
    items = []
    for spec in plan.batches:
        got = read_batch(store.open_uri, ChunkReader(store), spec.chunk, fmt, spec, "id")
        assert got.digest == spec.digest and not got.rejects
        items += got.items
    ids = [int(item["id"]) for _, item in items]
    assert ids == list(range(n))
    lines = dict((int(item["id"]), line) for line, item in items)
    assert lines[0] == (1 if fmt == "jsonl" else 2) and (fmt == "jsonl" or lines[8] == lines[7] + 2)


def test_the_format_is_the_suffix_before_the_compression_and_parquet_is_not_compressed_again():
    cfg = parse_config({"handler": "slurmctl.handlers.echo:handle", "input": {"uri": "day/users.csv.zst"}})
    assert (cfg.input.format, cfg.input.compression) == ("csv", "zstd")
    with pytest.raises(ConfigError, match="input"):
        parse_config({"handler": "slurmctl.handlers.echo:handle",
                      "input": {"uri": "u.parquet", "compression": "gzip"}})


def test_a_day_of_gzipped_and_plain_csv_parts_runs_end_to_end_and_rejects_a_bad_byte(tmp_path: Path, prefect_api: str,
                                                                                      slurmctl_home: Path):
    """One job over a glob (``day/part-*.csv*``): a gzipped part holding a latin-1 byte in UTF-8, and a plain part."""
    rows = csv_bytes(300).decode().splitlines()
    header, first, second = rows[0], rows[1:151], rows[151:]  # ids 0-149 (with the quoted two-line note), 150-299
    (tmp_path / "day").mkdir()
    (tmp_path / "day/part-1.csv.gz").write_bytes(gzip.compress(
        ("\n".join([header, *first]) + "\n").encode().replace(b'100,"note 100"', b'100,"caf\xe9"')))
    (tmp_path / "day/part-2.csv").write_text("\n".join([header, *second]) + "\n")
    cfg = write_config(tmp_path / "job.yaml", job_id="gz-e2e", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "day/part-*.csv*"}, batch_size=40, cluster={"kind": "local", "n_workers": 2},
                       storage={"uri": "file://./state"})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "gz-e2e")
    view = status("gz-e2e")
    assert (view["status"], view["items_total"], view["items_succeeded"], view["items_rejected"]) == (
        "completed", 300, 299, 1)
    table = pq.read_table(view["output"][len("file://"):])
    assert sorted(int(i) for i in table.column("id").to_pylist()) == [i for i in range(300) if i != 100]
    assert "two\nlines" in table.column("note").to_pylist()
    [reject] = [json.loads(line) for line in (tmp_path / "state/jobs/gz-e2e/rejects.jsonl").read_text().splitlines()]
    assert (Path(reject["file"]).name, reject["file_line"]) == ("part-1.csv.gz", 103), reject  # header, 2-line row
    assert "not valid utf-8 (line 103" in reject["reason"]
