"""The training card: what training hands to the compile step besides the ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edge_runtime.contracts import ContractError, OutlierRule, OutputSpec, parse_document

CARD_FILE = "training.json"
MODEL_FILE = "model.onnx"
BASELINE_FILE = "baseline.json"
SAMPLES_FILE = "samples.npy"


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


def load_card(directory: str | Path) -> TrainingCard:
    path = Path(directory) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"{path}: not found (is {directory} a training output?)") from None
    except json.JSONDecodeError as err:
        raise ContractError(f"{path}: not valid JSON ({err.msg})") from None
    return parse_document(TrainingCard, data, str(path))
