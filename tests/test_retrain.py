"""Retraining and the watch that starts it: a challenger is registered only if it beats the champion."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from cloud import synthetic
from cloud.registry import approval, fetch_bundle, register
from cloud.retrain import retrain
from cloud.watch import watch_round
from edge_runtime.bundle import load_bundle
from edge_runtime.contracts import RuntimeConfig
from edge_runtime.service import run_file
from edge_runtime.store import LocalStore

COHORT_DRIFT = synthetic.Drift("temperature", 2.0)


def fresh_csv(path, drift: synthetic.Drift | None, rows: int = 2880, seed: int = 5):
    """Two days of one device's records, drifted from the start or not, as CSV."""
    stream = synthetic.device_stream("fresh", rows, seed=seed, anomaly_rate=0.0, drift=drift, drift_from=0)
    lines = [",".join(synthetic.FEATURES)] + [",".join(f"{v:.5f}" for v in row) for row in stream.X]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_challenger_that_fits_the_new_data_is_registered_pending_approval(tmp_path, bundle_dir):
    store = LocalStore(tmp_path / "store")
    register(bundle_dir, store)
    result = retrain(fresh_csv(tmp_path / "fresh.csv", COHORT_DRIFT), bundle_dir, tmp_path / "out", "1.0.1",
                     store=store)
    assert result.better and result.registered, result.reason
    assert result.champion.worst_feature == "temperature" and result.champion.worst_ks > 0.5
    assert result.challenger.worst_ks < 0.1 and result.challenger.calibration_error < 0.04  # 864 held-out rows
    assert result.champion.flagged_rate > 0.2  # the champion flags the cohort's normal data as outliers
    assert approval(store, "sensor-outliers", "1.0.1") == "PendingManualApproval"
    fetched = fetch_bundle(store, "sensor-outliers", "1.0.1", tmp_path / "fetched")
    assert load_bundle(fetched).manifest.version == "1.0.1"


def test_a_challenger_that_is_not_better_is_not_registered(tmp_path, bundle_dir):
    store = LocalStore(tmp_path / "store")
    register(bundle_dir, store)
    result = retrain(fresh_csv(tmp_path / "fresh.csv", None), bundle_dir, tmp_path / "out", "1.0.1", store=store)
    assert not result.better and not result.registered
    assert approval(store, "sensor-outliers", "1.0.1") is None
    assert list(store.list("models/model=sensor-outliers/version=1.0.1/")) == []


@pytest.fixture
def drifting_fleet(tmp_path, bundle_dir):
    """A registered champion and two devices' days: one healthy, one whose temperature moved."""
    store = LocalStore(tmp_path / "store")
    register(bundle_dir, store)
    for i, drift in enumerate((None, COHORT_DRIFT)):
        device = f"dev-{i}"
        stream = synthetic.device_stream(device, 1440, seed=40 + i, anomaly_rate=0.0, drift=drift, drift_from=0)
        source = synthetic.write_jsonl(stream, tmp_path / device / "in.jsonl")
        config = RuntimeConfig(device_id=device, bundle=str(bundle_dir), window={"seconds": 3600},
                               sinks={"events": str(tmp_path / device / "ev.jsonl"),
                                      "dead_letter": str(tmp_path / device / "dl.jsonl"),
                                      "outbox": str(tmp_path / device / "outbox")},
                               store={"url": str(tmp_path / "store")})
        run_file(config, source)
    return store


def test_watch_retrains_once_per_cohort_and_champion(tmp_path, drifting_fleet):
    state = tmp_path / "watch" / "state.json"
    said = []
    kwargs = dict(data=fresh_csv(tmp_path / "fresh.csv", COHORT_DRIFT), out_dir=tmp_path / "watch",
                  cycle_s=synthetic.CYCLE_S, echo=said.append)
    (action,) = watch_round(drifting_fleet, state, **kwargs)
    assert (action.model, action.champion, action.challenger, action.devices) == (
        "sensor-outliers", "1.0.0", "1.0.1", ["dev-1"])
    assert action.detail["registered"] and action.detail["approval"] == "PendingManualApproval"
    assert watch_round(drifting_fleet, state, **kwargs) == []  # the next round does not start it again
    assert any("already started" in line for line in said)


def test_watch_can_start_a_sagemaker_pipeline_instead(tmp_path, drifting_fleet):
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/retrain/execution/abc"
    with Stubber(client) as stub:
        stub.add_response("start_pipeline_execution", {"PipelineExecutionArn": arn}, {
            "PipelineName": "retrain", "PipelineExecutionDisplayName": "retrain-sensor-outliers-1-0-1",
            "PipelineParameters": [{"Name": "Model", "Value": "sensor-outliers"},
                                   {"Name": "ChampionVersion", "Value": "1.0.0"},
                                   {"Name": "ChallengerVersion", "Value": "1.0.1"},
                                   {"Name": "Store", "Value": "s3://fleet/plant7"},
                                   {"Name": "DriftedDevices", "Value": "dev-1"}]})
        (action,) = watch_round(drifting_fleet, tmp_path / "state.json", out_dir=tmp_path, pipeline="retrain",
                                sagemaker=client, store_url="s3://fleet/plant7", cycle_s=synthetic.CYCLE_S,
                                echo=lambda *_: None)
        stub.assert_no_pending_responses()
    assert action.how == "pipeline" and action.detail == {"execution": arn}
