"""The fleet drift review on SageMaker Processing: this process plans and judges, one job reviews.

The driver (``review_on_sagemaker``) does what ``drift.fleet_drift`` does up to the reading of
summaries: it lists the store, makes each model version's plan and cuts its devices into the same
fixed shares. It writes them to ``<work_prefix>/<job>/input/`` as JSON (``drift_io``; no pickle
in S3), zips the ``cloud`` and ``edge_runtime`` packages to ``<job>/code/``, and starts one
processing job whose instances split the share files between them (``ShardedByS3Key``). Each
instance runs ``main`` (``python3 -m cloud.drift_sagemaker``): it reviews its shares straight from
the store and writes ``partial-<share>.json`` to ``<job>/output/``. The driver then combines the
partials in share order and makes the verdicts here, with one false-discovery correction over the
whole fleet, so the result is the same, number for number, as ``fleet_drift`` on the same store.

The image (``image_uri``) needs Python 3.11 (``python3`` on PATH) and the project's runtime
dependencies, not the project itself (the code travels in the zip, on ``PYTHONPATH``)::

    FROM python:3.11-slim
    RUN pip install --no-cache-dir "numpy>=1.24" "pydantic>=2.5" "PyYAML>=6.0" "datasketches>=5.0" \\
        "boto3>=1.28" "orjson>=3.9"

pushed to ECR. The role (``role_arn``) is assumed by the job: it needs read access to the work
prefix and the store, write access to ``<job>/output/``, ECR pull and CloudWatch Logs, as any
processing job does. The job reads the store over the network, so network isolation is off.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge_runtime.contracts import WindowSummary
from edge_runtime.store import ObjectNotFound, S3Store, open_store
from model_compile import sagemaker_jobs as jobs

from . import drift_io
from .drift import (
    ModelDrift,
    Partial,
    Plan,
    Thresholds,
    _combine,
    _plan,
    _shares,
    chosen_keys,
    finish,
    list_summaries,
    load_baseline,
    review_devices,
)

PROCESSING = "/opt/ml/processing"
CODE_DIR = f"{PROCESSING}/code"
CODE_ZIP = "edgeloop-code.zip"
ENTRYPOINT = ["python3", "-m", "cloud.drift_sagemaker"]
SHARE_FORMAT = "edgeloop.drift.share/1"
RESULT_FORMAT = "edgeloop.drift.result/1"
MAX_RUNTIME_S = 5 * 86400  # SageMaker's own limit on MaxRuntimeInSeconds is higher; a review never needs it

# what the job reads from its environment; the directories are overridable to run ``main`` off SageMaker
ENV_STORE_URL = "EDGELOOP_STORE_URL"
ENV_STORE_ENDPOINT = "EDGELOOP_STORE_ENDPOINT"
ENV_WORKERS = "EDGELOOP_WORKERS"
ENV_INPUT_DIR = "EDGELOOP_INPUT_DIR"  # default /opt/ml/processing/input (shares/, plans/)
ENV_OUTPUT_DIR = "EDGELOOP_OUTPUT_DIR"  # default /opt/ml/processing/output
ENV_MESSAGE_FILE = "EDGELOOP_MESSAGE_FILE"  # default /opt/ml/output/message (the job's ExitMessage)

TERMINAL = ("Completed", "Failed", "Stopped")



class SageMakerJobError(RuntimeError):
    """The processing job failed, was stopped, ran out of time or did not return every share."""


def share_name(i: int) -> str:
    return f"share-{i:05d}"


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class _Version:
    """One model version as the driver keeps it between planning and judging."""

    model: str
    version: str
    plan: Plan | None = None
    plan_id: str = ""
    shares: list[int] = field(default_factory=list)
    skipped: str | None = None  # the warning, when there is no baseline


def review_on_sagemaker(store_url: str, role_arn: str, image_uri: str, instance_type: str, instance_count: int,
                        work_prefix: str, session=None, *, endpoint_url: str | None = None,
                        baselines: dict[tuple[str, str], WindowSummary] | None = None,
                        thresholds: Thresholds = Thresholds(), since: datetime | None = None,
                        until: datetime | None = None, last: timedelta | None = timedelta(days=1),
                        cycle_s: int | None = None, workers: int = 8, poll_s: float = 30.0,
                        timeout_s: float = 6 * 3600, volume_gb: int = 30, job_name: str | None = None,
                        subnets: list[str] | None = None, security_group_ids: list[str] | None = None,
                        progress: Callable[[str, str, float], None] | None = None,
                        ) -> tuple[list[ModelDrift], list[str]]:
    """``fleet_drift`` with the summaries read by one SageMaker Processing job of ``instance_count``
    instances (at most one per share). ``session``: anything with ``.client(name)`` (a
    ``boto3.Session`` by default) for the sagemaker and S3 clients; ``endpoint_url`` is the store's.
    ``progress(job, status, seconds)`` after each poll. Returns the reports and warnings."""
    for what, url in (("store", store_url), ("work prefix", work_prefix)):
        if not url.startswith("s3://"):  # the job's instances read and write these themselves
            raise ValueError(f"{what} {url!r}: a SageMaker job needs s3://bucket/prefix")
    if session is None:
        import boto3

        session = boto3.session.Session()
    store = open_store(store_url, endpoint_url)
    versions, shares = _prepare(store, baselines, thresholds, since, until, last, cycle_s)
    parts: dict[int, Partial] = {}
    if shares:
        job = job_name or _job_name()
        base = f"{work_prefix.rstrip('/')}/{job}"
        work = S3Store(base, client=session.client("s3"))
        _upload(work, versions, shares)
        sm = session.client("sagemaker")
        env = {ENV_STORE_URL: store_url, ENV_WORKERS: str(workers), "PYTHONPATH": f"{CODE_DIR}/{CODE_ZIP}"}
        if endpoint_url:
            env[ENV_STORE_ENDPOINT] = endpoint_url
        if getattr(session, "region_name", None):
            env["AWS_DEFAULT_REGION"] = session.region_name
        sm.create_processing_job(**processing_job_request(
            job, base, role_arn, image_uri, instance_type, min(instance_count, len(shares)), env,
            max_runtime_s=min(MAX_RUNTIME_S, max(60, math.ceil(timeout_s))), volume_gb=volume_gb,
            subnets=subnets, security_group_ids=security_group_ids))
        jobs.follow(sm, jobs.PROCESSING, job, poll_s=poll_s, timeout_s=timeout_s, on_status=progress,
                    error=SageMakerJobError, timeout_hint="raise the timeout for a fleet this large")
        parts = _read_partials(work, job, versions, shares)
    return _judge_all(store, versions, parts, cycle_s)


def _job_name() -> str:
    return f"edgeloop-drift-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _prepare(store, baselines, t, since, until, last, cycle_s) -> tuple[list[_Version], list[tuple[str, list]]]:
    """Every model version's plan and shares, as ``fleet_drift`` makes them; shares numbered
    across the whole review, each with its plan's id."""
    versions, shares = [], []
    for (model, version), devices in sorted(list_summaries(store).items()):
        v = _Version(model, version)
        versions.append(v)
        baseline = (baselines or {}).get((model, version)) or load_baseline(store, model, version)
        if baseline is None:
            v.skipped = f"no baseline for {model} {version}: skipped (register the bundle first)"
            continue
        v.plan = _plan(store, model, version, baseline, devices, t, since, until, last, cycle_s)
        v.plan_id = f"plan-{len(versions) - 1:04d}"
        for share in _shares(chosen_keys(v.plan, devices)):
            v.shares.append(len(shares))
            shares.append((v.plan_id, share))
    return versions, shares


