"""Rate-limiter blocks: where the shared state of each limit lives. The maths is in ``slurmctl.ratelimit``.

* ``DynamoDBRateLimiter``: one item per limit in a DynamoDB table (prefect-aws ``AwsCredentials``; endpoint
  overridable for a moto server). A lease is one ``UpdateItem`` on one lane — ``t<j> = t<j> + n*L/rate`` under a
  condition — so the table sees one write per lease (a few percent of the requests), and concurrent leases of a busy
  lane never conflict (the update is additive: they queue). Pause, rate changes and throttling are also published to
  a small *signal* object in a manifest store (``signals``), which workers poll about once a second instead of
  DynamoDB. A signal that cannot be written is retried, then raises ``SignalNotPublished`` (the DynamoDB change
  stands; the message says so and what to do); publishing again is idempotent.
* ``LocalRateLimiter``: the same state in a SQLite file (``BEGIN IMMEDIATE`` transactions), shared by all processes
  on one machine: the embedded default. Its signal is the row itself (a local read is free).

Like prefect-aws blocks, they hold only configuration; clients and connections are created lazily per process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Union

from botocore.exceptions import BotoCoreError, ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field

from slurmctl.blocks.aws import aws_credentials
from slurmctl.blocks.manifest_store import LocalManifestStore, S3ManifestStore
from slurmctl.ratelimit.lanes import (
    Grant,
    Lease,
    LimitSpec,
    LimitState,
    Signal,
    SignalNotPublished,
    Wait,
    booked_as,
    free_lanes,
    now_us,
    plan_lanes,
    share_of,
    throttled_state,
)
from slurmctl.ratelimit.leaser import Leaser

log = logging.getLogger("slurmctl.ratelimit")


class RateLimiter(Block, ABC):
    """Shared limiter state: lease slots, give back unused ones, report throttling, pause, change the rate."""

    _block_schema_capabilities = ["rate-limiter"]

    @abstractmethod
    def _update(self, key: str, spec: LimitSpec | None, change: Callable[[LimitState], Any], *,
                publish: bool = False) -> tuple[Any, LimitState]:
        """Apply ``change`` to the limit's state atomically (creating it from ``spec`` if absent). A new epoch is
        signalled to workers; ``publish`` signals the resulting state even when nothing changed (an operator's
        command run again repairs a signal that could not be written the first time)."""

    @abstractmethod
    def read(self, key: str) -> LimitState | None: ...

    def ensure_limit(self, key: str, spec: LimitSpec) -> LimitState:
        """Create the limit's state if absent (a job does this before its workers start, so they don't race to)."""
        return self._update(key, spec, lambda state: False)[1]

    def signal(self, key: str) -> Signal | None:
        """What workers poll between leases (the epoch and the pause flag): here, the state itself."""
        state = self.read(key)
        return Signal(state.epoch, state.paused) if state else None

    def lease_lanes(self, key: str, spec: LimitSpec, n: int, *, renew: Mapping[int, int] | None = None,
                    hold: Iterable[int] = (), want: int = 1, must: int = 1, owner: str = "",
                    share: bool = False, need: int | None = None) -> Grant | Wait:
        """``n`` slots of each of the lanes ``plan_lanes`` picks, in one transaction; or how long to wait."""
        def change(state: LimitState) -> Grant | Wait:
            at = now_us()
            out = plan_lanes(state, n, at, spec.horizon_s, renew=renew, hold=hold, want=want, must=must,
                             owner=owner, share=share, need=need)
            if isinstance(out, Wait):
                return out
            for lease in out:
                state.tats[lease.lane] = lease.end_us
                state.own(lease.lane, booked_as(owner, lease))
            state.granted += n * len(out)
            return Grant(tuple(out), 1, len(free_lanes(state, at)), *share_of(state, at, owner))
        return self._update(key, spec, change)[0]

    def lease(self, key: str, spec: LimitSpec, n: int, *, hold: Iterable[int] = ()) -> Lease | Wait:
        """One lane's lease (the first free, else the first to come free, not one in ``hold``)."""
        got = self.lease_lanes(key, spec, n, hold=hold, want=len(set(hold)) + 1, must=len(set(hold)) + 1)
        return got if isinstance(got, Wait) else got.leases[0]

    def release_lanes(self, key: str, tails: list[tuple[Lease, int]]) -> int:
        def change(state: LimitState) -> int:
            given = 0
            for lease, unused in tails:
                if state.epoch == lease.epoch and state.tats[lease.lane] == lease.end_us:
                    state.tats[lease.lane] -= unused * lease.interval_us
                    state.granted -= unused
                    given += unused
            return given
        return self._update(key, None, change)[0]

    def release(self, key: str, lease: Lease, unused: int) -> bool:
        return self.release_lanes(key, [(lease, unused)]) == unused

    def report_throttle(self, key: str, spec: LimitSpec, retry_after_s: float | None) -> LimitState:
        return self._update(key, spec, lambda state: throttled_state(
            state, now_us(), retry_after_s, spec.grace_us, strikes=spec.strikes_needed,
            window_us=spec.strike_window_us))[1]

    def set_rate(self, key: str, spec: LimitSpec, per_second: float) -> LimitState:
        def change(state: LimitState) -> None:
            if not state.floor <= per_second <= state.ceiling:
                raise ValueError(f"--per-second {per_second} is outside this limit's floor..ceiling "
                                 f"({state.floor:g}..{state.ceiling:g})")
            at = now_us()
            state.target = state.rate = per_second
            state.changed_at = at
            state.restart(at + spec.grace_us, at)
        return self._update(key, spec, change, publish=True)[1]

    def set_paused(self, key: str, spec: LimitSpec, paused: bool) -> LimitState:
        def change(state: LimitState) -> bool | None:
            if state.paused == paused:
                return False  # already so: no new epoch (running workers keep their leases); signalled again
            # Either way a new epoch: a pause voids every lease; a resume starts the lanes afresh after the grace
            # (the pause does not count as idle time that could be burst through at once).
            at = now_us()
            state.paused = paused
            state.restart(at + spec.grace_us, at)
            return None
        return self._update(key, spec, change, publish=True)[1]


