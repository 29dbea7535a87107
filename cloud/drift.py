"""Fleet drift review: stream the fleet's window summaries, compare each device with the baseline,
and give verdicts that hold in both directions.

How a verdict is reached (``Thresholds`` holds every number):

* **What is compared.** The windows inside the review's time range (default: the last day of
  data), per device, rolled into ``drift_stats.Profile``s without holding any summary. If the
  baseline has a cycle (a daily one, say), only whole cycles are compared: a device with less
  than one cycle of data in range gets no distribution verdict (``short``), since half a day is
  not a day.
* **Distribution drift** per feature and for the outlier score: the two-sample KS test on the
  sketch-error-adjusted distance, its p-values corrected for testing every feature of every device
  at once (Benjamini-Hochberg, false discovery rate ``alpha``), and an effect-size gate so a huge
  sample never flags a trivial change: ``drift`` needs q < alpha and adjusted KS >= ``drift_ks``,
  ``warn`` q < alpha and >= ``warn_ks``. PSI, Jensen-Shannon, normalised Wasserstein and Model
  Monitor's robust L-infinity distance are reported beside it.
* **Data quality**: the rejected share of records, and per feature the missing, non-finite and
  out-of-range shares, against the baseline's; **the outlier rate** against the rate the threshold
  was calibrated for. Each is a one-sided binomial test (in the same correction) with an effect
  gate; a flagged data-quality check makes the device ``data-quality``, a flagged outlier rate
  ``outliers`` (the model flags far more than it was calibrated to: the data or the process
  changed), unless a distribution drifted too.
* Fewer than ``min_count`` values: no verdict (``too-few``).

The same store gives the same numbers (no sketch is merged), and more data never makes a verdict
milder for the same effect.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from edge_runtime import summary_format
from edge_runtime.bundle import MANIFEST_FILE
from edge_runtime.contracts import (
    SUMMARY_PREFIX,
    SUMMARY_SUFFIX,
    ContractError,
    SummaryHeader,
    WindowSummary,
    baseline_key,
    load_summary,
    model_key,
    parse_document,
)
from edge_runtime.store import ObjectNotFound, ObjectStore
from edge_runtime.summary import decode_sketch, grid_id, kll_layout, review_grid

from . import drift_stats as st

SCORE_ROW = "(outlier score)"
SEVERITY = {"drift": 5, "outliers": 4, "data-quality": 3, "warn": 2, "ok": 1, "short": 0, "too-few": 0}
KEY_RE = re.compile(r"model=(?P<model>[^/]+)/version=(?P<version>[^/]+)/device=(?P<device>[^/]+)/"
                    r"date=(?P<date>[^/]+)/(?P<stamp>\d{8}T\d{6}Z)")


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.01  # false discovery rate over every test of a review
    drift_ks: float = 0.05  # adjusted KS distance for drift (a 0.13 SD mean shift, a x1.2 spread)
    warn_ks: float = 0.025
    min_count: int = 50  # values of a feature below which it gets no verdict
    quality_rate: float = 0.02  # data-quality shares must exceed the baseline's by this much
    outlier_factor: float = 3.0  # outlier rate at least this times the calibrated one ...
    outlier_excess: float = 0.005  # ... and this much above it
    ks_alpha: float = 0.05  # the level of Model Monitor's robust L-infinity distance (reported)


@dataclass
class FeatureDrift:
    feature: str
    count: int
    mean: float | None
    baseline_mean: float | None
    ks: float | None = None
    ks_adjusted: float | None = None
    robust_linf: float | None = None
    psi: float | None = None
    js: float | None = None
    wasserstein: float | None = None
    pvalue: float | None = None
    qvalue: float | None = None
    missing_rate: float = 0.0
    nonfinite_rate: float = 0.0
    out_of_range_rate: float = 0.0
    verdict: str = "too-few"
    missing: int = 0
    nonfinite: int = 0
    std: float | None = None
    min: float | None = None
    max: float | None = None


@dataclass
class Check:
    """A rate judged against what it should be: rejected records, missing values, outliers, ..."""

    name: str
    kind: str  # data-quality | outliers
    count: int
    total: int
    rate: float
    expected: float
    pvalue: float
    qvalue: float | None = None
    verdict: str = "ok"


@dataclass
class DeviceDrift:
    device_id: str
    windows: int
    records: int
    rejected: int
    outliers: int
    outlier_rate: float
    first: datetime | None = None
    last: datetime | None = None
    verdict: str = "too-few"
    reasons: list[str] = field(default_factory=list)
    drifted_features: list[str] = field(default_factory=list)
    features: list[FeatureDrift] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    health: dict = field(default_factory=dict)  # from the newest window: spool, uploads, lines lost, ...

    @property
    def worst_ks(self) -> float:
        return max((f.ks_adjusted or 0.0 for f in self.features), default=0.0)


@dataclass
class ModelDrift:
    model_name: str
    model_version: str
    since: datetime | None
    until: datetime | None
    devices: list[DeviceDrift]
    fleet: DeviceDrift | None = None
    cohorts: list[DeviceDrift] = field(default_factory=list)  # one row per cohort (device tag), if given
    expected_outlier_rate: float | None = None
    cycle_s: int | None = None
    # for plots: the fleet per hour (records, rejected, outliers, each feature's mean), and each
    # feature's baseline and fleet CDF at up to 64 points
    timeline: list[dict] = field(default_factory=list)
    distributions: dict[str, dict] = field(default_factory=dict)
    # windows whose distributions came from exact counts on the review grid (summary version 4
    # counted on this baseline's grids), and from sketches (older summaries, or another grid)
    windows_on_grid: int = 0
    windows_sketched: int = 0

    @property
    def drifted_devices(self) -> list[str]:
        return sorted(d.device_id for d in self.devices if d.verdict == "drift")


@dataclass
class _Device:
    """What the review keeps of a device while it streams: profiles per cycle bucket, counts."""

    device_id: str
    buckets: dict[int, dict[str, st.Profile]] = field(default_factory=dict)
    covered: dict[int, dict[datetime, float]] = field(default_factory=dict)  # bucket -> window start -> seconds
    windows: int = 0
    records: int = 0
    rejected: int = 0
    outliers: int = 0
    first: datetime | None = None
    last: datetime | None = None
    health: dict = field(default_factory=dict)
    on_grid: int = 0  # windows read as exact counts on the review grid (a day's, kept in its roll-up)
    sketched: int = 0  # windows whose sketches were read
    # windows counted on the review grid, per bucket, not yet added to its profiles (``_flush``)
    lean: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)


# --- reading the store -----------------------------------------------------------------------


def list_summaries(store: ObjectStore) -> dict[tuple[str, str], dict[str, list[tuple[datetime, str]]]]:
    """Every summary key, by (model, version) then device, with its window start (from the key)."""
    found: dict = defaultdict(lambda: defaultdict(list))
    for key in store.list(SUMMARY_PREFIX):
        m = KEY_RE.search(key)
        if not m or not key.endswith((".json", SUMMARY_SUFFIX)):
            continue
        start = datetime.strptime(m["stamp"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        found[(m["model"], m["version"])][m["device"]].append((start, key))
    return found


def load_baseline(store: ObjectStore, model: str, version: str) -> WindowSummary | None:
    key = baseline_key(model, version)
    try:
        return load_summary(store.get(key), key)
    except ObjectNotFound:
        return None


def expected_outlier_rate(store: ObjectStore, model: str, version: str) -> float | None:
    """The false-positive rate the registered bundle's threshold was calibrated for."""
    import json

    try:
        manifest = json.loads(store.get(model_key(model, version, MANIFEST_FILE)))
        return float(manifest["outlier"]["target_false_positive_rate"])
    except (ObjectNotFound, KeyError, TypeError, ValueError):
        return None


