"""Object stores: a local directory laid out like S3, or S3 itself through boto3.

Both speak the same small interface, so the runtime, the outbox and the fleet review never know
which one they write to. ``open_store("s3://bucket/prefix")`` gives S3 (``endpoint_url`` for
MinIO or LocalStack); anything else is a local directory.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class StoreError(OSError):
    """The object store could not be reached or refused a request."""


class ObjectNotFound(KeyError):
    """No object under that key."""


class ObjectExists(Exception):
    """A put with ``if_absent`` found an object already under that key (S3: 412 Precondition Failed)."""


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, if_absent: bool = False) -> None:
        """Store ``data`` under ``key``; with ``if_absent``, raise ObjectExists rather than overwrite."""
        ...

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

    def put(self, key: str, data: bytes, if_absent: bool = False) -> None:
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
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise ObjectExists(key) from None
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            if self.durable:
                fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return (self.root / _check_key(key)).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def delete(self, key: str) -> None:
        (self.root / _check_key(key)).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, in path order; only the folder the prefix names is walked (a
        review lists 10,000 summaries beside the rest of a store)."""
        folder = prefix.rpartition("/")[0]
        top = self.root / folder if folder else self.root
        if not top.is_dir() or ".." in folder.split("/"):
            return
        keys = []
        pending = [(top, f"{folder}/" if folder else "")]
        while pending:
            path, rel = pending.pop()
            with os.scandir(path) as entries:
                for entry in entries:
                    key = rel + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), key + "/"))
                    elif not entry.name.startswith(".") and entry.is_file() and key.startswith(prefix):
                        keys.append(key)  # not temp files, nor local state
        yield from sorted(keys, key=lambda k: k.split("/"))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store:
    """``s3://bucket/prefix`` through boto3.

    Credentials come from boto3's default chain (under Greengrass, the Token Exchange Service's
    ``AWS_CONTAINER_CREDENTIALS_FULL_URI``). Requests have short timeouts and one attempt each:
    the device's uploader retries with its own backoff, so a hung store costs one timeout, not
    several stacked ones. Objects above ``multipart_threshold`` go in parts.
    """

    def __init__(self, url: str, endpoint_url: str | None = None, client=None, *, sse: str | None = None,
                 kms_key_id: str | None = None, multipart_threshold: int = 16 << 20,
                 connect_timeout: float = 3.0, read_timeout: float = 10.0, retries: int = 3) -> None:
        import boto3
        from botocore.config import Config

        rest = url.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"no bucket in {url!r}")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url, self.endpoint_url = url, endpoint_url
        self.multipart_threshold = multipart_threshold
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.part_size = max(8 << 20, multipart_threshold // 2)
        self._sse: dict[str, str] = {}
        if sse:
            self._sse["ServerSideEncryption"] = sse
            if kms_key_id:
                if sse != "aws:kms":
                    raise ValueError("kms_key_id needs sse: aws:kms")
                self._sse["SSEKMSKeyId"] = kms_key_id
        config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"total_max_attempts": retries, "mode": "standard"}, tcp_keepalive=True)
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise StoreError(f"{self.url}: {err}") from err

    def put(self, key: str, data: bytes, if_absent: bool = False) -> None:
        from botocore.exceptions import ClientError

        full = self.prefix + _check_key(key)
        cond = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            if len(data) > self.multipart_threshold:
                self._put_multipart(full, data, cond)
            else:
                self._call(self.client.put_object, Key=full, Body=data, **cond, **self._sse)
        except StoreError as err:
            cause = err.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise ObjectExists(key) from None
            raise

    def _put_multipart(self, full: str, data: bytes, cond: dict) -> None:
        # one attempt is bounded as a whole, not only per request: a crawling link gives up and
        # leaves the object in the spool for the next attempt
        deadline = time.monotonic() + self.attempt_timeout(len(data))
        upload = self._call(self.client.create_multipart_upload, Key=full, **self._sse)["UploadId"]
        try:
            parts = []
            for no, lo in enumerate(range(0, len(data), self.part_size), start=1):
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.url}: {full}: upload slower than {self.attempt_timeout(len(data)):.0f} s")
                chunk = data[lo:lo + self.part_size]
                etag = self._call(self.client.upload_part, Key=full, UploadId=upload, PartNumber=no, Body=chunk)["ETag"]
                parts.append({"PartNumber": no, "ETag": etag})
            self._call(self.client.complete_multipart_upload, Key=full, UploadId=upload,
                       MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            try:  # parts left behind cost storage until a lifecycle rule removes them
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload)
            except Exception:
                pass
            raise

    def attempt_timeout(self, size: int) -> float:
        """How long one multipart attempt may take: the per-request timeouts of each part, at least
        a minute."""
        parts = max(1, -(-size // self.part_size))
        return max(60.0, (parts + 2) * (self.connect_timeout + self.read_timeout))

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Key=self.prefix + _check_key(key))

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


def open_store(url: str, endpoint_url: str | None = None, **s3_options) -> ObjectStore:
    """``s3_options``: S3Store's keyword options (encryption, multipart, timeouts); ignored locally."""
    if url.startswith("s3://"):
        return S3Store(url, endpoint_url=endpoint_url, **s3_options)
    return LocalStore(url.removeprefix("file://"))


def store_for(config) -> ObjectStore:
    """The store a runtime configuration names (``StoreConfig``), for the device's uploader."""
    return open_store(config.url, config.endpoint_url, sse=config.sse, kms_key_id=config.kms_key_id,
                      multipart_threshold=config.multipart_threshold_mb << 20,
                      connect_timeout=config.connect_timeout_s, read_timeout=config.read_timeout_s, retries=1)