def _upload(work: S3Store, versions: list[_Version], shares: list[tuple[str, list]]) -> None:
    for v in versions:
        if v.shares:
            work.put(f"input/plans/{v.plan_id}.json", drift_io.dumps(drift_io.plan_to_json(v.plan)))
    for i, (plan_id, devices) in enumerate(shares):
        doc = {"format": SHARE_FORMAT, "share": i, "plan": plan_id, "devices": [[d, keys] for d, keys in devices]}
        work.put(f"input/shares/{share_name(i)}.json", drift_io.dumps(doc))
    work.put(f"code/{CODE_ZIP}", code_zip())


def code_zip() -> bytes:
    """The ``cloud`` and ``edge_runtime`` packages' sources, importable from the zip itself.
    Fixed timestamps: the same code always gives the same bytes."""
    import cloud
    import edge_runtime

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in (cloud, edge_runtime):
            root = Path(package.__file__).resolve().parent
            for path in sorted(root.rglob("*.py")):
                if "__pycache__" not in path.parts:
                    info = zipfile.ZipInfo(path.relative_to(root.parent).as_posix(), (1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, path.read_bytes())
    return out.getvalue()


def processing_job_request(job: str, base: str, role_arn: str, image_uri: str, instance_type: str,
                           instance_count: int, env: dict[str, str], max_runtime_s: int, volume_gb: int = 30,
                           subnets: list[str] | None = None, security_group_ids: list[str] | None = None) -> dict:
    """CreateProcessingJob's parameters: shares split between the instances, plans and code on each."""
    def s3_input(name: str, sub: str, local: str, distribution: str) -> dict:
        return {"InputName": name, "S3Input": {
            "S3Uri": f"{base}/{sub}/", "LocalPath": local, "S3DataType": "S3Prefix", "S3InputMode": "File",
            "S3DataDistributionType": distribution, "S3CompressionType": "None"}}

    network: dict = {"EnableNetworkIsolation": False, "EnableInterContainerTrafficEncryption": True}
    if subnets or security_group_ids:
        network["VpcConfig"] = {"Subnets": list(subnets or []), "SecurityGroupIds": list(security_group_ids or [])}
    return {
        "ProcessingJobName": job,
        "RoleArn": role_arn,
        "AppSpecification": {"ImageUri": image_uri, "ContainerEntrypoint": list(ENTRYPOINT)},
        "Environment": dict(env),
        "ProcessingInputs": [
            s3_input("shares", "input/shares", f"{PROCESSING}/input/shares", "ShardedByS3Key"),
            s3_input("plans", "input/plans", f"{PROCESSING}/input/plans", "FullyReplicated"),
            s3_input("code", "code", CODE_DIR, "FullyReplicated"),
        ],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "partials", "S3Output": {
            "S3Uri": f"{base}/output/", "LocalPath": f"{PROCESSING}/output", "S3UploadMode": "EndOfJob"}}]},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": instance_count, "InstanceType": instance_type,
                                                  "VolumeSizeInGB": volume_gb}},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s},
        "NetworkConfig": network,
    }


