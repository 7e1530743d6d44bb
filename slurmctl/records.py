"""Reading input records: streaming partitioning into slice descriptions, and reading one slice back.

A batch is never a copy of the data. Partitioning streams the input once and records, per batch, where its records
are (byte range and first line for JSONL/CSV, row range for Parquet), so planning a job costs one object-store write
whatever the number of batches, and memory stays flat whatever the input size.

Malformed records are found when a batch reads its slice (in parallel, on the workers): each becomes a *reject* with
its physical line number (row number for Parquet) and reason, instead of failing the batch or vanishing.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

if TYPE_CHECKING:
    import pyarrow.parquet as pq


RAW_PREVIEW = 500  # characters of a rejected record kept for the rejects file


@dataclass(frozen=True)
class BatchSpec:
    """Where one batch's records are. ``start``/``end`` are bytes (JSONL, CSV) or rows (Parquet)."""

    batch_id: str
    index: int
    start: int
    end: int
    first_line: int  # physical 1-based line (JSONL/CSV) or 1-based row (Parquet) of the first record
    records: int
    header_end: int = 0  # CSV: bytes [0, header_end) hold the header line
    digest: str = ""  # sha256 of the slice's bytes (JSONL/CSV) or of its identity in the file (Parquet)
    source: str = "input"  # "input", or the store key of a retry plan whose lines this batch takes
    group: str = "initial_batch"  # Prefect task group / PRD TaskGroup: initial_batch, retry_batch_1, ...
    # Parquet: the input file's identity when it was partitioned (``ManifestStore.input_identity``: S3 ETag and
    # size, or mtime and size), checked when the batch reads, since ``digest`` covers only the file's shape. Empty
    # for JSONL/CSV (``digest`` hashes the slice's bytes) and in plans written before it existed (not checked).
    input_identity: str = ""
    # A compressed input: the store key of the zstd chunk holding this batch (``slurmctl.books.input_chunks``);
    # ``start``/``end``/``header_end`` are then offsets in the chunk's decompressed bytes.
    chunk: str = ""
    # An input of many files (a glob, a directory or prefix, ``input.files``): the batch's file, and the job-wide
    # line number of that file's line 0 (``first_line`` and every item's line are job-wide, so lines stay unique
    # across files; the file's own line is ``line - line_base``). Batches never span files.
    file: str = ""
    line_base: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As a plan line; empty optional fields are left out, so a plain one-file plan is what it always was."""
        d = asdict(self)
        for optional in ("input_identity", "chunk", "file", "line_base"):
            if not d[optional]:
                del d[optional]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchSpec":
        return cls(**d)


@dataclass
class Plan:
    """The result of partitioning: batches plus input-wide facts."""

    batches: list[BatchSpec] = field(default_factory=list)
    records: int = 0
    input_bytes: int = 0
    lines: int = 0  # physical lines (JSONL, CSV) or rows (Parquet) read: the next file's ``line_base`` moves by it
    chunks: int = 0  # a compressed input's chunks written (``slurmctl.books.input_chunks``): numbered on by the next file


@dataclass
class SliceRead:
    """One batch's records, parsed: good items with their line numbers, and rejects."""

    items: list[tuple[int, dict[str, Any]]]
    rejects: list[dict[str, Any]]
    digest: str  # sha256 of the raw slice: the batch's input identity
    previous: dict[str, int] = field(default_factory=dict)  # retry batches: how many items were failed/deferred


def batch_id_for(index: int) -> str:
    return f"batch-{index:06d}"


