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


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto in server mode on loopback: real HTTP, real request signing."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server; its name."""
    import uuid

    import boto3

    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    name = f"edgeloop-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=name)
    yield name
