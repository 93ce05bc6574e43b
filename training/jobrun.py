"""The training process of one retrain job: read its folder, train, and leave result.json or error.json there.

The service starts it by module name (service/jobs.py), so the serving side never imports this code; a
`refit worker`'s work horse calls `run_job` in process (training/worker.py).

    python -m training.jobrun run REFIT_HOME/jobs/<id>     # one job in a fresh process
    python -m training.jobrun standby REFIT_HOME/jobs/.standby.sock   # warm up, then run the job dir sent to it

The process dies with the server worker that started it (PDEATHSIG), so no orphan publishes after a
restart, and runs at a lower priority, so predictions win the CPU whenever both want it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from core import standby as standby_socket
from core.jobs import PROGRESS_FILE
from core.progress import describe
from core.progress_view import throttled
from core.scratch import scratch_root
from core.settings import settings
from core.store import atomic_write_json

# A poll every second sees a fresh state; the head's hundreds of epochs a second are not each written.
PROGRESS_EVERY = 0.5


def die_with_parent() -> None:
    """Linux: be killed when the worker that started us dies, so no orphan publishes after a restart."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = settings().parent_pid
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def lower_priority() -> None:
    try:
        os.nice(10)  # predictions win the CPU whenever both want it
    except OSError:
        pass


def warm_up() -> None:
    """What every run would otherwise pay first: imports, torch.optim's lazy compiler import, and the
    default backbone's frozen graphs (exported once into the store's cache): its features for the head, and
    the frozen stages of a default `partial` for the activation cache."""
    import matplotlib.pyplot  # noqa: F401 - imported for its import time: the confusion-matrix plot
    import onnxruntime.quantization  # noqa: F401 - imported for its import time: the INT8 quantizer
    import torch

    from core.config import TrainRequest
    from core.store import Store
    from training.activations import prefix_session, split_model
    from training.export import feature_session
    from training.finetune import STRATEGIES, apply_strategy
    from training.pipeline import train  # noqa: F401 - imported for its import time: the pipeline
    from training.registry import create_backbone

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    backbone = TrainRequest.model_fields["backbone"].default
    bb = create_backbone(backbone, num_classes=2, pretrained=True)
    feature_session(bb, bb.contract.input_size, Store().home / "cache")
    defaults = TrainRequest()
    _, summary = apply_strategy(bb, STRATEGIES["partial"], lr=defaults.lr, backbone_lr=defaults.backbone_lr,
                                unfreeze_blocks=defaults.unfreeze_blocks, log=lambda _: None)
    split = split_model(bb, summary["unfrozen_stages"])
    if split is not None:
        prefix_session(bb, split, bb.contract.input_size, Store().home / "cache")


def standby(address: Path) -> int:
    """Listen on a unix socket in the jobs folder, warm up, then take one job folder from the first worker
    that connects, answer with this pid, and run the job with stdout/stderr in its log."""
    die_with_parent()
    lower_priority()
    server = standby_socket.listen(address)
    t0 = time.monotonic()
    try:
        warm_up()
        print(f"standby {os.getpid()}: warm in {time.monotonic() - t0:.1f}s", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed warm-up only costs the job its start-up time
        print(f"standby {os.getpid()}: warm-up failed ({type(e).__name__}: {e}); continuing cold", flush=True)
    job_dir = standby_socket.take_job(server)
    if job_dir is None:
        return 0
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
    from core.progress import Progress

    if not started:
        die_with_parent()
        lower_priority()
    _temp_files_under(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    request = _request(job)
    say = _say()
    report = _reporter(job_dir, progress)
    report(Progress().state)  # "preparing", until the run reports its own phases
    what = job.get("data") or f"dataset {request.dataset} snapshot {request.snapshot or '(newest)'}"
    say(f"job {job['id']}: training on {what} with {request.threads} thread(s) in process {os.getpid()}")
    refused = (job.get("source") or {}).get("refused") or []
    for r in refused:
        say(f"refused when the upload was admitted: {r['name']}: {r['error']}")
    result = _train(job, request, job_dir, say, report)
    if isinstance(result, int):
        return result
    # An upload's files that admission refused (not images, corrupt) never reached the snapshot; they are
    # reported where a client has always found the files training skipped.
    result["skipped"] = [{"path": r["name"], "reason": r["error"]} for r in refused] + (result.get("skipped") or [])
    atomic_write_json(job_dir / "result.json", json.loads(json.dumps(result, default=str)))
    return 0


def _temp_files_under(job_dir: Path) -> None:
    """Every temp file of this run (ours, onnxruntime's quantizer's) goes under the job, where the service
    removes it when the job ends, or at the next start if this process is killed."""
    tmp = job_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)


def _request(job: dict):
    """The job's TrainRequest, its threads capped by what the service gave this process (REFIT_TRAIN_THREADS;
    one when it set none)."""
    from core.config import TrainRequest

    cap = settings().train_threads_ or 1
    request = TrainRequest.model_validate(job["request"])
    request.threads = min(request.threads or cap, cap)
    return request


def _say() -> Callable[[str], None]:
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    return say


def _reporter(job_dir: Path, progress: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """Writes each progress state, with its one-line `message`, to progress.json, and hands it on."""

    def report(state: dict) -> None:
        state = {**state, "message": describe(state)}
        try:
            atomic_write_json(job_dir / PROGRESS_FILE, state)
        except OSError as e:  # a full disk say: the job's outcome matters more than its progress display
            print(f"progress not written ({e})", flush=True)
        if progress:
            progress(state)

    return report


def _train(job: dict, request, job_dir: Path, say, report) -> dict | int:
    """The training run's result, or the exit code after error.json has said why it failed."""
    from core.data import DatasetError
    from core.store import Store
    from training.errors import DeviceError
    from training.pipeline import train

    try:
        store = Store(project=job.get("project", "default"))  # the job's project (core/projects.py)
        return train(request, job.get("data"), store=store, actor=job.get("actor", "api"), log=say,
                     progress=throttled(report, PROGRESS_EVERY), job_id=job["id"])
    except DatasetError as e:
        atomic_write_json(job_dir / "error.json", {"status": 422, "message": f"dataset: {_relative(str(e), job_dir)}"})
        print(f"dataset error: {e}", flush=True)
        return 3
    except DeviceError as e:  # the request asks for what this machine lacks: the client's to change, no traceback
        atomic_write_json(job_dir / "error.json", {"status": 422, "message": str(e)})
        print(f"device error: {e}", flush=True)
        return 3
    except Exception as e:  # noqa: BLE001 - reported to the client; the traceback goes to the log
        import traceback

        traceback.print_exc()
        atomic_write_json(job_dir / "error.json", {"status": 500, "message": f"training failed: "
                                                   f"{type(e).__name__}: {_relative(str(e), job_dir)}"})
        return 1


def _relative(msg: str, job_dir: Path) -> str:
    """Server paths out of a message for the client: the dataset's own paths are shown relative to what the
    client sent (the upload or data_path), anything else under the job or the store by a name."""
    from core.settings import refit_home

    home = refit_home()
    # A data_path .zip is unpacked into the run's folder: REFIT_HOME/tmp/runs/run-<pid>-<id>/dataset/...
    msg = re.sub(re.escape(str(scratch_root(home))) + r"/[^/\s]+/dataset/?", "", msg)
    for root, shown in ((job_dir / "data", "."), (settings().data_root, "."),
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
