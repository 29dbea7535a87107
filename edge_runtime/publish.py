"""The outbound event queue: outlier events and health heartbeats waiting for a transport.

Transports (MQTT, Greengrass IPC) take from it on their own threads; the engine only ``offer``s,
never waits. Bounded, with a declared policy when full (``publish.when_full``); every drop is
counted in health. An event larger than ``publish.max_payload_bytes`` (AWS IoT Core refuses more
than 128 KB) goes as a reference to the outlier sample object that holds the record.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import orjson

from .contracts import PublishConfig

REF_FIELDS = ("kind", "device_id", "model", "version", "ts", "id", "score", "threshold")


class EventQueue:
    def __init__(self, config: PublishConfig, device_id: str, health) -> None:
        self.config = config
        self.health = health
        self.events_topic = config.events_topic.format(device_id=device_id)
        self.health_topic = config.health_topic.format(device_id=device_id)
        self._items: deque[tuple[str, bytes]] = deque()
        self._lock = threading.Lock()
        self._beat_at = time.monotonic()

    def reconfigure(self, config: PublishConfig, device_id: str) -> None:
        """New topics, limits or heartbeat, live; events already queued keep their topic."""
        self.config = config
        self.events_topic = config.events_topic.format(device_id=device_id)
        self.health_topic = config.health_topic.format(device_id=device_id)

    def event(self, line: bytes, event: dict, sample_key: str | None) -> None:
        """The engine's hook for each outlier event."""
        if len(line) > self.config.max_payload_bytes:
            ref = {k: event.get(k) for k in REF_FIELDS}
            ref.update(truncated=len(line), sample=sample_key)
            line = orjson.dumps(ref)
        self.offer(self.events_topic, line)

    def offer(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if len(self._items) >= self.config.max_queue:
                self.health.events_dropped += 1
                if self.config.when_full == "drop_new":
                    return
                self._items.popleft()
            self._items.append((topic, payload))

    def take(self) -> tuple[str, bytes] | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def put_back(self, item: tuple[str, bytes]) -> None:
        """A publish that failed goes first again (unless the queue filled meanwhile)."""
        with self._lock:
            if len(self._items) < self.config.max_queue:
                self._items.appendleft(item)
            else:
                self.health.events_dropped += 1

    def beat(self) -> None:
        """Queue a health heartbeat if one is due."""
        every = self.config.heartbeat_s
        if every and time.monotonic() - self._beat_at >= every:
            self._beat_at = time.monotonic()
            self.offer(self.health_topic, self.health.window_header().model_dump_json().encode())

    @property
    def queued(self) -> int:
        return len(self._items)


class Publisher:
    """What every transport's publisher shares: the bounded queue the engine offers events to
    (through ``event``, the engine's hook) and the transport takes from."""

    def __init__(self, config: PublishConfig, device_id: str, health) -> None:
        self.config = config
        self.health = health
        self.queue = EventQueue(config, device_id, health)
        self.event = self.queue.event

    @property
    def queued(self) -> int:
        return self.queue.queued
