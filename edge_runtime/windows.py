"""Windows: which window each record counts in, and when a window is due to ship.

Windows are aligned to multiples of ``seconds`` in UTC and keyed by event time (a record's
``ts``). One window is open at a time: a record for a later window closes it, a record for an
earlier one is counted in it as ``late``. A record without ``ts`` takes the last ts the stream
carried, moved on by the wall-clock time since (a replay must not jump to "now"), or the wall
clock if the stream never carried one.

A device that goes quiet must still ship its window, so the stream's clock keeps running on the
wall clock between records: the watermark is the latest event time seen plus the wall-clock time
since it arrived. The open window is due once the watermark passes its end plus ``lateness_s``.
For a live stream that is the window's end plus the lateness in wall-clock time; for a replay of
old data it is the same amount of quiet after the last record, never "immediately".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .contracts import SpoolDrops, WindowHealth, WindowSummary
from .digest import hexdigest
from .summary import MatrixAccumulator


@dataclass
class Window:
    """The open window of one model version: its accumulators and counts."""

    start: float
    end: float
    model_name: str
    model_version: str
    feature_names: list[str]
    features: MatrixAccumulator
    score: MatrixAccumulator
    records: int = 0
    rejected: int = 0
    late: int = 0
    outliers: int = 0
    dropped: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    samples: list[bytes] = field(default_factory=list)
    part: int = 0
    digest: int = 0  # sum of the counted records' hashes (``digest``), to recognise a replay
    changed: bool = False  # since the last checkpoint
    grid: str | None = None  # the review grids the accumulators count on (``summary.grid_id``), if any

    def summary(self, device_id: str, health: WindowHealth | None, instance_id: str | None = None,
                spool_dropped: SpoolDrops | None = None) -> WindowSummary:
        return WindowSummary(
            model_name=self.model_name,
            model_version=self.model_version,
            device_id=device_id,
            instance_id=instance_id,
            part=self.part,
            records_digest=hexdigest(self.digest),
            spool_dropped=spool_dropped,
            window_start=datetime.fromtimestamp(self.start, tz=timezone.utc),
            window_end=datetime.fromtimestamp(self.end, tz=timezone.utc),
            records=self.records,
            rejected=self.rejected,
            late=self.late,
            outliers=self.outliers,
            rejected_by_reason=dict(sorted(self.rejected_by_reason.items())),
            dropped=self.dropped,
            health=health,
            features=dict(zip(self.feature_names, self.features.summaries())),
            score=self.score.summaries()[0],
            grid=self.grid if self.features.grid_le is not None else None,
        )


def window_start(ts: float, seconds: int) -> float:
    return math.floor(ts / seconds) * seconds


def fill_missing_ts(ts: np.ndarray, before: float) -> np.ndarray:
    """NaN timestamps take the previous record's, the first ones ``before``."""
    missing = np.isnan(ts)
    if not missing.any():
        return ts
    idx = np.where(missing, -1, np.arange(len(ts)))
    np.maximum.accumulate(idx, out=idx)
    filled = np.where(idx >= 0, ts[np.maximum(idx, 0)], before)
    return filled


@dataclass
class Segment:
    start: float  # the window these rows count in
    lo: int
    hi: int
    late: int  # rows in [lo, hi) whose own window is earlier


def segments(ts: np.ndarray, open_start: float | None, seconds: int) -> list[Segment]:
    """Split a batch, in arrival order, into runs that count in the same window.

    A row for a later window than the one open moves the window on; a row for an earlier one
    stays in the open window as late.
    """
    if not len(ts):
        return []
    starts = np.floor(ts / seconds) * seconds
    current = -np.inf if open_start is None else open_start
    running = np.maximum.accumulate(np.maximum(starts, current))
    late = starts < running
    cuts = np.flatnonzero(np.diff(running)) + 1
    bounds = [0, *cuts.tolist(), len(ts)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out.append(Segment(float(running[lo]), lo, hi, int(late[lo:hi].sum())))
    return out


class StreamClock:
    """The watermark: event time, advancing with the wall clock while the stream is quiet."""

    def __init__(self) -> None:
        self.event_ts: float | None = None  # the latest event time seen (records' own or filled in)
        self.at: float = 0.0  # monotonic time when it was seen
        self.own_ts: float | None = None  # the last timestamp a record carried itself
        self.own_at: float = 0.0

    def observe(self, ts: np.ndarray, now: float) -> None:
        if len(ts):
            latest = float(ts.max())
            if self.event_ts is None or latest >= self.event_ts:
                self.event_ts, self.at = latest, now

    def note_own(self, ts: np.ndarray, now: float) -> None:
        """Remember the last timestamp records carried (``ts`` before filling: NaN where none)."""
        own = ts[~np.isnan(ts)]
        if len(own):
            self.own_ts, self.own_at = float(own[-1]), now

    def for_missing(self, now: float, wall: float) -> float:
        """The time of a record without ``ts``: the last one a record carried, moved on by the
        wall-clock time since (a replay keeps its own time; a live stream that stopped stamping
        keeps moving), or the wall clock for a stream that never stamped."""
        return wall if self.own_ts is None else self.own_ts + (now - self.own_at)

    def watermark(self, now: float) -> float | None:
        return None if self.event_ts is None else self.event_ts + (now - self.at)
