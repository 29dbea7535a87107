"""Deploying the runtime and a model to a thing group, and following the rollout.

A deployment to a thing group replaces that group's previous one, so it always names both
components: the runtime (the latest published version unless given) and the model component at
the version asked for. The runtime's configuration is merged with ``model`` (which model to
serve: the runtime hot-swaps to it) and, if given, the store URL and ONNX Runtime flavour. The
rollout is exponential, a share of failures aborts it, a device that fails rolls back
(``ROLLBACK``), and components are told before an update (``NOTIFY_COMPONENTS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from edge_runtime.contracts import MODEL_COMPONENT_PREFIX, ModelComponentRef, parse_document

from .components import ComponentError
from .publish import account_of, component_arn, component_state, highest_version


@dataclass
class Rollout:
    base_rate_per_minute: int = 5
    increment_factor: float = 2.0
    succeeded_to_increase: int = 5
    maximum_per_minute: int = 100
    abort_failure_percent: float = 10.0
    abort_min_executed: int = 5
    in_progress_timeout_min: int = 60
    component_update_timeout_s: int = 120
    config_validation_timeout_s: int = 60


@dataclass
class DeployRequest:
    thing_group: str
    model: str  # the model component's name (com.edgeloop.model.<name>) or the model's name
    model_version: str
    runtime: str = "com.edgeloop.EdgeRuntime"
    runtime_version: str | None = None  # None: the highest published
    store_url: str | None = None
    endpoint_url: str | None = None
    onnxruntime: str | None = None  # cpu | gpu
    run_as: str | None = None  # posix user[:group], e.g. ggc_user:video for the GPU's device nodes
    rollout: Rollout = field(default_factory=Rollout)


def model_component(model: str) -> str:
    return model if model.startswith(MODEL_COMPONENT_PREFIX) else MODEL_COMPONENT_PREFIX + model


def thing_group_arn(partition: str, region: str, account: str, group: str) -> str:
    return f"arn:{partition}:iot:{region}:{account}:thinggroup/{group}"


def runtime_merge(req: DeployRequest) -> dict:
    """The configuration merged into the runtime component: which model, and what the flags set."""
    ref = parse_document(ModelComponentRef, {"component": model_component(req.model), "version": req.model_version},
                         "--model/--model-version")
    merge: dict = {"model": ref.model_dump()}
    store = {k: v for k, v in (("url", req.store_url), ("endpoint_url", req.endpoint_url)) if v}
    if store:
        merge["runtime"] = {"store": store}
    if req.onnxruntime:
        if req.onnxruntime not in ("cpu", "gpu"):
            raise ComponentError(f"--onnxruntime must be cpu or gpu, not {req.onnxruntime!r}")
        merge["onnxruntime"] = req.onnxruntime
    return merge


def deployment_request(req: DeployRequest, target_arn: str, runtime_version: str) -> dict:
    r = req.rollout
    runtime: dict = {"componentVersion": runtime_version,
                     "configurationUpdate": {"merge": json.dumps(runtime_merge(req), sort_keys=True)}}
    if req.run_as:
        runtime["runWith"] = {"posixUser": req.run_as}
    return {
        "targetArn": target_arn,
        "deploymentName": f"edgeloop {model_component(req.model)} {req.model_version}",
        "components": {
            req.runtime: runtime,
            model_component(req.model): {"componentVersion": req.model_version},
        },
        "deploymentPolicies": {
            "failureHandlingPolicy": "ROLLBACK",
            "componentUpdatePolicy": {"timeoutInSeconds": r.component_update_timeout_s, "action": "NOTIFY_COMPONENTS"},
            "configurationValidationPolicy": {"timeoutInSeconds": r.config_validation_timeout_s},
        },
        "iotJobConfiguration": {
            "jobExecutionsRolloutConfig": {
                "exponentialRate": {
                    "baseRatePerMinute": r.base_rate_per_minute,
                    "incrementFactor": r.increment_factor,
                    "rateIncreaseCriteria": {"numberOfSucceededThings": r.succeeded_to_increase},
                },
                "maximumPerMinute": r.maximum_per_minute,
            },
            "abortConfig": {"criteriaList": [{
                "failureType": "FAILED", "action": "CANCEL",
                "thresholdPercentage": r.abort_failure_percent,
                "minNumberOfExecutedThings": r.abort_min_executed,
            }]},
            "timeoutConfig": {"inProgressTimeoutInMinutes": r.in_progress_timeout_min},
        },
    }


def deploy(req: DeployRequest, session) -> dict:
    """Check both component versions exist, then create the deployment; returns its ids."""
    region = session.region_name
    if not region:
        raise ComponentError("no region: give --region or set AWS_REGION")
    gg = session.client("greengrassv2", region_name=region)
    account = account_of(session)
    partition = session.get_partition_for_region(region)
    runtime_version = req.runtime_version or highest_version(gg, component_arn(partition, region, account, req.runtime))
    if not runtime_version:
        raise ComponentError(f"{req.runtime} is not published in {region}: run `edgeloop component publish`")
    for name, version in ((req.runtime, runtime_version), (model_component(req.model), req.model_version)):
        state = component_state(gg, component_arn(partition, region, account, name, version))
        if state is None:
            raise ComponentError(f"{name} {version} is not published in {region}: run `edgeloop component publish`")
        if state != "DEPLOYABLE":
            raise ComponentError(f"{name} {version} is {state} in {region}, not DEPLOYABLE: see "
                                 "`aws greengrassv2 describe-component`, fix it and publish a new version")
    target = thing_group_arn(partition, region, account, req.thing_group)
    created = gg.create_deployment(**deployment_request(req, target, runtime_version))
    return {"deploymentId": created["deploymentId"], "iotJobId": created.get("iotJobId"),
            "targetArn": target, "runtimeVersion": runtime_version}


def deployment_status(session, thing_group: str | None = None, deployment_id: str | None = None) -> dict:
    """The deployment (the group's latest unless an id is given) and each core device's status in it."""
    region = session.region_name
    gg = session.client("greengrassv2", region_name=region)
    partition = session.get_partition_for_region(region)
    if deployment_id is None:
        if not thing_group:
            raise ComponentError("give --thing-group or --deployment-id")
        target = thing_group_arn(partition, region, account_of(session), thing_group)
        found = gg.list_deployments(targetArn=target, historyFilter="LATEST_ONLY").get("deployments", [])
        if not found:
            raise ComponentError(f"no deployment for thing group {thing_group}")
        deployment_id = found[0]["deploymentId"]
    deployment = gg.get_deployment(deploymentId=deployment_id)
    devices = []
    target = deployment["targetArn"]
    if ":thinggroup/" in target:
        names = [d["coreDeviceThingName"]
                 for page in gg.get_paginator("list_core_devices").paginate(thingGroupArn=target)
                 for d in page.get("coreDevices", [])]
    else:
        names = [target.rsplit("/", 1)[-1]]
    for name in names:
        row = {"device": name, "status": "NOT_STARTED", "reason": ""}
        for page in gg.get_paginator("list_effective_deployments").paginate(coreDeviceThingName=name):
            for d in page.get("effectiveDeployments", []):
                if d.get("deploymentId") == deployment_id:
                    details = d.get("statusDetails") or {}
                    reason = d.get("reason") or "; ".join(details.get("errorStack") or [])
                    row = {"device": name, "status": d.get("coreDeviceExecutionStatus", ""), "reason": reason or ""}
        devices.append(row)
    return {"deploymentId": deployment_id, "name": deployment.get("deploymentName"),
            "status": deployment.get("deploymentStatus"), "components": deployment.get("components", {}),
            "devices": devices}


def format_status(status: dict) -> str:
    lines = [f"deployment {status['deploymentId']} ({status.get('name')}): {status.get('status')}"]
    for name, spec in sorted(status.get("components", {}).items()):
        lines.append(f"  {name} {spec.get('componentVersion')}")
    counts: dict[str, int] = {}
    for d in status["devices"]:
        counts[d["status"]] = counts.get(d["status"], 0) + 1
    lines.append("devices: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none in the group"))
    width = max([len(d["device"]) for d in status["devices"]] + [6])
    for d in sorted(status["devices"], key=lambda d: (d["status"] == "SUCCEEDED", d["device"])):
        lines.append(f"  {d['device']:<{width}}  {d['status']:<12} {d['reason']}".rstrip())
    return "\n".join(lines)
