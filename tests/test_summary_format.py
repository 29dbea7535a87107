"""Property tests (hypothesis) of window summaries: merging in any order, the binary container
(``summary_format``, versions 3 and 4) round trip, the fleet review's column reader, damage detection, its
size, version-2 JSON summaries merging with version-3 ones, and the fleet review counting a replayed window
part once."""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from datetime import datetime, timezone

import numpy as np
import pytest
from datasketches import kll_doubles_sketch, kll_floats_sketch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud.drift import load_fleet
from edge_runtime.contracts import (
    ContractError,
    NumericSummary,
    SpoolDrops,
    WindowHealth,
    WindowSummary,
    load_summary,
    summary_key,
)
from edge_runtime.digest import bytes_digest, rows_digest
from edge_runtime.store import LocalStore
from edge_runtime.summary import KLL_K, MatrixAccumulator, SeriesAccumulator, decode_sketch, merge_summaries
from edge_runtime.summary_format import DEFLATED, FORMAT, MAGIC, SummaryFormatError, _exact_sketch, columns, encode
from edge_runtime.windows import Window

F32 = np.float32
F32_MAX = float(np.finfo(F32).max)
# KLL's normalised rank error for one quantile query at k=200 (about 1.33%). DataSketches states it with 99%
# confidence *per query*, and these tests make thousands of queries over all examples and runs, so a bound of
# exactly EPS would fail now and then on a correct sketch; twice it is far out in the error's (sub-Gaussian)
# tail, so a failure means a wrong merge, not bad luck.
EPS = kll_floats_sketch.get_normalized_rank_error(KLL_K, False)
RANK_SLACK = 2 * EPS
RANKS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def examples(n: int) -> settings:
    """No deadline (a 9000-row window takes a while), no example database (no files left behind)."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# histogram edges that are float32 values, so that series can hold values exactly equal to them
EDGES = sorted({float(F32(v)) for v in (-1e30, -2.5, -1.0, 0.0, 0.1, 1.0, 7.75, 3.0e38)})
ODD_VALUES = [F32_MAX, -F32_MAX, float(np.finfo(F32).smallest_subnormal), 0.0, -0.0, 1e-30, 16777217.0]
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


# --- checks shared by the tests ------------------------------------------------------------------------------


def assert_quantiles_within_bound(summary: NumericSummary, union: np.ndarray, slack: float = RANK_SLACK,
                                  exact_extremes: bool = True) -> None:
    """Every quantile the summary's sketch gives is a value of ``union`` whose exact normalised rank there is
    within ``slack`` of the rank asked for. With ties a value has a range of ranks, [fraction below it,
    fraction at or below it]: the rank asked for must be within ``slack`` of that range. A KLL sketch also
    keeps the exact min and max (its quantiles 0 and 1)."""
    sketch = decode_sketch(summary)
    assert sketch.n == len(union)
    if not len(union):
        assert sketch.is_empty()
        return
    ordered = np.sort(np.asarray(union, dtype=np.float64))
    if exact_extremes:
        assert (sketch.get_min_value(), sketch.get_max_value()) == (ordered[0], ordered[-1])
    for inclusive in (False, True):
        for q in RANKS:
            x = sketch.get_quantile(q, inclusive)
            below = np.searchsorted(ordered, x, side="left") / len(ordered)
            at_or_below = np.searchsorted(ordered, x, side="right") / len(ordered)
            assert at_or_below > below, f"quantile {q} = {x!r} is not a value of the series"
            assert below - slack <= q <= at_or_below + slack, (
                f"q={q} inclusive={inclusive}: {x!r} has exact rank [{below}, {at_or_below}] in {len(union)} values "
                f"(allowed error {slack:.4f})")


def assert_statistics_of(summary: NumericSummary, union: np.ndarray, edges: list[float]) -> None:
    """Count, min, max and histogram exactly those of ``union``; mean and variance to float64 rounding."""
    union = np.asarray(union, dtype=np.float64)
    assert summary.count == len(union)
    assert summary.hist_edges == edges
    assert summary.hist_counts == np.bincount(np.searchsorted(edges, union, side="right"),
                                              minlength=len(edges) + 1).tolist()
    if not len(union):
        assert summary.min is summary.max is summary.mean is summary.variance is None
        return
    assert (summary.min, summary.max) == (union.min(), union.max())
    # Chan et al.'s merge rounds at the scale of the values (delta = mean_b - mean_a, squared), not at the scale
    # of the result: allow float64 rounding relative to max|x| (and max|x|^2 for the variance) besides 1e-9
    scale = float(np.abs(union).max())
    mean = math.fsum(union) / len(union)
    assert abs(summary.mean - mean) <= 1e-9 * abs(mean) + 1e-12 * scale
    variance = math.fsum((union - mean) ** 2) / len(union)
    assert abs(summary.variance - variance) <= 1e-9 * variance + 1e-12 * scale * scale


# --- 1. merging is associative and commutative ---------------------------------------------------------------


@st.composite
def series(draw) -> tuple[np.ndarray, int, int, int, int]:
    """(finite float32 values, NaNs, +Infs, -Infs, missing): a few drawn values (edges, extremes, duplicates)
    and a bulk drawn by numpy from a hypothesis seed, of 0 to 3000 values."""
    picked = draw(st.lists(st.one_of(FLOAT32, st.sampled_from(EDGES), st.sampled_from(ODD_VALUES)), max_size=25))
    n = draw(st.sampled_from([0, 0, 1, 2, 150, 600, 3000]))
    kind = draw(st.sampled_from(["normal", "duplicates", "huge", "edges"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        loc, scale = draw(st.sampled_from([(0.0, 1.0), (1e6, 1e-3), (-3.0, 1e3), (0.05, 0.05)]))
        bulk = rng.normal(loc, scale, n)
    elif kind == "duplicates":
        bulk = rng.choice(np.asarray(picked or [1.5], dtype=np.float64), n)
    elif kind == "huge":
        bulk = rng.uniform(-F32_MAX, F32_MAX, n)
    else:
        bulk = rng.choice(np.asarray(EDGES), n)
    values = np.concatenate([np.asarray(picked, dtype=F32), bulk.astype(F32)])
    rng.shuffle(values)
    return (values, draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 3)),
            draw(st.integers(0, 3)))


def summarise_series(drawn: tuple[np.ndarray, int, int, int, int]) -> NumericSummary:
    values, nan, pos_inf, neg_inf, missing = drawn
    acc = SeriesAccumulator(EDGES)
    mixed = np.concatenate([values, np.full(nan, np.nan, F32), np.full(pos_inf, np.inf, F32),
                            np.full(neg_inf, -np.inf, F32)])
    np.random.default_rng(len(mixed)).shuffle(mixed)
    for chunk in np.array_split(mixed, 3):  # in several updates, as a device would
        acc.update(chunk)
    acc.add_missing(missing)
    return acc.summary()


@examples(300)
@given(series(), series(), series())
def test_merging_is_associative_and_commutative(a, b, c):
    sa, sb, sc = (summarise_series(x) for x in (a, b, c))
    orders = {
        "merge(a, merge(b, c))": merge_summaries([sa, merge_summaries([sb, sc])]),
        "merge(merge(a, b), c)": merge_summaries([merge_summaries([sa, sb]), sc]),
        "merge(c, a, b)": merge_summaries([sc, sa, sb]),
        "merge(merge(b, a), c)": merge_summaries([merge_summaries([sb, sa]), sc]),
    }
    union = np.concatenate([a[0], b[0], c[0]]).astype(np.float64)
    exact = ("count", "missing", "nonfinite", "nan", "inf", "min", "max", "hist_edges", "hist_counts", "kll_type")
    first = next(iter(orders.values()))
    for order, merged in orders.items():
        assert {f: getattr(merged, f) for f in exact} == {f: getattr(first, f) for f in exact}, order
        assert merged.missing == a[4] + b[4] + c[4]
        assert merged.nan == a[1] + b[1] + c[1]
        assert merged.inf == sum(x[2] + x[3] for x in (a, b, c)) == merged.nonfinite - merged.nan
        assert_statistics_of(merged, union, EDGES)  # mean and variance: approximately, in every order
        assert_quantiles_within_bound(merged, union)
        if len(union):
            assert merged.mean == pytest.approx(first.mean, rel=1e-9, abs=1e-12 * float(np.abs(union).max()))


def test_merging_values_on_every_edge_counts_them_in_the_bin_above():
    on_edges = summarise_series((np.asarray(EDGES, dtype=F32), 0, 0, 0, 0))
    merged = merge_summaries([on_edges, on_edges, summarise_series((np.zeros(0, F32), 1, 0, 0, 2))])
    assert merged.hist_counts == [0] + [2] * len(EDGES)
    assert (merged.count, merged.nan, merged.missing) == (2 * len(EDGES), 1, 2)


# --- windows, as the runtime builds them -----------------------------------------------------------------------

T_HOUR = 3600
START = datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()
REASONS = ["malformed_json", "missing", "non_finite", "wrong_shape", "bad_timestamp", "too_long"]


def make_window(rng: np.random.Generator, rows: int, feature_edges: list[list[float]], score_edges: list[float],
                rejected: dict[str, int] | None = None, start: float = START, part: int = 0,
                model: tuple[str, str] = ("m", "1.0.0"), grids: list[np.ndarray] | None = None
                ) -> tuple[Window, np.ndarray]:
    """A window of ``rows`` normal float32 records (and ``rejected`` dead letters), through the same
    accumulators and digest as the runtime's; also the matrix of records. ``grids``: count on these
    (the features', then the score's), as a device counts on its baseline's review grids."""
    names = [f"f{i}" for i in range(len(feature_edges))]
    window = Window(start=start, end=start + T_HOUR, model_name=model[0], model_version=model[1],
                    feature_names=names, features=MatrixAccumulator(feature_edges, grids=grids and grids[:-1]),
                    score=MatrixAccumulator([score_edges], grids=grids and grids[-1:]), part=part,
                    grid="0123456789abcdef" if grids else None)
    x = rng.normal(0, 1, (rows, len(names))).astype(F32)
    ts = start + np.sort(rng.uniform(0, T_HOUR, rows))
    score = (x.astype(np.float64) ** 2).sum(axis=1, keepdims=True).astype(F32)
    for lo in range(0, rows, 700):  # scoring batches
        window.features.update(x[lo:lo + 700])
        window.score.update(score[lo:lo + 700])
    window.records = rows
    window.outliers = int((score > 3 * len(names)).sum())
    window.digest = rows_digest(x, ts)
    for reason, n in (rejected or {}).items():
        for i in range(n):
            window.rejected += 1
            window.rejected_by_reason[reason] += 1
            window.digest += bytes_digest(f"{reason} {i} {start}".encode())
            if reason == "missing" and names:
                window.features.add_missing(i % len(names))
            if reason == "non_finite" and names:
                window.features.add_nonfinite(i % len(names), nan=bool(i % 2))
    return window, x


