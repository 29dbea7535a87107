import json

import numpy as np
import pytest

from cloud.synthetic import FEATURES
from edge_runtime.contracts import FeatureSpec, InputSchema
from edge_runtime.records import Record, RecordParser, Rejection

SCHEMA = InputSchema(name="X", shape=[None, len(FEATURES)], features=[FeatureSpec(name=f) for f in FEATURES])
GOOD = {f: float(i) for i, f in enumerate(FEATURES)}


def parse(obj_or_line):
    line = obj_or_line if isinstance(obj_or_line, str) else json.dumps(obj_or_line)
    return RecordParser(SCHEMA).parse(line, 7)


def test_named_features_in_schema_order_with_metadata_ignored():
    r = parse({"ts": "2026-11-01T00:00:00Z", "id": 5, "site": "a", **GOOD})
    assert isinstance(r, Record)
    assert r.values.tolist() == list(range(len(FEATURES)))
    assert r.ts == 1793491200.0 and r.record_id == "5" and r.line_no == 7


def test_array_and_object_forms():
    assert parse({"features": list(range(6))}).values.tolist() == list(range(6))
    assert isinstance(parse({"features": GOOD}), Record)


@pytest.mark.parametrize("record, reason", [
    ('{"ts": 1, "temp', "malformed JSON"),
    ("[1, 2, 3]", "not a JSON object"),
    ({"features": [1.0, 2.0]}, "wrong number of features: expected 6, got 2"),
    ({**GOOD, "rpm": "fast"}, "non-numeric value for 'rpm'"),
    ({**GOOD, "rpm": True}, "non-numeric value for 'rpm'"),
    ({"features": {**GOOD, "extra": 1}}, "unexpected features ['extra']"),
    ({**GOOD, "ts": "yesterday"}, "bad timestamp"),
])
def test_bad_records_are_rejected_with_a_reason(record, reason):
    r = parse(record)
    assert isinstance(r, Rejection)
    assert reason in r.reason


def test_missing_and_nonfinite_values_are_named():
    line = json.dumps({**GOOD, "rpm": None}).replace('"current": 4.0', '"current": NaN')
    r = parse(line)
    assert isinstance(r, Rejection)
    assert r.missing == ["rpm"] and r.nonfinite == ["current"]
    big = parse({**GOOD, "rpm": 1e300})  # finite in float64, infinite in the model's float32
    assert isinstance(big, Rejection) and big.nonfinite == ["rpm"]


def test_impute_policy_fills_missing_values():
    schema = InputSchema(name="X", shape=[None, 2], features=[
        FeatureSpec(name="a"), FeatureSpec(name="b", missing="impute", impute_value=3.5)])
    r = RecordParser(schema).parse('{"a": 1}', 1)
    assert isinstance(r, Record) and np.allclose(r.values, [1.0, 3.5])
