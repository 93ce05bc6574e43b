"""Temporary folders of training runs, kept under REFIT_HOME/tmp/runs instead of the system temp dir.

A run killed with SIGKILL never removes its temp folder (an unpacked dataset, ONNX files). Kept under the
store's home, such folders can be found again; each is held with an flock for as long as its process lives,
so `sweep` (run by the service at start) removes exactly the folders whose process is gone and never one
that a live `refit train` is using.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("refit.scratch")


def scratch_root(home: Path) -> Path:
    # A folder of its own: REFIT_HOME/tmp also holds the store's staging folders, which are not ours to sweep.
    return home / "tmp" / "runs"


@contextmanager
def run_folder(home: Path, prefix: str = "run") -> Iterator[Path]:
    """A fresh folder under REFIT_HOME/tmp/runs, locked while the caller uses it and removed afterwards."""
    path = scratch_root(home) / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies, however it dies
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(home: Path) -> list[str]:
    """Remove the folders of runs whose process is gone; returns their names."""
    removed = []
    root = scratch_root(home)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run holds it
        finally:
            os.close(fd)
        log.warning("removing the temp folder of a run that was killed: %s", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
