"""The window summary on the wire (version 3): a small binary container.

A summary of a 10,000-row window is mostly its KLL sketches. Version 2 carried them as base64
inside JSON (a third larger, and a doubles sketch: twice the bytes a float32 series needs);
version 3 carries the raw float sketch, so a feature costs about 2.3 KB at k=200. Layout, all
little-endian::

    magic "ELWS" | u8 format (3) | u8 flags (1: body gzipped) | u16 0 | u32 body length | u32 CRC-32 of body
    body: u32 header length | header (JSON: the summary without its series, plus "series": names)
          then per series (features in order, then the score):
          u64 count, missing, nan, inf | f64 min, max, mean, m2 (NaN when count is 0)
          u16 edges | f64 edges[] | u64 counts[edges + 1] | u8 sketch type (0 f64, 1 f32) | u32 n | sketch

The body is gzipped only where that saves a tenth or more, and only up to 32 KB: beyond that it is
mostly sketches, which do not compress, and gzip would cost milliseconds per window for a few
percent. The length and CRC make a truncated or
corrupted file an error, never a summary with part of its data.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib

import numpy as np
import orjson

from .contracts import ContractError, NumericSummary, WindowSummary

MAGIC = b"ELWS"
FORMAT = 3
GZIPPED = 1
GZIP_MAX = 32 << 10  # bodies larger than this are stored as they are
_PREAMBLE = struct.Struct("<4sBBHII")
_STATS = struct.Struct("<QQQQdddd")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SKETCH = struct.Struct("<BI")
SCORE = "score"


class SummaryFormatError(ContractError):
    """Not a summary, or a truncated or corrupted one."""


def is_binary(data: bytes) -> bool:
    return data[:4] == MAGIC


def encode(summary: WindowSummary) -> bytes:
    header = summary.model_dump(mode="json", exclude={"features", "score"})
    header["schema_version"] = FORMAT
    header["series"] = [*summary.features, SCORE]
    head = orjson.dumps(header)
    parts = [_U32.pack(len(head)), head]
    for s in (*summary.features.values(), summary.score):
        parts.append(_series(s))
    body = b"".join(parts)
    flags = 0
    if len(body) <= GZIP_MAX:  # a large body is mostly sketches, which do not compress; not worth the time
        packed = gzip.compress(body, compresslevel=6, mtime=0)
        if len(packed) <= 0.9 * len(body):
            body, flags = packed, GZIPPED
    return _PREAMBLE.pack(MAGIC, FORMAT, flags, 0, len(body), zlib.crc32(body)) + body


def _series(s: NumericSummary) -> bytes:
    nan = math.nan
    m2 = s.variance * s.count if s.variance is not None else nan
    stats = _STATS.pack(s.count, s.missing, s.nan, s.inf if (s.nan or s.inf) else s.nonfinite,
                        _f(s.min), _f(s.max), _f(s.mean), m2)
    edges = np.asarray(s.hist_edges, dtype="<f8")
    counts = np.asarray(s.hist_counts or [0] * (len(edges) + 1), dtype="<u8")
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} histogram counts for {len(edges)} edges")
    kll = s.kll or b""
    return b"".join((stats, _U16.pack(len(edges)), edges.tobytes(), counts.tobytes(),
                     _SKETCH.pack(1 if s.kll_type == "f32" else 0, len(kll)), kll))


def _f(v: float | None) -> float:
    return math.nan if v is None else v


def check(data: bytes, source: str) -> tuple[int, bytes]:
    """The container is whole (length and CRC): its flags and body."""
    if len(data) < _PREAMBLE.size or not is_binary(data):
        raise SummaryFormatError(f"{source}: not an edgeloop window summary")
    magic, fmt, flags, reserved, length, crc = _PREAMBLE.unpack_from(data)
    if fmt != FORMAT:
        raise SummaryFormatError(f"{source}: summary format {fmt} is not one this reader knows ({FORMAT})")
    if flags & ~GZIPPED or reserved:
        raise SummaryFormatError(f"{source}: unknown flags {flags:#x}/{reserved:#x} (corrupted?)")
    body = data[_PREAMBLE.size:]
    if len(body) != length:
        raise SummaryFormatError(f"{source}: truncated ({len(body)} of {length} bytes)")
    if zlib.crc32(body) != crc:
        raise SummaryFormatError(f"{source}: checksum mismatch (corrupted)")
    return flags, body


def decode(data: bytes, source: str) -> WindowSummary:
    """The summary in ``data``; SummaryFormatError names what is wrong with a damaged one."""
    flags, body = check(data, source)
    try:
        if flags & GZIPPED:
            body = gzip.decompress(body)
        (head_len,) = _U32.unpack_from(body)
        header = orjson.loads(body[4:4 + head_len])
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
        names = header.pop("series")
        if not isinstance(names, list) or not names or names[-1] != SCORE:
            raise ValueError("no score series")
        pos = 4 + head_len
        series = []
        for _ in names:
            s, pos = _read_series(body, pos)
            series.append(s)
        if pos != len(body):
            raise ValueError(f"{len(body) - pos} bytes after the last series")
    except (ValueError, struct.error, OSError, EOFError, KeyError, TypeError, zlib.error) as err:
        raise SummaryFormatError(f"{source}: malformed summary ({err})") from None
    doc = {**header, "features": dict(zip(names[:-1], series[:-1])), "score": series[-1]}
    from .contracts import parse_document

    return parse_document(WindowSummary, doc, source)


def _read_series(body: bytes, pos: int) -> tuple[NumericSummary, int]:
    count, missing, nan, inf, lo, hi, mean, m2 = _STATS.unpack_from(body, pos)
    pos += _STATS.size
    (n_edges,) = _U16.unpack_from(body, pos)
    pos += 2
    edges = np.frombuffer(body, dtype="<f8", count=n_edges, offset=pos)
    pos += 8 * n_edges
    counts = np.frombuffer(body, dtype="<u8", count=n_edges + 1, offset=pos)
    pos += 8 * (n_edges + 1)
    kind, n = _SKETCH.unpack_from(body, pos)
    pos += _SKETCH.size
    kll = bytes(body[pos:pos + n])
    if len(kll) != n:
        raise ValueError("sketch cut short")
    pos += n
    has = count > 0
    summary = NumericSummary(
        count=count, missing=missing, nonfinite=nan + inf, nan=nan, inf=inf,
        min=lo if has else None, max=hi if has else None, mean=mean if has else None,
        variance=m2 / count if has else None,
        hist_edges=edges.tolist(), hist_counts=counts.tolist(),
        kll=kll or None, kll_type="f32" if kind == 1 else "f64",
    )
    return summary, pos
