"""The window summary on the wire (versions 3 and 4): a small binary container.

A summary of a 10,000-row window is mostly its KLL sketches. Version 2 carried them as base64
inside JSON (a third larger, and a doubles sketch: twice the bytes a float32 series needs);
version 3 carries the raw float sketch, so a feature costs about 2.3 KB at k=200. Version 4 (written
now) puts every series' counts and moments in columns ahead of the rest, and adds each series'
exact counts on the review grid: the fleet review reads a summary with a few array views instead
of parsing 65 series and their sketches. Layout, all little-endian::

    magic "ELWS" | u8 format | u8 flags (1: body deflated) | u16 0 | u32 body length | u32 CRC-32 of body
    body: u32 header length | header (JSON: the summary without its series, plus "series": names)
    version 4, then:
          u8 column flags (2: 64-bit counts, 4: float32 extremes, 16: grid counts follow)
          count, missing, nan, inf per series (u32, or u64 with flag 2)
          min, max, mean, m2 per series (f64; NaN when count is 0); with flag 4, every series' min
          and max first (f32, as device values are), then mean and m2
          with flag 16: u8 flags (1: deflated) | u8 width (1, 2, 4 or 8) | u32 grid length per series |
          u32 n | n bytes: the counts, series after series (u<width>); the header's "grid" names the
          grids (``summary.grid_id``). Mostly small numbers and zeros, they are deflated on their own
          (to a fifth) when the body is too large to be deflated whole
          then per series: u8 flags (1: float sketch, 4: float32 edges) | u16 edges | edges[] (f64, or
          f32 with flag 4) | counts[edges + 1] (u32, or u64 with column flag 2) | u32 n | sketch
    version 3, per series (features in order, then the score):
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
from dataclasses import dataclass

import numpy as np
import orjson

from .contracts import ContractError, NumericSummary, WindowSummary
from .summary import kll_extremes, kll_layout

MAGIC = b"ELWS"
FORMAT = 4  # written; 3 is still read
FORMATS = (3, 4)
DEFLATED = 1
DEFLATE_MAX = 32 << 10  # bodies larger than this are stored as they are
_PREAMBLE = struct.Struct("<4sBBHII")
_WIDE = struct.Struct("<QQQQ")
_NARROW = struct.Struct("<IIII")
_MOMENTS = struct.Struct("<dddd")
_U8 = struct.Struct("<B")
F32_SKETCH, WIDE_COUNTS, F32_EDGES, EXTREMES_IN_SKETCH = 1, 2, 4, 8
F32_EXTREMES = 4  # version 4's column flag: every min and max is a float32 value, stored as one
GRID_COUNTS = 16  # version 4's column flag: exact counts on the review grid follow
GRID_DEFLATED = 1  # the grid block's flag: its counts are deflated (a body too large to deflate whole)
MAX_GRID = 2 * ((1 << 16) + 131)  # the most points a review grid can have: 2 x (u16 edges + quantiles + extremes)
GRID_RATIO = 64  # deflated grid counts inflate to at most this many times their size (they deflate about 5x)
_PAIR = struct.Struct("<dd")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
SCORE = "score"


class SummaryFormatError(ContractError):
    """Not a summary, or a truncated or corrupted one."""


def is_binary(data: bytes) -> bool:
    return data[:4] == MAGIC


def encode(summary: WindowSummary, version: int = FORMAT) -> bytes:
    """The summary in the container, as ``version`` (4; 3 as devices before it wrote it)."""
    if version not in FORMATS:
        raise ValueError(f"summary format {version} is not one this writer knows {FORMATS}")
    series = [*summary.features.values(), summary.score]
    gridded = version >= 4 and bool(summary.grid)
    # the counts are left out where every sketch still holds each of its values (a short window): the
    # review reads the same exact counts off the sketches, and the window stays no larger than its data
    on_grid = gridded and all(s.grid_counts is not None for s in series) and not all(map(_exact_sketch, series))
    header = summary.model_dump(mode="json", exclude={"features", "score", "grid"}, exclude_defaults=True)
    header["schema_version"] = version
    header["series"] = [*summary.features, SCORE]
    if gridded:
        header["grid"] = summary.grid
    head = orjson.dumps(header)
    columns = [_series_v3(s) for s in series] if version == 3 else _columns_v4(series, on_grid)
    parts = [_U32.pack(len(head)), head, *columns]
    body = b"".join(parts)
    flags = 0
    if len(body) <= DEFLATE_MAX:  # a large body is mostly sketches, which do not compress; not worth the time
        packed = zlib.compress(body, 9)
        if len(packed) <= 0.9 * len(body):
            body, flags = packed, DEFLATED
    elif on_grid:  # the grid counts alone, then: mostly small numbers and zeros, a fifth of their size
        columns[GRID_PART] = _grid_block(series, deflate=True)
        body = b"".join([_U32.pack(len(head)), head, *columns])
    return _PREAMBLE.pack(MAGIC, version, flags, 0, len(body), zlib.crc32(body)) + body


def _exact_sketch(s: NumericSummary) -> bool:
    """The series' float sketch holds every value it summarised, each once (or there are none)."""
    if not s.count:
        return True
    if not s.kll or s.kll_type != "f32":
        return False
    try:
        layout = kll_layout(s.kll)
    except ValueError:
        return False
    return layout.n == s.count == sum(layout.sizes)


