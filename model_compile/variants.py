"""fp16 and int8 builds of a bundle's model, each kept only if it passes a parity gate against fp32.

- **fp16**, for the GPU providers. Matrix products and the elementwise arithmetic between them run
  in half precision; three kinds of node stay fp32: those that read the raw input (a reading of
  1,677 rpm has an fp16 spacing of 1.0, which the model's scaling then amplifies), reductions and
  exponentials/logarithms (squared distances and log-likelihoods leave fp16's range of +-65,504),
  and everything downstream of those. Inputs and outputs stay float32, so the device feeds and reads
  a variant as it does the fp32 model.
- **int8**, for the CPU provider: ONNX Runtime's static quantization in QDQ format, calibrated on
  rows of the *training* split (``calibration.npy``), never on the held-out rows that gate it. The
  matrix products' weights are int8 per output channel, their inputs uint8 with the calibrated
  range, their outputs float32. A training output without calibration rows gets no int8 variant.

The gate compares a variant with the fp32 model on the held-out rows (``samples.npy``), on the
outlier score the device computes (``sign * output``), and keeps the variant only if all of:

1. **outputs within the tolerance**: for every row, ``|s32 - s| / (D + |s32 - T|) <= tolerance``
   (default 0.02), where T is the threshold and D the distance from the held-out rows' median score
   to T. An error is measured against how far the typical row is from being flagged, plus how far
   this row is from the threshold: near the threshold 2% of D, further out a proportionate share.
   A likelihood-valued output has no meaningful relative error of its own (values near zero), and
   an absolute one would have to be chosen per model; this scale comes from the model's own scores.
2. **decisions agree** (outlier or not, at the threshold) on at least 99.5% of held-out rows.
3. **far rows stay flagged**: the held-out rows pushed 4 and 16 times as far from their median row
   are rows far outside the training data; of those the fp32 model flags, the variant must flag at
   least 99.5%. Held-out rows seldom show what a variant does with a reading far outside the range
   it was calibrated or represented on: int8 inputs saturate at the calibrated range (a spike then
   looks like an ordinary high reading) and fp16 overflows; outliers are what the model is for.

A variant that fails, or cannot be built or run, is left out with the reason; ``parity`` records
what the gate measured either way. The outputs a gate judges are always computed: fp16 on ONNX's
reference evaluator (numpy arithmetic in fp16: no fp32 accumulation to flatter it) and also on a
GPU provider where the compiling machine has one, the worse result counting; int8 on ONNX
Runtime's CPU provider, the kernels the device runs it with (the gate measured the compiling
machine's CPU: x86 and ARM int8 kernels differ slightly).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.scoring import GPU_PROVIDERS

PRECISIONS = ("fp16", "int8")
VARIANT_FILES = {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PROVIDERS = {"fp16": sorted(GPU_PROVIDERS), "int8": ["CPUExecutionProvider"]}

DEFAULT_TOLERANCE = 0.02
MIN_AGREEMENT = 0.995
FAR_FACTORS = (4.0, 16.0)

# operators that compute the same function in fp16, with no type attribute to rewrite
FP16_OPS = {
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "LeakyRelu",
    "Sigmoid", "Tanh", "Clip", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice",
    "Gather", "Identity", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
}
# operators whose float output is no wider than their inputs: they keep no node downstream in fp32
RANGE_NEUTRAL_OPS = {"Constant", "ConstantOfShape", "Shape", "Size", "Cast"}
INT8_OPS = ["MatMul", "Gemm", "Conv"]


class VariantError(ValueError):
    """A variant could not be built or run; the message becomes the reason it is left out."""


@dataclass(frozen=True)
class Gate:
    tolerance: float = DEFAULT_TOLERANCE
    min_agreement: float = MIN_AGREEMENT
    far_factors: tuple[float, ...] = FAR_FACTORS


@dataclass
class GateRows:
    """The rows a gate runs on and what the fp32 model says about them, as outlier scores."""

    held_out: np.ndarray
    far: np.ndarray
    held_out_scores: np.ndarray
    far_scores: np.ndarray
    threshold: float
    sign: float


@dataclass
class VariantOutcome:
    precision: str
    file: str | None  # bundle-relative; None when left out
    providers: list[str]
    parity: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # why it was left out
    evaluated_with: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return self.file is not None


def far_rows(rows: np.ndarray, factors: Iterable[float]) -> np.ndarray:
    """The rows pushed ``factor`` times as far from their per-feature median row."""
    median = np.median(rows, axis=0)
    return np.concatenate([median + f * (rows - median) for f in factors]).astype(np.float32)


def gate_rows(score_fp32: Callable[[np.ndarray], np.ndarray], held_out: np.ndarray, threshold: float,
              higher_is_outlier: bool, gate: Gate = Gate()) -> GateRows:
    """Score the gate's rows with the fp32 model (``score_fp32`` returns raw model outputs)."""
    sign = 1.0 if higher_is_outlier else -1.0
    held_out = np.ascontiguousarray(held_out, dtype=np.float32)
    far = far_rows(held_out, gate.far_factors)
    return GateRows(held_out, far, sign * _flat(score_fp32(held_out)), sign * _flat(score_fp32(far)),
                    float(threshold), sign)


def _flat(out) -> np.ndarray:
    return np.asarray(out).reshape(-1).astype(np.float64)


def measure(rows: GateRows, held_out_scores: np.ndarray, far_scores: np.ndarray,
            gate: Gate = Gate()) -> tuple[dict[str, float], str | None]:
    """The gate on a variant's outlier scores: what it measured, and why it fails (None: it passes)."""
    a, b = rows.held_out_scores, np.asarray(held_out_scores, dtype=np.float64).reshape(-1)
    fa, fb = rows.far_scores, np.asarray(far_scores, dtype=np.float64).reshape(-1)
    if b.size != a.size or fb.size != fa.size:
        return {}, f"gives {b.size + fb.size} values for {a.size + fa.size} rows; expected one per row"
    t = rows.threshold
    scale = abs(t - float(np.median(a)))
    if not scale > 0:
        q1, q3 = np.quantile(a, [0.25, 0.75])
        scale = float(q3 - q1) or 1.0
    finite = np.isfinite(b)
    diff = np.where(finite, np.abs(a - b), 0.0)  # non-finite rows are counted apart: the manifest is JSON
    rel = diff / (scale + np.abs(a - t))
    flagged = fa > t
    far_recall = float((fb[flagged] > t).mean()) if flagged.any() else 1.0
    parity = {
        "rows": float(a.size),
        "nonfinite_rows": float((~finite).sum()),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()),
        "decision_agreement": float(((a > t) == (b > t)).mean()),
        "far_rows": float(fa.size),
        "far_flagged": float(flagged.sum()),
        "far_recall": far_recall,
        "tolerance": gate.tolerance,
        "min_agreement": gate.min_agreement,
    }
    if not finite.all():
        return parity, f"non-finite outputs on {int((~finite).sum())} of {a.size} held-out rows"
    if parity["max_rel_diff"] > gate.tolerance:
        i = int(np.argmax(rel))
        return parity, (f"outputs outside the tolerance: relative difference {rel[i]:.3g} > {gate.tolerance:g} "
                        f"(score {a[i]:.4g} vs {b[i]:.4g}, threshold {t:.4g})")
    if parity["decision_agreement"] < gate.min_agreement:
        return parity, (f"outlier decisions agree on {parity['decision_agreement']:.2%} of held-out rows "
                        f"< {gate.min_agreement:.1%}")
    if far_recall < gate.min_agreement:
        missed = int(flagged.sum() - (fb[flagged] > t).sum())
        return parity, (f"misses {missed} of {int(flagged.sum())} far-out rows the fp32 model flags "
                        f"(far recall {far_recall:.2%} < {gate.min_agreement:.1%})")
    return parity, None


def worst(results: list[tuple[dict[str, float], str | None]]) -> tuple[dict[str, float], str | None]:
    """Several evaluators' gates on one variant: the worst figures, the first failure."""
    parity: dict[str, float] = {}
    for p, _ in results:
        for k, v in p.items():
            higher_is_worse = k in ("nonfinite_rows", "max_abs_diff", "max_rel_diff")
            lower_is_worse = k in ("decision_agreement", "far_recall")
            if k not in parity or (higher_is_worse and v > parity[k]) or (lower_is_worse and v < parity[k]):
                parity[k] = v
    return parity, next((r for _, r in results if r), None)


# --- building ----------------------------------------------------------------------------------


