"""Building Greengrass components: the GDK custom build.

``build_components`` writes ``greengrass-build/`` the way GDK expects from a custom build:
``recipes/recipe.yaml`` and ``artifacts/<component>/<version>/``, where ``<version>`` is
gdk-config.json's version *as written* (``NEXT_PATCH`` included: publish picks the number). The
runtime component's artifact is one ZIP per architecture holding the installer, the pinned lock
and every wheel (``wheels.py``). For each model bundle given it also writes a model component:
``bundle.zip`` (entries at the top, so the nucleus unzips it to ``<decompressed path>/bundle/``)
and its recipe from ``recipes/model-component.yaml``.
"""

from __future__ import annotations

import json
import re
import string
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import edge_runtime
from edge_runtime.bundle import load_bundle
from edge_runtime.contracts import BUNDLE_ARTIFACT, SEMVER, model_component_name

from .wheels import ARCHES, DEFAULT_PYTHON, FLAVOURS, Target, WheelError, download, read_lock, runtime_wheel

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MAX_RECIPE_BYTES = 16_000  # Greengrass's limit on a recipe
DEFAULT_CACHE = Path.home() / ".cache" / "edgeloop" / "wheels"


class ComponentError(ValueError):
    pass


@dataclass
class BuiltComponent:
    name: str
    version: str  # as built: gdk-config's version as written for the runtime ("NEXT_PATCH" too)
    recipe: Path
    artifacts: list[Path] = field(default_factory=list)


def runtime_artifact_name(arch: str) -> str:
    return f"edgeloop-runtime-{arch}.zip"


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


def _zip_entry(zf: zipfile.ZipFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))  # fixed times: the same inputs give the same zip
    # wheels are zips already; deflating them again costs time and saves nothing
    info.compress_type = zipfile.ZIP_STORED if name.endswith(".whl") else zipfile.ZIP_DEFLATED
    info.external_attr = mode << 16
    zf.writestr(info, data)


def _write_recipe(text: str, path: Path) -> Path:
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ComponentError(f"{path.name}: recipe is {len(text.encode())} bytes; Greengrass allows {MAX_RECIPE_BYTES}")
    yaml.safe_load(text)  # fail here, not at deployment, on a template that renders to broken YAML
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def runtime_recipe(root: Path, name: str, version: str, author: str, arches: list[str]) -> str:
    """recipe.yaml with GDK's placeholders filled and only the built architectures' manifests."""
    text = (root / "recipe.yaml").read_text()
    recipe = yaml.safe_load(text) or {}
    if recipe.get("ComponentName") not in (name, "{COMPONENT_NAME}"):
        raise ComponentError(f"recipe.yaml names {recipe.get('ComponentName')!r} but gdk-config.json builds {name!r}")
    platforms = {ARCHES[a] for a in arches}
    manifests = recipe.get("Manifests") or []
    kept = [m for m in manifests if (m.get("Platform") or {}).get("architecture") in platforms]
    if not kept:
        raise ComponentError(f"recipe.yaml has no manifest for {sorted(platforms)}")
    recipe["Manifests"] = kept
    text = yaml.safe_dump(recipe, sort_keys=False, width=200)
    for placeholder, value in {"{COMPONENT_NAME}": name, "{COMPONENT_VERSION}": version,
                               "{COMPONENT_AUTHOR}": author}.items():
        text = text.replace(placeholder, value)
    return text


