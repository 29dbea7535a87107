"""SageMaker Neo compilation of a bundle: S3 on the moto server (real HTTP), SageMaker through botocore's
Stubber, which checks every request and response against the service model. moto has compilation jobs,
but they complete at once, never fail, and report the output folder as ``S3ModelArtifacts`` where
SageMaker names the archive, so the job's side is played here: at the first describe, ``SimulatedNeo``
reads the uploaded input as Neo would and writes an output archive where the stubbed describe says."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.contracts import NeoArtifact
from model_compile import neo, sagemaker_jobs

ROLE = "arn:aws:iam::123456789012:role/edgeloop-neo"
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
OUTPUT = {"compiled.so": b"\x7fELF compiled", "compiled.params": os.urandom(256),
          "compiled_model.json": b'{"nodes": []}', "compiled.meta": b"meta"}


@pytest.fixture
def bundle(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


@pytest.fixture
def s3(moto_endpoint, s3_bucket):
    return boto3.client("s3", endpoint_url=moto_endpoint), s3_bucket


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) and its bytes: what "unchanged" compares."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def archive(files: dict[str, bytes], *, links: dict[str, str] | None = None, prefix: str = "./") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, to in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, to
            tar.addfile(info)
    return raw.getvalue()


def base(bucket: str, bundle: Path, job: str) -> str:
    m = json.loads((bundle / "manifest.json").read_text())
    return f"s3://{bucket}/edgeloop/neo/{m['name']}/{m['version']}/{job}"


def arn(job: str) -> str:
    return f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{job}"


def described(job: str, status: str, request: dict, artifact: str, reason: str = "") -> dict:
    return {"CompilationJobName": job, "CompilationJobArn": arn(job),
            "CompilationJobStatus": status, "StoppingCondition": request["StoppingCondition"], "CreationTime": T0,
            "LastModifiedTime": T0, "FailureReason": reason, "ModelArtifacts": {"S3ModelArtifacts": artifact},
            "RoleArn": ROLE, "InputConfig": request["InputConfig"], "OutputConfig": request["OutputConfig"]}


class SimulatedNeo:
    """The stubbed sagemaker client; at the first describe after a create, Neo's side of that job:
    the input must be a tar.gz holding the bundle's model, and ``output`` becomes the output archive."""

    def __init__(self, client, s3, outputs: list[bytes | None]) -> None:
        self.client, self.s3, self.outputs, self.requests, self.pending = client, s3, list(outputs), [], False
        self.inputs: list[dict[str, bytes]] = []

    def create_compilation_job(self, **params):
        self.requests.append(params)
        self.pending = True
        return self.client.create_compilation_job(**params)

    def describe_compilation_job(self, **params):
        if self.pending:
            self.pending = False
            request = self.requests[-1]
            bucket, _, key = request["InputConfig"]["S3Uri"].removeprefix("s3://").partition("/")
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                self.inputs.append({m.name: tar.extractfile(m).read() for m in tar})
            output = self.outputs.pop(0)
            if output is not None:
                out = request["OutputConfig"]["S3OutputLocation"]
                target = request["OutputConfig"].get("TargetDevice") or "platform"
                bucket, _, prefix = out.removeprefix("s3://").partition("/")
                self.s3.put_object(Bucket=bucket, Key=f"{prefix}/model-{target}.tar.gz", Body=output)
        return self.client.describe_compilation_job(**params)

    def __getattr__(self, name):
        return getattr(self.client, name)


def expect_job(stub: Stubber, bucket: str, bundle: Path, job: str, output_config: dict, statuses: list[str],
               reason: str = "", artifact_name: str = "model-jetson_xavier.tar.gz") -> dict:
    """Queue one job: the exact create request it must send, then the describes it will see."""
    m = json.loads((bundle / "manifest.json").read_text())
    at = base(bucket, bundle, job)
    request = {
        "CompilationJobName": job, "RoleArn": ROLE,
        "InputConfig": {"S3Uri": f"{at}/input/model.tar.gz", "Framework": "ONNX",
                        "DataInputConfig": json.dumps({m["input"]["name"]: [1, len(m["input"]["features"])]})},
        "OutputConfig": {"S3OutputLocation": f"{at}/output", **output_config},
        "StoppingCondition": {"MaxRuntimeInSeconds": 900},
    }
    stub.add_response("create_compilation_job", {"CompilationJobArn": arn(job)}, request)
    for status in statuses:
        stub.add_response("describe_compilation_job",
                          described(job, status, request, f"{at}/output/{artifact_name}", reason),
                          {"CompilationJobName": job})
    return request


def sagemaker():
    client = boto3.client("sagemaker", region_name="us-east-1")
    return client, Stubber(client)


def test_a_completed_job_adds_its_output_to_the_bundle(bundle, s3):
    client, bucket = s3
    sm, stub = sagemaker()
    before = tree(bundle)
    job = "edgeloop-neo-test-1"
    expect_job(stub, bucket, bundle, job, {"TargetDevice": "jetson_xavier"},
               ["STARTING", "INPROGRESS", "INPROGRESS", "COMPLETED"])
    fake = SimulatedNeo(sm, client, [archive({**OUTPUT, "lib/libdlr.so": b"dlr"})])
    seen = []
    with stub:
        result = neo.compile_with_neo(bundle, "jetson_xavier", role_arn=ROLE, bucket=bucket, sagemaker=fake, s3=client,
                                      poll_s=0, job_name=job, on_status=lambda *a: seen.append(a))
        stub.assert_no_pending_responses()
    assert [(j, s) for j, s, _ in seen] == [(job, "STARTING"), (job, "INPROGRESS"), (job, "COMPLETED")]
    assert fake.inputs == [{"model.onnx": before["model.onnx"]}]  # Neo was given the bundle's model, at the top

    loaded = load_bundle(bundle)
    m = loaded.manifest
    assert m.neo == {"jetson_xavier": NeoArtifact(target="jetson_xavier", directory="neo/jetson_xavier", job_name=job)}
    expected = {f"neo/jetson_xavier/{n}": d for n, d in {**OUTPUT, "lib/libdlr.so": b"dlr"}.items()}
    assert {k: v for k, v in m.files.items() if k.startswith("neo/")} == {
        k: hashlib.sha256(d).hexdigest() for k, d in expected.items()}
    after = tree(bundle)
    assert after == {**before, "manifest.json": after["manifest.json"], **expected}  # nothing else added, nothing lost
    assert set(after) == set(m.files) | {"manifest.json"}
    assert result.artifact == m.neo["jetson_xavier"] and sorted(result.files) == sorted(expected)
    assert result.s3_model_artifacts == f"{base(bucket, bundle, job)}/output/model-jetson_xavier.tar.gz"

    (bundle / "neo/jetson_xavier/compiled.so").write_bytes(b"\x7fELF tampered")
    with pytest.raises(BundleError, match="checksum mismatch for neo/jetson_xavier/compiled.so"):
        load_bundle(bundle)
    (bundle / "neo/jetson_xavier/compiled.so").unlink()
    with pytest.raises(BundleError, match="bundle file neo/jetson_xavier/compiled.so is missing"):
        load_bundle(bundle)


def test_a_failed_job_raises_with_its_reason_and_leaves_the_bundle_alone(bundle, s3):
    client, bucket = s3
    sm, stub = sagemaker()
    before = tree(bundle)
    job = "edgeloop-neo-fails"
    reason = "ClientError: InputConfiguration: Unsupported ONNX operator ReduceLogSumExp"
    expect_job(stub, bucket, bundle, job, {"TargetDevice": "rasp4b"}, ["INPROGRESS", "FAILED"], reason=reason)
    seen = []
    with stub, pytest.raises(neo.NeoError, match=f"compilation job {job} failed: {reason}$"):
        neo.compile_with_neo(bundle, "rasp4b", role_arn=ROLE, bucket=bucket, sagemaker=sm, s3=client, poll_s=0,
                             job_name=job, on_status=lambda *a: seen.append(a[1]))
    stub.assert_no_pending_responses()
    assert seen == ["INPROGRESS", "FAILED"]
    assert tree(bundle) == before


