"""The spool: atomic and durable puts, one scan at start, damage set aside, bounds, a full disk,
the directory lock, checkpoints of the open window, and the JSON-lines sinks on a full disk.

Everything runs on real files under tmp_path; a full disk is simulated by making writes fail
with ENOSPC, and once for real on a small tmpfs (root only).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import subprocess
import time
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from helpers import normal_rows, read_samples, record_line, window_name

from cloud import synthetic
from edge_runtime import sinks as sinks_module
from edge_runtime import spool as spool_module
from edge_runtime import store as store_module
from edge_runtime.contracts import RuntimeConfig, SpoolConfig, load_summary
from edge_runtime.health import Health
from edge_runtime.runtime import EdgeRuntime
from edge_runtime.sinks import JsonlSink
from edge_runtime.spool import Spool, SpoolBusy
from edge_runtime.store import LocalStore, StoreError
from edge_runtime.uploader import Uploader

T0 = synthetic.START_TS
KIB = 1024
PREFIX = "model=m/version=1.0.0/device=d/date=2026-11-01"


def summary_k(name: str) -> str:
    return f"summaries/{PREFIX}/{name}.elws"


def samples_k(name: str) -> str:
    return f"outliers/{PREFIX}/{name}.jsonl.gz"


def os_with(**overrides) -> types.ModuleType:
    """The os module with some functions replaced, to patch one module's view of it only."""
    proxy = types.ModuleType("os")
    proxy.__dict__.update(vars(os))
    proxy.__dict__.update(overrides)
    return proxy


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def files_under(root: Path) -> list[str]:
    """Every file under ``root`` (hidden ones included), relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def objects_on_disk(root: Path) -> dict[str, bytes]:
    """The spool's objects as files: everything outside the hidden folders and files."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = p.read_bytes()
    return out


class Store(LocalStore):
    """A LocalStore that can be offline (put raises StoreError) and records what it was given."""

    def __init__(self, root, online: bool = True) -> None:
        super().__init__(root)
        self.online = online
        self.puts: list[str] = []

    def put(self, key, data, if_absent=False):
        if not self.online:
            raise StoreError("network is unreachable")
        self.puts.append(key)
        super().put(key, data, if_absent)


class DiskFull:
    """Stands in for ``spool.atomic_write``: fails with ENOSPC while ``full``."""

    def __init__(self) -> None:
        self.full = False
        self.real = spool_module.atomic_write

    def __call__(self, path, data, fsync=True):
        if self.full:
            no_space()
        self.real(path, data, fsync)


@pytest.fixture
def disk(monkeypatch) -> DiskFull:
    d = DiskFull()
    monkeypatch.setattr(spool_module, "atomic_write", d)
    return d


def drain(uploader: Uploader, limit: int = 100) -> list[bool]:
    results = []
    for _ in range(limit):
        r = uploader.send_one()
        if r is None:
            return results
        results.append(r)
    raise AssertionError("the uploader never ran out of objects")


# --- real objects, as a runtime writes them -------------------------------------------------------


@dataclass
class Real:
    objects: dict[str, bytes]
    summaries: list[str]  # keys, window order
    samples: list[str]


@pytest.fixture(scope="module")
def real(bundle_dir, tmp_path_factory) -> Real:
    """What a runtime left in its spool for three one-minute windows, each with outliers, while the
    store was down: real summaries (.elws) and outlier samples (.jsonl.gz)."""
    work = tmp_path_factory.mktemp("real")
    config = RuntimeConfig.model_validate({
        "device_id": "dev-real", "bundle": str(bundle_dir), "window": {"seconds": 60},
        "sinks": {"events": str(work / "events.jsonl"), "dead_letter": str(work / "dl.jsonl"),
                  "outbox": str(work / "outbox")},
        "store": {"url": str(work / "store")},
    })
    rows = normal_rows(180, seed=1)
    rows[10::60, 5] += 2000  # an rpm spike in every window
    rt = EdgeRuntime(config, store=Store(work / "store", online=False))
    rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(rows))
    rt.close(upload_timeout=0.5)
    objects = objects_on_disk(work / "outbox")
    summaries = sorted(k for k in objects if k.endswith(".elws"))
    samples = sorted(k for k in objects if k.endswith(".jsonl.gz"))
    assert len(summaries) == 3 and len(samples) == 3 and len(objects) == 6
    assert [load_summary(objects[k], k).records for k in summaries] == [60, 60, 60]
    return Real(objects, summaries, samples)


# --- 1. atomic and durable; crash leftovers; order ---------------------------------------------------


def test_put_writes_the_whole_object_fsyncs_it_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool").open()
    calls = []

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        os.fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        os.replace(src, dst)

    monkeypatch.setattr(spool_module, "os", os_with(fsync=fsync, replace=replace))
    monkeypatch.setattr(store_module, "os", os_with(fsync=fsync))  # fsync_dir
    key = summary_k("20261101T000000Z-aaaaaaaaaaaa-p0")
    data = os.urandom(200 * KIB)
    assert spool.put(key, data, records=5) is True

    final = tmp_path / "spool" / key
    assert final.read_bytes() == data
    *new_dirs, fsync_file, rename, fsync_dir = calls
    # the new folders' entries first, each fsynced in its parent, from the top down
    assert all(c[0] == "fsync" for c in new_dirs) and len(new_dirs) >= 1
    assert [Path(c[1]) for c in new_dirs] == sorted(Path(c[1]) for c in new_dirs)
    final = final.resolve()
    tmp = Path(fsync_file[1])
    assert tmp.parent == final.parent and tmp.name.startswith(".tmp-")
    assert rename[0] == "replace" and [Path(p).resolve() for p in rename[1:]] == [tmp, final]  # once fsynced
    assert fsync_dir == ("fsync", str(final.parent))  # and the rename itself made durable
    assert files_under(tmp_path / "spool") == [".lock", key]  # no temp file left
    assert (spool.pending, spool.bytes, spool.keys()) == (1, len(data), [key])


