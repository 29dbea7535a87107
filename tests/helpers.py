"""Small helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cloud import synthetic

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"  # development aids beside the checkout; tests may read them

def record_line(values, ts=synthetic.START_TS, rid=None) -> str:
    rec = {"ts": ts, **dict(zip(synthetic.FEATURES, (float(v) for v in values)))}
    if rid is not None:
        rec["id"] = rid
    return json.dumps(rec)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def normal_rows(n: int, seed: int = 0) -> np.ndarray:
    return synthetic.device_stream("x", n, seed=seed, anomaly_rate=0.0).X
