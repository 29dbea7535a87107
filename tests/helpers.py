"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cloud import synthetic

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"  # development aids beside the checkout; tests may read them

def record_line(values, ts=synthetic.START_TS, rid=None) -> str:
    rec = {"ts": ts, **dict(zip(synthetic.FEATURES, (float(v) for v in values)))}
    if rid is not None:
        rec["id"] = rid
    return json.dumps(rec)


def read_jsonl(path: Path) -> list[dict]:
    # split on newlines only: str.splitlines() also splits on U+0085, U+2028 and U+2029, which JSON
    # may carry unescaped inside a string
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line]


def normal_rows(n: int, seed: int = 0) -> np.ndarray:
    return synthetic.device_stream("x", n, seed=seed, anomaly_rate=0.0).X


def bundle_copy(src: Path, dst: Path, version: str, **manifest_changes) -> Path:
    """A valid copy of a bundle under another version (and other manifest fields, e.g. a threshold)."""
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = version
    for dotted, value in manifest_changes.items():
        node = manifest
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def window_name(key: str) -> str:
    """A summary or sample key's last part without the writer's instance id: '<start>-p<part>'."""
    import re

    name = key.rsplit("/", 1)[-1]
    return re.sub(r"-[0-9a-f]{12}-p(\d+)\.(elws|jsonl\.gz)$", r"-p\1", name)


def read_samples(data: bytes) -> list[dict]:
    import gzip

    return [json.loads(line) for line in gzip.decompress(data).splitlines() if line]


def wait_for(predicate, timeout=20.0, interval=0.02):
    """``predicate()``'s first truthy value, polling; an AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


@contextmanager
def serving(config, **kwargs):
    """A Service on a thread (no signal handlers there); stopped and joined on exit."""
    from edge_runtime.service import Service

    service = Service(config, **kwargs)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("stats", service.run()), daemon=True)
    thread.start()
    assert service.started.wait(15), "service did not start"
    try:
        yield service, out
    finally:
        service.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "service did not stop within 30 s"
