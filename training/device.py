"""Where a run trains: the request's `device` (auto, cpu, cuda) made a torch device, and what runs differently on
an accelerator. Every check of the device is here; the training code asks this module and otherwise moves its
tensors with `.to(device)`, which on the CPU returns them unchanged, so a CPU run computes what it always did.

On CUDA, fine-tuning runs under autocast: bfloat16 where the GPU has it (no loss scaling needed), else float16
with a GradScaler. The frozen passes that fill the feature and activation caches run on the device too, under
the same autocast; the caches keep float32 arrays in host memory as on the CPU. The head on cached features
trains on the device in float32 (one linear layer has nothing to gain from half precision). Models go back to
the CPU when a step ends, so the export, the parity check and the version's figures are computed as on a CPU
run, in float32, from the exported file.

    python -m training.device     # prints what `auto` trains on here, e.g. "cuda (NVIDIA H100 ..., torch 2.9)"
"""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import numpy as np
import torch
from torch import nn

from training.errors import DeviceError

CPU = torch.device("cpu")
CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """`auto`: CUDA when torch sees a CUDA device, else the CPU; `cuda` without one is a DeviceError saying why."""
    if choice not in CHOICES:
        raise DeviceError(f"device {choice!r}: not one of {', '.join(CHOICES)}")
    if choice == "cpu":
        return CPU
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "auto":
        return CPU
    raise DeviceError(f"device 'cuda' was asked for, but {no_cuda_reason()}; ask for device 'auto' (the CPU "
                      "when there is no CUDA device) or 'cpu'")


def no_cuda_reason() -> str:
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is built without CUDA"
    return f"there is no CUDA device on this machine (torch {torch.__version__}, built for CUDA {torch.version.cuda})"


@functools.cache  # asked at every batch; the answer of a device does not change
def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on `device`; None on the CPU, which trains in float32 as it always has."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device):
    """Mixed precision on CUDA; on the CPU nothing (float32, exactly as before)."""
    dtype = amp_dtype(device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast; a disabled scaler (scale, step and update pass through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device) is torch.float16)


def describe(device: torch.device) -> str:
    """One line for logs: `cuda (NVIDIA H100 80GB HBM3, torch 2.9.1, bfloat16 autocast)` or `cpu (no CUDA
    device)`."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, torch {torch.__version__}, {_precision(device)})"
    if torch.cuda.is_available():
        return "cpu (as asked; a CUDA device is present)"
    return "cpu (no CUDA device)" if torch.backends.cuda.is_built() else f"cpu (torch {torch.__version__} without CUDA)"


def record(device: torch.device, requested: str) -> dict:
    """metrics.json's `device`: what trained the version, and in which precision."""
    if device.type == "cuda":
        return {"type": "cuda", "requested": requested, "name": torch.cuda.get_device_name(device),
                "cuda": torch.version.cuda, "precision": _precision(device)}
    return {"type": "cpu", "requested": requested, "precision": _precision(device)}


def _precision(device: torch.device) -> str:
    """`bfloat16 autocast`, `float16 autocast`, or `float32` where there is no autocast (the CPU)."""
    dtype = amp_dtype(device)
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def describe_before_fork() -> str:
    """What `auto` trains on, told without initialising CUDA in this process. `refit worker` forks a work horse
    per job, and CUDA cannot be used in a child forked after the parent initialised it (torch's "Cannot
    re-initialize CUDA in forked subprocess"); torch's default availability check initialises the driver. So
    NVML counts the devices (PYTORCH_NVML_BASED_CUDA_CHECK, set here for this process and its horses), and a
    device it finds is described by a short child process, which may initialise CUDA."""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    if not torch.cuda.is_available():
        return describe(CPU)
    try:
        done = subprocess.run([sys.executable, "-m", "training.device"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "cuda (its description timed out)"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else f"cuda ({(lines or ['undescribed'])[-1]})"


class TorchSession:
    """A frozen module run in torch on `device`, answering as an ONNX Runtime session does (`run(None,
    {"input": x})` -> [float32 array]), so the feature and activation caches take either. The module runs in
    eval mode (as its ONNX export would), and every submodule's own mode is put back after each call."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module.to(device), device

    def run(self, _outputs, feeds: dict) -> list[np.ndarray]:
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            with torch.no_grad(), autocast(self.device):
                x = torch.from_numpy(feeds["input"]).to(self.device, non_blocking=True)
                return [self.module(x).float().cpu().numpy()]
        finally:
            for m, mode in modes:
                m.training = mode


if __name__ == "__main__":
    try:
        print(describe(resolve_device("auto")))
    except Exception as e:  # noqa: BLE001 - a broken driver: say what it said, in one line
        print(f"{type(e).__name__}: {e}")
        sys.exit(1)
