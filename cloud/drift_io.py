"""JSON round trips for the parts of a drift review: a model version's ``Plan`` and a share's ``Partial``.

A review run elsewhere (a SageMaker Processing job) gets its plan and hands back its partial
results through S3. They travel as plain JSON, never pickle: an object in a bucket must not be a
way to run code in whoever reads it. Every float64 comes back exactly (Python writes the shortest
repr that reads back to the same double), so a review combined from these files gives the same
numbers, bit for bit, as one combined in memory. Non-finite floats (a ``Profile``'s empty min and
max) and datetimes inside free-form dicts are tagged, so the files are strict JSON. Each document
names its format; a reader refuses one it does not know rather than guess.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from datetime import datetime, timedelta

import numpy as np
import orjson

from . import drift_stats as st
from .drift import Check, DeviceDrift, FeatureDrift, Partial, Plan, Thresholds, _Device

PLAN_FORMAT = "edgeloop.drift.plan/1"
PARTIAL_FORMAT = "edgeloop.drift.partial/2"  # 2: hourly sums and counts as lists, in the plan's order


# --- values ------------------------------------------------------------------------------------


def _value(v):
    """Any value a review keeps, as JSON: non-finite floats and datetimes tagged."""
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
    if isinstance(v, datetime):
        return {"$datetime": v.isoformat()}
    if isinstance(v, dict):
        return {str(k): _value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    raise TypeError(f"cannot write {type(v).__name__} to a drift review file")


def _unvalue(v):
    if isinstance(v, dict):
        if len(v) == 1 and "$float" in v:
            return float(v["$float"])
        if len(v) == 1 and "$datetime" in v:
            return datetime.fromisoformat(v["$datetime"])
        return {k: _unvalue(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unvalue(x) for x in v]
    return v


def _time(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _untime(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _array(a: np.ndarray) -> list:
    return a.tolist() if np.isfinite(a).all() else [_value(x) for x in a.tolist()]


def _unarray(values: list) -> np.ndarray:
    try:  # plain numbers, the usual case: at C speed
        return np.array(values, dtype=np.float64)
    except (TypeError, ValueError):  # tagged non-finite values among them
        return np.array([_unvalue(x) for x in values], dtype=np.float64)


def _check_format(doc: dict, expected: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != expected:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"not a {expected} document (format {found!r})")


# --- profiles and device states ----------------------------------------------------------------


def profile_to_json(p: st.Profile) -> dict:
    p.settle()
    return {"grid": _array(p.grid), "count": int(p.count), "missing": int(p.missing), "nonfinite": int(p.nonfinite),
            "cdf_mass": _array(p.cdf_mass), "error_mass": _value(p.error_mass), "total": _value(p.total),
            "m2": _value(p.m2), "min": _value(p.min), "max": _value(p.max),
            "bins": None if p.bins is None else [int(b) for b in p.bins]}


def profile_from_json(doc: dict, grid: np.ndarray | None = None) -> st.Profile:
    """``grid``: the profile's grid when the document leaves it out (a roll-up: the plan has it)."""
    return st.Profile(_unarray(doc["grid"]) if grid is None else grid, count=doc["count"], missing=doc["missing"],
                      nonfinite=doc["nonfinite"],
                      cdf_mass=_unarray(doc["cdf_mass"]), error_mass=_unvalue(doc["error_mass"]),
                      total=_unvalue(doc["total"]), m2=_unvalue(doc["m2"]), min=_unvalue(doc["min"]),
                      max=_unvalue(doc["max"]), bins=doc["bins"])


def _profiles_to_json(profiles: dict[str, st.Profile]) -> dict:
    return {name: profile_to_json(p) for name, p in profiles.items()}


def _profiles_from_json(doc: dict, grids: dict[str, np.ndarray] | None = None) -> dict[str, st.Profile]:
    return {name: profile_from_json(p, (grids or {}).get(name)) for name, p in doc.items()}


def _state_to_json(d: _Device) -> dict:
    """Buckets and coverage keyed by int (and datetime) become lists of pairs, in their order."""
    return {"device_id": d.device_id,
            "buckets": [[int(b), _profiles_to_json(ps)] for b, ps in d.buckets.items()],
            "covered": [[int(b), [[_time(t), _value(s)] for t, s in c.items()]] for b, c in d.covered.items()],
            "windows": d.windows, "records": d.records, "rejected": d.rejected, "outliers": d.outliers,
            "first": _time(d.first), "last": _time(d.last), "health": _value(d.health),
            "on_grid": d.on_grid, "sketched": d.sketched}


