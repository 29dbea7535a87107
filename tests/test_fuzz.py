"""Property-based tests (hypothesis) of what a device may throw at the edge runtime: JSON lines of any
shape or none, byte streams cut anywhere, binary frames whole, split or forged, and all of it end to end."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from helpers import normal_rows, read_jsonl, record_line
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cloud import synthetic
from edge_runtime.contracts import FeatureSpec, InputSchema, SourceConfig, load_summary
from edge_runtime.frames import HEADER, MAGIC, FrameError, FrameSplitter, decode_frame, encode_frame, read_header
from edge_runtime.records import MS_FROM, Reason, RecordDecoder, TooLong
from edge_runtime.runtime import TS_CEILING, EdgeRuntime
from edge_runtime.sources import TOO_LONG_HEAD, LineSplitter, StreamCutter
from edge_runtime.store import LocalStore

FEATURES = list(synthetic.FEATURES)
T0 = float(synthetic.START_TS)
F32_MAX = float(np.finfo(np.float32).max)
REASONS = frozenset(v for k, v in vars(Reason).items() if k.isupper() and isinstance(v, str))
DAY = 86_400.0

SCHEMA = InputSchema(name="X", shape=[None, 6], features=[FeatureSpec(name=f) for f in FEATURES])
SCHEMAS = [
    SCHEMA,
    InputSchema(name="X", shape=[None, 1], features=[FeatureSpec(name=FEATURES[0])]),  # the 1-key itemgetter path
    InputSchema(name="X", shape=[None, 6], features=[
        FeatureSpec(name=f, missing="impute", impute_value=0.5) if f == "rpm" else FeatureSpec(name=f)
        for f in FEATURES]),
]
PLAUSIBLE = (T0 - 365 * DAY, T0 + DAY)  # what a runtime whose clock reads T0 would allow

# --- raw JSON text: values a device might write, rendered as tokens so 1e400 and NaN stay literal ----------


def obj(items) -> str:
    """A JSON object from (key, raw JSON token) pairs, keys in the order given."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items) + "}"


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a": ' * depth + "1" + "}" * depth
    return "[" * depth  # never closed


DEEP = st.builds(nested, st.integers(2000, 10_000), st.sampled_from(["array", "object", "open"]))
HUGE_INT = st.builds(lambda sign, first, n: f"{sign}{first}{'7' * n}",
                     st.sampled_from(["", "-"]), st.integers(1, 9), st.integers(15, 6000))
ODD_NUMBER = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999", "1e39", "-1e300", "3.4028235e38", "3.4028236e38",
    "-3.4028234663852886e+38", "1e-400", "-0.0", "0", "18446744073709551615", "18446744073709551616",
    "9223372036854775808", "-9223372036854775809", "1" * 30,
])
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                             max_size=4), max_leaves=8)
ANY_TOKEN = st.one_of(JSON_VALUE.map(json.dumps), ODD_NUMBER, HUGE_INT, DEEP)
GOOD_NUMBER = st.one_of(st.floats(-1e6, 1e6).map(json.dumps), st.integers(-10**6, 10**6).map(str))

FIXED_OFFSET = st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-(23 * 60 + 59), 23 * 60 + 59))
ISO = st.builds(
    lambda dt, z, sep: dt.isoformat(sep=sep).replace("+00:00", "Z" if z else "+00:00"),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999_999),
                 timezones=st.none() | FIXED_OFFSET),
    st.booleans(), st.sampled_from(["T", " "]),
)
TS_TOKEN = st.one_of(
    st.integers(int(T0 - 20 * 365 * DAY), int(T0 + 20 * 365 * DAY)).map(str),  # seconds
    st.floats(T0 - 2 * DAY, T0 + 2 * DAY).map(json.dumps),
    st.integers(MS_FROM, 10**16).map(str),  # milliseconds
    st.integers(-(10**14), 0).map(str),  # before 1970
    st.integers().map(str), st.floats().map(json.dumps), ODD_NUMBER, HUGE_INT,
    ISO.map(json.dumps),
    st.sampled_from(["0001-01-01T00:00:00", "0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00-23:59",
                     "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999-23:59", "9999-12-31T23:59:59+23:59",
                     "2026-11-01", "2026-W44-7", "yesterday", "", "Z", "NaN"]).map(json.dumps),
    JSON_VALUE.map(json.dumps), DEEP,
)


