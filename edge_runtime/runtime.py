"""The engine: payloads in; events, dead letters and window summaries out.

Single-threaded and transport-free: the service (``service.py``) feeds it batches from its
sources and calls ``tick`` between them; tests and replays can drive it directly with
``process``. Per batch: decode (columnar), score (one ONNX Runtime call per batch), judge
(threshold), assign windows (event time), update the window summaries (vectorised), write events.
A closed window's summary goes to the local spool; the uploader forwards it on its own thread,
so nothing here waits on the network. The open window is checkpointed to the spool every
``window.checkpoint_s``, so a kill loses at most that much.
"""

from __future__ import annotations

import gzip
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson

from .contracts import MAX_WINDOW_SECONDS, RuntimeConfig, WindowSummary, outlier_key, summary_key
from .digest import bytes_digest, rows_digest
from .frames import FrameError, decode_frame
from .health import Health
from .model import Model, load_model
from .presence import Presence
from .records import MAX_TS, Decoded, Reason, Rejection, TooLong
from .scoring import ScoringError
from .sinks import JsonlSink
from .sources import Payload
from .spool import TEMP_PREFIX, Spool, atomic_write
from .store import ObjectStore, store_for
from .streams import DEFAULT_STREAM, StreamWindows
from .summary import MatrixAccumulator
from .summary_format import encode
from .uploader import Uploader
from .windows import StreamClock, Window, fill_missing_ts, segments, window_start

log = logging.getLogger(__name__)

STREAMS_FILE = ".streams/windows.npz"  # a stream model's windows, beside the spool (which skips dot folders)

TS_CEILING = MAX_TS - 2 * MAX_WINDOW_SECONDS  # a window end computed from any accepted ts fits a datetime
DEAD_LETTER_LINE_MAX = 64 * 1024  # bytes of a rejected line kept in its dead letter
RECENT_PARTS = 1024  # windows whose next part number is remembered
SPOOL_CHORES_S = 5.0  # how often the spool drops what is too old and retries writes a full disk refused


@dataclass
class RunStats:
    provider: str = ""
    model_version: str = ""
    lines: int = 0
    scored: int = 0
    rejected: int = 0
    outliers: int = 0
    dropped: int = 0
    windows: int = 0
    swaps: int = 0
    sent: int = 0
    pending: int = 0


class RejectTally:
    """Rejections not yet counted in a window (none was open): counters only, so bounded."""

    def __init__(self) -> None:
        self.reasons: Counter = Counter()
        self.missing: Counter = Counter()
        self.nonfinite: Counter = Counter()
        self.nan: Counter = Counter()
        self.digest = 0
        self.since: float | None = None

    def add(self, r: Rejection, origin: _Origin, now: float) -> None:
        self.reasons[r.code] += 1
        self.missing.update(r.missing)
        self.nonfinite.update(r.nonfinite)
        self.nan.update(r.nan)
        self.digest += rejection_digest(origin)
        if self.since is None:
            self.since = now

    def __bool__(self) -> bool:
        return bool(self.reasons)

    def apply(self, window: Window) -> None:
        for code, n in self.reasons.items():
            window.rejected += n
            window.rejected_by_reason[code] += n
        window.digest += self.digest
        window.changed = True
        features, names = window.features, window.feature_names
        for name, n in self.missing.items():
            if name in names:
                features.add_missing(names.index(name), n)
        for name, n in self.nonfinite.items():
            if name in names:
                nan = min(self.nan[name], n)
                features.add_nonfinite(names.index(name), nan, nan=True)
                features.add_nonfinite(names.index(name), n - nan)
        self.__init__()


def rejection_digest(origin: _Origin) -> int:
    """A rejected record's part of the window digest: its raw bytes (and where in a frame it was)."""
    p = origin.payload
    item = p.items[origin.index] if p.kind == "jsonl" and origin.index < len(p.items) else None
    if isinstance(item, TooLong):
        return bytes_digest(b"%d:" % item.size + item.head)
    if item is not None:
        return bytes_digest(bytes(item))
    head = p.items[0][:4096] if p.items else b""
    return bytes_digest(b"%d:" % origin.index + bytes(head))


