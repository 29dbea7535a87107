"""The device service's speed and memory, as ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_service.py [--rows 200000] [--repeat 3] [--soak-seconds 60]
                                            [--only core,ingest,e2e,latency,memory]

Two 64-feature models: the Gaussian-mixture detector that ``edgeloop train`` makes, and an MLP
autoencoder (64-32-64, random weights, score = mean squared reconstruction error). Sections:

1. core: the engine (decoded float32 arrays in; batching, rules, window summaries, events out)
   vs raw ``session.run`` on the same arrays in the same batches.
2. ingest: JSON lines and binary frames decoded and validated, records/s on one core.
3. e2e: ``edgeloop run`` (the CLI, one-hour windows) vs the naive loop of the AWS Greengrass ML
   samples (stdlib ``json.loads``, one ``session.run`` and one written result per record), both as
   fresh processes on the same lines: JSON parsed on the engine's thread, JSON with two parse
   worker processes, and binary frames.
4. latency: one record every 3 ms over TCP; p50/p99 from arrival to event vs raw single-record
   ``session.run``.
5. memory: resident memory of ``edgeloop run`` serving TCP at a steady rate for --soak-seconds.

Prints one JSON document; docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
N_FEATURES = 64
T0 = 1_793_491_200  # 2026-11-01T00:00:00Z
NAMES = [f"f{i:02d}" for i in range(N_FEATURES)]


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sensor_rows(n: int, seed: int) -> np.ndarray:
    """Correlated sensor-like data: 8 latent factors seen through 64 noisy channels."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1).normal(size=(8, N_FEATURES))
    X = rng.normal(size=(n, 8)) @ mix + 0.3 * rng.normal(size=(n, N_FEATURES)) + 10.0
    return X.astype(np.float32)


