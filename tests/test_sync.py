"""Store-and-forward against real S3 semantics: moto in server mode on loopback, behind a TCP
proxy that can refuse or hang the link, and the real runtime (in process, or the CLI killed
with SIGKILL and restarted)."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import pytest
import yaml
from helpers import normal_rows, record_line, wait_for, window_name
from netfault import FaultProxy

from cloud.drift import load_fleet
from edge_runtime.contracts import load_summary, summary_key
from edge_runtime.runtime import EdgeRuntime
from edge_runtime.spool import SpoolBusy
from edge_runtime.store import LocalStore, S3Store, StoreError, open_store

T0 = 1_793_491_200  # 2026-11-01T00:00:00Z


def s3_config(bucket: str, endpoint: str, **extra) -> dict:
    return {"url": f"s3://{bucket}/fleet", "endpoint_url": endpoint, "connect_timeout_s": 1, "read_timeout_s": 1,
            "retry_max_s": 0.5, "presence_s": 0, **extra}


def stored(bucket: str, endpoint: str) -> dict:
    store = open_store(f"s3://{bucket}/fleet", endpoint_url=endpoint)
    return {k: load_summary(store.get(k), k) for k in store.list("summaries/")}


def by_window(summaries: dict) -> Counter:
    counts: Counter = Counter()
    for s in summaries.values():
        counts[s.window_start.timestamp()] += s.records
    return counts


@pytest.fixture
def proxy(moto_endpoint):
    u = urlparse(moto_endpoint)
    with FaultProxy(u.hostname, u.port).start() as p:
        yield p


def _lines(n: int, step: float = 2.0, seed: int = 0) -> list[str]:
    return [record_line(r, ts=T0 + step * i, rid=f"r{i}") for i, r in enumerate(normal_rows(n, seed=seed))]


@pytest.mark.parametrize("fault", ["refuse", "hang"])
def test_scoring_goes_on_while_the_store_fails_and_every_window_arrives_once(
        fault, make_config, s3_bucket, moto_endpoint, proxy):
    lines = _lines(3000)  # 2 s apart: 100 one-minute windows
    config = make_config(window={"seconds": 60}, store=s3_config(s3_bucket, proxy.url))
    rt = EdgeRuntime(config)
    rt.uploader.start()
    proxy.set_mode(fault)
    rt.process(lines[:1500])  # 49 windows close while the store is unreachable
    assert rt.health.scored == 1500 and rt.health.windows == 49
    wait_for(lambda: rt.health.upload_failures >= 1)
    assert rt.health.uploaded == 0 and rt.spool.pending >= 49  # all of it safe in the spool
    proxy.set_mode("pass")
    rt.process(lines[1500:])
    wait_for(lambda: rt.health.uploaded >= 99, timeout=30)  # the backlog drains once the link is back
    rt.close(upload_timeout=20)
    assert rt.spool.pending == 0 and rt.health.writer_conflicts == 0
    got = stored(s3_bucket, moto_endpoint)
    assert len(got) == 100 and sum(s.records for s in got.values()) == 3000
    assert sorted(by_window(got).values()) == [30] * 100  # 30 records a minute, no window twice


def test_stop_is_bounded_while_the_store_hangs_and_the_next_start_sends_the_rest(
        make_config, s3_bucket, moto_endpoint, proxy):
    config = make_config(window={"seconds": 60}, store=s3_config(s3_bucket, proxy.url))
    proxy.set_mode("hang")
    rt = EdgeRuntime(config)
    rt.uploader.start()
    rt.process(_lines(600))
    began = time.monotonic()
    rt.close(upload_timeout=2)
    assert time.monotonic() - began < 8  # bounded by the timeout, whatever the store does
    assert len([k for k in rt.spool.keys() if k.startswith("summaries/")]) == 20  # every window kept
    proxy.set_mode("pass")
    with EdgeRuntime(config) as again:  # the next start forwards what the last one left
        again.process([])
    got = stored(s3_bucket, moto_endpoint)
    assert len(got) == 20 and sum(s.records for s in got.values()) == 600


class AnswerLost:
    """S3 that stores each object but whose first answer for each key never arrives."""

    def __init__(self, inner: S3Store) -> None:
        self.inner, self.url, self.seen = inner, inner.url, set()

    def put(self, key, data, if_absent=False):
        self.inner.put(key, data, if_absent)
        if key not in self.seen:
            self.seen.add(key)
            raise StoreError("connection reset before the answer")

    def get(self, key):
        return self.inner.get(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        self.inner.delete(key)


def test_a_retry_after_a_lost_answer_is_settled_by_the_conditional_put(make_config, s3_bucket, moto_endpoint):
    store = AnswerLost(open_store(f"s3://{s3_bucket}/fleet", endpoint_url=moto_endpoint))
    config = make_config(window={"seconds": 60}, store=s3_config(s3_bucket, moto_endpoint))
    rt = EdgeRuntime(config, store=store)
    rt.uploader.start()
    rt.process(_lines(300))
    wait_for(lambda: rt.spool.pending <= 2)  # the open window, and its samples
    rt.close(upload_timeout=20)
    got = stored(s3_bucket, moto_endpoint)
    assert len(got) == 10 and sum(s.records for s in got.values()) == 300
    assert rt.health.upload_failures >= 10 and rt.health.writer_conflicts == 0 and rt.spool.pending == 0


def test_a_different_object_under_our_key_is_never_overwritten(make_config, s3_bucket, moto_endpoint, caplog):
    config = make_config(window={"seconds": 60}, store=s3_config(s3_bucket, moto_endpoint))
    store = open_store(f"s3://{s3_bucket}/fleet", endpoint_url=moto_endpoint)
    rt = EdgeRuntime(config)
    from datetime import datetime, timezone

    start = datetime.fromtimestamp(T0, tz=timezone.utc)
    key = summary_key("sensor-outliers", "1.0.0", "dev-test", start, 0, rt.instance_id)
    store.put(key, b"somebody else's")
    with caplog.at_level(logging.ERROR):
        rt.process(_lines(60))  # two windows; the first one's key is taken
        rt.close(upload_timeout=20)
    assert store.get(key) == b"somebody else's"
    assert rt.health.writer_conflicts == 1 and "CONFLICT" in caplog.text
    assert list((rt.spool.root / ".conflicts").rglob("*.elws"))  # ours kept aside, not lost
    assert len(list(store.list("summaries/"))) == 2


def test_two_runtimes_with_one_device_id_overwrite_nothing_and_see_each_other(
        make_config, s3_bucket, moto_endpoint, tmp_path, caplog):
    runtimes = []
    for name in ("a", "b"):
        d = tmp_path / name
        config = make_config(window={"seconds": 60}, store=s3_config(s3_bucket, moto_endpoint, presence_s=0.2),
                             sinks={"events": str(d / "events.jsonl"), "dead_letter": str(d / "dl.jsonl"),
                                    "outbox": str(d / "outbox")})
        runtimes.append(EdgeRuntime(config))
    # one process here; on a device they would be two: the second writer says it is our parent
    runtimes[1].uploader.presence.pid = os.getppid()
    with caplog.at_level(logging.ERROR):
        for rt in runtimes:
            rt.uploader.start()
        for rt in runtimes:
            rt.process(_lines(600))
        wait_for(lambda: all(rt.health.writer_conflicts >= 1 for rt in runtimes))
        for rt in runtimes:
            rt.close(upload_timeout=20)
    assert "two runtimes write as device 'dev-test'" in caplog.text
    got = stored(s3_bucket, moto_endpoint)
    assert len(got) == 40 and sum(s.records for s in got.values()) == 1200  # each window twice, one per writer
    assert {s.instance_id for s in got.values()} == {rt.instance_id for rt in runtimes}
    assert all(rt.health.window_header().writer_conflicts >= 1 for rt in runtimes)
    store = open_store(f"s3://{s3_bucket}/fleet", endpoint_url=moto_endpoint)
    assert not list(store.list("devices/"))  # both withdrew their presence at a clean stop


def test_two_runtimes_cannot_share_one_spool(make_config):
    first = EdgeRuntime(make_config())
    try:
        with pytest.raises(SpoolBusy, match="two runtimes must not share one spool"):
            EdgeRuntime(make_config())
    finally:
        first.close()
    EdgeRuntime(make_config()).close()  # free again once the first is gone


def test_replaying_the_same_input_after_a_restart_counts_it_once(make_config, tmp_path, caplog):
    lines = _lines(200, step=18)  # one hour: 200 records in one window
    for _ in range(2):
        with EdgeRuntime(make_config()) as rt:
            rt.process(lines)
    assert rt.health.replays == 1
    store = LocalStore(tmp_path / "store")
    assert len(list(store.list("summaries/"))) == 1
    # the fleet review dedupes too, for a device that lost its spool between the two runs
    rt_state = tmp_path / "outbox" / ".ledger"
    rt_state.unlink()
    with EdgeRuntime(make_config()) as rt:
        rt.process(lines)
    assert len(list(store.list("summaries/"))) == 2
    fleet, warnings = load_fleet(store)
    (windows,) = fleet[("sensor-outliers", "1.0.0")].values()
    assert sum(w.records for w in windows) == 200
    assert any("replayed input counted once" in w for w in warnings)


# -- kill -9, twenty times ---------------------------------------------------------------------------

class Feeder:
    """Writes records stamped with the wall clock into the runtime's Unix socket at a steady rate,
    reconnecting while the runtime is down; remembers every record it handed to the socket."""

    def __init__(self, path: str, rate: float) -> None:
        self.path, self.period = path, 1.0 / rate
        self.sent: list[float] = []
        self.stop = threading.Event()
        self.rows = normal_rows(1000, seed=4)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn, n = None, 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            if conn is None:
                try:
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    conn.connect(self.path)
                except OSError:
                    conn.close()
                    conn = None
                    time.sleep(0.02)
                    continue
            ts = time.time()
            try:
                conn.sendall((record_line(self.rows[n % len(self.rows)], ts=ts, rid=f"k{n}") + "\n").encode())
            except OSError:
                conn.close()
                conn = None
                continue
            self.sent.append(ts)
            n += 1
            next_at += self.period
            time.sleep(max(next_at - time.monotonic(), 0))
        if conn is not None:
            conn.close()


def test_twenty_kills_lose_at_most_the_checkpoint_interval_and_store_every_window_once(
        bundle_dir, s3_bucket, moto_endpoint, tmp_path):
    rate, checkpoint_s, window_s, kills = 200.0, 0.5, 4, 20
    sock = tmp_path / "records.sock"
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({
        "device_id": "dev-kill", "bundle": str(bundle_dir),
        "source": {"kind": "unix", "path": str(sock)},
        "window": {"seconds": window_s, "lateness_s": 1, "checkpoint_s": checkpoint_s},
        "health": {"log_interval_s": 0}, "service": {"grace_s": 15},
        "sinks": {"events": str(tmp_path / "events.jsonl"), "dead_letter": str(tmp_path / "dl.jsonl"),
                  "outbox": str(tmp_path / "outbox")},
        "store": s3_config(s3_bucket, moto_endpoint),
    }))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    log_file = open(tmp_path / "runtime.log", "ab")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "run", "--config", str(cfg)],
                                stdout=log_file, stderr=log_file, env=env)
        wait_for(lambda: proc.poll() is not None or (sock.exists() and _accepts(sock)), timeout=30)
        assert proc.poll() is None, (tmp_path / "runtime.log").read_text()[-3000:]
        return proc

    feeder = Feeder(str(sock), rate)
    rng = random.Random(7)
    proc = start()
    feeder.thread.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.5, 2.5))
            proc.send_signal(signal.SIGKILL)  # mid-window, sometimes mid-upload
            proc.wait()
            proc = start()
        ready = time.time()
        time.sleep(window_s + 2)  # at least one whole window after the last restart
        feeder.stop.set()
        feeder.thread.join(5)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # the last stop is clean: it loses nothing
        assert proc.wait(30) == 0, (tmp_path / "runtime.log").read_text()[-3000:]
    finally:
        feeder.stop.set()
        if proc.poll() is None:
            proc.kill()
        log_file.close()
    got = stored(s3_bucket, moto_endpoint)
    keys = [window_name(k) for k in got]
    assert len(keys) == len(set(zip(keys, (s.instance_id for s in got.values()))))
    sent = Counter(ts // window_s * window_s for ts in feeder.sent)
    counted = by_window(got)
    over = {w: (counted[w], sent[w]) for w in counted if counted[w] > sent[w]}
    assert not over, f"windows counted more records than were sent: {over}"
    lost = len(feeder.sent) - sum(counted.values())
    # each kill loses what arrived since the last checkpoint, plus what was in flight in the socket
    assert lost <= kills * rate * (checkpoint_s + 0.25), (lost, len(feeder.sent))
    # what the last run got, ended by SIGTERM, is whole
    after = [w for w in sent if w >= ready]
    assert after and all(counted[w] == sent[w] for w in after), [(counted[w], sent[w]) for w in after]
    assert not list((tmp_path / "outbox").rglob("*.elws"))  # all forwarded
    assert not list((tmp_path / "outbox").rglob(".tmp-*"))


def _accepts(path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_encryption_and_multipart_with_conditional_puts(s3_bucket, moto_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    store = S3Store(f"s3://{s3_bucket}/enc", endpoint_url=moto_endpoint, sse="AES256", multipart_threshold=5 << 20)
    store.put("small.bin", b"x" * 100, if_absent=True)
    big = os.urandom(12 << 20)  # over the threshold: two parts of 8 MiB and 4 MiB
    store.put("big.bin", big, if_absent=True)
    assert store.get("big.bin") == big
    for key in ("enc/small.bin", "enc/big.bin"):
        assert client.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"
    from edge_runtime.store import ObjectExists

    with pytest.raises(ObjectExists):  # the conditional holds for a multipart upload too
        store.put("big.bin", os.urandom(12 << 20), if_absent=True)
    assert store.get("big.bin") == big
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # the refused one was aborted
    kms = S3Store(f"s3://{s3_bucket}/kms", endpoint_url=moto_endpoint, sse="aws:kms", kms_key_id="alias/edgeloop")
    kms.put("k.bin", b"secret", if_absent=True)
    head = client.head_object(Bucket=s3_bucket, Key="kms/k.bin")
    assert head["ServerSideEncryption"] == "aws:kms" and "edgeloop" in head.get("SSEKMSKeyId", "")
    with pytest.raises(ValueError, match="aws:kms"):
        S3Store(f"s3://{s3_bucket}", endpoint_url=moto_endpoint, sse="AES256", kms_key_id="alias/x")
