"""A test double of the Greengrass nucleus IPC endpoint: eventstream RPC on a Unix domain socket.

Standard library only. It speaks enough of the protocol (framing, CONNECT/CONNECT_ACK, PING, application
messages and errors on streams) for the real ``awsiot.greengrasscoreipc.clientv2.GreengrassCoreIPCClientV2``
to run unmodified against it. Supported operations: PublishToIoTCore, PublishToTopic, SubscribeToTopic,
SubscribeToIoTCore, GetConfiguration, SubscribeToConfigurationUpdate, UpdateState; anything else is answered
with a ServiceError.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

# message types and flags (awscrt.eventstream.rpc.MessageType / MessageFlag)
APPLICATION_MESSAGE, APPLICATION_ERROR, PING, PING_RESPONSE, CONNECT, CONNECT_ACK = 0, 1, 2, 3, 4, 5
CONNECTION_ACCEPTED, TERMINATE_STREAM = 0x1, 0x2
NS = "aws.greengrass#"
_STREAM_EVENT = {"SubscribeToTopic": "local", "SubscribeToIoTCore": "iot_core",
                 "SubscribeToConfigurationUpdate": "configuration"}
_AUTHORIZED_BY = {"SubscribeToTopic": "aws.greengrass.ipc.pubsub", "PublishToTopic": "aws.greengrass.ipc.pubsub",
                  "SubscribeToIoTCore": "aws.greengrass.ipc.mqttproxy",
                  "PublishToIoTCore": "aws.greengrass.ipc.mqttproxy"}


def encode_message(headers: dict[str, Any], payload: bytes = b"") -> bytes:
    """Frame one eventstream message; ints are int32, str strings, bytes byte buffers, bool booleans."""
    out = bytearray()
    for name, value in headers.items():
        raw = name.encode()
        out += struct.pack("B", len(raw)) + raw
        if isinstance(value, bool):
            out += struct.pack("B", 0 if value else 1)
        elif isinstance(value, int):
            out += struct.pack(">Bi", 4, value)
        elif isinstance(value, str):
            out += struct.pack(">BH", 7, len(value.encode())) + value.encode()
        else:
            out += struct.pack(">BH", 6, len(value)) + bytes(value)
    prelude = struct.pack(">II", 16 + len(out) + len(payload), len(out))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + bytes(out) + payload
    return body + struct.pack(">I", zlib.crc32(body))


def decode_headers(data: bytes) -> dict[str, Any]:
    """Parse an eventstream header block."""
    headers: dict[str, Any] = {}
    i = 0
    while i < len(data):
        n = data[i]
        name = data[i + 1:i + 1 + n].decode()
        i += 1 + n
        kind = data[i]
        i += 1
        if kind in (0, 1):
            value: Any = kind == 0
        elif kind in (2, 3, 4, 5, 8):
            fmt = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}[kind]
            value = struct.unpack_from(fmt, data, i)[0]
            i += struct.calcsize(fmt)
        elif kind in (6, 7):
            (size,) = struct.unpack_from(">H", data, i)
            value = data[i + 2:i + 2 + size]
            value = value.decode() if kind == 7 else bytes(value)
            i += 2 + size
        elif kind == 9:
            value, i = bytes(data[i:i + 16]), i + 16
        else:
            raise ValueError(f"bad header type {kind}")
        headers[name] = value
    return headers


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Read one message from a socket, checking both CRCs."""
    prelude = _recv_exact(sock, 12)
    total, hlen, crc = struct.unpack(">III", prelude)
    if zlib.crc32(prelude[:8]) != crc:
        raise ValueError("bad prelude crc")
    rest = _recv_exact(sock, total - 12)
    if zlib.crc32(prelude + rest[:-4]) != struct.unpack(">I", rest[-4:])[0]:
        raise ValueError("bad message crc")
    return decode_headers(rest[:hlen]), rest[hlen:-4]


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT-style match with ``+`` and ``#`` wildcards."""
    pp, tp = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pp):
        if p == "#":
            return True
        if i >= len(tp) or (p != "+" and p != tp[i]):
            return False
    return len(pp) == len(tp)


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, headers: dict[str, Any], payload: bytes = b"") -> None:
        with self.lock:
            self.sock.sendall(encode_message(headers, payload))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class Nucleus:
    """Fake nucleus: records what clients did and lets tests push messages/config to them."""

    def __init__(self, socket_path: str | Path, auth_token: str = "test-token",
                 configuration: dict | None = None, component: str = "com.edgeloop.runtime") -> None:
        self.socket_path = str(socket_path)
        self.auth_token = auth_token
        self.configuration: dict = dict(configuration or {})
        self.component = component
        self.fail_publish = False
        # the component's accessControl, as the nucleus enforces it; None: allow everything
        self.access_control: dict | None = None
        self.denied: list[tuple[str, str]] = []
        self.iot_core_published: list[dict] = []
        self.local_published: list[dict] = []
        self.states: list[str] = []
        self.connections = 0
        self._lock = threading.Condition()
        self._streams: list[tuple[str, str | None, _Conn, int]] = []  # (kind, topic, conn, stream id)
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()

    # lifecycle
    def start(self) -> Nucleus:
        """Listen on the socket and serve clients, one thread each (may be called again after stop)."""
        self._stopping.clear()
        Path(self.socket_path).unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then join the threads."""
        self._stopping.set()
        if self._threads:
            self._threads[0].join(timeout=2)  # the accept loop: no new connections after this
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
            self._streams.clear()
        for conn in conns:
            conn.close()
        for t in self._threads[1:]:
            t.join(timeout=2)
        self._threads.clear()
        Path(self.socket_path).unlink(missing_ok=True)

    def __enter__(self) -> Nucleus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment variables a component gets from the nucleus."""
        return {"AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": self.socket_path,
                "SVCUID": self.auth_token, "AWS_IOT_THING_NAME": "test-thing"}

    # driving clients
    def deliver_local(self, topic: str, payload: bytes) -> int:
        """Send a binary message to matching SubscribeToTopic streams; returns how many got it."""
        event = {"binaryMessage": {"message": base64.b64encode(payload).decode(), "context": {"topic": topic}}}
        return self._push("local", topic, "SubscriptionResponseMessage", event)

    def deliver_iot_core(self, topic: str, payload: bytes) -> int:
        """Send an MQTT message to matching SubscribeToIoTCore streams; returns how many got it."""
        event = {"message": {"topicName": topic, "payload": base64.b64encode(payload).decode()}}
        return self._push("iot_core", topic, "IoTCoreMessage", event)

    def set_configuration(self, value: dict) -> None:
        """Replace the configuration and notify SubscribeToConfigurationUpdate streams."""
        with self._lock:
            self.configuration = dict(value)
        event = {"configurationUpdateEvent": {"componentName": self.component, "keyPath": []}}
        self._push("configuration", None, "ConfigurationUpdateEvents", event)

    def subscribed(self, kind: str, topic: str | None = None) -> bool:
        """Whether a client holds a subscription of this kind (and topic, if given)."""
        return any(k == kind and (topic is None or t == topic) for k, t, _, _ in list(self._streams))

    def wait_subscribed(self, kind: str, topic: str | None = None, timeout: float = 5) -> None:
        """Block until a client holds a subscription of this kind (and topic, if given)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.subscribed(kind, topic), timeout):
                raise TimeoutError(f"no {kind} subscription for {topic!r}")

    # internals
    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name="nucleus")
        self._threads.append(t)
        t.start()

    def _push(self, kind: str, topic: str | None, model: str, event: dict) -> int:
        body = json.dumps(event).encode()
        with self._lock:
            targets = [(c, sid) for k, t, c, sid in self._streams
                       if k == kind and (topic is None or topic_matches(t or "", topic))]
            for conn, sid in targets:  # sent under the lock so events never overtake a subscribe's response
                with contextlib.suppress(OSError):
                    conn.send(_app_headers(sid, NS + model, 0), body)
        return len(targets)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()  # type: ignore[union-attr]
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            conn = _Conn(sock)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: _Conn) -> None:
        authed = False
        try:
            while not self._stopping.is_set():
                headers, payload = read_message(conn.sock)
                mtype, flags = headers.get(":message-type"), headers.get(":message-flags", 0)
                sid = headers.get(":stream-id", 0)
                if mtype == CONNECT:
                    token = json.loads(payload or b"{}").get("authToken")
                    authed = token == self.auth_token
                    if authed:  # counted before the ack, so a connected client always sees itself counted
                        with self._lock:
                            self.connections += 1
                    conn.send({":message-type": CONNECT_ACK, ":message-flags": CONNECTION_ACCEPTED if authed else 0,
                               ":stream-id": 0})
                    if not authed:  # let the client hang up first, so it reports access denied
                        conn.sock.settimeout(2)
                        while conn.sock.recv(4096):
                            pass
                        return
                elif mtype == PING:
                    conn.send({":message-type": PING_RESPONSE, ":message-flags": 0, ":stream-id": 0}, payload)
                elif not authed:
                    return
                elif mtype == APPLICATION_MESSAGE and sid:
                    if flags & TERMINATE_STREAM:
                        with self._lock:
                            self._streams = [s for s in self._streams if not (s[2] is conn and s[3] == sid)]
                    elif "operation" in headers:
                        self._operation(conn, sid, headers["operation"], json.loads(payload or b"{}"))
        except (OSError, ValueError, ConnectionError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._streams = [s for s in self._streams if s[2] is not conn]
            conn.close()

    def allowed(self, op: str, topic: str) -> bool:
        """Whether ``access_control`` lets the component do ``op`` on ``topic`` (exact, ``*``, or MQTT wildcards)."""
        policies = (self.access_control or {}).get(_AUTHORIZED_BY[op], {}) or {}
        for policy in policies.values():
            ops = policy.get("operations") or []
            if NS + op in ops or "*" in ops:
                for resource in policy.get("resources") or []:
                    if resource in ("*", topic) or topic_matches(resource, topic):
                        return True
        return False

    def _operation(self, conn: _Conn, sid: int, operation: str, req: dict) -> None:
        op = operation.removeprefix(NS)
        response: dict = {}
        topic = req.get("topic") or req.get("topicName") or ""
        if self.access_control is not None and op in _AUTHORIZED_BY and not self.allowed(op, topic):
            self.denied.append((op, topic))
            return conn.send(_app_headers(sid, NS + "UnauthorizedError", TERMINATE_STREAM, APPLICATION_ERROR),
                             json.dumps({"message": f"not authorized: {op} on {topic}"}).encode())
        if op == "PublishToIoTCore":
            if self.fail_publish:
                return conn.send(_app_headers(sid, NS + "ServiceError", TERMINATE_STREAM, APPLICATION_ERROR),
                                 json.dumps({"message": "publish failed (fail_publish)"}).encode())
            self.iot_core_published.append({"topic": req.get("topicName"), "qos": req.get("qos"),
                                            "payload": base64.b64decode(req.get("payload", ""))})
        elif op == "PublishToTopic":
            msg = req.get("publishMessage", {})
            if "binaryMessage" in msg:
                data = base64.b64decode(msg["binaryMessage"].get("message", ""))
            else:
                data = json.dumps(msg.get("jsonMessage", {}).get("message")).encode()
            self.local_published.append({"topic": req.get("topic"), "payload": data})
        elif op == "UpdateState":
            self.states.append(req.get("state", ""))
        elif op == "GetConfiguration":
            value: Any = self.configuration
            for key in req.get("keyPath") or []:
                if not isinstance(value, dict) or key not in value:
                    return conn.send(_app_headers(sid, NS + "ResourceNotFoundError", TERMINATE_STREAM,
                                                  APPLICATION_ERROR),
                                     json.dumps({"message": f"no key {key!r}"}).encode())
                value = value[key]
            response = {"componentName": req.get("componentName") or self.component, "value": value}
        elif op not in _STREAM_EVENT:
            return conn.send(_app_headers(sid, NS + "ServiceError", TERMINATE_STREAM, APPLICATION_ERROR),
                             json.dumps({"message": f"unsupported operation {operation}"}).encode())
        kind = _STREAM_EVENT.get(op)
        body = json.dumps(response).encode()
        with self._lock:  # respond and register atomically (see _push)
            conn.send(_app_headers(sid, f"{NS}{op}Response", 0 if kind else TERMINATE_STREAM), body)
            if kind:
                self._streams.append((kind, req.get("topic") or req.get("topicName"), conn, sid))
                self._lock.notify_all()
        return None


def _app_headers(sid: int, model: str, flags: int, mtype: int = APPLICATION_MESSAGE) -> dict[str, Any]:
    return {":message-type": mtype, ":message-flags": flags, ":stream-id": sid,
            ":content-type": "application/json", "service-model-type": model}


def wait_until(predicate: Any, timeout: float = 5) -> bool:
    """Poll ``predicate`` until true or timeout; returns its last truthiness."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