def _read_partials(work: S3Store, job: str, versions: list[_Version],
                   shares: list[tuple[str, list]]) -> dict[int, Partial]:
    """Every share's partial, checked to be the one this job was given; a missing share is named."""
    parts, missing = {}, []
    for i, (plan_id, devices) in enumerate(shares):
        try:
            doc = drift_io.loads(work.get(f"output/partial-{i:05d}.json"))
        except ObjectNotFound:
            missing.append(f"{share_name(i)} ({len(devices)} devices, {devices[0][0]} .. {devices[-1][0]})")
            continue
        if doc.get("format") != RESULT_FORMAT or doc.get("share") != i or doc.get("plan") != plan_id:
            raise SageMakerJobError(f"{work.url}/output/partial-{i:05d}.json is not {share_name(i)}'s result "
                                    f"for {plan_id}")
        parts[i] = drift_io.partial_from_json(doc["partial"])
    if missing:
        raise SageMakerJobError(f"SageMaker processing job {job} completed without a result for "
                                f"{len(missing)} of {len(shares)} shares: {'; '.join(missing)} "
                                f"(no partial under {work.url}/output/); the review is incomplete, so no verdicts")
    return parts


def _judge_all(store, versions: list[_Version], parts: dict[int, Partial],
               cycle_s: int | None) -> tuple[list[ModelDrift], list[str]]:
    """Combine in share order and judge, model version by version, as ``fleet_drift`` does."""
    reports, warnings = [], []
    for v in versions:
        if v.skipped:
            warnings.append(v.skipped)
            continue
        report, more = _combine(v.plan, [parts[i] for i in v.shares], cycle_s)
        warnings += more
        if finish(store, report, v.plan.thresholds, warnings):
            reports.append(report)
    return reports, warnings


# --- the job -------------------------------------------------------------------------------------


def review_shares(input_dir: Path, output_dir: Path, store, workers: int = 8) -> int:
    """Review every share file this instance was given; one ``partial-<share>.json`` each."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plans: dict[str, Plan] = {}
    paths = sorted((input_dir / "shares").glob("share-*.json"))
    for path in paths:
        doc = drift_io.loads(path.read_bytes())
        if doc.get("format") != SHARE_FORMAT:
            raise ValueError(f"{path.name}: not a {SHARE_FORMAT} document")
        plan_id = doc["plan"]
        if plan_id not in plans:
            plan_path = input_dir / "plans" / f"{plan_id}.json"
            if not plan_path.is_file():
                raise FileNotFoundError(f"{path.name} needs {plan_id}, not found under {plan_path.parent}")
            plans[plan_id] = drift_io.plan_from_json(drift_io.loads(plan_path.read_bytes()))
        devices = [(d, list(keys)) for d, keys in doc["devices"]]
        began = time.monotonic()
        part = review_devices(store, plans[plan_id], devices, workers)
        result = {"format": RESULT_FORMAT, "share": doc["share"], "plan": plan_id,
                  "partial": drift_io.partial_to_json(part)}
        target = output_dir / f"partial-{doc['share']:05d}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(drift_io.dumps(result))
        tmp.replace(target)
        print(f"{path.name}: {len(devices)} devices, {sum(len(k) for _, k in devices)} summaries, "
              f"{len(part.warnings)} warnings, {time.monotonic() - began:.1f} s", flush=True)
    return len(paths)


def main() -> int:
    """The processing job's entry point: the store from the environment, the files SageMaker gave
    this instance; a failure is written where SageMaker reports it (ExitMessage) and exits 1."""
    input_dir = Path(os.environ.get(ENV_INPUT_DIR, f"{PROCESSING}/input"))
    output_dir = Path(os.environ.get(ENV_OUTPUT_DIR, f"{PROCESSING}/output"))
    try:
        store = open_store(os.environ[ENV_STORE_URL], os.environ.get(ENV_STORE_ENDPOINT) or None)
        done = review_shares(input_dir, output_dir, store, int(os.environ.get(ENV_WORKERS, "8")))
    except Exception as err:
        message = Path(os.environ.get(ENV_MESSAGE_FILE, "/opt/ml/output/message"))
        try:
            message.parent.mkdir(parents=True, exist_ok=True)
            message.write_text(f"{type(err).__name__}: {err}"[:1000], encoding="utf-8")
        except OSError:
            pass
        raise
    print(f"{done} shares reviewed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
