"""The training card: what training hands to the compile step besides the ONNX file."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edge_runtime.contracts import OutlierRule, OutputSpec, load_json_file

CARD_FILE = "training.json"
MODEL_FILE = "model.onnx"
BASELINE_FILE = "baseline.json"
SAMPLES_FILE = "samples.npy"
CALIBRATION_FILE = "calibration.npy"  # rows of the training split: int8 calibration (model_compile.variants)
MAX_SAMPLES = 2000  # held-out rows kept in SAMPLES_FILE for the compile step's parity gates
MAX_CALIBRATION_ROWS = 1000


class TrainingCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    name: str
    version: str
    features: list[str]
    output: OutputSpec
    outlier: OutlierRule
    algorithm: str
    train_rows: int
    # the missing-value policy per feature and what it did (rows dropped, values imputed)
    missing_values: dict = {}
    # where the model came from (a SageMaker training job's name, image, hyperparameters, metrics, data
    # location and checksum; for local training the data file and its checksum): copied into the manifest
    lineage: dict = {}
    # set for a stream model: its input is a window of one stream's last values (edge_runtime.contracts)
    stream: dict | None = None


def load_card(directory: str | Path) -> TrainingCard:
    return load_json_file(TrainingCard, Path(directory) / CARD_FILE, f"not found (is {directory} a training output?)")
