"""Greengrass IPC: the runtime's transports when the nucleus runs it (awsiotsdk's client V2).

Detected from the nucleus's environment (the IPC socket path and the component's token). Here:

* ``NucleusLink``: the IPC connection. Made on first use; a connection-level failure (not a
  service's answer such as "unauthorized") drops it, and the next call makes a new one. Its
  ``generation`` counts connections, so streams know when to subscribe again. Every call has a
  timeout, so a nucleus that accepts but never answers cannot hang the engine.
* ``IpcSource``: records from local publish/subscribe (``SubscribeToTopic``) or AWS IoT Core
  (``SubscribeToIoTCore``), subscribed again after each reconnect. The client runs stream
  callbacks on one worker thread, so records arrive in order.
* ``IpcPublisher``: outlier events and heartbeats to AWS IoT Core (``PublishToIoTCore``, QoS 1)
  from the bounded ``EventQueue``.
* ``ConfigFollower``: the component's configuration followed live
  (``SubscribeToConfigurationUpdate``), subscribed again after each reconnect.
* ``component_configuration`` and ``report_state`` (``UpdateState``).
"""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .contracts import GREENGRASS_ROOT_ENV, PublishConfig, SourceConfig, runtime_settings
from .publish import Publisher
from .sources import Emit, message_payload

log = logging.getLogger(__name__)

SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
CALL_TIMEOUT_S = 10.0
MAX_PUBLISH_TRIES = 5  # a refused event (not a lost connection) is dropped, counted, after this many


def under_greengrass() -> bool:
    """The nucleus started us: its IPC socket and our token are in the environment."""
    return bool(os.environ.get(SOCKET_ENV)) and bool(os.environ.get(TOKEN_ENV))


def is_service_answer(err: BaseException) -> bool:
    """The nucleus answered with an error (unauthorized, not found, ...): the connection is fine."""
    try:
        from awsiot.greengrasscoreipc.model import GreengrassCoreIPCError
    except ImportError:
        return False
    return isinstance(err, GreengrassCoreIPCError)


class NucleusLink:
    """The IPC client, connected on first use and again after a connection-level failure."""

    def __init__(self) -> None:
        self._client = None
        self._lock = threading.Lock()
        self.generation = 0

    def client(self):
        with self._lock:
            if self._client is None:
                from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

                # one callback thread: stream events in order, never two at once
                self._client = GreengrassCoreIPCClientV2(executor=ThreadPoolExecutor(max_workers=1))
                self.generation += 1
                log.info("greengrass: connected to the nucleus at %s", os.environ.get(SOCKET_ENV))
            return self._client

    def drop(self, client=None) -> None:
        """Forget the connection (``client``: only if it is still the current one)."""
        with self._lock:
            if self._client is None or (client is not None and client is not self._client):
                return
            client, self._client = self._client, None
        try:
            client.close(executor_wait=False)
        except Exception:
            pass

    def call(self, fn: Callable, timeout: float = CALL_TIMEOUT_S):
        """``fn(client)`` returns a future (an ``*_async`` call); its result within ``timeout``."""
        client = self.client()
        try:
            result = fn(client)
            future = result[0] if isinstance(result, tuple) else result
            value = future.result(timeout)
            return (value, result[1]) if isinstance(result, tuple) else value
        except Exception as err:
            if not is_service_answer(err):
                self.drop(client)
            raise

    def close(self) -> None:
        self.drop()


def component_configuration(link: NucleusLink) -> dict:
    """The runtime configuration mapping in this component's configuration: its ``runtime``
    mapping, with ``bundle`` set from the model component it names (``contracts.runtime_settings``)."""
    try:
        value = link.call(lambda c: c.get_configuration_async(key_path=[])).value
    except Exception as err:
        if type(err).__name__ == "ResourceNotFoundError":
            return {}
        raise
    return runtime_settings(value if isinstance(value, dict) else {}, os.environ.get(GREENGRASS_ROOT_ENV))


def report_state(link: NucleusLink, state: str) -> None:
    try:
        link.call(lambda c: c.update_state_async(state=state))
    except Exception as err:  # the state is a courtesy to the nucleus: never a reason to stop
        log.warning("greengrass: could not report state %s: %s", state, err)


