"""Publishing built components to AWS IoT Greengrass, the way ``gdk component publish`` does.

For each component in ``greengrass-build/``: pick the version (gdk-config's, or for
``NEXT_PATCH`` one patch above the highest in the account, 1.0.0 for the first), refuse if that
version already exists (before anything is uploaded), upload the artifacts to
``s3://<bucket>/<component>/<version>/<file>`` (the bucket is ``<bucket>-<region>-<account>``
from gdk-config.json, or exactly ``--bucket``; created if missing), point the recipe's artifact
URIs there, create the component version and wait until the service calls it deployable.

Also the local layout for ``greengrass-cli deployment create --recipeDir --artifactDir``, to try
the components on one device before a fleet.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from edge_runtime.contracts import MODEL_COMPONENT_PREFIX, SEMVER

from .components import MAX_RECIPE_BYTES, ComponentError, read_gdk_config

PUBLISHED_FILE = "published.json"  # in greengrass-build/: what the last publish created, for deploy


@dataclass
class Publishable:
    """A built component: its recipe and artifact folder in ``greengrass-build/``."""

    name: str
    version: str  # as built ("NEXT_PATCH" for the runtime unless gdk-config pins one)
    recipe: dict
    artifacts: list[Path]


@dataclass
class Published:
    name: str
    version: str
    arn: str
    uris: list[str]
    recipe: Path


def semver_key(version: str) -> tuple:
    m = re.match(SEMVER, version)
    return tuple(int(x) for x in m.groups()[:3]) if m else (-1,)


def next_patch(highest: str | None) -> str:
    if not highest:
        return "1.0.0"
    major, minor, patch = semver_key(highest)
    return f"{major}.{minor}.{patch + 1}"


def account_of(session) -> str:
    return session.client("sts").get_caller_identity()["Account"]


def component_arn(partition: str, region: str, account: str, name: str, version: str | None = None) -> str:
    arn = f"arn:{partition}:greengrass:{region}:{account}:components:{name}"
    return f"{arn}:versions:{version}" if version else arn


def highest_version(gg, arn: str) -> str | None:
    versions = []
    for page in gg.get_paginator("list_component_versions").paginate(arn=arn):
        versions += [v["componentVersion"] for v in page.get("componentVersions", [])]
    return max(versions, key=semver_key) if versions else None


def component_state(gg, arn: str) -> str | None:
    """The version's state (REQUESTED, INITIATED, DEPLOYABLE, FAILED, DEPRECATED), None if there is none."""
    try:
        return gg.describe_component(arn=arn).get("status", {}).get("componentState") or "UNKNOWN"
    except gg.exceptions.ResourceNotFoundException:
        return None


def version_exists(gg, arn: str) -> bool:
    return component_state(gg, arn) is not None


def bucket_name(bucket: str | None, gdk_publish: dict, region: str, account: str) -> str:
    """``--bucket`` exactly as given, else gdk-config's publish.bucket + ``-<region>-<account>``."""
    if bucket:
        return bucket
    prefix = str(gdk_publish.get("bucket") or "").strip()
    if not prefix:
        raise ComponentError("no bucket: give --bucket or set publish.bucket in gdk-config.json")
    return f"{prefix}-{region}-{account}"


def built_components(build_dir: Path, root: Path) -> list[Publishable]:
    """The runtime component and every model component in ``build_dir``."""
    name, gdk = read_gdk_config(root)
    found = []
    runtime_recipe = build_dir / "recipes" / "recipe.yaml"
    if runtime_recipe.is_file():
        version = str(gdk.get("version") or "NEXT_PATCH")
        found.append(_publishable(name, version, runtime_recipe, build_dir))
    for path in sorted((build_dir / "recipes").glob(f"{MODEL_COMPONENT_PREFIX}*.yaml")):
        if path.name.endswith(".published.yaml"):
            continue
        recipe = yaml.safe_load(path.read_text())
        found.append(_publishable(recipe["ComponentName"], recipe["ComponentVersion"], path, build_dir))
    if not found:
        raise ComponentError(f"nothing built in {build_dir}: run `edgeloop component build` (or `gdk component build`)")
    return found


