"""The model registry: one interface, two backends.

A registered version is a bundle whose files sit under ``models/model=<name>/version=<v>/`` in an
object store, with its baseline under ``baselines/`` where the fleet review finds it, and an
approval status in SageMaker Model Registry's words: ``PendingManualApproval`` when registered,
then ``Approved`` or ``Rejected``. Publishing a model component wants ``Approved``.

``LocalRegistry`` (the default, no AWS account needed) keeps everything in the store: the
per-version objects are the truth (``manifest.json``, ``approval.json``, ``metrics.json``), and
``models/index.json`` with its change log ``models/index/`` make a listing one or two reads
instead of a scan of the store. ``SageMakerRegistry`` (cloud/sagemaker_registry.py) keeps the
versions and their approval in SageMaker Model Registry and the files in an S3 store, in the same
layout, so devices and the fleet review read them the same way. ``open_registry`` picks one.

A version is immutable: registering different files under a version that exists is refused, in
both backends; registering the same files again keeps the version and its decision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from edge_runtime.bundle import MANIFEST_FILE, Bundle, load_bundle
from edge_runtime.contracts import baseline_key, model_key
from edge_runtime.store import ObjectExists, ObjectNotFound, ObjectStore, StoreError, open_store

log = logging.getLogger(__name__)

PENDING = "PendingManualApproval"
APPROVAL_STATES = (PENDING, "Approved", "Rejected")  # SageMaker Model Registry's words
APPROVAL_FILE = "approval.json"
METRICS_FILE = "metrics.json"  # the version's metrics: the training card's rule, the caller's evaluation
CLAIM_FILE = "claim.json"  # written first, if absent: two registrations of one version cannot mix files
REGISTRY_FILES = (APPROVAL_FILE, METRICS_FILE, CLAIM_FILE)  # beside the bundle's files in its folder
METRICS_FORMAT = "edgeloop.registry.metrics/1"
INDEX_KEY = "models/index.json"
INDEX_LOG = "models/index/"  # one object per change, <seq>.json, created if absent and never rewritten
INDEX_FORMAT = "edgeloop.registry.index/1"
INDEX_TRIES = 64


class RegistryError(ValueError):
    pass


@dataclass
class RegisteredVersion:
    model: str
    version: str
    approval: str
    note: str = ""
    at: str = ""  # when the approval was last set (ISO-8601, UTC), where the listing knows it
    ref: str = ""  # the backend's name for it: the manifest's key, or the model package's ARN
    number: int | None = None  # the backend's own version number (SageMaker's ModelPackageVersion)
    bundle: str = ""  # where the bundle's files are (the version's folder)
    baseline: str = ""
    metrics: str = ""


@runtime_checkable
class Registry(Protocol):
    spec: str  # how the command line names it: a folder, s3://bucket/prefix, or sagemaker[:prefix]

    def register(self, bundle_dir: str | Path, metrics: dict | None = None, *, status: str = PENDING,
                 note: str = "registered") -> RegisteredVersion:
        """Upload and record a bundle's version (``status``: how it starts); the same files again
        return the version as it is, decision kept; other files under its version are refused."""
        ...

    def versions(self, name: str | None = None) -> list[RegisteredVersion]:
        """Every version (of ``name``, or of every model), by model then semver."""
        ...

    def approval(self, name: str, version: str) -> str | None:
        """The version's approval status, None if it is not registered."""
        ...

    def set_approval(self, name: str, version: str, status: str, note: str = "") -> None: ...

    def fetch_bundle(self, name: str, version: str, dest: str | Path) -> Path:
        """The version's bundle, downloaded into ``dest`` and its checksums verified."""
        ...


# --- what both backends share -------------------------------------------------------------------


def check_status(status: str) -> str:
    if status not in APPROVAL_STATES:
        raise RegistryError(f"approval {status!r}: choose one of {', '.join(APPROVAL_STATES)}")
    return status


