"""Per-stream windows for stream models: each record becomes the last ``window`` values of its stream.

A stream model (``BundleManifest.stream``) scores a sliding window of one univariate stream, not a
record on its own. The device keeps, for every stream it has seen (named by the record's key field;
records without one belong to the default stream ``""``), its last ``window - 1`` values, and turns a
batch of records into one row per record: that stream's values before it, oldest first, and the
record's own value last. Records are taken in arrival order, so the rows are what a one-record-at-a-
time loop would give, with no look-ahead. Until a stream has a full window, its row is padded on the
left with the stream's first value (the history is then what has been seen so far), and its first
``warmup`` values are scored but never flagged: a range of a handful of values says little, and every
new stream, and every stream after a restart, would otherwise open with a burst of false outliers.

Memory is bounded: at most ``max_streams`` streams are kept; the one unseen longest is forgotten
(and counted) when a new one arrives beyond that. The runtime saves the windows beside its spool
(``dump``/``restore``) with every checkpoint and at a clean stop, so a restart, even after a kill,
picks each stream up where it was instead of warming it up again.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .contracts import StreamSpec

DEFAULT_STREAM = ""
MAX_NAME = 128  # characters; a longer stream id is known by its digest (it is kept, and saved, per stream)


def stream_name(value: object) -> str:
    """A record's key value as a stream name: strings as they are, other JSON values as JSON text
    (so 1 and "1" name one stream), and a name longer than 128 characters by its sha256."""
    if value is None:
        return DEFAULT_STREAM
    if not isinstance(value, str):
        import json

        value = json.dumps(value, sort_keys=True)
    if len(value) > MAX_NAME:
        import hashlib

        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return value


class StreamWindows:
    """The recent values of every stream, and the rows a stream model scores."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.width = spec.window
        self._history: OrderedDict[str, np.ndarray] = OrderedDict()
        self.forgotten = 0  # streams dropped for max_streams

    def __len__(self) -> int:
        return len(self._history)

    def history(self, stream: str) -> np.ndarray:
        """The values kept for ``stream``, oldest first (at most ``window - 1``)."""
        return self._history.get(stream, np.empty(0, np.float32)).copy()

    def rows(self, values: np.ndarray, streams: list[str] | None, seen: np.ndarray | None = None) -> np.ndarray:
        """One (window,) row per value, in order, and the state advanced past them.

        ``values`` is (n,) float32; ``streams`` the n stream names (None: all the default stream).
        ``seen``, if given ((n,) integers), receives how many earlier values of its stream each row's
        window holds (at most ``window - 1``): what a warm-up rule judges a young stream by."""
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        n = len(values)
        out = np.empty((n, self.width), np.float32)
        if n == 0:
            return out
        if streams is None or all(s == streams[0] for s in streams):
            groups = {streams[0] if streams else DEFAULT_STREAM: np.arange(n)}
        else:
            order: dict[str, list[int]] = {}
            for i, s in enumerate(streams):
                order.setdefault(s, []).append(i)
            groups = {s: np.asarray(ix) for s, ix in order.items()}
        # streams in the order they were last seen in this batch, so the one seen least recently is
        # the one forgotten beyond max_streams (as one record at a time would, unless a stream is
        # forgotten and seen again within one batch)
        for stream, ix in sorted(groups.items(), key=lambda item: item[1][-1]):
            before = self._history.pop(stream, np.empty(0, np.float32))
            if seen is not None:
                seen[ix] = np.minimum(len(before) + np.arange(len(ix)), self.width - 1)
            seq = np.concatenate([before, values[ix]])
            short = self.width - 1 + len(ix) - len(seq)  # a young stream: its first value stands in
            padded = np.concatenate([np.full(short, seq[0], np.float32), seq]) if short > 0 else seq
            out[ix] = sliding_window_view(padded, self.width)[-len(ix):]
            self._history[stream] = seq[-(self.width - 1):].copy()  # most recently seen last
        while len(self._history) > self.spec.max_streams:
            self._history.popitem(last=False)
            self.forgotten += 1
        return out

    def adopt(self, other: StreamWindows) -> None:
        """Take over another model's streams (a model swap): the same key and value keep their
        history, trimmed to this window; otherwise start empty."""
        if (other.spec.key, other.spec.value) != (self.spec.key, self.spec.value):
            return
        keep = self.width - 1
        self._history = OrderedDict((s, h[-keep:].copy()) for s, h in other._history.items())
        while len(self._history) > self.spec.max_streams:
            self._history.popitem(last=False)
            self.forgotten += 1

    def dump(self) -> bytes:
        """Every stream's history, oldest stream first, as one .npz document."""
        names = list(self._history)
        lengths = np.array([len(h) for h in self._history.values()], np.int64)
        values = np.concatenate(list(self._history.values())) if names else np.empty(0, np.float32)
        out = io.BytesIO()
        np.savez(out, key=np.array(self.spec.key), value=np.array(self.spec.value), names=np.array(names, dtype=str),
                 lengths=lengths, values=values.astype(np.float32))
        return out.getvalue()

    def restore(self, data: bytes) -> int:
        """Take back what ``dump`` saved, if it is this spec's key and value (trimmed to this window);
        the number of streams restored. ValueError if the document is not one ``dump`` wrote."""
        try:  # a damaged file raises whatever numpy or zipfile meets first: all of it means "not restored"
            with np.load(io.BytesIO(data), allow_pickle=False) as doc:
                key, value = str(doc["key"]), str(doc["value"])
                names, lengths, values = [str(n) for n in doc["names"].tolist()], doc["lengths"], doc["values"]
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"not a saved stream state ({type(err).__name__}: {err})") from None
        if (key, value) != (self.spec.key, self.spec.value):
            return 0
        if (lengths.dtype.kind not in "iu" or values.dtype != np.float32 or len(names) != len(lengths)
                or (lengths < 0).any() or lengths.sum() != len(values) or not np.isfinite(values).all()):
            raise ValueError("saved stream state does not add up")
        keep = self.width - 1
        starts = np.concatenate([[0], np.cumsum(lengths)])
        history = OrderedDict((str(n), values[a:b][-keep:].astype(np.float32).copy())
                              for n, a, b in zip(names, starts[:-1], starts[1:]))
        while len(history) > self.spec.max_streams:
            history.popitem(last=False)
        self._history = history
        return len(history)