def make_bundles(work: Path) -> dict[str, Path]:
    from cloud.train import make_baseline, train
    from edge_runtime.contracts import OutlierRule, OutputSpec
    from model_compile.card import BASELINE_FILE, MODEL_FILE, SAMPLES_FILE, TrainingCard
    from model_compile.compile import compile_bundle

    X = sensor_rows(20_000, seed=7)
    csv = work / "train64.csv"
    np.savetxt(csv, X, delimiter=",", header=",".join(NAMES), comments="", fmt="%.5f")
    train(csv, work / "gmm64")
    compile_bundle(work / "gmm64", work / "gmm64-bundle")

    # the MLP autoencoder, random weights: a heavier graph than the mixture
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1 = (rng.normal(size=(N_FEATURES, 32)) / 8).astype(np.float32)
    w2 = (rng.normal(size=(32, N_FEATURES)) / 6).astype(np.float32)
    mu, sd = X.mean(0), X.std(0)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (mu, "mu"), (sd, "sd"),
                                                         (np.zeros(32, np.float32), "b1"),
                                                         (np.zeros(N_FEATURES, np.float32), "b2"))]
    nodes = [
        helper.make_node("Sub", ["X", "mu"], ["c"]), helper.make_node("Div", ["c", "sd"], ["z"]),
        helper.make_node("MatMul", ["z", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["r0"]),
        helper.make_node("Add", ["r0", "b2"], ["r"]), helper.make_node("Sub", ["r", "z"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["score"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "ae64", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, N_FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    ae = work / "ae64"
    ae.mkdir(exist_ok=True)
    (ae / MODEL_FILE).write_bytes(model.SerializeToString())
    sess = ort.InferenceSession(str(ae / MODEL_FILE), providers=["CPUExecutionProvider"])
    scores = sess.run(None, {"X": X})[0].astype(np.float64)
    threshold = float(np.quantile(scores, 0.99))
    baseline = make_baseline("ae64", "1.0.0", NAMES, X, scores, int((scores > threshold).sum()))
    (ae / BASELINE_FILE).write_text(baseline.model_dump_json())
    np.save(ae / SAMPLES_FILE, X[:256])
    card = TrainingCard(name="ae64", version="1.0.0", features=NAMES,
                        output=OutputSpec(name="score", meaning="mean squared reconstruction error",
                                          higher_is_outlier=True),
                        outlier=OutlierRule(threshold=threshold, target_false_positive_rate=0.01,
                                            calibration_rows=len(X)),
                        algorithm="MLP autoencoder 64-32-64, random weights", train_rows=len(X))
    (ae / "training.json").write_text(card.model_dump_json())
    compile_bundle(ae, work / "ae64-bundle")
    return {"gmm64": work / "gmm64-bundle", "ae64": work / "ae64-bundle"}


def write_inputs(work: Path, rows: int) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    from edge_runtime.frames import encode_frame

    X = sensor_rows(rows, seed=11)
    X[::97] += 6.0  # about 1% outliers
    ts = (T0 + np.arange(rows)).astype(np.float64)  # one a second: 56 one-hour windows in 200k rows
    jsonl = work / "in.jsonl"
    with open(jsonl, "w") as fh:
        for t, row in zip(ts.tolist(), X.tolist()):
            fh.write(json.dumps({"ts": int(t), **dict(zip(NAMES, row))}) + "\n")
    frames = work / "in.frames"
    with open(frames, "wb") as fh:
        for lo in range(0, rows, 256):
            fh.write(encode_frame(X[lo:lo + 256], ts[lo:lo + 256]))
    return X, ts, jsonl, frames


def runtime_config(work: Path, bundle: Path, tag: str, **extra):
    from edge_runtime.contracts import RuntimeConfig

    d = work / f"run-{tag}-{time.monotonic_ns()}"
    return RuntimeConfig(device_id="bench", bundle=str(bundle),
                         sinks={"events": str(d / "events.jsonl"), "dead_letter": str(d / "dl.jsonl"),
                                "outbox": str(d / "outbox")},
                         store={"url": str(d / "store")}, health={"log_interval_s": 0}, **extra)


def bench_core(work, bundles, X, ts, repeat) -> dict:
    from edge_runtime.frames import encode_frame
    from edge_runtime.model import load_model
    from edge_runtime.runtime import EdgeRuntime
    from edge_runtime.sources import Payload

    frames = [encode_frame(X[lo:lo + 256], ts[lo:lo + 256]) for lo in range(0, len(X), 256)]
    batches = [np.ascontiguousarray(X[lo:lo + 256]) for lo in range(0, len(X), 256)]

    def one(bundle: Path) -> dict:
        model = load_model(bundle, runtime_config(work, bundle, "core").scoring)
        sess, inp, outp = model.scorer.session, model.scorer.input_name, model.scorer.output_name
        raw = best_of(repeat, lambda: [sess.run([outp], {inp: b}) for b in batches])

        def engine():
            with EdgeRuntime(runtime_config(work, bundle, "core"), model=model) as rt:
                for i, f in enumerate(frames):
                    rt.handle([Payload("frame", [f], "bench", i + 1, n=256)])

        t = best_of(repeat, engine)
        return {"raw_session_run_s": round(raw, 3), "engine_s": round(t, 3),
                "engine_vs_raw": round(raw / t, 3), "engine_rows_per_s": round(len(X) / t)}

    return {name: one(bundle) for name, bundle in bundles.items()}


def bench_ingest(bundles, jsonl: Path, frames_path: Path, repeat) -> dict:
    from edge_runtime.bundle import load_bundle
    from edge_runtime.contracts import SourceConfig
    from edge_runtime.frames import decode_frame
    from edge_runtime.records import RecordDecoder
    from edge_runtime.sources import StreamCutter

    bundle = load_bundle(next(iter(bundles.values())))
    decoder = RecordDecoder(bundle.manifest.input)
    data = jsonl.read_bytes()
    cutter = StreamCutter("bench", SourceConfig(), 256)
    payloads = cutter.feed(data) + cutter.end()
    n = sum(len(p.items) for p in payloads)
    rng = (0.0, 4e9)
    t_json = best_of(repeat, lambda: [decoder.decode(p.items, rng) for p in payloads])
    fdata = frames_path.read_bytes()
    fcut = StreamCutter("bench", SourceConfig(format="frames", max_message_bytes=4 << 20), 256)
    fpayloads = fcut.feed(fdata)
    t_frames = best_of(repeat, lambda: [decode_frame(p.items[0], NAMES, rng) for p in fpayloads])
    t_cut = best_of(repeat, lambda: StreamCutter("bench", SourceConfig(), 256).feed(data))
    return {"jsonl_records_per_s": round(n / t_json), "jsonl_cut_lines_per_s": round(n / t_cut),
            "frames_records_per_s": round(n / t_frames), "bytes_per_jsonl_record": round(len(data) / n)}


NAIVE = r"""
import json, sys, numpy as np, onnxruntime as ort
bundle, names, src, dst = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
m = json.load(open(bundle + "/manifest.json"))
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
sess = ort.InferenceSession(bundle + "/model.onnx", opts, providers=["CPUExecutionProvider"])
inp, outn, thr = m["input"]["name"], m["output"]["name"], m["outlier"]["threshold"]
sign = 1.0 if m["output"]["higher_is_outlier"] else -1.0
with open(src) as fh, open(dst, "w") as out:
    for line in fh:
        rec = json.loads(line)
        x = np.array([[rec[n] for n in names]], dtype=np.float32)
        s = sign * float(sess.run([outn], {inp: x})[0].reshape(-1)[0])
        out.write(json.dumps({"ts": rec["ts"], "score": s, "outlier": s > thr}) + "\n")
"""


def bench_e2e(work, bundles, jsonl: Path, frames_path: Path, repeat) -> dict:
    out = {}
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, bundle in bundles.items():
        naive = best_of(repeat, lambda b=bundle: subprocess.run(
            [py, "-c", NAIVE, str(b), ",".join(NAMES), str(jsonl), str(work / "naive.out")], check=True, env=env))

        def cli(src: Path, fmt: str, b=bundle, workers: int = 0):
            d = work / f"cli-{time.monotonic_ns()}"
            subprocess.run([py, "-m", "edge_runtime", "run", "--input", str(src), "--log-level", "WARNING",
                            "--set", "device_id=bench", "--set", f"bundle={b}", "--set", "window.seconds=3600",
                            "--set", f"source.format={fmt}", "--set", f"sinks.events={d}/e.jsonl",
                            "--set", f"sinks.dead_letter={d}/dl.jsonl", "--set", f"sinks.outbox={d}/outbox",
                            "--set", f"store.url={d}/store", "--set", f"source.parse_workers={workers}"],
                           check=True, env=env, stdout=subprocess.DEVNULL)

        t_json = best_of(repeat, lambda: cli(jsonl, "jsonl"))
        t_json2 = best_of(repeat, lambda: cli(jsonl, "jsonl", workers=2))
        t_frames = best_of(repeat, lambda: cli(frames_path, "frames"))
        out[name] = {"naive_s": round(naive, 2), "cli_jsonl_s": round(t_json, 2),
                     "cli_jsonl_2_parse_workers_s": round(t_json2, 2), "cli_frames_s": round(t_frames, 2),
                     "jsonl_speedup": round(naive / t_json, 2), "jsonl_2_workers_speedup": round(naive / t_json2, 2),
                     "frames_speedup": round(naive / t_frames, 2)}
    return out


def _start_service(work: Path, bundle: Path, tag: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    d = work / f"svc-{tag}"
    port_file = d / "port"
    d.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime", "run", "--log-level", "WARNING", "--json",
         "--set", "device_id=bench", "--set", f"bundle={bundle}", "--set", "source.kind=tcp",
         "--set", f"source.port={port}", "--set", f"sinks.events={d}/e.jsonl", "--set", f"sinks.dead_letter={d}/dl",
         "--set", f"sinks.outbox={d}/outbox", "--set", f"store.url={d}/store", *extra],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    port_file.write_text(str(port))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("service did not start")


def _paced_send(port: int, lines: list[bytes], interval: float) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        nxt = time.perf_counter()
        for line in lines:
            conn.sendall(line)
            nxt += interval
            delay = nxt - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


def bench_latency(work, bundles, X, repeat) -> dict:
    import onnxruntime as ort

    out = {}
    for name, bundle in bundles.items():
        manifest = json.loads((bundle / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        inp, outn = manifest["input"]["name"], manifest["output"]["name"]
        single = []
        for row in X[:2000]:
            t = time.perf_counter()
            sess.run([outn], {inp: row[None, :]})
            single.append((time.perf_counter() - t) * 1000)
        metrics_port = _free_port()
        proc, port = _start_service(work, bundle, f"lat-{name}", ["--set", f"health.port={metrics_port}"])
        now = int(time.time())
        lines = [(json.dumps({"ts": now, **dict(zip(NAMES, r))}) + "\n").encode() for r in X[:3000].tolist()]
        _paced_send(port, lines, 0.003)
        time.sleep(0.5)
        text = _scrape(metrics_port)
        proc.terminate()
        proc.wait(timeout=30)
        q = {ln.split('quantile="')[1].split('"')[0]: float(ln.split()[-1]) for ln in text.splitlines()
             if ln.startswith("edgeloop_arrival_to_event_ms_quantile{")}
        raw50, raw99 = float(np.percentile(single, 50)), float(np.percentile(single, 99))
        out[name] = {"raw_single_run_ms_p50": round(raw50, 3), "raw_single_run_ms_p99": round(raw99, 3),
                     "arrival_to_event_ms_p50": q.get("0.5"), "arrival_to_event_ms_p99": q.get("0.99"),
                     "p99_minus_raw_p99_ms": round(q.get("0.99", float("nan")) - raw99, 3)}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_memory(work, bundles, X, seconds: float, rate: int) -> dict:
    name, bundle = next(iter(bundles.items()))
    proc, port = _start_service(work, bundle, "soak", ["--set", "window.seconds=60"])
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.wait(2.0):
            samples.append((time.monotonic() - t0, _rss_mb(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = X[:5000].tolist()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        t_end = time.monotonic() + seconds
        nxt, i = time.monotonic(), 0
        while time.monotonic() < t_end:
            burst = []
            for _ in range(rate // 10):
                burst.append(json.dumps({"ts": time.time(), **dict(zip(NAMES, rows[i % len(rows)]))}) + "\n")
                i += 1
            conn.sendall("".join(burst).encode())
            nxt += 0.1
            time.sleep(max(nxt - time.monotonic(), 0))
    time.sleep(1)
    stop.set()
    proc.terminate()
    report = json.loads(proc.communicate(timeout=60)[0].strip().splitlines()[-1])
    model_mb = (bundle / "model.onnx").stat().st_size / 2**20
    (work / "soak-rss.csv").write_text("seconds,rss_mb\n" + "".join(f"{t:.1f},{r:.1f}\n" for t, r in samples))
    rss = [r for _, r in samples]
    half = len(rss) // 2
    t_all = np.array([t for t, _ in samples])
    last = t_all >= t_all[-1] / 2  # growth over the second half, per hour: a leak shows here
    slope = float(np.polyfit(t_all[last], np.array(rss)[last], 1)[0]) * 3600 if last.sum() > 2 else float("nan")
    return {"model": name, "seconds": seconds, "rate_per_s": rate, "sent": i, "scored": report["scored"],
            "model_mb": round(model_mb, 2), "rss_mb_first_quarter_max": round(max(rss[: max(len(rss) // 4, 1)]), 1),
            "rss_mb_max": round(max(rss), 1), "rss_mb_last": round(rss[-1], 1),
            "rss_mb_mean_first_half": round(float(np.mean(rss[:half] or rss)), 1),
            "rss_mb_mean_second_half": round(float(np.mean(rss[half:])), 1),
            "rss_mb_per_hour_over_second_half": round(slope, 2), "samples_csv": str(work / "soak-rss.csv")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--soak-seconds", type=float, default=60)
    ap.add_argument("--soak-rate", type=int, default=2000)
    ap.add_argument("--only", default="core,ingest,e2e,latency,memory")
    ap.add_argument("--workdir", help="keep the models and inputs here (default: a temp dir)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    sys.path.insert(0, str(REPO))
    import onnxruntime as ort

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgeloop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = make_bundles(work)
    X, ts, jsonl, frames = write_inputs(work, args.rows)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''} cores={os.cpu_count()}".strip(),
        "onnxruntime": ort.__version__, "providers_in_build": ort.get_available_providers(), "rows": args.rows,
    }
    sections = [("core", lambda: bench_core(work, bundles, X, ts, args.repeat)),
                ("ingest", lambda: bench_ingest(bundles, jsonl, frames, args.repeat)),
                ("e2e", lambda: bench_e2e(work, bundles, jsonl, frames, args.repeat)),
                ("latency", lambda: bench_latency(work, bundles, X, args.repeat)),
                ("memory", lambda: bench_memory(work, bundles, X, args.soak_seconds, args.soak_rate))]
    for key, fn in sections:
        if key in only:
            result[key] = fn()
            print(f"{key}: {json.dumps(result[key])}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
