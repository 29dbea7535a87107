"""The spool: where everything bound for the object store waits, durable, until the store has it.

Store-and-forward in the manner of Greengrass Stream Manager's file-backed streams, without it:

* **Atomic and durable.** An object is written to a temp file, fsynced, renamed into place and its
  directory fsynced: after a power cut it is there whole or not at all. Temp files a crash left
  behind are removed at start.
* **Indexed, never rescanned.** The directory is walked once, at start; after that an in-memory
  index (summaries first, then outlier samples, each oldest first) says what to send next.
* **Bounded.** ``spool.max_bytes`` and ``max_age_s``, with a declared policy when full:
  ``drop_oldest`` drops the oldest samples, then the oldest summaries; ``reject_new`` drops the new
  object. Every drop is counted (``take_drops``) and reported in the next summary's header.
* **Disk full is not fatal.** A write that fails for lack of space keeps the object in memory
  (bounded by ``max_memory_bytes``; the uploader sends it from there), reports ``disk_full``, and
  writes it out when space returns.
* **One writer.** The directory is locked; a second runtime pointed at it refuses to start.
* **Checkpoints.** The open window's state is kept in ``.checkpoint/<instance>``, replaced at an
  interval; at start, a checkpoint a killed runtime left becomes an ordinary part of its window.
* **Damage is set aside.** A truncated or corrupted file is moved to ``.quarantine/`` with a log
  line; the rest go on.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import orjson

from .contracts import SUMMARY_PREFIX, ContractError, SpoolConfig, SpoolDrops, outlier_key, summary_key
from .store import fsync_dir

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
CHECKPOINTS = ".checkpoint"
QUARANTINE = ".quarantine"
CONFLICTS = ".conflicts"
LOCK = ".lock"
DROPS = ".drops.json"
LEDGER = ".ledger"
LEDGER_KEEP = 4096  # window parts remembered for replay detection
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_CKPT = struct.Struct("<4sII")  # magic, summary length, CRC-32 of the rest


class SpoolBusy(OSError):
    """Another runtime holds the spool directory."""


class Damaged(ValueError):
    """A spool file that is not whole: truncated, corrupted, or not what its name says."""


@dataclass
class Entry:
    key: str
    kind: str  # "summary", "samples" or "other"
    size: int
    created: float  # wall-clock seconds
    records: int | None = None  # records a summary counted, where known (for drop accounting)
    data: bytes | None = None  # held in memory while the disk is full
    replaces: str | None = None  # the checkpoint this object supersedes, kept while it is only in memory


def kind_of(key: str) -> str:
    if key.startswith(SUMMARY_PREFIX):
        return "summary"
    if key.startswith("outliers/"):
        return "samples"
    return "other"


def verify(key: str, data: bytes) -> None:
    """Raise ``Damaged`` unless ``data`` is a whole object of the kind its key says."""
    from .summary_format import SummaryFormatError, decode

    try:
        if key.endswith(".elws"):
            decode(data, key)  # the whole of it: a flipped flag outside the CRC must not pass
        elif key.endswith(".gz"):
            gzip.decompress(data)  # its CRC-32 and length trailer catch a cut or a flipped bit
        elif key.endswith(".json"):
            orjson.loads(data)
        elif key.endswith(".jsonl"):
            if data and not data.endswith(b"\n"):
                raise ValueError("last line cut short")
    except (SummaryFormatError, OSError, EOFError, ValueError, zlib.error) as err:
        raise Damaged(str(err)) from None


class Spool:
    """The device's side of store-and-forward. The engine thread puts; the uploader thread takes."""

    def __init__(self, directory: str | Path, config: SpoolConfig | None = None, fsync: bool = True) -> None:
        self.root = Path(directory)
        self.config = config or SpoolConfig()
        self.fsync = fsync
        self._lock = threading.Lock()
        self._queues: dict[str, OrderedDict[str, Entry]] = {k: OrderedDict() for k in ("summary", "samples", "other")}
        self._bytes = 0  # on disk
        self._memory = 0  # held in memory
        self._inflight: str | None = None
        self._drops = SpoolDrops()
        self._lock_fd: int | None = None
        self.disk_full: str | None = None  # why, while writes fail for lack of space
        self.quarantined = 0
        self._ledger: OrderedDict[str, None] = OrderedDict()

    # -- start and stop ---------------------------------------------------------------------------

    def open(self) -> Spool:
        """Lock the directory, clean up after a crash, and build the index (the only full scan)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SpoolBusy(
                f"spool {self.root} is in use by {holder}: two runtimes must not share one spool "
                "(give each its own sinks.outbox, and its own device_id)") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds without the note
        self._lock_fd = fd
        self._load_drops()
        self._load_ledger()
        self._scan()
        self._recover_checkpoints()
        if self.pending:
            log.info("spool %s: %d objects (%d bytes) waiting from before", self.root, self.pending, self._bytes)
        return self

    def close(self) -> None:
        if self._memory:
            held = [e.key for q in self._queues.values() for e in q.values() if e.data is not None]
            log.error("spool %s: %d objects (%d bytes) held in memory while the disk was full are lost at "
                      "stop: %s", self.root, len(held), self._memory, ", ".join(held[:5]) + (" ..." if len(held) > 5
                                                                                             else ""))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _scan(self) -> None:
        stale = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = here / name
                if name.startswith(TEMP_PREFIX):
                    _unlink(path)  # a write a crash cut short; its object was never acknowledged
                    stale += 1
                    continue
                if name.startswith("."):
                    continue
                key = path.relative_to(self.root).as_posix()
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                self._index(Entry(key, kind_of(key), st.st_size, st.st_mtime))
        if stale:
            log.warning("spool %s: removed %d temp files left by an interrupted write", self.root, stale)
        # oldest first within each kind
        for kind, q in self._queues.items():
            self._queues[kind] = OrderedDict(sorted(q.items(), key=lambda kv: (kv[1].created, kv[0])))

    def _index(self, e: Entry) -> None:
        old = self._queues[e.kind].pop(e.key, None)
        if old is not None:
            self._forget(old)
        self._queues[e.kind][e.key] = e
        if e.data is None:
            self._bytes += e.size
        else:
            self._memory += e.size

    def _unindex(self, e: Entry) -> None:
        """Out of the index, if it is still this entry there (lock held)."""
        if self._queues[e.kind].get(e.key) is e:
            self._queues[e.kind].pop(e.key)
            self._forget(e)

    def _forget(self, e: Entry) -> None:
        if e.data is None:
            self._bytes -= e.size
        else:
            self._memory -= e.size

    # -- the engine's side ------------------------------------------------------------------------

    def put(self, key: str, data: bytes, records: int | None = None, replaces_checkpoint: str | None = None) -> bool:
        """Hand an object over. False when the policy dropped it (counted). Never raises for a disk
        that is full (or failing): the object is then kept in memory. ``replaces_checkpoint``: the
        checkpoint this object supersedes. It is removed once the object is on disk, before the
        uploader can see it, or once the store has it: so a kill never leaves both a checkpoint and
        a sent part, and an object held only in memory keeps its checkpoint on disk."""
        kind = kind_of(key)
        entry = Entry(key, kind, len(data), time.time(), records, replaces=replaces_checkpoint)
        with self._lock:
            if not self._make_room(entry, on_disk=True):
                return False
        try:
            self._write(key, data)
        except OSError as err:
            self._note_disk_full(err)
            entry.data = data
            with self._lock:
                if not self._make_room(entry, on_disk=False):
                    return False
                self._index(entry)
            return True
        self._settled(entry)
        with self._lock:
            self._index(entry)
        if self.disk_full and not self._memory:
            self._disk_ok()
        return True

    def _write(self, key: str, data: bytes) -> None:
        path = self.root / key
        make_dirs(path.parent, self.fsync)
        atomic_write(path, data, self.fsync)

    def _make_room(self, new: Entry, on_disk: bool) -> bool:
        """Apply the bounds for ``new`` (lock held): drop by the policy; False if ``new`` itself goes."""
        cfg = self.config
        limit = cfg.max_bytes if on_disk else cfg.max_memory_bytes
        used = (lambda: self._bytes) if on_disk else (lambda: self._memory)
        if new.size > limit:
            self._count_drop(new, f"larger than the spool's {'max_bytes' if on_disk else 'max_memory_bytes'}")
            return False
        if used() + new.size <= limit:
            return True
        if cfg.when_full == "reject_new":
            self._count_drop(new, "spool full (when_full: reject_new)")
            return False
        for kind in ("samples", "other", "summary"):
            q = self._queues[kind]
            for key in list(q):
                if used() + new.size <= limit:
                    return True
                e = q[key]
                if key == self._inflight or (e.data is None) != on_disk:
                    continue
                self._drop(e, "spool full (when_full: drop_oldest)")
        if used() + new.size <= limit:
            return True
        self._count_drop(new, "spool full")
        return False

    def _drop(self, e: Entry, why: str) -> None:
        self._unindex(e)
        if e.kind == "summary":
            # its own records, and the drops its header was reporting: both are now reported here
            records, carried = _summary_counts(e.data if e.data is not None else self.root / e.key)
            e.records = records if records is not None else e.records
            if carried is not None:
                d = self._drops
                d.summaries += carried.summaries
                d.samples += carried.samples
                d.records += carried.records
        self._count_drop(e, why)
        if e.data is None:
            _unlink(self.root / e.key)
        log.warning("spool: dropped %s (%s)", e.key, why)

    def _count_drop(self, e: Entry, why: str) -> None:
        d = self._drops
        if e.kind == "summary":
            d.summaries += 1
            d.records += e.records or 0
        else:
            d.samples += 1
        d.reason = why
        self._save_drops()

    def expire(self, now: float | None = None) -> None:
        """Drop what is older than ``max_age_s`` (counted): a device offline for longer than the
        fleet keeps data must not fill up with it."""
        if self.config.max_age_s is None:
            return
        cutoff = (now or time.time()) - self.config.max_age_s
        with self._lock:
            for q in self._queues.values():
                for e in [e for e in q.values() if e.created < cutoff and e.key != self._inflight]:
                    self._drop(e, f"older than max_age_s ({self.config.max_age_s:.0f} s)")

    def take_drops(self) -> SpoolDrops | None:
        """What was dropped since the last call, for the next summary's header."""
        with self._lock:
            d = self._drops
            if not (d.summaries or d.samples):
                return None
            self._drops = SpoolDrops()
            self._save_drops()
            return d

    def restore_drops(self, d: SpoolDrops) -> None:
        """Drops taken for a summary that was not written after all: they go in the next one."""
        with self._lock:
            cur = self._drops
            cur.summaries += d.summaries
            cur.samples += d.samples
            cur.records += d.records
            cur.reason = cur.reason or d.reason
            self._save_drops()

    def retry_memory(self) -> None:
        """While the disk was full: write what is held in memory, oldest first, as space allows
        (within ``max_bytes``, by the same policy); with nothing in memory, a small probe says
        whether writing works again."""
        if not self._memory:
            if self.disk_full:
                try:
                    atomic_write(self.root / ".probe", b"ok", self.fsync)
                except OSError:
                    return
                self._disk_ok()
            return
        for q in self._queues.values():
            for e in list(q.values()):
                with self._lock:
                    if e.data is None or e.key == self._inflight or q.get(e.key) is not e:
                        continue
                    room = self._room_on_disk(e)
                if not room:
                    continue
                try:
                    self._write(e.key, e.data)
                except OSError:
                    return
                with self._lock:
                    still = q.get(e.key) is e
                    if still:
                        self._memory -= e.size
                        self._bytes += e.size
                        e.data = None
                if still:
                    self._settled(e)
                else:  # sent from memory (or dropped) while it was being written: no orphan file
                    _unlink(self.root / e.key)
        if not self._memory:
            self._disk_ok()

    def _room_on_disk(self, e: Entry) -> bool:
        """Make room on disk for ``e``, now in memory (lock held); if the policy will not, it is dropped."""
        cfg = self.config
        if self._bytes + e.size <= cfg.max_bytes:
            return True
        if cfg.when_full == "drop_oldest":
            for kind in ("samples", "other", "summary"):
                for key in list(self._queues[kind]):
                    if self._bytes + e.size <= cfg.max_bytes:
                        return True
                    old = self._queues[kind][key]
                    if old.data is None and key != self._inflight:
                        self._drop(old, "spool full (when_full: drop_oldest)")
            if self._bytes + e.size <= cfg.max_bytes:
                return True
        self._drop(e, "spool full (when_full: reject_new)" if cfg.when_full == "reject_new" else "spool full")
        return False

    def _note_disk_full(self, err: OSError) -> None:
        if not self.disk_full:
            log.error("spool %s: %s; scoring goes on, objects are kept in memory (up to %d bytes) and written "
                      "when space returns", self.root, err.strerror, self.config.max_memory_bytes)
        self.disk_full = err.strerror or "no space left on device"

    def _disk_ok(self) -> None:
        if self.disk_full:
            log.warning("spool %s: writing again (space returned)", self.root)
        self.disk_full = None

    # -- checkpoints of the open window ------------------------------------------------------------

    def checkpoint(self, name: str, summary: bytes, samples: bytes = b"") -> bool:
        """Replace checkpoint ``name`` (one per window part); False (and nothing lost yet) if the
        disk is full."""
        body = struct.pack("<I", len(summary)) + summary + samples
        blob = _CKPT.pack(b"ELCK", len(body), zlib.crc32(body)) + body
        path = self.root / CHECKPOINTS / f"{name}.ckpt"
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, blob, self.fsync)
        except OSError as err:
            self._note_disk_full(err)
            return False
        if self.disk_full and not self._memory:
            self._disk_ok()
        return True

    def clear_checkpoint(self, name: str) -> None:
        path = self.root / CHECKPOINTS / f"{name}.ckpt"
        if _unlink(path) and self.fsync:
            try:  # the removal must not come back after a power cut once the part is visible
                fsync_dir(path.parent)
            except OSError:
                pass

    def _settled(self, e: Entry) -> None:
        """``e`` is on disk or in the store: the checkpoint it supersedes can go."""
        if e.replaces is not None:
            self.clear_checkpoint(e.replaces)
            e.replaces = None

    def _recover_checkpoints(self) -> None:
        """A checkpoint left here belongs to a runtime that was killed inside a window: what it had
        counted becomes a part of that window, under its own instance's key."""
        from .contracts import load_summary

        folder = self.root / CHECKPOINTS
        if not folder.is_dir():
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith(TEMP_PREFIX):
                _unlink(path)
                continue
            try:
                summary, samples = _read_checkpoint(path.read_bytes())
                s = load_summary(summary, str(path))
            except OSError as err:  # unreadable now (a failing disk): left for the next start
                log.error("spool: checkpoint %s could not be read (%s); left in place", path, err)
                continue
            except (Damaged, ContractError) as err:
                self._set_aside(path, QUARANTINE, f"checkpoint {path.name}: {err}")
                self.quarantined += 1
                continue
            key = summary_key(s.model_name, s.model_version, s.device_id, s.window_start, s.part, s.instance_id)
            if key not in self._queues["summary"]:  # else: it closed normally and the crash came after
                log.warning("recovered the open window of a runtime that stopped without closing it: %s "
                            "(%d records)", key, s.records)
                if samples:
                    self.put(outlier_key(s.model_name, s.model_version, s.device_id, s.window_start, s.part,
                                         s.instance_id), samples)
                # the checkpoint goes once the part is on disk or sent, not before
                self.put(key, summary, s.records, replaces_checkpoint=path.name.removesuffix(".ckpt"))
            else:
                self.clear_checkpoint(path.name.removesuffix(".ckpt"))

    # -- the uploader's side ----------------------------------------------------------------------

    def next(self) -> Entry | None:
        """The object to send next (summaries first, oldest first), marked in flight."""
        with self._lock:
            for q in self._queues.values():
                for e in q.values():
                    self._inflight = e.key
                    return e
            self._inflight = None
            return None

    def read(self, e: Entry) -> bytes | None:
        """The object's bytes; None if it is gone (dropped meanwhile)."""
        if e.data is not None:
            return e.data
        try:
            return (self.root / e.key).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._unindex(e)
            return None
        except OSError as err:  # unreadable (a bad sector, permissions): aside, so the rest go on
            self.quarantine(e, f"unreadable ({err.strerror or err})")
            return None

    def done(self, e: Entry) -> None:
        """The store has it: forget it."""
        with self._lock:
            self._unindex(e)
            self._inflight = None
        if e.data is None:
            _unlink(self.root / e.key)
        self._settled(e)

    def requeue(self, e: Entry) -> None:
        """To the back of its queue: an object the store keeps refusing must not hold up the rest."""
        with self._lock:
            q = self._queues[e.kind]
            if q.get(e.key) is e:
                q.move_to_end(e.key)

    def release(self) -> None:
        with self._lock:
            self._inflight = None

    def quarantine(self, e: Entry, why: str) -> None:
        self._remove_aside(e, QUARANTINE, why)
        self.quarantined += 1

    def set_aside_conflict(self, e: Entry, why: str) -> None:
        self._remove_aside(e, CONFLICTS, why)

    def _remove_aside(self, e: Entry, folder: str, why: str) -> None:
        with self._lock:
            self._unindex(e)
            self._inflight = None
        if e.data is None:
            self._set_aside(self.root / e.key, folder, f"{e.key}: {why}")

    def _set_aside(self, path: Path, folder: str, why: str) -> None:
        target = self.root / folder / path.relative_to(self.root)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            log.error("spool: %s; moved to %s, not sent", why, target)
        except OSError as err:
            _unlink(path)
            log.error("spool: %s; removed (could not move it aside: %s)", why, err)

    # -- replays ----------------------------------------------------------------------------------

    def seen_before(self, identity: str) -> bool:
        """True if a window part with this identity was written before: the input was replayed."""
        return identity in self._ledger

    def remember(self, identity: str) -> None:
        """A window part with this identity is in the spool (call after ``put``)."""
        self._ledger[identity] = None
        while len(self._ledger) > LEDGER_KEEP:
            self._ledger.popitem(last=False)
        try:
            with open(self.root / LEDGER, "ab") as fh:
                fh.write(identity.encode() + b"\n")
            if (self.root / LEDGER).stat().st_size > 64 * LEDGER_KEEP * 2:
                atomic_write(self.root / LEDGER, b"".join(k.encode() + b"\n" for k in self._ledger), False)
        except OSError:
            pass  # a full disk: remembered in memory; the fleet review dedupes as well

    def _load_ledger(self) -> None:
        try:
            lines = (self.root / LEDGER).read_bytes().splitlines()
        except OSError:
            return
        for line in lines[-LEDGER_KEEP:]:
            if line:
                self._ledger[line.decode("utf-8", "replace")] = None

    # -- figures ----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def bytes(self) -> int:
        return self._bytes + self._memory

    def keys(self) -> list[str]:
        with self._lock:
            return [k for q in self._queues.values() for k in q]

    def _save_drops(self) -> None:
        try:
            atomic_write(self.root / DROPS, self._drops.model_dump_json().encode(), False)
        except OSError:
            pass  # kept in memory

    def _load_drops(self) -> None:
        try:
            self._drops = SpoolDrops.model_validate_json((self.root / DROPS).read_bytes())
        except (OSError, ValueError):
            self._drops = SpoolDrops()