def test_recompiling_a_target_replaces_its_output_and_keeps_the_others(bundle, s3):
    client, bucket = s3
    sm, stub = sagemaker()
    platform = {"TargetPlatform": {"Os": "LINUX", "Arch": "ARM64"}}
    expect_job(stub, bucket, bundle, "job-1", {"TargetDevice": "jetson_xavier"}, ["COMPLETED"])
    expect_job(stub, bucket, bundle, "job-2", platform, ["INPROGRESS", "COMPLETED"],
               artifact_name="model-platform.tar.gz")
    expect_job(stub, bucket, bundle, "job-3", {"TargetDevice": "jetson_xavier"}, ["COMPLETED"])
    fake = SimulatedNeo(sm, client, [archive(OUTPUT), archive({"arm.so": b"arm64"}),
                                     archive({"compiled.so": b"second build", "new/extra.json": b"{}"})])
    with stub:
        for job, target in (("job-1", "jetson_xavier"), ("job-2", "LINUX_ARM64"), ("job-3", "jetson_xavier")):
            neo.compile_with_neo(bundle, target, role_arn=ROLE, bucket=bucket, sagemaker=fake, s3=client, poll_s=0,
                                 job_name=job)
        stub.assert_no_pending_responses()
    m = load_bundle(bundle).manifest
    assert {t: a.job_name for t, a in m.neo.items()} == {"jetson_xavier": "job-3", "linux_arm64": "job-2"}
    on_disk = {k: v for k, v in tree(bundle).items() if k.startswith("neo/")}
    assert on_disk == {"neo/jetson_xavier/compiled.so": b"second build", "neo/jetson_xavier/new/extra.json": b"{}",
                       "neo/linux_arm64/arm.so": b"arm64"}  # job-1's other files are gone
    assert sorted(k for k in m.files if k.startswith("neo/")) == sorted(on_disk)


def test_a_failed_verification_puts_the_earlier_output_back(bundle, s3, monkeypatch):
    client, bucket = s3
    sm, stub = sagemaker()
    expect_job(stub, bucket, bundle, "job-1", {"TargetDevice": "jetson_xavier"}, ["COMPLETED"])
    expect_job(stub, bucket, bundle, "job-2", {"TargetDevice": "jetson_xavier"}, ["COMPLETED"])
    fake = SimulatedNeo(sm, client, [archive(OUTPUT), archive({"compiled.so": b"second"})])
    with stub:
        neo.compile_with_neo(bundle, "jetson_xavier", role_arn=ROLE, bucket=bucket, sagemaker=fake, s3=client,
                             poll_s=0, job_name="job-1")
        before = tree(bundle)
        calls = []

        def failing_verify(root):  # the check after the manifest is rewritten (the third call) fails
            calls.append(root)
            if len(calls) == 3:
                raise BundleError("simulated")
            return load_bundle(root)

        monkeypatch.setattr(neo, "load_bundle", failing_verify)
        with pytest.raises(BundleError, match="simulated"):
            neo.compile_with_neo(bundle, "jetson_xavier", role_arn=ROLE, bucket=bucket, sagemaker=fake, s3=client,
                                 poll_s=0, job_name="job-2")
    assert len(calls) == 3 and tree(bundle) == before
    assert load_bundle(bundle).manifest.neo["jetson_xavier"].job_name == "job-1"


def test_an_unknown_target_is_refused_before_anything_starts(bundle, s3):
    client, bucket = s3
    sm, stub = sagemaker()
    with stub, pytest.raises(neo.NeoError) as err:
        neo.compile_with_neo(bundle, "jetson_orin", role_arn=ROLE, bucket=bucket, sagemaker=sm, s3=client)
    message = str(err.value)
    assert "unknown Neo target 'jetson_orin'" in message
    for valid in ("jetson_xavier", "jetson_nano", "rasp4b", "linux", "android", "arm64", "x86_64", "nvidia"):
        assert valid in message
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # nothing uploaded


