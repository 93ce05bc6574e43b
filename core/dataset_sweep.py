"""What a killed dataset add leaves behind, removed at start (`bentoml serve`, `refit dataset add`, and
`refit dataset sweep` on demand), never what a live add is still using:

- its temp folder (the upload and its unpacked copy): under REFIT_HOME/tmp/runs, held with an flock for as
  long as its process lives (core.scratch), so the sweep removes exactly the folders whose process is
  gone. Folders of the older layout (REFIT_HOME/tmp/refit-dataset-*, no lock) go once older than
  REFIT_DATASET_TMP_GRACE_SECONDS.
- half-written files of a folder store (`.*.tmp` beside the blobs and records): older than that same grace.
- images (blobs) that no snapshot of any dataset names: an add writes its images before its snapshot, on any
  machine of the store, so only once older than REFIT_DATASET_BLOB_GRACE_SECONDS (a day by default: longer
  than any add). An add that finds its image already stored refreshes the image's time (`freshen`, as git
  does for objects it would have written), so an old orphan that an add is about to name again is kept.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from core import snapshots
from core.scratch import sweep as sweep_run_folders
from core.settings import settings
from core.store import Store, StoreError

log = logging.getLogger("refit.datasets")

ROOT = "datasets"
BLOBS = f"{ROOT}/blobs"


def tmp_grace() -> float:
    return settings().dataset_tmp_grace_seconds


def blob_grace() -> float:
    return settings().dataset_blob_grace_seconds


def sweep(store: Store, *, blobs: bool = True, tmp_age: float | None = None, blob_age: float | None = None
          ) -> dict:
    """Remove what killed adds left; returns what was removed, by kind. Never raises for the store."""
    out = sweep_local(store, tmp_age)
    if blobs:
        try:
            out["blobs"] = sweep_blobs(store, blob_age)
        except StoreError as e:
            log.warning("dataset sweep: unreferenced images were not looked for: %s", e)
            out["blobs"] = []
    if any(out.values()):
        log.warning("dataset sweep: removed %s", ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    return out


def sweep_local(store: Store, tmp_age: float | None = None) -> dict:
    """This machine's leftovers: temp folders of adds (and runs) whose process is gone, and `.tmp` files."""
    age = tmp_grace() if tmp_age is None else tmp_age
    now = time.time()
    folders = sweep_run_folders(store.home)
    for d in sorted((store.home / "tmp").glob("refit-dataset-*")):
        if d.is_dir() and now - _newest(d) >= age:
            shutil.rmtree(d, ignore_errors=True)
            folders.append(d.name)
    return {"temp folders": folders, "temp files": store.objects.sweep_temp(ROOT, age)}


def _newest(d: Path) -> float:
    """The newest modification time in a folder's tree: an old folder may still be written into."""
    times = [d.stat().st_mtime]
    for p in d.rglob("*"):
        try:
            times.append(p.lstat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times)


def sweep_blobs(store: Store, blob_age: float | None = None) -> list[str]:
    """Delete images no snapshot names and older than the grace. References are read first, then the
    images listed, and each one's age read again just before it is deleted."""
    age = blob_grace() if blob_age is None else blob_age
    names = referenced(store)
    removed = []
    for rel, modified in _listing(store, BLOBS):
        sha = rel.rsplit("/", 1)[-1]
        if sha in names or time.time() - modified < age:
            continue
        again = _modified(store, rel)
        if again is None or time.time() - again < age:
            continue  # gone already, or an add freshened it since the listing
        store.delete_record(rel)
        removed.append(sha)
    return removed


def referenced(store: Store) -> set[str]:
    """Every image any snapshot of any dataset names (files of both formats, and records heads carry)."""
    names: set[str] = set()
    for name in store.folders(ROOT):
        if name == "blobs":
            continue
        head, tag = store.record(f"{ROOT}/{name}/head.json")
        if head is None and tag is not None:
            raise StoreError(f"{ROOT}/{name}/head.json is damaged; no image is removed")
        names |= snapshots.referenced((head or {}).get("record") or {})
        for rel in store.keys(f"{ROOT}/{name}/snapshots/"):
            if not rel.endswith(".json"):
                continue
            record, tag = store.record(rel)
            if record is None:
                if tag is None:
                    continue  # listed, then gone: never happens to a snapshot, but is no damage
                raise StoreError(f"{rel} is damaged (not JSON); no image is removed")
            names |= snapshots.referenced(record)
    return names


def _listing(store: Store, prefix: str) -> list[tuple[str, float]]:
    """(key, modification time) of every object under `prefix`."""
    return [(o.key, o.modified) for o in store.objects.listing(prefix)]


def _modified(store: Store, rel: str) -> float | None:
    return store.objects.modified(rel)


def freshen(store: Store, rel: str, data: bytes) -> bool:
    """True when the image is stored already, its time made recent enough that no sweep takes it for an
    orphan while the add that names it is still running; False when it is not stored."""
    return store.objects.freshen(rel, data, older_than=blob_grace() / 2)