@st.composite
def feature_token(draw) -> str:
    return draw(GOOD_NUMBER) if draw(st.integers(0, 9)) else draw(ANY_TOKEN)  # mostly plausible


@st.composite
def record_like(draw) -> bytes:
    """Something shaped like a record, in any of the three layouts or none, with any values."""
    values = [(n, draw(feature_token())) for n in FEATURES if draw(st.integers(0, 9))]
    extra = draw(st.lists(st.tuples(st.text(max_size=8), ANY_TOKEN), max_size=2))
    items = [] if draw(st.integers(0, 4)) == 0 else [("ts", draw(TS_TOKEN))]
    layout = draw(st.sampled_from(["top", "dict", "list", "odd"]))
    if layout == "top":
        items += values + extra
    elif layout == "dict":
        items.append(("features", obj(values + (extra if draw(st.booleans()) else []))))
    elif layout == "list":
        n = draw(st.sampled_from([0, 1, 5, 6, 6, 6, 7]))
        items.append(("features", "[" + ", ".join(draw(feature_token()) for _ in range(n)) + "]"))
    else:
        items += [("features", draw(ANY_TOKEN))] + values
    if draw(st.booleans()):
        items.append(("id", draw(ANY_TOKEN)))
    return obj(draw(st.permutations(items))).encode()


@st.composite
def mangled(draw) -> bytes:
    """A record-like line truncated, or with a byte changed."""
    line = draw(record_like())
    at = draw(st.integers(0, max(len(line) - 1, 0)))
    if draw(st.booleans()):
        return line[:at]
    return line[:at] + bytes([draw(st.integers(0, 255))]) + line[at + 1:]


BLANK = st.sampled_from([b"", b" ", b"\t", b"\r", b"  \x0b\x0c \t"])
LINE = st.one_of(
    record_like(), record_like(), mangled(), st.binary(max_size=64), ANY_TOKEN.map(str.encode), BLANK,
    st.builds(TooLong, st.integers(1, 10**9), st.binary(max_size=16)),
)
TS_RANGE = st.one_of(
    st.just(PLAUSIBLE), st.just((0.0, TS_CEILING)),
    st.tuples(st.floats(0, 2 * T0), st.floats(0, TS_CEILING)).map(sorted).map(tuple),
)


def is_blank(line) -> bool:
    return isinstance(line, bytes) and not line.strip()


# --- 1. the decoder never raises and accounts for every line -----------------------------------------


@settings(max_examples=250, deadline=None)
@given(schema=st.sampled_from(SCHEMAS), lines=st.lists(LINE, max_size=10), ts_range=TS_RANGE)
@example(schema=SCHEMA, lines=[b"[" * 10_000 + b"]" * 10_000, b"\xff\xfe", b'{"ts": 1e400}', b"  "],
         ts_range=PLAUSIBLE)
def test_decoder_never_raises_and_every_line_is_one_row_or_one_rejection(schema, lines, ts_range):
    d = RecordDecoder(schema).decode(lines, ts_range)
    n = len(schema.features)
    accepted = d.index.tolist()
    rejected = [r.index for r in d.rejections]
    assert sorted(accepted + rejected) == [i for i, x in enumerate(lines) if not is_blank(x)]
    assert accepted == sorted(accepted) and rejected == sorted(rejected)  # both in payload order

    assert d.values.dtype == np.float32 and d.values.shape == (len(accepted), n)
    assert d.ts.shape == (len(accepted),) and len(d.ids) == len(accepted)
    assert np.isfinite(d.values).all() and (np.abs(d.values) <= F32_MAX).all()
    lo, hi = ts_range
    assert all(np.isnan(t) or lo <= t <= hi for t in d.ts.tolist())

    names = set(schema.feature_names)
    for r in d.rejections:
        assert r.code in REASONS and isinstance(r.reason, str) and r.reason.strip()
        assert set(r.missing) <= names and set(r.nonfinite) <= names
        if r.code == Reason.MISSING:
            assert r.missing
        if r.code == Reason.NON_FINITE:
            assert r.nonfinite and not r.missing
        if isinstance(lines[r.index], TooLong):
            assert r.code == Reason.TOO_LONG
    assert not any(isinstance(lines[i], TooLong) for i in accepted)


# --- 2. a valid record is accepted exactly, whatever came before it ---------------------------------------

