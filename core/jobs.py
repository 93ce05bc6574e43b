"""The retrain job record, written once for both runners: its statuses, its id, the record a new job starts as,
the failure shape, what a client sees of it, and `JobStore`, the interface admission and the routes use.

The local runner (`service/jobs.py`: a folder per job under REFIT_HOME/jobs, one training process at a time)
and the queue's (`service/queue.py` over `core/queue.py`: records in the shared store, `refit worker`s on
Redis) both implement `JobStore` and write records of this one shape:

    {"id", "status", "created", ["updated",] "actor", "source", "request", "task_id", "result", "error", ...}

A record is JSON; `Status` members are strings, so a record reads and writes as it always has.
"""
from __future__ import annotations

import enum
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Protocol

from core.store import now_iso

PROGRESS_FILE = "progress.json"  # where a training run keeps where it is, in its job's folder

# A client names jobs (GET /jobs/{id}, task ids): only a name a job could have reaches a file system or store.
JOB_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,99}")
MADE_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")  # the ids new_id() makes


class Status(str, enum.Enum):
    """A job's state: queued -> running -> succeeded or failed."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def __str__(self) -> str:  # in messages and f-strings the word itself, as the record has it
        return self.value


ACTIVE = (Status.QUEUED, Status.RUNNING)  # a job in one of these holds the model line


def new_id() -> str:
    """A job's id: when it was admitted, then 8 random hex digits (20240131-120000-1a2b3c4d)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def new_record(job_id: str, *, request: dict, source: dict, actor: str, stamped: bool = False,
               project: str = "default") -> dict:
    """The record of a job just admitted; `stamped`: with `updated` from the start (the shared store's
    readers age records by it)."""
    created = now_iso()
    return {"id": job_id, "project": project, "status": Status.QUEUED, "created": created,
            **({"updated": created} if stamped else {}),
            "actor": actor, "source": source, "request": request, "task_id": job_id, "result": None, "error": None}


def failed(status: int, message: str, **changes) -> dict:
    """The changes that end a job as failed: `status` is the HTTP code a client hears for it, `message` what it
    reads; `changes` (finished, seconds, progress) go between them, where the records have always had them."""
    return {"status": Status.FAILED, **changes, "error": {"status": status, "message": message}}


def public(job: dict) -> dict:
    """What a client sees of a job (the log stays on the server)."""
    keys = ("id", "project", "task_id", "status", "created", "started", "finished", "seconds", "actor", "source",
            "request", "progress", "worker", "heartbeat", "result", "error")
    return {k: job.get(k) for k in keys if k in job}


def read_json(path: Path) -> dict | None:
    """A JSON file a job's process wrote (result, error, progress), or None when it is missing or cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether a process of this machine has that pid (a job's trainer, an upload's receiver)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore(Protocol):
    """What admission and the routes ask of a runner's job records: `service.jobs.Jobs` (this machine) and
    `service.queue.SharedJobs` (the shared store, for the Redis queue). `get` raises KeyError for an id that
    names no job; `admit` refuses with a 409 ApiError while another job holds the model line."""

    root: Path  # this machine's jobs folder: uploads being received are saved under it

    def get(self, job_id: str) -> dict: ...

    def update(self, job_id: str, **changes) -> dict: ...

    def list(self, limit: int = 50) -> list[dict]: ...

    def active(self) -> dict | None: ...

    def busy(self) -> bool: ...

    def incoming_dir(self) -> Path: ...

    def admit(self, *, request: dict, source: dict, actor: str) -> dict: ...

    def attach(self, job_id: str, *, upload: Path | None, extracted: Path | None, data: Path | None) -> dict: ...

    def abandon(self, job_id: str, message: str) -> None: ...