# --- one machine: SQLite ------------------------------------------------------------------------------------------
def _state_from_json(text: str) -> LimitState | None:
    """A stored state, or None for one written before lanes existed (it is recreated from the config)."""
    body = json.loads(text)
    return LimitState(**body) if "tats" in body else None


_connections: dict[tuple[int, str], sqlite3.Connection] = {}
SQLITE_TIMEOUT_S = 60.0


def _set_up(conn: sqlite3.Connection) -> None:
    """WAL mode and the table, on a file other processes may be opening at the same moment (a job's workers start
    together). SQLite answers "database is locked" at once, without its busy timeout, when waiting could deadlock:
    two connections of a new file both turning it to WAL (seen: 3 of 40 starts of 6 processes). Those are tried
    again, with jitter, within the same timeout."""
    deadline = time.monotonic() + SQLITE_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS limits (key TEXT PRIMARY KEY, state TEXT NOT NULL)")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.01, 0.1))


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
            conn = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT_S, isolation_level=None)
            _set_up(conn)
            _connections[key] = conn  # type: ignore[index]
        return conn

    def read(self, key: str) -> LimitState | None:
        row = self._conn().execute("SELECT state FROM limits WHERE key = ?", (key,)).fetchone()
        return _state_from_json(row[0]) if row else None

    def _update(self, key: str, spec: LimitSpec | None, change: Callable[[LimitState], Any], *,
                publish: bool = False) -> tuple[Any, LimitState]:
        # The row is the signal: written in the same transaction, nothing to publish.
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT state FROM limits WHERE key = ?", (key,)).fetchone()
            state = _state_from_json(row[0]) if row else None
            if state is None:
                if spec is None:
                    conn.execute("ROLLBACK")
                    raise KeyError(f"no rate limit state for {key!r}")
                state = LimitState.new(key, spec, now_us())
            out = change(state)
            conn.execute("INSERT OR REPLACE INTO limits (key, state) VALUES (?, ?)", (key, json.dumps(state.to_dict())))
            conn.execute("COMMIT")
            return out, state
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# --- many machines: DynamoDB --------------------------------------------------------------------------------------
_NUMERIC = {f.name for f in fields(LimitState)} - {"key", "paused", "tats", "owners"}
_INTS = {f.name for f in fields(LimitState) if f.type in ("int", int)}


