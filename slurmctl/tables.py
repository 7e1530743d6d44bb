"""Output rows as Arrow tables: a batch's part (Parquet or SQLite), merging, deduplication, hash partitions.

Every row a batch writes carries two bookkeeping columns besides the handler's own: ``_slurmctl_line`` (the input
line of the item it came from) and ``_slurmctl_row`` (its index within that item's output; a handler may return
several rows for an item, or none). The aggregation adds ``_slurmctl_batch`` (the batch's place in commit order).
The id column always holds the input item's id (``slurmctl.handler.normalise_output``), so together they say which
rows survive when one item id appears in more than one occurrence: those of its latest occurrence, the one from the
latest commit and within a batch from the latest input line, that is: the last committed attempt, and for an id
repeated in the input, its last occurrence (all of that occurrence's rows, whatever the earlier ones returned). The
final dataset leaves them out.

Parts written before these columns existed are read with ``_slurmctl_line`` = the row's position in the part and
``_slurmctl_row`` = how many earlier rows of the part have the same id (an id repeated within one such batch then
reads as one item with several rows).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Iterable, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LINE = "_slurmctl_line"
ROW = "_slurmctl_row"
BATCH = "_slurmctl_batch"
INTERNAL = (BATCH, LINE, ROW)
SQLITE_TABLE = "rows"

PartKind = Literal["parquet", "sqlite"]
_LINE_SPAN = 1 << 32  # an occurrence is (batch ordinal, input line) as one int64: batch * 2**32 + line


def rows_table(rows: list[dict[str, Any]], lines: list[int], row_index: list[int]) -> pa.Table:
    """Rows (dicts, possibly with differing keys) as a table; columns are the union of keys in first-seen order."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {}
    for c in columns:
        try:
            arrays[c] = pa.array([r.get(c) for r in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TypeError(f"output column {c!r} has values of mixed types: {exc}") from None
    arrays[LINE] = pa.array(lines, pa.int64())
    arrays[ROW] = pa.array(row_index, pa.int32())
    return pa.table(arrays)


# --- SQLite parts ---------------------------------------------------------------------------------------------------
_SQL_TYPES = [(pa.types.is_boolean, "BOOLEAN"), (pa.types.is_integer, "INTEGER"), (pa.types.is_floating, "REAL"),
              (pa.types.is_string, "TEXT"), (pa.types.is_large_string, "TEXT"), (pa.types.is_binary, "BLOB")]
_ARROW_TYPES = {"BOOLEAN": pa.bool_(), "INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string(),
                "BLOB": pa.binary(), "JSON": pa.string(), "NULL": pa.null()}


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "NULL"
    return next((name for test, name in _SQL_TYPES if test(t)), "JSON")


def write_sqlite(table: pa.Table, path: str) -> None:
    """A part as a SQLite database: one table ``rows``, each column declared with the Arrow type it holds.

    The declared types make the part read back with the same schema (SQLite itself stores any value in any
    column); nested values (lists, structs) are stored as JSON text, declared ``JSON``.
    """
    con = sqlite3.connect(path)
    try:
        cols = [(f.name, _sql_type(f.type)) for f in table.schema]
        con.execute(f"CREATE TABLE {SQLITE_TABLE} ({', '.join(f'{_q(n)} {t}' for n, t in cols)})")
        values = [table[n].to_pylist() for n, _ in cols]
        for i, (_, t) in enumerate(cols):
            if t == "JSON":
                values[i] = [None if v is None else json.dumps(v, default=str) for v in values[i]]
        marks = ", ".join("?" * len(cols))
        con.executemany(f"INSERT INTO {SQLITE_TABLE} VALUES ({marks})", zip(*values))
        con.commit()
    finally:
        con.close()


def read_sqlite(path: str) -> pa.Table:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        decl = con.execute(f"SELECT name, type FROM pragma_table_info('{SQLITE_TABLE}')").fetchall()
        rows = con.execute(f"SELECT * FROM {SQLITE_TABLE} ORDER BY rowid").fetchall()
    finally:
        con.close()
    columns = list(zip(*rows)) if rows else [() for _ in decl]
    arrays = {}
    for (name, sql_type), values in zip(decl, columns):
        t = _ARROW_TYPES.get(sql_type.upper(), pa.string())
        arrays[name] = pa.array(values, t) if sql_type.upper() != "JSON" else pa.array(
            [None if v is None else json.loads(v) for v in values])
    return pa.table(arrays)


def sqlite_rows(path: str) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(f"SELECT count(*) FROM {SQLITE_TABLE}").fetchone()[0]
    finally:
        con.close()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def part_kind(key: str) -> PartKind:
    return "sqlite" if key.endswith(".sqlite") else "parquet"


def count_part_rows(path: str, kind: PartKind) -> int:
    return sqlite_rows(path) if kind == "sqlite" else pq.ParquetFile(path).metadata.num_rows


def with_row_keys(table: pa.Table, id_field: str) -> pa.Table:
    """A part's rows with ``_slurmctl_line`` and ``_slurmctl_row`` (derived for parts written without them: the rows
    of one id in such a part are one item, at the line of its first row, with several rows)."""
    if LINE in table.column_names and ROW in table.column_names:
        return table
    import pandas as pd  # only for parts of an earlier release

    ids = table[id_field].to_pandas() if id_field in table.column_names else pd.Series(np.zeros(len(table)))
    groups = ids.groupby(ids.map(_key), sort=False)
    if LINE not in table.column_names:
        first = pd.Series(np.arange(len(table), dtype=np.int64), index=ids.index).groupby(groups.ngroup()).transform(
            "min")
        table = table.append_column(LINE, pa.array(first.to_numpy(dtype=np.int64)))
    if ROW not in table.column_names:
        table = table.append_column(ROW, pa.array(groups.cumcount().to_numpy(dtype=np.int32)))
    return table


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


# --- merging --------------------------------------------------------------------------------------------------------
def unify(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema for all inputs: union of columns, null-typed columns promoted to their typed counterparts."""
    schemas = list(schemas)
    return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])


def align(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order (missing ones null)."""
    return pa.table({f.name: (table[f.name].cast(f.type) if f.name in table.column_names
                              else pa.nulls(len(table), f.type)) for f in schema}, schema=schema)


def concat(tables: list[pa.Table]) -> pa.Table:
    """One table: missing columns null, null-typed columns promoted, as ``unify`` does."""
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def read_parquet_bytes(data: bytes) -> pa.Table:
    """A small Parquet file already in memory (a batch part): no dataset machinery, no thread pool."""
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


class Dropped(NamedTuple):
    """What a deduplication dropped, per batch ordinal: rows, and item occurrences (input lines) whose rows went."""

    rows: dict[int, int]
    items: dict[int, int]


def dedupe(table: pa.Table, id_field: str) -> tuple[pa.Table, Dropped]:
    """Keep, for each item id, the rows of its latest occurrence, ``table`` being in commit order: the occurrence
    of the latest commit (batch ordinal), and within a batch the latest input line. The order of the kept rows is
    unchanged. Returns the rows kept and what was dropped, per batch ordinal.

    The key is the input item's id (``id_field`` always holds it: ``slurmctl.handler.normalise_output``), so
    distinct items never collapse whatever their handler returned; an id repeated in the input is one item in the
    output, its last occurrence, with all of that occurrence's rows (never a mix of two occurrences' rows). The
    rule is associative (a latest occurrence of a union is the latest of the latest), so a merge tree may apply it
    at every level.
    """
    keep, dropped = latest_rows(table, id_field)
    return (table, dropped) if keep is None else (table.filter(pa.array(keep)), dropped)


def latest_rows(table: pa.Table, id_field: str) -> tuple[np.ndarray | None, Dropped]:
    """``dedupe``'s rule as a mask over ``table``'s rows (None: all kept). ``table`` needs only the id, the batch
    ordinal and the line columns: a merge whose inputs are too large to hold at once decides on those, then streams
    each input's rows through its share of the mask."""
    n = len(table)
    if n == 0 or id_field not in table.column_names:
        return None, Dropped({}, {})
    lines = table[LINE].to_numpy().astype(np.int64, copy=False)
    if len(lines) and (lines.min() < 0 or lines.max() >= _LINE_SPAN):
        raise ValueError(f"input line numbers must lie in [0, {_LINE_SPAN}) to be deduplicated")
    occurrence = table[BATCH].to_numpy().astype(np.int64) * _LINE_SPAN + lines
    ids = pc.dictionary_encode(table[id_field].combine_chunks(), null_encoding="encode")
    group = ids.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    latest = np.full(len(ids.dictionary), -1, dtype=np.int64)
    np.maximum.at(latest, group, occurrence)
    keep = occurrence == latest[group]
    if keep.all():
        return None, Dropped({}, {})
    dropped = ~keep
    batches = table[BATCH].to_numpy()[dropped]
    rows = dict(zip(*(v.tolist() for v in np.unique(batches, return_counts=True))))
    items_batches = np.unique(occurrence[dropped]) // _LINE_SPAN
    items = dict(zip(*(v.tolist() for v in np.unique(items_batches, return_counts=True))))
    return keep, Dropped(rows, items)


IdRange = list  # [kind ("int" or "str"), lowest id, highest id]


def id_range(table: pa.Table, id_field: str) -> IdRange | None:
    """The lowest and highest item id of ``table``, when its ids are all integers or all strings, none null (None
    otherwise): a merge records it for each file it writes, so the merge above can tell that its inputs share no id
    (``disjoint``) without reading them."""
    if id_field not in table.column_names or not len(table):
        return None
    ids = table[id_field]
    kind = ("int" if pa.types.is_integer(ids.type) else
            "str" if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) else None)
    if kind is None or ids.null_count:
        return None
    low_high = pc.min_max(ids)
    return [kind, low_high["min"].as_py(), low_high["max"].as_py()]


def _one_kind(ranges: list[IdRange | None]) -> bool:
    """All of ``ranges`` are known and of one kind (an int and a string are never compared)."""
    return all(r is not None for r in ranges) and len({r[0] for r in ranges}) == 1


def span(ranges: Iterable[IdRange | None]) -> IdRange | None:
    """One range holding all of ``ranges`` (None if any is None or they are of different kinds)."""
    ranges = list(ranges)
    if not ranges or not _one_kind(ranges):
        return None
    return [ranges[0][0], min(r[1] for r in ranges), max(r[2] for r in ranges)]


def disjoint(ranges: list[IdRange | None]) -> bool:
    """No item id can be in two of the files whose ranges these are: they are all known, of one kind (an int and a
    string are never compared) and, ordered by their lowest id, each starts above where the one before ends. Ids are
    compared as ``dedupe`` compares them: integers by value, strings by their UTF-8 bytes (code point order)."""
    if len(ranges) < 2:
        return True
    if not _one_kind(ranges):
        return False
    spans = sorted((r[1], r[2]) for r in ranges)
    return all(later[0] > earlier[1] for earlier, later in zip(spans, spans[1:]))


def buckets_of(table: pa.Table, id_field: str, buckets: int) -> np.ndarray:
    """Each row's hash partition: a stable hash of the item id (the same in every process and run)."""
    if buckets <= 1 or len(table) == 0:
        return np.zeros(len(table), dtype=np.int64)
    import pandas as pd  # its stable vectorised hash; imported only by merges that partition

    values = table[id_field].to_pandas() if id_field in table.column_names else pd.Series([None] * len(table))
    if values.dtype == object:  # strings, or values of mixed kinds: hash their JSON text (1 and "1" differ)
        values = values.map(_key)
    hashed = pd.util.hash_array(values.to_numpy())
    return (hashed % np.uint64(buckets)).astype(np.int64)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
