"""The stream detector: is a stream's newest value outside the range of its recent values?

For univariate sensor series (CPU load, request counts, temperatures) the strongest simple signal of
trouble is a value the stream has not reached for a long while: a spike above everything in the last
``window`` values, or a drop below all of them. The score is how far the newest value falls outside
the range of the window's earlier values, as a fraction of that range (plus a floor of ``margin``
baseline standard deviations, so a flat stream does not divide by zero): 0 inside the range, 0.1 for
an excursion a tenth of the range beyond it. The same is asked of the stream smoothed (the mean of
each ``smooth`` consecutive values), weighted ``smooth_weight``: a run of values that is unusual
together (spikes coming denser, a level creeping past its usual band) shows there when no single
value is a record. Where the training series has a cycle (a day of readings, say), the change over
one cycle is judged the same way, weighted ``seasonal_weight``: a day that goes flat, or peaks lower
than every day before it, shows there while every single value stays inside the usual range. The
score is the largest of these. Because the range is the stream's own recent
one, the detector adapts: after a level shift it fires and then, as the window fills with the new
level, falls quiet, instead of flagging every later record.

The graph reads one row per record: the stream's last ``window`` values, oldest first (the device
builds these rows, ``edge_runtime.streams``). It normalises with the training data's mean and standard
deviation (so large-valued streams stay precise in float32), and uses only Sub/Div/Mul/Slice/ReduceMax/
ReduceMin/Max/Add/AveragePool/(Un)Squeeze, which every execution provider runs.

The threshold is a stated excursion (default 0.1: a tenth of the range beyond it), not a quantile of
the training scores. The score is already relative to each stream's own range, so one threshold
holds across streams. A quantile of a short training series mostly measures how young the stream was
(its first values set new records all the time), and gave worse decisions on held-out series (see
docs/streams.md). The rate the threshold gives on the training series, read through the device's own
window builder, is recorded as the rate the fleet review compares devices with.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.train import TrainingError, TrainResult, make_baseline
from edge_runtime.contracts import OutlierRule, OutputSpec, StreamSpec
from edge_runtime.streams import StreamWindows, stream_name
from model_compile.card import BASELINE_FILE, MODEL_FILE, SAMPLES_FILE, TrainingCard

SCORE_OUTPUT = "score"
INPUT_NAME = "window"
ONNX_OPSET = 17
# The defaults, and what they were chosen on: docs/streams.md ("How the defaults were chosen")
DEFAULT_WINDOW = 4096  # values per row: two weeks of 5-minute readings; 16 KB per stream on the device
DEFAULT_MARGIN = 1.0  # baseline standard deviations added to the range: the floor of the denominator
DEFAULT_SMOOTH = 16  # values per mean in the smoothed series
DEFAULT_SMOOTH_WEIGHT = 2.0  # how much a smoothed excursion counts against a raw one
DEFAULT_THRESHOLD = 0.1  # flag an excursion beyond the recent range by a tenth of that range
DEFAULT_SEASONAL_WEIGHT = 2.0  # how much the change over one cycle counts, where the stream has a cycle
DEFAULT_WARMUP = 64  # values before a young stream is flagged (at least a cycle, for a periodic one)
MIN_PERIOD, MIN_AUTOCORRELATION = 12, 0.5  # what counts as a cycle in the training series
MIN_ROWS = 100
Z_LIMIT = 1e30  # standardised values are clipped here: far beyond any range, and 16 of them still sum finite
SCORE_CHUNK = 2048  # training rows scored at a time: a window row is 16 KB at the default window


@dataclass
class StreamData:
    values: np.ndarray  # float64, finite, in file order
    streams: list[str]  # each value's stream
    dropped: int  # rows without a finite value


def read_stream_csv(path: str | Path, value: str = "value", key: str = "stream_id") -> StreamData:
    """The value column of a CSV in file order, and each row's stream (the ``key`` column if there is
    one). Rows whose value is empty, not a number or not finite are dropped and counted: the device
    rejects such records too, so they never enter a stream's window."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise TrainingError(f"{path}: empty file")
        if value not in reader.fieldnames:
            raise TrainingError(f"{path}: no column {value!r} (columns: {reader.fieldnames})")
        has_key = key in reader.fieldnames
        values, streams, dropped = [], [], 0
        for row in reader:
            try:
                v = float(row[value])
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                dropped += 1
                continue
            values.append(v)
            streams.append(stream_name(row[key] or None) if has_key else "")
    return StreamData(np.asarray(values, dtype=np.float64), streams, dropped)