class _Streams:
    """Subscriptions kept up across reconnects: made again whenever the link's generation moves on
    or a stream closes. Callbacks of an older round are ignored."""

    name = "streams"

    def __init__(self, link: NucleusLink) -> None:
        self.link = link
        self.connected = threading.Event()
        self._round = 0
        self._broken = threading.Event()
        self._ops: list = []
        self._lock = threading.Lock()

    def _open(self, round_: int) -> list:  # the subscriptions of one round (ops)
        raise NotImplementedError

    def _closed_cb(self, round_: int) -> Callable[[], None]:
        def closed() -> None:
            if round_ == self._round:
                self._broken.set()
        return closed

    def _error_cb(self, round_: int) -> Callable[[Exception], bool]:
        def error(err: Exception) -> bool:
            if round_ == self._round:
                log.warning("greengrass: %s: stream error: %s", self.name, err)
                self._broken.set()
            return True
        return error

    def _close_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for op in ops:
            try:
                op.close()
            except Exception:
                pass

    def renew(self) -> None:
        """Subscribe again at once (new topics)."""
        self._broken.set()

    def keep(self, stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            self._round += 1
            round_ = self._round
            self._broken.clear()
            self._close_ops()
            try:
                ops = self._open(round_)
            except Exception as err:
                self._close_ops()
                backoff = min(backoff * 2 if backoff else BACKOFF_START_S, BACKOFF_MAX_S)
                log.error("greengrass: %s: cannot subscribe (%s: %s); retrying in %.0f s", self.name,
                          type(err).__name__, err, backoff)
                stop.wait(backoff * random.uniform(0.5, 1.0))
                continue
            with self._lock:
                self._ops = ops
            backoff = 0.0
            self.connected.set()
            gen = self.link.generation
            while not stop.is_set() and not self._broken.wait(0.2) and self.link.generation == gen:
                pass
            self.connected.clear()
            if stop.is_set():
                break
            if not self._broken.is_set() or self.link.generation != gen:
                continue  # reconnected by someone else: subscribe on the new connection
            stop.wait(0.05)
        self._close_ops()


class IpcSource(_Streams):
    finite = False

    def __init__(self, config: SourceConfig, device_id: str, link: NucleusLink) -> None:
        super().__init__(link)
        self.config = config
        self._device_id = device_id
        self._set_topics(config)
        self.received = 0
        self._no = 0
        self._emit: Emit | None = None

    def _set_topics(self, config: SourceConfig) -> None:
        self.via = config.ipc.via
        self.topics = [t.format(device_id=self._device_id) for t in config.ipc.topics]
        self.name = f"greengrass:{self.via}:{','.join(self.topics)}"

    def _message(self, round_: int, topic: str, body: bytes) -> None:
        if round_ != self._round or self._emit is None:
            return  # an old subscription's last message: the new one is already up
        self.received += 1
        self._no += 1
        self._emit(message_payload(self.config, body, f"greengrass:{topic}", self._no))

    def _open(self, round_: int) -> list:
        from awsiot.greengrasscoreipc.model import QOS

        ops = []
        for topic in self.topics:
            if self.via == "local":
                def local(event, t=topic):
                    if event.binary_message is not None:
                        body = event.binary_message.message or b""
                        where = getattr(event.binary_message.context, "topic", None) or t
                    else:
                        import orjson

                        body = orjson.dumps(event.json_message.message)
                        where = getattr(event.json_message.context, "topic", None) or t
                    self._message(round_, where, body)

                _, op = self.link.call(lambda c, t=topic, h=local: c.subscribe_to_topic_async(
                    topic=t, on_stream_event=h, on_stream_error=self._error_cb(round_),
                    on_stream_closed=self._closed_cb(round_)))
            else:
                qos = QOS.AT_LEAST_ONCE if self.config.ipc.qos else QOS.AT_MOST_ONCE

                def iot(event):
                    msg = event.message
                    body = msg.payload if isinstance(msg.payload, bytes) else base64.b64decode(msg.payload or b"")
                    self._message(round_, msg.topic_name, body)

                _, op = self.link.call(lambda c, t=topic, q=qos, h=iot: c.subscribe_to_iot_core_async(
                    topic_name=t, qos=q, on_stream_event=h, on_stream_error=self._error_cb(round_),
                    on_stream_closed=self._closed_cb(round_)))
            ops.append(op)
            with self._lock:
                self._ops.append(op)  # closed with the rest if a later topic fails
        log.info("greengrass: receiving records from %s", self.name)
        return ops

    def retarget(self, config: SourceConfig) -> bool:
        """New record topics (a live reconfiguration): subscribed again. False if what changed is not
        the IPC subscription (that needs a restart)."""
        if config.resolved_kind != "ipc" or config.model_dump(exclude={"ipc"}) != self.config.model_dump(
                exclude={"ipc"}):
            return False
        self.config = config
        self._set_topics(config)
        self.renew()
        return True

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self._emit = emit
        self.keep(stop)

    def close(self) -> None:
        self._close_ops()


class ConfigFollower(_Streams):
    """Calls ``on_change`` when the component's configuration (``runtime`` or ``model``) changes,
    across reconnects."""

    name = "configuration"

    def __init__(self, link: NucleusLink, on_change: Callable[[], None]) -> None:
        super().__init__(link)
        self.on_change = on_change
        self._stop = threading.Event()
        self._first = True

    def _open(self, round_: int) -> list:
        def changed(event) -> None:
            if round_ == self._round:
                self.on_change()

        _, op = self.link.call(lambda c: c.subscribe_to_configuration_update_async(
            key_path=[], on_stream_event=changed, on_stream_error=self._error_cb(round_),
            on_stream_closed=self._closed_cb(round_)))
        if not self._first:  # it may have changed while we were away
            self.on_change()
        self._first = False
        return [op]

    def start(self) -> None:
        threading.Thread(target=self.keep, args=(self._stop,), name="edgeloop-gg-config", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


class IpcPublisher(Publisher):
    """Events and heartbeats to AWS IoT Core through the nucleus, from a bounded ``EventQueue``."""

    def __init__(self, config: PublishConfig, device_id: str, health, link: NucleusLink) -> None:
        super().__init__(config, device_id, health)
        self.link = link
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeloop-ipc-publisher", daemon=True)
        self._thread.start()

    def _send(self, topic: str, payload: bytes, legs: set) -> None:
        """Each leg once: a retry after IoT Core took it but local pub/sub did not sends only the rest."""
        from awsiot.greengrasscoreipc.model import QOS, BinaryMessage, PublishMessage

        if "iot_core" not in legs:
            qos = QOS.AT_LEAST_ONCE if self.config.qos else QOS.AT_MOST_ONCE
            self.link.call(lambda c: c.publish_to_iot_core_async(topic_name=topic, qos=qos, payload=payload))
            legs.add("iot_core")
        if self.config.also_local and "local" not in legs:
            message = PublishMessage(binary_message=BinaryMessage(message=payload))
            self.link.call(lambda c: c.publish_to_topic_async(topic=topic, publish_message=message))
            legs.add("local")

    def _run(self) -> None:
        backoff, item, legs, tries = 0.0, None, set(), 0
        while not self._stop.is_set():
            self.queue.beat()
            if item is None:
                item, legs, tries = self.queue.take(), set(), 0
                if item is None:
                    self._stop.wait(0.05)
                    continue
            try:
                self._send(item[0], item[1], legs)
            except Exception as err:
                tries += 1
                if is_service_answer(err) and tries >= MAX_PUBLISH_TRIES:  # refused, not lost: give up on it
                    log.error("greengrass: event to %s refused %d times (%s); dropped", item[0], tries, err)
                    self.health.events_dropped += 1
                    item = None
                    continue
                backoff = min(backoff * 2 if backoff else BACKOFF_START_S, BACKOFF_MAX_S)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("greengrass: publishing failed (%s); %d events wait, retrying with backoff",
                                err, self.queue.queued + 1)
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                continue
            item, backoff, self._down_since = None, 0.0, None
            self.health.events_published += 1
        if item is not None:
            self.queue.put_back(item)

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.queue.queued and self._down_since is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 1.0))
        if self.queue.queued:
            log.warning("greengrass: %d events not published at stop", self.queue.queued)
