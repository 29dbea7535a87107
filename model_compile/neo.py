"""Compiling a bundle's ONNX model with SageMaker Neo for one target device or platform.

``compile_with_neo`` packs the bundle's ``model.onnx`` as the ``model.tar.gz`` Neo reads, uploads it,
starts a compilation job, follows it to its end and unpacks Neo's output into the bundle under
``neo/<target>/``: every file checksummed in ``manifest.files``, the job recorded in
``manifest.neo[target]``, the manifest rewritten atomically and the bundle verified with
``load_bundle``. A failed or stopped job raises ``NeoError`` with SageMaker's ``FailureReason`` and
leaves the bundle as it was.

Targets (``parse_target``), lower case:

- a Neo device name, as SageMaker's ``TargetDevice`` lists it: ``jetson_xavier``, ``jetson_nano``,
  ``rasp4b``, ``ml_c5``...;
- a platform ``<os>_<arch>[_<accelerator>]``, from ``TargetPlatform``'s Os, Arch and Accelerator:
  ``linux_arm64``, ``linux_arm64_nvidia``, ``linux_x86_64``, ``android_arm_eabihf_mali``...
  NVIDIA accelerators need ``compiler_options`` with ``gpu-code``, ``trt-ver`` and ``cuda-ver``.

The valid names are read from botocore's SageMaker service model, so they follow the installed
botocore rather than a list kept here.

What the output is for: Neo's output is a model for the Neo runtime, DLR (``pip install dlr`` on the
device, or the image Neo names), loaded with ``dlr.DLRModel("<bundle>/neo/<target>", dev_type)``
and fed the input named in the manifest with the shape it was compiled for (``batch_size`` rows).
The edgeloop runtime does not use it: it goes on scoring ``model.onnx`` with ONNX Runtime, and
``neo/`` is carried in the bundle, checksummed, for an application on the device that runs DLR.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from edge_runtime.bundle import MANIFEST_FILE, load_bundle, sha256_file
from edge_runtime.contracts import BundleManifest, NeoArtifact
from model_compile import sagemaker_jobs as jobs

NEO_DIR = "neo"
INPUT_ARCHIVE = "model.tar.gz"
FRAMEWORK = "ONNX"
TERMINAL = ("COMPLETED", "FAILED", "STOPPED")  # CompilationJobStatus; STARTING, INPROGRESS, STOPPING go on
NVIDIA_OPTIONS = ("gpu-code", "trt-ver", "cuda-ver")  # CompilerOptions SageMaker requires for NVIDIA



class NeoError(RuntimeError):
    """A Neo target, archive or compilation job that cannot give the bundle a compiled model."""


@dataclass(frozen=True)
class Target:
    """A parsed target: its canonical name (the key in ``manifest.neo``) and its OutputConfig part."""

    name: str
    device: str | None = None
    platform: dict[str, str] | None = None  # TargetPlatform: Os, Arch[, Accelerator]

    def output_config(self) -> dict:
        return {"TargetDevice": self.device} if self.device else {"TargetPlatform": dict(self.platform)}

    @property
    def nvidia(self) -> bool:
        return bool(self.platform and self.platform.get("Accelerator") == "NVIDIA")


@dataclass(frozen=True)
class NeoResult:
    artifact: NeoArtifact
    manifest: BundleManifest
    files: list[str]  # bundle-relative paths of the compiled model's files
    s3_model_artifacts: str


# --- targets -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def target_names() -> dict[str, tuple[str, ...]]:
    """The enums SageMaker's CreateCompilationJob accepts, from botocore's service model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return {shape: tuple(model.shape_for(shape).enum)
            for shape in ("TargetDevice", "TargetPlatformOs", "TargetPlatformArch", "TargetPlatformAccelerator")}