def build_graph(window: int, mean: float, sd: float, margin: float = DEFAULT_MARGIN, smooth: int = DEFAULT_SMOOTH,
                smooth_weight: float = DEFAULT_SMOOTH_WEIGHT, period: int | None = None,
                seasonal_weight: float = DEFAULT_SEASONAL_WEIGHT):
    """The ONNX graph: (n, window) float32 -> (n, 1) scores. With a ``period``, also the excursion of
    the newest change over one cycle (the value less the one ``period`` values before it)."""
    from onnx import TensorProto, helper

    if not 2 <= smooth <= window // 2:
        raise TrainingError(f"smooth must be 2 .. window/2 ({window // 2}), got {smooth}")

    def const(name: str, v: float):
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [v])

    def excursion(series: str, width: str, out: str) -> list:
        """``out``: how far the last value of ``series`` falls outside the range of the ones before it."""
        p = f"{out}_"
        return [
            helper.make_node("Slice", [series, "zero_i", width, "axis1"], [p + "hist"]),
            helper.make_node("Slice", [series, width, "end_i", "axis1"], [p + "newest"]),
            helper.make_node("ReduceMax", [p + "hist"], [p + "hi"], axes=[1], keepdims=1),
            helper.make_node("ReduceMin", [p + "hist"], [p + "lo"], axes=[1], keepdims=1),
            helper.make_node("Sub", [p + "newest", p + "hi"], [p + "above"]),
            helper.make_node("Sub", [p + "lo", p + "newest"], [p + "below"]),
            helper.make_node("Max", [p + "above", p + "below", "zero"], [p + "excess"]),
            helper.make_node("Sub", [p + "hi", p + "lo"], [p + "range"]),
            helper.make_node("Add", [p + "range", "margin"], [p + "scale"]),
            helper.make_node("Div", [p + "excess", p + "scale"], [out]),
        ]

    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "sd"], ["z_raw"]),
        # a sensor's error sentinel (3.4e38) over a small training SD is inf in float32, and inf - inf
        # in a mean is NaN: clipped, such a value scores as the huge excursion it is
        helper.make_node("Clip", ["z_raw", "z_low", "z_high"], ["z"]),
        *excursion("z", "raw_width", "raw_score"),
        # the mean of every `smooth` consecutive values: (n, 1, window) -> (n, 1, window - smooth + 1)
        helper.make_node("Unsqueeze", ["z", "axis1"], ["z3"]),
        helper.make_node("AveragePool", ["z3"], ["means3"], kernel_shape=[smooth], strides=[1]),
        helper.make_node("Squeeze", ["means3", "axis1"], ["means"]),
        *excursion("means", "mean_width", "mean_excursion"),
        helper.make_node("Mul", ["mean_excursion", "smooth_weight"], ["mean_score"]),
    ]
    terms = ["raw_score", "mean_score"]
    if period:
        nodes += [  # the change over one cycle, (n, window - period), judged as the values are
            helper.make_node("Slice", ["z", "period", "end_i", "axis1"], ["later"]),
            helper.make_node("Slice", ["z", "zero_i", "cycle_end", "axis1"], ["earlier"]),
            helper.make_node("Sub", ["later", "earlier"], ["seasonal"]),
            *excursion("seasonal", "seasonal_width", "seasonal_excursion"),
            helper.make_node("Mul", ["seasonal_excursion", "seasonal_weight"], ["seasonal_score"]),
        ]
        terms.append("seasonal_score")
    nodes.append(helper.make_node("Max", terms, [SCORE_OUTPUT]))
    inits = [
        const("mean", mean), const("sd", sd), const("zero", 0.0), const("margin", margin),
        helper.make_tensor("z_low", TensorProto.FLOAT, [], [-Z_LIMIT]),
        helper.make_tensor("z_high", TensorProto.FLOAT, [], [Z_LIMIT]),
        const("smooth_weight", smooth_weight),
        helper.make_tensor("zero_i", TensorProto.INT64, [1], [0]),
        helper.make_tensor("raw_width", TensorProto.INT64, [1], [window - 1]),
        helper.make_tensor("mean_width", TensorProto.INT64, [1], [window - smooth]),
        helper.make_tensor("end_i", TensorProto.INT64, [1], [2**62]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    ]
    if period:
        if not 2 <= period <= window // 2:
            raise TrainingError(f"period must be 2 .. window/2 ({window // 2}), got {period}")
        inits += [
            const("seasonal_weight", seasonal_weight),
            helper.make_tensor("period", TensorProto.INT64, [1], [period]),
            helper.make_tensor("cycle_end", TensorProto.INT64, [1], [window - period]),
            helper.make_tensor("seasonal_width", TensorProto.INT64, [1], [window - period - 1]),
        ]
    graph = helper.make_graph(
        nodes, "edgeloop-stream-range",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", window])],
        [helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["n", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="edgeloop")
    model.ir_version = 8  # readable by every ONNX Runtime from 1.10 on
    return model


def detect_period(data: StreamData) -> int:
    """The training series' cycle, in values: past the lag where its autocorrelation first turns
    negative (and at least 12), the lag up to half the series where it peaks again, if that peak
    reaches 0.5; 0 for none. With several streams, the one with the most values."""
    names = sorted(set(data.streams), key=data.streams.count, reverse=True)
    x = data.values[[i for i, s in enumerate(data.streams) if s == names[0]]] if len(names) > 1 else data.values
    x = x - x.mean()
    n = len(x)
    if n < 2 * MIN_PERIOD or not x.std() > 0:
        return 0
    spectrum = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
    acf /= acf[0]
    negative = np.flatnonzero(acf[:n // 2] < 0)
    start = max(int(negative[0]), MIN_PERIOD) if len(negative) else n
    if start >= n // 2:  # never decorrelates within half the series: a trend, not a cycle
        return 0
    lag = int(np.argmax(acf[start:n // 2]) + start)
    return lag if acf[lag] >= MIN_AUTOCORRELATION else 0


def _score_series(session, data: StreamData, spec: StreamSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score the series as a device would, through its own window builder, a chunk of rows at a time
    (a year of 5-minute readings is 105,000 rows of 16 KB). Returns every value's score, which of them
    the device would judge (their stream past its warm-up), and up to 256 rows for the compile's
    parity gate, spread over the series."""
    windows, values = StreamWindows(spec), data.values.astype(np.float32)
    seen = np.empty(len(values), np.int64)
    scores = np.empty(len(values))
    keep = set(np.linspace(0, len(values) - 1, min(len(values), 256)).astype(int).tolist())
    samples = []
    for lo in range(0, len(values), SCORE_CHUNK):
        hi = min(lo + SCORE_CHUNK, len(values))
        rows = windows.rows(values[lo:hi], data.streams[lo:hi], seen[lo:hi])
        scores[lo:hi] = session.run([SCORE_OUTPUT], {INPUT_NAME: rows})[0].reshape(-1)
        samples += [rows[i - lo] for i in range(lo, hi) if i in keep]
    return scores, seen >= min(spec.warmup, spec.window - 1), np.stack(samples)


def train_stream(data: str | Path, out_dir: str | Path, *, name: str = "stream-outliers", version: str = "1.0.0",
                 value: str = "value", key: str = "stream_id", window: int = DEFAULT_WINDOW,
                 threshold: float = DEFAULT_THRESHOLD, margin: float = DEFAULT_MARGIN, smooth: int = DEFAULT_SMOOTH,
                 smooth_weight: float = DEFAULT_SMOOTH_WEIGHT, period: int | None = None,
                 seasonal_weight: float = DEFAULT_SEASONAL_WEIGHT, rows: int | None = None,
                 lineage: dict | None = None) -> TrainResult:
    """Fit the stream detector on a CSV's ``value`` column (its first ``rows`` rows, or all) and write a
    training output that ``compile_bundle`` turns into a bundle. ``lineage`` (the training entry
    point's record) goes into the card; without it, the data file, its checksum and the settings."""
    import onnxruntime as ort

    if not threshold > 0:
        raise TrainingError(f"threshold must be above 0 (an excursion beyond the range), got {threshold}")
    if not margin > 0:
        raise TrainingError(f"margin must be above 0 (training SDs added to the range), got {margin}")
    if not 2 <= window <= 4096:
        raise TrainingError(f"window must be 2 .. 4096 values, got {window}")
    full = read_stream_csv(data, value, key)
    series = StreamData(full.values[:rows], full.streams[:rows], full.dropped) if rows else full
    if len(series.values) < MIN_ROWS:
        raise TrainingError(f"only {len(series.values)} usable values; need at least {MIN_ROWS}")
    mean = float(series.values.mean())
    sd = float(series.values.std())
    if not sd > 0:  # a constant training series: any movement is news, on the scale of its level
        sd = 1e-3 * max(abs(mean), 1.0)
    found = None
    if period is None:  # found in the training series (0: none); one that the window cannot hold twice is not used
        found = period = detect_period(series) if seasonal_weight > 0 else 0
        if period > window // 2:
            period = 0
    if period and period > window // 2:
        raise TrainingError(f"a period of {period} values needs a window of at least {2 * period}")
    # a periodic stream is judged once its window holds a whole cycle: the change over one cycle of a
    # younger stream would be measured against its padding
    spec = StreamSpec(key=key, value=value, window=window, warmup=min(max(DEFAULT_WARMUP, period), window - 1))
    model = build_graph(window, mean, sd, margin, smooth, smooth_weight, period or None, seasonal_weight)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, judged, samples = _score_series(session, series, spec)
    # the rate the device would flag: a stream's warm-up values are never flagged
    training_rate = float((scores[judged] > threshold).mean()) if judged.any() else 0.0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model.SerializeToString())
    baseline = make_baseline(name, version, [value], series.values.astype(np.float32).reshape(-1, 1), scores,
                             int((scores > threshold).sum()))
    baseline.features[value].missing = series.dropped
    (out / BASELINE_FILE).write_text(baseline.model_dump_json(indent=1))
    np.save(out / SAMPLES_FILE, samples)
    if lineage is None:
        from cloud.train_entry import data_facts

        lineage = {"data": {"path": str(Path(data).resolve()), **data_facts(data)},
                   "hyperparameters": {"model": "stream", "window": window, "margin": margin, "smooth": smooth,
                                       "smooth_weight": smooth_weight, "threshold": threshold, "rows": rows,
                                       "seasonal_weight": seasonal_weight}}
    lineage = {**lineage, "seasonal_period": period}
    if found and not period:
        lineage["seasonal_note"] = f"a cycle of {found} values was found; the window of {window} is too short to use it"
    card = TrainingCard(
        name=name, version=version, features=[value],
        output=OutputSpec(name=SCORE_OUTPUT, meaning="how far the newest value (or the mean of the newest "
                          f"{smooth}, weighted x{smooth_weight:g}"
                          + (f"; or its change over a {period}-value cycle, x{seasonal_weight:g}" if period else "")
                          + f") falls outside the range of the stream's earlier ones in its last {window}, as a "
                          f"fraction of that range (+{margin} training SD)", higher_is_outlier=True),
        # the threshold is a stated excursion, not a quantile: the rate it gives on the training series is
        # what the fleet review compares the devices' outlier rates with
        outlier=OutlierRule(threshold=threshold, target_false_positive_rate=training_rate,
                            calibration_rows=int(judged.sum())),
        algorithm=f"stream range excursion (window={window}, smooth={smooth} x{smooth_weight:g}, "
                  + (f"period={period} x{seasonal_weight:g}, " if period else "period=none, ")
                  + f"margin={margin} SD; mean={mean:.6g}, sd={sd:.6g})",
        train_rows=len(series.values),
        missing_values={"policy": {value: "drop"}, "rows_dropped": series.dropped},
        lineage=lineage,
        stream=spec.model_dump(),
    )
    (out / "training.json").write_text(json.dumps(card.model_dump(), indent=1))
    return TrainResult(out, card, training_rate)