def to_fp16(model) -> tuple[object, list[str]]:
    """An fp16 copy of ``model`` (float32 inputs and outputs kept); returns it and the converted nodes.

    Which nodes convert: see the module docstring. Each fp16 node reads fp16 copies of its float
    inputs (initializers converted once, other tensors through one Cast) and writes ``<name>/fp16``;
    a Cast back to float32 under the original name serves every fp32 reader and graph output, and
    is dropped where nothing reads it.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    graph = onnx.shape_inference.infer_shapes(model).graph
    init = {t.name: t for t in graph.initializer}
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    raw_inputs = {i.name for i in graph.input} - set(init)

    convert, tainted = set(), set()
    for i, node in enumerate(graph.node):
        reads = {t for t in node.input if t}
        if node.op_type in FP16_OPS and node.domain in ("", "ai.onnx") and not reads & (raw_inputs | tainted) \
                and any(types.get(t) == FLOAT for t in reads) and all(t in types for t in reads) \
                and all(types.get(o) == FLOAT for o in node.output if o):
            convert.add(i)
        elif reads & tainted or node.op_type not in FP16_OPS | RANGE_NEUTRAL_OPS:
            tainted.update(o for o in node.output if types.get(o) == FLOAT)
    if not convert:
        return model, []

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes, added, halves, new_inits, half_made = [], [], {}, [], set()

    def half(name: str) -> str:
        if name in half_made:
            return f"{name}/fp16"
        if name not in halves:
            halves[name] = f"{name}/fp16"
            if name in init:
                value = numpy_helper.to_array(init[name]).astype(np.float16)
                new_inits.append(numpy_helper.from_array(value, halves[name]))
            else:
                cast = helper.make_node("Cast", [name], [halves[name]], to=HALF, name=f"{name}/to_fp16")
                nodes.append(cast)
                added.append(cast)
        return halves[name]

    for i, node in enumerate(g.node):
        if i not in convert:
            nodes.append(node)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, t in enumerate(node.input):
            if t and types.get(t) == FLOAT:
                new.input[k] = half(t)
        outputs = [t for t in node.output if t]
        for k, t in enumerate(node.output):
            if t:
                new.output[k] = f"{t}/fp16"
                half_made.add(t)
        nodes.append(new)
        for t in outputs:
            cast = helper.make_node("Cast", [f"{t}/fp16"], [t], to=FLOAT, name=f"{t}/to_fp32")
            nodes.append(cast)
            added.append(cast)
    g.initializer.extend(new_inits)
    del g.value_info[:]  # types changed; ONNX Runtime infers them again
    needed = {o.name for o in g.output}
    for node in nodes:
        if not any(node is a for a in added):
            needed.update(node.input)
    keep: list = []
    for node in reversed(nodes):  # an added Cast stays only if something reads it
        if any(node is a for a in added) and not set(node.output) & needed:
            continue
        needed.update(node.input)
        keep.append(node)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = {t for n in g.node for t in n.input}
    kept_inits = [t for t in g.initializer if t.name in used or t.name in {i.name for i in g.input}]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    return out, [graph.node[i].name or f"#{i} {graph.node[i].op_type}" for i in sorted(convert)]


class _Rows:
    """ONNX Runtime's CalibrationDataReader protocol over a matrix, in batches."""

    def __init__(self, input_name: str, rows: np.ndarray, batch: int = 256) -> None:
        self._batches = iter([{input_name: rows[i:i + batch]} for i in range(0, len(rows), batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # part of the protocol; calibration reads once
        pass


@contextmanager
def _quiet_quantizer():
    """The quantizer logs advice on the root logger (pre-processing, ...) that is no news here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def to_int8(src: Path, dst: Path, input_name: str, calibration: np.ndarray) -> int:
    """Static QDQ quantization of ``src`` calibrated on ``calibration``; returns the nodes quantized."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Rows, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="edgeloop-int8-") as tmp, _quiet_quantizer():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_optimization=True)
        quantize_static(
            str(prepared), str(dst), Reader(input_name, np.ascontiguousarray(calibration, dtype=np.float32)),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=INT8_OPS, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": INT8_OPS},
        )
    graph = onnx.load(str(dst)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in graph.node if n.op_type in INT8_OPS and dequantized & set(n.input))


# --- running -----------------------------------------------------------------------------------


def run_ort(path: Path, input_name: str, output_name: str, rows: np.ndarray, provider: str) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    if session.get_providers()[0] != provider:
        raise VariantError(f"{provider} did not start")
    (out,) = session.run([output_name], {input_name: rows})
    return np.asarray(out)


def run_reference(path: Path, input_name: str, output_name: str, rows: np.ndarray) -> np.ndarray:
    """ONNX's reference evaluator: each operator in numpy, in the tensor's own precision."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    with np.errstate(all="ignore"):  # fp16 overflow is what the gate is there to see
        (out,) = ReferenceEvaluator(onnx.load(str(path))).run([output_name], {input_name: rows})
    return np.asarray(out)


def fp16_evaluators() -> list[str]:
    """Where the fp16 gate runs: always the reference evaluator, and the GPU providers present."""
    import onnxruntime as ort

    return ["reference"] + [p for p in PROVIDERS["fp16"] if p in ort.get_available_providers()]


def build_variants(fp32: Path, out_dir: Path, precisions: Iterable[str], *, input_name: str, output_name: str,
                   rows: GateRows, calibration: np.ndarray | None, gpu_capable: bool, cpu_only_ops: list[str],
                   gate: Gate = Gate()) -> list[VariantOutcome]:
    """Build, gate and keep (in ``out_dir``) or leave out each variant of the fp32 model ``fp32``."""
    outcomes = []
    for precision in precisions:
        if precision not in PRECISIONS:
            raise VariantError(f"unknown variant {precision!r}; choose from {list(PRECISIONS)}")
        path = out_dir / VARIANT_FILES[precision]
        outcome = VariantOutcome(precision, None, PROVIDERS[precision])
        try:
            if precision == "fp16":
                _build_fp16(fp32, path, gpu_capable, cpu_only_ops)
                evaluators = fp16_evaluators()
            else:
                _build_int8(fp32, path, input_name, calibration)
                evaluators = ["CPUExecutionProvider"]
            results = []
            for ev in evaluators:
                held, far = (_evaluate(path, ev, input_name, output_name, x) for x in (rows.held_out, rows.far))
                results.append(measure(rows, rows.sign * held, rows.sign * far, gate))
                outcome.evaluated_with.append(ev)
            outcome.parity, outcome.reason = worst(results)
        except VariantError as err:
            outcome.reason = str(err)
        if outcome.reason is None:
            outcome.file = path.name
        elif path.exists():
            path.unlink()
        outcomes.append(outcome)
    return outcomes


def _evaluate(path: Path, evaluator: str, input_name: str, output_name: str, rows: np.ndarray) -> np.ndarray:
    try:
        if evaluator == "reference":
            return _flat(run_reference(path, input_name, output_name, rows))
        return _flat(run_ort(path, input_name, output_name, rows, evaluator))
    except VariantError:
        raise
    except Exception as err:  # onnxruntime's and the evaluator's own errors
        raise VariantError(f"does not run on {evaluator}: {str(err).splitlines()[0][:300]}") from None


def _build_fp16(src: Path, dst: Path, gpu_capable: bool, cpu_only_ops: list[str]) -> None:
    import onnx

    if not gpu_capable:
        raise VariantError(f"the graph has CPU-provider-only operators {cpu_only_ops}: no GPU provider runs it")
    model, converted = to_fp16(onnx.load(str(src)))
    if not converted:
        raise VariantError("no operator can run in fp16 (see FP16_OPS and the rules in model_compile/variants.py)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise VariantError(f"the fp16 graph is not valid ONNX: {str(err).splitlines()[0][:300]}") from None
    onnx.save(model, str(dst))


def _build_int8(src: Path, dst: Path, input_name: str, calibration: np.ndarray | None) -> None:
    if calibration is None:
        raise VariantError("no calibration rows from the training split (calibration.npy): train again with "
                           "this version of edgeloop to get an int8 variant")
    try:
        quantized = to_int8(src, dst, input_name, calibration)
    except Exception as err:  # the quantizer's own errors
        raise VariantError(f"static quantization failed: {str(err).splitlines()[0][:300]}") from None
    if not quantized:
        raise VariantError(f"no {'/'.join(INT8_OPS)} with a constant weight to quantize")
