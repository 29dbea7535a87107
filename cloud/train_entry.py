"""The one training entry point: the same code trains here and inside a SageMaker training job.

``edgeloop train`` calls ``run``; ``python -m cloud.train_entry --data F.csv --out DIR [--KEY VALUE ...]``
does too. In a SageMaker training job (script mode of a framework container, see
cloud/sagemaker_train.py) ``main`` finds SageMaker's environment and:

- reads the one CSV file of the ``train`` channel (``SM_CHANNEL_TRAIN``);
- reads the hyperparameters from ``SM_HPS``; SageMaker hands them over as strings and the
  container's toolkit decodes those that look like JSON, so every value is parsed here to its
  type, whichever form it comes in, and ``hyperparameters.json`` under ``SM_INPUT_CONFIG_DIR``
  (the strings exactly as given) wins where it has the key: a name "1e3" stays "1e3", not "1000.0";
- writes the training output (model.onnx, baseline.json, samples.npy, training.json) to
  ``SM_MODEL_DIR``, which SageMaker uploads as model.tar.gz;
- prints each metric as ``edgeloop_metric NAME=VALUE``, the form ``metric_definitions`` parses;
- on failure writes the reason to ``failure`` in ``SM_OUTPUT_DIR`` (/opt/ml/output), which
  SageMaker reports as the job's FailureReason, and exits 1.

What is trained depends on the ``model`` hyperparameter (default ``tabular``), looked up in
``MODELS``: a new kind of model is one more entry there, with its options, its training function
and its metrics. Every run records its lineage in the training card: the data file, its sha256
and row count, the resolved hyperparameters and the metrics (the SageMaker driver adds the job's).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.bundle import sha256_file
from edge_runtime.contracts import BundleManifest
from model_compile.card import CARD_FILE, TrainingCard, load_card

from .train import TrainingError, TrainResult, train

# SageMaker's training environment (the sagemaker-training toolkit's SM_* variables)
ENV_MODEL_DIR = "SM_MODEL_DIR"
ENV_TRAIN_CHANNEL = "SM_CHANNEL_TRAIN"
ENV_HPS = "SM_HPS"
ENV_INPUT_CONFIG_DIR = "SM_INPUT_CONFIG_DIR"  # holds hyperparameters.json, the values as given
ENV_OUTPUT_DIR = "SM_OUTPUT_DIR"  # /opt/ml/output: the failure file goes here
ENV_OUTPUT_DATA_DIR = "SM_OUTPUT_DATA_DIR"  # /opt/ml/output/data
ENV_INSTANCE_TYPE = "SM_CURRENT_INSTANCE_TYPE"
ENV_JOB_NAME = "TRAINING_JOB_NAME"  # set by SageMaker itself
SAGEMAKER_MARKERS = (ENV_MODEL_DIR, ENV_TRAIN_CHANNEL, ENV_HPS)
DEFAULT_OUTPUT_DIR = "/opt/ml/output"
FAILURE_FILE = "failure"
CHANNEL = "train"

METRIC_PREFIX = "edgeloop_metric"
_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


class HyperparameterError(TrainingError):
    """A hyperparameter that is unknown or whose value does not parse."""


# --- hyperparameters ------------------------------------------------------------------------------


def _text(value: object) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # SM_HPS decoded "2" to 2: it was text all along
    raise ValueError("expected text")


def _manifest_field(name: str) -> Callable[[object], str]:
    """Text the bundle manifest will accept for ``name``: checked before training, not at compile."""
    pattern = next(m.pattern for m in BundleManifest.model_fields[name].metadata if getattr(m, "pattern", None))

    def check(value: object) -> str:
        text = _text(value)
        if not re.fullmatch(pattern, text):
            raise ValueError(f"the bundle manifest needs {pattern}")
        return text
    return check


def _integer(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError("expected an integer")


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _within(low: float, high: float, parse: Callable[[object], float] = _number) -> Callable[[object], float]:
    def check(value: object) -> float:
        number = parse(value)
        if not low < number < high:
            raise ValueError(f"must be in ({low:g}, {high:g})")
        return number
    return check


def _at_least(low: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = _integer(value)
        if number < low:
            raise ValueError(f"must be at least {low}")
        return number
    return check


def _names(value: object) -> list[str] | None:
    """``a,b,c`` (or a JSON list of names); empty means every numeric column."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value if n.strip()]
    else:
        raise ValueError("expected comma-separated column names")
    return names or None


@dataclass(frozen=True)
class Option:
    parse: Callable[[object], object]
    default: object
    help: str


