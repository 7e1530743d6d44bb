"""slurmctl: very large, embarrassingly parallel batch jobs on Slurm with Prefect, S3 and DynamoDB.

From Python (``slurmctl.api`` says more)::

    import slurmctl
    job = slurmctl.submit("jobs/backfill.yaml", date="2025-04-12")
    job.wait(); df = job.to_pandas()

The names below are imported on first use: ``import slurmctl.config`` (or any module) stays light.
"""

from __future__ import annotations

from typing import Any

_API = {"job": "slurmctl.api", "jobs": "slurmctl.api", "Job": "slurmctl.api", "submit": "slurmctl.api",
        "SubmitRefused": "slurmctl.control.errors", "SubmitFailed": "slurmctl.control.errors",
        "ControlError": "slurmctl.control.errors", "ControlFailed": "slurmctl.control.errors",
        "JobRunning": "slurmctl.control.errors", "BudgetRefused": "slurmctl.control.errors",
        "NothingToDo": "slurmctl.control.errors",
        "JobNotFound": "slurmctl.books.store", "ConfigError": "slurmctl.config",
        "ManifestCorrupt": "slurmctl.storage", "StorageConfig": "slurmctl.config"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'slurmctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
