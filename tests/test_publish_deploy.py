"""Publishing and deploying components: Greengrass v2 and STS through botocore's Stubber (every call's
parameters exactly, in order; ``aws`` fails a test that leaves a queued call unmade), S3 on moto."""

from __future__ import annotations

import fnmatch
import json
import time
import types
import uuid
from datetime import datetime, timezone

import boto3
import jsonschema
import pytest
import yaml
from botocore.stub import Stubber
from conftest import AWS_TEST_ENV
from greengrass_stub import ACCOUNT, NOW, REGION, GreengrassStub, JsonOf, arn, client
from helpers import REPO, SHARED

import cloud.publish
from cloud.cli import main
from cloud.components import ComponentError, build_model, lower_keys, runtime_recipe
from cloud.deploy import DeployRequest, deploy, deployment_status, format_status, runtime_merge
from cloud.iam import THING, device_policy
from cloud.publish import bucket_name, local_layout, next_patch, publish
from edge_runtime.contracts import outlier_key, presence_key, summary_key

RUNTIME, MODEL = "com.edgeloop.EdgeRuntime", "com.edgeloop.model.sensor-outliers"
RUNTIME_ZIP, MODEL_ZIP = "edgeloop-runtime-x86_64.zip", "bundle.zip"
DEFAULT_BUCKET = f"edgeloop-components-{REGION}-{ACCOUNT}"  # gdk-config's publish.bucket + region + account
GROUP_ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/line-1"

@pytest.fixture
def aws():
    stubs = GreengrassStub()
    yield stubs
    stubs.gg_stub.assert_no_pending_responses()
    stubs.sts_stub.assert_no_pending_responses()


@pytest.fixture
def build_dir(tmp_path, bundle_dir):
    """greengrass-build/ as `component build` writes it, with a stand-in runtime artifact (no wheels)."""
    out = tmp_path / "greengrass-build"
    (out / "recipes").mkdir(parents=True)
    (out / "recipes" / "recipe.yaml").write_text(runtime_recipe(REPO, RUNTIME, "NEXT_PATCH", "edgeloop", ["x86_64"]))
    artifact = out / "artifacts" / RUNTIME / "NEXT_PATCH" / RUNTIME_ZIP
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"PK\x05\x06" + bytes(18) + uuid.uuid4().bytes)  # an empty zip, and bytes of its own
    build_model(bundle_dir, out, RUNTIME, REPO)
    return out


@pytest.fixture
def s3(moto_endpoint):
    return client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def sleeps(monkeypatch):
    """Polling without waiting: the pauses publish asks for."""
    asked = []
    monkeypatch.setattr(cloud.publish, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=asked.append))
    return asked


def drop_bucket(s3, name: str) -> None:
    if name in buckets(s3):
        for obj in s3.list_objects_v2(Bucket=name).get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
        s3.delete_bucket(Bucket=name)


def buckets(s3) -> set[str]:
    return {b["Name"] for b in s3.list_buckets()["Buckets"]}


def check_recipe(sent: bytes, name: str, version: str, bucket: str, files: list[str]) -> None:
    text = sent.decode()
    recipe = yaml.safe_load(text)
    assert (recipe["ComponentName"], recipe["ComponentVersion"]) == (name, version)
    uris = [a["URI"] for m in recipe["Manifests"] for a in m.get("Artifacts") or []]
    assert uris == [f"s3://{bucket}/{name}/{version}/{f}" for f in files]
    for placeholder in ("BUCKET_NAME", "COMPONENT_NAME", "COMPONENT_VERSION", "COMPONENT_AUTHOR", "NEXT_PATCH"):
        assert placeholder not in text


def check_uploaded(s3, bucket: str, build_dir, name: str, built_as: str, version: str, file: str) -> None:
    expected = (build_dir / "artifacts" / name / built_as / file).read_bytes()
    assert s3.get_object(Bucket=bucket, Key=f"{name}/{version}/{file}")["Body"].read() == expected


