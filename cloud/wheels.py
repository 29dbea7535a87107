"""The runtime component's Python payload: a pinned lock, the wheels it names, the runtime's wheel.

Devices install offline from what the artifact carries, so every device of a release runs the
same versions. ``lock`` resolves ``components/runtime/requirements.txt`` (plus both ONNX Runtime
flavours and pip) for each target architecture with pip's resolver and writes exact pins;
``download`` fetches those pins as binary wheels for a target (cached, so a rebuild is quick);
``runtime_wheel`` packs ``edge_runtime`` alone, so the device never gets ``cloud`` or
``model_compile``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import edge_runtime

ARCHES = {"x86_64": "amd64", "aarch64": "aarch64"}  # wheel architecture -> Greengrass platform name
FLAVOURS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
DEFAULT_PYTHON = "3.11"  # Debian 12, Raspberry Pi OS Bookworm
DEFAULT_GLIBC = "2.28"
EPOCH = (2020, 1, 1, 0, 0, 0)


class WheelError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    arch: str
    python: str = DEFAULT_PYTHON
    glibc: str = DEFAULT_GLIBC

    def pip_args(self) -> list[str]:
        """pip's platform options: every manylinux tag up to our glibc, CPython of our version."""
        if self.arch not in ARCHES:
            raise WheelError(f"unknown architecture {self.arch!r}; choose from {sorted(ARCHES)}")
        major, minor = (int(x) for x in self.glibc.split("."))
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        tags += [f"{legacy}_{self.arch}" for legacy, m in (("manylinux2014", 17), ("manylinux2010", 12),
                                                           ("manylinux1", 5)) if minor >= m]
        args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python]
        for tag in tags:
            args += ["--platform", tag]
        return args


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The pins (normalised name -> ``name==version``) and the header's ``key: value`` lines.
    (The device reads the same file with ``components/runtime/install.py``'s own copy of this:
    that script runs before anything but the standard library is installed.)"""
    pins, header = {}, {}
    for raw in path.read_text().splitlines():
        if raw.startswith("# ") and ": " in raw:
            key, _, value = raw[2:].partition(": ")
            header[key.strip()] = value.strip()
        line = raw.split("#", 1)[0].strip()
        if line:
            if "==" not in line:
                raise WheelError(f"{path}: {line!r} is not pinned (name==version)")
            pins[normalise(line.split("==", 1)[0])] = line
    return pins, header


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        err = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)
        raise WheelError(f"pip {args[0]} failed:\n{err.strip()[-2000:]}")
    return proc


def resolve(requirements: Path, target: Target, extra: list[str]) -> dict[str, str]:
    """pip's resolution of ``requirements`` + ``extra`` for ``target``: {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--target", str(Path(tmp) / "t"),
              "--report", str(report), *target.pip_args(), "-r", str(requirements), *extra])
        doc = json.loads(report.read_text())
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in doc["install"]}


def lock(requirements: Path, out: Path, python: str = DEFAULT_PYTHON, glibc: str = DEFAULT_GLIBC,
         arches: list[str] = tuple(ARCHES), progress=print) -> dict[str, str]:
    """Resolve for every architecture and flavour and write one lock that fits them all."""
    pins: dict[str, str] = {}
    notes = []
    for arch in arches:
        target = Target(arch, python, glibc)
        for flavour, package in FLAVOURS.items():
            progress(f"resolving {package} for CPython {python} on {arch} ...")
            try:
                found = resolve(requirements, target, [package, "pip"])
            except WheelError:
                if flavour == "cpu":
                    raise
                notes.append(f"{package}: no wheel for {arch}")
                continue
            for name, version in found.items():
                key = normalise(name)
                if key in pins and pins[key] != f"{name}=={version}":
                    raise WheelError(f"{name} resolves to {version} on {arch} but {pins[key]} elsewhere: "
                                     "pin it in requirements.txt")
                pins[key] = f"{name}=={version}"
    header = [f"# Generated by `edgeloop component lock` on {date.today().isoformat()}; do not edit.",
              f"# python: {python}", f"# glibc: {glibc}", f"# arches: {','.join(arches)}"]
    header += [f"# note: {n}" for n in notes]
    out.write_text("\n".join(header + sorted(pins.values(), key=str.lower)) + "\n")
    return pins


def download(pins: dict[str, str], target: Target, cache: Path, flavours: list[str],
             progress=print) -> list[Path]:
    """The wheels of ``pins`` for ``target`` (the flavours asked for only), from ``cache`` or PyPI."""
    wanted = [line for name, line in pins.items()
              if name not in FLAVOURS.values() or name in {FLAVOURS[f] for f in flavours}]
    for f in flavours:
        if FLAVOURS[f] not in pins:
            raise WheelError(f"the lock has no {FLAVOURS[f]} pin for {target.arch}")
    folder = cache / f"cp{target.python.replace('.', '')}-{target.arch}-glibc{target.glibc}"
    folder.mkdir(parents=True, exist_ok=True)
    found = _cached(wanted, folder)
    if found is not None:
        return found
    progress(f"wheels for CPython {target.python} on {target.arch}: {len(wanted)} packages -> {folder}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(wanted) + "\n")
        f.flush()
        try:
            _pip(["download", "--quiet", "--no-deps", "--dest", str(folder), *target.pip_args(), "-r", f.name])
        except WheelError as err:
            raise WheelError(f"{err}\n(the lock may not fit {target.arch}: run `edgeloop component lock`)") from None
    found = _cached(wanted, folder)
    if found is None:
        raise WheelError(f"pip downloaded, but not every wheel of the lock for {target.arch} is in {folder}")
    return found


def _cached(pins: list[str], folder: Path) -> list[Path] | None:
    """The wheel of every pin in ``folder``, or None if one is missing (a rebuild needs no network)."""
    found = []
    for line in pins:
        name, version = line.split("==", 1)
        prefix = f"{normalise(name).replace('-', '_')}-{version}-".lower()
        match = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
        if not match:
            return None
        found.append(match[-1])
    return found


def runtime_wheel(out_dir: Path, requirements: Path) -> Path:
    """``edgeloop_runtime-<version>-py3-none-any.whl``: the ``edge_runtime`` package alone (the one
    this process imports, so a GDK project elsewhere builds the installed runtime)."""
    package = Path(edge_runtime.__file__).resolve().parent
    version = edge_runtime.__version__
    dist = f"edgeloop_runtime-{version}"
    requires = [r.split("#", 1)[0].strip() for r in requirements.read_text().splitlines()]
    metadata = "\n".join(["Metadata-Version: 2.1", "Name: edgeloop-runtime", f"Version: {version}",
                          "Summary: edgeloop's on-device runtime", "Requires-Python: >=3.10",
                          *(f"Requires-Dist: {r}" for r in requires if r)]) + "\n"
    files: dict[str, bytes] = {}
    for path in sorted(package.rglob("*.py")):
        files[path.relative_to(package.parent).as_posix()] = path.read_bytes()
    files[f"{dist}.dist-info/METADATA"] = metadata.encode()
    files[f"{dist}.dist-info/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: edgeloop\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n")
    record = [f"{name},sha256={_b64sha(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist}.dist-info/RECORD"] = ("\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n").encode()
    out = out_dir / f"{dist}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    out.write_bytes(buf.getvalue())
    return out


def _b64sha(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
