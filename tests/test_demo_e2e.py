"""The whole loop on a small simulated fleet, through the public entry points."""

import json
import subprocess
import sys

from cloud.demo import run_demo


def test_demo_finds_the_drifted_devices_and_the_anomalies(tmp_path):
    result = run_demo(tmp_path / "demo", devices=5, rows=2880, seed=11, echo=lambda *_: None)
    assert sorted(result.drifted_found) == ["dev-02", "dev-04"]
    assert result.drifted_features["dev-02"] == ["temperature"]
    assert result.drifted_features["dev-04"] == ["temperature"]
    # the loop closed: a challenger retrained on the cohort went to it, and the next day reads ok
    assert result.retrained == "1.0.1", result.retrain_reason
    assert result.cleared == ["dev-02", "dev-04"] and result.still_drifted == []
    assert result.recall >= 0.8
    assert result.false_positive_rate <= 0.02
    assert result.rejected == 5 * 4
    doc = json.loads(result.drift_json.read_text())
    assert doc["models"][0]["drifted_devices"] == ["dev-02", "dev-04"]

    # the store, reviewed again through the CLI over the drifted day, gives the same verdicts
    out = tmp_path / "again.json"
    proc = subprocess.run([sys.executable, "-m", "cloud.cli", "fleet", "drift", "--store",
                           str(tmp_path / "demo" / "store"), "--json", str(out), "--until", "2026-11-03T00:00:00Z",
                           "--cycle", "24h"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "drifted devices: dev-02, dev-04" in proc.stdout
    assert json.loads(out.read_text())["models"][0]["drifted_devices"] == ["dev-02", "dev-04"]


def test_cli_train_compile_run_chain(tmp_path):
    from helpers import record_line

    from cloud import synthetic

    data = synthetic.write_training_csv(tmp_path / "t.csv", rows=3000)

    def edgeloop(*args):
        return subprocess.run([sys.executable, "-m", "cloud.cli", *args], capture_output=True, text=True)

    assert edgeloop("train", "--data", str(data), "--out", str(tmp_path / "m")).returncode == 0
    assert edgeloop("compile", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b")).returncode == 0
    rows = synthetic.device_stream("d", 30, seed=1, anomaly_rate=0).X
    (tmp_path / "in.jsonl").write_text("\n".join(record_line(r) for r in rows))
    (tmp_path / "edge.yaml").write_text("device_id: d\nbundle: b\nsource: {path: in.jsonl}\n")
    proc = edgeloop("run", "--config", str(tmp_path / "edge.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "scored=30" in proc.stdout and "windows=1" in proc.stdout
    bad = edgeloop("compile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b2"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr
