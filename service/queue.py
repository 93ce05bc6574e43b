"""Retrain jobs on a Redis queue (`REFIT_QUEUE=redis://host:6379/0`): any replica admits, any `refit worker`
trains, and every replica reads the same job state, because all of it lives in the shared store.

    jobs/<id>/job.json       the job record (queued -> running with progress and a heartbeat -> succeeded/failed)
    jobs/<id>/dataset.zip    the admitted dataset, as the worker downloads it (none when the job names a
                             snapshot of a dataset in the store: the worker reads that from the store)
    jobs/line.json           which job holds the model line: one retrain at a time, whatever the number of
                             workers, taken with a conditional write (S3 If-None-Match / If-Match)

The queue engine is RQ: Redis is the only server it needs, a job is a plain function call, and each job runs
in a work horse forked from a worker that has already imported torch (the warm start the local standby
process gives). Redis only carries "run job <id>"; the store holds the truth, so a replica never needs
Redis to answer /jobs and a flushed Redis loses no history.

A worker that dies mid-job stops its heartbeat; whoever reads the job after REFIT_JOB_TTL_SECONDS records
it as failed (it is not retried: a crash that killed one worker, memory say, would kill the next), which
also frees the line. Its work horse dies with it, so it publishes nothing, and a publish cut short is never
visible (core/store.py).
"""
from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from service import settings
from service.jobs import ACTIVE, _JOB_ID, AdmissionError, Jobs, public
from service.outcome import published_outcome
from service.replicas import age
from core.store import Store, StoreError, now_iso

log = logging.getLogger("refit.queue")

QUEUE_NAME = "refit"
LINE = "jobs/line.json"
JOB_FUNCTION = "service.worker.run_queued"  # by name: a replica never imports the training code


def record_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def dataset_key(job_id: str) -> str:
    return f"jobs/{job_id}/dataset.zip"


def redis_connection(url: str):
    from redis import Redis

    # Timeouts: a replica whose Redis is away answers 503 within seconds instead of hanging a request.
    return Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


