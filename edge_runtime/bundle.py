"""Model bundles on disk: a directory of model files plus ``manifest.json``.

The device refuses a bundle whose files do not match the manifest's checksums: a half-copied or
tampered model must never score.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .contracts import BundleManifest, ContractError, WindowSummary, load_manifest, load_summary

MANIFEST_FILE = "manifest.json"


class BundleError(ContractError):
    """A model bundle is missing, incomplete or corrupt."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: BundleManifest
    baseline: WindowSummary

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file


def verify_files(root: Path, manifest: BundleManifest) -> None:
    for rel in (manifest.model_file, manifest.baseline_file):
        if rel not in manifest.files:
            raise BundleError(f"{root}: manifest lists no checksum for {rel}")
    for rel, expected in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{root}: bundle file {rel} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{root}: checksum mismatch for {rel} (manifest {expected[:12]}…, file {actual[:12]}…)"
            )


def load_bundle(root: str | Path) -> Bundle:
    """Load and verify a bundle; raise BundleError with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: model bundle directory not found")
    manifest = load_manifest(root / MANIFEST_FILE)
    verify_files(root, manifest)
    baseline_path = root / manifest.baseline_file
    baseline = load_summary(baseline_path.read_bytes(), str(baseline_path))
    missing = set(manifest.input.feature_names) - set(baseline.features)
    if missing:
        raise BundleError(f"{root}: baseline lacks features {sorted(missing)}")
    return Bundle(root=root, manifest=manifest, baseline=baseline)
