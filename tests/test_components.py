import json
import zipfile

import jsonschema
import pytest
import yaml
from helpers import REPO, SHARED

from cloud.components import MAX_RECIPE_BYTES, build_components, lower_keys

schemas = pytest.mark.skipif(not (SHARED / "schemas").is_dir(), reason="../shared/schemas not present")


def recipe_schema():
    return json.loads((SHARED / "schemas" / "greengrass-recipe.schema.json").read_text())


def validate_recipe(path):
    text = path.read_text()
    assert len(text.encode()) < MAX_RECIPE_BYTES
    jsonschema.validate(lower_keys(yaml.safe_load(text)), recipe_schema())


@schemas
def test_gdk_config_and_root_recipe_validate():
    gdk = json.loads((REPO / "gdk-config.json").read_text())
    jsonschema.validate(gdk, json.loads((SHARED / "schemas" / "gdk-config.schema.json").read_text()))
    (component,) = gdk["component"].values()
    assert component["build"] == {"build_system": "custom", "custom_build_command": ["edgeloop", "component", "build"]}
    validate_recipe(REPO / "recipe.yaml")


@schemas
def test_schema_check_is_not_vacuous():
    broken = lower_keys(yaml.safe_load((REPO / "recipe.yaml").read_text()))
    del broken["componentname"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, recipe_schema())


@schemas
def test_build_writes_runtime_and_model_components(tmp_path, bundle_dir):
    out = tmp_path / "greengrass-build"
    runtime, model = build_components(out, [bundle_dir], store_url="s3://fleet/bucket", root=REPO)
    assert runtime.recipe == out / "recipes" / "recipe.yaml"
    assert runtime.artifacts[0] == out / "artifacts" / runtime.name / runtime.version / "edgeloop-runtime.zip"
    for c in (runtime, model):
        validate_recipe(c.recipe)
    with zipfile.ZipFile(runtime.artifacts[0]) as zf:
        names = zf.namelist()
    assert "edgeloop-runtime/edge_runtime/runtime.py" in names
    assert "edgeloop-runtime/requirements.txt" in names
    assert not any(n.startswith(("edgeloop-runtime/cloud", "edgeloop-runtime/model_compile")) for n in names)

    recipe = yaml.safe_load(model.recipe.read_text())
    assert recipe["ComponentName"] == "com.edgeloop.model.sensor-outliers"
    assert recipe["ComponentDependencies"] == {
        runtime.name: {"VersionRequirement": f">={runtime.version}", "DependencyType": "HARD"}}
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"]["storeUrl"] == "s3://fleet/bucket"
    run = recipe["Manifests"][0]["Lifecycle"]["Run"]["Script"]
    assert f"{{{runtime.name}:artifacts:decompressedPath}}/edgeloop-runtime" in run
    assert "--set device_id={iot:thingName}" in run
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    # records come from a topic through the nucleus, and the component may use those IPC operations
    assert defaults["runtime"]["source"] == {"kind": "ipc", "ipc": {"via": "local",
                                                                     "topics": ["edgeloop/{device_id}/records"]}}
    policies = defaults["accessControl"]
    assert "aws.greengrass#SubscribeToTopic" in str(policies["aws.greengrass.ipc.pubsub"])
    assert "aws.greengrass#PublishToIoTCore" in str(policies["aws.greengrass.ipc.mqttproxy"])
    from edge_runtime.contracts import load_runtime_config

    assert load_runtime_config(None, {"device_id": "d", "bundle": "b"}, defaults["runtime"]).source.kind == "ipc"
    with zipfile.ZipFile(model.artifacts[0]) as zf:
        assert set(zf.namelist()) == {"bundle/manifest.json", "bundle/model.onnx", "bundle/baseline.json"}


def test_same_sources_give_the_same_runtime_artifact(tmp_path):
    a = build_components(tmp_path / "a", root=REPO)[0].artifacts[0].read_bytes()
    b = build_components(tmp_path / "b", root=REPO)[0].artifacts[0].read_bytes()
    assert a == b
