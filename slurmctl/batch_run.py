"""Running a batch through a batch handler: one call for the whole batch, per-item outcomes all the same.

``handle_batch(batch, ctx)`` gets the batch's good items as ``batch_format`` (a list of dicts, a pandas DataFrame or
a pyarrow Table, each with the id column) and returns rows in any of those forms, each carrying its item's id. The
batch still ends with one outcome per item, so it commits, retries and counts exactly as an item handler's does:

* an item's rows are those carrying its id (an id repeated in one batch: the rows go to its first line, the
  others fail with class ``missing``, since rows matched by id cannot tell them apart);
* an item fails with its class when the handler says so: ``ctx.fail(id, exc_or_message, error_class=None)``, or a
  row whose ``errors`` column is set (its message; its class from an ``error_class`` column, else ``handler``);
* an item with neither rows nor an error fails with class ``missing``: nothing is dropped silently;
* a call that raises is retried as a whole per the error policy (transient classes, ``max_attempts``, backoff);
  when it still fails, the batch is split in halves and each half called on its own, down to single items, so a
  poison item fails alone with its class and the others keep their rows. Rows naming ids that are not in the call
  make the call fail the same way.

Rows stay Arrow when they can (``BatchRun.table``): a DataFrame or Table answer whose id column holds the batch's
ids as the input wrote them (integers for integer ids, text for text) is matched to its items by a vectorised pass
over that column and becomes the part as it is, in input order, with no row ever a Python dict. Anything else (a
list of dicts, ids written otherwise, a batch halved to isolate a poison item) takes the row-by-row path, which
defines the semantics; the fast path gives the same rows and outcomes.

Plain Python: no Prefect, no Dask (``tasks/process_batch.py`` calls it in place of ``slurmctl.item_run``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from typing import Any, Callable

from slurmctl import inflight
from slurmctl.batch_metrics import BatchMeter
from slurmctl.config import JobConfig
from slurmctl.errors import Backoff, ErrorPolicy, ItemError, ItemOutcome
from slurmctl.handler import BatchContext, Handler, batch_callable, normalise_output

Items = list[tuple[int, dict[str, Any]]]
ERRORS, ERROR_CLASS = "errors", "error_class"
ITEM_INDEX = "_slurmctl_item"  # the fast path's item index per row (dropped before the part is written)


def id_key(value: Any) -> str:
    """An id as a matching key: ``7``, ``"7"`` and numpy's ``int64(7)`` are one id (CSV gives text, pandas numpy)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # a numpy scalar
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def no_id_column(id_field: str) -> ItemError:
    return ItemError(f"the batch handler returned a row without the id column {id_field!r}", error_class="handler")


def not_in_batch(strangers: set[str]) -> ItemError:
    return ItemError(f"the batch handler returned rows for ids not in its batch: {sorted(strangers)[:5]}",
                     error_class="handler")


def to_format(items: list[dict[str, Any]], fmt: str) -> Any:
    if fmt == "pandas":
        import pandas as pd

        return pd.DataFrame.from_records(items)
    if fmt == "arrow":
        import pyarrow as pa

        return pa.Table.from_pylist(items)
    return [dict(item) for item in items]


def to_rows(result: Any) -> list[dict[str, Any]]:
    """A batch handler's answer as row dicts: a list of dicts, a DataFrame, a pyarrow Table or RecordBatch, or None."""
    if result is None:
        return []
    if isinstance(result, list):
        if not all(isinstance(r, dict) for r in result):
            raise TypeError("a batch handler's list must hold dicts (one per output row)")
        return result
    if hasattr(result, "to_pylist"):  # pyarrow Table / RecordBatch
        return result.to_pylist()
    if hasattr(result, "to_dict"):  # pandas DataFrame
        import pandas as pd

        frame = result.astype(object).where(pd.notna(result), None)
        return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                for row in frame.to_dict("records")]
    raise TypeError(f"a batch handler must return a list of dicts, a DataFrame or a pyarrow Table, got "
                    f"{type(result).__name__}")


