"""Rate-limiter blocks: where the shared state of each limit lives. The maths is in ``slurmctl.ratelimit``.

* ``DynamoDBRateLimiter``: one item per limit in a DynamoDB table (prefect-aws ``AwsCredentials``; endpoint
  overridable for a moto server). A lease is one ``UpdateItem`` — ``tat = tat + n/rate`` under a condition — so the
  table sees one write per lease, not per request, and concurrent leases never conflict (the update is additive).
* ``LocalRateLimiter``: the same state in a SQLite file (``BEGIN IMMEDIATE`` transactions), shared by all processes
  on one machine: the embedded default.

Like prefect-aws blocks, they hold only configuration; clients and connections are created lazily per process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from botocore.exceptions import ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field

from blocks.aws import aws_credentials
from slurmctl.ratelimit import US, Lease, LimitSpec, LimitState, Wait, now_us, plan_lease, throttled_state


class RateLimiter(Block, ABC):
    """Shared limiter state: lease slots, give back unused ones, report throttling, pause, change the rate."""

    _block_schema_capabilities = ["rate-limiter"]

    @abstractmethod
    def _update(self, key: str, spec: LimitSpec | None, change: Callable[[LimitState], Any]) -> tuple[Any, LimitState]:
        """Apply ``change`` to the limit's state atomically (creating it from ``spec`` if absent)."""

    @abstractmethod
    def read(self, key: str) -> LimitState | None: ...

    def lease(self, key: str, spec: LimitSpec, n: int) -> Lease | Wait:
        def change(state: LimitState) -> Lease | Wait:
            new_tat, out = plan_lease(state, n, now_us(), spec.horizon_s)
            if isinstance(out, Lease):
                state.tat, state.granted = new_tat, state.granted + n
            return out
        return self._update(key, spec, change)[0]

    def release(self, key: str, lease: Lease, unused: int) -> bool:
        def change(state: LimitState) -> bool:
            if state.tat != lease.end_us:
                return False
            state.tat -= unused * lease.interval_us
            state.granted -= unused
            return True
        return self._update(key, None, change)[0]

    def report_throttle(self, key: str, spec: LimitSpec, retry_after_s: float | None) -> None:
        def change(state: LimitState) -> None:
            throttled_state(state, now_us(), retry_after_s)
        self._update(key, spec, change)

    def set_rate(self, key: str, spec: LimitSpec, per_second: float) -> LimitState:
        def change(state: LimitState) -> None:
            if not state.floor <= per_second <= state.ceiling:
                raise ValueError(f"--per-second {per_second} is outside this limit's floor..ceiling "
                                 f"({state.floor:g}..{state.ceiling:g})")
            state.target = state.rate = per_second
            state.changed_at = now_us()
        return self._update(key, spec, change)[1]

    def set_paused(self, key: str, spec: LimitSpec, paused: bool) -> LimitState:
        def change(state: LimitState) -> None:
            state.paused = paused
            if not paused:  # don't let the pause count as idle time that could be burst through at once
                state.tat = max(state.tat, now_us() - state.burst * round(US / state.effective_rate(now_us())))
        return self._update(key, spec, change)[1]


# --- one machine: SQLite ------------------------------------------------------------------------------------------
_connections: dict[tuple[int, str], sqlite3.Connection] = {}


