"""The model registry's approval workflow, through the CLI."""

from __future__ import annotations

import pytest
from helpers import bundle_copy

from cloud.cli import main
from cloud.registry import RegistryError, approval, set_approval, versions
from edge_runtime.store import LocalStore


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