def build_runtime(out: Path, root: Path = PROJECT_ROOT, arches: list[str] = tuple(ARCHES),
                  python: str = DEFAULT_PYTHON, flavours: list[str] = ("cpu",),
                  cache: Path = DEFAULT_CACHE, progress=_log) -> BuiltComponent:
    name, gdk = read_gdk_config(root)
    version = str(gdk.get("version") or "NEXT_PATCH")
    if version != "NEXT_PATCH" and not re.match(SEMVER, version):
        raise ComponentError(f"gdk-config.json: version {version!r} is neither NEXT_PATCH nor major.minor.patch")
    unknown = [f for f in flavours if f not in FLAVOURS]
    if unknown:
        raise ComponentError(f"unknown ONNX Runtime flavour {unknown}; choose from {sorted(FLAVOURS)}")
    lock_path = root / "components" / "runtime" / "requirements.lock"
    pins, header = read_lock(lock_path)
    if header.get("python") != python:
        raise ComponentError(f"{lock_path} pins CPython {header.get('python')}; for {python} run "
                             f"`edgeloop component lock --python {python}` first")
    artifact_dir = out / "artifacts" / name / version  # GDK publishes this folder, named as configured
    artifact_dir.mkdir(parents=True, exist_ok=True)
    installer = (root / "components" / "runtime" / "install.py").read_bytes()
    artifacts = []
    with tempfile.TemporaryDirectory() as tmp:
        own = runtime_wheel(Path(tmp), root / "components" / "runtime" / "requirements.txt")
        for arch in arches:
            target = Target(arch, python, header.get("glibc", "2.28"))
            arch_flavours = [f for f in flavours if FLAVOURS[f] in pins and
                             not (f == "gpu" and arch != "x86_64")]
            for f in set(flavours) - set(arch_flavours):
                progress(f"note: no {FLAVOURS[f]} wheel for {arch}: its devices can only use the CPU flavour")
            try:
                wheels = download(pins, target, cache, arch_flavours, progress)
            except WheelError as err:
                raise ComponentError(str(err)) from None
            build = {"runtime_version": edge_runtime.__version__, "python": python, "arch": arch,
                     "glibc": target.glibc, "flavours": arch_flavours}
            artifact = artifact_dir / runtime_artifact_name(arch)
            with zipfile.ZipFile(artifact, "w") as zf:
                _zip_entry(zf, "install.py", installer)
                _zip_entry(zf, "requirements.lock", lock_path.read_bytes())
                _zip_entry(zf, "build.json", json.dumps(build, indent=1).encode())
                for wheel in [own, *wheels]:
                    _zip_entry(zf, f"wheels/{wheel.name}", wheel.read_bytes())
            progress(f"built {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
            artifacts.append(artifact)
    text = runtime_recipe(root, name, version, str(gdk.get("author", "edgeloop")), list(arches))
    recipe = _write_recipe(text, out / "recipes" / "recipe.yaml")
    return BuiltComponent(name, version, recipe, artifacts)


def build_model(bundle_dir: Path, out: Path, runtime_name: str, root: Path = PROJECT_ROOT) -> BuiltComponent:
    """A model component: the bundle as its one artifact, readable by the runtime component's user."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if not re.match(SEMVER, m.version):
        raise ComponentError(f"model version {m.version!r} is not major.minor.patch, which Greengrass requires")
    name = model_component_name(m.name)
    artifact_dir = out / "artifacts" / name / m.version
    artifact_dir.mkdir(parents=True, exist_ok=True)
    artifact = artifact_dir / BUNDLE_ARTIFACT
    with zipfile.ZipFile(artifact, "w") as zf:
        for path in sorted(bundle.root.rglob("*")):
            if path.is_file():
                _zip_entry(zf, path.relative_to(bundle.root).as_posix(), path.read_bytes())
    template = string.Template((root / "recipes" / "model-component.yaml").read_text())
    try:
        text = template.substitute(component_name=name, component_version=m.version, model_name=m.name,
                                   model_version=m.version, runtime_name=runtime_name, publisher="edgeloop",
                                   artifact=BUNDLE_ARTIFACT)
    except (KeyError, ValueError) as err:
        raise ComponentError(f"model component template: unknown placeholder {err}") from None
    recipe = _write_recipe(text, out / "recipes" / f"{name}-{m.version}.yaml")
    return BuiltComponent(name, m.version, recipe, [artifact])


def build_components(out: str | Path = "greengrass-build", bundles: list[str | Path] = (),
                     root: Path | None = None, **runtime_options) -> list[BuiltComponent]:
    out, root = Path(out), root or project_root()
    runtime = build_runtime(out, root, **runtime_options)
    return [runtime, *(build_model(Path(b), out, runtime.name, root) for b in bundles)]
