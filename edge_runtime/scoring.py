"""Scoring feature matrices with ONNX Runtime.

The scorer asks for the execution providers the config names, in order (``auto``: CUDA, then
CPU), each with its options, and then trusts only ``session.get_providers()``: the build's list of
available providers says what it was compiled with, not what can start on this machine. Every
requested provider that did not start gets one warning naming it, with ONNX Runtime's own reason
where it gave one. On a GPU provider inputs and outputs are bound to reusable buffers (I/O
binding), and the bundle's fp16 variant is used where it has one.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .contracts import BundleManifest, ProviderSpec

log = logging.getLogger(__name__)

AUTO_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


class ScoringError(RuntimeError):
    """The model cannot be loaded, or gave an output of the wrong shape."""


@dataclass(frozen=True)
class ProviderRequest:
    name: str
    options: dict
    explicit: bool  # named in the config, not only implied by 'auto'


def expand_providers(requested: list[str | ProviderSpec]) -> list[ProviderRequest]:
    """The config's list as (name, options) pairs: ``auto`` expanded, CPU always last as the fallback.

    Names that came from ``auto`` are not demands: ``provider_failures`` is silent about one that
    this build does not even have (a CPU build on a CPU device is what ``auto`` wants there)."""
    out: list[ProviderRequest] = []
    for item in requested:
        spec = item if isinstance(item, ProviderSpec) else ProviderSpec(name=item)
        names = AUTO_PROVIDERS if spec.name == "auto" else [spec.name]
        for name in names:
            if name not in (r.name for r in out):
                options = {k: str(v) for k, v in spec.options.items()}
                out.append(ProviderRequest(name, options, spec.name != "auto"))
    if not out:
        raise ScoringError("scoring.providers is empty")
    if "CPUExecutionProvider" not in (r.name for r in out):
        out.append(ProviderRequest("CPUExecutionProvider", {}, False))
    return out


def choose_model_file(manifest: BundleManifest, active: str) -> str:
    """The bundle's variant made for the active provider (fp16 on a GPU), else the fp32 model."""
    for variant in manifest.variants.values():
        if active in variant.providers:
            return variant.file
    return manifest.model_file


@contextmanager
def _captured_stderr():
    """ONNX Runtime explains a provider that failed to start only on the process's stderr (its C++
    logger); catch that text, then pass it on unchanged so nothing is hidden."""
    captured: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            if text:
                os.write(2, text.encode())
            captured.append(text)


def provider_failures(wanted: list[ProviderRequest], active: list[str], available: list[str],
                      ort_log: str) -> dict[str, str]:
    """For each requested provider that did not start: why, as far as ONNX Runtime said."""
    reasons = {}
    for request in wanted:
        name = request.name
        if name in active:
            continue
        if name not in available:
            if request.explicit:
                reasons[name] = f"not in this ONNX Runtime build (it has {available})"
            continue
        short = name.removesuffix("ExecutionProvider")
        text = re.sub(r"\x1b\[[0-9;]*m", "", ort_log)  # its terminal colours
        lines = [ln.strip() for ln in text.splitlines() if short.lower() in ln.lower() or "fail" in ln.lower()]
        # drop ORT's "<time> [E:onnxruntime:Default, file:line function] " prefix
        reason = " | ".join(re.sub(r"^\S+ \S+ \[[A-Z]:onnxruntime:[^\]]*\] ", "", ln) for ln in lines[-3:] if ln)
        reasons[name] = reason or "ONNX Runtime gave no reason (run with its log level raised to see more)"
    return reasons


@dataclass
class _Binding:
    """Input and output buffers of one batch size, kept for the next batch of that size."""

    binding: object
    input: object
    output: object
    host: np.ndarray  # the buffer behind a CPU-side input: owned here, never a caller's array


