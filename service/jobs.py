"""Retrain jobs: admission, state on disk, and the training run in its own process.

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
unix socket in the jobs folder, so whichever server worker admits a job hands it over; the worker that
started it starts a fresh one once it has taken a job. Each job still runs in a process of its own that
exits with it.

    python -m service.jobs run REFIT_HOME/jobs/<id>     # one job in a fresh process
    python -m service.jobs standby REFIT_HOME/jobs/.standby.sock   # warm up, then run the job dir sent to it
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from service import settings
from core.data import check_layout
from core.progress import describe
from core.progress_view import throttled
from core.scratch import scratch_root, sweep
from core.store import atomic_write_json, now_iso

log = logging.getLogger("refit.jobs")

ACTIVE = ("queued", "running")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding service/ and training/
_JOB_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,99}")
PROGRESS_FILE = "progress.json"
# A poll every second sees a fresh state; the head's hundreds of epochs a second are not each written.
PROGRESS_EVERY = 0.5


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
        self._standby: subprocess.Popen | None = None
        self._standby_threads: int | None = None

    # -- state ------------------------------------------------------------------------------------
    def dir(self, job_id: str) -> Path:
        # A client names jobs (GET /jobs/{id}, task ids): only a name a job could have reaches the file system.
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
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
            raise AdmissionError(409, "busy: a retrain is already running; submit again when it has finished",
                                 job=public(running) if running else None)
        try:
            self._fail_stale()  # we hold the lock, so any job still marked active has lost its worker
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            self.dir(job_id).mkdir(parents=True)
            job = {"id": job_id, "status": "queued", "created": now_iso(), "actor": actor, "source": source,
                   "request": request, "task_id": job_id, "result": None, "error": None}
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
            self.update(job_id, status="failed", finished=now_iso(), error={"status": 503, "message": message})
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
        sweep(self.root.parent)  # temp folders of runs (service or CLI) whose process is gone
        fd = self._try_lock()
        if fd is None:
            return []  # another live worker holds a job; its state is current
        try:
            failed = self._fail_stale()
            for job in self.list(limit=100_000):
                if job.get("status") not in ACTIVE:
                    self._drop_scratch(job["id"])
            return failed
        finally:
            os.close(fd)

    def _sweep_incoming(self) -> None:
        for d in self.root.glob(".incoming-*"):
            pid = d.name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
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
        failed = []
        for job in self.list(limit=100_000):
            if job.get("status") not in ACTIVE:
                continue
            d = self.dir(job["id"])
            if (d / "result.json").is_file():  # the run finished; only the bookkeeping was cut short
                self.update(job["id"], status="succeeded", finished=now_iso(),
                            result=json.loads((d / "result.json").read_text()))
                continue
            end = self._published(job)
            if end is not None:  # killed after its version landed: that is its outcome (service/outcome.py)
                self.update(job["id"], finished=now_iso(), **end)
                continue
            self.update(job["id"], status="failed", finished=now_iso(),
                        error={"status": 500, "message": "the service stopped while this job was running; "
                               "no version was published by it"})
            failed.append(job["id"])
            log.warning("retrain job %s was interrupted by a restart; marked failed", job["id"])
        return failed

    def _published(self, job: dict) -> dict | None:
        from service.outcome import published_outcome
        from core.store import Store

        try:
            return published_outcome(Store(self.root.parent), job)
        except Exception as e:  # noqa: BLE001 - the store away: the job is recorded failed as before
            log.warning("retrain job %s: its versions cannot be looked up (%s)", job["id"], e)
            return None

    # -- running ----------------------------------------------------------------------------------
    @staticmethod
    def _env(train_threads: int) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")])),
               "REFIT_PARENT_PID": str(os.getpid())}
        # Library thread pools size themselves from these before torch.set_num_threads runs.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(train_threads)
        env["REFIT_TRAIN_THREADS"] = str(train_threads)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child reports through its files, not metrics
        return env

    @property
    def _socket(self) -> Path:
        return self.root / ".standby.sock"

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
                [sys.executable, "-m", "service.jobs", "standby", str(self._socket)], stdin=subprocess.DEVNULL,
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
        job (after its warm-up, if that is still going on), or None when there is none to take it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.connect(str(self._socket))
                conn.sendall(f"{job_dir}\n".encode())
                reply = conn.makefile("r").readline().strip()
            except OSError:  # no standby listening (none started, or it has taken a job), or it died
                return None
        return int(reply) if reply.isdigit() else None

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
        job = self.update(job_id, status="running", started=now_iso())
        t0 = time.monotonic()
        pid = await asyncio.to_thread(self._take_standby, d) if settings.TRAIN_STANDBY else None
        proc = None
        if pid is None:
            with open(d / "train.log", "ab") as logf:
                proc = subprocess.Popen([sys.executable, "-m", "service.jobs", "run", str(d)], stdout=logf,
                                        stderr=subprocess.STDOUT, env=self._env(train_threads),
                                        cwd=str(PACKAGE_ROOT))
            pid = proc.pid
        self.update(job_id, pid=pid)
        try:
            rc = await asyncio.to_thread(proc.wait) if proc else await _exited(pid)
        except asyncio.CancelledError:
            # The request that ran this job went away (a client that called POST /retrain and hung up,
            # or a worker shutting down): stop training too, or it would run on unaccounted for.
            _kill(pid)
            await asyncio.shield(asyncio.to_thread(proc.wait) if proc else _exited(pid))
            self.update(job_id, status="failed", finished=now_iso(),
                        error={"status": 499, "message": "the request running this job was cancelled"})
            raise
        seconds = round(time.monotonic() - t0, 2)
        if (d / "result.json").is_file():
            job = self.update(job_id, status="succeeded", finished=now_iso(), seconds=seconds,
                              result=json.loads((d / "result.json").read_text()))
        else:
            code = f" with code {rc}" if rc is not None else ""
            err = _read_json(d / "error.json") or {"status": 500, "message": f"training exited{code}; "
                                                   f"the job's train.log on the server has the details"}
            log.error("retrain job %s failed (exit %s); log: %s", job_id, rc, d / "train.log")
            job = self.update(job_id, status="failed", finished=now_iso(), seconds=seconds, error=err)
        self._drop_scratch(job_id)  # the extracted upload and the run's temp files are not needed any more
        return job


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _with_progress(job: dict, job_dir: Path) -> dict:
    """A job with `progress`, where its training run is (phase, epoch, epochs, best_val_acc, eta_seconds,
    elapsed_seconds and `message`, one line of them), from the progress.json its training process keeps, as a
    queued job's heartbeat carries it: what the console shows live. A running job that has none (yet, or
    one from before progress.json) gets the last line of its training log instead, as a string."""
    if job.get("progress"):
        return job
    state = _read_json(job_dir / PROGRESS_FILE)
    if isinstance(state, dict):
        job["progress"] = state
        return job
    if job.get("status") != "running":
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def public(job: dict) -> dict:
    """What a client sees of a job (the log stays on the server)."""
    keys = ("id", "task_id", "status", "created", "started", "finished", "seconds", "actor", "source",
            "request", "progress", "worker", "heartbeat", "result", "error")
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


def _lower_priority() -> None:
    try:
        os.nice(10)  # predictions win the CPU whenever both want it
    except OSError:
        pass


def warm_up() -> None:
    """What every run would otherwise pay first: imports, torch.optim's lazy compiler import, and the
    default backbone's frozen graphs (exported once into the store's cache): its features for the head, and
    the frozen stages of a default `partial` for the activation cache."""
    import matplotlib.pyplot  # noqa: F401 - the confusion-matrix plot
    import onnxruntime.quantization  # noqa: F401
    import torch

    from core.config import TrainRequest
    from training.export import feature_session
    from training.pipeline import train  # noqa: F401
    from training.registry import create_backbone
    from core.store import Store

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    backbone = TrainRequest.model_fields["backbone"].default
    bb = create_backbone(backbone, num_classes=2, pretrained=True)
    feature_session(bb, bb.contract.input_size, Store().home / "cache")
    from training.activations import prefix_session, split_model
    from training.finetune import STRATEGIES, apply_strategy

    defaults = TrainRequest()
    _, summary = apply_strategy(bb, STRATEGIES["partial"], lr=defaults.lr, backbone_lr=defaults.backbone_lr,
                                unfreeze_blocks=defaults.unfreeze_blocks, log=lambda _: None)
    split = split_model(bb, summary["unfrozen_stages"])
    if split is not None:
        prefix_session(bb, split, bb.contract.input_size, Store().home / "cache")


def standby(address: Path) -> int:
    """Listen on a unix socket in the jobs folder, warm up, then take one job folder from the first worker
    that connects, answer with this pid, and run the job with stdout/stderr in its log."""
    _die_with_parent()
    _lower_priority()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = address.with_name(f".standby-{os.getpid()}.sock")
    staging.unlink(missing_ok=True)
    server.bind(str(staging))
    server.listen(1)
    os.replace(staging, address)  # listening from now on: a job handed over during warm-up waits for it
    t0 = time.monotonic()
    try:
        warm_up()
        print(f"standby {os.getpid()}: warm in {time.monotonic() - t0:.1f}s", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed warm-up only costs the job its start-up time
        print(f"standby {os.getpid()}: warm-up failed ({type(e).__name__}: {e}); continuing cold", flush=True)
    conn, _ = server.accept()
    with conn:
        line = conn.makefile("r").readline().strip()
        if not line:
            return 0
        conn.sendall(f"{os.getpid()}\n".encode())
    server.close()  # one job per standby: later connections are refused, and a fresh standby replaces it
    job_dir = Path(line)
    fd = os.open(job_dir / "train.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return run_job(job_dir, started=True)


def run_job(job_dir: Path, *, started: bool = False, progress: Callable[[dict], None] | None = None) -> int:
    """Run one job; `started`: the process has already tied itself to the service and lowered its priority.
    Where the run is goes to job_dir/progress.json at most every PROGRESS_EVERY s and on every phase change;
    `progress` is called with each state written there (a queue worker's heartbeat carries it)."""
    from core.config import TrainRequest
    from core.data import DatasetError
    from training.pipeline import train
    from core.progress import Progress
    from core.store import Store

    if not started:
        _die_with_parent()
        _lower_priority()
    # Every temp file of this run (ours, onnxruntime's quantizer's) goes under the job, where the service
    # removes it when the job ends, or at the next start if this process is killed.
    tmp = job_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    job = json.loads((job_dir / "job.json").read_text())
    cap = int(os.environ.get("REFIT_TRAIN_THREADS") or 1)
    request = TrainRequest.model_validate(job["request"])
    request.threads = min(request.threads or cap, cap)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    def report(state: dict) -> None:
        state = {**state, "message": describe(state)}
        try:
            atomic_write_json(job_dir / PROGRESS_FILE, state)
        except OSError as e:  # a full disk say: the job's outcome matters more than its progress display
            print(f"progress not written ({e})", flush=True)
        if progress:
            progress(state)

    report(Progress().state)  # "preparing", until the run reports its own phases

    what = job.get("data") or f"dataset {request.dataset} snapshot {request.snapshot or '(newest)'}"
    say(f"job {job['id']}: training on {what} with {request.threads} thread(s) in process {os.getpid()}")
    refused = (job.get("source") or {}).get("refused") or []
    for r in refused:
        say(f"refused when the upload was admitted: {r['name']}: {r['error']}")
    try:
        result = train(request, job.get("data"), store=Store(), actor=job.get("actor", "api"), log=say,
                       progress=throttled(report, PROGRESS_EVERY), job_id=job["id"])
    except DatasetError as e:
        atomic_write_json(job_dir / "error.json", {"status": 422, "message": f"dataset: {_relative(str(e), job_dir)}"})
        print(f"dataset error: {e}", flush=True)
        return 3
    except Exception as e:  # noqa: BLE001 - reported to the client; the traceback goes to the log
        import traceback

        traceback.print_exc()
        atomic_write_json(job_dir / "error.json", {"status": 500, "message": f"training failed: "
                                                   f"{type(e).__name__}: {_relative(str(e), job_dir)}"})
        return 1
    # An upload's files that admission refused (not images, corrupt) never reached the snapshot; they are
    # reported where a client has always found the files training skipped.
    result["skipped"] = [{"path": r["name"], "reason": r["error"]} for r in refused] + (result.get("skipped") or [])
    atomic_write_json(job_dir / "result.json", json.loads(json.dumps(result, default=str)))
    return 0


def _relative(msg: str, job_dir: Path) -> str:
    """Server paths out of a message for the client: the dataset's own paths are shown relative to what the
    client sent (the upload or data_path), anything else under the job or the store by a name."""
    from core.paths import refit_home

    home = refit_home()
    # A data_path .zip is unpacked into the run's folder: REFIT_HOME/tmp/runs/run-<pid>-<id>/dataset/...
    msg = re.sub(re.escape(str(scratch_root(home))) + r"/[^/\s]+/dataset/?", "", msg)
    for root, shown in ((job_dir / "data", "."), (os.environ.get("REFIT_DATA_ROOT"), "."),
                        (job_dir, f"job {job_dir.name}"), (home, "REFIT_HOME")):
        if root:
            msg = msg.replace(f"{root}{os.sep}", "" if shown == "." else f"{shown}: ").replace(str(root), shown)
    return msg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "standby":
        return standby(Path(argv[1]))
    if len(argv) != 2 or argv[0] != "run":
        print(__doc__, file=sys.stderr)
        return 2
    return run_job(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
