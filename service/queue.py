"""The replica's side of the Redis queue (`REFIT_QUEUE`; the records and their keys: core/queue.py): admit a
job into the shared store, take the model line for it, and enqueue "run job <id>" for any `refit worker`.
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import zipfile
from pathlib import Path

from core.jobs import ACTIVE, failed, new_id, new_record, public
from core.queue import JOB_FUNCTION, LINE, SharedRecords, dataset_key, record_key, shown
from core.settings import settings
from core.store import Store, now_iso
from service.errors import ApiError
from service.jobs import BUSY, Jobs

log = logging.getLogger("refit.queue")


class SharedJobs(SharedRecords):
    """The job store admission and the routes use (`core.jobs.JobStore`, as `service.jobs.Jobs`), over the
    shared store."""

    def __init__(self, store: Store, queue_url: str):
        super().__init__(store, queue_url)
        self.local = Jobs(store.home, store.project)  # this machine's folder for uploads being received
        self.root = self.local.root

    def incoming_dir(self) -> Path:
        return self.local.incoming_dir()

    def admit(self, *, request: dict, source: dict, actor: str) -> dict:
        """Record a queued job and take the model line for it, or refuse with 409 while another job holds it."""
        job_id = new_id()
        job = new_record(job_id, request=request, source=source, actor=actor, stamped=True,
                         project=self.store.project)
        # The record first: a line naming a job nobody can read would look free to the next admitter.
        self.store.put_record(record_key(job_id), job, create_only=True)
        line, tag = self.store.record(LINE)
        holder = self._holder(line)
        taken = holder is None or holder.get("status") not in ACTIVE
        if taken:
            taken = self.store.put_record(LINE, {"job": job_id, "taken": now_iso()}, if_tag=tag,
                                          create_only=tag is None)
        if not taken:
            self.store.delete_record(record_key(job_id))
            holder = self.active()
            raise ApiError(409, BUSY, job=public(holder) if holder else None)
        return job

    def attach(self, job_id: str, *, upload: Path | None, extracted: Path | None, data: Path | None) -> dict:
        """Put the dataset where every worker can read it: the uploaded zip as it came, or a folder named by
        data_path packed into one (stored, not compressed: photos do not shrink). A job that names a dataset
        snapshot has nothing to attach: the worker materializes the snapshot from the store."""
        if upload is None and data is None:
            return self.update(job_id, dataset=None)
        if upload is None and data is not None and data.is_dir():
            with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                packed = Path(tmp) / "dataset.zip"
                with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as z:
                    for p in sorted(data.rglob("*")):
                        if p.is_file():
                            z.write(p, p.relative_to(data).as_posix())
                self.store.put_file(dataset_key(job_id), packed)
        else:
            self.store.put_file(dataset_key(job_id), upload or data)
        return self.update(job_id, dataset=dataset_key(job_id))

    def abandon(self, job_id: str, message: str) -> None:
        try:
            self.update(job_id, **failed(503, message, finished=now_iso()))
        finally:
            self.store.delete_file(dataset_key(job_id))


class QueueRunner:
    """`service.runner.JobRunner` over RQ: submit enqueues the job for any `refit worker`."""

    def __init__(self, jobs: SharedJobs):
        self.jobs = jobs

    def submit(self, job_id: str) -> None:
        try:
            # The project rides along: any worker takes any project's job and finds its records by it.
            self.jobs.rq_queue.enqueue(JOB_FUNCTION, job_id, self.jobs.store.project, job_id=job_id,
                                       job_timeout=settings().job_timeout_seconds, result_ttl=3600,
                                       failure_ttl=7 * 86400, description=f"retrain {job_id}")
        except Exception as e:  # broad on purpose: Redis refused or is away: the client is told, the line freed
            log.exception("retrain job %s could not be queued", job_id)
            self.jobs.abandon(job_id, f"the job queue could not take this job ({type(e).__name__}); try again")
            raise ApiError(503, f"the job queue ({shown(self.jobs.queue_url)}) cannot be reached; "
                                "try again later") from None

    async def run(self, job_id: str) -> dict:
        """Queue the job and wait for its end; cancelling this stops the job on whichever worker has it."""
        self.submit(job_id)
        try:
            while True:
                job = await asyncio.to_thread(self.jobs.get, job_id)
                if job["status"] not in ACTIVE:
                    return job
                await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self._stop, job_id))
            raise

    def _stop(self, job_id: str) -> None:
        from rq.command import send_stop_job_command
        from rq.job import Job

        try:
            Job.fetch(job_id, connection=self.jobs.rq_queue.connection).cancel()  # still queued
        except Exception:  # noqa: BLE001 - already started: stop it where it runs
            pass
        try:
            send_stop_job_command(self.jobs.rq_queue.connection, job_id)
        except Exception:  # noqa: BLE001 - not running anywhere (any more)
            pass
        self.jobs.update(job_id, **failed(499, "the request running this job was cancelled", finished=now_iso()))

    def get(self, job_id: str) -> dict:
        return self.jobs.get(job_id)

    async def drain(self) -> None:
        """Jobs run on workers; a replica stopping leaves them running."""