@pytest.mark.parametrize("text, config", [
    ("jetson_nano", {"TargetDevice": "jetson_nano"}),
    ("ml_c5", {"TargetDevice": "ml_c5"}),
    ("linux_x86_64", {"TargetPlatform": {"Os": "LINUX", "Arch": "X86_64"}}),
    ("linux_arm64_nvidia", {"TargetPlatform": {"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"}}),
    ("android_arm_eabihf_mali", {"TargetPlatform": {"Os": "ANDROID", "Arch": "ARM_EABIHF", "Accelerator": "MALI"}}),
    ("linux_x86_64_intel_graphics",
     {"TargetPlatform": {"Os": "LINUX", "Arch": "X86_64", "Accelerator": "INTEL_GRAPHICS"}}),
])
def test_targets_parse_to_the_apis_output_config(text, config):
    target = neo.parse_target(text)
    assert target.output_config() == config and target.name == text


@pytest.mark.parametrize("text", ["linux", "linux_", "linux_arm64_", "linux_arm64_tpu", "windows_x86_64", "nvidia",
                                  "jetson-xavier", ""])
def test_malformed_targets_are_refused(text):
    with pytest.raises(neo.NeoError, match="unknown Neo target"):
        neo.parse_target(text)


def test_the_target_names_come_from_botocores_service_model(monkeypatch):
    """A device botocore adds is accepted without a change here; one it does not list is not."""
    names = dict(neo.target_names())
    assert "jetson_xavier" in names["TargetDevice"] and "NVIDIA" in names["TargetPlatformAccelerator"]
    monkeypatch.setattr(neo, "target_names", lambda: {**names, "TargetDevice": ("jetson_orin",)})
    assert neo.parse_target("jetson_orin").device == "jetson_orin"
    with pytest.raises(neo.NeoError, match=r"a device \(jetson_orin\)"):
        neo.parse_target("jetson_xavier")


def test_an_nvidia_platform_needs_its_compiler_options(bundle, s3):
    client, bucket = s3
    sm, stub = sagemaker()
    with stub, pytest.raises(neo.NeoError, match="gpu-code, trt-ver, cuda-ver"):
        neo.compile_with_neo(bundle, "linux_arm64_nvidia", role_arn=ROLE, bucket=bucket, sagemaker=sm, s3=client,
                             compiler_options={"gpu-code": "sm_72"})
    request = neo.compilation_job_request(
        "j", neo.parse_target("linux_arm64_nvidia"), ROLE, "s3://b/in/model.tar.gz", "s3://b/out", {"X": [1, 6]},
        compiler_options={"gpu-code": "sm_72", "trt-ver": "8.4.1", "cuda-ver": "11.4"})
    assert json.loads(request["OutputConfig"]["CompilerOptions"]) == {"gpu-code": "sm_72", "trt-ver": "8.4.1",
                                                                      "cuda-ver": "11.4"}
    stub.add_response("create_compilation_job", {"CompilationJobArn": arn("j")}, request)
    with stub:  # the Stubber validates the request against the service model
        sm.create_compilation_job(**request)


