"""The Numenta Anomaly Benchmark's scoring, for judging a detector's decisions on labelled streams.

As the benchmark describes it: the first 15% of a series (at most 750 rows) is probationary and does
not count; inside a labelled window only the first detection counts, worth the scaled sigmoid of its
position (about 1 at the window's start, 0 at its end); a window with no detection costs a false
negative; a detection outside every window costs a false positive, weighted by the same sigmoid of
its distance past the previous window (full weight before the first window or far after one). A
profile weighs the three; the corpus score is normalised so that the null detector (never detects)
scores 0 and the perfect one (a detection at each window's first row) scores 100; the threshold is
the one that maximises the corpus score, per profile.

Detectors give each row a score in [0, 1]; ``sweep`` evaluates every threshold at once.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

PROFILES = {  # NAB's cost matrices: (true positive, false positive, false negative) weights
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP_rate": (1.0, 0.22, 1.0),
    "reward_low_FN_rate": (1.0, 0.11, 2.0),
}
PROBATION = 0.15
MAX_PROBATION_ROWS = 750  # 15% of 5,000 rows


def probation_rows(n: int) -> int:
    return min(math.floor(PROBATION * n), MAX_PROBATION_ROWS)


def scaled_sigmoid(position: float) -> float:
    """2·sigmoid(-5x) - 1: about 1 at x = -1 (a window's first row), 0 at its end, -1 far past it."""
    if position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)  # a detection at a window's first row earns the full true-positive weight


@dataclass
class Series:
    name: str  # folder/file.csv, as in the label files
    ts: list[datetime]
    values: np.ndarray
    windows: list[tuple[int, int]]  # row index ranges, inclusive

    @property
    def probation(self) -> int:
        return probation_rows(len(self.values))


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.strip().replace("Z", ""))


def load_corpus(root: str | Path) -> list[Series]:
    """Every labelled series under ``root`` (NAB's folders, ``combined_windows.json``), sorted by name."""
    root = Path(root)
    windows = json.loads((root / "combined_windows.json").read_text())
    out = []
    for name in sorted(windows):
        with open(root / name, newline="") as fh:
            rows = list(csv.DictReader(fh))
        ts = [_parse(r["timestamp"]) for r in rows]
        values = np.asarray([float(r["value"]) for r in rows])
        idx = []
        for start, end in windows[name]:
            a, b = _parse(start), _parse(end)
            inside = [i for i, t in enumerate(ts) if a <= t <= b]
            if inside:
                idx.append((inside[0], inside[-1]))
        out.append(Series(name, ts, values, idx))
    return out


def row_weights(n: int, windows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the scaled-sigmoid weight a detection there earns (>0 in a window) or costs (<0), and
    the window it falls in (-1: none)."""
    weight = np.empty(n)
    window_of = np.full(n, -1)
    prev_end = prev_width = None
    w = 0
    for i in range(n):
        if w < len(windows) and windows[w][0] <= i <= windows[w][1]:
            start, end = windows[w]
            width = end - start + 1
            weight[i] = scaled_sigmoid(-(end - i + 1) / width) / MAX_TP
            window_of[i] = w
            if i == end:
                prev_end, prev_width = end, width
                w += 1
        elif prev_end is None:
            weight[i] = -1.0
        else:
            weight[i] = scaled_sigmoid(abs(prev_end - i) / (prev_width - 1))
    return weight, window_of


def series_curve(series: Series, scores: np.ndarray, thresholds: np.ndarray,
                 profile: tuple[float, float, float]) -> np.ndarray:
    """The raw NAB score of one series at each threshold (a detection is a score >= threshold)."""
    tp_w, fp_w, fn_w = profile
    n = len(scores)
    weight, window_of = row_weights(n, series.windows)
    keep = np.arange(n) >= series.probation
    s, weight, window_of = scores[keep], weight[keep], window_of[keep]
    order = np.argsort(-s, kind="stable")
    s, weight, window_of = s[order], weight[order], window_of[order]
    # walk down the scores: the curve after including each row
    total = -fn_w * len(series.windows)
    best = {}
    after = np.empty(len(s))
    for j in range(len(s)):
        w = window_of[j]
        if w < 0:
            total += fp_w * weight[j]
        elif w not in best:
            best[w] = weight[j]
            total += tp_w * weight[j] + fn_w
        elif weight[j] > best[w]:
            total += tp_w * (weight[j] - best[w])
            best[w] = weight[j]
        after[j] = total
    # rows included at threshold t: those with score >= t, i.e. the first k of the descending order
    k = np.searchsorted(-s, -thresholds, side="right")
    base = -fn_w * len(series.windows)
    return np.where(k > 0, after[np.maximum(k - 1, 0)], base)


def sweep(corpus: list[Series], scores: dict[str, np.ndarray], profile: str = "standard",
          thresholds: np.ndarray | None = None) -> dict:
    """The normalised corpus score at the best threshold (NAB's optimisation), and at each threshold
    in ``thresholds`` when those are given (then the best is taken over them only)."""
    weights = PROFILES[profile]
    tp_w, _, fn_w = weights
    if thresholds is None:
        thresholds = np.unique(np.concatenate([scores[s.name] for s in corpus]))
    raw = sum(series_curve(s, np.asarray(scores[s.name], dtype=np.float64), thresholds, weights) for s in corpus)
    windows = sum(len(s.windows) for s in corpus)
    if not windows:
        raise ValueError("no labelled anomaly window in these series: NAB's normalisation needs one")
    null, perfect = -fn_w * windows, tp_w * windows
    normalised = 100.0 * (raw - null) / (perfect - null)
    best = int(np.argmax(normalised))
    return {"score": float(normalised[best]), "threshold": float(thresholds[best]),
            "curve": normalised, "thresholds": thresholds}


def score_at(corpus: list[Series], scores: dict[str, np.ndarray], threshold: float, profile: str = "standard") -> float:
    """The normalised corpus score of detections at one fixed threshold."""
    return sweep(corpus, scores, profile, np.asarray([threshold]))["score"]
