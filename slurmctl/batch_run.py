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


def id_key(value: Any) -> str:
    """An id as a matching key: ``7``, ``"7"`` and numpy's ``int64(7)`` are one id (CSV gives text, pandas numpy)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # a numpy scalar
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


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

    def run(self, items: Items) -> list[ItemOutcome | None]:
        outcomes: list[ItemOutcome | None] = [None] * len(items)
        self._solve(list(range(len(items))), items, outcomes)
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
        rows = to_rows(result)
        if len(idx) == 1:  # one item: its rows need not name it (as an item handler's)
            only = subset[0]
            rows = [{self.id_field: only[self.id_field], **r} if self.id_field not in r else r for r in rows]
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if self.id_field not in row:
                raise ItemError(f"the batch handler returned a row without the id column {self.id_field!r}",
                                error_class="handler")
            by_id.setdefault(id_key(row[self.id_field]), []).append(row)
        failed = {id_key(k): v for k, v in self.ctx.failed.items()}
        wanted = {id_key(item[self.id_field]) for item in subset}
        strangers = (set(by_id) | set(failed)) - wanted
        if strangers:
            raise ItemError(f"the batch handler returned rows for ids not in its batch: {sorted(strangers)[:5]}",
                            error_class="handler")
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
