"""Greengrass IPC: the runtime's transports when the nucleus runs it (awsiotsdk's client V2).

Detected from the nucleus's environment (the IPC socket path and the component's token). Here:

* ``NucleusLink``: the IPC connection, made again with backoff after the nucleus restarts;
* ``IpcSource``: records from local publish/subscribe (``SubscribeToTopic``) or AWS IoT Core
  (``SubscribeToIoTCore``), resubscribed after a reconnect; a message is one record, a JSON array
  of records, or a frame, as over MQTT;
* ``IpcPublisher``: outlier events and heartbeats to AWS IoT Core (``PublishToIoTCore``, QoS 1)
  from the bounded ``EventQueue``;
* ``component_configuration`` / ``follow_configuration``: the component's ``runtime`` configuration
  read at start and followed live (``SubscribeToConfigurationUpdate``);
* ``report_state``: ``UpdateState`` (RUNNING once serving, ERRORED with a log line on a fatal error).
"""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
from collections.abc import Callable

from .contracts import PublishConfig, SourceConfig
from .publish import EventQueue
from .sources import Emit, message_payload

log = logging.getLogger(__name__)

SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
CONFIG_KEY = "runtime"  # the component configuration key that holds runtime settings


def under_greengrass() -> bool:
    """The nucleus started us: its IPC socket and our token are in the environment."""
    return bool(os.environ.get(SOCKET_ENV)) and bool(os.environ.get(TOKEN_ENV))


class NucleusLink:
    """The IPC client, connected on first use and again after a failure."""

    def __init__(self) -> None:
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

                self._client = GreengrassCoreIPCClientV2()
                log.info("greengrass: connected to the nucleus at %s", os.environ.get(SOCKET_ENV))
            return self._client

    def drop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close(executor_wait=False)
            except Exception:
                pass

    def call(self, fn: Callable):
        """``fn(client)``; a failure drops the connection, so the next call makes a new one."""
        try:
            return fn(self.client())
        except Exception:
            self.drop()
            raise

    def close(self) -> None:
        self.drop()


def component_configuration(link: NucleusLink) -> dict:
    """The ``runtime`` mapping of this component's configuration ({} if there is none)."""
    try:
        value = link.call(lambda c: c.get_configuration(key_path=[CONFIG_KEY]).value)
    except Exception as err:
        if type(err).__name__ == "ResourceNotFoundError":
            return {}
        raise
    return value if isinstance(value, dict) else {}


def follow_configuration(link: NucleusLink, on_change: Callable[[], None]) -> None:
    """Call ``on_change`` when the component's ``runtime`` configuration changes."""
    link.call(lambda c: c.subscribe_to_configuration_update(
        key_path=[CONFIG_KEY], on_stream_event=lambda event: on_change()))


def report_state(link: NucleusLink, state: str) -> None:
    try:
        link.call(lambda c: c.update_state(state=state))
    except Exception as err:  # the state is a courtesy to the nucleus: never a reason to stop
        log.warning("greengrass: could not report state %s: %s", state, err)


