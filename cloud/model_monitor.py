"""The review in SageMaker Model Monitor's file formats, for tools that already read them.

Per model version, in ``<out>/model=<m>/version=<v>/``:

* ``constraints.json``: from the baseline (completeness, non-negativity, and the distribution
  comparison this review applies: Model Monitor's robust method at our drift threshold);
* ``statistics.json``: the fleet's current data over the review's range (counts, moments, a KLL
  distribution as ten buckets between min and max);
* ``constraint_violations.json``: ``baseline_drift_check`` for every feature that drifted (on the
  fleet or on a device) and ``completeness_check`` for data-quality findings.

Field names and check types are Model Monitor's; what it has no field for (device, KS, PSI,
q-value, the rates) is in extra keys, which its readers ignore.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .drift import SCORE_ROW, DeviceDrift, ModelDrift, Thresholds

BUCKETS = 10


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def constraints(report: ModelDrift, t: Thresholds) -> dict:
    features = []
    for name, dist in report.distributions.items():
        if name == SCORE_ROW:
            continue
        base_min = dist["x"][0] if dist["x"] else 0.0
        features.append({"name": name, "inferred_type": "Fractional", "completeness": 1.0,
                         "num_constraints": {"is_non_negative": bool(base_min >= 0)}})
    return {"version": 0.0, "features": features, "monitoring_config": {
        "evaluate_constraints": "Enabled", "emit_metrics": "Enabled",
        "datatype_check_threshold": 1.0, "domain_content_threshold": 1.0,
        "distribution_constraints": {"perform_comparison": "Enabled", "comparison_threshold": t.drift_ks,
                                     "comparison_method": "Robust", "categorical_comparison_threshold": 0.1,
                                     "categorical_drift_method": "LInfinity"}}}


def _buckets(dist: dict, count: int) -> list[dict]:
    x, cdf = np.asarray(dist["x"]), dist.get("current_cdf")
    if cdf is None or not len(x) or count == 0:
        return []
    cdf = np.asarray(cdf)
    edges = np.linspace(x[0], x[-1], BUCKETS + 1)
    at = np.interp(edges, x, cdf)
    at[0], at[-1] = 0.0, 1.0  # the tails beyond the baseline's range go to the end buckets
    return [{"lower_bound": float(edges[i]), "upper_bound": float(edges[i + 1]),
             "count": float(round((at[i + 1] - at[i]) * count, 6))} for i in range(BUCKETS)]


def statistics(report: ModelDrift) -> dict:
    fleet = report.fleet
    rows = {f.feature: f for f in (fleet.features if fleet else [])}
    features = []
    for name, dist in report.distributions.items():
        if name == SCORE_ROW or name not in rows:
            continue
        f = rows[name]
        quantiles = np.interp(np.linspace(0, 1, 64), dist["current_cdf"], dist["x"]).tolist() \
            if dist.get("current_cdf") is not None else []
        features.append({
            "name": name, "inferred_type": "Fractional",
            "numerical_statistics": {
                "common": {"num_present": f.count, "num_missing": f.missing + f.nonfinite},
                "mean": _finite(f.mean), "sum": _finite(f.mean * f.count) if f.mean is not None else None,
                "std_dev": _finite(f.std), "min": _finite(f.min), "max": _finite(f.max),
                "distribution": {"kll": {"buckets": _buckets(dist, f.count),
                                         "sketch": {"parameters": {"c": 0.64, "k": 2048.0}, "data": [quantiles]}}},
            },
            "edgeloop": {"ks": f.ks, "ks_adjusted": f.ks_adjusted, "psi": f.psi, "js": f.js,
                         "wasserstein": f.wasserstein, "robust_linf": f.robust_linf, "qvalue": f.qvalue,
                         "out_of_range_rate": f.out_of_range_rate, "verdict": f.verdict},
        })
    return {"version": 0.0, "dataset": {"item_count": fleet.records if fleet else 0}, "features": features,
            "edgeloop": {"model": report.model_name, "version": report.model_version,
                         "since": report.since.isoformat() if report.since else None,
                         "until": report.until.isoformat() if report.until else None,
                         "devices": len(report.devices)}}


def violations(report: ModelDrift, t: Thresholds) -> dict:
    out = []
    for d in ([report.fleet] if report.fleet else []) + report.cohorts + report.devices:
        out += _device_violations(d, t)
    return {"violations": out}


def _device_violations(d: DeviceDrift, t: Thresholds) -> list[dict]:
    found = []
    for f in d.features:
        if f.verdict == "drift":
            found.append({"feature_name": f.feature, "constraint_check_type": "baseline_drift_check",
                          "description": f"Baseline drift distance: {f.ks_adjusted:.6g} exceeds threshold: "
                                         f"{t.drift_ks:g} (KS test q-value {f.qvalue:.3g})",
                          "device_id": d.device_id, "ks": f.ks, "psi": f.psi, "qvalue": f.qvalue})
    for c in d.checks:
        if c.verdict != "ok":
            feature, _, what = c.name.partition(": ")
            found.append({"feature_name": feature if what else "", "constraint_check_type": (
                "completeness_check" if what in ("missing", "non-finite") or c.kind == "data-quality"
                else "baseline_drift_check"),
                "description": f"{c.name}: {c.rate:.4g} against {c.expected:.4g} expected "
                               f"({c.count} of {c.total}, q-value {c.qvalue:.3g})",
                "device_id": d.device_id, "check": c.name, "kind": c.kind})
    return found


def write(reports: list[ModelDrift], out: str | Path, t: Thresholds) -> list[Path]:
    written = []
    for r in reports:
        folder = Path(out) / f"model={r.model_name}" / f"version={r.model_version}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, doc in (("constraints.json", constraints(r, t)), ("statistics.json", statistics(r)),
                          ("constraint_violations.json", violations(r, t))):
            (folder / name).write_text(json.dumps(doc, indent=1))
            written.append(folder / name)
    return written
