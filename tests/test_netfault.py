"""Tests of the fault-injection proxy (tests/netfault.py) against a real moto server."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from moto.server import ThreadedMotoServer
from netfault import FaultProxy

CONNECTION_FAILURES = (EndpointConnectionError, ConnectionClosedError)
TIMEOUTS = (ReadTimeoutError, ConnectTimeoutError)


def fast_config(**overrides: Any) -> Config:
    """The project's fast-failing client config.

    botocore's ``retries.max_attempts`` counts *retries*, so this makes 2 attempts per call; and it
    mutates the ``retries`` dict it is given, hence a fresh Config per client.
    """
    kwargs: dict[str, Any] = {
        "connect_timeout": 1,
        "read_timeout": 1,
        "retries": {"max_attempts": 1},
        "s3": {"addressing_style": "path"},
    }
    kwargs.update(overrides)
    return Config(**kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[tuple[str, int]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def proxy(moto_endpoint: tuple[str, int]) -> Iterator[FaultProxy]:
    host, port = moto_endpoint
    with FaultProxy(host, port) as p:
        yield p


def s3_client(proxy: FaultProxy, config: Config | None = None) -> Any:
    return boto3.session.Session().client("s3", endpoint_url=proxy.url, config=config or fast_config())


@pytest.fixture
def s3(aws_env: None, proxy: FaultProxy) -> Any:
    return s3_client(proxy)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"netfault-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def test_pass_forwards_large_bodies(proxy: FaultProxy, s3: Any, bucket: str) -> None:
    assert proxy.mode == "pass"
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    body = os.urandom(5 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=body)
    got = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert got == body
    assert proxy.connections >= 1


def test_pass_many_concurrent_connections(aws_env: None, proxy: FaultProxy, bucket: str) -> None:
    client = s3_client(proxy, fast_config(max_pool_connections=16))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                key = f"k-{i}-{j}"
                payload = f"{i}:{j}".encode() * 1000
                client.put_object(Bucket=bucket, Key=key, Body=payload)
                assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == payload
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    # moto's werkzeug server answers "Connection: close", so each request is its own connection.
    assert proxy.connections >= 12
    assert wait_for(lambda: proxy.open_connections == 0)  # finished connections are not leaked


def test_refuse_fails_fast_then_recovers(proxy: FaultProxy, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="before", Body=b"x")

    proxy.set_mode("refuse")
    assert proxy.mode == "refuse"
    assert proxy.open_connections == 0  # existing connections were cut
    before = proxy.connections
    start = time.monotonic()
    with pytest.raises(CONNECTION_FAILURES):
        s3.put_object(Bucket=bucket, Key="during", Body=b"y")
    assert time.monotonic() - start < 3.0
    assert proxy.connections > before  # the client did reach the proxy and was reset

    proxy.set_mode("pass")
    s3.put_object(Bucket=bucket, Key="after", Body=b"z")
    assert s3.get_object(Bucket=bucket, Key="after")["Body"].read() == b"z"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"before", "after"}


def test_hang_times_out_then_recovers(proxy: FaultProxy, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="before", Body=b"x")

    proxy.set_mode("hang")
    assert proxy.mode == "hang"
    start = time.monotonic()
    with pytest.raises(TIMEOUTS):
        s3.put_object(Bucket=bucket, Key="during", Body=b"y")
    elapsed = time.monotonic() - start
    # A PUT always sends "Expect: 100-continue", which botocore waits 1 s for before sending the body,
    # then read_timeout=1; 2 attempts plus a standard-mode backoff of up to 1 s.
    assert 1.9 <= elapsed < 6.0

    # A single-attempt GET times out after just about the read timeout.
    once = s3_client(proxy, fast_config(retries={"total_max_attempts": 1}))
    start = time.monotonic()
    with pytest.raises(TIMEOUTS):
        once.get_object(Bucket=bucket, Key="before")
    assert 0.9 <= time.monotonic() - start < 2.0

    proxy.set_mode("pass")
    assert proxy.open_connections == 0  # hung connections are closed on leaving hang
    s3.put_object(Bucket=bucket, Key="after", Body=b"z")
    assert s3.get_object(Bucket=bucket, Key="after")["Body"].read() == b"z"
    # Nothing sent while hung reached the server (the held connections were closed, never flushed).
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"before", "after"}


def test_stop_is_prompt_while_client_hangs(aws_env: None, moto_endpoint: tuple[str, int]) -> None:
    host, port = moto_endpoint
    p = FaultProxy(host, port).start()
    slow = s3_client(p, Config(connect_timeout=1, read_timeout=30, retries={"total_max_attempts": 1}))
    p.set_mode("hang")
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            slow.list_buckets()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    deadline = time.monotonic() + 3
    while p.connections == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.connections == 1 and p.open_connections == 1

    start = time.monotonic()
    p.stop()
    assert time.monotonic() - start < 2.0
    t.join(5)
    assert not t.is_alive()
    assert outcome and isinstance(outcome[0], CONNECTION_FAILURES)
    leftover = [th.name for th in threading.enumerate() if th.name.startswith("faultproxy-")]
    assert not [name for name in leftover if name.endswith(f"-{p.port}")]


def test_set_mode_rejects_unknown_mode(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set_mode("sideways")  # type: ignore[arg-type]
    assert proxy.mode == "pass"


# --------------------------------------------------------------------------------------------------
# Existing-connection semantics.  moto closes every connection after one response, so these use a
# stdlib keep-alive echo server to check what happens to connections that are open across a switch.


class _Echo(socketserver.BaseRequestHandler):
    server: _EchoServer

    def handle(self) -> None:
        while data := self.request.recv(65536):
            with self.server.lock:
                self.server.received += len(data)
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.lock = threading.Lock()
        self.received = 0


@pytest.fixture
def echo_proxy() -> Iterator[tuple[FaultProxy, _EchoServer]]:
    server = _EchoServer()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with FaultProxy("127.0.0.1", server.server_address[1]) as p:
            yield p, server
    finally:
        server.shutdown()
        server.server_close()


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    sock.settimeout(2)
    return sock


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keepalive_large_bidirectional_stream_and_half_close(
    echo_proxy: tuple[FaultProxy, _EchoServer],
) -> None:
    proxy, _ = echo_proxy
    with _connect(proxy) as sock:
        for i in range(3):  # several exchanges on one keep-alive connection
            assert _echo(sock, f"ping {i}".encode()) == f"ping {i}".encode()
        payload = os.urandom(8 * 1024 * 1024)
        received: list[bytes] = []

        def read_all() -> None:
            while chunk := sock.recv(1 << 20):
                received.append(chunk)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        sock.sendall(payload)  # larger than all socket buffers: exercises backpressure both ways
        sock.shutdown(socket.SHUT_WR)  # half-close travels through; the echo server then closes
        reader.join(10)
        assert b"".join(received) == payload
    assert proxy.connections == 1
    assert wait_for(lambda: proxy.open_connections == 0)


def test_hang_holds_existing_connection_then_closes_it(echo_proxy: tuple[FaultProxy, _EchoServer]) -> None:
    proxy, server = echo_proxy
    with _connect(proxy) as old, _connect(proxy) as idle:
        assert _echo(old, b"ping") == b"ping"
        assert _echo(idle, b"ping") == b"ping"
        proxy.set_mode("hang")
        old.sendall(b"held")
        old.settimeout(0.3)
        with pytest.raises(TimeoutError):
            old.recv(10)
        assert server.received == 8  # the held bytes never reached the server

        with _connect(proxy) as new:  # new connections are accepted but never answered
            new.sendall(b"hello")
            new.settimeout(0.3)
            with pytest.raises(TimeoutError):
                new.recv(10)
            assert proxy.connections == 3 and server.received == 8

            proxy.set_mode("pass")  # every connection alive while hung is closed, not resumed
            assert proxy.open_connections == 0
            old.settimeout(2)
            new.settimeout(2)
            assert _is_closed(old) and _is_closed(new) and _is_closed(idle)
    assert server.received == 8
    with _connect(proxy) as fresh:
        assert _echo(fresh, b"again") == b"again"


def test_refuse_cuts_existing_and_resets_new_connections(echo_proxy: tuple[FaultProxy, _EchoServer]) -> None:
    proxy, _ = echo_proxy
    with _connect(proxy) as old:
        assert _echo(old, b"ping") == b"ping"
        proxy.set_mode("refuse")
        with pytest.raises(ConnectionResetError):
            old.recv(10)
    for _ in range(3):
        start = time.monotonic()
        # The kernel completes the handshake and the proxy then resets it: depending on timing the
        # reset surfaces from connect(), send() or recv(), but always at once.
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            with _connect(proxy) as new:
                new.sendall(b"x")
                new.recv(10)
        assert time.monotonic() - start < 0.5
    assert proxy.connections == 4 and proxy.open_connections == 0
    proxy.set_mode("pass")
    with _connect(proxy) as fresh:
        assert _echo(fresh, b"again") == b"again"
