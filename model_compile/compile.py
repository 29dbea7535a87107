"""Checking, optimising and packaging a trained model into a bundle.

ONNX Runtime's *basic* offline optimisations (constant folding, redundant-node removal) are the
ones that stay valid on every execution provider, so a bundle optimised here runs on the CPU and
on CUDA alike. Extended and full levels fuse nodes for a particular provider and are refused unless
asked for by name. A parity gate runs the original and the optimised model on held-out rows and
refuses the bundle if they disagree, or if the output is not one value per row.

The fp16 and int8 variants (``model_compile.variants``) are built from the optimised model and
gated against it; one that fails its gate is left out, with the reason in the manifest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_runtime.bundle import MANIFEST_FILE, sha256_file
from edge_runtime.contracts import (
    BundleManifest,
    FeatureSpec,
    InputSchema,
    ModelVariant,
    SkippedVariant,
    load_summary,
)
from model_compile.card import BASELINE_FILE, CALIBRATION_FILE, MODEL_FILE, SAMPLES_FILE, load_card
from model_compile.variants import DEFAULT_TOLERANCE, PRECISIONS, Gate, VariantOutcome, build_variants, gate_rows

CPU_ONLY_DOMAINS = {"ai.onnx.ml"}  # ONNX-ML operators have CPU-provider kernels only
LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


class CompileError(ValueError):
    """The model cannot be packaged as given."""


@dataclass
class CompileResult:
    bundle: Path
    manifest: BundleManifest
    max_abs_diff: float
    cpu_only_ops: list[str]
    variants: list[VariantOutcome] = field(default_factory=list)  # kept and left out, in the order asked


STREAM_VARIANTS = ("not built for a stream model: its graph is a few reductions over one window, with no matrix "
                   "work that reduced precision would speed up, and rounding the raw values would move the "
                   "range it judges against")


def row_width(card) -> int:
    """Values per model row: the features, or for a stream model the window of its stream's values."""
    return int(card.stream["window"]) if card.stream else len(card.features)


