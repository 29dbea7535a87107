"""The fleet review on SageMaker Processing: plans and partials through JSON, the driver against moto
S3 and a stubbed SageMaker client, the job's entry point run as two simulated instances. The result
must be the one ``fleet_drift`` gives on the same store, to the last digit."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path
from unittest import mock

import boto3
import numpy as np
import pytest
from botocore.stub import ANY, Stubber
from test_drift import BASE, T0, Fleet, window

from cloud import drift, drift_io
from cloud import drift_sagemaker as dsm
from cloud import drift_stats as st
from cloud.drift import SCORE_ROW, DeviceDrift, Thresholds, fleet_drift, to_json
from cloud.train import quantile_edges
from edge_runtime.contracts import baseline_key, summary_key
from edge_runtime.store import LocalStore, open_store
from model_compile import sagemaker_jobs

ROLE = "arn:aws:iam::123456789012:role/edgeloop-drift"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/edgeloop-drift:py311"
SPAN = {"since": T0, "until": T0 + timedelta(hours=4)}
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def report_json(reports) -> str:
    return json.dumps(to_json(reports, Thresholds()))


# --- plans and partials as JSON ------------------------------------------------------------------


@pytest.mark.parametrize("on_grid", [False, True], ids=["sketches", "grid"])
def test_a_real_reviews_plan_and_parts_round_trip_to_the_same_report(tmp_path, monkeypatch, on_grid):
    monkeypatch.setattr(drift, "SHARE_SUMMARIES", 7)  # several shares
    g = np.full(50_000, np.nan)  # a sensor dead fleet-wide: empty profiles, infinite min and max
    fleet = Fleet(tmp_path, {"f": BASE, "g": g, SCORE_ROW: np.abs(BASE)}, fpr=0.01,
                  edges={"f": quantile_edges(BASE), "g": quantile_edges(BASE)}, on_grid=on_grid)
    rng = np.random.default_rng(30)
    for i in range(8):
        for h in range(1 if i == 5 else 4):  # d05: less than a cycle
            fleet.add(f"d{i:02d}", {"f": rng.normal(0.5 if i == 2 else 0, 1, 300), "g": np.full(300, np.nan)},
                      T0 + timedelta(hours=h), outliers=3 + 20 * (i == 4), rejected=40 * (i == 6))
    store, t = fleet.store, Thresholds()
    (devices,) = drift.list_summaries(store).values()
    plan = drift._plan(store, "m", "1.0.0", fleet.baseline, devices, t, None, None, None, 7200)
    chosen = [(d, sorted(k for s, k in keys if plan.since <= s < plan.until)) for d, keys in sorted(devices.items())]
    parts = [drift.review_devices(store, plan, share, 2) for share in drift._shares(chosen)]
    assert len(parts) > 2 and sum(p.fleet.on_grid for p in parts) == (29 if on_grid else 0)

    plan_doc, part_docs = drift_io.plan_to_json(plan), [drift_io.partial_to_json(p) for p in parts]
    plan2 = drift_io.plan_from_json(drift_io.loads(drift_io.dumps(plan_doc)))  # strict JSON, as in S3
    parts2 = [drift_io.partial_from_json(drift_io.loads(drift_io.dumps(d))) for d in part_docs]
    assert drift_io.plan_to_json(plan2) == plan_doc and [drift_io.partial_to_json(p) for p in parts2] == part_docs
    assert plan2.cycle == timedelta(hours=2) and plan2.since == plan.since and plan2.thresholds == t
    assert all(np.array_equal(plan2.base[n].grid, p.grid) for n, p in plan.base.items())
    assert parts2[0].fleet.buckets[0]["g"].min == np.inf and '{"$float":"inf"}' in drift_io.dumps(part_docs[0]).decode()
    assert isinstance(next(iter(parts2[0].hours.values()))["sums"], np.ndarray)

    def judged(p, ps):
        report, warnings = drift._combine(p, ps, 7200)
        report.expected_outlier_rate = drift.expected_outlier_rate(store, "m", "1.0.0")
        drift._judge(report, p.thresholds)
        return report, warnings

    here, there = judged(plan, parts), judged(plan2, parts2)
    assert report_json([here[0]]) == report_json([there[0]]) and here[1] == there[1]
    direct, _ = fleet_drift(store, last=None, cycle_s=7200)
    assert report_json(direct) == report_json([there[0]])
    verdicts = {d.device_id: d.verdict for d in there[0].devices}
    assert verdicts["d02"] == "drift" and verdicts["d05"] == "short"


def test_tagged_values_and_unknown_formats():
    d = DeviceDrift("d", 1, 10, 0, 0, 0.0, T0, T0 + timedelta(hours=1), health={"at": T0, "lag": float("nan")})
    back = drift_io.device_from_json(json.loads(json.dumps(drift_io.device_to_json(d), allow_nan=False)))
    assert back.health["at"] == T0 and np.isnan(back.health["lag"]) and back.first == T0
    empty = drift_io.profile_from_json(drift_io.profile_to_json(st.Profile(np.array([0.0, 1.0]))))
    assert (empty.min, empty.max, empty.count) == (np.inf, -np.inf, 0)
    with pytest.raises(ValueError, match="edgeloop.drift.partial/2"):
        drift_io.partial_from_json({"format": "edgeloop.drift.partial/1"})  # before the hourly series were lists
    with pytest.raises(ValueError, match="edgeloop.drift.plan/1"):
        drift_io.plan_from_json({"model": "m"})


# --- the driver and the job ----------------------------------------------------------------------


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"edgeloop-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture
def fleet_url(tmp_path, s3, moto_endpoint, monkeypatch) -> str:
    """Two model versions with baselines (one with drift and a summary under another device's key),
    one without a baseline, one with nothing in the range the tests review (``SPAN``): built like
    test_drift's fleets, then put in S3."""
    monkeypatch.setattr(drift, "SHARE_SUMMARIES", 10)  # several shares per model version
    fleet = Fleet(tmp_path / "local", fpr=0.01, on_grid=True)  # m: counted on its grids; m2, m4: JSON
    rng = np.random.default_rng(40)
    for i in range(12):
        for h in range(4):
            fleet.add(f"d{i:02d}", rng.normal(0.7 if i == 3 else 0, 1, 400), T0 + timedelta(hours=h), outliers=4)
    forged = window("d00", {"f": rng.normal(3, 1, 400)}, T0)
    fleet.store.put(summary_key("m", "1.0.0", "d99", T0), forged.model_dump_json().encode())
    base2 = rng.normal(10, 2, 20_000)
    edges2 = {"f": quantile_edges(base2)}
    b2 = window("training", {"f": base2, SCORE_ROW: np.abs(BASE[:20_000])}, T0, edges=edges2, model="m2")
    fleet.store.put(baseline_key("m2", "1.0.0"), b2.model_dump_json().encode())
    b4 = window("training", {"f": base2, SCORE_ROW: np.abs(BASE[:20_000])}, T0, edges=edges2, model="m4")
    fleet.store.put(baseline_key("m4", "1.0.0"), b4.model_dump_json().encode())
    for model, n, start in (("m2", 4, T0), ("m3", 1, T0), ("m4", 1, T0 + timedelta(days=2))):
        for i in range(n):
            for h in range(4):
                w = window(f"e{i}", {"f": rng.normal(10, 2, 300)}, start + timedelta(hours=h), edges=edges2,
                           model=model)
                fleet.store.put(summary_key(model, "1.0.0", f"e{i}", w.window_start, instance="i0"),
                                w.model_dump_json().encode())
    client, bucket = s3
    url = f"s3://{bucket}/fleet"
    remote = open_store(url, moto_endpoint)
    for key in fleet.store.list():
        remote.put(key, fleet.store.get(key))
    return url


class Session:
    """What the driver needs of a boto3 session."""

    region_name = "us-east-1"

    def __init__(self, **clients) -> None:
        self.clients = clients

    def client(self, name: str):
        return self.clients[name]


class SimulatedSageMaker:
    """The stubbed sagemaker client; at the first describe, ``job`` plays SageMaker's side of the
    job just created (``job(request)``)."""

    def __init__(self, client, job=None) -> None:
        self.client, self.job, self.request = client, job, None

    def create_processing_job(self, **params):
        self.request = params
        return self.client.create_processing_job(**params)

    def describe_processing_job(self, **params):
        if self.job is not None:
            job, self.job = self.job, None
            job(self.request)
        return self.client.describe_processing_job(**params)

    def __getattr__(self, name):
        return getattr(self.client, name)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


def play_job(request: dict, s3, root: Path, instances: int = 2, subprocess_instance: int | None = 1,
             drop: tuple[str, ...] = ()) -> None:
    """SageMaker Processing, simulated: each instance gets its inputs under its own /opt/ml/processing
    (ShardedByS3Key: every ``instances``-th share file; FullyReplicated: all), runs the entry point
    with the job's environment, and its output directory is uploaded to the output prefix. One
    instance runs ``python3 -m cloud.drift_sagemaker`` in a new process, importing the code zip."""
    for n in range(instances):
        home = root / f"instance-{n}"
        for item in request["ProcessingInputs"]:
            spec = item["S3Input"]
            bucket, prefix = _split(spec["S3Uri"])
            keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))
            if spec["S3DataDistributionType"] == "ShardedByS3Key":
                keys = keys[n::instances]
            local = home / Path(spec["LocalPath"]).relative_to(dsm.PROCESSING)
            for key in keys:
                (local / key[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
                (local / key[len(prefix):]).write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        env = {**request["Environment"], dsm.ENV_INPUT_DIR: str(home / "input"),
               dsm.ENV_OUTPUT_DIR: str(home / "output"), dsm.ENV_MESSAGE_FILE: str(home / "message"),
               "PYTHONPATH": request["Environment"]["PYTHONPATH"].replace(dsm.PROCESSING, str(home))}
        if n == subprocess_instance:
            command = [sys.executable, *request["AppSpecification"]["ContainerEntrypoint"][1:]]
            where = subprocess.run([sys.executable, "-c", "import cloud.drift_sagemaker as m; print(m.__file__)"],
                                   env={**os.environ, **env}, cwd=home, capture_output=True, text=True, check=True)
            assert "edgeloop-code.zip" in where.stdout  # the job's code is the zip's, not this checkout's
            done = subprocess.run(command, env={**os.environ, **env}, cwd=home, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        else:
            with mock.patch.dict(os.environ, env):
                assert dsm.main() == 0
        bucket, prefix = _split(request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"])
        for path in sorted((home / "output").glob("*")):
            if path.name not in drop:
                s3.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())


def described(job: str, status: str, **extra) -> dict:
    return {"ProcessingJobName": job, "ProcessingJobStatus": status, "CreationTime": T0,
            "ProcessingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:processing-job/{job}",
            "AppSpecification": {"ImageUri": IMAGE},
            "ProcessingResources": {"ClusterConfig": {"InstanceCount": 2, "InstanceType": "ml.m5.xlarge",
                                                      "VolumeSizeInGB": 30}}, **extra}


def sagemaker_client():
    return boto3.client("sagemaker", region_name="us-east-1")


def test_the_review_on_sagemaker_matches_fleet_drift(fleet_url, s3, moto_endpoint, tmp_path):
    client, bucket = s3
    expected, expected_warnings = fleet_drift(open_store(fleet_url, moto_endpoint), **SPAN, workers=2)
    job = "edgeloop-drift-test-1"
    base = f"s3://{bucket}/work/{job}"
    sm = sagemaker_client()
    stub = Stubber(sm)

    def s3_input(name, sub, local, distribution):
        return {"InputName": name, "S3Input": {"S3Uri": f"{base}/{sub}/", "LocalPath": local, "S3DataType": "S3Prefix",
                                               "S3InputMode": "File", "S3DataDistributionType": distribution,
                                               "S3CompressionType": "None"}}

    stub.add_response("create_processing_job", {"ProcessingJobArn": described(job, "")["ProcessingJobArn"]}, {
        "ProcessingJobName": job,
        "RoleArn": ROLE,
        "AppSpecification": {"ImageUri": IMAGE, "ContainerEntrypoint": ["python3", "-m", "cloud.drift_sagemaker"]},
        "Environment": {"EDGELOOP_STORE_URL": fleet_url, "EDGELOOP_WORKERS": "2",
                        "PYTHONPATH": "/opt/ml/processing/code/edgeloop-code.zip",
                        "EDGELOOP_STORE_ENDPOINT": moto_endpoint, "AWS_DEFAULT_REGION": "us-east-1"},
        "ProcessingInputs": [
            s3_input("shares", "input/shares", "/opt/ml/processing/input/shares", "ShardedByS3Key"),
            s3_input("plans", "input/plans", "/opt/ml/processing/input/plans", "FullyReplicated"),
            s3_input("code", "code", "/opt/ml/processing/code", "FullyReplicated"),
        ],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "partials", "S3Output": {
            "S3Uri": f"{base}/output/", "LocalPath": "/opt/ml/processing/output", "S3UploadMode": "EndOfJob"}}]},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 2, "InstanceType": "ml.m5.xlarge",
                                                  "VolumeSizeInGB": 30}},
        "StoppingCondition": {"MaxRuntimeInSeconds": 900},
        "NetworkConfig": {"EnableNetworkIsolation": False, "EnableInterContainerTrafficEncryption": True},
    })
    for status in ("InProgress", "InProgress", "Completed"):
        stub.add_response("describe_processing_job", described(job, status), {"ProcessingJobName": job})
    fake = SimulatedSageMaker(sm, lambda request: play_job(request, client, tmp_path / "job"))
    seen = []
    with stub:
        reports, warnings = dsm.review_on_sagemaker(
            fleet_url, ROLE, IMAGE, "ml.m5.xlarge", 2, f"s3://{bucket}/work/", Session(s3=client, sagemaker=fake),
            endpoint_url=moto_endpoint, **SPAN, workers=2, poll_s=0, timeout_s=900, job_name=job,
            progress=lambda *a: seen.append(a))
        stub.assert_no_pending_responses()
    assert report_json(reports) == report_json(expected)
    assert warnings == expected_warnings and len(warnings) == 3  # d99's key names d00; no baseline; m4 not in range
    assert [r.model_name for r in reports] == ["m", "m2"] and reports[0].drifted_devices == ["d03"]
    assert [(name, status) for name, status, _ in seen] == [(job, "InProgress")] * 2 + [(job, "Completed")]
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"work/{job}/")["Contents"]]
    shares = sorted(k for k in listed if "/input/shares/" in k)
    assert len(shares) == 7 and len([k for k in listed if "/output/partial-" in k]) == 7  # 5 for m, 2 for m2
    assert len([k for k in listed if "/input/plans/" in k]) == 2
    for n in (0, 1):  # each instance reviewed its own half
        got = sorted(p.name for p in (tmp_path / "job" / f"instance-{n}" / "output").glob("partial-*.json"))
        assert got == [f"partial-{i:05d}.json" for i in range(n, 7, 2)]


