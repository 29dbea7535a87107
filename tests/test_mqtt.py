"""MQTT as a record source, against a real broker (Debian's mosquitto, started here on loopback
with plain, TLS and mutual-TLS listeners; see broker.py)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from broker import Broker
from helpers import normal_rows, read_jsonl, record_line, serving, wait_for

from edge_runtime.contracts import load_summary
from edge_runtime.frames import encode_frame
from edge_runtime.store import LocalStore

pytestmark = pytest.mark.skipif(not Broker.available(), reason="mosquitto is not installed (.ci/run installs it)")

T0 = 1_793_491_200


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


def publish(broker: Broker, topic: str, messages: list[bytes], listener: str = "plain") -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    if listener != "plain":
        c = broker.certs
        client.tls_set(ca_certs=str(c.ca), certfile=str(c.client_cert), keyfile=str(c.client_key))
    client.connect("127.0.0.1", broker.ports[listener])
    client.loop_start()
    try:
        for m in messages:
            client.publish(topic, m, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_config(make_config, broker, topic, listener="plain", cert=None, client="paho", **extra):
    c = broker.certs
    mqtt = {"host": "127.0.0.1", "port": broker.ports[listener], "topics": [topic], "client": client,
            "client_id": f"edgeloop-test-{client}-{topic.replace('/', '-')}"}
    if listener != "plain":
        mqtt["ca_file"] = str(c.ca)
    if cert == "client":
        mqtt.update(cert_file=str(c.client_cert), key_file=str(c.client_key))
    elif cert == "stranger":
        mqtt.update(cert_file=str(c.stranger_cert), key_file=str(c.stranger_key))
    return make_config(source={"kind": "mqtt", "mqtt": mqtt, "max_message_bytes": 4096, **extra},
                       health={"log_interval_s": 0}, window={"seconds": 3600})


def summaries(tmp_path) -> list:
    store = LocalStore(tmp_path / "store")
    return [load_summary(store.get(k), k) for k in store.list("summaries/")]


@pytest.mark.parametrize("client", ["paho", "awsiotsdk"])
def test_records_from_a_topic_one_or_an_array_per_message_with_bad_messages_dead_lettered(
        make_config, broker, tmp_path, client):
    rows = normal_rows(8)
    lines = [record_line(r, ts=T0 + i, rid=f"m{i}") for i, r in enumerate(rows)]
    messages = [
        lines[0].encode(),                                    # one record
        ("[" + ",".join(lines[1:4]) + "]").encode(),          # an array of three
        lines[4].encode(), lines[5].encode(),
        b"not json at all",
        bytes(range(256)) * 2,                                # binary junk
        b"[" + b"1," * 3000 + b"1]",                          # over max_message_bytes
        json.dumps({"ts": T0, "features": [1, 2]}).encode(),  # wrong shape
        lines[6].encode(), lines[7].encode(),                 # later records still scored
    ]
    config = mqtt_config(make_config, broker, f"plant/{client}/records", client=client)
    with serving(config) as (svc, _):
        wait_for(svc.source.subscribed.is_set)
        publish(broker, f"plant/{client}/records", messages)
        # records_in counts arrivals; scoring follows on the engine's thread
        wait_for(lambda: svc.health.records_in >= 12 and svc.health.scored >= 8)
        assert svc.health.scored == 8
    (s,) = summaries(tmp_path)
    assert (s.records, s.rejected) == (8, 4)
    reasons = sorted(d["code"] for d in read_jsonl(tmp_path / "dead-letter.jsonl"))
    assert reasons == ["malformed_json", "malformed_json", "too_long", "wrong_shape"]
    assert all(d["source"] == f"mqtt:plant/{client}/records" for d in read_jsonl(tmp_path / "dead-letter.jsonl"))


def test_frames_from_a_topic(make_config, broker, tmp_path):
    import numpy as np

    rows = normal_rows(300).astype(np.float32)
    frames = [encode_frame(rows[i:i + 100], np.arange(T0 + i, T0 + i + 100, dtype=float)) for i in (0, 100, 200)]
    config = mqtt_config(make_config, broker, "plant/frames", format="frames")
    with serving(config) as (svc, _):
        wait_for(svc.source.subscribed.is_set)
        publish(broker, "plant/frames", frames + [b"ELF1 but not a frame"])
        wait_for(lambda: svc.health.records_in >= 301)
    (s,) = summaries(tmp_path)
    assert (s.records, s.rejected, s.rejected_by_reason) == (300, 1, {"bad_frame": 1})


@pytest.mark.parametrize("listener,cert,client", [("tls", None, "paho"), ("mtls", "client", "paho"),
                                                  ("mtls", "client", "awsiotsdk")])
def test_tls_and_mutual_tls(make_config, broker, tmp_path, listener, cert, client):
    rows = normal_rows(5)
    config = mqtt_config(make_config, broker, f"secure/{listener}", listener=listener, cert=cert, client=client)
    with serving(config) as (svc, _):
        wait_for(svc.source.subscribed.is_set)
        assert svc.source.endpoint.startswith("mqtts://")
        publish(broker, f"secure/{listener}", [record_line(r, ts=T0 + i).encode() for i, r in enumerate(rows)],
                listener="mtls")
        wait_for(lambda: svc.health.scored >= 5)
    assert sum(s.records for s in summaries(tmp_path)) == 5


def test_a_refused_client_certificate_is_a_clear_error_retried_with_backoff_not_a_crash(
        make_config, broker, caplog):
    config = mqtt_config(make_config, broker, "secure/refused", listener="mtls", cert="stranger")
    with caplog.at_level(logging.ERROR, logger="edge_runtime.mqtt"):
        with serving(config) as (svc, out):
            wait_for(lambda: len([r for r in caplog.records if "cannot connect" in r.getMessage()]) >= 2, 10)
            assert not svc.source.connected.is_set()
    errors = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert f"mqtts://127.0.0.1:{broker.ports['mtls']}" in errors[0]
    assert "retrying in" in errors[0] and len(errors) < 10  # backoff, not a hot loop
    assert out["stats"].scored == 0  # and the service stopped cleanly


def test_no_record_is_lost_across_a_broker_restart(make_config, broker, tmp_path):
    rows = normal_rows(40)
    lines = [record_line(r, ts=T0 + i).encode() for i, r in enumerate(rows)]
    config = mqtt_config(make_config, broker, "plant/restart")
    with serving(config) as (svc, _):
        wait_for(svc.source.subscribed.is_set)
        publish(broker, "plant/restart", lines[:20])
        wait_for(lambda: svc.health.scored >= 20)
        broker.restart(down_s=0.5)  # the runtime's session survives in the broker's persistence
        publish(broker, "plant/restart", lines[20:])  # QoS 1, kept for the runtime until it is back
        wait_for(lambda: svc.health.scored >= 40, timeout=30)
    # QoS 1 is at least once: a record handled just before the link dropped, whose ack had not gone
    # out yet, comes again; never fewer than were sent, and at most the broker's in-flight window more
    assert 40 <= sum(s.records for s in summaries(tmp_path)) <= 40 + 20


# -- events and heartbeats out -------------------------------------------------------------------------

class Subscriber:
    """Collects what the broker delivers on a topic filter."""

    def __init__(self, broker: Broker, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))
        self.client.connect("127.0.0.1", broker.ports["plain"])
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        time.sleep(0.2)

    def on(self, topic: str) -> list[dict]:
        return [m for t, m in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publishing_config(make_config, broker, client="paho", **publish):
    return make_config(source={"kind": "tcp", "port": 0}, health={"log_interval_s": 0},
                       publish={"kind": "mqtt", "mqtt": {"host": "127.0.0.1", "port": broker.ports["plain"],
                                                         "reconnect_max_s": 1, "client": client}, **publish})


def send_tcp(svc, lines: list[str]) -> None:
    import socket

    with socket.create_connection(tuple(svc.source.address)) as conn:
        conn.sendall("".join(line + "\n" for line in lines).encode())


def outlier_lines(n: int, first: int = 0) -> list[str]:
    rows = normal_rows(n, seed=first + 1)
    rows[:, 5] += 2000  # every one an outlier
    return [record_line(r, ts=time.time(), rid=f"o{first + i}") for i, r in enumerate(rows)]


@pytest.mark.parametrize("client", ["paho", "awsiotsdk"])
def test_outlier_events_and_a_health_heartbeat_go_to_the_broker(make_config, broker, client):
    sub = Subscriber(broker, "edgeloop/dev-test/#")
    try:
        with serving(publishing_config(make_config, broker, client, heartbeat_s=0.3)) as (svc, _):
            send_tcp(svc, outlier_lines(3) + [record_line(normal_rows(1)[0], ts=time.time())])
            wait_for(lambda: len(sub.on("edgeloop/dev-test/outliers")) >= 3)
            wait_for(lambda: sub.on("edgeloop/dev-test/health"))
        events = sub.on("edgeloop/dev-test/outliers")
        assert sorted(e["id"] for e in events) == ["o0", "o1", "o2"] and all(e["kind"] == "outlier" for e in events)
        beat = sub.on("edgeloop/dev-test/health")[-1]
        assert beat["provider"] == "CPUExecutionProvider" and beat["records_in"] >= 0
        assert svc.health.events_published >= 4
    finally:
        sub.close()


def test_events_wait_in_a_bounded_queue_while_the_broker_is_away(make_config, broker):
    with serving(publishing_config(make_config, broker, max_queue=5, heartbeat_s=0)) as (svc, _):
        wait_for(svc.publisher.link.connected.is_set)
        broker.stop()
        wait_for(lambda: not svc.publisher.link.connected.is_set())
        send_tcp(svc, outlier_lines(8, first=10))
        wait_for(lambda: svc.health.outliers >= 8)
        assert svc.publisher.queued == 5 and svc.health.events_dropped == 3  # the oldest three went
        assert svc.health.window_header().events_dropped == 3
        broker.start()
        sub = Subscriber(broker, "edgeloop/dev-test/outliers")
        try:
            wait_for(lambda: len(sub.messages) >= 5, timeout=20)
            assert sorted(e["id"] for _, e in sub.messages) == [f"o{i}" for i in range(13, 18)]
        finally:
            sub.close()


def test_an_event_over_the_payload_limit_goes_as_a_reference_to_its_sample(make_config, broker):
    sub = Subscriber(broker, "edgeloop/dev-test/outliers")
    try:
        with serving(publishing_config(make_config, broker, max_payload_bytes=256, heartbeat_s=0)) as (svc, _):
            send_tcp(svc, outlier_lines(1, first=50))
            wait_for(lambda: sub.messages)
        (_, ref), = sub.messages
        assert ref["id"] == "o50" and ref["truncated"] > 256 and "features" not in ref
        assert ref["sample"].startswith("outliers/model=sensor-outliers/version=1.0.0/device=dev-test/")
        assert ref["sample"].endswith(f"-{svc.runtime.instance_id}-p0.jsonl.gz")
    finally:
        sub.close()
