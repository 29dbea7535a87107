"""A minimal model registry on the object store.

Registering a bundle uploads its files under ``models/model=<name>/version=<v>/`` and its
baseline under ``baselines/``, where the fleet review finds it. A version is immutable: registering
different files under a version that exists is refused. Each version has an approval status, in
SageMaker Model Registry's words: ``PendingManualApproval`` when registered, then ``Approved`` or
``Rejected``.
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
    set_approval(store, m.name, m.version, "PendingManualApproval", note="registered")
    return key


APPROVAL_FILE = "approval.json"
APPROVAL_STATES = ("PendingManualApproval", "Approved", "Rejected")  # SageMaker Model Registry's words


def set_approval(store: ObjectStore, name: str, version: str, status: str, note: str = "") -> None:
    """Record a registered version's approval (publishing a model component wants Approved)."""
    import json
    from datetime import datetime, timezone

    if status not in APPROVAL_STATES:
        raise RegistryError(f"approval {status!r}: choose one of {', '.join(APPROVAL_STATES)}")
    try:
        store.get(model_key(name, version, MANIFEST_FILE))
    except ObjectNotFound:
        raise RegistryError(f"{name} {version} is not registered") from None
    doc = {"status": status, "note": note, "at": datetime.now(timezone.utc).isoformat()}
    store.put(model_key(name, version, APPROVAL_FILE), json.dumps(doc).encode())


def approval(store: ObjectStore, name: str, version: str) -> str | None:
    import json

    try:
        return json.loads(store.get(model_key(name, version, APPROVAL_FILE)))["status"]
    except ObjectNotFound:
        return None


def fetch_bundle(store: ObjectStore, name: str, version: str, dest: str | Path) -> Path:
    """A registered version's bundle, downloaded and checked (checksums) into ``dest``."""
    import json

    try:
        manifest = store.get(model_key(name, version, MANIFEST_FILE))
    except ObjectNotFound:
        raise RegistryError(f"{name} {version} is not registered") from None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in json.loads(manifest)["files"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(store.get(model_key(name, version, rel)))
    (dest / MANIFEST_FILE).write_bytes(manifest)
    load_bundle(dest)  # the checksums must hold
    return dest


def versions(store: ObjectStore, name: str | None = None) -> list[dict]:
    """Every registered version (of ``name``, or of every model), oldest first, with its approval."""
    import re

    found = []
    for key in store.list("models/" + (f"model={name}/" if name else "")):
        m = re.search(r"model=([^/]+)/version=([^/]+)/" + re.escape(MANIFEST_FILE) + "$", key)
        if m:
            found.append({"model": m[1], "version": m[2]})
    found.sort(key=lambda r: (r["model"], tuple(int(x) for x in re.findall(r"\d+", r["version"])[:3])))
    for row in found:
        row["approval"] = approval(store, row["model"], row["version"]) or "PendingManualApproval"
    return found
