"""Training that runs here and, unchanged, as a SageMaker training job, with its lineage.

The entry point runs under a simulated SageMaker environment (the SM_* variables and /opt/ml-like
folders in a temp dir, hyperparameters as the toolkit hands them over). The driver runs against moto
in server mode (S3, SageMaker, CloudWatch Logs, STS): moto's job is Completed at once, so the test
plays the job itself, as SageMaker's script mode would: it fetches the channel and the code from
S3, runs the launcher from the unpacked code in a new process, and puts model.tar.gz where moto
says the artefact is. botocore's Stubber gives the InProgress-then-Completed and Failed sequences.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from cloud import cli, synthetic, train_entry
from cloud import sagemaker_train as smt
from cloud.train import TrainResult, train
from edge_runtime.bundle import load_bundle, sha256_file
from model_compile.card import load_card
from model_compile.compile import compile_bundle
from model_compile.sagemaker_jobs import split_s3_uri

ROLE = "arn:aws:iam::123456789012:role/edgeloop-training"
REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's
DEFAULT_IMAGE = "683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn:1.4-2-cpu-py3"


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    return synthetic.write_training_csv(tmp_path_factory.mktemp("data") / "sensors.csv", rows=2000, seed=5)


def toolkit_hps(given: dict[str, str]) -> dict:
    """SM_HPS as the sagemaker-training toolkit makes it: SageMaker's own keys left out, every value
    that parses as JSON decoded ("2" -> 2, "1e3" -> 1000.0), the rest kept as text."""
    out = {}
    for key, value in given.items():
        if key.startswith("sagemaker_"):
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def opt_ml(root: Path, hyperparameters: dict[str, str], job: str = "job-1") -> tuple[dict[str, str], Path]:
    """An /opt/ml-like tree under ``root`` and the environment the toolkit gives the script."""
    ml = root / "opt" / "ml"
    for sub in ("input/data/train", "input/config", "model", "output/data", "code"):
        (ml / sub).mkdir(parents=True, exist_ok=True)
    (ml / "input/config/hyperparameters.json").write_text(json.dumps(hyperparameters))
    env = {
        "SM_MODEL_DIR": str(ml / "model"),
        "SM_CHANNEL_TRAIN": str(ml / "input/data/train"),
        "SM_HPS": json.dumps(toolkit_hps(hyperparameters)),
        "SM_INPUT_CONFIG_DIR": str(ml / "input/config"),
        "SM_OUTPUT_DIR": str(ml / "output"),
        "SM_OUTPUT_DATA_DIR": str(ml / "output/data"),
        "SM_CURRENT_INSTANCE_TYPE": "ml.m5.large",
        "TRAINING_JOB_NAME": job,
    }
    return env, ml


def metrics_in(text: str, model: str = "tabular") -> dict[str, float]:
    """What SageMaker would read from the log with the job's MetricDefinitions."""
    found = {}
    for d in train_entry.metric_definitions(model):
        m = re.search(d["Regex"], text)
        if m:
            found[d["Name"]] = float(m.group(1))
    return found