def parse_target(text: str) -> Target:
    """A device name (``jetson_xavier``) or ``<os>_<arch>[_<accelerator>]`` (``linux_arm64_nvidia``)."""
    names = target_names()
    name = text.strip().lower()
    if name in names["TargetDevice"]:
        return Target(name, device=name)
    os_name, _, rest = name.partition("_")
    by_lower = {v.lower(): v for v in names["TargetPlatformOs"]}
    arches = {v.lower(): v for v in names["TargetPlatformArch"]}
    if os_name in by_lower and rest:
        if rest in arches:
            return Target(name, platform={"Os": by_lower[os_name], "Arch": arches[rest]})
        for acc in names["TargetPlatformAccelerator"]:
            arch = rest.removesuffix("_" + acc.lower())
            if arch != rest and arch in arches:
                return Target(name, platform={"Os": by_lower[os_name], "Arch": arches[arch], "Accelerator": acc})
    def lower(shape: str) -> str:
        return ", ".join(v.lower() for v in names[shape])

    raise NeoError(f"unknown Neo target {text!r}: a device ({lower('TargetDevice')}) or a platform "
                   f"<os>_<arch>[_<accelerator>] with os one of {lower('TargetPlatformOs')}, arch one of "
                   f"{lower('TargetPlatformArch')}, accelerator one of {lower('TargetPlatformAccelerator')} "
                   "(e.g. linux_arm64_nvidia)")


# --- the job -------------------------------------------------------------------------------------


def data_input_config(manifest: BundleManifest, batch_size: int = 1) -> dict[str, list[int]]:
    """Neo compiles for fixed shapes: the manifest's input with its free batch dimension set."""
    if batch_size < 1:
        raise NeoError(f"batch size {batch_size}: must be at least 1")
    shape = [batch_size if (i == 0 and d is None) else d for i, d in enumerate(manifest.input.shape)]
    if any(d is None for d in shape):
        raise NeoError(f"input {manifest.input.name!r} has shape {manifest.input.shape}: Neo needs every "
                       "dimension but the batch fixed")
    return {manifest.input.name: shape}


