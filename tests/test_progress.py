"""A training run's progress (phase, epoch, best validation accuracy so far, time left) where people wait on
it: the CLI's stderr (a line per phase in a log, a bar on a terminal), a retrain job's state over HTTP
(GET /jobs/{id}, /retrain/status), and a queued job's record as a `refit worker` heartbeat writes it.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid

import httpx
import pytest
from conftest import ROOT, make_dataset, run_cli
from serving import AUTH, Server, copy_store, dataset_files, make_zip

PHASES = ("preparing", "features", "head", "partial", "full", "scratch", "finishing", "done")
FIELDS = {"phase", "epoch", "epochs", "best_val_acc", "eta_seconds", "elapsed_seconds", "message"}


def phases_of(states: list[dict]) -> list[str]:
    """The phases in the order they were seen, each once per stretch."""
    out: list[str] = []
    for s in states:
        if not out or out[-1] != s["phase"]:
            out.append(s["phase"])
    return out


# --- the CLI ------------------------------------------------------------------------------------------

def test_cli_prints_a_line_per_phase_when_stderr_is_not_a_terminal(tmp_path):
    """A log (CI, a pipe) gets no redrawn bar: one `progress:` line per phase and per fine-tuning epoch,
    phases in order, ending with done; --json keeps stdout to the one summary line."""
    data = make_dataset(tmp_path / "data", n=12)
    done = run_cli("train", data, "--strategy", "partial", "--epochs", "2", "--patience", "5", "--no-int8",
                   "--json", home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["version"] == "v0001", done.stdout
    lines = [ln[len("progress: "):] for ln in done.stderr.splitlines() if ln.startswith("progress: ")]
    print("\n".join(lines))
    assert "\r" not in done.stderr  # nothing redrawn in a log
    seen = phases_of([{"phase": ln.split(",")[0].split(" ")[0]} for ln in lines])
    assert seen == ["preparing", "features", "head", "partial", "finishing", "done"], lines
    epochs = [ln for ln in lines if ln.startswith("partial epoch ") and not ln.startswith("partial epoch 0/")]
    assert [ln.split(",")[0] for ln in epochs] == ["partial epoch 1/2", "partial epoch 2/2"], lines
    assert all("best val acc " in ln and " s left" in ln for ln in epochs), epochs
    assert lines[-1].startswith("done in ") and ", best val acc " in lines[-1], lines
    # The head's hundreds of epochs do not each get a line.
    assert sum(ln.startswith("head") for ln in lines) == 1, lines


def run_cli_on_a_terminal(*args, home, timeout: int = 600) -> tuple[subprocess.CompletedProcess, str]:
    """The CLI with stderr on a pseudo-terminal (120 columns), stdout a pipe: (the run, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    got: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                return
            if not chunk:
                return
            got.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=timeout)
    reader.join(10)
    os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ""), b"".join(got).decode(errors="replace")


def test_cli_draws_a_progress_bar_on_a_terminal(tmp_path):
    data = make_dataset(tmp_path / "data", n=12)
    done, terminal = run_cli_on_a_terminal("train", data, "--strategy", "partial", "--epochs", "2", "--no-int8",
                                           "--json", home=tmp_path / "home")
    assert done.returncode == 0, terminal[-3000:]
    out = done.stdout.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["strategy"] == "partial", done.stdout
    # Redrawn in place: carriage returns, the phase with its epoch of epochs, best accuracy and time left.
    frames = [f for f in terminal.replace("\n", "\r").split("\r") if f.strip()]
    assert any(f.startswith("partial 2/2 |") and "best val acc" in f and "s left" in f for f in frames), frames
    assert any(f.startswith("finishing") for f in frames), frames
    assert not any(f.startswith("progress: ") for f in frames), frames  # the bar, not the log lines
    # The log lines still print (above the bar).
    assert any(f.startswith("published v0001") for f in frames), frames


