"""The ``edgeloop`` command line. Each subcommand is a thin shell over one Python function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edge_runtime.cli import add_run_arguments, run_command


def _train(args) -> int:
    """Here, through the training entry point (cloud/train_entry.py), or the same entry point as a
    SageMaker training job (cloud/sagemaker_train.py); either way the card records the lineage."""
    from cloud import train_entry

    hps = {k: getattr(args, k) for k in ("name", "version", "features", "fpr", "components", "seed", "missing",
                                         "window") if getattr(args, k) is not None}
    if args.detector:
        hps["model"] = args.detector
    for item in args.hp or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"edgeloop train: error: --hp {item!r}: give KEY=VALUE", file=sys.stderr)
            return 2
        if key.strip() in hps:
            print(f"edgeloop train: error: hyperparameter {key.strip()} given twice", file=sys.stderr)
            return 2
        hps[key.strip()] = value
    remote = {"--role": args.role, "--instance-type": args.instance_type, "--image": args.image,
              "--bucket": args.bucket, "--prefix": args.prefix, "--region": args.region,
              "--endpoint-url": args.endpoint_url, "--max-runtime": args.max_runtime, "--job-name": args.job_name}
    if not args.sagemaker:
        given = [flag for flag, value in remote.items() if value is not None]
        if given:
            print(f"edgeloop train: error: {', '.join(given)}: only with --sagemaker", file=sys.stderr)
            return 2
        trained = train_entry.run(args.data, args.out, hps)
        card, out_dir = trained.result.card, trained.result.out_dir
    else:
        if not args.role:
            print("edgeloop train: error: --sagemaker needs --role ARN, the IAM role the training job runs as "
                  "(docs/training.md says what it needs)", file=sys.stderr)
            return 2
        from cloud.drift import parse_span
        from cloud.sagemaker_train import DEFAULT_PREFIX, Detached, TrainingJobError, train_on_sagemaker

        def status(job: str, state: str, secondary: str, message: str, seconds: float) -> None:
            detail = f" / {secondary}" if secondary and secondary != state else ""
            print(f"[{seconds / 60:5.1f} min] {job}: {state}{detail}" + (f": {message}" if message else ""),
                  file=sys.stderr, flush=True)

        def log_line(stream: str, line: str) -> None:
            print(f"  {stream.rpartition('/')[2]} | {line}", file=sys.stderr, flush=True)

        max_runtime = int(parse_span(args.max_runtime).total_seconds()) if args.max_runtime else None
        try:
            done = train_on_sagemaker(
                args.data, args.out, hps, role_arn=args.role, instance_type=args.instance_type,
                image_uri=args.image, bucket=args.bucket, prefix=args.prefix if args.prefix is not None else
                DEFAULT_PREFIX, region=args.region, endpoint_url=args.endpoint_url, job_name=args.job_name,
                **({"max_runtime_s": max_runtime} if max_runtime else {}), on_status=status, on_log=log_line)
        except Detached as err:
            print(f"edgeloop train: {err}", file=sys.stderr)
            return 130
        except TrainingJobError as err:
            print(f"edgeloop train: error: {err}", file=sys.stderr)
            return 1
        card, out_dir = done.card, done.out_dir
        job = card.lineage["training_job"]
        print(f"SageMaker training job {job['name']} ({job.get('instance_type')}, {job.get('image')}): "
              f"model {card.lineage['model_artifact']}")
    print(f"trained {card.name} {card.version} on {card.train_rows} rows, features {card.features}")
    gaps = card.missing_values
    if gaps.get("rows_dropped") or gaps.get("imputed"):
        imputed = ", ".join(f"{n} {v['count']}" for n, v in gaps["imputed"].items()) or "none"
        print(f"missing values: {gaps['rows_dropped']} rows dropped, imputed (median): {imputed}")
    if card.stream:
        print(f"threshold {card.outlier.threshold:g}, a stated excursion beyond the stream's recent range; it "
              f"flags {card.outlier.target_false_positive_rate:.2%} of the training series; window "
              f"{card.stream['window']} values, streams keyed by '{card.stream['key']}', "
              + (f"a cycle of {card.lineage['seasonal_period']} values" if card.lineage.get("seasonal_period")
                 else "no cycle") + f" -> {out_dir}")
        if card.lineage.get("seasonal_note"):
            print(f"note: {card.lineage['seasonal_note']}")
    else:
        holdout_fpr = card.lineage.get("metrics", {}).get("holdout_fpr", float("nan"))
        print(f"threshold {card.outlier.threshold:.4f} (target FPR {card.outlier.target_false_positive_rate:.2%}, "
              f"held-out FPR {holdout_fpr:.2%}) -> {out_dir}")
    print(f"data sha256 {card.lineage['data']['sha256']} ({card.lineage['data']['rows']} rows), lineage in "
          f"{Path(out_dir) / 'training.json'}")
    return 0


def _compile(args) -> int:
    """Compile a training output into a bundle; with --neo, also (or, without --model, only) compile the
    bundle's model with SageMaker Neo for each --target."""
    from model_compile.compile import compile_bundle

    if not args.model and not args.neo:
        print("edgeloop compile: error: --model is required (or --neo to add Neo targets to the bundle at --out)",
              file=sys.stderr)
        return 2
    if args.model:
        result = compile_bundle(args.model, args.out, level=args.optimization, variants=_variants(args.variants),
                                variant_tolerance=args.variant_tolerance)
        _print_compiled(result)
    return _neo(args) if args.neo else 0


