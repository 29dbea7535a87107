"""A minimal model registry on the object store.

Registering a bundle uploads its files under ``models/model=<name>/version=<v>/`` and its
baseline under ``baselines/``, where the fleet review finds it. A version is immutable: registering
different files under a version that exists is refused.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.bundle import MANIFEST_FILE, load_bundle
from edge_runtime.contracts import baseline_key, model_key
from edge_runtime.store import ObjectNotFound, ObjectStore


class RegistryError(ValueError):
    pass


def register(bundle_dir: str | Path, store: ObjectStore) -> str:
    bundle = load_bundle(bundle_dir)  # verifies checksums before anything is published
    m = bundle.manifest
    manifest_bytes = (bundle.root / MANIFEST_FILE).read_bytes()
    key = model_key(m.name, m.version, MANIFEST_FILE)
    try:
        existing = store.get(key)
    except ObjectNotFound:
        existing = None
    if existing is not None:
        import json

        if json.loads(existing)["files"] != m.files:
            raise RegistryError(f"{m.name} {m.version} is already registered with other files; bump the version")
        return key
    for rel in m.files:
        store.put(model_key(m.name, m.version, rel), (bundle.root / rel).read_bytes())
    store.put(baseline_key(m.name, m.version), (bundle.root / m.baseline_file).read_bytes())
    store.put(key, manifest_bytes)  # last: a manifest in the registry means the files are there
    return key
