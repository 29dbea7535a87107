"""Stream models: the device's per-stream windows, and the stream detector giving the same scores in
Python and on the device, record by record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud.stream_detector import read_stream_csv, train_stream
from cloud.train import TrainingError
from edge_runtime.contracts import RuntimeConfig, StreamSpec
from edge_runtime.model import load_model
from edge_runtime.runtime import EdgeRuntime
from edge_runtime.streams import StreamWindows
from model_compile.compile import compile_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import nab  # noqa: E402

WINDOW = 256
WARMUP = 64  # a stream's first values are scored, never flagged
PERIOD = 50  # the test series' cycle, which training finds


def reference_scores(values: np.ndarray, mean: float, sd: float, window: int, margin: float = 1.0, smooth: int = 16,
                     weight: float = 2.0, period: int = PERIOD, seasonal_weight: float = 2.0) -> np.ndarray:
    """The detector written plainly, one value at a time, in float64: how far the newest value falls
    outside the range of the stream's previous (window - 1) values, over that range + margin; the same
    for the mean of the newest ``smooth`` values against the earlier means in the window, x ``weight``;
    the same for each value's change over one cycle, x ``seasonal_weight``; the largest of the three. A
    young stream's window is padded with its first value."""
    z = (np.asarray(values, dtype=np.float64) - mean) / sd

    def excursion(series: np.ndarray) -> float:
        hist, newest = series[:-1], series[-1]
        return max(newest - hist.max(), hist.min() - newest, 0.0) / (hist.max() - hist.min() + margin)

    out = np.zeros(len(z))
    for t in range(len(z)):
        w = z[max(0, t - window + 1):t + 1]
        w = np.concatenate([np.full(window - len(w), z[0]), w])
        means = np.convolve(w, np.full(smooth, 1 / smooth), mode="valid")  # each run of `smooth` values
        cycle = w[period:] - w[:-period]  # each value's change over one cycle
        out[t] = max(excursion(w), weight * excursion(means), seasonal_weight * excursion(cycle))
    return out


