"""MQTT through the AWS SDK (awscrt's MQTT5 client, as in awsiotsdk): ``mqtt.client: awsiotsdk``.

For users who prefer AWS's own client for IoT Core. Same behaviour as the paho transport
(``mqtt.py``): a message is one record, a JSON array of records, or a frame; a QoS 1 record is
acknowledged only after the engine has handled it (the client's manual PUBACK control); events and
heartbeats go out from the bounded ``EventQueue``. The client reconnects by itself with exponential
backoff and full jitter; each failed attempt is logged with the endpoint and the cause.
"""

from __future__ import annotations

import logging
import threading
import time

from .contracts import MqttConnection, PublishConfig, SourceConfig
from .publish import Publisher
from .sources import Emit, message_payload

log = logging.getLogger(__name__)


class SdkLink:
    """One awscrt MQTT5 client, started until ``stop``."""

    def __init__(self, conn: MqttConnection, client_id: str, *, persistent: bool, on_publish=None,
                 on_connected=None) -> None:
        from awscrt import io, mqtt5

        self.conn = conn
        tls_ctx = None
        if conn.ca_file or conn.cert_file:
            opts = (io.TlsContextOptions.create_client_with_mtls_from_path(conn.cert_file, conn.key_file)
                    if conn.cert_file else io.TlsContextOptions())
            if conn.ca_file:
                opts.override_default_trust_store_from_path(None, conn.ca_file)
            tls_ctx = io.ClientTlsContext(opts)
        self.endpoint = f"{'mqtts' if tls_ctx else 'mqtt'}://{conn.host}:{conn.port}"
        self.connected = threading.Event()
        self._on_connected = on_connected
        self._failures = 0
        self.client = mqtt5.Client(mqtt5.ClientOptions(
            host_name=conn.host, port=conn.port, tls_ctx=tls_ctx,
            connect_options=mqtt5.ConnectPacket(client_id=client_id, keep_alive_interval_sec=conn.keepalive_s,
                                                session_expiry_interval_sec=3600 if persistent else 0),
            session_behavior=(mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS if persistent
                              else mqtt5.ClientSessionBehaviorType.CLEAN),
            retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
            min_reconnect_delay_ms=1000, max_reconnect_delay_ms=int(conn.reconnect_max_s * 1000),
            on_publish_callback_fn=on_publish,
            on_lifecycle_event_connection_success_fn=self._success,
            on_lifecycle_event_connection_failure_fn=self._failure,
            on_lifecycle_event_disconnection_fn=self._disconnected,
        ))

    def _success(self, data) -> None:
        self._failures = 0
        self.connected.set()
        log.info("mqtt5 %s: connected", self.endpoint)
        if self._on_connected is not None:
            threading.Thread(target=self._on_connected, daemon=True).start()  # not on the client's thread

    def _failure(self, data) -> None:
        self._failures += 1
        if self._failures in (1, 2) or self._failures % 10 == 0:  # retried with backoff by the client
            log.error("mqtt5 %s: cannot connect: %s; retrying with backoff", self.endpoint, data.exception)

    def _disconnected(self, data) -> None:
        if self.connected.is_set():
            log.warning("mqtt5 %s: connection lost (%s); reconnecting", self.endpoint, data.exception)
        self.connected.clear()

    def start(self) -> None:
        self.client.start()

    def stop(self) -> None:
        try:
            self.client.stop()
        except Exception:
            pass
        self.connected.clear()


class SdkMqttSource:
    finite = False

    def __init__(self, config: SourceConfig, client_id: str) -> None:
        self.config = config
        m = self.mqtt = config.mqtt
        self.link = SdkLink(m, m.client_id or client_id, persistent=m.persistent_session, on_publish=self._received,
                            on_connected=self._subscribe)
        self.endpoint = self.link.endpoint
        self.connected = self.link.connected
        self.subscribed = threading.Event()
        self.name = f"{self.endpoint} {','.join(m.topics)} (awsiotsdk)"
        self.received = 0
        self._no = 0
        self._emit: Emit | None = None

    def _subscribe(self) -> None:
        from awscrt import mqtt5

        qos = mqtt5.QoS.AT_LEAST_ONCE if self.mqtt.qos else mqtt5.QoS.AT_MOST_ONCE
        try:
            self.link.client.subscribe(mqtt5.SubscribePacket(
                subscriptions=[mqtt5.Subscription(topic_filter=t, qos=qos) for t in self.mqtt.topics])).result(10)
        except Exception as err:
            log.error("mqtt5 %s: cannot subscribe to %s: %s", self.endpoint, ", ".join(self.mqtt.topics), err)
            return
        self.subscribed.set()
        log.info("mqtt5 %s: subscribed to %s", self.endpoint, ", ".join(self.mqtt.topics))

    def _received(self, data) -> None:
        packet = data.publish_packet
        self.received += 1
        self._no += 1
        payload = message_payload(self.config, bytes(packet.payload or b""), f"mqtt:{packet.topic}", self._no)
        if packet.qos.value > 0:
            handle = data.acquire_publish_acknowledgement_control()
            payload.ack = lambda: self.link.client.invoke_publish_acknowledgement(handle)
        if self._emit is not None:
            self._emit(payload)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self._emit = emit
        self.link.start()
        stop.wait()
        self.link.stop()

    def close(self) -> None:
        self.link.stop()


class SdkMqttPublisher(Publisher):
    """Events and heartbeats out through awscrt's MQTT5 client, from a bounded ``EventQueue``."""

    def __init__(self, config: PublishConfig, device_id: str, health) -> None:
        super().__init__(config, device_id, health)
        conn = config.mqtt
        self.link = SdkLink(conn, conn.client_id or f"edgeloop-{device_id}-pub", persistent=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: list = []

    def start(self) -> None:
        self.link.start()
        self._thread = threading.Thread(target=self._run, name="edgeloop-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from awscrt import mqtt5

        qos = mqtt5.QoS.AT_LEAST_ONCE if self.config.qos else mqtt5.QoS.AT_MOST_ONCE
        while not self._stop.is_set():
            self.queue.beat()
            self._inflight = [f for f in self._inflight if not self._settled(f)]
            if not self.link.connected.is_set() or len(self._inflight) >= 100:
                self._stop.wait(0.05)
                continue
            item = self.queue.take()
            if item is None:
                self._stop.wait(0.05)
                continue
            future = self.link.client.publish(mqtt5.PublishPacket(topic=item[0], payload=item[1], qos=qos))
            future.item = item
            self._inflight.append(future)

    def _settled(self, future) -> bool:
        if not future.done():
            return False
        if future.exception() is None:
            self.health.events_published += 1
        else:  # the link dropped before the PUBACK: it goes again
            self.queue.put_back(future.item)
        return True

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.queue.queued or self._inflight) and self.link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.queue.queued:
            log.warning("mqtt5 %s: %d events not published at stop", self.link.endpoint, self.queue.queued)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 1.0))
        self.link.stop()