@dataclass(frozen=True)
class ModelKind:
    """One kind of model: its own hyperparameters, how to train it, and the metrics it reports.
    ``train(data, out_dir, hyperparameters, lineage)`` writes the training output into out_dir."""

    about: str
    options: dict[str, Option]
    train: Callable[[Path, Path, dict, dict], TrainResult]
    metrics: dict[str, Callable[[TrainResult], float]] = field(default_factory=dict)


COMMON_OPTIONS: dict[str, Option] = {
    "model": Option(_text, "tabular", "the kind of model to train (see MODELS)"),
    "name": Option(_manifest_field("name"), "sensor-outliers", "the model's name"),
    "version": Option(_manifest_field("version"), "1.0.0", "the model's version: MAJOR.MINOR.PATCH"),
}


def _train_tabular(data: Path, out_dir: Path, hp: dict, lineage: dict) -> TrainResult:
    return train(data, out_dir, name=hp["name"], version=hp["version"], features=hp["features"],
                 target_fpr=hp["fpr"], components=hp["components"], holdout=hp["holdout"], seed=hp["seed"],
                 missing=hp["missing"], lineage=lineage)


MODELS: dict[str, ModelKind] = {
    "tabular": ModelKind(
        about="StandardScaler + GaussianMixture on the numeric columns; score = negative log-likelihood",
        options={
            "features": Option(_names, None, "comma-separated feature columns (default: every numeric column)"),
            "fpr": Option(_within(0, 0.5), 0.01, "target false-positive rate of the threshold"),
            "components": Option(_at_least(1), 3, "Gaussian mixture components"),
            "holdout": Option(_within(0, 1), 0.2, "share of the rows held out to calibrate the threshold"),
            "seed": Option(_integer, 0, "random seed (split and mixture)"),
            "missing": Option(_text, "impute", "gaps: impute or drop, for all features or per feature "
                              "(impute,humidity=drop)"),
        },
        train=_train_tabular,
        metrics={
            "holdout_fpr": lambda r: r.holdout_fpr,
            "threshold": lambda r: r.card.outlier.threshold,
            "train_rows": lambda r: r.card.train_rows,
            "calibration_rows": lambda r: r.card.outlier.calibration_rows,
            "rows_dropped": lambda r: r.card.missing_values.get("rows_dropped", 0),
        },
    ),
}


def _train_stream(data: Path, out_dir: Path, hp: dict, lineage: dict) -> TrainResult:
    from .stream_detector import train_stream

    return train_stream(data, out_dir, name=hp["name"], version=hp["version"], value=hp["value"],
                        key=hp["stream_key"], window=hp["window"], threshold=hp["threshold"], margin=hp["margin"],
                        smooth=hp["smooth"], smooth_weight=hp["smooth_weight"], period=hp["period"],
                        seasonal_weight=hp["seasonal_weight"], rows=hp["rows"], lineage=lineage)


MODELS["stream"] = ModelKind(
    about="univariate streams: how far the newest value (and the mean of the newest few) falls outside the "
          "range of the stream's recent values (cloud/stream_detector.py, docs/streams.md)",
    options={
        "value": Option(_text, "value", "the column holding the stream's values"),
        "stream_key": Option(_text, "stream_id", "the column (and record field) naming the stream"),
        "window": Option(_at_least(16), 4096, "values per model row: the stream's last N"),
        "threshold": Option(_within(0, 1e6), 0.1, "flag an excursion beyond the recent range by this share of it"),
        "margin": Option(_within(0, 1e6), 1.0, "training SDs added to the range (a flat stream's floor)"),
        "smooth": Option(_at_least(2), 16, "values per mean in the smoothed series"),
        "smooth_weight": Option(_within(0, 1e6), 2.0, "how much a smoothed excursion counts against a raw one"),
        "period": Option(_at_least(0), None, "the stream's cycle in values (default: found in the training "
                         "series; 0: none)"),
        "seasonal_weight": Option(_within(-1e-9, 1e6), 2.0, "how much the change over one cycle counts (0: none)"),
        "rows": Option(_at_least(100), None, "train on the first N rows only (default: all)"),
    },
    train=_train_stream,
    metrics={
        "training_fpr": lambda r: r.holdout_fpr,
        "threshold": lambda r: r.card.outlier.threshold,
        "train_rows": lambda r: r.card.train_rows,
        "rows_dropped": lambda r: r.card.missing_values.get("rows_dropped", 0),
    },
)


def _reserved(key: str) -> bool:
    """SageMaker's own hyperparameters (sagemaker_program, _tuning_objective_metric, ...)."""
    return key.startswith(("sagemaker_", "_"))


