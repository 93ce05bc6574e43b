"""How a version is built and becomes visible, all or nothing.

Every publish builds its entry (core.entry) in a staging folder of its own, `tmp/staging-<id>`, flocked for as
long as the publish runs, so `sweep` removes exactly the staging folders whose publish is gone. Then:

- a folder store (`RenameCommit`): under the folder's lock the number is the next after every entry there
  (partial ones, a killed publish's, are removed first), and the built entry is renamed into place, the
  commit point; the `latest` file BentoML's local store keeps is written beside it;
- any other store (core.claims.ClaimedCommit): the number is claimed, the files uploaded, model.yaml last.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from core.clock import now_iso
from core.entry import MODEL_NAME, VERSION_RE, write_entry
from core.objects import ObjectStore

log = logging.getLogger("refit.store")


class Staging:
    """Staging folders under `tmp`, each flocked while its publish runs."""

    def __init__(self, tmp: Path, model_name: str = MODEL_NAME):
        self.tmp = tmp
        self.model_name = model_name  # BentoML's name of the model line: one per project
        self._held: dict[Path, int] = {}  # staging folder -> fd of the flock that marks it in use

    def build(self, version: str, files: dict[str, Path], metadata: dict, labels: dict | None,
              stamp: Callable[[str], dict] | None) -> tuple[Path, Path]:
        """The entry built in a staging folder; returns (entry folder, staging folder). `stamp(version)` runs
        once the id is known (to write it into the files) and returns extra metadata."""
        staging = self.tmp / f"staging-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        self._held[staging] = _hold_flock(staging)  # in use: `sweep` leaves it alone
        try:
            extra = stamp(version) if stamp else {}
            metadata = {**metadata, **extra, "version": version, "created": now_iso()}
            entry = write_entry(staging / self.model_name / version, version, files, metadata, labels or {},
                                self.model_name)
        except BaseException:
            self.drop(staging)
            raise
        return entry, staging

    def drop(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        fd = self._held.pop(staging, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def sweep(self) -> list[str]:
        """Staging folders no process holds (each is flocked while its publish runs)."""
        removed = []
        for staging in sorted(self.tmp.glob("staging-*")):
            if staging.is_dir() and _unheld(staging):
                log.warning("removing a staging folder a killed publish left: %s", staging)
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(str(staging))
        return removed


class RenameCommit:
    """A folder store's versions: numbered and renamed into place under the folder's lock."""

    def __init__(self, objects: ObjectStore, models_dir: Path, tmp: Path, listed: Callable[[], list[str]]):
        self.objects, self.models_dir, self.tmp, self.listed = objects, models_dir, tmp, listed

    @contextlib.contextmanager
    def claim(self, version: str | None) -> Iterator[str]:
        """The next number, held with the folder's lock until the block ends; or exactly `version` (an entry
        made elsewhere, copied in)."""
        if version is not None:
            yield version
            return
        with self.objects.locked():
            self.tmp.mkdir(parents=True, exist_ok=True)
            # Anything left in staging while we hold the lock belongs to a crashed publish.
            for stale in self.tmp.glob("staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
            existing = self.listed()
            partial = [p for p in self.models_dir.glob("v*") if p.is_dir() and p.name not in existing]
            for p in partial:
                shutil.rmtree(p, ignore_errors=True)
            n = max([int(v[1:]) for v in existing] + [int(p.name[1:]) for p in partial
                                                        if VERSION_RE.match(p.name)] + [0]) + 1
            yield f"v{n:04d}"

    def commit(self, version: str, folder: Path, *, move: bool) -> None:
        """`move`: the built entry, synced, renamed into place (the commit point). Else a copy of `folder`."""
        if not move:
            shutil.copytree(folder, self.models_dir / version)
            return
        for f in folder.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(folder, self.models_dir / version)  # the commit point
        tmp_latest = self.models_dir / f".latest.{uuid.uuid4().hex}"
        tmp_latest.write_text(version)
        os.replace(tmp_latest, self.models_dir / "latest")

    def sweep(self) -> list[str]:
        return []  # a publish's own lock removes what a killed one left in the entries


def _hold_flock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies, however it dies
    return fd


def _unheld(path: Path) -> bool:
    """No process holds `path`'s flock (the one `_hold_flock` takes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
