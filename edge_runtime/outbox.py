"""Store-and-forward: everything bound for the object store is written to a local outbox first.

A window summary is durable on the device the moment its window closes. ``Outbox.flush`` then
uploads what it can and deletes only what the store accepted, so a device that is offline for a
day loses nothing and catches up when the link returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

from .store import LocalStore, ObjectStore

log = logging.getLogger(__name__)

PARTS_FILE = ".window-parts.json"
RECENT_KEYS = 1024


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

    def next_part(self, key: str, start: float) -> int:
        """0 the first time ``key`` (a window starting at ``start``) is asked for, then 1, 2, ...:
        remembered across restarts, so a restart, a swap back, or a late record reopening a window
        never overwrites a part already written (and perhaps already sent).

        The most recent keys are kept; a window at or before the newest one forgotten gets a part
        number of its own (milliseconds since the epoch), which cannot collide with 0, 1, 2, ...
        """
        state = self.spool.root / PARTS_FILE
        try:
            doc = json.loads(state.read_text())
            parts = {str(k): (int(v[0]), float(v[1])) for k, v in doc["parts"].items()}
            forgotten = doc["forgotten_before"]
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            parts, forgotten = {}, None
        if key in parts:
            part = parts.pop(key)[0] + 1
        elif forgotten is not None and start <= forgotten:
            part = time.time_ns() // 1_000_000
        else:
            part = 0
        parts[key] = (part, start)
        while len(parts) > RECENT_KEYS:
            oldest = next(iter(parts))
            forgotten = max(forgotten if forgotten is not None else -math.inf, parts.pop(oldest)[1])
        self.spool.root.mkdir(parents=True, exist_ok=True)
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"parts": parts, "forgotten_before": forgotten}))
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