FLOAT32_RANGE = st.floats(-F32_MAX, F32_MAX, allow_nan=False)
# metadata any JSON parser takes: not nested past its depth limit nor an integer past Python's 4300 digits
META_TOKEN = st.one_of(JSON_VALUE.map(json.dumps), ODD_NUMBER, st.text(st.characters(categories=["Cs"])).map(json.dumps),
                       st.builds(lambda n: "8" * n, st.integers(20, 4000)))


@st.composite
def valid_record(draw):
    """(line, float32 values, expected ts or NaN, id) of a record that must be accepted."""
    values = draw(st.lists(FLOAT32_RANGE | st.integers(-(2**63), 2**63 - 1), min_size=6, max_size=6))
    tokens = [json.dumps(v) for v in values]
    expected = np.array([np.float32(float(v)) for v in values], dtype=np.float32)
    kind = draw(st.sampled_from(["none", "seconds", "float", "ms", "iso"]))
    lo, hi = PLAUSIBLE
    if kind == "none":
        ts_items, ts = [], float("nan")
    elif kind == "seconds":
        ts = draw(st.integers(int(lo) + 1, int(hi)))
        ts_items = [("ts", str(ts))]
    elif kind == "float":
        ts = draw(st.floats(lo, hi))
        ts_items = [("ts", json.dumps(ts))]
    elif kind == "ms":
        ms = draw(st.integers(int(lo) * 1000 + 1000, int(hi) * 1000))
        ts, ts_items = ms / 1000.0, [("ts", str(ms))]
    else:
        dt = datetime.fromtimestamp(draw(st.integers(int(lo) + 1, int(hi))), tz=timezone.utc)
        ts, ts_items = dt.timestamp(), [("ts", json.dumps(dt.isoformat().replace("+00:00", "Z")))]
    rid = draw(st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10))
    id_items = [] if rid is None else [("id", json.dumps(rid))]
    layout = draw(st.sampled_from(["top", "dict", "list"]))
    if layout == "top":
        meta = [(k, draw(META_TOKEN)) for k in draw(st.lists(st.sampled_from(["site", "seq", "unit", "x"]),
                                                            unique=True, max_size=3))]
        items = list(zip(FEATURES, tokens)) + meta
    elif layout == "dict":
        items = [("features", obj(draw(st.permutations(list(zip(FEATURES, tokens))))))]
    else:
        items = [("features", "[" + ", ".join(tokens) + "]")]
    line = obj(draw(st.permutations(items + ts_items + id_items))).encode()
    return line, expected, ts, rid


@settings(max_examples=200, deadline=None)
@given(bad=st.lists(LINE, min_size=1, max_size=8), good=valid_record())
@example(bad=[b'{"ts": "0001-01-01T00:00:00+01:00", "rpm": NaN}', b"{" * 3000, TooLong(9, b"x")],
         good=(record_line(range(6), ts=T0).encode(), np.arange(6, dtype=np.float32), T0, None))
def test_a_valid_record_after_bad_lines_is_accepted_with_its_exact_values(bad, good):
    line, expected, ts, rid = good
    d = RecordDecoder(SCHEMA).decode([*bad, line], PLAUSIBLE)
    assert len(bad) in d.index.tolist(), [r for r in d.rejections if r.index == len(bad)]
    j = d.index.tolist().index(len(bad))
    assert np.array_equal(d.values[j], expected)
    assert (np.isnan(d.ts[j]) and np.isnan(ts)) or d.ts[j] == pytest.approx(ts, rel=0, abs=1e-6)
    assert d.ids[j] == rid


# --- 3. LineSplitter: any stream, cut anywhere -----------------------------------------------------------

STREAM = st.lists(st.binary(max_size=50) | st.just(b"\n") | st.just(b"\n\n"), max_size=25).map(b"".join)


@st.composite
def cut(draw, data: bytes) -> list[bytes]:
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def split_stream(splitter: LineSplitter, blocks: list[bytes]) -> list:
    out = []
    for block in blocks:
        out += splitter.feed(block)
        assert splitter._pending_len <= splitter.max_bytes
        assert sum(map(len, splitter._pending)) == splitter._pending_len  # what it says it holds is what it holds
        assert len(splitter._head) <= TOO_LONG_HEAD
    out += splitter.flush()
    assert splitter.flush() == []
    return out


def expected_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines  # a stream ending in a newline has no partial line