def _read(store: ObjectStore, keys: list[str], workers: int) -> Iterator[tuple[str, bytes | Exception]]:
    """The objects, in order, fetched ``workers`` at a time (S3 latency, not CPU, bounds a review)."""
    def get(key: str):
        try:
            return key, store.get(key)
        except Exception as err:  # noqa: BLE001 - reported per key, the review goes on
            return key, err

    if workers <= 1 or not str(getattr(store, "url", "")).startswith("s3://"):
        yield from map(get, keys)  # a local disk has no latency to hide; threads would only contend
        return
    with ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(keys), workers * 4):  # bounded read-ahead
            yield from pool.map(get, keys[i:i + workers * 4])


# --- the review --------------------------------------------------------------------------------


def parse_span(text: str) -> timedelta:
    """``90m``, ``24h``, ``7d``, ``3600`` (seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise ValueError(f"{text!r}: expected a span such as 90m, 24h or 7d")
    return timedelta(seconds=float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]])


def fleet_drift(store: ObjectStore, baselines: dict[tuple[str, str], WindowSummary] | None = None,
                thresholds: Thresholds = Thresholds(), since: datetime | None = None,
                until: datetime | None = None, last: timedelta | None = timedelta(days=1),
                cycle_s: int | None = None, workers: int = 8,
                progress: Callable[[int, int], None] | None = None,
                dask=None, compact: bool = False,
                cohorts: dict[str, str] | None = None) -> tuple[list[ModelDrift], list[str]]:
    """Review every (model, version) in the store over [since, until): by default the last day
    of data (``last``; None: all of it). Returns the reports and warnings.

    ``dask``: a ``distributed.Client`` to spread the devices over its workers; the verdicts (one
    false-discovery correction over the whole fleet) are made here, from the workers' results.
    ``compact``: write a roll-up for every whole day read (``rollups``); later reviews read those.
    ``cohorts``: device -> cohort (a tag); each cohort gets a row of its own, judged like a device."""
    listing = list_summaries(store)
    warnings: list[str] = []
    reports = []
    total = sum(len(k) for devices in listing.values() for k in devices.values())
    done = [0]

    def tick(n: int = 1) -> None:  # progress, as summaries are read or skipped
        done[0] += n
        if progress:
            progress(done[0], total)

    for (model, version), devices in sorted(listing.items()):
        baseline = (baselines or {}).get((model, version)) or load_baseline(store, model, version)
        if baseline is None:
            warnings.append(f"no baseline for {model} {version}: skipped (register the bundle first)")
            tick(sum(len(k) for k in devices.values()))
            continue
        report = _review_model(store, model, version, baseline, devices, thresholds, since, until, last,
                               cycle_s, workers, warnings, tick, dask, compact, cohorts)
        if finish(store, report, thresholds, warnings):
            reports.append(report)
    return reports, warnings


@dataclass
class Plan:
    """What every part of one model version's review shares: the range, the grids, the baseline."""

    model: str
    version: str
    since: datetime
    until: datetime
    cycle: timedelta | None
    base: dict[str, st.Profile]
    thresholds: Thresholds
    baseline_id: str = ""  # names the baseline, for roll-ups (``rollups``)
    cohorts: dict[str, str] = field(default_factory=dict)  # device -> cohort (a tag: site, batch, ...)
    grid_id: str = ""  # names the baseline's review grids: summaries counted on them are read as columns

    @property
    def features(self) -> list[str]:
        """The baseline's features, in its order (the fleet's hourly series are kept in it)."""
        return [n for n in self.base if n != SCORE_ROW]

    def __post_init__(self) -> None:
        self._layouts: dict[tuple[str, ...], _Layout | None] = {}
        self._reference: st.Reference | None = None

    def __getstate__(self) -> dict:  # caches: they do not travel (Dask)
        return {k: v for k, v in self.__dict__.items() if k not in ("_layouts", "_reference")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def reference(self) -> st.Reference:
        """The baseline's profiles as arrays, for comparing a device's series all at once."""
        if self._reference is None:
            self._reference = st.Reference(list(self.base.values()))
        return self._reference

    def layout(self, names: list[str]) -> _Layout | None:
        """How a summary's series (``names``, the score last as "score") map onto the plan's
        profiles; None if they are not the baseline's features."""
        key = tuple(names)
        if key not in self._layouts:
            self._layouts[key] = _Layout.of(names, {n: p.grid for n, p in self.base.items()})
        return self._layouts[key]


@dataclass
class _Layout:
    """A summary's series order against the plan's: the summary's grid lengths, and the indices
    that put its columns in the plan's order (None where the orders agree, as they do when the
    device's features are the baseline's, in order)."""

    lengths: np.ndarray  # each series' grid length, in the summary's order
    series: np.ndarray | None  # the summary's series, in the plan's order
    counts: np.ndarray | None  # the summary's grid counts, in the plan's order

    @classmethod
    def of(cls, names: list[str], grids: dict[str, np.ndarray]) -> _Layout | None:
        own = [SCORE_ROW if i == len(names) - 1 else n for i, n in enumerate(names)]
        if len(set(own)) != len(own) or set(own) != set(grids):
            return None
        lengths = np.array([len(grids[n]) for n in own], dtype=np.int64)
        if own == list(grids):
            return cls(lengths, None, None)
        where = {n: i for i, n in enumerate(own)}
        series = np.array([where[n] for n in grids])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        counts = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in series])
        return cls(lengths, series, counts)


