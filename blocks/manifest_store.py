"""The manifest store as Prefect blocks: the stores of ``slurmctl.storage`` (which hold all of their I/O and its
guarantees) as small pydantic models a user can save, that Prefect uses as result storage, and that pickle to Dask
workers.

Two blocks share one interface (``ManifestStore``): ``LocalManifestStore`` for the embedded default (a directory on
this machine, or a shared filesystem on a cluster) and ``S3ManifestStore`` built on prefect-aws ``AwsCredentials``
(whose ``aws_client_parameters.endpoint_url`` points it at a moto server in tests). Following prefect-aws, boto3
clients are created lazily through ``AwsCredentials.get_client`` (cached per process by prefect-aws) and never stored
on the block, so a store pickles cheaply.
"""

from __future__ import annotations

from abc import ABC
from typing import Any, Literal

from prefect.filesystems import WritableFileSystem
from prefect_aws import AwsCredentials
from pydantic import Field, model_validator

from slurmctl.blocks.aws import aws_credentials
from slurmctl.storage import split_uri
from slurmctl.storage.base import Store
from slurmctl.storage.local import LocalStoreOps
from slurmctl.storage.s3 import S3StoreOps


class ManifestStore(Store, WritableFileSystem, ABC):
    """Base class of the store blocks. It is also a Prefect ``WritableFileSystem``, so batch tasks persist their
    (small) results and cache records in the job's own store: a cache hit survives the coordinator, the Prefect
    server and the machine."""

    _block_schema_capabilities = ["manifest-store"]

    aws_credentials: AwsCredentials = Field(
        default_factory=aws_credentials,
        description="Used for s3:// URIs (the S3 store's own bucket, and any s3:// input).")

    # --- Prefect WritableFileSystem (result storage) ----------------------------------------------------------
    # Prefect calls these with ``_sync=True`` from sync code and looks for ``a``-prefixed async twins.
    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        data = self.get_bytes(path)
        if data is None:
            raise FileNotFoundError(self.uri(path))
        return data

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        self.put_bytes(path, content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)

    def _s3(self) -> Any:
        return self.aws_credentials.get_client("s3")


class LocalManifestStore(LocalStoreOps, ManifestStore):
    """A directory on this machine (embedded default) or on a filesystem shared by all cluster nodes."""

    _block_type_name = "slurmctl Local Manifest Store"
    _block_type_slug = "slurmctl-local-manifest-store"

    root: str = Field(description="Absolute directory path holding the store.")


class S3ManifestStore(S3StoreOps, ManifestStore):
    """``s3://bucket/prefix`` through prefect-aws credentials (endpoint overridable for moto or other S3s)."""

    _block_type_name = "slurmctl S3 Manifest Store"
    _block_type_slug = "slurmctl-s3-manifest-store"

    bucket: str = Field(min_length=3)
    prefix: str = Field(default="", description="Key prefix for everything this store writes.")
    sse: Literal["AES256", "aws:kms"] | None = Field(default=None, description=(
        "Server-side encryption of every object this store writes (PutObject, multipart uploads, copies): "
        "AES256 (SSE-S3, keys managed by S3) or aws:kms (SSE-KMS). None: the bucket's default encryption."))
    sse_kms_key_id: str | None = Field(default=None, min_length=1, description=(
        "With sse aws:kms: the KMS key (id, ARN or alias) to encrypt with; None uses the account's aws/s3 key."))

    @model_validator(mode="after")
    def _sse_key_needs_kms(self) -> "S3ManifestStore":
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id is only used with sse: aws:kms; set sse to aws:kms or drop the key id")
        return self


def store_from_uri(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                   sse: str | None = None, sse_kms_key_id: str | None = None) -> ManifestStore:
    """The store block a config's ``storage.uri`` names: ``s3://bucket/prefix`` or a local path / ``file://``.
    ``sse``/``sse_kms_key_id``: server-side encryption of an S3 store's writes (ignored for a local one)."""
    creds = aws_credentials(endpoint_url, region)
    kind, where, prefix = split_uri(uri)
    if kind == "s3":
        return S3ManifestStore(bucket=where, prefix=prefix, aws_credentials=creds, sse=sse,
                               sse_kms_key_id=sse_kms_key_id)
    return LocalManifestStore(root=where, aws_credentials=creds)
