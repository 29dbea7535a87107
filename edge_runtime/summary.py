"""Compact, mergeable summaries of numeric series.

A device keeps one accumulator per feature (and one for the outlier score) for each window. What
it ships is a ``NumericSummary``: exact count/min/max/mean/variance, a histogram on the baseline's
bin edges, and an Apache DataSketches KLL sketch for quantiles. Any number of summaries merge
into one with the same meaning, so the cloud can roll windows up into days, devices into fleets.
"""

from __future__ import annotations

import base64
import math

import numpy as np
from datasketches import kll_doubles_sketch

from .contracts import NumericSummary

KLL_K = 200  # DataSketches' default: about 1.65% normalised rank error


def encode_sketch(sketch: kll_doubles_sketch) -> str:
    return base64.b64encode(sketch.serialize()).decode("ascii")


def decode_sketch(text: str | None) -> kll_doubles_sketch:
    if not text:
        return kll_doubles_sketch(KLL_K)
    return kll_doubles_sketch.deserialize(base64.b64decode(text))


class SeriesAccumulator:
    """Accumulates one numeric series batch by batch; ``summary()`` freezes it."""

    def __init__(self, hist_edges: list[float] | np.ndarray) -> None:
        self.edges = np.asarray(hist_edges, dtype=np.float64)
        self.hist = np.zeros(len(self.edges) + 1, dtype=np.int64)
        self.sketch = kll_doubles_sketch(KLL_K)
        self.count = 0
        self.missing = 0
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def add_missing(self, n: int = 1) -> None:
        self.missing += n

    def add_nonfinite(self, n: int = 1) -> None:
        self.nonfinite += n

    def update(self, values: np.ndarray) -> None:
        """Add finite values; NaN counts as missing, +-Inf as non-finite."""
        values = np.asarray(values, dtype=np.float64).ravel()
        nan = np.isnan(values)
        inf = np.isinf(values)
        self.missing += int(nan.sum())
        self.nonfinite += int(inf.sum())
        values = values[~(nan | inf)]
        n = values.size
        if n == 0:
            return
        self.sketch.update(values)
        # np.searchsorted with side="right": a value equal to an edge falls in the bin above it
        self.hist += np.bincount(
            np.searchsorted(self.edges, values, side="right"), minlength=len(self.hist)
        )
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        self._combine(n, float(values.mean()), float(values.var()) * n)

    def _combine(self, n: int, mean: float, m2: float) -> None:
        """Chan et al.'s pairwise update of count, mean and sum of squared deviations."""
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def summary(self) -> NumericSummary:
        has = self.count > 0
        return NumericSummary(
            count=self.count,
            missing=self.missing,
            nonfinite=self.nonfinite,
            min=self.min if has else None,
            max=self.max if has else None,
            mean=self.mean if has else None,
            variance=self.m2 / self.count if has else None,
            hist_edges=self.edges.tolist(),
            hist_counts=self.hist.tolist(),
            kll=encode_sketch(self.sketch) if has else None,
        )

    def merge(self, other: NumericSummary) -> None:
        if list(other.hist_edges) != self.edges.tolist():
            raise ValueError("cannot merge summaries with different histogram edges")
        self.missing += other.missing
        self.nonfinite += other.nonfinite
        if other.count == 0:
            return
        self.hist += np.asarray(other.hist_counts, dtype=np.int64)
        self.sketch.merge(decode_sketch(other.kll))
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self._combine(other.count, other.mean, other.variance * other.count)


def merge_summaries(summaries: list[NumericSummary]) -> NumericSummary:
    """One summary with the meaning of all of them together."""
    if not summaries:
        raise ValueError("nothing to merge")
    acc = SeriesAccumulator(summaries[0].hist_edges)
    for s in summaries:
        acc.merge(s)
    return acc.summary()


def summarise(values: np.ndarray, hist_edges: list[float] | np.ndarray) -> NumericSummary:
    acc = SeriesAccumulator(hist_edges)
    acc.update(values)
    return acc.summary()