@dataclass
class Partial:
    """The review of some devices: their results, the fleet's share of them, the hourly series."""

    devices: list[DeviceDrift] = field(default_factory=list)
    fleet: _Device = field(default_factory=lambda: _Device("(fleet)"))
    hours: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cohorts: dict[str, _Device] = field(default_factory=dict)


def _plan(store, model, version, baseline, devices, t, since, until, last, cycle_s) -> Plan:
    if until is None:  # the end of the newest window: read it
        newest = max((s, k) for keys in devices.values() for s, k in keys)
        try:
            until = load_summary(store.get(newest[1]), newest[1]).window_end
        except (ContractError, ObjectNotFound):
            until = newest[0]
    if since is None and last is not None:
        since = until - last
    if since is None:
        since = min(s for keys in devices.values() for s, _ in keys)
    series = {**baseline.features, SCORE_ROW: baseline.score}
    grids = {name: review_grid(s) for name, s in series.items()}
    gid = grid_id({n: g for n, g in grids.items() if n != SCORE_ROW}, grids[SCORE_ROW])
    base = {}
    for name, s in series.items():
        base[name] = st.Profile(grids[name])
        base[name].add_summary(s, on_grid=baseline.grid == gid)  # a baseline from training counts on them
    from .rollups import baseline_id

    return Plan(model, version, since, until, timedelta(seconds=cycle_s) if cycle_s else None, base, t,
                baseline_id(baseline), grid_id=gid)


def review_devices(store, plan: Plan, devices: list[tuple[str, list[str]]], workers: int = 8,
                   tick: Callable[[int], None] = lambda n=1: None, compact: bool = False) -> Partial:
    """Stream the given devices' summaries (keys already chosen for the range) into results, a
    day at a time: a whole day inside the range is read from its roll-up when one matches, and
    with ``compact`` one is written for every whole day read. Runs in-process, or on a Dask worker
    or in a SageMaker job for a share of the fleet (``store`` may then be a URL and endpoint)."""
    from . import rollups

    if isinstance(store, tuple):
        from edge_runtime.store import open_store

        store = open_store(*store)
    part = Partial()
    grids = {name: p.grid for name, p in plan.base.items()}
    for device, keys in devices:
        state = _Device(device)
        by_day: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            m = KEY_RE.search(key)
            by_day[m["date"] if m else ""].append(key)
        for day, day_keys in sorted(by_day.items()):
            whole = bool(plan.baseline_id) and _whole_day(plan, day)
            rkey = rollups.rollup_key(plan.model, plan.version, device, day, plan.baseline_id) if whole else ""
            found = rollups.load(store, rkey, day_keys, grids) if whole else None
            if found is not None:
                day_state, day_hours, day_warnings = found
                _rebucket(day_state, plan, day)
                tick(len(day_keys))
            else:
                day_state, day_hours, day_warnings, seen = _Device(device), {}, [], {}
                cut = False
                for key, data in _read(store, day_keys, workers):
                    tick(1)
                    taken = _take(day_state, key, data, plan, grids, seen, day_warnings, day_hours)
                    cut |= taken == "out of range"
                    day_state.on_grid += taken == "on grid"
                    day_state.sketched += taken == "sketched"
                _flush(day_state, plan)
                if whole and compact and not cut:
                    rollups.save(store, rkey, day_keys, day_state, day_hours, day_warnings)
            _merge_state(state, day_state)
            _merge_hours(part.hours, day_hours)
            part.warnings += day_warnings
        if not state.windows:
            continue
        part.devices.append(_device_result(state, plan, plan.cycle))
        cohort = plan.cohorts.get(device)
        targets = [part.fleet] + ([part.cohorts.setdefault(cohort, _Device(f"(cohort {cohort})"))] if cohort else [])
        for target in targets:
            for bucket in _complete_buckets(state, plan.cycle, plan.until, plan.since):
                _add_bucket(target, bucket)
            _add_counts(target, state)
    return part