# --- publish ----------------------------------------------------------------------------------


def test_versions_and_bucket_names():
    assert next_patch(None) == "1.0.0"
    assert next_patch("1.0.9") == "1.0.10"
    assert bucket_name("exactly-this", {"bucket": "gdk"}, REGION, ACCOUNT) == "exactly-this"
    assert bucket_name(None, {"bucket": "gdk"}, "eu-west-1", ACCOUNT) == f"gdk-eu-west-1-{ACCOUNT}"
    with pytest.raises(ComponentError, match="no bucket"):
        bucket_name(None, {}, REGION, ACCOUNT)


@pytest.fixture
def approved_registry(tmp_path, bundle_dir):
    from cloud.registry import register, set_approval
    from edge_runtime.store import LocalStore

    registry = LocalStore(tmp_path / "registry")
    register(bundle_dir, registry)
    set_approval(registry, "sensor-outliers", "1.0.0", "Approved")
    return registry


def test_first_publish_creates_the_bucket_uploads_and_waits(build_dir, aws, s3, sleeps, approved_registry):
    drop_bucket(s3, DEFAULT_BUCKET)
    aws.versions(RUNTIME, [[]])  # never published: NEXT_PATCH is 1.0.0
    aws.missing("describe_component", arn=arn(RUNTIME, "1.0.0"))
    aws.missing("describe_component", arn=arn(MODEL, "1.0.0"))
    aws.created(RUNTIME, "1.0.0", states=("REQUESTED", "INITIATED", "DEPLOYABLE"))
    aws.created(MODEL, "1.0.0")
    try:
        done = publish(build_dir, root=REPO, session=aws.session(s3), progress=lambda m: None,
                       registry=approved_registry)
        assert DEFAULT_BUCKET in buckets(s3)
        check_uploaded(s3, DEFAULT_BUCKET, build_dir, RUNTIME, "NEXT_PATCH", "1.0.0", RUNTIME_ZIP)
        check_uploaded(s3, DEFAULT_BUCKET, build_dir, MODEL, "1.0.0", "1.0.0", MODEL_ZIP)
    finally:
        drop_bucket(s3, DEFAULT_BUCKET)

    assert [(p.name, p.version, p.arn) for p in done] == [(RUNTIME, "1.0.0", arn(RUNTIME, "1.0.0")),
                                                          (MODEL, "1.0.0", arn(MODEL, "1.0.0"))]
    assert done[1].uris == [f"s3://{DEFAULT_BUCKET}/{MODEL}/1.0.0/{MODEL_ZIP}"]
    runtime_sent, model_sent = aws.recipes.values
    check_recipe(runtime_sent, RUNTIME, "1.0.0", DEFAULT_BUCKET, [RUNTIME_ZIP])
    check_recipe(model_sent, MODEL, "1.0.0", DEFAULT_BUCKET, [MODEL_ZIP])
    assert [p.recipe.read_bytes() for p in done] == [runtime_sent, model_sent]
    assert len(sleeps) == 2  # polled until DEPLOYABLE
    assert json.loads((build_dir / "published.json").read_text()) == {
        "region": REGION, "account": ACCOUNT, "bucket": DEFAULT_BUCKET,
        "components": {RUNTIME: "1.0.0", MODEL: "1.0.0"}}