def series(n: int, seed: int, shift_at: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 50 + 5 * np.sin(2 * np.pi * np.arange(n) / PERIOD) + rng.normal(0, 1, n)
    if shift_at is not None:
        x[shift_at:] += 30
    return x


def write_csv(path: Path, columns: dict[str, list]) -> Path:
    names = list(columns)
    lines = [",".join(names)] + [",".join(str(v) for v in row) for row in zip(*columns.values())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def stream_bundle(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("stream")
    train = series(400, 1)
    data = write_csv(tmp / "train.csv", {"timestamp": list(range(400)), "value": train.tolist()})
    card = train_stream(data, tmp / "trained", name="pump", window=WINDOW)
    compile_bundle(tmp / "trained", tmp / "bundle")
    return tmp / "bundle", {"mean": float(train.mean()), "sd": float(train.std()), "card": card}


def config(tmp: Path, bundle: Path, batch: int, threshold: float | None = None) -> RuntimeConfig:
    return RuntimeConfig(
        device_id="dev", bundle=str(bundle), batch={"max_records": batch},
        window={"seconds": 3600, "max_past_s": None},
        scoring={"providers": ["CPUExecutionProvider"], "threshold": threshold},
        sinks={"events": str(tmp / "events.jsonl"), "dead_letter": str(tmp / "dl.jsonl"),
               "outbox": str(tmp / "outbox")},
        store={"url": str(tmp / "store")}, health={"log_interval_s": 0},
    )


def device_scores(tmp: Path, bundle: Path, records: list[dict], batch: int) -> dict[str, float]:
    """Every record's score as the device reports it (threshold override below all scores: each
    record past its stream's warm-up comes out as an event), by record id."""
    with EdgeRuntime(config(tmp, bundle, batch, threshold=-1.0)) as rt:
        stats = rt.process(json.dumps(r) for r in records)
    assert stats.rejected == 0
    events = [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]
    return {e["id"]: e["score"] for e in events if e["kind"] == "outlier"}


# --- the device's windows ---------------------------------------------------------------------


def test_rows_are_each_streams_last_values_in_arrival_order():
    spec = StreamSpec(value="value", window=4)
    sw = StreamWindows(spec)
    rows = sw.rows(np.array([1, 10, 2, 20, 3, 4, 5], np.float32), ["a", "b", "a", "b", "a", "a", "a"])
    # a stream's first rows are padded with its first value; b's values never enter a's rows
    expected = [[1, 1, 1, 1], [10, 10, 10, 10], [1, 1, 1, 2], [10, 10, 10, 20], [1, 1, 2, 3], [1, 2, 3, 4],
                [2, 3, 4, 5]]
    assert rows.tolist() == expected
    assert sw.history("a").tolist() == [3, 4, 5] and sw.history("b").tolist() == [10, 20]


def test_batched_rows_equal_one_record_at_a_time():
    rng = np.random.default_rng(3)
    values = rng.normal(size=500).astype(np.float32)
    streams = [f"s{k}" for k in rng.integers(0, 7, 500)]
    spec = StreamSpec(value="value", window=16)
    one = StreamWindows(spec)
    single = np.concatenate([one.rows(values[i:i + 1], streams[i:i + 1]) for i in range(500)])
    many = StreamWindows(spec)
    batched = np.concatenate([many.rows(values[i:i + 37], streams[i:i + 37]) for i in range(0, 500, 37)])
    assert np.array_equal(single, batched)


def test_beyond_the_limit_the_stream_seen_least_recently_goes_in_a_batch_as_one_at_a_time():
    values, streams = np.array([1, 2, 3, 4], np.float32), ["a", "b", "a", "c"]
    one = StreamWindows(StreamSpec(value="value", window=4, max_streams=2))
    for i in range(4):
        one.rows(values[i:i + 1], streams[i:i + 1])
    batched = StreamWindows(StreamSpec(value="value", window=4, max_streams=2))
    batched.rows(values, streams)
    assert one.history("a").tolist() == batched.history("a").tolist() == [1, 3]
    assert batched.history("b").size == 0 and batched.forgotten == one.forgotten == 1


def test_stream_names_are_bounded():
    from edge_runtime.streams import stream_name

    assert stream_name(None) == "" and stream_name(7) == stream_name("7") == "7"
    long = "x" * 100_000  # a stream id is kept and saved per stream: a long one is known by its digest
    assert stream_name(long).startswith("sha256:") and len(stream_name(long)) == 71
    assert stream_name(long) == stream_name("x" * 100_000) != stream_name("y" * 100_000)


def test_an_error_sentinel_value_is_flagged_not_dead_lettered(tmp_path):
    """A sensor's float32 error value over a small training SD overflows when standardised; clipped,
    it scores as a huge excursion, and the records after it still score."""
    train = 0.1 + np.random.default_rng(2).normal(0, 0.005, 400)
    data = write_csv(tmp_path / "t.csv", {"value": train.tolist()})
    train_stream(data, tmp_path / "trained", window=WINDOW, period=0)
    compile_bundle(tmp_path / "trained", tmp_path / "bundle")
    x = 0.1 + np.random.default_rng(3).normal(0, 0.005, 200)
    x[120] = 3.4e38
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": "p", "value": float(x[t])} for t in range(200)]
    with EdgeRuntime(config(tmp_path / "run", tmp_path / "bundle", 8)) as rt:
        stats = rt.process(json.dumps(r) for r in records)
    assert stats.rejected == 0 and stats.scored == 200
    flagged = sorted(int(e["id"]) for e in map(json.loads, (tmp_path / "run" / "events.jsonl").read_text().splitlines())
                     if e["kind"] == "outlier")
    assert 120 in flagged


def test_streams_beyond_the_limit_are_forgotten_oldest_first():
    sw = StreamWindows(StreamSpec(value="value", window=3, max_streams=2))
    sw.rows(np.array([1, 2], np.float32), ["a", "b"])
    sw.rows(np.array([3], np.float32), ["a"])  # a is now the most recently seen
    sw.rows(np.array([4], np.float32), ["c"])
    assert len(sw) == 2 and sw.forgotten == 1
    assert sw.history("b").size == 0 and sw.history("a").tolist() == [1, 3]


def test_a_new_model_adopts_the_streams_history_trimmed_to_its_window():
    old = StreamWindows(StreamSpec(value="value", window=6))
    old.rows(np.arange(10, dtype=np.float32), None)
    new = StreamWindows(StreamSpec(value="value", window=3))
    new.adopt(old)
    assert new.history("").tolist() == [8, 9]
    other = StreamWindows(StreamSpec(value="temperature", window=3))
    other.adopt(old)  # another value: nothing in common
    assert len(other) == 0


# --- the detector: Python and device agree ----------------------------------------------------


def test_training_writes_a_stream_bundle(stream_bundle):
    bundle, info = stream_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["stream"] == {"key": "stream_id", "value": "value", "window": WINDOW, "max_streams": 10000,
                                  "warmup": WARMUP}
    assert manifest["input"]["shape"] == [None, WINDOW]
    assert not manifest["variants"]  # reduced precision is not built for stream models, and says why
    assert set(manifest["skipped_variants"]) == {"fp16", "int8"}
    assert "stream model" in manifest["skipped_variants"]["fp16"]["reason"]
    assert len(manifest["lineage"]["data"]["sha256"]) == 64
    assert manifest["lineage"]["seasonal_period"] == PERIOD  # found in the training series
    assert manifest["lineage"]["hyperparameters"]["window"] == WINDOW
    # the threshold is the stated excursion; the rate it gives on the training series is recorded for the
    # fleet review
    train = series(400, 1)
    ref = reference_scores(train, info["mean"], info["sd"], WINDOW)
    assert manifest["outlier"]["threshold"] == 0.1
    assert manifest["outlier"]["target_false_positive_rate"] == pytest.approx((ref[WARMUP:] > 0.1).mean())


@pytest.mark.parametrize("batch", [1, 64])
def test_device_scores_equal_python_record_by_record(stream_bundle, tmp_path, batch):
    bundle, info = stream_bundle
    a, b = series(300, 7, shift_at=200), series(300, 8)
    records = []
    c = series(300, 9)
    for t in range(300):  # two streams interleaved, and records without a key: the default stream
        records.append({"ts": 1_700_000_000 + t, "id": f"a{t}", "stream_id": "a", "value": float(a[t])})
        records.append({"ts": 1_700_000_000 + t, "id": f"b{t}", "stream_id": "b", "value": float(b[t])})
        records.append({"ts": 1_700_000_000 + t, "id": f"c{t}", "value": float(c[t])})
    got = device_scores(tmp_path, bundle, records, batch)
    for name, x in (("a", a), ("b", b), ("c", c)):
        ref = reference_scores(x, info["mean"], info["sd"], WINDOW)
        assert {t for t in range(300) if f"{name}{t}" not in got} == set(range(WARMUP))  # warm-up: never flagged
        dev = np.asarray([got[f"{name}{t}"] for t in range(WARMUP, 300)])
        np.testing.assert_allclose(dev, ref[WARMUP:], rtol=1e-4, atol=1e-5)


def test_a_level_shift_is_flagged_then_the_stream_adapts(stream_bundle, tmp_path):
    bundle, info = stream_bundle
    x = series(1200, 9, shift_at=500)
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": "p", "value": float(x[t])} for t in range(1200)]
    with EdgeRuntime(config(tmp_path, bundle, 1)) as rt:
        rt.process(json.dumps(r) for r in records)
    flagged = sorted(int(json.loads(line)["id"]) for line in (tmp_path / "events.jsonl").read_text().splitlines()
                     if json.loads(line)["kind"] == "outlier")
    assert 500 in flagged  # the shift itself
    assert not [t for t in flagged if t > 500 + 2 * WINDOW]  # quiet once the window holds the new level


def test_young_streams_are_scored_but_not_flagged_until_warm(stream_bundle, tmp_path):
    bundle, _ = stream_bundle
    x = series(200, 6)
    x[10] += 15  # a spike while the stream is young: scored, not flagged
    x[150] += 60  # one once it is warm, beyond everything before it
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": "p", "value": float(x[t])} for t in range(200)]
    with EdgeRuntime(config(tmp_path, bundle, 16)) as rt:
        stats = rt.process(json.dumps(r) for r in records)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    flagged = sorted(int(e["id"]) for e in events if e["kind"] == "outlier")
    assert 150 in flagged and not [t for t in flagged if t < WARMUP]
    assert stats.scored == 200 and stats.outliers == len(flagged)
    assert {e["stream"] for e in events if e["kind"] == "outlier"} == {"p"}  # events name their stream


def _events(path: Path) -> dict[str, float]:
    return {e["id"]: e["score"] for e in map(json.loads, path.read_text().splitlines()) if e["kind"] == "outlier"}


def test_a_restart_picks_the_streams_up_where_they_were(stream_bundle, tmp_path):
    bundle, _ = stream_bundle
    x = series(300, 11)
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": s, "value": float(x[t] + (5 if s == "q" else 0))}
               for t in range(300) for s in ("p", "q")]
    straight = device_scores(tmp_path / "straight", bundle, records, 8)
    cfg = config(tmp_path / "restarted", bundle, 8, threshold=-1.0)
    with EdgeRuntime(cfg) as rt:  # a clean stop saves the windows
        rt.process(json.dumps(r) for r in records[:300])
    with EdgeRuntime(cfg) as rt:
        rt.process(json.dumps(r) for r in records[300:])
    restarted = _events(tmp_path / "restarted" / "events.jsonl")
    assert restarted == pytest.approx(straight)  # the same scores, and no second warm-up


def test_after_a_kill_the_streams_resume_from_the_last_checkpoint(stream_bundle, tmp_path):
    bundle, _ = stream_bundle
    x = series(300, 12)
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": "p", "value": float(x[t])} for t in range(300)]
    cfg = config(tmp_path, bundle, 8, threshold=-1.0)
    rt = EdgeRuntime(cfg)
    rt.process(json.dumps(r) for r in records[:100])
    rt.checkpoint()  # as the service does every window.checkpoint_s
    rt.process(json.dumps(r) for r in records[100:150])  # counted, never saved: the kill comes now
    rt.events.close()
    rt.spool.close()  # what the kill leaves: the checkpoint, and the spool's lock released
    with EdgeRuntime(cfg) as again:
        again.process(json.dumps(r) for r in records[150:])
    scores = _events(tmp_path / "events.jsonl")
    assert {str(t) for t in range(150, 300)} <= set(scores)  # no warm-up: the stream was known


def test_a_damaged_stream_state_is_set_aside_and_the_streams_warm_up_again(stream_bundle, tmp_path, caplog):
    from edge_runtime.runtime import STREAMS_FILE

    bundle, _ = stream_bundle
    cfg = config(tmp_path, bundle, 8, threshold=-1.0)
    state = tmp_path / "outbox" / STREAMS_FILE
    state.parent.mkdir(parents=True)
    good = StreamWindows(StreamSpec(value="value", window=WINDOW))
    good.rows(np.arange(500, dtype=np.float32), ["p"] * 500)
    saved = good.dump()
    flipped = bytearray(saved)
    flipped[len(saved) // 2] ^= 0xFF
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": "p", "value": 50.0 + t % 7} for t in range(100)]
    for damaged in (b"not an npz", saved[:len(saved) // 2], bytes(flipped)):  # truncated, a bit flipped
        state.write_bytes(damaged)
        (tmp_path / "events.jsonl").unlink(missing_ok=True)
        caplog.clear()
        with caplog.at_level("WARNING"), EdgeRuntime(cfg) as rt:
            stats = rt.process(json.dumps(r) for r in records)
        assert stats.scored == 100 and "not restored" in caplog.text
        assert set(_events(tmp_path / "events.jsonl")) == {str(t) for t in range(WARMUP, 100)}
        assert StreamWindows(StreamSpec(value="value", window=WINDOW)).restore(state.read_bytes()) == 1  # anew


def test_a_swap_keeps_the_streams(stream_bundle, tmp_path):
    bundle, _ = stream_bundle
    x = series(100, 4)
    records = [{"ts": 1_700_000_000 + t, "id": t, "stream_id": "p", "value": float(x[t])} for t in range(100)]
    with EdgeRuntime(config(tmp_path, bundle, 8, threshold=-1.0)) as rt:
        rt.process(json.dumps(r) for r in records[:60])
        rt.swap(load_model(bundle, rt.config.scoring))
        rt.process(json.dumps(r) for r in records[60:])
    swapped = {e["id"]: e["score"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())
               if e["kind"] == "outlier"}
    straight = device_scores(tmp_path / "straight", bundle, records, 8)
    assert set(swapped) == set(straight) == {str(t) for t in range(WARMUP, 100)}
    judged = [str(t) for t in range(WARMUP, 100)]
    assert [swapped[t] for t in judged] == pytest.approx([straight[t] for t in judged])


def test_cli_trains_a_stream_model_through_the_entry_point(tmp_path, capsys):
    from cloud.cli import main

    x = series(600, 5)
    data = write_csv(tmp_path / "s.csv", {"timestamp": list(range(600)), "value": x.tolist()})
    assert main(["train", "--detector", "stream", "--window", "64", "--data", str(data), "--out",
                 str(tmp_path / "t"), "--hp", "rows=500"]) == 0
    assert main(["compile", "--model", str(tmp_path / "t"), "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["stream"]["window"] == 64 and manifest["input"]["shape"] == [None, 64]
    assert manifest["lineage"]["hyperparameters"]["rows"] == 500
    assert manifest["lineage"]["metrics"]["train_rows"] == 500
    # an option of the other detector is refused with what this one takes
    capsys.readouterr()
    assert main(["train", "--detector", "stream", "--features", "a", "--data", str(data), "--out",
                 str(tmp_path / "u")]) == 2
    assert "unknown hyperparameter(s) ['features'] for model 'stream'" in capsys.readouterr().err


def test_bad_training_data_is_refused_clearly(tmp_path):
    short = write_csv(tmp_path / "short.csv", {"value": list(range(50))})
    with pytest.raises(TrainingError, match="need at least"):
        train_stream(short, tmp_path / "o")
    other = write_csv(tmp_path / "other.csv", {"reading": list(range(200))})
    with pytest.raises(TrainingError, match="no column 'value'"):
        train_stream(other, tmp_path / "o")
    gaps = write_csv(tmp_path / "gaps.csv", {"ts": [1, 2, 3, 4, 5], "value": ["1.0", "", "nan", "x", "2.5"]})
    data = read_stream_csv(gaps)
    assert data.values.tolist() == [1.0, 2.5] and data.dropped == 3


# --- NAB's scoring ----------------------------------------------------------------------------


def _series(n: int, windows: list[tuple[int, int]]) -> nab.Series:
    return nab.Series("s.csv", [None] * n, np.zeros(n), windows)


def test_nab_null_and_perfect_detectors_score_0_and_100():
    corpus = [_series(1000, [(400, 499)]), _series(1000, [(300, 349), (700, 799)])]
    null = {s.name + str(i): np.zeros(1000) for i, s in enumerate(corpus)}
    for i, s in enumerate(corpus):
        s.name = s.name + str(i)
    perfect = {s.name: np.zeros(1000) for s in corpus}
    for s in corpus:
        for a, _ in s.windows:
            perfect[s.name][a] = 1.0
    for profile in nab.PROFILES:
        assert nab.score_at(corpus, null, 0.5, profile) == pytest.approx(0.0)
        assert nab.score_at(corpus, perfect, 0.5, profile) == pytest.approx(100.0)


def test_nab_weighs_detections_as_the_benchmark_describes():
    s = _series(1000, [(400, 499)])
    s.name = "one.csv"
    late = np.zeros(1000)
    late[499] = 1.0  # the window's last row: worth almost nothing
    worth = nab.scaled_sigmoid(-1 / 100) / nab.MAX_TP
    assert 0 < worth < 0.03
    assert nab.score_at([s], {"one.csv": late}, 0.5) == pytest.approx(100 * (worth + 1) / 2)
    mid = np.zeros(1000)
    mid[450] = 1.0
    mid[460] = 1.0  # a second detection in the window counts for nothing
    expect = nab.scaled_sigmoid(-(499 - 450 + 1) / 100) / nab.MAX_TP
    assert expect == pytest.approx(0.8598, abs=1e-4)  # halfway into the window: 2/(1+e^-2.5)-1 over 2/(1+e^-5)-1
    assert nab.score_at([s], {"one.csv": mid}, 0.5) == pytest.approx(100 * (expect + 1) / 2)
    early_fp = mid.copy()
    early_fp[200] = 1.0  # before any window: a full false positive (standard weight 0.11)
    assert nab.score_at([s], {"one.csv": early_fp}, 0.5) == pytest.approx(100 * (expect - 0.11 + 1) / 2)
    probation = mid.copy()
    probation[100] = 1.0  # inside the first 15%: not counted
    assert nab.score_at([s], {"one.csv": probation}, 0.5) == pytest.approx(100 * (expect + 1) / 2)
    # the sweep finds the threshold that keeps the true detection and drops the false one
    graded = np.zeros(1000)
    graded[450], graded[200] = 0.9, 0.5
    best = nab.sweep([s], {"one.csv": graded})
    assert best["threshold"] == 0.9 and best["score"] == pytest.approx(100 * (expect + 1) / 2)
