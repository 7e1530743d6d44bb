"""The manifest store: where a job's manifests, batch outputs and final dataset live.

Two blocks share one interface (``ManifestStore``): ``LocalManifestStore`` for the embedded default (a directory on
this machine, or a shared filesystem on a cluster) and ``S3ManifestStore`` built on prefect-aws ``AwsCredentials``
(whose ``aws_client_parameters.endpoint_url`` points it at a moto server in tests).

Following prefect-aws, a block is a small pydantic model: boto3 clients are created lazily through
``AwsCredentials.get_client`` (cached per process by prefect-aws) and never stored on the block, so a store pickles
cheaply to Dask workers.

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

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Literal

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from prefect.filesystems import WritableFileSystem
from prefect_aws import AwsCredentials
from pydantic import Field, model_validator

from slurmctl.blocks.aws import aws_credentials
from slurmctl.safe_keys import MAX_KEY_BYTES, UnsafeKey, safe_key

CHECKSUM_FIELD = "checksum"
#: Parts of 16 MB, four at a time: a multipart upload or download streams from disk with ~64 MB in flight at most.
_TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
DELETE_ERRORS_SHOWN = 5  # keys named in a ``DeleteIncomplete`` message


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


class ManifestStore(WritableFileSystem, ABC):
    """Base class: key/value objects under a root, JSON manifests with checksums, input streams.

    It is also a Prefect ``WritableFileSystem``, so batch tasks persist their (small) results and cache records in
    the job's own store: a cache hit survives the coordinator, the Prefect server and the machine.
    """

    _block_schema_capabilities = ["manifest-store"]

    aws_credentials: AwsCredentials = Field(
        default_factory=aws_credentials,
        description="Used for s3:// URIs (the S3 store's own bucket, and any s3:// input).")

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
        for group in _first_then_rest(keys, first):
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
        except (ClientError, OSError) as exc:
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
            return io.BufferedReader(_S3RangeReader(self._s3(), bucket, key), buffer_size=8 << 20)
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
        return self.aws_credentials.get_client("s3")


class LocalManifestStore(ManifestStore):
    """A directory on this machine (embedded default) or on a filesystem shared by all cluster nodes."""

    _block_type_name = "slurmctl Local Manifest Store"
    _block_type_slug = "slurmctl-local-manifest-store"

    root: str = Field(description="Absolute directory path holding the store.")

    def _path(self, key: str) -> Path:
        return Path(self._inside(key))

    def _inside(self, key: str) -> str:
        """The absolute path of ``key``, after checking it cannot leave the root.

        ``safe_key`` refuses ``..``, leading ``/`` and the rest; then the normalised path must still be the root or
        below it. The check is on the path's text, not on symlinks: a directory an operator links into the root
        (scratch on another filesystem) keeps working, and no key slurmctl builds can create a link.
        """
        safe_key(key, self.root)
        root = os.path.abspath(self.root)
        path = os.path.normpath(os.path.join(root, key))
        if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
            raise UnsafeKey(f"refusing store key {key!r}: it leaves the store root {root}")
        return path

    def uri(self, key: str) -> str:
        return "file://" + str(self._path(key))

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        created = _make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent, even between hosts on NFS
                except FileExistsError:
                    # An NFS client may retransmit a LINK whose reply was lost: the retry then fails with EEXIST
                    # although the link is ours. Same inode as our temp file: we won.
                    if not _same_file(tmp, path):
                        return False
            else:
                os.replace(tmp, path)
            _sync_entries(path.parent, created)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            with open(self._inside(key), "rb") as f:  # not Path: this runs once per part and manifest
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> Iterator[str]:
        return iter(sorted(key for key, _ in self._scan(prefix, times=False)))

    def list_modified(self, prefix: str) -> Iterator[tuple[str, int]]:
        return iter(sorted(self._scan(prefix, times=True)))

    def _scan(self, prefix: str, *, times: bool) -> list[tuple[str, int]]:
        """Files under ``prefix`` with their mtime in nanoseconds, or 0 without ``times``. os.scandir, not
        Path.rglob: a listing of 25,000 commits is strings and d_type, not 50,000 Path objects and stat calls (0.05 s
        instead of 0.5 s); with ``times``, one stat per file."""
        safe_key(prefix, self.root)
        directory = prefix if prefix.endswith("/") else prefix[: prefix.rfind("/") + 1]
        found: list[tuple[str, int]] = []
        pending = [directory]
        while pending:
            rel = pending.pop()
            try:
                entries = os.scandir(os.path.join(self.root, rel))
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        pending.append(f"{rel}{e.name}/")
                    elif e.is_file() and (rel + e.name).startswith(prefix):
                        modified = _mtime_ns(e) if times else 0
                        if modified is not None:
                            found.append((rel + e.name, modified))
        return found

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str, *, first: Callable[[str], bool] | None = None) -> None:
        if not prefix.endswith("/") or first is not None:
            super().delete_prefix(prefix, first=first)
        failed: list[tuple[str, str]] = []
        if prefix.endswith("/") and self._path(prefix).exists():  # what is left: directories (and a prefix/ tree)
            shutil.rmtree(self._path(prefix), onerror=lambda fn, path, exc: failed.append((path, repr(exc[1]))))
        if failed:
            raise DeleteIncomplete(self.uri(prefix), failed, len(failed))

    def put_file(self, key: str, path: str) -> None:
        self._place(key, lambda tmp: shutil.copyfile(path, tmp))

    def get_file(self, key: str, path: str) -> bool:
        try:
            shutil.copyfile(self._path(key), path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def copy(self, src: str, dst: str) -> None:
        source = self._path(src)
        if not source.is_file():
            raise FileNotFoundError(self.uri(src))
        self._place(dst, lambda tmp: shutil.copyfile(source, tmp))

    def local_path(self, key: str) -> str | None:
        return str(self._path(key))

    def _place(self, key: str, fill: Any) -> None:
        """Write a temp file beside ``key`` with ``fill(tmp)``, fsync it, rename it into place and fsync the
        directory (``_sync_entries``)."""
        path = self._path(key)
        created = _make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fill(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _sync_entries(path.parent, created)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _remove_probe(self, key: str) -> None:
        self.delete(key)
        self._path(key).parent.rmdir()  # the probe's own directory

    def _advice(self) -> str:
        return ("put `storage.uri` on a local or shared POSIX filesystem that supports hard links (ext4, xfs, NFS, "
                "Lustre, GPFS), or use an s3:// store")


def _first_then_rest(keys: list[str], first: Callable[[str], bool] | None) -> list[list[str]]:
    """``keys`` as the groups a delete goes through in order: those ``first`` picks, then the others."""
    if first is None:
        return [keys]
    return [[k for k in keys if first(k)], [k for k in keys if not first(k)]]


def _mtime_ns(entry: os.DirEntry) -> int | None:
    """A listed file's mtime in nanoseconds; None when it was removed since it was listed."""
    try:
        return entry.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p directory``; return the directories it created, outermost first (their entries need an fsync)."""
    missing: list[Path] = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _sync_entries(directory: Path, created: list[Path]) -> None:
    """Make a file just linked or renamed into ``directory`` durable: fsync the directory (its new entry), and the
    parent of each directory ``created`` for it (their entries). An fsync of the file alone leaves the name in the
    page cache, so a commit reported, counted and listed could vanish with a crash of the machine or the file
    server. ``created`` is outermost first: each parent is synced before the entries below it are relied on."""
    for d in [*(c.parent for c in created), directory]:
        _fsync_dir(d)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # A filesystem that cannot fsync a directory (some FUSE and CIFS mounts) says EINVAL: it has nothing more
        # durable to offer, and refusing every write there would help nobody.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code') or status}: {err.get('Message') or exc}"
    return f"{type(exc).__name__}: {exc}"


class S3ManifestStore(ManifestStore):
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

    def _key(self, key: str) -> str:
        """The S3 key of ``key``: checked by ``safe_key`` (so it stays under the prefix), 1,024 bytes at most."""
        p = self.prefix.strip("/")
        full = f"{p}/{safe_key(key, f's3://{self.bucket}/{p}')}" if p else safe_key(key, f"s3://{self.bucket}")
        if len(full.encode()) > MAX_KEY_BYTES:
            raise UnsafeKey(f"refusing store key {key[:200]!r}: with the prefix it is {len(full.encode())} bytes, "
                            f"and S3 keys are at most {MAX_KEY_BYTES}; use a shorter prefix or shorter names")
        return full

    def _sse_args(self) -> dict[str, str]:
        """The encryption arguments of every write (PutObject, CreateMultipartUpload, CopyObject)."""
        if not self.sse:
            return {}
        args = {"ServerSideEncryption": self.sse}
        if self.sse == "aws:kms" and self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        kwargs: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        kwargs.update(self._sse_args())
        try:
            self._s3().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kwargs)
        except ClientError as exc:
            if if_absent and exc.response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                                           "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._s3().get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def exists(self, key: str) -> bool:
        try:
            self._s3().head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise

    def list_keys(self, prefix: str) -> Iterator[str]:
        return (key for key, _ in self.list_modified(prefix))

    def list_modified(self, prefix: str) -> Iterator[tuple[str, int]]:
        strip = len(self._key(""))
        pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:], int(obj["LastModified"].timestamp()) * 1_000_000_000

    def delete(self, key: str) -> None:
        self._s3().delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str, *, first: Callable[[str], bool] | None = None) -> None:
        """``DeleteObjects`` in requests of 1,000 keys (those ``first`` picks before the rest). It answers 200 even
        when some keys were not deleted, listing them in ``Errors`` (Quiet mode lists only those): they are tried
        once more, then ``DeleteIncomplete``."""
        keys = [self._key(k) for k in self.list_keys(prefix)]
        strip = len(self._key(""))
        for group in _first_then_rest(keys, first and (lambda k: first(k[strip:]))):
            failed = self._delete_keys(group)
            if failed:  # once more: a slow-down or an internal error usually passes
                failed = self._delete_keys([k for k, _ in failed])
            if failed:
                raise DeleteIncomplete(self.uri(prefix), failed, len(keys))

    def _delete_keys(self, keys: list[str]) -> list[tuple[str, str]]:
        """Delete S3 ``keys``; return those DeleteObjects did not delete, with the error it gave for each."""
        s3, failed = self._s3(), []
        for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1,000 keys per request
            resp = s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            failed += [(e["Key"], f"{e.get('Code')}: {e.get('Message')}") for e in resp.get("Errors", [])]
        return failed

    def put_file(self, key: str, path: str) -> None:
        # boto3's managed transfer: a multipart upload read from disk part by part above the threshold (S3 makes
        # the object visible only when the upload completes), a single PUT below it.
        self._s3().upload_file(path, self.bucket, self._key(key), ExtraArgs=self._sse_args() or None,
                               Config=_TRANSFER)

    def get_file(self, key: str, path: str) -> bool:
        try:
            self._s3().download_file(self.bucket, self._key(key), path, Config=_TRANSFER)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                if os.path.exists(path):
                    os.unlink(path)
                return False
            raise

    def copy(self, src: str, dst: str) -> None:
        # server-side: a single CopyObject up to 5 GB, a multipart copy above (the managed transfer decides)
        self._s3().copy({"Bucket": self.bucket, "Key": self._key(src)}, self.bucket, self._key(dst),
                        ExtraArgs=self._sse_args() or None, Config=_TRANSFER)

    def _advice(self) -> str:
        return ("slurmctl commits each batch with a conditional PUT (If-None-Match: *). Amazon S3 supports it; for an "
                "S3-compatible server, use one that implements conditional writes on PutObject, or use a file:// "
                "store on a shared filesystem")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (convenient for moto and first runs)."""
        s3 = self._s3()
        try:
            s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            region = s3.meta.region_name
            kwargs = ({} if region in (None, "us-east-1")
                      else {"CreateBucketConfiguration": {"LocationConstraint": region}})
            s3.create_bucket(Bucket=self.bucket, **kwargs)


class _S3RangeReader(io.RawIOBase):
    """A seekable raw stream over one S3 object; each ``readinto`` is one ranged GET (wrap in BufferedReader)."""

    def __init__(self, client: Any, bucket: str, key: str):
        self._client, self._bucket, self._key = client, bucket, key
        self._pos = 0
        self._size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        if self._pos >= self._size:
            return 0
        end = min(self._pos + len(buf), self._size)
        data = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                       Range=f"bytes={self._pos}-{end - 1}")["Body"].read()
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


def store_from_uri(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                   sse: str | None = None, sse_kms_key_id: str | None = None) -> ManifestStore:
    """Build the store a config's ``storage.uri`` names: ``s3://bucket/prefix`` or a local path / ``file://``.
    ``sse``/``sse_kms_key_id``: server-side encryption of an S3 store's writes (ignored for a local one)."""
    creds = aws_credentials(endpoint_url, region)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        return S3ManifestStore(bucket=bucket, prefix=prefix, aws_credentials=creds, sse=sse,
                               sse_kms_key_id=sse_kms_key_id)
    path = uri[7:] if uri.startswith("file://") else uri
    return LocalManifestStore(root=str(Path(path).resolve()), aws_credentials=creds)
