import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import normal_rows, read_jsonl, read_samples, record_line, window_name

from cloud import synthetic
from edge_runtime.bundle import BundleError
from edge_runtime.contracts import load_summary
from edge_runtime.runtime import EdgeRuntime
from edge_runtime.store import LocalStore, StoreError

T0 = synthetic.START_TS


def test_runtime_flags_outliers_summarises_windows_and_syncs(make_config, tmp_path):
    rows = normal_rows(200)
    rows[50, 5] += 2000  # rpm spike
    lines = [record_line(r, ts=T0 + 30 * i, rid=f"r{i}") for i, r in enumerate(rows)]  # 100 min: 2 windows
    config = make_config()
    with EdgeRuntime(config) as rt:
        stats = rt.process(lines)
    assert stats.scored == 200 and stats.rejected == 0 and stats.provider == "CPUExecutionProvider"
    events = read_jsonl(tmp_path / "events.jsonl")
    assert "r50" in {e["id"] for e in events}
    assert stats.outliers == len(events) <= 8  # the spike plus at most a few false alarms

    store = LocalStore(tmp_path / "store")
    keys = sorted(store.list("summaries/"))
    prefix = "summaries/model=sensor-outliers/version=1.0.0/device=dev-test/date=2026-11-01/"
    assert [k.startswith(prefix) for k in keys] == [True, True]
    assert [window_name(k) for k in keys] == ["20261101T000000Z-p0", "20261101T010000Z-p0"]
    first, second = (load_summary(store.get(k), k) for k in keys)
    assert first.instance_id == second.instance_id == rt.instance_id and first.schema_version == 4
    assert (first.records, second.records) == (120, 80)
    assert first.features["rpm"].count == 120
    assert first.features["rpm"].mean == pytest.approx(float(rows[:120, 5].astype(np.float64).mean()), rel=1e-6)
    # counted on the bundle baseline's review grids; windows this short leave the counts out (their sketches
    # hold every value, and the review reads them from there)
    assert first.grid == second.grid == rt.model.grid_id and first.features["rpm"].grid_counts is None
    assert first.outliers + second.outliers == stats.outliers
    samples = [k for k in store.list("outliers/")]
    assert samples and "r50" in {e["id"] for e in read_samples(store.get(samples[0]))}
    assert not list(LocalStore(tmp_path / "outbox").list())  # everything forwarded


def test_a_window_counts_every_value_on_the_review_grids_of_its_bundles_baseline(make_config, tmp_path):
    rows = normal_rows(900)
    lines = [record_line(r, ts=T0 + 3 * i) for i, r in enumerate(rows)]  # 45 minutes: one window
    with EdgeRuntime(make_config()) as rt:
        rt.process(lines)
    store = LocalStore(tmp_path / "store")
    (key,) = store.list("summaries/")
    summary = load_summary(store.get(key), key)
    assert summary.grid == rt.model.grid_id and summary.records == 900
    for j, name in enumerate(rt.model.feature_names):  # values at or below each point, exactly
        grid = rt.model.feature_grids[j].astype(np.float32)
        at_or_below = np.searchsorted(np.sort(rows[:, j].astype(np.float32)), grid, side="right")
        assert np.cumsum(summary.features[name].grid_counts).tolist() == at_or_below.tolist(), name
    assert len(summary.score.grid_counts) == len(rt.model.score_grid) and sum(summary.score.grid_counts) <= 900


def test_bad_records_are_dead_lettered_and_serving_goes_on(make_config, tmp_path):
    rows = normal_rows(20)
    good = [record_line(r, ts=T0 + i) for i, r in enumerate(rows)]
    bad = [
        "{not json",
        json.dumps({"ts": T0, "features": [1, 2, 3]}),
        record_line(rows[0], ts=T0).replace('"rpm": ', '"rpm": NaN, "x": '),
        json.dumps({"ts": T0, **dict(zip(synthetic.FEATURES, rows[0].tolist())), "rpm": None}),
        json.dumps({"ts": T0, **dict(zip(synthetic.FEATURES, rows[0].tolist())), "rpm": "high"}),
    ]
    lines = good[:10] + bad + good[10:] + [""]
    with EdgeRuntime(make_config()) as rt:
        stats = rt.process(lines)
    assert stats.scored == 20 and stats.rejected == 5
    letters = read_jsonl(tmp_path / "dead-letter.jsonl")
    assert [d["line_no"] for d in letters] == [11, 12, 13, 14, 15]
    assert "malformed JSON" in letters[0]["reason"] and letters[0]["line"] == "{not json"
    assert "wrong number of features" in letters[1]["reason"]
    assert "non-finite ['rpm']" in letters[2]["reason"] and "missing ['rpm']" in letters[3]["reason"]
    (key,) = LocalStore(tmp_path / "store").list("summaries/")
    s = load_summary(LocalStore(tmp_path / "store").get(key), key)
    assert (s.records, s.rejected) == (20, 5)
    assert (s.features["rpm"].missing, s.features["rpm"].nonfinite) == (1, 1)


