"""Compact, mergeable summaries of numeric series.

A device keeps one accumulator per feature (and one for the outlier score) for each window. What
it ships is a ``NumericSummary``: exact count/min/max/mean/variance, a histogram on the baseline's
bin edges, exact counts on the review grid (the baseline's quantiles, both sides of each: what the
fleet review compares distributions on), and an Apache DataSketches KLL sketch for quantiles. Any
number of summaries merge into one with the same meaning, so the cloud can roll windows up into
days, devices into fleets.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from datasketches import kll_doubles_sketch, kll_floats_sketch

from .contracts import NumericSummary

KLL_K = 200  # DataSketches' default: about 1.33% normalised rank error for single quantiles


_KLL_PREAMBLE = struct.Struct("<BBBBHBB")  # preamble ints, serial version, family, flags, k, m, unused
_KLL_FULL = struct.Struct("<QHBB")  # n, min k, levels, unused
_KLL_FAMILY = 15
_KLL_EMPTY, _KLL_SINGLE = 1, 4


_POW2 = np.ldexp(1.0, np.arange(64))


class SketchLayout(NamedTuple):
    """Where a serialised float KLL sketch keeps its items: ``sizes[i]`` items of weight 2**i, level
    by level, from ``offset`` on."""

    k: int
    n: int
    offset: int
    sizes: list[int]


def kll_layout(data: bytes) -> SketchLayout:
    """Read a serialised ``kll_floats_sketch``'s layout without building one: the fleet review needs
    only its items and weights (for CDFs on a grid, as integer weight sums) and reads tens of
    thousands of sketches. DataSketches' compact layout: an 8-byte preamble; then, unless the sketch
    is empty or holds one item, n, min k and the number of levels, the level boundaries (the last
    one implied), min, max, and the items level by level. The layout is checked whole (the levels
    hold exactly the items there are, and their weights add up to n), so a damaged sketch is refused
    here, by the summary that holds it. ValueError if it is not such a sketch."""
    k, flags = _kll_head(data)
    if flags & _KLL_EMPTY:
        return SketchLayout(k, 0, len(data), [])
    if flags & _KLL_SINGLE:
        if len(data) != _KLL_PREAMBLE.size + 4:
            raise ValueError("KLL sketch of one item has another size")
        return SketchLayout(k, 1, _KLL_PREAMBLE.size, [1])
    try:
        n, _, levels, _ = _KLL_FULL.unpack_from(data, _KLL_PREAMBLE.size)
        pos = _KLL_PREAMBLE.size + _KLL_FULL.size
        bounds = struct.unpack_from(f"<{levels}I", data, pos)
    except struct.error:
        raise ValueError("KLL sketch cut short") from None
    pos += 4 * levels + 8  # past the levels, min and max
    retained, rest = divmod(len(data) - pos, 4)
    sizes = [b - a for a, b in zip(bounds, bounds[1:] + (bounds[0] + retained,))]
    if (not levels or levels > len(_POW2) or rest or retained < 0 or min(sizes) < 0
            or sum(size << level for level, size in enumerate(sizes)) != n):
        raise ValueError("KLL sketch levels do not match its items")
    return SketchLayout(k, int(n), pos, sizes)


def grid_masses(grid32: np.ndarray, sketches: list[bytes], layouts: list[SketchLayout] | None = None) -> np.ndarray:
    """For each point of the increasing float32 ``grid32``: the summed weight of the items <= it,
    over all the serialised float sketches (``layouts``: theirs, if already read): n x CDF, an exact
    integer, in one pass for the lot."""
    layouts = layouts or [kll_layout(data) for data in sketches]
    items = np.concatenate([np.frombuffer(d, "<f4", sum(lay.sizes), lay.offset) for d, lay in zip(sketches, layouts)])
    levels = [level for lay in layouts for level in range(len(lay.sizes))]
    weights = np.repeat(_POW2[levels], [size for lay in layouts for size in lay.sizes])
    below = np.searchsorted(grid32, items)  # the first grid point >= each item
    return np.cumsum(np.bincount(below, weights, minlength=len(grid32) + 1)[:len(grid32)])


def kll_extremes(data: bytes) -> tuple[float, float]:
    """A serialised non-empty ``kll_floats_sketch``'s min and max, read where they lie."""
    _, flags = _kll_head(data)
    if flags & _KLL_EMPTY:
        raise ValueError("an empty KLL sketch has no extremes")
    if flags & _KLL_SINGLE:
        (item,) = struct.unpack_from("<f", data, _KLL_PREAMBLE.size)
        return item, item
    try:
        levels = data[_KLL_PREAMBLE.size + 10]
        return struct.unpack_from("<ff", data, _KLL_PREAMBLE.size + _KLL_FULL.size + 4 * levels)
    except (IndexError, struct.error):
        raise ValueError("KLL sketch cut short") from None


