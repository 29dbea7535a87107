"""A small threaded TCP fault-injection proxy for tests.

``FaultProxy`` listens on an ephemeral loopback port and forwards every accepted connection to a real
server (for example a moto server).  The proxy can be switched at runtime between three modes:

``"pass"``
    Bytes are forwarded both ways, one daemon thread per direction per connection.  Keep-alive
    connections, half-closes and multi-megabyte bodies are handled.

``"refuse"``
    Every connection that exists at the moment of the switch is cut with a TCP reset (``SO_LINGER``
    0).  New connections are accepted and immediately reset by the proxy, so the client sees
    ``ECONNRESET`` from connect/send/recv without any timeout; botocore raises ``ConnectionClosedError``
    or (when the reset hits while sending, e.g. a PUT body) ``EndpointConnectionError``.  The listening socket
    is deliberately kept open (rather than closed to produce ``ECONNREFUSED``) so that the port never
    changes and can never be taken by another socket while the proxy is "down".

``"hang"``
    New connections are accepted but nothing is read, forwarded or answered, and existing connections
    stop forwarding: unread bytes stay in the kernel buffers and are not delivered.  Clients therefore
    see a read timeout.  Leaving ``"hang"`` (for any other mode) closes every connection that was alive
    while hung, instead of resuming them: by then their clients have normally timed out, and replaying
    stale requests would only confuse the server.  Idle pooled connections are closed with a FIN, which
    urllib3 notices before reuse, and a client that was mid-request simply retries on a new connection.

Mode switches are applied at chunk granularity (up to 64 KiB): a chunk that a pump thread already read
before a switch to ``"hang"`` is held as well, but a ``send`` call already in progress completes.
All threads are daemons; ``stop`` closes every socket and joins the threads within about two seconds
even if clients are stuck on hung connections.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "refuse", "hang"]
_MODES: tuple[str, ...] = ("pass", "refuse", "hang")
_POLL_S = 0.05
_CHUNK = 64 * 1024
_UPSTREAM_CONNECT_TIMEOUT_S = 1.0
_STOP_JOIN_S = 1.5


def _ready(sock: socket.socket, events: int) -> bool:
    """Wait up to one poll interval for ``events`` on ``sock`` (poll(): no FD_SETSIZE limit)."""
    poller = select.poll()
    poller.register(sock.fileno(), events)
    return bool(poller.poll(_POLL_S * 1000))


def _close(sock: socket.socket | None, *, reset: bool) -> None:
    """Close ``sock``; with ``reset`` the peer gets an RST (SO_LINGER 0) instead of a FIN."""
    if sock is None:
        return
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Conn:
    """One proxied client connection and (once connected) its upstream socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        self.pumps_done = 0
        self.lock = threading.Lock()

    def close(self, *, reset: bool) -> bool:
        """Close both sockets once; returns False if the connection was already closed."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            client, upstream = self.client, self.upstream
        _close(client, reset=reset)
        _close(upstream, reset=reset)
        return True


class FaultProxy:
    """Threaded TCP proxy between a client and ``target_host:target_port`` with switchable faults."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port: int = 0
        self._mode: Mode = "pass"
        self._connections = 0
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def connections(self) -> int:
        """Total number of client connections accepted so far, in any mode."""
        return self._connections

    @property
    def open_connections(self) -> int:
        """Number of client connections currently tracked (not yet closed)."""
        with self._lock:
            return len(self._conns)

    def start(self) -> FaultProxy:
        if self._listener is not None:
            raise RuntimeError("FaultProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(128)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def set_mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
        with self._lock:
            old = self._mode
            if mode == "refuse":
                victims, reset = list(self._conns), True
            elif old == "hang" and mode != "hang":
                victims, reset = list(self._conns), False
            else:
                victims, reset = [], False
            for conn in victims:
                self._conns.discard(conn)
                # closed before the mode changes: a pump held by "hang" must not forward what it
                # holds in the moment between the switch and the close
                conn.close(reset=reset)
            self._mode = mode

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            victims = list(self._conns)
            self._conns.clear()
        for conn in victims:
            conn.close(reset=True)
        deadline = time.monotonic() + _STOP_JOIN_S
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            _close(self._listener, reset=False)

    def __enter__(self) -> FaultProxy:
        if self._listener is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(_POLL_S)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            with self._lock:
                self._connections += 1
                mode = self._mode
                conn = _Conn(client)
                if mode != "refuse" and not self._stopping.is_set():
                    self._conns.add(conn)
            if mode == "refuse" or self._stopping.is_set():
                conn.close(reset=True)
            elif mode == "pass":
                self._spawn(self._serve, conn, name=f"faultproxy-conn-{self.port}")
            # "hang": the connection is just held; it is closed on leaving hang or on stop().

    def _serve(self, conn: _Conn) -> None:
        """Connect upstream, then pump client->upstream here and upstream->client in a second thread."""
        try:
            upstream = socket.create_connection(
                (self.target_host, self.target_port), timeout=_UPSTREAM_CONNECT_TIMEOUT_S
            )
        except OSError:
            self._drop(conn, reset=True)
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.setblocking(False)
        with conn.lock:
            if conn.closed:
                _close(upstream, reset=True)
                return
            conn.upstream = upstream
        self._spawn(self._pump, conn, upstream, conn.client, name=f"faultproxy-down-{self.port}")
        self._pump(conn, conn.client, upstream)

    def _drop(self, conn: _Conn, *, reset: bool) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.close(reset=reset)

    def _hold(self, conn: _Conn) -> bool:
        """Wait while the proxy hangs; False once the connection or the proxy is closed."""
        while self._mode == "hang":
            if conn.closed or self._stopping.wait(_POLL_S):
                return False
        return not conn.closed and not self._stopping.is_set()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._hold(conn):
                if not _ready(src, select.POLLIN) or not self._hold(conn):
                    continue
                try:
                    data = src.recv(_CHUNK)
                except BlockingIOError:
                    continue
                if not data:  # EOF: propagate the half-close
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    break
                if not self._send_all(conn, dst, data):
                    return
        except (OSError, ValueError):
            # Peer reset, or the sockets were closed by set_mode()/stop() from another thread.
            self._drop(conn, reset=True)
            return
        with conn.lock:
            conn.pumps_done += 1
            both_done = conn.pumps_done == 2
        if both_done:
            self._drop(conn, reset=False)

    def _send_all(self, conn: _Conn, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if not self._hold(conn):
                return False
            if not _ready(dst, select.POLLOUT):
                continue
            try:
                sent = dst.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]
        return True