# --- partitioning ---------------------------------------------------------------------------------------------
def partition(stream: BinaryIO, fmt: str, batch_size: int, on_batch: Callable[[BatchSpec], None] | None = None,
              input_identity: str = "", *, first_index: int = 0, line_base: int = 0, file: str = "") -> Plan:
    """Stream ``stream`` once and cut it into batches of ``batch_size`` records.

    ``on_batch`` sees each batch as it is cut (progress reporting); the plan also keeps them, which at 50k batches
    is a few MB of small dataclasses, never the data. ``input_identity`` (Parquet: the file's identity taken
    before it was opened) is recorded in each batch. One file of many: its batches are numbered from
    ``first_index``, its lines from ``line_base`` + 1, and they name ``file``.
    """
    plan = Plan()
    identity = input_identity if fmt == "parquet" else ""

    def emit(start: int, end: int, first_line: int, records: int, header_end: int = 0, digest: str = "") -> None:
        index = first_index + len(plan.batches)
        spec = BatchSpec(batch_id_for(index), index, start, end, line_base + first_line, records, header_end, digest,
                         input_identity=identity, file=file, line_base=line_base)
        plan.batches.append(spec)
        plan.records += records
        if on_batch:
            on_batch(spec)

    if fmt == "parquet":
        import pyarrow.parquet as pq  # here: the commands that read a job's books never need it

        meta = pq.ParquetFile(stream).metadata
        for start in range(0, meta.num_rows, batch_size):
            end = min(start + batch_size, meta.num_rows)
            emit(start, end, start + 1, end - start, digest=parquet_slice_digest(meta, start, end))
        plan.lines = meta.num_rows
        return plan

    pos = 0
    line_no = 0
    header_end = 0
    if fmt == "csv":
        header = stream.readline()
        line_no, pos = 1, len(header)
        header_end = pos
        if not header.strip():
            plan.input_bytes, plan.lines = pos, line_no
            return plan
    batch_start, batch_first_line, batch_records = pos, line_no + 1, 0
    digest = hashlib.sha256()  # of exactly the bytes [batch_start, pos): what a worker will read back
    pending_quote = False  # CSV: inside a quoted field that spans lines
    for line in stream:
        line_no += 1
        pos += len(line)
        if fmt == "csv" and line.count(b'"') % 2 == 1:
            pending_quote = not pending_quote
        if pending_quote:  # the record goes on in the next physical line
            digest.update(line)
            continue
        if not line.strip():
            if batch_records == 0 and pos - len(line) == batch_start:  # blank lines between batches: no record
                batch_start, batch_first_line = pos, line_no + 1
            else:
                digest.update(line)
            continue
        digest.update(line)
        batch_records += 1
        if batch_records == batch_size:
            emit(batch_start, pos, batch_first_line, batch_records, header_end, "sha256:" + digest.hexdigest())
            batch_start, batch_first_line, batch_records = pos, line_no + 1, 0
            digest = hashlib.sha256()
    if batch_records:
        emit(batch_start, pos, batch_first_line, batch_records, header_end, "sha256:" + digest.hexdigest())
    plan.input_bytes, plan.lines = pos, line_no
    return plan


def parquet_slice_digest(meta: Any, start: int, end: int) -> str:
    """Identity of a Parquet row range: the file's shape plus the range (hashing rows would mean reading them)."""
    ident = f"parquet:{meta.num_rows}:{meta.num_row_groups}:{meta.serialized_size}:{meta.created_by}:{start}:{end}"
    return "sha256:" + hashlib.sha256(ident.encode()).hexdigest()


# --- reading one batch ------------------------------------------------------------------------------------------
def _reject(line: int, reason: str, raw: Any) -> dict[str, Any]:
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return {"line": line, "reason": reason, "raw": text[:RAW_PREVIEW]}


def _has_id(item: dict[str, Any], id_field: str) -> bool:
    value = item.get(id_field)
    return value is not None and value != ""


