"""Store-and-forward: summary size, summary cost, upload rate, and scoring while the store fails.

    .venv/bin/python bench/bench_sync.py [--rows 60000] [--repeat 3] [--only size,cost,uploads,outage]

Sections (each a ratio against a baseline measured in the same run):

1. size: bytes per series of a version-3 summary (binary, float KLL) for a 10,000-row window, vs
   the version-2 JSON one; and one-minute windows at several rates vs the JSON input they summarise.
2. cost: the engine on the 64-feature models, fed frames and fed JSON lines (``process``: decode,
   score, windows, events, spool), with window summaries (statistics, histograms, KLL sketches,
   digests, encoding) vs the same engine with that work switched off: the summaries' share.
3. uploads: objects per second from the spool to S3 (moto server on loopback, conditional puts,
   removal from the spool) vs bare boto3 ``put_object`` calls of the same objects.
4. outage: records/s through the engine (6-feature demo bundle, JSON lines one second apart, one-day
   windows, so that uploads come from the failure mode, not from windows the replay closes) with
   the uploader thread running against a store that is up, refusing connections, hanging, or up
   with 3,800 objects of backlog to drain. moto runs in its own process here.

Prints one JSON document; docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from bench_service import T0, make_bundles, runtime_config, sensor_rows  # noqa: E402

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def _window_summary(n_rows: int, n_features: int, seed: int = 0):
    """A window as a device builds it: histograms on the baseline's edges, counts on its review grids."""
    from edge_runtime.summary import MatrixAccumulator, review_grid, summarise
    from edge_runtime.windows import Window

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(5000, n_features))
    from cloud.train import quantile_edges

    edges = [quantile_edges(base[:, j]) for j in range(n_features)]
    grids = [review_grid(summarise(base[:, j], edges[j])) for j in range(n_features)]
    names = [f"f{j:02d}" for j in range(n_features)]
    w = Window(start=T0, end=T0 + 60, model_name="m", model_version="1.0.0", feature_names=names,
               features=MatrixAccumulator(edges, grids=grids), score=MatrixAccumulator([edges[0]], grids=grids[:1]),
               grid="0123456789abcdef")
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    w.features.update(X)
    w.score.update(rng.normal(size=(n_rows, 1)).astype(np.float32))
    w.records = n_rows
    return w, X, names


def _health():
    from edge_runtime.health import Health

    h = Health(provider="CPUExecutionProvider", records_in=123456, scored=123400, outliers=1234, batches=4321)
    h.rejected["malformed_json"] = 56
    for _ in range(100):
        h.batch(32, 0.0004)
    return h.window_header()


def bench_size() -> dict:
    global _HEALTH
    _HEALTH = _health()
    from edge_runtime.summary_format import encode

    out: dict = {}
    for f in (6, 64):
        w, _, _ = _window_summary(10_000, f)
        s = w.summary("bench", None, "0123456789ab")
        v4, v3 = len(encode(s)), len(encode(s, 3))
        v2 = len(s.model_dump_json(exclude={"grid": True, "features": {"__all__": {"grid_counts"}},
                                            "score": {"grid_counts"}}))
        out[f"10k_rows_{f}_features"] = {"v4_bytes_per_series": round(v4 / (f + 1)),
                                          "v3_bytes_per_series": round(v3 / (f + 1)),
                                          "v2_json_bytes_per_series": round(v2 / (f + 1)),
                                          "v4_vs_v2": round(v4 / v2, 3), "v4_vs_v3": round(v4 / v3, 3)}
    for rate_per_s in (0.1, 1, 10, 100):
        n = max(int(60 * rate_per_s), 1)
        w, X, names = _window_summary(n, 6)
        v4 = len(encode(w.summary("bench", _HEALTH, "0123456789ab")))  # with a health header, as a device writes
        raw = sum(len(json.dumps({"ts": T0 + i, **dict(zip(names, map(float, row)))})) + 1
                  for i, row in enumerate(X))
        out[f"60s_window_{rate_per_s}_per_s_6_features"] = {"records": n, "summary_bytes": v4, "raw_json_bytes": raw,
                                                            "summary_vs_raw": round(v4 / raw, 3)}
    return out