@settings(max_examples=300, deadline=None)
@given(data=st.data(), stream=STREAM, max_bytes=st.integers(1, 40))
def test_line_splitter_matches_split_for_any_cuts_and_holds_at_most_max_bytes(data, stream, max_bytes):
    blocks = data.draw(cut(stream))
    out = split_stream(LineSplitter(max_bytes), blocks)
    expected = expected_lines(stream)
    assert len(out) == len(expected)
    for got, line in zip(out, expected):
        if len(line) <= max_bytes:
            assert type(got) is bytes and got == line
        else:
            assert isinstance(got, TooLong) and got.size == len(line)


@pytest.mark.xfail(strict=True, reason=(
    "BUG LineSplitter._hold: when a pending (short) start of a line plus a new block without a newline goes "
    "over max_bytes, TooLong.head keeps only the pending bytes (b''.join(self._pending)[:TOO_LONG_HEAD]), not "
    "the first TOO_LONG_HEAD bytes of the line, so the dead letter's head depends on how the stream was cut"))
@settings(max_examples=200, deadline=None)
@given(data=st.data(), stream=STREAM, max_bytes=st.integers(1, 40))
@example(data=None, stream=b"abcdefgh\n", max_bytes=5)  # blocks b"abc", b"defgh", b"\n": head b"abc"
def test_line_splitter_too_long_head_is_the_start_of_the_line(data, stream, max_bytes):
    blocks = [b"abc", b"defgh", b"\n"] if data is None else data.draw(cut(stream))
    out = split_stream(LineSplitter(max_bytes), blocks)
    for got, line in zip(out, expected_lines(stream)):
        if isinstance(got, TooLong):
            assert got.head == line[:TOO_LONG_HEAD], (got, line)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), stream=STREAM, chunk=st.integers(1, 5))
def test_stream_cutter_numbers_lines_in_payloads_of_at_most_chunk(data, stream, chunk):
    cutter = StreamCutter("s", SourceConfig(max_message_bytes=256), chunk)
    payloads = [p for block in data.draw(cut(stream)) for p in cutter.feed(block)] + cutter.end()
    expected = expected_lines(stream)
    assert all(p.kind == "jsonl" and 1 <= len(p.items) <= chunk for p in payloads)
    assert [p.first_no for p in payloads] == [1 + sum(len(q.items) for q in payloads[:k]) for k in range(len(payloads))]
    items = [x for p in payloads for x in p.items]
    assert [x.size if isinstance(x, TooLong) else x for x in items] == [
        len(x) if len(x) > 256 else x for x in expected]


# --- 4. binary frames ---------------------------------------------------------------------------------------

F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def finite_matrix(draw, max_rows: int = 12, max_features: int = 8) -> np.ndarray:
    shape = (draw(st.integers(0, max_rows)), draw(st.integers(1, max_features)))
    return draw(hnp.arrays(np.float32, shape, elements=F32))


@st.composite
def timestamps(draw, n: int) -> np.ndarray | None:
    if draw(st.booleans()):
        return None
    lo, hi = PLAUSIBLE
    return draw(hnp.arrays(np.float64, n, elements=st.floats(lo, hi) | st.just(float("nan"))))


def names_for(f: int) -> list[str]:
    return [f"f{i}" for i in range(f)]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), values=finite_matrix())
def test_frames_round_trip_any_finite_float32_matrix(data, values):
    ts = data.draw(timestamps(len(values)))
    frame = encode_frame(values, ts)
    assert len(frame) == HEADER.size + read_header(frame).body_size
    d = decode_frame(frame, names_for(values.shape[1]), PLAUSIBLE)
    assert d.rejections == []
    assert d.values.dtype == np.float32 and d.values.shape == values.shape
    assert np.array_equal(d.values.view(np.uint32), values.view(np.uint32))  # bit for bit, -0.0 included
    expected_ts = np.full(len(values), np.nan) if ts is None else ts
    assert np.array_equal(d.ts, expected_ts, equal_nan=True)
    assert d.index.tolist() == list(range(len(values))) and d.ids == [None] * len(values)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), matrices=st.lists(finite_matrix(max_rows=6, max_features=4), min_size=1, max_size=6))
def test_frame_splitter_returns_whole_frames_in_order_for_any_split(data, matrices):
    frames = [encode_frame(m, data.draw(timestamps(len(m)))) for m in matrices]
    stream = b"".join(frames)
    limit = max(max(map(len, frames)), 256)
    splitter = FrameSplitter(max(map(len, frames)))  # the largest frame is exactly at the limit
    cutter = StreamCutter("s", SourceConfig(format="frames", max_message_bytes=limit), 1)
    got, payloads = [], []
    for block in data.draw(cut(stream)):
        got += splitter.feed(block)
        payloads += cutter.feed(block)
    assert got == frames and splitter.leftover() == 0
    payloads += cutter.end()
    assert [(p.kind, p.items, p.first_no, p.n) for p in payloads] == [
        ("frame", [f], i + 1, max(len(m), 1)) for i, (f, m) in enumerate(zip(frames, matrices))]


