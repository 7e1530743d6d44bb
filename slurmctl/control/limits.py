"""Pausing a job and changing its rate limits while it runs: the limits' backend (SQLite or DynamoDB) and the
signal workers poll, and the operator's intent in ``control.json`` (what ``status`` shows)."""

from __future__ import annotations

from typing import Any

from slurmctl.control.errors import ControlFailed, LimitNotChanged, NothingToDo


def backend_errors() -> tuple[type[BaseException], ...]:
    """What a store or limiter backend raises when it cannot be reached (S3, DynamoDB, disk, SQLite); not bugs."""
    import sqlite3

    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError, OSError, sqlite3.Error


def set_paused(job: Any, paused: bool) -> list[str]:
    """Pause or unpause every rate limit of a job (workers stop taking tokens within ~1 s); return their names.

    Raises ``LimitNotChanged`` when a limit or its signal cannot be written. Repeating it is safe: a limit already
    in that state is left alone and its signal published again.
    """
    from slurmctl.books.limits import backend_for, limit_key, limit_spec
    from slurmctl.config import parse_config
    from slurmctl.ratelimit.lanes import SignalNotPublished

    cfg = parse_config(job.config)
    backend = backend_for(cfg)
    verb = "paused" if paused else "unpaused"
    done: list[str] = []
    for name in cfg.rate_limits:
        try:
            backend.set_paused(limit_key(cfg, name), limit_spec(cfg, name), paused)
        except SignalNotPublished as exc:
            raise LimitNotChanged(f"limit {name} is {verb}, but its signal is not: {exc}") from exc
        except backend_errors() as exc:
            raise LimitNotChanged(
                f"limit {name} could not be {verb} ({cfg.rate_limiter.kind} limiter: {type(exc).__name__}: {exc}); "
                f"it is unchanged" + (f" (already {verb}: {', '.join(done)})" if done else "")) from exc
        done.append(name)
    return done


def write_control(store: Any, job_id: str, paused: bool) -> str | None:
    """Record the operator's intent in ``control.json``; return an error message if it could not be written."""
    from slurmctl.books.manifests import Keys, now

    key = Keys(job_id).control
    try:
        store.put_json(key, {"schema_version": 1, "paused": paused, "at": now()})
    except backend_errors() as exc:
        return f"writing {store.uri(key)} failed ({type(exc).__name__}: {exc})"
    return None


def pause(job: Any, store: Any) -> list[str]:
    """Stop the job's workers taking tokens of any of its rate limits (in-flight requests finish; batches wait);
    return the limits' names. ``resume`` undoes it. Safe to repeat."""
    if not job.config.get("rate_limits"):
        raise NothingToDo(f"job {job.job_id} declares no rate_limits: pause stops token issuance, so there is "
                          f"nothing to pause")
    # The intent first, the limits next: if a limit then fails, status says paused and `resume` unpauses it.
    failed = write_control(store, job.job_id, True)
    if failed:
        raise ControlFailed(f"could not pause {job.job_id}: {failed}; nothing was changed. Run `slurmctl pause "
                            f"{job.job_id}` again")
    try:
        return set_paused(job, True)
    except LimitNotChanged as exc:
        raise LimitNotChanged(f"pause of {job.job_id} is incomplete: {exc}\n  run `slurmctl pause {job.job_id}` "
                              f"again (it is safe to repeat), or `slurmctl resume {job.job_id}` to call it off"
                              ) from exc


def unpause(job: Any, store: Any) -> list[str]:
    """Undo ``pause``: the limits first, the intent last (while any limit may still be paused, ``control.json``
    says paused, so running it again unpauses again). Return the limits' names."""
    try:
        names = set_paused(job, False)
    except LimitNotChanged as exc:
        raise LimitNotChanged(f"could not unpause {job.job_id}: {exc}\n  run `slurmctl resume {job.job_id}` again "
                              f"(it is safe to repeat)") from exc
    failed = write_control(store, job.job_id, False)
    if failed:
        raise ControlFailed(f"{job.job_id}: its rate limits are unpaused, but {failed}, so status still says "
                            f"paused; run `slurmctl resume {job.job_id}` again")
    return names


def set_rate(job: Any, limit: str, per_second: float) -> float:
    """Change the rate limit ``limit`` of a running job to ``per_second``; return the new target. Workers see it at
    their next signal check and switch after a grace of about 1.5 s."""
    from slurmctl.books.limits import backend_for, limit_key, limit_spec
    from slurmctl.config import parse_config
    from slurmctl.ratelimit.lanes import SignalNotPublished

    cfg = parse_config(job.config)
    if limit not in cfg.rate_limits:
        raise NothingToDo(f"--limit: job {job.job_id} has no rate limit {limit!r} "
                          f"(it has: {', '.join(cfg.rate_limits) or 'none'})")
    try:
        state = backend_for(cfg).set_rate(limit_key(cfg, limit), limit_spec(cfg, limit), per_second)
    except ValueError as exc:
        raise NothingToDo(str(exc)) from None
    except SignalNotPublished as exc:
        raise ControlFailed(f"limit {limit} of {job.job_id} is changed, but its signal is not: {exc}\n  run the "
                            f"same `slurmctl rate` again (it is safe to repeat)") from exc
    except backend_errors() as exc:
        raise ControlFailed(f"could not change limit {limit} of {job.job_id} ({cfg.rate_limiter.kind} limiter: "
                            f"{type(exc).__name__}: {exc}); it is unchanged. Run the same `slurmctl rate` again"
                            ) from exc
    return state.target
