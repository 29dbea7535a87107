"""``edgeloop run`` / ``python -m edge_runtime run``: the device's entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .contracts import ContractError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="edge.yaml (YAML or JSON); optional when --set gives every required key")
    parser.add_argument("--input", help="JSON-lines (or frames) file, or '-' for stdin: overrides source.kind/path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set device_id=dev-7 --set window.seconds=60",
    )
    parser.add_argument("--json", action="store_true", help="print the run report as JSON")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of the runtime (default INFO: start, health lines, stop)")


def run_command(args: argparse.Namespace) -> int:
    from .bundle import BundleError
    from .contracts import load_runtime_config
    from .scoring import ScoringError
    from .service import Service

    logging.getLogger("edge_runtime").setLevel(getattr(args, "log_level", "INFO"))
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"edgeloop run: error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = value
    from .greengrass import NucleusLink, component_configuration, under_greengrass

    nucleus = NucleusLink() if under_greengrass() else None
    try:
        try:
            extra = component_configuration(nucleus) if nucleus is not None else None
        except Exception as err:  # the nucleus is not answering: Greengrass restarts us with its backoff
            print(f"edgeloop run: error: cannot read the component configuration from the Greengrass nucleus: {err}",
                  file=sys.stderr)
            return 2
        config = load_runtime_config(args.config, overrides, extra)
        service = Service(config, config_path=args.config, overrides=overrides, input_path=args.input,
                          nucleus=nucleus)
        stats = service.run()
    except (ContractError, BundleError, ScoringError, OSError, ValueError) as err:
        print(f"edgeloop run: error: {err}", file=sys.stderr)
        if nucleus is not None:  # say so to Greengrass as well: the deployment shows the component ERRORED
            from .greengrass import report_state

            report_state(nucleus, "ERRORED")
        return 2
    except Exception:
        if nucleus is not None:
            from .greengrass import report_state

            report_state(nucleus, "ERRORED")
        raise
    finally:
        if nucleus is not None:
            nucleus.close()
    report = stats.__dict__
    if args.json:
        print(json.dumps(report))
    else:
        print(" ".join(f"{k}={v}" for k, v in report.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge_runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="score records with a model bundle"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(args)
