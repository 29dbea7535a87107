"""Representative data and its baseline: reading a feature CSV, and summarising it as a window.

Training (cloud/train.py) and bring-your-own-model bundles (model_compile/byo.py) both read a CSV
of feature columns and turn rows and scores into the baseline the fleet review compares devices
with, in the window-summary format the devices write.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_runtime.contracts import NumericSummary, WindowSummary
from edge_runtime.summary import grid_bins, grid_id, review_grid, summarise

NON_FEATURE_COLUMNS = {"ts", "timestamp", "time", "id", "label", "anomaly", "is_anomaly", "device_id"}
HIST_BINS = 10


class TrainingError(ValueError):
    """The training (or other representative) data cannot be used as given."""


@dataclass
class TrainingData:
    """The feature matrix as read: NaN where a cell was empty or not a finite number."""

    names: list[str]
    X: np.ndarray  # float64, rows x features
    missing: dict[str, int]  # empty or non-numeric cells per feature
    nonfinite: dict[str, int]  # nan or inf per feature
    skipped: int = 0  # rows too short for the header


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
    grids: dict[str, np.ndarray] = {}
    for j, n in enumerate(names):
        edges = quantile_edges(X[:, j])
        column = X[:, j] if raw is None else raw.X[:, j]
        if raw is not None:
            column = column[np.isfinite(column)].astype(np.float32)
        features[n], grids[n] = _on_review_grid(column, edges)
        if raw is not None:
            features[n].missing, features[n].nonfinite = raw.missing[n], raw.nonfinite[n]
            features[n].nan = raw.nonfinite[n]
    score, score_grid = _on_review_grid(scores, quantile_edges(scores))
    return WindowSummary(
        model_name=name, model_version=version, device_id="training",
        window_start=now, window_end=now, records=len(X), outliers=outliers,
        features=features, score=score, grid=grid_id(grids, score_grid),
    )


def _on_review_grid(values: np.ndarray, edges: list[float]) -> tuple[NumericSummary, np.ndarray]:
    """The series' summary, with exact counts on the review grid it defines (``review_grid``):
    devices count on the same grid, so the review compares exact counts on both sides."""
    summary = summarise(values, edges)
    grid = review_grid(summary)  # from this very sketch: another summary of the same values may differ
    summary.grid_counts = grid_bins(values, grid)
    return summary, grid