def _codec(encoding: str) -> str:
    """UTF-8 is read as ``utf-8-sig``: a byte-order mark at the start of a file is not part of its first record."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _not_valid(encoding: str, exc: UnicodeDecodeError, line: int) -> str:
    return (f"bytes not valid {codecs.lookup(encoding).name} (line {line}, byte {exc.start + 1}: "
            f"{exc.object[exc.start:exc.start + 4]!r}, {exc.reason}); set input.encoding if the file is in another "
            f"encoding")


_raw_json = json.JSONDecoder().raw_decode
_json_space = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]


def _json_line(text: str) -> Any:
    """``json.loads(text)`` without its per-call overhead when the line is one JSON value and nothing else (nearly
    every line); any other line goes through ``json.loads`` itself, so what is accepted and each error message are
    exactly its own."""
    try:
        value, end = _raw_json(text)
        if end == len(text) or _json_space(text, end).end() == len(text):
            return value
    except ValueError:
        pass
    return json.loads(text)


def _decoded_lines(raws: list[bytes], data: bytes, codec: str) -> list[str | None]:
    """Each line's text: the slice decoded in one call when it is valid UTF-8 (each line as ``utf-8-sig`` would
    decode it alone: a leading byte-order mark dropped), else None: decode line by line, to reject the bad ones."""
    if codec != "utf-8-sig":
        return [None] * len(raws)
    try:
        texts = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return [None] * len(raws)
    return [t[1:] if t.startswith("\ufeff") else t for t in texts]


def read_jsonl(data: bytes, first_line: int, id_field: str, encoding: str = "utf-8", line_base: int = 0) -> SliceRead:
    items, rejects = [], []
    codec = _codec(encoding)
    raws = data.split(b"\n")
    for offset, (raw, text) in enumerate(zip(raws, _decoded_lines(raws, data, codec))):
        line = first_line + offset
        if not raw.strip():
            continue
        if text is None:
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError as exc:
                rejects.append(_reject(line, _not_valid(encoding, exc, line - line_base), raw))
                continue
        try:
            item = _json_line(text)
        except json.JSONDecodeError as exc:
            rejects.append(_reject(line, f"invalid JSON: {exc}", raw))
            continue
        if not isinstance(item, dict):
            rejects.append(_reject(line, f"not a JSON object ({type(item).__name__})", raw))
        elif not _has_id(item, id_field):
            rejects.append(_reject(line, f"missing id field {id_field!r}", raw))
        else:
            items.append((line, item))
    return SliceRead(items, rejects, "")


def read_csv(header: bytes, data: bytes, first_line: int, id_field: str, encoding: str = "utf-8",
             line_base: int = 0) -> SliceRead:
    """A CSV slice. Each physical line is decoded strictly; a record touching a line that is not valid in
    ``encoding`` is rejected with the reason (the line is parsed with U+FFFD in place only to find where the
    record ends, and nothing of it reaches the output)."""
    codec = _codec(encoding)
    columns = next(csv.reader([header.decode(codec).rstrip("\r\n")]))
    items, rejects = [], []
    texts: list[str] = []
    invalid: dict[int, str] = {}  # physical line -> why its bytes are not valid
    for offset, raw in enumerate(data.splitlines(keepends=True)):
        try:
            texts.append(raw.decode(codec))
        except UnicodeDecodeError as exc:
            invalid[first_line + offset] = _not_valid(encoding, exc, first_line + offset - line_base)
            texts.append(raw.decode(codec, "replace"))
    reader = csv.reader(io.StringIO("".join(texts), newline=""))
    line = first_line
    while True:
        start_line = first_line + reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rejects.append(_reject(start_line, f"invalid CSV: {exc}", ""))
            continue
        line = start_line
        bad = next((invalid[n] for n in range(start_line, first_line + reader.line_num) if n in invalid), None)
        if bad is not None:
            rejects.append(_reject(line, bad, ",".join(row)))
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(columns):
            rejects.append(_reject(line, f"expected {len(columns)} columns, found {len(row)}", ",".join(row)))
            continue
        item = dict(zip(columns, row))
        if not _has_id(item, id_field):
            rejects.append(_reject(line, f"missing id field {id_field!r}", ",".join(row)))
            continue
        items.append((line, item))
    return SliceRead(items, rejects, "")


def read_parquet_rows(pf: "pq.ParquetFile", start: int, end: int, id_field: str, line_base: int = 0) -> SliceRead:
    """Rows ``[start, end)``, reading only the row groups that overlap them."""
    meta = pf.metadata
    groups, first_row_of_first_group, row = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row + n > start and row < end:
            groups.append(g)
            if first_row_of_first_group is None:
                first_row_of_first_group = row
        row += n
    items, rejects = [], []
    if not groups:
        return SliceRead(items, rejects, "")
    table = pf.read_row_groups(groups)
    offset = start - first_row_of_first_group
    table = table.slice(offset, end - start)
    for i, item in enumerate(table.to_pylist()):
        line = line_base + start + i + 1
        if not _has_id(item, id_field):
            rejects.append(_reject(line, f"missing id field {id_field!r}", json.dumps(item, default=str)))
        else:
            items.append((line, item))
    return SliceRead(items, rejects, "")


def read_batch(open_uri: Callable[[str], BinaryIO], read_range: Callable[[str, int, int], bytes], uri: str,
               fmt: str, spec: BatchSpec, id_field: str, encoding: str = "utf-8") -> SliceRead:
    """Read and parse one batch's slice of the input; ``digest`` fingerprints exactly the bytes/rows read.

    For a retry batch (``spec.source`` is a retry plan), ``uri`` is that plan's URI and the slice holds items.
    """
    if spec.source != "input":
        return read_retry_lines(read_range(uri, spec.start, spec.end))
    if fmt == "parquet":
        with open_uri(uri) as f:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            result = read_parquet_rows(pf, spec.start, spec.end, id_field, spec.line_base)
            result.digest = parquet_slice_digest(pf.metadata, spec.start, spec.end)
        return result
    data = read_range(uri, spec.start, spec.end)
    if fmt == "jsonl":
        result = read_jsonl(data, spec.first_line, id_field, encoding, spec.line_base)
    else:
        header = read_range(uri, 0, spec.header_end)
        result = read_csv(header, data, spec.first_line, id_field, encoding, spec.line_base)
    result.digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return result


def read_retry_lines(data: bytes) -> SliceRead:
    """A slice of a retry plan: one ``{"line", "item", "previous"}`` JSON object per line (see flows/retry.py)."""
    items: list[tuple[int, dict[str, Any]]] = []
    previous: dict[str, int] = {}
    for raw in data.splitlines():
        if raw.strip():
            entry = json.loads(raw)
            items.append((entry["line"], entry["item"]))
            previous[entry["previous"]] = previous.get(entry["previous"], 0) + 1
    return SliceRead(items, [], "sha256:" + hashlib.sha256(data).hexdigest(), previous)