class LocalRateLimiter(RateLimiter):
    """Limits shared by every process on this machine, in a SQLite file."""

    _block_type_name = "slurmctl Local Rate Limiter"
    _block_type_slug = "slurmctl-local-rate-limiter"

    path: str = Field(description="SQLite file holding the limits' state.")

    def _conn(self) -> sqlite3.Connection:
        key = (os.getpid(), threading.get_ident(), self.path)
        conn = _connections.get(key)  # type: ignore[arg-type]
        if conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS limits (key TEXT PRIMARY KEY, state TEXT NOT NULL)")
            _connections[key] = conn  # type: ignore[index]
        return conn

    def read(self, key: str) -> LimitState | None:
        row = self._conn().execute("SELECT state FROM limits WHERE key = ?", (key,)).fetchone()
        return LimitState(**json.loads(row[0])) if row else None

    def _update(self, key: str, spec: LimitSpec | None, change: Callable[[LimitState], Any]) -> tuple[Any, LimitState]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT state FROM limits WHERE key = ?", (key,)).fetchone()
            if row:
                state = LimitState(**json.loads(row[0]))
            elif spec is not None:
                state = LimitState.new(key, spec, now_us())
            else:
                conn.execute("ROLLBACK")
                raise KeyError(f"no rate limit state for {key!r}")
            out = change(state)
            conn.execute("INSERT OR REPLACE INTO limits (key, state) VALUES (?, ?)", (key, json.dumps(state.to_dict())))
            conn.execute("COMMIT")
            return out, state
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# --- many machines: DynamoDB --------------------------------------------------------------------------------------
_NUMERIC = {f.name for f in fields(LimitState)} - {"key", "paused"}


def _to_item(state: LimitState) -> dict[str, Any]:
    item: dict[str, Any] = {"key": {"S": state.key}, "paused": {"BOOL": state.paused}}
    for name in _NUMERIC:
        item[name] = {"N": repr(getattr(state, name))}
    return item


def _from_item(item: dict[str, Any]) -> LimitState:
    values: dict[str, Any] = {"key": item["key"]["S"], "paused": item.get("paused", {}).get("BOOL", False)}
    for f in fields(LimitState):
        if f.name in _NUMERIC and f.name in item:
            raw = item[f.name]["N"]
            values[f.name] = int(raw) if f.type in ("int", int) and "." not in raw and "e" not in raw else float(raw)
    return LimitState(**values)


_dynamo_cache: dict[tuple[str, str], LimitState] = {}


