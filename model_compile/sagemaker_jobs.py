"""Following a SageMaker job to its end (one loop for processing and compilation jobs), and reading
what a job leaves in S3 (its URI, its output archive, unpacked safely).

A job is polled until it ends. A failure or stop raises with SageMaker's ``FailureReason`` (and the
container's exit message where there is one). A timeout, or Ctrl-C, stops the job first, so no
instance goes on billing for a result nobody waits for. ``model_compile`` holds it because both the
cloud side (the fleet review's processing job) and Neo compilation here follow jobs.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_now = time.monotonic  # module-level, so a test can run the clock without touching the real one
_sleep = time.sleep


@dataclass(frozen=True)
class JobKind:
    """How SageMaker's API names one kind of job."""

    noun: str  # in messages: "processing job"
    describe: str  # the client method: "describe_processing_job"
    stop: str  # "stop_processing_job"
    name_param: str  # "ProcessingJobName"
    status_key: str  # "ProcessingJobStatus"
    done: str  # the status of success
    failed: tuple[str, ...]  # the other end states


PROCESSING = JobKind("processing job", "describe_processing_job", "stop_processing_job", "ProcessingJobName",
                     "ProcessingJobStatus", "Completed", ("Failed", "Stopped"))
COMPILATION = JobKind("Neo compilation job", "describe_compilation_job", "stop_compilation_job",
                      "CompilationJobName", "CompilationJobStatus", "COMPLETED", ("FAILED", "STOPPED"))


def follow(sm, kind: JobKind, job: str, *, poll_s: float, timeout_s: float,
           on_status: Callable[[str, str, float], None] | None = None, changes_only: bool = False,
           error: type[Exception] = RuntimeError, timeout_hint: str = "") -> dict:
    """Poll until ``job`` ends and return its last description. ``on_status(job, status, seconds)``
    at every poll (or, with ``changes_only``, when the status changes)."""
    describe = getattr(sm, kind.describe)
    start, last = _now(), None
    try:
        while True:
            desc = describe(**{kind.name_param: job})
            status = desc[kind.status_key]
            if on_status and not (changes_only and status == last):
                on_status(job, status, _now() - start)
            last = status
            if status == kind.done:
                return desc
            if status in kind.failed:
                why = desc.get("FailureReason") or "no reason given"
                said = f"; the container said: {desc['ExitMessage']}" if desc.get("ExitMessage") else ""
                raise error(f"SageMaker {kind.noun} {job} {status.lower()}: {why}{said}")
            if _now() - start >= timeout_s:
                stop(sm, kind, job)
                raise error(f"SageMaker {kind.noun} {job} still {status} after {timeout_s:g} s: stopped it"
                            + (f" ({timeout_hint})" if timeout_hint else ""))
            _sleep(poll_s)
    except KeyboardInterrupt:
        stop(sm, kind, job)
        raise


def stop(sm, kind: JobKind, job: str) -> None:
    """Ask SageMaker to stop the job; one that ended meanwhile needs nothing."""
    from botocore.exceptions import ClientError

    try:
        getattr(sm, kind.stop)(**{kind.name_param: job})
    except ClientError as err:
        print(f"warning: could not stop {job}: {err}", file=sys.stderr)


# --- a job's output ---------------------------------------------------------------------------------


class ArchiveError(ValueError):
    """A job's output archive that is unreadable, empty, or has an entry that must not be unpacked."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` as (bucket, key); ValueError for anything else."""
    if not uri.startswith("s3://"):
        raise ValueError("expected an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ValueError("expected s3://bucket/key")
    return bucket, key


def unpack_archive(archive: Path, dest: Path, what: str) -> list[str]:
    """Unpack a job's tar archive (a model.tar.gz, Neo's output) into ``dest``: regular files and
    folders only, each inside ``dest``; returns the files' paths relative to it. An entry that is
    absolute, climbs out with ``..``, or is a link or device is refused, as is an archive with no
    file: a job's output is untrusted input. ``what`` names the archive in errors."""
    files = []
    try:
        tar = tarfile.open(archive, mode="r:*")
    except tarfile.TarError as err:
        raise ArchiveError(f"{what} is not a readable tar archive: {err}") from None
    with tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts or "\\" in member.name:
                raise ArchiveError(f"{what} has an entry outside its folder: {member.name!r}")
            parts = tuple(p for p in parts if p != ".")
            if member.isdir():
                if parts:
                    dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise ArchiveError(f"{what} has an entry that is not a regular file: {member.name!r}")
            if not parts:
                raise ArchiveError(f"{what} has an unnamed file entry: {member.name!r}")
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest.resolve()):  # a folder of ours never links out, but check
                raise ArchiveError(f"{what} has an entry outside its folder: {member.name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            target.chmod(0o644 | (member.mode & 0o111))
            files.append(PurePosixPath(*parts).as_posix())
    if not files:
        raise ArchiveError(f"{what} holds no files")
    return sorted(set(files))
