"""Health: the service's counters and gauges, read three ways.

The engine bumps plain integers on its own thread (no locks, no per-record cost). They are read
as a Prometheus text endpoint (``prometheus-client``, a custom collector that builds the metrics
at scrape time; off by default), as one log line at an interval, and as the header written into
every window summary.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .contracts import WindowHealth

LATENCY_SAMPLES = 4096
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


@dataclass
class Health:
    started: float = field(default_factory=time.monotonic)
    records_in: int = 0
    scored: int = 0
    rejected: Counter = field(default_factory=Counter)
    outliers: int = 0
    windows: int = 0
    swaps: int = 0
    swaps_refused: int = 0
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # bucket upper bound -> batches
    provider: str = ""
    model_name: str = ""
    model_version: str = ""
    queue_depth: Callable[[], int] = lambda: 0
    dropped: Callable[[], int] = lambda: 0
    uploaded: int = 0
    upload_failures: int = 0
    writer_conflicts: int = 0
    replays: int = 0
    spool: object | None = None  # the Spool, read for pending, bytes, disk_full and quarantined
    lines_lost: Callable[[], int] = lambda: 0  # event and dead-letter lines a full disk refused
    events_published: int = 0
    events_dropped: int = 0
    score_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    arrival_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    _recent_sizes: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def batch(self, size: int, score_seconds: float) -> None:
        self.batches += 1
        self.batch_sizes[next((b for b in BATCH_BUCKETS if size <= b), BATCH_BUCKETS[-1])] += 1
        self._recent_sizes.append(size)
        self.score_ms.append(score_seconds * 1000.0)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    @staticmethod
    def quantile(samples: deque, q: float) -> float | None:
        data = list(samples)
        return float(np.quantile(data, q)) if data else None

    def window_header(self) -> WindowHealth:
        return WindowHealth(
            provider=self.provider,
            uptime_s=round(self.uptime_s, 3),
            records_in=self.records_in,
            scored=self.scored,
            rejected=sum(self.rejected.values()),
            outliers=self.outliers,
            dropped=self.dropped(),
            queue_depth=self.queue_depth(),
            batches=self.batches,
            batch_size_p50=self.quantile(self._recent_sizes, 0.5),
            score_latency_ms_p50=self.quantile(self.score_ms, 0.5),
            score_latency_ms_p99=self.quantile(self.score_ms, 0.99),
            swaps=self.swaps,
            spool_pending=self.spool.pending if self.spool is not None else None,
            spool_bytes=self.spool.bytes if self.spool is not None else None,
            disk_full=bool(self.spool is not None and self.spool.disk_full),
            uploaded=self.uploaded,
            upload_failures=self.upload_failures,
            writer_conflicts=self.writer_conflicts,
            replays=self.replays,
            lines_lost=self.lines_lost(),
            events_published=self.events_published,
            events_dropped=self.events_dropped,
        )

    def log_line(self) -> str:
        def ms(q, samples):
            v = self.quantile(samples, q)
            return "-" if v is None else f"{v:.2f}"

        return (
            f"health: model={self.model_name}:{self.model_version} provider={self.provider} "
            f"in={self.records_in} scored={self.scored} rejected={sum(self.rejected.values())} "
            f"outliers={self.outliers} dropped={self.dropped()} queue={self.queue_depth()} "
            f"windows={self.windows} score_ms_p50={ms(0.5, self.score_ms)} score_ms_p99={ms(0.99, self.score_ms)} "
            f"arrival_to_event_ms_p99={ms(0.99, self.arrival_ms)} uptime_s={self.uptime_s:.0f}"
            + (f" spool={self.spool.pending}/{self.spool.bytes}B uploaded={self.uploaded} "
               f"upload_failures={self.upload_failures}" if self.spool is not None else "")
            + (" DISK_FULL" if self.spool is not None and self.spool.disk_full else "")
            + (f" lines_lost={self.lines_lost()}" if self.lines_lost() else "")
            + (f" WRITER_CONFLICTS={self.writer_conflicts}" if self.writer_conflicts else "")
        )


class HealthCollector:
    """A prometheus-client collector reading ``Health`` at scrape time."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        h = self.health
        yield CounterMetricFamily("edgeloop_records_in", "Records received from sources", value=h.records_in)
        yield CounterMetricFamily("edgeloop_records_scored", "Records scored", value=h.scored)
        rejected = CounterMetricFamily("edgeloop_records_rejected", "Records dead-lettered", labels=["reason"])
        for reason, n in sorted(h.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("edgeloop_outliers", "Records flagged as outliers", value=h.outliers)
        yield CounterMetricFamily("edgeloop_records_dropped", "Records dropped by a full queue", value=h.dropped())
        yield CounterMetricFamily("edgeloop_windows", "Window summaries handed to the outbox", value=h.windows)
        yield CounterMetricFamily("edgeloop_model_swaps", "Hot model swaps done", value=h.swaps)
        yield CounterMetricFamily("edgeloop_model_swaps_refused", "Bundles refused at swap", value=h.swaps_refused)
        yield GaugeMetricFamily("edgeloop_queue_depth", "Records waiting in the intake queue", value=h.queue_depth())
        yield GaugeMetricFamily("edgeloop_uptime_seconds", "Seconds since the service started", value=h.uptime_s)
        yield CounterMetricFamily("edgeloop_uploads", "Objects the store confirmed", value=h.uploaded)
        yield CounterMetricFamily("edgeloop_upload_failures", "Upload attempts that failed", value=h.upload_failures)
        yield CounterMetricFamily("edgeloop_writer_conflicts", "Other runtimes seen writing as this device",
                                  value=h.writer_conflicts)
        yield CounterMetricFamily("edgeloop_replays", "Window parts not written: input replayed", value=h.replays)
        yield CounterMetricFamily("edgeloop_lines_lost", "Event and dead-letter lines a full disk refused",
                                  value=h.lines_lost())
        yield CounterMetricFamily("edgeloop_events_published", "Events and heartbeats the broker acknowledged",
                                  value=h.events_published)
        yield CounterMetricFamily("edgeloop_events_dropped", "Events dropped by a full publish queue",
                                  value=h.events_dropped)
        if h.spool is not None:
            sp = h.spool
            yield GaugeMetricFamily("edgeloop_spool_objects", "Objects waiting for the store", value=sp.pending)
            yield GaugeMetricFamily("edgeloop_spool_bytes", "Bytes waiting for the store", value=sp.bytes)
            yield GaugeMetricFamily("edgeloop_disk_full", "1 while the spool cannot write for lack of space",
                                    value=1 if sp.disk_full else 0)
            yield CounterMetricFamily("edgeloop_spool_quarantined", "Damaged spool files set aside",
                                      value=sp.quarantined)
        buckets, cumulative = [], 0
        for bound in BATCH_BUCKETS:
            cumulative += h.batch_sizes.get(bound, 0)
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", h.batches))
        yield HistogramMetricFamily("edgeloop_batch_size", "Records per scored batch", buckets=buckets,
                                    sum_value=h.scored)
        for name, samples, text in (("edgeloop_score_latency_ms_quantile", h.score_ms, "ONNX Runtime ms per batch"),
                                    ("edgeloop_arrival_to_event_ms_quantile", h.arrival_ms,
                                     "ms from arrival to scored, per batch")):
            g = GaugeMetricFamily(name, text + " (recent quantiles)", labels=["quantile"])
            for q in (0.5, 0.99):
                v = h.quantile(samples, q)
                if v is not None:
                    g.add_metric([str(q)], v)
            yield g
        yield InfoMetricFamily("edgeloop_model", "The model serving", value={
            "name": h.model_name, "version": h.model_version, "provider": h.provider})


def serve_metrics(health: Health, address: str, port: int):
    """Start the Prometheus endpoint on its own thread; returns (server, port actually bound)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    registry.register(HealthCollector(health))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server, server.server_address[1]