def as_table(result: Any) -> Any:
    """A DataFrame, Table or RecordBatch answer as a pyarrow Table (None for anything else: the row-by-row path)."""
    import pyarrow as pa

    if isinstance(result, pa.RecordBatch):
        result = pa.Table.from_batches([result])
    elif hasattr(result, "to_dict") and hasattr(result, "columns"):  # pandas
        try:
            result = pa.Table.from_pandas(result, preserve_index=False).replace_schema_metadata(None)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None  # mixed object columns: as row dicts, as before
    if not isinstance(result, pa.Table):
        return None
    for i, f in enumerate(result.schema):  # a categorical's values, not its codes: parts of any batch then unify
        if pa.types.is_dictionary(f.type):
            result = result.set_column(i, f.name, result.column(i).cast(f.type.value_type))
    return result


class BatchRun:
    """One batch through a batch handler, with the error policy's retries and halving to isolate poison items."""

    def __init__(self, cfg: JobConfig, handler: Handler, ctx: BatchContext, meter: BatchMeter,
                 on_retry: Callable[..., None], sleep: Callable[[float], None]) -> None:
        self.cfg, self.ctx, self.meter, self.on_retry, self.sleep = cfg, ctx, meter, on_retry, sleep
        self.call = batch_callable(handler)
        e = cfg.errors
        self.policy, self.backoff, self.max_attempts = ErrorPolicy.of(e), Backoff.of(e), e.max_attempts
        self.id_field, self.fmt = cfg.input.id_field, cfg.batch_format
        self.calls = 0
        self.pieces: list[Any] = []  # the fast path's tables, one per call that answered (see ``table``)

    def run(self, items: Items) -> list[ItemOutcome | None]:
        outcomes: list[ItemOutcome | None] = [None] * len(items)
        self._solve(list(range(len(items))), items, outcomes)
        if len(self.pieces) > 1 or (self.pieces and any(o is not None and o.ok and o.result for o in outcomes)):
            self.as_rows(outcomes)  # halved: the halves' types may differ; rows as dicts, as the merge unifies them
        return outcomes

    def table(self) -> Any:
        """The batch's rows as one pyarrow Table in input order, with the ``slurmctl.tables`` line and row-index
        columns, when they stayed Arrow (the succeeded items' outcomes then hold no rows); else None."""
        return self.pieces[0] if self.pieces else None

    def as_rows(self, outcomes: list[ItemOutcome | None]) -> list[ItemOutcome | None]:
        """Give up the fast path: the table's rows go back into their items' outcomes as dicts (a schema check
        that must name the items that do not fit works on those)."""
        from slurmctl.tables import LINE, ROW

        rows_of: dict[int, list[dict[str, Any]]] = {}
        for piece in self.pieces:
            positions = piece.column(ITEM_INDEX).to_pylist()
            for i, row in zip(positions, piece.drop_columns([LINE, ROW, ITEM_INDEX]).to_pylist()):
                rows_of.setdefault(i, []).append(row)
        self.pieces = []
        for i, rows in rows_of.items():
            outcome = outcomes[i]
            if outcome is not None and outcome.ok and outcome.result is None:
                outcomes[i] = replace(outcome, result=rows)
        return outcomes

    def _solve(self, idx: list[int], items: Items, outcomes: list[ItemOutcome | None]) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                self._call(idx, items, outcomes, attempt)
                return
            except Exception as exc:
                err = self.policy.classify(exc)
                if err.transient and attempt < self.max_attempts:
                    wait = self.backoff.delay(attempt, err.retry_after)
                    self.on_retry(err, attempt, wait)
                    self.sleep(wait)
                    continue
                if len(idx) > 1:  # isolate the item(s) that make it fail
                    half = len(idx) // 2
                    self._solve(idx[:half], items, outcomes)
                    self._solve(idx[half:], items, outcomes)
                    return
                outcomes[idx[0]] = ItemOutcome(False, error=err, attempts=attempt)
                return

    def _call(self, idx: list[int], items: Items, outcomes: list[ItemOutcome | None], attempt: int) -> None:
        subset = [items[i][1] for i in idx]
        self.ctx.failed = {}
        with self.meter.call(self.ctx):
            result = self.call(to_format(subset, self.fmt), self.ctx)
            if inspect.isawaitable(result):
                result = inflight.worker_loop().run(result)
        self.calls += 1
        table = as_table(result) if len(idx) > 1 else None
        if table is not None and self._call_arrow(table, idx, items, outcomes, attempt):
            return
        rows = to_rows(table if table is not None else result)
        if len(idx) == 1:  # one item: its rows need not name it (as an item handler's)
            only = subset[0]
            rows = [{self.id_field: only[self.id_field], **r} if self.id_field not in r else r for r in rows]
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if self.id_field not in row:
                raise no_id_column(self.id_field)
            by_id.setdefault(id_key(row[self.id_field]), []).append(row)
        failed = {id_key(k): v for k, v in self.ctx.failed.items()}
        wanted = {id_key(item[self.id_field]) for item in subset}
        strangers = (set(by_id) | set(failed)) - wanted
        if strangers:
            raise not_in_batch(strangers)
        seen: set[str] = set()
        for i, item in zip(idx, subset):
            key = id_key(item[self.id_field])
            if key in seen:
                outcomes[i] = self._failure("missing", f"id {item[self.id_field]!r} repeats in the batch: a batch "
                                                       f"handler's rows are matched by id; its rows went to the "
                                                       f"first", attempt)
                continue
            seen.add(key)
            mine = by_id.get(key, [])
            errored = [r for r in mine if r.get(ERRORS) not in (None, "")]
            if key in failed:
                error, cls = failed[key]
                outcomes[i] = self._failed(error, cls, attempt)
            elif errored:
                outcomes[i] = self._failure(errored[0].get(ERROR_CLASS) or "handler", str(errored[0][ERRORS]),
                                            attempt)
            elif mine:
                clean = [{k: v for k, v in r.items() if k not in (ERRORS, ERROR_CLASS)} for r in mine]
                outcomes[i] = ItemOutcome(True, result=normalise_output(clean, item, self.id_field), attempts=attempt)
            else:
                outcomes[i] = self._failure("missing", "the batch handler returned no row and no error for this item",
                                            attempt)

    def _call_arrow(self, table: Any, idx: list[int], items: Items, outcomes: list[ItemOutcome | None],
                    attempt: int) -> bool:
        """The call's answer matched to its items without leaving Arrow; False (nothing done) when its id column does
        not hold the ids as the input wrote them, and the row-by-row path decides."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from slurmctl.tables import LINE, ROW

        field = self.id_field
        if field not in table.column_names:
            raise no_id_column(field)
        ids = [items[i][1][field] for i in idx]
        column = table.column(field)
        if all(type(v) is int for v in ids) and pa.types.is_integer(column.type):
            column = column.cast(pa.int64())
        elif all(type(v) is str for v in ids) and (pa.types.is_string(column.type)
                                                   or pa.types.is_large_string(column.type)):
            column = column.cast(pa.string())
        else:
            return False
        if column.null_count:
            raise no_id_column(field)
        first: dict[Any, int] = {}  # an id -> the first of the call's items holding it
        for k, v in enumerate(ids):
            first.setdefault(v, k)
        # each row's item, as its index in the call (the first holding the row's id), -1 for an id not in the call
        owner = np.asarray(pc.fill_null(pc.index_in(column, value_set=pa.array(ids, column.type)), -1))
        failed = {id_key(k): v for k, v in self.ctx.failed.items()}
        strangers = {id_key(v) for v in column.filter(pa.array(owner < 0)).to_pylist()} | (
            set(failed) - {id_key(v) for v in ids} if failed else set())
        if strangers:
            raise not_in_batch(strangers)
        bad: dict[int, Any] = {}  # an item -> its first errored row's (message, class)
        names = table.column_names
        if ERRORS in names:
            errors = table.column(ERRORS)
            try:
                flagged = pc.fill_null(pc.not_equal(pc.cast(errors, pa.string()), ""), False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                return False  # an errors column of nested values: the row-by-row path reads it
            if pc.any(flagged).as_py():
                classes = table.column(ERROR_CLASS).to_pylist() if ERROR_CLASS in names else None
                messages = errors.to_pylist()
                for r in pc.indices_nonzero(flagged).to_pylist():
                    bad.setdefault(int(owner[r]), (messages[r], classes[r] if classes else None))
        has_rows = np.zeros(len(ids), bool)
        has_rows[owner] = True
        keep_item = np.zeros(len(ids), bool)
        for k, v in enumerate(ids):
            i = idx[k]
            if first[v] != k:
                outcomes[i] = self._failure("missing", f"id {v!r} repeats in the batch: a batch handler's rows are "
                                                       f"matched by id; its rows went to the first", attempt)
            elif failed and id_key(v) in failed:
                error, cls = failed[id_key(v)]
                outcomes[i] = self._failed(error, cls, attempt)
            elif k in bad:
                message, cls = bad[k]
                outcomes[i] = self._failure(cls or "handler", str(message), attempt)
            elif has_rows[k]:
                outcomes[i] = ItemOutcome(True, result=None, attempts=attempt)  # its rows: in ``table()``
                keep_item[k] = True
            else:
                outcomes[i] = self._failure("missing", "the batch handler returned no row and no error for this "
                                                       "item", attempt)
        kept = np.flatnonzero(keep_item[owner])
        order = kept[np.argsort(owner[kept], kind="stable")]  # input order; an item's rows keep the handler's order
        owners = owner[order]
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]) if len(owners) else np.zeros(0, np.int64)
        row_index = np.arange(len(owners)) - np.repeat(starts, np.diff(np.r_[starts, len(owners)]))
        body = table.drop_columns([c for c in (ERRORS, ERROR_CLASS) if c in names])
        body = body.set_column(body.column_names.index(field), field, column).take(pa.array(order, pa.int64()))
        lines = np.array([line for line, _ in items], np.int64)
        positions = np.asarray(idx, np.int64)[owners]
        body = body.append_column(LINE, pa.array(lines[positions], pa.int64()))
        body = body.append_column(ROW, pa.array(row_index, pa.int32()))
        body = body.append_column(ITEM_INDEX, pa.array(positions, pa.int64()))
        self.pieces.append(body)
        return True

    def reached(self) -> dict[str, int]:
        """For the batch's metrics: the handler calls the batch took (1, more when retried or halved)."""
        return {"batch_calls": self.calls}

    def _failed(self, error: BaseException | str, cls: str | None, attempt: int) -> ItemOutcome:
        if isinstance(error, BaseException):
            err = self.policy.classify(error)
            return ItemOutcome(False, error=replace(err, error_class=cls) if cls else err, attempts=attempt)
        return self._failure(cls or "handler", str(error), attempt)

    def _failure(self, cls: str, message: str, attempt: int) -> ItemOutcome:
        err = self.policy.classify(ItemError(message, error_class=cls))
        return ItemOutcome(False, error=err, attempts=attempt)


def is_batch_mode(cfg: JobConfig) -> bool:
    """Is the job's handler called per batch? ``handler_mode`` when set, else what the handler is
    (``slurmctl.handler.is_batch_spec``)."""
    from slurmctl.handler import is_batch_spec

    return cfg.handler_mode == "batch" if cfg.handler_mode else is_batch_spec(cfg.handler)