def test_a_failed_job_raises_with_its_reason(fleet_url, s3, moto_endpoint):
    client, bucket = s3
    sm = sagemaker_client()
    stub = Stubber(sm)
    stub.add_response("create_processing_job", {"ProcessingJobArn": described("x", "")["ProcessingJobArn"]}, None)
    stub.add_response("describe_processing_job", described("x", "InProgress"), {"ProcessingJobName": ANY})
    stub.add_response("describe_processing_job", described(
        "x", "Failed", FailureReason="AlgorithmError: see job logs. exit code: 1",
        ExitMessage="StoreError: s3://fleet: AccessDenied"), {"ProcessingJobName": ANY})
    fake = SimulatedSageMaker(sm)
    with stub, pytest.raises(dsm.SageMakerJobError, match=r"failed: AlgorithmError: see job logs\. exit code: 1; "
                                                          r"the container said: StoreError: s3://fleet: AccessDenied"):
        dsm.review_on_sagemaker(fleet_url, ROLE, IMAGE, "ml.m5.xlarge", 1, f"s3://{bucket}/work",
                                Session(s3=client, sagemaker=fake), endpoint_url=moto_endpoint, **SPAN, poll_s=0)
    job = fake.request["ProcessingJobName"]
    assert re.fullmatch(r"edgeloop-drift-\d{8}-\d{6}-[0-9a-f]{6}", job)
    code = client.get_object(Bucket=bucket, Key=f"work/{job}/code/edgeloop-code.zip")["Body"].read()
    names = zipfile.ZipFile(io.BytesIO(code)).namelist()
    assert {"cloud/drift_sagemaker.py", "cloud/drift_io.py", "edge_runtime/store.py"} <= set(names)
    assert not any("__pycache__" in n for n in names) and code == dsm.code_zip()  # the same code, the same bytes


