"""Parsing JSON lines in worker processes, so a device's second core does the decoding while the
first one scores.

Under the GIL, decode and scoring share one core however many threads there are; JSON parsing
is most of a JSON-lines stream's cost. With ``source.parse_workers`` > 0 the source hands each
payload to a process pool and queues it, decoded, in arrival order. The engine uses that result
only if it was made for the schema it is serving (a hot swap to other features re-decodes in
the engine), and decodes the payload itself if a worker failed: parsing here is an optimisation,
never a second source of truth.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

from .contracts import InputSchema
from .records import Decoded, RecordDecoder
from .sources import Emit, Payload

log = logging.getLogger(__name__)

_decoder: RecordDecoder | None = None


def _init(schema: InputSchema) -> None:
    global _decoder
    _decoder = RecordDecoder(schema)


def _decode(items: list, ts_range: tuple[float, float]) -> Decoded:
    assert _decoder is not None
    return _decoder.decode(items, ts_range)


def schema_key(schema: InputSchema) -> str:
    return schema.model_dump_json()


class ParseStage:
    """Wraps a queue's ``put``: JSON-lines payloads are decoded by the pool, in order."""

    def __init__(self, put: Emit, schema: InputSchema, ts_range: Callable[[], tuple[float, float]],
                 workers: int) -> None:
        self.put = put
        self.ts_range = ts_range
        self.key = schema_key(schema)
        self.depth = 2 * workers  # payloads in flight: enough to keep every worker busy
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init, initargs=(schema,))
        self._inflight: deque[tuple[Payload, Future]] = deque()
        for _ in range(workers):  # start the workers now, not at the first payload
            self.pool.submit(int)

    def __call__(self, payload: Payload) -> bool:
        if payload.kind != "jsonl":
            return self._drain() and self.put(payload)
        try:
            future = self.pool.submit(_decode, payload.items, self.ts_range())
        except RuntimeError:  # the pool is gone (broken, or shut down at stop): the engine decodes
            return self._drain() and self.put(payload)
        self._inflight.append((payload, future))
        while len(self._inflight) > self.depth:
            if not self._release():
                return False
        return True

    def _release(self) -> bool:
        payload, future = self._inflight.popleft()
        try:
            payload.decoded, payload.schema_key = future.result(), self.key
        except Exception as err:  # a worker died: this payload is decoded by the engine instead
            log.warning("parse worker failed (%s); decoding in the engine", err)
        payload.arrived = time.monotonic()
        return self.put(payload)

    def _drain(self) -> bool:
        while self._inflight:
            if not self._release():
                return False
        return True

    def close(self) -> None:
        """Hand over what is in flight, then stop the workers."""
        self._drain()
        self.pool.shutdown(wait=False, cancel_futures=True)