def parse_hyperparameters(given: Mapping[str, object]) -> dict:
    """Every hyperparameter of the chosen model kind, typed, defaults filled in. Values may be
    strings (as SageMaker passes them) or already typed; unknown keys and bad values are refused."""
    given = {str(k): v for k, v in given.items() if not _reserved(str(k))}
    try:
        model = _text(given.get("model", COMMON_OPTIONS["model"].default))
    except ValueError:
        model = repr(given.get("model"))
    kind = MODELS.get(model)
    if kind is None:
        raise HyperparameterError(f"hyperparameter model={given.get('model')!r}: choose one of {sorted(MODELS)}")
    options = {**COMMON_OPTIONS, **kind.options}
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise HyperparameterError(f"unknown hyperparameter(s) {unknown} for model {model!r}; "
                                  f"it takes {sorted(options)}")
    resolved = {}
    for key, option in options.items():
        if key not in given or given[key] is None:
            resolved[key] = option.default
            continue
        try:
            resolved[key] = option.parse(given[key])
        except (TypeError, ValueError) as err:
            raise HyperparameterError(f"hyperparameter {key}={given[key]!r}: {err}") from None
    resolved["model"] = model
    return resolved


def hyperparameter_strings(hyperparameters: Mapping[str, object]) -> dict[str, str]:
    """Resolved hyperparameters as the strings a training job is given (``parse_hyperparameters``
    reads them back to the same values); None (a default that means "all") is left out."""
    out = {}
    for key, value in hyperparameters.items():
        if value is None:
            continue
        if isinstance(value, list):
            out[key] = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            out[key] = repr(value)
        else:
            out[key] = str(value)
    return out


def metric_definitions(model: str = "tabular") -> list[dict[str, str]]:
    """The training job's MetricDefinitions: one regex per metric the model kind prints."""
    return [{"Name": name, "Regex": f"{METRIC_PREFIX} {name}=({_NUMBER})"} for name in MODELS[model].metrics]


def metric_line(name: str, value: float) -> str:
    return f"{METRIC_PREFIX} {name}={value:.8g}"


# --- training -------------------------------------------------------------------------------------


@dataclass
class Trained:
    result: TrainResult
    hyperparameters: dict
    metrics: dict[str, float]
    lineage: dict


def data_facts(path: str | Path) -> dict:
    """What identifies the training data: sha256, size and data rows (CSV records after the header)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        records = sum(1 for _ in csv.reader(fh))
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rows": max(records - 1, 0)}


def merge_lineage(base: dict, extra: Mapping) -> dict:
    """``extra`` over ``base``; nested dicts are merged, key by key, rather than replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_lineage(out[key], value)
        else:
            out[key] = value
    return out


def amend_lineage(model_dir: str | Path, extra: Mapping) -> TrainingCard:
    """Merge ``extra`` into the lineage of the training card in ``model_dir`` and write it back."""
    card = load_card(model_dir)
    card.lineage = merge_lineage(card.lineage, extra)
    (Path(model_dir) / CARD_FILE).write_text(json.dumps(card.model_dump(), indent=1))
    return card


def run(data: str | Path, out_dir: str | Path, hyperparameters: Mapping[str, object], *,
        lineage: Mapping | None = None) -> Trained:
    """Train the model kind the hyperparameters name on one CSV file into ``out_dir``, with the
    lineage (data file, checksum, rows, hyperparameters, metrics; plus ``lineage``) in its card."""
    hp = parse_hyperparameters(hyperparameters)
    kind = MODELS[hp["model"]]
    data = Path(data)
    if not data.is_file():
        raise TrainingError(f"{data}: no such file")
    record = merge_lineage({
        "source": "local",
        "entry_point": "cloud.train_entry",
        "edgeloop_version": __version__,
        "python": platform.python_version(),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": hp["model"],
        "data": {"path": str(data.resolve()), **data_facts(data)},
        "hyperparameters": hp,
    }, lineage or {})
    result = kind.train(data, Path(out_dir), hp, record)
    metrics = {name: float(get(result)) for name, get in kind.metrics.items()}
    result.card = amend_lineage(result.out_dir, {"metrics": metrics})
    return Trained(result, hp, metrics, result.card.lineage)


# --- the process: SageMaker or local ---------------------------------------------------------------


def in_sagemaker(env: Mapping[str, str]) -> bool:
    return any(k in env for k in SAGEMAKER_MARKERS)


def failure_path(env: Mapping[str, str]) -> Path:
    """Where SageMaker looks for the reason a training job failed: /opt/ml/output/failure."""
    if env.get(ENV_OUTPUT_DIR):
        return Path(env[ENV_OUTPUT_DIR]) / FAILURE_FILE
    if env.get(ENV_OUTPUT_DATA_DIR):
        return Path(env[ENV_OUTPUT_DATA_DIR]).parent / FAILURE_FILE
    return Path(DEFAULT_OUTPUT_DIR) / FAILURE_FILE