def test_a_job_past_its_timeout_is_stopped(fleet_url, s3, moto_endpoint, monkeypatch):
    client, bucket = s3
    clock = [0.0]
    monkeypatch.setattr(sagemaker_jobs, "_now", lambda: clock[0])
    monkeypatch.setattr(sagemaker_jobs, "_sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    job = "edgeloop-drift-slow"
    sm = sagemaker_client()
    stub = Stubber(sm)
    stub.add_response("create_processing_job", {"ProcessingJobArn": described(job, "")["ProcessingJobArn"]}, None)
    for _ in range(4):  # at 0, 10, 20 and 30 s
        stub.add_response("describe_processing_job", described(job, "InProgress"), {"ProcessingJobName": job})
    stub.add_response("stop_processing_job", {}, {"ProcessingJobName": job})
    with stub, pytest.raises(dsm.SageMakerJobError, match="still InProgress after 30 s: stopped it"):
        dsm.review_on_sagemaker(fleet_url, ROLE, IMAGE, "ml.m5.xlarge", 2, f"s3://{bucket}/work",
                                Session(s3=client, sagemaker=sm), endpoint_url=moto_endpoint, **SPAN,
                                poll_s=10, timeout_s=30, job_name=job)
    stub.assert_no_pending_responses()


def test_a_share_without_a_result_is_refused_and_named(fleet_url, s3, moto_endpoint, tmp_path):
    client, bucket = s3
    job = "edgeloop-drift-lossy"
    sm = sagemaker_client()
    stub = Stubber(sm)
    stub.add_response("create_processing_job", {"ProcessingJobArn": described(job, "")["ProcessingJobArn"]}, None)
    stub.add_response("describe_processing_job", described(job, "Completed"), {"ProcessingJobName": job})
    fake = SimulatedSageMaker(sm, lambda request: play_job(request, client, tmp_path / "job", subprocess_instance=None,
                                                           drop=("partial-00002.json",)))
    with stub, pytest.raises(dsm.SageMakerJobError) as err:
        dsm.review_on_sagemaker(fleet_url, ROLE, IMAGE, "ml.m5.xlarge", 2, f"s3://{bucket}/work",
                                Session(s3=client, sagemaker=fake), endpoint_url=moto_endpoint, **SPAN,
                                poll_s=0, job_name=job)
    assert "without a result for 1 of 7 shares: share-00002 (3 devices, d06 .. d08)" in str(err.value)
    assert f"s3://{bucket}/work/{job}/output/" in str(err.value)


def test_a_store_the_job_cannot_reach_is_refused(tmp_path):
    with pytest.raises(ValueError, match="store .*: a SageMaker job needs s3://bucket/prefix"):
        dsm.review_on_sagemaker(str(tmp_path), ROLE, IMAGE, "ml.m5.xlarge", 1, "s3://b/work", Session())


def test_the_entry_point_reports_why_it_failed(tmp_path, monkeypatch):
    """A share that names a plan the instance was not given: exit 1, the reason in ExitMessage."""
    shares = tmp_path / "input" / "shares"
    shares.mkdir(parents=True)
    doc = {"format": dsm.SHARE_FORMAT, "share": 0, "plan": "plan-0007", "devices": [["d", ["k"]]]}
    (shares / "share-00000.json").write_text(json.dumps(doc))
    LocalStore(tmp_path / "store")
    for k, v in {dsm.ENV_STORE_URL: str(tmp_path / "store"), dsm.ENV_INPUT_DIR: str(tmp_path / "input"),
                 dsm.ENV_OUTPUT_DIR: str(tmp_path / "output"), dsm.ENV_MESSAGE_FILE: str(tmp_path / "message")}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FileNotFoundError):
        dsm.main()
    assert "share-00000.json needs plan-0007" in (tmp_path / "message").read_text()
