"""Presence: each runtime says in the store that it writes as its device id, and looks for others.

Keys carry the writer's instance id, so two runtimes with one device id (a copied config, a
cloned SD card) never overwrite each other's data; but their summaries would silently count one
device twice. So every ``store.presence_s`` the uploader puts a small note under
``devices/device=<id>/writers/<instance>.json`` and reads the others' notes: one that is fresh and
not a dead process of this same host is a second writer, logged loudly and counted in health.
A runtime that stops cleanly withdraws its note.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import orjson

from .contracts import presence_key
from .store import ObjectStore

log = logging.getLogger(__name__)

FRESH_PERIODS = 2.5  # a note is fresh for this many announcement periods


class Presence:
    def __init__(self, store: ObjectStore, device_id: str, instance_id: str, every_s: float) -> None:
        self.store = store
        self.device_id = device_id
        self.instance_id = instance_id
        self.every_s = every_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self.others: dict[str, dict] = {}  # second writers already reported
        self._next = time.monotonic()

    def due_in(self) -> float | None:
        if not self.every_s:
            return None
        return max(self._next - time.monotonic(), 0.0)

    def maybe_announce(self, health) -> None:
        if self.every_s and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every_s
            try:
                self.announce(health)
            except Exception as err:  # the store is down: the next period tries again
                log.debug("presence: %s", err)

    def announce(self, health) -> list[dict]:
        """Put our note, read the others'; returns the live second writers newly found."""
        note = {"device_id": self.device_id, "instance_id": self.instance_id, "host": self.host, "pid": self.pid,
                "started": self.started, "seen": time.time(), "every_s": self.every_s}
        self.store.put(presence_key(self.device_id, self.instance_id), orjson.dumps(note))
        prefix = presence_key(self.device_id, "x").rsplit("/", 1)[0] + "/"
        found = []
        for key in self.store.list(prefix):
            other = key.rsplit("/", 1)[-1].removesuffix(".json")
            if other == self.instance_id or other in self.others:
                continue
            try:
                doc = orjson.loads(self.store.get(key))
            except Exception:
                continue
            if self._live(doc):
                self.others[other] = doc
                found.append(doc)
                health.writer_conflicts += 1
                log.error("CONFLICT: two runtimes write as device %r: this one (instance %s, host %s, pid %d) "
                          "and instance %s (host %s, pid %s). Their data is kept apart, but the fleet review "
                          "counts them as one device: give each device its own device_id",
                          self.device_id, self.instance_id, self.host, self.pid, other, doc.get("host"),
                          doc.get("pid"))
        return found

    def _live(self, doc: dict) -> bool:
        every = float(doc.get("every_s") or self.every_s)
        if time.time() - float(doc.get("seen", 0)) > FRESH_PERIODS * every:
            return False
        if doc.get("host") == self.host:  # same machine: a killed predecessor is not a second writer
            if doc.get("pid") == self.pid:  # our own pid: a container restarted (PID 1 again)
                return False
            try:
                os.kill(int(doc.get("pid", 0)), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, OverflowError):
                pass
        return True

    def withdraw(self) -> None:
        try:
            self.store.delete(presence_key(self.device_id, self.instance_id))
        except Exception as err:
            log.debug("presence: could not withdraw: %s", err)
