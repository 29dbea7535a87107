"""The device installs only edge_runtime: it must not import the cloud side, nor compile import cloud."""

import ast

import pytest
from helpers import REPO


def imported_packages(package: str) -> set[str]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("edge_runtime", {"cloud", "model_compile", "sklearn", "skl2onnx", "onnx"}),
    ("model_compile", {"cloud"}),
])
def test_import_boundaries(package, forbidden):
    assert not imported_packages(package) & forbidden
