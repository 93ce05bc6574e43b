"""`refit worker`: take retrain jobs from the queue (REFIT_QUEUE) and run them against the shared store
(REFIT_STORE), on any machine that has the training code. Run as many as you like: the model line admits one
job at a time (core/queue.py), and each worker takes one job at a time.

The worker imports torch and exports the default backbone's feature graph once, before its first job; RQ
then forks a work horse per job, which starts warm. The horse dies with its worker (PDEATHSIG), so a worker
killed mid-job publishes nothing; its job's heartbeat stops, and the job is recorded as failed.

RQ names the function a job calls: replicas enqueue `training.worker.run_queued` (core/queue.py), and jobs
queued before it moved here, as `service.worker.run_queued`, run as it too (training/rqworker.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

from core.cas import Contended, swap
from core.jobs import ACTIVE, Status, failed, read_json
from core.queue import LINE, QUEUE_NAME, dataset_key, record_key, redis_connection
from core.settings import settings
from core.store import Store, atomic_write_json, now_iso
from training.jobrun import die_with_parent, lower_priority, run_job, warm_up

log = logging.getLogger("refit.worker")


def main(*, burst: bool = False, name: str | None = None) -> int:
    queue = settings().queue
    if not queue:
        print("refit: error: REFIT_QUEUE is not set; a worker needs the job queue's URL, e.g. "
              "REFIT_QUEUE=redis://localhost:6379/0 (and REFIT_STORE for the shared store)", file=sys.stderr)
        return 2
    from redis.exceptions import ConnectionError as RedisDown

    from core.scratch import sweep
    from training.device import describe_before_fork
    from training.orphans import ProjectRecords, sweep_worker_home
    from training.rqworker import QueueWorker, free_name

    name = name or f"{socket.gethostname()}-{os.getpid()}"
    store = Store()
    problem = store_problem(store)
    if problem:  # a worker that cannot use its store would take jobs from the shared queue only to fail them
        print(f"refit: error: worker {name}: the store {store.describe()} cannot be used: {problem}", file=sys.stderr)
        return 2
    try:
        connection = redis_connection(queue)
        taken = free_name(connection, name)
        if taken:
            print(f"refit: error: {taken}", file=sys.stderr)
            return 2
        log.info("refit worker: training on %s", describe_before_fork())  # before warm_up imports more of torch
        sweep(store.home)  # temp folders of runs killed on this machine
        sweep_worker_home(store, ProjectRecords(store, queue))  # a killed job's leftovers, in every project
        try:
            warm_up()
        except Exception as e:  # noqa: BLE001 - a failed warm-up only costs each job its start-up time
            log.warning("warm-up failed (%s: %s); jobs start cold", type(e).__name__, e)
        os.environ["REFIT_PARENT_PID"] = str(os.getpid())  # the work horses die with this process
        worker = QueueWorker([QUEUE_NAME], connection=connection, name=name,
                             job_monitoring_interval=max(1, settings().worker_monitor_seconds))
        log.info("worker %s: store %s, queue %s", name, store.describe(), QUEUE_NAME)
        worker.work(burst=burst, logging_level="INFO")
    except RedisDown as e:
        print(f"refit: error: the job queue cannot be reached ({e})", file=sys.stderr)
        return 2
    except ValueError as e:  # RQ's register_birth: a worker of that name registered since free_name looked
        print(f"refit: error: {e}", file=sys.stderr)
        return 2
    return 0


def store_problem(store: Store) -> str | None:
    """Why the store cannot serve as this worker's (no bucket, no credentials, endpoint away), else None:
    what a job needs first, read at start, as a replica reads it."""
    from core.store import StoreError

    try:
        store.versions()
        store.record(LINE)
    except StoreError as e:
        return str(e)
    return None


def run_queued(job_id: str, project: str = "default") -> str:
    """One job of `project`, in RQ's work horse: train on the job's dataset, publish, and record the outcome.
    Every worker takes jobs of any project; the job's records are the project's (core/projects.py)."""
    die_with_parent()
    lower_priority()
    store = Store(project=project)
    me = f"{os.environ.get('RQ_WORKER_ID') or socket.gethostname()}/{os.getpid()}"  # worker name / horse pid
    job, tag = _queued_record(store, job_id)
    if job.get("status") != Status.QUEUED:
        log.warning("job %s is %s; not running it", job_id, job.get("status"))
        return "skipped"
    job = {**job, "status": Status.RUNNING, "started": now_iso(), "heartbeat": now_iso(), "worker": me,
           "updated": now_iso()}
    if not store.put_record(record_key(job_id), job, if_tag=tag):
        return "skipped"  # changed under us (cancelled, or recorded lost)
    folder = store.home / "jobs" / job_id
    beat = _Heartbeat(store, job_id)
    beat.start()
    try:
        outcome = _train(store, job, folder, beat)
    finally:
        beat.stop()
    _record_outcome(store, job_id, outcome)
    store.delete_file(dataset_key(job_id))
    shutil.rmtree(folder, ignore_errors=True)  # the model line is free once the record says the job ended
    return str(outcome["status"])


def _record_outcome(store: Store, job_id: str, outcome: dict) -> None:
    """The last write: only over a record still saying running, so a job already recorded lost stays failed."""

    def attempt() -> bool | None:
        current, tag = store.record(record_key(job_id))
        if current is None or current.get("status") not in ACTIVE:
            return True  # ended already (recorded lost, or cancelled): that record stands
        done = store.put_record(record_key(job_id), {**current, **outcome, "finished": now_iso(),
                                                     "updated": now_iso()}, if_tag=tag)
        return True if done else None

    try:
        swap(attempt, what=f"the record of job {job_id}", attempts=10)
    except Contended as e:  # readers kept writing it: the heartbeat's absence settles it as before
        log.error("job %s: its outcome was not recorded: %s", job_id, e)


class NotStarted(Exception):
    """Why a worker took a job from the queue and could not start it; RQ records it as the job's failure,
    which is where a replica reads it (the job's record may be out of this worker's reach)."""


def _queued_record(store: Store, job_id: str) -> tuple[dict, str | None]:
    from core.store import StoreError

    try:
        job, tag = store.record(record_key(job_id))
    except StoreError as e:
        raise NotStarted(f"this worker cannot read its store {store.describe()}: {e}") from None
    if job is None:  # the replicas wrote it: this worker's REFIT_STORE is not theirs
        raise NotStarted(f"this worker found no record of this job in its store {store.describe()}; is its "
                         f"REFIT_STORE the replicas'?")
    return job, tag


def _train(store: Store, job: dict, folder: Path, beat: "_Heartbeat") -> dict:
    from core.data import DatasetError, safe_extract_zip

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if not job.get("dataset"):  # a snapshot of a dataset in the store: training materializes it
        atomic_write_json(folder / "job.json", {**job, "data": None})
        return _run(folder, beat)
    try:
        store.get_file(dataset_key(job["id"]), folder / "dataset.zip")
        safe_extract_zip(folder / "dataset.zip", folder / "data")
    except FileNotFoundError:
        return failed(500, "the job's dataset is not in the store")
    except DatasetError as e:
        return failed(422, f"dataset: {e}")
    except Exception as e:  # broad on purpose: the store or this machine's disk: the job says so, not a stale heartbeat
        log.exception("job %s: the dataset could not be fetched", job["id"])
        return failed(503, f"the worker could not fetch the dataset ({type(e).__name__}); try again")
    (folder / "dataset.zip").unlink()
    atomic_write_json(folder / "job.json", {**job, "data": str(folder / "data")})
    return _run(folder, beat)


def _run(folder: Path, beat: "_Heartbeat") -> dict:
    rc = run_job(folder, started=True, progress=beat.say)
    result = read_json(folder / "result.json")
    if result is not None:
        return {"status": Status.SUCCEEDED, "result": result, "progress": beat.last}
    err = read_json(folder / "error.json") or {"status": 500, "message": f"training exited with code {rc}; the "
                                                f"worker's log has the details"}
    return {"status": Status.FAILED, "error": err, "progress": beat.last}


class _Heartbeat(threading.Thread):
    """Rewrites the running job's record every JOB_TTL/6 s, and at once when the run enters a new phase, with
    where the run is (`progress`: the small dict training/jobrun.py's run_job writes to progress.json). When the
    record no longer says running (a reader declared this worker dead after a stall), the job stops here at
    once: the line has been given to the next job, and two jobs must never train on one line together."""

    def __init__(self, store: Store, job_id: str):
        super().__init__(name=f"heartbeat {job_id}", daemon=True)
        self.store, self.job_id = store, job_id
        self.last: dict | None = None
        self._halt = threading.Event()
        self._wake = threading.Event()  # set by a new phase or by stop()

    def say(self, state: dict) -> None:
        new_phase = self.last is None or state.get("phase") != self.last.get("phase")
        self.last = state
        if new_phase:
            self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait(settings().job_ttl_seconds / 6)
            self._wake.clear()
            if self._halt.is_set():
                return
            try:
                job, tag = self.store.record(record_key(self.job_id))
                if job is not None and job.get("status") != Status.RUNNING:
                    log.error("job %s was recorded %s while it ran here; stopping it", self.job_id, job.get("status"))
                    os.kill(os.getpid(), signal.SIGKILL)
                if job is not None:
                    self.store.put_record(record_key(self.job_id), {**job, "heartbeat": now_iso(),
                                                                   "progress": self.last}, if_tag=tag)
            except Exception as e:  # noqa: BLE001 - a store hiccup: try again next beat
                log.warning("job %s: heartbeat not written (%s)", self.job_id, e)

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
        self.join(timeout=10)


if __name__ == "__main__":  # python -m training.worker
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main(burst="--burst" in sys.argv))

