"""slurmctl's Prefect blocks: one external system behind each.

``prefect block register -m slurmctl.blocks`` registers the members of this module, so the concrete block classes
are exposed here (the abstract bases are not blocks a user saves). They are imported on first use: importing one
module of this package (``slurmctl.blocks.aws``) need not import Prefect through the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"LocalManifestStore": "manifest_store", "S3ManifestStore": "manifest_store",
          "DynamoDBRateLimiter": "rate_limiter", "LocalRateLimiter": "rate_limiter"}

__all__ = ["DynamoDBRateLimiter", "LocalManifestStore", "LocalRateLimiter", "S3ManifestStore"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"slurmctl.blocks.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # `prefect block register -m slurmctl.blocks` looks for the classes by listing the module
    return sorted([*globals(), *_HOMES])
