"""MQTT off Greengrass (paho-mqtt 2.x): records from topics, outlier events and health out.

Any broker, or AWS IoT Core (8883, mutual TLS with the device certificate). ``MqttLink`` owns a
connection: a failed connect or a lost link is logged with the endpoint and the cause and retried
with exponential backoff and jitter, so a refused certificate never ends the service.

``MqttSource``: a message is one JSON record, a JSON array of records, or (``source.format:
frames``) one binary frame. With QoS 1 a message is acknowledged to the broker only after the
engine has handled it (paho's manual acks), so a runtime that dies with messages in its queue gets
them again from its persistent session.

``MqttPublisher``: outlier events and a periodic health heartbeat, QoS 1, through a bounded queue
that holds them while the broker is away (``publish.when_full`` when it fills; drops counted in
health). An event over ``publish.max_payload_bytes`` (AWS IoT Core refuses more than 128 KB) is
published as a reference to the outlier sample object that holds the record.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

from .contracts import MqttConnection, PublishConfig, SourceConfig
from .publish import Publisher
from .sources import Emit, Payload, message_payload

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
MAX_INFLIGHT = 100  # QoS 1 publishes awaiting their PUBACK


class MqttLink:
    """One connection to a broker, kept up until ``stop``."""

    def __init__(self, conn: MqttConnection, client_id: str, *, clean_session: bool, manual_ack: bool = False,
                 on_connected: Callable[[object], None] | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.conn = conn
        tls = conn.ca_file is not None or conn.cert_file is not None
        self.endpoint = f"{'mqtts' if tls else 'mqtt'}://{conn.host}:{conn.port}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session, manual_ack=manual_ack)
        if tls:
            self.client.tls_set(ca_certs=conn.ca_file, certfile=conn.cert_file, keyfile=conn.key_file,
                                cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.connected = threading.Event()
        self._on_connected = on_connected
        self._refused: str | None = None
        self.generation = 0  # connections made; an ack of an older one is not sent on a newer one
        self._acks: queue.SimpleQueue = queue.SimpleQueue()

    def ack_later(self, mid: int, qos: int) -> Callable[[], None]:
        """An ack for the engine to call when it has handled the message: it is only queued, and
        sent by this link's own thread (paho's writes are not safe from two threads)."""
        generation = self.generation
        return lambda: self._acks.put((generation, mid, qos))

    def _send_acks(self) -> None:
        while True:
            try:
                generation, mid, qos = self._acks.get_nowait()
            except queue.Empty:
                return
            if generation == self.generation:  # else: its connection is gone; the broker sends it again
                self.client.ack(mid, qos)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"the broker refused the connection: {reason_code}"
            return
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected(client)

    def run(self, stop: threading.Event, while_connected: Callable[[], None] | None = None) -> None:
        backoff = 0.0
        c = self.conn
        while not stop.is_set():
            try:
                self.client.connect(c.host, c.port, keepalive=c.keepalive_s)
            except (OSError, ssl.SSLError) as err:
                backoff = min(backoff * 2 if backoff else BACKOFF_START_S, c.reconnect_max_s)
                log.error("mqtt %s: cannot connect: %s; retrying in %.0f s", self.endpoint, _cause(err), backoff)
                stop.wait(backoff * random.uniform(0.5, 1.0))
                continue
            began = time.monotonic()
            self._refused = None
            self.generation += 1
            while not stop.is_set():
                self._send_acks()
                rc = self.client.loop(timeout=0.1)
                if rc != 0:  # the link is gone
                    break
                if not self.connected.is_set():
                    if time.monotonic() - began > c.keepalive_s:
                        rc = "no answer to CONNECT"
                        break
                elif while_connected is not None:
                    while_connected()
            was_up = self.connected.is_set()
            self.connected.clear()
            if stop.is_set():
                break
            if was_up and time.monotonic() - began > c.keepalive_s:
                backoff = 0.0  # it had been up a while: start over
            backoff = min(backoff * 2 if backoff else BACKOFF_START_S, c.reconnect_max_s)
            if was_up:
                log.warning("mqtt %s: connection lost (%s); reconnecting in %.0f s", self.endpoint, _rc(rc), backoff)
            else:  # TLS 1.3: a refused client certificate shows here, after connect() returned
                log.error("mqtt %s: cannot connect: %s; retrying in %.0f s", self.endpoint,
                          self._refused or f"the broker closed the connection before accepting it ({_rc(rc)})"
                          + ("; does it accept this client certificate?" if c.cert_file or c.ca_file else ""),
                          backoff)
            stop.wait(backoff * random.uniform(0.5, 1.0))
        self.close()

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass


class MqttSource:
    finite = False

    def __init__(self, config: SourceConfig, client_id: str) -> None:
        self.config = config
        m = self.mqtt = config.mqtt
        self.link = MqttLink(m, m.client_id or client_id, clean_session=not m.persistent_session, manual_ack=True,
                             on_connected=self._subscribe)
        self.link.client.on_message = self._on_message
        self.link.client.on_subscribe = lambda *args: self.subscribed.set()
        self.endpoint = self.link.endpoint
        self.connected = self.link.connected
        self.subscribed = threading.Event()  # the broker confirmed the subscription: records flow
        self.name = f"{self.endpoint} {','.join(m.topics)}"
        self.received = 0
        self._emit: Emit | None = None
        self._no = 0

    def _subscribe(self, client) -> None:
        self.subscribed.clear()
        client.subscribe([(topic, self.mqtt.qos) for topic in self.mqtt.topics])
        log.info("mqtt %s: connected, subscribed to %s (QoS %d)", self.endpoint, ", ".join(self.mqtt.topics),
                 self.mqtt.qos)

    def _on_message(self, client, userdata, msg) -> None:
        self.received += 1
        self._no += 1
        payload = self.payload(msg.payload, f"mqtt:{msg.topic}", self._no)
        if msg.qos > 0:
            payload.ack = self.link.ack_later(msg.mid, msg.qos)
        if self._emit is not None:
            self._emit(payload)  # may wait: back-pressure, and the broker holds what is not acked

    def payload(self, body: bytes, source: str, no: int) -> Payload:
        return message_payload(self.config, body, source, no)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self._emit = emit
        self.link.run(stop)

    def close(self) -> None:
        self.link.close()


class MqttPublisher(Publisher):
    """Events and heartbeats out, QoS 1, from a bounded ``EventQueue``; its own connection and thread."""

    def __init__(self, config: PublishConfig, device_id: str, health) -> None:
        super().__init__(config, device_id, health)
        conn = config.mqtt
        self.link = MqttLink(conn, conn.client_id or f"edgeloop-{device_id}-pub", clean_session=True)
        self.link.client.max_inflight_messages_set(MAX_INFLIGHT)
        self._inflight: deque = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.link.run, args=(self._stop, self._drain),
                                        name="edgeloop-publisher", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while self._inflight and self._inflight[0].is_published():
            self._inflight.popleft()
            self.health.events_published += 1
        self.queue.beat()
        while len(self._inflight) < MAX_INFLIGHT:
            item = self.queue.take()
            if item is None:
                return
            try:
                info = self.link.client.publish(item[0], item[1], qos=self.config.qos)
            except ValueError as err:  # a topic paho will not publish to (a bad events_topic)
                log.error("mqtt %s: cannot publish to %r: %s; event dropped", self.link.endpoint, item[0], err)
                self.health.events_dropped += 1
                continue
            if self.config.qos:
                self._inflight.append(info)
            else:
                self.health.events_published += 1

    def stop(self, timeout: float) -> None:
        """Publish what is queued while ``timeout`` allows, then disconnect."""
        deadline = time.monotonic() + timeout
        while (self.queue.queued or self._inflight) and self.link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 1.0))
        left = self.queue.queued + sum(not i.is_published() for i in list(self._inflight))
        if left:
            log.warning("mqtt %s: %d events not published at stop", self.link.endpoint, left)


def _rc(rc: object) -> str:
    if isinstance(rc, int):
        import paho.mqtt.client as mqtt

        return mqtt.error_string(rc)
    return str(rc)


def _cause(err: BaseException) -> str:
    """What a person can act on: the certificate problem, the refusal, the timeout."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"the broker's certificate was not accepted ({err.verify_message})"
    if isinstance(err, ssl.SSLError):
        return f"TLS handshake failed ({err.reason or err}); is the client certificate accepted by the broker?"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the broker running, and on this port?)"
    return f"{type(err).__name__}: {err}"
