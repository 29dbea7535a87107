"""Retraining: a challenger trained on fresh data, judged against the champion on the same
held-out rows, registered only if it is better.

Fresh data is a CSV of recent records (for a cohort of drifted devices, say). Both models score
the same held-out part of it, and each is measured on two things an engineer can act on:

* **fit**: the largest KS distance between the held-out rows and the model's own baseline (what
  the fleet review will compare devices with once the model runs): a model whose baseline no
  longer looks like the data flags drift and outliers everywhere;
* **calibration**: how far the share of held-out rows it flags is from the rate its threshold
  was calibrated for.

The challenger wins if its fit is better by ``min_gain`` and its calibration is no worse than
the champion's (plus a small tolerance). A winner is registered as pending approval, or approved
with ``approve``; its model component can then be built, published and deployed as usual.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import load_bundle
from edge_runtime.scoring import Scorer
from edge_runtime.store import ObjectStore
from edge_runtime.summary import review_grid, summarise

from . import drift_stats as st
from .registry import PENDING, Registry, as_registry
from .train import TrainingError, apply_missing_policy, parse_missing_policy, read_training_csv, train

CALIBRATION_TOLERANCE = 0.005


@dataclass
class Evaluation:
    version: str
    rows: int
    flagged_rate: float
    target_rate: float
    worst_ks: float  # the largest KS distance of a feature to the model's baseline
    worst_feature: str

    @property
    def calibration_error(self) -> float:
        return abs(self.flagged_rate - self.target_rate)


@dataclass
class RetrainResult:
    champion: Evaluation
    challenger: Evaluation
    better: bool
    reason: str
    bundle: Path
    registered: bool = False
    approval: str | None = None


def evaluate(bundle_dir: str | Path, rows: np.ndarray, names: list[str]) -> Evaluation:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if m.input.feature_names != names:
        raise TrainingError(f"{m.name} {m.version} reads {m.input.feature_names}; the data has {names}")
    scorer = Scorer(str(bundle.root), m, ["CPUExecutionProvider"])
    flagged = float((scorer.score(rows) > m.outlier.threshold).mean())
    baseline = bundle.baseline
    worst, worst_name = 0.0, ""
    for j, name in enumerate(names):
        base = baseline.features[name]
        b = st.Profile(review_grid(base))
        b.add_summary(base)
        c = st.Profile(b.grid)
        c.add_summary(summarise(rows[:, j], base.hist_edges))
        d = st.ks(b, c)
        if d > worst:
            worst, worst_name = d, name
    return Evaluation(m.version, len(rows), flagged, m.outlier.target_false_positive_rate, worst, worst_name)


def retrain(data: str | Path, champion: str | Path, out_dir: str | Path, new_version: str,
            store: Registry | ObjectStore | None = None, approve: bool = False, holdout: float = 0.3,
            min_gain: float = 0.02, seed: int = 0, missing: str | None = None) -> RetrainResult:
    """Train a challenger on ``data``, compare it with the ``champion`` bundle, register it if better
    (``store``: a registry, or an object store holding a local one), with both evaluations as its metrics."""
    from model_compile.compile import compile_bundle

    out = Path(out_dir)
    champ = load_bundle(champion)
    names = champ.manifest.input.feature_names
    raw = read_training_csv(data, names)
    rows, _ = apply_missing_policy(raw, parse_missing_policy(missing, names))
    order = np.random.default_rng(seed).permutation(len(rows))
    n_hold = max(int(len(rows) * holdout), 100)
    if len(rows) - n_hold < 100:
        raise TrainingError(f"{len(rows)} fresh rows: too few to train on and hold out {n_hold}")
    held, fit_rows = rows[order[:n_hold]], rows[order[n_hold:]]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_csv = Path(tmp) / "train.csv"
        with open(train_csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            writer.writerows(fit_rows.tolist())
        train(train_csv, out / "model", name=champ.manifest.name, version=new_version, features=names, seed=seed,
              target_fpr=champ.manifest.outlier.target_false_positive_rate)
    compiled = compile_bundle(out / "model", out / "bundle")
    before, after = evaluate(champion, held, names), evaluate(compiled.bundle, held, names)
    fits = after.worst_ks <= before.worst_ks - min_gain
    calibrated = after.calibration_error <= before.calibration_error + CALIBRATION_TOLERANCE
    better = fits and calibrated
    reason = (f"fit: worst KS {before.worst_ks:.3f} ({before.worst_feature}) -> {after.worst_ks:.3f}; "
              f"flagged {before.flagged_rate:.2%} -> {after.flagged_rate:.2%} (target {after.target_rate:.2%})")
    result = RetrainResult(before, after, better, reason, compiled.bundle)
    if better and store is not None:
        registry = as_registry(store)
        wanted = "Approved" if approve else PENDING
        metrics = {"retrain": {"champion": _as_metrics(before), "challenger": _as_metrics(after), "reason": reason}}
        done = registry.register(compiled.bundle, metrics, status=wanted, note=reason)
        if done.approval != wanted:  # registered before: this decision replaces the earlier one
            registry.set_approval(champ.manifest.name, new_version, wanted, note=reason)
        result.approval = wanted
        result.registered = True
    return result


def _as_metrics(e: Evaluation) -> dict:
    return {"version": e.version, "rows": e.rows, "flagged_rate": e.flagged_rate, "target_rate": e.target_rate,
            "calibration_error": e.calibration_error, "worst_ks": e.worst_ks, "worst_feature": e.worst_feature}