# --- a retrain job over HTTP --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    make_dataset(root / "data" / "colours", n=24)
    srv = Server(copy_store(imagenet_store, root / "home"), root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop(kill=True)


def test_a_running_job_shows_phase_epoch_accuracy_and_time_left(server):
    """GET /jobs/{id} polled while a job trains: `progress` is a dict of the run's state whose phases come in
    order; a fine-tuning epoch has its epoch of epochs, best accuracy so far and time left. /retrain/status
    carries the same while the job runs, and the finished job keeps its last state (done)."""
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        r = http.post("/retrain/submit", json={"data_path": "colours", "strategy": "full", "epochs": 3,
                                               "patience": 5, "promote": False, "int8": False})
        assert r.status_code == 200, r.text
        task = r.json()["task_id"]
        seen, from_status = [], []
        deadline = time.monotonic() + 600
        while (job := http.get(f"/jobs/{task}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            if job["status"] == "running" and job.get("progress") is not None:
                seen.append(job["progress"])
                status = http.get("/retrain/status", params={"task_id": task}).json()
                if status["status"] == "in_progress" and status.get("progress"):
                    from_status.append(status["progress"])
            time.sleep(0.15)
    assert job["status"] == "succeeded", job
    print(f"{len(seen)} states while running; phases {phases_of([s for s in seen if isinstance(s, dict)])}")
    states = [s for s in seen if isinstance(s, dict)]
    assert states, f"no structured progress while the job ran: {seen[:5]}"
    assert all(FIELDS <= s.keys() for s in states), states[0]
    order = [PHASES.index(p) for p in phases_of(states)]
    assert order == sorted(order) and "full" in phases_of(states), phases_of(states)
    tuning = [s for s in states if s["phase"] == "full" and s["epoch"]]
    assert tuning, phases_of(states)
    for s in tuning:
        assert s["epochs"] == 3 and 1 <= s["epoch"] <= 3, s
        assert 0 <= s["best_val_acc"] <= 1 and s["eta_seconds"] >= 0, s
        assert s["message"].startswith(f"full epoch {s['epoch']}/3, best val acc "), s
    assert [s["elapsed_seconds"] for s in states] == sorted(s["elapsed_seconds"] for s in states)
    assert from_status and all(FIELDS <= s.keys() for s in from_status), from_status[:3]
    assert job["progress"]["phase"] == "done" and job["progress"]["best_val_acc"] is not None, job["progress"]


# --- a queued job, trained by a `refit worker` ----------------------------------------------------------

def test_a_queued_job_record_carries_the_progress_dict(imagenet_store, redis_url, tmp_path):
    """With REFIT_QUEUE the job runs in a `refit worker`; its heartbeat writes the same dict into the job's
    record in the store (at once on every phase change), which any replica answers GET /jobs/{id} from."""
    from test_cluster import ENV, Worker

    store = copy_store(imagenet_store, tmp_path / "store")
    queue = f"{redis_url[:-1]}{1 + uuid.uuid4().int % 15}"  # a database of its own on the shared Redis
    worker = Worker("w1", tmp_path / "w1", str(store), queue)
    srv = Server(tmp_path / "a", tmp_path / "data", tmp_path / "a.log",
                 env={**ENV, "REFIT_STORE": str(store), "REFIT_QUEUE": queue})
    try:
        srv.start()
        worker.wait_listening()
        r = httpx.post(srv.url + "/retrain/submit", files={"dataset": ("colours.zip", make_zip(dataset_files()))},
                       data={"strategy": "full", "epochs": "3", "promote": "false", "int8": "false"},
                       headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        task = r.json()["task_id"]
        seen = []
        deadline = time.monotonic() + 400
        while (job := httpx.get(f"{srv.url}/jobs/{task}", headers=AUTH, timeout=30).json())["status"] in (
                "queued", "running"):
            assert time.monotonic() < deadline, job
            if job["status"] == "running" and job.get("progress") is not None:
                seen.append(job["progress"])
            time.sleep(0.2)
    finally:
        worker.stop()
        srv.stop(kill=True)
    assert job["status"] == "succeeded", job
    print(f"{len(seen)} states while running; phases {phases_of(seen)}")
    assert seen and all(isinstance(s, dict) and FIELDS <= s.keys() for s in seen), seen[:3]
    order = [PHASES.index(p) for p in phases_of(seen)]
    assert order == sorted(order) and len(order) >= 2, phases_of(seen)
    # The record is small: the dict, not a log.
    assert len(json.dumps(seen[-1])) < 400, seen[-1]
    assert job["progress"]["phase"] == "done", job["progress"]
