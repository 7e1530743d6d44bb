"""slurmctl's Prefect blocks: one external system behind each.

``prefect block register -m slurmctl.blocks`` registers the members of this module, so the concrete block classes
are exposed here (the abstract bases are not blocks a user saves).
"""

from slurmctl.blocks.manifest_store import LocalManifestStore, S3ManifestStore
from slurmctl.blocks.rate_limiter import DynamoDBRateLimiter, LocalRateLimiter

__all__ = ["DynamoDBRateLimiter", "LocalManifestStore", "LocalRateLimiter", "S3ManifestStore"]
