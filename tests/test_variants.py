"""fp16 and int8 variants: built, gated against fp32, kept or left out with the reason, and served."""

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud import synthetic
from cloud.cli import main
from edge_runtime.bundle import load_bundle, sha256_file
from edge_runtime.contracts import ScoringConfig
from edge_runtime.model import load_model
from edge_runtime.scoring import Scorer, choose_model_file
from model_compile.byo import bundle_onnx
from model_compile.card import CALIBRATION_FILE, SAMPLES_FILE
from model_compile.compile import compile_bundle
from model_compile.variants import GateRows, measure, to_fp16

CPU = ["CPUExecutionProvider"]


def _model(nodes, inits, n_features: int, path):
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def squashed_model(path, center, spread, weights):
    """score = |tanh((x - center) / spread) @ W|^2: the matrix product only ever sees values in
    (-1, 1), so a range calibrated on training rows covers every row: int8 can keep this model."""
    return _model([
        helper.make_node("Sub", ["x", "c"], ["d"]), helper.make_node("Div", ["d", "s"], ["z"]),
        helper.make_node("Tanh", ["z"], ["t"]), helper.make_node("MatMul", ["t", "W"], ["u"]),
        helper.make_node("ReduceSumSquare", ["u"], ["score"], axes=[1], keepdims=1),
    ], {"c": center, "s": spread, "W": weights}, len(center), path)


def write_csv(path, X, names):
    lines = [",".join(names)] + [",".join(f"{v:.6f}" for v in row) for row in X]
    path.write_text("\n".join(lines) + "\n")
    return path


CENTER, SD = np.array([10.0, 20.0, 30.0]), np.array([2.0, 5.0, 1.0])


def sensor_rows(n, seed):
    return (np.random.default_rng(seed).standard_normal((n, 3)) * SD + CENTER).astype(np.float32)


@pytest.fixture(scope="module")
def squashed_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("squashed")
    model = squashed_model(work / "sq.onnx", CENTER, SD / 2, [[1, 0.3, 0], [0, 1, 0.2], [0.1, 0, 1]])
    data = write_csv(work / "rows.csv", sensor_rows(3000, 0), ["a", "b", "c"])
    return bundle_onnx(model, data, work / "bundle", higher_is_outlier=True).compiled.bundle


def test_default_bundle_lists_its_gated_variants_with_checksums(bundle_dir):
    m = load_bundle(bundle_dir).manifest  # load_bundle verifies every listed file's checksum
    fp16 = m.variants["fp16"]
    assert fp16.file == "model.fp16.onnx" and m.files[fp16.file] == sha256_file(bundle_dir / fp16.file)
    assert "CUDAExecutionProvider" in fp16.providers and "CPUExecutionProvider" not in fp16.providers
    p = fp16.parity
    assert p["rows"] >= 1000 and p["max_rel_diff"] <= p["tolerance"] == 0.02
    assert p["decision_agreement"] >= 0.995 and p["far_recall"] >= 0.995 and p["far_flagged"] > 0
    # fp16 holds the input scaling in fp32: raw readings like 1,700 rpm lose a whole unit in fp16
    graph = onnx.load(str(bundle_dir / fp16.file)).graph
    assert graph.node[0].op_type == "Sub" and graph.node[0].input[0] == graph.input[0].name
    types = {t.name: t.type.tensor_type.elem_type for t in (*graph.input, *graph.output)}
    assert types[m.input.name] == types[m.output.name] == TensorProto.FLOAT  # the device feeds and reads float32
    assert any(n.op_type == "Gemm" and n.input[0].endswith("/fp16") for n in graph.node)


def test_int8_of_the_default_model_is_left_out_for_saturating_on_outliers(bundle_dir):
    """Static int8 clips inputs at the range calibrated on training rows: a row beyond it scores like
    an ordinary high reading. The gate sees it on held-out rows and leaves int8 out, saying why."""
    m = load_bundle(bundle_dir).manifest
    assert "int8" not in m.variants and not (bundle_dir / "model.int8.onnx").exists()
    skipped = m.skipped_variants["int8"]
    assert "outside the tolerance" in skipped.reason
    assert skipped.parity["max_rel_diff"] > skipped.parity["tolerance"]
    # decision agreement alone (99.5%) would have let it through: the tolerance is what catches it
    assert skipped.parity["decision_agreement"] >= 0.995