FOLD_ROWS = 4096  # rows buffered before the statistics are updated: amortises the per-call cost


class MatrixAccumulator:
    """``SeriesAccumulator`` for every column of a matrix at once, vectorised across columns.

    Rows are buffered and folded in blocks of ``FOLD_ROWS``, so the cost per call (dozens of
    numpy calls) does not grow with how small the scoring batches are. Rows must be finite: the
    decoder has already dead-lettered the rest and counted them with ``add_missing`` and
    ``add_nonfinite``.
    """

    def __init__(self, edges: list[list[float]]) -> None:
        f = len(edges)
        width = max((len(e) for e in edges), default=0)
        self.n_edges = [len(e) for e in edges]
        # pad with +inf: no finite value reaches a padded edge, so padded bins stay empty
        self.edges = np.full((f, width), np.inf)
        for j, e in enumerate(edges):
            self.edges[j, : len(e)] = e
        self.hist = np.zeros((f, width + 1), dtype=np.int64)
        self.sketches = [kll_doubles_sketch(KLL_K) for _ in range(f)]
        self.count = 0
        self.missing = np.zeros(f, dtype=np.int64)
        self.nonfinite = np.zeros(f, dtype=np.int64)
        self.min = np.full(f, np.inf)
        self.max = np.full(f, -np.inf)
        self.mean = np.zeros(f)
        self.m2 = np.zeros(f)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def update(self, matrix: np.ndarray) -> None:
        if len(matrix):
            self._buffer.append(matrix)
            self._buffered += len(matrix)
            if self._buffered >= FOLD_ROWS:
                self._fold()

    def add_missing(self, column: int, n: int = 1) -> None:
        self.missing[column] += n

    def add_nonfinite(self, column: int, n: int = 1) -> None:
        self.nonfinite[column] += n

    def _fold(self) -> None:
        """Fold the buffered rows in: one sort per column pays for everything else. Sorted, a
        column's min and max are its ends, its histogram is a handful of binary searches for the
        bin edges, and the KLL sketch takes sorted input about twice as fast as unsorted (its
        guarantees hold for any input order)."""
        if not self._buffer:
            return
        cols = np.concatenate(self._buffer).T.copy()  # (f, n), each row contiguous
        self._buffer, self._buffered = [], 0
        cols.sort(axis=1)  # in the input's precision (float32 from the decoder): half the bytes to move
        cols = cols.astype(np.float64, copy=False)
        n = cols.shape[1]
        mean = cols.mean(axis=1)
        m2 = ((cols - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta * delta * self.count * n / total
        self.count = total
        np.minimum(self.min, cols[:, 0], out=self.min)
        np.maximum(self.max, cols[:, -1], out=self.max)
        for j, (sketch, k) in enumerate(zip(self.sketches, self.n_edges)):
            col = cols[j]
            sketch.update(col)
            # values below edge i: bins are [edge[i-1], edge[i]), as np.searchsorted(side="right") puts them
            bounds = np.empty(k + 2, dtype=np.int64)
            bounds[0], bounds[-1] = 0, n
            bounds[1:-1] = np.searchsorted(col, self.edges[j, :k], side="left")
            self.hist[j, : k + 1] += bounds[1:] - bounds[:-1]

    def summaries(self) -> list[NumericSummary]:
        self._fold()
        has = self.count > 0
        out = []
        for j, k in enumerate(self.n_edges):
            out.append(NumericSummary(
                count=self.count,
                missing=int(self.missing[j]),
                nonfinite=int(self.nonfinite[j]),
                min=float(self.min[j]) if has else None,
                max=float(self.max[j]) if has else None,
                mean=float(self.mean[j]) if has else None,
                variance=float(self.m2[j] / self.count) if has else None,
                hist_edges=self.edges[j, :k].tolist(),
                hist_counts=self.hist[j, : k + 1].tolist(),
                kll=encode_sketch(self.sketches[j]) if has else None,
            ))
        return out