def quantile_edges(rng: np.random.Generator, bins: int = 10) -> list[float]:
    """Edges of ``bins`` quantile bins of a training sample, as the bundle's baseline holds them."""
    return np.quantile(rng.normal(0, 1, 4000).astype(F32), np.linspace(0, 1, bins + 1)[1:-1]).tolist()


# --- 2. codec round trip ---------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=16)  # JSON text: no lone surrogates
COUNT = st.integers(0, 2**63 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
HEALTH = st.builds(
    WindowHealth, provider=st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider"]),
    uptime_s=FINITE, records_in=COUNT, scored=COUNT, rejected=COUNT, outliers=COUNT, dropped=COUNT,
    queue_depth=COUNT, batches=COUNT, batch_size_p50=st.none() | FINITE, score_latency_ms_p50=st.none() | FINITE,
    score_latency_ms_p99=st.none() | FINITE, swaps=COUNT, spool_pending=st.none() | COUNT,
    spool_bytes=st.none() | COUNT, disk_full=st.booleans(), uploaded=st.none() | COUNT,
    upload_failures=st.none() | COUNT, writer_conflicts=COUNT, replays=COUNT,
)
SPOOL_DROPS = st.builds(SpoolDrops, summaries=COUNT, samples=COUNT, records=COUNT, reason=st.none() | TEXT)
SORTED_EDGES = st.lists(st.floats(-1e6, 1e6, width=32), max_size=12, unique=True).map(sorted)


def assert_round_trips(summary: WindowSummary, version: int = FORMAT) -> WindowSummary:
    data = encode(summary, version)
    assert data[:4] == MAGIC and data[4] == version
    assert encode(summary, version) == data  # deterministic: no gzip timestamp
    back = load_summary(data, "window.elws")
    want, got = summary.model_dump(), back.model_dump()
    want["schema_version"] = version
    if version < 4:  # version 3 has no grid counts: they are left out, and nothing else
        want["grid"] = None
    if version < 4 or all(map(_exact_sketch, [*summary.features.values(), summary.score])):
        for series in [want["score"], *want["features"].values()]:  # a short window's sketches hold every value
            series["grid_counts"] = None
    for name in [*summary.features, None]:  # variance is stored as m2 = variance * count and divided back
        w = want["score"] if name is None else want["features"][name]
        g = got["score"] if name is None else got["features"][name]
        w_var, g_var = w.pop("variance"), g.pop("variance")
        assert g_var == w_var if w_var is None else g_var == pytest.approx(w_var, rel=1e-12, abs=0)
    assert got == want
    assert list(back.features) == list(summary.features)  # feature order kept
    for series in [*back.features.values(), back.score]:  # built without validation: as validation builds it
        assert series.model_fields_set == set(NumericSummary.model_fields)
        again = NumericSummary.model_validate(series.model_dump())
        assert again == series
        assert all(type(getattr(again, f)) is type(getattr(series, f)) for f in NumericSummary.model_fields)
    assert_columns_agree(data, back)
    return back


def assert_columns_agree(data: bytes, back: WindowSummary) -> None:
    """The review's column reader gives what the full decoder gives, for a summary counted on grids;
    None for any other."""
    cols = columns(data, "window.elws")
    if back.score.grid_counts is None:
        assert cols is None
        return
    series = [*back.features.values(), back.score]
    assert cols.names == [*back.features, "score"] and cols.header["grid"] == back.grid
    assert cols.tallies.tolist() == [[s.count, s.missing, s.nan, s.inf] for s in series]
    for row, s in zip(cols.moments.tolist(), series):
        if s.count:
            assert row[:3] == [s.min, s.max, s.mean] and row[3] == pytest.approx(s.variance * s.count, rel=1e-12)
    assert cols.grid_lengths.tolist() == [len(s.grid_counts) for s in series]
    assert cols.grid_counts.tolist() == [c for s in series for c in s.grid_counts]


@examples(120)
@given(n_features=st.integers(1, 8), rows=st.sampled_from([0, 1, 3, 64, 4097, 9000]),
       edges=st.lists(SORTED_EDGES, min_size=8, max_size=8), score_edges=SORTED_EDGES,
       rejected=st.dictionaries(st.sampled_from(REASONS) | TEXT, st.integers(0, 40), max_size=4),
       health=st.none() | HEALTH, instance=st.none() | st.from_regex(r"[0-9a-f]{12}", fullmatch=True) | TEXT,
       part=st.integers(0, 2**31), spool_dropped=st.none() | SPOOL_DROPS, device=TEXT.filter(bool),
       hours=st.integers(-24 * 365 * 50, 24 * 365 * 50), seed=st.integers(0, 2**32 - 1),
       grid_sizes=st.none() | st.lists(st.integers(0, 300), min_size=9, max_size=9),
       version=st.sampled_from([3, 4, 4]))
@example(n_features=6, rows=0, edges=[[-1.0, 0.0, 1.0]] * 8, score_edges=[1.0, 5.0], rejected={"missing": 5},
         health=None, instance="0123456789ab", part=0, spool_dropped=None, device="dev-1", hours=0, seed=0,
         grid_sizes=None, version=4)
@example(n_features=2, rows=9000, edges=[[-1.0, 0.0, 1.0]] * 8, score_edges=[1.0, 5.0], rejected={},
         health=None, instance="0123456789ab", part=0, spool_dropped=None, device="dev-1", hours=0, seed=0,
         grid_sizes=[258, 0, 1, 2, 3, 4, 5, 6, 270], version=4)
def test_a_window_summary_round_trips_through_the_binary_container(
        n_features, rows, edges, score_edges, rejected, health, instance, part, spool_dropped, device, hours, seed,
        grid_sizes, version):
    rng = np.random.default_rng(seed)
    grids = None
    if grid_sizes is not None:  # increasing float32 points, some of them where the values are dense
        grids = [np.unique(rng.normal(0, 1.5, n).astype(F32)).astype(np.float64)
                 for n in grid_sizes[:n_features] + grid_sizes[-1:]]
    window, x = make_window(rng, rows, edges[:n_features], score_edges, rejected,
                            start=START + hours * T_HOUR, part=part, grids=grids)
    summary = window.summary(device, health, instance, spool_dropped)
    back = assert_round_trips(summary, version)
    assert back.records == rows and back.rejected == sum(rejected.values())
    assert back.score.count == rows and all(f.count == rows for f in back.features.values())
    if grids is not None and version >= 4 and rows > KLL_K:  # the counts on each grid: exactly the values'
        for j, (name, s) in enumerate(back.features.items()):
            at_or_below = np.searchsorted(np.sort(x[:, j]), grids[j].astype(F32), side="right")
            assert np.cumsum(s.grid_counts).tolist() == at_or_below.tolist(), name


def test_a_large_window_counted_on_grids_round_trips_with_its_grid_counts_deflated_alone():
    """64 features of 10,000 rows: a body too large to deflate whole (mostly sketches), so the grid
    counts are deflated on their own; both readers get every count back."""
    from edge_runtime.summary import review_grid, summarise

    rng = np.random.default_rng(14)
    training = rng.normal(0, 1, 5_000)
    edges = [quantile_edges(rng) for _ in range(64)]
    grids = [review_grid(summarise(training, e)) for e in edges]
    window, x = make_window(rng, 10_000, edges, quantile_edges(rng), grids=[*grids, grids[0]])
    summary = window.summary("dev", None, "0123456789ab")
    data = encode(summary)
    assert data[5] == 0  # the body as a whole is not deflated ...
    raw = sum(len(s.grid_counts) for s in [*summary.features.values(), summary.score])
    assert len(data) < len(encode(summary, 3)) + 0.7 * raw  # ... its grid counts are (raw: a byte a point)
    back = assert_round_trips(summary)
    assert back.features["f63"].grid_counts == summary.features["f63"].grid_counts
    assert np.cumsum(back.features["f7"].grid_counts)[-1] == int((x[:, 7] <= grids[7][-1]).sum())


@pytest.mark.parametrize("version", [3, 4])
def test_extremes_that_are_not_float32_values_keep_every_bit(version):
    from edge_runtime.summary import summarise

    x = summarise(np.array([0.1, 0.2, 3.1e30, -1e-20]), [0.0])  # float64 values: a cloud-side merge, say
    f32 = summarise(np.array([0.5, 2.0], dtype=np.float32), [0.0])
    summary = WindowSummary(model_name="m", model_version="1.0.0", device_id="d", window_start=START,
                            window_end=START, features={"x": x, "y": f32}, score=f32)
    back = assert_round_trips(summary, version)
    assert (back.features["x"].min, back.features["x"].max) == (-1e-20, 3.1e30)


def test_a_window_with_only_rejections_round_trips():
    window, _ = make_window(np.random.default_rng(4), 0, [[-1.0, 0.0, 1.0]] * 3, [2.0],
                            {"missing": 4, "non_finite": 3, "malformed_json": 2})
    summary = window.summary("dev-1", None, "0123456789ab")
    back = assert_round_trips(summary)
    assert (back.records, back.rejected, back.rejected_by_reason) == (0, 9, {
        "malformed_json": 2, "missing": 4, "non_finite": 3})
    f0 = back.features["f0"]
    assert (f0.count, f0.missing, f0.nan, f0.inf, f0.min, f0.kll, f0.kll_type) == (0, 2, 0, 1, None, None, "f32")
    assert back.score.count == 0 and back.score.hist_counts == [0, 0]


# --- 3. damage is always detected ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded() -> list[bytes]:
    """Encoded summaries: a small and a 5000-row window (gzipped bodies), one whose body is not gzipped, one
    counted on grids, and one of version 3."""
    rng = np.random.default_rng(11)
    small, _ = make_window(rng, 40, [quantile_edges(rng)] * 3, [1.0, 4.0], {"missing": 2})
    large, _ = make_window(rng, 5000, [quantile_edges(rng)] * 6, quantile_edges(rng))
    grid = np.unique(rng.normal(0, 1, 200).astype(F32)).astype(np.float64)
    gridded, _ = make_window(rng, 3000, [quantile_edges(rng)] * 4, quantile_edges(rng), grids=[grid] * 5)

    def incompressible() -> NumericSummary:  # random bits, in both series: gzip saves nothing, the body stays plain
        noise = np.frombuffer(rng.bytes(8 * 700), dtype=np.float64)
        noise = np.sort(noise[np.isfinite(noise)][:600]).tolist()
        return NumericSummary(count=1, min=0.0, max=0.0, mean=0.0, variance=0.0, hist_edges=noise,
                              hist_counts=rng.integers(0, 2**62, len(noise) + 1).tolist())

    raw = WindowSummary(model_name="m", model_version="1.0.0", device_id="d", window_start=START, window_end=START,
                        features={"a": incompressible()}, score=incompressible())
    out = [encode(small.summary("dev", None, "0123456789ab")), encode(large.summary("dev", None, "0123456789ab")),
           encode(raw), encode(gridded.summary("dev", None, "0123456789ab")),
           encode(large.summary("dev", None, "0123456789ab"), 3)]
    assert [d[5] for d in out] == [DEFLATED, DEFLATED, 0, DEFLATED, DEFLATED]
    for data in out:
        load_summary(data, "whole.elws")  # undamaged, each reads
    assert columns(out[3], "whole.elws") is not None  # read as columns by the review
    return out


def assert_rejected(data: bytes) -> None:
    assert issubclass(SummaryFormatError, ContractError)
    with pytest.raises(ContractError):
        load_summary(data, "damaged.elws")
    try:  # the review's column reader: an error, or nothing to read as columns (then decoded, as above)
        assert columns(data, "damaged.elws") is None
    except ContractError:
        pass


def test_well_framed_bodies_with_bad_series_names_or_moments_are_rejected():
    window, _ = make_window(np.random.default_rng(13), 50, [[0.0], [0.0]], [1.0])
    summary = window.summary("dev", None, "0123456789ab")
    body = zlib.decompress(encode(summary)[16:])
    (head_len,) = struct.unpack_from("<I", body)
    header = json.loads(body[4:4 + head_len])
    for names in (["f0", "f0", "score"], ["f0", 1, "score"], ["f0", ["f1"], "score"]):
        head = json.dumps({**header, "series": names}).encode()
        assert_rejected(framed(struct.pack("<I", len(head)) + head + body[4 + head_len:]))
    moments_at = 4 + head_len + 1 + 3 * 16  # after the column flags and the tallies of 3 series
    bad = bytearray(body)
    struct.pack_into("<d", bad, moments_at + 16, math.nan)  # the first series' mean
    assert_rejected(framed(bytes(bad)))


def test_forged_grid_blocks_are_rejected_without_inflating_them():
    """A grid block that declares no counts but holds a deflate bomb, or a grid larger than any review
    grid: refused before anything is inflated or allocated."""
    rng = np.random.default_rng(15)
    grid = np.unique(rng.normal(0, 1, 50).astype(F32)).astype(np.float64)
    window, _ = make_window(rng, 300, [quantile_edges(rng)], [1.0], grids=[grid, grid])
    body = zlib.decompress(encode(window.summary("dev", None, "0123456789ab"))[16:])
    (head_len,) = struct.unpack_from("<I", body)
    n = 2  # one feature and the score
    at = 4 + head_len + 1 + 16 * n + 24 * n  # past the column flags, the tallies and the float32-extreme moments
    assert body[4 + head_len] & 16  # grid counts follow
    width, end = body[at + 1], at + 2 + 4 * n
    (stored,) = struct.unpack_from("<I", body, end)
    tail = body[end + 4 + stored:]
    bomb = zlib.compress(bytes(50_000_000), 9)  # 50 MB of zeros in about 50 KB
    forged = body[:at] + bytes([1, width]) + struct.pack("<II", 0, 0) + struct.pack("<I", len(bomb)) + bomb + tail
    import tracemalloc

    tracemalloc.start()
    try:
        assert_rejected(framed(forged))
        assert tracemalloc.get_traced_memory()[1] < 5_000_000  # the bomb was never inflated
    finally:
        tracemalloc.stop()
    huge = body[:at + 2] + struct.pack("<II", 10_000_000, 0) + body[end:]
    assert_rejected(framed(huge))


def _unpacked_gridded(rows: int = 300) -> tuple[bytes, int]:
    """A version-4 body (not deflated) of one feature counted on a grid, and where its columns start."""
    rng = np.random.default_rng(16)
    grid = np.unique(rng.normal(0, 1, 50).astype(F32)).astype(np.float64)
    window, _ = make_window(rng, rows, [quantile_edges(rng)], [1.0], grids=[grid, grid])
    body = zlib.decompress(encode(window.summary("dev", None, "0123456789ab"))[16:])
    (head_len,) = struct.unpack_from("<I", body)
    return body, 4 + head_len


def test_impossible_counts_and_moments_are_rejected_by_both_readers():
    body, at = _unpacked_gridded()
    tallies, moments = at + 1, at + 1 + 2 * 16  # two series (the feature, the score); float32 extremes first
    cases = {
        "m2 < 0": (moments + 2 * 4 * 2 + 8, "<d", -1e9),  # past both series' extremes and the first mean
        "min > max": (moments, "<f", 1e30),
    }
    for name, (offset, fmt, value) in cases.items():
        bad = bytearray(body)
        struct.pack_into(fmt, bad, offset, value)
        assert_rejected(framed(bytes(bad)))
        with pytest.raises(ContractError, match="impossible moments"):
            columns(framed(bytes(bad)), name)
    wide = bytearray(body)  # counts as 64-bit, one of them past 2**63: it would wrap negative
    wide[at] |= 2
    widened = bytes(wide[:tallies]) + np.array([2**63 + 5, 0, 0, 0, 300, 0, 0, 0], "<u8").tobytes() + bytes(
        wide[tallies + 32:])
    with pytest.raises(ContractError, match="2\\*\\*63"):
        columns(framed(widened), "wrapped")


def test_a_deflated_body_larger_than_any_writer_deflates_is_refused_before_it_is_inflated():
    import tracemalloc

    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MB of zeros in about 64 KB
    data = struct.pack("<4sBBHII", MAGIC, FORMAT, DEFLATED, 0, len(bomb), zlib.crc32(bomb)) + bomb
    tracemalloc.start()
    try:
        assert_rejected(data)
        assert tracemalloc.get_traced_memory()[1] < 5_000_000
    finally:
        tracemalloc.stop()


def test_a_body_whose_series_part_is_broken_is_refused_by_the_column_reader_too():
    body, _ = _unpacked_gridded()
    cut = body[:-40] + b"j" * 40  # the last series' sketch is not what its length says
    assert_rejected(framed(body[:-1]))
    with pytest.raises(ContractError):
        columns(framed(body[:-1]), "cut")
    with pytest.raises(ContractError):
        columns(framed(body + b"\0"), "longer")
    assert columns(framed(cut), "same length") is not None  # bytes inside a sketch are the sketch's own


@pytest.mark.parametrize("version", [3, 4])
def test_a_feature_called_score_is_a_feature(version):
    rng = np.random.default_rng(17)
    grid = np.unique(rng.normal(0, 1, 50).astype(F32)).astype(np.float64)
    window, _ = make_window(rng, 300, [[0.0], [1.0]], [1.0], grids=[grid] * 3)
    summary = window.summary("dev", None, "0123456789ab")
    summary.features = {"score": summary.features["f0"], "temp": summary.features["f1"]}
    back = assert_round_trips(summary, version)
    assert list(back.features) == ["score", "temp"] and back.features["score"].count == 300


def test_grid_counts_beyond_what_a_series_counted_are_rejected():
    rng = np.random.default_rng(12)
    grid = np.unique(rng.normal(0, 1, 50).astype(F32)).astype(np.float64)
    window, _ = make_window(rng, 300, [quantile_edges(rng)], [1.0], grids=[grid, grid])  # > KLL_K: counts kept
    summary = window.summary("dev", None, "0123456789ab")
    summary.features["f0"].grid_counts[0] += 1000  # more values on the grid than the series holds
    data = encode(summary)
    with pytest.raises(ContractError, match="more values on the grid"):
        load_summary(data, "forged.elws")
    with pytest.raises(ContractError, match="more values on the grid"):
        columns(data, "forged.elws")


def test_every_truncation_is_detected(encoded):
    for data in encoded:
        for n in range(len(data)):
            assert_rejected(data[:n])


# The preamble is magic (bytes 0-3), format (4), flags (5), a reserved u16 (6-7), body length (8-11) and the body's
# CRC-32 (12-15); the CRC covers the body only. Here: every bit the length or the CRC protects, and the format.
PROTECTED_PREAMBLE_BITS = [8 * 4 + b for b in range(8)] + list(range(8 * 8, 8 * 16))


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_in_the_body_length_crc_or_format_is_detected(encoded):
    small = encoded[0]
    for bit in [*PROTECTED_PREAMBLE_BITS, *range(8 * 16, 8 * len(small))]:
        assert_rejected(flip(small, bit))


@examples(300)
@given(which=st.integers(0, 2), flips=st.integers(1, 2), data=st.data())
def test_random_bit_flips_are_detected(encoded, which, flips, data):
    """One or two flipped bits anywhere the length or the CRC covers (CRC-32 catches every 1- and 2-bit error
    at these lengths; three could, rarely, cancel out in a body of over 91,607 bits)."""
    original = encoded[which]
    damaged = original
    for _ in range(flips):
        bit = data.draw(st.sampled_from(PROTECTED_PREAMBLE_BITS) | st.integers(8 * 16, 8 * len(original) - 1))
        damaged = flip(damaged, bit)
    if damaged != original:  # two flips of one bit undo each other
        assert_rejected(damaged)


def test_a_bit_flip_in_the_magic_is_a_contract_error(encoded):
    for bit in range(32):
        assert_rejected(flip(encoded[0], bit))


@pytest.mark.parametrize("byte", [5, 6, 7])
def test_a_bit_flip_in_the_flags_or_reserved_bytes_is_detected(encoded, byte):
    for data in encoded:
        for bit in range(8 * byte, 8 * byte + 8):
            if bit == 8 * 5:
                continue  # the gzip flag itself: a wrongly flagged body fails to decode (tested below)
            assert_rejected(flip(data, bit))


def test_clearing_or_setting_the_gzip_flag_is_detected(encoded):
    for data in encoded:
        assert_rejected(flip(data, 8 * 5))


@examples(200)
@given(st.binary(max_size=400))
def test_garbage_after_the_magic_is_rejected(garbage):
    assert_rejected(MAGIC + garbage)
    assert_rejected(MAGIC + bytes([FORMAT]) + garbage)


def framed(body: bytes, flags: int = 0) -> bytes:
    """``body`` in a whole container: right length and CRC, so only the body's parser can object."""
    return struct.pack("<4sBBHII", MAGIC, FORMAT, flags, 0, len(body), zlib.crc32(body)) + body


def test_well_framed_malformed_bodies_are_rejected():
    for head in (b"{}", b'{"series": []}', b'{"series": ["a"]}', b"[]", b"not json"):
        assert_rejected(framed(struct.pack("<I", len(head)) + head))
    assert_rejected(framed(b"\x1f\x8b not gzip", DEFLATED))


@pytest.mark.parametrize("data", [
    framed(struct.pack("<I", 1) + b"1"),
    framed(struct.pack("<I", 4) + b"null"),
    framed(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 20, DEFLATED),
], ids=["number-header", "null-header", "corrupt-deflate"])
def test_well_framed_bodies_that_break_the_parser_are_contract_errors(data):
    assert_rejected(data)


# --- 4. size ---------------------------------------------------------------------------------------------------


def test_encoded_size_beats_the_goals():
    from edge_runtime.summary import review_grid, summarise

    rng = np.random.default_rng(21)
    edges = [quantile_edges(rng) for _ in range(6)]
    training = rng.normal(0, 1, 20_000)
    grids = [review_grid(summarise(training, e)) for e in edges]  # as the device counts: on review grids
    score_grid = review_grid(summarise(training ** 2 * 6, edges[0]))
    big, _ = make_window(rng, 10_000, edges, quantile_edges(rng), grids=[*grids, score_grid])
    summary = big.summary("dev-1", None, "0123456789ab")
    assert summary.grid and all(len(s.grid_counts) > 250 for s in summary.features.values())
    data = encode(summary)
    assert len(data) <= 3000 * 7, f"{len(data)} bytes: {len(data) / 7:.0f} per series (features + score)"
    assert len(data) <= 1.12 * len(encode(summary, 3))  # the exact counts cost about a tenth more

    small, x = make_window(rng, 60, edges, quantile_edges(rng))
    data = encode(small.summary("dev-1", None, "0123456789ab"))
    ts = START + np.arange(60) * 0.5
    jsonl = "".join(json.dumps({"ts": t, **{f"f{j}": float(v) for j, v in enumerate(row)}}) + "\n"
                    for t, row in zip(ts.tolist(), x))
    assert len(data) < len(jsonl.encode()), f"{len(data)} bytes of summary for {len(jsonl)} of JSON lines"


# --- 5. version-2 JSON summaries merge with version-3 ones -------------------------------------------------------


def version_2_series(values: np.ndarray, edges: list[float], nonfinite: int, missing: int) -> dict:
    """A version-2 series: a doubles sketch in base64, NaN and Inf in one count, no nan, inf or kll_type."""
    x = values.astype(np.float64)
    doc = {"count": len(x), "missing": missing, "nonfinite": nonfinite, "hist_edges": edges,
           "hist_counts": np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1).tolist()}
    if len(x):
        sketch = kll_doubles_sketch(KLL_K)
        sketch.update(x)
        doc |= {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "variance": float(x.var()),
                "kll": base64.b64encode(sketch.serialize()).decode()}
    return doc


