"""What a Greengrass core device does with a deployment, for tests: no nucleus, same steps.

``CoreDevice`` takes the recipes that were sent to ``CreateComponentVersion`` and the request
that was sent to ``CreateDeployment``, and for each component, as the nucleus does:

* picks the manifest for this platform (``linux``, ``amd64``/``aarch64``);
* downloads each artifact from its S3 URI into ``packages/artifacts/<name>/<version>/``, unzips
  every ZIP into ``packages/artifacts-unarchived/<name>/<version>/<zip name>/``, and makes them
  read-only: owned by root, readable by the component's group only with ``Permission: Read:
  OWNER``, by every user with ``ALL`` (a component that only ships data, such as a model, is
  given root's group here, so another component can read it only with ``ALL``);
* builds the configuration: ``DefaultConfiguration`` merged with the deployment's
  ``configurationUpdate.merge``, system variables interpolated in it
  (``interpolateComponentConfiguration``);
* interpolates lifecycle scripts: ``{artifacts:path}``, ``{artifacts:decompressedPath}``,
  ``{work:path}``, ``{kernel:rootPath}``, ``{iot:thingName}``, ``{configuration:/json/pointer}``,
  and ``{<dependency>:artifacts:...}`` / ``{<dependency>:configuration:...}``;
* runs Install, then Run, with ``sh -c`` in the work folder as an unprivileged user, with
  ``Setenv`` and the variables the nucleus sets (IPC socket and token, thing name, region, and
  the token exchange service's URI and token when the recipe depends on it). Install can be
  run with no network at all (a fresh network namespace).
"""

from __future__ import annotations

