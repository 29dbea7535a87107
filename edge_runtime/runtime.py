"""The device runtime: records in; events, dead letters and window summaries out.

This module wires the stages together and holds no transport code of its own: records arrive as
an iterable of lines, events go to a sink, summaries go to an outbox that forwards them to
whatever object store the config names.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle
from .contracts import RuntimeConfig, WindowSummary, outlier_key, summary_key
from .outbox import Outbox
from .records import Record, RecordParser, Rejection
from .scoring import Scorer, ScoringError
from .sinks import JsonlSink
from .store import ObjectStore, open_store
from .summary import SeriesAccumulator

log = logging.getLogger(__name__)

SYNC_BACKOFF_START_S = 5.0
SYNC_BACKOFF_MAX_S = 300.0


@dataclass
class RunStats:
    provider: str = ""
    lines: int = 0
    scored: int = 0
    rejected: int = 0
    outliers: int = 0
    windows: int = 0
    sent: int = 0
    pending: int = 0


@dataclass
class Window:
    start: datetime
    end: datetime
    features: list[SeriesAccumulator]
    score: SeriesAccumulator
    records: int = 0
    rejected: int = 0
    late: int = 0
    outliers: int = 0
    samples: list[dict] = field(default_factory=list)


class EdgeRuntime:
    """One model on one device. Use as a context manager, feed it lines, let it close."""

    def __init__(
        self,
        config: RuntimeConfig,
        store: ObjectStore | None = None,
        clock: Callable[[], float] = time.time,
        bundle: Bundle | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle or load_bundle(config.bundle)
        self.manifest = self.bundle.manifest
        self.parser = RecordParser(self.manifest.input)
        self.scorer = Scorer(str(self.bundle.model_path), self.manifest, config.scoring.providers)
        self.threshold = self.manifest.outlier.threshold
        self.store = store or open_store(config.store.url, config.store.endpoint_url)
        self.outbox = Outbox(config.sinks.outbox)
        self.events = JsonlSink(config.sinks.events)
        self.dead_letter = JsonlSink(config.sinks.dead_letter)
        self.clock = clock
        self.window: Window | None = None
        self.pending: list[Record] = []
        self.stats = RunStats(provider=self.scorer.provider)
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_event_ts: float | None = None
        self._orphans: list[Rejection] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Score what is pending, close the open window and try one last sync."""
        self._close_window()
        self.sync(force=True)
        self.events.close()
        self.dead_letter.close()

    def sync(self, force: bool = False) -> None:
        """Forward the outbox; after a failure, wait (doubling, up to 5 min) before the next try,
        so an unreachable store never stalls scoring at every window close."""
        now = time.monotonic()
        if not force and now < self._retry_at:
            self.stats.pending = len(self.outbox.pending())
            return
        result = self.outbox.flush(self.store)
        self.stats.sent += result.sent
        self.stats.pending = result.pending
        if result.failed:
            self._backoff = min(self._backoff * 2 if self._backoff else SYNC_BACKOFF_START_S, SYNC_BACKOFF_MAX_S)
            self._retry_at = now + self._backoff
        else:
            self._backoff, self._retry_at = 0.0, 0.0

    # -- the data path --------------------------------------------------------------------------

    def process(self, lines: Iterable[str]) -> RunStats:
        for line in lines:
            self.stats.lines += 1
            if line.strip():
                self.feed(line, self.stats.lines)
        self._score_pending()
        return self.stats

    def feed(self, line: str, line_no: int) -> None:
        item = self.parser.parse(line, line_no)
        if isinstance(item, Rejection):
            # a rejected record's timestamp is not trusted: it never opens or closes a window
            self._reject(item, self.window)
            return
        if item.ts is not None:
            self._last_event_ts = item.ts
        # without a ts: the stream's own time if it has one (a replay must not jump to "now")
        ts = item.ts if item.ts is not None else self._last_event_ts
        self._window_for(ts if ts is not None else self.clock())
        self.pending.append(item)
        if len(self.pending) >= self.config.scoring.batch_size:
            self._score_pending()

    def _window_for(self, ts: float) -> Window:
        seconds = self.config.window.seconds
        start_ts = math.floor(ts / seconds) * seconds
        if self.window is not None:
            current = self.window.start.timestamp()
            if start_ts > current:
                self._close_window()
            elif start_ts < current:
                self.window.late += 1
                return self.window
            else:
                return self.window
        start = datetime.fromtimestamp(start_ts, tz=timezone.utc)
        baseline = self.bundle.baseline
        self.window = Window(
            start=start,
            end=start + timedelta(seconds=seconds),
            features=[
                SeriesAccumulator(baseline.features[name].hist_edges)
                for name in self.manifest.input.feature_names
            ],
            score=SeriesAccumulator(baseline.score.hist_edges),
        )
        for rejection in self._orphans:  # rejected before any window was open
            self._count_rejection(rejection, self.window)
        self._orphans.clear()
        return self.window

    def _reject(self, rejection: Rejection, window: Window | None) -> None:
        self.stats.rejected += 1
        self.dead_letter.write(
            {"reason": rejection.reason, "line_no": rejection.line_no, "line": rejection.line.rstrip("\n")}
        )
        if window is None:
            self._orphans.append(Rejection(rejection.reason, "", 0, None, rejection.missing, rejection.nonfinite))
            return
        self._count_rejection(rejection, window)

    def _count_rejection(self, rejection: Rejection, window: Window) -> None:
        window.rejected += 1
        names = self.manifest.input.feature_names
        for name in rejection.missing:
            window.features[names.index(name)].add_missing()
        for name in rejection.nonfinite:
            window.features[names.index(name)].add_nonfinite()

    def _score_pending(self) -> None:
        if not self.pending or self.window is None:
            return
        batch, self.pending = self.pending, []
        matrix = np.stack([r.values for r in batch])
        try:
            scores = self.scorer.score(matrix)
        except ScoringError as err:
            log.error("scoring failed for %d records: %s", len(batch), err)
            for r in batch:
                self._reject(Rejection(f"scoring failed: {err}", r.line, r.line_no, r.ts), self.window)
            return
        finite = np.isfinite(scores)
        if not finite.all():
            for r in (r for r, ok in zip(batch, finite) if not ok):
                self._reject(Rejection("model gave a non-finite score", r.line, r.line_no, r.ts), self.window)
            batch = [r for r, ok in zip(batch, finite) if ok]
            matrix, scores = matrix[finite], scores[finite]
        window = self.window
        for j, acc in enumerate(window.features):
            acc.update(matrix[:, j])
        window.score.update(scores)
        window.records += len(batch)
        self.stats.scored += len(batch)
        for i in np.flatnonzero(scores > self.threshold):
            self._emit_outlier(batch[i], float(scores[i]), window)

    def _emit_outlier(self, record: Record, score: float, window: Window) -> None:
        window.outliers += 1
        self.stats.outliers += 1
        names = self.manifest.input.feature_names
        event = {
            "device_id": self.config.device_id,
            "model": self.manifest.name,
            "version": self.manifest.version,
            "ts": record.ts,
            "id": record.record_id,
            "line_no": record.line_no,
            "score": score,
            "threshold": self.threshold,
            "features": dict(zip(names, record.values.astype(float).tolist())),
        }
        self.events.write(event)
        if len(window.samples) < self.config.sinks.max_outlier_samples:
            window.samples.append(event)

    def _close_window(self) -> None:
        self._score_pending()
        window, self.window = self.window, None
        if window is None:
            return
        m = self.manifest
        summary = WindowSummary(
            model_name=m.name,
            model_version=m.version,
            device_id=self.config.device_id,
            window_start=window.start,
            window_end=window.end,
            records=window.records,
            rejected=window.rejected,
            late=window.late,
            outliers=window.outliers,
            features={n: acc.summary() for n, acc in zip(m.input.feature_names, window.features)},
            score=window.score.summary(),
        )
        device = self.config.device_id
        # a restart inside a window writes a second part rather than overwrite the first
        part = self.outbox.next_part(summary_key(m.name, m.version, device, window.start))
        self.outbox.put(summary_key(m.name, m.version, device, window.start, part), summary.model_dump_json().encode())
        if window.samples:
            body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in window.samples)
            self.outbox.put(outlier_key(m.name, m.version, device, window.start, part), body.encode())
        self.stats.windows += 1
        self.sync()


def run_file(config: RuntimeConfig, path: str | Path | None = None, **kwargs) -> RunStats:
    """Run the runtime over a JSON-lines file (or stdin for '-') to its end."""
    import sys

    source = str(path if path is not None else config.source.path)
    with EdgeRuntime(config, **kwargs) as runtime:
        if source == "-":
            runtime.process(sys.stdin)
        else:
            with open(source, encoding="utf-8", errors="replace") as fh:
                runtime.process(fh)
    return runtime.stats
