"""Store-and-forward: everything bound for the object store is written to a local outbox first.

A window summary is durable on the device the moment its window closes. ``Outbox.flush`` then
uploads what it can and deletes only what the store accepted, so a device that is offline for a
day loses nothing and catches up when the link returns.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from .store import LocalStore, ObjectStore

log = logging.getLogger(__name__)

PARTS_FILE = ".window-parts.json"
RECENT_KEYS = 64


@dataclass
class FlushResult:
    sent: int = 0
    failed: int = 0
    pending: int = 0


class Outbox:
    def __init__(self, directory: str) -> None:
        self.spool = LocalStore(directory, durable=True)

    def put(self, key: str, data: bytes) -> None:
        self.spool.put(key, data)

    def next_part(self, key: str) -> int:
        """0 the first time ``key`` is asked for, then 1, 2, ...: remembered across restarts.

        The most recent keys are kept (a swap back and forth between model versions inside one
        window must not reuse a part number); windows close in order, so older keys cannot recur.
        """
        state = self.spool.root / PARTS_FILE
        try:
            parts = json.loads(state.read_text())
            if not isinstance(parts, dict):
                parts = {}
        except (OSError, ValueError):
            parts = {}
        part = int(parts[key]) + 1 if key in parts else 0
        parts.pop(key, None)
        parts[key] = part
        while len(parts) > RECENT_KEYS:
            parts.pop(next(iter(parts)))
        self.spool.root.mkdir(parents=True, exist_ok=True)
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(parts))
        os.replace(tmp, state)
        return part

    def pending(self) -> list[str]:
        return list(self.spool.list())

    def flush(self, store: ObjectStore) -> FlushResult:
        """Send pending objects in key order; stop at the first failure (the link is likely down)."""
        result = FlushResult()
        keys = self.pending()
        for key in keys:
            path = self.spool.root / key
            try:
                store.put(key, path.read_bytes())
            except Exception as err:  # any transport failure: keep the file, try next time
                result.failed = 1
                log.warning("outbox: %s not sent (%s); kept for the next flush", key, err)
                break
            path.unlink()
            result.sent += 1
        result.pending = len(keys) - result.sent
        return result
