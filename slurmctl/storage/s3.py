"""A store in an S3 bucket (or an S3-compatible server: moto in tests), through boto3."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from slurmctl.safe_keys import MAX_KEY_BYTES, UnsafeKey, safe_key
from slurmctl.storage.base import DeleteIncomplete, Store, first_then_rest
from slurmctl.storage.client import PlainClient

#: Parts of 16 MB, four at a time: a multipart upload or download streams from disk with ~64 MB in flight at most.
_TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)


class S3StoreOps(Store):
    """``s3://bucket/prefix``. Needs ``self.bucket``, ``self.prefix``, ``self.sse`` and ``self.sse_kms_key_id``."""

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

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        strip = len(self._key(""))
        pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:], int(obj["Size"])

    def list_children(self, prefix: str) -> Iterator[str]:
        base = self._key(prefix)
        pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"][len(base):].rstrip("/")

    def delete(self, key: str) -> None:
        self._s3().delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str, *, first: Callable[[str], bool] | None = None) -> None:
        """``DeleteObjects`` in requests of 1,000 keys (those ``first`` picks before the rest). It answers 200 even
        when some keys were not deleted, listing them in ``Errors`` (Quiet mode lists only those): they are tried
        once more, then ``DeleteIncomplete``."""
        keys = [self._key(k) for k in self.list_keys(prefix)]
        strip = len(self._key(""))
        for group in first_then_rest(keys, first and (lambda k: first(k[strip:]))):
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


class S3Store(PlainClient, S3StoreOps):
    """An S3 store as a plain object (``slurmctl.storage.open_store``)."""

    def __init__(self, bucket: str, prefix: str = "", *, sse: str | None = None, sse_kms_key_id: str | None = None,
                 endpoint_url: str | None = None, region: str | None = None) -> None:
        super().__init__(endpoint_url=endpoint_url, region=region)
        self.bucket, self.prefix, self.sse, self.sse_kms_key_id = bucket, prefix, sse, sse_kms_key_id

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"
