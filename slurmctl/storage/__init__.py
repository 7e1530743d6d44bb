"""Where a job's manifests, batch outputs and final dataset live, as plain Python objects.

Two backends share one interface (``Store``): a directory (``LocalStore``: the embedded default, or a filesystem
every cluster node shares) and an S3 bucket (``S3Store``). The I/O of each lives here, in ``LocalStoreOps`` and
``S3StoreOps``; ``slurmctl.blocks.manifest_store`` makes Prefect blocks of the same code, which flows and tasks use
(a block can be saved, is Prefect's result storage, and pickles to Dask workers). Commands that read or mend a job's
books (``status``, ``list``, ``analyze-errors``, ``pause``) open a plain store with ``open_store``: they must not
wait seconds for Prefect and prefect-aws to import.

Guarantees every caller relies on:

* ``put_bytes`` is atomic: a reader sees the old object, or the whole new one, never a partial write.
* ``put_bytes(..., if_absent=True)`` creates the object only if no object exists under the key, and says whether it
  did (S3 ``If-None-Match: *``; a hard link on a filesystem). This is the primitive a commit is built on.
* ``put_json``/``get_json`` write and verify a sha256 checksum over the canonical JSON body; a body without its
  checksum is refused like a corrupt one (every manifest slurmctl writes has one).
* Every key goes through ``slurmctl.safe_keys.safe_key`` before it reaches the filesystem or S3: a local store never
  touches a path outside its root, an S3 store never a key outside its prefix (``UnsafeKey`` otherwise).
* ``check_conditional_writes`` proves the create-if-absent primitive on this very store before a job relies on it:
  an S3-compatible server that ignores ``If-None-Match`` would silently turn every commit into last-writer-wins.
* A local store's write is durable when it returns: the file is fsynced, then the directory that names it (and the
  parent of any directory created for it), so a commit reported and counted survives a crash.
* An S3 store's ``delete_prefix`` either empties the prefix or raises ``DeleteIncomplete`` naming what is left
  (``DeleteObjects`` reports keys it did not delete inside a successful answer).

Input data may live anywhere (``s3://`` or a local path) independently of where the store keeps manifests;
``open_uri`` returns a seekable binary stream for either, reading S3 in ranged GETs so a large input is never held in
memory.
"""

from __future__ import annotations

from pathlib import Path

from slurmctl.storage.base import (
    AWS_RETRIES,
    CHECKSUM_FIELD,
    DeleteIncomplete,
    ManifestCorrupt,
    Store,
    StoreUnsupported,
    canonical_json,
    checksum_of,
    sha256_bytes,
)


def split_uri(uri: str) -> tuple[str, str, str]:
    """``("s3", bucket, prefix)`` for ``s3://bucket/prefix``, ``("file", absolute path, "")`` for a path or
    ``file://`` URI."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        return "s3", bucket, prefix
    return "file", str(Path(uri[7:] if uri.startswith("file://") else uri).resolve()), ""


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None, sse: str | None = None,
               sse_kms_key_id: str | None = None) -> Store:
    """The plain store a config's ``storage.uri`` names: ``s3://bucket/prefix`` or a local path / ``file://``.
    ``sse``/``sse_kms_key_id``: server-side encryption of an S3 store's writes (ignored for a local one)."""
    kind, where, prefix = split_uri(uri)
    if kind == "s3":
        from slurmctl.storage.s3 import S3Store

        return S3Store(where, prefix, sse=sse, sse_kms_key_id=sse_kms_key_id, endpoint_url=endpoint_url,
                       region=region)
    from slurmctl.storage.local import LocalStore

    return LocalStore(where, endpoint_url=endpoint_url, region=region)


__all__ = ["AWS_RETRIES", "CHECKSUM_FIELD", "DeleteIncomplete", "ManifestCorrupt", "Store", "StoreUnsupported",
           "canonical_json", "checksum_of", "open_store", "sha256_bytes", "split_uri"]