def test_a_write_that_fails_halfway_leaves_no_object_and_no_temp_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool").open()
    key = samples_k("20261101T000000Z-aaaaaaaaaaaa-p0")
    real_write = os.write

    def write_half_then_fail(fd, view):
        if len(view) > 1000:
            return real_write(fd, view[:len(view) // 2])
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module, "os", os_with(write=write_half_then_fail))
    first = os.urandom(100 * KIB)
    # a failing disk (an SD card gone read-only, an I/O error) is treated like a full one: kept in memory
    assert spool.put(key, first) is True
    assert files_under(tmp_path / "spool") == [".lock"]  # no half object, no temp file
    assert (spool.pending, spool.bytes, spool.disk_full) == (1, len(first), "Input/output error")

    monkeypatch.undo()
    spool.retry_memory()
    assert (tmp_path / "spool" / key).read_bytes() == first and spool.disk_full is None


def test_open_removes_stale_temp_files_and_indexes_summaries_first_oldest_first(tmp_path, caplog):
    root = tmp_path / "spool"
    objects = {  # key -> mtime: a sample is the oldest object of all, yet summaries go first; the
        # mtimes run against the names, so only the age can give the order
        summary_k("20261101T000000Z-aaaaaaaaaaaa-p0"): 3000,
        summary_k("20261101T020000Z-aaaaaaaaaaaa-p0"): 1000,
        samples_k("20261101T020000Z-aaaaaaaaaaaa-p0"): 500,
        samples_k("20261101T000000Z-aaaaaaaaaaaa-p0"): 2000,
        summary_k("20261101T010000Z-aaaaaaaaaaaa-p0"): 2500,
    }
    for i, (key, mtime) in enumerate(objects.items()):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (100 + i))
        os.utime(path, (T0 + mtime, T0 + mtime))
    stale = [".tmp-a.elws.123", f"summaries/{PREFIX}/.tmp-b.elws.9",
             "outliers/model=m/.tmp-c.jsonl.gz.7", f"outliers/{PREFIX}/deeper/still/.tmp-d.4",
             ".checkpoint/.tmp-abc.ckpt.5"]
    for rel in stale:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"half an object")

    with caplog.at_level(logging.WARNING, logger="edge_runtime.spool"):
        spool = Spool(root).open()
    assert not [p for p in root.rglob(".tmp-*")]
    assert any("removed 4 temp files" in r.getMessage() for r in caplog.records)
    assert spool.pending == 5 and spool.bytes == sum(100 + i for i in range(5))
    assert set(spool.keys()) == set(objects)

    order = []
    while (e := spool.next()) is not None:
        order.append(e.key)
        assert e.created == T0 + objects[e.key]
        spool.done(e)
    assert order == [
        summary_k("20261101T020000Z-aaaaaaaaaaaa-p0"),
        summary_k("20261101T010000Z-aaaaaaaaaaaa-p0"),
        summary_k("20261101T000000Z-aaaaaaaaaaaa-p0"),
        samples_k("20261101T020000Z-aaaaaaaaaaaa-p0"),
        samples_k("20261101T000000Z-aaaaaaaaaaaa-p0"),
    ]
    assert objects_on_disk(root) == {} and (spool.pending, spool.bytes) == (0, 0)


# --- 2. no rescans ----------------------------------------------------------------------------------


def test_after_open_nothing_walks_the_directory(tmp_path, monkeypatch):
    root = tmp_path / "spool"
    for i in range(3):
        (root / samples_k(f"old{i}")).parent.mkdir(parents=True, exist_ok=True)
        (root / samples_k(f"old{i}")).write_bytes(b"s" * 30 * KIB)
    spool = Spool(root, SpoolConfig(max_bytes=128 * KIB, max_age_s=3600)).open()

    def walked(*_args, **_kwargs):
        raise AssertionError("the spool scanned its directory after open()")

    monkeypatch.setattr(os, "walk", walked)
    monkeypatch.setattr(os, "scandir", walked)
    monkeypatch.setattr(os, "listdir", walked)
    for name in ("rglob", "glob", "iterdir", "walk"):
        monkeypatch.setattr(Path, name, walked, raising=False)

    for i in range(6):  # past max_bytes: drop_oldest makes room from the index
        assert spool.put(summary_k(f"new{i}"), b"S" * 20 * KIB, records=i)
    assert spool.take_drops().samples == 3
    e = spool.next()
    assert e.key == summary_k("new0") and spool.read(e) == b"S" * 20 * KIB
    spool.done(e)
    spool.expire()
    spool.retry_memory()
    assert spool.pending == 5 and spool.bytes == 5 * 20 * KIB
    monkeypatch.undo()
    assert sorted(objects_on_disk(root)) == sorted(spool.keys())


# --- 3. damaged files ---------------------------------------------------------------------------