def model_tarball(model_dir: Path) -> bytes:
    """model.tar.gz as SageMaker makes it from SM_MODEL_DIR: the files at the top."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return out.getvalue()


# --- the entry point ------------------------------------------------------------------------------


def test_the_entry_point_trains_in_a_simulated_sagemaker_job(tmp_path, data_csv, capsys):
    given = {"fpr": "0.02", "components": "2", "name": "1e3", "version": "2.0.1", "missing": "impute",
             "sagemaker_program": "edgeloop_train.py", "sagemaker_submit_directory": "s3://b/code.tar.gz"}
    env, ml = opt_ml(tmp_path, given)
    data = ml / "input/data/train/part/sensors.csv"
    data.parent.mkdir()
    data.write_bytes(data_csv.read_bytes())
    argv = ["--components", "2", "--fpr", "0.02"]  # the toolkit passes them here too: ignored

    assert train_entry.main(argv, env=env) == 0
    out = capsys.readouterr().out
    assert {"baseline.json", "model.onnx", "samples.npy", "training.json"} <= {p.name for p in (ml / "model").iterdir()}
    assert not (ml / "output/failure").exists()
    card = load_card(ml / "model")
    assert card.name == "1e3"  # hyperparameters.json's text, not SM_HPS's 1000.0
    assert card.version == "2.0.1" and card.outlier.target_false_positive_rate == 0.02
    lineage = card.lineage
    assert lineage["source"] == "sagemaker"
    assert lineage["training_job"] == {"name": "job-1", "instance_type": "ml.m5.large"}
    assert lineage["data"] == {"path": str(data), "sha256": sha256_file(data_csv), "bytes": data_csv.stat().st_size,
                               "rows": 2000}
    assert lineage["hyperparameters"] == {"model": "tabular", "name": "1e3", "version": "2.0.1", "features": None,
                                          "fpr": 0.02, "components": 2, "holdout": 0.2, "seed": 0,
                                          "missing": "impute"}
    # every metric printed so that the job's MetricDefinitions find it, with the card's values
    seen = metrics_in(out)
    assert set(seen) == set(lineage["metrics"]) == {"holdout_fpr", "threshold", "train_rows", "calibration_rows",
                                                     "rows_dropped"}
    assert seen["threshold"] == pytest.approx(card.outlier.threshold, rel=1e-7)
    assert seen["train_rows"] == card.train_rows == 1600
    assert abs(seen["holdout_fpr"] - 0.02) < 0.01

    bundle = tmp_path / "bundle"
    compile_bundle(ml / "model", bundle)
    assert load_bundle(bundle).manifest.lineage == lineage


@pytest.mark.parametrize("given, reason", [
    ({"fpr": "lots"}, "hyperparameter fpr='lots': expected a number"),
    ({"fpr": "0.7"}, "hyperparameter fpr='0.7': must be in (0, 0.5)"),
    ({"components": "2.5"}, "hyperparameter components='2.5': expected an integer"),
    ({"componnets": "3"}, "unknown hyperparameter(s) ['componnets'] for model 'tabular'; it takes ['components',"),
    ({"model": "forest"}, "hyperparameter model='forest': choose one of ['stream', 'tabular']"),
    ({"version": "1.2"}, "hyperparameter version='1.2': the bundle manifest needs"),
])
def test_a_bad_hyperparameter_fails_the_job_with_its_reason(tmp_path, data_csv, given, reason, capsys):
    env, ml = opt_ml(tmp_path, given)
    (ml / "input/data/train/sensors.csv").write_bytes(data_csv.read_bytes())
    assert train_entry.main([], env=env) == 1
    assert (ml / "output/failure").read_text().startswith(reason)
    assert reason in capsys.readouterr().err
    assert not any((ml / "model").iterdir())


def test_the_failure_file_sits_beside_the_output_data_and_names_the_channel_problem(tmp_path, data_csv):
    env, ml = opt_ml(tmp_path, {})
    del env["SM_OUTPUT_DIR"]  # only SM_OUTPUT_DATA_DIR: the failure file goes to its parent, /opt/ml/output
    for name in ("a.csv", "b.csv"):
        (ml / "input/data/train" / name).write_bytes(data_csv.read_bytes())
    assert train_entry.main([], env=env) == 1
    assert "holds 2 CSV files ['a.csv', 'b.csv']; it needs exactly one" in (ml / "output/failure").read_text()

    env, ml = opt_ml(tmp_path / "empty", {})
    del env["SM_CHANNEL_TRAIN"]
    assert train_entry.main([], env=env) == 1
    assert "without SM_CHANNEL_TRAIN" in (ml / "output/failure").read_text()


def test_hyperparameters_as_strings_or_typed_give_the_same_values():
    typed = train_entry.parse_hyperparameters({"fpr": 0.05, "components": 4, "features": ["a", "b"], "seed": 7})
    text = train_entry.parse_hyperparameters({"fpr": "0.05", "components": "4", "features": "a, b", "seed": "7"})
    assert typed == text
    assert typed["features"] == ["a", "b"] and typed["holdout"] == 0.2 and typed["model"] == "tabular"
    sent = train_entry.hyperparameter_strings(typed)
    assert all(isinstance(v, str) for v in sent.values())
    assert train_entry.parse_hyperparameters(sent) == typed  # what the job is given reads back the same
    assert train_entry.parse_hyperparameters(toolkit_hps(sent)) == typed  # and so does SM_HPS
    assert "features" not in train_entry.hyperparameter_strings(train_entry.parse_hyperparameters({}))
    with pytest.raises(train_entry.HyperparameterError, match="seed=True: expected an integer"):
        train_entry.parse_hyperparameters({"seed": True})


def test_a_new_model_kind_is_one_entry_in_the_table(tmp_path, data_csv, monkeypatch, capsys):
    """The stream detector will be added like this: its own options, training function and metrics."""
    calls = []

    def fit(data: Path, out_dir: Path, hp: dict, lineage: dict) -> TrainResult:
        calls.append(hp)
        return train(data, out_dir, name=hp["name"], components=hp["window"] // 16, lineage=lineage)

    kind = train_entry.ModelKind("test kind", {"window": train_entry.Option(train_entry._at_least(16), 32, "")},
                                 fit, {"threshold": lambda r: r.card.outlier.threshold})
    monkeypatch.setitem(train_entry.MODELS, "windowed", kind)
    env, ml = opt_ml(tmp_path, {"model": "windowed", "window": "48"})
    (ml / "input/data/train/sensors.csv").write_bytes(data_csv.read_bytes())
    assert train_entry.main([], env=env) == 0
    assert calls == [{"model": "windowed", "name": "sensor-outliers", "version": "1.0.0", "window": 48}]
    card = load_card(ml / "model")
    assert card.algorithm.startswith("StandardScaler+GaussianMixture(n_components=3")
    assert card.lineage["model"] == "windowed" and card.lineage["hyperparameters"]["window"] == 48
    assert set(metrics_in(capsys.readouterr().out, "windowed")) == {"threshold"}
    with pytest.raises(train_entry.HyperparameterError, match=r"unknown hyperparameter\(s\) \['fpr'\] for model "
                                                              "'windowed'"):
        train_entry.parse_hyperparameters({"model": "windowed", "fpr": "0.1"})


def test_local_training_goes_through_the_entry_point_and_records_lineage(tmp_path, data_csv, capsys):
    out = tmp_path / "m"
    assert cli.main(["train", "--data", str(data_csv), "--out", str(out), "--components", "2",
                     "--hp", "holdout=0.25", "--version", "1.2.3"]) == 0
    lineage = load_card(out).lineage
    assert lineage["source"] == "local" and lineage["entry_point"] == "cloud.train_entry"
    assert lineage["data"] == {"path": str(data_csv.resolve()), "sha256": sha256_file(data_csv),
                               "bytes": data_csv.stat().st_size, "rows": 2000}
    assert lineage["hyperparameters"]["holdout"] == 0.25 and lineage["hyperparameters"]["components"] == 2
    assert lineage["metrics"]["calibration_rows"] == 500
    assert f"data sha256 {sha256_file(data_csv)} (2000 rows)" in capsys.readouterr().out

    # python -m cloud.train_entry, with no SM_* variables: the same, from the command line
    assert train_entry.main(["--data", str(data_csv), "--out", str(tmp_path / "m2"), "--components=2",
                             "--holdout", "0.25", "--version", "1.2.3"], env={}) == 0
    again = load_card(tmp_path / "m2")
    assert again.lineage["hyperparameters"] == lineage["hyperparameters"]
    assert again.outlier.threshold == load_card(out).outlier.threshold  # same code, same seed, same model
    assert train_entry.main(["--data", str(data_csv), "--out", str(tmp_path / "m3"), "--fpr", "x"], env={}) == 2
    assert "hyperparameter fpr='x': expected a number" in capsys.readouterr().err

    assert cli.main(["train", "--data", str(data_csv), "--out", str(out), "--hp", "components=2",
                     "--components", "3"]) == 2
    assert "hyperparameter components given twice" in capsys.readouterr().err


def test_the_training_imports_are_in_the_image_or_the_requirements(tmp_path, data_csv):
    """The job's container has the scikit-learn image's packages and requirements.txt, nothing else:
    every package the project's modules on the training path import must be one of those."""
    import ast

    code = ("import json, sys\nfrom cloud.train_entry import main\n"
            f"assert main(['--data', {str(data_csv)!r}, '--out', {str(tmp_path / 'm')!r}], env={{}}) == 0\n"
            f"print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())"
            f" if n.split('.')[0] in {smt.PACKAGES!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    files = json.loads(done.stdout.splitlines()[-1])
    assert {"cloud/train.py", "edge_runtime/summary.py", "model_compile/card.py"} <= {
        "/".join(Path(f).parts[-2:]) for f in files}
    imported = set()
    for path in files:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | set(smt.PACKAGES) | {"__future__"}
    by_module = importlib.metadata.packages_distributions()

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    needed = {norm(d) for m in imported for d in by_module[m]}
    image = {"numpy", "scikit-learn", "scipy"}  # the SageMaker scikit-learn image has them
    required = {norm(re.split(r"[<>=!~; ]", r)[0]) for r in smt.REQUIREMENTS}
    assert {"onnxruntime", "skl2onnx", "pydantic", "datasketches", "numpy", "scikit-learn"} <= needed
    assert needed - image - required == set()
    assert smt.requirements_txt().splitlines() == list(smt.REQUIREMENTS)


# --- the driver: moto server ----------------------------------------------------------------------


class Session:
    """What the driver needs of a boto3 session; ``overrides`` replace clients by name."""

    region_name = REGION

    def __init__(self, **overrides) -> None:
        self.overrides = overrides

    def client(self, name: str, **kw):
        return self.overrides.get(name) or boto3.client(name, **kw)


class PlayedSageMaker:
    """moto's SageMaker client; at the first describe, ``job(request, description)`` plays the job
    moto says is already Completed."""

    def __init__(self, client, job=None) -> None:
        self.client, self.job, self.request = client, job, None

    def create_training_job(self, **params):
        self.request = params
        return self.client.create_training_job(**params)

    def describe_training_job(self, **params):
        desc = self.client.describe_training_job(**params)
        if self.job is not None:
            job, self.job = self.job, None
            job(self.request, desc)
        return desc

    def __getattr__(self, name):
        return getattr(self.client, name)


def play_training_job(request: dict, desc: dict, s3, logs, root: Path) -> subprocess.CompletedProcess:
    """SageMaker script mode, simulated: the channel and the code from S3 into /opt/ml, the
    launcher run from the unpacked code with the toolkit's environment and arguments, SM_MODEL_DIR
    uploaded as model.tar.gz, the output put in the job's CloudWatch log stream."""
    hps = request["HyperParameters"]
    env, ml = opt_ml(root, hps, request["TrainingJobName"])
    (channel,) = request["InputDataConfig"]
    assert channel["ChannelName"] == "train"
    bucket, prefix = split_s3_uri(channel["DataSource"]["S3DataSource"]["S3Uri"])
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        target = Path(env["SM_CHANNEL_TRAIN"]) / obj["Key"][len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    bucket, key = split_s3_uri(hps["sagemaker_submit_directory"])
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), mode="r:gz") as tar:
        tar.extractall(ml / "code", filter="data")
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import cloud.train_entry as m; print(m.__file__)"],
                           cwd=ml / "code", env=base, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(ml / "code" / "cloud" / "train_entry.py")  # the job's code, not ours
    args = [a for k in sorted(toolkit_hps(hps)) for a in (f"--{k}", hps[k])]
    done = subprocess.run([sys.executable, hps["sagemaker_program"], *args], cwd=ml / "code",
                          env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bucket, key = split_s3_uri(desc["ModelArtifacts"]["S3ModelArtifacts"])
    s3.put_object(Bucket=bucket, Key=key, Body=model_tarball(ml / "model"))
    stream = f"{request['TrainingJobName']}/algo-1-{int(time.time())}"
    try:
        logs.create_log_group(logGroupName=smt.LOG_GROUP)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    logs.create_log_stream(logGroupName=smt.LOG_GROUP, logStreamName=stream)
    now = int(time.time() * 1000)
    lines = (done.stdout + done.stderr).splitlines()
    logs.put_log_events(logGroupName=smt.LOG_GROUP, logStreamName=stream,
                        logEvents=[{"timestamp": now, "message": line} for line in lines])
    return done


def test_edgeloop_train_sagemaker_end_to_end_on_moto(tmp_path, data_csv, moto_endpoint, monkeypatch, capsys):
    """``edgeloop train --sagemaker`` against moto: upload, job, log lines, model, lineage, bundle.
    No --bucket: the SageMaker SDK's default bucket for the account (from STS) is used."""
    aws_env(monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    logs = boto3.client("logs", endpoint_url=moto_endpoint)
    bucket = f"sagemaker-{REGION}-{ACCOUNT}"
    s3.create_bucket(Bucket=bucket)
    played = {}
    sm = PlayedSageMaker(boto3.client("sagemaker", endpoint_url=moto_endpoint),
                         lambda request, desc: played.setdefault("run", play_training_job(
                             request, desc, s3, logs, tmp_path / "job")))
    monkeypatch.setattr(smt, "_session", lambda region: Session(sagemaker=sm))
    monkeypatch.setattr(smt, "_sleep", lambda s: None)
    job, out = "edgeloop-train-moto-1", tmp_path / "model"

    assert cli.main(["train", "--data", str(data_csv), "--out", str(out), "--sagemaker", "--role", ROLE,
                     "--region", REGION, "--endpoint-url", moto_endpoint, "--job-name", job, "--fpr", "0.02",
                     "--components", "2", "--hp", "holdout=0.25", "--max-runtime", "2h"]) == 0
    printed = capsys.readouterr()

    request = sm.request
    base = f"edgeloop/training/{job}"
    assert request["AlgorithmSpecification"]["TrainingImage"] == DEFAULT_IMAGE
    assert request["RoleArn"] == ROLE and request["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    assert request["ResourceConfig"] == {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 30}
    assert request["OutputDataConfig"] == {"S3OutputPath": f"s3://{bucket}/edgeloop/training"}
    hps = request["HyperParameters"]
    assert hps["sagemaker_program"] == "edgeloop_train.py"
    assert hps["sagemaker_submit_directory"] == f"s3://{bucket}/{base}/code/sourcedir.tar.gz"
    assert {k: hps[k] for k in ("fpr", "components", "holdout", "model", "version")} == {
        "fpr": "0.02", "components": "2", "holdout": "0.25", "model": "tabular", "version": "1.0.0"}
    assert all(isinstance(v, str) for v in hps.values())
    # the MetricDefinitions SageMaker is given find every metric in what the job printed
    definitions = request["AlgorithmSpecification"]["MetricDefinitions"]
    assert definitions == train_entry.metric_definitions("tabular")
    card = load_card(out)
    assert metrics_in(played["run"].stdout) == pytest.approx(card.lineage["metrics"], rel=1e-7)

    code = s3.get_object(Bucket=bucket, Key=f"{base}/code/sourcedir.tar.gz")["Body"].read()
    assert smt.source_tarball() == smt.source_tarball()  # the same code, the same bytes (and sha256)
    names = tarfile.open(fileobj=io.BytesIO(code), mode="r:gz").getnames()
    assert {"edgeloop_train.py", "requirements.txt", "cloud/train_entry.py", "cloud/train.py",
            "model_compile/card.py", "edge_runtime/contracts.py"} <= set(names)
    assert not any("__pycache__" in n for n in names)
    uploaded = s3.get_object(Bucket=bucket, Key=f"{base}/input/train/sensors.csv")["Body"].read()
    assert uploaded == data_csv.read_bytes()

    lineage = card.lineage
    assert lineage["source"] == "sagemaker"
    tj = lineage["training_job"]
    assert tj["name"] == job and tj["arn"] == f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{job}"
    assert tj["image"] == DEFAULT_IMAGE and tj["instance_type"] == "ml.m5.large" and tj["region"] == REGION
    assert tj["hyperparameters"] == hps and tj["status"] == "Completed"
    assert tj["final_metrics"] == {"train:progress": 100.0}  # moto's; SageMaker's would be ours
    assert lineage["data"] == {
        "path": str(tmp_path / "job/opt/ml/input/data/train/sensors.csv"),  # where the job read it
        "uri": f"s3://{bucket}/{base}/input/train/sensors.csv", "sha256": hashlib.sha256(uploaded).hexdigest(),
        "bytes": len(uploaded), "rows": 2000, "source_path": str(data_csv.resolve())}
    assert lineage["code"] == {"uri": hps["sagemaker_submit_directory"], "sha256": hashlib.sha256(code).hexdigest()}
    assert lineage["model_artifact"] == f"s3://{bucket}/edgeloop/training/{job}/output/model.tar.gz"
    assert lineage["hyperparameters"]["holdout"] == 0.25 and lineage["hyperparameters"]["fpr"] == 0.02
    assert card.outlier.calibration_rows == 500 and lineage["metrics"]["calibration_rows"] == 500

    assert f"{job}: Completed" in printed.err
    assert "algo-1-" in printed.err and "| edgeloop_metric holdout_fpr=" in printed.err  # the job's log lines
    assert f"SageMaker training job {job} (ml.m5.large, {DEFAULT_IMAGE})" in printed.out

    bundle = tmp_path / "bundle"
    compile_bundle(out, bundle)
    manifest = load_bundle(bundle).manifest
    assert manifest.lineage == lineage and manifest.lineage["training_job"]["name"] == job


def aws_env(monkeypatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(k, v)


# --- the driver: status sequences (Stubber) -------------------------------------------------------

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/edgeloop-train:1"


def described(job: str, bucket: str, status: str, secondary: str, message: str = "", **extra) -> dict:
    from datetime import datetime, timezone

    t0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
    return {
        "TrainingJobName": job, "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{job}",
        "TrainingJobStatus": status, "SecondaryStatus": secondary,
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{bucket}/edgeloop/training/{job}/output/model.tar.gz"},
        "AlgorithmSpecification": {"TrainingImage": IMAGE, "TrainingInputMode": "File"},
        "RoleArn": ROLE, "HyperParameters": {"fpr": "0.02", "sagemaker_program": "edgeloop_train.py"},
        "ResourceConfig": {"InstanceType": "ml.c5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600}, "CreationTime": t0,
        "SecondaryStatusTransitions": [{"Status": secondary, "StartTime": t0, "StatusMessage": message}], **extra}


@pytest.fixture(scope="module")
def job_model(data_csv, tmp_path_factory) -> Path:
    """A job's model directory: the entry point run in a simulated SageMaker environment."""
    env, ml = opt_ml(tmp_path_factory.mktemp("played"), {"fpr": "0.02", "components": "2"})
    (ml / "input/data/train/sensors.csv").write_bytes(data_csv.read_bytes())
    assert train_entry.main([], env=env) == 0
    return ml / "model"


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(smt, "_now", lambda: now[0])
    monkeypatch.setattr(smt, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


def stubbed_sagemaker(job: str, bucket: str, sequence: list[dict]) -> tuple:
    sm = boto3.client("sagemaker", region_name=REGION)
    stub = Stubber(sm)
    stub.add_response("create_training_job", {"TrainingJobArn": sequence[0]["TrainingJobArn"]})
    for desc in sequence:
        stub.add_response("describe_training_job", desc, {"TrainingJobName": job})
    return sm, stub


def test_the_cli_shows_a_job_going_from_in_progress_to_completed(tmp_path, data_csv, job_model, s3_bucket,
                                                                   moto_endpoint, monkeypatch, clock, capsys):
    job, bucket = "edgeloop-train-stub-1", s3_bucket
    sequence = [
        described(job, bucket, "InProgress", "Starting", "Preparing the instances for training"),
        described(job, bucket, "InProgress", "Starting", "Preparing the instances for training"),
        described(job, bucket, "InProgress", "Downloading", "Downloading input data"),
        described(job, bucket, "InProgress", "Training", "Downloading the training image"),
        described(job, bucket, "InProgress", "Training", "Training image download completed. Training in progress."),
        described(job, bucket, "Completed", "Completed", "Training job completed", BillableTimeInSeconds=94,
                  FinalMetricDataList=[{"MetricName": "holdout_fpr", "Value": 0.0195},
                                       {"MetricName": "train_rows", "Value": 1600.0}]),
    ]
    sm, stub = stubbed_sagemaker(job, bucket, sequence)
    monkeypatch.setattr(smt, "_session", lambda region: Session(sagemaker=sm))
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.put_object(Bucket=bucket, Key=f"edgeloop/training/{job}/output/model.tar.gz", Body=model_tarball(job_model))
    out = tmp_path / "out"
    with stub:
        assert cli.main(["train", "--data", str(data_csv), "--out", str(out), "--sagemaker", "--role", ROLE,
                         "--instance-type", "ml.c5.xlarge", "--image", IMAGE, "--bucket", bucket,
                         "--region", REGION, "--endpoint-url", moto_endpoint, "--job-name", job, "--fpr", "0.02",
                         "--components", "2"]) == 0
        stub.assert_no_pending_responses()
    printed = capsys.readouterr()
    shown = [line.split("] ", 1)[1] for line in printed.err.splitlines() if f"] {job}: " in line]
    assert shown == [
        f"{job}: InProgress / Starting: Preparing the instances for training",  # once, not twice
        f"{job}: InProgress / Downloading: Downloading input data",
        f"{job}: InProgress / Training: Downloading the training image",
        f"{job}: InProgress / Training: Training image download completed. Training in progress.",
        f"{job}: Completed: Training job completed",
    ]
    minutes = [float(line[1:].split(" min]")[0]) for line in printed.err.splitlines() if f"] {job}: " in line]
    assert minutes == [0.0, 0.5, 0.8, 1.0, 1.2]  # polled every 15 s; the repeated Starting was not shown
    assert f"SageMaker training job {job} (ml.c5.xlarge, {IMAGE})" in printed.out
    lineage = load_card(out).lineage
    assert lineage["training_job"]["final_metrics"] == {"holdout_fpr": 0.0195, "train_rows": 1600.0}
    assert lineage["training_job"]["billable_seconds"] == 94 and lineage["training_job"]["image"] == IMAGE
    assert lineage["data"]["uri"] == f"s3://{bucket}/edgeloop/training/{job}/input/train/sensors.csv"
    assert lineage["metrics"] == load_card(job_model).lineage["metrics"]  # the container's own, kept
    assert (out / "model.onnx").read_bytes() == (job_model / "model.onnx").read_bytes()


@pytest.mark.parametrize("status, extra, reason", [
    ("Failed", {"FailureReason": "AlgorithmError: ExecuteUserScriptError: training failed: "
                                 "sensors.csv: no numeric feature columns"},
     "failed: AlgorithmError: ExecuteUserScriptError: training failed: sensors.csv: no numeric feature columns"),
    ("Stopped", {}, "stopped: no reason given"),
])
def test_a_job_that_fails_or_is_stopped_raises_with_its_reason(tmp_path, data_csv, s3_bucket, moto_endpoint,
                                                               clock, status, extra, reason):
    job = f"edgeloop-train-{status.lower()}"
    sm, stub = stubbed_sagemaker(job, s3_bucket, [
        described(job, s3_bucket, "InProgress", "Training", "Training image download completed."),
        described(job, s3_bucket, status, status, **extra)])
    out = tmp_path / "out"
    with stub, pytest.raises(smt.TrainingJobError, match=re.escape(f"SageMaker training job {job} {reason}")):
        smt.train_on_sagemaker(data_csv, out, {"fpr": "0.02"}, role_arn=ROLE, image_uri=IMAGE, bucket=s3_bucket,
                               endpoint_url=moto_endpoint, job_name=job, poll_s=10, session=Session(sagemaker=sm))
    stub.assert_no_pending_responses()
    assert not out.exists() and list(tmp_path.iterdir()) == []

    sm, stub = stubbed_sagemaker(job, s3_bucket, [described(job, s3_bucket, status, status, **extra)])
    with stub, pytest.MonkeyPatch.context() as mp:
        mp.setattr(smt, "_session", lambda region: Session(sagemaker=sm))
        done = subprocess_free_cli(["train", "--data", str(data_csv), "--out", str(out), "--sagemaker", "--role",
                                    ROLE, "--image", IMAGE, "--bucket", s3_bucket, "--region", REGION,
                                    "--endpoint-url", moto_endpoint, "--job-name", job])
    assert done[0] == 1 and f"edgeloop train: error: SageMaker training job {job} {reason}" in done[2]


def subprocess_free_cli(argv: list[str]) -> tuple[int, str, str]:
    """cloud.cli.main with its stdout and stderr."""
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_ctrl_c_leaves_the_job_running_and_says_how_to_stop_it(tmp_path, data_csv, s3_bucket, moto_endpoint,
                                                               monkeypatch, clock):
    job = "edgeloop-train-interrupted"
    sm, stub = stubbed_sagemaker(job, s3_bucket, [described(job, s3_bucket, "InProgress", "Training")])

    class Interrupted:
        calls: list[str] = []

        def __getattr__(self, name):
            self.calls.append(name)
            if name == "describe_training_job" and self.calls.count(name) == 2:
                raise KeyboardInterrupt
            return getattr(sm, name)

    monkeypatch.setattr(smt, "_session", lambda region: Session(sagemaker=Interrupted()))
    with stub:
        code, _, err = subprocess_free_cli(["train", "--data", str(data_csv), "--out", str(tmp_path / "out"),
                                            "--sagemaker", "--role", ROLE, "--image", IMAGE, "--bucket", s3_bucket,
                                            "--region", REGION, "--endpoint-url", moto_endpoint, "--job-name", job])
        stub.assert_no_pending_responses()
    assert code == 130
    assert f"aws sagemaker stop-training-job --training-job-name {job} --region {REGION}" in err
    assert f"s3://{s3_bucket}/edgeloop/training/{job}/output/model.tar.gz" in err
    assert Interrupted.calls == ["create_training_job", "describe_training_job", "describe_training_job"]  # no stop


def _retarred(model: Path, tmp: Path, change) -> bytes:
    copy = tmp / "copy"
    shutil.copytree(model, copy)
    change(copy)
    return model_tarball(copy)


def _forge_sha(d: Path) -> None:
    card = json.loads((d / "training.json").read_text())
    card["lineage"]["data"]["sha256"] = "0" * 64
    (d / "training.json").write_text(json.dumps(card))


def _escaping(tmp: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return out.getvalue()


@pytest.mark.parametrize("make, message", [
    (lambda m, t: _retarred(m, t, lambda d: (d / "training.json").unlink()), "is not a training output"),
    (lambda m, t: _retarred(m, t, _forge_sha), f"was trained on data with sha256 {'0' * 64}, not the "),
    (lambda m, t: _escaping(t), "has an entry outside its folder: '../escaped.txt'"),
])
def test_a_model_artefact_that_is_not_this_training_is_refused(tmp_path, data_csv, job_model, s3_bucket,
                                                                moto_endpoint, clock, make, message):
    job = "edgeloop-train-odd"
    boto3.client("s3", endpoint_url=moto_endpoint).put_object(
        Bucket=s3_bucket, Key=f"edgeloop/training/{job}/output/model.tar.gz", Body=make(job_model, tmp_path))
    sm, stub = stubbed_sagemaker(job, s3_bucket, [described(job, s3_bucket, "Completed", "Completed")])
    out = tmp_path / "work" / "out"
    with stub, pytest.raises(smt.TrainingJobError, match=re.escape(message)):
        smt.train_on_sagemaker(data_csv, out, {}, role_arn=ROLE, image_uri=IMAGE, bucket=s3_bucket,
                               endpoint_url=moto_endpoint, job_name=job, session=Session(sagemaker=sm))
    assert list((tmp_path / "work").iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


def test_log_lines_are_shown_once_and_missing_or_unreadable_logs_do_not_stop_training(caplog):
    logs = boto3.client("logs", region_name=REGION)
    stub = Stubber(logs)
    job, stream = "j", "j/algo-1-1700000000"
    group = {"logGroupName": smt.LOG_GROUP}
    stub.add_client_error("describe_log_streams", "ResourceNotFoundException", "log group does not exist",
                          expected_params={**group, "logStreamNamePrefix": "j/"})
    streams = {"logStreams": [{"logStreamName": stream}]}
    stub.add_response("describe_log_streams", streams)
    stub.add_response("get_log_events", {"events": [{"message": "a\n"}, {"message": "b"}], "nextForwardToken": "t1"},
                      {**group, "logStreamName": stream, "startFromHead": True})
    stub.add_response("get_log_events", {"events": [], "nextForwardToken": "t1"},
                      {**group, "logStreamName": stream, "startFromHead": True, "nextToken": "t1"})
    stub.add_response("describe_log_streams", streams)
    stub.add_response("get_log_events", {"events": [{"message": "c"}], "nextForwardToken": "t2"},
                      {**group, "logStreamName": stream, "startFromHead": True, "nextToken": "t1"})
    stub.add_response("get_log_events", {"events": [], "nextForwardToken": "t2"},
                      {**group, "logStreamName": stream, "startFromHead": True, "nextToken": "t2"})
    stub.add_client_error("describe_log_streams", "AccessDeniedException", "not allowed")
    lines = []
    tail = smt.LogTail(logs, job, lambda s, line: lines.append((s, line)))
    with stub:
        for _ in range(5):  # after the access error, no more calls
            tail.poll()
        stub.assert_no_pending_responses()
    assert lines == [(stream, "a"), (stream, "b"), (stream, "c")]
    assert [r.message for r in caplog.records if "cannot read the job's log lines" in r.message] != []


def test_clear_errors_before_anything_is_paid(tmp_path, data_csv, s3_bucket, moto_endpoint, monkeypatch, capsys):
    monkeypatch.setattr(smt, "_session", lambda region: Session(sagemaker=object()))
    base = ["train", "--data", str(data_csv), "--out", str(tmp_path / "o"), "--sagemaker", "--region", REGION,
            "--endpoint-url", moto_endpoint]
    assert cli.main(base) == 2
    assert "--sagemaker needs --role ARN" in capsys.readouterr().err
    assert cli.main([*base, "--role", "edgeloop-training"]) == 2
    assert "role 'edgeloop-training': give the ARN of an IAM role" in capsys.readouterr().err
    assert cli.main([*base, "--role", ROLE, "--fpr", "0.9"]) == 2
    assert "hyperparameter fpr=0.9: must be in (0, 0.5)" in capsys.readouterr().err
    assert cli.main([*base, "--role", ROLE, "--bucket", "no-such-bucket-here"]) == 2
    assert "bucket no-such-bucket-here does not exist" in capsys.readouterr().err
    assert cli.main([*base, "--role", ROLE, "--instance-type", "m5.large"]) == 2
    assert "instance type 'm5.large'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no default training image known for region xx-north-9: give --image"):
        smt.default_image("xx-north-9")
    assert smt.default_image("cn-north-1").endswith(".amazonaws.com.cn/sagemaker-scikit-learn:1.4-2-cpu-py3")
    assert not (tmp_path / "o").exists()
