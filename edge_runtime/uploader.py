"""The uploader: forwards the outbox to the object store on its own thread.

Scoring hands a finished summary to the local outbox and goes on; this thread wakes when told
there is something new, or when its backoff after a failure runs out, and uploads what it can.
After a failed flush it waits (doubling from 5 s to 5 min, with jitter) so an unreachable store
costs nothing per window. Without ``start()`` it does nothing until ``stop()``, which makes one
last synchronous attempt: the form the tests and one-shot replays use.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from .outbox import FlushResult, Outbox
from .store import ObjectStore

log = logging.getLogger(__name__)

BACKOFF_START_S = 5.0
BACKOFF_MAX_S = 300.0


class Uploader:
    def __init__(self, outbox: Outbox, store: ObjectStore) -> None:
        self.outbox = outbox
        self.store = store
        self.sent = 0
        self.pending = 0
        self.attempts = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = 0.0
        self._retry_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgeloop-uploader", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something new is in the outbox."""
        self._wake.set()

    def flush(self) -> FlushResult:
        self.attempts += 1
        result = self.outbox.flush(self.store)
        self.sent += result.sent
        self.pending = result.pending
        if result.failed:
            self._backoff = min(self._backoff * 2 if self._backoff else BACKOFF_START_S, BACKOFF_MAX_S)
            self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)
        else:
            self._backoff = self._retry_at = 0.0
        return result

    def _loop(self) -> None:
        while not self._stopping.is_set():
            wait = max(self._retry_at - time.monotonic(), 0.0) if self._retry_at else None
            woke = self._wake.wait(wait)
            if self._stopping.is_set():
                break
            if woke and self._retry_at and time.monotonic() < self._retry_at:
                # new objects during a backoff wait for it: the store is probably still down
                self._wake.clear()
                continue
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let one bad object or a store bug end forwarding
                log.exception("uploader: flush failed")
                self._retry_at = time.monotonic() + BACKOFF_START_S

    def stop(self, timeout: float) -> None:
        """One last attempt to forward everything, bounded by ``timeout``: what is not sent stays
        in the outbox, durable, for the next start."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # still inside a flush against a store that hangs
                log.warning("uploader: store did not answer within %.0fs; %d objects stay in the outbox",
                            timeout, len(self.outbox.pending()))
                return
        final = threading.Thread(target=self._final, name="edgeloop-uploader-final", daemon=True)
        final.start()
        final.join(max(deadline - time.monotonic(), 0.1))
        if final.is_alive():
            log.warning("uploader: store did not answer within %.0fs; %d objects stay in the outbox",
                        timeout, len(self.outbox.pending()))

    def _final(self) -> None:
        try:
            self.flush()
        except Exception:
            log.exception("uploader: final flush failed")
