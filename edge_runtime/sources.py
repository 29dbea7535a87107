"""Sources: where records come from, behind one small interface.

A source reads raw bytes and hands the service ``Payload``s: a run of JSON lines or one binary
frame, with where it came from and an optional acknowledgement hook that the service calls once
the payload's records are scored and counted in a window. Parsing happens later, a batch at a
time, on the engine's thread: a source only cuts bytes into messages, so it stays cheap and a
malformed message can never stop it.

``Source.run(emit, stop)`` reads until its input ends (a file) or ``stop`` is set (everything
else), calling ``emit`` for each payload; ``emit`` returns False once the service no longer
takes input. Transports (MQTT, Greengrass IPC) are sources of this same shape.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .contracts import SourceConfig
from .frames import FrameError, FrameSplitter
from .records import TooLong

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
TOO_LONG_HEAD = 256  # bytes of an over-long line kept for its dead letter


@dataclass
class Payload:
    """Messages from one source, in order. ``kind``: ``jsonl`` (``items`` are lines, or ``TooLong``
    markers), ``frame`` (``items`` holds one binary frame) or ``error`` (``items`` holds one
    ``bytes`` head of what could not be framed, ``note`` says why)."""

    kind: str
    items: list
    source: str
    first_no: int  # message number of items[0] within its source, from 1
    n: int = 0  # records carried (for the queue's bound); set from items when 0
    ack: Callable[[], None] | None = None
    note: str = ""
    arrived: float = field(default_factory=time.monotonic)
    decoded: object = None  # a Decoded made ahead by a parse worker (parsing.py), for ``schema_key``
    schema_key: str = ""

    def __post_init__(self) -> None:
        if not self.n:
            self.n = max(len(self.items), 1)


Emit = Callable[[Payload], bool]


class Source(Protocol):
    name: str
    finite: bool  # its input ends by itself (a file): the service then drains and exits

    def run(self, emit: Emit, stop: threading.Event) -> None: ...


class LineSplitter:
    """Cuts a byte stream into lines without ever holding more than ``max_bytes`` of one line:
    an over-long line is skipped as it streams past and stands in the output as ``TooLong``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._skipping = 0  # bytes of an over-long line skipped so far; 0 when not skipping
        self._head = b""

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        parts = data.split(b"\n")
        tail = parts.pop()
        out: list[bytes | TooLong] = []
        if parts and (self._pending or self._skipping):
            out.append(self._finish(parts[0]))
            parts = parts[1:]
        if parts and max(map(len, parts)) <= self.max_bytes:
            out.extend(parts)
        else:
            out.extend(x if len(x) <= self.max_bytes else TooLong(len(x), x[:TOO_LONG_HEAD]) for x in parts)
        if tail:
            self._hold(tail)
        return out

    def flush(self) -> list[bytes | TooLong]:
        """The last line of a stream that did not end in a newline."""
        if self._pending or self._skipping:
            return [self._finish(b"")]
        return []

    def _keep_head(self, data: bytes) -> None:
        if len(self._head) < TOO_LONG_HEAD:
            self._head += data[: TOO_LONG_HEAD - len(self._head)]

    def _hold(self, data: bytes) -> None:
        if self._skipping:
            self._skipping += len(data)
            self._keep_head(data)
        elif self._pending_len + len(data) > self.max_bytes:
            self._head = (b"".join(self._pending) + data[:TOO_LONG_HEAD])[:TOO_LONG_HEAD]
            self._skipping = self._pending_len + len(data)
            self._pending, self._pending_len = [], 0
        else:
            self._pending.append(data)
            self._pending_len += len(data)

    def _finish(self, end: bytes) -> bytes | TooLong:
        if self._skipping:
            self._keep_head(end)
            marker = TooLong(self._skipping + len(end), self._head)
            self._skipping, self._head = 0, b""
            return marker
        line = b"".join(self._pending) + end
        self._pending, self._pending_len = [], 0
        return line if len(line) <= self.max_bytes else TooLong(len(line), line[:TOO_LONG_HEAD])


