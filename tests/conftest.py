from __future__ import annotations

from pathlib import Path  # noqa: F401

import pytest

from cloud import synthetic
from cloud.train import train
from edge_runtime.contracts import RuntimeConfig
from model_compile.compile import compile_bundle


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trained")
    data = synthetic.write_training_csv(work / "train.csv", rows=6000, seed=3)
    train(data, work / "model", seed=3)
    return work / "model"


@pytest.fixture(scope="session")
def bundle_dir(trained_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    compile_bundle(trained_dir, out)
    return out


@pytest.fixture
def make_config(tmp_path, bundle_dir):
    def make(**overrides) -> RuntimeConfig:
        doc = {
            "device_id": "dev-test",
            "bundle": str(bundle_dir),
            "window": {"seconds": 3600},
            "sinks": {"events": str(tmp_path / "events.jsonl"),
                      "dead_letter": str(tmp_path / "dead-letter.jsonl"),
                      "outbox": str(tmp_path / "outbox")},
            "store": {"url": str(tmp_path / "store")},
        }
        doc.update(overrides)
        return RuntimeConfig.model_validate(doc)
    return make
