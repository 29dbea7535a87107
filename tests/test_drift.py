"""The fleet drift review: numbers checked against scipy, verdicts on fleets of known drift, false
alarms on fleets without, and the formats other tools read."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from scipy import stats as sps

from cloud import drift_stats as st
from cloud.drift import SCORE_ROW, Thresholds, fleet_drift, to_json
from cloud.train import quantile_edges
from edge_runtime.contracts import WindowSummary, baseline_key, model_key, summary_key
from edge_runtime.store import LocalStore
from edge_runtime.summary import KLL_K, grid_bins, grid_id, review_grid, summarise
from edge_runtime.summary_format import encode

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
RNG = np.random.default_rng(0)
BASE = RNG.normal(0, 1, 50_000)
EDGES = quantile_edges(BASE)


def window(device: str, values: dict[str, np.ndarray], start: datetime, hours: float = 1, rejected: int = 0,
           outliers: int = 0, edges=None, model: str = "m", grids: dict | str | None = None) -> WindowSummary:
    """``grids``: the review grids to count on, as devices do from summary version 4 on; "own": the
    grids this window's own series define, as training counts the baseline."""
    n = max((len(v) for v in values.values()), default=0)
    series = {k: (v, (edges or {}).get(k, EDGES)) for k, v in values.items() if k != SCORE_ROW}
    series[SCORE_ROW] = (values.get(SCORE_ROW, np.abs(RNG.normal(0, 1, n))), quantile_edges(np.abs(BASE)))
    out = {k: summarise(v, e, grids[k] if isinstance(grids, dict) else None) for k, (v, e) in series.items()}
    if grids == "own":
        grids = {k: review_grid(s) for k, s in out.items()}
        for k, s in out.items():
            s.grid_counts = grid_bins(series[k][0], grids[k])
    score = out.pop(SCORE_ROW)
    return WindowSummary(
        model_name=model, model_version="1.0.0", device_id=device, window_start=start,
        window_end=start + timedelta(hours=hours), records=n, rejected=rejected, outliers=outliers,
        features=out, score=score,
        grid=grid_id({k: g for k, g in grids.items() if k != SCORE_ROW}, grids[SCORE_ROW]) if grids else None)


