"""MQTT as a source of records (paho-mqtt 2.x), off Greengrass: any broker, or AWS IoT Core.

A message is one JSON record, a JSON array of records, or (``source.format: frames``) one binary
frame. With QoS 1 a message is acknowledged to the broker only after the engine has
handled it (paho's manual acks), so a runtime that dies with messages in its queue gets them again
from a persistent session. The connection is ours to manage: a failed connect or a lost link is
logged with the endpoint and the cause, and retried with exponential backoff and jitter; a
refused certificate never ends the service.
"""

from __future__ import annotations

import logging
import random
import ssl
import struct
import threading
import time

import orjson

from .contracts import SourceConfig
from .frames import HEADER, FrameError, read_header
from .records import TooLong
from .sources import TOO_LONG_HEAD, Emit, Payload

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0


class MqttSource:
    finite = False

    def __init__(self, config: SourceConfig, client_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.config = config
        m = self.mqtt = config.mqtt
        tls = m.ca_file is not None or m.cert_file is not None
        self.endpoint = f"{'mqtts' if tls else 'mqtt'}://{m.host}:{m.port}"
        self.name = f"{self.endpoint} {','.join(m.topics)}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m.client_id or client_id,
                                  clean_session=not m.persistent_session, manual_ack=True)
        if tls:
            self.client.tls_set(ca_certs=m.ca_file, certfile=m.cert_file, keyfile=m.key_file,
                                cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.received = 0
        self._emit: Emit | None = None
        self._no = 0
        self._refused: str | None = None

    # -- paho callbacks (on this source's thread) -------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"the broker refused the connection: {reason_code}"
            return
        client.subscribe([(topic, self.mqtt.qos) for topic in self.mqtt.topics])
        self.connected.set()
        log.info("mqtt %s: connected, subscribed to %s (QoS %d)", self.endpoint, ", ".join(self.mqtt.topics),
                 self.mqtt.qos)

    def _on_message(self, client, userdata, msg) -> None:
        self.received += 1
        self._no += 1
        payload = self.payload(msg.payload, f"mqtt:{msg.topic}", self._no)
        if msg.qos > 0:
            payload.ack = lambda mid=msg.mid, qos=msg.qos: client.ack(mid, qos)
        if self._emit is not None:
            self._emit(payload)  # may wait: back-pressure, and the broker holds what is not acked

    def payload(self, body: bytes, source: str, no: int) -> Payload:
        """One message as a payload of the device service."""
        cfg = self.config
        if len(body) > cfg.max_message_bytes:
            return Payload("jsonl", [TooLong(len(body), body[:TOO_LONG_HEAD])], source, no)
        if cfg.format == "frames":
            try:
                header = read_header(body)
                if len(body) != HEADER.size + header.body_size:
                    raise FrameError(f"{len(body)} bytes, its header says {HEADER.size + header.body_size}")
            except (FrameError, struct.error) as err:  # struct.error: shorter than a header
                return Payload("error", [body[:TOO_LONG_HEAD]], source, no, note=f"bad frame: {err}")
            return Payload("frame", [body], source, no, n=max(header.n_rows, 1))
        text = body.strip()
        if text.startswith(b"["):
            try:
                records = orjson.loads(text)
                items = [orjson.dumps(r) for r in records] or [b""]
            except orjson.JSONDecodeError:
                items = [body]  # dead-lettered as malformed JSON by the decoder
            return Payload("jsonl", items, source, no)
        return Payload("jsonl", [text], source, no)  # one record, whatever bytes it holds

    # -- the source -------------------------------------------------------------------------------

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self._emit = emit
        backoff = 0.0
        m = self.mqtt
        while not stop.is_set():
            try:
                self.client.connect(m.host, m.port, keepalive=m.keepalive_s)
            except (OSError, ssl.SSLError) as err:
                backoff = min(backoff * 2 if backoff else BACKOFF_START_S, m.reconnect_max_s)
                log.error("mqtt %s: cannot connect: %s; retrying in %.0f s", self.endpoint, _cause(err), backoff)
                stop.wait(backoff * random.uniform(0.5, 1.0))
                continue
            began = time.monotonic()
            self._refused = None
            while not stop.is_set():
                rc = self.client.loop(timeout=0.2)
                if rc != 0:  # the link is gone
                    break
                if not self.connected.is_set() and time.monotonic() - began > m.keepalive_s:
                    rc = "no answer to CONNECT"
                    break
            was_up = self.connected.is_set()
            self.connected.clear()
            if stop.is_set():
                break
            if was_up and time.monotonic() - began > m.keepalive_s:
                backoff = 0.0  # it had been up a while: start over
            backoff = min(backoff * 2 if backoff else BACKOFF_START_S, m.reconnect_max_s)
            if was_up:
                log.warning("mqtt %s: connection lost (%s); reconnecting in %.0f s", self.endpoint, _rc(rc), backoff)
            else:  # TLS 1.3: a refused client certificate shows here, after connect() returned
                log.error("mqtt %s: cannot connect: %s; retrying in %.0f s", self.endpoint,
                          self._refused or f"the broker closed the connection before accepting it ({_rc(rc)})"
                          + ("; does it accept this client certificate?" if m.cert_file or m.ca_file else ""),
                          backoff)
            stop.wait(backoff * random.uniform(0.5, 1.0))
        try:
            self.client.disconnect()
        except Exception:
            pass

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass


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
