"""SageMaker Model Registry as the model registry: SageMaker and S3 on moto in server mode (real HTTP),
botocore's Stubber where moto differs from SageMaker (a model package group that exists already), and
publish and the CLI on top. Each test names its groups with a prefix of its own: the moto server is shared."""

from __future__ import annotations

import hashlib
import json
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from greengrass_stub import REGION, GreengrassStub, arn, client
from helpers import REPO, bundle_copy
from test_registry import other_files

from cloud.cli import main
from cloud.components import ComponentError, build_model
from cloud.publish import publish
from cloud.registry import PENDING, LocalRegistry, RegistryError, open_registry
from cloud.sagemaker_registry import SageMakerRegistry
from edge_runtime.bundle import load_bundle
from edge_runtime.contracts import baseline_key, model_key
from edge_runtime.store import LocalStore, S3Store

MODEL = "sensor-outliers"
COMPONENT = f"com.edgeloop.model.{MODEL}"
RUNTIME = "com.edgeloop.EdgeRuntime"


@pytest.fixture
def sm(moto_endpoint):
    return client("sagemaker", endpoint_url=moto_endpoint)


@pytest.fixture
def s3(moto_endpoint):
    return client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def store(s3_bucket, moto_endpoint):
    return S3Store(f"s3://{s3_bucket}/fleet", endpoint_url=moto_endpoint)


@pytest.fixture
def prefix():
    return f"t{uuid.uuid4().hex[:10]}-"


@pytest.fixture
def registry(sm, store, prefix):
    return SageMakerRegistry(sm, store, group_prefix=prefix)


def packages(sm, group: str) -> list[dict]:
    return sm.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]


