"""Outlier quality on labelled real data: the stream detector on the NAB subset, through the device.

For each series: train the stream detector on its probationary part (the first 15%, at most 750
rows), compile the bundle as for any fleet, then feed the whole series to the device service
(``EdgeRuntime``) one record per batch, in time order, with no look-ahead, and collect what it says:

* a pass with the bundle's own threshold: the records it flags as outliers (its events) are the
  detections, scored with NAB's method at that fixed decision (no tuning on the test data);
* a pass with the threshold override below every score, so every record's score comes out in an
  event (but a stream's first ``warmup`` records, which are never flagged and lie in the probation
  NAB does not count): NAB's threshold sweep over these scores (mapped to [0, 1] by s / (1 + s), which keeps their
  order), as the published scoreboard does.

Both are normalised NAB scores (null detector 0, perfect 100) for the three profiles, beside the
published detectors' scores on the same 28 series. ``--quick N`` takes the first N series only.

    python bench/bench_nab.py [--data ../shared/data/nab] [--window N] [--threshold T] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nab  # noqa: E402

SUBSET_FOLDERS = {"artificialNoAnomaly", "artificialWithAnomaly", "realAWSCloudwatch"}
# the benchmark's scorer on these 28 series, as ../shared/data/nab/README.md lists them
PUBLISHED = {
    "Numenta HTM": (72.3, 69.1, 76.0), "ARTime": (69.8, 60.0, 75.2), "KNN CAD": (57.1, 46.6, 62.1),
    "Random Cut Forest": (53.7, 44.9, 60.1), "windowed Gaussian": (26.5, 2.2, 37.1),
}


def device_pass(bundle: Path, lines: list[bytes], work: Path, threshold: float | None) -> dict[int, float]:
    """Feed the records one per batch; the outlier events' scores by record id."""
    from edge_runtime.contracts import RuntimeConfig
    from edge_runtime.runtime import EdgeRuntime

    run = Path(tempfile.mkdtemp(dir=work))
    config = RuntimeConfig(
        device_id="nab", bundle=str(bundle), batch={"max_records": 1},
        window={"seconds": 86400, "max_past_s": None},
        scoring={"providers": ["CPUExecutionProvider"], "threshold": threshold},
        sinks={"events": str(run / "events.jsonl"), "dead_letter": str(run / "dl.jsonl"),
               "outbox": str(run / "outbox")},
        store={"url": str(run / "store")}, health={"log_interval_s": 0},
    )
    with EdgeRuntime(config) as rt:
        stats = rt.process(lines)
    if stats.rejected:
        raise SystemExit(f"{bundle}: the device rejected {stats.rejected} records; see {run / 'dl.jsonl'}")
    flagged = {}
    with open(run / "events.jsonl", encoding="utf-8") as fh:
        for line in fh:
            event = json.loads(line)
            if event.get("kind") == "outlier":
                flagged[int(event["id"])] = event["score"]
    return flagged


def run_series(series: nab.Series, root: Path, work: Path, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    from cloud.stream_detector import train_stream
    from model_compile.compile import compile_bundle

    tag = series.name.replace("/", "_").removesuffix(".csv")
    trained, bundle = work / f"{tag}-train", work / f"{tag}-bundle"
    train_stream(root / series.name, trained, name="nab", rows=series.probation, **settings)
    compile_bundle(trained, bundle)  # as a user would: a stream bundle is fp32 only
    lines = [json.dumps({"ts": t.isoformat() + "Z", "id": i, "stream_id": tag, "value": float(v)}).encode()
             for i, (t, v) in enumerate(zip(series.ts, series.values))]
    decided = device_pass(bundle, lines, work, None)
    everything = device_pass(bundle, lines, work, -1.0)
    manifest = json.loads((bundle / "manifest.json").read_text())
    threshold, warmup = manifest["outlier"]["threshold"], manifest["stream"]["warmup"]
    # a stream's warm-up values are never flagged, so never reported: they lie in the probation NAB ignores
    if set(range(len(lines))) - set(everything) != set(range(warmup)) or warmup > series.probation:
        raise SystemExit(f"{series.name}: {len(everything)} scores for {len(lines)} records, warm-up {warmup}")
    scores = np.asarray([everything.get(i, 0.0) for i in range(len(lines))])
    decisions = np.zeros(len(lines))
    decisions[list(decided)] = 1.0
    if not np.array_equal(decisions > 0, scores > threshold):  # the two passes must tell one story
        raise SystemExit(f"{series.name}: the device's decisions differ from its scores against {threshold}")
    return scores, decisions


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(here.parent / "shared" / "data" / "nab"))
    parser.add_argument("--window", type=int, help="the detector's window (default: its own)")
    parser.add_argument("--threshold", type=float, help="the detector's threshold (default: its own)")
    parser.add_argument("--quick", type=int, help="only the first N series")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    root = Path(args.data)
    corpus = nab.load_corpus(root)[: args.quick]
    if not any(s.windows for s in corpus):
        raise SystemExit("these series have no labelled anomaly window to score against: take more (--quick N)")
    scores, decisions = {}, {}
    settings = {k: v for k, v in (("window", args.window), ("threshold", args.threshold)) if v is not None}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, series in enumerate(corpus, 1):
            t = time.perf_counter()
            scores[series.name], decisions[series.name] = run_series(series, root, Path(tmp), settings)
            print(f"[{k}/{len(corpus)}] {series.name}: {len(series.values)} records, "
                  f"{int(decisions[series.name].sum())} flagged ({time.perf_counter() - t:.1f} s)", flush=True)
    seconds = time.perf_counter() - t0
    unit = {name: s / (1.0 + s) for name, s in scores.items()}
    result = {"series": len(corpus), "records": int(sum(len(s.values) for s in corpus)),
              "windows": sum(len(s.windows) for s in corpus), "seconds": round(seconds, 1),
              "settings": settings, "machine": platform.platform(), "profiles": {}}
    for profile in nab.PROFILES:
        swept = nab.sweep(corpus, unit, profile)
        result["profiles"][profile] = {
            "optimised_threshold": swept["score"], "threshold": swept["threshold"],
            "device_decisions": nab.score_at(corpus, decisions, 0.5, profile),
        }
    print(f"\n{result['records']} records of {result['series']} series through the device service, one at a "
          f"time, in {seconds:.0f} s")
    print(f"{'':34}{'standard':>10}{'low FP':>10}{'low FN':>10}")
    for label, key in (("stream detector, NAB-optimised", "optimised_threshold"),
                       ("stream detector, device decisions", "device_decisions")):
        print(f"{label:34}" + "".join(f"{result['profiles'][p][key]:>10.1f}" for p in nab.PROFILES))
    if len(corpus) == 28 and {s.name.split("/")[0] for s in corpus} == SUBSET_FOLDERS:  # what PUBLISHED is on
        for name, published in PUBLISHED.items():
            print(f"{name + ' (published)':34}" + "".join(f"{v:>10.1f}" for v in published))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
