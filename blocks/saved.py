"""Saved blocks named in a job config: ``storage: {block: team-manifests}``, ``rate_limiter: {block: team-limits}``.

A team saves its S3 store and DynamoDB limiter once (in the Prefect UI or ``Block.save``), credentials included,
and configs and deployments name them. The config keeps the name plus the non-secret settings read from the block
(URI, table, endpoint, region), so the manifests say where everything is without a credential in them; processes
that need the credentials (coordinator, workers) load the block by name, once per process.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

from prefect.blocks.core import Block

STORE_TYPES = ("slurmctl-s3-manifest-store", "slurmctl-local-manifest-store")
LIMITER_TYPES = ("slurmctl-dynamodb-rate-limiter", "slurmctl-local-rate-limiter")


class BlockNotFound(LookupError):
    """No saved block of the wanted types has that name; the message says how to make one."""


@functools.lru_cache(maxsize=64)
def saved_block(name: str, types: tuple[str, ...]) -> Block:
    """The saved block ``name`` of the first of ``types`` that has one; ``type-slug/name`` picks the type."""
    # registers our block classes, so a loaded document becomes one of them
    import slurmctl.blocks.manifest_store  # noqa: F401
    import slurmctl.blocks.rate_limiter  # noqa: F401

    slug, _, bare = name.rpartition("/")
    candidates = [slug] if slug else list(types)
    if slug and slug not in types:
        raise BlockNotFound(f"block {name!r}: type {slug!r} is not one of {', '.join(types)}")
    with _prefect_api(name):
        for block_type in candidates:
            try:
                return Block.load(f"{block_type}/{bare}")
            except ValueError as exc:  # Prefect: "Unable to find block document named ..."
                if "Unable to find" not in str(exc):
                    raise
    raise BlockNotFound(f"block {name!r}: no saved block of type {' or '.join(candidates)} has that name; save one "
                        f"(Prefect UI, Blocks; or `<BlockClass>(...).save({bare!r})` in Python) or check "
                        f"`prefect block ls` and PREFECT_API_URL")


@contextlib.contextmanager
def _prefect_api(name: str) -> Iterator[None]:
    """Blocks live on ``PREFECT_API_URL``, else on the embedded default's local server; never on a throwaway
    ephemeral server, which would hold no saved block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from slurmctl import prefect_server

    info = prefect_server.running()
    if info is None:
        raise BlockNotFound(f"block {name!r}: no Prefect API to load it from: set PREFECT_API_URL, or start the local "
                            f"server (`slurmctl server start`) where it was saved")
    with temporary_settings(updates={PREFECT_API_URL: info["api_url"]}):
        yield


def _endpoint_region(block: Any) -> dict[str, Any]:
    creds = getattr(block, "aws_credentials", None)
    if creds is None:
        return {}
    return {"endpoint_url": creds.aws_client_parameters.endpoint_url, "region": creds.region_name}


def store_settings(name: str) -> dict[str, Any]:
    """``storage:`` fields of a saved manifest-store block (no secrets)."""
    from slurmctl.blocks.manifest_store import S3ManifestStore

    block = saved_block(name, STORE_TYPES)
    if isinstance(block, S3ManifestStore):
        return {"uri": f"s3://{block.bucket}/{block.prefix.strip('/')}".rstrip("/"), **_endpoint_region(block),
                "sse": block.sse, "sse_kms_key_id": block.sse_kms_key_id}
    return {"uri": "file://" + block.root}


def limiter_settings(name: str) -> dict[str, Any]:
    """``rate_limiter:`` fields of a saved rate-limiter block (no secrets)."""
    from slurmctl.blocks.rate_limiter import DynamoDBRateLimiter

    block = saved_block(name, LIMITER_TYPES)
    if isinstance(block, DynamoDBRateLimiter):
        return {"kind": "dynamodb", "table": block.table_name, **_endpoint_region(block)}
    return {"kind": "local", "path": block.path}