def _kll_head(data: bytes) -> tuple[int, int]:
    if len(data) < _KLL_PREAMBLE.size:
        raise ValueError("KLL sketch cut short")
    _, _, family, flags, k, _, _ = _KLL_PREAMBLE.unpack_from(data)
    if family != _KLL_FAMILY:
        raise ValueError(f"not a KLL sketch (family {family})")
    return k, flags


def new_sketch(k: int = KLL_K) -> kll_floats_sketch:
    """Device data is float32, so the float sketch: half the bytes of the doubles one."""
    return kll_floats_sketch(k)


GRID_RANKS = 129  # baseline quantiles the review grid is built on: resolution 1/128 of the baseline's mass


def review_grid(baseline: NumericSummary) -> np.ndarray:
    """The points the fleet review evaluates this series' distribution at: the baseline's
    quantiles, its histogram edges and extremes, each with the largest float32 below it (a CDF's
    left limit, so point masses and ties keep a bin of their own). Devices count their values on
    it (``grid_counts``), so the review adds exact integers instead of reading sketches; the
    review derives the same grid from the same baseline, and ``grid_id`` tells the two agree."""
    points = list(baseline.hist_edges)
    sketch = decode_sketch(baseline)
    if sketch is not None and not sketch.is_empty():
        points += list(sketch.get_quantiles(np.linspace(0, 1, GRID_RANKS)))
    points += [v for v in (baseline.min, baseline.max) if v is not None]
    # float32: devices count float32 values, and a float32 comparison needs strictly increasing points
    base = np.unique(np.asarray(points, dtype=np.float32))
    base = base[np.isfinite(base)]
    if not len(base):  # a series the baseline never saw a value of, nor has edges for: one point, harmless
        base = np.zeros(1, dtype=np.float32)
    return np.unique(np.concatenate([base, np.nextafter(base, np.float32(-np.inf))])).astype(np.float64)


def grid_id(features: Mapping[str, np.ndarray], score: np.ndarray) -> str:
    """Names a set of review grids (each feature's and the score's): a summary counted on them
    says so, and the review uses its counts only when its own grids, from the same baseline, have
    this name."""
    h = hashlib.sha256()
    for name, grid in [*sorted(features.items()), ("", score)]:  # "": no feature has an empty name
        grid = np.asarray(grid, dtype="<f4")
        h.update(f"{name}\0{len(grid)}\0".encode())
        h.update(grid.tobytes())
    return h.hexdigest()[:16]


def grid_counts(sorted32: np.ndarray, grid32: np.ndarray) -> np.ndarray:
    """For each grid point, how many of the sorted float32 values are <= it (cumulative)."""
    return np.searchsorted(sorted32, grid32, side="right")


def grid_bins(values: np.ndarray, grid: np.ndarray) -> list[int]:
    """The finite values' counts on the grid as a summary carries them (``grid_counts``)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values32 = np.sort(values[np.isfinite(values)].astype(np.float32))
    return _bins(grid_counts(values32, np.asarray(grid, dtype=np.float32)))


def decode_sketch(summary: NumericSummary) -> kll_floats_sketch | kll_doubles_sketch:
    """The summary's sketch, of the type it was written with (doubles before version 3)."""
    if summary.kll_type == "f64":
        return kll_doubles_sketch.deserialize(summary.kll) if summary.kll else kll_doubles_sketch(KLL_K)
    return kll_floats_sketch.deserialize(summary.kll) if summary.kll else new_sketch()


def as_floats_sketch(summary: NumericSummary, k: int = KLL_K) -> kll_floats_sketch:
    """The summary's sketch as a float sketch, for merging: a version-2 doubles sketch is rebuilt
    from its retained items and their weights (its guarantees carry over to the new sketch)."""
    sketch = decode_sketch(summary)
    if isinstance(sketch, kll_floats_sketch):
        return sketch
    out = kll_floats_sketch(max(sketch.k, 8) if not sketch.is_empty() else k)
    if not sketch.is_empty():
        items = np.fromiter((x for x, _ in sketch), dtype=np.float64)
        weights = np.fromiter((w for _, w in sketch), dtype=np.int64)
        order = np.argsort(items, kind="stable")
        items, weights = items[order], weights[order]
        # a compacted sketch's retained items need not include its extremes: one unit of weight of
        # the smallest and of the largest item stands for them, so n and min/max stay exact
        values = np.repeat(items, weights)
        values[0], values[-1] = sketch.get_min_value(), sketch.get_max_value()
        out.update(values.astype(np.float32))
    return out


