"""Bring your own ONNX: a model made elsewhere, bundled with representative data, served by the device."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.cli import main
from edge_runtime.bundle import load_bundle, sha256_file
from edge_runtime.contracts import ScoringConfig
from edge_runtime.model import load_model
from model_compile.byo import ByoError, bundle_onnx

CENTER = np.array([10.0, 20.0, 30.0])
SD = np.array([2.0, 5.0, 1.0])
FEATURES = ["temperature", "humidity", "pressure"]


def rows(n, seed):
    return (np.random.default_rng(seed).standard_normal((n, 3)) * SD + CENTER).astype(np.float32)


def write_csv(path, X, names=FEATURES, extra_lines=()):
    lines = ["ts," + ",".join(names)] + [f"{i}," + ",".join(f"{v:.6f}" for v in r) for i, r in enumerate(X)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def onnx_model(path, nodes, inits, *, n_features=3, outputs=(("score", ["N", 1]),), input_type=TensorProto.FLOAT,
               batch="N"):
    graph = helper.make_graph(
        nodes, "byo", [helper.make_tensor_value_info("x", input_type, [batch, n_features])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def distance_model(path, negate=False):
    """The squared Mahalanobis-like distance from the centre: Sub, Div, ReduceSumSquare (negated: a
    similarity, where lower means more unusual)."""
    nodes = [helper.make_node("Sub", ["x", "c"], ["d"]), helper.make_node("Div", ["d", "s"], ["z"]),
             helper.make_node("ReduceSumSquare", ["z"], ["r" if negate else "score"], axes=[1], keepdims=1)]
    if negate:
        nodes.append(helper.make_node("Neg", ["r"], ["score"]))
    return onnx_model(path, nodes, {"c": CENTER, "s": SD})


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    # a row with a gap is left out of the scores, and counted as missing in the baseline
    return write_csv(tmp_path_factory.mktemp("data") / "rows.csv", rows(3000, 0), extra_lines=["3000,,20,30"])


def test_own_distance_model_bundles_and_serves(tmp_path, data_csv):
    model = distance_model(tmp_path / "distance.onnx")
    result = bundle_onnx(model, data_csv, tmp_path / "bundle", higher_is_outlier=True)
    assert (result.rows, result.dropped) == (3000, 1)
    bundle = load_bundle(tmp_path / "bundle")
    m = bundle.manifest
    assert (m.name, m.version) == ("distance", "1.0.0")
    assert m.input.feature_names == FEATURES and m.input.shape == [None, 3]
    assert m.output.name == "score" and m.output.higher_is_outlier and m.gpu_capable
    assert m.outlier.target_false_positive_rate == 0.01 and m.outlier.calibration_rows == 3000
    # chi-squared, 3 degrees of freedom: its 99% quantile is 11.34
    assert m.outlier.threshold == pytest.approx(11.34, rel=0.15)
    assert m.lineage["onnx_sha256"] == sha256_file(model) and m.lineage["data_sha256"] == sha256_file(data_csv)
    assert bundle.baseline.features["temperature"].missing == 1 and bundle.baseline.features["humidity"].count == 3001
    assert bundle.baseline.score.count == 3000 and len(bundle.baseline.score.hist_edges) == 9
    assert "fp16" in m.variants  # variants and their gates apply to a model of one's own too

    served = load_model(tmp_path / "bundle", ScoringConfig(providers=["CPUExecutionProvider"]))
    fresh = rows(20000, 7)
    far = fresh[:100] + np.array([12.0, 0.0, 0.0], dtype=np.float32)  # six standard deviations off
    scores = served.scorer.score(fresh)
    expected = (((fresh - CENTER) / SD) ** 2).sum(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert 0.005 <= (scores > served.threshold).mean() <= 0.02  # 1%, calibrated on 3,000 rows
    assert (served.scorer.score(far) > served.threshold).all()


def test_lower_is_outlier_and_a_given_threshold(tmp_path, data_csv, capsys):
    model = distance_model(tmp_path / "similarity.onnx", negate=True)
    result = bundle_onnx(model, data_csv, tmp_path / "bundle", higher_is_outlier=False, threshold=9.0,
                         name="sim", version="2.1.0", variants=())
    m = load_bundle(tmp_path / "bundle").manifest
    assert (m.name, m.version, m.outlier.threshold, m.output.higher_is_outlier) == ("sim", "2.1.0", 9.0, False)
    # the data's own rate above the given threshold is what the manifest records
    assert m.outlier.target_false_positive_rate == pytest.approx(result.data_fpr) and 0.01 < result.data_fpr < 0.05
    served = load_model(tmp_path / "bundle", ScoringConfig(providers=["CPUExecutionProvider"]))
    far = rows(10, 3) + np.array([0.0, 40.0, 0.0], dtype=np.float32)
    assert (served.scorer.score(far) > 9.0).all()  # the device negates: outlier score = distance


def test_isolation_forest_from_scikit_learn(tmp_path, data_csv):
    """A real model made elsewhere: its ONNX-ML tree operators run on the CPU provider only, so the
    fp16 (GPU) variant is left out with that reason, and the bundle says it is not GPU-capable."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=30, random_state=0).fit(rows(2000, 1))
    onx = to_onnx(forest, rows(1, 1), target_opset={"": 17, "ai.onnx.ml": 3})
    (tmp_path / "forest.onnx").write_bytes(onx.SerializeToString())
    bundle_onnx(tmp_path / "forest.onnx", data_csv, tmp_path / "bundle", score_output="scores",
                higher_is_outlier=False, variants=["fp16"])
    m = load_bundle(tmp_path / "bundle").manifest
    assert not m.gpu_capable and "CPU-provider-only" in m.skipped_variants["fp16"].reason
    served = load_model(tmp_path / "bundle", ScoringConfig(providers=["CPUExecutionProvider"]))
    fresh = rows(3000, 11)
    assert 0.002 <= (served.scorer.score(fresh) > served.threshold).mean() <= 0.03
    assert (served.scorer.score(fresh[:20] * 3) > served.threshold).all()