def _neo(args) -> int:
    import boto3

    from model_compile.neo import NeoError, compile_with_neo

    if not (args.target and args.role and args.bucket):
        print("edgeloop compile: error: --neo needs --target, --role and --bucket", file=sys.stderr)
        return 2
    try:
        options = json.loads(args.compiler_options) if args.compiler_options else None
    except json.JSONDecodeError as err:
        print(f"edgeloop compile: error: --compiler-options is not JSON: {err}", file=sys.stderr)
        return 2
    session = boto3.session.Session(region_name=args.region)
    sm, s3 = session.client("sagemaker"), session.client("s3", endpoint_url=args.endpoint_url)

    def status(job: str, state: str, seconds: float) -> None:
        print(f"SageMaker Neo compilation job {job}: {state} ({seconds / 60:.1f} min)", file=sys.stderr, flush=True)

    for target in _csv(args.target):
        try:
            r = compile_with_neo(args.out, target, role_arn=args.role, bucket=args.bucket, prefix=args.prefix,
                                 sagemaker=sm, s3=s3, compiler_options=options, batch_size=args.neo_batch,
                                 poll_s=args.neo_poll, timeout_s=args.neo_timeout, on_status=status)
        except NeoError as err:
            print(f"edgeloop compile: error: {err}", file=sys.stderr)
            return 1
        print(f"neo {r.artifact.target}: {len(r.files)} files -> {Path(args.out) / r.artifact.directory} "
              f"(job {r.artifact.job_name})")
    return 0


