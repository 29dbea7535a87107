import subprocess
import sys

import pytest

from edge_runtime.contracts import ContractError, RuntimeConfig, load_runtime_config, summary_key


def write(tmp_path, text):
    p = tmp_path / "edge.yaml"
    p.write_text(text)
    return p


def test_missing_key_is_named_in_one_line(tmp_path):
    with pytest.raises(ContractError) as err:
        load_runtime_config(write(tmp_path, "bundle: b\n"))
    assert str(err.value) == f"{tmp_path / 'edge.yaml'}: missing key 'device_id'"


def test_nested_missing_and_unknown_keys(tmp_path):
    with pytest.raises(ContractError, match="unknown key 'window.minutes'"):
        load_runtime_config(write(tmp_path, "device_id: d\nbundle: b\nwindow: {minutes: 5}\n"))
    with pytest.raises(ContractError, match="key 'window.seconds'"):
        load_runtime_config(write(tmp_path, "device_id: d\nbundle: b\nwindow: {seconds: -1}\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ContractError, match="not valid YAML"):
        load_runtime_config(write(tmp_path, "device_id: [unclosed\n"))
    with pytest.raises(ContractError, match="no such config file"):
        load_runtime_config(tmp_path / "nope.yaml")
    with pytest.raises(ContractError, match="mapping"):
        load_runtime_config(write(tmp_path, "- a\n- b\n"))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_runtime_config(write(tmp_path, "device_id: d\nbundle: bundle\nstore: {url: s3://b/p}\n"))
    assert cfg.bundle == str(tmp_path / "bundle")
    assert cfg.sinks.outbox == str(tmp_path / "outbox")
    assert cfg.store.url == "s3://b/p"
    assert cfg.source.path == "-"


def test_overrides_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_runtime_config(None, {"device_id": "007", "bundle": "/b", "window.seconds": "60"})
    assert cfg.device_id == "007" and cfg.window.seconds == 60
    assert cfg.sinks.events == str(tmp_path / "events.jsonl")


def test_device_id_cannot_break_the_key_layout():
    with pytest.raises(ValueError):
        RuntimeConfig(device_id="a/b", bundle="x")


def test_summary_key_layout():
    from datetime import datetime, timezone

    start = datetime(2026, 11, 1, 13, 0, tzinfo=timezone.utc)
    assert summary_key("m", "1.0.0", "dev-1", start) == (
        "summaries/model=m/version=1.0.0/device=dev-1/date=2026-11-01/20261101T130000Z.json"
    )


def test_cli_reports_missing_key_and_exits_nonzero(tmp_path):
    cfg = write(tmp_path, "bundle: b\n")
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "--config", str(cfg)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"edgeloop run: error: {cfg}: missing key 'device_id'"]


def test_json_summaries_of_versions_1_and_2_are_still_read_and_merge_with_version_3():
    import base64
    import json

    import numpy as np
    from datasketches import kll_doubles_sketch

    from edge_runtime.contracts import SUMMARY_SCHEMA_VERSION, load_summary
    from edge_runtime.summary import decode_sketch, merge_summaries, summarise

    empty = {"count": 0, "missing": 0, "nonfinite": 0, "hist_edges": [], "hist_counts": [0]}
    v1 = {"schema_version": 1, "model_name": "m", "model_version": "1.0.0", "device_id": "d",
          "window_start": "2026-11-01T00:00:00Z", "window_end": "2026-11-01T01:00:00Z",
          "records": 3, "rejected": 1, "late": 0, "outliers": 0, "features": {"a": empty}, "score": empty}
    old = load_summary(json.dumps(v1), "v1.json")
    assert old.schema_version == 1 and old.health is None and old.rejected_by_reason == {}
    assert old.instance_id is None and old.records_digest is None
    assert SUMMARY_SCHEMA_VERSION == 4
    with pytest.raises(ContractError, match="schema_version"):
        load_summary(json.dumps({**v1, "schema_version": 5}), "v5.json")
    # a version-2 series: base64 of a doubles sketch, NaN and Inf in one count
    x = np.arange(1000, dtype=np.float64)
    sketch = kll_doubles_sketch(200)
    sketch.update(x)
    series = {"count": 1000, "missing": 0, "nonfinite": 2, "min": 0.0, "max": 999.0, "mean": float(x.mean()),
              "variance": float(x.var()), "hist_edges": [500.0], "hist_counts": [500, 500],
              "kll": base64.b64encode(sketch.serialize()).decode()}
    v2 = load_summary(json.dumps({**v1, "schema_version": 2, "features": {"a": series}, "score": series}), "v2")
    assert v2.features["a"].kll_type == "f64" and decode_sketch(v2.features["a"]).n == 1000
    newer = summarise(np.arange(1000, 2000, dtype=np.float64), [500.0])
    merged = merge_summaries([v2.features["a"], newer])
    assert merged.count == 2000 and merged.hist_counts == [500, 1500] and merged.kll_type == "f32"
    assert merged.nonfinite == merged.inf == 2  # the old single count carried over
    assert decode_sketch(merged).n == 2000
    assert abs(decode_sketch(merged).get_quantile(0.5) - 1000) < 2000 * 0.03


def test_a_set_override_keeps_strings_and_can_clear_an_optional_key(tmp_path):
    config = load_runtime_config(write(tmp_path, "device_id: d\nbundle: b\n"),
                                 {"device_id": "007", "window.max_past_s": "null", "window.seconds": "60"})
    assert config.device_id == "007"  # a thing name stays as written
    assert config.window.max_past_s is None and config.window.seconds == 60