def test_cli_publish_takes_next_patch_over_every_page_into_the_exact_bucket(build_dir, aws, s3, monkeypatch, capsys):
    bucket = f"exact-{uuid.uuid4().hex[:12]}"
    aws.versions(RUNTIME, [["0.9.0", "1.0.3"], ["1.0.2", "0.10.0"]])  # highest 1.0.3, on the first page
    aws.missing("describe_component", arn=arn(RUNTIME, "1.0.4"))
    aws.created(RUNTIME, "1.0.4", states=())  # --no-wait: no polling
    monkeypatch.setattr(boto3, "Session", lambda **kw: aws.session(s3))
    assert main(["component", "publish", "--build-dir", str(build_dir), "--bucket", bucket,
                 "--component", RUNTIME, "--no-wait"]) == 0
    assert capsys.readouterr().out.split() == [RUNTIME, "1.0.4", arn(RUNTIME, "1.0.4")]
    check_uploaded(s3, bucket, build_dir, RUNTIME, "NEXT_PATCH", "1.0.4", RUNTIME_ZIP)
    check_recipe(aws.recipes.values[0], RUNTIME, "1.0.4", bucket, [RUNTIME_ZIP])
    assert DEFAULT_BUCKET not in buckets(s3)
    assert json.loads((build_dir / "published.json").read_text())["components"] == {RUNTIME: "1.0.4"}


def test_a_component_greengrass_refuses_fails_the_publish(build_dir, aws, s3, sleeps):
    aws.versions(RUNTIME, [[]])
    aws.missing("describe_component", arn=arn(RUNTIME, "1.0.0"))
    aws.created(RUNTIME, "1.0.0", states=("FAILED",), message="artifact edgeloop-runtime-x86_64.zip unreadable")
    with pytest.raises(ComponentError, match="refused the component: artifact edgeloop-runtime-x86_64.zip unreadable"):
        publish(build_dir, root=REPO, bucket=f"exact-{uuid.uuid4().hex[:12]}", session=aws.session(s3),
                only=[RUNTIME], progress=lambda m: None)
    assert not (build_dir / "published.json").exists()


def test_publishing_a_model_version_again_is_refused_before_touching_s3(build_dir, aws):
    s3 = client("s3")
    s3_stub = Stubber(s3)  # no responses queued: any S3 call fails
    s3_stub.activate()
    requests = []
    s3.meta.events.register("before-parameter-build.s3", lambda model, **_: requests.append(model.name))
    aws.versions(RUNTIME, [["1.0.0"]])
    aws.missing("describe_component", arn=arn(RUNTIME, "1.0.1"))
    aws.described(MODEL, "1.0.0")  # the first publish made it
    with pytest.raises(ComponentError, match=f"{MODEL} 1.0.0 already exists"):
        publish(build_dir, root=REPO, session=aws.session(s3), progress=lambda m: None)
    assert requests == []
    s3_stub.assert_no_pending_responses()
    assert aws.recipes.values == []
    assert not (build_dir / "published.json").exists()


def test_a_model_version_is_published_only_once_approved(build_dir, aws, tmp_path, bundle_dir):
    from cloud.registry import register
    from edge_runtime.store import LocalStore

    s3 = client("s3")
    with Stubber(s3):  # no S3 call may happen
        aws.missing("describe_component", arn=arn(MODEL, "1.0.0"))
        with pytest.raises(ComponentError, match="give the registry it was approved in"):
            publish(build_dir, root=REPO, session=aws.session(s3), only=[MODEL], progress=lambda m: None)
        registry = LocalStore(tmp_path / "pending")
        register(bundle_dir, registry)
        aws.missing("describe_component", arn=arn(MODEL, "1.0.0"))
        with pytest.raises(ComponentError, match="is PendingManualApproval in the registry; approve it first"):
            publish(build_dir, root=REPO, session=aws.session(s3), only=[MODEL], progress=lambda m: None,
                    registry=registry)


def test_publishing_a_component_that_was_not_built_is_refused(build_dir, aws):
    with pytest.raises(ComponentError, match="not built in .*: com.edgeloop.model.other"):
        publish(build_dir, root=REPO, session=aws.session(client("s3")), only=["com.edgeloop.model.other"])
    assert not (build_dir / "published.json").exists()


