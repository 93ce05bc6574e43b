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
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("refit.scratch")

# A folder under its dot-name lives from mkdir to rename, microseconds; one older than this was left by a
# process killed in between (empty), and goes once no one holds it.
HIDDEN_GRACE = 60.0


def scratch_root(home: Path) -> Path:
    # A folder of its own: REFIT_HOME/tmp also holds the store's staging folders, which are not ours to sweep.
    return home / "tmp" / "runs"


@contextmanager
def run_folder(home: Path, prefix: str = "run") -> Iterator[Path]:
    """A fresh folder under REFIT_HOME/tmp/runs, locked while the caller uses it and removed afterwards."""
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = scratch_root(home) / name
    # Made and locked under a dot-name, then renamed into place (the lock is on the folder, so it goes with
    # it): a sweep between mkdir and flock would find the folder unlocked and remove it from under its maker.
    hidden = scratch_root(home) / f".{name}"
    hidden.mkdir(parents=True)
    fd = os.open(hidden, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies, however it dies
        hidden.rename(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(hidden, ignore_errors=True)  # there only when the rename failed
        os.close(fd)


def _younger(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except FileNotFoundError:
        return True  # renamed into place meanwhile


def sweep(home: Path) -> list[str]:
    """Remove the folders of runs whose process is gone; returns their names."""
    removed = []
    root = scratch_root(home)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") and _younger(path, HIDDEN_GRACE):
            continue  # a folder being made: not locked yet (run_folder)
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
