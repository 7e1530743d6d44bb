"""What a compressed input costs at partition: the plain file's partition against the same records compressed.

    .venv/bin/python benchmarks/compressed_input.py --items 2000000 --json

Writes ``--items`` JSONL records (~50 bytes each), compresses them with gzip, zstd and bz2, and times, in one process,
``records.partition`` of the plain file (one streaming pass) against ``partition`` through a ``Chunker`` for each
compressed file (decompress, cut, write the zstd chunks into a local store), and the read of one batch back from its
chunk. Prints one JSON object: per compression, seconds, MB of records per second, chunks and their bytes against the
compressed input's, and the first and last batch's read time.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slurmctl.blocks.manifest_store import LocalManifestStore  # noqa: E402
from slurmctl.books.input_chunks import Chunker, ChunkReader, decompressing  # noqa: E402
from slurmctl.records import partition, read_batch  # noqa: E402

COMPRESS = {"gzip": lambda b: gzip.compress(b, 6), "zstd": lambda b: pa.compress(b, "zstd", asbytes=True),
            "bz2": lambda b: bz2.compress(b, 9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--compressions", nargs="+", default=["gzip", "zstd", "bz2"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-compressed-"))
    try:
        plain = "".join(f'{{"id": {i}, "name": "user-{i}", "score": {i % 97}}}\n' for i in range(args.items)).encode()
        (tmp / "in.jsonl").write_bytes(plain)
        mb = len(plain) / 1e6
        t = time.perf_counter()
        with open(tmp / "in.jsonl", "rb") as f:
            reference = partition(f, "jsonl", args.batch_size)
        plain_s = time.perf_counter() - t
        out = {"items": args.items, "records_mb": round(mb, 1), "batches": len(reference.batches),
               "plain_partition_s": round(plain_s, 2), "plain_mb_per_s": round(mb / plain_s, 1), "compressed": {}}
        for name in args.compressions:
            path = tmp / f"in.jsonl.{name}"
            path.write_bytes(COMPRESS[name](plain))
            store = LocalManifestStore(root=str(tmp / f"store-{name}"))
            t = time.perf_counter()
            with open(path, "rb") as raw:
                chunker = Chunker(store, "bench", decompressing(raw, name))
                plan = partition(chunker, "jsonl", args.batch_size, on_batch=chunker.add)
                chunks = chunker.finish(plan)
            seconds = time.perf_counter() - t
            assert [s.digest for s in plan.batches] == [s.digest for s in reference.batches]
            chunk_bytes = sum(f.stat().st_size for f in (tmp / f"store-{name}").rglob("*.zst"))
            reads = []
            for spec in (plan.batches[0], plan.batches[-1]):
                ChunkReader._cache.clear()
                t = time.perf_counter()
                got = read_batch(store.open_uri, ChunkReader(store), spec.chunk, "jsonl", spec, "id")
                reads.append(round(time.perf_counter() - t, 4))
                assert got.digest == spec.digest
            out["compressed"][name] = {
                "input_mb": round(path.stat().st_size / 1e6, 1), "partition_s": round(seconds, 2),
                "records_mb_per_s": round(mb / seconds, 1), "vs_plain": round(seconds / plain_s, 2),
                "chunks": chunks, "chunks_mb": round(chunk_bytes / 1e6, 1),
                "first_batch_read_s": reads[0], "last_batch_read_s": reads[1]}
        print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
