"""Retrain jobs on a Redis queue (`REFIT_QUEUE=redis://host:6379/0`): what the replicas that admit them
(`service/queue.py`) and the `refit worker`s that train them (`training/worker.py`) share. All the job state
lives in the shared store:

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

import logging
import re

from core.clock import age_seconds as age
from core.jobs import ACTIVE, JOB_ID, Status, failed
from core.outcome import published_outcome
from core.settings import settings
from core.store import Store, StoreError, now_iso

log = logging.getLogger("refit.queue")

QUEUE_NAME = "refit"
LINE = "jobs/line.json"
# RQ stores the function a job calls by name, and a replica never imports the training code.
JOB_FUNCTION = "training.worker.run_queued"
# The name jobs were queued under before the function moved: a worker runs those as JOB_FUNCTION.
OLD_JOB_FUNCTION = "service.worker.run_queued"


def record_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def dataset_key(job_id: str) -> str:
    return f"jobs/{job_id}/dataset.zip"


def redis_connection(url: str):
    from redis import Redis

    # Timeouts: a replica whose Redis is away answers 503 within seconds instead of hanging a request.
    return Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


class SharedRecords:
    """The job records in the shared store, as every replica and worker reads them: a job whose worker is
    gone is recorded failed by the first reader that notices."""

    def __init__(self, store: Store, queue_url: str):
        self.store = store
        self.queue_url = queue_url
        self._rq = None

    @property
    def rq_queue(self):
        if self._rq is None:
            from rq import Queue

            self._rq = Queue(QUEUE_NAME, connection=redis_connection(self.queue_url))
        return self._rq

    def get(self, job_id: str) -> dict:
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
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
        ttl = settings().job_ttl_seconds
        why, end = None, None
        if job.get("status") == Status.RUNNING and age(job.get("heartbeat") or job.get("started")) > ttl:
            end = self._published(job)  # it may have published before it stopped
            why = (f"the worker running this job stopped (no heartbeat for over {ttl:g} s); no "
                   "version was published by it; submit again")
        elif job.get("status") == Status.QUEUED:
            why = self._lost_in_queue(job["id"], long=age(job.get("created")) > ttl)
        if why is None:
            return job
        end = end or failed(500, why)
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
        if status in ("failed", "stopped", "canceled"):  # RQ's words for its own job, not a record's status
            return f"the job queue reports this job {getattr(status, 'value', status)} before it started" \
                   f"{_why_failed(rq_job)}; submit again"
        return None


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
    # "training.worker.NotStarted: worker W ..." reads better without the exception's class path.
    cause = re.sub(r"^[A-Za-z_][\w.]*\.\w+: ", "", cause)
    name = getattr(result, "worker_name", "")  # not every RQ release's Result has it
    where = f", on worker {name}" if name else ""
    return f"{where}: {cause[:500]}" if cause else where


def shown(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}{u.path}"
