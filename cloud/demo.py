"""``edgeloop demo``: the whole loop on one machine, with no cloud account.

Train on synthetic sensor data, compile a bundle, build the model's Greengrass component,
register the model, run every simulated device's runtime into a local store that mirrors S3's
key layout, review fleet drift, and report outlier recall against the injected anomalies. Then
close the loop: two devices are a cohort whose temperature sensors were recalibrated; the review
finds them, a challenger is retrained on their recent data, beats the champion on held-out rows,
is registered and goes to that cohort, and the next day's review clears them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud import synthetic
from cloud.components import build_model, project_root, read_gdk_config
from cloud.drift import Thresholds, dumps, fleet_drift, format_table, to_json
from cloud.registry import register
from cloud.retrain import retrain
from cloud.train import train
from edge_runtime.contracts import RuntimeConfig
from edge_runtime.service import run_file
from edge_runtime.store import LocalStore
from model_compile.compile import compile_bundle

ANOMALY_RATE = 0.005  # injected anomalies: a rate the fleet review reads as normal beside the 1% calibrated
# a cohort (a batch of recalibrated sensors): the same drift on two devices
DRIFTS = {1: synthetic.Drift("temperature", 1.5), 3: synthetic.Drift("temperature", 1.5)}
NEXT_VERSION = "1.0.1"


@dataclass
class DemoResult:
    drifted_expected: dict[str, str]
    drifted_found: list[str]
    drifted_features: dict[str, list[str]]
    recall: float
    false_positive_rate: float
    rejected: int
    provider: str
    seconds: float
    drift_json: Path
    retrained: str | None = None  # the challenger's version, if it won and was deployed
    retrain_reason: str = ""
    cleared: list[str] | None = None  # drifted devices that read ok on the next day's review
    still_drifted: list[str] | None = None  # devices flagged on the next day, any version


def run_demo(workdir: str | Path = "edgeloop-demo", devices: int = 5, rows: int = 2880,
             seed: int = 42, window_seconds: int = 3600, bad_lines: int = 4,
             echo=print) -> DemoResult:
    t0 = time.monotonic()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = LocalStore(work / "store")

    echo(f"[1/8] train   : synthetic training data -> {work / 'model'}")
    data = synthetic.write_training_csv(work / "train.csv", seed=seed)
    trained = train(data, work / "model", seed=seed)
    rule = trained.card.outlier
    echo(f"      threshold {rule.threshold:.3f} at {rule.target_false_positive_rate:.0%} "
         f"target FPR (held-out FPR {trained.holdout_fpr:.2%})")

    echo(f"[2/8] compile : optimise, parity-check, bundle -> {work / 'bundle'}")
    compiled = compile_bundle(work / "model", work / "bundle")
    echo(f"      parity max abs diff {compiled.max_abs_diff:.2g}; gpu-capable graph: {compiled.manifest.gpu_capable}")

    echo(f"[3/8] build   : the model's Greengrass component -> {work / 'greengrass-build'}")
    runtime_name, _ = read_gdk_config(project_root())
    built = build_model(work / "bundle", work / "greengrass-build", runtime_name, project_root())
    echo(f"      {built.name} {built.version} (the runtime component: `edgeloop component build`)")
    register(work / "bundle", store)

    echo(f"[4/8] devices : {devices} simulated devices x {rows} records, drift on "
         f"{', '.join(f'dev-{i + 1:02d}' for i in DRIFTS if i < devices)}")
    streams = []
    rejected = 0
    provider = ""
    for i in range(devices):
        device_id = f"dev-{i + 1:02d}"
        stream = synthetic.device_stream(device_id, rows, seed=seed * 100 + i, drift=DRIFTS.get(i),
                                         anomaly_rate=ANOMALY_RATE)
        stats = _run_device(work, device_id, stream, work / "bundle", window_seconds, bad_lines, seed=i)
        rejected += stats.rejected
        provider = stats.provider
        streams.append((stream, work / "devices" / device_id / "events.jsonl"))
        echo(f"      {device_id}: {stats.scored} scored, {stats.outliers} outliers, {stats.rejected} "
             f"dead-lettered, {stats.windows} windows synced ({stats.provider})")

    echo("[5/8] fleet   : merge summaries, compare with the baseline (the last day, whole days)")
    thresholds = Thresholds()
    reports, warnings = fleet_drift(store, thresholds=thresholds, cycle_s=synthetic.CYCLE_S)
    for w in warnings:
        echo(f"      warning: {w}")
    drift_json = work / "drift.json"
    drift_json.write_bytes(dumps(to_json(reports, thresholds)))

    echo("[6/8] review")
    for report in reports:
        echo(format_table(report))
    recall, fpr = outlier_quality(streams)
    found = reports[0].drifted_devices if reports else []
    result = DemoResult(
        drifted_expected={f"dev-{i + 1:02d}": d.feature for i, d in DRIFTS.items() if i < devices},
        drifted_found=found,
        drifted_features={d.device_id: d.drifted_features for r in reports for d in r.devices},
        recall=recall, false_positive_rate=fpr, rejected=rejected, provider=provider,
        seconds=time.monotonic() - t0, drift_json=drift_json,
    )
    echo(f"outlier recall on injected anomalies: {recall:.3f}; false-positive rate on clean rows: {fpr:.2%}")
    echo(f"drift expected on {sorted(result.drifted_expected)}, found on {found}")
    if found:
        _close_the_loop(result, work, store, streams, found, devices, rows, seed, window_seconds, echo)
    result.seconds = time.monotonic() - t0
    echo(f"{rejected} malformed records dead-lettered; drift JSON: {drift_json}; {result.seconds:.1f}s")
    return result


def _run_device(work: Path, device_id: str, stream, bundle: Path, window_seconds: int, bad_lines: int, seed: int):
    device_dir = work / "devices" / device_id
    source = synthetic.write_jsonl(stream, device_dir / "input.jsonl", bad_lines=bad_lines, seed=seed)
    for old in ("events.jsonl", "dead-letter.jsonl"):
        (device_dir / old).unlink(missing_ok=True)
    config = RuntimeConfig(
        device_id=device_id, bundle=str(bundle), window={"seconds": window_seconds},
        sinks={"events": str(device_dir / "events.jsonl"), "dead_letter": str(device_dir / "dead-letter.jsonl"),
               "outbox": str(device_dir / "outbox")},
        store={"url": str(work / "store")},
    )
    return run_file(config, source)


def _close_the_loop(result: DemoResult, work: Path, store, streams, found: list[str], devices: int, rows: int,
                    seed: int, window_seconds: int, echo) -> None:
    """Retrain on the drifted cohort's recent data; if the challenger wins, it goes to that cohort,
    every device runs one more day, and the review says whether the drift cleared."""
    echo(f"[7/8] retrain : a challenger on {', '.join(found)}'s records since the drift")
    fresh = work / "fresh.csv"
    with open(fresh, "w") as fh:
        fh.write(",".join(synthetic.FEATURES) + "\n")
        for stream, _ in streams:
            if stream.device_id in found:
                for row in stream.X[stream.drifted & ~stream.anomaly]:
                    fh.write(",".join(f"{v:.5f}" for v in row) + "\n")
    outcome = retrain(fresh, work / "bundle", work / "retrain", NEXT_VERSION, store=store, approve=True, seed=seed)
    result.retrain_reason = outcome.reason
    echo(f"      {outcome.reason}")
    if not outcome.better:
        echo("      the challenger is not better: nothing deployed")
        return
    runtime_name, _ = read_gdk_config(project_root())
    built = build_model(outcome.bundle, work / "greengrass-build", runtime_name, project_root())
    result.retrained = NEXT_VERSION
    echo(f"      registered {built.name} {built.version} ({outcome.approval}); component built; deployed to "
         f"the cohort {', '.join(found)}")
    echo("[8/8] next day: the cohort runs the challenger, the rest the champion")
    for i in range(devices):
        device_id = f"dev-{i + 1:02d}"
        cohort = device_id in found
        stream = synthetic.device_stream(device_id, synthetic.CYCLE_S // synthetic.STEP_S, seed=seed * 1000 + i,
                                         drift=DRIFTS.get(i), drift_from=0, offset=rows, anomaly_rate=ANOMALY_RATE)
        _run_device(work, device_id, stream, outcome.bundle if cohort else work / "bundle", window_seconds, 0, i)
    reports, _ = fleet_drift(store, cycle_s=synthetic.CYCLE_S)
    for report in reports:
        echo(format_table(report, features=False))
    verdicts = {(r.model_version, d.device_id): d.verdict for r in reports for d in r.devices}
    result.cleared = sorted(d for d in found if verdicts.get((NEXT_VERSION, d)) == "ok")
    result.still_drifted = sorted(d for (_, d), v in verdicts.items() if v == "drift")
    echo(f"drift cleared on {result.cleared or 'none'}; still drifted: {result.still_drifted or 'none'}")


def outlier_quality(streams) -> tuple[float, float]:
    """Recall on injected anomalies, and FPR on rows that are neither anomalous nor drifted."""
    flagged_total = anomalies = clean = clean_flagged = 0
    for stream, events_path in streams:
        flagged = {json.loads(line)["id"] for line in events_path.read_text().splitlines() if line}
        is_flagged = np.array([rid in flagged for rid in stream.ids])
        anomalies += int(stream.anomaly.sum())
        flagged_total += int((is_flagged & stream.anomaly).sum())
        mask = ~stream.anomaly & ~stream.drifted
        clean += int(mask.sum())
        clean_flagged += int((is_flagged & mask).sum())
    return flagged_total / max(anomalies, 1), clean_flagged / max(clean, 1)