FORGED_HEADER = st.builds(
    lambda flags, reserved, f, n, body: HEADER.pack(MAGIC, flags, reserved, f, n) + body,
    st.integers(0, 255) | st.just(1) | st.just(0), st.integers(0, 255) | st.just(0), st.integers(0, 65535),
    st.integers(0, 2**32 - 1) | st.integers(0, 8), st.binary(max_size=200))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), stream=st.lists(st.binary(max_size=40) | FORGED_HEADER, max_size=6).map(b"".join),
       max_bytes=st.integers(12, 4096))
def test_frame_splitter_on_random_bytes_yields_frames_or_raises_frame_error(data, stream, max_bytes):
    splitter = FrameSplitter(max_bytes)
    frames, failed = [], False
    for block in data.draw(cut(stream)):
        try:
            frames += splitter.feed(block)
        except FrameError:
            failed = True
            break
    joined = b"".join(frames)
    assert stream.startswith(joined)
    for frame in frames:
        assert HEADER.size + read_header(frame).body_size == len(frame) <= max_bytes
    if not failed:
        assert len(joined) + splitter.leftover() == len(stream)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), values=finite_matrix(max_rows=10, max_features=6))
def test_decode_frame_rejects_exactly_the_rows_with_nan_or_inf(data, values):
    n, f = values.shape
    values = values.copy()
    poisoned = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n)) if n else [])
    for i in poisoned:
        cols = data.draw(st.sets(st.integers(0, f - 1), min_size=1))
        for c in cols:
            values[i, c] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    names = names_for(f)
    d = decode_frame(encode_frame(values, data.draw(timestamps(n))), names, PLAUSIBLE)
    assert [r.index for r in d.rejections] == poisoned
    for r in d.rejections:
        row = values[r.index]
        assert r.missing == tuple(nm for nm, v in zip(names, row) if np.isnan(v))
        assert r.nonfinite == tuple(nm for nm, v in zip(names, row) if np.isinf(v))
        assert r.code == (Reason.MISSING if r.missing else Reason.NON_FINITE) and r.reason
    clean = [i for i in range(n) if i not in poisoned]
    assert d.index.tolist() == clean
    assert np.array_equal(d.values.view(np.uint32), values[clean].view(np.uint32))


# --- 5. end to end: junk never costs a valid record, and every line is counted once -------------------------

ROWS = normal_rows(64, seed=7)
CLOCK = T0 + 3600.0  # the device clock of the end-to-end runs: T0 .. T0 + 3 h is plausible


def parses_to_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


@st.composite
def broken_line(draw) -> bytes:
    """A line that must be dead-lettered: one defect in an otherwise good record, or no record at all."""
    row = ROWS[draw(st.integers(0, len(ROWS) - 1))]
    items = [("ts", json.dumps(T0 + draw(st.integers(0, 7200))))] + [(n, repr(float(v))) for n, v in zip(FEATURES, row)]
    kind = draw(st.sampled_from(["drop", "value", "raw", "ts", "shape", "unexpected", "truncate", "json", "bytes"]))
    victim = draw(st.integers(1, 6))
    if kind == "drop":
        del items[victim]
    elif kind == "value":
        bad = draw(st.text(max_size=8) | st.booleans() | st.none() | st.lists(st.floats(), max_size=3)
                   | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
        items[victim] = (items[victim][0], json.dumps(bad))
    elif kind == "raw":
        bad = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e39", "3.4028236e38", "9" * 400])
                   | st.builds(lambda sign, n: sign + "9" * n, st.sampled_from(["", "-"]), st.integers(40, 4000))
                   | DEEP)
        items[victim] = (items[victim][0], bad)
    elif kind == "ts":
        bad = draw(st.sampled_from(["-5", "0", "true", "null", '"yesterday"', '"0001-01-01T00:00:00"',
                                    '"9999-12-31T23:59:59Z"', "1e300", "NaN", "[]", "{}", "1" * 400])
                   | st.integers(int(CLOCK + 2 * DAY), 10**11 - 1).map(str)  # too far ahead, in seconds
                   | st.integers(int(CLOCK + 2 * DAY) * 1000, 10**15).map(str)  # or in milliseconds
                   | st.integers(-(10**15), int(CLOCK - 11 * 365 * DAY)).map(str))  # or too far back
        if bad == "null":
            bad = '"not a time"'  # a missing ts is allowed: keep it bad
        items[0] = ("ts", bad)
    elif kind == "shape":
        n = draw(st.sampled_from([0, 1, 5, 7, 12]))
        items = [items[0], ("features", json.dumps([float(v) for v in (list(row) * 2)[:n]]))]
    elif kind == "unexpected":
        items = [items[0], ("features", obj(items[1:] + [(draw(st.sampled_from(["x", "rpm2", "Temp"])), "1.0")]))]
    elif kind == "json":
        return json.dumps(draw(JSON_VALUE.filter(lambda v: not isinstance(v, dict)))).encode()
    elif kind == "bytes":
        return draw(st.binary(min_size=1, max_size=64).filter(lambda b: b.strip() and not parses_to_object(b)))
    line = obj(draw(st.permutations(items))).encode()
    if kind == "truncate":
        line = line[:draw(st.integers(1, len(line) - 1))]
    return line