class Scorer:
    """Turns an (n, f) float32 matrix into n outlier scores, higher meaning more unusual."""

    def __init__(self, bundle_root: str, manifest: BundleManifest, providers: list,
                 intra_op_threads: int = 1, io_binding: str = "auto", max_batch: int = 256) -> None:
        import onnxruntime as ort

        self.ort = ort
        options = ort.SessionOptions()
        # the bundle was optimised offline; don't pay for it again at every start
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
        # spinning threads burn a core between batches on a device that is mostly idle
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = expand_providers(providers)
        available = ort.get_available_providers()
        model_file = manifest.model_file
        self.session = self._open(f"{bundle_root}/{model_file}", options, wanted)
        self.active_providers = self.session.get_providers()
        self.failed = provider_failures(wanted, self.active_providers, available, self._ort_log)
        for name, reason in self.failed.items():
            log.warning("execution provider %s requested but not started: %s", name, reason)
        variant = choose_model_file(manifest, self.provider)
        if variant != model_file:  # reopen on the variant made for this provider
            self.session = self._open(f"{bundle_root}/{variant}", options, wanted)
            self.active_providers = self.session.get_providers()
        self.model_file = variant
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name
        self.sign = 1.0 if manifest.output.higher_is_outlier else -1.0
        # a stream model's row is a window of its stream's values, not the record's features
        self.n_features = manifest.stream.window if manifest.stream else len(manifest.input.features)
        on_gpu = self.provider in GPU_PROVIDERS
        self.bind = io_binding == "on" or (io_binding == "auto" and on_gpu)
        self.device = "cuda" if on_gpu else "cpu"
        self._bindings: dict[int, _Binding] = {}
        # a CUDA graph replays one captured shape: every batch is padded to max_batch rows
        active = next((r for r in wanted if r.name == self.provider), None)
        graph = active is not None and str(active.options.get("enable_cuda_graph", "0")).lower() in ("1", "true")
        self.pad_to = max_batch if graph else None
        if self.pad_to:
            self.bind = True
        self.last_seconds = 0.0
        log.info("scoring %s with %s", variant, self.provider)

    def _open(self, path: str, options, wanted: list[ProviderRequest]):
        with _captured_stderr() as captured, warnings.catch_warnings():
            # ORT also warns (in Python) about a provider missing from its build: we say it once, better
            warnings.simplefilter("ignore", UserWarning)
            try:
                session = self.ort.InferenceSession(
                    path, options, providers=[r.name for r in wanted], provider_options=[r.options for r in wanted]
                )
            except Exception as err:  # onnxruntime raises its own untyped errors
                raise ScoringError(f"cannot load model {path}: {err}") from None
        self._ort_log = "".join(captured)
        return session

    @property
    def provider(self) -> str:
        return self.active_providers[0]

    def score(self, matrix: np.ndarray) -> np.ndarray:
        if matrix.ndim != 2 or matrix.shape[1] != self.n_features:
            raise ScoringError(f"expected a (n, {self.n_features}) matrix, got {matrix.shape}")
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        rows = len(matrix)
        if self.pad_to and rows < self.pad_to:
            matrix = np.concatenate([matrix, np.repeat(matrix[-1:], self.pad_to - rows, axis=0)])
        t = time.perf_counter()
        try:
            out = self._run_bound(matrix) if self.bind else self.session.run(
                [self.output_name], {self.input_name: matrix})[0]
        except Exception as err:  # onnxruntime's own errors (bad input, CUDA out of memory, ...)
            raise ScoringError(f"ONNX Runtime failed on a batch of {len(matrix)}: {err}") from None
        finally:
            self.last_seconds = time.perf_counter() - t
        out = np.asarray(out)
        if out.size != matrix.shape[0]:
            raise ScoringError(
                f"model output '{self.output_name}' has shape {out.shape} for {matrix.shape[0]} rows"
            )
        return self.sign * out.reshape(-1)[:rows].astype(np.float64)

    def _run_bound(self, matrix: np.ndarray) -> np.ndarray:
        """I/O binding with device buffers kept per batch size: copy in, run, copy out, nothing
        allocated per batch once each size has been seen."""
        n = len(matrix)
        b = self._bindings.get(n)
        if b is None:
            ort = self.ort
            binding = self.session.io_binding()
            host = matrix.copy()
            inp = ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)
            meta = next(o for o in self.session.get_outputs() if o.name == self.output_name)
            shape = [d if isinstance(d, int) else n for d in meta.shape]
            dtype = np.float64 if meta.type == "tensor(double)" else np.float32
            out = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)
            binding.bind_ortvalue_input(self.input_name, inp)
            binding.bind_ortvalue_output(self.output_name, out)
            b = self._bindings[n] = _Binding(binding, inp, out, host)
            if len(self._bindings) > 64:  # many distinct sizes: keep memory bounded
                self._bindings.pop(next(iter(self._bindings)))
        else:
            b.input.update_inplace(matrix)
        self.session.run_with_iobinding(b.binding)
        return b.output.numpy()