def check_model(model, n_features: int, output_name: str) -> tuple[str, list[str]]:
    """Structural checks; returns the input name and any CPU-only operators."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise CompileError(f"ONNX checker rejected the model: {err}") from None
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise CompileError(f"expected one graph input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 2 or (dims[1].HasField("dim_value") and dims[1].dim_value != n_features):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise CompileError(f"input '{inputs[0].name}' has shape {shape}; expected [N, {n_features}]")
    if output_name not in [o.name for o in model.graph.output]:
        raise CompileError(f"model has no output '{output_name}'")
    cpu_only = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain in CPU_ONLY_DOMAINS})
    return inputs[0].name, cpu_only


def _run(path: Path, input_name: str, output_name: str, rows: np.ndarray, level: str = "none") -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run([output_name], {input_name: rows})
    return np.asarray(out)


def optimise(src: Path, dst: Path, level: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise CompileError("ONNX Runtime wrote no optimised model")


def parity(original: np.ndarray, optimised: np.ndarray, rows: int, rtol: float, atol: float) -> float:
    for label, out in (("original", original), ("optimised", optimised)):
        if out.size != rows:
            raise CompileError(
                f"{label} model output has shape {list(out.shape)} for {rows} rows; "
                "expected one value per row (N,) or (N, 1)"
            )
    a, b = original.reshape(-1).astype(np.float64), optimised.reshape(-1).astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise CompileError("model gives non-finite outputs on the sample rows")
    diff = float(np.max(np.abs(a - b)))
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        raise CompileError(f"optimised model disagrees with the original: max abs diff {diff:.3g}")
    return diff


def compile_bundle(model_dir: str | Path, out: str | Path, *, level: str = "basic",
                   rtol: float = 1e-4, atol: float = 1e-5, variants: Iterable[str] = PRECISIONS,
                   variant_tolerance: float = DEFAULT_TOLERANCE) -> CompileResult:
    """``variants``: which of fp16 and int8 to build and gate (``()`` for none); ``variant_tolerance``:
    the gate's output tolerance, relative to the scores' distance from the threshold (see variants)."""
    import onnx

    model_dir, out = Path(model_dir), Path(out)
    if level not in LEVELS:
        raise CompileError(f"unknown optimisation level {level!r}; choose from {sorted(LEVELS)}")
    card = load_card(model_dir)
    src = model_dir / MODEL_FILE
    try:
        model = onnx.load(str(src))
    except FileNotFoundError:
        raise CompileError(f"{src}: not found") from None
    except Exception as err:
        raise CompileError(f"{src}: not a readable ONNX model ({err})") from None
    width = row_width(card)
    input_name, cpu_only = check_model(model, width, card.output.name)
    baseline = load_summary((model_dir / BASELINE_FILE).read_bytes(), str(model_dir / BASELINE_FILE))
    samples = np.load(model_dir / SAMPLES_FILE).astype(np.float32)
    if samples.ndim != 2 or samples.shape[1] != width:
        raise CompileError(f"{SAMPLES_FILE} has shape {samples.shape}; expected (n, {width})")
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in PRECISIONS]
    if unknown:
        raise CompileError(f"unknown variant(s) {unknown}; choose from {list(PRECISIONS)}")
    passed_over = []
    if card.stream and variants:  # a stream model: nothing to gain, and fp16 loses large sensor values
        passed_over = [VariantOutcome(v, None, [], reason=STREAM_VARIANTS) for v in variants]
        variants = []
    calibration = _calibration_rows(model_dir, width) if "int8" in variants else None

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        optimise(src, staging / MODEL_FILE, level)
        diff = parity(
            _run(src, input_name, card.output.name, samples),
            _run(staging / MODEL_FILE, input_name, card.output.name, samples),
            len(samples), rtol, atol,
        )
        outcomes = list(passed_over)
        if variants:
            gate = Gate(tolerance=variant_tolerance)
            rows = gate_rows(lambda x: _run(staging / MODEL_FILE, input_name, card.output.name, x), samples,
                             card.outlier.threshold, card.output.higher_is_outlier, gate)
            outcomes += build_variants(staging / MODEL_FILE, staging, variants, input_name=input_name,
                                      output_name=card.output.name, rows=rows, calibration=calibration,
                                      gpu_capable=not cpu_only, cpu_only_ops=cpu_only, gate=gate)
        kept = [o for o in outcomes if o.kept]
        shutil.copy(model_dir / BASELINE_FILE, staging / BASELINE_FILE)
        manifest = BundleManifest(
            name=card.name, version=card.version, created_at=datetime.now(timezone.utc),
            model_file=MODEL_FILE, baseline_file=BASELINE_FILE,
            files={f: sha256_file(staging / f) for f in (MODEL_FILE, BASELINE_FILE, *(o.file for o in kept))},
            input=InputSchema(
                name=input_name, shape=[None, width],
                features=[FeatureSpec(name=f) for f in card.features],
            ),
            output=card.output, outlier=card.outlier,
            onnx_opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
            optimization=f"onnxruntime {level}", gpu_capable=not cpu_only,
            stream=card.stream, lineage=card.lineage,
            variants={o.precision: ModelVariant(file=o.file, precision=o.precision, providers=o.providers,
                                                parity=o.parity) for o in kept},
            skipped_variants={o.precision: SkippedVariant(precision=o.precision, reason=o.reason, parity=o.parity)
                              for o in outcomes if not o.kept},
        )
        missing = set(card.features) - set(baseline.features)
        if missing:
            raise CompileError(f"baseline lacks features {sorted(missing)}")
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=1))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return CompileResult(out, manifest, diff, cpu_only, outcomes)


def _calibration_rows(model_dir: Path, width: int) -> np.ndarray | None:
    """The training split's rows for int8 calibration; None for a training output made before them."""
    path = model_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    rows = np.load(path).astype(np.float32)
    if rows.ndim != 2 or rows.shape[1] != width or not len(rows):
        raise CompileError(f"{CALIBRATION_FILE} has shape {rows.shape}; expected (n, {width})")
    return rows