def _publishable(name: str, version: str, recipe_path: Path, build_dir: Path) -> Publishable:
    recipe = yaml.safe_load(recipe_path.read_text())
    folder = build_dir / "artifacts" / name / version
    artifacts = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    wanted = {Path(a["URI"]).name for m in recipe.get("Manifests") or [] for a in m.get("Artifacts") or []
              if str(a.get("URI", "")).startswith("s3://")}
    missing = wanted - {p.name for p in artifacts}
    if missing:
        raise ComponentError(f"{name}: the recipe names {sorted(missing)}, which are not in {folder}; build again")
    return Publishable(name, version, recipe, artifacts)


def publish_recipe(recipe: dict, version: str, bucket: str) -> str:
    """The recipe with its version set and its S3 artifact URIs pointing at where we upload."""
    recipe = json.loads(json.dumps(recipe))
    recipe["ComponentVersion"] = version
    for manifest in recipe.get("Manifests") or []:
        for artifact in manifest.get("Artifacts") or []:
            uri = str(artifact.get("URI", ""))
            if uri.startswith("s3://"):
                artifact["URI"] = f"s3://{bucket}/{recipe['ComponentName']}/{version}/{Path(uri).name}"
    text = yaml.safe_dump(recipe, sort_keys=False, width=200)
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ComponentError(f"{recipe['ComponentName']}: the recipe is {len(text.encode())} bytes; "
                             f"Greengrass allows {MAX_RECIPE_BYTES}")
    return text


def _check_approved(registry, model: str, version: str) -> None:
    """Only a model version someone approved goes to a fleet. ``registry``: a ``Registry`` (local or
    SageMaker Model Registry), or an object store holding a local registry."""
    from .registry import as_registry, is_sagemaker

    if registry is None:
        raise ComponentError(f"model {model} {version}: give the registry it was approved in (--registry), "
                             "or --unapproved to publish it without approval")
    registry = as_registry(registry)
    status = registry.approval(model, version)
    if status != "Approved":
        where = f"--registry {registry.spec}" if is_sagemaker(registry.spec) else f"--store {registry.spec}"
        raise ComponentError(f"model {model} {version} is {status or 'not registered'} in the registry; approve it "
                             f"first: edgeloop model approve --model {model} --version {version} {where}")


def ensure_bucket(s3, bucket: str, region: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except s3.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise ComponentError(f"bucket {bucket}: {err}") from None
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=bucket, **kwargs)