def _whole_day(plan: Plan, day: str) -> bool:
    """The UTC day lies inside the range, and (with a cycle) inside one cycle of it."""
    try:
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        return False
    end = start + timedelta(days=1)
    if start < plan.since or end > plan.until:
        return False
    return plan.cycle is None or (plan.until - end) % plan.cycle + timedelta(days=1) <= plan.cycle


def _rebucket(day: _Device, plan: Plan, date: str) -> None:
    """A roll-up's one bucket, numbered for this review's range."""
    end = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=timezone.utc) + timedelta(days=1)
    b = int((plan.until - end) // plan.cycle) if plan.cycle else 0
    (profiles,) = day.buckets.values()  # a whole day lies in one bucket
    day.buckets = {b: profiles}
    day.covered = {b: {t: s for cov in day.covered.values() for t, s in cov.items()}}


def _merge_state(target: _Device, day: _Device) -> None:
    """Add a day's state (which is used up: its profiles may become the target's) to the device's."""
    for b, profiles in day.buckets.items():
        into = target.buckets.get(b)
        if into is None:
            target.buckets[b] = profiles
            continue
        for name, profile in profiles.items():
            into[name].add(profile)
    for b, cov in day.covered.items():
        target.covered.setdefault(b, {}).update(cov)
    if day.last is not None and (target.last is None or day.last >= target.last):
        target.health = day.health
    _add_counts(target, day)


def _new_hour(features: int) -> dict:
    """One hour of the fleet series: counts, and per feature (the plan's, in order) the sum and
    count of its values."""
    return {"records": 0, "rejected": 0, "outliers": 0, "sums": np.zeros(features),
            "counts": np.zeros(features, dtype=np.int64)}


def _merge_hours(target: dict, hours: dict) -> None:
    for hour, v in hours.items():
        h = target.get(hour)
        if h is None:
            h = target[hour] = _new_hour(len(v["sums"]))
        for k in ("records", "rejected", "outliers"):
            h[k] += v[k]
        h["sums"] += v["sums"]
        h["counts"] += v["counts"]


def _add_counts(target: _Device, other: _Device) -> None:
    target.windows += other.windows
    target.records += other.records
    target.rejected += other.rejected
    target.outliers += other.outliers
    target.on_grid += other.on_grid
    target.sketched += other.sketched
    if other.first is not None:
        target.first = min(target.first or other.first, other.first)
    if other.last is not None:
        target.last = max(target.last or other.last, other.last)


def _combine(plan: Plan, parts: list[Partial], cycle_s: int | None) -> tuple[ModelDrift, list[str]]:
    report = ModelDrift(plan.model, plan.version, plan.since, plan.until, [], cycle_s=cycle_s)
    fleet, hours, warnings, cohorts = _Device("(fleet)"), {}, [], {}
    for part in parts:
        report.devices += part.devices
        warnings += part.warnings
        for target, source in [(fleet, part.fleet)] + [
                (cohorts.setdefault(name, _Device(c.device_id)), c) for name, c in sorted(part.cohorts.items())]:
            if source.buckets:
                _add_bucket(target, source.buckets[0])
            _add_counts(target, source)
        _merge_hours(hours, part.hours)
    report.windows_on_grid, report.windows_sketched = fleet.on_grid, fleet.sketched
    report.cohorts = [_device_result(c, plan, None)
                      for _, c in sorted(cohorts.items())]
    if fleet.windows:
        report.fleet = _device_result(fleet, plan, None)
        current = fleet.buckets.get(0, {})
        for name, b in plan.base.items():
            c = current.get(name)
            pick = sorted({int(i) for i in np.linspace(0, len(b.grid) - 1, 64)})
            report.distributions[name] = {"x": b.grid[pick].tolist(), "baseline_cdf": b.cdf[pick].tolist(),
                                          "current_cdf": (c.cdf[pick].tolist() if c is not None and c.count
                                                          else None)}
    report.timeline = [{"hour": h, "records": v["records"], "rejected": v["rejected"], "outliers": v["outliers"],
                        "means": {n: float(v["sums"][i] / v["counts"][i])
                                  for n, i in sorted((n, i) for i, n in enumerate(plan.features)) if v["counts"][i]}}
                       for h, v in sorted(hours.items())]
    return report, warnings


def _review_model(store, model, version, baseline, devices, t, since, until, last, cycle_s, workers,
                  warnings, tick, dask=None, compact: bool = False,
                  cohorts: dict[str, str] | None = None) -> ModelDrift:
    plan = _plan(store, model, version, baseline, devices, t, since, until, last, cycle_s)
    plan.cohorts = {d: c for d, c in (cohorts or {}).items() if d in devices}
    shares = _shares(chosen_keys(plan, devices, tick))
    if dask is None:
        parts = [review_devices(store, plan, share, workers, tick, compact) for share in shares]
    else:
        parts = _on_dask(dask, store, plan, shares, workers, tick, compact)
    report, more = _combine(plan, parts, cycle_s)
    warnings += more
    return report


def chosen_keys(plan: Plan, devices: dict[str, list[tuple[datetime, str]]],
                tick: Callable[[int], None] = lambda n=1: None) -> list[tuple[str, list[str]]]:
    """Per device, in order, the keys whose window starts inside the plan's range."""
    chosen = []
    for device, keys in sorted(devices.items()):
        picked = sorted(k for s, k in keys if plan.since <= s < plan.until)
        tick(len(keys) - len(picked))
        if picked:
            chosen.append((device, picked))
    return chosen


def finish(store: ObjectStore, report: ModelDrift, t: Thresholds, warnings: list[str]) -> bool:
    """Judge a combined report; False (and a warning) when the range held nothing of it."""
    if not report.devices:
        warnings.append(f"{report.model_name} {report.model_version}: no summaries between "
                        f"{report.since:%Y-%m-%d %H:%M} and {report.until:%Y-%m-%d %H:%M} UTC")
        return False
    report.expected_outlier_rate = expected_outlier_rate(store, report.model_name, report.model_version)
    _judge(report, t)
    return True


SHARE_SUMMARIES = 500  # a unit of work: fixed, so the same store always splits (and sums) the same way


def _shares(chosen: list[tuple[str, list[str]]]) -> list[list[tuple[str, list[str]]]]:
    """Whole devices in order, about ``SHARE_SUMMARIES`` summaries a share. The fleet's sums are
    made share by share in this order, in-process or on any cluster, so the numbers never depend
    on where the review ran."""
    shares, share, size = [], [], 0
    for device in chosen:
        share.append(device)
        size += len(device[1])
        if size >= SHARE_SUMMARIES:
            shares.append(share)
            share, size = [], 0
    return shares + ([share] if share else [])


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536. Setting it also fixes glibc's mmap
# threshold at 128 KB, so the review's summary-sized buffers and per-device arrays are given back to
# the system and faulted in again nearly every time: the review ran at half speed on such workers
# (docs/benchmarks.md). Workers this module starts get these; docs/drift.md says how to set them on
# a cluster of your own.
DASK_WORKER_ENV = {"MALLOC_TRIM_THRESHOLD_": 128 << 20, "MALLOC_MMAP_THRESHOLD_": 16 << 20}


def local_cluster(workers: int):
    """A Dask LocalCluster of ``workers`` one-thread worker processes, set up for the review."""
    import dask
    from distributed import LocalCluster

    environ = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in DASK_WORKER_ENV.items()}
    with dask.config.set(environ):
        return LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)


