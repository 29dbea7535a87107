"""``edgeloop fleet watch``: review drift on a schedule and start retraining when it crosses the line.

Each round reviews the store (the last day, as ``fleet drift`` does), writing roll-ups of the whole
days it read, so the next rounds read those instead. A model version whose drifted
devices (verdict ``drift`` or ``outliers``) reach ``min_devices`` gets one retraining per champion
version and cohort, never one per round: what was started is remembered in a small state file.
Retraining runs here (``cloud.retrain`` on ``--data``, registered as pending approval) or, with
``pipeline``, as a SageMaker pipeline execution given the model, the champion and challenger
versions, the store and the drifted devices as parameters.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.store import ObjectStore

from .drift import ModelDrift, Thresholds, fleet_drift
from .registry import fetch_bundle, versions

FLAGGED = ("drift", "outliers")


@dataclass
class Action:
    model: str
    champion: str
    challenger: str
    devices: list[str]
    how: str  # "local" or "pipeline"
    detail: dict = field(default_factory=dict)


def next_version(store: ObjectStore, model: str, champion: str) -> str:
    known = [row["version"] for row in versions(store, model)] or [champion]
    major, minor, patch = (int(x) for x in re.findall(r"\d+", known[-1])[:3])
    return f"{major}.{minor}.{patch + 1}"


def flagged(report: ModelDrift) -> list[str]:
    return sorted(d.device_id for d in report.devices if d.verdict in FLAGGED)


def watch_round(store: ObjectStore, state_path: Path, *, data: str | Path | None = None, out_dir: Path,
                min_devices: int = 1, cycle_s: int | None = None, pipeline: str | None = None,
                sagemaker=None, store_url: str = "", thresholds: Thresholds = Thresholds(),
                echo=print) -> list[Action]:
    """One review and what it started. ``sagemaker``: a boto3 SageMaker client (with ``pipeline``)."""
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"started": []}
    reports, warnings = fleet_drift(store, thresholds=thresholds, cycle_s=cycle_s, compact=True)
    for w in warnings:
        echo(f"warning: {w}")
    actions = []
    for report in reports:
        devices = flagged(report)
        echo(f"{report.model_name} {report.model_version}: {len(devices)} of {len(report.devices)} devices "
             f"flagged" + (f" ({', '.join(devices)})" if devices else ""))
        if len(devices) < min_devices:
            continue
        mark = f"{report.model_name}:{report.model_version}:{','.join(devices)}"
        if mark in state["started"]:
            echo("  retraining already started for this cohort and champion")
            continue
        challenger = next_version(store, report.model_name, report.model_version)
        action = Action(report.model_name, report.model_version, challenger, devices,
                        "pipeline" if pipeline else "local")
        if pipeline:
            display = re.sub(r"[^A-Za-z0-9-]", "-", f"retrain-{report.model_name}-{challenger}")[:82]
            started = sagemaker.start_pipeline_execution(
                PipelineName=pipeline, PipelineExecutionDisplayName=display,
                PipelineParameters=[{"Name": "Model", "Value": report.model_name},
                                    {"Name": "ChampionVersion", "Value": report.model_version},
                                    {"Name": "ChallengerVersion", "Value": challenger},
                                    {"Name": "Store", "Value": store_url},
                                    {"Name": "DriftedDevices", "Value": ",".join(devices)}])
            action.detail = {"execution": started["PipelineExecutionArn"]}
            echo(f"  started pipeline execution {started['PipelineExecutionArn']}")
        else:
            if data is None:
                raise ValueError("retraining here needs --data (fresh records as CSV), or use --sagemaker-pipeline")
            from .retrain import retrain

            work = out_dir / f"{report.model_name}-{challenger}"
            champion = fetch_bundle(store, report.model_name, report.model_version, work / "champion")
            result = retrain(data, champion, work, challenger, store=store)
            action.detail = {"better": result.better, "registered": result.registered, "reason": result.reason,
                             "approval": result.approval, "bundle": str(result.bundle)}
            outcome = f"registered, {result.approval}" if result.registered else "not better, not registered"
            echo(f"  challenger {challenger}: {outcome}; {result.reason}")
        state["started"].append(mark)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1))
        actions.append(action)
    return actions


def watch(store: ObjectStore, every_s: float, rounds: int | None = None, **kwargs) -> None:
    """``watch_round`` every ``every_s`` seconds (``rounds`` times, or until interrupted)."""
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        watch_round(store, **kwargs)
        done += 1
        if rounds is not None and done >= rounds:
            return
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))
