"""The window summary on the wire (version 3): a small binary container.

A summary of a 10,000-row window is mostly its KLL sketches. Version 2 carried them as base64
inside JSON (a third larger, and a doubles sketch: twice the bytes a float32 series needs);
version 3 carries the raw float sketch, so a feature costs about 2.3 KB at k=200. Layout, all
little-endian::

    magic "ELWS" | u8 format (3) | u8 flags (1: body deflated) | u16 0 | u32 body length | u32 CRC-32 of body
    body: u32 header length | header (JSON: the summary without its series, plus "series": names)
          then per series (features in order, then the score):
          u8 flags (1: float sketch, 2: 64-bit counts, 4: float32 edges, 8: min and max are the sketch's)
          count, missing, nan, inf (u32, or u64 with flag 2)
          f64 min, max (absent with flag 8), mean, m2 (NaN when count is 0)
          u16 edges | edges[] (f64, or f32 with flag 4 when every edge is a float32 exactly)
          counts[edges + 1] (u32, or u64 with flag 2) | u32 n | sketch

The body is deflated (zlib) only where that saves a tenth or more, and only up to 32 KB: beyond that it is
mostly sketches, which do not compress, and deflate would cost milliseconds per window for a few
percent. The length and CRC make a truncated or
corrupted file an error, never a summary with part of its data.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import orjson

from .contracts import ContractError, NumericSummary, WindowSummary
from .summary import kll_extremes

MAGIC = b"ELWS"
FORMAT = 3
DEFLATED = 1
DEFLATE_MAX = 32 << 10  # bodies larger than this are stored as they are
_PREAMBLE = struct.Struct("<4sBBHII")
_WIDE = struct.Struct("<QQQQ")
_NARROW = struct.Struct("<IIII")
_MOMENTS = struct.Struct("<dddd")
_U8 = struct.Struct("<B")
F32_SKETCH, WIDE_COUNTS, F32_EDGES, EXTREMES_IN_SKETCH = 1, 2, 4, 8
_PAIR = struct.Struct("<dd")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
SCORE = "score"


class SummaryFormatError(ContractError):
    """Not a summary, or a truncated or corrupted one."""


def is_binary(data: bytes) -> bool:
    return data[:4] == MAGIC


def encode(summary: WindowSummary) -> bytes:
    header = summary.model_dump(mode="json", exclude={"features", "score"}, exclude_defaults=True)
    header["schema_version"] = FORMAT
    header["series"] = [*summary.features, SCORE]
    head = orjson.dumps(header)
    parts = [_U32.pack(len(head)), head]
    for s in (*summary.features.values(), summary.score):
        parts.append(_series(s))
    body = b"".join(parts)
    flags = 0
    if len(body) <= DEFLATE_MAX:  # a large body is mostly sketches, which do not compress; not worth the time
        packed = zlib.compress(body, 9)
        if len(packed) <= 0.9 * len(body):
            body, flags = packed, DEFLATED
    return _PREAMBLE.pack(MAGIC, FORMAT, flags, 0, len(body), zlib.crc32(body)) + body


def _series(s: NumericSummary) -> bytes:
    nan = math.nan
    m2 = s.variance * s.count if s.variance is not None else nan
    counts = np.asarray(s.hist_counts or [0] * (len(s.hist_edges) + 1), dtype=np.int64)
    edges = np.asarray(s.hist_edges, dtype="<f8")
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} histogram counts for {len(edges)} edges")
    tallies = (s.count, s.missing, s.nan, s.inf if (s.nan or s.inf) else s.nonfinite)
    wide = max(tallies) >= 1 << 32
    with np.errstate(over="ignore"):  # an edge beyond float32's range simply keeps float64
        narrow = edges.astype("<f4")
    f32_edges = bool(np.array_equal(narrow.astype("<f8"), edges))
    kll = s.kll or b""
    # a float sketch fed the float32 casts of exactly the values summarised holds min and max as
    # float32 values: when they are float32 values themselves, the reader takes them from it
    in_sketch = (bool(kll) and s.kll_type == "f32" and s.min is not None and s.max is not None
                 and float(np.float32(s.min)) == s.min and float(np.float32(s.max)) == s.max)
    flags = ((F32_SKETCH if s.kll_type == "f32" else 0) | (WIDE_COUNTS if wide else 0)
             | (F32_EDGES if f32_edges else 0) | (EXTREMES_IN_SKETCH if in_sketch else 0))
    moments = _PAIR.pack(_f(s.mean), m2) if in_sketch else _MOMENTS.pack(_f(s.min), _f(s.max), _f(s.mean), m2)
    return b"".join((_U8.pack(flags), (_WIDE if wide else _NARROW).pack(*tallies), moments, _U16.pack(len(edges)),
                     (narrow if f32_edges else edges).tobytes(),
                     counts.astype("<u8" if wide else "<u4").tobytes(), _U32.pack(len(kll)), kll))


def _f(v: float | None) -> float:
    return math.nan if v is None else v


def check(data: bytes, source: str) -> tuple[int, bytes]:
    """The container is whole (length and CRC): its flags and body."""
    if len(data) < _PREAMBLE.size or not is_binary(data):
        raise SummaryFormatError(f"{source}: not an edgeloop window summary")
    magic, fmt, flags, reserved, length, crc = _PREAMBLE.unpack_from(data)
    if fmt != FORMAT:
        raise SummaryFormatError(f"{source}: summary format {fmt} is not one this reader knows ({FORMAT})")
    if flags & ~DEFLATED or reserved:
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
        if flags & DEFLATED:
            body = zlib.decompress(body)
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
    except (ValueError, struct.error, OSError, EOFError, LookupError, TypeError, zlib.error, RuntimeError) as err:
        raise SummaryFormatError(f"{source}: malformed summary ({err})") from None
    doc = {**header, "features": dict(zip(names[:-1], series[:-1])), "score": series[-1]}
    from .contracts import parse_document

    return parse_document(WindowSummary, doc, source)


def _built(**fields) -> NumericSummary:
    """A NumericSummary of fields already checked and typed, as pydantic's ``model_construct`` makes
    one but without its per-field bookkeeping (a quarter of a review's decoding time). The caller
    gives every field (tests/test_summary_format.py checks the result against validation)."""
    summary = NumericSummary.__new__(NumericSummary)
    object.__setattr__(summary, "__dict__", fields)
    object.__setattr__(summary, "__pydantic_fields_set__", set(fields))
    object.__setattr__(summary, "__pydantic_extra__", None)
    object.__setattr__(summary, "__pydantic_private__", None)
    return summary


def _read_series(body: bytes, pos: int) -> tuple[NumericSummary, int]:
    (flags,) = _U8.unpack_from(body, pos)
    pos += 1
    if flags & ~(F32_SKETCH | WIDE_COUNTS | F32_EDGES | EXTREMES_IN_SKETCH):
        raise ValueError(f"unknown series flags {flags:#x}")
    tally = _WIDE if flags & WIDE_COUNTS else _NARROW
    count, missing, nan, inf = tally.unpack_from(body, pos)
    pos += tally.size
    if flags & EXTREMES_IN_SKETCH:
        mean, m2 = _PAIR.unpack_from(body, pos)
        pos += _PAIR.size
        lo = hi = math.nan  # from the sketch, below
    else:
        lo, hi, mean, m2 = _MOMENTS.unpack_from(body, pos)
        pos += _MOMENTS.size
    (n_edges,) = _U16.unpack_from(body, pos)
    pos += 2
    edge_width = 4 if flags & F32_EDGES else 8
    edges = np.frombuffer(body, dtype=f"<f{edge_width}", count=n_edges, offset=pos).astype(np.float64)
    pos += edge_width * n_edges
    width = 8 if flags & WIDE_COUNTS else 4
    counts = np.frombuffer(body, dtype=f"<u{width}", count=n_edges + 1, offset=pos)
    pos += width * (n_edges + 1)
    (n,) = _U32.unpack_from(body, pos)
    pos += 4
    kll = bytes(body[pos:pos + n])
    if len(kll) != n:
        raise ValueError("sketch cut short")
    pos += n
    if flags & EXTREMES_IN_SKETCH:
        if not (flags & F32_SKETCH) or not kll:
            raise ValueError("extremes said to be in a sketch that is not there")
        lo, hi = kll_extremes(kll)
    has = count > 0
    # every field comes typed from the fixed layout above: no validation to pay for, 65 times a summary
    summary = _built(
        count=count, missing=missing, nonfinite=nan + inf, nan=nan, inf=inf,
        min=lo if has else None, max=hi if has else None, mean=mean if has else None,
        variance=m2 / count if has else None,
        hist_edges=edges.tolist(), hist_counts=counts.tolist(),
        kll=kll or None, kll_type="f32" if flags & F32_SKETCH else "f64",
    )
    return summary, pos