def _on_dask(client, store, plan: Plan, shares, workers: int, tick, compact: bool = False) -> list[Partial]:
    """One task per share on a Dask cluster; each opens the store itself (a URL travels, a
    connection does not). Results come back in share order."""
    from distributed import as_completed

    spec = (store.url, getattr(store, "endpoint_url", None))
    plan_future = client.scatter(plan, broadcast=True)
    futures = [client.submit(review_devices, spec, plan_future, share, workers, compact=compact, pure=False)
               for share in shares]
    sizes = {f.key: sum(len(k) for _, k in share) for f, share in zip(futures, shares)}
    for future in as_completed(futures):
        future.result()  # raises here if the task failed
        tick(sizes[future.key])
    return [f.result() for f in futures]


def admit(key: str, data: bytes | Exception, model: str, version: str, seen: dict, warnings: list[str],
          since: datetime | None = None, until: datetime | None = None) -> WindowSummary | str | None:
    """The summary at ``key`` if the review counts it; None (with a warning) if it is unreadable,
    names another device or model than its key, or repeats a part already counted (``seen``);
    "out of range" if its window is not inside [since, until]."""
    if isinstance(data, Exception):
        warnings.append(f"summary not read: {key}: {data}")
        return None
    try:
        s = load_summary(data, key)
    except ContractError as err:
        warnings.append(f"unreadable summary skipped: {err}")
        return None
    return admit_summary(key, s, model, version, seen, warnings, since, until)


def admit_summary(key: str, s: SummaryHeader, model: str, version: str, seen: dict, warnings: list[str],
                  since: datetime | None = None, until: datetime | None = None) -> SummaryHeader | str | None:
    """``admit`` for a summary read (or its header): the checks of its key, range and replays."""
    claimed = f"/model={s.model_name}/version={s.model_version}/device={s.device_id}/"
    if claimed not in "/" + key or (s.model_name, s.model_version) != (model, version):
        # the key is what the device's IAM policy scopes (device=<thing name>); a summary that
        # names another device or model than its key is not counted for either
        warnings.append(f"summary skipped: {key} holds {s.model_name} {s.model_version} of device "
                        f"{s.device_id!r}, which its key does not name")
        return None
    if (until is not None and s.window_end > until) or (since is not None and s.window_start < since):
        return "out of range"
    if s.records_digest is not None:
        if s.identity in seen:
            warnings.append(f"replayed input counted once: {key} repeats {seen[s.identity]}")
            return None
        seen[s.identity] = key
    return s


def load_fleet(store: ObjectStore) -> tuple[dict[tuple[str, str], dict[str, list[WindowSummary]]], list[str]]:
    """Every summary the review would count, in memory, by (model, version) then device: for tools
    and tests on small stores. The review itself never holds them all."""
    fleet: dict = defaultdict(dict)
    warnings: list[str] = []
    for (model, version), devices in sorted(list_summaries(store).items()):
        for device, keys in sorted(devices.items()):
            seen: dict = {}
            ordered = sorted(k for _, k in keys)
            admitted = [admit(k, d, model, version, seen, warnings) for k, d in _read(store, ordered, 4)]
            windows = [s for s in admitted if isinstance(s, WindowSummary)]
            if windows:
                fleet[(model, version)][device] = windows
    return fleet, warnings