class StreamCutter:
    """One stream's bytes into payloads of at most ``chunk`` messages, lines or frames."""

    def __init__(self, name: str, config: SourceConfig, chunk: int) -> None:
        self.name = name
        self.frames = config.format == "frames"
        self.chunk = chunk
        self.lines = LineSplitter(config.max_message_bytes)
        self.framer = FrameSplitter(config.max_message_bytes)
        self.count = 0  # messages cut so far
        self.broken = False

    def feed(self, data: bytes) -> list[Payload]:
        if self.broken:
            return []
        if not self.frames:
            return self._line_payloads(self.lines.feed(data))
        try:
            frames = self.framer.feed(data)
        except FrameError as err:
            return self._frame_payloads([]) + [self._broken(str(err), data[:TOO_LONG_HEAD])]
        return self._frame_payloads(frames)

    def end(self) -> list[Payload]:
        """End of the stream: a last line without a newline, or an unfinished frame."""
        if self.broken:
            return []
        if not self.frames:
            return self._line_payloads(self.lines.flush())
        if self.framer.leftover():
            return [self._broken(f"stream ended inside a frame ({self.framer.leftover()} bytes)", b"")]
        return []

    def _line_payloads(self, lines: list) -> list[Payload]:
        out = []
        for i in range(0, len(lines), self.chunk):
            part = lines[i:i + self.chunk]
            out.append(Payload("jsonl", part, self.name, self.count + 1))
            self.count += len(part)
        return out

    def _frame_payloads(self, frames: list[bytes]) -> list[Payload]:
        out = []
        for frame in frames:
            self.count += 1
            rows = int.from_bytes(frame[8:12], "little")
            out.append(Payload("frame", [frame], self.name, self.count, n=max(rows, 1)))
        return out

    def _broken(self, why: str, head: bytes) -> Payload:
        self.broken = True
        self.count += 1
        log.error("%s: %s; the rest of this stream is not read", self.name, why)
        return Payload("error", [head], self.name, self.count, note=why)


def _emit_all(emit: Emit, payloads: list[Payload]) -> bool:
    for p in payloads:
        if not emit(p):
            return False
    return True


def _read_to_end(read: Callable[[], bytes | None], cutter: StreamCutter, emit: Emit, stop: threading.Event) -> None:
    """Feed ``read()``'s blocks (None: nothing yet; b"": the end) to ``cutter`` until the end or a stop.

    Only a real end flushes a last line without a newline; after a stop, a half-read line is not a
    record (the file, or the writer, still has all of it)."""
    while not stop.is_set():
        data = read()
        if data is None:
            continue
        if not data:
            _emit_all(emit, cutter.end())
            return
        if not _emit_all(emit, cutter.feed(data)) or cutter.broken:
            return


class FileSource:
    """A file read once to its end (JSON lines or frames): replays, batch jobs, the demo."""

    finite = True

    def __init__(self, config: SourceConfig, chunk: int, path: str | None = None) -> None:
        self.path = path or config.path
        self.name = f"file:{self.path}"
        self.cutter = StreamCutter(self.name, config, chunk)
        # open now, so a missing file is a start-up error rather than a log line
        self._fh = open(self.path, "rb")

    def run(self, emit: Emit, stop: threading.Event) -> None:
        with self._fh as fh:
            _read_to_end(lambda: fh.read(READ_SIZE), self.cutter, emit, stop)


class StdinSource:
    """Standard input, read as bytes (no locale, no decoding) and without blocking shutdown."""

    finite = True
    name = "stdin"

    def __init__(self, config: SourceConfig, chunk: int, fd: int | None = None) -> None:
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.cutter = StreamCutter(self.name, config, chunk)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        def read() -> bytes | None:
            ready, _, _ = select.select([self.fd], [], [], 0.2)  # so a stop is seen within 0.2 s
            return os.read(self.fd, READ_SIZE) if ready else None

        _read_to_end(read, self.cutter, emit, stop)


class TailSource:
    """A file followed as it grows, like ``tail -F``: survives rotation and truncation."""

    finite = False

    def __init__(self, config: SourceConfig, chunk: int) -> None:
        self.path = Path(config.path)
        self.name = f"tail:{self.path}"
        self.config = config
        self.chunk = chunk
        self.poll = config.poll_ms / 1000.0
        # where reading starts is fixed now, at start-up, not whenever the thread gets to it
        self._fh = self._open(at_end=not config.from_start)

    def _open(self, at_end: bool):
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return None
        if at_end:
            fh.seek(0, os.SEEK_END)
        return fh

    def run(self, emit: Emit, stop: threading.Event) -> None:
        fh, self._fh = self._fh, None
        cutter = StreamCutter(self.name, self.config, self.chunk)
        try:
            while not stop.is_set():
                if fh is None:
                    fh = self._open(at_end=False)  # created or replaced after start: all of it is new
                    if fh is None:
                        stop.wait(self.poll)
                        continue
                data = fh.read(READ_SIZE)
                if data:
                    if not _emit_all(emit, cutter.feed(data)):
                        return
                    if cutter.broken:  # frames out of step: wait for the file to be replaced
                        cutter = StreamCutter(self.name, self.config, self.chunk)
                        fh.seek(0, os.SEEK_END)
                    continue
                if self._replaced(fh):
                    log.info("%s: file rotated or truncated; reading the new one from its start", self.name)
                    _emit_all(emit, cutter.end())
                    fh.close()
                    fh, cutter = None, StreamCutter(self.name, self.config, self.chunk)
                    continue
                stop.wait(self.poll)
        finally:
            if fh is not None:
                fh.close()

    def _replaced(self, fh) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # keep reading the open file until a new one appears
        return st.st_ino != os.fstat(fh.fileno()).st_ino or st.st_size < fh.tell()


