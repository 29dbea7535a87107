"""The model registry on SageMaker Model Registry: versions and their approval in SageMaker, files in S3.

Each model is a model package group (``<prefix><model>``, the name's other characters made
hyphens; created when its first version is registered); each version is a model package in it.
The files go to an S3 store in the local registry's layout (``models/model=<m>/version=<v>/``,
``baselines/...``), where devices' model components are built from and the fleet review reads
the baseline; SageMaker holds the record and the decision:

* ``ModelPackageDescription``: ``edgeloop bundle <model> <semver> (files sha256:<digest>)``. It
  cannot be changed after creation and comes back in ``ListModelPackages``, so it is what maps
  SageMaker's package version numbers back to semver (no describe per version) and what tells a
  second registration of a semver whether its files are the same.
* ``ModelApprovalStatus`` (``PendingManualApproval``, or ``Approved`` when registered with
  approval) and, on approval or rejection, ``ApprovalDescription``.
* ``ModelMetrics.ModelQuality.Statistics``: the version's ``metrics.json`` in the store (outlier
  threshold and target false-positive rate, variants' parity, training's and the caller's
  metrics), with its sha256 as ``ContentDigest``. It is edgeloop's own JSON document, not Model
  Monitor's model-quality schema: Studio links it but does not chart it.
* ``CustomerMetadataProperties``: ``edgeloop:model``, ``edgeloop:version``, ``edgeloop:bundle``
  (the version's folder), ``edgeloop:manifest``, ``edgeloop:baseline`` (S3 URIs) and
  ``edgeloop:files-sha256``.
* No ``InferenceSpecification``: it names an ECR image that SageMaker hosting would run the model
  in, and an edge bundle has none (the Greengrass runtime on each device runs it). A stand-in image
  would make the package look deployable to an endpoint when it is not; the API leaves the field
  optional for versioned packages, so it is left out.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.bundle import load_bundle
from edge_runtime.contracts import baseline_key, model_key
from edge_runtime.store import ObjectStore

from .registry import (
    METRICS_FILE,
    PENDING,
    RegisteredVersion,
    RegistryError,
    check_status,
    download_bundle,
    files_digest,
    semver_order,
    store_location,
    upload_bundle,
)

log = logging.getLogger(__name__)

GROUP_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's EntityName
GROUP_DESCRIPTION = re.compile(r"^edgeloop model (?P<model>\S+):")
PACKAGE_DESCRIPTION = re.compile(
    r"^edgeloop bundle (?P<model>\S+) (?P<version>\S+) \(files sha256:(?P<digest>[0-9a-f]{64})\)")
METADATA_VALUE = re.compile(r"^[\w .:/=+\-@]{1,256}$")  # CustomerMetadataValue, in Python's terms
META = "edgeloop:"


@dataclass
class _Package:
    """One model package as ListModelPackages gives it, with what its description says."""

    arn: str
    number: int | None
    model: str
    version: str
    digest: str
    approval: str


class SageMakerRegistry:
    """``client``: a boto3 SageMaker client; ``store``: the S3 store for the files (needed to
    register and to fetch a bundle; listing and deciding need only SageMaker). ``group_prefix``
    namespaces the groups (one account, several fleets)."""

    def __init__(self, client, store: ObjectStore | None = None, *, group_prefix: str = "",
                 page_size: int = 100) -> None:
        if store is not None and not getattr(store, "bucket", None):
            raise RegistryError(f"SageMaker Model Registry records S3 locations: the files' store must be "
                                f"s3://bucket/prefix, not {store.url}")
        if group_prefix and not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9-]*", group_prefix):
            raise RegistryError(f"group prefix {group_prefix!r}: letters, digits and hyphens, a letter or digit first")
        if not 1 <= page_size <= 100:
            raise ValueError("page_size: 1 to 100 (ListModelPackages' MaxResults)")
        self.sm, self.store, self.group_prefix, self.page_size = client, store, group_prefix, page_size
        self.spec = "sagemaker" + (f":{group_prefix}" if group_prefix else "")

    def group_name(self, model: str) -> str:
        group = self.group_prefix + re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-")
        if len(group) > 63 or not GROUP_NAME.match(group):
            raise RegistryError(f"model {model}: {group!r} is not a model package group name (letters, digits and "
                                "single hyphens, 63 characters at most)")
        return group

    # --- the Registry interface

    def register(self, bundle_dir: str | Path, metrics: dict | None = None, *, status: str = PENDING,
                 note: str = "registered") -> RegisteredVersion:
        check_status(status)
        store = self._need_store("register a version")
        bundle = load_bundle(bundle_dir)  # checksums verified before anything is uploaded
        m = bundle.manifest
        digest = files_digest(m.files)
        group = self._ensure_group(m.name)
        same = self._packages(m.name, m.version)
        if same:
            other = [p for p in same if p.digest != digest]
            if other:
                raise RegistryError(f"{m.name} {m.version} is already registered ({other[0].arn}) with other files; "
                                    "bump the version")
            return self._listed(same[0])  # the same files again: the version and its decision stay
        manifest_key, _ = upload_bundle(bundle, store, metrics)  # refuses other files under this version
        metrics_key = model_key(m.name, m.version, METRICS_FILE)
        where = {
            "bundle": store_location(store, model_key(m.name, m.version, "")),
            "manifest": store_location(store, manifest_key),
            "baseline": store_location(store, baseline_key(m.name, m.version)),
            "metrics": store_location(store, metrics_key),
        }
        metadata = {f"{META}model": m.name, f"{META}version": m.version, f"{META}bundle": where["bundle"],
                    f"{META}manifest": where["manifest"], f"{META}baseline": where["baseline"],
                    f"{META}files-sha256": digest}
        for key, value in metadata.items():
            if not METADATA_VALUE.match(value):
                raise RegistryError(f"{key} {value!r}: SageMaker takes at most 256 letters, digits, spaces and "
                                    "_.:/=+-@ in a metadata value; choose a store prefix without other characters")
        created = self.sm.create_model_package(
            ModelPackageGroupName=group,
            ModelPackageDescription=f"edgeloop bundle {m.name} {m.version} (files sha256:{digest})",
            ModelApprovalStatus=status,
            ModelMetrics={"ModelQuality": {"Statistics": {
                "ContentType": "application/json",
                "ContentDigest": "sha256:" + hashlib.sha256(store.get(metrics_key)).hexdigest(),
                "S3Uri": where["metrics"]}}},
            CustomerMetadataProperties=metadata,
            # the same registration sent twice (a retry, a race) makes one package on SageMaker's side
            ClientToken=str(uuid.uuid5(uuid.NAMESPACE_URL, f"edgeloop:{group}:{m.version}:{digest}:{status}")),
        )
        arn = created["ModelPackageArn"]
        if status != PENDING and note:
            self.sm.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=status, ApprovalDescription=note)
        return RegisteredVersion(m.name, m.version, status, note if status != PENDING else "", ref=arn,
                                 number=_number(arn), bundle=where["bundle"], baseline=where["baseline"],
                                 metrics=where["metrics"])

    def versions(self, name: str | None = None) -> list[RegisteredVersion]:
        groups = [self.group_name(name)] if name is not None else self._groups()
        found = [self._listed(p) for group in groups for p in self._list(group) if name is None or p.model == name]
        return sorted(found, key=lambda v: (v.model, semver_order(v.version), v.number or 0))

    def approval(self, name: str, version: str) -> str | None:
        same = self._packages(name, version)
        return same[0].approval if same else None

    def set_approval(self, name: str, version: str, status: str, note: str = "") -> None:
        check_status(status)
        same = self._packages(name, version)
        if not same:
            raise self._not_registered(name, version)
        for p in same:  # one, unless two registrations of the same files raced past SageMaker's idempotency
            self.sm.update_model_package(ModelPackageArn=p.arn, ModelApprovalStatus=status, ApprovalDescription=note)

    def fetch_bundle(self, name: str, version: str, dest: str | Path) -> Path:
        store = self._need_store("fetch a bundle")
        registered = self._one(name, version)
        recorded = self._describe(registered).bundle
        if recorded and recorded != store_location(store, model_key(name, version, "")):
            raise RegistryError(f"{name} {version}'s files were registered at {recorded}, not in {store.url}: "
                                "give that store")
        path = download_bundle(store, name, version, dest)
        digest = files_digest(load_bundle(path).manifest.files)
        if digest != registered.digest:
            raise RegistryError(f"{name} {version} in {store.url} is not the bundle registered in SageMaker "
                                f"(files sha256 {digest[:12]}, registered {registered.digest[:12]})")
        return path

    # --- beyond the interface

    def describe(self, name: str, version: str) -> RegisteredVersion:
        """One version in full: its approval description and where its files and metrics are."""
        return self._describe(self._one(name, version))

    # --- SageMaker

    def _need_store(self, what: str) -> ObjectStore:
        if self.store is None:
            raise RegistryError(f"to {what}, SageMaker Model Registry needs the S3 store for the files (--store s3://...)")
        return self.store

    def _one(self, name: str, version: str) -> _Package:
        same = self._packages(name, version)
        if not same:
            raise self._not_registered(name, version)
        return same[0]

    def _not_registered(self, name: str, version: str) -> RegistryError:
        return RegistryError(f"{name} {version} is not registered in SageMaker Model Registry "
                             f"(group {self.group_name(name)})")

    def _describe(self, p: _Package) -> RegisteredVersion:
        d = self.sm.describe_model_package(ModelPackageName=p.arn)
        meta = d.get("CustomerMetadataProperties") or {}
        stats = (d.get("ModelMetrics") or {}).get("ModelQuality", {}).get("Statistics", {})
        at = d.get("LastModifiedTime") or d.get("CreationTime")
        return RegisteredVersion(p.model, p.version, d.get("ModelApprovalStatus") or PENDING,
                                 d.get("ApprovalDescription", ""), at.isoformat() if at else "", ref=p.arn,
                                 number=d.get("ModelPackageVersion"), bundle=meta.get(f"{META}bundle", ""),
                                 baseline=meta.get(f"{META}baseline", ""), metrics=stats.get("S3Uri", ""))

    def _ensure_group(self, model: str) -> str:
        from botocore.exceptions import ClientError

        group = self.group_name(model)
        try:
            found = self.sm.describe_model_package_group(ModelPackageGroupName=group)
        except ClientError as err:
            if not _missing(err):
                raise
            try:
                self.sm.create_model_package_group(
                    ModelPackageGroupName=group,
                    ModelPackageGroupDescription=f"edgeloop model {model}: the versions of its edge bundle, "
                                                 "registered by edgeloop")
                return group
            except ClientError as refused:
                try:  # another registration created it meanwhile
                    found = self.sm.describe_model_package_group(ModelPackageGroupName=group)
                except ClientError:
                    raise refused from None
        owner = GROUP_DESCRIPTION.match(found.get("ModelPackageGroupDescription") or "")
        if owner and owner["model"] != model:
            raise RegistryError(f"model package group {group} holds model {owner['model']}, not {model}: their names "
                                "differ only in characters a group name cannot have; rename one")
        return group

    def _groups(self) -> list[str]:
        paginator = self.sm.get_paginator("list_model_package_groups")
        query = {"NameContains": self.group_prefix} if self.group_prefix else {}
        return [g["ModelPackageGroupName"]
                for page in paginator.paginate(**query, PaginationConfig={"PageSize": self.page_size})
                for g in page.get("ModelPackageGroupSummaryList", [])
                if g["ModelPackageGroupName"].startswith(self.group_prefix)]

    def _list(self, group: str) -> Iterator[_Package]:
        """The group's packages that edgeloop registered, oldest first, every page."""
        from botocore.exceptions import ClientError

        paginator = self.sm.get_paginator("list_model_packages")
        pages = paginator.paginate(ModelPackageGroupName=group, SortBy="CreationTime", SortOrder="Ascending",
                                   PaginationConfig={"PageSize": self.page_size})
        foreign = 0
        try:
            summaries = [s for page in pages for s in page.get("ModelPackageSummaryList", [])]
        except ClientError as err:
            if _missing(err):  # no group yet: nothing registered
                return
            raise
        for s in summaries:
            said = PACKAGE_DESCRIPTION.match(s.get("ModelPackageDescription") or "")
            if s.get("ModelPackageStatus") == "Deleting":
                continue
            if not said:
                foreign += 1
                continue
            yield _Package(s["ModelPackageArn"], s.get("ModelPackageVersion"), said["model"], said["version"],
                           said["digest"], s.get("ModelApprovalStatus") or PENDING)
        if foreign:
            log.info("model package group %s: %d packages not registered by edgeloop left out", group, foreign)

    def _packages(self, name: str, version: str) -> list[_Package]:
        same = [p for p in self._list(self.group_name(name)) if p.model == name and p.version == version]
        return sorted(same, key=lambda p: p.number or 0)

    def _listed(self, p: _Package) -> RegisteredVersion:
        return RegisteredVersion(p.model, p.version, p.approval, ref=p.arn, number=p.number)


def _missing(err) -> bool:
    e = err.response.get("Error", {})
    return e.get("Code") in ("ResourceNotFound", "ResourceNotFoundException") or (
        e.get("Code") == "ValidationException" and "does not exist" in str(e.get("Message", "")))


def _number(arn: str) -> int | None:
    last = arn.rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else None

