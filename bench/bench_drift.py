"""The fleet review at scale: device-window summaries x 64 features, time and peak memory.

    .venv/bin/python bench/bench_drift.py [--devices 1000] [--windows 10] [--features 64] [--workers 8]
                                          [--dask N] [--no-v3]

Writes ``devices x windows`` version-4 summaries (hourly windows of 1,000 rows, 64 features, as
devices write them: counted on the baseline's review grids) to a local store, then, each in a fresh
process so peak memory is its own:

1. baseline: read and decode every summary (``load_summary``), nothing else;
2. review: ``fleet_drift`` over the whole history (profiles, tests, verdicts for every device);
3. with ``--dask N``: the same review on a Dask LocalCluster of N worker processes (start-up
   excluded; memory is the driver's);
4. compaction: the review writing a roll-up per whole device-day (``--compact``), then the same
   review again, which reads the roll-ups (with ``--windows 24`` every device has a whole day);
5. unless ``--no-v3``: the same windows written as version 3 (sketches only, as devices before
   version 4 write them), decoded and reviewed: the review as it was, measured in the same run.

Prints one JSON document; docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

POOL = 40  # distinct windows, reused under every device's keys (generating 10,000 costs minutes)
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def make_store(root: Path, devices: int, windows: int, features: int, version: int = 4) -> None:
    """Version 4: windows counted on the baseline's review grids, as devices now write them;
    version 3: as devices wrote them before (sketches only)."""
    import numpy as np

    from cloud.train import make_baseline, quantile_edges
    from edge_runtime.contracts import WindowSummary, baseline_key, summary_key
    from edge_runtime.store import LocalStore
    from edge_runtime.summary import summarise
    from edge_runtime.summary_format import encode

    rng = np.random.default_rng(0)
    store = LocalStore(root)
    names = [f"f{i:02d}" for i in range(features)]
    base = rng.normal(0, 1, (50_000, features)).astype(np.float32)
    baseline = make_baseline("m", "1.0.0", names, base, np.abs(base[:, 0]), 0)
    edges = [quantile_edges(base[:, j]) for j in range(features)]
    score_edges = quantile_edges(np.abs(base[:, 0]))
    from edge_runtime.summary import review_grid

    grids = [review_grid(baseline.features[n]) if version >= 4 else None for n in names]
    score_grid = review_grid(baseline.score) if version >= 4 else None

    def window(device: str, X, start: datetime) -> WindowSummary:
        return WindowSummary(model_name="m", model_version="1.0.0", device_id=device, window_start=start,
                             window_end=start + timedelta(hours=1), records=len(X),
                             features={n: summarise(X[:, j], edges[j], grids[j]) for j, n in enumerate(names)},
                             score=summarise(np.abs(X[:, 0]), score_edges, score_grid),
                             grid=baseline.grid if version >= 4 else None)

    store.put(baseline_key("m", "1.0.0"), baseline.model_dump_json().encode())
    pool = [window("x", rng.normal(0.3 if i % 10 == 0 else 0, 1, (1000, features)).astype(np.float32), T0)
            for i in range(POOL)]
    for d in range(devices):
        for w in range(windows):
            s = pool[(d * windows + w) % POOL].model_copy(
                update={"device_id": f"dev-{d:05d}", "window_start": T0 + timedelta(hours=w),
                        "window_end": T0 + timedelta(hours=w + 1), "instance_id": "i0"})
            store.put(summary_key("m", "1.0.0", s.device_id, s.window_start, instance="i0"), encode(s, version))


def child(mode: str, root: str, workers: int, dask_workers: int = 0) -> None:
    from cloud.drift import fleet_drift
    from edge_runtime.contracts import SUMMARY_PREFIX, load_summary
    from edge_runtime.store import LocalStore

    store = LocalStore(root)
    client = None
    if mode == "dask":
        from distributed import Client

        from cloud.drift import local_cluster

        client = Client(local_cluster(dask_workers))
        client.run(lambda: __import__("cloud.drift"))  # start-up, imports included, is not timed
    start = time.perf_counter()
    if mode == "decode":
        n = sum(1 for key in store.list(SUMMARY_PREFIX) if load_summary(store.get(key), key))
        detail = {"summaries": n}
    else:
        (report,), warnings = fleet_drift(store, last=None, workers=workers, dask=client, compact=mode == "compact")
        detail = {"devices": len(report.devices), "drift": len(report.drifted_devices), "warnings": len(warnings)}
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "peak_mb": peak_mb, **detail}))


def run_child(mode: str, root: Path, workers: int, dask_workers: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root), "--workers", str(workers),
                          "--dask", str(dask_workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dask", type=int, default=0, help="also review on a LocalCluster of this many workers")
    parser.add_argument("--no-v3", action="store_true", help="skip the version-3 store")
    parser.add_argument("--child")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.root, args.workers, args.dask)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        t = time.perf_counter()
        make_store(root, args.devices, args.windows, args.features)
        made = time.perf_counter() - t
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        decode = run_child("decode", root, args.workers)
        review = run_child("review", root, args.workers)
        dask = run_child("dask", root, args.workers, args.dask) if args.dask else None
        compact = run_child("compact", root, args.workers)
        warm = run_child("review", root, args.workers)
        old = {}
        if not args.no_v3:
            root3 = Path(tmp) / "store-v3"
            make_store(root3, args.devices, args.windows, args.features, version=3)
            old = {"decode": run_child("decode", root3, args.workers),
                   "review": run_child("review", root3, args.workers)}
    n = args.devices * args.windows
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "summaries": n, "features": args.features,
        "store_mb": round(size / 1e6, 1), "bytes_per_feature": round(size / n / (args.features + 1)),
        "generate_s": round(made, 1),
        "baseline_decode_s": round(decode["seconds"], 2), "baseline_peak_mb": round(decode["peak_mb"]),
        "review_s": round(review["seconds"], 2), "review_peak_mb": round(review["peak_mb"]),
        "review_x_decode": round(review["seconds"] / decode["seconds"], 2),
        "review": {k: v for k, v in review.items() if k not in ("seconds", "peak_mb")},
        **({"dask_workers": args.dask, "dask_s": round(dask["seconds"], 2),
            "dask_x_decode": round(dask["seconds"] / decode["seconds"], 2)} if dask else {}),
        "compacting_review_s": round(compact["seconds"], 2),
        "review_from_rollups_s": round(warm["seconds"], 2), "rollups_peak_mb": round(warm["peak_mb"]),
        "rollups_x_decode": round(warm["seconds"] / decode["seconds"], 3),
        **({"v3_decode_s": round(old["decode"]["seconds"], 2), "v3_review_s": round(old["review"]["seconds"], 2),
            "v3_review_peak_mb": round(old["review"]["peak_mb"]),
            "review_x_v3_review": round(review["seconds"] / old["review"]["seconds"], 3)} if old else {}),
    }, indent=1))


if __name__ == "__main__":
    main()
