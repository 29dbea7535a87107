"""Training the default outlier detector and calibrating its threshold.

The detector is scikit-learn's ``StandardScaler`` + ``GaussianMixture``; the outlier score is the
negative log-likelihood of a row under the mixture. skl2onnx exports it as plain ONNX operators
(Gemm, ReduceLogSumExp, ...) with the scaler as Sub/Div, so the graph runs on GPU execution
providers too. The threshold is the (1 - target FPR) quantile of the scores of held-out rows.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_runtime.contracts import NumericSummary, OutlierRule, OutputSpec, WindowSummary
from edge_runtime.summary import summarise
from model_compile.card import BASELINE_FILE, MODEL_FILE, SAMPLES_FILE, TrainingCard

NON_FEATURE_COLUMNS = {"ts", "timestamp", "time", "id", "label", "anomaly", "is_anomaly", "device_id"}
HIST_BINS = 10
ONNX_OPSET = 17
SCORE_OUTPUT = "score_samples"


class TrainingError(ValueError):
    """The training data cannot be used as given."""


@dataclass
class TrainResult:
    out_dir: Path
    card: TrainingCard
    holdout_fpr: float


@dataclass
class TrainingData:
    """The feature matrix as read: NaN where a cell was empty or not a finite number."""

    names: list[str]
    X: np.ndarray  # float64, rows x features
    missing: dict[str, int]  # empty or non-numeric cells per feature
    nonfinite: dict[str, int]  # nan or inf per feature
    skipped: int = 0  # rows too short for the header


MISSING_POLICIES = ("impute", "drop")


def read_training_csv(path: str | Path, features: list[str] | None = None) -> TrainingData:
    """Numeric feature columns of a CSV; what is missing or not finite is kept as NaN and counted."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TrainingError(f"{path}: empty file") from None
        rows = list(reader)
    if not rows:
        raise TrainingError(f"{path}: no data rows")
    if features:
        unknown = [f for f in features if f not in header]
        if unknown:
            raise TrainingError(f"{path}: no column(s) {unknown}")
        names = features
    else:
        names = [h for i, h in enumerate(header)
                 if h.lower() not in NON_FEATURE_COLUMNS and _is_numeric_column(rows, i)]
        if not names:
            raise TrainingError(f"{path}: no numeric feature columns")
    idx = [header.index(n) for n in names]
    data, skipped = [], 0
    missing, nonfinite = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for row in rows:
        if len(row) <= max(idx):
            skipped += 1
            continue
        values = []
        for name, i in zip(names, idx):
            try:
                v = float(row[i])
            except ValueError:
                missing[name] += 1
                v = math.nan
            else:
                if not math.isfinite(v):
                    nonfinite[name] += 1
                    v = math.nan
            values.append(v)
        data.append(values)
    return TrainingData(names, np.asarray(data, dtype=np.float64).reshape(-1, len(names)), missing, nonfinite,
                        skipped)


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


def _is_numeric_column(rows: list[list[str]], i: int) -> bool:
    sample = [r[i] for r in rows[:200] if i < len(r) and r[i].strip()]
    try:
        [float(v) for v in sample]
    except ValueError:
        return False
    return bool(sample)


def quantile_edges(values: np.ndarray, bins: int = HIST_BINS) -> list[float]:
    """Inner bin edges at the baseline's quantiles: each bin holds about 1/bins of it."""
    edges = np.quantile(values.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    # device data is float32: edges that are float32 values lose nothing, and take half the bytes
    return np.unique(edges.astype(np.float32)).astype(np.float64).tolist()


def make_baseline(name: str, version: str, names: list[str], X: np.ndarray, scores: np.ndarray,
                  outliers: int, raw: TrainingData | None = None) -> WindowSummary:
    """The training data in the window-summary format. With ``raw``, each feature is summarised as
    read (gaps counted as missing or non-finite, as a device counts them), on the training rows'
    bins, so the review compares devices with the data as it came."""
    now = datetime.now(timezone.utc)
    features: dict[str, NumericSummary] = {}
    for j, n in enumerate(names):
        edges = quantile_edges(X[:, j])
        if raw is None:
            features[n] = summarise(X[:, j], edges)
            continue
        column = raw.X[:, j]
        s = summarise(column[np.isfinite(column)].astype(np.float32), edges)
        s.missing, s.nonfinite, s.nan = raw.missing[n], raw.nonfinite[n], raw.nonfinite[n]
        features[n] = s
    return WindowSummary(
        model_name=name, model_version=version, device_id="training",
        window_start=now, window_end=now, records=len(X), outliers=outliers,
        features=features, score=summarise(scores, quantile_edges(scores)),
    )


def train(data: str | Path, out_dir: str | Path, *, name: str = "sensor-outliers",
          version: str = "1.0.0", features: list[str] | None = None, target_fpr: float = 0.01,
          components: int = 3, holdout: float = 0.2, seed: int = 0, missing: str | None = None) -> TrainResult:
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
    np.save(out / SAMPLES_FILE, X_hold[:256])
    card = TrainingCard(
        name=name, version=version, features=names,
        output=OutputSpec(name=SCORE_OUTPUT, meaning="log-likelihood of the row under the Gaussian "
                          "mixture; outlier score = its negation", higher_is_outlier=False),
        outlier=OutlierRule(threshold=threshold, target_false_positive_rate=target_fpr,
                            calibration_rows=int(n_hold)),
        algorithm=f"StandardScaler+GaussianMixture(n_components={components}, covariance=full)",
        train_rows=len(X_train), missing_values=missing_report,
    )
    (out / "training.json").write_text(json.dumps(card.model_dump(), indent=1))
    return TrainResult(out, card, float((hold_scores > threshold).mean()))