def sagemaker_hyperparameters(env: Mapping[str, str]) -> dict:
    """SM_HPS, with the values as given (hyperparameters.json) where that file has them."""
    try:
        hps = json.loads(env.get(ENV_HPS) or "{}")
    except json.JSONDecodeError as err:
        raise HyperparameterError(f"{ENV_HPS} is not JSON: {err}") from None
    if not isinstance(hps, dict):
        raise HyperparameterError(f"{ENV_HPS} is not a JSON object")
    if env.get(ENV_INPUT_CONFIG_DIR):
        given = Path(env[ENV_INPUT_CONFIG_DIR]) / "hyperparameters.json"
        if given.is_file():
            raw = json.loads(given.read_text(encoding="utf-8"))
            hps.update({k: v for k, v in raw.items() if k in hps and isinstance(v, str)})
    return hps


def channel_csv(channel: str | Path) -> Path:
    """The one CSV file in the train channel."""
    channel = Path(channel)
    if not channel.is_dir():
        raise TrainingError(f"the {CHANNEL} channel {channel} is not a directory")
    found = sorted(p for p in channel.rglob("*") if p.is_file() and p.suffix.lower() == ".csv")
    if len(found) != 1:
        names = [str(p.relative_to(channel)) for p in found][:5]
        raise TrainingError(f"the {CHANNEL} channel {channel} holds {len(found)} CSV files {names}; "
                            "it needs exactly one")
    return found[0]


def _write_failure(env: Mapping[str, str], reason: str) -> None:
    path = failure_path(env)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reason[:1024], encoding="utf-8")  # SageMaker reports the first 1024 characters
    except OSError as err:
        print(f"could not write {path}: {err}", file=sys.stderr)


def _report(trained: Trained) -> None:
    for name, value in trained.metrics.items():
        print(metric_line(name, value), flush=True)
    card = trained.result.card
    print(f"trained {card.name} {card.version} ({trained.hyperparameters['model']}) on {card.train_rows} rows "
          f"-> {trained.result.out_dir}", flush=True)


def _main_sagemaker(env: Mapping[str, str]) -> int:
    try:
        missing = [k for k in (ENV_MODEL_DIR, ENV_TRAIN_CHANNEL) if not env.get(k)]
        if missing:
            raise TrainingError(f"SageMaker environment without {' and '.join(missing)} "
                                f"(the job needs a {CHANNEL!r} input channel)")
        hps = sagemaker_hyperparameters(env)
        data = channel_csv(env[ENV_TRAIN_CHANNEL])
        job = {k: env[e] for k, e in (("name", ENV_JOB_NAME), ("instance_type", ENV_INSTANCE_TYPE)) if env.get(e)}
        trained = run(data, env[ENV_MODEL_DIR], hps, lineage={"source": "sagemaker", "training_job": job})
    except Exception as err:  # every failure must reach SageMaker's FailureReason
        expected = isinstance(err, (TrainingError, OSError))
        reason = str(err) if isinstance(err, TrainingError) else f"{type(err).__name__}: {err}"
        if not expected:
            traceback.print_exc()
        print(f"training failed: {reason}", file=sys.stderr, flush=True)
        _write_failure(env, reason)
        return 1
    _report(trained)
    return 0


def _local_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.train_entry",
        description="Train on a CSV file here; every other --KEY VALUE is a hyperparameter "
                    f"(model kinds: {', '.join(sorted(MODELS))}). In a SageMaker job the SM_* "
                    "environment is read instead.")
    parser.add_argument("--data", required=True, help="CSV with a header row")
    parser.add_argument("--out", required=True, help="output directory")
    args, rest = parser.parse_known_args(argv)
    hps: dict[str, str] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) == 2:
            parser.error(f"expected --KEY VALUE, got {token!r}")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(rest):
                parser.error(f"--{key} needs a value")
            value, i = rest[i + 1], i + 1
        hps[key.replace("-", "_")] = value
        i += 1
    return args, hps


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    """In SageMaker (any of SM_MODEL_DIR, SM_CHANNEL_TRAIN, SM_HPS set): train from its
    environment, ignoring ``argv`` (the toolkit passes the same hyperparameters there too).
    Otherwise: ``--data``, ``--out`` and hyperparameters from the command line."""
    if in_sagemaker(env):
        return _main_sagemaker(env)
    args, hps = _local_arguments(argv)
    try:
        trained = run(args.data, args.out, hps)
    except (TrainingError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _report(trained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