def _tallies(s: NumericSummary) -> tuple[int, int, int, int]:
    # before version 3 NaN and Inf were one count: it goes to inf, which keeps nan + inf right
    return s.count, s.missing, s.nan, s.inf if (s.nan or s.inf) else s.nonfinite


def _hist(s: NumericSummary) -> tuple[np.ndarray, np.ndarray, bool]:
    """The histogram's counts and edges, checked, and whether the edges are float32 values."""
    counts = np.asarray(s.hist_counts or [0] * (len(s.hist_edges) + 1), dtype=np.int64)
    edges = np.asarray(s.hist_edges, dtype="<f8")
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} histogram counts for {len(edges)} edges")
    with np.errstate(over="ignore"):  # an edge beyond float32's range simply keeps float64
        narrow = edges.astype("<f4")
    return counts, edges, bool(np.array_equal(narrow.astype("<f8"), edges))


def _edges_bytes(edges: np.ndarray, f32: bool) -> bytes:
    return (edges.astype("<f4") if f32 else edges).tobytes()


GRID_PART = 3  # where ``_columns_v4`` puts the grid block: after the flags, tallies and moments


def _columns_v4(series: list[NumericSummary], on_grid: bool) -> list[bytes]:
    tallies = np.array([_tallies(s) for s in series], dtype=np.int64)
    hists = [_hist(s) for s in series]
    wide = bool(tallies.size and tallies.max() >= 1 << 32) or any(h[0].size and h[0].max() >= 1 << 32 for h in hists)
    nan = math.nan
    moments = np.array([(_f(s.min), _f(s.max), _f(s.mean), s.variance * s.count if s.variance is not None else nan)
                        for s in series], dtype="<f8")
    count_type = "<u8" if wide else "<u4"
    with np.errstate(over="ignore"):  # device values are float32: so are their extremes, in half the bytes
        extremes32 = moments[:, :2].astype("<f4")
    f32_extremes = bool(np.array_equal(extremes32.astype("<f8"), moments[:, :2], equal_nan=True))
    parts = [_U8.pack((WIDE_COUNTS if wide else 0) | (GRID_COUNTS if on_grid else 0)
                      | (F32_EXTREMES if f32_extremes else 0)),
             tallies.astype(count_type).tobytes(),
             extremes32.tobytes() + moments[:, 2:].tobytes() if f32_extremes else moments.tobytes(),
             _grid_block(series, deflate=False) if on_grid else b""]
    for s, (counts, edges, f32_edges) in zip(series, hists):
        kll = s.kll or b""
        parts += [_U8.pack((F32_SKETCH if s.kll_type == "f32" else 0) | (F32_EDGES if f32_edges else 0)),
                  _U16.pack(len(edges)), _edges_bytes(edges, f32_edges), counts.astype(count_type).tobytes(),
                  _U32.pack(len(kll)), kll]
    return parts


