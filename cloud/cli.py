"""The ``edgeloop`` command line. Each subcommand is a thin shell over one Python function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_runtime.cli import add_run_arguments, run_command


def _train(args) -> int:
    from cloud.train import train

    features = [f.strip() for f in args.features.split(",")] if args.features else None
    result = train(args.data, args.out, name=args.name, version=args.version, features=features,
                   target_fpr=args.fpr, components=args.components, seed=args.seed)
    card = result.card
    print(f"trained {card.name} {card.version} on {card.train_rows} rows, features {card.features}")
    print(f"threshold {card.outlier.threshold:.4f} (target FPR {card.outlier.target_false_positive_rate:.2%}, "
          f"held-out FPR {result.holdout_fpr:.2%}) -> {result.out_dir}")
    return 0


def _compile(args) -> int:
    from model_compile.compile import compile_bundle

    result = compile_bundle(args.model, args.out, level=args.optimization)
    m = result.manifest
    print(f"bundle {m.name} {m.version} -> {result.bundle} (parity max abs diff {result.max_abs_diff:.3g})")
    if result.cpu_only_ops:
        print(f"note: CPU-provider-only operators {result.cpu_only_ops}: this model will not use a GPU")
    return 0


def _component_build(args) -> int:
    from cloud.components import build_components

    for c in build_components(args.out, args.bundle, store_url=args.store_url):
        print(f"built {c.name} {c.version}: {c.recipe}")
    return 0


def _fleet_drift(args) -> int:
    from cloud.drift import Thresholds, fleet_drift, format_table, to_json
    from edge_runtime.contracts import load_summary
    from edge_runtime.store import open_store

    store = open_store(args.store, args.endpoint_url)
    baselines = {}
    if args.baseline:
        b = load_summary(Path(args.baseline).read_bytes(), args.baseline)
        baselines[(b.model_name, b.model_version)] = b
    thresholds = Thresholds(psi_drift=args.psi_drift, ks_drift=args.ks_drift, min_count=args.min_rows)
    reports, warnings = fleet_drift(store, baselines, thresholds)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not reports:
        print(f"no summaries with a baseline found in {args.store}", file=sys.stderr)
        return 1
    for r in reports:
        print(format_table(r))
        print()
    doc = to_json(reports, thresholds)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"drift JSON written to {args.json}")
    return 0


def _demo(args) -> int:
    from cloud.demo import run_demo

    result = run_demo(args.workdir, devices=args.devices, rows=args.rows, seed=args.seed)
    ok = sorted(result.drifted_found) == sorted(result.drifted_expected)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop", description="Edge ML on device fleets, loop closed.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the default outlier detector on a CSV")
    p.add_argument("--data", required=True, help="CSV with a header row and numeric feature columns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", default="sensor-outliers")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--features", help="comma-separated feature columns (default: every numeric column)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    p.add_argument("--components", type=int, default=3, help="Gaussian mixture components")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)

    p = sub.add_parser("compile", help="check, optimise and bundle a trained model")
    p.add_argument("--model", required=True, help="the output directory of `edgeloop train`")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--optimization", default="basic", choices=["none", "basic", "extended", "all"],
                   help="ONNX Runtime offline level; only none/basic stay portable across providers")
    p.set_defaults(func=_compile)

    comp = sub.add_parser("component", help="Greengrass components").add_subparsers(dest="action", required=True)
    p = comp.add_parser("build", help="GDK custom build: write greengrass-build/")
    p.add_argument("--out", default="greengrass-build")
    p.add_argument("--bundle", action="append", default=[], help="also build a model component for this bundle")
    p.add_argument("--store-url", default="s3://edgeloop-fleet", help="where model components sync summaries")
    p.set_defaults(func=_component_build)

    p = sub.add_parser("run", help="the device runtime: score records with a bundle")
    add_run_arguments(p)
    p.set_defaults(func=run_command)

    fleet = sub.add_parser("fleet", help="fleet review").add_subparsers(dest="action", required=True)
    p = fleet.add_parser("drift", help="merge the fleet's summaries and compare with the baseline")
    p.add_argument("--store", required=True, help="a local directory or s3://bucket/prefix")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, LocalStack)")
    p.add_argument("--baseline", help="baseline.json to use instead of the registered one")
    p.add_argument("--json", help="also write the result as JSON to this path")
    p.add_argument("--psi-drift", type=float, default=0.25)
    p.add_argument("--ks-drift", type=float, default=0.2)
    p.add_argument("--min-rows", type=int, default=100)
    p.set_defaults(func=_fleet_drift)

    p = sub.add_parser("demo", help="the whole loop on a simulated fleet, no cloud account needed")
    p.add_argument("--workdir", default="edgeloop-demo")
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--rows", type=int, default=2880, help="records per device (one a minute)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from edge_runtime.contracts import ContractError
    from edge_runtime.store import StoreError

    try:
        return args.func(args)
    except (ContractError, StoreError, OSError, ValueError) as err:
        print(f"edgeloop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