class SeriesAccumulator:
    """Accumulates one numeric series batch by batch; ``summary()`` freezes it."""

    def __init__(self, hist_edges: list[float] | np.ndarray, k: int = KLL_K, grid: np.ndarray | None = None) -> None:
        self.edges = np.asarray(hist_edges, dtype=np.float64)
        self.hist = np.zeros(len(self.edges) + 1, dtype=np.int64)
        self.sketch = new_sketch(k)
        # values <= each review grid point, if counted on one (``review_grid``)
        self.grid32 = None if grid is None else np.asarray(grid, dtype=np.float32)
        self.grid_le = None if grid is None else np.zeros(len(grid), dtype=np.int64)
        self.count = 0
        self.missing = 0
        self.nan = 0
        self.inf = 0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def add_missing(self, n: int = 1) -> None:
        self.missing += n

    def add_nonfinite(self, n: int = 1, nan: bool = False) -> None:
        if nan:
            self.nan += n
        else:
            self.inf += n

    def update(self, values: np.ndarray) -> None:
        """Add finite values; NaN and +-Inf are counted apart."""
        values = np.asarray(values, dtype=np.float64).ravel()
        nan = np.isnan(values)
        inf = np.isinf(values)
        self.nan += int(nan.sum())
        self.inf += int(inf.sum())
        values = values[~(nan | inf)]
        n = values.size
        if n == 0:
            return
        values32 = values.astype(np.float32)
        self.sketch.update(values32)
        if self.grid_le is not None:
            self.grid_le += grid_counts(np.sort(values32), self.grid32)
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
            nonfinite=self.nan + self.inf,
            nan=self.nan,
            inf=self.inf,
            min=self.min if has else None,
            max=self.max if has else None,
            mean=self.mean if has else None,
            variance=self.m2 / self.count if has else None,
            hist_edges=self.edges.tolist(),
            hist_counts=self.hist.tolist(),
            kll=self.sketch.serialize() if has else None,
            kll_type="f32",
            grid_counts=_bins(self.grid_le),
        )

    def merge(self, other: NumericSummary) -> None:
        """Add a summary. Grid counts are ``merge_summaries``' to add: an accumulator counting on
        a grid knows none after a merge."""
        self.grid_le = self.grid32 = None
        if list(other.hist_edges) != self.edges.tolist():
            raise ValueError("cannot merge summaries with different histogram edges")
        self.missing += other.missing
        # before version 3 NaN and Inf were one count: it goes to inf, which keeps nan + inf right
        self.nan += other.nan
        self.inf += other.inf if (other.nan or other.inf) else other.nonfinite
        if other.count == 0:
            return
        self.hist += np.asarray(other.hist_counts, dtype=np.int64)
        self.sketch.merge(as_floats_sketch(other))
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self._combine(other.count, other.mean, other.variance * other.count)


def merge_summaries(summaries: list[NumericSummary]) -> NumericSummary:
    """One summary with the meaning of all of them together. Grid counts add up when every
    summary has them, on grids of one length (the caller merges summaries of one grid, as it
    merges those of one set of histogram edges); otherwise the merged summary has none."""
    if not summaries:
        raise ValueError("nothing to merge")
    acc = SeriesAccumulator(summaries[0].hist_edges, max(_k(s) for s in summaries))
    for s in summaries:
        acc.merge(s)
    merged = acc.summary()
    counted = [s.grid_counts for s in summaries]
    if all(c is not None and len(c) == len(counted[0]) for c in counted):
        merged.grid_counts = np.sum(np.asarray(counted, dtype=np.int64), axis=0).tolist()
    return merged


def _bins(grid_le: np.ndarray | None) -> list[int] | None:
    """Cumulative counts on a grid as the summary carries them: per point, the values in
    (previous point, point], small numbers that pack into few bytes."""
    return None if grid_le is None else np.diff(grid_le, prepend=0).tolist()


def _k(summary: NumericSummary) -> int:
    return decode_sketch(summary).k if summary.kll else KLL_K


def summarise(values: np.ndarray, hist_edges: list[float] | np.ndarray,
              grid: np.ndarray | None = None) -> NumericSummary:
    acc = SeriesAccumulator(hist_edges, grid=grid)
    acc.update(values)
    return acc.summary()


FOLD_ROWS = 4096  # rows buffered before the statistics are updated: amortises the per-call cost


