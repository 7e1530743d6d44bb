"""The output's types, checked per item at the batch: a row of the wrong type fails its item (class ``schema``),
not the whole aggregation hours later.

The schema is the declared one (``output.schema``: Arrow types by column, or a Parquet file's schema), else the one
the job recorded from its first batch with rows (``jobs/<job>/output_schema.json``, written create-if-absent; a batch
that loses that race checks itself against the winner). A declared type is strict: a value must convert to it
(``"7"`` is no ``int64``, ``1.5`` no ``int64``). A recorded type follows the merge's promotion rules
(``slurmctl.tables.unify``: int to double is fine, text where numbers were is not). Columns the schema does not name
are free (the merge adds them).

Checked per column over the whole batch first (one conversion per column, as writing the part does anyway); only a
column that fails is checked item by item, to find which items fail.
"""

from __future__ import annotations

import base64
import threading
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from slurmctl.books.manifests import Keys
from slurmctl.config import JobConfig
from slurmctl.storage import Store
from slurmctl.tables import INTERNAL

_recorded: dict[str, pa.Schema] = {}  # its key's URI -> a job's recorded schema (immutable once written), per process
_lock = threading.Lock()


_declared: dict[str, pa.Schema] = {}  # a schema file's URI -> its schema, read once per process


def declared(cfg: JobConfig, store: Store) -> pa.Schema | None:
    spec = cfg.output.schema_
    if spec is None:
        return None
    if isinstance(spec, dict):
        return pa.schema([(name, pa.type_for_alias(str(t))) for name, t in spec.items()])
    if spec not in _declared:
        with store.open_uri(spec) as f:
            _declared[spec] = pq.ParquetFile(f).schema_arrow
    return _declared[spec]


def infer(rows: list[dict[str, Any]]) -> pa.Schema:
    """Each column's type from its first non-null value (a batch's rows may disagree: the first decides)."""
    fields: dict[str, pa.DataType] = {}
    for row in rows:
        for name, value in row.items():
            if name not in fields and value is not None and name not in INTERNAL:
                try:
                    fields[name] = pa.array([value]).type
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    continue
    return pa.schema(list(fields.items()))


def recorded(store: Store, job_id: str, propose: Callable[[], pa.Schema]) -> pa.Schema | None:
    """The job's recorded schema; when there is none yet and ``propose()`` has columns, record it (create-if-absent)
    and return the winner's."""
    key = Keys(job_id).output_schema
    where = store.uri(key)
    with _lock:
        if where in _recorded:
            return _recorded[where]
    body = store.get_json(key)
    proposal = propose() if body is None else None
    if body is None and proposal is not None and len(proposal):
        store.put_json(key, {"schema_version": 1, "kind": "output_schema", "job_id": job_id,
                             "arrow_ipc_b64": base64.b64encode(proposal.serialize().to_pybytes()).decode()},
                       if_absent=True)
        body = store.get_json(key)
    if body is None:
        return None
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["arrow_ipc_b64"])))
    with _lock:
        _recorded[where] = schema
    return schema


def _converts(values: list[Any], t: pa.DataType, strict: bool) -> str | None:
    """None when ``values`` fit a column of type ``t``; else why not."""
    try:
        return _fits(pa.array(values), t, strict)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError) as exc:
        return str(exc).splitlines()[0][:300]


def _fits(got: pa.Array | pa.ChunkedArray, t: pa.DataType, strict: bool) -> str | None:
    """None when the values of ``got`` fit a column of type ``t``; else why not (or the conversion's error)."""
    if got.type == t or pa.types.is_null(got.type):
        return None
    if strict:
        for kind in (_is_text, pa.types.is_boolean, pa.types.is_binary):
            if kind(got.type) != kind(t):  # no parsing "7" into 7, no 1 into "1", no True into 1
                return f"{got.type} is not {t}"
        got.cast(t, safe=True)  # 4.5 is no int64, 300 no int8
        return None
    pa.unify_schemas([pa.schema([("c", t)]), pa.schema([("c", got.type)])], promote_options="permissive")
    return None


def infer_table(table: pa.Table) -> pa.Schema:
    """``infer`` for rows that are a table: each column's type as its first non-null value would give it as a
    Python value, so a job records the same schema whichever path its first batch took."""
    fields = []
    for name in table.column_names:
        column = table.column(name).drop_null()
        if name in INTERNAL or name.startswith("_slurmctl") or not len(column):
            continue
        try:
            fields.append((name, pa.array([column[0].as_py()]).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            continue
    return pa.schema(fields)


def table_fits(table: pa.Table, schema: pa.Schema, strict: bool) -> bool:
    """True when every row of ``table`` fits ``schema``, decided per column from its type (as ``_converts`` decides
    for values). False means "not known to fit": the caller checks row by row (``violations``) to name the items."""
    for field in schema:
        if field.name not in table.column_names:
            continue
        column = table.column(field.name)
        if column.null_count == len(column):
            continue
        try:
            if _fits(column, field.type, strict) is not None:
                return False
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError):
            return False
    return True


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def violations(items_rows: list[list[dict[str, Any]]], schema: pa.Schema, strict: bool) -> dict[int, str]:
    """Index (in ``items_rows``) -> why that item's rows do not fit ``schema``."""
    bad: dict[int, str] = {}
    for field in schema:
        name = field.name
        # The common case first, once per column (nulls never decide a column's type): it fits.
        if _converts([row.get(name) for rows in items_rows for row in rows], field.type, strict) is None:
            continue
        values = [(i, row[name]) for i, rows in enumerate(items_rows) for row in rows if row.get(name) is not None]
        for i, value in values:  # the column does not fit: find its items
            if i in bad:
                continue
            why = _converts([value], field.type, strict)
            if why is not None:
                bad[i] = (f"column {field.name!r}: {value!r} ({type(value).__name__}) does not fit "
                          f"{'the declared' if strict else 'the recorded'} type {field.type}: {why}")
    return bad