def _to_item(state: LimitState) -> dict[str, Any]:
    item: dict[str, Any] = {"key": {"S": state.key}, "paused": {"BOOL": state.paused},
                            "lanes": {"N": str(state.lanes)}}
    for name in _NUMERIC:
        item[name] = {"N": repr(getattr(state, name))}
    for j, tat in enumerate(state.tats):  # one attribute per lane: a lease updates only its own
        item[f"t{j}"] = {"N": str(tat)}
        if state.owner(j):
            item[f"o{j}"] = {"S": state.owner(j)}
    return item


def _from_item(item: dict[str, Any]) -> LimitState:
    values: dict[str, Any] = {"key": item["key"]["S"], "paused": item.get("paused", {}).get("BOOL", False),
                              "tats": [int(item[f"t{j}"]["N"]) for j in range(int(item["lanes"]["N"]))]}
    values["owners"] = [item.get(f"o{j}", {}).get("S", "") for j in range(len(values["tats"]))]
    for name in _NUMERIC:
        if name in item:
            raw = item[name]["N"]
            values[name] = int(raw) if name in _INTS else float(raw)
    return LimitState(**values)


# This process's last view of each limit's item, and when it was read (time.monotonic()).
_dynamo_views: dict[tuple[str, str], tuple[LimitState, float]] = {}
FRESH_VIEW_S = 0.5  # a view this recent is worth planning extra lanes from; an older one is only good for renewals


def _remember(cache_key: tuple[str, str], state: LimitState) -> LimitState:
    _dynamo_views[cache_key] = (state, time.monotonic())
    return state


def _lane_swaps(changes: list[tuple[int, int, int]], values: dict[str, Any], owners: list[str] | None = None
                ) -> tuple[list[str], list[str]]:
    """SET and condition clauses moving each lane's tat from ``old`` to ``new`` ((lane, old, new) triples), only if
    it is still ``old``: one ``UpdateItem`` changes several lanes, and lanes other workers change never conflict.
    ``owners``: also note who booked each of them (``booked_as``)."""
    sets, conds = [], []
    tags: dict[str, str] = {}
    for i, (lane, old, new) in enumerate(changes):
        sets.append(f"t{lane} = :new{i}")
        conds.append(f"t{lane} = :old{i}")
        values[f":new{i}"], values[f":old{i}"] = {"N": str(new)}, {"N": str(old)}
        if owners:
            tag = tags.setdefault(owners[i], f":owner{len(tags)}")
            sets.append(f"o{lane} = {tag}")
            values[tag] = {"S": owners[i]}
    return sets, conds

# botocore's retry budget for signals, far shorter than the job store's (10 retries with backoff of up to 20 s: about
# 1.5 min per call in an outage). A poll runs inside a worker's token acquisition: stuck in botocore that long, the
# worker would stop instead of spending the leases it holds and polling again 0.2 s later (the Leaser's own retry).
# A publish is retried by ``_publish`` on top of these, and `slurmctl pause` says within seconds that it failed.
SIGNAL_READ_CONFIG = {"retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": 2,
                      "read_timeout": 5}
SIGNAL_WRITE_CONFIG = {"retries": {"mode": "standard", "total_max_attempts": 3}, "connect_timeout": 2,
                       "read_timeout": 5}


