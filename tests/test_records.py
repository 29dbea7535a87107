import json

import numpy as np
import pytest

from cloud.synthetic import FEATURES
from edge_runtime.contracts import FeatureSpec, InputSchema
from edge_runtime.records import Reason, RecordDecoder, TooLong

SCHEMA = InputSchema(name="X", shape=[None, len(FEATURES)], features=[FeatureSpec(name=f) for f in FEATURES])
GOOD = {f: float(i) for i, f in enumerate(FEATURES)}
ANY_TIME = (0.0, 4e9)


def decode(*records, ts_range=ANY_TIME, schema=SCHEMA):
    lines = [r if isinstance(r, (bytes, TooLong)) else (r if isinstance(r, str) else json.dumps(r)).encode()
             for r in records]
    return RecordDecoder(schema).decode(lines, ts_range)


def only_rejection(*records, **kw):
    d = decode(*records, **kw)
    assert len(d.values) == 0 and len(d.rejections) == 1
    return d.rejections[0]


def test_named_features_in_schema_order_with_metadata_ignored():
    d = decode({"ts": "2026-11-01T00:00:00Z", "id": 5, "site": "a", **GOOD})
    assert d.values.tolist() == [list(range(len(FEATURES)))] and d.values.dtype == np.float32
    assert d.ts.tolist() == [1793491200.0] and d.ids == [5] and d.index.tolist() == [0]


def test_array_and_object_forms_and_milliseconds():
    d = decode({"features": list(range(6)), "ts": 1793491200123}, {"features": GOOD})
    assert d.values.tolist() == [list(range(6))] * 2
    assert d.ts[0] == pytest.approx(1793491200.123) and np.isnan(d.ts[1])


@pytest.mark.parametrize("record, code, reason", [
    ('{"ts": 1, "temp', Reason.MALFORMED, "malformed JSON"),
    ("[1, 2, 3]", Reason.NOT_OBJECT, "not a JSON object"),
    ({"features": [1.0, 2.0]}, Reason.SHAPE, "wrong number of features: expected 6, got 2"),
    ({**GOOD, "rpm": "fast"}, Reason.NON_NUMERIC, "non-numeric value for 'rpm'"),
    ({**GOOD, "rpm": "1.5"}, Reason.NON_NUMERIC, "non-numeric value for 'rpm'"),
    ({**GOOD, "rpm": True}, Reason.NON_NUMERIC, "non-numeric value for 'rpm'"),
    ({"features": [True, 1, 2, 3, 4, 5]}, Reason.NON_NUMERIC, "non-numeric value for 'temperature'"),
    ({"features": {**GOOD, "extra": 1}}, Reason.UNEXPECTED, "unexpected features ['extra']"),
    ({**GOOD, "ts": "yesterday"}, Reason.BAD_TIMESTAMP, "bad timestamp"),
    ({**GOOD, "ts": True}, Reason.BAD_TIMESTAMP, "bad timestamp"),
    (b"\xff\xfe{\"a\": 1}", Reason.MALFORMED, "malformed JSON"),
    (b"[" * 5000 + b"]" * 5000, Reason.MALFORMED, "malformed JSON"),
    (TooLong(5_000_000, b'{"ts": 1'), Reason.TOO_LONG, "5000000 bytes"),
])
def test_bad_records_are_rejected_with_a_code_and_a_reason(record, code, reason):
    r = only_rejection(record)
    assert r.code == code and reason in r.reason


def test_missing_and_nonfinite_values_are_named():
    line = json.dumps({**GOOD, "rpm": None}).replace('"current": 4.0', '"current": NaN')
    r = only_rejection(line)
    assert r.code == Reason.MISSING and r.missing == ("rpm",) and r.nonfinite == ("current",)
    big = only_rejection({**GOOD, "rpm": 1e300})  # finite in float64, infinite in the model's float32
    assert big.code == Reason.NON_FINITE and big.nonfinite == ("rpm",)
    huge_int = only_rejection(json.dumps(GOOD).replace('"rpm": 5.0', '"rpm": ' + "9" * 400))
    assert huge_int.nonfinite == ("rpm",)
    inf = only_rejection(json.dumps(GOOD).replace('"rpm": 5.0', '"rpm": -Infinity'))
    assert inf.nonfinite == ("rpm",)


def test_absurd_integers_and_timestamps_are_rejected_not_raised():
    digits = "1" + "0" * 5000  # beyond Python's int-from-string limit
    assert only_rejection(json.dumps(GOOD).replace('"rpm": 5.0', f'"rpm": {digits}')).code == Reason.MALFORMED
    for ts in ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00", 253402300799999, 1e300, -5, "NaN"]:
        raw = json.dumps({**GOOD, "ts": ts}) if ts != "NaN" else json.dumps(GOOD)[:-1] + ', "ts": NaN}'
        r = only_rejection(raw)
        assert r.code in (Reason.TIMESTAMP_RANGE, Reason.BAD_TIMESTAMP), (ts, r)


def test_timestamps_outside_the_plausible_range_are_rejected_with_the_range():
    now = 1793491200.0
    d = decode({**GOOD, "ts": now + 10}, {**GOOD, "ts": now + 7200}, {**GOOD, "ts": now - 90_000},
               ts_range=(now - 86_400, now + 3600))
    assert d.ts.tolist() == [now + 10]
    assert [r.index for r in d.rejections] == [1, 2]
    assert all(r.code == Reason.TIMESTAMP_RANGE and "window.max_future_s" in r.reason for r in d.rejections)


def test_impute_policy_fills_missing_values():
    schema = InputSchema(name="X", shape=[None, 2], features=[
        FeatureSpec(name="a"), FeatureSpec(name="b", missing="impute", impute_value=3.5)])
    d = decode('{"a": 1}', schema=schema)
    assert np.allclose(d.values, [[1.0, 3.5]])


def test_a_bad_record_never_costs_its_batch_mates_and_order_is_kept():
    lines = [{**GOOD, "id": 0}, "{oops", {**GOOD, "id": 2}, "", {**GOOD, "rpm": None}, {**GOOD, "id": 5}]
    d = decode(*lines)
    assert d.ids == [0, 2, 5] and d.index.tolist() == [0, 2, 5]
    assert [(r.index, r.code) for r in d.rejections] == [(1, Reason.MALFORMED), (4, Reason.MISSING)]


def test_single_feature_models_decode_too():
    schema = InputSchema(name="X", shape=[None, 1], features=[FeatureSpec(name="value")])
    d = decode({"value": 3}, {"features": [4.5]}, {"value": "x"}, schema=schema)
    assert d.values.ravel().tolist() == [3.0, 4.5] and d.rejections[0].code == Reason.NON_NUMERIC


def test_a_nested_features_object_wins_over_top_level_keys_in_every_path():
    both = {**GOOD, "features": {f: 100.0 + i for i, f in enumerate(FEATURES)}}
    alone = decode(both)
    mixed = decode(both, "{bad")  # the line-by-line path
    assert alone.values.tolist() == mixed.values.tolist() == [[100.0 + i for i in range(6)]]
