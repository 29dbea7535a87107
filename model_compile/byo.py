"""Bundling an ONNX model trained elsewhere ("bring your own"), with representative data.

The model must take one float32 input of shape [N, n_features] (N dynamic: the device scores
batches) and give one score per row in the output named. The representative rows (a CSV) stand in
for what training gives the compile step: the baseline the fleet review compares devices with, the
outlier threshold (their (1 - FPR) quantile, unless one is given), held-out rows for the parity
gates and, disjoint from those, calibration rows for the int8 variant. From there the bundle is
compiled exactly like a trained model's (``compile_bundle``): same checks, optimisation and gates.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import sha256_file
from edge_runtime.contracts import OutlierRule, OutputSpec
from model_compile.baseline import make_baseline, read_training_csv
from model_compile.card import (
    BASELINE_FILE,
    CALIBRATION_FILE,
    CARD_FILE,
    MAX_CALIBRATION_ROWS,
    MAX_SAMPLES,
    MODEL_FILE,
    SAMPLES_FILE,
    TrainingCard,
)
from model_compile.compile import CompileError, CompileResult, _run, check_model, compile_bundle
from model_compile.variants import PRECISIONS

MIN_ROWS = 100
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # as BundleManifest.name
VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")


class ByoError(CompileError):
    """The model or the representative data cannot be bundled as given."""


@dataclass
class ByoResult:
    compiled: CompileResult
    card: TrainingCard
    rows: int  # complete data rows used
    dropped: int  # data rows left out for a gap in a feature
    data_fpr: float  # share of the data rows above the threshold


def bundle_onnx(onnx_path: str | Path, data: str | Path, out: str | Path, *, higher_is_outlier: bool,
                features: list[str] | None = None, score_output: str | None = None, target_fpr: float = 0.01,
                threshold: float | None = None, name: str | None = None, version: str = "1.0.0",
                meaning: str | None = None, variants: Iterable[str] = PRECISIONS, level: str = "basic",
                seed: int = 0) -> ByoResult:
    """Check ``onnx_path`` against the features, score ``data`` with it and compile a bundle to ``out``.

    ``features``: the model's input columns in order (default: the CSV's numeric columns, in its
    order). ``higher_is_outlier``: whether a higher output means a more unusual row (False for a
    likelihood). The threshold is ``threshold`` or the data scores' (1 - ``target_fpr``) quantile.
    """
    import onnx

    onnx_path, data = Path(onnx_path), Path(data)
    name = name or onnx_path.stem
    if not NAME.match(name):
        raise ByoError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (give --name)")
    if not VERSION.match(version):
        raise ByoError(f"version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 1.0.0")
    if threshold is None and not 0 < target_fpr < 0.5:
        raise ByoError(f"target FPR must be in (0, 0.5), got {target_fpr}")
    if threshold is not None and not np.isfinite(threshold):
        raise ByoError(f"threshold {threshold} is not a finite number")
    try:
        model = onnx.load(str(onnx_path))
    except FileNotFoundError:
        raise ByoError(f"{onnx_path}: not found") from None
    except Exception:
        raise ByoError(f"{onnx_path}: not an ONNX model (it does not parse as one)") from None
    if not model.graph.node:
        raise ByoError(f"{onnx_path}: not an ONNX model (no graph)")

    raw = read_training_csv(data, features)
    features = raw.names
    outputs = [o.name for o in model.graph.output]
    if score_output is None:
        if len(outputs) != 1:
            raise ByoError(f"{onnx_path}: the model has outputs {outputs}; name the score with --score-output")
        score_output = outputs[0]
    elif score_output not in outputs:
        raise ByoError(f"{onnx_path}: no output {score_output!r}; the model's outputs are {outputs}")
    try:
        input_name, _ = check_model(model, len(features), score_output)
    except CompileError as err:
        raise ByoError(f"{onnx_path}: {err} (features {features})") from None
    _check_input(model, input_name, onnx_path)

    complete = np.isfinite(raw.X).all(axis=1)
    X = raw.X[complete].astype(np.float32)
    if len(X) < MIN_ROWS:
        raise ByoError(f"{data}: only {len(X)} complete rows of {features}; need at least {MIN_ROWS}")
    try:
        out_raw = _run(onnx_path, input_name, score_output, X)
    except Exception as err:  # onnxruntime's own errors
        raise ByoError(f"{onnx_path}: ONNX Runtime cannot score the data: {str(err).splitlines()[0][:300]}") from None
    if out_raw.size != len(X):
        raise ByoError(f"{onnx_path}: output {score_output!r} has shape {list(out_raw.shape)} for {len(X)} rows; "
                       "expected one score per row, (N,) or (N, 1)")
    scores = (1.0 if higher_is_outlier else -1.0) * out_raw.reshape(-1).astype(np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ByoError(f"{onnx_path}: output {score_output!r} is not finite on {int(bad.sum())} of {len(X)} rows "
                       f"of {data} (first: row {int(np.argmax(bad))} of the complete rows)")
    given = threshold is not None
    if not given:
        threshold = float(np.quantile(scores, 1 - target_fpr))
    data_fpr = float((scores > threshold).mean())

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_cal = min(MAX_CALIBRATION_ROWS, len(X) // 2)
    calibration, held_out = X[order[:n_cal]], X[order[n_cal:]][:MAX_SAMPLES]
    card = TrainingCard(
        name=name, version=version, features=features,
        output=OutputSpec(name=score_output, higher_is_outlier=higher_is_outlier,
                          meaning=meaning or f"the score of {onnx_path.name} (bring-your-own model); "
                          f"{'higher' if higher_is_outlier else 'lower'} is more unusual"),
        outlier=OutlierRule(threshold=threshold, target_false_positive_rate=data_fpr if given else target_fpr,
                            calibration_rows=len(X)),
        algorithm=f"bring-your-own ONNX ({onnx_path.name})", train_rows=0,
        missing_values={"policy": "drop", "rows_read": int(len(raw.X)), "rows_dropped": int((~complete).sum()),
                        "rows_skipped": raw.skipped, "missing": raw.missing, "nonfinite": raw.nonfinite},
        lineage={"source": "bring-your-own", "onnx": str(onnx_path), "onnx_sha256": sha256_file(onnx_path),
                 "data": str(data), "data_sha256": sha256_file(data), "data_rows": len(X)},
    )
    baseline = make_baseline(name, version, features, X, scores, int((scores > threshold).sum()), raw=raw)

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgeloop-byo-") as tmp:
        work = Path(tmp)
        shutil.copy(onnx_path, work / MODEL_FILE)
        (work / BASELINE_FILE).write_text(baseline.model_dump_json(indent=1))
        np.save(work / SAMPLES_FILE, held_out)
        np.save(work / CALIBRATION_FILE, calibration)
        (work / CARD_FILE).write_text(json.dumps(card.model_dump(), indent=1))
        compiled = compile_bundle(work, out, level=level, variants=variants)
    return ByoResult(compiled, card, len(X), int((~complete).sum()), data_fpr)


def _check_input(model, input_name: str, path: Path) -> None:
    from onnx import TensorProto

    tensor = next(i for i in model.graph.input if i.name == input_name).type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT:
        raise ByoError(f"{path}: input {input_name!r} is {TensorProto.DataType.Name(tensor.elem_type).lower()}; "
                       "expected float32")
    batch = tensor.shape.dim[0]
    if batch.HasField("dim_value"):
        raise ByoError(f"{path}: input {input_name!r} has a fixed batch size of {batch.dim_value}; the device scores "
                       "batches of any size: export it with a dynamic first dimension")

