"""Fleet drift: merge every device's window summaries and compare them with the baseline.

Two distances per feature, both computed from the summaries alone:

* PSI on the baseline's histogram bins (quantile bins of the training data);
* the Kolmogorov-Smirnov distance between the baseline's and the device's KLL sketches,
  evaluated at the union of both sketches' quantiles.

A feature is ``drift`` when either distance crosses its drift threshold, ``warn`` when either
crosses its warning threshold, and ``too-few`` when the device has too few rows to judge.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_runtime.contracts import (
    SUMMARY_PREFIX,
    SUMMARY_SUFFIX,
    ContractError,
    NumericSummary,
    WindowSummary,
    baseline_key,
    load_summary,
)
from edge_runtime.store import ObjectNotFound, ObjectStore
from edge_runtime.summary import decode_sketch, merge_summaries

SCORE_ROW = "(outlier score)"
PSI_EPS = 1e-4


@dataclass(frozen=True)
class Thresholds:
    psi_warn: float = 0.1
    psi_drift: float = 0.25
    ks_warn: float = 0.1
    ks_drift: float = 0.2
    min_count: int = 100


@dataclass
class FeatureDrift:
    feature: str
    count: int
    mean: float | None
    baseline_mean: float | None
    psi: float | None
    ks: float | None
    verdict: str


@dataclass
class DeviceDrift:
    device_id: str
    windows: int
    records: int
    rejected: int
    outliers: int
    outlier_rate: float
    verdict: str
    drifted_features: list[str]
    features: list[FeatureDrift] = field(default_factory=list)


@dataclass
class ModelDrift:
    model_name: str
    model_version: str
    devices: list[DeviceDrift]
    expected_outlier_rate: float | None = None

    @property
    def drifted_devices(self) -> list[str]:
        return [d.device_id for d in self.devices if d.verdict == "drift"]


def psi(baseline: NumericSummary, current: NumericSummary) -> float:
    """Population stability index on the baseline's bins."""
    if baseline.hist_edges != current.hist_edges:
        raise ValueError("histogram edges differ from the baseline's (a bundle from another training run?)")
    p = np.asarray(baseline.hist_counts, dtype=np.float64)
    q = np.asarray(current.hist_counts, dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("PSI of an empty histogram")
    p = np.clip(p / p.sum(), PSI_EPS, None)
    q = np.clip(q / q.sum(), PSI_EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_distance(baseline: NumericSummary, current: NumericSummary, points: int = 256) -> float:
    """Largest gap between the two CDFs, read off the KLL sketches."""
    a, b = decode_sketch(baseline), decode_sketch(current)
    if a.is_empty() or b.is_empty():
        raise ValueError("KS distance of an empty sketch")
    ranks = np.linspace(0, 1, points)
    grid = np.unique(np.concatenate([a.get_quantiles(ranks), b.get_quantiles(ranks)]))
    return float(np.max(np.abs(np.asarray(a.get_cdf(grid)) - np.asarray(b.get_cdf(grid)))))


def judge(name: str, baseline: NumericSummary, current: NumericSummary, t: Thresholds) -> FeatureDrift:
    if current.count < t.min_count:
        return FeatureDrift(name, current.count, current.mean, baseline.mean, None, None, "too-few")
    p, k = psi(baseline, current), ks_distance(baseline, current)
    if p >= t.psi_drift or k >= t.ks_drift:
        verdict = "drift"
    elif p >= t.psi_warn or k >= t.ks_warn:
        verdict = "warn"
    else:
        verdict = "ok"
    return FeatureDrift(name, current.count, current.mean, baseline.mean, p, k, verdict)


def merge_windows(windows: list[WindowSummary]) -> WindowSummary:
    """All of one device's windows as one summary spanning them."""
    first = windows[0]
    return WindowSummary(
        model_name=first.model_name, model_version=first.model_version, device_id=first.device_id,
        window_start=min(w.window_start for w in windows), window_end=max(w.window_end for w in windows),
        records=sum(w.records for w in windows), rejected=sum(w.rejected for w in windows),
        late=sum(w.late for w in windows), outliers=sum(w.outliers for w in windows),
        features={n: merge_summaries([w.features[n] for w in windows]) for n in first.features},
        score=merge_summaries([w.score for w in windows]),
    )


def assess_device(baseline: WindowSummary, windows: list[WindowSummary], t: Thresholds) -> DeviceDrift:
    merged = merge_windows(windows)
    rows = [judge(n, baseline.features[n], merged.features[n], t) for n in baseline.features]
    drifted = [r.feature for r in rows if r.verdict == "drift"]
    verdicts = {r.verdict for r in rows}
    verdict = "drift" if drifted else "warn" if "warn" in verdicts else "too-few" if verdicts == {"too-few"} else "ok"
    rows.append(judge(SCORE_ROW, baseline.score, merged.score, t))
    return DeviceDrift(
        device_id=merged.device_id, windows=len(windows), records=merged.records,
        rejected=merged.rejected, outliers=merged.outliers,
        outlier_rate=merged.outliers / merged.records if merged.records else 0.0,
        verdict=verdict, drifted_features=drifted, features=rows,
    )


def load_fleet(store: ObjectStore) -> tuple[dict[tuple[str, str], dict[str, list[WindowSummary]]], list[str]]:
    """Every summary in the store (all parts of every window, any version), grouped by (model,
    version) then device; plus warnings: unreadable keys, and replays skipped. A part whose digest
    and counts repeat another part of the same window is the same input fed twice: counted once."""
    fleet: dict[tuple[str, str], dict[str, list[WindowSummary]]] = defaultdict(lambda: defaultdict(list))
    warnings: list[str] = []
    seen: dict[tuple, str] = {}
    for key in store.list(SUMMARY_PREFIX):
        if not key.endswith((".json", SUMMARY_SUFFIX)):
            continue
        try:
            s = load_summary(store.get(key), key)
        except ContractError as err:
            warnings.append(f"unreadable summary skipped: {err}")
            continue
        claimed = f"/model={s.model_name}/version={s.model_version}/device={s.device_id}/"
        if claimed not in "/" + key:
            # the key is what the device's IAM policy scopes (device=<thing name>); a summary that
            # names another device or model than its key is not counted for either
            warnings.append(f"summary skipped: {key} holds {s.model_name} {s.model_version} of device "
                            f"{s.device_id!r}, which its key does not name")
            continue
        if s.records_digest is not None:
            if s.identity in seen:
                warnings.append(f"replayed input counted once: {key} repeats {seen[s.identity]}")
                continue
            seen[s.identity] = key
        fleet[(s.model_name, s.model_version)][s.device_id].append(s)
    return fleet, warnings


def load_baseline(store: ObjectStore, model: str, version: str) -> WindowSummary | None:
    key = baseline_key(model, version)
    try:
        return load_summary(store.get(key), key)
    except ObjectNotFound:
        return None


def fleet_drift(store: ObjectStore, baselines: dict[tuple[str, str], WindowSummary] | None = None,
                thresholds: Thresholds = Thresholds()) -> tuple[list[ModelDrift], list[str]]:
    """Assess every (model, version) in the store; returns the reports and any warnings."""
    fleet, warnings = load_fleet(store)
    reports: list[ModelDrift] = []
    for (model, version), devices in sorted(fleet.items()):
        baseline = (baselines or {}).get((model, version)) or load_baseline(store, model, version)
        if baseline is None:
            warnings.append(f"no baseline for {model} {version}: skipped (register the bundle first)")
            continue
        assessed = []
        for device, wins in sorted(devices.items()):
            try:
                assessed.append(assess_device(baseline, wins, thresholds))
            except (ValueError, KeyError) as err:  # one inconsistent device must not hide the fleet
                warnings.append(f"{model} {version} device {device}: skipped: {err}")
        reports.append(ModelDrift(model, version, assessed))
    return reports, warnings


def to_json(reports: list[ModelDrift], thresholds: Thresholds) -> dict:
    return {
        "thresholds": asdict(thresholds),
        "models": [
            {**asdict(r), "drifted_devices": r.drifted_devices} for r in reports
        ],
    }


def format_table(report: ModelDrift) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = f"{'device':<14}{'feature':<18}{'rows':>7}{'mean':>11}{'base mean':>11}{'PSI':>8}{'KS':>7}  verdict"
    lines = [f"model {report.model_name} version {report.model_version}", header, "-" * len(header)]
    for d in report.devices:
        for f in d.features:
            lines.append(
                f"{d.device_id:<14}{f.feature:<18}{f.count:>7}{num(f.mean, '.4g'):>11}"
                f"{num(f.baseline_mean, '.4g'):>11}{num(f.psi, '.3f'):>8}{num(f.ks, '.3f'):>7}  "
                + (f.verdict.upper() if f.verdict == "drift" else f.verdict)
            )
        lines.append(
            f"{d.device_id:<14}=> {d.verdict.upper()}: {d.records} rows, {d.outliers} outliers "
            f"({d.outlier_rate:.1%}), {d.rejected} rejected"
            + (f"; drifted: {', '.join(d.drifted_features)}" if d.drifted_features else "")
        )
    lines.append(f"drifted devices: {', '.join(report.drifted_devices) or 'none'}")
    return "\n".join(lines)
