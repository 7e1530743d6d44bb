"""Which job a flow run is, from its parameters alone: the run's name, its date, its job id and store.

A deployment run carries only static parameters (every scheduled run of a deployment gets the same ones), so the
job a run is about is derived here, the same way by the run itself, by its name in the UI and by the cancellation
hook (which may run in another process): the date is the ``date`` parameter, else the run's scheduled start
(``days_before`` earlier, in ``timezone``); the config is templated with it (``{date}``); the job id is the
``job_id`` parameter, else the config's, else one made from the flow run's id (so each run of a config without a
job id is its own job, and every process agrees which).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from slurmctl.config import ConfigError, job_config, known_storage, parse_date


def run_date(params: dict[str, Any], scheduled_start: _dt.datetime | None) -> _dt.date:
    """The date a run is for: ``date`` if given (a manual re-run of one day), else its scheduled start's date in
    ``timezone`` minus ``days_before`` (a nightly run at 02:00 with ``days_before: 1`` processes yesterday)."""
    if params.get("date"):
        return parse_date(params["date"])
    start = scheduled_start or _dt.datetime.now(_dt.timezone.utc)
    if start.tzinfo is None:
        start = start.replace(tzinfo=_dt.timezone.utc)
    tz = params.get("timezone") or "UTC"
    try:
        local = start.astimezone(ZoneInfo(tz))
    except (KeyError, ValueError):
        raise ConfigError([("timezone", f"unknown time zone {tz!r} (an IANA name such as Europe/Berlin)")]) from None
    return local.date() - _dt.timedelta(days=int(params.get("days_before") or 0))


def config_of_run(params: dict[str, Any], scheduled_start: _dt.datetime | None, flow_run_id: str | None) -> Any:
    """The validated ``JobConfig`` of a run started from a config (``config_path`` or inline ``config``)."""
    default = f"{{name}}-{str(flow_run_id)[:8]}" if flow_run_id else None
    return job_config(params.get("config_path"), params.get("config"), job_id=params.get("job_id"),
                      date=run_date(params, scheduled_start), default_job_id=default)


def job_of_run(params: dict[str, Any], scheduled_start: _dt.datetime | None = None,
               flow_run_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(job_id, storage)`` of a job flow run's parameters."""
    if params.get("job_id") and not params.get("config_path") and params.get("config") is None:
        return params["job_id"], params.get("storage") or known_storage(params["job_id"]).model_dump()
    cfg = config_of_run(params, scheduled_start, flow_run_id)
    return cfg.job_id, cfg.storage.model_dump()


def job_run_name() -> str:
    """A job's flow run is named after the job (the UI lists ``backfill-2025-04-12``, not ``noble-cockatoo``);
    a config that cannot be read names the run after its file, and the run itself then fails saying why."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        return job_of_run(params, flow_run.scheduled_start_time, flow_run.id)[0]
    except (ConfigError, OSError, ValueError, TypeError):
        if params.get("job_id"):
            return str(params["job_id"])
        if params.get("config_path"):
            return Path(params["config_path"]).stem
        return "slurmctl-job"