# --- local layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("runtime_version", [None, "2.3.4"])
def test_local_layout_for_greengrass_cli(build_dir, tmp_path, runtime_version):
    out = tmp_path / "local"
    recipes, artifacts, versions = local_layout(build_dir, out, root=REPO, runtime_version=runtime_version)
    runtime_version = runtime_version or "0.0.1"
    assert versions == {RUNTIME: runtime_version, MODEL: "1.0.0"}
    assert sorted(p.name for p in recipes.iterdir()) == [f"{RUNTIME}-{runtime_version}.yaml", f"{MODEL}-1.0.0.yaml"]
    for name, version, built_as, file in ((RUNTIME, runtime_version, "NEXT_PATCH", RUNTIME_ZIP),
                                          (MODEL, "1.0.0", "1.0.0", MODEL_ZIP)):
        assert [p.name for p in (artifacts / name / version).iterdir()] == [file]
        assert (artifacts / name / version / file).read_bytes() == (build_dir / "artifacts" / name / built_as
                                                                    / file).read_bytes()
        assert yaml.safe_load((recipes / f"{name}-{version}.yaml").read_text())["ComponentVersion"] == version


@pytest.mark.skipif(not (SHARED / "schemas").is_dir(), reason="../shared/schemas not present")
def test_local_recipes_validate_against_the_recipe_schema(build_dir, tmp_path):
    recipes, _, _ = local_layout(build_dir, tmp_path / "local", root=REPO)
    schema = json.loads((SHARED / "schemas" / "greengrass-recipe.schema.json").read_text())
    for path in sorted(recipes.iterdir()):
        jsonschema.validate(lower_keys(yaml.safe_load(path.read_text())), schema)


def test_cli_component_local_prints_the_greengrass_cli_command(build_dir, tmp_path, capsys):
    assert main(["component", "local", "--build-dir", str(build_dir), "--out", str(tmp_path / "local")]) == 0
    out = capsys.readouterr().out
    assert f'--merge "{RUNTIME}=0.0.1" --merge "{MODEL}=1.0.0"' in out
    update = json.loads(out.split("--update-config '", 1)[1].split("'", 1)[0])
    assert update == {RUNTIME: {"MERGE": {"model": {"component": MODEL, "version": "1.0.0"}}}}


# --- deploy -----------------------------------------------------------------------------------