@st.composite
def good_line(draw) -> bytes:
    row = ROWS[draw(st.integers(0, len(ROWS) - 1))].copy()
    if draw(st.integers(0, 7)) == 0:
        row[5] += 2000  # an rpm spike: an outlier, which writes an event
    ts = None if draw(st.integers(0, 7)) == 0 else T0 + draw(st.integers(0, 3 * 3600 - 1))
    rid = draw(st.none() | st.integers(0, 10**6) | st.text(max_size=8))
    return record_line(row, ts=ts, rid=rid).encode()


def run_lines(make_config, tmp_path, lines, batch) -> tuple:
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by every example of a test
    config = make_config(
        sinks={"events": str(work / "events.jsonl"), "dead_letter": str(work / "dead-letter.jsonl"),
               "outbox": str(work / "outbox")},
        store={"url": str(work / "store")},
        batch={"max_records": batch},
    )
    rt = EdgeRuntime(config, clock=lambda: CLOCK)
    rt.process(lines)
    return rt.close(), work


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), good=st.lists(good_line(), max_size=30), batch=st.integers(1, 16))
def test_runtime_scores_every_valid_line_and_counts_every_other_once(make_config, tmp_path, data, good, batch):
    junk = data.draw(st.lists(broken_line() | BLANK, max_size=30))
    lines = data.draw(st.permutations(good + junk))
    non_blank = sum(1 for x in lines if x.strip())
    stats, work = run_lines(make_config, tmp_path, lines, batch)

    assert stats.scored == len(good)
    assert stats.scored + stats.rejected == stats.lines == non_blank
    store = LocalStore(work / "store")
    summaries = [load_summary(store.get(k), k) for k in store.list("summaries/")]
    assert sum(s.records for s in summaries) == stats.scored
    assert sum(s.rejected for s in summaries) == stats.rejected
    assert sum(sum(s.rejected_by_reason.values()) for s in summaries) == stats.rejected
    assert sum(s.outliers for s in summaries) == stats.outliers
    assert len(read_jsonl(work / "dead-letter.jsonl")) == stats.rejected
    assert not list(LocalStore(work / "outbox").list())  # everything forwarded


@pytest.mark.xfail(strict=True, raises=TypeError, reason=(
    "BUG EdgeRuntime._outlier_events: an accepted outlier record whose 'id' is a string with a lone surrogate "
    "(JSON escape \\ud800; orjson refuses it, the lenient json.loads fallback accepts it) crashes handle() "
    "with TypeError from orjson.dumps ('str is not valid UTF-8: surrogates not allowed'), which takes down "
    "the service loop"))
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rid=st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
       | st.tuples(st.text(max_size=4), st.characters(categories=["Cs"])).map("".join))
@example(rid="\ud800")
def test_runtime_survives_any_string_id_on_an_outlier(make_config, tmp_path, rid):
    row = ROWS[0].copy()
    row[5] += 2000
    stats, work = run_lines(make_config, tmp_path, [record_line(row, ts=T0, rid=rid)], 8)
    assert stats.scored == 1 and stats.outliers == 1
    assert len(read_jsonl(work / "events.jsonl")) == 1
