"""A job's rate limits: their keys, specs and backend, from its config (used by workers, the CLI and status)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from slurmctl.config import JobConfig, LocalClusterConfig
from slurmctl.paths import home
from slurmctl.ratelimit.lanes import LimitSpec
from slurmctl.ratelimit.leaser import Leaser


def limit_key(cfg: JobConfig, name: str) -> str:
    return cfg.rate_limits[name].key or f"{cfg.job_id}/{name}"


def worker_processes(cfg: JobConfig) -> int:
    """How many worker processes the job runs at most: they share its limits (each may hold its share of lanes)."""
    c = cfg.cluster
    if isinstance(c, LocalClusterConfig):
        return c.n_workers if c.processes else 1
    return c.max_jobs * c.processes


def limit_spec(cfg: JobConfig, name: str) -> LimitSpec:
    c = cfg.rate_limits[name]
    return LimitSpec(per_second=c.per_second, burst=c.burst, floor=c.floor, ceiling=c.ceiling,
                     lease_size=c.lease_size, lanes=c.lanes, recovery_s=c.recovery_s,
                     throttle_strikes=c.throttle_strikes, workers=worker_processes(cfg))


def backend_for(cfg: JobConfig) -> Any:
    from slurmctl.blocks.rate_limiter import limiter_from_config

    r = cfg.rate_limiter
    path = r.path
    if r.kind == "local" and not path:
        s = cfg.storage.uri
        base = s[len("file://"):] if s.startswith("file://") else str(home())
        path = str(Path(base) / "rate-limits.sqlite")
    signals = None
    if r.kind == "dynamodb":  # workers poll pause/rate/throttle signals in the job's store, not DynamoDB
        from slurmctl.books.store import store_for

        signals = store_for(cfg.storage)
    if r.block:  # a saved block: its own credentials
        from slurmctl.blocks.saved import LIMITER_TYPES, saved_block

        block = saved_block(r.block, LIMITER_TYPES)
        return block.model_copy(update={"signals": signals}) if r.kind == "dynamodb" else block
    return limiter_from_config(r.kind, path=path, table=r.table, endpoint_url=r.endpoint_url, region=r.region,
                               signals=signals)


_leasers: dict[tuple[str, str], Leaser] = {}
_leasers_lock = threading.Lock()


def leasers_for(cfg: JobConfig) -> dict[str, Leaser]:
    """This process's spenders for the job's limits: one per limit and process, kept across batches so a lease is
    never wasted. Built under a lock: a worker's first two shards start together, and two spenders in one process
    split its lanes between them, count as two holders (a smaller fair share for every process on the key) and
    leave the lanes of the one that is dropped unused until their leases end (traced: each worker of a 2-worker job
    built two, and it reached 0.63-0.76 of its 50/s; 0.99 with one)."""
    if not cfg.rate_limits:
        return {}
    backend = backend_for(cfg)
    out = {}
    with _leasers_lock:
        for name in cfg.rate_limits:
            key = limit_key(cfg, name)
            ident = (repr(backend), key)
            if ident not in _leasers:
                _leasers[ident] = Leaser(backend, key, limit_spec(cfg, name))
            out[name] = _leasers[ident]
    return out


def limits_status(cfg: JobConfig) -> dict[str, Any]:
    """Current state of each limit, for ``slurmctl status`` (empty when the backend cannot be reached)."""
    from slurmctl.ratelimit.lanes import now_us

    if not cfg.rate_limits:
        return {}
    backend = backend_for(cfg)
    out = {}
    for name in cfg.rate_limits:
        state = backend.read(limit_key(cfg, name))
        if state is None:
            out[name] = {"target_per_s": cfg.rate_limits[name].per_second, "current_per_s": None, "paused": False,
                         "granted": 0, "throttled": 0, "lanes": limit_spec(cfg, name).lane_count}
        else:
            out[name] = {"target_per_s": state.target, "current_per_s": round(state.effective_rate(now_us()), 3),
                         "paused": state.paused, "granted": state.granted, "throttled": state.throttled,
                         "decreases": state.decreases, "lanes": state.lanes, "epoch": state.epoch}
    return out


def ensure_limits(cfg: JobConfig) -> None:
    """Create each limit's shared state before workers start (otherwise every worker's first lease races to)."""
    if not cfg.rate_limits:
        return
    backend = backend_for(cfg)
    for name in cfg.rate_limits:
        backend.ensure_limit(limit_key(cfg, name), limit_spec(cfg, name))