def _take(state: _Device, key: str, data, plan: Plan, grids, seen, warnings, hours) -> str | None:
    """Count one summary into the device's state: "on grid" (its columns, exact counts on the
    plan's grids), "sketched" (its series and sketches), "out of range", or None (skipped, with a
    warning)."""
    if isinstance(data, bytes) and summary_format.is_binary(data):
        # counted on the plan's grids: its columns; anything else (another baseline's grids, a short
        # window, version 3): decoded whole, from the container checked once
        try:
            read = summary_format.read(data, key, plan.grid_id) if plan.grid_id else summary_format.decode(data, key)
        except ContractError as err:
            warnings.append(f"unreadable summary skipped: {err}")
            return None
        if isinstance(read, summary_format.Columns):
            return _take_columns(state, key, read, plan, grids, seen, warnings, hours)
        s = admit_summary(key, read, plan.model, plan.version, seen, warnings, plan.since, plan.until)
    else:
        s = admit(key, data, plan.model, plan.version, seen, warnings, plan.since, plan.until)
    if not isinstance(s, WindowSummary):
        return s
    if set(s.features) != set(grids) - {SCORE_ROW}:
        warnings.append(f"summary skipped: {key}: features {sorted(s.features)} are not the baseline's")
        return None
    on_grid = bool(plan.grid_id) and s.grid == plan.grid_id
    try:  # every float sketch's layout, checked before anything of the summary is counted
        layouts = {name: kll_layout(x.kll) for name, x in [*s.features.items(), (SCORE_ROW, s.score)]
                   if x.count and x.kll and x.kll_type == "f32" and not (on_grid and x.grid_counts is not None)}
    except ValueError as err:
        warnings.append(f"summary skipped: {key}: a damaged sketch ({err})")
        return None
    series = [*s.features.items(), (SCORE_ROW, s.score)]
    if on_grid and not all(st.fits_grid(x, grids[name]) for name, x in series):
        warnings.append(f"summary skipped: {key}: grid counts that do not fit the baseline's grids")
        return None
    unread = [(name, x) for name, x in series if x.count and name not in layouts
              and not (on_grid and x.grid_counts is not None)]  # sketches that are not float ones, or none
    for name, x in unread:
        problem = _unreadable_sketch(x)
        if problem:
            warnings.append(f"summary skipped: {key}: {name}: {problem}")
            return None
    profiles = _bucket(state, s, plan, grids)
    for name, summary in series:
        profiles[name].add_summary(summary, layouts.get(name), on_grid)
    counts = np.array([s.features[n].count for n in plan.features], dtype=np.int64)
    means = np.array([s.features[n].mean if s.features[n].count else 0.0 for n in plan.features])
    _count_window(state, s, hours, counts, means)
    return "on grid" if on_grid and all(x.grid_counts is not None for _, x in series) else "sketched"


def _unreadable_sketch(x) -> str | None:
    """Why a series with values cannot give its distribution from its (doubles) sketch, if it cannot:
    checked before anything of the summary is counted."""
    if not x.kll:
        return "values but no sketch"
    try:
        sketch = decode_sketch(x)
    except Exception as err:  # noqa: BLE001 - the library's own errors on bytes it did not write
        return f"a damaged sketch ({type(err).__name__}: {err})"
    return None if sketch.n == x.count else f"a sketch of {sketch.n} values for {x.count}"


def _take_columns(state: _Device, key: str, cols: summary_format.Columns, plan: Plan, grids, seen, warnings,
                  hours) -> str | None:
    try:
        header = parse_document(SummaryHeader, cols.header, key)
    except ContractError as err:
        warnings.append(f"unreadable summary skipped: {err}")
        return None
    s = admit_summary(key, header, plan.model, plan.version, seen, warnings, plan.since, plan.until)
    if not isinstance(s, SummaryHeader):
        return s
    layout = plan.layout(cols.names)
    if layout is None:
        warnings.append(f"summary skipped: {key}: features {sorted(cols.names[:-1])} are not the baseline's")
        return None
    if not np.array_equal(cols.grid_lengths, layout.lengths):
        warnings.append(f"summary skipped: {key}: grid counts that do not fit the baseline's grids")
        return None
    tallies, moments, counts = cols.tallies, cols.moments, cols.grid_counts
    if layout.series is not None:
        tallies, moments, counts = tallies[layout.series], moments[layout.series], counts[layout.counts]
    _bucket(state, s, plan, grids)
    state.lean.setdefault(_bucket_of(s, plan), []).append((tallies, moments, counts))
    n_features = len(cols.names) - 1  # the plan's features come first, in its order: the score is last
    _count_window(state, s, hours, tallies[:n_features, 0], moments[:n_features, 2])
    return "on grid"


