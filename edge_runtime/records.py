"""Turning raw JSON lines into feature vectors, or into a reason why not.

Accepted shapes of a record (one JSON object per line):

* ``{"ts": 1700000000, "temperature": 21.5, "vibration": 0.3, ...}``: features by name at the top;
  other top-level keys are metadata and are ignored;
* ``{"ts": ..., "features": {"temperature": 21.5, ...}}``: features by name, no extras allowed;
* ``{"ts": ..., "features": [21.5, 0.3, ...]}``: features in the bundle's input order.

``ts`` is optional: seconds since the epoch, or an ISO-8601 string. ``id`` is carried into events.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .contracts import InputSchema

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Record:
    values: np.ndarray  # float32, one per feature, in schema order
    ts: float | None
    record_id: str | None
    line_no: int
    line: str  # kept so a record that fails later (scoring) is dead-lettered as it arrived


@dataclass
class Rejection:
    reason: str
    line: str
    line_no: int
    ts: float | None = None
    missing: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)


MAX_TS = 253_402_300_800  # 10000-01-01: the end of what datetime can hold
MS_FROM = 100_000_000_000  # larger epoch numbers are milliseconds (1e11 s is the year 5138)


def parse_timestamp(value: object) -> float:
    """Epoch seconds or milliseconds, or an ISO-8601 string, as epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("bad timestamp")
    if isinstance(value, (int, float)):
        try:
            ts = float(value)
        except OverflowError:
            raise ValueError("bad timestamp") from None
        if ts >= MS_FROM:
            ts /= 1000.0
        if not (math.isfinite(ts) and 0 <= ts < MAX_TS):
            raise ValueError(f"timestamp out of range: {value!r}")
        return ts
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"bad timestamp {value!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    raise ValueError("bad timestamp")


class RecordParser:
    """Validates records against a bundle's input schema."""

    def __init__(self, schema: InputSchema) -> None:
        self.features = schema.features
        self.names = schema.feature_names
        self.index = {name: i for i, name in enumerate(self.names)}

    def parse(self, line: str, line_no: int) -> Record | Rejection:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            return Rejection(f"malformed JSON: {err.msg}", line, line_no)
        if not isinstance(obj, dict):
            return Rejection("not a JSON object", line, line_no)
        ts = None
        if "ts" in obj and obj["ts"] is not None:
            try:
                ts = parse_timestamp(obj["ts"])
            except ValueError as err:
                return Rejection(str(err), line, line_no)
        record_id = obj.get("id")
        record_id = None if record_id is None else str(record_id)

        raw = obj.get("features", obj) if isinstance(obj.get("features"), (dict, list)) else obj
        if isinstance(raw, list):
            if len(raw) != len(self.names):
                return Rejection(
                    f"wrong number of features: expected {len(self.names)}, got {len(raw)}",
                    line, line_no, ts,
                )
            raw = dict(zip(self.names, raw))
        elif raw is not obj:
            extra = sorted(set(raw) - set(self.names))
            if extra:
                return Rejection(f"unexpected features {extra}", line, line_no, ts)

        values = np.empty(len(self.names), dtype=np.float32)
        missing: list[str] = []
        nonfinite: list[str] = []
        for i, spec in enumerate(self.features):
            value = raw.get(spec.name)
            if value is None:
                if spec.missing == "impute" and spec.impute_value is not None:
                    values[i] = spec.impute_value
                else:
                    missing.append(spec.name)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return Rejection(f"non-numeric value for '{spec.name}'", line, line_no, ts)
            try:
                value = float(value)
            except OverflowError:  # a huge JSON integer
                value = math.inf
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                nonfinite.append(spec.name)
                continue
            values[i] = value
        if missing or nonfinite:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if nonfinite:
                parts.append(f"non-finite {nonfinite}")
            return Rejection("; ".join(parts), line, line_no, ts, missing, nonfinite)
        return Record(values, ts, record_id, line_no, line)
