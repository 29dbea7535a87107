import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.summary import SeriesAccumulator, decode_sketch, merge_summaries, summarise

EDGES = [-1.0, 0.0, 1.0]


def test_statistics_match_numpy():
    x = np.random.default_rng(0).normal(2.0, 3.0, 5000)
    s = summarise(x, EDGES)
    assert s.count == 5000
    assert s.mean == pytest.approx(x.mean(), rel=1e-12)
    assert s.variance == pytest.approx(x.var(), rel=1e-9)
    assert (s.min, s.max) == (x.min(), x.max())
    expected = np.histogram(x, [-np.inf, *EDGES, np.inf])[0]
    assert s.hist_counts == expected.tolist()
    assert decode_sketch(s).get_quantile(0.5) == pytest.approx(np.median(x), abs=0.15)


def test_value_on_an_edge_goes_to_the_bin_above():
    assert summarise(np.array([0.0]), EDGES).hist_counts == [0, 0, 1, 0]


def test_merging_parts_equals_summarising_the_whole():
    rng = np.random.default_rng(1)
    parts = [rng.normal(m, 1 + abs(m), n) for m, n in [(0, 10), (5, 3000), (-2, 700), (1, 1)]]
    whole = summarise(np.concatenate(parts), EDGES)
    merged = merge_summaries([summarise(p, EDGES) for p in parts])
    assert merged.count == whole.count and merged.hist_counts == whole.hist_counts
    assert merged.mean == pytest.approx(whole.mean, rel=1e-12)
    assert merged.variance == pytest.approx(whole.variance, rel=1e-9)
    assert (merged.min, merged.max) == (whole.min, whole.max)
    q = [0.1, 0.5, 0.9]
    assert decode_sketch(merged).get_quantiles(q) == pytest.approx(
        np.quantile(np.concatenate(parts), q), abs=0.3)


def test_missing_and_nonfinite_are_counted_not_summarised():
    acc = SeriesAccumulator(EDGES)
    acc.update(np.array([1.0, np.nan, np.inf, -np.inf, 3.0]))
    acc.add_missing(2)
    s = acc.summary()
    assert (s.count, s.missing, s.nan, s.inf, s.nonfinite, s.mean) == (2, 2, 1, 2, 3, 2.0)
    empty = SeriesAccumulator(EDGES).summary()
    assert empty.count == 0 and empty.mean is None and empty.kll is None
    assert merge_summaries([empty, s]).count == 2


def test_edges_must_agree_to_merge():
    with pytest.raises(ValueError, match="edges"):
        merge_summaries([summarise(np.ones(3), EDGES), summarise(np.ones(3), [0.0])])


def test_matrix_accumulator_matches_the_per_series_one_column_by_column():
    from edge_runtime.summary import FOLD_ROWS, MatrixAccumulator

    rng = np.random.default_rng(5)
    edges = [EDGES, [0.5], [-2.0, -1.0, 0.0, 1.0, 2.0, 2.5], list(np.linspace(-3, 3, 40))]  # ragged; > 32 bins
    m = rng.normal(0, 1.5, (3 * FOLD_ROWS + 123, 4)).astype(np.float32)
    m[7, :] = [0.0, 0.5, 2.5, 0.0]  # values exactly on edges go to the bin above
    acc = MatrixAccumulator(edges)
    for lo in range(0, len(m), 1000):  # uneven batches across fold boundaries
        acc.update(m[lo:lo + 1000])
    acc.add_missing(1, 3)
    acc.add_nonfinite(2)
    got = acc.summaries()
    for j, e in enumerate(edges):
        series = SeriesAccumulator(e)
        series.update(m[:, j])
        want = series.summary()
        assert got[j].count == want.count == len(m)
        assert got[j].hist_edges == want.hist_edges and got[j].hist_counts == want.hist_counts
        assert (got[j].min, got[j].max) == (want.min, want.max)
        assert got[j].mean == pytest.approx(want.mean, rel=1e-9)
        assert got[j].variance == pytest.approx(want.variance, rel=1e-9)
        sketch = decode_sketch(got[j])
        assert sketch.n == len(m)
        for q in (0.1, 0.5, 0.9):  # within the sketch's rank error of the exact quantile
            rank = float(np.mean(m[:, j].astype(np.float64) <= sketch.get_quantile(q)))
            assert abs(rank - q) <= 2 * sketch.normalized_rank_error(False)
    assert (got[1].missing, got[2].nonfinite, got[0].missing) == (3, 1, 0)


