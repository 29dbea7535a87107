"""Compaction: a device's day of summaries, reviewed once, written back as one roll-up.

A review that covers whole UTC days (and, with a cycle, days that fall in one cycle) can read a
device-day's roll-up instead of its summaries: the day's profiles on the baseline's grid, its
counts, coverage, hourly series and warnings. The roll-up names the exact summary keys it was made
from and the baseline it was made against; if the store has any other key for that device and day
now (a late part, a replay) or the baseline changed, the roll-up is not used and the day is read
again, and written again. So a roll-up can never hide data; it only saves reading it twice.

``rollups/model=<m>/version=<v>/device=<d>/date=<YYYY-MM-DD>/<baseline id>.json``, JSON
(``drift_io``), never pickle.
"""

from __future__ import annotations

import hashlib

from edge_runtime.contracts import WindowSummary
from edge_runtime.store import ObjectNotFound, ObjectStore

ROLLUP_PREFIX = "rollups/"
ROLLUP_FORMAT = "edgeloop.drift.rollup/3"  # 2: profiles without their grid; 3: hourly series as lists


def baseline_id(baseline: WindowSummary) -> str:
    """Names the baseline (and so the grid) a roll-up was made against."""
    return hashlib.sha256(baseline.model_dump_json().encode()).hexdigest()[:16]


def rollup_key(model: str, version: str, device: str, day: str, base_id: str) -> str:
    return f"{ROLLUP_PREFIX}model={model}/version={version}/device={device}/date={day}/{base_id}.json"


def load(store: ObjectStore, key: str, keys: list[str], grids: dict):
    """The day's state, hours and warnings from its roll-up, if it was made from exactly ``keys``
    (the profiles' grids come from the plan: the roll-up names the baseline they derive from)."""
    from . import drift_io

    try:
        doc = drift_io.loads(store.get(key))
    except (ObjectNotFound, ValueError):
        return None
    if doc.get("format") != ROLLUP_FORMAT or doc.get("keys") != keys:
        return None
    return (drift_io._state_from_json(doc["state"], grids), drift_io._hours_from_json(doc["hours"]),
            list(doc["warnings"]))


def save(store: ObjectStore, key: str, keys: list[str], state, hours: dict, warnings: list[str]) -> None:
    from . import drift_io

    encoded = drift_io._state_to_json(state)
    for _, profiles in encoded["buckets"]:
        for profile in profiles.values():
            profile["grid"] = None  # the baseline's (named in the key): the plan has it
    doc = {"format": ROLLUP_FORMAT, "keys": keys, "state": encoded, "hours": drift_io._hours_to_json(hours),
           "warnings": warnings}
    store.put(key, drift_io.dumps(doc))
