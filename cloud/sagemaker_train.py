"""``edgeloop train --sagemaker``: the training entry point, unchanged, as a SageMaker training job.

The driver (``train_on_sagemaker``) checks the hyperparameters here first (a typo costs nothing),
then writes under ``s3://<bucket>/<prefix>/<job>/``:

- ``input/train/<file>.csv``: the data, the job's one input channel (``train``);
- ``code/sourcedir.tar.gz``: the ``cloud``, ``edge_runtime`` and ``model_compile`` packages, the
  launcher ``edgeloop_train.py`` (which calls ``cloud.train_entry.main``) and ``requirements.txt``
  (what the image lacks: ONNX, skl2onnx, ONNX Runtime, pydantic, datasketches);

and starts a training job on a SageMaker scikit-learn framework image in script mode: its toolkit
unpacks ``sagemaker_submit_directory``, pip-installs requirements.txt (so the job needs internet
access: no network isolation, and a NAT in a VPC) and runs ``sagemaker_program``. The job writes
``<job>/output/model.tar.gz``. The driver follows the job (status changes and its CloudWatch log
lines) until it ends, downloads and unpacks the model into the output directory, checks it is a
training output of the very data it uploaded (the container's sha256 against its own), and adds
the job's lineage to training.json: job name and ARN, image, instance type, hyperparameters as
SageMaker holds them, SageMaker's final metrics, data and code locations, model artefact.

The default image is the SageMaker scikit-learn container ``1.4-2-cpu-py3`` (Python 3.10,
scikit-learn 1.4.2, NumPy 2.1); ``image_uri`` replaces it, e.g. with an image that already holds
the requirements. Ctrl-C while following leaves the job running (its model still lands in S3) and
says how to stop it: a training job's result is worth keeping even if this process goes away.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import secrets
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_runtime.contracts import ContractError
from model_compile.card import TrainingCard, load_card
from model_compile.sagemaker_jobs import ArchiveError, split_s3_uri, unpack_archive

from . import train_entry
from .drift_sagemaker import SageMakerJobError

log = logging.getLogger(__name__)

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
DEFAULT_INSTANCE_TYPE = "ml.m5.large"
DEFAULT_PREFIX = "edgeloop/training"
DEFAULT_MAX_RUNTIME_S = 3600
MAX_RUNTIME_LIMIT_S = 28 * 86400  # SageMaker's upper bound for MaxRuntimeInSeconds
LAUNCHER = "edgeloop_train.py"
SOURCE_TARBALL = "sourcedir.tar.gz"
PACKAGES = ("cloud", "edge_runtime", "model_compile")
TERMINAL = ("Completed", "Failed", "Stopped")

# The SageMaker scikit-learn framework image (script mode, sagemaker-training toolkit): 1.4-2 runs
# Python 3.10. Its registry account per region, as the SageMaker Python SDK lists them.
SKLEARN_IMAGE_REPOSITORY = "sagemaker-scikit-learn"
SKLEARN_IMAGE_TAG = "1.4-2-cpu-py3"
SKLEARN_REGISTRIES = {
    "af-south-1": "510948584623", "ap-east-1": "651117190479", "ap-northeast-1": "354813040037",
    "ap-northeast-2": "366743142698", "ap-northeast-3": "867004704886", "ap-south-1": "720646828776",
    "ap-south-2": "628508329040", "ap-southeast-1": "121021644041", "ap-southeast-2": "783357654285",
    "ap-southeast-3": "951798379941", "ap-southeast-4": "106583098589", "ca-central-1": "341280168497",
    "cn-north-1": "450853457545", "cn-northwest-1": "451049120500", "eu-central-1": "492215442770",
    "eu-central-2": "680994064768", "eu-north-1": "662702820516", "eu-south-1": "978288397137",
    "eu-south-2": "104374241257", "eu-west-1": "141502667606", "eu-west-2": "764974769150",
    "eu-west-3": "659782779980", "me-central-1": "272398656194", "me-south-1": "801668240914",
    "sa-east-1": "737474898029", "us-east-1": "683313688378", "us-east-2": "257758044811",
    "us-gov-east-1": "237065988967", "us-gov-west-1": "414596584902", "us-west-1": "746614075791",
    "us-west-2": "246618743249",
}
# What the training path imports and the image lacks (it has numpy, scikit-learn, scipy, boto3).
REQUIREMENTS = (
    "onnx>=1.15",
    "onnxruntime>=1.19",  # the first with NumPy 2 wheels: the image has NumPy 2.1
    "skl2onnx>=1.16",
    "pydantic>=2.5",
    "datasketches>=5.0",
    "PyYAML>=6.0",  # edge_runtime.contracts imports it (for configs); the image has it, another may not
)
LAUNCHER_SOURCE = '''"""SageMaker script mode runs this file; the training is cloud.train_entry's."""
import sys

