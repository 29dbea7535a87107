"""The runtime component's Install step: first install, a repeat with nothing changed, a switch.

    .venv/bin/python bench/bench_install.py [--repeat 5]

Builds the runtime artifact for this machine (wheels from the cache), unzips it, and times
``install.py`` as the nucleus runs it (the device's ``python3``, offline):

1. first: a fresh virtual environment from the artifact's wheels;
2. again: Install at a restart with nothing changed (the nucleus runs it at every start);
3. reinstall: what a changed lock or flavour costs (a fresh environment built beside the old one).

Baseline, measured in the same run: the device interpreter starting and exiting (``python3 -c
pass``), the least any Install step can cost. Prints one JSON document; docs/benchmarks.md
records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    from cloud.components import build_runtime

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        built = build_runtime(tmp / "build", REPO, arches=[platform.machine()], progress=lambda m: None)
        (artifact,) = built.artifacts
        artifact_mb = round(artifact.stat().st_size / 1e6, 1)
        unzipped = tmp / artifact.stem
        shutil.unpack_archive(artifact, unzipped)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp)}
        venv = tmp / "work" / "venv"
        install = [PYTHON, str(unzipped / "install.py"), "--venv", str(venv)]
        baseline = statistics.median(timed([PYTHON, "-c", "pass"], env) for _ in range(args.repeat))
        first = timed(install, env)
        again = statistics.median(timed(install, env) for _ in range(args.repeat))
        reinstalls = []
        for _ in range(max(1, args.repeat // 2)):
            (venv / ".edgeloop-install.json").write_text("{}")  # as if the lock had changed
            reinstalls.append(timed(install, env))
        size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": PYTHON,
        "artifact_mb": artifact_mb,
        "venv_mb": round(size / 1e6, 1),
        "baseline_interpreter_s": round(baseline, 4),
        "first_install_s": round(first, 2), "first_x_baseline": round(first / baseline, 1),
        "again_s": round(again, 4), "again_x_baseline": round(again / baseline, 2),
        "reinstall_s": round(statistics.median(reinstalls), 2),
    }, indent=1))


if __name__ == "__main__":
    main()
