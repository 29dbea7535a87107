import json
import shutil

import numpy as np
import pytest

from cloud import synthetic
from cloud.train import TrainingError, read_numeric_csv, train
from edge_runtime.bundle import BundleError, load_bundle, sha256_file
from edge_runtime.contracts import ContractError
from edge_runtime.scoring import Scorer
from model_compile.card import load_card
from model_compile.compile import CompileError, compile_bundle, parity


def test_threshold_holds_its_false_positive_rate_on_fresh_data(bundle_dir):
    bundle = load_bundle(bundle_dir)
    scorer = Scorer(str(bundle.root), bundle.manifest, ["CPUExecutionProvider"])
    fresh = synthetic.device_stream("fresh", 8000, seed=99, anomaly_rate=0.0).X
    fpr = float((scorer.score(fresh) > bundle.manifest.outlier.threshold).mean())
    assert 0.002 <= fpr <= 0.03  # target 1%: device bias and sampling noise allowed


def test_bundle_manifest_checksums_and_schema(bundle_dir, trained_dir):
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.input.feature_names == synthetic.FEATURES
    assert m.gpu_capable and m.optimization == "onnxruntime basic"
    for rel, digest in m.files.items():
        assert sha256_file(bundle_dir / rel) == digest
    assert load_card(trained_dir).outlier.threshold == m.outlier.threshold
    assert set(bundle.baseline.features) == set(synthetic.FEATURES)
    counts = np.asarray(bundle.baseline.features["rpm"].hist_counts)
    assert len(counts) == 10  # decile edges: 9 inner edges, 10 bins of about 10% each
    assert np.all(np.abs(counts / counts.sum() - 0.1) < 0.01)


def test_corrupt_bundle_is_refused(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="checksum mismatch for model.onnx"):
        load_bundle(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_bundle(copy)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_parity_gate_catches_flattened_multi_output_regressor(tmp_path, trained_dir):
    """skl2onnx exports a multi-output MLPRegressor as (N*k, 1): the gate must refuse it."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPRegressor

    X = synthetic.training_frame(500, seed=1)
    mlp = MLPRegressor(hidden_layer_sizes=(3,), max_iter=50, random_state=0).fit(X, X)
    model_dir = tmp_path / "mlp"
    shutil.copytree(trained_dir, model_dir)
    onx = to_onnx(mlp, X[:1], target_opset=17)
    (model_dir / "model.onnx").write_bytes(onx.SerializeToString())
    card = json.loads((model_dir / "training.json").read_text())
    card["output"]["name"] = onx.graph.output[0].name
    (model_dir / "training.json").write_text(json.dumps(card))
    with pytest.raises(CompileError, match="expected one value per row"):
        compile_bundle(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parity_detects_disagreement_and_nonfinite():
    a = np.arange(10, dtype=np.float32)
    assert parity(a, a + 1e-7, 10, 1e-4, 1e-5) < 1e-6
    with pytest.raises(CompileError, match="disagrees"):
        parity(a, a + 0.1, 10, 1e-4, 1e-5)
    with pytest.raises(CompileError, match="non-finite"):
        parity(a, np.full(10, np.nan), 10, 1e-4, 1e-5)


def test_unreadable_model_and_wrong_feature_count(tmp_path, trained_dir):
    bad = tmp_path / "bad"
    shutil.copytree(trained_dir, bad)
    (bad / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(CompileError, match="not a readable ONNX model"):
        compile_bundle(bad, tmp_path / "o")
    shutil.copy(trained_dir / "model.onnx", bad / "model.onnx")
    card = json.loads((bad / "training.json").read_text())
    card["features"] = card["features"][:-1]
    (bad / "training.json").write_text(json.dumps(card))
    with pytest.raises(CompileError, match=r"expected \[N, 5\]"):
        compile_bundle(bad, tmp_path / "o")


def test_csv_reading_picks_numeric_columns_and_drops_bad_rows(tmp_path):
    p = tmp_path / "d.csv"
    rows = ["ts,site,a,b,label"] + [f"{i},x,{i},{2 * i},0" for i in range(150)] + ["999,x,,1,0", "1000,x,nan,1,0"]
    p.write_text("\n".join(rows) + "\n")
    names, X = read_numeric_csv(p)
    assert names == ["a", "b"] and X.shape == (150, 2)
    with pytest.raises(TrainingError, match="no column"):
        read_numeric_csv(p, ["zz"])
    (tmp_path / "tiny.csv").write_text("a\n1\n2\n")
    with pytest.raises(TrainingError, match="at least 100"):
        train(tmp_path / "tiny.csv", tmp_path / "m")


def test_missing_values_follow_a_stated_policy_and_reach_the_baseline(tmp_path):
    """Gaps are never dropped silently: imputed or dropped per feature, counted in the training
    card, and counted in the baseline as a device would count them."""
    rng = np.random.default_rng(0)
    X = synthetic.training_frame(3000, seed=2)
    lines = ["temperature,humidity,pressure,vibration,current,rpm"]
    gaps = {"temperature": 0, "humidity": 0}
    for i, row in enumerate(X):
        cells = [f"{v:.4f}" for v in row]
        if rng.random() < 0.05:
            cells[0], gaps["temperature"] = "", gaps["temperature"] + 1
        if i % 50 == 0:
            cells[1], gaps["humidity"] = "nan", gaps["humidity"] + 1
        lines.append(",".join(cells))
    data = tmp_path / "gaps.csv"
    data.write_text("\n".join(lines) + "\n")
    result = train(data, tmp_path / "m", missing="impute,humidity=drop")
    report = result.card.missing_values
    assert report["policy"]["temperature"] == "impute" and report["policy"]["humidity"] == "drop"
    assert report["rows_dropped"] == gaps["humidity"]
    assert report["missing"]["temperature"] == gaps["temperature"]
    assert report["nonfinite"]["humidity"] == gaps["humidity"]
    assert 0 < report["imputed"]["temperature"]["count"] <= gaps["temperature"]
    baseline = json.loads((tmp_path / "m" / "baseline.json").read_text())
    assert baseline["features"]["temperature"]["missing"] == gaps["temperature"]
    assert baseline["features"]["humidity"]["nonfinite"] == gaps["humidity"]
    assert baseline["features"]["temperature"]["count"] == 3000 - gaps["temperature"]
    with pytest.raises(TrainingError, match="choose impute or drop"):
        train(data, tmp_path / "m2", missing="guess")
    with pytest.raises(TrainingError, match="not a feature"):
        train(data, tmp_path / "m3", missing="speed=drop")