def _grid_block(series: list[NumericSummary], deflate: bool) -> bytes:
    """u8 flags (1: deflated) | u8 width | u32 grid length per series | u32 n | n bytes of counts."""
    grids = [np.asarray(s.grid_counts, dtype=np.int64) for s in series]
    flat = np.concatenate(grids) if grids else np.zeros(0, np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError("negative grid counts")
    top = int(flat.max()) if flat.size else 0
    width = next(w for w in (1, 2, 4, 8) if top < 1 << (8 * w))
    packed = raw = flat.astype(f"<u{width}").tobytes()
    flags = 0
    if deflate and len(raw) >= 64:
        packed = zlib.compress(raw, 6)
        if len(packed) < len(raw):
            flags |= GRID_DEFLATED
        else:
            packed = raw
    return b"".join((_U8.pack(flags), _U8.pack(width), np.array([len(g) for g in grids], dtype="<u4").tobytes(),
                     _U32.pack(len(packed)), packed))


def _series_v3(s: NumericSummary) -> bytes:
    nan = math.nan
    m2 = s.variance * s.count if s.variance is not None else nan
    counts, edges, f32_edges = _hist(s)
    tallies = _tallies(s)
    wide = max(tallies) >= 1 << 32
    kll = s.kll or b""
    # a float sketch fed the float32 casts of exactly the values summarised holds min and max as
    # float32 values: when they are float32 values themselves, the reader takes them from it
    in_sketch = (bool(kll) and s.kll_type == "f32" and s.min is not None and s.max is not None
                 and float(np.float32(s.min)) == s.min and float(np.float32(s.max)) == s.max)
    flags = ((F32_SKETCH if s.kll_type == "f32" else 0) | (WIDE_COUNTS if wide else 0)
             | (F32_EDGES if f32_edges else 0) | (EXTREMES_IN_SKETCH if in_sketch else 0))
    moments = _PAIR.pack(_f(s.mean), m2) if in_sketch else _MOMENTS.pack(_f(s.min), _f(s.max), _f(s.mean), m2)
    return b"".join((_U8.pack(flags), (_WIDE if wide else _NARROW).pack(*tallies), moments, _U16.pack(len(edges)),
                     _edges_bytes(edges, f32_edges), counts.astype("<u8" if wide else "<u4").tobytes(),
                     _U32.pack(len(kll)), kll))


def _f(v: float | None) -> float:
    return math.nan if v is None else v


def check(data: bytes, source: str) -> tuple[int, int, bytes]:
    """The container is whole (length and CRC): its format, flags and body."""
    if len(data) < _PREAMBLE.size or not is_binary(data):
        raise SummaryFormatError(f"{source}: not an edgeloop window summary")
    magic, fmt, flags, reserved, length, crc = _PREAMBLE.unpack_from(data)
    if fmt not in FORMATS:
        raise SummaryFormatError(f"{source}: summary format {fmt} is not one this reader knows {FORMATS}")
    if flags & ~DEFLATED or reserved:
        raise SummaryFormatError(f"{source}: unknown flags {flags:#x}/{reserved:#x} (corrupted?)")
    body = data[_PREAMBLE.size:]
    if len(body) != length:
        raise SummaryFormatError(f"{source}: truncated ({len(body)} of {length} bytes)")
    if zlib.crc32(body) != crc:
        raise SummaryFormatError(f"{source}: checksum mismatch (corrupted)")
    return fmt, flags, body


_PARSE_ERRORS = (ValueError, struct.error, OSError, EOFError, LookupError, TypeError, zlib.error, RuntimeError)


@dataclass
class Columns:
    """A version-4 summary's header and its series' columns, as the fleet review reads them: no
    series object is built and no sketch is read."""

    header: dict  # the summary's fields but its series (validate with ``contracts.SummaryHeader``)
    names: list[str]  # the series: the features in order, then "score"
    tallies: np.ndarray  # (series, 4) int64: count, missing, nan, inf
    moments: np.ndarray  # (series, 4) float64: min, max, mean, m2 (NaN where count is 0)
    grid_lengths: np.ndarray | None  # (series,): each one's grid length, if counted on the grids
    grid_counts: np.ndarray | None  # the grid counts, series after series (as ``NumericSummary.grid_counts``)
    end: int = 0  # where the per-series part of the body starts
    wide: bool = False


def read(data: bytes, source: str, grid: str | None = None) -> Columns | WindowSummary:
    """The summary in ``data`` as the fleet review takes it: the columns of a version-4 summary
    counted on the grids named ``grid`` (on any, if None), its series left unparsed but checked
    whole; any other summary decoded whole. The container is checked and inflated once either way.
    SummaryFormatError for a damaged one."""
    fmt, body = _open(data, source)
    try:
        cols = _read_columns(body) if fmt >= 4 else None
        if cols is not None and cols.grid_counts is not None and grid in (None, cols.header.get("grid")):
            _skip_series_v4(body, cols)  # what the review does not read must still be whole
            return cols
    except _PARSE_ERRORS as err:
        raise SummaryFormatError(f"{source}: malformed summary ({err})") from None
    return _whole(fmt, body, cols, source)


def columns(data: bytes, source: str) -> Columns | None:
    """The columns of a version-4 summary counted on review grids; None for any other."""
    got = read(data, source)
    return got if isinstance(got, Columns) else None


def _header(body: bytes) -> tuple[dict, list[str], int]:
    (head_len,) = _U32.unpack_from(body)
    header = orjson.loads(body[4:4 + head_len])
    if not isinstance(header, dict):
        raise ValueError("the header is not a mapping")
    names = header.pop("series", None)
    if not isinstance(names, list) or not names or names[-1] != SCORE:
        raise ValueError("no score series")
    features = names[:-1]  # a feature may be called "score": the score series is the last one
    if not all(isinstance(n, str) for n in features) or len(set(features)) != len(features):
        raise ValueError("feature names that are not distinct strings")
    return header, names, 4 + head_len


def _read_columns(body: bytes) -> Columns:
    header, names, pos = _header(body)
    n = len(names)
    (flags,) = _U8.unpack_from(body, pos)
    pos += 1
    if flags & ~(WIDE_COUNTS | GRID_COUNTS | F32_EXTREMES):
        raise ValueError(f"unknown column flags {flags:#x}")
    width = 8 if flags & WIDE_COUNTS else 4
    tallies = _counts(_array(body, f"<u{width}", 4 * n, pos)).reshape(n, 4)
    pos += 4 * n * width
    if flags & F32_EXTREMES:
        moments = np.empty((n, 4))
        moments[:, :2] = _array(body, "<f4", 2 * n, pos).reshape(n, 2)
        moments[:, 2:] = _array(body, "<f8", 2 * n, pos + 8 * n).reshape(n, 2)
        pos += 24 * n
    else:
        moments = _array(body, "<f8", 4 * n, pos).reshape(n, 4)
        pos += 32 * n
    counted = moments[tallies[:, 0] > 0]
    if not np.isfinite(counted).all() or (counted[:, 3] < 0).any() or (counted[:, 0] > counted[:, 1]).any():
        raise ValueError("a series with values but impossible moments (non-finite, min above max, or m2 < 0)")
    lengths = counts = None
    if flags & GRID_COUNTS:
        grid_flags, grid_width = body[pos], body[pos + 1]
        if grid_flags & ~GRID_DEFLATED or grid_width not in (1, 2, 4, 8):
            raise ValueError(f"grid counts of flags {grid_flags:#x} and {grid_width} bytes")
        lengths = _array(body, "<u4", n, pos + 2).astype(np.int64)
        pos += 2 + 4 * n
        if n and lengths.max() > MAX_GRID:  # a review grid is a baseline's edges and quantiles, twice
            raise ValueError(f"a grid of {lengths.max()} points")
        total = int(lengths.sum())
        (stored,) = _U32.unpack_from(body, pos)
        pos += 4
        packed = body[pos:pos + stored]
        if len(packed) != stored:
            raise ValueError("grid counts cut short")
        pos += stored
        if grid_flags & GRID_DEFLATED:
            if grid_width * total > max(GRID_RATIO * stored, 1 << 16):  # far beyond what counts deflate to
                raise ValueError(f"{total} grid counts said to deflate to {stored} bytes")
            raw = _inflate(packed, grid_width * total)
        else:
            raw = packed
        if len(raw) != grid_width * total:
            raise ValueError(f"{len(raw)} bytes of grid counts for {total} points")
        counts = _counts(np.frombuffer(raw, dtype=f"<u{grid_width}"))
        running = np.concatenate([[0], np.cumsum(counts)])
        ends = np.cumsum(lengths)
        if np.any(running[ends] - running[ends - lengths] > tallies[:, 0]):
            raise ValueError("more values on the grid than the series counted")
        if not isinstance(header.get("grid"), str):
            raise ValueError("grid counts without the grid they are on")
    return Columns(header, names, tallies, moments, lengths, counts, pos, bool(flags & WIDE_COUNTS))


def _counts(raw: np.ndarray) -> np.ndarray:
    """Unsigned counts as int64, refusing any that would wrap (2**63 or more)."""
    if raw.dtype.itemsize == 8 and raw.size and raw.max() >= 1 << 63:
        raise ValueError("a count of 2**63 or more")
    return raw.astype(np.int64)


def _inflate_body(body: bytes) -> bytes:
    """A deflated body: writers deflate only bodies of up to ``DEFLATE_MAX``, so no more is inflated."""
    inflater = zlib.decompressobj()
    raw = inflater.decompress(body, DEFLATE_MAX + 1)
    if len(raw) > DEFLATE_MAX or inflater.unconsumed_tail:
        raise ValueError(f"a deflated body of more than {DEFLATE_MAX} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ValueError("a deflated body cut short or followed by other bytes")
    return raw


def _skip_series_v4(body: bytes, cols: Columns) -> None:
    """Walk the per-series part (flags, edges, histogram, sketch) by its lengths alone, to its end."""
    pos, width = cols.end, 8 if cols.wide else 4
    for _ in cols.names:
        flags, n_edges = body[pos], _U16.unpack_from(body, pos + 1)[0]
        if flags & ~(F32_SKETCH | F32_EDGES):
            raise ValueError(f"unknown series flags {flags:#x}")
        pos += 3 + (4 if flags & F32_EDGES else 8) * n_edges + width * (n_edges + 1)
        pos += 4 + _U32.unpack_from(body, pos)[0]
    if pos != len(body):
        raise ValueError("series that do not end where the body does")


def _inflate(packed: bytes, size: int) -> bytes:
    """Deflated bytes that must come to ``size``: a forged stream cannot make more of them."""
    if size <= 0:  # zlib reads a limit of 0 as none
        raise ValueError("deflated grid counts of no size")
    inflater = zlib.decompressobj()
    raw = inflater.decompress(packed, size)
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise ValueError("grid counts do not inflate to their size")
    return raw


def _array(body: bytes, dtype: str, count: int, offset: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize * count
    if offset + size > len(body):
        raise ValueError("cut short")
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset)


def decode(data: bytes, source: str) -> WindowSummary:
    """The summary in ``data``; SummaryFormatError names what is wrong with a damaged one."""
    return _whole(*_open(data, source), None, source)


def _open(data: bytes, source: str) -> tuple[int, bytes]:
    """The container checked whole (length, CRC) and its body inflated: the format and the body."""
    fmt, flags, body = check(data, source)
    if flags & DEFLATED:
        try:
            body = _inflate_body(body)
        except _PARSE_ERRORS as err:
            raise SummaryFormatError(f"{source}: malformed summary ({err})") from None
    return fmt, body


def _whole(fmt: int, body: bytes, cols: Columns | None, source: str) -> WindowSummary:
    """Every series of the body parsed (``cols``: its version-4 columns, if read already)."""
    try:
        if fmt == 3:
            header, names, pos = _header(body)
            series = []
            for _ in names:
                s, pos = _read_series_v3(body, pos)
                series.append(s)
        else:
            cols = cols or _read_columns(body)
            header, names, pos = dict(cols.header), cols.names, cols.end
            series = []
            grids = (np.split(cols.grid_counts, np.cumsum(cols.grid_lengths)[:-1])
                     if cols.grid_counts is not None else [None] * len(names))
            for i, grid in enumerate(grids):
                s, pos = _read_series_v4(body, pos, cols, i, grid)
                series.append(s)
        if pos != len(body):
            raise ValueError(f"{len(body) - pos} bytes after the last series")
    except _PARSE_ERRORS as err:
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


def _tail(body: bytes, pos: int, flags: int, wide: bool) -> tuple[np.ndarray, np.ndarray, bytes, int]:
    """A series' histogram edges and counts and its sketch, from ``pos``."""
    (n_edges,) = _U16.unpack_from(body, pos)
    pos += 2
    edge_width = 4 if flags & F32_EDGES else 8
    edges = _array(body, f"<f{edge_width}", n_edges, pos).astype(np.float64)
    pos += edge_width * n_edges
    width = 8 if wide else 4
    counts = _array(body, f"<u{width}", n_edges + 1, pos)
    pos += width * (n_edges + 1)
    (n,) = _U32.unpack_from(body, pos)
    pos += 4
    kll = bytes(body[pos:pos + n])
    if len(kll) != n:
        raise ValueError("sketch cut short")
    return edges, counts, kll, pos + n


def _series(tallies, lo: float, hi: float, mean: float, m2: float, edges: np.ndarray, counts: np.ndarray,
            kll: bytes, flags: int, grid: np.ndarray | None) -> NumericSummary:
    count, missing, nan, inf = tallies
    has = count > 0
    if has and not (math.isfinite(mean) and m2 >= 0 and lo <= hi):  # NaN fails every comparison
        raise ValueError("a series with values but impossible moments (non-finite, min above max, or m2 < 0)")
    # every field comes typed from the fixed layout: no validation to pay for, 65 times a summary
    return _built(
        count=count, missing=missing, nonfinite=nan + inf, nan=nan, inf=inf,
        min=lo if has else None, max=hi if has else None, mean=mean if has else None,
        variance=m2 / count if has else None,
        hist_edges=edges.tolist(), hist_counts=counts.tolist(),
        kll=kll or None, kll_type="f32" if flags & F32_SKETCH else "f64",
        grid_counts=None if grid is None else grid.tolist(),
    )


def _read_series_v4(body: bytes, pos: int, cols: Columns, i: int, grid) -> tuple[NumericSummary, int]:
    (flags,) = _U8.unpack_from(body, pos)
    if flags & ~(F32_SKETCH | F32_EDGES):
        raise ValueError(f"unknown series flags {flags:#x}")
    edges, counts, kll, pos = _tail(body, pos + 1, flags, cols.wide)
    lo, hi, mean, m2 = cols.moments[i].tolist()
    return _series(cols.tallies[i].tolist(), lo, hi, mean, m2, edges, counts, kll, flags, grid), pos


def _read_series_v3(body: bytes, pos: int) -> tuple[NumericSummary, int]:
    (flags,) = _U8.unpack_from(body, pos)
    pos += 1
    if flags & ~(F32_SKETCH | WIDE_COUNTS | F32_EDGES | EXTREMES_IN_SKETCH):
        raise ValueError(f"unknown series flags {flags:#x}")
    tally = _WIDE if flags & WIDE_COUNTS else _NARROW
    tallies = tally.unpack_from(body, pos)
    pos += tally.size
    if flags & EXTREMES_IN_SKETCH:
        mean, m2 = _PAIR.unpack_from(body, pos)
        pos += _PAIR.size
        lo = hi = math.nan  # from the sketch, below
    else:
        lo, hi, mean, m2 = _MOMENTS.unpack_from(body, pos)
        pos += _MOMENTS.size
    edges, counts, kll, pos = _tail(body, pos, flags, bool(flags & WIDE_COUNTS))
    if flags & EXTREMES_IN_SKETCH:
        if not (flags & F32_SKETCH) or not kll:
            raise ValueError("extremes said to be in a sketch that is not there")
        lo, hi = kll_extremes(kll)
    return _series(tallies, lo, hi, mean, m2, edges, counts, kll, flags, None), pos
