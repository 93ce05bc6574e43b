"""The training errors a caller reports as one line (`refit: error: ...`), in a module without torch, so the
command line can catch them without paying torch's import on commands that never train."""
from __future__ import annotations


class BackboneError(ValueError):
    """An unknown backbone name, or a weights file that does not fit (training/registry.py)."""


class ExportError(RuntimeError):
    """A model file without Refit's contract, or an export that PyTorch does not agree with (training/export.py)."""


class DeviceError(ValueError):
    """A training device that this machine does not have (training/device.py): `device cuda` without a CUDA
    device."""
