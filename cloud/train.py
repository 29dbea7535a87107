"""Training the default outlier detector and calibrating its threshold.

The detector is scikit-learn's ``StandardScaler`` + ``GaussianMixture``; the outlier score is the
negative log-likelihood of a row under the mixture. skl2onnx exports it as plain ONNX operators
(Gemm, ReduceLogSumExp, ...) with the scaler as Sub/Div, so the graph runs on GPU execution
providers too. The threshold is the (1 - target FPR) quantile of the scores of held-out rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.contracts import OutlierRule, OutputSpec
from model_compile.baseline import (  # noqa: F401  (moved to model_compile; imported from here by others)
    HIST_BINS,
    NON_FEATURE_COLUMNS,
    TrainingData,
    TrainingError,
    make_baseline,
    quantile_edges,
    read_training_csv,
)
from model_compile.card import (
    BASELINE_FILE,
    CALIBRATION_FILE,
    MAX_CALIBRATION_ROWS,
    MAX_SAMPLES,
    MODEL_FILE,
    SAMPLES_FILE,
    TrainingCard,
)

ONNX_OPSET = 17
SCORE_OUTPUT = "score_samples"


@dataclass
class TrainResult:
    out_dir: Path
    card: TrainingCard
    holdout_fpr: float


MISSING_POLICIES = ("impute", "drop")


def parse_missing_policy(text: str | None, names: list[str]) -> dict[str, str]:
    """``impute`` / ``drop`` for every feature, or ``default,feature=policy,...`` (default: impute)."""
    policy = dict.fromkeys(names, "impute")
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        feature, sep, value = part.rpartition("=")
        if value not in MISSING_POLICIES:
            raise TrainingError(f"missing-value policy {value!r}: choose {' or '.join(MISSING_POLICIES)}")
        if not sep:
            policy = dict.fromkeys(names, value)
        elif feature not in policy:
            raise TrainingError(f"missing-value policy names {feature!r}, which is not a feature")
        else:
            policy[feature] = value
    return policy


def apply_missing_policy(data: TrainingData, policy: dict[str, str]) -> tuple[np.ndarray, dict]:
    """Rows with a gap in a ``drop`` feature go; gaps in ``impute`` features take the median of the
    kept rows. Returns the complete matrix and what was done, for the training card."""
    X = data.X
    bad = ~np.isfinite(X)
    drop_cols = [j for j, n in enumerate(data.names) if policy[n] == "drop"]
    keep = ~bad[:, drop_cols].any(axis=1) if drop_cols else np.ones(len(X), dtype=bool)
    X = X[keep].copy()
    report = {"policy": policy, "rows_read": int(len(data.X)), "rows_dropped": int((~keep).sum()),
              "rows_skipped": data.skipped, "missing": data.missing, "nonfinite": data.nonfinite, "imputed": {}}
    for j, n in enumerate(data.names):
        gaps = ~np.isfinite(X[:, j])
        if gaps.any():
            finite = X[~gaps, j]
            if not len(finite):
                raise TrainingError(f"feature {n!r} has no finite value to impute from")
            X[gaps, j] = float(np.median(finite))
            report["imputed"][n] = {"count": int(gaps.sum()), "value": float(np.median(finite))}
    if len(X) < 100:
        raise TrainingError(f"only {len(X)} usable rows after the missing-value policy; need at least 100")
    return X.astype(np.float32), report


def read_numeric_csv(path: str | Path, features: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Numeric feature columns of a CSV, rows with any gap dropped (the ``drop`` policy for all)."""
    data = read_training_csv(path, features)
    X, _ = apply_missing_policy(data, dict.fromkeys(data.names, "drop"))
    return data.names, X


def train(data: str | Path, out_dir: str | Path, *, name: str = "sensor-outliers",
          version: str = "1.0.0", features: list[str] | None = None, target_fpr: float = 0.01,
          components: int = 3, holdout: float = 0.2, seed: int = 0, missing: str | None = None,
          lineage: dict | None = None) -> TrainResult:
    """Fit, export and calibrate; ``lineage`` (where the data and the run came from, see
    cloud/train_entry.py) goes into the training card as given, and from there into the bundle."""
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from sklearn.mixture import GaussianMixture
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if not 0 < target_fpr < 0.5:
        raise TrainingError(f"target FPR must be in (0, 0.5), got {target_fpr}")
    raw = read_training_csv(data, features)
    names = raw.names
    X, missing_report = apply_missing_policy(raw, parse_missing_policy(missing, names))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_hold = max(int(len(X) * holdout), 50)
    X_hold, X_train = X[order[:n_hold]], X[order[n_hold:]]

    pipeline = Pipeline([
        ("scale", StandardScaler()),
        ("mixture", GaussianMixture(n_components=components, covariance_type="full", random_state=seed)),
    ]).fit(X_train)
    onnx_model = to_onnx(
        pipeline, X_train[:1],
        options={StandardScaler: {"div": "div"}, GaussianMixture: {"score_samples": True}},
        target_opset=ONNX_OPSET,
    )
    # calibrate on what the runtime will compute: ONNX Runtime's float32 outputs
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def score(rows: np.ndarray) -> np.ndarray:
        (out,) = session.run([SCORE_OUTPUT], {input_name: rows})
        return -np.asarray(out, dtype=np.float64).reshape(-1)

    hold_scores = score(X_hold)
    threshold = float(np.quantile(hold_scores, 1 - target_fpr))
    train_scores = score(X_train)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(onnx_model.SerializeToString())
    baseline = make_baseline(name, version, names, X_train, train_scores, int((train_scores > threshold).sum()),
                             raw=raw)
    (out / BASELINE_FILE).write_text(baseline.model_dump_json(indent=1))
    # held-out rows for the compile step's parity gates; training rows to calibrate its int8 variant on
    np.save(out / SAMPLES_FILE, X_hold[:MAX_SAMPLES])
    np.save(out / CALIBRATION_FILE, X_train[:MAX_CALIBRATION_ROWS])
    card = TrainingCard(
        name=name, version=version, features=names,
        output=OutputSpec(name=SCORE_OUTPUT, meaning="log-likelihood of the row under the Gaussian "
                          "mixture; outlier score = its negation", higher_is_outlier=False),
        outlier=OutlierRule(threshold=threshold, target_false_positive_rate=target_fpr,
                            calibration_rows=int(n_hold)),
        algorithm=f"StandardScaler+GaussianMixture(n_components={components}, covariance=full)",
        train_rows=len(X_train), missing_values=missing_report, lineage=dict(lineage or {}),
    )
    (out / "training.json").write_text(json.dumps(card.model_dump(), indent=1))
    return TrainResult(out, card, float((hold_scores > threshold).mean()))
