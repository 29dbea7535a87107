"""Throughput of the device data path, as ratios against baselines measured in the same run.

Baselines: ``json.loads`` of every line alone (the floor of any JSON-lines runtime), and one
ONNX Runtime ``session.run`` over the same rows as a single matrix (the model's own cost).
Measured: ``EdgeRuntime.process`` end to end (parse, validate, score in batches, summarise,
write events and summaries to a local store).

    python bench/bench_runtime.py [--rows 50000] [--batch 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    from cloud import synthetic
    from cloud.train import train
    from edge_runtime.bundle import load_bundle
    from edge_runtime.contracts import RuntimeConfig
    from edge_runtime.runtime import EdgeRuntime
    from edge_runtime.scoring import Scorer
    from model_compile.compile import compile_bundle

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))
    train(synthetic.write_training_csv(work / "t.csv", rows=10_000), work / "m")
    compile_bundle(work / "m", work / "b")
    stream = synthetic.device_stream("bench", args.rows, seed=1)
    lines = synthetic.write_jsonl(stream, work / "in.jsonl").read_text().splitlines()
    bundle = load_bundle(work / "b")
    scorer = Scorer(str(bundle.model_path), bundle.manifest, ["auto"])

    t_json = best_of(args.repeat, lambda: [json.loads(line) for line in lines])
    t_model = best_of(args.repeat, lambda: scorer.score(stream.X))

    runs = itertools.count()

    def runtime_pass():
        d = work / f"run{next(runs)}"
        cfg = RuntimeConfig(device_id="bench", bundle=str(work / "b"), scoring={"batch_size": args.batch},
                            sinks={"events": str(d / "e.jsonl"), "dead_letter": str(d / "dl.jsonl"),
                                   "outbox": str(d / "outbox")}, store={"url": str(d / "store")})
        with EdgeRuntime(cfg, bundle=bundle) as rt:
            rt.process(lines)

    t_rt = best_of(args.repeat, runtime_pass)
    n = args.rows
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()} "
        f"{platform.processor() or ''} cores={os.cpu_count()}", "provider": scorer.provider,
        "rows": n, "batch": args.batch,
        "json_loads_rows_per_s": round(n / t_json), "model_only_rows_per_s": round(n / t_model),
        "runtime_rows_per_s": round(n / t_rt),
        "runtime_vs_json_loads": round(t_rt / t_json, 2), "runtime_vs_model_only": round(t_rt / t_model, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
