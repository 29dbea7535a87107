"""Store-and-forward: everything bound for the object store is written to a local outbox first.

A window summary is durable on the device the moment its window closes. ``Outbox.flush`` then
uploads what it can and deletes only what the store accepted, so a device that is offline for a
day loses nothing and catches up when the link returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .store import LocalStore, ObjectStore

log = logging.getLogger(__name__)


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
