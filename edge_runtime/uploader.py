"""The uploader: forwards the spool to the object store on its own thread.

Scoring hands a finished object to the spool and goes on; this thread sends one object at a
time, summaries first, and removes each only after the store confirmed it. Every put is
conditional (``If-None-Match: *``): keys are unique per writer instance and part, so an existing
object is either this very object (a retry whose answer was lost: fine) or a second writer
under the same name (a conflict: logged loudly, counted, the file kept aside, nothing
overwritten). A failed attempt backs off exponentially with jitter, counted from when the
attempt ended; each request has short timeouts, so a hung store costs one timeout per attempt.
The thread's own CPU time is kept to ``store.upload_cpu_share`` of a core by pausing between
objects, so draining a backlog of thousands does not slow scoring.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from .health import Health
from .presence import Presence
from .spool import Damaged, Entry, Spool, verify
from .store import ObjectExists, ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0
FINAL_TRIES = 3  # consecutive failures that end the last upload at stop


class Uploader:
    def __init__(self, spool: Spool, store: ObjectStore, health: Health | None = None,
                 presence: Presence | None = None, backoff_max_s: float = BACKOFF_MAX_S,
                 cpu_share: float = 1.0) -> None:
        self.spool = spool
        self.store = store
        self.health = health or Health()
        self.presence = presence
        self.backoff_max_s = backoff_max_s
        self.cpu_share = cpu_share
        self.sent = 0
        self.failures = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._down_since: float | None = None

    @property
    def pending(self) -> int:
        return self.spool.pending

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgeloop-uploader", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something new is in the spool."""
        self._wake.set()

    # -- one object -------------------------------------------------------------------------------

    def send_one(self) -> bool | None:
        """Send the next object. True: sent (or settled); False: the store failed (back off);
        None: nothing to send."""
        e = self.spool.next()
        if e is None:
            return None
        try:
            data = self.spool.read(e)
            if data is None:
                return True  # dropped by the spool's policy meanwhile, or unreadable and set aside
            try:
                verify(e.key, data)
            except Damaged as err:
                self.spool.quarantine(e, f"damaged ({err})")
                return True
            return self._put(e, data)
        except Exception:
            self.spool.requeue(e)  # whatever went wrong with this one, the rest go first
            raise
        finally:
            self.spool.release()

    def _put(self, e: Entry, data: bytes) -> bool:
        try:
            self.store.put(e.key, data, if_absent=True)
        except ObjectExists:
            return self._settle_existing(e, data)
        except Exception as err:  # any transport or service failure: keep the file, back off
            self._failed(e, err)
            self.spool.requeue(e)
            return False
        self.spool.done(e)
        self._ok()
        return True

    def _settle_existing(self, e: Entry, data: bytes) -> bool:
        try:
            existing = self.store.get(e.key)
        except ObjectNotFound as err:  # gone again (a lifecycle rule?): retry the put, after a pause
            self._failed(e, err)
            return False
        except Exception as err:
            self._failed(e, err)
            return False
        if existing == data:  # our own earlier attempt landed; its answer did not
            self.spool.done(e)
            self._ok()
            return True
        self.health.writer_conflicts += 1
        log.error("CONFLICT: %s already holds a different object: another runtime writes as this device with "
                  "this instance id; ours is kept in the spool's .conflicts folder, theirs is not overwritten",
                  e.key)
        self.spool.set_aside_conflict(e, "a different object exists under this key in the store")
        return True

    def _ok(self) -> None:
        self.sent += 1
        self.health.uploaded += 1
        if self._down_since is not None:
            log.info("store %s reachable again after %.0f s", self.store.url, time.monotonic() - self._down_since)
            self._down_since = None
        self._backoff = self._retry_at = 0.0

    def _failed(self, e: Entry, err: BaseException) -> None:
        self.failures += 1
        self.health.upload_failures += 1
        self._backoff = min(self._backoff * 2 if self._backoff else BACKOFF_START_S, self.backoff_max_s)
        # counted from the end of the attempt, so a slow failure (a timeout) does not shorten the wait
        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.5, 1.0)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("store %s: %s not sent (%s); %d objects wait in the spool, retrying with backoff",
                        self.store.url, e.key, err, self.spool.pending)
        else:
            log.debug("store still failing (%s); next try in %.1f s", err, self._backoff)

    # -- the thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self._retry_at:
                wait = self._retry_at - time.monotonic()
                if wait > 0:
                    self._stopping.wait(wait)
                    continue
            if self.presence is not None and self._down_since is None:
                self.presence.maybe_announce(self.health)
            cpu = time.thread_time()
            try:
                result = self.send_one()
            except Exception:  # never let one bad object or a store bug end forwarding
                log.exception("uploader: unexpected error; backing off")
                self._retry_at = time.monotonic() + BACKOFF_START_S
                continue
            if result and self.cpu_share < 1.0:
                # signing and parsing an S3 request is Python work that holds the GIL: pausing in
                # proportion keeps a backlog's drain from slowing the engine thread
                self._stopping.wait((time.thread_time() - cpu) * (1.0 / self.cpu_share - 1.0))
            if result is None:
                # presence is announced only while the store answers; while it is down, wait for news
                announce = self.presence is not None and self._down_since is None
                self._wake.wait(self.presence.due_in() if announce else None)
                self._wake.clear()

    def stop(self, timeout: float) -> None:
        """One last attempt to forward everything, bounded by ``timeout``: what is not sent stays
        in the spool, durable, for the next start."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # inside a request to a store that hangs
                self._left(timeout)
                return
        final = threading.Thread(target=self._final, args=(deadline,), name="edgeloop-uploader-final", daemon=True)
        final.start()
        final.join(max(deadline - time.monotonic(), 0.1))
        if final.is_alive() or self.spool.pending:
            self._left(timeout)

    def _final(self, deadline: float) -> None:
        self._retry_at = 0.0
        failures = 0
        while time.monotonic() < deadline:
            try:
                result = self.send_one()
            except Exception:
                log.exception("uploader: final upload failed")
                return
            if result is None:  # all sent: this instance stops writing
                if self.presence is not None:
                    self.presence.withdraw()
                return
            if result is False:
                # a lost answer or a blip is worth a quick retry; a store that is down is not worth the grace
                failures += 1
                if failures >= FINAL_TRIES:
                    return
                time.sleep(min(0.2 * failures, max(deadline - time.monotonic(), 0)))
            else:
                failures = 0

    def _left(self, timeout: float) -> None:
        log.warning("uploader: %d objects stay in the spool for the next start (store %s, %.0f s allowed)",
                    self.spool.pending, self.store.url, timeout)