def test_register_records_a_pending_version_with_its_metrics_and_locations(registry, sm, s3, store, s3_bucket,
                                                                           prefix, bundle_dir):
    done = registry.register(bundle_dir)
    group = f"{prefix}{MODEL}"
    assert (done.model, done.version, done.approval, done.number) == (MODEL, "1.0.0", PENDING, 1)
    assert sm.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupDescription"].startswith(
        f"edgeloop model {MODEL}:")

    d = sm.describe_model_package(ModelPackageName=done.ref)
    manifest = load_bundle(bundle_dir).manifest
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert (d["ModelPackageGroupName"], d["ModelPackageVersion"], d["ModelApprovalStatus"]) == (group, 1, PENDING)
    assert d["ModelPackageDescription"] == f"edgeloop bundle {MODEL} 1.0.0 (files sha256:{digest})"
    folder = f"s3://{s3_bucket}/fleet/models/model={MODEL}/version=1.0.0/"
    assert d["CustomerMetadataProperties"] == {
        "edgeloop:model": MODEL, "edgeloop:version": "1.0.0", "edgeloop:bundle": folder,
        "edgeloop:manifest": folder + "manifest.json",
        "edgeloop:baseline": f"s3://{s3_bucket}/fleet/baselines/model={MODEL}/version=1.0.0/baseline.json",
        "edgeloop:files-sha256": digest}
    assert "InferenceSpecification" not in d  # an edge bundle has no SageMaker serving image

    stats = d["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert stats["ContentType"] == "application/json" and stats["S3Uri"] == folder + "metrics.json"
    body = s3.get_object(Bucket=s3_bucket, Key=f"fleet/models/model={MODEL}/version=1.0.0/metrics.json")["Body"].read()
    assert stats["ContentDigest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    metrics = json.loads(body)
    assert metrics["outlier"]["threshold"] == manifest.outlier.threshold
    assert metrics["outlier"]["target_false_positive_rate"] == manifest.outlier.target_false_positive_rate

    # the files where devices' builds and the fleet review read them; the decision is SageMaker's alone
    for rel in manifest.files:
        assert store.get(model_key(MODEL, "1.0.0", rel)) == (bundle_dir / rel).read_bytes()
    assert store.get(baseline_key(MODEL, "1.0.0")) == (bundle_dir / "baseline.json").read_bytes()
    assert not list(store.list(f"models/model={MODEL}/version=1.0.0/approval"))

    again = registry.register(bundle_dir)  # the same files: the same version, no second package
    assert again.ref == done.ref and len(packages(sm, group)) == 1


def test_approve_and_reject_with_a_description(registry, sm, bundle_dir, tmp_path):
    registry.register(bundle_dir)
    registry.register(bundle_copy(bundle_dir, tmp_path / "b1", "1.0.1"))
    registry.set_approval(MODEL, "1.0.1", "Approved", note="beats 1.0.0 on last week's data")
    registry.set_approval(MODEL, "1.0.0", "Rejected", note="flags the new sensor batch")
    assert registry.approval(MODEL, "1.0.1") == "Approved" and registry.approval(MODEL, "1.0.0") == "Rejected"
    assert registry.approval(MODEL, "9.9.9") is None
    for version, status, note in (("1.0.1", "Approved", "beats 1.0.0 on last week's data"),
                                  ("1.0.0", "Rejected", "flags the new sensor batch")):
        d = sm.describe_model_package(ModelPackageName=registry.describe(MODEL, version).ref)
        assert (d["ModelApprovalStatus"], d["ApprovalDescription"]) == (status, note)
    # registering the same files again keeps the decision
    assert registry.register(bundle_copy(bundle_dir, tmp_path / "b1again", "1.0.1")).approval == "Approved"
    with pytest.raises(RegistryError, match="9.9.9 is not registered in SageMaker Model Registry"):
        registry.set_approval(MODEL, "9.9.9", "Approved")
    with pytest.raises(RegistryError, match="choose one of"):
        registry.set_approval(MODEL, "1.0.0", "Maybe")


def test_versions_are_listed_in_semver_order_over_every_page(sm, store, prefix, bundle_dir, tmp_path):
    registry = SageMakerRegistry(sm, store, group_prefix=prefix, page_size=2)
    order = ["1.0.10", "1.0.2", "2.0.0", "1.0.9", "1.0.0"]  # registration order: not the versions' order
    for v in order:
        registry.register(bundle_copy(bundle_dir, tmp_path / v, v))
    registry.register(bundle_copy(bundle_dir, tmp_path / "other", "0.1.0", name="another-model"))
    sm.create_model_package(ModelPackageGroupName=f"{prefix}{MODEL}", ModelPackageDescription="made by hand",
                            ModelApprovalStatus="Approved")  # not edgeloop's: left out
    calls = []
    sm.meta.events.register("before-parameter-build.sagemaker.ListModelPackages",
                            lambda **kw: calls.append(kw["params"]))

    listed = registry.versions(MODEL)
    assert [v.version for v in listed] == ["1.0.0", "1.0.2", "1.0.9", "1.0.10", "2.0.0"]
    assert {v.version: v.number for v in listed} == {v: order.index(v) + 1 for v in order}  # package numbers
    assert all(v.ref.endswith(f"/{v.number}") and v.approval == PENDING for v in listed)
    assert len(calls) == 3 and all(c["MaxResults"] == 2 for c in calls) and "NextToken" in calls[-1]

    everything = registry.versions()  # every group under the prefix, every page of each
    assert [(v.model, v.version) for v in everything] == [("another-model", "0.1.0")] + [
        (MODEL, v.version) for v in listed]


def test_a_version_registered_with_other_files_is_refused(registry, sm, store, prefix, bundle_dir, tmp_path):
    registry.register(bundle_dir)
    changed = other_files(bundle_dir, tmp_path / "changed", "1.0.0")
    with pytest.raises(RegistryError, match=r"1.0.0 is already registered \(arn:.*\) with other files; bump"):
        registry.register(changed)
    assert len(packages(sm, f"{prefix}{MODEL}")) == 1
    assert store.get(baseline_key(MODEL, "1.0.0")) == (bundle_dir / "baseline.json").read_bytes()

    # the store refuses too: 1.0.1 holds other files there (say, from the local registry) but not in SageMaker
    LocalRegistry(store).register(bundle_copy(bundle_dir, tmp_path / "local", "1.0.1"))
    with pytest.raises(RegistryError, match="1.0.1 is already registered with other files"):
        registry.register(other_files(bundle_dir, tmp_path / "changed1", "1.0.1"))
    assert [v.version for v in registry.versions(MODEL)] == ["1.0.0"]


def test_fetch_bundle_checks_it_is_the_registered_one(registry, sm, store, bundle_dir, tmp_path):
    registry.register(bundle_dir)
    fetched = registry.fetch_bundle(MODEL, "1.0.0", tmp_path / "fetched")
    assert load_bundle(fetched).manifest.files == load_bundle(bundle_dir).manifest.files
    # someone replaced the version's files in the store behind the registry's back
    changed = other_files(bundle_dir, tmp_path / "changed", "1.0.0")
    for rel in ("baseline.json", "manifest.json"):
        store.put(model_key(MODEL, "1.0.0", rel), (changed / rel).read_bytes())
    with pytest.raises(RegistryError, match="is not the bundle registered in SageMaker"):
        registry.fetch_bundle(MODEL, "1.0.0", tmp_path / "again")
    reader = SageMakerRegistry(sm, group_prefix=registry.group_prefix)  # no store: lists and decides only
    assert reader.approval(MODEL, "1.0.0") == PENDING
    with pytest.raises(RegistryError, match="needs the S3 store"):
        reader.fetch_bundle(MODEL, "1.0.0", tmp_path / "x")


def test_names_sagemaker_cannot_hold_are_refused_clearly(sm, store, prefix, bundle_dir, tmp_path):
    registry = SageMakerRegistry(sm, store, group_prefix=prefix)
    registry.register(bundle_dir)
    dotted = bundle_copy(bundle_dir, tmp_path / "dotted", "1.0.0", name="sensor.outliers")  # group sensor-outliers too
    with pytest.raises(RegistryError, match="holds model sensor-outliers, not sensor.outliers"):
        registry.register(dotted)
    with pytest.raises(RegistryError, match="not a model package group name"):
        registry.group_name("x" * 70)
    with pytest.raises(RegistryError, match="must be s3://bucket/prefix"):
        SageMakerRegistry(sm, LocalStore(tmp_path / "local"))


def test_a_group_created_meanwhile_is_used_and_the_request_is_what_the_api_takes(store, bundle_dir, s3_bucket):
    """moto overwrites a group that exists; SageMaker refuses. Stubbed: the request is validated against
    the service model, and a group another registration just created is used, not an error."""
    sm = client("sagemaker")
    group = f"{MODEL}"
    with Stubber(sm) as stub:
        stub.add_client_error("describe_model_package_group", "ValidationException",
                              f"ModelPackageGroup arn:aws:sagemaker:{REGION}:123456789012:model-package-group/{group} "
                              "does not exist.", expected_params={"ModelPackageGroupName": group})
        stub.add_client_error("create_model_package_group", "ValidationException", "Model Package Group already exists")
        stub.add_response("describe_model_package_group", {
            "ModelPackageGroupName": group, "ModelPackageGroupArn": "arn:aws:sagemaker:us-east-1:123456789012:"
            f"model-package-group/{group}", "ModelPackageGroupDescription": f"edgeloop model {MODEL}: versions",
            "CreationTime": "2025-01-01T00:00:00Z", "CreatedBy": {}, "ModelPackageGroupStatus": "Completed"},
            {"ModelPackageGroupName": group})
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": []},
                          {"ModelPackageGroupName": group, "SortBy": "CreationTime", "SortOrder": "Ascending",
                           "MaxResults": 100})
        package = f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{group}/1"
        stub.add_response("create_model_package", {"ModelPackageArn": package})
        sent = []
        sm.meta.events.register("before-parameter-build.sagemaker.CreateModelPackage",
                                lambda **kw: sent.append(kw["params"]))
        done = SageMakerRegistry(sm, store).register(bundle_dir, status="Approved", note="")
        stub.assert_no_pending_responses()
    assert (done.ref, done.number, done.approval) == (package, 1, "Approved")
    (request,) = sent
    assert request["ModelApprovalStatus"] == "Approved" and request["ModelPackageGroupName"] == group
    assert len(request["ClientToken"]) == 36  # a retry of this registration makes no second package


def test_a_model_without_a_group_has_no_versions():
    """If SageMaker answers a listing of a group that does not exist with an error, not an empty list."""
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        for _ in range(2):
            stub.add_client_error("list_model_packages", "ValidationException",
                                  "ModelPackageGroup arn:aws:sagemaker:us-east-1:123456789012:model-package-group/"
                                  "never does not exist.")
        registry = SageMakerRegistry(sm)
        assert registry.approval("never", "1.0.0") is None and registry.versions("never") == []
        stub.add_client_error("list_model_packages", "AccessDeniedException", "not allowed")
        with pytest.raises(ClientError, match="not allowed"):
            registry.versions("never")


# --- publish --------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path, bundle_dir):
    out = tmp_path / "greengrass-build"
    build_model(bundle_dir, out, RUNTIME, REPO)
    return out


def test_publish_wants_the_version_approved_in_sagemaker(registry, built, bundle_dir, s3, moto_endpoint):
    registry.register(bundle_dir)
    aws = GreengrassStub()
    aws.missing("describe_component", arn=arn(COMPONENT, "1.0.0"))
    with pytest.raises(ComponentError, match=f"is PendingManualApproval in the registry; approve it first: edgeloop "
                       f"model approve --model {MODEL} --version 1.0.0 --registry {registry.spec}"):
        publish(built, root=REPO, session=aws.session(client("s3")), only=[COMPONENT], progress=lambda m: None,
                registry=registry)

    registry.set_approval(MODEL, "1.0.0", "Approved", note="reviewed")
    bucket = f"exact-{uuid.uuid4().hex[:12]}"
    aws.missing("describe_component", arn=arn(COMPONENT, "1.0.0"))
    aws.created(COMPONENT, "1.0.0")
    (done,) = publish(built, root=REPO, bucket=bucket, session=aws.session(s3), only=[COMPONENT],
                      progress=lambda m: None, registry=registry)
    assert (done.name, done.version) == (COMPONENT, "1.0.0")
    assert s3.head_object(Bucket=bucket, Key=f"{COMPONENT}/1.0.0/bundle.zip")["ContentLength"] > 0
    aws.gg_stub.assert_no_pending_responses()


def test_cli_publish_takes_a_sagemaker_registry(registry, built, bundle_dir, moto_endpoint, monkeypatch, capsys):
    registry.register(bundle_dir)
    aws = GreengrassStub()
    aws.missing("describe_component", arn=arn(COMPONENT, "1.0.0"))
    session = aws.session(client("s3"))
    monkeypatch.setattr(boto3, "Session", lambda **kw: session)
    assert main(["component", "publish", "--build-dir", str(built), "--component", COMPONENT, "--bucket", "b",
                 "--region", REGION, "--registry", registry.spec, "--endpoint-url", moto_endpoint]) == 2
    assert f"{MODEL} 1.0.0 is PendingManualApproval in the registry" in capsys.readouterr().err
    aws.gg_stub.assert_no_pending_responses()


# --- the command line -----------------------------------------------------------------------------


def test_cli_end_to_end(sm, s3_bucket, prefix, moto_endpoint, bundle_dir, tmp_path, capsys):
    aws = ["--registry", f"sagemaker:{prefix}", "--region", REGION, "--endpoint-url", moto_endpoint]
    store = ["--store", f"s3://{s3_bucket}/fleet"]
    assert main(["model", "register", *aws, *store, "--bundle", str(bundle_dir)]) == 0
    assert main(["model", "register", *aws, *store, "--bundle", str(bundle_copy(bundle_dir, tmp_path / "b", "1.0.10")),
                 "--approve", "--note", "urgent fix"]) == 0
    out = capsys.readouterr().out.splitlines()
    group_arn = f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{prefix}{MODEL}".lower()
    assert out == [f"registered: {group_arn}/1 ({PENDING})", f"registered: {group_arn}/2 (Approved)"]

    assert main(["model", "approve", *aws, "--model", MODEL, "--version", "1.0.0", "--note", "looks right"]) == 0
    assert main(["model", "reject", *aws, "--model", MODEL, "--version", "1.0.10"]) == 0
    capsys.readouterr()
    assert main(["model", "list", *aws, "--model", MODEL]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [[MODEL, "1.0.0", "Approved", f"{group_arn}/1"], [MODEL, "1.0.10", "Rejected", f"{group_arn}/2"]]
    registry = SageMakerRegistry(sm, group_prefix=prefix)
    assert registry.describe(MODEL, "1.0.0").note == "looks right"

    assert main(["model", "approve", *aws, "--model", MODEL, "--version", "9.9.9"]) == 2
    assert "9.9.9 is not registered in SageMaker Model Registry" in capsys.readouterr().err
    assert main(["model", "register", *aws, "--bundle", str(bundle_dir)]) == 2  # no store for the files
    assert "needs the S3 store" in capsys.readouterr().err
    assert main(["model", "register", *aws, "--store", str(tmp_path / "dir"), "--bundle", str(bundle_dir)]) == 2
    assert "must be s3://bucket/prefix" in capsys.readouterr().err
    assert main(["model", "list", *aws, "--rebuild-index"]) == 2
    assert main(["model", "list"]) == 2  # neither registry
    assert "give the local registry's --store" in capsys.readouterr().err


def test_open_registry_picks_the_backend(tmp_path, moto_endpoint, s3_bucket):
    assert isinstance(open_registry(str(tmp_path / "reg")), LocalRegistry)
    s3_local = open_registry(f"s3://{s3_bucket}/reg", endpoint_url=moto_endpoint)
    assert isinstance(s3_local, LocalRegistry) and s3_local.spec == f"s3://{s3_bucket}/reg"
    for spec, group_prefix in (("sagemaker", ""), ("sagemaker:plant7-", "plant7-"), ("sagemaker://plant7-", "plant7-")):
        reg = open_registry(spec, f"s3://{s3_bucket}/fleet", endpoint_url=moto_endpoint, region=REGION)
        assert isinstance(reg, SageMakerRegistry) and reg.group_prefix == group_prefix
        assert reg.group_name("sensor_outliers.v2") == f"{group_prefix}sensor-outliers-v2"


def test_cli_retrain_takes_its_champion_from_sagemaker_and_registers_the_winner_there(
        sm, s3_bucket, prefix, moto_endpoint, bundle_dir, tmp_path, capsys):
    from test_retrain import COHORT_DRIFT, fresh_csv

    aws = ["--registry", f"sagemaker:{prefix}", "--region", REGION, "--endpoint-url", moto_endpoint]
    store = ["--store", f"s3://{s3_bucket}/fleet"]
    assert main(["model", "register", *aws, *store, "--bundle", str(bundle_dir), "--approve"]) == 0
    data = fresh_csv(tmp_path / "fresh.csv", COHORT_DRIFT)
    assert main(["retrain", *aws, *store, "--data", str(data), "--model", MODEL, "--version", "1.0.0",
                 "--new-version", "1.0.1", "--out", str(tmp_path / "out")]) == 0
    assert f"registered 1.0.1 ({PENDING})" in capsys.readouterr().out
    registry = SageMakerRegistry(sm, group_prefix=prefix)
    assert [(v.version, v.approval) for v in registry.versions(MODEL)] == [("1.0.0", "Approved"), ("1.0.1", PENDING)]
    assert main(["retrain", *aws, "--data", str(data), "--model", MODEL, "--version", "1.0.0",
                 "--new-version", "1.0.2"]) == 2  # the files live on the store: without it, a clear error
    assert "needs the S3 store for the files (--store s3://...)" in capsys.readouterr().err