def _text(value: object) -> str | None:
    """A record's id as text that is valid UTF-8 whatever came in (a lone surrogate from a JSON
    escape that the lenient parser let through, a number, an object)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _Origin:
    """Where a decoded row came from, for its event or dead letter."""

    payload: Payload
    index: int


@dataclass
class _Rows:
    """Where each decoded row of a batch came from, as arrays: no Python object per row."""

    payloads: list[Payload]
    src: np.ndarray  # index into payloads
    item: np.ndarray  # index within that payload

    def __getitem__(self, i: int) -> _Origin:
        return _Origin(self.payloads[self.src[i]], int(self.item[i]))

    def keep(self, mask: np.ndarray) -> _Rows:
        return _Rows(self.payloads, self.src[mask], self.item[mask])


class EdgeRuntime:
    """One model at a time on one device. Feed it payloads (or lines), tick it, close it."""

    def __init__(
        self,
        config: RuntimeConfig,
        store: ObjectStore | None = None,
        clock: Callable[[], float] = time.time,
        model: Model | None = None,
        health: Health | None = None,
    ) -> None:
        self.config = config
        self.model = model or load_model(config.bundle, config.scoring, max_batch=config.batch.max_records)
        self.clock = clock
        self.health = health or Health()
        self.instance_id = secrets.token_hex(6)  # this run's name in every key it writes
        self.store = store or store_for(config.store)
        self.spool = Spool(config.sinks.outbox, config.spool).open()
        self.health.spool = self.spool
        presence = (Presence(self.store, config.device_id, self.instance_id, config.store.presence_s)
                    if config.store.presence_s else None)
        self.uploader = Uploader(self.spool, self.store, self.health, presence, config.store.retry_max_s,
                                 config.store.upload_cpu_share)
        try:
            self.events = JsonlSink(config.sinks.events)
            self.dead_letter = JsonlSink(config.sinks.dead_letter)
        except BaseException:
            self.spool.close()
            raise
        self.health.lines_lost = lambda: self.events.lost + self.dead_letter.lost
        # adapters that also want each outlier event (an MQTT publisher): (line, event, sample key or None)
        self.event_hooks: list[Callable[[bytes, dict, str | None], None]] = []
        self._parts: OrderedDict[tuple[str, float], int] = OrderedDict()
        self._forgotten_before: float | None = None  # the latest window start no longer in _parts
        self._checkpoint_at = time.monotonic()
        self._chores_at = time.monotonic()
        self.window: Window | None = None
        self.stream = StreamClock()
        self.orphans = RejectTally()
        self._line_no = 0
        self._dropped_seen = 0
        self._stats = RunStats()
        self._note_model()
        self._restore_streams()

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, upload_timeout: float = 30.0) -> RunStats:
        """Ship the open window (as a part if the window goes on after a restart), count any
        rejections still outside a window, hand everything to the outbox and try one last upload."""
        if self.orphans:
            self._open(window_start(self._orphan_ts(), self.config.window.seconds))
        self._close_window()
        self._save_streams()
        self.uploader.stop(upload_timeout)
        self.events.close()
        self.dead_letter.close()
        self.spool.close()
        return self.stats

    @property
    def stats(self) -> RunStats:
        """The run's figures: one object, brought up to date at every read and at ``close``."""
        h, st = self.health, self._stats
        st.provider, st.model_version = self.model.scorer.provider, self.model.version
        st.lines, st.scored, st.rejected = h.records_in, h.scored, sum(h.rejected.values())
        st.outliers, st.dropped, st.windows, st.swaps = h.outliers, h.dropped(), h.windows, h.swaps
        st.sent, st.pending = self.uploader.sent, self.uploader.pending
        return st

    def swap(self, model: Model) -> None:
        """Serve ``model`` from the next batch on. The old version's open window closes as a part,
        so every summary names the one version that scored its records."""
        old = self.model
        self._close_window()
        if model.streams is not None and old.streams is not None:
            model.streams.adopt(old.streams)  # the streams' recent values outlive the model version
        self.model = model
        self.health.swaps += 1
        self._note_model()
        self._event({"kind": "model_swapped", "from": old.version, "to": model.version,
                     "bundle": str(model.bundle.root)})
        self.events.flush()
        log.info("model swapped: %s -> %s", old.describe(), model.describe())

    def threshold(self, model: Model) -> float:
        """The configured override (``scoring.threshold``), else the bundle's calibrated threshold."""
        override = self.config.scoring.threshold
        return model.threshold if override is None else override

    def set_window(self, window) -> None:
        """New window settings (a live reconfiguration): the open window closes as it is, the next
        one follows the new settings."""
        self._close_window()
        self.config.window = window

    def _note_model(self) -> None:
        self.health.provider = self.model.scorer.provider
        self.health.model_name, self.health.model_version = self.model.name, self.model.version

    # -- the data path --------------------------------------------------------------------------

    def process(self, lines: Iterable[str | bytes]) -> RunStats:
        """Feed lines in batches of ``batch.max_records`` (for replays and tests)."""
        size = self.config.batch.max_records
        chunk: list[bytes] = []
        for line in lines:
            chunk.append(line.encode() if isinstance(line, str) else line)
            if len(chunk) >= size:
                self._feed_chunk(chunk)
                chunk = []
        if chunk:
            self._feed_chunk(chunk)
        return self.stats

    def _feed_chunk(self, chunk: list[bytes]) -> None:
        payload = Payload("jsonl", [line.rstrip(b"\r\n") for line in chunk], "lines", self._line_no + 1)
        self._line_no += len(chunk)
        self.handle([payload])

    def ts_range(self) -> tuple[float, float]:
        now, w = self.clock(), self.config.window
        lo = 0.0 if w.max_past_s is None else max(now - w.max_past_s, 0.0)
        return lo, min(now + w.max_future_s, TS_CEILING)

    def handle(self, payloads: list[Payload]) -> None:
        """Decode, score, judge, window and summarise one batch of payloads."""
        model, now = self.model, time.monotonic()
        decoded, origins = self._decode(payloads, model)
        values = np.concatenate([d.values for d in decoded]) if decoded else np.empty((0, 0), np.float32)
        ts = np.concatenate([d.ts for d in decoded]) if decoded else np.empty(0)
        ids = [i for d in decoded for i in d.ids]
        rejections = [(r, _Origin(p, r.index)) for d, p in zip(decoded, payloads) for r in d.rejections]
        rows = _Rows(payloads, np.concatenate(origins) if origins else np.empty(0, np.int64),
                     np.concatenate([d.index for d in decoded]) if decoded else np.empty(0, np.int64))
        streams = None  # stream models: each row's stream, and whether it is still warming up
        if len(values):
            inputs = values if model.streams is None else _WindowRows(model.streams, values[:, 0], _streams(decoded))
            scores, failed = self._score(inputs, rows, model)
            if model.streams is not None:
                spec = model.streams.spec
                streams = _StreamRows(inputs.names, inputs.seen < min(spec.warmup, spec.window - 1))
            if failed is not None:
                rejections += failed[1]
                keep = failed[0]
                values, ts, scores = values[keep], ts[keep], scores[keep]
                ids = [x for x, k in zip(ids, keep) if k]
                rows = rows.keep(keep)
                streams = streams.keep(keep) if streams is not None else None
        else:
            scores = np.empty(0)
        self._dead_letter(rejections)
        own_ts = ts  # as the records carried it (NaN where they did not): what the digest hashes
        ts = fill_missing_ts(ts, self.stream.for_missing(now, self.clock()))
        if self.window is not None:
            self._count_rejections(rejections, self.window)
            rejections = []
        for seg in segments(ts, self.window.start if self.window else None, self.config.window.seconds):
            if self.window is None or seg.start != self.window.start:
                self._close_window()
                self._open(seg.start)
            if rejections:
                self._count_rejections(rejections, self.window)
                rejections = []
            self._account(self.window, seg.lo, seg.hi, seg.late, values, ts, own_ts, scores, ids, rows, model,
                          streams)
        for r, origin in rejections:  # no window open and none opened by this batch
            self.orphans.add(r, origin, now)
        self.stream.observe(ts, now)
        self.stream.note_own(own_ts, now)
        self.events.flush()
        self.dead_letter.flush()
        done = time.monotonic()
        for p in payloads:
            self.health.arrival_ms.append((done - p.arrived) * 1000.0)
            if p.ack is not None:
                p.ack()

    def fail(self, payloads: list[Payload], err: BaseException) -> None:
        """The last line of defence: a batch that broke the engine (a bug) is dead-lettered whole
        and counted, and serving goes on. Records of it already counted before the failure may
        then be counted twice; that is logged with the error."""
        log.exception("engine failed on a batch of %d records; dead-lettered, serving goes on",
                      sum(p.n for p in payloads))
        reason = f"internal error: {type(err).__name__}: {err}"
        rejections = [(Rejection(Reason.INTERNAL, reason, i), _Origin(p, i))
                      for p in payloads for i in range(len(p.items) if p.kind == "jsonl" else p.n)]
        self.health.records_in += len(rejections)
        try:
            self._dead_letter(rejections)
            self.dead_letter.flush()
        except Exception:
            log.exception("could not dead-letter the failed batch")
        if self.window is not None:
            self._count_rejections(rejections, self.window)
        else:
            for r, origin in rejections:
                self.orphans.add(r, origin, time.monotonic())
        for p in payloads:
            if p.ack is not None:
                p.ack()

    def tick(self) -> None:
        """Between batches: ship the open window once the stream's clock has passed its end plus
        the lateness allowance; give rejections that found no window one of their own."""
        now = time.monotonic()
        w = self.config.window
        if self.window is not None:
            mark = self.stream.watermark(now)
            if mark is not None and mark >= self.window.end + w.lateness_s:
                self._close_window()
        elif self.orphans and now - self.orphans.since >= w.lateness_s + 1.0:
            self._open(window_start(self._orphan_ts(), w.seconds))
            self.stream.observe(np.array([self._orphan_ts()]), now)
        if (w.checkpoint_s and self.window is not None and self.window.changed
                and now - self._checkpoint_at >= w.checkpoint_s):
            self.checkpoint()
        if now - self._chores_at >= SPOOL_CHORES_S:
            self._chores_at = now
            self.spool.expire()
            if self.spool.disk_full:
                self.spool.retry_memory()
                if not self.spool.disk_full:
                    self.uploader.notify()

    def checkpoint(self) -> None:
        """Write the open window's state so far to the spool (replacing the last checkpoint): after
        a kill, the next start ships it as a part of its window."""
        self._checkpoint_at = time.monotonic()
        window = self.window
        if window is None:
            return
        summary = self._summary(window, spool_dropped=None)
        if self.spool.checkpoint(self._checkpoint_name(window), encode(summary), self._samples(window)):
            window.changed = False
        self._save_streams()

    def _streams_file(self) -> Path:
        return Path(self.config.sinks.outbox) / STREAMS_FILE

    def _save_streams(self) -> None:
        """A stream model's windows, beside the spool (the spool's lock makes them this runtime's)."""
        if self.model.streams is None:
            return
        path = self._streams_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, self.model.streams.dump())
        except OSError as err:  # a full disk: the windows are kept in memory, saved at the next chance
            log.warning("stream windows not saved to %s: %s", path, err.strerror or err)

    def _restore_streams(self) -> None:
        path = self._streams_file()
        for stale in path.parent.glob(f"{TEMP_PREFIX}*") if path.parent.is_dir() else ():
            stale.unlink(missing_ok=True)  # a save a kill cut short
        if self.model.streams is None or not path.is_file():
            return
        try:
            restored = self.model.streams.restore(path.read_bytes())
        except (OSError, ValueError) as err:
            log.warning("stream windows in %s not restored (%s): every stream warms up again", path, err)
            return
        log.info("stream windows restored: %d streams from %s", restored, path)

    def _checkpoint_name(self, window: Window) -> str:
        """One checkpoint per window part: a part that closed into memory (disk full) keeps its own
        until it is on disk or sent, whatever the next window checkpoints."""
        return f"{self.instance_id}-{window.start:.0f}-p{window.part}"

    def _orphan_ts(self) -> float:
        return self.stream.event_ts if self.stream.event_ts is not None else self.clock()

    # -- stages ---------------------------------------------------------------------------------

    def _decode(self, payloads: list[Payload], model: Model) -> tuple[list[Decoded], list]:
        ts_range = self.ts_range()
        decoded, origins = [], []
        for p in payloads:
            if p.decoded is not None and p.schema_key == model.schema_key:
                d = p.decoded  # parsed ahead by a worker process for this very schema
            elif p.kind == "jsonl":
                d = model.decoder.decode(p.items, ts_range)
            elif p.kind == "frame":
                try:
                    d = decode_frame(p.items[0], model.feature_names, ts_range)
                except FrameError as err:
                    d = Decoded.empty(len(model.feature_names), [Rejection(Reason.BAD_FRAME, str(err), 0)])
            else:
                d = Decoded.empty(len(model.feature_names), [Rejection(Reason.BAD_FRAME, p.note, 0)])
            self.health.records_in += len(d.index) + len(d.rejections)
            decoded.append(d)
            origins.append(np.full(len(d.index), len(origins), dtype=np.int64))
        return decoded, origins

    def _score(self, values: np.ndarray, rows: _Rows, model: Model):
        """Scores for every row; rows that could not be scored come back as rejections."""
        size = max(self.config.batch.max_records, 1)
        scores = np.empty(len(values))
        ok = np.ones(len(values), dtype=bool)
        failed: list[tuple[Rejection, _Origin]] = []
        for lo in range(0, len(values), size):
            part = values[lo:lo + size]
            try:
                scores[lo:lo + len(part)] = model.scorer.score(part)
            except ScoringError as err:
                log.error("scoring failed for %d records: %s", len(part), err)
                ok[lo:lo + len(part)] = False
                failed += [(Rejection(Reason.SCORING, f"scoring failed: {err}", rows[i].index), rows[i])
                           for i in range(lo, lo + len(part))]
                continue
            self.health.batch(len(part), model.scorer.last_seconds)
        bad = ok & ~np.isfinite(scores)
        for i in np.flatnonzero(bad):
            failed.append((Rejection(Reason.BAD_SCORE, "model gave a non-finite score", rows[i].index), rows[i]))
        ok &= ~bad
        return scores, ((ok, failed) if failed else None)

    def _account(self, window: Window, lo: int, hi: int, late: int, values, ts, own_ts, scores, ids, rows,
                 model, streams: _StreamRows | None = None) -> None:
        n = hi - lo
        if n <= 0:
            return
        window.features.update(values[lo:hi])
        window.score.update(scores[lo:hi, None])
        window.digest += rows_digest(values[lo:hi], own_ts[lo:hi])
        window.records += n
        window.late += late
        window.changed = True
        self.health.scored += n
        above = scores[lo:hi] > self.threshold(model)
        if streams is not None:  # a stream still warming up is scored, never flagged
            above &= ~streams.young[lo:hi]
        flagged = np.flatnonzero(above) + lo
        if len(flagged):
            window.outliers += len(flagged)
            self.health.outliers += len(flagged)
            self._outlier_events(window, flagged, values, ts, scores, ids, rows, model, streams)

    def _outlier_events(self, window, flagged, values, ts, scores, ids, rows, model, streams=None) -> None:
        names = model.feature_names
        cap = self.config.sinks.max_outlier_samples
        for i in flagged:
            origin = rows[i]
            event = {
                "kind": "outlier",
                "device_id": self.config.device_id,
                "model": model.name,
                "version": model.version,
                "ts": float(ts[i]),
                "id": _text(ids[i]),
                "source": origin.payload.source,
                **self._position(origin),
                **({"stream": streams.names[i]} if streams is not None else {}),
                "score": float(scores[i]),
                "threshold": self.threshold(model),
                "features": dict(zip(names, values[i].tolist())),
            }
            line = self._event(event)
            sampled = len(window.samples) < cap
            if sampled:
                window.samples.append(line)
            if self.event_hooks:
                key = self._sample_key(window) if sampled else None
                for hook in self.event_hooks:
                    hook(line, event, key)

    def _sample_key(self, window: Window) -> str:
        start = datetime.fromtimestamp(window.start, tz=timezone.utc)
        return outlier_key(window.model_name, window.model_version, self.config.device_id, start, window.part,
                           self.instance_id)

    @staticmethod
    def _position(origin: _Origin) -> dict:
        p = origin.payload
        if p.kind == "frame":
            return {"frame_no": p.first_no, "row": origin.index}
        return {"line_no": p.first_no + origin.index}

    def _event(self, event: dict) -> bytes:
        line = orjson.dumps(event, option=orjson.OPT_SERIALIZE_NUMPY)
        self.events.write_raw(line)
        return line

    def _dead_letter(self, rejections: list[tuple[Rejection, _Origin]]) -> None:
        for r, origin in rejections:
            p = origin.payload
            item = p.items[origin.index] if p.kind == "jsonl" and origin.index < len(p.items) else None
            if isinstance(item, TooLong):
                line, size = item.head, item.size
            elif item is not None:
                line, size = item, len(item)
            else:
                line, size = (p.items[0] if p.kind == "error" else b""), None
            entry = {"code": r.code, "reason": r.reason, "source": p.source, **self._position(origin),
                     "line": line[:DEAD_LETTER_LINE_MAX].decode("utf-8", "replace")}
            if size is not None and size > DEAD_LETTER_LINE_MAX or isinstance(item, TooLong):
                entry["truncated_from"] = size
            self.dead_letter.write_raw(orjson.dumps(entry))
            self.health.rejected[r.code] += 1

    def _count_rejections(self, rejections: list[tuple[Rejection, _Origin]], window: Window) -> None:
        names = window.feature_names
        for r, origin in rejections:
            window.rejected += 1
            window.rejected_by_reason[r.code] += 1
            window.digest += rejection_digest(origin)
            window.changed = True
            for name in r.missing:
                window.features.add_missing(names.index(name))
            for name in r.nonfinite:
                window.features.add_nonfinite(names.index(name), nan=name in r.nan)

    # -- windows --------------------------------------------------------------------------------

    def _open(self, start: float) -> Window:
        m, k = self.model, self.config.window.kll_k
        self.window = Window(
            start=start, end=start + self.config.window.seconds, model_name=m.name, model_version=m.version,
            feature_names=m.feature_names, features=MatrixAccumulator(m.feature_edges, k, m.feature_grids),
            score=MatrixAccumulator([m.score_edges], k, [m.score_grid]), part=self._next_part(m.version, start),
            grid=m.grid_id,
        )
        self._checkpoint_at = time.monotonic()
        if self.orphans:
            self.orphans.apply(self.window)
        self._dropped_seen = self._note_drops(self.window)
        return self.window

    def _note_drops(self, window: Window) -> int:
        dropped = self.health.dropped()
        window.dropped += dropped - self._dropped_seen
        return dropped

    def _next_part(self, version: str, start: float) -> int:
        """0 the first time this run opens a window, then 1, 2, ... (a swap back, a late record
        reopening it): each part its own key. A window forgotten (long ago) gets a clock-based
        part number, which cannot collide with small ones."""
        key = (version, start)
        if key in self._parts:
            part = self._parts.pop(key) + 1
        elif self._forgotten_before is not None and start <= self._forgotten_before:
            part = time.time_ns() // 1_000_000
        else:
            part = 0
        self._parts[key] = part
        while len(self._parts) > RECENT_PARTS:
            (_, forgotten), _ = self._parts.popitem(last=False)
            self._forgotten_before = max(self._forgotten_before or forgotten, forgotten)
        return part

    def _summary(self, window: Window, spool_dropped) -> WindowSummary:
        return window.summary(self.config.device_id, self.health.window_header(), self.instance_id, spool_dropped)

    def _samples(self, window: Window) -> bytes:
        if not window.samples:
            return b""
        return gzip.compress(b"\n".join(window.samples) + b"\n", compresslevel=1, mtime=0)  # fast; ~4x smaller

    def _close_window(self) -> None:
        window, self.window = self.window, None
        if window is None:
            return
        self._dropped_seen = self._note_drops(window)
        drops = self.spool.take_drops()
        summary = self._summary(window, drops)
        name, version, device = window.model_name, window.model_version, self.config.device_id
        identity = "|".join(map(str, summary.identity))
        checkpoint = self._checkpoint_name(window)
        if (summary.records or summary.rejected) and self.spool.seen_before(identity):
            self.health.replays += 1
            log.warning("window %s of %s %s: the same %d records were summarised before (input replayed?): "
                        "not counted again", summary.window_start.isoformat(), name, version,
                        summary.records + summary.rejected)
            if drops is not None:
                self.spool.restore_drops(drops)
            self.spool.clear_checkpoint(checkpoint)
        else:
            key = summary_key(name, version, device, summary.window_start, window.part, self.instance_id)
            if self.spool.put(key, encode(summary), summary.records, replaces_checkpoint=checkpoint):
                self.spool.remember(identity)
            else:
                if drops is not None:
                    self.spool.restore_drops(drops)
                self.spool.clear_checkpoint(checkpoint)  # dropped by the policy: counted
            # after the summary: a kill in between costs these samples, never a sample file that a
            # recovered checkpoint would write again with other contents
            samples = self._samples(window)
            if samples:
                self.spool.put(outlier_key(name, version, device, summary.window_start, window.part,
                                           self.instance_id), samples)
        self.health.windows += 1
        self.uploader.notify()


class _WindowRows:
    """A stream model's rows, built as ``_score`` takes them, one batch slice at a time and in order:
    a large payload (a frame of 262,000 rows) never holds every row's window at once."""

    def __init__(self, streams: StreamWindows, values: np.ndarray, names: list[str]) -> None:
        self.streams, self.values, self.names = streams, values, names
        self.seen = np.empty(len(values), np.int64)  # filled as the rows are built

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, part: slice) -> np.ndarray:
        return self.streams.rows(self.values[part], self.names[part], self.seen[part])


@dataclass
class _StreamRows:
    """For a stream model: each row's stream, and whether that stream is still warming up."""

    names: list[str]
    young: np.ndarray  # bool

    def keep(self, mask: np.ndarray) -> _StreamRows:
        return _StreamRows([n for n, k in zip(self.names, mask) if k], self.young[mask])


def _streams(decoded: list[Decoded]) -> list[str]:
    """Each decoded row's stream, in order (frames and other keyless rows: the default stream)."""
    out: list[str] = []
    for d in decoded:
        out += d.streams if d.streams is not None else [DEFAULT_STREAM] * len(d.values)
    return out