def bench_cost(work: Path, bundles: dict, rows: int, repeat: int) -> dict:
    from edge_runtime import runtime as runtime_module
    from edge_runtime.frames import encode_frame
    from edge_runtime.model import load_model
    from edge_runtime.runtime import EdgeRuntime
    from edge_runtime.sources import Payload
    from edge_runtime.summary import MatrixAccumulator

    X = sensor_rows(rows, seed=11)
    ts = (T0 + 0.25 * np.arange(rows)).astype(np.float64)  # four a second: 14,400 rows per one-hour window
    frames = [encode_frame(X[lo:lo + 256], ts[lo:lo + 256]) for lo in range(0, rows, 256)]
    names = [f"f{i:02d}" for i in range(X.shape[1])]
    lines = [json.dumps({"ts": t, **dict(zip(names, row))}).encode() for t, row in zip(ts.tolist(), X.tolist())]
    out = {}
    for name, bundle in bundles.items():
        model = load_model(bundle, runtime_config(work, bundle, "cost").scoring)

        def frames_in(bundle=bundle, model=model):
            with EdgeRuntime(runtime_config(work, bundle, "cost"), model=model) as rt:
                for i, fr in enumerate(frames):
                    rt.handle([Payload("frame", [fr], "bench", i + 1, n=256)])

        def json_in(bundle=bundle, model=model):
            with EdgeRuntime(runtime_config(work, bundle, "cost"), model=model) as rt:
                rt.process(lines)

        saved = (MatrixAccumulator.update, MatrixAccumulator.summaries, runtime_module.rows_digest,
                 runtime_module.encode)

        def summaries_off():  # the same engine with the summary work switched off
            MatrixAccumulator.update = lambda self, m: None
            MatrixAccumulator.summaries = lambda self: [_EMPTY] * len(self.n_edges)
            runtime_module.rows_digest = lambda v, t: 0
            runtime_module.encode = lambda s: b"x"

        def summaries_on(saved=saved):
            (MatrixAccumulator.update, MatrixAccumulator.summaries, runtime_module.rows_digest,
             runtime_module.encode) = saved

        times: dict = {(src, mode): [] for src in ("frames", "json") for mode in ("on", "off")}
        try:  # alternating runs: this VM's speed drifts by tens of percent within a minute
            for _ in range(repeat):
                for mode in ("on", "off"):
                    (summaries_on if mode == "on" else summaries_off)()
                    for src, fn in (("frames", frames_in), ("json", json_in)):
                        t = time.perf_counter()
                        fn()
                        times[(src, mode)].append(time.perf_counter() - t)
        finally:
            summaries_on()
        out[name] = {}
        for src in ("frames", "json"):
            on, off = times[(src, "on")], times[(src, "off")]
            med_on, med_off = statistics.median(on), statistics.median(off)
            out[name][src] = {"median_with_s": round(med_on, 3), "median_without_s": round(med_off, 3),
                              "min_with_s": round(min(on), 3), "min_without_s": round(min(off), 3),
                              "share_by_median": round(1 - med_off / med_on, 3),
                              "share_by_min": round(1 - min(off) / min(on), 3),
                              "us_per_record_by_median": round((med_on - med_off) / rows * 1e6, 2),
                              "us_per_record_end_to_end": round(med_on / rows * 1e6, 2)}
    return out


def _empty():
    from edge_runtime.contracts import NumericSummary

    return NumericSummary()


_EMPTY = None
_HEALTH = None


def bench_uploads(work: Path, endpoint: str, n: int = 400) -> dict:
    import boto3

    from edge_runtime.contracts import SpoolConfig
    from edge_runtime.spool import Spool
    from edge_runtime.store import open_store
    from edge_runtime.summary_format import encode
    from edge_runtime.uploader import Uploader

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench-uploads")
    w, _, _ = _window_summary(600, 6)
    blobs = []
    for i in range(n):
        w.start = T0 + 60 * i
        blobs.append((f"summaries/x/{i:06d}.elws", encode(w.summary("bench", None, "0123456789ab"))))

    t = time.perf_counter()
    for key, data in blobs:
        client.put_object(Bucket="bench-uploads", Key="raw/" + key, Body=data)
    raw = time.perf_counter() - t

    spool = Spool(work / f"up-spool-{time.monotonic_ns()}", SpoolConfig()).open()
    for key, data in blobs:
        spool.put(key, data)
    store = open_store("s3://bench-uploads/spooled", endpoint_url=endpoint, retries=1)
    up = Uploader(spool, store)
    t = time.perf_counter()
    while up.send_one() is not None:
        pass
    spooled = time.perf_counter() - t
    spool.close()
    assert spool.pending == 0 and up.sent == n
    return {"objects": n, "bytes_each": len(blobs[0][1]), "boto3_put_object_per_s": round(n / raw, 1),
            "spool_uploader_per_s": round(n / spooled, 1), "uploader_vs_boto3": round(raw / spooled, 3)}


