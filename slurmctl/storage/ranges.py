"""Reading an ``s3://`` input in ranges: a seekable stream over one S3 object, so an input on S3 opens like a file
(``Store.open_uri``) and a reader seeks to its slice instead of downloading the object."""

from __future__ import annotations

import io
from typing import Any


class S3RangeReader(io.RawIOBase):
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