def _variants(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else _csv(text)


def _print_compiled(result) -> None:
    """The bundle, then each variant: kept with what its gate measured, or left out and why."""
    m = result.manifest
    print(f"bundle {m.name} {m.version} -> {result.bundle} (parity max abs diff {result.max_abs_diff:.3g})")
    if result.cpu_only_ops:
        print(f"note: CPU-provider-only operators {result.cpu_only_ops}: this model will not use a GPU")
    for v in result.variants:
        p = v.parity
        figures = (f"max rel diff {p['max_rel_diff']:.3g} (tolerance {p['tolerance']:g}), decisions agree "
                   f"{p['decision_agreement']:.2%} of {int(p['rows'])} held-out rows, far outliers kept "
                   f"{p['far_recall']:.2%}") if "max_rel_diff" in p else ""
        if v.kept:
            print(f"variant {v.precision}: kept as {v.file} for {', '.join(v.providers)}: {figures} "
                  f"[gated on {', '.join(v.evaluated_with)}]")
        else:
            print(f"variant {v.precision}: left out: {v.reason}" + (f" [{figures}]" if figures else ""))


def _bundle(args) -> int:
    from model_compile.byo import bundle_onnx

    threshold_given = args.threshold is not None
    result = bundle_onnx(args.onnx, args.data, args.out, higher_is_outlier=args.higher_is_outlier,
                         features=_csv(args.features) if args.features else None, score_output=args.score_output,
                         target_fpr=args.fpr, threshold=args.threshold, name=args.name, version=args.version,
                         meaning=args.meaning, variants=_variants(args.variants), level=args.optimization)
    rule = result.card.outlier
    how = "as given" if threshold_given else f"at target FPR {rule.target_false_positive_rate:.2%}"
    print(f"scored {result.rows} rows of {args.data} ({result.dropped} with gaps left out); threshold "
          f"{rule.threshold:.6g} {how}: {result.data_fpr:.2%} of the rows above it")
    _print_compiled(result.compiled)
    return 0


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _component_build(args) -> int:
    import shutil

    from cloud.components import build_components

    out = Path(args.out)
    for sub in ("recipes", "artifacts"):  # as GDK does: nothing stale is published with this build
        shutil.rmtree(out / sub, ignore_errors=True)
    built = build_components(out, args.bundle, arches=_csv(args.arch), python=args.python,
                             flavours=_csv(args.onnxruntime), cache=Path(args.wheel_cache))
    for c in built:
        print(f"built {c.name} {c.version}: {c.recipe}")
    return 0


def _component_lock(args) -> int:
    from cloud.components import project_root
    from cloud.wheels import lock

    runtime = project_root() / "components" / "runtime"
    pins = lock(runtime / "requirements.txt", runtime / "requirements.lock", python=args.python, glibc=args.glibc,
                arches=_csv(args.arch), progress=lambda m: print(m, file=sys.stderr))
    print(f"{len(pins)} pins -> {runtime / 'requirements.lock'}")
    return 0


def _component_publish(args) -> int:
    from cloud.publish import publish
    from cloud.registry import open_registry

    registry = open_registry(args.registry, endpoint_url=args.endpoint_url, region=args.region) if args.registry \
        else None
    done = publish(args.build_dir, bucket=args.bucket, region=args.region, only=args.component or None,
                   registry=registry, unapproved=args.unapproved,
                   wait_s=0 if args.no_wait else args.wait, progress=lambda m: print(m, file=sys.stderr))
    for p in done:
        print(f"{p.name} {p.version} {p.arn}")
    return 0


def _component_local(args) -> int:
    from cloud.publish import local_layout

    recipes, artifacts, versions = local_layout(args.build_dir, args.out, runtime_version=args.runtime_version)
    merges = " ".join(f'--merge "{n}={v}"' for n, v in versions.items())
    print(f"local deployment layout in {args.out}; on the device (as root):")
    print(f"  /greengrass/v2/bin/greengrass-cli deployment create --recipeDir {recipes} "
          f"--artifactDir {artifacts} {merges}")
    models = [n for n in versions if n.startswith("com.edgeloop.model.")]
    if models:
        from cloud.components import project_root, read_gdk_config

        runtime, _ = read_gdk_config(project_root())
        update = {runtime: {"MERGE": {"model": {"component": models[0], "version": versions[models[0]]}}}}
        print(f"  add --update-config '{json.dumps(update)}' to serve {models[0]}")
    return 0


def _deploy(args) -> int:
    import boto3

    from cloud.deploy import DeployRequest, deploy, deployment_status, format_status

    session = boto3.Session(region_name=args.region) if args.region else boto3.Session()
    if args.action == "status":
        print(format_status(deployment_status(session, args.thing_group, args.deployment_id)))
        return 0
    if not args.thing_group or not args.model_version:
        print("edgeloop deploy: error: --thing-group and --model-version are required", file=sys.stderr)
        return 2
    model = args.model or _last_model(args.build_dir)
    req = DeployRequest(args.thing_group, model, args.model_version, runtime_version=args.runtime_version,
                        store_url=args.store, endpoint_url=args.endpoint_url, onnxruntime=args.onnxruntime,
                        run_as=args.run_as)
    if not args.store:
        print("edgeloop deploy: note: no --store; devices keep the runtime's store (a local folder) and sync "
              "nothing to S3", file=sys.stderr)
    result = deploy(req, session)
    print(f"deployment {result['deploymentId']} to {result['targetArn']}: runtime {result['runtimeVersion']}, "
          f"model {model} {args.model_version}")
    print(f"follow it: edgeloop deploy status --deployment-id {result['deploymentId']}")
    return 0


def _last_model(build_dir: str) -> str:
    from cloud.components import ComponentError

    names = sorted(p.name.rsplit("-", 1)[0] for p in (Path(build_dir) / "recipes").glob("com.edgeloop.model.*.yaml")
                   if not p.name.endswith(".published.yaml"))
    if len(set(names)) != 1:
        raise ComponentError(f"give --model: {'several' if names else 'no'} model components in {build_dir}")
    return names[0]


def _iam_policy(args) -> int:
    from cloud.iam import device_policy

    policy = device_policy(args.store, args.artifact_bucket, partition=args.partition, kms_key_arn=args.kms_key,
                           per_device=not args.all_devices)
    text = json.dumps(policy, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"policy written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def _fleet_drift(args) -> int:
    from datetime import datetime, timezone

    from cloud.drift import Thresholds, dumps, fleet_drift, format_table, parse_span, to_json
    from edge_runtime.contracts import load_summary
    from edge_runtime.store import open_store

    def when(text: str | None):
        if not text:
            return None
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    store = open_store(args.store, args.endpoint_url)
    baselines = {}
    if args.baseline:
        b = load_summary(Path(args.baseline).read_bytes(), args.baseline)
        baselines[(b.model_name, b.model_version)] = b
    thresholds = Thresholds(alpha=args.alpha, drift_ks=args.drift_ks, warn_ks=args.warn_ks, min_count=args.min_rows,
                            quality_rate=args.quality_rate)
    if args.sagemaker and (args.dask or not (args.sagemaker_role and args.sagemaker_image)):
        print("--sagemaker needs --sagemaker-role and --sagemaker-image, and excludes --dask", file=sys.stderr)
        return 2
    bar = _progress("reading summaries") if sys.stderr.isatty() and not args.sagemaker else None
    client = _dask_client(args.dask) if args.dask else None
    review = dict(baselines=baselines, thresholds=thresholds, since=when(args.since), until=when(args.until),
                  last=None if args.all or args.since else parse_span(args.last),
                  cycle_s=int(parse_span(args.cycle).total_seconds()) if args.cycle else None, workers=args.workers)
    try:
        if args.sagemaker:
            from cloud.drift_sagemaker import SageMakerJobError

            try:
                reports, warnings = _on_sagemaker(args, review)
            except SageMakerJobError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        else:
            reports, warnings = fleet_drift(store, **review, progress=bar, dask=client, compact=args.compact,
                                            cohorts=_read_cohorts(args.cohorts) if args.cohorts else None)
    finally:
        if client is not None:
            client.close()
    if bar:
        print(file=sys.stderr)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not reports:
        print(f"no summaries with a baseline found in {args.store}", file=sys.stderr)
        return 1
    for r in reports:
        print(format_table(r, features=not args.brief, limit=args.limit))
        print()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(dumps(to_json(reports, thresholds)))
        print(f"drift JSON written to {args.json}")
    if args.model_monitor:
        from cloud import model_monitor

        for path in model_monitor.write(reports, args.model_monitor, thresholds):
            print(f"Model Monitor: {path}")
    if args.html:
        from cloud.drift_report import write_html

        print(f"HTML report written to {write_html(reports, args.html, warnings)}")
    if args.cloudwatch:
        import boto3

        from cloud import cloudwatch

        sent = cloudwatch.publish(reports, boto3.client("cloudwatch"), args.cloudwatch)
        print(f"{sent} CloudWatch metrics sent to namespace {args.cloudwatch}")
    return 0


def _on_sagemaker(args, review: dict):
    """The review with the summaries read by one SageMaker Processing job (cloud/drift_sagemaker.py)."""
    from cloud.drift import parse_span
    from cloud.drift_sagemaker import review_on_sagemaker

    def status(job: str, state: str, seconds: float) -> None:
        print(f"SageMaker processing job {job}: {state} ({seconds / 60:.1f} min)", file=sys.stderr, flush=True)

    def ids(text: str | None) -> list[str] | None:
        return [s.strip() for s in text.split(",") if s.strip()] if text else None

    return review_on_sagemaker(
        args.store, args.sagemaker_role, args.sagemaker_image, args.sagemaker_instance_type,
        args.sagemaker_instances, args.sagemaker, endpoint_url=args.endpoint_url, poll_s=args.sagemaker_poll,
        timeout_s=parse_span(args.sagemaker_timeout).total_seconds(), job_name=args.sagemaker_job_name,
        subnets=ids(args.sagemaker_subnets), security_group_ids=ids(args.sagemaker_security_groups),
        progress=status, **review)


def _read_cohorts(path: str) -> dict[str, str]:
    """device -> cohort, from a CSV with ``device,cohort`` rows (a header row is skipped) or a JSON object."""
    import csv

    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    rows = [r for r in csv.reader(text.splitlines()) if len(r) >= 2]
    if rows and rows[0][0].strip().lower() in ("device", "device_id", "thing", "thing_name"):
        rows = rows[1:]
    return {r[0].strip(): r[1].strip() for r in rows}


def _dask_client(address: str):
    """A Dask client: ``local`` or ``local:N`` starts a LocalCluster of N worker processes here;
    anything else is a scheduler's address (``tcp://host:8786``)."""
    from distributed import Client

    from .drift import local_cluster

    if address.startswith("local"):
        workers = int(address.partition(":")[2] or os.cpu_count() or 2)
        return Client(local_cluster(workers))
    return Client(address)


def _progress(label: str):
    """A one-line progress bar on stderr, redrawn at most every 1% of the work."""
    state = {"shown": -1}

    def update(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct != state["shown"]:
            state["shown"] = pct
            filled = pct // 4
            print(f"\r{label} [{'#' * filled}{'.' * (25 - filled)}] {pct:3d}% ({done}/{total})",
                  end="", file=sys.stderr, flush=True)
    return update


def _retrain(args) -> int:
    from cloud.registry import open_registry
    from cloud.retrain import retrain

    registry = None  # the local registry on --store, or SageMaker Model Registry (files on --store)
    if args.registry:
        registry = open_registry(args.registry, args.store, endpoint_url=args.endpoint_url, region=args.region)
    elif args.store:
        registry = open_registry(args.store, endpoint_url=args.endpoint_url)
    champion = args.champion
    if champion is None:
        if registry is None or not args.model or not args.version:
            print("edgeloop retrain: error: give --champion BUNDLE, or a registry (--store, or --registry sagemaker "
                  "with --store s3://...) with --model and --version", file=sys.stderr)
            return 2
        champion = registry.fetch_bundle(args.model, args.version, Path(args.out) / "champion")
    result = retrain(args.data, champion, args.out, args.new_version, store=registry, approve=args.approve,
                     seed=args.seed, missing=args.missing)
    print(f"champion {result.champion.version}: worst KS {result.champion.worst_ks:.3f}, flagged "
          f"{result.champion.flagged_rate:.2%}; challenger {result.challenger.version}: worst KS "
          f"{result.challenger.worst_ks:.3f}, flagged {result.challenger.flagged_rate:.2%} "
          f"(target {result.challenger.target_rate:.2%})")
    if not result.better:
        print("the challenger is not better: not registered")
        return 1
    print(f"better: {result.reason}")
    if result.registered:
        print(f"registered {result.challenger.version} ({result.approval})")
    if args.build_component or args.publish or args.deploy:
        from cloud.components import build_model, project_root, read_gdk_config

        if (args.publish or args.deploy) and result.approval != "Approved":
            print("edgeloop retrain: error: only an approved version is published: add --approve (and --store), "
                  "or approve it after review and publish it then", file=sys.stderr)
            return 2
        runtime, _ = read_gdk_config(project_root())
        built = build_model(result.bundle, Path(args.build_dir), runtime, project_root())
        print(f"built {built.name} {built.version}: {built.recipe}")
        if args.publish or args.deploy:
            import boto3

            from cloud.deploy import DeployRequest, deploy
            from cloud.publish import publish

            session = boto3.Session(region_name=args.region) if args.region else boto3.Session()
            for p in publish(args.build_dir, bucket=args.bucket, region=args.region, session=session,
                             only=[built.name], progress=lambda m: print(m, file=sys.stderr), registry=registry):
                print(f"published {p.name} {p.version}")
            if args.deploy:
                store_url = args.deploy_store or (args.store if args.store and args.store.startswith("s3://") else None)
                done = deploy(DeployRequest(args.deploy, built.name, built.version, store_url=store_url), session)
                print(f"deployment {done['deploymentId']} to {done['targetArn']}: runtime {done['runtimeVersion']}, "
                      f"model {built.name} {built.version}")
        else:
            print(f"next: edgeloop component publish --build-dir {args.build_dir} --component {built.name}, "
                  f"then edgeloop deploy --model-version {built.version}")
    return 0


def _fleet_watch(args) -> int:
    from cloud.drift import parse_span
    from cloud.watch import watch
    from edge_runtime.store import open_store

    store = open_store(args.store, args.endpoint_url)
    sagemaker = None
    if args.sagemaker_pipeline:
        import boto3

        sagemaker = boto3.client("sagemaker")
    watch(store, parse_span(args.every).total_seconds(), rounds=1 if args.once else None,
          state_path=Path(args.out) / "watch-state.json", data=args.data, out_dir=Path(args.out),
          min_devices=args.min_devices, cycle_s=int(parse_span(args.cycle).total_seconds()) if args.cycle else None,
          pipeline=args.sagemaker_pipeline, sagemaker=sagemaker, store_url=args.store)
    return 0


def _model(args) -> int:
    from cloud.registry import PENDING, LocalRegistry, is_sagemaker, open_registry

    sagemaker = is_sagemaker(args.registry)
    if not sagemaker and bool(args.registry) == bool(args.store):
        print(f"edgeloop model {args.action}: error: give the local registry's --store (a folder or "
              "s3://bucket/prefix), or --registry sagemaker" + (", not both" if args.store else ""), file=sys.stderr)
        return 2
    if sagemaker:
        registry = open_registry(args.registry, args.store, endpoint_url=args.endpoint_url, region=args.region)
    else:
        registry = open_registry(args.registry or args.store, endpoint_url=args.endpoint_url)
    if args.action == "register":
        done = registry.register(args.bundle, status="Approved" if args.approve else PENDING,
                                 note=args.note or ("registered" if not args.approve else "approved when registered"))
        print(f"registered: {done.ref} ({done.approval})")
    elif args.action == "list":
        if args.rebuild_index:
            if not isinstance(registry, LocalRegistry):
                print("edgeloop model list: error: --rebuild-index is for the local registry", file=sys.stderr)
                return 2
            print(f"index rebuilt: {registry.rebuild_index()} versions", file=sys.stderr)
        rows = registry.versions(args.model)
        for row in rows:
            ref = f" {row.ref}" if row.number is not None else ""  # SageMaker: the package's ARN, /<its number>
            print(f"{row.model:<24} {row.version:<12} {row.approval:<21}{ref}".rstrip())
        if not rows:
            print(f"no registered model{' ' + args.model if args.model else ''} in {registry.spec}")
    else:
        status = {"approve": "Approved", "reject": "Rejected"}[args.action]
        registry.set_approval(args.model, args.version, status, note=args.note or "")
        print(f"{args.model} {args.version}: {status}")
    return 0


def _demo(args) -> int:
    from cloud.demo import run_demo

    result = run_demo(args.workdir, devices=args.devices, rows=args.rows, seed=args.seed)
    expected = sorted(result.drifted_expected)
    ok = sorted(result.drifted_found) == expected
    if expected:  # the loop closed: the retrained model went out and the drift cleared
        ok = ok and result.retrained is not None and result.cleared == expected and not result.still_drifted
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop", description="Edge ML on device fleets, loop closed.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the default outlier detector on a CSV, here or on SageMaker")
    p.add_argument("--data", required=True, help="CSV with a header row and numeric feature columns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", help="the model's name (default sensor-outliers)")
    p.add_argument("--version", help="the model's version (default 1.0.0)")
    p.add_argument("--features", help="comma-separated feature columns (default: every numeric column)")
    p.add_argument("--fpr", type=float, help="target false-positive rate (default 0.01)")
    p.add_argument("--components", type=int, help="Gaussian mixture components (default 3)")
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--missing", help="gaps (empty, non-numeric, nan, inf cells): impute (the median, the default) "
                   "or drop (the row), for all features or per feature: impute,humidity=drop")
    p.add_argument("--detector", choices=["tabular", "stream"], help="tabular (default): rows of features; stream: "
                   "one value per record, scored against the stream's recent values (docs/streams.md)")
    p.add_argument("--window", type=int, help="stream: values per model row (default 1024)")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help="any other hyperparameter of the training "
                   "entry point (model=tabular, holdout=0.2, ...; see docs/training.md); repeatable")
    g = p.add_argument_group("SageMaker", "run the same training as a SageMaker training job (docs/training.md)")
    g.add_argument("--sagemaker", action="store_true", help="train in a SageMaker training job, follow it, "
                   "download the model into --out with the job's lineage")
    g.add_argument("--role", metavar="ARN", help="the IAM role the job runs as (required with --sagemaker)")
    g.add_argument("--instance-type", help="(default ml.m5.large)")
    g.add_argument("--image", metavar="URI", help="training image (default: the SageMaker scikit-learn 1.4-2 "
                   "framework image of the region, Python 3.10)")
    g.add_argument("--bucket", help="for the data, code and model (default: sagemaker-<region>-<account>, "
                   "which must exist)")
    g.add_argument("--prefix", help="key prefix in the bucket (default edgeloop/training)")
    g.add_argument("--region")
    g.add_argument("--endpoint-url", help="one endpoint for S3, SageMaker, CloudWatch Logs and STS (LocalStack, "
                   "tests)")
    g.add_argument("--max-runtime", help="SageMaker stops the job after this long: 90m, 2h, 3600 (default 1h)")
    g.add_argument("--job-name", help="default: edgeloop-train-<UTC time>-<random>")
    p.set_defaults(func=_train)

    p = sub.add_parser("compile", help="check, optimise and bundle a trained model")
    p.add_argument("--model", help="the output directory of `edgeloop train` (not needed for --neo on an "
                   "existing --out)")
    p.add_argument("--out", required=True, help="bundle directory to write (with --neo alone: the bundle to add to)")
    p.add_argument("--optimization", default="basic", choices=["none", "basic", "extended", "all"],
                   help="ONNX Runtime offline level; only none/basic stay portable across providers")
    p.add_argument("--variants", default="fp16,int8", help="reduced-precision variants to build and gate: fp16 "
                   "(GPU providers), int8 (CPU), both (default) or none; one that fails its gate is left out")
    p.add_argument("--variant-tolerance", type=float, default=0.02, help="the variants' output tolerance, "
                   "relative to the scores' distance from the threshold (docs/compile.md; default 0.02)")
    g = p.add_argument_group("SageMaker Neo", "also compile the model for target devices (docs/neo.md)")
    g.add_argument("--neo", action="store_true", help="compile the bundle's model with SageMaker Neo; the output "
                   "goes into the bundle under neo/<target>/")
    g.add_argument("--target", help="Neo targets, comma-separated: a device (jetson_xavier, rasp4b, ...) or "
                   "<os>_<arch>[_<accelerator>] (linux_arm64, linux_arm64_nvidia)")
    g.add_argument("--role", metavar="ARN", help="the role the compilation job assumes")
    g.add_argument("--bucket", help="S3 bucket for the job's input and output")
    g.add_argument("--prefix", default="edgeloop/neo", help="key prefix in --bucket (default edgeloop/neo)")
    g.add_argument("--region", help="AWS region (default: the environment's)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint for the upload and download")
    g.add_argument("--compiler-options", metavar="JSON", help='Neo CompilerOptions; needed for *_nvidia, e.g. '
                   '{"gpu-code": "sm_72", "trt-ver": "8.4.1", "cuda-ver": "11.4"}')
    g.add_argument("--neo-batch", type=int, default=1, help="batch size Neo compiles for (default 1)")
    g.add_argument("--neo-timeout", type=float, default=3600, help="seconds to follow a job before stopping it")
    g.add_argument("--neo-poll", type=float, default=15, help="seconds between status checks")
    p.set_defaults(func=_compile)

    p = sub.add_parser("bundle", help="bundle your own ONNX model, with representative data (docs/compile.md)")
    p.add_argument("--onnx", required=True, help="the model: one float32 input [N, features], one score per row")
    p.add_argument("--data", required=True, help="CSV of representative rows with a header: the baseline, the "
                   "threshold and the parity gates (at least 100 complete rows)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--features", help="comma-separated input columns in the model's order (default: the CSV's "
                   "numeric columns, in its order)")
    p.add_argument("--score-output", help="the output holding the score (default: the model's only output)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--higher-is-outlier", dest="higher_is_outlier", action="store_true", default=None,
                           help="a higher score means a more unusual row (a distance, an anomaly score)")
    direction.add_argument("--lower-is-outlier", dest="higher_is_outlier", action="store_false",
                           help="a lower score means a more unusual row (a likelihood, a similarity)")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--fpr", type=float, default=0.01, help="calibrate the threshold so this share of the "
                       "data rows is flagged (default 0.01)")
    limit.add_argument("--threshold", type=float, help="use this threshold on the outlier score (the output, "
                       "negated with --lower-is-outlier)")
    p.add_argument("--name", help="model name (default: the ONNX file's name)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--meaning", help="what the score means, for the manifest")
    p.add_argument("--optimization", default="basic", choices=["none", "basic", "extended", "all"],
                   help="ONNX Runtime offline level; only none/basic stay portable across providers")
    p.add_argument("--variants", default="fp16,int8", help="fp16, int8, both (default) or none")
    p.set_defaults(func=_bundle)

    comp = sub.add_parser("component", help="Greengrass components").add_subparsers(dest="action", required=True)
    p = comp.add_parser("build", help="GDK custom build: write greengrass-build/ (downloads wheels, cached)")
    p.add_argument("--out", default="greengrass-build")
    p.add_argument("--bundle", action="append", default=[], help="also build a model component for this bundle")
    p.add_argument("--arch", default=os.environ.get("EDGELOOP_BUILD_ARCH", "x86_64,aarch64"),
                   help="device architectures (default $EDGELOOP_BUILD_ARCH or x86_64,aarch64)")
    p.add_argument("--python", default="3.11", help="the devices' CPython (default 3.11: Debian 12, Pi OS)")
    p.add_argument("--onnxruntime", default="cpu", help="flavours to ship: cpu, or cpu,gpu (adds onnxruntime-gpu)")
    p.add_argument("--wheel-cache", default=str(Path.home() / ".cache" / "edgeloop" / "wheels"))
    p.set_defaults(func=_component_build)
    p = comp.add_parser("lock", help="pin the runtime's requirements for the devices (requirements.lock)")
    p.add_argument("--python", default="3.11")
    p.add_argument("--glibc", default="2.28", help="the oldest glibc among the devices (default 2.28)")
    p.add_argument("--arch", default="x86_64,aarch64")
    p.set_defaults(func=_component_lock)
    p = comp.add_parser("publish", help="publish the built components (as gdk component publish does)")
    p.add_argument("--build-dir", default="greengrass-build")
    p.add_argument("--bucket", help="exactly this bucket (default: gdk-config's bucket-<region>-<account>)")
    p.add_argument("--region", help="default: gdk-config's publish.region")
    p.add_argument("--component", action="append", help="only this component (repeatable)")
    p.add_argument("--registry", help="the model registry model versions must be approved in: a folder or "
                   "s3://bucket/prefix (local registry), or sagemaker[:GROUP_PREFIX] (SageMaker Model Registry, "
                   "in --region)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the registry (and SageMaker's, for LocalStack)")
    p.add_argument("--unapproved", action="store_true", help="publish model versions without approval")
    p.add_argument("--wait", type=float, default=120, help="seconds to wait for each to be deployable")
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=_component_publish)
    p = comp.add_parser("local", help="a recipes/artifacts layout for greengrass-cli on one device")
    p.add_argument("--build-dir", default="greengrass-build")
    p.add_argument("--out", default="greengrass-local")
    p.add_argument("--runtime-version", help="the version NEXT_PATCH becomes (default 0.0.1)")
    p.set_defaults(func=_component_local)

    p = sub.add_parser("deploy", help="deploy the runtime and a model to a thing group; `deploy status`")
    p.add_argument("action", nargs="?", choices=["status"], help="status: per-device status of a deployment")
    p.add_argument("--thing-group")
    p.add_argument("--model-version", help="the model component version to serve")
    p.add_argument("--model", help="model name or component (default: the one in greengrass-build)")
    p.add_argument("--runtime-version", help="default: the highest published")
    p.add_argument("--store", help="s3://bucket/prefix the devices sync to")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for the devices' store")
    p.add_argument("--onnxruntime", choices=["cpu", "gpu"], help="switch the devices' ONNX Runtime flavour")
    p.add_argument("--run-as", help="posix user[:group] for the runtime, e.g. ggc_user:video for GPU nodes")
    p.add_argument("--region")
    p.add_argument("--deployment-id", help="status: this deployment instead of the group's latest")
    p.add_argument("--build-dir", default="greengrass-build")
    p.set_defaults(func=_deploy)

    iam = sub.add_parser("iam", help="AWS IAM").add_subparsers(dest="action", required=True)
    p = iam.add_parser("policy", help="the policy the devices' token exchange role needs")
    p.add_argument("--store", required=True, help="s3://bucket/prefix the devices sync to")
    p.add_argument("--artifact-bucket", required=True, help="the component bucket (see component publish)")
    p.add_argument("--kms-key", help="the KMS key ARN, with store.sse aws:kms")
    p.add_argument("--partition", default="aws")
    p.add_argument("--all-devices", action="store_true", help="do not scope keys to the device's thing name")
    p.add_argument("--out", help="write it here instead of printing it")
    p.set_defaults(func=_iam_policy)

    p = sub.add_parser("run", help="the device runtime: score records with a bundle")
    add_run_arguments(p)
    p.set_defaults(func=run_command)

    fleet = sub.add_parser("fleet", help="fleet review").add_subparsers(dest="action", required=True)
    p = fleet.add_parser("drift", help="merge the fleet's summaries and compare with the baseline")
    p.add_argument("--store", required=True, help="a local directory or s3://bucket/prefix")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, LocalStack)")
    p.add_argument("--baseline", help="baseline.json to use instead of the registered one")
    p.add_argument("--json", help="also write the result as JSON to this path")
    p.add_argument("--model-monitor", metavar="DIR", help="also write Model Monitor's statistics.json, "
                   "constraints.json and constraint_violations.json per model version under DIR")
    p.add_argument("--html", help="also write a self-contained HTML report to this path")
    p.add_argument("--cloudwatch", nargs="?", const="edgeloop/drift", metavar="NAMESPACE",
                   help="also send the metrics to CloudWatch (default namespace edgeloop/drift)")
    p.add_argument("--since", help="start of the range (ISO-8601, UTC if no zone)")
    p.add_argument("--until", help="end of the range (default: the end of the newest window)")
    p.add_argument("--last", default="24h", help="the range's length when --since is not given (default 24h)")
    p.add_argument("--all", action="store_true", help="the whole history instead of --last")
    p.add_argument("--cycle", help="the data's cycle, e.g. 24h: compare whole cycles only")
    p.add_argument("--alpha", type=float, default=0.01, help="false discovery rate over all tests (0.01)")
    p.add_argument("--drift-ks", type=float, default=0.05, help="KS distance (sketch error removed) for drift")
    p.add_argument("--warn-ks", type=float, default=0.025)
    p.add_argument("--quality-rate", type=float, default=0.02,
                   help="data-quality shares above the baseline's by this much are flagged (0.02)")
    p.add_argument("--min-rows", type=int, default=50, help="fewer values: no verdict")
    p.add_argument("--workers", type=int, default=8, help="summaries read in parallel (per Dask task)")
    p.add_argument("--dask", metavar="ADDRESS", help="spread the devices over a Dask cluster: a scheduler "
                   "address, or local[:N] for N local worker processes")
    p.add_argument("--limit", type=int, help="show at most this many devices in the table")
    p.add_argument("--brief", action="store_true", help="one line per device")
    p.add_argument("--cohorts", metavar="FILE", help="device,cohort rows (CSV) or a JSON object: a row per cohort "
                   "(site, hardware batch, firmware), judged like a device")
    p.add_argument("--compact", action="store_true", help="write a roll-up of every whole device-day read, so "
                   "later reviews read one object per device and day (rebuilt when a day's summaries change)")
    p.add_argument("--sagemaker", metavar="S3_PREFIX", help="read the summaries in one SageMaker Processing job "
                   "instead, its files under this s3://bucket/prefix (with --sagemaker-role, --sagemaker-image)")
    p.add_argument("--sagemaker-role", metavar="ARN", help="the role the processing job runs as: reads the store "
                   "and the job prefix, writes the job's output/")
    p.add_argument("--sagemaker-image", metavar="URI", help="ECR image with Python 3.11 and the project's "
                   "dependencies (not the project: its code travels with the job); see cloud/drift_sagemaker.py")
    p.add_argument("--sagemaker-instance-type", default="ml.m5.xlarge", help="(default ml.m5.xlarge)")
    p.add_argument("--sagemaker-instances", type=int, default=2,
                   help="processing instances, at most one per share of the fleet (default 2)")
    p.add_argument("--sagemaker-timeout", default="6h", help="stop the job after this long (default 6h)")
    p.add_argument("--sagemaker-poll", type=float, default=30.0, help="seconds between status checks (default 30)")
    p.add_argument("--sagemaker-job-name", help="default: edgeloop-drift-<UTC time>-<random>")
    p.add_argument("--sagemaker-subnets", help="comma-separated subnet ids: run the job in this VPC")
    p.add_argument("--sagemaker-security-groups", help="comma-separated security group ids (with --sagemaker-subnets)")
    p.set_defaults(func=_fleet_drift)

    p = fleet.add_parser("watch", help="review on a schedule; retrain when drift crosses the line")
    p.add_argument("--store", required=True)
    p.add_argument("--endpoint-url")
    p.add_argument("--every", default="1h", help="between reviews (default 1h)")
    p.add_argument("--once", action="store_true", help="one review, then exit (for cron or a scheduler)")
    p.add_argument("--min-devices", type=int, default=1, help="flagged devices that start a retraining")
    p.add_argument("--cycle", help="the data's cycle, e.g. 24h")
    p.add_argument("--data", help="fresh records (CSV) to retrain on here")
    p.add_argument("--sagemaker-pipeline", metavar="NAME", help="start this SageMaker pipeline instead")
    p.add_argument("--out", default="edgeloop-watch", help="challengers and the watch's state")
    p.set_defaults(func=_fleet_watch)

    p = sub.add_parser("retrain", help="train a challenger on fresh data; register it if it beats the champion")
    p.add_argument("--data", required=True, help="fresh records, CSV with the model's feature columns")
    p.add_argument("--champion", help="the champion's bundle directory")
    p.add_argument("--store", help="the registry's store (champion from it with --model/--version; winner to it)")
    p.add_argument("--registry", help="sagemaker[:PREFIX]: SageMaker Model Registry, with the files on --store "
                   "(s3://...); default: the local registry on --store")
    p.add_argument("--endpoint-url")
    p.add_argument("--model")
    p.add_argument("--version", help="the champion's version")
    p.add_argument("--new-version", required=True, help="the challenger's version")
    p.add_argument("--out", default="edgeloop-retrain")
    p.add_argument("--approve", action="store_true", help="register the winner as Approved (default: pending)")
    p.add_argument("--build-component", action="store_true", help="also build the winner's model component")
    p.add_argument("--build-dir", default="greengrass-build")
    p.add_argument("--publish", action="store_true", help="also publish the winner's component (needs --approve)")
    p.add_argument("--deploy", metavar="THING_GROUP", help="also publish and deploy it to this thing group")
    p.add_argument("--deploy-store", help="s3://bucket/prefix the devices sync to (default: --store if on S3)")
    p.add_argument("--bucket", help="component bucket, exactly (default: gdk-config's bucket-region-account)")
    p.add_argument("--region")
    p.add_argument("--missing", default="impute")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_retrain)

    model = sub.add_parser("model", help="the model registry").add_subparsers(dest="action", required=True)
    for action, text in (("register", "register a compiled bundle (pending approval)"),
                         ("list", "registered versions and their approval"),
                         ("approve", "approve a version"), ("reject", "reject a version")):
        p = model.add_parser(action, help=text)
        p.add_argument("--store", help="the local registry: a directory or s3://bucket/prefix; with --registry "
                       "sagemaker, the s3:// store for the bundle and baseline (to register)")
        p.add_argument("--registry", metavar="sagemaker[:GROUP_PREFIX]", help="SageMaker Model Registry (model "
                       "package groups named GROUP_PREFIX + model) instead of the local registry in --store")
        p.add_argument("--region", help="SageMaker's region (default: the AWS configuration's)")
        p.add_argument("--endpoint-url", help="S3-compatible endpoint of the store (and SageMaker's, for LocalStack)")
        if action == "register":
            p.add_argument("--bundle", required=True)
            p.add_argument("--approve", action="store_true", help="register it Approved (default: pending approval)")
            p.add_argument("--note", help="with --approve: why, kept with the status")
        else:
            p.add_argument("--model", required=action != "list")
        if action == "list":
            p.add_argument("--rebuild-index", action="store_true", help="local registry: rebuild its index from the "
                           "registered versions first (after another tool wrote to the store)")
        if action in ("approve", "reject"):
            p.add_argument("--version", required=True)
            p.add_argument("--note", help="why, kept with the status")
        p.set_defaults(func=_model)

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
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    from edge_runtime.contracts import ContractError
    from edge_runtime.store import StoreError

    try:
        return args.func(args)
    except (NoCredentialsError, NoRegionError) as err:
        print(f"edgeloop {args.command}: error: {err}: set up AWS credentials and a region (aws configure, "
              "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, --region)", file=sys.stderr)
        return 2
    except (ContractError, StoreError, OSError, ValueError, RuntimeError, BotoCoreError, ClientError) as err:
        print(f"edgeloop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