def bench_outage(work: Path, bundle: Path, endpoint: str, rows: int, cpu_share: float | None = None) -> dict:
    import boto3
    from netfault import FaultProxy

    from cloud import synthetic
    from edge_runtime.contracts import RuntimeConfig
    from edge_runtime.runtime import EdgeRuntime
    from edge_runtime.spool import Spool

    X = synthetic.device_stream("bench", rows, seed=5, anomaly_rate=0.01).X
    lines = [json.dumps({"ts": T0 + i, **dict(zip(synthetic.FEATURES, map(float, r)))}).encode()
             for i, r in enumerate(X)]
    u = urlparse(endpoint)
    out = {}
    for mode in ("up", "refuse", "hang", "backlog"):
        bucket = f"bench-outage-{mode}-{time.monotonic_ns()}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        d = work / f"outage-{mode}-{time.monotonic_ns()}"
        with FaultProxy(u.hostname, u.port).start() as proxy:
            config = RuntimeConfig(
                device_id="bench", bundle=str(bundle), window={"seconds": 86400}, health={"log_interval_s": 0},
                sinks={"events": str(d / "events.jsonl"), "dead_letter": str(d / "dl.jsonl"),
                       "outbox": str(d / "outbox")},
                store={"url": f"s3://{bucket}", "endpoint_url": proxy.url, "connect_timeout_s": 2,
                       "read_timeout_s": 5, "retry_max_s": 5, "presence_s": 0,
                       **({"upload_cpu_share": cpu_share} if cpu_share else {})})
            if mode == "backlog":  # 3,800 objects left by an earlier outage
                spool = Spool(d / "outbox").open()
                w, _, _ = _window_summary(60, 6)
                for i in range(3800):
                    w.start = T0 - 86400 + 60 * i
                    from edge_runtime.summary_format import encode
                    spool.put(f"summaries/old/{i:06d}.elws", encode(w.summary("bench", None, "0123456789ab")))
                spool.close()
            rt = EdgeRuntime(config)
            if mode in ("refuse", "hang"):
                proxy.set_mode(mode)
            rt.uploader.start()
            t = time.perf_counter()
            rt.process(lines)
            elapsed = time.perf_counter() - t
            drained = rt.health.uploaded
            proxy.set_mode("pass")
            rt.close(upload_timeout=1)
        out[mode] = {"records_per_s": round(rows / elapsed), "uploaded_meanwhile": drained,
                     "upload_failures": rt.health.upload_failures}
    base = out["up"]["records_per_s"]
    for mode in ("refuse", "hang", "backlog"):
        out[mode]["vs_up"] = round(out[mode]["records_per_s"] / base, 3)
    return out


def _wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not start on port {port}")


def demo_bundle(work: Path) -> Path:
    """The demo's 6-feature detector, as ``edgeloop demo`` trains and compiles it."""
    from cloud import synthetic
    from cloud.train import train
    from model_compile.compile import compile_bundle

    out = work / "demo-bundle"
    if not out.exists():
        train(synthetic.write_training_csv(work / "demo-train.csv", seed=42), work / "demo-model", seed=42)
        compile_bundle(work / "demo-model", out)
    return out


def main() -> None:
    global _EMPTY
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="size,cost,uploads,outage")
    ap.add_argument("--workdir")
    ap.add_argument("--outage-rows", type=int, default=400_000)
    args = ap.parse_args()
    only = set(args.only.split(","))
    _EMPTY = _empty()
    import logging

    logging.basicConfig(level=logging.ERROR)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgeloop-bench-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()}, "rows": args.rows}
    if "size" in only:
        result["size"] = bench_size()
    if "cost" in only:
        bundles = make_bundles(work) if not (work / "gmm64-bundle").exists() else {
            "gmm64": work / "gmm64-bundle", "ae64": work / "ae64-bundle"}
        result["cost"] = bench_cost(work, bundles, args.rows, args.repeat)
    if only & {"uploads", "outage"}:
        # moto in its own process: in this one it would take the GIL from the engine being measured
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        _wait_port(port)
        try:
            if "uploads" in only:
                result["uploads"] = bench_uploads(work, endpoint)
            if "outage" in only:
                result["outage"] = bench_outage(work, demo_bundle(work), endpoint, args.outage_rows)
                result["outage_no_cpu_cap"] = bench_outage(work, demo_bundle(work), endpoint, args.outage_rows, 1.0)
        finally:
            server.terminate()
            server.wait(10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
