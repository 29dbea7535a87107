"""The fake nucleus (tests/nucleus.py) against the real awsiotsdk GreengrassCoreIPCClientV2."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("awsiot.greengrasscoreipc.clientv2")

from awsiot.eventstreamrpc import AccessDeniedError  # noqa: E402
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2  # noqa: E402
from awsiot.greengrasscoreipc.model import (  # noqa: E402
    QOS,
    BinaryMessage,
    ConfigurationUpdateEvents,
    IoTCoreMessage,
    JsonMessage,
    PublishMessage,
    ResourceNotFoundError,
    ServiceError,
    SubscriptionResponseMessage,
)
from nucleus import Nucleus, encode_message, read_message, topic_matches, wait_until  # noqa: E402

CONFIG = {"model": {"threshold": 0.5, "labels": ["a", "b"]}, "interval": 10}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths must stay under ~107 bytes, so not pytest's (long) tmp_path.
    d = Path(tempfile.mkdtemp(prefix="gg-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nucleus(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Nucleus]:
    with Nucleus(sock_dir / "ipc.sock", configuration=CONFIG) as n:
        for key, value in n.env().items():
            monkeypatch.setenv(key, value)
        yield n


@pytest.fixture
def client(nucleus: Nucleus) -> Iterator[GreengrassCoreIPCClientV2]:
    c = GreengrassCoreIPCClientV2()
    yield c
    c.close()


def _bounded(fn, timeout: float = 5):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=timeout)


def test_connect_counts_handshakes(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    assert nucleus.connections == 1
    other = GreengrassCoreIPCClientV2()
    try:
        assert nucleus.connections == 2
    finally:
        other.close()


def test_publish_to_iot_core_is_recorded(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    client.publish_to_iot_core(topic_name="dt/dev/events", qos=QOS.AT_LEAST_ONCE, payload=b"\x00{json}")
    assert nucleus.iot_core_published == [{"topic": "dt/dev/events", "qos": "1", "payload": b"\x00{json}"}]


def test_publish_to_topic_is_recorded(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    binary, js = BinaryMessage(message=b"raw"), JsonMessage(message={"k": 1})
    client.publish_to_topic(topic="local/a", publish_message=PublishMessage(binary_message=binary))
    client.publish_to_topic(topic="local/b", publish_message=PublishMessage(json_message=js))
    assert nucleus.local_published == [{"topic": "local/a", "payload": b"raw"},
                                       {"topic": "local/b", "payload": b'{"k": 1}'}]


def test_subscribe_to_topic_receives_delivered_messages(nucleus: Nucleus,
                                                        client: GreengrassCoreIPCClientV2) -> None:
    got: list[SubscriptionResponseMessage] = []
    _, op = client.subscribe_to_topic(topic="cmd/+/run", on_stream_event=got.append)
    nucleus.wait_subscribed("local", "cmd/+/run")
    assert nucleus.deliver_local("other/topic", b"no") == 0
    assert nucleus.deliver_local("cmd/x/run", b"\x01\x02") == 1
    assert wait_until(lambda: len(got) == 1)
    assert got[0].binary_message.message == b"\x01\x02"
    assert got[0].binary_message.context.topic == "cmd/x/run"
    op.close().result(5)
    assert wait_until(lambda: nucleus.deliver_local("cmd/x/run", b"late") == 0)


def test_subscribe_to_iot_core_receives_delivered_messages(nucleus: Nucleus,
                                                           client: GreengrassCoreIPCClientV2) -> None:
    got: list[IoTCoreMessage] = []
    client.subscribe_to_iot_core(topic_name="cmd/dev/#", qos=QOS.AT_LEAST_ONCE, on_stream_event=got.append)
    nucleus.wait_subscribed("iot_core", "cmd/dev/#")
    assert nucleus.deliver_iot_core("cmd/dev/reload", b"go") == 1
    assert wait_until(lambda: len(got) == 1)
    assert (got[0].message.topic_name, got[0].message.payload) == ("cmd/dev/reload", b"go")


def test_get_configuration(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    whole = client.get_configuration()
    assert (whole.component_name, whole.value) == ("com.edgeloop.runtime", CONFIG)
    assert client.get_configuration(key_path=["model"]).value == CONFIG["model"]
    assert client.get_configuration(key_path=[]).value == CONFIG
    with pytest.raises(ResourceNotFoundError):
        client.get_configuration(key_path=["missing"])


def test_configuration_update_event_after_set_configuration(nucleus: Nucleus,
                                                            client: GreengrassCoreIPCClientV2) -> None:
    got: list[ConfigurationUpdateEvents] = []
    client.subscribe_to_configuration_update(key_path=[], on_stream_event=got.append)
    nucleus.wait_subscribed("configuration")
    nucleus.set_configuration({"interval": 20})
    assert wait_until(lambda: len(got) == 1)
    event = got[0].configuration_update_event
    assert (event.component_name, event.key_path) == ("com.edgeloop.runtime", [])
    assert client.get_configuration().value == {"interval": 20}


def test_update_state_recorded(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    client.update_state(state="RUNNING")
    client.update_state(state="ERRORED")
    assert nucleus.states == ["RUNNING", "ERRORED"]


def test_wrong_token_fails_to_connect(nucleus: Nucleus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVCUID", "wrong")
    with pytest.raises(AccessDeniedError):
        _bounded(GreengrassCoreIPCClientV2)
    assert nucleus.connections == 0


def test_fail_publish_raises(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    nucleus.fail_publish = True
    with pytest.raises(ServiceError):
        client.publish_to_iot_core(topic_name="t", qos=QOS.AT_LEAST_ONCE, payload=b"x")
    assert nucleus.iot_core_published == []
    nucleus.fail_publish = False
    client.publish_to_iot_core(topic_name="t", qos=QOS.AT_LEAST_ONCE, payload=b"x")
    assert len(nucleus.iot_core_published) == 1


def test_unknown_operation_raises(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    with pytest.raises(ServiceError):
        _bounded(client.list_components)


def test_ping_is_answered(nucleus: Nucleus, client: GreengrassCoreIPCClientV2) -> None:
    # the client never pings on its own; check the raw protocol instead
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(nucleus.socket_path)
        base = {":message-flags": 0, ":stream-id": 0}
        s.sendall(encode_message({":message-type": 4, **base, ":version": "0.1.0"}, b'{"authToken": "test-token"}'))
        assert read_message(s)[0][":message-flags"] == 1
        s.sendall(encode_message({":message-type": 2, **base}, b"hello"))
        headers, payload = read_message(s)
        assert (headers[":message-type"], payload) == (3, b"hello")


def test_stop_with_connected_client_is_prompt(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = Nucleus(sock_dir / "ipc.sock").start()
    for key, value in n.env().items():
        monkeypatch.setenv(key, value)
    c = GreengrassCoreIPCClientV2()
    c.subscribe_to_topic(topic="a", on_stream_event=lambda _e: None)
    t0 = time.monotonic()
    n.stop()
    assert time.monotonic() - t0 < 1
    with pytest.raises(Exception):  # noqa: B017 (ConnectionClosedError or similar)
        _bounded(lambda: c.update_state(state="RUNNING"))
    c.close()


def test_restart_serves_new_clients(nucleus: Nucleus) -> None:
    nucleus.stop()
    nucleus.start()
    c = _bounded(GreengrassCoreIPCClientV2)
    try:
        c.update_state(state="RUNNING")
        assert nucleus.states == ["RUNNING"]
    finally:
        c.close()


def test_topic_matches() -> None:
    assert topic_matches("a/+/c", "a/b/c") and topic_matches("a/#", "a/b/c") and topic_matches("#", "x")
    assert not topic_matches("a/+", "a/b/c") and not topic_matches("a/b", "a") and not topic_matches("a", "a/b")
