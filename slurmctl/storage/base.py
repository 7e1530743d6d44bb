"""The part of a store every backend shares: the primitives each implements, JSON manifests with checksums,
create-if-absent proven before a job relies on it, and input streams (see ``slurmctl.storage``).

No Prefect, Dask, pandas or boto3 here: reading a job's books must not need them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from abc import ABC, abstractmethod
from typing import Any, BinaryIO, Callable, Iterator

CHECKSUM_FIELD = "checksum"
DELETE_ERRORS_SHOWN = 5  # keys named in a ``DeleteIncomplete`` message
# botocore's retries for every S3 client slurmctl makes. Standard mode, not adaptive: adaptive adds a client-side
# rate limiter that, after one throttling answer, slows a sequential client to about one request per second, far
# worse than the backoff it replaces for our workloads.
AWS_RETRIES = {"retries": {"mode": "standard", "max_attempts": 10}}


class ManifestCorrupt(ValueError):
    """A manifest whose checksum is missing or does not match its body (torn, truncated or hand-edited)."""


class StoreUnsupported(RuntimeError):
    """The store cannot give the guarantees a job relies on (create-if-absent); the message says what to use."""


class DeleteIncomplete(RuntimeError):
    """Some keys under a prefix are still there after a delete and one retry of them (S3 ``DeleteObjects`` answers
    200 and lists per-key ``Errors``: access denied, a slow-down, an internal error). Raised so a caller never takes
    a prefix for empty when it is not; the message says how many keys and names the first few."""

    def __init__(self, uri: str, failed: list[tuple[str, str]], total: int):
        self.uri, self.failed, self.total = uri, failed, total
        shown = ", ".join(f"{key} ({why})" for key, why in failed[:DELETE_ERRORS_SHOWN])
        more = f" and {len(failed) - DELETE_ERRORS_SHOWN} more" if len(failed) > DELETE_ERRORS_SHOWN else ""
        super().__init__(f"{len(failed)} of {total} key(s) under {uri} could not be deleted (tried twice): "
                         f"{shown}{more}")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def checksum_of(body: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a manifest body without its checksum field."""
    data = {k: v for k, v in body.items() if k != CHECKSUM_FIELD}
    return "sha256:" + hashlib.sha256(canonical_json(data)).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Store(ABC):
    """Key/value objects under a root, JSON manifests with checksums, input streams. ``LocalStore`` and ``S3Store``
    (plain objects) and the Prefect blocks of ``slurmctl.blocks.manifest_store`` are all ``Store``s."""

    # --- the primitives each backend implements -------------------------------------------------------------
    @abstractmethod
    def uri(self, key: str) -> str:
        """The full URI of a key (what users see in status output)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Atomically write ``data``. With ``if_absent`` write only when no object exists; return whether written."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when absent."""

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (relative to the store root), in lexical order."""

    @abstractmethod
    def list_modified(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(key, modified)`` under ``prefix``, in lexical order, from the listing alone (no request per key).

        ``modified`` is when the object was last written, in nanoseconds since the epoch, by the store's own clock
        and at its own granularity: S3 gives ``LastModified`` to the second (floored), a filesystem its mtime (the
        kernel's coarse clock: a few milliseconds). Two equal times are therefore in no known order, and an earlier
        time means an earlier write (``books.failures`` relies on both)."""

    @abstractmethod
    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(key, bytes)`` under ``prefix``, in lexical order, from the listing alone."""

    @abstractmethod
    def list_children(self, prefix: str) -> Iterator[str]:
        """The names one level below ``prefix`` (which ends with ``/``) that have objects under them, in lexical
        order, without listing those objects (``jobs/`` -> each job id): a store of millions of objects answers in
        one request per thousand names."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; absent keys are fine."""

    @abstractmethod
    def put_file(self, key: str, path: str) -> None:
        """Atomically store the local file ``path`` under ``key``, streamed from disk (large outputs, merges)."""

    @abstractmethod
    def get_file(self, key: str, path: str) -> bool:
        """Stream the object to the local file ``path``; False (and no file) when absent."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Atomically make ``dst`` a copy of ``src`` without passing the bytes through this process when the
        backend can (S3 copies server-side)."""

    # --- shared behaviour -----------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.get_bytes(key) is not None

    def local_path(self, key: str) -> str | None:
        """The object's path when it is a file on this machine (read in place), else None (fetch it)."""
        return None

    def delete_prefix(self, prefix: str, *, first: Callable[[str], bool] | None = None) -> None:
        """Remove every key under ``prefix`` (a merge plan's intermediate files); the keys ``first`` picks (markers
        that vouch for the others, such as a merge's ``.done``) go before the rest, so a delete cut short never
        leaves a marker whose files are gone. Raises ``DeleteIncomplete`` when keys are left."""
        keys = list(self.list_keys(prefix))
        failed: list[tuple[str, str]] = []
        for group in first_then_rest(keys, first):
            for key in group:
                try:
                    self.delete(key)
                except OSError as exc:
                    failed.append((key, f"{type(exc).__name__}: {exc}"))
            if failed:
                break
        if failed:
            raise DeleteIncomplete(self.uri(prefix), failed, len(keys))

    def put_json(self, key: str, body: dict[str, Any], *, if_absent: bool = False) -> bool:
        body = {k: v for k, v in body.items() if k != CHECKSUM_FIELD}
        body[CHECKSUM_FIELD] = checksum_of(body)
        return self.put_bytes(key, json.dumps(body, sort_keys=True, indent=1, default=str).encode(),
                              if_absent=if_absent)

    def get_json(self, key: str) -> dict[str, Any] | None:
        data = self.get_bytes(key)
        if data is None:
            return None
        try:
            body = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ManifestCorrupt(f"{self.uri(key)}: not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ManifestCorrupt(f"{self.uri(key)}: not a JSON object")
        if CHECKSUM_FIELD not in body:
            raise ManifestCorrupt(f"{self.uri(key)}: no {CHECKSUM_FIELD!r} field (truncated, hand-written or not "
                                  f"written by slurmctl)")
        if body[CHECKSUM_FIELD] != checksum_of(body):
            raise ManifestCorrupt(f"{self.uri(key)}: checksum mismatch")
        return body

    def check_conditional_writes(self) -> None:
        """Prove that create-if-absent holds here: write a probe key twice; the second write must be refused.

        Raises ``StoreUnsupported`` naming what is missing. Costs three requests (two PUTs, one DELETE).
        """
        key = f"_probes/{uuid.uuid4().hex}/create-if-absent"
        what = f"the manifest store {self.uri('')}"
        try:
            first = self.put_bytes(key, b"first", if_absent=True)
            second = self.put_bytes(key, b"second", if_absent=True)
        except Exception as exc:
            if not isinstance(exc, OSError) and not _is_client_error(exc):
                raise
            raise StoreUnsupported(f"{what} failed a create-if-absent write ({_describe(exc)}); {self._advice()}"
                                   ) from None
        finally:
            try:
                self._remove_probe(key)
            except Exception:  # a leftover probe object is harmless
                pass
        if not first:
            raise StoreUnsupported(f"{what} refused to create a new object with create-if-absent; {self._advice()}")
        if second:
            raise StoreUnsupported(f"{what} does not honour create-if-absent: a second conditional write of the same "
                                   f"key replaced the first, so batch commits would silently become "
                                   f"last-writer-wins; {self._advice()}")

    def _advice(self) -> str:
        return "use a store that supports it"

    def _remove_probe(self, key: str) -> None:
        self.delete(key)

    def input_identity(self, uri: str) -> str:
        """This version of an input file, without reading it: its ETag and size on S3 (one HEAD), its mtime in
        nanoseconds and size on a filesystem (one stat). Partitioning records it and each batch compares it after
        reading its slice: a Parquet batch's digest covers only the file's shape, so a file rewritten with the same
        shape would otherwise pass."""
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            head = self._s3().head_object(Bucket=bucket, Key=key)
            etag = head["ETag"].strip('"')
            return f"s3:etag={etag}:size={head['ContentLength']}"
        st = os.stat(uri[7:] if uri.startswith("file://") else uri)
        return f"file:mtime_ns={st.st_mtime_ns}:size={st.st_size}"

    def open_uri(self, uri: str) -> BinaryIO:
        """A seekable binary stream over a local path, ``file://`` URI or ``s3://`` URI."""
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            from slurmctl.storage.ranges import S3RangeReader

            return io.BufferedReader(S3RangeReader(self._s3(), bucket, key), buffer_size=8 << 20)
        return open(uri[7:] if uri.startswith("file://") else uri, "rb")

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an input, in one ranged read."""
        if end <= start:
            return b""
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            resp = self._s3().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            return resp["Body"].read()
        with self.open_uri(uri) as f:
            f.seek(start)
            return f.read(end - start)

    def _s3(self) -> Any:
        """A boto3 S3 client (created once, lazily): for an S3 store's own bucket and any ``s3://`` input."""
        raise NotImplementedError



def first_then_rest(keys: list[str], first: Callable[[str], bool] | None) -> list[list[str]]:
    """``keys`` as the groups a delete goes through in order: those ``first`` picks, then the others."""
    if first is None:
        return [keys]
    return [[k for k in keys if first(k)], [k for k in keys if not first(k)]]


def _is_client_error(exc: BaseException) -> bool:
    """A botocore ``ClientError`` (an answer from S3), without importing botocore to ask."""
    return any(c.__name__ == "ClientError" and c.__module__.startswith("botocore") for c in type(exc).__mro__)


def _describe(exc: BaseException) -> str:
    if _is_client_error(exc):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code') or status}: {err.get('Message') or exc}"
    return f"{type(exc).__name__}: {exc}"