def test_late_records_are_counted_in_the_open_window(make_config, tmp_path):
    rows = normal_rows(3)
    lines = [record_line(rows[0], ts=T0 + 3600), record_line(rows[1], ts=T0 + 10), record_line(rows[2], ts=T0 + 3601)]
    with EdgeRuntime(make_config()) as rt:
        rt.process(lines)
    (key,) = LocalStore(tmp_path / "store").list("summaries/")
    s = load_summary(LocalStore(tmp_path / "store").get(key), key)
    assert (s.records, s.late) == (3, 1)


class FlakyStore(LocalStore):
    """A store that is offline until told otherwise."""

    online = False
    attempts = 0

    def put(self, key, data, if_absent=False):
        self.attempts += 1
        if not self.online:
            raise StoreError("network is unreachable")
        super().put(key, data, if_absent)


def test_store_and_forward_loses_nothing_while_offline(make_config, tmp_path):
    store = FlakyStore(tmp_path / "store")
    rows = normal_rows(240)
    lines = [record_line(r, ts=T0 + 60 * i) for i, r in enumerate(rows)]  # 4 hourly windows
    with EdgeRuntime(make_config(), store=store) as rt:
        stats = rt.process(lines)
    assert stats.windows == 4 and stats.sent == 0 and stats.pending >= 4
    outbox = LocalStore(tmp_path / "outbox")
    pending = [k for k in outbox.list() if k.startswith("summaries/")]
    assert len(pending) == 4 and not list(store.list())
    # no uploader thread was started: only the last upload at close, three quick tries, then it gives up
    from edge_runtime.uploader import FINAL_TRIES

    assert store.attempts == FINAL_TRIES == 3

    store.online = True
    with EdgeRuntime(make_config(), store=store) as rt:  # the next start (or window) flushes
        rt.process([])
    assert sorted(store.list("summaries/")) == sorted(pending)
    assert not list(outbox.list())
    total = sum(load_summary(store.get(k), k).records for k in pending)
    assert total == 240


def test_tampered_bundle_refuses_to_start(bundle_dir, make_config, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    (copy / "baseline.json").write_text((copy / "baseline.json").read_text().replace('"count"', '"count" ', 1))
    with pytest.raises(BundleError, match="checksum mismatch for baseline.json"):
        EdgeRuntime(make_config(bundle=str(copy)))
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"device_id: d\nbundle: {copy}\n")
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "--config", str(cfg), "--input", "/dev/null"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert "checksum mismatch for baseline.json" in line


def test_cli_run_reads_stdin_and_reports_provider(bundle_dir, tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"device_id: d1\nbundle: {bundle_dir}\n")
    data = "\n".join(record_line(r, ts=T0 + i) for i, r in enumerate(normal_rows(50))) + "\n{bad\n"
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "--config", str(cfg), "--json"],
                          input=data, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["scored"] == 50 and report["rejected"] == 1 and report["windows"] == 1
    assert report["provider"] == "CPUExecutionProvider"
    assert (tmp_path / "store" / "summaries").is_dir()


def summaries(tmp_path):
    store = LocalStore(tmp_path / "store")
    return {k: load_summary(store.get(k), k) for k in store.list("summaries/")}


