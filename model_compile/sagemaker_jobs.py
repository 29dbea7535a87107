"""Following a SageMaker job to its end: one loop for processing and compilation jobs.

A job is polled until it ends. A failure or stop raises with SageMaker's ``FailureReason`` (and the
container's exit message where there is one). A timeout, or Ctrl-C, stops the job first, so no
instance goes on billing for a result nobody waits for. ``model_compile`` holds it because both the
cloud side (the fleet review's processing job) and Neo compilation here follow jobs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

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
