"""A seeded synthetic sensor fleet, for the demo and the tests.

Each device reads six correlated sensors driven by a shared load with a daily cycle. Anomalies
(spikes of several standard deviations on one or two sensors) are injected on every device, and a
drift (a sensor offset) can start halfway through a device's stream. Every row carries its labels,
so recall and false-positive rates can be measured exactly.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ["temperature", "humidity", "pressure", "vibration", "current", "rpm"]
START_TS = 1_793_491_200  # 2026-11-01T00:00:00Z
STEP_S = 60


@dataclass
class Drift:
    feature: str
    shift_sd: float  # offset, in units of the feature's fleet-wide standard deviation


@dataclass
class DeviceStream:
    device_id: str
    ts: np.ndarray
    X: np.ndarray
    anomaly: np.ndarray  # bool per row
    drifted: np.ndarray  # bool per row
    drift: Drift | None = None
    ids: list[str] = field(default_factory=list)


CYCLE_S = 86400  # the sensors follow a daily cycle


def _sensors(rng: np.random.Generator, ts: np.ndarray, bias: float) -> np.ndarray:
    n = len(ts)
    day = 2 * np.pi * ((ts % CYCLE_S) / CYCLE_S)
    ambient = np.sin(day - 1.0) + 0.1 * rng.standard_normal(n)
    load = 0.6 + 0.3 * np.sin(2 * day) + 0.15 * rng.standard_normal(n)
    X = np.column_stack([
        40 + 8 * load + 2 * ambient + 0.4 * rng.standard_normal(n) + bias,  # temperature, C
        50 - 10 * ambient + 1.5 * rng.standard_normal(n),                   # humidity, %
        101.3 + 0.2 * ambient + 0.1 * rng.standard_normal(n),               # pressure, kPa
        0.5 + 0.4 * load + 0.03 * rng.standard_normal(n),                   # vibration, mm/s
        10 + 4 * load + 0.2 * rng.standard_normal(n),                       # current, A
        1500 + 300 * load + 10 * rng.standard_normal(n),                    # rpm
    ])
    return X.astype(np.float32)


# fleet-wide standard deviations, measured once on a large sample of _sensors
_SD = _sensors(np.random.default_rng(12345), START_TS + STEP_S * np.arange(100_000), 0.0).std(axis=0)


def training_frame(rows: int = 20_000, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ts = START_TS - STEP_S * rows + STEP_S * np.arange(rows)
    return _sensors(rng, ts, 0.0)


def write_training_csv(path: str | Path, rows: int = 20_000, seed: int = 7) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    X = training_frame(rows, seed)
    ts = START_TS - STEP_S * rows + STEP_S * np.arange(rows)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", *FEATURES])
        for t, row in zip(ts, X):
            w.writerow([int(t), *(f"{v:.5g}" for v in row)])
    return path


def device_stream(device_id: str, rows: int, seed: int, anomaly_rate: float = 0.02,
                  drift: Drift | None = None, offset: int = 0, drift_from: int | None = None) -> DeviceStream:
    """``rows`` records a minute apart, from ``offset`` minutes after the fleet's start; a drift
    starts at row ``drift_from`` (default: halfway)."""
    rng = np.random.default_rng(seed)
    ts = START_TS + STEP_S * (offset + np.arange(rows))
    X = _sensors(rng, ts, bias=0.05 * rng.standard_normal())
    drifted = np.zeros(rows, dtype=bool)
    if drift is not None:
        drifted[(rows // 2 if drift_from is None else drift_from):] = True
        j = FEATURES.index(drift.feature)
        X[drifted, j] += drift.shift_sd * _SD[j]
    anomaly = rng.random(rows) < anomaly_rate
    for i in np.flatnonzero(anomaly):
        cols = rng.choice(len(FEATURES), size=rng.integers(1, 3), replace=False)
        X[i, cols] += rng.choice([-1, 1], size=len(cols)) * rng.uniform(5, 8, size=len(cols)) * _SD[cols]
    ids = [f"{device_id}-{offset + i:06d}" for i in range(rows)]
    return DeviceStream(device_id, ts, X, anomaly, drifted, drift, ids)


def write_jsonl(stream: DeviceStream, path: str | Path, bad_lines: int = 0, seed: int = 0) -> Path:
    """Write a stream as JSON lines, with ``bad_lines`` malformed records mixed in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bad_at = set(rng.choice(len(stream.ts), size=min(bad_lines, len(stream.ts)), replace=False).tolist())
    broken = [
        '{"ts": 1, "temperature": ',  # truncated JSON
        json.dumps({"features": [1.0, 2.0]}),  # too few features
        '{"temperature": NaN, "humidity": 1, "pressure": 1, "vibration": 1, "current": 1, "rpm": 1}',
        json.dumps({"temperature": "hot", "humidity": 1, "pressure": 1, "vibration": 1, "current": 1, "rpm": 1}),
    ]
    n_bad = 0
    with open(path, "w") as fh:
        for i, (t, row, rid) in enumerate(zip(stream.ts, stream.X, stream.ids)):
            if i in bad_at:
                fh.write(broken[n_bad % len(broken)] + "\n")
                n_bad += 1
            rec = {"ts": int(t), "id": rid}
            rec.update({f: round(float(v), 5) for f, v in zip(FEATURES, row)})
            fh.write(json.dumps(rec) + "\n")
    return path
