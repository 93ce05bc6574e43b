"""Retrain jobs on this machine: state on disk, the one-job lock, and the training run in a process of its own.

Each job is a folder REFIT_HOME/jobs/<id>/ with job.json (replaced atomically on every change), the
extracted dataset, the training log, progress.json (where the run is: phase, epoch, best validation accuracy,
time left; replaced atomically as it goes) and result.json or error.json written by the training process.
One job at a time: admitting a job takes an exclusive flock on jobs/.lock that the admitting worker
holds until the job ends; a worker that dies releases it, which is how a restart recognises a job whose
owner is gone and records it as failed. The training process is killed with its worker (PDEATHSIG), and
versions are published atomically, so such a job never leaves a partial version behind.

A training process pays about five seconds of imports (torch, the ONNX exporter, the quantizer,
torch.optim's compiler hooks) before it reads a single image. The service therefore keeps one standby
process that has done them, and exported the default backbone's feature graph, ahead of time. It waits on a
unix socket in the jobs folder (core/standby.py), so whichever server worker admits a job hands it over; the
worker that started it starts a fresh one once it has taken a job. Each job still runs in a process of its
own that exits with it. The training process is `training/jobrun.py`, started by module name: the serving
side never imports the training code.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from core import standby
from core.data import check_layout
from core.jobs import ACTIVE, JOB_ID, PROGRESS_FILE, Status, alive, failed, new_id, new_record, public, read_json
from core.projects import DEFAULT
from core.scratch import sweep
from core.settings import PACKAGE_ROOT, settings
from core.store import atomic_write_json, now_iso
from service.errors import ApiError

log = logging.getLogger("refit.jobs")

TRAINING_PROCESS = "training.jobrun"  # python -m training.jobrun run|standby ...
BUSY = "busy: a retrain is already running; submit again when it has finished"
__all__ = ["PACKAGE_ROOT", "BUSY", "Jobs", "public", "looks_like_dataset"]


class Jobs:
    def __init__(self, home: Path, project: str = DEFAULT):
        self.home, self.project = home, project
        # The default project's jobs where they always were; another project's under projects/NAME/.
        self.root = home / "jobs" if project == DEFAULT else home / "projects" / project / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.root / ".lock"
        self._held: dict[str, int] = {}  # job id -> fd of the flock this process holds for it
        self._standby: subprocess.Popen | None = None
        self._standby_threads: int | None = None

    # -- state ------------------------------------------------------------------------------------
    def dir(self, job_id: str) -> Path:
        # A client names jobs (GET /jobs/{id}, task ids): only a name a job could have reaches the file system.
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise KeyError(job_id)
        return self.root / job_id

    def get(self, job_id: str) -> dict:
        return _with_progress(self._record(job_id), self.dir(job_id))

    def _record(self, job_id: str) -> dict:
        try:
            return json.loads((self.dir(job_id) / "job.json").read_text())
        except FileNotFoundError:
            raise KeyError(job_id) from None

    def update(self, job_id: str, **changes) -> dict:
        job = {**self._record(job_id), **changes, "updated": now_iso()}
        atomic_write_json(self.dir(job_id) / "job.json", job)
        return job

    def list(self, limit: int = 50) -> list[dict]:
        jobs = []
        for f in self.root.glob("*/job.json"):
            try:
                jobs.append((json.loads(f.read_text()), f.parent))
            except (OSError, ValueError):
                continue
        jobs.sort(key=lambda j: j[0].get("created", ""), reverse=True)
        return [_with_progress(job, d) for job, d in jobs[:limit]]

    def active(self) -> dict | None:
        return next((j for j in self.list(limit=1000) if j.get("status") in ACTIVE), None)

    # -- one job at a time ------------------------------------------------------------------------
    def _try_lock(self) -> int | None:
        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def busy(self) -> bool:
        fd = self._try_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    def admit(self, *, request: dict, source: dict, actor: str) -> dict:
        """Create a queued job and hold the lock for it, or refuse with 409 while another one runs."""
        fd = self._try_lock()
        if fd is None:
            running = self.active()
            raise ApiError(409, BUSY, job=public(running) if running else None)
        try:
            self._fail_stale()  # we hold the lock, so any job still marked active has lost its worker
            job_id = new_id()
            self.dir(job_id).mkdir(parents=True)
            job = new_record(job_id, request=request, source=source, actor=actor, project=self.project)
            atomic_write_json(self.dir(job_id) / "job.json", job)
        except BaseException:
            os.close(fd)
            raise
        self._held[job_id] = fd
        return job

    def incoming_dir(self) -> Path:
        """A folder for an upload being saved and unpacked, named for this process so that a restart can
        tell the leftovers of a dead process from an upload still being received."""
        return self.root / f".incoming-{os.getpid()}-{uuid.uuid4().hex}"

    def attach(self, job_id: str, *, upload: Path | None, extracted: Path | None, data: Path | None) -> dict:
        """Give the admitted job its dataset: the unpacked upload moves into the job's folder; a folder or
        .zip named by data_path is read where it is; a job that names a dataset of the store has none."""
        if extracted is None and data is None:
            return self.update(job_id, data=None)
        if extracted is not None:
            data = self.dir(job_id) / "data"
            extracted.rename(data)
        return self.update(job_id, data=str(data))

    def abandon(self, job_id: str, message: str) -> None:
        """An admitted job that will not run: record why, drop its data and give back the lock."""
        try:
            self.update(job_id, **failed(503, message, finished=now_iso()))
        finally:
            self.release(job_id)
            shutil.rmtree(self.dir(job_id) / "data", ignore_errors=True)

    def release(self, job_id: str) -> None:
        fd = self._held.pop(job_id, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    def recover(self) -> list[str]:
        """At start: jobs left active by a process that is gone are recorded as failed, and what dead
        processes left on disk is removed (partial uploads, unpacked datasets, a killed run's temp files)."""
        self._sweep_incoming()
        sweep(self.home)  # temp folders of runs (service or CLI) whose process is gone
        fd = self._try_lock()
        if fd is None:
            return []  # another live worker holds a job; its state is current
        try:
            stale = self._fail_stale()
            for job in self.list(limit=100_000):
                if job.get("status") not in ACTIVE:
                    self._drop_scratch(job["id"])
            return stale
        finally:
            os.close(fd)

    def _sweep_incoming(self) -> None:
        for d in self.root.glob(".incoming-*"):
            pid = d.name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and alive(int(pid)):
                continue  # a live worker is still receiving this upload
            log.warning("removing a partial upload left by a stopped process: %s", d)
            shutil.rmtree(d, ignore_errors=True)

    def _drop_scratch(self, job_id: str) -> None:
        """A finished job needs neither its unpacked dataset nor its temp folder."""
        for name in ("data", "tmp"):
            d = self.dir(job_id) / name
            if d.exists():
                log.warning("removing %s of finished job %s", name, job_id)
                shutil.rmtree(d, ignore_errors=True)

    def _fail_stale(self) -> list[str]:
        stale = []
        for job in self.list(limit=100_000):
            if job.get("status") not in ACTIVE:
                continue
            d = self.dir(job["id"])
            if (d / "result.json").is_file():  # the run finished; only the bookkeeping was cut short
                self.update(job["id"], status=Status.SUCCEEDED, finished=now_iso(),
                            result=json.loads((d / "result.json").read_text()))
                continue
            end = self._published(job)
            if end is not None:  # killed after its version landed: that is its outcome (core/outcome.py)
                self.update(job["id"], finished=now_iso(), **end)
                continue
            self.update(job["id"], **failed(500, "the service stopped while this job was running; no version was "
                                                 "published by it", finished=now_iso()))
            stale.append(job["id"])
            log.warning("retrain job %s was interrupted by a restart; marked failed", job["id"])
        return stale

    def _published(self, job: dict) -> dict | None:
        from core.outcome import published_outcome
        from core.store import Store

        try:
            return published_outcome(Store(self.home, project=self.project), job)
        except Exception as e:  # noqa: BLE001 - the store away: the job is recorded failed as before
            log.warning("retrain job %s: its versions cannot be looked up (%s)", job["id"], e)
            return None

    # -- running ----------------------------------------------------------------------------------
    @staticmethod
    def _env(train_threads: int) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")])),
               "REFIT_PARENT_PID": str(os.getpid())}  # the training process dies with this one
        # Library thread pools size themselves from these before torch.set_num_threads runs.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(train_threads)
        env["REFIT_TRAIN_THREADS"] = str(train_threads)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child reports through its files, not metrics
        return env

    @property
    def _socket(self) -> Path:
        return standby.address(self.home / "jobs")  # one standby per replica, for every project's jobs

    def start_standby(self, train_threads: int) -> None:
        """Start the warm training process the next job will run in, whichever worker admits that job: it
        waits on a unix socket in the jobs folder for a job folder. One worker of a replica owns it and starts
        a fresh one whenever it has taken a job. Call it from the thread that stays (the event loop's): the
        child's PDEATHSIG fires when the thread that forked it exits."""
        self._standby_threads = train_threads
        if self._standby is not None and self._standby.poll() is None:
            return
        log_path = self.root / ".standby.log"
        with open(log_path, "ab") as logf:
            self._standby = proc = subprocess.Popen(
                [sys.executable, "-m", TRAINING_PROCESS, "standby", str(self._socket)], stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT, env=self._env(train_threads), cwd=str(PACKAGE_ROOT))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # started outside the event loop: nobody to start the next one from
            loop = None
        if loop is not None:
            # When it has run a job (or died), the next one is started from the event loop's thread.
            started = time.monotonic()

            def replace() -> None:
                proc.wait()
                if time.monotonic() - started < 10 and proc.returncode != 0:
                    log.warning("the warm training process exited at once (code %s); retrains start cold",
                                proc.returncode)
                    return  # a standby that cannot start would be restarted in a tight loop
                if self._standby is proc and self._standby_threads is not None:
                    try:
                        loop.call_soon_threadsafe(self.start_standby, self._standby_threads)
                    except RuntimeError:  # the loop is closed: the worker is stopping
                        pass

            threading.Thread(target=replace, name="refit-standby-wait", daemon=True).start()

    def _take_standby(self, job_dir: Path) -> int | None:
        """Hand the job to the standby process (whichever worker started it): its pid once it has taken the
        job, or None when there is none to take it."""
        return standby.hand_over(self._socket, job_dir)

    def stop_standby(self) -> None:
        self._standby_threads = None
        proc, self._standby = self._standby, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    async def run(self, job_id: str, *, train_threads: int) -> dict:
        """Train in a child process (the warm standby, or a fresh one) and wait for it without blocking the
        event loop. Returns the job."""
        d = self.dir(job_id)
        self.update(job_id, status=Status.RUNNING, started=now_iso())
        t0 = time.monotonic()
        pid, proc = await self._start_training(d, train_threads)
        self.update(job_id, pid=pid)
        try:
            rc = await asyncio.to_thread(proc.wait) if proc else await _exited(pid)
        except asyncio.CancelledError:
            # The request that ran this job went away (a client that called POST /retrain and hung up,
            # or a worker shutting down): stop training too, or it would run on unaccounted for.
            _kill(pid)
            await asyncio.shield(asyncio.to_thread(proc.wait) if proc else _exited(pid))
            self.update(job_id, **failed(499, "the request running this job was cancelled", finished=now_iso()))
            raise
        job = self._record_end(job_id, rc, seconds=round(time.monotonic() - t0, 2))
        self._drop_scratch(job_id)  # the extracted upload and the run's temp files are not needed any more
        return job

    async def _start_training(self, d: Path, train_threads: int) -> tuple[int, subprocess.Popen | None]:
        """The pid training the job in `d`: the standby's, when one took it, else a fresh child's (and it)."""
        pid = await asyncio.to_thread(self._take_standby, d) if settings().train_standby else None
        if pid is not None:
            return pid, None
        with open(d / "train.log", "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", TRAINING_PROCESS, "run", str(d)], stdout=logf,
                                    stderr=subprocess.STDOUT, env=self._env(train_threads), cwd=str(PACKAGE_ROOT))
        return proc.pid, proc

    def _record_end(self, job_id: str, rc: int | None, *, seconds: float) -> dict:
        """The job's end, from what its training process left: result.json, or error.json, or only its code."""
        d = self.dir(job_id)
        if (d / "result.json").is_file():
            return self.update(job_id, status=Status.SUCCEEDED, finished=now_iso(), seconds=seconds,
                               result=json.loads((d / "result.json").read_text()))
        code = f" with code {rc}" if rc is not None else ""
        err = read_json(d / "error.json") or {"status": 500, "message": f"training exited{code}; "
                                              f"the job's train.log on the server has the details"}
        log.error("retrain job %s failed (exit %s); log: %s", job_id, rc, d / "train.log")
        return self.update(job_id, status=Status.FAILED, finished=now_iso(), seconds=seconds, error=err)


async def _exited(pid: int) -> None:
    """Until a process that is not our child exits (the standby another worker started): a pidfd becomes
    readable when the process ends, zombie or reaped."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _with_progress(job: dict, job_dir: Path) -> dict:
    """A job with `progress`, where its training run is (phase, epoch, epochs, best_val_acc, eta_seconds,
    elapsed_seconds and `message`, one line of them), from the progress.json its training process keeps, as a
    queued job's heartbeat carries it: what the console shows live. A running job that has none (yet, or
    one from before progress.json) gets the last line of its training log instead, as a string."""
    if job.get("progress"):
        return job
    state = read_json(job_dir / PROGRESS_FILE)
    if isinstance(state, dict):
        job["progress"] = state
        return job
    if job.get("status") != Status.RUNNING:
        return job
    try:
        with open(job_dir / "train.log", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return job
    # Progress bars redraw a line with carriage returns: the last text between line ends or returns counts.
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", tail) if ln.strip()]
    if lines:
        job["progress"] = re.sub(r"^\[\s*[\d.]+s\]\s*", "", lines[-1])[:300]
    return job


def looks_like_dataset(root: Path) -> str | None:
    """Catch a wrong archive at submit time; the training process does the thorough check."""
    return check_layout(root)


