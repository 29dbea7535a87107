"""A servable model: a verified bundle, its ONNX Runtime session and its decoder, as one unit.

The service swaps whole ``Model`` objects between two batches, so a record is always decoded,
scored, judged and summarised by one model version. ``load_model`` does every check before a
model may serve: checksums, input schema against the baseline, and a warm-up run that must give
one finite score per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError, load_bundle
from .contracts import ScoringConfig
from .records import RecordDecoder
from .scoring import Scorer, ScoringError
from .streams import StreamWindows
from .summary import grid_id, review_grid


class ModelError(BundleError):
    """A bundle that must not serve: corrupt, inconsistent, or failing its warm-up."""


@dataclass
class Model:
    bundle: Bundle
    scorer: Scorer
    decoder: RecordDecoder
    streams: StreamWindows | None = None  # stream models: each stream's recent values

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def threshold(self) -> float:
        return self.bundle.manifest.outlier.threshold

    @property
    def feature_names(self) -> list[str]:
        return self.bundle.manifest.input.feature_names

    @property
    def feature_edges(self) -> list[list[float]]:
        return [self.bundle.baseline.features[n].hist_edges for n in self.feature_names]

    @property
    def score_edges(self) -> list[float]:
        return self.bundle.baseline.score.hist_edges

    @cached_property
    def feature_grids(self) -> list[np.ndarray]:
        """Each feature's review grid (``summary.review_grid`` of its baseline): windows count on it."""
        return [review_grid(self.bundle.baseline.features[n]) for n in self.feature_names]

    @cached_property
    def score_grid(self) -> np.ndarray:
        return review_grid(self.bundle.baseline.score)

    @cached_property
    def grid_id(self) -> str:
        return grid_id(dict(zip(self.feature_names, self.feature_grids)), self.score_grid)

    @cached_property
    def schema_key(self) -> str:
        """Identifies the input schema: a record parsed ahead for another one is parsed again."""
        stream = self.bundle.manifest.stream
        return self.bundle.manifest.input.model_dump_json() + (f"|stream:{stream.key}" if stream else "")

    def describe(self) -> str:
        return f"{self.name} {self.version} ({self.bundle.root})"


def warm_up_rows(bundle: Bundle, n: int = 8) -> np.ndarray:
    """Plausible rows for a warm-up run: the baseline's means (zeros where it has none); for a
    stream model, windows of its value's mean."""
    means = [bundle.baseline.features[name].mean or 0.0 for name in bundle.manifest.input.feature_names]
    stream = bundle.manifest.stream
    if stream is not None:
        means = [bundle.baseline.features[stream.value].mean or 0.0] * stream.window
    return np.tile(np.asarray(means, dtype=np.float32), (n, 1))


def load_model(path: str | Path, scoring: ScoringConfig, bundle: Bundle | None = None,
               max_batch: int = 256) -> Model:
    """Load, verify and warm up a bundle; raise ModelError (or BundleError) with a one-line reason."""
    bundle = bundle or load_bundle(path)
    scorer = Scorer(str(bundle.root), bundle.manifest, scoring.providers, scoring.intra_op_threads,
                    scoring.io_binding, max_batch)
    rows = warm_up_rows(bundle, min(8, max_batch))
    try:
        scores = scorer.score(rows)
        scorer.score(rows[:1])
    except ScoringError as err:
        raise ModelError(f"{bundle.root}: warm-up failed: {err}") from None
    if not np.isfinite(scores).all():
        raise ModelError(f"{bundle.root}: warm-up gave non-finite scores on the baseline's mean row")
    stream = bundle.manifest.stream
    if stream is None:
        return Model(bundle, scorer, RecordDecoder(bundle.manifest.input))
    if bundle.manifest.input.feature_names != [stream.value]:
        raise ModelError(f"{bundle.root}: a stream model takes one feature, its value {stream.value!r}; "
                         f"the manifest lists {bundle.manifest.input.feature_names}")
    return Model(bundle, scorer, RecordDecoder(bundle.manifest.input, stream.key), StreamWindows(stream))
