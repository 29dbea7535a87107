"""Install step of the edgeloop runtime component: a virtual environment from the shipped wheels.

The nucleus runs this as the component's user, from the unzipped artifact (read-only), at every
start. It must work on a stock Debian 12 / Raspberry Pi OS / Ubuntu Python, where ``pip install
--user`` is refused (PEP 668) and ``ensurepip`` may be missing, and with no network. So:

* the environment lives in the component's work folder (``--venv``), made ``--without-pip``;
  pip runs from its own wheel, shipped beside the others;
* everything comes from ``wheels/`` and the pinned ``requirements.lock``, with ``--no-index``
  unless ``--index-url`` names one;
* a stamp (hash of the lock, the wheels, the ONNX Runtime flavour and the interpreter) makes a
  repeated install a no-op that takes milliseconds;
* anything else is a fresh environment built beside the old one and swapped in only once it
  works: a failed or killed install leaves the previous one serving, and switching the flavour
  (``onnxruntime`` <-> ``onnxruntime-gpu``, which share one package folder) never leaves both.

Standard library only: nothing else exists on the device before this runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAVOURS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
STAMP = ".edgeloop-install.json"


class InstallError(Exception):
    pass


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines (comments and blank lines skipped) -> {normalised name: line}."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name = line.split("==", 1)[0].strip().lower().replace("_", "-")
            pins[name] = line
    return pins


def requirements(pins: dict[str, str], flavour: str, runtime: str) -> list[str]:
    """What to install: the lock without the other flavour's package, and the runtime itself."""
    if flavour not in FLAVOURS:
        raise InstallError(f"onnxruntime must be one of {sorted(FLAVOURS)}, not {flavour!r}")
    other = {v for k, v in FLAVOURS.items() if k != flavour}
    wanted = FLAVOURS[flavour]
    if wanted not in pins:
        raise InstallError(f"this artifact has no {wanted} pin in requirements.lock")
    return [line for name, line in pins.items() if name not in other and name != "pip"] + [runtime]


def stamp_of(build: dict, lock_text: str, wheels: list[str], flavour: str, index_url: str) -> str:
    doc = {"build": build, "lock": lock_text, "wheels": wheels, "flavour": flavour, "index": index_url,
           "python": sys.version, "executable": os.path.realpath(sys.executable)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def current_stamp(venv: Path) -> str | None:
    try:
        return json.loads((venv / STAMP).read_text())["stamp"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_interpreter(build: dict, index_url: str) -> None:
    want = build.get("python")
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want and want != have and not index_url:
        raise InstallError(
            f"this artifact's wheels are for CPython {want}, and this device runs {have}. Build the runtime "
            f"component for it (`edgeloop component lock --python {have}` then `edgeloop component build "
            f"--python {have}`), or set the component's pipIndexUrl to install from an index")


def gpu_access_warning(flavour: str) -> str | None:
    """CUDA needs the GPU device nodes; the component user may not be in their group."""
    if flavour != "gpu":
        return None
    nodes = sorted(Path("/dev").glob("nvidia*")) + sorted(Path("/dev").glob("nvhost-*"))
    blocked = [n for n in nodes if not os.access(n, os.R_OK | os.W_OK)]
    if not nodes:
        return ("onnxruntime-gpu chosen, but this device has no /dev/nvidia* or /dev/nvhost-* node: "
                "scoring will use the CPU")
    if blocked:
        import grp

        try:
            group = grp.getgrgid(blocked[0].stat().st_gid).gr_name
        except (KeyError, OSError):
            group = "the device nodes' group"
        return (f"this user cannot open {blocked[0]}: add the component user to {group} "
                f"(`usermod -aG {group} ggc_user`) or deploy with --run-as ggc_user:{group}; "
                "until then scoring falls back to the CPU")
    return None


def run(cmd: list[str], log) -> None:
    # only our options: no pip.conf (Raspberry Pi OS ships one naming piwheels), no user site
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.stdout.strip():
        log(proc.stdout.rstrip())
    if proc.returncode:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise InstallError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")


def install(venv: Path, flavour: str, index_url: str = "", artifact: Path = HERE, log=print) -> bool:
    """Make ``venv`` match this artifact; True if anything was installed, False if it already did."""
    build = json.loads((artifact / "build.json").read_text())
    lock_text = (artifact / "requirements.lock").read_text()
    wheel_dir = artifact / "wheels"
    wheels = sorted(p.name for p in wheel_dir.glob("*.whl"))
    stamp = stamp_of(build, lock_text, wheels, flavour, index_url)
    if current_stamp(venv) == stamp and (venv / "bin" / "python").exists():
        log(f"edgeloop runtime {build['runtime_version']} ({FLAVOURS[flavour]}) already installed in {venv}")
        return False
    check_interpreter(build, index_url)
    reqs = requirements(read_lock(artifact / "requirements.lock"), flavour,
                        f"edgeloop-runtime=={build['runtime_version']}")
    pip_wheels = sorted(wheel_dir.glob("pip-*.whl"))
    if not pip_wheels:
        raise InstallError(f"no pip wheel in {wheel_dir}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    fresh = venv.with_name(venv.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], log)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(reqs) + "\n")
    try:
        source = ["--index-url", index_url] if index_url else ["--no-index"]
        run([str(fresh / "bin" / "python"), str(pip_wheels[-1] / "pip"), "install", "--quiet",
             "--disable-pip-version-check", "--no-cache-dir", "--no-compile", *source,
             "--find-links", str(wheel_dir), "-r", f.name], log)
    finally:
        os.unlink(f.name)
    run([str(fresh / "bin" / "python"), "-c", f"import edge_runtime, {FLAVOURS[flavour].split('-')[0]}"], log)
    (fresh / STAMP).write_text(json.dumps({"stamp": stamp, "flavour": flavour, "build": build}))
    old = venv.with_name(venv.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if venv.exists():
        venv.rename(old)
    fresh.rename(venv)  # the old environment served until here
    shutil.rmtree(old, ignore_errors=True)
    log(f"edgeloop runtime {build['runtime_version']} ({FLAVOURS[flavour]}) installed in {venv}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--venv", required=True, help="the environment to create or update")
    parser.add_argument("--onnxruntime", default="cpu", help="cpu (onnxruntime) or gpu (onnxruntime-gpu)")
    parser.add_argument("--index-url", default="", help="install from this index too (default: offline)")
    args = parser.parse_args(argv)
    flavour = args.onnxruntime.strip().lower()
    try:
        install(Path(args.venv), flavour, args.index_url.strip())
    except (InstallError, OSError, ValueError) as err:
        print(f"edgeloop install: error: {err}", file=sys.stderr)
        return 1
    warning = gpu_access_warning(flavour)
    if warning:
        print(f"edgeloop install: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
