"""The Greengrass components as built: GDK's custom-build contract, the recipes, the artifacts."""

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import REPO, SHARED
from packaging.requirements import Requirement

from cloud.components import MAX_RECIPE_BYTES, build_model, build_runtime, lower_keys, runtime_artifact_name
from cloud.wheels import FLAVOURS, read_lock
from edge_runtime.contracts import load_runtime_config

schemas = pytest.mark.skipif(not (SHARED / "schemas").is_dir(), reason="../shared/schemas not present")
ARCH = platform.machine()
RUNTIME = "com.edgeloop.EdgeRuntime"


def recipe_schema():
    return json.loads((SHARED / "schemas" / "greengrass-recipe.schema.json").read_text())


def validate_recipe(path):
    text = path.read_text()
    assert len(text.encode()) < MAX_RECIPE_BYTES
    jsonschema.validate(lower_keys(yaml.safe_load(text)), recipe_schema())


@pytest.fixture(scope="module")
def runtime_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "greengrass-build"
    return out, build_runtime(out, REPO, arches=[ARCH], progress=lambda m: None)


@schemas
def test_gdk_config_and_root_recipe_validate():
    gdk = json.loads((REPO / "gdk-config.json").read_text())
    jsonschema.validate(gdk, json.loads((SHARED / "schemas" / "gdk-config.schema.json").read_text()))
    validate_recipe(REPO / "recipe.yaml")


@schemas
def test_schema_check_is_not_vacuous():
    broken = lower_keys(yaml.safe_load((REPO / "recipe.yaml").read_text()))
    del broken["componentname"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, recipe_schema())


