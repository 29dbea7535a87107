"""The local model registry: its approval workflow through the CLI, and its index."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from helpers import bundle_copy

from cloud.cli import main
from cloud.registry import (
    INDEX_FORMAT,
    INDEX_KEY,
    LocalRegistry,
    RegistryError,
    approval,
    files_digest,
    set_approval,
    versions,
)
from edge_runtime.bundle import load_bundle, sha256_file
from edge_runtime.contracts import model_key
from edge_runtime.store import LocalStore, ObjectExists


def test_register_list_approve_reject(tmp_path, bundle_dir, capsys):
    store = str(tmp_path / "registry")
    assert main(["model", "register", "--store", store, "--bundle", str(bundle_dir)]) == 0
    newer = bundle_copy(bundle_dir, tmp_path / "b2", "1.0.10")
    assert main(["model", "register", "--store", store, "--bundle", str(newer)]) == 0
    capsys.readouterr()
    assert main(["model", "list", "--store", store]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].split() == ["sensor-outliers", "1.0.0", "PendingManualApproval"]
    assert lines[1].split() == ["sensor-outliers", "1.0.10", "PendingManualApproval"]  # numeric order
    assert main(["model", "approve", "--store", store, "--model", "sensor-outliers", "--version", "1.0.10",
                 "--note", "beats 1.0.0 on last week's data"]) == 0
    assert main(["model", "reject", "--store", store, "--model", "sensor-outliers", "--version", "1.0.0"]) == 0
    rows = {r["version"]: r["approval"] for r in versions(LocalStore(store), "sensor-outliers")}
    assert rows == {"1.0.0": "Rejected", "1.0.10": "Approved"}
    # registering again the same files keeps the decision; a version that is not registered is refused
    assert main(["model", "register", "--store", store, "--bundle", str(newer)]) == 0
    assert approval(LocalStore(store), "sensor-outliers", "1.0.10") == "Approved"
    assert main(["model", "approve", "--store", store, "--model", "sensor-outliers", "--version", "9.9.9"]) == 2
    assert "is not registered" in capsys.readouterr().err
    with pytest.raises(RegistryError, match="choose one of"):
        set_approval(LocalStore(store), "sensor-outliers", "1.0.0", "Maybe")


# --- the local registry's index -------------------------------------------------------------------

MODEL = "sensor-outliers"


def other_files(src, dst, version: str):
    """A valid bundle of ``version`` whose baseline differs (by whitespace) from ``src``'s."""
    b = bundle_copy(src, dst, version)
    (b / "baseline.json").write_bytes((b / "baseline.json").read_bytes() + b"\n")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["baseline.json"] = sha256_file(b / "baseline.json")
    (b / "manifest.json").write_text(json.dumps(manifest))
    return b


class Watched:
    """A store that records what is asked of it, and can hold each thread at its first index read."""

    def __init__(self, inner, barrier: threading.Barrier | None = None):
        self.inner, self.url, self.barrier = inner, inner.url, barrier
        self.gets, self.lists, self.refused = [], [], 0
        self.waited = set()

    def get(self, key):
        self.gets.append(key)
        data = self.inner.get(key)
        if self.barrier and key == INDEX_KEY and threading.get_ident() not in self.waited:
            self.waited.add(threading.get_ident())
            self.barrier.wait(timeout=30)  # every writer has read the same index before any writes
        return data

    def put(self, key, data, if_absent=False):
        try:
            return self.inner.put(key, data, if_absent)
        except ObjectExists:
            self.refused += 1
            raise

    def list(self, prefix=""):
        self.lists.append(prefix)
        return self.inner.list(prefix)


@pytest.fixture
def registered(tmp_path, bundle_dir):
    """1.0.0, 1.0.2 (approved) and 1.0.10 in a local registry."""
    store = LocalStore(tmp_path / "registry")
    reg = LocalRegistry(store)
    for v in ("1.0.0", "1.0.2", "1.0.10"):
        reg.register(bundle_copy(bundle_dir, tmp_path / v, v))
    reg.set_approval(MODEL, "1.0.2", "Approved", note="ok")
    return store


LISTED = [("1.0.0", "PendingManualApproval"), ("1.0.2", "Approved"), ("1.0.10", "PendingManualApproval")]


def listed(store) -> list[tuple[str, str]]:
    return [(v.version, v.approval) for v in LocalRegistry(store).versions(MODEL)]


def test_a_listing_reads_the_index_not_the_store(registered):
    watched = Watched(registered)
    rows = LocalRegistry(watched).versions()
    assert [(v.version, v.approval) for v in rows] == LISTED
    assert rows[1].note == "ok" and rows[1].ref == "models/model=sensor-outliers/version=1.0.2/manifest.json"
    assert watched.lists == []  # no scan: the snapshot, and the one change number after it that is not there
    assert watched.gets == [INDEX_KEY, "models/index/000000000005.json"]
    doc = json.loads(registered.get(INDEX_KEY))
    assert doc["seq"] == 4 and [e["version"] for e in doc["versions"]] == ["1.0.0", "1.0.2", "1.0.10"]