@examples(100)
@given(old_rows=st.sampled_from([0, 1, 90, 700, 6000]), new_rows=st.sampled_from([0, 1, 90, 700, 6000]),
       shift=st.sampled_from([0.0, 0.5, 3.0]), nonfinite=st.integers(0, 5), missing=st.integers(0, 5),
       seed=st.integers(0, 2**32 - 1))
def test_version_2_json_summaries_merge_with_version_3_ones(old_rows, new_rows, shift, nonfinite, missing, seed):
    rng = np.random.default_rng(seed)
    edges = [quantile_edges(rng) for _ in range(3)]
    score_edges = quantile_edges(rng)
    old_x = (rng.normal(0, 1, (old_rows, 3)) + shift).astype(F32)
    old_score = rng.chisquare(3, old_rows).astype(F32)
    features = {f"f{j}": version_2_series(old_x[:, j], edges[j], nonfinite, missing) for j in range(3)}
    v2 = load_summary(json.dumps({
        "schema_version": 2, "model_name": "m", "model_version": "1.0.0", "device_id": "dev-1",
        "window_start": "2026-10-31T23:00:00Z", "window_end": "2026-11-01T00:00:00Z", "records": old_rows,
        "rejected": nonfinite, "late": 0, "outliers": 0, "rejected_by_reason": {"non_finite": nonfinite},
        "features": features, "score": version_2_series(old_score, score_edges, 0, 0)}), "v2.json")
    assert v2.features["f0"].kll_type == "f64" and v2.features["f0"].nan == v2.features["f0"].inf == 0
    window, new_x = make_window(rng, new_rows, edges, score_edges, {"non_finite": 2})
    v3 = load_summary(encode(window.summary("dev-1", None, "0123456789ab")), "v3.elws")
    assert v3.features["f0"].kll_type == "f32"

    # A version-2 sketch is rebuilt as a float sketch from its retained items and weights (as_floats_sketch):
    # its own error (EPS, 99%) and the rebuilt sketch's (another EPS) add, so the merge is held to twice the
    # slack of one made of version-3 sketches only. The rebuilt sketch loses the exact min and max (see
    # test_a_version_2_sketch_keeps_its_exact_extremes_when_merged), so they are not checked here.
    slack = 2 * RANK_SLACK
    for order in ([v2, v3], [v3, v2]):
        assert (sum(w.records for w in order), sum(w.rejected for w in order)) == (old_rows + new_rows, nonfinite + 2)
        for j in range(3):
            m = merge_summaries([w.features[f"f{j}"] for w in order])
            assert m.kll_type == "f32"
            # the new window's two non-finite rejections: an Inf in f0, a NaN in f1 (make_window)
            assert (m.missing, m.nonfinite, m.nan) == (missing, nonfinite + (j < 2), int(j == 1))
            assert m.inf == nonfinite + (j == 0)  # the old single count carries over as Inf
            union = np.concatenate([old_x[:, j], new_x[:, j]])
            assert_statistics_of(m, union, edges[j])
            assert_quantiles_within_bound(m, union, slack, exact_extremes=False)
        score_union = np.concatenate([old_score, (new_x.astype(np.float64) ** 2).sum(axis=1).astype(F32)])
        merged_score = merge_summaries([w.score for w in order])
        assert_statistics_of(merged_score, score_union, score_edges)
        assert_quantiles_within_bound(merged_score, score_union, slack, exact_extremes=False)


