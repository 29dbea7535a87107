"""Building Greengrass components: the GDK custom build.

``build_components`` writes ``greengrass-build/`` the way GDK expects from a custom build:
``recipes/recipe.yaml`` and ``artifacts/<component>/<version>/`` for the runtime component, plus,
for each model bundle given, a model component recipe and its zipped bundle.
"""

from __future__ import annotations

import io
import json
import string
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

import edge_runtime
from edge_runtime.bundle import load_bundle

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ARTIFACT = "edgeloop-runtime.zip"
MAX_RECIPE_BYTES = 16_000  # Greengrass's limit on a recipe
MODEL_COMPONENT_PREFIX = "com.edgeloop.model."


class ComponentError(ValueError):
    pass


@dataclass
class BuiltComponent:
    name: str
    version: str
    recipe: Path
    artifacts: list[Path]


def project_root() -> Path:
    """The GDK project being built: the working directory if it is one (as under ``gdk``), else ours."""
    cwd = Path.cwd()
    return cwd if (cwd / "gdk-config.json").is_file() and (cwd / "recipe.yaml").is_file() else PROJECT_ROOT


def read_gdk_config(root: Path = PROJECT_ROOT) -> tuple[str, dict]:
    path = root / "gdk-config.json"
    try:
        config = json.loads(path.read_text())
        ((name, component),) = config["component"].items()
    except (OSError, ValueError, KeyError) as err:
        raise ComponentError(f"{path}: not a usable GDK config ({err})") from None
    return name, component


def lower_keys(obj):
    """Lower-case every mapping key, as GDK does before validating a recipe."""
    if isinstance(obj, dict):
        return {str(k).lower(): lower_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [lower_keys(v) for v in obj]
    return obj


def _zip_dir(zf: zipfile.ZipFile, src: Path, arc_root: str) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            info = zipfile.ZipInfo(f"{arc_root}/{path.relative_to(src).as_posix()}", (2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())  # fixed timestamps: the same sources give the same zip


def _write_recipe(text: str, path: Path) -> Path:
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ComponentError(f"{path.name}: recipe is {len(text.encode())} bytes; Greengrass allows {MAX_RECIPE_BYTES}")
    yaml.safe_load(text)  # fail here, not at deployment, on a template that renders to broken YAML
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_runtime(out: Path, root: Path = PROJECT_ROOT) -> BuiltComponent:
    name, gdk = read_gdk_config(root)
    version = gdk.get("version", "NEXT_PATCH")
    if version == "NEXT_PATCH":
        version = edge_runtime.__version__
    artifact_dir = out / "artifacts" / name / version
    artifact_dir.mkdir(parents=True, exist_ok=True)
    artifact = artifact_dir / RUNTIME_ARTIFACT
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _zip_dir(zf, root / "edge_runtime", "edgeloop-runtime/edge_runtime")
        _zip_dir(zf, root / "components" / "runtime", "edgeloop-runtime")
    artifact.write_bytes(buf.getvalue())
    text = (root / "recipe.yaml").read_text()
    declared = (yaml.safe_load(text) or {}).get("ComponentName")
    if declared not in (name, "{COMPONENT_NAME}"):
        raise ComponentError(f"recipe.yaml names {declared!r} but gdk-config.json builds {name!r}")
    for placeholder, value in {"{COMPONENT_NAME}": name, "{COMPONENT_VERSION}": version,
                               "{COMPONENT_AUTHOR}": gdk.get("author", "edgeloop")}.items():
        text = text.replace(placeholder, value)
    recipe = _write_recipe(text, out / "recipes" / "recipe.yaml")
    return BuiltComponent(name, version, recipe, [artifact])


def build_model(bundle_dir: Path, out: Path, runtime: BuiltComponent, store_url: str,
                root: Path = PROJECT_ROOT, bucket: str = "BUCKET_NAME") -> BuiltComponent:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    name = MODEL_COMPONENT_PREFIX + m.name
    artifact_dir = out / "artifacts" / name / m.version
    artifact_dir.mkdir(parents=True, exist_ok=True)
    artifact = artifact_dir / f"{m.name}-bundle.zip"
    with zipfile.ZipFile(artifact, "w") as zf:
        _zip_dir(zf, bundle.root, "bundle")
    template = string.Template((root / "recipes" / "model-component.yaml").read_text())
    try:
        text = template.substitute(
            component_name=name, component_version=m.version, model_name=m.name,
            model_version=m.version, runtime_name=runtime.name, runtime_version=runtime.version,
            publisher="edgeloop", store_url=store_url,
            artifact_uri=f"s3://{bucket}/{name}/{m.version}/{artifact.name}",
        )
    except (KeyError, ValueError) as err:
        raise ComponentError(f"model component template: unknown placeholder {err}") from None
    recipe = _write_recipe(text, out / "recipes" / f"{name}-{m.version}.yaml")
    return BuiltComponent(name, m.version, recipe, [artifact])


def build_components(out: str | Path = "greengrass-build", bundles: list[str | Path] = (),
                     store_url: str = "s3://edgeloop-fleet", root: Path | None = None) -> list[BuiltComponent]:
    out, root = Path(out), root or project_root()
    runtime = build_runtime(out, root)
    return [runtime, *(build_model(Path(b), out, runtime, store_url, root) for b in bundles)]