def test_a_job_past_its_timeout_is_stopped(bundle, s3, monkeypatch):
    client, bucket = s3
    clock = [0.0]
    monkeypatch.setattr(sagemaker_jobs, "_now", lambda: clock[0])
    monkeypatch.setattr(sagemaker_jobs, "_sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    sm, stub = sagemaker()
    before = tree(bundle)
    expect_job(stub, bucket, bundle, "slow", {"TargetDevice": "jetson_nano"}, ["INPROGRESS"] * 4)  # 0, 10, 20, 30 s
    stub.add_response("stop_compilation_job", {}, {"CompilationJobName": "slow"})
    with stub, pytest.raises(neo.NeoError, match="slow still INPROGRESS after 30 s: stopped it"):
        neo.compile_with_neo(bundle, "jetson_nano", role_arn=ROLE, bucket=bucket, sagemaker=sm, s3=client,
                             poll_s=10, timeout_s=30, job_name="slow")
    stub.assert_no_pending_responses()
    assert tree(bundle) == before


def test_an_archive_escaping_its_folder_is_refused(bundle, s3, tmp_path):
    client, bucket = s3
    sm, stub = sagemaker()
    before = tree(bundle)
    expect_job(stub, bucket, bundle, "evil", {"TargetDevice": "jetson_xavier"}, ["COMPLETED"])
    fake = SimulatedNeo(sm, client, [archive({**OUTPUT, "../../escaped.so": b"x"})])
    with stub, pytest.raises(neo.NeoError, match=r"entry outside its folder: '\./\.\./\.\./escaped\.so'"):
        neo.compile_with_neo(bundle, "jetson_xavier", role_arn=ROLE, bucket=bucket, sagemaker=fake, s3=client,
                             poll_s=0, job_name="evil")
    assert tree(bundle) == before and not list(tmp_path.rglob("escaped.so"))


def test_only_a_valid_target_names_a_folder(bundle, tmp_path):
    before = tree(bundle)
    (tmp_path / "out.tar.gz").write_bytes(archive(OUTPUT))
    with pytest.raises(neo.NeoError, match="unknown Neo target '../../x'"):
        neo.add_neo_output(bundle, "../../x", tmp_path / "out.tar.gz", "job")
    assert tree(bundle) == before and not (tmp_path / "x").exists()


@pytest.mark.parametrize("make, match", [
    (lambda: archive({"a/../../up.so": b"x"}, prefix=""), "outside its folder"),
    (lambda: archive({"/abs.so": b"x"}, prefix=""), "outside its folder"),
    (lambda: archive({"ok.so": b"x"}, links={"link.so": "/etc/passwd"}), "not a regular file: 'link.so'"),
    (lambda: archive({}), "holds no files"),
    (lambda: b"not a tar", "not a readable tar archive"),
])
def test_unsafe_or_empty_archives_are_refused(tmp_path, make, match):
    (tmp_path / "a.tar.gz").write_bytes(make())
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(sagemaker_jobs.ArchiveError, match=match):
        sagemaker_jobs.unpack_archive(tmp_path / "a.tar.gz", dest, "Neo's output")
    assert not (tmp_path / "up.so").exists() and not (tmp_path / "out" / "up.so").exists()


def test_the_input_is_the_manifests_with_the_batch_fixed(bundle):
    m = load_bundle(bundle).manifest
    assert neo.data_input_config(m, 4) == {m.input.name: [4, len(m.input.features)]}
    free = m.model_copy(update={"input": m.input.model_copy(update={"shape": [None, None]})})
    with pytest.raises(neo.NeoError, match="every dimension but the batch fixed"):
        neo.data_input_config(free)
    first = neo.model_archive(bundle / "model.onnx")
    assert first == neo.model_archive(bundle / "model.onnx")  # the same model, the same bytes
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        assert tar.getnames() == ["model.onnx"]


def test_job_names_follow_sagemakers_rule():
    import re

    for text in ("jetson_xavier", "android_arm_eabihf_intel_graphics"):
        name = neo.default_job_name(neo.parse_target(text))
        assert len(name) <= 63 and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name)


def test_the_cli_says_what_neo_needs(bundle, capsys):
    from cloud.cli import main

    assert main(["compile", "--out", str(bundle)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["compile", "--out", str(bundle), "--neo", "--target", "jetson_xavier"]) == 2
    assert "--neo needs --target, --role and --bucket" in capsys.readouterr().err
    assert main(["compile", "--out", str(bundle), "--neo", "--target", "jetson_xavier", "--role", "arn:r",
                 "--bucket", "b", "--compiler-options", "{bad"]) == 2
    assert "--compiler-options is not JSON" in capsys.readouterr().err