def semver_order(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def files_digest(files: dict[str, str]) -> str:
    """One sha256 for a bundle's file list (path -> sha256): two bundles with it have the same files."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store_location(store: ObjectStore, key: str) -> str:
    """The URL of ``key`` in ``store``: s3://bucket/prefix/key on S3, the path locally."""
    bucket = getattr(store, "bucket", None)
    if bucket:
        return f"s3://{bucket}/{getattr(store, 'prefix', '')}{key}"
    return f"{str(store.url).rstrip('/')}/{key}"


def metrics_document(bundle: Bundle, metrics: dict | None) -> dict:
    """What is recorded as the version's metrics: the outlier rule it was calibrated to (threshold,
    target false-positive rate), its variants' parity, training's own metrics from the lineage, and
    whatever the caller measured (``metrics``, e.g. retraining's evaluation)."""
    m = bundle.manifest
    return {
        "format": METRICS_FORMAT,
        "model": m.name,
        "version": m.version,
        "outlier": m.outlier.model_dump(mode="json"),
        "variants": {name: v.parity for name, v in m.variants.items()},
        "training": m.lineage.get("metrics", {}),
        "evaluation": dict(metrics or {}),
    }


def _get(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.get(key)
    except ObjectNotFound:
        return None


def upload_bundle(bundle: Bundle, store: ObjectStore, metrics: dict | None = None) -> tuple[str, bool]:
    """Put a bundle's files, baseline and metrics under its version; the manifest last, so a manifest
    in the store means the files are there. Returns the manifest's key and whether it is new.

    Refuses other files under a version that holds some, including one a concurrent or interrupted
    registration claimed first (``claim.json``, created if absent before any file is written)."""
    m = bundle.manifest
    clash = sorted(set(m.files) & set(REGISTRY_FILES))
    if clash:
        raise RegistryError(f"{m.name} {m.version}: the bundle has files named {clash}, which the registry keeps "
                            "beside it; rename them")
    key = model_key(m.name, m.version, MANIFEST_FILE)
    digest = files_digest(m.files)
    existing = _get(store, key)
    if existing is not None:
        if json.loads(existing)["files"] != m.files:
            raise RegistryError(f"{m.name} {m.version} is already registered with other files; bump the version")
        _put_metrics(store, bundle, metrics)
        return key, False
    claim_key = model_key(m.name, m.version, CLAIM_FILE)
    try:
        store.put(claim_key, json.dumps({"files_sha256": digest, "at": _now()}).encode(), if_absent=True)
    except ObjectExists:
        held = json.loads(store.get(claim_key)).get("files_sha256")
        if held != digest:
            raise RegistryError(f"{m.name} {m.version} is being registered with other files (or such a registration "
                                f"stopped half way: {store_location(store, claim_key)}); bump the version") from None
        # the same files: an earlier attempt that stopped half way, or a concurrent one; same bytes either way
    for rel in m.files:
        store.put(model_key(m.name, m.version, rel), (bundle.root / rel).read_bytes())
    store.put(baseline_key(m.name, m.version), (bundle.root / m.baseline_file).read_bytes())
    _put_metrics(store, bundle, metrics)
    try:
        store.put(key, (bundle.root / MANIFEST_FILE).read_bytes(), if_absent=True)
    except ObjectExists:
        if json.loads(store.get(key))["files"] != m.files:
            raise RegistryError(f"{m.name} {m.version} is already registered with other files; "
                                "bump the version") from None
        return key, False
    return key, True


def _put_metrics(store: ObjectStore, bundle: Bundle, metrics: dict | None) -> None:
    """The first registration's metrics stay: a version's record does not change under it."""
    m = bundle.manifest
    doc = json.dumps(metrics_document(bundle, metrics), indent=1, sort_keys=True).encode()
    try:
        store.put(model_key(m.name, m.version, METRICS_FILE), doc, if_absent=True)
    except ObjectExists:
        pass


def download_bundle(store: ObjectStore, name: str, version: str, dest: str | Path) -> Path:
    """A registered version's bundle, downloaded and checked (checksums) into ``dest``."""
    manifest = _get(store, model_key(name, version, MANIFEST_FILE))
    if manifest is None:
        raise RegistryError(f"{name} {version} is not registered in {store.url}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in json.loads(manifest)["files"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(store.get(model_key(name, version, rel)))
    (dest / MANIFEST_FILE).write_bytes(manifest)
    load_bundle(dest)  # the checksums must hold
    return dest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# --- the local registry ---------------------------------------------------------------------------


class LocalRegistry:
    """The registry in an object store (a folder or s3://bucket/prefix), with an index for listing.

    The index: ``models/index.json`` is a snapshot of every version's approval with the number of
    the last change it includes; each change (a registration, an approval) is also written as
    ``models/index/<seq>.json`` *if absent*, so two writers cannot both take one number: the loser
    reads again and takes the next. A listing reads the snapshot and the changes after it (usually
    none). A missing or unreadable snapshot is rebuilt from the per-version objects, which stay the
    truth: ``approval`` reads them, never the index, so publishing is never decided on a stale
    listing. A version written around the index (by an older edgeloop) is listed after
    ``rebuild_index`` (``edgeloop model list --rebuild-index``).
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.spec = str(store.url)

    def register(self, bundle_dir: str | Path, metrics: dict | None = None, *, status: str = PENDING,
                 note: str = "registered") -> RegisteredVersion:
        check_status(status)
        bundle = load_bundle(bundle_dir)  # verifies checksums before anything is published
        m = bundle.manifest
        key, new = upload_bundle(bundle, self.store, metrics)
        doc = self._approval_doc(m.name, m.version)
        if new or doc is None:
            self._write_approval(m.name, m.version, status, note)
        else:  # registered before: the decision stays; an index that missed it (a crash) learns it now
            entries = self._index()[1]
            if _entry_key(m.name, m.version) not in entries:
                self._record(_entry(m.name, m.version, doc))
        return self._version(m.name, m.version, self._approval_doc(m.name, m.version) or {})

    def set_approval(self, name: str, version: str, status: str, note: str = "") -> None:
        """Record a registered version's approval (publishing a model component wants Approved)."""
        check_status(status)
        if _get(self.store, model_key(name, version, MANIFEST_FILE)) is None:
            raise RegistryError(f"{name} {version} is not registered")
        self._write_approval(name, version, status, note)

    def approval(self, name: str, version: str) -> str | None:
        doc = self._approval_doc(name, version)
        if doc is not None:
            return doc["status"]
        return None

    def fetch_bundle(self, name: str, version: str, dest: str | Path) -> Path:
        return download_bundle(self.store, name, version, dest)

    def versions(self, name: str | None = None) -> list[RegisteredVersion]:
        entries = self._index()[1]
        found = [self._version(e["model"], e["version"], {"status": e["approval"], "note": e.get("note", ""),
                                                          "at": e.get("at", "")})
                 for e in entries.values() if name is None or e["model"] == name]
        return sorted(found, key=lambda v: (v.model, semver_order(v.version)))

    def rebuild_index(self) -> int:
        """Rebuild the index from the per-version objects (a full listing of ``models/``); how many
        versions it holds."""
        return len(self._index(rebuild=True)[1])

    # the per-version truth

    def _approval_doc(self, name: str, version: str) -> dict | None:
        raw = _get(self.store, model_key(name, version, APPROVAL_FILE))
        return json.loads(raw) if raw is not None else None

    def _write_approval(self, name: str, version: str, status: str, note: str) -> None:
        doc = {"status": status, "note": note, "at": _now()}
        self.store.put(model_key(name, version, APPROVAL_FILE), json.dumps(doc).encode())
        self._record(_entry(name, version, doc))

    def _version(self, name: str, version: str, doc: dict) -> RegisteredVersion:
        return RegisteredVersion(
            name, version, doc.get("status", PENDING), doc.get("note", ""), doc.get("at", ""),
            ref=model_key(name, version, MANIFEST_FILE),
            bundle=store_location(self.store, model_key(name, version, "")),
            baseline=store_location(self.store, baseline_key(name, version)),
            metrics=store_location(self.store, model_key(name, version, METRICS_FILE)))

    # the index

    def _index(self, rebuild: bool = False) -> tuple[int, dict[str, dict]]:
        """The last change's number and every version's entry: the snapshot and the changes after it,
        or a rebuild from the per-version objects; the snapshot is rewritten when it was behind."""
        snapshot = None if rebuild else self._read_snapshot()
        if snapshot is None:
            seq, entries = self._scan()
        else:
            seq, entries = snapshot
        last = self._replay(seq, entries)
        if (snapshot is None and (entries or last)) or last > seq:  # nothing registered: nothing to write
            self._write_snapshot(last, entries, force=snapshot is None)
        return last, entries

    def _read_snapshot(self) -> tuple[int, dict[str, dict]] | None:
        raw = _get(self.store, INDEX_KEY)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            if doc.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            return int(doc["seq"]), {_entry_key(e["model"], e["version"]): e for e in doc["versions"]}
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable (%s); rebuilding it from the registered versions",
                        store_location(self.store, INDEX_KEY), err)
            return None

    def _scan(self) -> tuple[int, dict[str, dict]]:
        """Every registered version from its own objects, and the highest change number there is."""
        entries: dict[str, dict] = {}
        seq = 0
        pattern = re.compile(r"^models/model=([^/]+)/version=([^/]+)/" + re.escape(MANIFEST_FILE) + "$")
        for key in self.store.list("models/"):
            found = pattern.match(key)
            if found:
                doc = self._approval_doc(found[1], found[2]) or {"status": PENDING}
                entries[_entry_key(found[1], found[2])] = _entry(found[1], found[2], doc)
            elif key.startswith(INDEX_LOG) and re.fullmatch(r"\d+\.json", key[len(INDEX_LOG):]):
                seq = max(seq, int(key[len(INDEX_LOG):-5]))
        return seq, entries

    def _replay(self, seq: int, entries: dict[str, dict]) -> int:
        while True:
            raw = _get(self.store, _log_key(seq + 1))
            if raw is None:
                return seq
            _merge(entries, json.loads(raw))
            seq += 1

    def _write_snapshot(self, seq: int, entries: dict[str, dict], force: bool = False) -> None:
        """Best effort: the snapshot only saves reads (a reader with read-only access goes on without)."""
        if not force:
            current = self._read_snapshot()
            if current is not None and current[0] >= seq:
                return
        doc = {"format": INDEX_FORMAT, "seq": seq,
               "versions": sorted(entries.values(), key=lambda e: (e["model"], semver_order(e["version"])))}
        try:
            self.store.put(INDEX_KEY, json.dumps(doc, indent=0).encode())
        except (StoreError, OSError) as err:
            log.warning("could not write %s: %s", store_location(self.store, INDEX_KEY), err)

    def _record(self, entry: dict) -> None:
        """Append one change to the index: take the next number if nobody has; else read and retry."""
        for _ in range(INDEX_TRIES):
            seq, entries = self._index()
            try:
                self.store.put(_log_key(seq + 1), json.dumps(entry).encode(), if_absent=True)
            except ObjectExists:
                continue
            _merge(entries, entry)
            self._write_snapshot(seq + 1, entries)
            return
        raise RegistryError(f"could not add {entry['model']} {entry['version']} to the index in "
                            f"{INDEX_TRIES} tries (too many concurrent writers); `edgeloop model list "
                            "--rebuild-index` lists it")


def _entry_key(name: str, version: str) -> str:
    return f"{name}/{version}"


def _entry(name: str, version: str, doc: dict) -> dict:
    return {"model": name, "version": version, "approval": doc.get("status", PENDING),
            "note": doc.get("note", ""), "at": doc.get("at", "")}


def _merge(entries: dict[str, dict], entry: dict) -> None:
    """The later decision wins, whichever order two writers' changes were numbered in."""
    key = _entry_key(entry["model"], entry["version"])
    if key not in entries or entry.get("at", "") >= entries[key].get("at", ""):
        entries[key] = entry


def _log_key(seq: int) -> str:
    return f"{INDEX_LOG}{seq:012d}.json"


# --- choosing one ---------------------------------------------------------------------------------


def is_sagemaker(spec: str | None) -> bool:
    return bool(spec) and (spec == "sagemaker" or spec.startswith("sagemaker:"))


def open_registry(spec: str, store: ObjectStore | str | None = None, *, endpoint_url: str | None = None,
                  region: str | None = None, client=None) -> Registry:
    """``sagemaker`` (or ``sagemaker:PREFIX``: model package groups named PREFIX + model) gives
    SageMaker Model Registry with its files in ``store`` (s3://...; needed to register and fetch,
    not to list or decide); a folder or s3://bucket/prefix gives the local registry there.
    ``endpoint_url`` is the store's, and SageMaker's too (LocalStack, moto)."""
    if is_sagemaker(spec):
        from .sagemaker_registry import SageMakerRegistry

        artefacts = open_store(store, endpoint_url) if isinstance(store, str) else store
        if client is None:
            import boto3

            client = boto3.session.Session(region_name=region).client("sagemaker", endpoint_url=endpoint_url)
        return SageMakerRegistry(client, artefacts, group_prefix=spec.partition(":")[2].removeprefix("//"))
    if store is not None:
        raise RegistryError(f"the local registry is the store itself: give {spec!r} or the store, not both")
    return LocalRegistry(open_store(spec, endpoint_url))


def as_registry(registry: Registry | ObjectStore) -> Registry:
    """A registry as given, or the local registry on an object store (what callers passed before)."""
    if hasattr(registry, "fetch_bundle") and hasattr(registry, "set_approval"):
        return registry  # type: ignore[return-value]
    return LocalRegistry(registry)  # type: ignore[arg-type]


# --- the local registry as functions of the store (the callers from before the interface) ---------


def register(bundle_dir: str | Path, store: ObjectStore, metrics: dict | None = None) -> str:
    """Register into the local registry on ``store``; the manifest's key."""
    return LocalRegistry(store).register(bundle_dir, metrics).ref


def set_approval(store: ObjectStore, name: str, version: str, status: str, note: str = "") -> None:
    LocalRegistry(store).set_approval(name, version, status, note)


def approval(store: ObjectStore, name: str, version: str) -> str | None:
    return LocalRegistry(store).approval(name, version)


def fetch_bundle(store: ObjectStore, name: str, version: str, dest: str | Path) -> Path:
    return LocalRegistry(store).fetch_bundle(name, version, dest)


def versions(store: ObjectStore, name: str | None = None) -> list[dict]:
    """Every registered version (of ``name``, or of every model), oldest first, with its approval."""
    return [{"model": v.model, "version": v.version, "approval": v.approval}
            for v in LocalRegistry(store).versions(name)]