def test_errors_say_what_is_wrong(tmp_path, data_csv):
    good = distance_model(tmp_path / "good.onnx")

    def bundle(model, data=data_csv, **kw):
        kw.setdefault("higher_is_outlier", True)
        return bundle_onnx(model, data, tmp_path / "out", variants=(), **kw)

    (tmp_path / "text.onnx").write_text("this is not a model\n")
    with pytest.raises(ByoError, match="not an ONNX model"):
        bundle(tmp_path / "text.onnx")
    with pytest.raises(ByoError, match=r"expected \[N, 2\] \(features \['temperature', 'humidity'\]\)"):
        bundle(good, features=["temperature", "humidity"])
    with pytest.raises(ByoError, match=r"no output 'nope'; the model's outputs are \['score'\]"):
        bundle(good, score_output="nope")
    wide = onnx_model(tmp_path / "wide.onnx", [helper.make_node("Sub", ["x", "c"], ["score"])], {"c": CENTER},
                      outputs=(("score", ["N", 3]),))
    with pytest.raises(ByoError, match=r"has shape \[3000, 3\] for 3000 rows; expected one score per row"):
        bundle(wide)
    log = onnx_model(tmp_path / "log.onnx", [
        helper.make_node("Sub", ["x", "c"], ["d"]),
        helper.make_node("ReduceSumSquare", ["d"], ["r"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["r", "one"], ["e"]), helper.make_node("Log", ["e"], ["score"]),
    ], {"c": CENTER, "one": [1.0]})
    with pytest.raises(ByoError, match=r"'score' is not finite on \d+ of 3000 rows"):
        bundle(log)
    few = write_csv(tmp_path / "few.csv", rows(60, 2))
    with pytest.raises(ByoError, match="only 60 complete rows .* need at least 100"):
        bundle(good, data=few)
    square = helper.make_node("ReduceSumSquare", ["x"], ["score"], axes=[1], keepdims=1)
    fixed = onnx_model(tmp_path / "fixed.onnx", [square], {}, batch=1, outputs=(("score", [1, 1]),))
    with pytest.raises(ByoError, match="fixed batch size of 1"):
        bundle(fixed)
    with pytest.raises(ByoError, match="model name 'my model'"):
        bundle(good, name="my model")
    two = onnx_model(tmp_path / "two.onnx", [
        helper.make_node("Sub", ["x", "c"], ["d"]),
        helper.make_node("ReduceSumSquare", ["d"], ["score"], axes=[1], keepdims=1),
        helper.make_node("ReduceSum", ["d"], ["other"], axes=[1], keepdims=1),
    ], {"c": CENTER}, outputs=(("score", ["N", 1]), ("other", ["N", 1])))
    with pytest.raises(ByoError, match=r"outputs \['score', 'other'\]; name the score with --score-output"):
        bundle(two)
    assert not (tmp_path / "out").exists()


def test_cli_bundle_end_to_end(tmp_path, data_csv, capsys):
    model = distance_model(tmp_path / "m.onnx")
    argv = ["bundle", "--onnx", str(model), "--data", str(data_csv), "--out", str(tmp_path / "b"),
            "--features", "temperature,humidity,pressure", "--score-output", "score", "--higher-is-outlier",
            "--fpr", "0.02", "--name", "plant-distance", "--version", "0.3.0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "scored 3000 rows" in out and "1 with gaps left out" in out and "2.00% of the rows above it" in out
    assert "bundle plant-distance 0.3.0 ->" in out and "variant fp16: kept" in out and "variant int8:" in out
    m = load_bundle(tmp_path / "b").manifest
    assert m.outlier.target_false_positive_rate == 0.02 and m.name == "plant-distance"
    card = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert card["lineage"]["source"] == "bring-your-own"
    load_model(tmp_path / "b", ScoringConfig(providers=["CPUExecutionProvider"]))

    bad = [*argv[:5], "--out", str(tmp_path / "x"), "--score-output", "nope", "--higher-is-outlier"]
    assert main(bad) == 2
    assert "no output 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the direction of the score is never guessed
        main([*argv[:5], "--out", str(tmp_path / "y")])
    assert "--higher-is-outlier --lower-is-outlier is required" in capsys.readouterr().err