from cloud.train_entry import main

sys.exit(main())
'''

_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")

_now = time.monotonic  # module-level, so a test can run the clock without touching the real one
_sleep = time.sleep

StatusCallback = Callable[[str, str, str, str, float], None]  # job, status, secondary status, message, s
LogCallback = Callable[[str, str], None]  # log stream, line


class TrainingJobError(SageMakerJobError):
    """The training job failed or was stopped, or what it left is not the training output expected."""


class Detached(RuntimeError):
    """Following was interrupted (Ctrl-C); the job goes on. The message says how to stop it."""


@dataclass
class SageMakerTraining:
    job_name: str
    out_dir: Path
    card: TrainingCard
    lineage: dict
    description: dict  # DescribeTrainingJob's last answer


# --- what the job is given ------------------------------------------------------------------------


def default_image(region: str) -> str:
    account = SKLEARN_REGISTRIES.get(region)
    if account is None:
        raise ValueError(f"no default training image known for region {region}: give --image (a SageMaker "
                         "scikit-learn framework image, Python >= 3.10)")
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{SKLEARN_IMAGE_REPOSITORY}:{SKLEARN_IMAGE_TAG}"


def default_bucket(sts, region: str) -> str:
    """The SageMaker Python SDK's default bucket, ``sagemaker-<region>-<account>``; not created here."""
    return f"sagemaker-{region}-{sts.get_caller_identity()['Account']}"


def requirements_txt() -> str:
    return "\n".join(REQUIREMENTS) + "\n"


def source_tarball() -> bytes:
    """sourcedir.tar.gz: the packages' sources, the launcher and requirements.txt. Fixed times and
    owners: the same code always gives the same bytes (and the same sha256 in the lineage)."""
    import importlib

    files: list[tuple[str, bytes]] = [(LAUNCHER, LAUNCHER_SOURCE.encode()),
                                      ("requirements.txt", requirements_txt().encode())]
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).resolve().parent
        files += [(p.relative_to(root.parent).as_posix(), p.read_bytes())
                  for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts]
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for arcname, data in files:
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def training_job_request(job: str, role_arn: str, image_uri: str, instance_type: str, region: str,
                         data_uri: str, code_uri: str, output_uri: str, hyperparameters: Mapping[str, str],
                         metric_definitions: list[dict], max_runtime_s: int, volume_gb: int = 30) -> dict:
    """CreateTrainingJob's parameters: script mode on the framework image, one CSV channel."""
    return {
        "TrainingJobName": job,
        "RoleArn": role_arn,
        "AlgorithmSpecification": {"TrainingImage": image_uri, "TrainingInputMode": "File",
                                   "MetricDefinitions": metric_definitions},
        "HyperParameters": {**hyperparameters, "sagemaker_program": LAUNCHER, "sagemaker_submit_directory": code_uri,
                            "sagemaker_region": region, "sagemaker_container_log_level": "20",
                            "sagemaker_job_name": job},
        "InputDataConfig": [{"ChannelName": train_entry.CHANNEL, "ContentType": "text/csv", "InputMode": "File",
                             "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": data_uri,
                                                             "S3DataDistributionType": "FullyReplicated"}}}],
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": 1, "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s},
        "EnableNetworkIsolation": False,  # the toolkit pip-installs requirements.txt
    }


def _job_name() -> str:
    return f"edgeloop-train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# --- following the job ----------------------------------------------------------------------------


class LogTail:
    """The job's CloudWatch log lines, each once: every stream ``<job>/...`` of the training jobs'
    log group, read on from where the last poll stopped. A group or stream that does not exist yet
    is normal early in a job; a log that cannot be read (no permission) is warned about once and
    left alone: the training does not depend on it."""

    def __init__(self, logs, job: str, emit: LogCallback | None) -> None:
        self.logs, self.job, self.emit = logs, job, emit
        self.tokens: dict[str, str | None] = {}
        self.enabled = logs is not None and emit is not None

    def poll(self) -> None:
        if not self.enabled:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            streams = self.logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{self.job}/")
            for stream in sorted(s["logStreamName"] for s in streams.get("logStreams", [])):
                self._read(stream)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return
            self._give_up(err)
        except BotoCoreError as err:
            self._give_up(err)

    def _read(self, stream: str) -> None:
        token = self.tokens.get(stream)
        while True:
            more = {"nextToken": token} if token else {}
            page = self.logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=True, **more)
            for event in page.get("events", []):
                self.emit(stream, event.get("message", "").rstrip("\n"))
            new = page.get("nextForwardToken")
            done = not page.get("events") or new == token
            token = new or token
            if done:
                break
        self.tokens[stream] = token

    def _give_up(self, err: Exception) -> None:
        self.enabled = False
        log.warning("cannot read the job's log lines from CloudWatch Logs %s (%s); following its status only",
                    LOG_GROUP, err)


def follow(sm, logs, job: str, poll_s: float = 15.0, on_status: StatusCallback | None = None,
           on_log: LogCallback | None = None) -> dict:
    """Poll until the job ends; ``on_status`` at each change of status, secondary status or status
    message, ``on_log`` for each new log line. Returns the last description; a job that failed or
    was stopped raises with SageMaker's FailureReason."""
    start, seen = _now(), None
    tail = LogTail(logs, job, on_log)
    while True:
        desc = sm.describe_training_job(TrainingJobName=job)
        status, secondary = desc["TrainingJobStatus"], desc.get("SecondaryStatus", "")
        transitions = desc.get("SecondaryStatusTransitions") or [{}]
        message = transitions[-1].get("StatusMessage", "")
        if (status, secondary, message) != seen:
            seen = (status, secondary, message)
            if on_status:
                on_status(job, status, secondary, message, _now() - start)
        tail.poll()
        if status in TERMINAL:
            break
        _sleep(poll_s)
    _sleep(min(poll_s, 5.0))  # CloudWatch Logs lags the status by a few seconds: the last lines
    tail.poll()
    if status != "Completed":
        why = desc.get("FailureReason") or "no reason given"
        raise TrainingJobError(f"SageMaker training job {job} {status.lower()}: {why}")
    return desc


# --- the model and its lineage --------------------------------------------------------------------


def _when(value) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def job_lineage(desc: dict, region: str, data_uri: str, data_sha256: str, source_path: Path, code_uri: str,
                code_sha256: str) -> dict:
    """What the driver knows of the run, for the training card (merged over the container's)."""
    job = {
        "name": desc["TrainingJobName"],
        "arn": desc.get("TrainingJobArn"),
        "region": region,
        "image": desc.get("AlgorithmSpecification", {}).get("TrainingImage"),
        "instance_type": desc.get("ResourceConfig", {}).get("InstanceType"),
        "instance_count": desc.get("ResourceConfig", {}).get("InstanceCount"),
        "role": desc.get("RoleArn"),
        "hyperparameters": desc.get("HyperParameters", {}),
        "final_metrics": {m["MetricName"]: m["Value"] for m in desc.get("FinalMetricDataList", [])},
        "status": desc.get("TrainingJobStatus"),
        "started": _when(desc.get("TrainingStartTime")),
        "ended": _when(desc.get("TrainingEndTime")),
        "billable_seconds": desc.get("BillableTimeInSeconds"),
    }
    return {
        "source": "sagemaker",
        "training_job": {k: v for k, v in job.items() if v is not None},
        "data": {"uri": data_uri, "sha256": data_sha256, "source_path": str(source_path.resolve())},
        "code": {"uri": code_uri, "sha256": code_sha256},
        "model_artifact": desc["ModelArtifacts"]["S3ModelArtifacts"],
    }


def fetch_model(s3, desc: dict, out_dir: Path, lineage: dict) -> TrainingCard:
    """Download the job's model.tar.gz, check it is a training output of the data sent, add the
    lineage to its card and put its files into ``out_dir``."""
    job = desc["TrainingJobName"]
    uri = (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not uri:
        raise TrainingJobError(f"SageMaker training job {job} completed without a model artefact")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sagemaker-", dir=out_dir.parent))
    try:
        archive = staging / "model.tar.gz"
        try:
            s3.download_file(*split_s3_uri(uri), str(archive))
            model = staging / "model"
            model.mkdir()
            unpack_archive(archive, model, f"{uri}")
        except ValueError as err:  # an odd URI, or an archive that is unreadable or escapes its folder
            raise TrainingJobError(str(err) if isinstance(err, ArchiveError) else f"{uri}: {err}") from None
        try:
            card = load_card(model)
        except ContractError as err:
            raise TrainingJobError(f"{uri} is not a training output of cloud.train_entry: {err}") from None
        sent, used = lineage["data"]["sha256"], card.lineage.get("data", {}).get("sha256")
        if used != sent:
            raise TrainingJobError(f"{uri} was trained on data with sha256 {used}, not the {sent} uploaded "
                                   f"to {lineage['data']['uri']}")
        card = train_entry.amend_lineage(model, lineage)
        shutil.copytree(model, out_dir, dirs_exist_ok=True)
        return card
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the driver -----------------------------------------------------------------------------------


def _session(region: str | None):
    import boto3

    return boto3.session.Session(region_name=region)


def train_on_sagemaker(data: str | Path, out_dir: str | Path, hyperparameters: Mapping[str, object], *,
                       role_arn: str, instance_type: str | None = None, image_uri: str | None = None,
                       bucket: str | None = None, prefix: str = DEFAULT_PREFIX, region: str | None = None,
                       endpoint_url: str | None = None, max_runtime_s: int = DEFAULT_MAX_RUNTIME_S,
                       volume_gb: int = 30, job_name: str | None = None, poll_s: float = 15.0, session=None,
                       on_status: StatusCallback | None = None, on_log: LogCallback | None = None,
                       ) -> SageMakerTraining:
    """Train ``data`` (a local CSV file) in a SageMaker training job and put the model, with its
    lineage, into ``out_dir``. ``bucket`` defaults to ``sagemaker-<region>-<account>``, which must
    exist; ``session``: anything with ``.client(name, **kw)`` (a boto3 Session by default)."""
    hp = train_entry.parse_hyperparameters(hyperparameters)  # a typo is refused before anything is paid
    data, out_dir = Path(data), Path(out_dir)
    if not data.is_file():
        raise train_entry.TrainingError(f"{data}: no such file")
    if not _ROLE_ARN.fullmatch(role_arn or ""):
        raise ValueError(f"role {role_arn!r}: give the ARN of an IAM role SageMaker can assume "
                         "(arn:aws:iam::<account>:role/<name>)")
    instance_type = instance_type or DEFAULT_INSTANCE_TYPE
    if not instance_type.startswith("ml."):
        raise ValueError(f"instance type {instance_type!r}: SageMaker's are named ml.<family>.<size> (ml.m5.large)")
    if not 1 <= max_runtime_s <= MAX_RUNTIME_LIMIT_S:
        raise ValueError(f"max runtime {max_runtime_s} s: give 1 s to {MAX_RUNTIME_LIMIT_S // 86400} days")
    job = job_name or _job_name()
    if not _JOB_NAME.fullmatch(job):
        raise ValueError(f"job name {job!r}: up to 63 letters, digits and hyphens, not starting with a hyphen")
    session = session or _session(region)
    region = region or getattr(session, "region_name", None)
    if not region:
        raise ValueError("no AWS region: give --region or set AWS_DEFAULT_REGION")
    extra = {"region_name": region, **({"endpoint_url": endpoint_url} if endpoint_url else {})}
    s3, sm = session.client("s3", **extra), session.client("sagemaker", **extra)
    image = image_uri or default_image(region)
    bucket = bucket or default_bucket(session.client("sts", **extra), region)
    base = "/".join(p for p in (prefix.strip("/"), job) if p)

    facts = train_entry.data_facts(data)
    data_uri = f"s3://{bucket}/{base}/input/{train_entry.CHANNEL}/"
    code = source_tarball()
    code_uri = f"s3://{bucket}/{base}/code/{SOURCE_TARBALL}"
    _upload(s3, bucket, f"{base}/input/{train_entry.CHANNEL}/{data.name}", data, code, f"{base}/code/{SOURCE_TARBALL}")

    request = training_job_request(
        job, role_arn, image, instance_type, region, data_uri, code_uri,
        f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}",
        train_entry.hyperparameter_strings(hp), train_entry.metric_definitions(hp["model"]), max_runtime_s, volume_gb)
    sm.create_training_job(**request)
    try:
        desc = follow(sm, session.client("logs", **extra), job, poll_s, on_status, on_log)
    except KeyboardInterrupt:
        raise Detached(
            f"stopped following SageMaker training job {job}; it goes on running (and being billed) until it "
            f"ends, and its model will be at {request['OutputDataConfig']['S3OutputPath']}/{job}/output/model.tar.gz."
            f" To stop it: aws sagemaker stop-training-job --training-job-name {job} --region {region}") from None
    lineage = job_lineage(desc, region, data_uri + data.name, facts["sha256"], data, code_uri,
                          hashlib.sha256(code).hexdigest())
    card = fetch_model(s3, desc, out_dir, lineage)
    return SageMakerTraining(job, out_dir, card, card.lineage, desc)


def _upload(s3, bucket: str, data_key: str, data: Path, code: bytes, code_key: str) -> None:
    from botocore.exceptions import ClientError

    try:
        s3.put_object(Bucket=bucket, Key=code_key, Body=code)  # first: a missing bucket shows here plainly
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
            raise ValueError(f"bucket {bucket} does not exist: create it (in the job's region) or give "
                             "--bucket") from None
        raise
    s3.upload_file(str(data), bucket, data_key)  # multipart for a large file