def test_a_restart_inside_a_window_adds_a_part_instead_of_overwriting(make_config, tmp_path):
    from cloud.drift import fleet_drift
    from cloud.registry import register

    rows = normal_rows(150)
    for chunk in (rows[:100], rows[100:]):  # two runs, both inside the first hour
        with EdgeRuntime(make_config()) as rt:
            rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(chunk))
    got = summaries(tmp_path)
    # each run writes under its own instance id: two parts of one window, neither overwritten
    assert sorted(window_name(k) for k in got) == ["20261101T000000Z-p0", "20261101T000000Z-p0"]
    assert len({s.instance_id for s in got.values()}) == 2
    assert sum(s.records for s in got.values()) == 150
    register(make_config().bundle, LocalStore(tmp_path / "store"))
    (report,), _ = fleet_drift(LocalStore(tmp_path / "store"))
    assert report.devices[0].records == 150


def test_timestamps_in_milliseconds_and_absurd_values(make_config, tmp_path):
    rows = normal_rows(4)
    big = "1" + "0" * 400
    lines = [
        record_line(rows[0], ts=T0 * 1000),          # milliseconds
        record_line(rows[1], ts=T0).replace(f'"ts": {T0}', f'"ts": {big}'),
        record_line(rows[2], ts=T0).replace('"rpm": ', f'"rpm": {big}, "x": '),
        record_line(rows[3], ts=1e300),
    ]
    with EdgeRuntime(make_config()) as rt:
        stats = rt.process(lines)
    assert (stats.scored, stats.rejected) == (1, 3)
    reasons = [d["reason"] for d in read_jsonl(tmp_path / "dead-letter.jsonl")]
    assert "timestamp" in reasons[0] and "non-finite ['rpm']" in reasons[1] and "timestamp" in reasons[2]
    (s,) = summaries(tmp_path).values()
    assert s.window_start.timestamp() == T0 and s.rejected == 3


def test_neither_a_record_without_ts_nor_a_rejected_one_moves_the_clock(make_config, tmp_path):
    rows = normal_rows(20)
    lines = [record_line(r, ts=T0 + 60 * i) for i, r in enumerate(rows)]
    lines[3] = json.dumps(dict(zip(synthetic.FEATURES, rows[3].tolist())))  # no ts
    lines[6] = json.dumps({"ts": T0 + 30 * 86400, "features": [1, 2]})  # rejected, a month ahead
    with EdgeRuntime(make_config(), clock=lambda: T0 + 10 * 86400) as rt:
        rt.process(lines)
    (s,) = summaries(tmp_path).values()
    assert (s.records, s.rejected, s.late) == (19, 1, 0)


def test_rejections_before_the_first_window_are_counted_in_it(make_config, tmp_path):
    with EdgeRuntime(make_config()) as rt:
        rt.process(["{bad", record_line(normal_rows(1)[0])])
    (s,) = summaries(tmp_path).values()
    assert (s.records, s.rejected) == (1, 1)


def test_a_failing_model_call_dead_letters_the_batch_and_serving_goes_on(make_config, tmp_path, monkeypatch):
    rows = normal_rows(10)
    rt = EdgeRuntime(make_config(batch={"max_records": 4}))
    real_run, calls = rt.model.scorer.session.run, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: out of memory")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(rt.model.scorer.session, "run", flaky, raising=False)
    with rt:
        stats = rt.process(record_line(r, ts=T0 + i) for i, r in enumerate(rows))
    assert (stats.scored, stats.rejected) == (6, 4)
    letters = read_jsonl(tmp_path / "dead-letter.jsonl")
    assert [d["line_no"] for d in letters] == [5, 6, 7, 8]
    assert all("out of memory" in d["reason"] for d in letters)
    assert letters[0]["line"] == record_line(rows[4], ts=T0 + 4)  # the record as it arrived


def test_a_payload_is_acknowledged_once_its_records_are_scored_and_counted(make_config, tmp_path):
    from edge_runtime.sources import Payload

    acks = []
    lines = [record_line(r, ts=T0 + i).encode() for i, r in enumerate(normal_rows(5))] + [b"{bad"]
    with EdgeRuntime(make_config()) as rt:
        payload = Payload("jsonl", lines, "test", 1, ack=lambda: acks.append(rt.health.scored))
        rt.handle([payload])
        assert acks == [5]  # called after the batch was scored (and the reject counted), exactly once
        assert rt.window.records == 5 and rt.window.rejected == 1
