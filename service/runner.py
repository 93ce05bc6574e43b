"""How admitted retrain jobs run, behind the three calls the retrain routes make: `submit` (start it, answer at
once), `run` (start it and wait for its end) and `get` (its record). The task id a client gets is the job id,
so a task is answered from the job record, before or after a restart.

`LocalRunner` runs each job on this machine, one at a time, in a training process of its own
(`Jobs.run`), as an asyncio task of the front worker. A runner backed by a job queue, with workers on other
machines, fits the same calls.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from core.jobs import Status, failed
from core.store import now_iso
from service.jobs import Jobs

log = logging.getLogger("refit.runner")

# The words of GET /retrain/status, those BentoML's task endpoints used, for the job's states.
TASK_STATUS = {Status.QUEUED: "in_progress", Status.RUNNING: "in_progress", Status.SUCCEEDED: "completed",
               Status.FAILED: "failed"}


class JobRunner(Protocol):
    def submit(self, job_id: str) -> None: ...

    async def run(self, job_id: str) -> dict: ...

    def get(self, job_id: str) -> dict: ...


class LocalRunner:
    def __init__(self, jobs: Jobs, *, train_threads: int, on_finish: Callable[[dict], None] | None = None):
        self.jobs = jobs
        self.train_threads = train_threads
        self.on_finish = on_finish  # called with the finished job (metrics)
        self._tasks: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks

    def submit(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self.run(job_id), name=f"retrain {job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, job_id: str) -> dict:
        """Until the job ends; cancelling this kills its training process and records the job as failed."""
        try:
            job = await self.jobs.run(job_id, train_threads=self.train_threads)
        except Exception as e:  # broad on purpose: the job must end in a state a client can read
            log.exception("retrain job %s could not run", job_id)
            job = self.jobs.update(job_id, **failed(500, f"the job could not run ({type(e).__name__}); the cause is "
                                                         "in the server log", finished=now_iso()))
        finally:
            self.jobs.release(job_id)
        if self.on_finish:
            self.on_finish(job)
        return job

    def get(self, job_id: str) -> dict:
        """The job record; KeyError for an id that names no job."""
        return self.jobs.get(job_id)

    async def drain(self) -> None:
        """Wait for the jobs running now (at shutdown: the worker's time limit still applies)."""
        if self._tasks:
            log.info("waiting for %d retrain job(s) to finish before stopping", len(self._tasks))
            await asyncio.wait(set(self._tasks))


def task_status(job: dict) -> dict:
    """The reply of GET /retrain/status; while the job runs, with its `progress` (as GET /jobs/{id} has it)."""
    reply = {"task_id": job["id"], "status": TASK_STATUS.get(job["status"], job["status"]),
             "created_at": job.get("created"), "executed_at": job.get("started"), "job_id": job["id"]}
    if job["status"] == Status.RUNNING and job.get("progress"):
        reply["progress"] = job["progress"]
    return reply


def task_result(job: dict) -> tuple[int, dict]:
    """The status code and reply of GET /retrain/get (and of the synchronous POST /retrain)."""
    if job["status"] == Status.SUCCEEDED:
        return 200, {"job_id": job["id"], **(job.get("result") or {})}
    if job["status"] == Status.FAILED:
        err = job.get("error") or {}
        return int(err.get("status") or 500), {"error": err.get("message") or "training failed", "job_id": job["id"]}
    return 400, {"error": f"task {job['id']} is not completed yet", "job_id": job["id"]}