def test_int8_variant_serves_on_cpu_and_agrees_with_fp32_on_fresh_rows(squashed_bundle):
    manifest = load_bundle(squashed_bundle).manifest
    int8 = manifest.variants["int8"]
    assert int8.providers == CPU and int8.parity["max_rel_diff"] <= 0.02
    model = load_model(squashed_bundle, ScoringConfig(providers=["CPUExecutionProvider"]))
    assert model.scorer.model_file == "model.int8.onnx"
    fp32 = Scorer(str(squashed_bundle), manifest.model_copy(update={"variants": {}}), CPU)
    assert fp32.model_file == "model.onnx"
    fresh = sensor_rows(5000, 99)
    fresh[::50] += np.array([6.0, -15.0, 3.0], dtype=np.float32)  # some unusual rows
    t = manifest.outlier.threshold
    a, b = fp32.score(fresh) > t, model.scorer.score(fresh) > t
    assert a.sum() >= 20  # enough flagged rows for agreement to mean something
    assert (a == b).mean() >= 0.995


def test_fp16_file_is_a_runnable_model_agreeing_with_fp32(bundle_dir):
    """No GPU here: the fp16 file run on ONNX Runtime's CPU kernels, by the device's own Scorer."""
    manifest = load_bundle(bundle_dir).manifest
    as_cpu = manifest.model_copy(deep=True)
    as_cpu.variants["fp16"].providers = CPU
    half = Scorer(str(bundle_dir), as_cpu, CPU)
    full = Scorer(str(bundle_dir), manifest, CPU)
    assert (half.model_file, full.model_file) == ("model.fp16.onnx", "model.onnx")
    fresh = synthetic.device_stream("fresh", 4000, seed=5, anomaly_rate=0.02)
    t = manifest.outlier.threshold
    a, b = full.score(fresh.X), half.score(fresh.X)
    assert ((a > t) == (b > t)).mean() >= 0.995
    assert (b[fresh.anomaly] > t).mean() >= (a[fresh.anomaly] > t).mean() - 0.005


def test_device_falls_back_to_fp32_when_no_variant_suits_its_provider(bundle_dir, tmp_path):
    manifest = load_bundle(bundle_dir).manifest
    assert choose_model_file(manifest, "CUDAExecutionProvider") == "model.fp16.onnx"
    assert choose_model_file(manifest, "CPUExecutionProvider") == "model.onnx"
    model = load_model(bundle_dir, ScoringConfig(providers=["auto"]))  # no GPU here: CPU, and fp32
    assert model.scorer.provider == "CPUExecutionProvider" and model.scorer.model_file == "model.onnx"
    assert np.isfinite(model.scorer.score(synthetic.training_frame(100, seed=1))).all()


def test_fp16_that_cannot_meet_the_tolerance_is_left_out(trained_dir, tmp_path):
    result = compile_bundle(trained_dir, tmp_path / "b", variants=["fp16"], variant_tolerance=1e-5)
    m = result.manifest
    assert m.variants == {} and set(m.files) == {"model.onnx", "baseline.json"}
    assert not (tmp_path / "b" / "model.fp16.onnx").exists()
    skipped = m.skipped_variants["fp16"]
    assert "outside the tolerance" in skipped.reason and skipped.parity["max_rel_diff"] > 1e-5
    assert "int8" not in m.skipped_variants  # not asked for
    load_model(tmp_path / "b", ScoringConfig(providers=["CPUExecutionProvider"]))