import grp
import json
import os
import platform
import pwd
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ARCH = {"x86_64": "amd64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())
TES = "aws.greengrass.TokenExchangeService"
_CROSS = re.compile(r"\{([.\w-]+):([.\w-]+):([^:}]*)\}")
_SAME = re.compile(r"\{([.\w-]+):([^:}]*)\}")


def can_unshare_net() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--net", "true"], capture_output=True).returncode == 0


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def json_pointer(doc: object, pointer: str) -> object:
    if pointer in ("", "/"):
        return doc
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


@dataclass
class Component:
    name: str
    version: str
    recipe: dict
    manifest: dict
    configuration: dict = field(default_factory=dict)

    @property
    def dependencies(self) -> dict:
        return self.recipe.get("ComponentDependencies") or {}

    def lifecycle(self) -> dict:
        return self.manifest.get("Lifecycle") or {}


class CoreDevice:
    def __init__(self, root: Path, thing_name: str, s3, user: str = "nobody", region: str = "us-east-1") -> None:
        self.root, self.thing_name, self.s3, self.region = Path(root), thing_name, s3, region
        self.user = pwd.getpwnam(user)
        self.group = grp.getgrgid(self.user.pw_gid)
        self.components: dict[str, Component] = {}
        self.env: dict[str, str] = {}  # what the nucleus adds (IPC socket, token exchange service)
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.root.parent):
            os.chmod(folder, 0o755)

    # paths
    def artifacts(self, c: Component) -> Path:
        return self.root / "packages" / "artifacts" / c.name / c.version

    def decompressed(self, c: Component) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / c.name / c.version

    def work(self, c: Component) -> Path:
        return self.root / "work" / c.name

    # deployment
    def deploy(self, recipes: dict[tuple[str, str], str], deployment: dict) -> None:
        """Apply a CreateDeployment request, with the recipes of the versions it names."""
        for name, spec in deployment["components"].items():
            version = spec["componentVersion"]
            recipe = yaml.safe_load(recipes[(name, version)])
            manifest = self._manifest(recipe)
            previous = self.components.get(name)
            default = (recipe.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {}
            config = previous.configuration if previous else json.loads(json.dumps(default))
            update = spec.get("configurationUpdate") or {}
            if update.get("merge"):
                config = merge(config, json.loads(update["merge"]))
            c = Component(name, version, recipe, manifest, self._interpolate_config(config))
            self._fetch(c)
            self.components[name] = c

    def _manifest(self, recipe: dict) -> dict:
        for m in recipe.get("Manifests") or []:
            p = m.get("Platform") or {}
            if p.get("os", "linux") in ("linux", "*", "all") and p.get("architecture", ARCH) in (ARCH, "*"):
                return m
        raise LookupError(f"{recipe['ComponentName']}: no manifest for linux/{ARCH}")

    def _fetch(self, c: Component) -> None:
        for artifact in c.manifest.get("Artifacts") or []:
            uri = artifact["URI"]
            assert uri.startswith("s3://"), uri
            bucket, key = uri[5:].split("/", 1)
            dest = self.artifacts(c) / Path(key).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(bucket, key, str(dest))
            targets = [dest]
            if (artifact.get("Unarchive") or "NONE").upper() == "ZIP":
                out = self.decompressed(c) / dest.name.rsplit(".", 1)[0]
                with zipfile.ZipFile(dest) as zf:
                    zf.extractall(out)
                targets.append(out)
            permission = artifact.get("Permission") or {}
            read = str(permission.get("Read", "OWNER")).upper()
            execute = str(permission.get("Execute", "NONE")).upper()
            group = self.group.gr_gid if c.lifecycle() else 0  # data-only components: root's group
            for target in targets:
                self._protect(target, read, execute, group)

    @staticmethod
    def _protect(path: Path, read: str, execute: str, gid: int) -> None:
        """The nucleus's mapping of Permission to modes (Permission.toFileSystemPermission)."""
        mode = 0o400
        mode |= 0o040 if read in ("OWNER", "ALL") or execute in ("OWNER", "ALL") else 0
        mode |= 0o004 if read == "ALL" or execute == "ALL" else 0
        mode |= 0o100 if execute in ("OWNER", "ALL") else 0
        mode |= 0o010 if execute in ("OWNER", "ALL") else 0
        mode |= 0o001 if execute == "ALL" else 0
        dir_mode = mode | ((mode & 0o444) >> 2)  # a readable folder can be entered
        paths = [path, *path.rglob("*")] if path.is_dir() else [path]
        for p in paths:
            os.chown(p, 0, gid, follow_symlinks=False)
            os.chmod(p, dir_mode if p.is_dir() else mode)
        for parent in (path.parent, path.parent.parent, path.parent.parent.parent):
            os.chmod(parent, 0o755)

    # interpolation
    def _system(self, c: Component, namespace: str, key: str) -> str | None:
        if namespace == "artifacts":
            return {"path": str(self.artifacts(c)), "decompressedPath": str(self.decompressed(c))}.get(key)
        if namespace == "work" and key == "path":
            return str(self.work(c))
        if namespace == "kernel" and key == "rootPath":
            return str(self.root)
        if namespace == "iot" and key == "thingName":
            return self.thing_name
        return None

    def _interpolate_config(self, config: object) -> object:
        """interpolateComponentConfiguration: system variables ({iot:thingName}, ...) in configuration."""
        if isinstance(config, dict):
            return {self._interpolate_config(k): self._interpolate_config(v) for k, v in config.items()}
        if isinstance(config, list):
            return [self._interpolate_config(v) for v in config]
        if isinstance(config, str):
            return _SAME.sub(lambda m: self.thing_name if m.group(0) == "{iot:thingName}" else m.group(0), config)
        return config

    def interpolate(self, c: Component, text: str) -> str:
        def value(component: Component, namespace: str, key: str, whole: str) -> str:
            if namespace == "configuration":
                found = json_pointer(component.configuration, key)
                if found is None:
                    return whole
                return found if isinstance(found, str) else json.dumps(found)
            found = self._system(component, namespace, key)
            return whole if found is None else found

        def cross(m: re.Match) -> str:
            other = self.components.get(m.group(1))
            if other is None or m.group(1) not in c.dependencies:
                return m.group(0)  # the nucleus resolves only a dependency's variables
            return value(other, m.group(2), m.group(3), m.group(0))

        text = _CROSS.sub(cross, text)
        return _SAME.sub(lambda m: value(c, m.group(1), m.group(2), m.group(0)), text)

    # lifecycle
    def environment(self, c: Component) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.work(c)), "LANG": "C.UTF-8",
               "AWS_IOT_THING_NAME": self.thing_name, "AWS_REGION": self.region,
               "AWS_DEFAULT_REGION": self.region}
        env.update({k: v for k, v in self.env.items() if k.startswith(("AWS_GG_", "SVCUID"))})
        if TES in c.dependencies:  # the nucleus's TES is up for components that depend on it
            env.update({k: v for k, v in self.env.items() if k.startswith("AWS_CONTAINER_")})
        for k, v in (c.lifecycle().get("Setenv") or {}).items():
            env[k] = self.interpolate(c, str(v))
        return env

    def script(self, c: Component, step: str) -> str | None:
        entry = c.lifecycle().get(step)
        if entry is None:
            return None
        text = entry if isinstance(entry, str) else entry.get("Script")
        assert not (isinstance(entry, dict) and entry.get("RequiresPrivilege")), f"{c.name} {step} wants root"
        return self.interpolate(c, text)

    def _prepare_work(self, c: Component) -> None:
        work = self.work(c)
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work.parent, 0o755)
        os.chown(work, self.user.pw_uid, self.user.pw_gid)
        os.chmod(work, 0o700)

    def install(self, name: str, network: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
        c = self.components[name]
        self._prepare_work(c)
        cmd = self._as_user(["sh", "-c", self.script(c, "Install") or "true"])
        env = self.environment(c)
        if not network:
            if can_unshare_net():  # a network namespace of its own, made as root before dropping to the user
                cmd = ["unshare", "--net", *cmd]
            else:  # a container that forbids namespaces: every way out points at a closed port
                dead = "http://127.0.0.1:9"
                env.update(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead,
                           PIP_INDEX_URL=dead + "/simple")
        return subprocess.run(cmd, cwd=self.work(c), env=env, capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, stdout=None) -> subprocess.Popen:
        c = self.components[name]
        self._prepare_work(c)
        return subprocess.Popen(self._as_user(["sh", "-c", self.script(c, "Run")]), cwd=self.work(c),
                                env=self.environment(c), stdout=stdout, stderr=subprocess.STDOUT)

    def _as_user(self, cmd: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups",
                "--inh-caps=-all", "--", *cmd]