class Fleet:
    """A store with a baseline for model m 1.0.0 and the device windows a test puts in it: with
    ``on_grid``, as devices write them from summary version 4 on (binary, counted on the baseline's
    review grids, which the baseline is counted on too); otherwise JSON with sketches only."""

    def __init__(self, tmp_path, baseline: dict[str, np.ndarray] | None = None, fpr: float | None = None,
                 edges=None, on_grid: bool = False) -> None:
        self.store = LocalStore(tmp_path / "store")
        self.edges = edges
        self.baseline = window("training", baseline or {"f": BASE, SCORE_ROW: np.abs(BASE)}, T0, edges=edges,
                               grids="own" if on_grid else None)
        self.grids = None
        self.short = 0  # windows written whose sketches hold every value: their grid counts are left out
        if on_grid:
            own = [*self.baseline.features.items(), (SCORE_ROW, self.baseline.score)]
            self.grids = {k: review_grid(s) for k, s in own}
        self.store.put(baseline_key("m", "1.0.0"), self.baseline.model_dump_json().encode())
        if fpr is not None:
            self.store.put(model_key("m", "1.0.0", "manifest.json"),
                           json.dumps({"outlier": {"target_false_positive_rate": fpr}}).encode())

    def add(self, device: str, values: dict[str, np.ndarray] | np.ndarray, start: datetime = T0, part: int = 0,
            instance: str = "i0", **kw) -> None:
        values = values if isinstance(values, dict) else {"f": values}
        w = window(device, values, start, edges=self.edges, grids=self.grids, **kw)
        self.short += bool(self.grids) and w.score.count <= KLL_K
        data = encode(w) if self.grids else w.model_dump_json().encode()
        self.store.put(summary_key("m", "1.0.0", device, start, part=part, instance=instance), data)

    def hourly(self, device: str, values: np.ndarray, start: datetime = T0, **kw) -> None:
        """``values`` spread over hourly windows."""
        for i, chunk in enumerate(np.array_split(values, max(1, len(values) // 1000))):
            self.add(device, chunk, start + timedelta(hours=i), **kw)

    def review(self, **kw):
        (report,), warnings = fleet_drift(self.store, **{"last": None, **kw})
        # every window is read the way it was written: as exact counts on the grids (but a short one,
        # whose sketches hold every value), or from its sketches
        assert report.windows_sketched <= self.short if self.grids else report.windows_on_grid == 0
        return report, warnings


@pytest.fixture(params=["sketches", "grid"])
def on_grid(request) -> bool:
    """Both ways a review reads a window: its sketches (summaries before version 4, or counted on
    another baseline's grids), and its exact counts on the review grids (version 4)."""
    return request.param == "grid"


def device(report, name: str):
    return next(d for d in report.devices if d.device_id == name)


def feature(d, name: str = "f"):
    return next(f for f in d.features if f.feature == name)


# --- the numbers ---------------------------------------------------------------------------------

def test_ks_matches_scipy_within_the_sketch_error_and_is_deterministic(tmp_path, on_grid):
    fleet = Fleet(tmp_path, on_grid=on_grid)
    x = np.random.default_rng(1).normal(0.3, 1.2, 40_000)
    fleet.hourly("d1", x)
    first, _ = fleet.review()
    second, _ = fleet.review()
    assert json.dumps(to_json([first], Thresholds())) == json.dumps(to_json([second], Thresholds()))
    f = feature(device(first, "d1"))
    exact = sps.ks_2samp(BASE, x).statistic
    assert abs(f.ks - exact) <= 0.0133 * 2 + 1 / 128  # both sketches' rank error, and the grid's step
    assert f.ks_adjusted <= exact  # the adjusted distance never overstates
    assert f.count == 40_000 and abs(f.mean - x.mean()) < 1e-6 and abs(f.std - x.std()) < 1e-4
    if on_grid:  # exact counts: the largest gap at the grid's points, exactly, with no sketch error taken off
        grid = fleet.grids["f"].astype(np.float32)
        on_points = np.abs(np.searchsorted(np.sort(x.astype(np.float32)), grid, side="right") / len(x)
                           - np.searchsorted(np.sort(BASE.astype(np.float32)), grid, side="right") / len(BASE))
        assert f.ks == pytest.approx(on_points.max(), abs=1e-12) and f.ks_adjusted == f.ks
        assert exact - 1 / 64 <= f.ks <= exact + 1e-9  # the grid only understates, by less than a step


def test_psi_sees_new_codes_in_discrete_data(tmp_path, on_grid):
    codes = np.random.default_rng(2).choice([0.0, 1.0, 2.0, 3.0], 20_000, p=[0.4, 0.3, 0.2, 0.1])
    edges = {"f": sorted(set(np.quantile(codes, np.linspace(0.1, 0.9, 9))))}
    fleet = Fleet(tmp_path, {"f": codes, SCORE_ROW: np.abs(BASE[:20_000])}, edges=edges, on_grid=on_grid)
    same = np.random.default_rng(3).choice([0.0, 1.0, 2.0, 3.0], 5_000, p=[0.4, 0.3, 0.2, 0.1])
    new = np.where(np.random.default_rng(4).random(5_000) < 0.15, 1.5, same)  # a code between two old ones
    fleet.add("same", same)
    fleet.add("new", new)
    report, _ = fleet.review()
    assert feature(device(report, "same")).psi < 0.02
    assert feature(device(report, "new")).psi > 0.2 and device(report, "new").verdict == "drift"
    assert st.benjamini_hochberg([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])


# --- verdicts on fleets of known drift -----------------------------------------------------------

def test_known_drift_is_flagged_on_exactly_those_devices_and_features(tmp_path, on_grid):
    rng = np.random.default_rng(5)
    base = {"a": BASE, "b": RNG.normal(10, 2, 50_000), SCORE_ROW: np.abs(BASE)}
    edges = {"a": EDGES, "b": quantile_edges(base["b"])}
    fleet = Fleet(tmp_path, base, edges=edges, on_grid=on_grid)

    def normal(n):
        return {"a": rng.normal(0, 1, n), "b": rng.normal(10, 2, n)}

    fleet.add("healthy", normal(20_000))
    fleet.add("shift", {**normal(20_000), "a": rng.normal(0.25, 1, 20_000)})  # +0.25 SD
    fleet.add("spread", {**normal(20_000), "b": rng.normal(10, 3, 20_000)})  # variance x2.25 (sd x1.5)
    report, _ = fleet.review()
    assert report.drifted_devices == ["shift", "spread"]
    assert device(report, "shift").drifted_features == ["a"]
    assert device(report, "spread").drifted_features == ["b"]
    assert device(report, "healthy").verdict == "ok"
    assert report.devices[0].device_id in ("shift", "spread")  # worst first


def test_more_data_never_gives_a_milder_verdict(tmp_path, on_grid):
    order = {"ok": 0, "warn": 1, "drift": 2}
    verdicts = []
    for n in (100, 300, 1_000, 3_000, 10_000, 30_000):  # a +0.25 SD shift, ever more rows
        fleet = Fleet(tmp_path / str(n), on_grid=on_grid)
        fleet.add("d", np.random.default_rng(n).normal(0.25, 1, n))
        report, _ = fleet.review()
        verdicts.append(order[feature(device(report, "d")).verdict])
    assert verdicts == sorted(verdicts) and verdicts[-1] == 2 and verdicts[0] == 0


def test_a_recent_change_after_a_long_normal_history_is_judged_on_the_last_day(tmp_path, on_grid):
    fleet = Fleet(tmp_path, on_grid=on_grid)
    rng = np.random.default_rng(6)
    for day in range(10):  # 50,000 normal rows, then a day at +3 SD
        for h in range(24):
            values = rng.normal(3 if day == 9 else 0, 1, 210)
            fleet.add("d", values, T0 + timedelta(days=day, hours=h))
    whole, _ = fleet.review()  # everything merged reads mild ...
    recent, _ = fleet.review(last=timedelta(days=1))  # ... the last day (the default) does not
    assert feature(device(recent, "d")).ks > 0.8 and device(recent, "d").verdict == "drift"
    assert recent.since == T0 + timedelta(days=9) and recent.until == T0 + timedelta(days=10)
    assert feature(device(whole, "d")).ks < feature(device(recent, "d")).ks / 5


def test_rejections_and_outliers_count_toward_the_verdict(tmp_path, on_grid):
    fleet = Fleet(tmp_path, fpr=0.01, on_grid=on_grid)
    rng = np.random.default_rng(7)
    fleet.add("fine", rng.normal(0, 1, 5_000), outliers=55)
    fleet.add("rejecting", rng.normal(0, 1, 3_500), rejected=1_500)  # 30% of its records
    fleet.add("all-rejected", {"f": np.array([])}, rejected=800)
    fleet.add("outliers", rng.normal(0, 1, 5_000), outliers=250)  # 5% against 1% calibrated
    with_nan = rng.normal(0, 1, 5_000)
    with_nan[:400] = np.nan
    fleet.add("nan", with_nan)
    report, _ = fleet.review()
    assert device(report, "fine").verdict == "ok"
    assert device(report, "rejecting").verdict == "data-quality"
    assert "rejected records 30.0%" in " ".join(device(report, "rejecting").reasons)
    gone = device(report, "all-rejected")  # never scored a record, and still in the review
    assert gone.verdict == "data-quality" and gone.records == 0 and gone.rejected == 800
    assert device(report, "outliers").verdict == "outliers"
    assert any("outlier rate 5.0%" in r for r in device(report, "outliers").reasons)
    assert device(report, "nan").verdict == "data-quality"
    assert any("f: non-finite" in r for r in device(report, "nan").reasons)


def test_whole_cycles_only_when_the_baseline_has_a_cycle(tmp_path, on_grid):
    """Healthy devices on a daily cycle: part of a day is not compared with a whole-day baseline."""
    rng = np.random.default_rng(8)
    minutes = np.arange(14 * 1440)
    cycle = lambda m: 5 * np.sin(2 * np.pi * (m % 1440) / 1440)  # noqa: E731
    base = cycle(minutes) + rng.normal(0, 1, len(minutes))
    fleet = Fleet(tmp_path, {"f": base, SCORE_ROW: np.abs(BASE)}, edges={"f": quantile_edges(base)}, on_grid=on_grid)
    for rows in (100, 300, 1_000):  # the first hours of a day
        fleet.hourly(f"part-{rows}", cycle(np.arange(rows)) + rng.normal(0, 1, rows), T0 + timedelta(days=1))
    day = np.arange(1440)
    for h in range(24):
        sl = slice(60 * h, 60 * (h + 1))
        fleet.add("whole-day", cycle(day[sl]) + rng.normal(0, 1, 60), T0 + timedelta(days=1, hours=h))
    naive, _ = fleet.review(last=timedelta(days=1))
    cycled, _ = fleet.review(last=timedelta(days=1), cycle_s=86_400)
    assert {device(naive, f"part-{r}").verdict for r in (300, 1_000)} == {"drift"}  # the false alarm
    assert {device(cycled, f"part-{r}").verdict for r in (100, 300, 1_000)} == {"short"}
    assert device(cycled, "whole-day").verdict == "ok"


def test_a_thousand_healthy_devices_of_100_to_100000_rows_raise_no_alarm(tmp_path, on_grid):
    fleet = Fleet(tmp_path, fpr=0.01, on_grid=on_grid)
    rng = np.random.default_rng(9)
    sizes = np.round(10 ** rng.uniform(2, 5, 1_000)).astype(int)
    for i, n in enumerate(sizes):
        fleet.add(f"d{i:04d}", rng.normal(0, 1, n), outliers=int(rng.binomial(n, 0.01)))
    report, _ = fleet.review(workers=4)
    flagged = [d.device_id for d in report.devices if d.verdict not in ("ok", "too-few")]
    assert len(report.devices) == 1_000 and len(flagged) <= 10  # the stated rate: FDR 1%; here none expected
    assert report.fleet.verdict == "ok"


# --- what other tools read ------------------------------------------------------------------------

def test_model_monitor_files_field_by_field(tmp_path):
    from cloud import model_monitor

    fleet = Fleet(tmp_path)
    fleet.add("ok", np.random.default_rng(10).normal(0, 1, 5_000))
    fleet.add("moved", np.random.default_rng(11).normal(1, 1, 5_000))
    report, _ = fleet.review()
    t = Thresholds()
    out = {p.name: json.loads(p.read_text()) for p in model_monitor.write([report], tmp_path / "mm", t)}
    cons = out["constraints.json"]
    assert cons["version"] == 0.0 and cons["features"][0]["name"] == "f"
    assert set(cons["features"][0]) == {"name", "inferred_type", "completeness", "num_constraints"}
    dist = cons["monitoring_config"]["distribution_constraints"]
    assert dist["comparison_method"] == "Robust" and dist["comparison_threshold"] == t.drift_ks
    stats_doc = out["statistics.json"]
    assert stats_doc["dataset"]["item_count"] == 10_000
    (f,) = stats_doc["features"]
    num = f["numerical_statistics"]
    assert f["name"] == "f" and f["inferred_type"] == "Fractional"
    assert num["common"] == {"num_present": 10_000, "num_missing": 0}
    assert {"mean", "sum", "std_dev", "min", "max", "distribution"} <= set(num)
    buckets = num["distribution"]["kll"]["buckets"]
    assert len(buckets) == 10 and abs(sum(b["count"] for b in buckets) - 10_000) < 1e-3
    assert set(buckets[0]) == {"lower_bound", "upper_bound", "count"}
    violations = out["constraint_violations.json"]["violations"]
    drifted = [v for v in violations if v["constraint_check_type"] == "baseline_drift_check"]
    assert {v["device_id"] for v in drifted} == {"moved", "(fleet)"}
    assert all(set(v) >= {"feature_name", "constraint_check_type", "description"} for v in violations)
    assert drifted[0]["description"].startswith("Baseline drift distance: ")


def test_cloudwatch_metrics_per_feature_with_model_and_version(tmp_path, moto_endpoint, monkeypatch):
    import boto3

    from cloud import cloudwatch

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    fleet = Fleet(tmp_path)
    fleet.add("moved", np.random.default_rng(12).normal(1, 1, 5_000))
    report, _ = fleet.review()
    client = boto3.client("cloudwatch", endpoint_url=moto_endpoint)
    namespace = f"edgeloop-test-{tmp_path.name}"
    sent = cloudwatch.publish([report], client, namespace)
    metrics = {m["MetricName"]: m for m in client.list_metrics(Namespace=namespace)["Metrics"]}
    assert len(metrics) == sent
    assert {"feature_baseline_drift_f", "score_baseline_drift", "outlier_rate", "devices_drift"} <= set(metrics)
    assert metrics["feature_baseline_drift_f"]["Dimensions"] == [{"Name": "Model", "Value": "m"},
                                                                {"Name": "Version", "Value": "1.0.0"}]
    got = client.get_metric_statistics(Namespace=namespace, MetricName="feature_baseline_drift_f",
                                       Dimensions=metrics["feature_baseline_drift_f"]["Dimensions"],
                                       StartTime=report.until - timedelta(hours=1),
                                       EndTime=report.until + timedelta(hours=1), Period=3600, Statistics=["Maximum"])
    assert got["Datapoints"][0]["Maximum"] == pytest.approx(report.fleet.features[0].ks)


def test_a_summary_under_another_devices_key_is_not_counted(tmp_path):
    """The store's IAM policy scopes a device's writes to keys with its own name; the review trusts
    the key, so a device cannot speak for another by naming it inside the summary."""
    fleet = Fleet(tmp_path)
    honest = window("d1", {"f": np.random.default_rng(4).normal(0, 1, 500)}, T0)
    forged = window("d1", {"f": np.random.default_rng(5).normal(3, 1, 500)}, T0 + timedelta(hours=1))
    fleet.store.put(summary_key("m", "1.0.0", "d1", honest.window_start), honest.model_dump_json().encode())
    fleet.store.put(summary_key("m", "1.0.0", "d2", forged.window_start), forged.model_dump_json().encode())
    report, warnings = fleet.review()
    assert [(d.device_id, d.windows) for d in report.devices] == [("d1", 1)]
    assert len(warnings) == 1 and "device=d2" in warnings[0] and "'d1'" in warnings[0]


def test_compaction_reads_a_day_once_and_never_hides_a_late_part(tmp_path, on_grid):
    fleet = Fleet(tmp_path, on_grid=on_grid)
    rng = np.random.default_rng(13)
    for name in ("a", "b"):
        for h in range(48):  # two whole days
            fleet.add(name, rng.normal(0.4 if name == "b" else 0, 1, 300), T0 + timedelta(hours=h))
    end = T0 + timedelta(days=2)  # given, so the review need not read the newest window to find it
    plain, _ = fleet.review(until=end)
    compacted, _ = fleet.review(until=end, compact=True)
    rollups = sorted(fleet.store.list("rollups/"))
    assert len(rollups) == 4 and all("/date=2026-11-0" in k for k in rollups)  # 2 devices x 2 days
    reads = []
    get = fleet.store.get
    fleet.store.get = lambda key: (reads.append(key), get(key))[1]
    again, _ = fleet.review(until=end)
    fleet.store.get = get
    assert not [k for k in reads if k.startswith("summaries/")]  # every whole day came from its roll-up
    same = json.dumps(to_json([plain], Thresholds()))
    assert json.dumps(to_json([compacted], Thresholds())) == same == json.dumps(to_json([again], Thresholds()))
    # a late part of a compacted day: the day is read again, and counted
    fleet.add("a", rng.normal(5, 1, 300), T0 + timedelta(hours=30), part=1, instance="late")
    after, _ = fleet.review(until=end)
    assert device(after, "a").records == device(plain, "a").records + 300


def test_cohorts_get_rows_of_their_own(tmp_path):
    """A change too small to flag on most single devices of a batch shows on the batch as a whole."""
    fleet = Fleet(tmp_path)
    rng = np.random.default_rng(14)
    for i in range(8):
        fleet.add(f"old-{i}", rng.normal(0, 1, 150))
        fleet.add(f"new-{i}", rng.normal(0.3, 1, 150))  # most too few rows to flag alone
    cohorts = {**{f"old-{i}": "batch-A" for i in range(8)}, **{f"new-{i}": "batch-B" for i in range(8)}}
    report, _ = fleet.review(cohorts=cohorts)
    assert {d.device_id: d.verdict for d in report.cohorts} == {"(cohort batch-A)": "ok", "(cohort batch-B)": "drift"}
    alone = [d.device_id for d in report.devices if d.verdict == "drift"]
    assert all(d.startswith("new-") for d in alone) and len(alone) <= 3
    assert next(c for c in report.cohorts if c.device_id == "(cohort batch-B)").records == 1200


def test_a_summary_with_a_damaged_sketch_is_skipped_by_name_and_the_review_goes_on(tmp_path):
    """A sketch whose bytes pass the container's checksum but do not add up (a buggy device) is
    refused with its summary's key; the device's other windows and the rest of the fleet count."""
    import struct

    from edge_runtime.summary_format import encode

    fleet = Fleet(tmp_path)
    rng = np.random.default_rng(8)
    fleet.add("d1", rng.normal(0, 1, 2000))
    fleet.add("d2", rng.normal(0, 1, 2000))
    bad = window("d1", {"f": rng.normal(0, 1, 2000)}, T0 + timedelta(hours=1))
    kll = bytearray(bad.features["f"].kll)
    struct.pack_into("<I", kll, 20, struct.unpack_from("<I", kll, 20)[0] + 1)  # a level boundary moved
    bad.features["f"].kll = bytes(kll)
    key = summary_key("m", "1.0.0", "d1", bad.window_start, instance="i0")
    fleet.store.put(key, encode(bad))
    report, warnings = fleet.review()
    assert [(d.device_id, d.windows) for d in sorted(report.devices, key=lambda d: d.device_id)] == [("d1", 1),
                                                                                                    ("d2", 1)]
    assert len(warnings) == 1 and key in warnings[0] and "damaged sketch" in warnings[0]


# --- reading windows counted on the review grid (summary version 4) --------------------------------------


def test_a_devices_series_compared_all_at_once_give_the_per_series_numbers():
    rng = np.random.default_rng(15)
    codes = rng.choice([0.0, 1.0, 2.0, 3.0], 20_000, p=[0.4, 0.3, 0.2, 0.1])
    base = {"normal": (BASE, EDGES), "codes": (codes, [1.0, 2.0]), "wide": (RNG.normal(10, 5, 30_000), [5.0, 10.0])}
    bases = []
    for values, edges in base.values():
        b = st.Profile(review_grid(summarise(values, edges)))
        b.add_summary(summarise(values, edges))
        bases.append(b)
    assert len({len(b.grid) for b in bases}) == 3  # grids of three lengths: the padding is exercised
    cases = [  # per series of the baseline: what a device might send
        [rng.normal(0.3, 1.2, 5_000), rng.choice([0.0, 1.0, 1.5, 3.0], 4_000), rng.normal(10, 5, 3_000)],
        [rng.normal(-9, 1, 500), np.full(300, 2.0), rng.normal(40, 1, 800)],  # beyond the ends; one point mass
        [np.zeros(0), rng.choice([0.0, 1.0], 50), rng.normal(10, 5, 10)],  # an empty series
    ]
    for values in cases:
        curs = []
        for b, v, (_, edges) in zip(bases, values, base.values()):
            c = st.Profile(b.grid)
            c.add_summary(summarise(v, edges))
            curs.append(c)
        all_at_once = st.Comparison.of(st.Reference(bases), curs)
        for i, (b, c) in enumerate(zip(bases, curs)):
            one = (st.ks(b, c), st.ks_adjusted(b, c), st.psi(b, c), st.js(b, c), st.wasserstein(b, c),
                   st.out_of_range(b, c))
            got = (all_at_once.ks[i], all_at_once.ks_adjusted[i], all_at_once.psi[i], all_at_once.js[i],
                   all_at_once.wasserstein[i], all_at_once.out_of_range[i])
            assert got == pytest.approx(one, rel=1e-12, abs=1e-12), (i, got, one)


def test_series_in_another_order_are_counted_where_they_belong(tmp_path):
    base = {"a": BASE, "b": RNG.normal(10, 2, 50_000), SCORE_ROW: np.abs(BASE)}
    edges = {"a": EDGES, "b": quantile_edges(base["b"])}
    fleet = Fleet(tmp_path, base, edges=edges, on_grid=True)
    rng = np.random.default_rng(16)
    a, b, score = rng.normal(0.3, 1, 3_000), rng.normal(10, 2, 3_000), np.abs(rng.normal(0, 1, 3_000))
    fleet.add("in-order", {"a": a, "b": b, SCORE_ROW: score})
    fleet.add("reversed", {"b": b, "a": a, SCORE_ROW: score})  # the device lists its features the other way
    report, warnings = fleet.review()
    assert not warnings and report.windows_on_grid == 2
    as_sent, reordered = device(report, "in-order"), device(report, "reversed")
    assert [f.feature for f in reordered.features] == [f.feature for f in as_sent.features]
    assert reordered.features == as_sent.features and reordered.verdict == as_sent.verdict == "drift"
    assert reordered.drifted_features == ["a"]


def test_a_window_counted_on_other_grids_is_read_from_its_sketches_and_a_forged_one_is_skipped(tmp_path):
    fleet = Fleet(tmp_path, on_grid=True)
    rng = np.random.default_rng(17)
    fleet.add("d1", rng.normal(0, 1, 2_000))
    # counted on another baseline's grids (an older bundle, say): its counts mean nothing here
    other = {name: np.unique(np.concatenate([g, g + 0.25]).astype(np.float32)).astype(np.float64)
             for name, g in fleet.grids.items()}
    stale = window("d2", {"f": rng.normal(0, 1, 2_000)}, T0, grids=other)
    fleet.store.put(summary_key("m", "1.0.0", "d2", T0, instance="i0"), encode(stale))
    # counted on grids of other lengths, and claiming the baseline's: refused by name
    forged = window("d3", {"f": rng.normal(0, 1, 2_000)}, T0, grids=other)
    forged.grid = fleet.baseline.grid
    key = summary_key("m", "1.0.0", "d3", T0, instance="i0")
    fleet.store.put(key, encode(forged))
    as_json = summary_key("m", "1.0.0", "d4", T0, instance="i0")  # the same, as JSON: the other reader
    fleet.store.put(as_json, forged.model_copy(update={"device_id": "d4"}).model_dump_json().encode())
    (report,), warnings = fleet_drift(fleet.store, last=None)
    assert (report.windows_on_grid, report.windows_sketched) == (1, 1)
    assert {d.device_id: d.verdict for d in report.devices} == {"d1": "ok", "d2": "ok"}
    assert len(warnings) == 2 and all("do not fit the baseline's grids" in w for w in warnings)
    assert key in warnings[0] and as_json in warnings[1]


def test_a_fleet_of_old_and_new_devices_is_one_review(tmp_path):
    """Devices that write version 3 (sketches only) beside devices that count on the grid: each window is
    read its own way, and the same data gives the same verdict either way."""
    old = Fleet(tmp_path / "old")
    new = Fleet(tmp_path / "new", on_grid=True)
    rng = np.random.default_rng(18)
    for i in range(6):
        values = rng.normal(0.3 if i % 3 == 0 else 0, 1, 4_000)
        old.add(f"d{i}", values)
        new.add(f"d{i}", values)
    mixed = LocalStore(tmp_path / "mixed")
    mixed.put(baseline_key("m", "1.0.0"), new.store.get(baseline_key("m", "1.0.0")))
    for i in range(6):
        source = old if i % 2 else new
        key = next(iter(source.store.list(f"summaries/model=m/version=1.0.0/device=d{i}/")))
        mixed.put(key, source.store.get(key))
    (report,), _ = fleet_drift(mixed, last=None)
    assert (report.windows_on_grid, report.windows_sketched) == (3, 3)
    by_old, _ = old.review()
    assert {d.device_id: d.verdict for d in report.devices} == {d.device_id: d.verdict for d in by_old.devices}
    assert sorted(report.drifted_devices) == ["d0", "d3"]


def test_a_short_window_leaves_its_grid_counts_out_and_is_read_exactly_from_its_sketches(tmp_path):
    from edge_runtime.contracts import load_summary
    from edge_runtime.summary_format import columns

    fleet = Fleet(tmp_path, on_grid=True)
    rng = np.random.default_rng(19)
    short, longer = rng.normal(0.5, 1, KLL_K), rng.normal(0.5, 1, KLL_K + 1)
    fleet.add("short", short)  # every sketch holds each of its values: the counts would add nothing
    fleet.add("longer", longer)
    (key,) = fleet.store.list("summaries/model=m/version=1.0.0/device=short/")
    data = fleet.store.get(key)
    assert columns(data, key) is None and load_summary(data, key).grid == fleet.baseline.grid
    assert load_summary(data, key).features["f"].grid_counts is None
    report, _ = fleet.review()
    assert (report.windows_on_grid, report.windows_sketched) == (1, 1)
    grid = fleet.grids["f"].astype(np.float32)
    for name, x in (("short", short), ("longer", longer)):
        f = feature(device(report, name))
        on_points = np.abs(np.searchsorted(np.sort(x.astype(np.float32)), grid, side="right") / len(x)
                           - np.searchsorted(np.sort(BASE.astype(np.float32)), grid, side="right") / len(BASE))
        assert f.ks == pytest.approx(on_points.max(), abs=1e-12) and f.ks_adjusted == f.ks, name  # exact both ways
    old = Fleet(tmp_path / "v3")  # the same short window from a device before version 4: its sketch error is charged
    old.add("short", short)
    was, _ = old.review()
    assert feature(device(was, "short")).ks_adjusted < feature(device(was, "short")).ks - 0.01


def test_a_series_with_values_but_no_readable_sketch_is_skipped_by_name(tmp_path):
    fleet = Fleet(tmp_path)
    rng = np.random.default_rng(20)
    fleet.add("good", rng.normal(0, 1, 3_000))
    no_sketch = window("bad", {"f": rng.normal(0, 1, 3_000)}, T0)
    no_sketch.features["f"].kll = None  # a buggy writer: 3,000 values, no sketch of them
    doubles = window("worse", {"f": rng.normal(0, 1, 3_000)}, T0)
    doubles.features["f"].kll_type = "f64"  # a float sketch's bytes said to be a doubles sketch
    for w in (no_sketch, doubles):
        fleet.store.put(summary_key("m", "1.0.0", w.device_id, T0, instance="i0"), encode(w))
    report, warnings = fleet.review()
    assert [d.device_id for d in report.devices] == ["good"]
    assert len(warnings) == 2 and "device=bad" in warnings[0] and "no sketch" in warnings[0]
    assert "device=worse" in warnings[1] and "f:" in warnings[1]


def test_a_baseline_feature_without_values_or_edges_does_not_stop_the_review(tmp_path):
    """A sensor dead throughout training (NaN only) and given no edges: nothing to compare it with,
    and the rest of the review goes on."""
    fleet = Fleet(tmp_path, {"f": BASE, "g": np.full(1_000, np.nan), SCORE_ROW: np.abs(BASE)},
                  edges={"f": EDGES, "g": []})
    rng = np.random.default_rng(21)
    fleet.add("d1", {"f": rng.normal(0, 1, 2_000), "g": rng.normal(0, 1, 2_000)})
    report, warnings = fleet.review()
    assert device(report, "d1").verdict == "ok" and not warnings
    assert feature(device(report, "d1"), "g").ks is None  # no baseline values: no distance
