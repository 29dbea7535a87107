"""Scoring feature matrices with ONNX Runtime.

The scorer asks for the execution providers the config names (``auto``: CUDA, then CPU) and then
reports the ones the session actually runs with: ``get_available_providers()`` lists what the
installed build was compiled with, not what can start on this machine.
"""

from __future__ import annotations

import logging

import numpy as np

from .contracts import BundleManifest

log = logging.getLogger(__name__)

AUTO_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class ScoringError(RuntimeError):
    """The model cannot be loaded, or gave an output of the wrong shape."""


def resolve_providers(requested: list[str], available: list[str]) -> list[str]:
    wanted: list[str] = []
    for name in requested:
        for p in AUTO_PROVIDERS if name == "auto" else [name]:
            if p in available and p not in wanted:
                wanted.append(p)
    if not wanted:
        raise ScoringError(f"none of the execution providers {requested} is in this build ({available})")
    return wanted


class Scorer:
    """Turns an (n, f) float32 matrix into n outlier scores, higher meaning more unusual."""

    def __init__(self, model_path: str, manifest: BundleManifest, providers: list[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # the bundle was optimised offline; don't pay for it again at every start
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        chosen = resolve_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(model_path, options, providers=chosen)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ScoringError(f"cannot load model {model_path}: {err}") from None
        self.active_providers = self.session.get_providers()
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name
        self.sign = 1.0 if manifest.output.higher_is_outlier else -1.0
        self.n_features = len(manifest.input.features)
        log.info("scoring with %s", self.active_providers[0])

    @property
    def provider(self) -> str:
        return self.active_providers[0]

    def score(self, matrix: np.ndarray) -> np.ndarray:
        if matrix.ndim != 2 or matrix.shape[1] != self.n_features:
            raise ScoringError(f"expected a (n, {self.n_features}) matrix, got {matrix.shape}")
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: matrix.astype(np.float32)})
        except Exception as err:  # onnxruntime's own errors (bad input, CUDA out of memory, ...)
            raise ScoringError(f"ONNX Runtime failed on a batch of {len(matrix)}: {err}") from None
        out = np.asarray(out)
        if out.size != matrix.shape[0]:
            raise ScoringError(
                f"model output '{self.output_name}' has shape {out.shape} for {matrix.shape[0]} rows"
            )
        return self.sign * out.reshape(-1).astype(np.float64)