class SocketSource:
    """A local listening socket, TCP or Unix: any number of clients, each a stream of JSON lines
    or frames. A client that sends an unframeable byte stream is disconnected; the others go on."""

    finite = False

    def __init__(self, config: SourceConfig, chunk: int) -> None:
        self.config = config
        self.chunk = chunk
        if config.resolved_kind == "unix":
            path = Path(config.path)
            if path.is_socket():
                path.unlink()  # left by a process that was killed
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(path))
            self.name = f"unix:{path}"
            self.address: object = str(path)
        else:
            self.listener = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((config.host, config.port))
            self.address = self.listener.getsockname()[:2]
            self.name = f"tcp:{self.address[0]}:{self.address[1]}"
        self.listener.listen(64)
        self.listener.setblocking(False)
        self._clients = 0

    def run(self, emit: Emit, stop: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        try:
            while not stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    if key.data is None:
                        self._accept(sel)
                    elif not self._read(sel, key.fileobj, key.data, emit):
                        return
        finally:
            self._drain(sel, emit)
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()
            if self.config.resolved_kind == "unix":
                Path(self.config.path).unlink(missing_ok=True)

    def _drain(self, sel: selectors.BaseSelector, emit: Emit, budget_s: float = 2.0) -> None:
        """At stop: what clients already sent is in this host's buffers, so read it (bounded in
        time: a client that never stops sending cannot hold the drain open) and end each stream."""
        deadline = time.monotonic() + budget_s
        while True:  # clients that connected (and perhaps sent) just before the stop
            before = len(sel.get_map())
            self._accept(sel)
            if len(sel.get_map()) == before:
                break
        for key in list(sel.get_map().values()):
            conn, cutter = key.fileobj, key.data
            if cutter is None:
                continue
            while time.monotonic() < deadline and not cutter.broken:
                try:
                    data = conn.recv(READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    data = b""
                if not data or not _emit_all(emit, cutter.feed(data)):
                    break
            _emit_all(emit, cutter.end())

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._clients += 1
        sel.register(conn, selectors.EVENT_READ, StreamCutter(f"{self.name}#{self._clients}", self.config, self.chunk))

    def _read(self, sel, conn: socket.socket, cutter: StreamCutter, emit: Emit) -> bool:
        try:
            data = conn.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if data and not cutter.broken:
            if not _emit_all(emit, cutter.feed(data)):
                return False
        if not data or cutter.broken:
            _emit_all(emit, cutter.end())
            sel.unregister(conn)
            conn.close()
        return True

    def close(self) -> None:
        self.listener.close()


def message_payload(config: SourceConfig, body: bytes, source: str, no: int) -> Payload:
    """One message of a message transport (MQTT, Greengrass IPC) as a payload: one JSON record, a
    JSON array of records, or (``format: frames``) one binary frame."""
    import struct

    import orjson

    from .frames import HEADER, FrameError, read_header

    if len(body) > config.max_message_bytes:
        return Payload("jsonl", [TooLong(len(body), body[:TOO_LONG_HEAD])], source, no)
    if config.format == "frames":
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
            items = [orjson.dumps(r) for r in orjson.loads(text)] or [b""]
        except orjson.JSONDecodeError:
            items = [body]  # dead-lettered as malformed JSON by the decoder
        return Payload("jsonl", items, source, no)
    return Payload("jsonl", [text], source, no)  # one record, whatever bytes it holds


def open_source(config: SourceConfig, chunk: int, path: str | None = None, client_id: str = "edgeloop") -> Source:
    """The source a config names; ``path`` overrides the file (``--input``), '-' meaning stdin."""
    kind = config.resolved_kind
    if path is not None:
        kind = "stdin" if path == "-" else "file"
    if kind == "mqtt":
        if config.mqtt.client == "awsiotsdk":
            from .mqtt5_sdk import SdkMqttSource

            return SdkMqttSource(config, client_id)
        from .mqtt import MqttSource

        return MqttSource(config, client_id)
    if kind == "stdin":
        return StdinSource(config, chunk)
    if kind == "file":
        return FileSource(config, chunk, path)
    if kind == "tail":
        return TailSource(config, chunk)
    return SocketSource(config, chunk)