def test_the_uploader_quarantines_damaged_files_and_sends_the_good_ones(real, tmp_path, caplog):
    root = tmp_path / "spool"
    s = real.objects
    truncated_summary = s[real.summaries[1]][:-100]
    flipped = bytearray(s[real.summaries[2]])
    flipped[len(flipped) // 2] ^= 0x10  # one bit in the body
    truncated_samples = s[real.samples[0]][: len(s[real.samples[0]]) // 2]
    damaged = {real.summaries[1]: truncated_summary, real.summaries[2]: bytes(flipped),
               real.samples[0]: truncated_samples}
    good = {k: s[k] for k in (real.summaries[0], real.samples[1], real.samples[2])}
    for key, data in {**damaged, **good}.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    spool = Spool(root).open()
    store = Store(tmp_path / "store")

    with caplog.at_level(logging.ERROR, logger="edge_runtime.spool"):
        results = drain(Uploader(spool, store))
    assert results == [True] * 6
    assert sorted(store.puts) == sorted(good)  # the damaged ones were never offered to the store
    assert {k: store.get(k) for k in store.list()} == good
    assert spool.quarantined == 3 and spool.pending == 0 and spool.bytes == 0
    assert objects_on_disk(root) == {}
    for key, data in damaged.items():
        assert (root / ".quarantine" / key).read_bytes() == data  # kept as it was, for a look
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    for key in damaged:
        (line,) = [m for m in errors if key in m]
        assert "damaged" in line and ".quarantine" in line
    assert any("truncated" in m for m in errors if real.summaries[1] in m)
    assert any("checksum" in m for m in errors if real.summaries[2] in m)


def test_a_summary_with_a_flipped_flags_bit_is_quarantined_not_sent(real, tmp_path):
    key = real.summaries[0]
    data = bytearray(real.objects[key])
    data[5] ^= 1  # the preamble's flags byte: "body gzipped"
    with pytest.raises(ValueError):
        load_summary(bytes(data), key)  # no reader can decode it
    root = tmp_path / "spool"
    (root / key).parent.mkdir(parents=True)
    (root / key).write_bytes(bytes(data))
    spool = Spool(root).open()
    store = Store(tmp_path / "store")
    drain(Uploader(spool, store))
    assert store.puts == [] and spool.quarantined == 1


# --- 4. bounds -------------------------------------------------------------------------------------


def test_drop_oldest_drops_the_oldest_samples_first_then_the_oldest_summaries(tmp_path, caplog):
    root = tmp_path / "spool"
    spool = Spool(root, SpoolConfig(max_bytes=100 * KIB, when_full="drop_oldest")).open()
    put = spool.put
    assert put(summary_k("s1"), b"1" * 20 * KIB, records=10)
    assert put(summary_k("s2"), b"2" * 20 * KIB, records=20)
    assert put(samples_k("p1"), b"a" * 20 * KIB)
    assert put(samples_k("p2"), b"b" * 20 * KIB)
    assert put(samples_k("p3"), b"c" * 20 * KIB)  # exactly full
    assert spool.take_drops() is None

    with caplog.at_level(logging.WARNING, logger="edge_runtime.spool"):
        assert put(summary_k("s3"), b"3" * 30 * KIB, records=30)  # makes room: p1, p2 go (older summaries stay)
    assert set(spool.keys()) == {summary_k("s1"), summary_k("s2"), summary_k("s3"), samples_k("p3")}
    assert sum(1 for r in caplog.records if "dropped" in r.getMessage()) == 2

    assert put(summary_k("s4"), b"4" * 60 * KIB, records=40)  # p3, then s1, then s2
    assert spool.keys() == [summary_k("s3"), summary_k("s4")]
    assert sorted(objects_on_disk(root)) == sorted(spool.keys())  # the dropped files are gone from disk
    assert spool.bytes == 90 * KIB

    d = spool.take_drops()
    assert (d.summaries, d.samples, d.records) == (2, 3, 30)
    assert "drop_oldest" in d.reason
    assert spool.take_drops() is None  # reset


def test_drop_oldest_leaves_the_object_in_flight_alone(tmp_path):
    spool = Spool(tmp_path / "spool", SpoolConfig(max_bytes=64 * KIB)).open()
    assert spool.put(summary_k("s1"), b"1" * 30 * KIB, records=1)
    assert spool.put(summary_k("s2"), b"2" * 30 * KIB, records=2)
    sending = spool.next()
    assert sending.key == summary_k("s1")
    assert spool.put(summary_k("s3"), b"3" * 30 * KIB, records=3)  # s1 is being sent: s2 goes instead
    assert spool.keys() == [summary_k("s1"), summary_k("s3")]
    assert spool.take_drops().records == 2


def test_drop_counts_survive_a_restart_and_the_records_of_a_dropped_file_are_read_from_it(real, tmp_path):
    root = tmp_path / "spool"
    config = SpoolConfig(max_bytes=64 * KIB)
    spool = Spool(root, config).open()
    key = real.summaries[0]
    assert spool.put(key, real.objects[key], records=60)
    spool.close()

    spool = Spool(root, config).open()  # the index now knows the file only: not its records
    assert spool.put(samples_k("big"), os.urandom(63 * KIB))
    spool.close()

    spool = Spool(root, config).open()
    assert (root / ".drops.json").is_file()
    d = spool.take_drops()
    assert (d.summaries, d.samples, d.records) == (1, 0, 60)
    spool.close()
    assert Spool(root, config).open().take_drops() is None  # taken is taken, across restarts too


def test_reject_new_refuses_the_new_object_and_counts_it(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root, SpoolConfig(max_bytes=64 * KIB, when_full="reject_new")).open()
    assert spool.put(samples_k("p1"), b"a" * 30 * KIB)
    assert spool.put(summary_k("s1"), b"1" * 30 * KIB, records=7)
    assert spool.put(summary_k("s2"), b"2" * 10 * KIB, records=8) is False
    assert spool.put(samples_k("p2"), b"b" * 10 * KIB) is False
    assert spool.keys() == [summary_k("s1"), samples_k("p1")]
    assert sorted(objects_on_disk(root)) == sorted(spool.keys())
    d = spool.take_drops()
    assert (d.summaries, d.samples, d.records) == (1, 1, 8) and "reject_new" in d.reason


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_an_object_larger_than_the_spool_is_refused_and_nothing_else_goes(tmp_path, policy):
    root = tmp_path / "spool"
    spool = Spool(root, SpoolConfig(max_bytes=64 * KIB, when_full=policy)).open()
    assert spool.put(samples_k("p1"), b"a" * 10 * KIB)
    assert spool.put(summary_k("huge"), b"H" * 65 * KIB, records=99) is False
    assert spool.keys() == [samples_k("p1")] and sorted(objects_on_disk(root)) == [samples_k("p1")]
    d = spool.take_drops()
    assert (d.summaries, d.samples, d.records) == (1, 0, 99) and "larger than" in d.reason


def test_max_age_drops_old_objects_and_counts_them(real, tmp_path):
    root = tmp_path / "spool"
    old_summary = real.summaries[0]
    spool = Spool(root, SpoolConfig(max_age_s=3600)).open()
    assert spool.put(old_summary, real.objects[old_summary], records=60)
    assert spool.put(samples_k("old"), b"p" * 100)
    spool.close()
    now = time.time()
    for key in (old_summary, samples_k("old")):  # left by a run a day ago
        os.utime(root / key, (now - 86_400, now - 86_400))
    spool = Spool(root, SpoolConfig(max_age_s=3600)).open()
    assert spool.put(summary_k("new"), b"n" * 100, records=5)

    spool.expire(now=now)  # the new one is younger than an hour: it stays
    assert spool.keys() == [summary_k("new")] and list(objects_on_disk(root)) == [summary_k("new")]
    d = spool.take_drops()
    assert (d.summaries, d.samples, d.records) == (1, 1, 60) and "max_age_s" in d.reason
    spool.expire(now=now)
    assert spool.take_drops() is None
    spool.expire(now=now + 3601)
    assert spool.keys() == [] and spool.take_drops().records == 5


def run_offline_then_flush(make_config, tmp_path, windows: int):
    """A runtime whose store is down for ``windows`` one-minute windows of 20 records each, with a
    64 KiB spool (drop_oldest); then a start with the store up. Returns (stored summaries, drops
    still waiting to be reported)."""
    config = make_config(window={"seconds": 60}, spool={"max_bytes": 64 * KIB})
    store = Store(tmp_path / "store", online=False)
    rows = normal_rows(20 * windows)
    with EdgeRuntime(config, store=store) as rt:
        rt.process(record_line(r, ts=T0 + 3 * i) for i, r in enumerate(rows))
    store.online = True
    EdgeRuntime(config, store=store).close()
    stored = [load_summary(store.get(k), k) for k in store.list("summaries/")]
    spool = Spool(config.sinks.outbox).open()
    left = spool.take_drops()
    spool.close()
    return stored, left


def accounted(stored, left) -> int:
    """Records the fleet can see: in a summary, or counted as dropped in a header or the drops file."""
    return (sum(s.records for s in stored) + sum(s.spool_dropped.records for s in stored if s.spool_dropped)
            + (left.records if left else 0))


def test_records_dropped_by_a_full_spool_are_reported_in_the_next_summaries(make_config, tmp_path):
    stored, left = run_offline_then_flush(make_config, tmp_path, windows=45)
    assert len(stored) < 45  # the spool could not hold them all
    assert any(s.spool_dropped and s.spool_dropped.summaries for s in stored)
    assert accounted(stored, left) == 45 * 20


def test_in_a_long_outage_no_drop_report_is_lost(make_config, tmp_path):
    stored, left = run_offline_then_flush(make_config, tmp_path, windows=90)
    assert accounted(stored, left) == 90 * 20


# --- 5. a full disk (simulated) -------------------------------------------------------------------


def test_a_full_disk_keeps_objects_in_memory_they_are_sent_from_there_and_written_when_space_returns(
        real, tmp_path, disk, caplog):
    root = tmp_path / "spool"
    spool = Spool(root).open()
    s0, s1, p0 = real.summaries[0], real.summaries[1], real.samples[0]
    disk.full = True
    with caplog.at_level(logging.WARNING, logger="edge_runtime.spool"):
        assert spool.put(s0, real.objects[s0], records=60) is True  # no exception
        assert spool.put(p0, real.objects[p0]) is True
    assert spool.disk_full == "No space left on device"
    assert spool.pending == 2 and spool.bytes == len(real.objects[s0]) + len(real.objects[p0])
    assert objects_on_disk(root) == {}
    assert sum(1 for r in caplog.records if r.levelno == logging.ERROR) == 1  # said once

    store = Store(tmp_path / "store")
    assert drain(Uploader(spool, store)) == [True, True]  # sent from memory
    assert {k: store.get(k) for k in store.list()} == {s0: real.objects[s0], p0: real.objects[p0]}
    assert (spool.pending, spool.bytes) == (0, 0)

    assert spool.put(s1, real.objects[s1], records=60)  # the link went down again; still full
    spool.retry_memory()
    assert spool.disk_full and objects_on_disk(root) == {}  # still no space: stays in memory

    disk.full = False
    with caplog.at_level(logging.WARNING, logger="edge_runtime.spool"):
        spool.retry_memory()
    assert spool.disk_full is None
    assert objects_on_disk(root) == {s1: real.objects[s1]}
    assert spool.pending == 1 and spool.bytes == len(real.objects[s1])
    assert any("writing again" in r.getMessage() for r in caplog.records)
    e = spool.next()
    assert e.data is None and spool.read(e) == real.objects[s1]  # read back from disk now
    spool.release()
    spool.close()
    assert Spool(root).open().keys() == [s1]  # durable: a restart finds it


def test_a_put_that_reaches_the_disk_ends_disk_full_once_memory_is_empty(real, tmp_path, disk, caplog):
    spool = Spool(tmp_path / "spool").open()
    s0, s1 = real.summaries[:2]
    disk.full = True
    assert spool.put(s0, real.objects[s0], records=60)
    assert drain(Uploader(spool, Store(tmp_path / "store"))) == [True]  # memory is empty again
    assert spool.disk_full  # nothing has been written since: still unknown
    disk.full = False
    with caplog.at_level(logging.WARNING, logger="edge_runtime.spool"):
        assert spool.put(s1, real.objects[s1], records=60)
    assert spool.disk_full is None and (tmp_path / "spool" / s1).is_file()
    assert any("writing again" in r.getMessage() for r in caplog.records)


def test_memory_is_bounded_while_the_disk_is_full(tmp_path, disk):
    root = tmp_path / "spool"
    spool = Spool(root, SpoolConfig(max_memory_bytes=50 * KIB, when_full="drop_oldest")).open()
    assert spool.put(samples_k("on-disk"), b"d" * 30 * KIB)  # written before the disk filled
    disk.full = True
    assert spool.put(samples_k("m1"), b"a" * 20 * KIB)
    assert spool.put(samples_k("m2"), b"b" * 20 * KIB)
    assert spool.put(summary_k("m3"), b"c" * 20 * KIB, records=7)  # m1 goes
    assert spool.put(summary_k("m4"), b"e" * 40 * KIB, records=8)  # m2, then m3 go
    assert spool.keys() == [summary_k("m4"), samples_k("on-disk")]  # the object on disk is not memory's to drop
    assert spool.bytes == 70 * KIB
    assert spool.put(summary_k("m5"), b"f" * 51 * KIB, records=9) is False  # larger than all of memory
    d = spool.take_drops()
    assert (d.summaries, d.samples, d.records) == (2, 2, 16)

    reject = Spool(tmp_path / "other", SpoolConfig(max_memory_bytes=50 * KIB, when_full="reject_new")).open()
    assert reject.put(summary_k("m1"), b"a" * 40 * KIB, records=1)
    assert reject.put(summary_k("m2"), b"b" * 20 * KIB, records=2) is False
    assert reject.keys() == [summary_k("m1")]
    assert reject.take_drops().records == 2


def test_a_successful_write_after_a_full_disk_clears_disk_full(tmp_path, disk):
    spool = Spool(tmp_path / "spool").open()
    disk.full = True
    assert spool.checkpoint("aaaaaaaaaaaa", b"summary") is False
    assert spool.disk_full
    disk.full = False
    spool.retry_memory()  # what the runtime's chores do
    assert spool.checkpoint("aaaaaaaaaaaa", b"summary") is True
    assert spool.disk_full is None  # the health header and log line would still say DISK_FULL


def test_objects_written_from_memory_respect_max_bytes(tmp_path, disk):
    root = tmp_path / "spool"
    spool = Spool(root, SpoolConfig(max_bytes=100 * KIB)).open()
    disk.full = True
    for i in range(3):
        assert spool.put(summary_k(f"s{i}"), b"s" * 40 * KIB, records=i)
    disk.full = False
    spool.retry_memory()
    on_disk = sum(len(v) for v in objects_on_disk(root).values())
    assert on_disk <= 100 * KIB


# --- 6. one writer --------------------------------------------------------------------------------


def test_a_second_spool_on_the_same_directory_is_refused_until_the_first_closes(tmp_path):
    root = tmp_path / "spool"
    first = Spool(root).open()
    with pytest.raises(SpoolBusy, match=re.escape(str(root))) as err:
        Spool(root).open()
    assert f"pid {os.getpid()}" in str(err.value)
    first.close()
    second = Spool(root).open()
    assert second.put(summary_k("s"), b"x")
    second.close()


def test_a_second_runtime_on_the_same_outbox_refuses_to_start(make_config):
    config = make_config()
    with EdgeRuntime(config, store=Store(config.store.url)):
        with pytest.raises(SpoolBusy, match="two runtimes must not share one spool"):
            EdgeRuntime(config, store=Store(config.store.url))


# --- 7. checkpoints ------------------------------------------------------------------------------


def kill(rt: EdgeRuntime) -> None:
    """What survives a SIGKILL: the files. The lock goes with the process; the open window is not
    closed, nothing is uploaded. (The sinks hold nothing unwritten between batches: closing them
    only gives their descriptors back.)"""
    rt.spool.close()
    rt.events.close()
    rt.dead_letter.close()


def spike_rows(n: int, seed: int = 0, every: int = 25):
    rows = normal_rows(n, seed=seed)
    rows[5::every, 5] += 2000
    return rows


def checkpoint_of(rt) -> Path:
    """The open window's checkpoint file (one per window part)."""
    return rt.spool.root / ".checkpoint" / f"{rt._checkpoint_name(rt.window)}.ckpt"


def test_a_killed_runtimes_checkpoint_becomes_a_part_of_its_window(make_config, tmp_path, caplog):
    config = make_config()
    rows = spike_rows(70)
    rt = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(rows[:50]))
    outliers_so_far = rt.window.outliers
    assert outliers_so_far >= 2
    rt.checkpoint()
    assert checkpoint_of(rt).is_file()
    rt.process(record_line(r, ts=T0 + 50 + i) for i, r in enumerate(rows[50:]))  # after the checkpoint: lost
    old = rt.instance_id
    kill(rt)

    store = Store(tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.spool"):
        rt2 = EdgeRuntime(config, store=store)
    assert any("recovered the open window" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "outbox" / ".checkpoint").glob(f"{old}-*.ckpt"))
    keys = rt2.spool.keys()
    assert len(keys) == 2 and all(f"-{old}-p0." in k for k in keys)  # under the killed instance's id
    rt2.close()

    (key,) = store.list("summaries/")
    s = load_summary(store.get(key), key)
    assert (s.instance_id, s.part, s.records, s.outliers) == (old, 0, 50, outliers_so_far)
    assert s.window_start.timestamp() == T0
    (samples,) = store.list("outliers/")
    assert window_name(samples) == window_name(key) == "20261101T000000Z-p0"
    assert len(read_samples(store.get(samples))) == outliers_so_far


@pytest.mark.parametrize("damage", ["truncated", "bit flipped", "not a summary"])
def test_a_damaged_checkpoint_is_quarantined_not_loaded(make_config, tmp_path, caplog, damage):
    config = make_config()
    rt = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(normal_rows(30)))
    rt.checkpoint()
    path = checkpoint_of(rt)
    blob = bytearray(path.read_bytes())
    kill(rt)
    if damage == "truncated":
        blob = blob[:-50]
    elif damage == "bit flipped":
        blob[len(blob) // 2] ^= 0x01
    else:  # whole and with a valid CRC, but what it holds is no summary
        body = struct.pack("<I", 3) + b"abc"
        blob = bytearray(spool_module._CKPT.pack(b"ELCK", len(body), zlib.crc32(body)) + body)
    path.write_bytes(bytes(blob))

    with caplog.at_level(logging.ERROR, logger="edge_runtime.spool"):
        rt2 = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    assert rt2.spool.keys() == []  # nothing loaded from it
    assert not path.exists()
    assert (tmp_path / "outbox" / ".quarantine" / ".checkpoint" / path.name).read_bytes() == bytes(blob)
    assert any(path.name in r.getMessage() and "quarantine" in r.getMessage() for r in caplog.records)
    rt2.close(upload_timeout=0.1)


def test_a_checkpoint_of_a_window_already_written_is_not_added_twice(make_config, tmp_path):
    config = make_config()
    outbox = tmp_path / "outbox"
    rt = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(normal_rows(40)))
    rt.checkpoint()
    ckpt = checkpoint_of(rt)
    saved = ckpt.read_bytes()
    rt.process(record_line(r, ts=T0 + 40 + i) for i, r in enumerate(normal_rows(20, seed=1)))
    rt.close(upload_timeout=0.1)  # the window is written whole (60 records); its checkpoint cleared
    assert not ckpt.exists()
    ckpt.write_bytes(saved)  # as if killed between writing the window and clearing its checkpoint

    store = Store(tmp_path / "store")
    rt2 = EdgeRuntime(config, store=store)
    (key,) = [k for k in rt2.spool.keys() if k.startswith("summaries/")]
    assert f"-{rt.instance_id}-p0.elws" in key
    assert load_summary((outbox / key).read_bytes(), key).records == 60  # the full window, not the checkpoint
    assert not ckpt.exists()
    rt2.close()
    assert [load_summary(store.get(k), k).records for k in store.list("summaries/")] == [60]