def _state_from_json(doc: dict, grids: dict[str, np.ndarray] | None = None) -> _Device:
    return _Device(doc["device_id"],
                   buckets={b: _profiles_from_json(ps, grids) for b, ps in doc["buckets"]},
                   covered={b: {_untime(t): _unvalue(s) for t, s in c} for b, c in doc["covered"]},
                   windows=doc["windows"], records=doc["records"], rejected=doc["rejected"],
                   outliers=doc["outliers"], first=_untime(doc["first"]), last=_untime(doc["last"]),
                   health=_unvalue(doc["health"]), on_grid=doc.get("on_grid", 0), sketched=doc.get("sketched", 0))


# --- device results ----------------------------------------------------------------------------


def _flat_to_json(obj) -> dict:  # FeatureDrift, Check: scalars only
    return {f.name: _value(getattr(obj, f.name)) for f in fields(obj)}


_DEVICE_OWN = ("first", "last", "features", "checks")  # written by device_to_json itself


def device_to_json(d: DeviceDrift) -> dict:
    doc = {f.name: _value(getattr(d, f.name)) for f in fields(d) if f.name not in _DEVICE_OWN}
    doc.update(first=_time(d.first), last=_time(d.last), features=[_flat_to_json(f) for f in d.features],
               checks=[_flat_to_json(c) for c in d.checks])
    return doc


def device_from_json(doc: dict) -> DeviceDrift:
    plain = {k: _unvalue(v) for k, v in doc.items() if k not in _DEVICE_OWN}
    return DeviceDrift(**plain, first=_untime(doc["first"]), last=_untime(doc["last"]),
                       features=[FeatureDrift(**{k: _unvalue(v) for k, v in f.items()}) for f in doc["features"]],
                       checks=[Check(**{k: _unvalue(v) for k, v in c.items()}) for c in doc["checks"]])


def _hours_to_json(hours: dict) -> list:
    """Per hour, its counts, and each feature's sum and count in the plan's order."""
    return [[_time(h), {"records": v["records"], "rejected": v["rejected"], "outliers": v["outliers"],
                        "sums": _array(v["sums"]), "counts": v["counts"].tolist()}]
            for h, v in hours.items()]


def _hours_from_json(doc: list) -> dict:
    return {_untime(h): {"records": v["records"], "rejected": v["rejected"], "outliers": v["outliers"],
                         "sums": _unarray(v["sums"]), "counts": np.array(v["counts"], dtype=np.int64)}
            for h, v in doc}


# --- plans and partials ------------------------------------------------------------------------


def plan_to_json(plan: Plan) -> dict:
    return {"format": PLAN_FORMAT, "model": plan.model, "version": plan.version,
            "since": _time(plan.since), "until": _time(plan.until),
            "cycle_s": None if plan.cycle is None else plan.cycle.total_seconds(),
            "base": _profiles_to_json(plan.base), "thresholds": asdict(plan.thresholds),
            "baseline_id": plan.baseline_id, "cohorts": dict(plan.cohorts), "grid_id": plan.grid_id}


def plan_from_json(doc: dict) -> Plan:
    _check_format(doc, PLAN_FORMAT)
    cycle = None if doc["cycle_s"] is None else timedelta(seconds=doc["cycle_s"])
    return Plan(doc["model"], doc["version"], _untime(doc["since"]), _untime(doc["until"]), cycle,
                _profiles_from_json(doc["base"]), Thresholds(**doc["thresholds"]), doc.get("baseline_id", ""),
                dict(doc.get("cohorts") or {}), doc.get("grid_id", ""))


def partial_to_json(part: Partial) -> dict:
    return {"format": PARTIAL_FORMAT, "devices": [device_to_json(d) for d in part.devices],
            "fleet": _state_to_json(part.fleet), "hours": _hours_to_json(part.hours),
            "warnings": list(part.warnings),
            "cohorts": [[name, _state_to_json(c)] for name, c in part.cohorts.items()]}


def partial_from_json(doc: dict) -> Partial:
    _check_format(doc, PARTIAL_FORMAT)
    return Partial([device_from_json(d) for d in doc["devices"]], _state_from_json(doc["fleet"]),
                   _hours_from_json(doc["hours"]), list(doc["warnings"]),
                   {name: _state_from_json(c) for name, c in doc.get("cohorts") or []})


def dumps(doc: dict) -> bytes:
    """Strict JSON, compact. orjson writes the same shortest round-trip floats as ``json``, several
    times faster (a roll-up is a few hundred KB). It would write a non-finite float as null: every
    float reaches it through ``_value`` or ``_array``, which tag those."""
    return orjson.dumps(doc)


def loads(data: bytes) -> dict:
    return orjson.loads(data)
