"""Object stores: a local directory laid out like S3, or S3 itself through boto3.

Both speak the same small interface, so the runtime, the outbox and the fleet review never know
which one they write to. ``open_store("s3://bucket/prefix")`` gives S3 (``endpoint_url`` for
MinIO or LocalStack); anything else is a local directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class StoreError(OSError):
    """The object store could not be reached or refused a request."""


class ObjectNotFound(KeyError):
    """No object under that key."""


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """A directory whose relative file paths are the object keys.

    ``durable=True`` fsyncs each object before it becomes visible, for the device's outbox:
    a summary acknowledged there survives a power cut.
    """

    def __init__(self, root: str | Path, durable: bool = False) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.durable = durable

    def put(self, key: str, data: bytes) -> None:
        path = self.root / _check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename so a reader never sees half an object
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return (self.root / _check_key(key)).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # temp files, local state
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key


class S3Store:
    """``s3://bucket/prefix`` through boto3."""

    def __init__(self, url: str, endpoint_url: str | None = None, client=None) -> None:
        import boto3
        from botocore.config import Config

        rest = url.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"no bucket in {url!r}")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url
        # bounded timeouts: a device on a bad link must fail fast and leave data in its outbox
        config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise StoreError(f"{self.url}: {err}") from err

    def put(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, Key=self.prefix + _check_key(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + _check_key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise ObjectNotFound(key) from None
        except Exception as err:
            raise StoreError(f"{self.url}: {err}") from err

    def list(self, prefix: str = "") -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix):]
        except (BotoCoreError, ClientError) as err:
            raise StoreError(f"{self.url}: {err}") from err


def open_store(url: str, endpoint_url: str | None = None) -> ObjectStore:
    if url.startswith("s3://"):
        return S3Store(url, endpoint_url=endpoint_url)
    return LocalStore(url.removeprefix("file://"))
