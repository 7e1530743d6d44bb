"""Output rows as Arrow tables: a batch's part (Parquet or SQLite), merging, deduplication, hash partitions.

Every row a batch writes carries two bookkeeping columns besides the handler's own: ``_slurmctl_line`` (the input
line of the item it came from) and ``_slurmctl_row`` (its index within that item's output; a handler may return
several rows for an item, or none). The aggregation adds ``_slurmctl_batch`` (the batch's place in commit order).
Together they say which row wins when one key, (item id, row index), appears more than once: the one from the
latest commit, and within a batch the latest input line, that is: the last committed attempt, and for an id repeated
in the input, its last occurrence. The final dataset leaves them out.

Parts written before these columns existed are read with ``_slurmctl_line`` = the row's position in the part and
``_slurmctl_row`` = how many earlier rows of the part have the same id (an id repeated within one such batch then
reads as one item with several rows).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Iterable, Literal

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
    """A part's rows with ``_slurmctl_line`` and ``_slurmctl_row`` (derived for parts written without them)."""
    if LINE not in table.column_names:
        table = table.append_column(LINE, pa.array(np.arange(len(table), dtype=np.int64)))
    if ROW not in table.column_names:
        import pandas as pd  # only for parts of an earlier release

        ids = table[id_field].to_pandas() if id_field in table.column_names else pd.Series(np.zeros(len(table)))
        nth = ids.groupby(ids.map(_key), sort=False).cumcount().to_numpy(dtype=np.int32)
        table = table.append_column(ROW, pa.array(nth))
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


def dedupe(table: pa.Table, id_field: str) -> tuple[pa.Table, dict[int, int]]:
    """Keep the last row of each key (item id, row index), ``table`` being in commit order; the order of the kept
    rows is unchanged. Returns the rows kept and, per batch ordinal, how many of its rows were dropped."""
    n = len(table)
    if n == 0 or id_field not in table.column_names:
        return table, {}
    keys = pa.table({"k": table[id_field], "r": table[ROW], "i": pa.array(np.arange(n, dtype=np.int64))})
    last = keys.group_by(["k", "r"], use_threads=False).aggregate([("i", "max")])["i_max"]
    if len(last) == n:
        return table, {}
    kept = np.sort(last.to_numpy())
    mask = np.ones(n, dtype=bool)
    mask[kept] = False
    dropped = pc.value_counts(table[BATCH].filter(pa.array(mask)))
    counts = {int(d["values"]): int(d["counts"]) for d in dropped.to_pylist()}
    return table.take(pa.array(kept)), counts


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