def _bucket_of(s: SummaryHeader, plan: Plan) -> int:
    return int((plan.until - s.window_end) // plan.cycle) if plan.cycle else 0


def _bucket(state: _Device, s: SummaryHeader, plan: Plan, grids) -> dict[str, st.Profile]:
    """The profiles of the cycle bucket the window falls in, its coverage noted."""
    bucket = _bucket_of(s, plan)
    profiles = state.buckets.get(bucket)
    if profiles is None:
        profiles = state.buckets[bucket] = {name: st.Profile(grid) for name, grid in grids.items()}
    state.covered.setdefault(bucket, {})[s.window_start] = (s.window_end - s.window_start).total_seconds()
    return profiles


def _flush(state: _Device, plan: Plan) -> None:
    """Add the windows read as columns to their buckets' profiles, a bucket at a time."""
    names = list(plan.base)
    for bucket, windows in state.lean.items():
        tallies, moments, counts = (np.stack(x) for x in zip(*windows))
        profiles = state.buckets[bucket]
        st.add_columns([profiles[n] for n in names], plan.reference.offsets, tallies, moments, counts)
    state.lean = {}


def _count_window(state: _Device, s: SummaryHeader, hours: dict, counts: np.ndarray, means: np.ndarray) -> None:
    """A counted window's records, its hour of the fleet series (per feature of the plan, in its
    order, the window's count and mean), and the device's newest health."""
    state.windows += 1
    state.records += s.records
    state.rejected += s.rejected
    state.outliers += s.outliers
    start = s.window_start.replace(minute=0, second=0, microsecond=0)
    hour = hours.get(start)
    if hour is None:
        hour = hours[start] = _new_hour(len(counts))
    hour["records"] += s.records
    hour["rejected"] += s.rejected
    hour["outliers"] += s.outliers
    hour["sums"] += np.where(counts > 0, means * counts, 0.0)
    hour["counts"] += counts
    state.first = min(state.first or s.window_start, s.window_start)
    if state.last is None or s.window_end >= state.last:
        state.last = s.window_end
        state.health = _health(s)


def _health(s: SummaryHeader) -> dict:
    doc = s.health.model_dump(exclude_defaults=True) if s.health else {}
    if s.spool_dropped:
        doc["spool_dropped"] = s.spool_dropped.model_dump(exclude_defaults=True)
    return doc


COVERAGE = 0.9  # a cycle counts as whole when the device's windows cover this much of it


def _complete_buckets(state: _Device, cycle, until, since) -> list[dict[str, st.Profile]]:
    """Every bucket without a cycle; with one, the cycles (inside the range) the device's windows
    cover, so that no part of the cycle weighs more than another."""
    if cycle is None:
        return list(state.buckets.values())
    out = []
    for b, profiles in sorted(state.buckets.items()):
        covered = sum(state.covered.get(b, {}).values())
        if until - cycle * (b + 1) >= since and covered >= COVERAGE * cycle.total_seconds():
            out.append(profiles)
    return out


def _add_bucket(state: _Device, bucket: dict[str, st.Profile]) -> None:
    """Into the fleet's one bucket: the complete cycles of every device."""
    target = state.buckets.get(0)
    if target is None:
        target = state.buckets[0] = {n: st.Profile(p.grid) for n, p in bucket.items()}
    for name, profile in bucket.items():
        target[name].add(profile)


def _summed(buckets: list[dict[str, st.Profile]], names: list[str], grids) -> list[st.Profile]:
    """The buckets' profiles added up, in ``names`` order (one bucket: its own profiles, not a copy)."""
    if len(buckets) == 1:
        return [buckets[0][n] for n in names]
    out = [st.Profile(grids[n]) for n in names]
    for bucket in buckets:
        for target, name in zip(out, names):
            target.add(bucket[name])
    return out


def _device_result(state: _Device, plan: Plan, cycle) -> DeviceDrift:
    base, t = plan.base, plan.thresholds
    names = list(base)
    grids = {name: p.grid for name, p in base.items()}
    buckets = _complete_buckets(state, cycle, plan.until, plan.since)
    merged = _summed(buckets, names, grids)
    # for the rates: every window, complete cycles or not
    seen_all = merged if len(buckets) == len(state.buckets) else _summed(list(state.buckets.values()), names, grids)
    scored = state.records
    d = DeviceDrift(state.device_id, state.windows, scored, state.rejected, state.outliers,
                    state.outliers / scored if scored else 0.0, state.first, state.last, health=state.health)
    short = cycle is not None and not buckets
    ref = plan.reference
    compared = st.Comparison.of(ref, merged) if buckets else None
    ranges = (compared if seen_all is merged and compared else st.Comparison.of(ref, seen_all)).out_of_range.tolist()
    if compared is not None:
        ks, adjusted = compared.ks.tolist(), compared.ks_adjusted.tolist()
        psi, js, wasserstein = compared.psi.tolist(), compared.js.tolist(), compared.wasserstein.tolist()
    for i, name in enumerate(names):
        b, c, seen = base[name], (merged[i] if buckets else None), seen_all[i]
        shown = seen if short or c is None else c
        f = FeatureDrift(name, shown.count, shown.mean, b.mean)
        total = seen.count + seen.missing + seen.nonfinite
        f.missing_rate = seen.missing / total if total else 0.0
        f.nonfinite_rate = seen.nonfinite / total if total else 0.0
        f.out_of_range_rate = ranges[i]
        f.missing, f.nonfinite, f.std = seen.missing, seen.nonfinite, seen.std
        f.min, f.max = (seen.min, seen.max) if seen.count else (None, None)
        if short:
            f.verdict = "short"
        elif c is not None and c.count >= t.min_count and b.count:
            f.ks, f.ks_adjusted = ks[i], adjusted[i]
            f.robust_linf = st.robust_linf(f.ks, c.count, b.count, t.ks_alpha)
            f.psi, f.js, f.wasserstein = psi[i], js[i], wasserstein[i]
            f.pvalue = st.ks_pvalue(f.ks_adjusted, c.count, b.count)
        d.features.append(f)
        if name == SCORE_ROW:
            continue
        b_total = b.count + b.missing + b.nonfinite
        for check, count, base_rate in (
            ("missing", seen.missing, b.missing / b_total if b_total else 0.0),
            ("non-finite", seen.nonfinite, b.nonfinite / b_total if b_total else 0.0),
            ("out-of-range", round(f.out_of_range_rate * seen.count), 2.0 / max(b.count, 1)),
        ):
            n = total if check != "out-of-range" else seen.count
            if n:
                d.checks.append(Check(f"{name}: {check}", "data-quality", count, n, count / n, base_rate,
                                      st.rate_pvalue(count, n, base_rate)))
    seen_records = state.records + state.rejected
    if seen_records:
        d.checks.append(Check("rejected records", "data-quality", state.rejected, seen_records,
                              state.rejected / seen_records, 0.0, st.rate_pvalue(state.rejected, seen_records, 0.0)))
    return d


def _judge(report: ModelDrift, t: Thresholds) -> None:
    """Verdicts for every device (and the fleet), with one false-discovery correction over all."""
    rows = [*report.devices, *report.cohorts, *([report.fleet] if report.fleet else [])]
    expected = report.expected_outlier_rate
    for d in rows:
        if expected is not None and d.records:
            d.checks.append(Check("outlier rate", "outliers", d.outliers, d.records, d.outlier_rate, expected,
                                  st.rate_pvalue(d.outliers, d.records, expected)))
    tests = [f for d in rows for f in d.features if f.pvalue is not None]
    checks = [c for d in rows for c in d.checks]
    qvalues = st.benjamini_hochberg([f.pvalue for f in tests] + [c.pvalue for c in checks])
    for f, q in zip(tests, qvalues[: len(tests)]):
        f.qvalue = q
        significant = q < t.alpha
        f.verdict = ("drift" if significant and f.ks_adjusted >= t.drift_ks else
                     "warn" if significant and f.ks_adjusted >= t.warn_ks else "ok")
    for c, q in zip(checks, qvalues[len(tests):]):
        c.qvalue = q
        excess = c.rate - c.expected
        if c.kind == "outliers":
            flagged = excess >= t.outlier_excess and c.rate >= t.outlier_factor * c.expected
        else:
            flagged = excess >= t.quality_rate
        c.verdict = c.kind if flagged and q < t.alpha else "ok"
    for d in rows:
        _device_verdict(d)
    report.devices.sort(key=lambda d: (-SEVERITY[d.verdict], -d.worst_ks, d.device_id))


def _device_verdict(d: DeviceDrift) -> None:
    d.drifted_features = [f.feature for f in d.features if f.verdict == "drift" and f.feature != SCORE_ROW]
    verdicts = {f.verdict for f in d.features}
    reasons = [f"{f.feature}: drift (KS {f.ks:.3f}, PSI {f.psi:.2f})" for f in d.features if f.verdict == "drift"]
    flagged = [c for c in d.checks if c.verdict != "ok"]
    reasons += [f"{c.name} {c.rate:.1%} (expected {c.expected:.1%})" for c in flagged]
    if "drift" in verdicts:
        d.verdict = "drift"
    elif any(c.kind == "outliers" for c in flagged):
        d.verdict = "outliers"
    elif flagged:
        d.verdict = "data-quality"
    elif "warn" in verdicts:
        d.verdict = "warn"
        reasons += [f"{f.feature}: warn (KS {f.ks:.3f})" for f in d.features if f.verdict == "warn"]
    elif "ok" in verdicts:
        d.verdict = "ok"
    elif "short" in verdicts:
        d.verdict = "short"
        reasons.append("less than one whole cycle of data in range: distributions not compared")
    else:
        d.verdict = "too-few"
    d.reasons = reasons


# --- outputs -----------------------------------------------------------------------------------


def _plain(value):
    """JSON's types, in one pass (``dataclasses.asdict`` deep-copies every value first: most of the
    time of writing a thousand devices' results): non-finite floats as null, times as ISO text."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return _plain(value.item())
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    raise TypeError(f"cannot write {type(value).__name__} in a drift review")


def to_json(reports: list[ModelDrift], thresholds: Thresholds) -> dict:
    return {
        "thresholds": _plain(thresholds),
        "models": [{**_plain(r), "drifted_devices": r.drifted_devices} for r in reports],
    }


def dumps(doc: dict) -> bytes:
    """A review's JSON document as text (indented), as ``--json`` and the demo write it."""
    import orjson

    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def format_table(report: ModelDrift, features: bool = True, limit: int | None = None) -> str:
    """Worst devices first; a device's features that are not ok under it."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    span = (f"{report.since:%Y-%m-%d %H:%M} .. {report.until:%Y-%m-%d %H:%M} UTC"
            if report.since and report.until else "all data")
    cycle = f", whole cycles of {report.cycle_s / 3600:g} h" if report.cycle_s else ""
    head = f"{'device':<16}{'feature':<18}{'rows':>8}{'mean':>11}{'base mean':>11}{'KS':>7}{'PSI':>7}{'q':>9}  verdict"
    lines = [f"model {report.model_name} version {report.model_version}: {span}{cycle}", head, "-" * len(head)]
    shown = report.devices[:limit] if limit else report.devices
    for d in shown + report.cohorts + ([report.fleet] if report.fleet else []):
        if features:
            for f in d.features:
                if f.verdict in ("drift", "warn") or d.verdict in ("drift", "warn") or len(shown) <= 10:
                    lines.append(
                        f"{d.device_id:<16}{f.feature:<18}{f.count:>8}{num(f.mean, '.4g'):>11}"
                        f"{num(f.baseline_mean, '.4g'):>11}{num(f.ks, '.3f'):>7}{num(f.psi, '.2f'):>7}"
                        f"{num(f.qvalue, '.1e'):>9}  " + (f.verdict.upper() if f.verdict == "drift" else f.verdict))
        why = f"; {'; '.join(d.reasons)}" if d.reasons else ""
        lines.append(f"{d.device_id:<16}=> {d.verdict.upper()}: {d.records} rows, {d.outliers} outliers "
                     f"({d.outlier_rate:.1%}), {d.rejected} rejected{why}")
    if limit and len(report.devices) > limit:
        lines.append(f"... {len(report.devices) - limit} more devices (see the JSON)")
    counts: dict[str, int] = defaultdict(int)
    for d in report.devices:
        counts[d.verdict] += 1
    lines.append("devices: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda x: -SEVERITY[x[0]])))
    lines.append(f"drifted devices: {', '.join(report.drifted_devices) or 'none'}")
    return "\n".join(lines)
