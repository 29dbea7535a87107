"""Turning raw JSON lines into a float32 feature matrix, a batch at a time, or into reasons why not.

Accepted shapes of a record (one JSON object per line):

* ``{"ts": 1700000000, "temperature": 21.5, "vibration": 0.3, ...}``: features by name at the top;
  other top-level keys are metadata and are ignored;
* ``{"ts": ..., "features": {"temperature": 21.5, ...}}``: features by name, no extras allowed;
* ``{"ts": ..., "features": [21.5, 0.3, ...]}``: features in the bundle's input order.

``ts`` is optional: seconds or milliseconds since the epoch, or an ISO-8601 string. ``id`` is
carried into events.

Why columnar: per-record Python work is what a device pays for. The fast path parses with orjson,
pulls the features out with one ``itemgetter`` call, checks their types in one pass and builds the
whole batch's matrix with one numpy call; only a record that fails a fast check takes the slow,
explaining path, so a bad record gets its exact reason and never costs its batch-mates.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import chain

import numpy as np
import orjson

from .contracts import InputSchema
from .streams import stream_name

FLOAT32_MAX = float(np.finfo(np.float32).max)

MAX_TS = 253_402_300_800  # 10000-01-01: the end of what datetime can hold
MS_FROM = 100_000_000_000  # larger epoch numbers are milliseconds (1e11 s is the year 5138)


class Reason:
    """Rejection codes: the label of the ``rejected`` counters and of every dead letter."""

    MALFORMED = "malformed_json"
    NOT_OBJECT = "not_object"
    BAD_TIMESTAMP = "bad_timestamp"
    TIMESTAMP_RANGE = "timestamp_out_of_range"
    SHAPE = "wrong_shape"
    UNEXPECTED = "unexpected_features"
    NON_NUMERIC = "non_numeric"
    MISSING = "missing"
    NON_FINITE = "non_finite"
    TOO_LONG = "too_long"
    BAD_FRAME = "bad_frame"
    SCORING = "scoring_failed"
    BAD_SCORE = "non_finite_score"
    INTERNAL = "internal_error"


@dataclass
class Rejection:
    code: str
    reason: str
    index: int  # position of the record in the payload it came in
    missing: tuple[str, ...] = ()
    nonfinite: tuple[str, ...] = ()
    nan: tuple[str, ...] = ()  # those of ``nonfinite`` that are NaN (the rest are infinite)


@dataclass
class Decoded:
    """A batch after validation: the rows that may be scored, and the rejections, both in order."""

    values: np.ndarray  # (n, f) float32, in schema order
    ts: np.ndarray  # (n,) float64 epoch seconds; NaN where the record had none
    index: np.ndarray  # (n,) int64: each row's position in its payload
    ids: list  # (n,) the records' "id" values, or None
    rejections: list[Rejection] = field(default_factory=list)
    streams: list[str] | None = None  # stream models: (n,) each record's stream (streams.stream_name)

    @classmethod
    def empty(cls, n_features: int, rejections: list[Rejection] | None = None) -> Decoded:
        return cls(np.empty((0, n_features), np.float32), np.empty(0), np.empty(0, np.int64), [], rejections or [])


@dataclass
class TooLong:
    """Stands in a payload for a line longer than the limit, which was skipped unread."""

    size: int
    head: bytes


def parse_timestamp(value: object) -> float:
    """Epoch seconds or milliseconds, or an ISO-8601 string, as epoch seconds (no range check)."""
    if isinstance(value, bool):
        raise ValueError("bad timestamp")
    if isinstance(value, (int, float)):
        try:
            ts = float(value)
        except OverflowError:
            raise ValueError("bad timestamp: too large") from None
        if ts >= MS_FROM:
            ts /= 1000.0
        if not math.isfinite(ts):
            raise ValueError(f"bad timestamp {value!r}")
        return ts
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"bad timestamp {value[:64]!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        try:
            return dt.timestamp()
        except (OverflowError, ValueError):
            raise ValueError(f"bad timestamp {value[:64]!r}") from None
    raise ValueError("bad timestamp")


def _loads_lenient(raw: bytes) -> object:
    """The slow path after orjson refused a line: the standard library accepts NaN and Infinity
    literals (which a device's ``json.dumps`` writes) and integers beyond 64 bits, so those can be
    counted per feature instead of as malformed. Anything it cannot parse is re-raised as ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_NUMERIC = frozenset((float, int))


class RecordDecoder:
    """Validates batches of records against a bundle's input schema."""

    def __init__(self, schema: InputSchema, stream_key: str | None = None) -> None:
        self.stream_key = stream_key  # stream models: the record field naming its stream
        self.features = schema.features
        self.names = schema.feature_names
        self.n = len(self.names)
        self.name_set = frozenset(self.names)
        getter = operator.itemgetter(*self.names)
        # itemgetter of one key returns the value itself, not a 1-tuple
        self._get = getter if self.n > 1 else (lambda d: (getter(d),))

    def decode(self, lines: Sequence[bytes | TooLong], ts_range: tuple[float, float]) -> Decoded:
        """Validate a payload's lines; timestamps outside ``ts_range`` (seconds) are rejected."""
        fast = self._decode_uniform(lines)
        if fast is not None:
            rows, raw_ts, ids, index, keys = fast
            return self._finish(rows, raw_ts, ids, index, [], ts_range, keys)
        return self._decode_each(lines, ts_range)

    def _decode_uniform(self, lines: Sequence[bytes | TooLong]):
        """The common case in one pass per step, no per-record branches: every line a flat JSON
        object with every feature a number. None if any line is otherwise (then line by line)."""
        try:
            objs = [orjson.loads(raw) for raw in lines]
            rows = [self._get(obj) for obj in objs]
            if "features" not in self.name_set and any("features" in obj for obj in objs):
                return None  # the nested forms: "features" wins over top-level keys, as line by line
            if not set(map(type, chain.from_iterable(rows))) <= _NUMERIC:
                return None
            raw_ts = [obj.get("ts") for obj in objs]
            ids = [obj.get("id") for obj in objs]
            keys = [obj.get(self.stream_key) for obj in objs] if self.stream_key else None
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return None
        return rows, raw_ts, ids, list(range(len(lines))), keys

    def _decode_each(self, lines: Sequence[bytes | TooLong], ts_range: tuple[float, float]) -> Decoded:
        loads, get, n = orjson.loads, self._get, self.n
        rows: list = []
        raw_ts: list = []
        ids: list = []
        keys: list | None = [] if self.stream_key else None
        index: list[int] = []
        rejections: list[Rejection] = []
        for i, raw in enumerate(lines):
            try:
                obj = loads(raw)
                if type(obj) is not dict:
                    raise TypeError
                inner = obj.get("features")
                if inner is None:
                    vals = get(obj)
                elif type(inner) is list and len(inner) == n:
                    vals = inner
                elif type(inner) is dict and len(inner) == n:
                    vals = get(inner)
                else:
                    raise TypeError
                if not set(map(type, vals)) <= _NUMERIC:
                    raise TypeError
            except (orjson.JSONDecodeError, TypeError, KeyError):
                got = self._explain(raw, i)
                if got is None:  # a blank line
                    continue
                if isinstance(got, Rejection):
                    rejections.append(got)
                    continue
                obj, vals = got
            rows.append(vals)
            raw_ts.append(obj.get("ts"))
            ids.append(obj.get("id"))
            if keys is not None:
                keys.append(obj.get(self.stream_key))
            index.append(i)
        return self._finish(rows, raw_ts, ids, index, rejections, ts_range, keys)

    def _finish(self, rows: list, raw_ts: list, ids: list, index: list[int], rejections: list[Rejection],
                ts_range: tuple[float, float], keys: list | None = None) -> Decoded:
        """Rows that passed the per-record checks -> the batch, less bad timestamps and values."""
        if not rows:
            return Decoded.empty(self.n, rejections)
        # float32 straight from the Python numbers: a value beyond float32's range becomes inf here
        # and is caught with NaN and inf below
        with np.errstate(over="ignore"):
            values = np.fromiter(chain.from_iterable(rows), dtype=np.float32, count=len(rows) * self.n)
        values = values.reshape(len(rows), self.n)
        ts, ts_bad = self._timestamps(raw_ts, ts_range)
        bad = ts_bad | ~np.isfinite(values).all(axis=1)
        if bad.any():
            for j in np.flatnonzero(bad):
                rejections.append(self._row_rejection(values[j], raw_ts[j], ts_range, index[j]))
            keep = ~bad
            values, ts = values[keep], ts[keep]
            index = [x for x, k in zip(index, keep) if k]
            ids = [x for x, k in zip(ids, keep) if k]
            if keys is not None:
                keys = [x for x, k in zip(keys, keep) if k]
            rejections.sort(key=lambda r: r.index)
        streams = None if keys is None else [stream_name(k) for k in keys]
        return Decoded(values, ts, np.asarray(index, dtype=np.int64), ids, rejections, streams)

    # -- the slow, explaining path ----------------------------------------------------------------

    def _explain(self, raw: bytes | TooLong, i: int) -> tuple[dict, list] | Rejection | None:
        """Why the fast path refused a line, or the line's values when it was only unusual."""
        if isinstance(raw, TooLong):
            return Rejection(Reason.TOO_LONG, f"line of {raw.size} bytes is over the limit", i)
        if not raw.strip():
            return None
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            try:
                obj = _loads_lenient(raw)
            except (ValueError, UnicodeDecodeError):
                return Rejection(Reason.MALFORMED, f"malformed JSON: {err}", i)
        if not isinstance(obj, dict):
            return Rejection(Reason.NOT_OBJECT, "not a JSON object", i)
        raw_values = obj.get("features", obj) if isinstance(obj.get("features"), (dict, list)) else obj
        if isinstance(raw_values, list):
            if len(raw_values) != self.n:
                return Rejection(
                    Reason.SHAPE, f"wrong number of features: expected {self.n}, got {len(raw_values)}", i
                )
            raw_values = dict(zip(self.names, raw_values))
        elif raw_values is not obj:
            extra = sorted(set(raw_values) - self.name_set)
            if extra:
                shown = extra[:8] + (["..."] if len(extra) > 8 else [])
                return Rejection(Reason.UNEXPECTED, f"unexpected features {shown}", i)
        values: list[float] = []
        missing: list[str] = []
        for spec in self.features:
            value = raw_values.get(spec.name)
            if value is None:
                if spec.missing == "impute" and spec.impute_value is not None:
                    values.append(spec.impute_value)
                else:
                    missing.append(spec.name)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return Rejection(Reason.NON_NUMERIC, f"non-numeric value for '{spec.name}'", i)
            try:
                value = float(value)
            except OverflowError:  # an integer beyond float range
                value = math.inf
            values.append(value)
        if missing:
            # what float32 makes of the rest, as on the fast path: past its range is non-finite
            with np.errstate(over="ignore"):
                row = np.asarray(values, dtype=np.float32)
            present = [f.name for f in self.features if f.name not in missing]
            nonfinite = [name for name, v in zip(present, row.tolist()) if not math.isfinite(v)]
            nan = tuple(name for name, v in zip(present, row.tolist()) if math.isnan(v))
            parts = [f"missing {missing}"] + ([f"non-finite {nonfinite}"] if nonfinite else [])
            return Rejection(Reason.MISSING, "; ".join(parts), i, tuple(missing), tuple(nonfinite), nan)
        # non-finite values are left to _finish, so every path judges the timestamp first, then values
        return obj, values

    def _timestamps(self, raw_ts: list, ts_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        try:  # every record has a numeric ts: no loop (an integer past float range goes the slow way)
            ts = np.array(raw_ts, dtype=np.float64) if set(map(type, raw_ts)) <= _NUMERIC else None
        except OverflowError:
            ts = None
        if ts is not None:
            with np.errstate(invalid="ignore", over="ignore"):
                ts[ts >= MS_FROM] /= 1000.0
                lo, hi = ts_range
                return ts, ~((ts >= lo) & (ts <= hi))
        ts = np.full(len(raw_ts), np.nan)
        bad = np.zeros(len(raw_ts), dtype=bool)
        parsed = np.zeros(len(raw_ts), dtype=bool)  # already in seconds: no milliseconds rule
        for j, value in enumerate(raw_ts):
            t = type(value)
            if (t is int or t is float) and abs(value) < MAX_TS * 1000:  # NaN fails this too
                ts[j] = value
            elif value is not None:
                parsed[j] = True
                try:
                    ts[j] = parse_timestamp(value)
                except ValueError:
                    bad[j] = True
        with np.errstate(invalid="ignore"):
            ms = (ts >= MS_FROM) & ~parsed
            ts[ms] /= 1000.0
            lo, hi = ts_range
            bad |= (ts < lo) | (ts > hi) | np.isinf(ts)
        return ts, bad

    def _row_rejection(self, row: np.ndarray, raw_ts: object, ts_range: tuple[float, float], i: int) -> Rejection:
        if raw_ts is not None:
            try:
                ts = parse_timestamp(raw_ts)
            except ValueError as err:
                return Rejection(Reason.BAD_TIMESTAMP, str(err), i)
            lo, hi = ts_range
            if not lo <= ts <= hi:
                return Rejection(
                    Reason.TIMESTAMP_RANGE,
                    f"timestamp {raw_ts!r} is outside the plausible range {_iso(lo)} .. {_iso(hi)} "
                    "(window.max_past_s / window.max_future_s around the device clock)",
                    i,
                )
        nonfinite = tuple(name for name, v in zip(self.names, row.tolist()) if not abs(v) <= FLOAT32_MAX)
        nan = tuple(name for name, v in zip(self.names, row.tolist()) if v != v)
        return Rejection(Reason.NON_FINITE, f"non-finite {list(nonfinite)}", i, (), nonfinite, nan)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
