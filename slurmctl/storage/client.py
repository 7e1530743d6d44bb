"""The S3 client of a plain store (``LocalStore``/``S3Store``): created on first use, once per store object, with
the same retries as the blocks' clients. A local store needs one only to read ``s3://`` input."""

from __future__ import annotations

import threading
from typing import Any

from slurmctl.storage.base import AWS_RETRIES


class PlainClient:
    def __init__(self, *, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.endpoint_url, self.region = endpoint_url, region
        self._client: Any = None
        self._client_lock = threading.Lock()

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=Config(**AWS_RETRIES))
            return self._client

    def __getstate__(self) -> dict[str, Any]:  # a client does not pickle: the copy makes its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_client_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _client=None, _client_lock=threading.Lock())