def test_counts_on_a_review_grid_are_exact_however_the_values_come_and_add_up_when_merged():
    from edge_runtime.summary import FOLD_ROWS, MatrixAccumulator, grid_bins, review_grid

    rng = np.random.default_rng(6)
    base = rng.normal(0, 1, 20_000)
    baseline = summarise(base, EDGES)
    grid = review_grid(baseline)  # the baseline's quantiles, edges and extremes, each with its left limit
    points = grid.astype(np.float32)
    assert np.all(np.diff(points) > 0) and set(np.float32(EDGES)) <= set(points)
    assert np.array_equal(np.nextafter(points[1::2], np.float32(-np.inf)), points[::2])  # a point and just below it
    m = rng.normal(0.2, 1.3, (2 * FOLD_ROWS + 77, 2)).astype(np.float32)
    m[:40, 0] = points[100]  # ties exactly on a point are counted at it, not below it
    acc = MatrixAccumulator([EDGES, EDGES], grids=[grid, grid])
    for lo in range(0, len(m), 999):
        acc.update(m[lo:lo + 999])
    a, b = acc.summaries()
    for j, s in enumerate((a, b)):
        want = np.searchsorted(np.sort(m[:, j]), points, side="right")  # values <= each point
        assert np.cumsum(s.grid_counts).tolist() == want.tolist() and s.grid_counts == grid_bins(m[:, j], grid)
    assert a.grid_counts[100] >= 40  # the ties: in (point 99, point 100]
    one = SeriesAccumulator(EDGES, grid=grid)
    one.update(np.concatenate([m[:, 0], [np.nan, np.inf]]))  # non-finite values are not on the grid
    assert one.summary().grid_counts == a.grid_counts
    merged = merge_summaries([a, b])
    assert merged.grid_counts == (np.asarray(a.grid_counts) + b.grid_counts).tolist()
    assert merge_summaries([a, summarise(m[:, 1], EDGES)]).grid_counts is None  # one without: none known


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30_000), min_size=1, max_size=6), k=st.sampled_from([8, 20, 200]),
       seed=st.integers(0, 2**32 - 1))
def test_sketch_bytes_read_without_the_library_agree_with_it(sizes, k, seed):
    """The review reads float sketches' items, weights and extremes straight from their bytes: the
    same items and weights the library iterates, and the same CDF masses it gives on a grid."""
    from datasketches import kll_floats_sketch

    from edge_runtime.summary import grid_masses, kll_extremes, kll_layout

    rng = np.random.default_rng(seed)
    sketches = []
    for n in sizes:
        sketch = kll_floats_sketch(k)
        for v in rng.standard_t(3, size=n).astype(np.float32):
            sketch.update(float(v))
        data = sketch.serialize()
        layout = kll_layout(data)
        assert (layout.k, layout.n) == (k, n)
        items = np.frombuffer(data, "<f4", sum(layout.sizes), layout.offset).tolist()
        weights = [float(2**level) for level, size in enumerate(layout.sizes) for _ in range(size)]
        assert sorted(zip(items, weights)) == sorted((float(x), float(w)) for x, w in sketch)
        if n:
            assert kll_extremes(data) == (sketch.get_min_value(), sketch.get_max_value())
        sketches.append(sketch)
    grid = np.unique(rng.standard_t(3, size=50).astype(np.float32))
    library = sum(np.rint(np.array(s.get_cdf(grid.tolist(), inclusive=True)[:-1]) * s.n) for s in sketches if s.n)
    assert np.array_equal(grid_masses(grid, [s.serialize() for s in sketches]), library + np.zeros(len(grid)))


def test_bytes_that_are_not_a_float_sketch_are_refused():
    from edge_runtime.summary import new_sketch

    sketch = new_sketch()
    for v in range(1000):
        sketch.update(float(v))
    data = sketch.serialize()
    import struct

    from edge_runtime.summary import kll_extremes, kll_layout

    levels = data[18]
    wrong_level = bytearray(data)
    struct.pack_into("<I", wrong_level, 20, struct.unpack_from("<I", data, 20)[0] + 1)  # a boundary moved
    for bad in (data[:5], bytes([data[0], data[1], 7]) + data[3:], data[:-2], data[:12], data[:18], data[:21],
                bytes(wrong_level), data[:20 + 4 * levels + 8] + data[20 + 4 * levels + 12:]):
        for read in (kll_layout, kll_extremes):
            try:
                read(bad)
            except ValueError:
                continue
            assert read is kll_extremes  # extremes are read where they lie; the layout is what is checked
