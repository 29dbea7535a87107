"""The S3 adapter against moto in server mode: real HTTP, real boto3 request signing."""

import boto3
import pytest
from helpers import normal_rows, record_line

from cloud.drift import fleet_drift
from cloud.registry import register
from edge_runtime.runtime import EdgeRuntime
from edge_runtime.store import ObjectNotFound, S3Store, StoreError, open_store

BUCKET = "edgeloop-test"


@pytest.fixture
def s3_endpoint(moto_endpoint):
    return moto_endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def test_put_get_list_under_a_prefix(s3, s3_endpoint):
    store = open_store(f"s3://{BUCKET}/fleet-a", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store)
    store.put("summaries/x/1.json", b"one")
    store.put("summaries/y/2.json", b"two")
    store.put("outliers/x/1.jsonl", b"three")
    assert store.get("summaries/y/2.json") == b"two"
    assert list(store.list("summaries/")) == ["summaries/x/1.json", "summaries/y/2.json"]
    assert s3.get_object(Bucket=BUCKET, Key="fleet-a/outliers/x/1.jsonl")["Body"].read() == b"three"
    with pytest.raises(ObjectNotFound):
        store.get("summaries/none.json")
    with pytest.raises(ValueError):
        store.put("../escape", b"")


def test_missing_bucket_is_a_store_error(s3, s3_endpoint):
    store = open_store("s3://no-such-bucket", endpoint_url=s3_endpoint)
    with pytest.raises(StoreError):
        store.put("k", b"v")


def test_device_syncs_to_s3_and_fleet_review_reads_it(s3, s3_endpoint, make_config, bundle_dir, tmp_path):
    url = f"s3://{BUCKET}/fleet"
    store = open_store(url, endpoint_url=s3_endpoint)
    register(bundle_dir, store)
    config = make_config(store={"url": url, "endpoint_url": s3_endpoint})
    rows = normal_rows(300, seed=5)
    with EdgeRuntime(config) as rt:
        stats = rt.process(record_line(r, ts=1_793_491_200 + 60 * i) for i, r in enumerate(rows))
    assert stats.windows == 5 and stats.pending == 0
    reports, warnings = fleet_drift(store)
    assert warnings == []
    (report,) = reports
    (device,) = report.devices
    assert device.device_id == "dev-test" and device.records == 300 and device.windows == 5