def _unlink(path: Path) -> bool:
    """Remove ``path``; True if it was there. A failing disk (read-only, I/O errors) is logged, not
    raised: it must not stop scoring."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as err:
        log.error("spool: could not remove %s: %s", path, err)
        return False


def atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    """Temp file, fsync, rename, fsync of the directory: whole or absent after a crash."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def _read_checkpoint(blob: bytes) -> tuple[bytes, bytes]:
    if len(blob) < _CKPT.size + 4:
        raise Damaged("checkpoint cut short")
    magic, length, crc = _CKPT.unpack_from(blob)
    body = blob[_CKPT.size:]
    if magic != b"ELCK" or len(body) != length or zlib.crc32(body) != crc:
        raise Damaged("checkpoint truncated or corrupted")
    (n,) = struct.unpack_from("<I", body)
    return body[4:4 + n], body[4 + n:]


def _summary_counts(source: bytes | Path) -> tuple[int | None, SpoolDrops | None]:
    """A spooled summary's records and the drops its header reports (None, None if unreadable)."""
    from .contracts import load_summary

    try:
        data = source if isinstance(source, bytes) else source.read_bytes()
        s = load_summary(data, "spool")
    except (OSError, ValueError):  # ContractError is a ValueError
        return None, None
    return s.records, s.spool_dropped


def make_dirs(path: Path, fsync: bool = True) -> None:
    """``mkdir -p``, with each new directory's entry fsynced in its parent (a new date folder must
    survive a power cut as well as the object in it)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not missing:
        return
    path.mkdir(parents=True, exist_ok=True)
    if fsync:
        for d in reversed(missing):
            fsync_dir(d.parent)