class MatrixAccumulator:
    """``SeriesAccumulator`` for every column of a matrix at once, vectorised across columns.

    Rows are buffered and folded in blocks of ``FOLD_ROWS``, so the cost per call (dozens of
    numpy calls) does not grow with how small the scoring batches are. Rows must be finite: the
    decoder has already dead-lettered the rest and counted them with ``add_missing`` and
    ``add_nonfinite``. (Folding on a thread of its own was tried: numpy's sort releases the GIL but
    the KLL updates do not, and end to end it was no faster; see docs/benchmarks.md.)
    """

    def __init__(self, edges: list[list[float]], k: int = KLL_K, grids: list[np.ndarray] | None = None) -> None:
        f = len(edges)
        width = max((len(e) for e in edges), default=0)
        self.n_edges = [len(e) for e in edges]
        # pad with +inf: no finite value reaches a padded edge, so padded bins stay empty
        self.edges = np.full((f, width), np.inf)
        for j, e in enumerate(edges):
            self.edges[j, : len(e)] = e
        self.hist = np.zeros((f, width + 1), dtype=np.int64)
        self.sketches = [new_sketch(k) for _ in range(f)]
        self.count = 0
        self.missing = np.zeros(f, dtype=np.int64)
        self.nan = np.zeros(f, dtype=np.int64)
        self.inf = np.zeros(f, dtype=np.int64)
        self.min = np.full(f, np.inf)
        self.max = np.full(f, -np.inf)
        self.mean = np.zeros(f)
        self.m2 = np.zeros(f)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        # per column, values <= each point of its review grid (``review_grid``), if counted on one
        if grids is not None and len(grids) != f:
            raise ValueError(f"{len(grids)} grids for {f} columns")
        self.grids32 = None if grids is None else [np.asarray(g, dtype=np.float32) for g in grids]
        self.grid_le = None if grids is None else [np.zeros(len(g), dtype=np.int64) for g in grids]

    def update(self, matrix: np.ndarray) -> None:
        if len(matrix):
            self._buffer.append(matrix)
            self._buffered += len(matrix)
            if self._buffered >= FOLD_ROWS:
                block, self._buffer, self._buffered = self._buffer, [], 0
                self._fold(block)

    def _settle(self) -> None:
        """Fold in the rows still buffered."""
        if self._buffer:
            block, self._buffer, self._buffered = self._buffer, [], 0
            self._fold(block)

    def add_missing(self, column: int, n: int = 1) -> None:
        self.missing[column] += n

    def add_nonfinite(self, column: int, n: int = 1, nan: bool = False) -> None:
        (self.nan if nan else self.inf)[column] += n

    def _fold(self, block: list[np.ndarray]) -> None:
        """Fold the buffered rows in: one sort per column pays for everything else. Sorted, a
        column's min and max are its ends, its histogram is a handful of binary searches for the
        bin edges, and the KLL sketch takes sorted input about twice as fast as unsorted (its
        guarantees hold for any input order)."""
        cols = np.concatenate(block).T.copy()  # (f, n), each row contiguous
        cols.sort(axis=1)  # in the input's precision (float32 from the decoder): half the bytes to move
        if cols.dtype != np.float32:
            cols = cols.astype(np.float32)
        for sketch, col in zip(self.sketches, cols):
            sketch.update(col)
        if self.grid_le is not None:
            for le, grid32, col in zip(self.grid_le, self.grids32, cols):
                le += grid_counts(col, grid32)
        wide = cols.astype(np.float64)
        n = wide.shape[1]
        np.minimum(self.min, wide[:, 0], out=self.min)
        np.maximum(self.max, wide[:, -1], out=self.max)
        for j, k in enumerate(self.n_edges):
            # values below edge i: bins are [edge[i-1], edge[i]), as np.searchsorted(side="right") puts them
            bounds = np.empty(k + 2, dtype=np.int64)
            bounds[0], bounds[-1] = 0, n
            bounds[1:-1] = np.searchsorted(wide[j], self.edges[j, :k], side="left")
            self.hist[j, : k + 1] += bounds[1:] - bounds[:-1]
        mean = wide.mean(axis=1)
        wide -= mean[:, None]  # in place: the block's sum of squared deviations without temporaries
        np.square(wide, out=wide)
        m2 = wide.sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta * delta * self.count * n / total
        self.count = total

    def summaries(self) -> list[NumericSummary]:
        self._settle()
        has = self.count > 0
        out = []
        for j, k in enumerate(self.n_edges):
            out.append(NumericSummary(
                count=self.count,
                missing=int(self.missing[j]),
                nonfinite=int(self.nan[j] + self.inf[j]),
                nan=int(self.nan[j]),
                inf=int(self.inf[j]),
                min=float(self.min[j]) if has else None,
                max=float(self.max[j]) if has else None,
                mean=float(self.mean[j]) if has else None,
                variance=float(self.m2[j] / self.count) if has else None,
                hist_edges=self.edges[j, :k].tolist(),
                hist_counts=self.hist[j, : k + 1].tolist(),
                kll=self.sketches[j].serialize() if has else None,
                kll_type="f32",
                grid_counts=_bins(self.grid_le[j]) if self.grid_le is not None else None,
            ))
        return out
