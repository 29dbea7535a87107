"""The bounded intake queue between sources and the engine, and the micro-batching policy.

Bounded in records, with a declared policy when full: ``block`` makes the source wait (TCP and
MQTT then push back on their senders), ``drop_oldest`` discards the oldest queued payloads and
counts every record dropped. The engine takes a batch with ``take``: at most ``max_records``
records, sent as soon as that many are queued or the first of them has waited ``max_wait``
seconds, whichever comes first. With ``max_wait`` 0 an idle engine scores a lone record at once,
and a busy one gets what queued up while it worked: batches grow with load by themselves.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from .sources import Payload


class IntakeQueue:
    def __init__(self, max_records: int, when_full: str = "block") -> None:
        if when_full not in ("block", "drop_oldest"):
            raise ValueError(f"unknown queue policy {when_full!r}")
        self.max_records = max_records
        self.when_full = when_full
        self._items: deque[Payload] = deque()
        self._cond = threading.Condition()
        self.depth = 0  # records queued
        self.high_water = 0
        self.dropped = 0  # records dropped by drop_oldest
        self.closed = False

    def put(self, payload: Payload) -> bool:
        """Queue a payload; False (and nothing queued) once the queue is closed."""
        with self._cond:
            if self.closed:
                self.dropped += payload.n  # read from its source but too late to be served: counted
                return False
            if self.when_full == "block":
                # a payload larger than the whole queue still goes in, alone
                while not self.closed and self.depth and self.depth + payload.n > self.max_records:
                    self._cond.wait(0.2)
            else:
                while self._items and self.depth + payload.n > self.max_records:
                    oldest = self._items.popleft()
                    self.depth -= oldest.n
                    self.dropped += oldest.n
                    if oldest.ack is not None:  # dropped by the declared policy: done with it
                        oldest.ack()
            if self.closed:
                self.dropped += payload.n
                return False
            payload.arrived = time.monotonic()
            self._items.append(payload)
            self.depth += payload.n
            self.high_water = max(self.high_water, self.depth)
            self._cond.notify_all()
            return True

    def take(self, max_records: int, max_wait: float, timeout: float) -> list[Payload] | None:
        """The next batch: [] if nothing came within ``timeout``; None once closed and empty."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self.closed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            first = self._items.popleft()
            batch, total = [first], first.n
            fill_by = first.arrived + max_wait
            while total < max_records:
                if self._items:
                    if total + self._items[0].n > max_records:
                        break
                    nxt = self._items.popleft()
                    batch.append(nxt)
                    total += nxt.n
                    continue
                remaining = fill_by - time.monotonic()
                if remaining <= 0 or self.closed:
                    break
                self._cond.wait(remaining)
            self.depth -= total
            self._cond.notify_all()
            return batch

    def discard(self) -> int:
        """Drop everything queued (a stop whose grace is running out); returns the records dropped.
        Not acknowledged: a transport that redelivers (MQTT QoS 1) sends them again after restart."""
        with self._cond:
            n = self.depth
            self._items.clear()
            self.depth = 0
            self.dropped += n
            self._cond.notify_all()
            return n

    def close(self) -> None:
        """Refuse further input; what is queued can still be taken."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