def test_a_version_2_sketch_keeps_its_exact_extremes_when_merged():
    rng = np.random.default_rng(51)
    edges = [0.0]
    new = SeriesAccumulator(edges)
    new.update(rng.normal(0, 1, 300).astype(F32))
    for _ in range(5):  # each extreme survives a doubles sketch's compactions with a chance of about 1/32
        x = rng.normal(0, 1, 5000).astype(F32)
        old = NumericSummary.model_validate(version_2_series(x, edges, 0, 0))
        merged = merge_summaries([old, new.summary()])
        sketch = decode_sketch(merged)
        assert (sketch.get_min_value(), sketch.get_max_value()) == (merged.min, merged.max)
        assert sketch.n == merged.count


# --- 6. the fleet review counts a replayed window part once ------------------------------------------------------


def test_load_fleet_counts_a_replay_once_and_every_distinct_part(tmp_path):
    rng = np.random.default_rng(31)
    edges = [quantile_edges(rng) for _ in range(6)]
    store = LocalStore(tmp_path)
    score_edges = quantile_edges(rng)
    first, _ = make_window(rng, 500, edges, score_edges, {"missing": 1})
    summary = first.summary("dev-1", None, "aaaaaaaaaaaa")
    data = encode(summary)
    start = summary.window_start
    key_a = summary_key("m", "1.0.0", "dev-1", start, 0, "aaaaaaaaaaaa")
    key_b = summary_key("m", "1.0.0", "dev-1", start, 0, "bbbbbbbbbbbb")
    store.put(key_a, data)
    store.put(key_b, data)  # the same input, fed again to a restarted runtime
    fleet, warnings = load_fleet(store)
    assert [len(w) for w in fleet[("m", "1.0.0")].values()] == [1]
    assert len(warnings) == 1 and "replay" in warnings[0] and key_a in warnings[0] and key_b in warnings[0]

    # a replay written by another runtime instance, as a later part: the same identity, still counted once
    again = summary.model_copy(update={"instance_id": "cccccccccccc", "part": 3})
    store.put(summary_key("m", "1.0.0", "dev-1", start, 3, "cccccccccccc"), encode(again))
    fleet, warnings = load_fleet(store)
    assert len(fleet[("m", "1.0.0")]["dev-1"]) == 1 and len(warnings) == 2

    # another part of the same window with other records: its own digest, counted besides the first
    second, _ = make_window(rng, 500, edges, score_edges, part=1)
    other = second.summary("dev-1", None, "aaaaaaaaaaaa")
    assert other.records_digest != summary.records_digest and other.window_start == start
    store.put(summary_key("m", "1.0.0", "dev-1", start, 1, "aaaaaaaaaaaa"), encode(other))
    fleet, warnings = load_fleet(store)
    windows = fleet[("m", "1.0.0")]["dev-1"]
    assert sorted(w.part for w in windows) == [0, 1] and len(warnings) == 2
    assert sum(w.records for w in windows) == 1000


def test_load_fleet_skips_a_summary_with_a_damaged_magic(tmp_path):
    rng = np.random.default_rng(41)
    window, _ = make_window(rng, 50, [[0.0]] * 2, [1.0])
    summary = window.summary("dev-1", None, "aaaaaaaaaaaa")
    store = LocalStore(tmp_path)
    store.put(summary_key("m", "1.0.0", "dev-1", summary.window_start, 0, "aaaaaaaaaaaa"), encode(summary))
    store.put(summary_key("m", "1.0.0", "dev-2", summary.window_start, 0, "aaaaaaaaaaaa"), flip(encode(summary), 0))
    fleet, warnings = load_fleet(store)
    assert list(fleet[("m", "1.0.0")]) == ["dev-1"] and len(warnings) == 1