class DynamoDBRateLimiter(RateLimiter):
    """Limits shared by every worker on every node, in one DynamoDB table (one item per limit)."""

    _block_type_name = "slurmctl DynamoDB Rate Limiter"
    _block_type_slug = "slurmctl-dynamodb-rate-limiter"

    table_name: str = Field(default="slurmctl-rate-limits", min_length=3)
    aws_credentials: AwsCredentials = Field(default_factory=aws_credentials)

    def _client(self) -> Any:
        return self.aws_credentials.get_client("dynamodb")

    def ensure_table(self) -> None:
        """Create the table (on-demand capacity) if it does not exist."""
        client = self._client()
        try:
            client.describe_table(TableName=self.table_name)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
        try:
            client.create_table(TableName=self.table_name, BillingMode="PAY_PER_REQUEST",
                                AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
                                KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}])
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceInUseException":
                raise
        client.get_waiter("table_exists").wait(TableName=self.table_name, WaiterConfig={"Delay": 1})

    def read(self, key: str) -> LimitState | None:
        item = self._client().get_item(TableName=self.table_name, Key={"key": {"S": key}},
                                       ConsistentRead=True).get("Item")
        return _from_item(item) if item else None

    def _create(self, key: str, spec: LimitSpec) -> LimitState:
        state = LimitState.new(key, spec, now_us())
        try:
            self._client().put_item(TableName=self.table_name, Item=_to_item(state),
                                    ConditionExpression="attribute_not_exists(#k)", ExpressionAttributeNames={"#k": "key"})
            return state
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return self.read(key)  # type: ignore[return-value]

    def _current(self, key: str, spec: LimitSpec | None) -> LimitState:
        state = self.read(key)
        if state is None:
            if spec is None:
                raise KeyError(f"no rate limit state for {key!r}")
            state = self._create(key, spec)
        return state

    def _update(self, key: str, spec: LimitSpec | None, change: Callable[[LimitState], Any]) -> tuple[Any, LimitState]:
        """Optimistic read-modify-write: the write is conditional on ``tat`` and ``changed_at`` being unchanged."""
        for _ in range(50):
            state = self._current(key, spec)
            old_tat, old_changed, old_paused = state.tat, state.changed_at, state.paused
            out = change(state)
            try:
                self._client().put_item(
                    TableName=self.table_name, Item=_to_item(state),
                    ConditionExpression="tat = :t AND changed_at = :c AND paused = :p",
                    ExpressionAttributeValues={":t": {"N": repr(old_tat)}, ":c": {"N": repr(old_changed)},
                                               ":p": {"BOOL": old_paused}})
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                    continue
                raise
            _dynamo_cache[(self.table_name, key)] = state
            return out, state
        raise RuntimeError(f"rate limit {key!r}: too much contention updating its state")

    def lease(self, key: str, spec: LimitSpec, n: int) -> Lease | Wait:
        """One conditional ``UpdateItem`` per lease in the steady state (``tat = tat + n*interval``)."""
        client = self._client()
        cache_key = (self.table_name, key)
        state = _dynamo_cache.get(cache_key) or self._current(key, spec)
        for _ in range(20):
            at = now_us()
            new_tat, out = plan_lease(state, n, at, spec.horizon_s)
            if isinstance(out, Wait):
                if out.paused:  # only a read tells when the pause ends
                    state = _dynamo_cache[cache_key] = self._current(key, spec)
                    new_tat, out = plan_lease(state, n, at, spec.horizon_s)
                if isinstance(out, Wait):
                    return out  # booked ahead: wait without a call (a stale view is corrected by the next write)
            inc = n * out.interval_us
            earliest = at - state.burst * out.interval_us
            busy = state.tat >= earliest
            values = {":n": {"N": str(n)}, ":f": {"BOOL": False}, ":earliest": {"N": str(earliest)}}
            if busy:  # the common case under load: additive, so concurrent leases never conflict
                update = "SET tat = tat + :inc, granted = granted + :n"
                condition = "paused = :f AND tat >= :earliest AND tat <= :latest"
                values |= {":inc": {"N": str(inc)}, ":latest": {"N": str(at + int(spec.horizon_s * US))}}
            else:  # an idle limit: the schedule restarts at `earliest`
                update = "SET tat = :start, granted = granted + :n"
                condition = "paused = :f AND tat < :earliest"
                values[":start"] = {"N": str(earliest + inc)}
            try:
                resp = client.update_item(TableName=self.table_name, Key={"key": {"S": key}}, UpdateExpression=update,
                                          ConditionExpression=condition, ExpressionAttributeValues=values,
                                          ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                item = exc.response.get("Item")
                state = _from_item(item) if item else self._current(key, spec)
                _dynamo_cache[cache_key] = state
                continue
            state = _dynamo_cache[cache_key] = _from_item(resp["Attributes"])
            return Lease(state.tat - inc, out.interval_us, n)
        return Wait(0.05)

    def release(self, key: str, lease: Lease, unused: int) -> bool:
        try:
            self._client().update_item(
                TableName=self.table_name, Key={"key": {"S": key}},
                UpdateExpression="SET tat = tat - :dec, granted = granted - :n", ConditionExpression="tat = :end",
                ExpressionAttributeValues={":dec": {"N": str(unused * lease.interval_us)}, ":n": {"N": str(unused)},
                                           ":end": {"N": str(lease.end_us)}})
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise



def limiter_from_config(kind: str, *, path: str | None = None, table: str = "slurmctl-rate-limits",
                        endpoint_url: str | None = None, region: str | None = None) -> RateLimiter:
    """The rate-limiter block a job config's ``rate_limiter:`` section names."""
    if kind == "dynamodb":
        return DynamoDBRateLimiter(table_name=table, aws_credentials=aws_credentials(endpoint_url, region))
    if not path:
        raise ValueError("a local rate limiter needs a path")
    return LocalRateLimiter(path=path)
