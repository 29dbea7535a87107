"""Local JSON-lines sinks: outlier events and the dead-letter file.

Writes are buffered and flushed once per batch (``flush``), not once per line: an outlier storm
costs one system call per batch, and a crash loses at most the batch in flight.
"""

from __future__ import annotations

from pathlib import Path

import orjson


class JsonlSink:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab", buffering=1 << 20)  # flushed per batch, not per 8 KiB
        self.written = 0

    def write_raw(self, line: bytes) -> None:
        """One JSON document, already serialised, without its newline."""
        self._fh.write(line + b"\n")
        self.written += 1

    def write(self, obj: dict) -> None:
        self.write_raw(orjson.dumps(obj))
        self.flush()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
