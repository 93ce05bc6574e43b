"""Retrain jobs: admission, state on disk, and the training run in its own process.

Each job is a folder REFIT_HOME/jobs/<id>/ with job.json (replaced atomically on every change), the
extracted dataset, the training log, and result.json or error.json written by the training process.
One job at a time: admitting a job takes an exclusive flock on jobs/.lock that the admitting worker
holds until the job ends; a worker that dies releases it, which is how a restart recognises a job whose
owner is gone and records it as failed. The training process is killed with its worker (PDEATHSIG), and
versions are published atomically, so such a job never leaves a partial version behind.

    python -m service.jobs run REFIT_HOME/jobs/<id>     # what the service starts for each job
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from training.data import check_layout
from training.store import atomic_write_json, now_iso

log = logging.getLogger("refit.jobs")

ACTIVE = ("queued", "running")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding service/ and training/


class AdmissionError(Exception):
    """A retrain request refused before it starts; status is the HTTP code, body the JSON reply."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


class Jobs:
    def __init__(self, home: Path):
        self.root = home / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.root / ".lock"
        self._held: dict[str, int] = {}  # job id -> fd of the flock this process holds for it

    # -- state ------------------------------------------------------------------------------------
    def dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise KeyError(job_id)
        return self.root / job_id

    def get(self, job_id: str) -> dict:
        try:
            return json.loads((self.dir(job_id) / "job.json").read_text())
        except FileNotFoundError:
            raise KeyError(job_id) from None

    def update(self, job_id: str, **changes) -> dict:
        job = {**self.get(job_id), **changes, "updated": now_iso()}
        atomic_write_json(self.dir(job_id) / "job.json", job)
        return job

    def list(self, limit: int = 50) -> list[dict]:
        jobs = []
        for f in self.root.glob("*/job.json"):
            try:
                jobs.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        jobs.sort(key=lambda j: j.get("created", ""), reverse=True)
        return jobs[:limit]

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
            raise AdmissionError(409, "busy: a retrain is already running; submit again when it has finished",
                                 job=public(running) if running else None)
        try:
            self._fail_stale()  # we hold the lock, so any job still marked active has lost its worker
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            self.dir(job_id).mkdir(parents=True)
            job = {"id": job_id, "status": "queued", "created": now_iso(), "actor": actor, "source": source,
                   "request": request, "task_id": None, "result": None, "error": None}
            atomic_write_json(self.dir(job_id) / "job.json", job)
        except BaseException:
            os.close(fd)
            raise
        self._held[job_id] = fd
        return job

    def release(self, job_id: str) -> None:
        fd = self._held.pop(job_id, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    def recover(self) -> list[str]:
        """At start: jobs left active by a process that is gone are recorded as failed."""
        fd = self._try_lock()
        if fd is None:
            return []  # another live worker holds a job; its state is current
        try:
            return self._fail_stale()
        finally:
            os.close(fd)

    def _fail_stale(self) -> list[str]:
        failed = []
        for job in self.list(limit=100_000):
            if job.get("status") not in ACTIVE:
                continue
            d = self.dir(job["id"])
            if (d / "result.json").is_file():  # the run finished; only the bookkeeping was cut short
                self.update(job["id"], status="succeeded", finished=now_iso(),
                            result=json.loads((d / "result.json").read_text()))
                continue
            self.update(job["id"], status="failed", finished=now_iso(),
                        error={"status": 500, "message": "the service stopped while this job was running; "
                               "no version was published by it"})
            failed.append(job["id"])
            log.warning("retrain job %s was interrupted by a restart; marked failed", job["id"])
        return failed

    # -- running ----------------------------------------------------------------------------------
    async def run(self, job_id: str, *, train_threads: int) -> dict:
        """Train in a child process and wait for it without blocking the event loop. Returns the job."""
        d = self.dir(job_id)
        job = self.update(job_id, status="running", started=now_iso())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")])),
               "REFIT_PARENT_PID": str(os.getpid())}
        # Library thread pools size themselves from these before torch.set_num_threads runs.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(train_threads)
        env["REFIT_TRAIN_THREADS"] = str(train_threads)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child reports through its files, not metrics
        t0 = time.monotonic()
        with open(d / "train.log", "ab") as logf:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service.jobs", "run", str(d),
                                                        stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env,
                                                        cwd=str(PACKAGE_ROOT))
            self.update(job_id, pid=proc.pid)
            try:
                rc = await proc.wait()
            except asyncio.CancelledError:
                # The request that ran this job went away (a client that called POST /retrain and hung up,
                # or a worker shutting down): stop training too, or it would run on unaccounted for.
                proc.kill()
                await asyncio.shield(proc.wait())
                self.update(job_id, status="failed", finished=now_iso(),
                            error={"status": 499, "message": "the request running this job was cancelled"})
                raise
        seconds = round(time.monotonic() - t0, 2)
        if (d / "result.json").is_file():
            job = self.update(job_id, status="succeeded", finished=now_iso(), seconds=seconds,
                              result=json.loads((d / "result.json").read_text()))
        else:
            err = _read_json(d / "error.json") or {"status": 500, "message": f"training exited with code {rc}; "
                                                   f"see {d / 'train.log'}"}
            job = self.update(job_id, status="failed", finished=now_iso(), seconds=seconds, error=err)
        shutil.rmtree(d / "data", ignore_errors=True)  # the extracted upload is not needed any more
        return job


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def public(job: dict) -> dict:
    """What a client sees of a job (the log stays on the server)."""
    keys = ("id", "task_id", "status", "created", "started", "finished", "seconds", "actor", "source",
            "request", "result", "error")
    return {k: job.get(k) for k in keys if k in job}


def looks_like_dataset(root: Path) -> str | None:
    """Catch a wrong archive at submit time; the training process does the thorough check."""
    return check_layout(root)


# --- the training process ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: be killed when the worker that started us dies, so no orphan publishes after a restart."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = os.environ.get("REFIT_PARENT_PID")
    if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def run_job(job_dir: Path) -> int:
    from training.config import TrainRequest
    from training.data import DatasetError
    from training.pipeline import train
    from training.store import Store

    _die_with_parent()
    try:
        os.nice(10)  # predictions win the CPU whenever both want it
    except OSError:
        pass
    job = json.loads((job_dir / "job.json").read_text())
    cap = int(os.environ.get("REFIT_TRAIN_THREADS") or 1)
    request = TrainRequest.model_validate(job["request"])
    request.threads = min(request.threads or cap, cap)
    print(f"job {job['id']}: training on {job['data']} with {request.threads} thread(s)", flush=True)
    try:
        result = train(request, job["data"], store=Store(), actor=job.get("actor", "api"),
                       log=lambda msg: print(msg, flush=True))
    except DatasetError as e:
        # Paths in the message are shown relative to what the client sent, not as server paths.
        msg = str(e)
        for root in (job_dir / "data", os.environ.get("REFIT_DATA_ROOT")):
            if root:
                msg = msg.replace(f"{root}{os.sep}", "").replace(str(root), ".")
        atomic_write_json(job_dir / "error.json", {"status": 422, "message": f"dataset: {msg}"})
        print(f"dataset error: {e}", flush=True)
        return 3
    except Exception as e:  # noqa: BLE001 - reported to the client; the traceback goes to the log
        import traceback

        traceback.print_exc()
        atomic_write_json(job_dir / "error.json", {"status": 500, "message": f"training failed: "
                                                   f"{type(e).__name__}: {e}"})
        return 1
    atomic_write_json(job_dir / "result.json", json.loads(json.dumps(result, default=str)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "run":
        print(__doc__, file=sys.stderr)
        return 2
    return run_job(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
