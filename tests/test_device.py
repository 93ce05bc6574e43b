"""The training device (`device`: auto, cpu, cuda; training/device.py): `auto` takes CUDA only where torch sees
it, a version records what trained it, and `cuda` on a machine without a CUDA device is one clear error, from
the CLI and from a retrain job's training process, with nothing published.

Real parts only: real CLI runs and training processes on small synthetic datasets. The tests marked for CUDA
run where torch sees a CUDA device and skip elsewhere; the ones about a missing device skip where there is one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, make_dataset, run_cli
from pydantic import ValidationError

from core.config import TrainRequest
from core.data import load_dataset
from core.store import Store
from training.device import CPU, describe, describe_before_fork, resolve_device
from training.errors import DeviceError
from training.pipeline import Run, input_contract

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device here")
without_cuda = pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
FAST = ("--strategy", "feature_extraction", "--head-epochs", "5", "--no-int8", "--parity-images", "2", "--json")


def test_auto_takes_cuda_only_where_torch_sees_it():
    assert resolve_device("auto") == (torch.device("cuda") if CUDA else CPU)
    assert resolve_device("cpu") == CPU
    assert TrainRequest().device == "auto"


def test_an_unknown_device_is_refused_naming_the_field(refit_home, tmp_path):
    with pytest.raises(ValidationError) as e:
        TrainRequest(device="tpu")
    assert [err["loc"] for err in e.value.errors()] == [("device",)]
    assert "'auto', 'cpu' or 'cuda'" in str(e.value)
    r = run_cli("train", tmp_path, "--device", "tpu", home=refit_home)
    assert r.returncode == 2 and "--device: invalid choice: 'tpu'" in r.stderr, r.stderr


@without_cuda
def test_cuda_without_a_device_is_one_clear_error_and_publishes_nothing(refit_home, tmp_path):
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    data = make_dataset(tmp_path / "data", n=4)
    r = run_cli("train", data, "--device", "cuda", *FAST, home=refit_home)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("refit: error: device 'cuda' was asked for, but "), r.stderr
    assert "no CUDA device" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    assert Store(refit_home).versions() == []


@without_cuda
def test_a_job_asking_for_cuda_without_one_fails_saying_so(refit_home, tmp_path):
    """The retrain path: the job's training process (the one `refit worker` and the service run) ends with an
    error.json a client reads as a 422 naming the device, and no traceback in its log."""
    data = make_dataset(tmp_path / "data", n=4)
    job_dir = refit_home / "jobs" / "20990101-000000-deadbeef"
    job_dir.mkdir(parents=True)
    request = TrainRequest(device="cuda", strategy="feature_extraction", head_epochs=5, int8=False)
    (job_dir / "job.json").write_text(json.dumps({"id": job_dir.name, "request": request.model_dump(),
                                                  "data": str(data)}))
    env = {**os.environ, "REFIT_HOME": str(refit_home), "BENTOML_HOME": str(refit_home)}
    done = subprocess.run([sys.executable, "-m", "training.jobrun", "run", str(job_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    error = json.loads((job_dir / "error.json").read_text())
    assert error["status"] == 422 and error["message"].startswith("device 'cuda' was asked for"), error
    assert "no CUDA device" in error["message"]
    assert "Traceback" not in done.stdout + done.stderr and not (job_dir / "result.json").exists()


def test_a_cpu_run_records_its_device(refit_home, tmp_path):
    data = make_dataset(tmp_path / "data", n=6)
    r = run_cli("train", data, "--device", "cpu", *FAST, home=refit_home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "device: cpu (" in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["device"] == {"type": "cpu", "requested": "cpu", "precision": "float32"}
    folder = refit_home / "models" / "refit" / out["version"]
    assert json.loads((folder / "metrics.json").read_text())["device"] == out["device"]
    config = json.loads((folder / "config.json").read_text())
    assert config["device"] == "cpu" and config["resolved"]["device"] == "cpu"


def test_the_worker_says_where_it_trains(refit_home, redis_url):
    """`refit worker` names its device as it starts, without initialising CUDA (its work horses are forked)."""
    env = {**os.environ, "REFIT_HOME": str(refit_home), "BENTOML_HOME": str(refit_home), "REFIT_QUEUE": redis_url}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--burst", "--name", "device-test"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines = time.monotonic() + 120, []
        while time.monotonic() < deadline and not any("training on" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.kill()  # it has said it; the warm-up after it is not what this test is about
        proc.wait(30)
    said = next((line.strip() for line in lines if "training on" in line), "".join(lines))
    expected = "refit worker: training on cuda (" if CUDA else "refit worker: training on cpu (no CUDA device)"
    assert said.startswith(expected), said


def test_describing_the_device_before_a_fork_leaves_cuda_uninitialised(monkeypatch):
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    was = torch.cuda.is_initialized()  # by another test of this process that trained on CUDA, say
    said = describe_before_fork()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert said.startswith("cuda (") if CUDA else said == describe(CPU) == "cpu (no CUDA device)"
    assert torch.cuda.is_initialized() == was


@needs_cuda
def test_a_forked_child_trains_on_cuda_after_the_worker_described_it():
    """What `refit worker` does: describe the device, then fork a work horse that trains on it."""
    code = ("import os, torch\n"
            "from training.device import describe_before_fork, resolve_device\n"
            "print(describe_before_fork())\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    d = resolve_device('auto')\n"
            "    x = torch.ones(4, device=d)\n"
            "    os._exit(0 if d.type == 'cuda' and float(x.sum()) == 4.0 else 1)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "raise SystemExit(os.waitstatus_to_exitcode(status))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"})
    assert done.returncode == 0, done.stdout + done.stderr


@needs_cuda
def test_partial_on_cuda_trains_the_unfrozen_layers_and_ends_on_the_cpu(tmp_path):
    """Head and partial fine-tuning on the GPU (cached activations computed there): the unfrozen stages move,
    the frozen ones do not, and the model is back on the CPU in float32 for the export."""
    data = make_dataset(tmp_path / "data", classes=("red", "blue", "green"), n=12, split=True)
    req = TrainRequest(strategy="partial", epochs=3, cache_views=2, unfreeze_blocks=2, head_epochs=20, patience=5)
    ds = load_dataset(data, contract=input_contract(req), log_fn=lambda _: None)
    run = Run(req, ds, lambda _: None, tmp_path / "cache")
    assert run.device.type == "cuda"
    before = {k: v.clone() for k, v in run.backbone(pretrained=True).model.state_dict().items()}
    bb, history, summary = run.run("partial")
    assert summary["activation_cache"]["used"] and summary["activation_cache"]["views_made"] == 2
    after = bb.model.state_dict()
    assert all(v.device.type == "cpu" and (v.dtype == before[k].dtype) for k, v in after.items())
    assert not torch.equal(after["_conv_head.weight"], before["_conv_head.weight"])
    assert torch.equal(after["_blocks.15._project_conv.weight"], before["_blocks.15._project_conv.weight"])
    assert [h["epoch"] for h in history if h["phase"] == "partial"] == [1, 2, 3]


@needs_cuda
def test_a_cuda_run_publishes_a_version_served_as_any_other(refit_home, tmp_path):
    data = make_dataset(tmp_path / "data", n=60, split=True)
    r = run_cli("train", data, "--device", "cuda", "--strategy", "partial", "--epochs", "2", "--head-epochs", "20",
                "--json", home=refit_home)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["device"]["type"] == "cuda" and out["device"]["precision"].endswith("autocast")
    assert out["parity"]["passed"] and out["val_accuracy"] > 0.9
    sess = ort.InferenceSession(str(refit_home / "models" / "refit" / out["version"] / "model.onnx"))
    probs = sess.run(["probs"], {"input": np.zeros((1, 3, 224, 224), np.float32)})[0]
    assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-5