def deployment(runtime_version: str, merge: dict, run_with: dict | None = None, model_version="1.2.0") -> dict:
    """create_deployment's parameters, in full."""
    runtime = {"componentVersion": runtime_version, "configurationUpdate": {"merge": JsonOf(merge)}}
    if run_with:
        runtime["runWith"] = run_with
    return {
        "targetArn": GROUP_ARN,
        "deploymentName": f"edgeloop {MODEL} {model_version}",
        "components": {RUNTIME: runtime, MODEL: {"componentVersion": model_version}},
        "deploymentPolicies": {
            "failureHandlingPolicy": "ROLLBACK",
            "componentUpdatePolicy": {"timeoutInSeconds": 120, "action": "NOTIFY_COMPONENTS"},
            "configurationValidationPolicy": {"timeoutInSeconds": 60},
        },
        "iotJobConfiguration": {
            "jobExecutionsRolloutConfig": {
                "exponentialRate": {"baseRatePerMinute": 5, "incrementFactor": 2.0,
                                    "rateIncreaseCriteria": {"numberOfSucceededThings": 5}},
                "maximumPerMinute": 100,
            },
            "abortConfig": {"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                                              "thresholdPercentage": 10.0, "minNumberOfExecutedThings": 5}]},
            "timeoutConfig": {"inProgressTimeoutInMinutes": 60},
        },
    }


PINNED = {"model": {"component": MODEL, "version": "1.2.0"}}


def test_deploy_pins_the_model_on_the_highest_published_runtime(aws):
    aws.versions(RUNTIME, [["1.0.2", "1.0.10"], ["1.0.9"]])  # 1.0.10 > 1.0.9, as versions
    aws.described(RUNTIME, "1.0.10")
    aws.described(MODEL, "1.2.0")
    aws.expect("create_deployment", {"deploymentId": "d-1", "iotJobId": "j-1"}, **deployment("1.0.10", PINNED))
    result = deploy(DeployRequest("line-1", "sensor-outliers", "1.2.0"), aws.session())
    assert result == {"deploymentId": "d-1", "iotJobId": "j-1", "targetArn": GROUP_ARN, "runtimeVersion": "1.0.10"}


def test_cli_deploy_flags_reach_the_deployment(aws, monkeypatch, capsys):
    aws.described(RUNTIME, "1.0.1")  # given: no listing
    aws.described(MODEL, "1.2.0")
    merge = {**PINNED, "runtime": {"store": {"url": "s3://bkt/fleet"}}, "onnxruntime": "gpu"}
    aws.expect("create_deployment", {"deploymentId": "d-2"},
               **deployment("1.0.1", merge, run_with={"posixUser": "ggc_user:video"}))
    monkeypatch.setattr(boto3, "Session", lambda **kw: aws.session())
    assert main(["deploy", "--thing-group", "line-1", "--model", MODEL, "--model-version", "1.2.0",
                 "--runtime-version", "1.0.1", "--store", "s3://bkt/fleet", "--onnxruntime", "gpu",
                 "--run-as", "ggc_user:video", "--region", REGION]) == 0
    assert "deployment d-2 to " + GROUP_ARN in capsys.readouterr().out


def test_deploying_an_unpublished_model_fails_before_create_deployment(aws):
    aws.described(RUNTIME, "1.0.1")
    aws.missing("describe_component", arn=arn(MODEL, "9.9.9"))
    with pytest.raises(ComponentError, match=f"{MODEL} 9.9.9 is not published in {REGION}"):
        deploy(DeployRequest("line-1", MODEL, "9.9.9", runtime_version="1.0.1"), aws.session())


def test_deploying_a_failed_model_version_is_refused(aws):
    aws.described(RUNTIME, "1.0.1")
    aws.described(MODEL, "1.2.0", state="FAILED", message="bad recipe")
    with pytest.raises(ComponentError, match="1.2.0 is FAILED in us-east-1, not DEPLOYABLE"):
        deploy(DeployRequest("line-1", MODEL, "1.2.0", runtime_version="1.0.1"), aws.session())


def test_onnxruntime_flavour_is_checked(capsys):
    assert runtime_merge(DeployRequest("g", MODEL, "1.2.0", onnxruntime="cpu"))["onnxruntime"] == "cpu"
    with pytest.raises(ComponentError, match="cpu or gpu"):
        runtime_merge(DeployRequest("g", MODEL, "1.2.0", onnxruntime="tpu"))
    with pytest.raises(SystemExit) as exit_:
        main(["deploy", "--thing-group", "g", "--model-version", "1.2.0", "--onnxruntime", "tpu"])
    assert exit_.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_cli_deploy_needs_a_thing_group(monkeypatch, capsys):
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    assert main(["deploy", "--model-version", "1.2.0"]) == 2
    assert "--thing-group and --model-version are required" in capsys.readouterr().err


def expect_status(aws):
    """The group's latest deployment d-2: dev-a succeeded, dev-b failed, dev-c has only the older d-1."""
    aws.expect("list_deployments", {"deployments": [{"deploymentId": "d-2", "targetArn": GROUP_ARN}]},
               targetArn=GROUP_ARN, historyFilter="LATEST_ONLY")
    aws.expect("get_deployment", {"deploymentId": "d-2", "targetArn": GROUP_ARN, "deploymentName": "edgeloop m",
                                  "deploymentStatus": "ACTIVE",
                                  "components": {MODEL: {"componentVersion": "1.2.0"}}}, deploymentId="d-2")
    devices = [[{"coreDeviceThingName": "dev-a"}, {"coreDeviceThingName": "dev-b"}], [{"coreDeviceThingName": "dev-c"}]]
    aws.pages("list_core_devices", "coreDevices", devices, thingGroupArn=GROUP_ARN)

    def effective(deployment_id, status, **extra):
        return {"deploymentId": deployment_id, "deploymentName": "n", "targetArn": GROUP_ARN,
                "coreDeviceExecutionStatus": status, "creationTimestamp": NOW, "modifiedTimestamp": NOW, **extra}

    for device, deployments in (
            ("dev-a", [effective("d-1", "SUCCEEDED"), effective("d-2", "SUCCEEDED")]),
            ("dev-b", [effective("d-2", "FAILED", reason="model bundle checksum mismatch")]),
            ("dev-c", [effective("d-1", "SUCCEEDED")])):
        aws.expect("list_effective_deployments", {"effectiveDeployments": deployments}, coreDeviceThingName=device)


def test_deployment_status_per_device(aws, monkeypatch, capsys):
    expect_status(aws)
    status = deployment_status(aws.session(), thing_group="line-1")
    assert (status["deploymentId"], status["status"]) == ("d-2", "ACTIVE")
    assert status["devices"] == [{"device": "dev-a", "status": "SUCCEEDED", "reason": ""},
                                 {"device": "dev-b", "status": "FAILED", "reason": "model bundle checksum mismatch"},
                                 {"device": "dev-c", "status": "NOT_STARTED", "reason": ""}]
    text = format_status(status)
    assert "devices: 1 FAILED, 1 NOT_STARTED, 1 SUCCEEDED" in text
    assert any(line.split()[:2] == ["dev-b", "FAILED"] and line.endswith("model bundle checksum mismatch")
               for line in text.splitlines())

    expect_status(aws)
    monkeypatch.setattr(boto3, "Session", lambda **kw: aws.session())
    assert main(["deploy", "status", "--thing-group", "line-1", "--region", REGION]) == 0
    assert capsys.readouterr().out == text + "\n"


# --- IAM --------------------------------------------------------------------------------------


def allowing(policy: dict, action: str) -> list[dict]:
    return [s for s in policy["Statement"] if action in s["Action"]]


def kms_statements(policy: dict) -> list[dict]:
    return [s for s in policy["Statement"] if any(a.startswith("kms:") for a in s["Action"])]


def may_put(policy: dict, device: str, key: str) -> bool:
    resources = [r.replace(THING, device) for s in allowing(policy, "s3:PutObject") for r in s["Resource"]]
    return any(fnmatch.fnmatchcase(f"arn:aws:s3:::bkt/{key}", r) for r in resources)


def test_device_policy_scopes_writes_to_the_device():
    policy = json.loads(json.dumps(device_policy("s3://bkt/fleet", "artifacts-bkt")))
    assert policy["Version"] == "2012-10-17"
    assert all(s["Effect"] == "Allow" and "*" not in s["Resource"] for s in policy["Statement"])
    (put,) = allowing(policy, "s3:PutObject")
    for resource in put["Resource"]:
        assert resource.startswith(tuple(f"arn:aws:s3:::bkt/fleet/{p}/" for p in ("summaries", "outliers", "devices")))
        assert f"/device={THING}/" in resource
    assert any(s["Resource"] == ["arn:aws:s3:::artifacts-bkt/*"] for s in allowing(policy, "s3:GetObject"))
    (listing,) = allowing(policy, "s3:ListBucket")
    assert listing["Resource"] == ["arn:aws:s3:::bkt"]
    (prefix,) = listing["Condition"]["StringLike"]["s3:prefix"]
    presence_prefix = "fleet/" + presence_key("dev-1", "x").rsplit("/", 1)[0] + "/"  # what the runtime lists
    assert fnmatch.fnmatchcase(presence_prefix, prefix.replace(THING, "dev-1"))
    assert not fnmatch.fnmatchcase(presence_prefix, prefix.replace(THING, "dev-2"))
    assert kms_statements(policy) == []

    start = datetime(2025, 3, 1, 12, tzinfo=timezone.utc)
    for device, allowed in (("dev-1", True), ("dev-2", False), ("dev-10", False)):
        for key in (summary_key("sensor-outliers", "1.0.0", device, start, instance="0123456789ab"),
                    outlier_key("sensor-outliers", "1.0.0", device, start, instance="0123456789ab"),
                    presence_key(device, "0123456789ab")):
            assert may_put(policy, "dev-1", "fleet/" + key) is allowed, key


def test_cli_iam_policy_writes_json_with_kms_only_when_given(tmp_path):
    key, out = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234", tmp_path / "policy.json"
    assert main(["iam", "policy", "--store", "s3://bkt/fleet", "--artifact-bucket", "artifacts-bkt",
                 "--kms-key", key, "--out", str(out)]) == 0
    policy = json.loads(out.read_text())
    assert policy == device_policy("s3://bkt/fleet", "artifacts-bkt", kms_key_arn=key)
    assert [s["Resource"] for s in kms_statements(policy)] == [[key]]


# --- retrain, then publish and deploy the winner ---------------------------------------------------


def test_retrain_publishes_and_deploys_an_approved_winner(tmp_path, bundle_dir, aws, s3, sleeps, monkeypatch, capsys):
    from cloud import synthetic
    from cloud.registry import register
    from edge_runtime.store import LocalStore

    store = LocalStore(tmp_path / "registry")
    register(bundle_dir, store)
    drifted = synthetic.device_stream("d", 2880, seed=8, anomaly_rate=0.0, drift=synthetic.Drift("temperature", 2.0),
                                      drift_from=0)
    data = tmp_path / "fresh.csv"
    data.write_text(",".join(synthetic.FEATURES) + "\n" + "\n".join(",".join(f"{v:.5f}" for v in r)
                                                                   for r in drifted.X) + "\n")
    bucket = f"exact-{uuid.uuid4().hex[:12]}"
    aws.missing("describe_component", arn=arn(MODEL, "1.0.1"))  # publish: a new version
    aws.created(MODEL, "1.0.1")
    aws.versions(RUNTIME, [["1.0.2", "1.0.3"]])  # deploy: the highest runtime, both versions deployable
    aws.described(RUNTIME, "1.0.3")
    aws.described(MODEL, "1.0.1")
    pinned = {"model": {"component": MODEL, "version": "1.0.1"}, "runtime": {"store": {"url": "s3://fleet/p7"}}}
    aws.expect("create_deployment", {"deploymentId": "d-9"}, **deployment("1.0.3", pinned, model_version="1.0.1"))
    monkeypatch.setattr(boto3, "Session", lambda **kw: aws.session(s3))
    aws.sts_stub.add_response("get_caller_identity", {"Account": ACCOUNT}, {})  # one session: publish, then deploy

    def retrain(version: str, *more: str) -> int:
        return main(["retrain", "--data", str(data), "--store", str(tmp_path / "registry"), "--model",
                     "sensor-outliers", "--version", "1.0.0", "--new-version", version, "--out",
                     str(tmp_path / version), "--build-dir", str(tmp_path / f"gb-{version}"), "--bucket", bucket,
                     "--region", REGION, *more])

    assert retrain("1.0.5", "--publish") == 2  # registered pending approval: nothing is published
    assert "only an approved version is published" in capsys.readouterr().err
    assert retrain("1.0.1", "--approve", "--deploy", "line-1", "--deploy-store", "s3://fleet/p7") == 0
    out = capsys.readouterr().out
    assert f"published {MODEL} 1.0.1" in out and "deployment d-9 to " + GROUP_ARN in out
    check_recipe(aws.recipes.values[0], MODEL, "1.0.1", bucket, [MODEL_ZIP])