def gdk_project(tmp_path: Path, version: str) -> Path:
    """A GDK project as a user has one: our sources, this checkout's virtual environment beside them."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("recipe.yaml", "components", "recipes"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, project / name)
    gdk = json.loads((REPO / "gdk-config.json").read_text())
    gdk["component"][RUNTIME]["version"] = version
    (project / "gdk-config.json").write_text(json.dumps(gdk))
    (project / ".venv").symlink_to(Path(sys.prefix))
    return project


@schemas
@pytest.mark.parametrize("version", ["NEXT_PATCH", "2.3.4"])
def test_gdk_custom_build_writes_the_layout_gdk_publishes(tmp_path, version):
    """What `gdk component build` runs, as it runs it: the command from gdk-config.json, in the
    project folder, with the virtual environment not activated (not on PATH)."""
    project = gdk_project(tmp_path, version)
    command = json.loads((project / "gdk-config.json").read_text())["component"][RUNTIME]["build"]
    assert command["build_system"] == "custom"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "EDGELOOP_BUILD_ARCH": ARCH}
    done = subprocess.run(command["custom_build_command"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # GDK's publish reads greengrass-build/recipes/<the project's recipe file name> and uploads
    # every file of greengrass-build/artifacts/<name>/<version as configured>/; a recipe URI is
    # rewritten only if a file of that name is there
    recipe_path = project / "greengrass-build" / "recipes" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    folder = project / "greengrass-build" / "artifacts" / RUNTIME / version
    assert recipe["ComponentName"] == RUNTIME and recipe["ComponentVersion"] == version
    uris = [a["URI"] for m in recipe["Manifests"] for a in m["Artifacts"]]
    built = sorted(p.name for p in folder.iterdir())
    assert sorted(Path(u).name for u in uris) == built == [runtime_artifact_name(ARCH)]
    assert [m["Platform"] for m in recipe["Manifests"]] == [
        {"os": "linux", "architecture": {"x86_64": "amd64", "aarch64": "aarch64"}[ARCH]}]
    if version != "NEXT_PATCH":
        validate_recipe(recipe_path)


@schemas
def test_runtime_recipe_installs_offline_into_its_work_folder_with_least_privilege(runtime_build):
    _, runtime = runtime_build
    validate_recipe(REPO / "recipe.yaml")
    recipe = yaml.safe_load(runtime.recipe.read_text())
    deps = recipe["ComponentDependencies"]
    assert deps["aws.greengrass.TokenExchangeService"]["DependencyType"] == "HARD"
    assert deps["aws.greengrass.Nucleus"]["VersionRequirement"].startswith(">=2.6.0")
    root = yaml.safe_load((REPO / "recipe.yaml").read_text())
    assert {m["Platform"]["architecture"] for m in root["Manifests"]} == {"amd64", "aarch64"}
    for manifest in recipe["Manifests"]:
        (artifact,) = manifest["Artifacts"]
        assert artifact["Unarchive"] == "ZIP" and artifact["Permission"]["Read"] == "OWNER"
        folder = Path(artifact["URI"]).name.removesuffix(".zip")
        life = manifest["Lifecycle"]
        install, run = life["Install"]["Script"], life["Run"]["Script"]
        assert f"{{artifacts:decompressedPath}}/{folder}/install.py" in install
        assert "--venv {work:path}/venv" in install and "--user" not in install
        assert "{configuration:/onnxruntime}" in install and "{configuration:/pipIndexUrl}" in install
        assert run.startswith("exec {work:path}/venv/bin/python") and "device_id={iot:thingName}" in run
        assert "{configuration:" not in run  # a model or window change must not restart the runtime
        assert life["Setenv"] == {"EDGELOOP_GREENGRASS_ROOT": "{kernel:rootPath}"}
        assert not life["Install"].get("RequiresPrivilege") and "RequiresPrivilege" not in life.get("Run", {})
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert defaults["onnxruntime"] == "cpu" and defaults["pipIndexUrl"] == "" and defaults["model"] == {}
    runtime_cfg = load_runtime_config(None, {"device_id": "d", "bundle": "b"}, defaults["runtime"])
    assert runtime_cfg.source.kind == "ipc" and runtime_cfg.publish.kind == "ipc"
    # only the operations the runtime calls, only this device's topics
    granted = {(service, op, res) for service, policies in defaults["accessControl"].items()
               for p in policies.values() for op in p["operations"] for res in p["resources"]}
    assert granted == {
        ("aws.greengrass.ipc.pubsub", "aws.greengrass#SubscribeToTopic", "edgeloop/{iot:thingName}/records"),
        ("aws.greengrass.ipc.mqttproxy", "aws.greengrass#PublishToIoTCore", "edgeloop/{iot:thingName}/outliers"),
        ("aws.greengrass.ipc.mqttproxy", "aws.greengrass#PublishToIoTCore", "edgeloop/{iot:thingName}/health"),
    }
    assert all(k.startswith(f"{RUNTIME}:") for policies in defaults["accessControl"].values() for k in policies)


def test_runtime_artifact_carries_the_installer_the_lock_and_every_wheel(runtime_build):
    _, runtime = runtime_build
    (artifact,) = runtime.artifacts
    with zipfile.ZipFile(artifact) as zf:
        names = set(zf.namelist())
        build = json.loads(zf.read("build.json"))
        own = [n for n in names if n.startswith("wheels/edgeloop_runtime-")]
        with zf.open(own[0]) as f, zipfile.ZipFile(f) as wheel:
            packaged = {n.split("/")[0] for n in wheel.namelist()}
    assert {"install.py", "requirements.lock", "build.json"} <= names
    assert not any(n.startswith(("edgeloop-runtime", "bundle/")) for n in names)  # entries at the top
    assert build["arch"] == ARCH and build["flavours"] == ["cpu"]
    assert packaged == {"edge_runtime", own[0].removeprefix("wheels/").split("-py3")[0] + ".dist-info"}
    pins, _ = read_lock(REPO / "components" / "runtime" / "requirements.lock")
    wheels = {n.removeprefix("wheels/").split("-")[0].lower().replace("_", "-")
              for n in names if n.startswith("wheels/")}
    assert set(pins) - {FLAVOURS["gpu"]} <= wheels  # every pin but the GPU flavour, which was not asked for


def test_the_lock_pins_every_requirement_it_serves():
    pins, header = read_lock(REPO / "components" / "runtime" / "requirements.lock")
    assert header["python"] == "3.11" and "x86_64" in header["arches"] and "aarch64" in header["arches"]
    assert {"pip", "onnxruntime", "onnxruntime-gpu"} <= set(pins)
    for line in (REPO / "components" / "runtime" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pinned = pins[req.name.lower().replace("_", "-")].split("==")[1]
            assert req.specifier.contains(pinned), f"{line} is not satisfied by the lock's {pinned}"


@schemas
def test_model_component_is_the_bundle_readable_by_the_runtime(tmp_path, bundle_dir):
    model = build_model(bundle_dir, tmp_path, RUNTIME, REPO)
    validate_recipe(model.recipe)
    recipe = yaml.safe_load(model.recipe.read_text())
    assert recipe["ComponentName"] == "com.edgeloop.model.sensor-outliers"
    assert "ComponentDependencies" not in recipe and "Lifecycle" not in recipe["Manifests"][0]
    (artifact,) = recipe["Manifests"][0]["Artifacts"]
    assert artifact["URI"] == f"s3://BUCKET_NAME/{model.name}/{model.version}/bundle.zip"
    assert artifact["Unarchive"] == "ZIP" and artifact["Permission"]["Read"] == "ALL"
    assert model.artifacts == [tmp_path / "artifacts" / model.name / model.version / "bundle.zip"]
    with zipfile.ZipFile(model.artifacts[0]) as zf:
        # unzipped into {artifacts:decompressedPath}/bundle/, which is where the runtime looks
        assert set(zf.namelist()) == {p.name for p in bundle_dir.iterdir()}


def test_same_sources_give_the_same_artifacts(tmp_path, runtime_build, bundle_dir):
    _, runtime = runtime_build
    again = build_runtime(tmp_path / "b", REPO, arches=[ARCH], progress=lambda m: None)
    assert again.artifacts[0].read_bytes() == runtime.artifacts[0].read_bytes()
    one = build_model(bundle_dir, tmp_path / "m1", RUNTIME, REPO).artifacts[0].read_bytes()
    assert build_model(bundle_dir, tmp_path / "m2", RUNTIME, REPO).artifacts[0].read_bytes() == one