def test_fp16_overflow_is_left_out(tmp_path):
    """A model whose intermediate values leave fp16's range (+-65,504): fp16 gives inf, and is left out."""
    model = _model([
        helper.make_node("Sub", ["x", "c"], ["d"]), helper.make_node("Div", ["d", "s"], ["z"]),
        helper.make_node("MatMul", ["z", "W"], ["u"]),
        helper.make_node("ReduceSumSquare", ["u"], ["r"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["r", "k"], ["score"]),
    ], {"c": CENTER, "s": SD, "W": np.eye(3) * 5e4, "k": [1e-9]}, 3, tmp_path / "big.onnx")
    data = write_csv(tmp_path / "rows.csv", sensor_rows(1000, 1), ["a", "b", "c"])
    result = bundle_onnx(model, data, tmp_path / "b", higher_is_outlier=True, variants=["fp16"]).compiled
    assert result.manifest.variants == {}
    skipped = result.manifest.skipped_variants["fp16"]
    assert skipped.reason.startswith("non-finite outputs on") and skipped.parity["nonfinite_rows"] > 0
    text = (result.bundle / "manifest.json").read_text()
    assert "Infinity" not in text and "NaN" not in text  # plain JSON, for any reader
    load_bundle(result.bundle)


def test_fp16_conversion_keeps_raw_inputs_and_reductions_in_fp32(trained_dir):
    model = onnx.load(str(trained_dir / "model.onnx"))
    half, converted = to_fp16(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sorted(ops[n] for n in converted) == ["Div", "Gemm", "Gemm", "Gemm"]
    onnx.checker.check_model(half, full_check=True)
    assert [o.name for o in half.graph.output] == [o.name for o in model.graph.output]


def _rows(a, far, t=1.0):
    a, far = np.asarray(a, dtype=float), np.asarray(far, dtype=float)
    return GateRows(np.zeros((len(a), 1)), np.zeros((len(far), 1)), a, far, t, 1.0)


def test_gate_measures_tolerance_decisions_and_far_outliers():
    held = np.linspace(0.0, 0.99, 1000)
    far = np.linspace(2.0, 50.0, 1000)
    parity, reason = measure(_rows(held, far), held + 0.005, far)
    assert reason is None and parity["decision_agreement"] == 1.0 and parity["far_recall"] == 1.0
    assert parity["max_rel_diff"] == pytest.approx(0.005 / (0.505 + 0.01), rel=1e-3)  # D = 1 - median 0.495
    # 1% of held-out decisions flip, each within the tolerance of a row right at the threshold
    near = np.concatenate([np.full(10, 0.999), held[10:]])
    _, reason = measure(_rows(near, far), np.concatenate([np.full(10, 1.001), held[10:]]), far)
    assert reason.startswith("outlier decisions agree on 99.00%")
    # held-out rows fine, but far-out rows saturate below the threshold
    clipped = np.minimum(far, 0.9)
    parity, reason = measure(_rows(held, far), held, clipped)
    assert parity["far_recall"] == 0.0 and reason.startswith("misses 1000 of 1000 far-out rows")
    _, reason = measure(_rows(held, far), np.where(held > 0.5, np.nan, held), far)
    assert reason.startswith("non-finite outputs on")


def test_old_training_output_without_calibration_rows_still_compiles(trained_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained_dir, old)
    (old / CALIBRATION_FILE).unlink()
    np.save(old / SAMPLES_FILE, np.load(old / SAMPLES_FILE)[:256])  # as training wrote them before
    result = compile_bundle(old, tmp_path / "b")
    m = result.manifest
    assert "fp16" in m.variants and m.variants["fp16"].parity["rows"] == 256
    assert "no calibration rows" in m.skipped_variants["int8"].reason
    load_model(tmp_path / "b", ScoringConfig(providers=["CPUExecutionProvider"]))


def test_cli_compile_prints_each_variant(trained_dir, tmp_path, capsys):
    assert main(["compile", "--model", str(trained_dir), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "variant fp16: kept as model.fp16.onnx for CUDAExecutionProvider" in out
    assert "decisions agree" in out
    assert "variant int8: left out: outputs outside the tolerance" in out
    assert main(["compile", "--model", str(trained_dir), "--out", str(tmp_path / "n"), "--variants", "none"]) == 0
    assert "variant" not in capsys.readouterr().out
    m = load_bundle(tmp_path / "n").manifest
    assert m.variants == {} and m.skipped_variants == {}
    assert main(["compile", "--model", str(trained_dir), "--out", str(tmp_path / "x"), "--variants", "bf16"]) == 2
    assert "unknown variant(s) ['bf16']" in capsys.readouterr().err