def test_a_recovered_checkpoint_is_not_deleted_while_its_part_lives_only_in_memory(make_config, tmp_path, disk):
    config = make_config()
    rt = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(normal_rows(30)))
    rt.checkpoint()
    kill(rt)

    disk.full = True  # the runtime restarts on a full disk (and is killed again before space returns)
    rt2 = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    (recovered,) = [k for k in rt2.spool.keys() if k.startswith("summaries/")]  # into memory
    assert rt2.spool.disk_full and not (tmp_path / "outbox" / recovered).exists()
    kill(rt2)

    disk.full = False
    rt3 = EdgeRuntime(config, store=Store(tmp_path / "store", online=False))
    assert recovered in rt3.spool.keys()  # the 30 records are still somewhere durable
    kill(rt3)


# --- 8. JSON-lines sinks on a full disk -------------------------------------------------------------


def test_jsonl_sink_counts_lost_lines_on_a_full_disk_and_resumes_with_whole_lines(tmp_path, monkeypatch, caplog):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    real_write = os.write
    state = {"mode": "ok"}

    def write(fd, view):
        if state["mode"] == "ok":
            return real_write(fd, view)
        if state["mode"] == "partial":  # the last free bytes: part of the buffer, cut inside a line
            state["mode"] = "full"
            return real_write(fd, view[:len(view) // 2 - 20])
        no_space()

    monkeypatch.setattr(sinks_module, "os", os_with(write=write))

    def batch(first: int, n: int) -> None:
        for i in range(first, first + n):
            sink.write_raw(orjson.dumps({"n": i, "pad": "x" * 40}))
        sink.flush()

    batch(0, 4)
    state["mode"] = "partial"
    with caplog.at_level(logging.WARNING, logger="edge_runtime.sinks"):
        batch(4, 4)  # one line and a half make it
        batch(8, 4)  # nothing does
        batch(12, 4)
        assert sink.failing == "No space left on device"
        assert sink.lost == 3 + 4 + 4
        state["mode"] = "ok"
        batch(16, 4)
        sink.close()
    assert sink.failing is None and sink.written == 20
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0].getMessage()  # logged once, not per batch
    assert any("writing again" in r.getMessage() and "11 lines lost" in r.getMessage() for r in caplog.records)

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # the file ends with a whole line
    parsed, torn = [], []
    for line in lines[:-1]:
        try:
            parsed.append(orjson.loads(line)["n"])
        except orjson.JSONDecodeError:
            torn.append(line)
    assert parsed == [0, 1, 2, 3, 4, 16, 17, 18, 19]
    assert len(torn) == 1 and torn[0].startswith(b'{"n":5,')  # the cut line stands alone
    assert len(parsed) + sink.lost == sink.written


# --- 9. a real full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no space left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"f" * (64 * KIB), b"f" * 512, b"f"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_a_real_full_disk_loses_no_window(make_config, small_disk, tmp_path):
    config = make_config(
        window={"seconds": 60, "lateness_s": 3600},  # windows close on records only, never on a slow tick
        sinks={"events": str(small_disk / "events.jsonl"), "dead_letter": str(small_disk / "dead-letter.jsonl"),
               "outbox": str(small_disk / "outbox")},
    )
    outbox = small_disk / "outbox"
    store = Store(tmp_path / "store", online=False)
    rows = spike_rows(360, every=30)
    lines = [record_line(r, ts=T0 + i) for i, r in enumerate(rows)]  # six one-minute windows
    lines[100:100] = ["{not json"]
    lines[250:250] = ['{"ts": 1, "features": []}']

    rt = EdgeRuntime(config, store=store)
    filler = small_disk / "filler"
    fill(filler)
    stats = rt.process(lines[:302])  # windows 1-4 close, window 5 open
    assert (stats.scored, stats.rejected, stats.windows) == (300, 2, 4)
    assert rt.spool.disk_full and rt.health.window_header().disk_full
    assert rt.events.lost > 0 and rt.events.failing and rt.dead_letter.lost == 2
    assert rt.health.window_header().lines_lost == rt.events.lost + 2  # reported, not only counted
    kept = rt.spool.keys()
    assert len([k for k in kept if k.startswith("summaries/")]) == 4
    assert not any((outbox / k).exists() for k in kept)  # all in memory

    filler.unlink()
    rt._chores_at = 0  # due now
    rt.tick()
    assert rt.spool.disk_full is None
    assert set(objects_on_disk(outbox)) == set(kept)  # memory written out
    stats = rt.process(lines[302:])  # closes window 5, on disk
    assert stats.windows == 5 and (outbox / [k for k in rt.spool.keys() if "T000400Z" in k][0]).is_file()
    assert rt.events.failing is None and rt.spool.disk_full is None

    store.online = True
    stats = rt.close()
    assert (stats.scored, stats.rejected, stats.pending) == (360, 2, 0)
    assert objects_on_disk(outbox) == {}
    got = {k: load_summary(store.get(k), k) for k in store.list("summaries/")}
    assert sorted(window_name(k) for k in got) == [f"20261101T00{m:02d}00Z-p0" for m in range(6)]
    assert sum(s.records for s in got.values()) == 360 and sum(s.rejected for s in got.values()) == 2
    assert len(store.puts) == len(set(store.puts))  # each object sent once
    # the header of each window tells whether the spool was writing when it closed
    assert [s.health.disk_full for _, s in sorted(got.items())] == [False, True, True, True, False, False]


def test_the_cli_starts_scores_and_ships_on_a_disk_that_is_already_full(small_disk, bundle_dir, tmp_path):
    """A device whose disk filled while it was down must not crash-loop on restart."""
    import sys

    fill(small_disk / "filler")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(record_line(r, ts=T0 + 10 * i) + "\n" for i, r in enumerate(normal_rows(300))))
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"device_id: full\nbundle: {bundle_dir}\nwindow: {{seconds: 600}}\n"
                   f"sinks: {{events: {small_disk}/events.jsonl, dead_letter: {small_disk}/dl.jsonl, "
                   f"outbox: {small_disk}/outbox}}\nstore: {{url: {tmp_path}/store}}\n")
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "--config", str(cfg), "--input", str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "scored=300" in proc.stdout
    store = LocalStore(tmp_path / "store")
    assert sum(load_summary(store.get(k), k).records for k in store.list("summaries/")) == 300


