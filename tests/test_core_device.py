"""The built components on a (simulated) core device: published to S3, deployed, installed, run.

Everything a nucleus does with our recipes happens here (``core_device.CoreDevice``): artifacts
fetched from their S3 URIs (moto in server mode), ZIPs unarchived into
``{artifacts:decompressedPath}/<zip name>/`` and made read-only, recipe variables interpolated,
Install then Run as an unprivileged user, Install with no network at all. The runtime then talks
to our nucleus double over the real IPC client, with the recipe's access control enforced, gets
S3 credentials from a token exchange service on loopback, scores the records published to it,
syncs windows to S3, and swaps to a new model version when a deployment changes its
configuration, without a restart.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY
from core_device import CoreDevice
from greengrass_stub import ACCOUNT, GreengrassStub, arn
from helpers import REPO, bundle_copy, normal_rows, record_line, wait_for
from nucleus import Nucleus

from cloud.components import build_model, build_runtime
from cloud.deploy import DeployRequest, deploy
from cloud.publish import publish
from cloud.wheels import read_lock

RUNTIME = "com.edgeloop.EdgeRuntime"
MODEL = "com.edgeloop.model.sensor-outliers"
THING = "plant7-line2"
LOCK_PYTHON = read_lock(REPO / "components" / "runtime" / "requirements.lock")[1].get("python")
DEVICE_PYTHON = subprocess.run(["sh", "-c", "PATH=/usr/local/bin:/usr/bin:/bin python3 -c "
                                "'import sys; print(\"%d.%d\" % sys.version_info[:2])'"],
                               capture_output=True, text=True).stdout.strip()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs components as another user, as the nucleus does (root only)"),
    pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)"),
    pytest.mark.skipif(DEVICE_PYTHON != LOCK_PYTHON,
                       reason=f"the device's python3 is {DEVICE_PYTHON}; the lock is for {LOCK_PYTHON}"),
]


class TokenExchange(ThreadingHTTPServer):
    """The nucleus's token exchange service: credentials for a component holding the token."""

    token = "tes-token"
    served = 0

    def __init__(self) -> None:
        tes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.headers.get("Authorization") != tes.token:
                    self.send_response(403)
                    self.end_headers()
                    return
                tes.served += 1
                body = json.dumps({"AccessKeyId": "ASIATES", "SecretAccessKey": "tes-secret", "Token": "tes-session",
                                   "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://127.0.0.1:{self.server_port}/2016-11-01/credentialprovider/",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": self.token}


@pytest.fixture(scope="module")
def build(tmp_path_factory, bundle_dir):
    """greengrass-build/ with the runtime for this machine and model 1.0.0; model 1.0.1 built apart."""
    work = tmp_path_factory.mktemp("gg")
    first, second = work / "greengrass-build", work / "greengrass-build-2"
    runtime = build_runtime(first, REPO, arches=[platform.machine()], python=LOCK_PYTHON, progress=lambda m: None)
    build_model(bundle_dir, first, runtime.name, REPO)
    build_model(bundle_copy(bundle_dir, work / "bundle-v2", "1.0.1"), second, runtime.name, REPO)
    return first, second


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """S3 on the moto server; Greengrass v2 and STS under the Stubber, checked at the end."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    gg = GreengrassStub()
    yield boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint), gg
    gg.gg_stub.assert_no_pending_responses()


def deployment_sent(gg: GreengrassStub, deployment_id: str) -> None:
    """A create_deployment answered; what was sent is checked in test_publish_deploy, kept here."""
    gg.expect("create_deployment", {"deploymentId": deployment_id, "iotJobId": "job-" + deployment_id},
              **{k: ANY for k in ("targetArn", "deploymentName", "components", "deploymentPolicies",
                                  "iotJobConfiguration")})


def summaries(s3, bucket: str, version: str) -> list[str]:
    prefix = f"fleet/summaries/model=sensor-outliers/version={version}/device={THING}/"
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


@pytest.fixture
def device_root():
    """The device's Greengrass root, where an unprivileged user can reach it (pytest's tmp is root's only)."""
    top = Path(tempfile.mkdtemp(prefix="edgeloop-core-"))
    os.chmod(top, 0o755)
    yield top / "greengrass" / "v2"
    shutil.rmtree(top, ignore_errors=True)


def test_published_components_install_and_run_on_a_core_device(build, aws, moto_endpoint, device_root, tmp_path):
    s3, gg = aws
    first, second = build
    session = gg.session(s3, accounts=2)  # publish, then deploy
    # publish: the runtime's NEXT_PATCH becomes 1.0.0; the model is new
    gg.versions(RUNTIME, [[]])
    gg.missing("describe_component", arn=arn(RUNTIME, "1.0.0"))
    gg.missing("describe_component", arn=arn(MODEL, "1.0.0"))
    gg.created(RUNTIME, "1.0.0")
    gg.created(MODEL, "1.0.0")
    published = publish(first, root=REPO, region="us-east-1", session=session, wait_s=5, progress=lambda m: None,
                        unapproved=True)
    assert [(p.name, p.version) for p in published] == [(RUNTIME, "1.0.0"), (MODEL, "1.0.0")]
    # deploy model 1.0.0 with the latest runtime to a thing group
    gg.versions(RUNTIME, [["1.0.0"]])
    gg.described(RUNTIME, "1.0.0")
    gg.described(MODEL, "1.0.0")
    deployment_sent(gg, "d-1")
    bucket = f"edgeloop-components-us-east-1-{ACCOUNT}"
    store = f"edgeloop-fleet-{os.getpid()}"
    s3.create_bucket(Bucket=store)
    deploy(DeployRequest("line2", "sensor-outliers", "1.0.0", store_url=f"s3://{store}/fleet",
                         endpoint_url=moto_endpoint), session)
    assert all(uri.startswith(f"s3://{bucket}/") for p in published for uri in p.uris)

    device = CoreDevice(device_root, THING, s3)
    device.deploy(gg.sent_recipes(), gg.deployments[0])
    runtime = device.components[RUNTIME]
    bundle = device.decompressed(device.components[MODEL]) / "bundle"
    assert (bundle / "manifest.json").is_file() and (bundle / "model.onnx").is_file()

    # Install: offline, as the component's user (who cannot write the root-owned artifacts), into
    # {work:path}; then again, as at every start
    done = device.install(RUNTIME)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (device.work(runtime) / "venv" / "bin" / "python").exists()
    again = device.install(RUNTIME)
    assert again.returncode == 0 and "already installed" in again.stdout, again.stdout + again.stderr

    # Run: the nucleus double serves IPC with the recipe's access control; TES serves credentials
    sock_dir = Path(tempfile.mkdtemp(prefix="gg-"))
    os.chmod(sock_dir, 0o755)
    tes = TokenExchange()
    nucleus = Nucleus(sock_dir / "ipc.socket", configuration=runtime.configuration, component=RUNTIME).start()
    os.chmod(nucleus.socket_path, 0o777)
    nucleus.access_control = runtime.configuration["accessControl"]
    device.env = {**nucleus.env(), **tes.env()}
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = device.start(RUNTIME, stdout=log)

    def alive(predicate):
        def check():
            if proc.poll() is not None:
                raise AssertionError(f"the runtime exited {proc.returncode}:\n"
                                     + (tmp_path / "run.log").read_text(errors="replace")[-3000:])
            return predicate()
        return check

    try:
        topic = f"edgeloop/{THING}/records"
        wait_for(alive(lambda: nucleus.subscribed("local", topic)), timeout=60)
        start = 1_700_000_000.0
        for i, row in enumerate(normal_rows(150, seed=4)):  # 2.5 hours of event time: windows close
            assert nucleus.deliver_local(topic, record_line(row, ts=start + 60 * i).encode()) == 1
        wait_for(alive(lambda: summaries(s3, store, "1.0.0")), timeout=60)
        assert tes.served >= 1  # S3 credentials came from the token exchange service
        assert "RUNNING" in nucleus.states and not nucleus.denied

        # a new model version: a deployment that changes the runtime's configuration only
        run_script = device.script(runtime, "Run")
        session = gg.session(s3, accounts=2)
        gg.missing("describe_component", arn=arn(MODEL, "1.0.1"))
        gg.created(MODEL, "1.0.1")
        publish(second, root=REPO, region="us-east-1", session=session, wait_s=5, progress=lambda m: None,
                unapproved=True)
        gg.versions(RUNTIME, [["1.0.0"]])
        gg.described(RUNTIME, "1.0.0")
        gg.described(MODEL, "1.0.1")
        deployment_sent(gg, "d-2")
        deploy(DeployRequest("line2", "sensor-outliers", "1.0.1"), session)
        device.deploy(gg.sent_recipes(), gg.deployments[1])
        assert device.script(device.components[RUNTIME], "Run") == run_script  # so the nucleus does not restart it
        nucleus.set_configuration(device.components[RUNTIME].configuration)
        time.sleep(3)  # the swap loads and checks the new bundle in the background
        later = start + 60 * 300
        for i, row in enumerate(normal_rows(150, seed=5)):
            nucleus.deliver_local(topic, record_line(row, ts=later + 60 * i).encode())
        wait_for(alive(lambda: summaries(s3, store, "1.0.1")), timeout=60)
        assert proc.poll() is None  # swapped live, never restarted
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        finally:
            log.close()
            nucleus.stop()
            tes.shutdown()
            shutil.rmtree(sock_dir, ignore_errors=True)
    output = (tmp_path / "run.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert not nucleus.denied, nucleus.denied
    assert "model swapped: sensor-outliers 1.0.0" in output and "-> sensor-outliers 1.0.1" in output


# --- the Install step on its own: flavours, a wrong interpreter, a failed install ------------

DEVICE_PY = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


@pytest.fixture(scope="module")
def artifact(build, tmp_path_factory) -> Path:
    """The runtime artifact unzipped (writable, so tests can change it), plus a stand-in GPU wheel."""
    first, _ = build
    (zipped,) = (first / "artifacts" / RUNTIME / "NEXT_PATCH").glob("*.zip")
    out = tmp_path_factory.mktemp("artifact") / zipped.stem
    shutil.unpack_archive(zipped, out)
    gpu_pin = read_lock(out / "requirements.lock")[0]["onnxruntime-gpu"].split("==")[1]
    fake_wheel(out / "wheels", "onnxruntime_gpu", gpu_pin, {"onnxruntime/__init__.py": b"__version__ = 'gpu'\n"})
    return out


def fake_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel: the GPU build is 300 MB and needs CUDA; the switch is what is tested."""
    import zipfile

    info = f"{dist}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]).encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def install(artifact: Path, venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(venv.parent)}
    return subprocess.run([DEVICE_PY, str(artifact / "install.py"), "--venv", str(venv), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def installed(venv: Path) -> set[str]:
    return {p.name.split("-")[0].lower() for p in venv.glob("lib/python*/site-packages/*.dist-info")}


def probe(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def test_switching_the_onnxruntime_flavour_removes_the_other(artifact, tmp_path):
    venv = tmp_path / "work" / "venv"
    assert install(artifact, venv, "--onnxruntime", "cpu").returncode == 0
    assert "onnxruntime" in installed(venv) and "onnxruntime_gpu" not in installed(venv)
    cpu_version = probe(venv)
    done = install(artifact, venv, "--onnxruntime", "gpu")
    assert done.returncode == 0, done.stderr
    assert "onnxruntime_gpu" in installed(venv) and "onnxruntime" not in installed(venv)
    assert probe(venv) == "gpu"  # the shared onnxruntime/ folder is the GPU package's, whole
    assert "no /dev/nvidia" in done.stderr or "cannot open" in done.stderr or not done.stderr
    assert install(artifact, venv, "--onnxruntime", "cpu").returncode == 0
    assert "onnxruntime_gpu" not in installed(venv) and probe(venv) == cpu_version
    assert not list(tmp_path.glob("work/venv.*"))  # no half-built or old environment left behind


def test_a_failed_install_leaves_the_serving_environment_alone(artifact, tmp_path):
    venv = tmp_path / "venv"
    assert install(artifact, venv).returncode == 0
    before = probe(venv)
    broken = tmp_path / "artifact"
    shutil.copytree(artifact, broken)
    for wheel in (broken / "wheels").glob("numpy-*.whl"):
        wheel.unlink()  # a new release whose install fails half-way
    done = install(broken, venv)
    assert done.returncode == 1 and "edgeloop install: error" in done.stderr and "numpy" in done.stderr
    assert probe(venv) == before and "already installed" in install(artifact, venv).stdout
    wrong = tmp_path / "artifact-py"
    shutil.copytree(artifact, wrong)
    build = json.loads((wrong / "build.json").read_text())
    (wrong / "build.json").write_text(json.dumps({**build, "python": "3.9"}))
    done = install(wrong, venv)
    assert done.returncode == 1 and "wheels are for CPython 3.9" in done.stderr
    assert "edgeloop component lock --python" in done.stderr and probe(venv) == before
    done = install(artifact, venv, "--onnxruntime", "tpu")
    assert done.returncode == 1 and "onnxruntime must be one of" in done.stderr