class IpcSource:
    finite = False

    def __init__(self, config: SourceConfig, device_id: str, link: NucleusLink) -> None:
        self.config = config
        self.link = link
        ipc = config.ipc
        self.via = ipc.via
        self.topics = [t.format(device_id=device_id) for t in ipc.topics]
        self.name = f"greengrass:{ipc.via}:{','.join(self.topics)}"
        self.connected = threading.Event()
        self.received = 0
        self._no = 0
        self._closed = threading.Event()
        self._device_id = device_id
        self._ops: list = []
        self._retargeting = False

    def _on_message(self, topic: str, body: bytes) -> None:
        self.received += 1
        self._no += 1
        self._emit(message_payload(self.config, body, f"greengrass:{topic}", self._no))

    def _local_event(self, event) -> None:
        msg = event.binary_message or event.json_message
        if event.binary_message is not None:
            body, topic = msg.message or b"", getattr(msg.context, "topic", None) or self.topics[0]
        else:
            import orjson

            body, topic = orjson.dumps(msg.message), getattr(msg.context, "topic", None) or self.topics[0]
        self._on_message(topic, body)

    def _iot_event(self, event) -> None:
        msg = event.message
        body = msg.payload if isinstance(msg.payload, bytes) else base64.b64decode(msg.payload or b"")
        self._on_message(msg.topic_name, body)

    def _subscribe(self) -> None:
        from awsiot.greengrasscoreipc.model import QOS

        for topic in self.topics:
            if self.via == "local":
                _, op = self.link.call(lambda c, t=topic: c.subscribe_to_topic(
                    topic=t, on_stream_event=self._local_event, on_stream_error=self._stream_error,
                    on_stream_closed=self._closed.set))
            else:
                qos = QOS.AT_LEAST_ONCE if self.config.ipc.qos else QOS.AT_MOST_ONCE
                _, op = self.link.call(lambda c, t=topic, qos=qos: c.subscribe_to_iot_core(
                    topic_name=t, qos=qos, on_stream_event=self._iot_event, on_stream_error=self._stream_error,
                    on_stream_closed=self._closed.set))
            self._ops.append(op)

    def retarget(self, config: SourceConfig) -> bool:
        """New record topics (a live reconfiguration): the subscriptions are made again. False if
        what changed is not the IPC subscription (that needs a restart)."""
        if config.resolved_kind != "ipc" or config.model_dump(exclude={"ipc"}) != self.config.model_dump(
                exclude={"ipc"}):
            return False
        self.config = config
        self.via = config.ipc.via
        self.topics = [t.format(device_id=self._device_id) for t in config.ipc.topics]
        self.name = f"greengrass:{self.via}:{','.join(self.topics)}"
        self._retargeting = True
        self._close_ops()
        self._closed.set()
        return True

    def _close_ops(self) -> None:
        ops, self._ops = self._ops, []
        for op in ops:
            try:
                op.close()
            except Exception:
                pass

    def _stream_error(self, err: Exception) -> bool:
        log.warning("greengrass: subscription error: %s", err)
        self._closed.set()
        return True

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self._emit = emit
        backoff = 0.0
        while not stop.is_set():
            self._closed.clear()
            try:
                self._subscribe()
            except Exception as err:
                backoff = min(backoff * 2 if backoff else BACKOFF_START_S, BACKOFF_MAX_S)
                log.error("greengrass: cannot subscribe to %s (%s); retrying in %.0f s", ", ".join(self.topics),
                          err, backoff)
                stop.wait(backoff * random.uniform(0.5, 1.0))
                continue
            backoff = 0.0
            self.connected.set()
            log.info("greengrass: receiving records from %s", self.name)
            while not stop.is_set() and not self._closed.wait(0.2):
                pass
            self.connected.clear()
            self._close_ops()
            if stop.is_set():
                break
            if self._retargeting:  # new topics: subscribe again at once, on the same connection
                self._retargeting = False
                continue
            log.warning("greengrass: subscription closed (the nucleus restarted?); subscribing again")
            self.link.drop()
            stop.wait(BACKOFF_START_S * random.uniform(0.5, 1.0))

    def close(self) -> None:
        self._close_ops()
        self._closed.set()


class IpcPublisher:
    """Events and heartbeats to AWS IoT Core through the nucleus, from a bounded ``EventQueue``."""

    def __init__(self, config: PublishConfig, device_id: str, health, link: NucleusLink) -> None:
        self.config = config
        self.health = health
        self.link = link
        self.queue = EventQueue(config, device_id, health)
        self.event = self.queue.event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    @property
    def queued(self) -> int:
        return self.queue.queued

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeloop-ipc-publisher", daemon=True)
        self._thread.start()

    def _publish(self, item: tuple[str, bytes]) -> None:
        from awsiot.greengrasscoreipc.model import QOS

        qos = QOS.AT_LEAST_ONCE if self.config.qos else QOS.AT_MOST_ONCE
        self.link.call(lambda c: c.publish_to_iot_core(topic_name=item[0], qos=qos, payload=item[1]))
        if self.config.also_local:
            from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage

            message = PublishMessage(binary_message=BinaryMessage(message=item[1]))
            self.link.call(lambda c: c.publish_to_topic(topic=item[0], publish_message=message))

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self.queue.beat()
            item = self.queue.take()
            if item is None:
                self._stop.wait(0.05)
                continue
            try:
                self._publish(item)
            except Exception as err:
                self.queue.put_back(item)
                backoff = min(backoff * 2 if backoff else BACKOFF_START_S, BACKOFF_MAX_S)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("greengrass: PublishToIoTCore failed (%s); %d events wait, retrying with backoff",
                                err, self.queue.queued)
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                continue
            backoff = 0.0
            self._down_since = None
            self.health.events_published += 1

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.queue.queued and self._down_since is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.queue.queued:
            log.warning("greengrass: %d events not published at stop", self.queue.queued)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 1.0))