def test_a_missing_or_unreadable_index_is_rebuilt_from_the_versions(registered, tmp_path, caplog):
    root = tmp_path / "registry"
    shutil.rmtree(root / "models" / "index")  # as a registry from before the index has it
    (root / INDEX_KEY).unlink()
    watched = Watched(registered)
    assert listed(watched) == LISTED and watched.lists == ["models/"]
    assert json.loads((root / INDEX_KEY).read_text())["format"] == INDEX_FORMAT

    (root / INDEX_KEY).write_text("{not json")
    assert listed(registered) == LISTED
    assert "unreadable" in caplog.text
    assert [e["approval"] for e in json.loads((root / INDEX_KEY).read_text())["versions"]] == [a for _, a in LISTED]

    LocalRegistry(registered).set_approval(MODEL, "1.0.0", "Rejected")  # and writing goes on from the rebuilt one
    assert listed(registered)[0] == ("1.0.0", "Rejected")


def test_an_index_behind_its_change_log_catches_up(registered, tmp_path):
    root = tmp_path / "registry"
    behind = (root / INDEX_KEY).read_bytes()
    LocalRegistry(registered).set_approval(MODEL, "1.0.10", "Rejected", note="drifts")
    (root / INDEX_KEY).write_bytes(behind)  # a writer that stopped after its change, before the snapshot
    assert listed(registered)[2] == ("1.0.10", "Rejected")
    assert json.loads((root / INDEX_KEY).read_text())["seq"] == json.loads(behind)["seq"] + 1  # rewritten


def test_a_version_written_around_the_index_is_listed_after_a_rebuild(registered, tmp_path, bundle_dir, capsys):
    from cloud.registry import upload_bundle

    upload_bundle(load_bundle(bundle_copy(bundle_dir, tmp_path / "old", "1.1.0")), registered)  # an older edgeloop
    registered.put(model_key(MODEL, "1.1.0", "approval.json"), json.dumps({"status": "Approved"}).encode())
    assert ("1.1.0", "Approved") not in listed(registered)  # the index cannot know without a scan
    assert LocalRegistry(registered).approval(MODEL, "1.1.0") == "Approved"  # what publish asks reads the truth
    assert main(["model", "list", "--store", str(tmp_path / "registry"), "--rebuild-index"]) == 0
    out = capsys.readouterr()
    assert "index rebuilt: 4 versions" in out.err and out.out.splitlines()[3].split() == [MODEL, "1.1.0", "Approved"]
    assert listed(registered)[3] == ("1.1.0", "Approved")


def test_concurrent_writers_lose_no_entries(tmp_path, bundle_dir):
    store = LocalStore(tmp_path / "registry")
    versions_ = [f"1.0.{i}" for i in range(6)]
    for v in versions_:
        LocalRegistry(store).register(bundle_copy(bundle_dir, tmp_path / v, v))
    watched = Watched(store, threading.Barrier(len(versions_)))
    decisions = {v: ("Approved" if i % 2 else "Rejected") for i, v in enumerate(versions_)}
    errors = []

    def decide(v):
        try:
            LocalRegistry(watched).set_approval(MODEL, v, decisions[v], note=f"note {v}")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=decide, args=(v,)) for v in versions_]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert watched.refused >= len(versions_) - 1  # they did collide: all but one had to take another number
    rows = LocalRegistry(store).versions(MODEL)
    assert {v.version: (v.approval, v.note) for v in rows} == {v: (d, f"note {v}") for v, d in decisions.items()}
    assert len(list(store.list("models/index/"))) == 2 * len(versions_)  # a change each, none overwritten


def test_two_registrations_of_one_version_cannot_mix_files(tmp_path, bundle_dir):
    store = LocalStore(tmp_path / "registry")
    claim = model_key(MODEL, "1.0.0", "claim.json")
    other = load_bundle(other_files(bundle_dir, tmp_path / "other", "1.0.0")).manifest.files
    store.put(claim, json.dumps({"files_sha256": files_digest(other)}).encode())  # claimed, not finished
    with pytest.raises(RegistryError, match="1.0.0 is being registered with other files"):
        LocalRegistry(store).register(bundle_dir)
    assert list(store.list("models/")) == [claim]  # nothing of this bundle was written

    store.put(claim, json.dumps({"files_sha256": files_digest(load_bundle(bundle_dir).manifest.files)}).encode())
    done = LocalRegistry(store).register(bundle_dir, metrics={"auc": 0.93})  # the same files: it goes on
    assert done.approval == "PendingManualApproval"
    metrics = json.loads(store.get(model_key(MODEL, "1.0.0", "metrics.json")))
    assert metrics["evaluation"] == {"auc": 0.93}
    assert metrics["outlier"]["threshold"] == load_bundle(bundle_dir).manifest.outlier.threshold
