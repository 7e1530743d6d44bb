"""A compressed input (``users.jsonl.gz``, ``.zst``, ``.bz2``), read once and kept as chunks a shard can open alone.

A compressed file cannot be read at an offset, so the usual plan (each batch a byte range of the input, read with one
ranged request) does not work, and streaming the file from its start for each shard would cost the whole prefix
again per shard. So partitioning streams the file once (decompressing as it goes, never the whole file on disk or in
memory) and writes its records again into the job's store as zstd chunks of whole batches (``input/chunk-NNNNNN.zst``,
about ``CHUNK_BYTES`` of records each, a CSV's header at the start of every chunk). Each batch then names its chunk,
and its offsets and digest are those of the chunk's decompressed bytes, which are the input's bytes: a shard fetches a
chunk with one request and decompresses a few MB. Cost: one pass of decompression and zstd compression at
partition (~100-300 MB/s of records on one core), and the chunks' size in the store (about the input's compressed
size again), kept with the job's other intermediate files.

The chunks are the job's copy of its input: a resume reads them, not the original file.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import BinaryIO, Iterator

import pyarrow as pa

from slurmctl.books.manifests import Keys
from slurmctl.books.parts import PartCorrupt, PartMissing
from slurmctl.records import BatchSpec, Plan
from slurmctl.storage import Store

CHUNK_BYTES = 8 << 20  # records per chunk, decompressed: one GET and ~10 ms of zstd per chunk a shard reads
CODEC = "zstd"


def decompressing(raw: BinaryIO, compression: str) -> BinaryIO:
    """``raw`` (a compressed file) as a stream of its decompressed bytes, read lazily in 1 MiB blocks."""
    stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), compression)
    return io.BufferedReader(stream, 1 << 20)  # type: ignore[arg-type]


class Chunker:
    """Tee a decompressed input as ``records.partition`` reads it, and write its batches into chunks.

    Give it to ``partition`` in place of the input and ``add`` as its ``on_batch``; then ``finish(plan)`` writes the
    last chunk and points the plan's batches into their chunks."""

    def __init__(self, store: Store, job_id: str, source: BinaryIO, chunk_bytes: int = CHUNK_BYTES,
                 first_chunk: int = 0) -> None:
        """``first_chunk``: the number of this file's first chunk (an input of many files numbers them on)."""
        self.store, self.keys, self.source, self.chunk_bytes = store, Keys(job_id), source, chunk_bytes
        self.first_chunk = first_chunk
        self.header = b""
        self.buf = bytearray()  # the input's bytes from ``self.offset`` on
        self.offset = 0
        self.read = 0  # bytes read from the source so far
        self.pending: list[BatchSpec] = []
        self.chunks = 0
        self.moved: dict[int, tuple[str, int]] = {}  # batch index -> its chunk, and the shift of its offsets

    # --- the stream partition reads -------------------------------------------------------------------------------
    def readline(self) -> bytes:  # a CSV's header
        line = self.source.readline()
        self.header += line
        self.read += len(line)
        self.offset = self.read
        return line

    def __iter__(self) -> Iterator[bytes]:
        for line in self.source:
            self.buf += line
            self.read += len(line)
            yield line

    # --- batches as partition cuts them ----------------------------------------------------------------------------
    def add(self, spec: BatchSpec) -> None:
        self.pending.append(spec)
        if spec.end - self.pending[0].start >= self.chunk_bytes:
            self._flush()

    def finish(self, plan: Plan) -> int:
        """Write the last chunk and point ``plan``'s batches into their chunks; return how many chunks there are."""
        if self.pending:
            self._flush()
        header_end = len(self.header)
        plan.batches = [replace(s, start=s.start + self.moved[s.index][1], end=s.end + self.moved[s.index][1],
                                header_end=header_end, chunk=self.moved[s.index][0]) if s.index in self.moved else s
                        for s in plan.batches]
        return self.chunks

    def _flush(self) -> None:
        start, end = self.pending[0].start, self.pending[-1].end
        data = self.header + bytes(self.buf[start - self.offset:end - self.offset])
        key = self.keys.input_chunk(self.first_chunk + self.chunks)
        self.store.put_bytes(key, pa.compress(data, CODEC, asbytes=True))
        for spec in self.pending:
            self.moved[spec.index] = (key, len(self.header) - start)
        del self.buf[:end - self.offset]
        self.offset = end
        self.pending = []
        self.chunks += 1


class ChunkReader:
    """``read_range`` over chunks: a chunk is fetched and decompressed once and its ranges served from memory (the two
    latest are kept per process, shared by its threads)."""

    _lock = threading.Lock()
    _cache: "OrderedDict[str, bytes]" = OrderedDict()

    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, key: str, start: int, end: int) -> bytes:
        return self.chunk(key)[start:end]

    def chunk(self, key: str) -> bytes:
        where = self.store.uri(key)
        with self._lock:
            if where in self._cache:
                self._cache.move_to_end(where)
                return self._cache[where]
        packed = self.store.get_bytes(key)
        if packed is None:
            raise PartMissing(f"input chunk {where} is missing: the job's copy of its compressed input was removed; "
                              f"submit the job again")
        try:
            data = pa.CompressedInputStream(pa.BufferReader(packed), CODEC).read()
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise PartCorrupt(f"input chunk {where} cannot be decompressed ({exc})") from None
        with self._lock:
            self._cache[where] = data
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return data

