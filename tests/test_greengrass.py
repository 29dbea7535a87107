"""The runtime under Greengrass: the real awsiotsdk IPC client against a test nucleus (nucleus.py,
an eventstream-RPC server on a Unix socket): records from local pub/sub and IoT Core, events to IoT
Core, configuration read at start and followed live, component state, a nucleus restart."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import helpers
import pytest
from helpers import bundle_copy, normal_rows, read_jsonl, record_line, wait_for
from nucleus import Nucleus

from edge_runtime.contracts import ContractError, load_runtime_config, load_summary
from edge_runtime.greengrass import NucleusLink, component_configuration, under_greengrass
from edge_runtime.service import Service
from edge_runtime.store import LocalStore

pytest.importorskip("awsiot.greengrasscoreipc.clientv2")


@pytest.fixture
def nucleus(monkeypatch):
    folder = tempfile.mkdtemp(prefix="gg-")  # a Unix socket path must stay under ~107 bytes
    with Nucleus(Path(folder) / "ipc.socket", configuration={}) as n:
        for k, v in n.env().items():
            monkeypatch.setenv(k, v)
        yield n
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def serving(config, link, overrides=None):
    """The service as the nucleus runs it; the IPC connection closed after."""
    try:
        with helpers.serving(config, nucleus=link, overrides=overrides) as running:
            yield running
    finally:
        link.close()


def gg_config(make_config, **extra):
    return make_config(health={"log_interval_s": 0}, **extra)


def outlier(i: int, ts: float) -> bytes:
    row = normal_rows(1, seed=i)[0].copy()
    row[5] += 2000
    return record_line(row, ts=ts, rid=f"g{i}").encode()


def test_under_greengrass_records_come_from_local_pubsub_and_events_go_to_iot_core(make_config, nucleus, tmp_path):
    assert under_greengrass()
    config = gg_config(make_config, publish={"heartbeat_s": 0.2})
    with serving(config, NucleusLink()) as (svc, _):
        assert svc.config.source.kind == "ipc" and svc.config.publish.kind == "ipc"  # detected, not configured
        nucleus.wait_subscribed("local", "edgeloop/dev-test/records")
        now = time.time()
        records = [record_line(r, ts=now).encode() for r in normal_rows(5)]
        for body in records + [outlier(1, now), b"{broken", b"[" + b",".join(records[:2]) + b"]"]:
            assert nucleus.deliver_local("edgeloop/dev-test/records", body) == 1
        wait_for(lambda: svc.health.records_in >= 9)
        wait_for(lambda: [p for p in nucleus.iot_core_published if p["topic"] == "edgeloop/dev-test/outliers"])
        wait_for(lambda: [p for p in nucleus.iot_core_published if p["topic"] == "edgeloop/dev-test/health"])
        assert nucleus.states[0] == "RUNNING"
    (event,) = [json.loads(p["payload"]) for p in nucleus.iot_core_published if p["topic"].endswith("/outliers")]
    assert event["id"] == "g1" and event["kind"] == "outlier"
    assert svc.health.scored == 8 and sum(svc.health.rejected.values()) == 1
    assert [d["code"] for d in read_jsonl(tmp_path / "dead-letter.jsonl")] == ["malformed_json"]


def test_records_from_iot_core(make_config, nucleus):
    config = gg_config(make_config, source={"kind": "ipc", "ipc": {"via": "iot_core", "topics": ["fleet/+/in"]}})
    with serving(config, NucleusLink()) as (svc, _):
        nucleus.wait_subscribed("iot_core", "fleet/+/in")
        assert nucleus.deliver_iot_core("fleet/a/in", record_line(normal_rows(1)[0], ts=time.time()).encode()) == 1
        wait_for(lambda: svc.health.scored >= 1)


def test_configuration_is_read_at_start_and_followed_live(make_config, nucleus, bundle_dir, tmp_path, caplog):
    nucleus.set_configuration({"runtime": {"window": {"seconds": 600}, "publish": {"heartbeat_s": 0},
                                           "bundle": str(bundle_dir)}})
    link = NucleusLink()
    extra = component_configuration(link)
    # as the recipe's Run script passes them; the component configuration's runtime mapping comes under
    overrides = {"device_id": "dev-test", "sinks.outbox": str(tmp_path / "outbox"),
                 "sinks.events": str(tmp_path / "events.jsonl"), "sinks.dead_letter": str(tmp_path / "dl.jsonl"),
                 "store.url": str(tmp_path / "store"), "health.log_interval_s": "0"}
    config = load_runtime_config(None, overrides, extra)
    assert config.window.seconds == 600
    v2 = bundle_copy(bundle_dir, tmp_path / "v2", "1.1.0")
    with caplog.at_level(logging.INFO), serving(config, link, overrides) as (svc, _):
        nucleus.wait_subscribed("configuration")
        nucleus.wait_subscribed("local")
        now = time.time()
        nucleus.deliver_local("edgeloop/dev-test/records", outlier(2, now))
        wait_for(lambda: nucleus.iot_core_published)
        # a deployment changes the window, the events topic and the model: no restart
        nucleus.set_configuration({"runtime": {"window": {"seconds": 60}, "bundle": str(v2),
                                               "scoring": {"threshold": 1e9},  # nothing is an outlier now
                                               "publish": {"heartbeat_s": 0, "events_topic": "plant/{device_id}/ev",
                                                           "also_local": True}}})
        wait_for(lambda: svc.runtime.model.version == "1.1.0")
        assert svc.runtime.config.window.seconds == 60
        nucleus.deliver_local("edgeloop/dev-test/records", outlier(3, now))
        wait_for(lambda: svc.health.scored >= 2)
        assert svc.runtime.threshold(svc.runtime.model) == 1e9 and svc.health.outliers == 1
        nucleus.set_configuration({"runtime": {"window": {"seconds": 60}, "bundle": str(v2),
                                               "publish": {"heartbeat_s": 0, "events_topic": "plant/{device_id}/ev",
                                                           "also_local": True}}})  # the bundle's threshold again
        wait_for(lambda: svc.runtime.config.scoring.threshold is None)
        nucleus.deliver_local("edgeloop/dev-test/records", outlier(3, now))
        wait_for(lambda: [p for p in nucleus.iot_core_published if p["topic"] == "plant/dev-test/ev"])
        wait_for(lambda: [p for p in nucleus.local_published if p["topic"] == "plant/dev-test/ev"])
    assert "reload: applied window, scoring.threshold, publish" in caplog.text
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [(e["id"], e["version"]) for e in events if e["kind"] == "outlier"] == [("g2", "1.0.0"), ("g3", "1.1.0")]
    store = LocalStore(tmp_path / "store")
    sums = [load_summary(store.get(k), k) for k in store.list("summaries/")]
    assert sum(s.records for s in sums) == 3
    assert {(s.model_version, (s.window_end - s.window_start).total_seconds()) for s in sums} == {
        ("1.0.0", 600.0), ("1.1.0", 60.0)}


def test_the_runtime_survives_a_nucleus_restart(make_config, nucleus):
    config = gg_config(make_config, publish={"heartbeat_s": 0})
    with serving(config, NucleusLink()) as (svc, _):
        nucleus.wait_subscribed("local")
        nucleus.deliver_local("edgeloop/dev-test/records", outlier(4, time.time()))
        wait_for(lambda: nucleus.iot_core_published)
        nucleus.stop()
        nucleus.start()  # the nucleus restarted: subscriptions and the publisher come back
        nucleus.wait_subscribed("local", timeout=15)
        nucleus.deliver_local("edgeloop/dev-test/records", outlier(5, time.time()))
        wait_for(lambda: len([p for p in nucleus.iot_core_published if p["topic"].endswith("/outliers")]) >= 2)
        assert svc.health.scored == 2


def test_ipc_off_greengrass_is_a_clear_error(make_config, monkeypatch):
    monkeypatch.delenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", raising=False)
    with pytest.raises(ContractError, match="needs the Greengrass nucleus"):
        Service(make_config(source={"kind": "ipc"}))


def test_a_refused_publish_neither_loses_the_event_nor_stops_the_records(make_config, nucleus, tmp_path):
    config = gg_config(make_config, publish={"heartbeat_s": 0})
    with serving(config, NucleusLink()) as (svc, _):
        nucleus.wait_subscribed("local")
        nucleus.fail_publish = True  # the nucleus answers PublishToIoTCore with an error
        nucleus.deliver_local("edgeloop/dev-test/records", outlier(6, time.time()))
        wait_for(lambda: svc.health.outliers >= 1)
        time.sleep(0.5)
        nucleus.fail_publish = False
        # the subscription is still up, and the refused event goes once the nucleus takes it
        assert nucleus.deliver_local("edgeloop/dev-test/records", outlier(7, time.time())) == 1
        wait_for(lambda: {json.loads(p["payload"])["id"] for p in nucleus.iot_core_published} == {"g6", "g7"})


def test_records_arrive_in_order_and_configuration_is_followed_after_a_nucleus_restart(nucleus, bundle_dir,
                                                                                       tmp_path):
    overrides = {"device_id": "dev-test", "bundle": str(bundle_dir), "sinks.outbox": str(tmp_path / "outbox"),
                 "sinks.events": str(tmp_path / "events.jsonl"), "sinks.dead_letter": str(tmp_path / "dl.jsonl"),
                 "store.url": str(tmp_path / "store"), "health.log_interval_s": "0", "publish.heartbeat_s": "0"}
    config = load_runtime_config(None, overrides)
    with serving(config, NucleusLink(), overrides) as (svc, _):
        nucleus.wait_subscribed("local")
        emit = svc.source._emit

        def slow_emit(payload, rng=__import__("random").Random(3)):  # a busy engine: callbacks overlap if they can
            time.sleep(rng.uniform(0, 0.003))
            return emit(payload)

        svc.source._emit = slow_emit
        now = time.time()
        for i in range(100):
            nucleus.deliver_local("edgeloop/dev-test/records", outlier(100 + i, now))
        wait_for(lambda: svc.health.outliers >= 100)
        nucleus.stop()
        nucleus.start()
        nucleus.wait_subscribed("configuration", timeout=15)  # followed again on the new connection
        nucleus.set_configuration({"runtime": {"window": {"seconds": 120}}})
        wait_for(lambda: svc.runtime.config.window.seconds == 120)
    ids = [e["id"] for e in read_jsonl(tmp_path / "events.jsonl") if e["kind"] == "outlier"]
    assert ids == [f"g{100 + i}" for i in range(100)]  # one callback thread: in the order sent


def test_the_model_component_named_in_the_configuration_is_the_bundle(nucleus, bundle_dir, tmp_path, monkeypatch):
    """The runtime component serves the model component its configuration names, from where the
    nucleus unzipped it; a model that is not on the device, or a nucleus that left {iot:thingName}
    uninterpolated in the access policy, is a clear error rather than a bundle that is not there."""
    root = tmp_path / "greengrass"
    unzipped = root / "packages" / "artifacts-unarchived" / "com.edgeloop.model.m" / "1.2.0" / "bundle"
    shutil.copytree(bundle_dir, unzipped)
    monkeypatch.setenv("EDGELOOP_GREENGRASS_ROOT", str(root))
    link = NucleusLink()
    nucleus.set_configuration({"model": {"component": "com.edgeloop.model.m", "version": "1.2.0"},
                               "runtime": {"window": {"seconds": 60}}, "onnxruntime": "cpu"})
    assert component_configuration(link) == {"window": {"seconds": 60}, "bundle": str(unzipped)}
    nucleus.set_configuration({"model": {"component": "com.edgeloop.model.m", "version": "1.3.0"}})
    with pytest.raises(ContractError, match="com.edgeloop.model.m 1.3.0 is not on this device"):
        component_configuration(link)
    nucleus.set_configuration({"model": {"component": "com.edgeloop.model.m", "version": "latest"}})
    with pytest.raises(ContractError, match="version"):
        component_configuration(link)
    nucleus.set_configuration({"model": {}, "accessControl": {"aws.greengrass.ipc.pubsub": {"p": {
        "operations": ["aws.greengrass#SubscribeToTopic"], "resources": ["edgeloop/{iot:thingName}/records"]}}}})
    with pytest.raises(ContractError, match="interpolateComponentConfiguration: true"):
        component_configuration(link)
    monkeypatch.delenv("EDGELOOP_GREENGRASS_ROOT")
    nucleus.set_configuration({"model": {"component": "com.edgeloop.model.m", "version": "1.2.0"}})
    with pytest.raises(ContractError, match="EDGELOOP_GREENGRASS_ROOT is not set"):
        component_configuration(link)
    link.close()