def _signal_store(store: S3ManifestStore | LocalManifestStore, config: dict[str, Any]
                  ) -> S3ManifestStore | LocalManifestStore:
    """``store`` with botocore ``config`` for its S3 client (a local store has no client)."""
    if not isinstance(store, S3ManifestStore):
        return store
    creds = store.aws_credentials
    params = creds.aws_client_parameters.model_copy(update={"config": config})
    return store.model_copy(update={"aws_credentials": creds.model_copy(update={"aws_client_parameters": params})})


class DynamoDBRateLimiter(RateLimiter):
    """Limits shared by every worker on every node, in one DynamoDB table (one item per limit).

    ``signals``: a manifest store (usually the job's own) where every new epoch — pause, resume, rate change,
    throttling — is published as ``rate-limits/<key>.signal.json``. Workers poll it about once a second; without
    it they poll the DynamoDB item instead, which costs one read per worker per second.
    """

    _block_type_name = "slurmctl DynamoDB Rate Limiter"
    _block_type_slug = "slurmctl-dynamodb-rate-limiter"

    table_name: str = Field(default="slurmctl-rate-limits", min_length=3)
    aws_credentials: AwsCredentials = Field(default_factory=aws_credentials)
    signals: Optional[Union[S3ManifestStore, LocalManifestStore]] = Field(
        default=None, description="Where pause/rate/throttle signals are published for workers to poll.")

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

    @staticmethod
    def _signal_key(key: str) -> str:
        return f"rate-limits/{key}.signal.json"

    PUBLISH_ATTEMPTS: ClassVar[int] = 4  # writes of a signal, each with botocore's own retries (SIGNAL_WRITE_CONFIG)
    PUBLISH_BACKOFF_S: ClassVar[float] = 0.5  # before the second attempt; doubling

    def signal(self, key: str) -> Signal | None:
        if self.signals is None:
            return super().signal(key)
        body = _signal_store(self.signals, SIGNAL_READ_CONFIG).get_json(self._signal_key(key))
        return Signal(int(body["epoch"]), bool(body["paused"])) if body else None

    def _publish(self, state: LimitState, spec: LimitSpec | None) -> None:
        """Signal ``state`` to the workers; raise ``SignalNotPublished`` if the signal cannot be written.

        After the write the item is read again: another process publishing an older epoch may have written after
        us (the object is last-writer-wins), and then the newer state is written again. Whoever changes the state
        publishes it too, so a few rounds settle it.
        """
        if self.signals is None:
            return
        store = _signal_store(self.signals, SIGNAL_WRITE_CONFIG)
        for _ in range(3):
            self._write_signal(store, state, spec)
            try:
                current = self.read(state.key)
            except (ClientError, BotoCoreError) as exc:  # the signal is written; only the double check failed
                log.warning("rate limit %r: signal published, but reading the limit back failed: %s: %s",
                            state.key, type(exc).__name__, exc)
                return
            if current is None or (current.epoch, current.paused) == (state.epoch, state.paused):
                return
            state = current

    def _write_signal(self, store: S3ManifestStore | LocalManifestStore, state: LimitState,
                      spec: LimitSpec | None) -> None:
        key = self._signal_key(state.key)
        body = {"schema_version": 1, "epoch": state.epoch, "paused": state.paused, "target": state.target,
                "rate": state.rate, "anchor_us": state.anchor}
        for attempt in range(1, self.PUBLISH_ATTEMPTS + 1):
            try:
                store.put_json(key, body)
                return
            except (ClientError, BotoCoreError, OSError) as exc:
                log.warning("rate limit %r: writing its signal %s failed (attempt %d of %d): %s: %s", state.key,
                            store.uri(key), attempt, self.PUBLISH_ATTEMPTS, type(exc).__name__, exc)
                if attempt == self.PUBLISH_ATTEMPTS:
                    raise SignalNotPublished(self._not_published(state, spec, store.uri(key), exc)) from exc
                time.sleep(self.PUBLISH_BACKOFF_S * 2 ** (attempt - 1))

    def _not_published(self, state: LimitState, spec: LimitSpec | None, uri: str, exc: BaseException) -> str:
        rate = state.effective_rate(now_us())
        now_says = "paused" if state.paused else f"{rate:g} requests/s (target {state.target:g}/s)"
        # Until they hear of it, workers spend the leases they hold (a pause: then their renewal is refused); a
        # worker waiting on a pause asks DynamoDB every PAUSE_RECHECK_S.
        span_s = (spec.lease_size if spec else 32) * state.lanes / max(rate, 1e-9)
        return (f"rate limit {state.key!r}: DynamoDB table {self.table_name!r} now says {now_says} (epoch "
                f"{state.epoch}), but its signal {uri} could not be written after {self.PUBLISH_ATTEMPTS} attempts "
                f"(last error {type(exc).__name__}: {exc}). The change stands: workers that did not hear of it "
                f"follow it at their next lease, within about {max(span_s, Leaser.PAUSE_RECHECK_S):.0f} s. Run the "
                f"same command again to publish the signal.")

    def _create(self, key: str, spec: LimitSpec) -> LimitState:
        state = LimitState.new(key, spec, now_us())
        try:
            self._client().put_item(TableName=self.table_name, Item=_to_item(state),
                                    ConditionExpression="attribute_not_exists(#k)",
                                    ExpressionAttributeNames={"#k": "key"},
                                    ReturnValuesOnConditionCheckFailure="ALL_OLD")
            return state
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            item = exc.response.get("Item")  # created by another worker meanwhile: theirs is the state
            return _from_item(item) if item else self.read(key)  # type: ignore[return-value]

    def _current(self, key: str, spec: LimitSpec | None) -> LimitState:
        state = self.read(key)
        if state is None:
            if spec is None:
                raise KeyError(f"no rate limit state for {key!r}")
            state = self._create(key, spec)
        return state

    def _update(self, key: str, spec: LimitSpec | None, change: Callable[[LimitState], Any], *,
                publish: bool = False) -> tuple[Any, LimitState]:
        """Optimistic read-modify-write, conditional on ``epoch`` and ``granted`` being unchanged; ``change``
        returning False means nothing to write. A new epoch (or, with ``publish``, any outcome) is published to
        the signal object."""
        for _ in range(50):
            state = self._current(key, spec)
            old_epoch, old_granted = state.epoch, state.granted
            out = change(state)
            if out is False:
                if publish:
                    self._publish(state, spec)
                return out, state
            try:
                self._client().put_item(
                    TableName=self.table_name, Item=_to_item(state),
                    ConditionExpression="epoch = :e AND granted = :g",
                    ExpressionAttributeValues={":e": {"N": str(old_epoch)}, ":g": {"N": str(old_granted)}})
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                    continue
                raise
            _remember((self.table_name, key), state)
            if publish or state.epoch != old_epoch:
                self._publish(state, spec)
            return out, state
        raise RuntimeError(f"rate limit {key!r}: too much contention updating its state")

    def lease_lanes(self, key: str, spec: LimitSpec, n: int, *, renew: Mapping[int, int] | None = None,
                    hold: Iterable[int] = (), want: int = 1, must: int = 1, owner: str = "",
                    share: bool = False, need: int | None = None) -> Grant | Wait:
        """One conditional ``UpdateItem`` for all the lanes of a lease, planned from this process's last view of the
        item (every answer, success or not, returns the whole item and refreshes that view). Each lane's condition is
        its exact tat, so workers leasing other lanes never conflict; a conflict is planned again from the item the
        refusal returns."""
        client = self._client()
        cache_key = (self.table_name, key)
        calls = 0
        state, seen = _dynamo_views.get(cache_key) or (None, 0.0)
        if state is None:
            state, calls, seen = _remember(cache_key, self._current(key, spec)), 1, time.monotonic()
        hold = list(hold)
        # A renewal planned from an old view would pick lanes that only looked free then (and fail on them): renew
        # first; the answer is a fresh view, and free lanes it shows are taken by the next call.
        stale = renew and time.monotonic() - seen > FRESH_VIEW_S
        wanted = min(want, len(set(hold)) + len(renew or {})) if stale else want
        for _ in range(20 if must else 3):  # more lanes are opportunistic: a few tries
            at = now_us()
            plan = dict(renew=renew, hold=hold, want=wanted, must=must, owner=owner, share=share, need=need)
            out = plan_lanes(state, n, at, spec.horizon_s, **plan)  # type: ignore[arg-type]
            if isinstance(out, Wait) and out.paused:  # only a read tells when the pause ends
                state, calls = _remember(cache_key, self._current(key, spec)), calls + 1
                out = plan_lanes(state, n, at, spec.horizon_s, **plan)  # type: ignore[arg-type]
            if isinstance(out, Wait):
                return Wait(out.seconds, out.paused, calls)  # booked ahead: wait (a stale view is corrected later)
            if not out:
                return Grant((), calls, 0, *share_of(state, at, owner))  # nothing free in our view: no call
            values: dict[str, Any] = {":g": {"N": str(n * len(out))}, ":f": {"BOOL": False},
                                      ":e": {"N": str(state.epoch)}}
            sets, conds = _lane_swaps([(lease.lane, state.tats[lease.lane], lease.end_us) for lease in out], values,
                                      [booked_as(owner, lease) for lease in out] if owner else None)
            calls += 1
            try:
                resp = client.update_item(TableName=self.table_name, Key={"key": {"S": key}},
                                          UpdateExpression="SET " + ", ".join(["granted = granted + :g", *sets]),
                                          ConditionExpression=" AND ".join(["epoch = :e", "paused = :f", *conds]),
                                          ExpressionAttributeValues=values,
                                          ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                item = exc.response.get("Item")
                if item:
                    state = _remember(cache_key, _from_item(item))
                else:
                    state, calls = _remember(cache_key, self._current(key, spec)), calls + 1
                wanted = want  # a fresh view now
                continue
            state = _remember(cache_key, _from_item(resp["Attributes"]))
            return Grant(tuple(out), calls, len(free_lanes(state, at)), *share_of(state, at, owner))
        return Wait(0.05, calls=calls) if must else Grant((), calls, 0)

    def release_lanes(self, key: str, tails: list[tuple[Lease, int]]) -> int:
        """One ``UpdateItem`` for every tail still at its lane's end (a refusal returns the item: try those again)."""
        tails = list(tails)
        for _ in range(2):
            if not tails:
                return 0
            values: dict[str, Any] = {":n": {"N": str(sum(u for _, u in tails))},
                                      ":e": {"N": str(tails[0][0].epoch)}}
            sets, conds = _lane_swaps([(lease.lane, lease.end_us, lease.end_us - unused * lease.interval_us)
                                       for lease, unused in tails], values)
            try:
                self._client().update_item(TableName=self.table_name, Key={"key": {"S": key}},
                                           UpdateExpression="SET " + ", ".join(["granted = granted - :n", *sets]),
                                           ConditionExpression=" AND ".join(["epoch = :e", *conds]),
                                           ExpressionAttributeValues=values,
                                           ReturnValuesOnConditionCheckFailure="ALL_OLD")
                return sum(u for _, u in tails)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                item = exc.response.get("Item")
                if not item:
                    return 0
                state = _from_item(item)
                tails = [(lease, u) for lease, u in tails
                         if state.epoch == lease.epoch and state.tats[lease.lane] == lease.end_us]
        return 0


def limiter_from_config(kind: str, *, path: str | None = None, table: str = "slurmctl-rate-limits",
                        endpoint_url: str | None = None, region: str | None = None,
                        signals: S3ManifestStore | LocalManifestStore | None = None) -> RateLimiter:
    """The rate-limiter block a job config's ``rate_limiter:`` section names (``signals``: the job's store)."""
    if kind == "dynamodb":
        return DynamoDBRateLimiter(table_name=table, aws_credentials=aws_credentials(endpoint_url, region),
                                   signals=signals)
    if not path:
        raise ValueError("a local rate limiter needs a path")
    return LocalRateLimiter(path=path)
