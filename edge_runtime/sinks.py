"""Local JSON-lines sinks: outlier events and the dead-letter file."""

from __future__ import annotations

import json
from pathlib import Path


class JsonlSink:
    """Appends one JSON object per line; each write is flushed so a crash loses at most one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.written = 0

    def write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._fh.flush()
        self.written += 1

    def close(self) -> None:
        self._fh.close()