# -- regressions found in review ---------------------------------------------------------------------

def _part(rows: int, start: float = T0, part: int = 0, instance: str = "0123456789ab"):
    """A real encoded summary part: (key, bytes, records)."""
    from edge_runtime.contracts import summary_key
    from edge_runtime.summary import MatrixAccumulator
    from edge_runtime.summary_format import encode
    from edge_runtime.windows import Window

    w = Window(start=start, end=start + 3600, model_name="m", model_version="1.0.0", feature_names=["a"],
               features=MatrixAccumulator([[0.0]]), score=MatrixAccumulator([[1.0]]), part=part)
    w.features.update(np.random.default_rng(rows).normal(size=(rows, 1)).astype(np.float32))
    w.score.update(np.ones((rows, 1), np.float32))
    w.records = rows
    s = w.summary("dev", None, instance)
    return summary_key("m", "1.0.0", "dev", s.window_start, part, instance), encode(s), rows


def _summaries_refused(spool: Spool, monkeypatch) -> None:
    """A disk with room for small files but not for summaries."""
    real = spool._write

    def write(key, data):
        if key.startswith("summaries/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(key, data)

    monkeypatch.setattr(spool, "_write", write)


def test_a_window_held_in_memory_keeps_its_checkpoint_when_the_next_window_checkpoints(tmp_path, monkeypatch):
    root = tmp_path / "spool"
    spool = Spool(root).open()
    _summaries_refused(spool, monkeypatch)
    key, early, _ = _part(100)
    spool.checkpoint("i-w1", early)
    key, final, records = _part(150)
    assert spool.put(key, final, records, replaces_checkpoint="i-w1")  # held in memory: the disk refused it
    assert spool.checkpoint("i-w2", _part(10, T0 + 3600)[1])  # the next window's checkpoint fits
    os.close(spool._lock_fd)  # kill -9: the memory copy is gone
    again = Spool(root).open()
    assert key in again.keys()  # the window's checkpoint survived and became its part
    assert load_summary((root / key).read_bytes(), key).records == 100


def test_a_window_sent_from_memory_leaves_no_checkpoint_to_conflict_with(tmp_path, monkeypatch):
    root, store = tmp_path / "spool", LocalStore(tmp_path / "store")
    spool = Spool(root).open()
    _summaries_refused(spool, monkeypatch)
    key, early, _ = _part(100)
    spool.checkpoint("i-w1", early)
    key, final, records = _part(150)
    spool.put(key, final, records, replaces_checkpoint="i-w1")
    health = Health()
    assert Uploader(spool, store, health).send_one() is True  # sent from memory
    spool.close()
    again = Spool(root).open()
    assert again.keys() == [] and Uploader(again, store, health).send_one() is None
    assert health.writer_conflicts == 0 and store.get(key) == final


def test_the_uploader_waits_quietly_when_the_store_is_down_and_the_spool_empties(tmp_path):
    import threading

    from edge_runtime.presence import Presence

    spool = Spool(tmp_path / "spool").open()
    store = Store(tmp_path / "store", online=False)
    calls = {"next": 0}
    real_next = spool.next

    def counting_next():
        calls["next"] += 1
        return real_next()

    spool.next = counting_next
    key, data, _ = _part(10)
    spool.put(key, data)
    up = Uploader(spool, store, Health(), Presence(store, "dev", "0123456789ab", every_s=0.05), backoff_max_s=0.1)
    up.start()
    time.sleep(0.3)  # at least one failure: the store counts as down
    with spool._lock:  # the object leaves the spool while the store is down (expired, say)
        spool._drop(spool._queues["summary"][key], "test")
    time.sleep(0.2)
    before = calls["next"]
    time.sleep(1.0)
    up.stop(1.0)
    assert calls["next"] - before < 50  # a hot loop makes hundreds of thousands of calls a second
    assert threading.active_count() < 50


def test_an_unreadable_spool_file_is_set_aside_and_the_rest_go_on(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool").open()
    keys = []
    for i in range(3):
        key, data, _ = _part(10 + i, T0 + 3600 * i)
        spool.put(key, data)
        keys.append(key)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == keys[0].rsplit("/", 1)[1] and ".quarantine" not in str(self):
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    store = LocalStore(tmp_path / "store")
    up = Uploader(spool, store)
    while up.send_one() is not None:
        pass
    assert sorted(store.list("summaries/")) == sorted(keys[1:])
    assert spool.quarantined == 1 and (spool.root / ".quarantine" / keys[0]).exists()


def test_a_part_forgotten_behind_older_windows_is_never_numbered_again(make_config, monkeypatch):
    from edge_runtime import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "RECENT_PARTS", 3)
    rt = EdgeRuntime(make_config())
    try:
        assert rt._next_part("1.0.0", 100.0) == 0  # a live window
        for start in (1.0, 2.0, 3.0):  # a backfill of older windows pushes it out
            rt._next_part("1.0.0", start)
        assert rt._next_part("1.0.0", 100.0) > 1_000_000_000_000  # not part 0 again
    finally:
        rt.close()


def test_a_presence_note_with_our_own_host_and_pid_is_a_restarted_container_not_a_second_writer(tmp_path):
    from edge_runtime.presence import Presence

    store = LocalStore(tmp_path / "store")
    before = Presence(store, "dev", "aaaaaaaaaaaa", every_s=60)
    before.announce(Health())  # the container's previous life, PID 1 as now
    now = Presence(store, "dev", "bbbbbbbbbbbb", every_s=60)
    health = Health()
    assert now.announce(health) == [] and health.writer_conflicts == 0
