"""The stream detector: is a stream's newest value outside the range of its recent values?

For univariate sensor series (CPU load, request counts, temperatures) the strongest simple signal of
trouble is a value the stream has not reached for a long while: a spike above everything in the last
``window`` values, or a drop below all of them. The score is how far the newest value falls outside
the range of the window's earlier values, as a fraction of that range (plus a floor of ``margin``
baseline standard deviations, so a flat stream does not divide by zero): 0 inside the range, 0.1 for
an excursion a tenth of the range beyond it. Because the range is the stream's own recent one, the
detector adapts: after a level shift it fires once and then, as the window fills with the new level,
falls quiet, instead of flagging every later record.

The graph reads one row per record: the stream's last ``window`` values, oldest first (the device
builds these rows, ``edge_runtime.streams``). It normalises with the training data's mean and standard
deviation (so large-valued streams stay precise in float32), and uses only Sub/Div/Slice/ReduceMax/
ReduceMin/Max/Add, which every execution provider runs. The threshold is calibrated, as for the
tabular detector, at the (1 - target FPR) quantile of the scores the same graph gives on the training
series, read through the device's own window builder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.train import TrainingError, make_baseline
from edge_runtime.contracts import OutlierRule, OutputSpec, StreamSpec
from edge_runtime.streams import StreamWindows, stream_name
from model_compile.card import BASELINE_FILE, MODEL_FILE, SAMPLES_FILE, TrainingCard

SCORE_OUTPUT = "score"
INPUT_NAME = "window"
ONNX_OPSET = 17
DEFAULT_WINDOW = 1024
DEFAULT_MARGIN = 0.5  # baseline standard deviations added to the range: the floor of the denominator
MIN_ROWS = 100


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


def build_graph(window: int, mean: float, sd: float, margin: float = DEFAULT_MARGIN):
    """The ONNX graph: (n, window) float32 -> (n, 1) scores."""
    from onnx import TensorProto, helper

    def const(name: str, v: float):
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [v])

    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "sd"], ["z"]),
        helper.make_node("Slice", ["z", "hist_start", "hist_end", "axis1"], ["hist"]),
        helper.make_node("Slice", ["z", "hist_end", "last_end", "axis1"], ["newest"]),
        helper.make_node("ReduceMax", ["hist"], ["hi"], axes=[1], keepdims=1),
        helper.make_node("ReduceMin", ["hist"], ["lo"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["newest", "hi"], ["above"]),
        helper.make_node("Sub", ["lo", "newest"], ["below"]),
        helper.make_node("Max", ["above", "below", "zero"], ["excess"]),
        helper.make_node("Sub", ["hi", "lo"], ["range"]),
        helper.make_node("Add", ["range", "margin"], ["scale"]),
        helper.make_node("Div", ["excess", "scale"], [SCORE_OUTPUT]),
    ]
    inits = [
        const("mean", mean), const("sd", sd), const("zero", 0.0), const("margin", margin),
        helper.make_tensor("hist_start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("hist_end", TensorProto.INT64, [1], [window - 1]),
        helper.make_tensor("last_end", TensorProto.INT64, [1], [window]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
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


def _windows(data: StreamData, spec: StreamSpec) -> np.ndarray:
    """The rows a device would build from these values, one per value, in order."""
    return StreamWindows(spec).rows(data.values.astype(np.float32), data.streams)


def train_stream(data: str | Path, out_dir: str | Path, *, name: str = "stream-outliers", version: str = "1.0.0",
                 value: str = "value", key: str = "stream_id", window: int = DEFAULT_WINDOW,
                 target_fpr: float = 0.01, margin: float = DEFAULT_MARGIN, rows: int | None = None,
                 lineage: dict | None = None) -> TrainingCard:
    """Fit the stream detector on a CSV's ``value`` column (its first ``rows`` rows, or all) and write a
    training output that ``compile_bundle`` turns into a bundle."""
    import onnxruntime as ort

    if not 0 < target_fpr < 0.5:
        raise TrainingError(f"target FPR must be in (0, 0.5), got {target_fpr}")
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
    spec = StreamSpec(key=key, value=value, window=window)
    model = build_graph(window, mean, sd, margin)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    X = _windows(series, spec)
    scores = session.run([SCORE_OUTPUT], {INPUT_NAME: X})[0].reshape(-1).astype(np.float64)
    # a stream's first value has no history to fall outside of: leave it out of the calibration
    first = np.ones(len(scores), dtype=bool)
    seen: set[str] = set()
    for i, s in enumerate(series.streams):
        first[i] = s not in seen
        seen.add(s)
    threshold = float(np.quantile(scores[~first], 1 - target_fpr))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model.SerializeToString())
    baseline = make_baseline(name, version, [value], series.values.astype(np.float32).reshape(-1, 1), scores,
                             int((scores > threshold).sum()))
    baseline.features[value].missing = series.dropped
    (out / BASELINE_FILE).write_text(baseline.model_dump_json(indent=1))
    pick = np.linspace(0, len(X) - 1, min(len(X), 256)).astype(int)
    np.save(out / SAMPLES_FILE, X[pick])
    digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    card = TrainingCard(
        name=name, version=version, features=[value],
        output=OutputSpec(name=SCORE_OUTPUT, meaning="how far the newest value falls outside the range of the "
                          f"stream's previous {window - 1} values, as a fraction of that range "
                          f"(+{margin} training SD)", higher_is_outlier=True),
        outlier=OutlierRule(threshold=threshold, target_false_positive_rate=target_fpr,
                            calibration_rows=int((~first).sum())),
        algorithm=f"stream range excursion (window={window}, margin={margin} SD; mean={mean:.6g}, sd={sd:.6g})",
        train_rows=len(series.values),
        missing_values={"policy": {value: "drop"}, "rows_dropped": series.dropped},
        lineage={"data": str(data), "data_sha256": digest, "rows": len(series.values),
                 "hyperparameters": {"model": "stream", "window": window, "margin": margin,
                                     "target_fpr": target_fpr}} | (lineage or {}),
        stream=spec.model_dump(),
    )
    (out / "training.json").write_text(json.dumps(card.model_dump(), indent=1))
    return card
