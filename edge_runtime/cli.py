"""``edgeloop run`` / ``python -m edge_runtime run``: the device's entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .contracts import ContractError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="edge.yaml (YAML or JSON); optional when --set gives every required key")
    parser.add_argument("--input", help="JSON-lines file, or '-' for stdin (overrides source.path)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set device_id=dev-7 --set window.seconds=60",
    )
    parser.add_argument("--json", action="store_true", help="print the run report as JSON")


def run_command(args: argparse.Namespace) -> int:
    from .bundle import BundleError
    from .contracts import load_runtime_config
    from .runtime import run_file
    from .scoring import ScoringError

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"edgeloop run: error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = value
    try:
        config = load_runtime_config(args.config, overrides)
        stats = run_file(config, args.input)
    except (ContractError, BundleError, ScoringError, OSError, ValueError) as err:
        print(f"edgeloop run: error: {err}", file=sys.stderr)
        return 2
    report = stats.__dict__
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"provider={stats.provider} lines={stats.lines} scored={stats.scored} "
            f"rejected={stats.rejected} outliers={stats.outliers} windows={stats.windows} "
            f"synced={stats.sent} pending={stats.pending}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge_runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="score records with a model bundle"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args)
