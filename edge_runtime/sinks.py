"""Local JSON-lines sinks: outlier events and the dead-letter file.

Writes are buffered and flushed once per batch (``flush``), not once per line: an outlier storm
costs one system call per batch, and a crash loses at most the batch in flight. A full disk
does not stop the service: the lines that could not be written are counted (``lost``) and
logged once, and writing resumes when space returns (a line cut short by the full disk is ended
with a newline first, so it stands alone as one unreadable line).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class JsonlSink:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._buf: list[bytes] = []
        self._size = 0
        self._torn = False
        self._closed = False
        self.written = 0
        self.lost = 0
        self.failing: str | None = None
        self._fd: int | None = None
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            self._fail(err)  # a full disk at start: try again at the next flush

    def write_raw(self, line: bytes) -> None:
        """One JSON document, already serialised, without its newline."""
        self._buf.append(line + b"\n")
        self._size += len(line) + 1
        self.written += 1
        if self._size >= FLUSH_BYTES:
            self.flush()

    def write(self, obj: dict) -> None:
        self.write_raw(orjson.dumps(obj))
        self.flush()

    def _fail(self, err: OSError) -> None:
        if not self.failing:
            log.error("%s: %s; lines are counted as lost until it can be written again", self.path, err.strerror)
        self.failing = err.strerror or str(err)

    def flush(self) -> None:
        if not self._buf or self._closed:
            return
        if self._fd is None:
            self._open()
            if self._fd is None:
                self.lost += len(self._buf)
                self._buf, self._size = [], 0
                return
        data = b"".join(([b"\n"] if self._torn else []) + self._buf)
        lines = len(self._buf)
        self._buf, self._size = [], 0
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError as err:
            self.lost += lines - data[:done].count(b"\n") + (1 if self._torn and done else 0)
            self._torn = done > 0 and data[done - 1:done] != b"\n" or (self._torn and done == 0)
            self._fail(err)
            return
        self._torn = False
        if self.failing:
            log.warning("%s: writing again (%d lines lost meanwhile)", self.path, self.lost)
            self.failing = None

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