def wait_deployable(gg, arn: str, timeout_s: float = 120.0, poll_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = gg.describe_component(arn=arn).get("status", {})
        state = status.get("componentState")
        if state == "DEPLOYABLE":
            return
        if state == "FAILED":
            errors = status.get("errors") or {}
            raise ComponentError(f"{arn}: Greengrass refused the component: {status.get('message', '')} {errors}")
        if time.monotonic() >= deadline:
            raise ComponentError(f"{arn}: still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def publish(build_dir: str | Path = "greengrass-build", root: Path | None = None, bucket: str | None = None,
            region: str | None = None, session=None, only: list[str] | None = None, wait_s: float = 120.0,
            progress=print, registry=None, unapproved: bool = False) -> list[Published]:
    """Publish what ``build_dir`` holds; refuses, before touching S3, a version that exists and a
    model version the ``registry`` has not approved (``unapproved``: publish it anyway)."""
    import boto3

    from .components import project_root

    root = root or project_root()
    build_dir = Path(build_dir)
    _, gdk = read_gdk_config(root)
    gdk_publish = gdk.get("publish") or {}
    region = region or gdk_publish.get("region") or (session.region_name if session else None)
    if not region:
        raise ComponentError("no region: give --region or set publish.region in gdk-config.json")
    session = session or boto3.Session(region_name=region)
    gg = session.client("greengrassv2", region_name=region)
    s3 = session.client("s3", region_name=region)
    account = account_of(session)
    partition = session.get_partition_for_region(region)
    bucket = bucket_name(bucket, gdk_publish, region, account)
    built = built_components(build_dir, root)
    unknown = sorted(set(only or ()) - {c.name for c in built})
    if unknown:
        raise ComponentError(f"not built in {build_dir}: {', '.join(unknown)} (built: "
                             f"{', '.join(c.name for c in built)})")
    components = [c for c in built if not only or c.name in only]

    plan = []  # decide every version, and refuse, before any upload
    for c in components:
        base = component_arn(partition, region, account, c.name)
        version = next_patch(highest_version(gg, base)) if c.version == "NEXT_PATCH" else c.version
        if version_exists(gg, component_arn(partition, region, account, c.name, version)):
            raise ComponentError(
                f"{c.name} {version} already exists in {region}; not overwriting its artifacts. "
                + ("Bump the model's version (edgeloop train --version) and build again."
                   if c.name.startswith(MODEL_COMPONENT_PREFIX) else
                   "Set version to NEXT_PATCH or a new version in gdk-config.json."))
        if c.name.startswith(MODEL_COMPONENT_PREFIX) and not unapproved:
            _check_approved(registry, c.name.removeprefix(MODEL_COMPONENT_PREFIX), version)
        plan.append((c, version, publish_recipe(c.recipe, version, bucket)))

    ensure_bucket(s3, bucket, region)
    done = []
    for c, version, text in plan:
        uris = []
        for artifact in c.artifacts:
            key = f"{c.name}/{version}/{artifact.name}"
            progress(f"uploading {artifact.name} ({artifact.stat().st_size / 1e6:.1f} MB) to s3://{bucket}/{key}")
            s3.upload_file(str(artifact), bucket, key)
            uris.append(f"s3://{bucket}/{key}")
        created = gg.create_component_version(inlineRecipe=text.encode())
        arn = created["arn"]
        if wait_s > 0:
            wait_deployable(gg, arn, wait_s)
        path = build_dir / "recipes" / f"{c.name}-{version}.published.yaml"
        path.write_text(text)
        progress(f"published {c.name} {version}")
        done.append(Published(c.name, version, arn, uris, path))
        record = {"region": region, "account": account, "bucket": bucket,
                  "components": {p.name: p.version for p in done}}
        (build_dir / PUBLISHED_FILE).write_text(json.dumps(record, indent=1))  # kept if a later one fails
    return done


def local_layout(build_dir: str | Path, out: str | Path, root: Path | None = None,
                 runtime_version: str | None = None) -> tuple[Path, Path, dict[str, str]]:
    """``recipes/`` and ``artifacts/<name>/<version>/`` for ``greengrass-cli deployment create``.

    ``NEXT_PATCH`` becomes ``runtime_version`` (default 0.0.1: local builds sort below published ones).
    """
    from .components import project_root

    root = root or project_root()
    out = Path(out)
    recipes, artifacts = out / "recipes", out / "artifacts"
    shutil.rmtree(out, ignore_errors=True)
    versions = {}
    for c in built_components(Path(build_dir), root):
        version = (runtime_version or "0.0.1") if c.version == "NEXT_PATCH" else c.version
        if not re.match(SEMVER, version):
            raise ComponentError(f"{c.name}: {version!r} is not major.minor.patch")
        folder = artifacts / c.name / version
        folder.mkdir(parents=True)
        for a in c.artifacts:
            shutil.copy2(a, folder / a.name)
        recipes.mkdir(parents=True, exist_ok=True)
        (recipes / f"{c.name}-{version}.yaml").write_text(publish_recipe(c.recipe, version, "BUCKET_NAME"))
        versions[c.name] = version
    return recipes, artifacts, versions