def model_archive(model_path: Path) -> bytes:
    """``model.tar.gz`` with the ONNX model at its top; fixed times, so the same model gives the same bytes."""
    data = model_path.read_bytes()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(model_path.name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def compilation_job_request(job: str, target: Target, role_arn: str, input_uri: str, output_uri: str,
                            data_input: dict[str, list[int]], *, framework_version: str | None = None,
                            compiler_options: dict | None = None, max_runtime_s: int = 900) -> dict:
    """CreateCompilationJob's parameters."""
    input_config = {"S3Uri": input_uri, "DataInputConfig": json.dumps(data_input), "Framework": FRAMEWORK}
    if framework_version:
        input_config["FrameworkVersion"] = framework_version
    output_config = {"S3OutputLocation": output_uri, **target.output_config()}
    if compiler_options:
        output_config["CompilerOptions"] = json.dumps(compiler_options)
    return {"CompilationJobName": job, "RoleArn": role_arn, "InputConfig": input_config,
            "OutputConfig": output_config, "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s}}


def default_job_name(target: Target) -> str:
    """Unique and within SageMaker's name rule (letters, digits, hyphens; at most 63)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", target.name).strip("-")
    head = f"edgeloop-neo-{slug}"[:40].rstrip("-")
    return f"{head}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# --- the bundle ----------------------------------------------------------------------------------


def write_manifest(root: Path, manifest: BundleManifest | bytes) -> None:
    """Write temp, flush to disk, rename: a reader sees the old manifest or the new, never half of one."""
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest.model_dump(mode="json"), indent=1).encode()
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=root)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / MANIFEST_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def add_neo_output(bundle_dir: str | Path, target: str, archive: Path,
                   job_name: str) -> tuple[BundleManifest, list[str]]:
    """Unpack Neo's ``archive`` into ``neo/<target>/`` in place of any earlier output for that target,
    record it in the manifest and verify the bundle; on any failure the bundle is put back as it was."""
    root = Path(bundle_dir)
    target = parse_target(target).name  # a folder name of ours, never a path from elsewhere
    manifest = load_bundle(root).manifest
    directory = f"{NEO_DIR}/{target}"
    final = root / NEO_DIR / target
    (root / NEO_DIR).mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target}-", dir=root / NEO_DIR))
    old = root / NEO_DIR / f".{target}-old-{secrets.token_hex(4)}"
    manifest_bytes = (root / MANIFEST_FILE).read_bytes()
    moved = False
    try:
        try:
            names = jobs.unpack_archive(archive, staging, "Neo's output")
        except jobs.ArchiveError as err:
            raise NeoError(str(err)) from None
        files = {k: v for k, v in manifest.files.items() if not k.startswith(directory + "/")}
        files.update({f"{directory}/{n}": sha256_file(staging / n) for n in names})
        updated = manifest.model_copy(update={
            "files": files,
            "neo": {**manifest.neo, target: NeoArtifact(target=target, directory=directory, job_name=job_name,
                                                        framework=FRAMEWORK)},
        })
        if final.exists():
            final.rename(old)
        moved = True
        staging.rename(final)
        write_manifest(root, updated)
        load_bundle(root)
    except BaseException:
        if (root / MANIFEST_FILE).read_bytes() != manifest_bytes:
            write_manifest(root, manifest_bytes)
        if moved:
            if final.exists():
                shutil.rmtree(final)
            if old.exists():
                old.rename(final)
        raise
    finally:
        for leftover in (staging, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        if not any((root / NEO_DIR).iterdir()):
            (root / NEO_DIR).rmdir()
    return updated, [f"{directory}/{n}" for n in names]


def compile_with_neo(bundle_dir: str | Path, target: str, *, role_arn: str, bucket: str, prefix: str = "edgeloop/neo",
                     session=None, sagemaker=None, s3=None, framework_version: str | None = None,
                     compiler_options: dict | None = None, batch_size: int = 1, poll_s: float = 15.0,
                     timeout_s: float = 3600.0, max_runtime_s: int = 900, job_name: str | None = None,
                     on_status: Callable[[str, str, float], None] | None = None) -> NeoResult:
    """Compile the bundle's model with SageMaker Neo for ``target`` and add the output to the bundle.

    The input goes to ``s3://<bucket>/<prefix>/<name>/<version>/<job>/input/model.tar.gz``, Neo writes
    under ``.../<job>/output/``. ``sagemaker`` and ``s3`` are boto3 clients (default: from ``session``,
    a ``boto3.Session`` by default). ``role_arn`` is the role Neo assumes: it reads the input and
    writes the output prefix. ``timeout_s``: how long to follow the job before stopping it;
    ``max_runtime_s``: SageMaker's own limit on the job. ``on_status(job, status, seconds)`` at each
    change of the job's status."""
    root = Path(bundle_dir)
    parsed = parse_target(target)
    if parsed.nvidia and not all(k in (compiler_options or {}) for k in NVIDIA_OPTIONS):
        raise NeoError(f"target {parsed.name}: SageMaker needs compiler options {', '.join(NVIDIA_OPTIONS)} for an "
                       'NVIDIA accelerator, e.g. {"gpu-code": "sm_72", "trt-ver": "8.4.1", "cuda-ver": "11.4"}')
    bundle = load_bundle(root)  # a corrupt bundle is refused before anything is uploaded
    m = bundle.manifest
    data_input = data_input_config(m, batch_size)
    if session is None and (sagemaker is None or s3 is None):
        import boto3

        session = boto3.session.Session()
    sm = sagemaker or session.client("sagemaker")
    s3 = s3 or session.client("s3")
    job = job_name or default_job_name(parsed)
    base = "/".join(p for p in (prefix.strip("/"), m.name, m.version, job) if p)
    s3.put_object(Bucket=bucket, Key=f"{base}/input/{INPUT_ARCHIVE}", Body=model_archive(bundle.model_path))
    sm.create_compilation_job(**compilation_job_request(
        job, parsed, role_arn, f"s3://{bucket}/{base}/input/{INPUT_ARCHIVE}", f"s3://{bucket}/{base}/output",
        data_input, framework_version=framework_version, compiler_options=compiler_options,
        max_runtime_s=max_runtime_s))
    desc = jobs.follow(sm, jobs.COMPILATION, job, poll_s=poll_s, timeout_s=timeout_s, on_status=on_status,
                       changes_only=True, error=NeoError)
    uri = desc["ModelArtifacts"]["S3ModelArtifacts"]
    try:
        out_bucket, key = jobs.split_s3_uri(uri)
    except ValueError as err:
        raise NeoError(f"compiled model at {uri!r}: {err}") from None
    with tempfile.TemporaryDirectory(prefix="edgeloop-neo-") as tmp:
        archive = Path(tmp) / "output.tar.gz"
        with open(archive, "wb") as fh:
            s3.download_fileobj(out_bucket, key, fh)
        manifest, files = add_neo_output(root, parsed.name, archive, job)
    return NeoResult(manifest.neo[parsed.name], manifest, files, uri)