class SharedJobs:
    """The job interface admission and the routes use (as `service.jobs.Jobs`), over the shared store."""

    def __init__(self, store: Store, queue_url: str):
        self.store = store
        self.queue_url = queue_url
        self.local = Jobs(store.home)  # this machine's folder for uploads being received
        self.root = self.local.root
        self._rq = None

    @property
    def rq_queue(self):
        if self._rq is None:
            from rq import Queue

            self._rq = Queue(QUEUE_NAME, connection=redis_connection(self.queue_url))
        return self._rq

    # -- state ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise KeyError(job_id)
        job, tag = self.store.record(record_key(job_id))
        if job is None:
            raise KeyError(job_id)
        return self._settle(job, tag)

    def update(self, job_id: str, **changes) -> dict:
        job, _ = self.store.record(record_key(job_id))
        job = {**(job or {}), **changes, "updated": now_iso()}
        self.store.put_record(record_key(job_id), job)
        return job

    def list(self, limit: int = 50) -> list[dict]:
        jobs = [j for k, j in self.store.records("jobs/").items() if k.endswith("/job.json") and isinstance(j, dict)]
        jobs.sort(key=lambda j: j.get("created", ""), reverse=True)
        out = []
        for job in jobs[:limit]:
            try:
                out.append(self.get(job["id"]) if job.get("status") in ACTIVE else job)
            except KeyError:
                continue
        return out

    def active(self) -> dict | None:
        line, _ = self.store.record(LINE)
        holder = self._holder(line)
        return holder if holder and holder.get("status") in ACTIVE else None

    def busy(self) -> bool:
        return self.active() is not None

    def _holder(self, line: dict | None) -> dict | None:
        try:
            return self.get(line["job"]) if line and line.get("job") else None
        except KeyError:
            return None

    def _settle(self, job: dict, tag: str | None) -> dict:
        """A job whose worker is gone is recorded as failed by the first reader that notices."""
        why, end = None, None
        if job.get("status") == "running" and age(job.get("heartbeat") or job.get("started")) > settings.JOB_TTL:
            end = self._published(job)  # it may have published before it stopped
            why = (f"the worker running this job stopped (no heartbeat for over {settings.JOB_TTL:g} s); no "
                   "version was published by it; submit again")
        elif job.get("status") == "queued":
            why = self._lost_in_queue(job["id"], long=age(job.get("created")) > settings.JOB_TTL)
        if why is None:
            return job
        end = end or {"status": "failed", "error": {"status": 500, "message": why}}
        settled = {**job, **end, "finished": now_iso(), "updated": now_iso()}
        if self.store.put_record(record_key(job["id"]), settled, if_tag=tag):
            log.warning("retrain job %s: %s", job["id"], (end.get("error") or {}).get("message") or
                        f"its worker stopped after publishing {end['result']['version']}")
            return settled
        return self.get(job["id"])  # its worker (or another reader) wrote first: read what it wrote

    def _published(self, job: dict) -> dict | None:
        try:
            return published_outcome(self.store, job)
        except StoreError:
            raise  # the store away: settled once it is back, not recorded as publishing nothing
        except Exception as e:  # noqa: BLE001 - a damaged version must not turn every job read into a 500
            log.warning("retrain job %s: its versions cannot be looked up (%s)", job["id"], e)
            return None

    def _lost_in_queue(self, job_id: str, *, long: bool) -> str | None:
        """Why a queued job will never run (a worker failed it before it started, RQ gave up on it, or, once
        it has been queued for over JOB_TTL, Redis lost it), else None."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            rq_job = Job.fetch(job_id, connection=self.rq_queue.connection)
            status = rq_job.get_status(refresh=True)
        except NoSuchJobError:
            # Not yet there (admitted, still being enqueued) or lost: only a job queued for long is lost.
            return "the job queue has no record of this job (was Redis emptied?); submit again" if long else None
        except Exception as e:  # noqa: BLE001 - Redis away: it may still run; say nothing yet
            if long:
                log.warning("job %s: the queue cannot be asked (%s)", job_id, e)
            return None
        if status in ("failed", "stopped", "canceled"):
            return f"the job queue reports this job {getattr(status, 'value', status)} before it started" \
                   f"{_why_failed(rq_job)}; submit again"
        return None

    # -- admission (the calls service/admission.py makes) ----------------------------------------
    def incoming_dir(self) -> Path:
        return self.local.incoming_dir()

    def admit(self, *, request: dict, source: dict, actor: str) -> dict:
        """Record a queued job and take the model line for it, or refuse with 409 while another job holds it."""
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        job = {"id": job_id, "status": "queued", "created": now_iso(), "updated": now_iso(), "actor": actor,
               "source": source, "request": request, "task_id": job_id, "result": None, "error": None}
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
            raise AdmissionError(409, "busy: a retrain is already running; submit again when it has finished",
                                 job=public(holder) if holder else None)
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
            self.update(job_id, status="failed", finished=now_iso(), error={"status": 503, "message": message})
        finally:
            self.store.delete_file(dataset_key(job_id))


class QueueRunner:
    """`service.runner.JobRunner` over RQ: submit enqueues the job for any `refit worker`."""

    def __init__(self, jobs: SharedJobs):
        self.jobs = jobs

    def submit(self, job_id: str) -> None:
        try:
            self.jobs.rq_queue.enqueue(JOB_FUNCTION, job_id, job_id=job_id, job_timeout=settings.JOB_TIMEOUT,
                                       result_ttl=3600, failure_ttl=7 * 86400, description=f"retrain {job_id}")
        except Exception as e:  # noqa: BLE001 - Redis refused or is away: the client is told, the line freed
            log.exception("retrain job %s could not be queued", job_id)
            self.jobs.abandon(job_id, f"the job queue could not take this job ({type(e).__name__}); try again")
            raise AdmissionError(503, f"the job queue ({_shown(self.jobs.queue_url)}) cannot be reached; "
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
        self.jobs.update(job_id, status="failed", finished=now_iso(),
                         error={"status": 499, "message": "the request running this job was cancelled"})

    def get(self, job_id: str) -> dict:
        return self.jobs.get(job_id)

    async def drain(self) -> None:
        """Jobs run on workers; a replica stopping leaves them running."""


def _why_failed(rq_job) -> str:
    """', on worker W: <the exception's last line>' from RQ's record of the failure, or ''."""
    try:
        result = rq_job.latest_result()
    except Exception:  # noqa: BLE001 - an older record, or Redis away: the status alone is what we know
        return ""
    if result is None:
        return ""
    lines = [ln.strip() for ln in (result.exc_string or "").strip().splitlines() if ln.strip()]
    cause = lines[-1] if lines else ""
    # "service.worker.NotStarted: worker W ..." reads better without the exception's class path.
    cause = re.sub(r"^[A-Za-z_][\w.]*\.\w+: ", "", cause)
    name = getattr(result, "worker_name", "")  # not every RQ release's Result has it
    where = f", on worker {name}" if name else ""
    return f"{where}: {cause[:500]}" if cause else where


def _shown(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}{u.path}"

