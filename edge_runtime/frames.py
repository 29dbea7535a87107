"""edgeloop binary frames: raw float32 rows with a 12-byte header, for high-rate sources.

A frame (all integers little-endian; see docs/frames.md)::

    offset  size  field
    0       4     magic b"ELF1"
    4       1     flags: bit 0 set = a float64 timestamp column follows the header
    5       1     reserved, 0
    6       2     n_features (uint16)
    8       4     n_rows (uint32)
    12      8*n   timestamps, epoch seconds (only with flag bit 0; NaN = none)
    ...     4*n*f values, float32, row-major

Why not Arrow IPC: a device writing a handful of rows at a time should not need pyarrow (60 MB)
to speak to its own runtime; this header costs nothing to write from C, Go or Python
(``encode_frame`` below), and reading it is one ``np.frombuffer``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .records import Decoded, Reason, Rejection

MAGIC = b"ELF1"
HEADER = struct.Struct("<4sBBHI")
FLAG_TS = 1


class FrameError(ValueError):
    """A frame header that cannot be trusted: the rest of that stream cannot be framed."""


@dataclass
class FrameHeader:
    has_ts: bool
    n_features: int
    n_rows: int

    @property
    def body_size(self) -> int:
        return self.n_rows * (8 * self.has_ts + 4 * self.n_features)


def encode_frame(values: np.ndarray, ts: np.ndarray | None = None) -> bytes:
    values = np.ascontiguousarray(values, dtype="<f4")
    if values.ndim != 2:
        raise ValueError("values must be a (rows, features) matrix")
    n, f = values.shape
    head = HEADER.pack(MAGIC, FLAG_TS if ts is not None else 0, 0, f, n)
    if ts is None:
        return head + values.tobytes()
    ts = np.ascontiguousarray(ts, dtype="<f8")
    if ts.shape != (n,):
        raise ValueError("one timestamp per row")
    return head + ts.tobytes() + values.tobytes()


def read_header(data: bytes | memoryview) -> FrameHeader:
    magic, flags, reserved, n_features, n_rows = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"not an edgeloop frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if flags & ~FLAG_TS or reserved:
        raise FrameError(f"unknown frame flags {flags:#x}/{reserved:#x}")
    if n_features == 0:
        raise FrameError("frame with no features")
    return FrameHeader(bool(flags & FLAG_TS), n_features, n_rows)


class FrameSplitter:
    """Cuts a byte stream into whole frames. After a FrameError the stream is lost: the caller
    dead-letters what it has and stops reading that stream (a file, a connection)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            header = read_header(self._buf)
            size = HEADER.size + header.body_size
            if size > self.max_bytes:
                raise FrameError(f"frame of {size} bytes is over the limit ({self.max_bytes})")
            if len(self._buf) < size:
                break
            frames.append(bytes(self._buf[:size]))
            del self._buf[:size]
        return frames

    def leftover(self) -> int:
        """Bytes of an unfinished frame at the end of the stream."""
        return len(self._buf)


def decode_frame(frame: bytes, names: list[str], ts_range: tuple[float, float]) -> Decoded:
    """A whole frame as a decoded batch: rows with a bad timestamp, a NaN (missing) or an infinite
    value are rejected one by one; a frame of the wrong width is rejected row by row."""
    n_features = len(names)
    header = read_header(frame)
    n = header.n_rows
    if header.n_features != n_features:
        reason = f"frame has {header.n_features} features, the model expects {n_features}"
        return Decoded.empty(n_features, [Rejection(Reason.SHAPE, reason, i) for i in range(n)])
    offset = HEADER.size
    if header.has_ts:
        ts = np.frombuffer(frame, dtype="<f8", count=n, offset=offset).astype(np.float64)
        offset += 8 * n
    else:
        ts = np.full(n, np.nan)
    values = np.frombuffer(frame, dtype="<f4", count=n * n_features, offset=offset).reshape(n, n_features)
    lo, hi = ts_range
    ts_bad = (ts < lo) | (ts > hi)  # NaN (no timestamp) compares False: not bad; +-inf is
    bad = ts_bad | ~np.isfinite(values).all(axis=1)
    rejections = []
    if bad.any():
        for i in np.flatnonzero(bad):
            if ts_bad[i]:
                reason = f"timestamp {float(ts[i])!r} is outside the plausible range {lo:.0f} .. {hi:.0f}"
                rejections.append(Rejection(Reason.TIMESTAMP_RANGE, reason, int(i)))
                continue
            row = values[i]
            missing = tuple(name for name, v in zip(names, row) if np.isnan(v))
            nonfinite = tuple(name for name, v in zip(names, row) if np.isinf(v))
            parts = ([f"missing {list(missing)}"] if missing else []) + (
                [f"non-finite {list(nonfinite)}"] if nonfinite else [])
            code = Reason.MISSING if missing else Reason.NON_FINITE
            rejections.append(Rejection(code, "; ".join(parts), int(i), missing, nonfinite))
        keep = ~bad
        values, ts = values[keep], ts[keep]
        index = np.flatnonzero(keep)
    else:
        index = np.arange(n)
    # values stay a read-only view of the frame: nothing downstream writes to a batch
    return Decoded(values, ts, index.astype(np.int64), [None] * len(index), rejections)
