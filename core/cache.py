"""Where this machine reads a version's files: in place (a folder store: the store is here), or from checked
copies of a remote store's versions under `REFIT_HOME/models/refit/vNNNN`.

A copy is downloaded to a temp folder, checked against the checksums recorded at publish time, then renamed
into place: BentoML's local model store is the cache, so `bentoml models list` shows what a replica holds. A
cached copy is used only while its model.yaml is the store's: an id alone does not name a model (a bucket
re-created empty hands out v0001 again), and a copy cached from the old one must never be served for it.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from core.entry import ENTRIES, MODEL_YAML, VERSION_RE, check_files, metadata_of
from core.objects import ObjectStore, StoreError

log = logging.getLogger("refit.store")


class InPlace:
    """A folder store's versions, read where they are."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir

    def path(self, version: str) -> Path:
        return self.models_dir / version

    def entry_file(self, version: str, name: str, missing_ok: bool = False, record: bytes | None = None
                   ) -> bytes | None:
        return _read_local(self.models_dir, version, name, missing_ok)

    def newest_held(self) -> str | None:
        return None  # nothing is cached: the store is here

    def adopt(self, version: str, built: Path) -> None:
        """Nothing to keep: a folder store's publish renamed the version into place."""


class CheckedCopies:
    """A remote store's versions, served from checked copies in `models_dir` (this machine's cache)."""

    def __init__(self, objects: ObjectStore, models_dir: Path, tmp: Path, entries: str = ENTRIES):
        self.objects, self.models_dir, self.tmp = objects, models_dir, tmp
        self.entries = entries  # the model line's folder in the store: one per project

    def store_record(self, version: str, missing_ok: bool = False) -> bytes | None:
        """The version's model.yaml as the store holds it now."""
        got = self.objects.get(f"{self.entries}{version}/{MODEL_YAML}")
        if got is None and not missing_ok:
            raise StoreError(f"{version}: model.yaml is missing from {self.objects.url}")
        return got[0] if got else None

    def cached_is(self, version: str, record: bytes | None) -> bool:
        """Whether this machine's cached copy of `version` is the one whose model.yaml is `record`."""
        try:
            return record is not None and (self.models_dir / version / MODEL_YAML).read_bytes() == record
        except OSError:
            return False

    def entry_file(self, version: str, name: str, missing_ok: bool = False, record: bytes | None = None
                   ) -> bytes | None:
        """model.yaml (the store's own record of the version) always from the store, and any other file from
        the cached copy only when that copy is the store's (the same model.yaml; `record`, when the caller has
        just read it), else from the store: one figure is shown without downloading the whole version."""
        if name == MODEL_YAML:
            return self.store_record(version, missing_ok=missing_ok)
        if self.cached_is(version, record or self.store_record(version, missing_ok=True)):
            return _read_local(self.models_dir, version, name, missing_ok)
        got = self.objects.get(f"{self.entries}{version}/{name}")
        if got is None and not missing_ok:
            raise StoreError(f"{version}: {name} is missing from {self.objects.url}")
        return got[0] if got else None

    def newest_held(self) -> str | None:
        held = [p.name for p in self.models_dir.iterdir() if VERSION_RE.match(p.name) and (p / MODEL_YAML).is_file()]
        return max(held, key=lambda v: int(v[1:]), default=None)

    def adopt(self, version: str, built: Path) -> None:
        """The publisher has the files it just uploaded: they become its cached copy at no cost."""
        try:
            os.rename(built, self.models_dir / version)
        except OSError:
            pass  # another process of this machine cached it first

    def evict(self, version: str, record: bytes | None, why: str) -> None:
        """Move a cached copy that is not the store's (`record`) out of the cache (a rename: a process reading
        it keeps its open files), then remove it. Another process of this machine may have evicted it and
        fetched the store's copy since we looked: that one is checked again before and after the move, and
        put back."""
        if self.cached_is(version, record):
            return
        aside = self.tmp / f"replaced-{version}-{uuid.uuid4().hex}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.models_dir / version, aside)
        except FileNotFoundError:
            return  # another process of this machine moved it first
        try:
            fetched = record is not None and (aside / MODEL_YAML).read_bytes() == record
        except OSError:
            fetched = False
        if fetched:
            try:
                os.rename(aside, self.models_dir / version)
            except OSError:  # a third one fetched it again meanwhile: that copy stays, this one goes
                shutil.rmtree(aside, ignore_errors=True)
            return
        log.warning("%s: the cached copy in %s is not the store's (%s); fetching the store's", version,
                    self.models_dir, why)
        shutil.rmtree(aside, ignore_errors=True)

    def path(self, version: str) -> Path:
        """Used from the cache only when its model.yaml is the store's, else downloaded into a temp folder,
        checked against the checksums in its model.yaml, then renamed into the cache, so the cache only ever
        holds whole, checked versions (several processes may race; the first rename wins, the others drop
        theirs)."""
        dest = self.models_dir / version
        record = self.store_record(version)
        if self.cached_is(version, record):
            return dest
        if (dest / MODEL_YAML).is_file():
            self.evict(version, record, f"its model.yaml differs from the one in {self.objects.url}")
            if self.cached_is(version, record):
                return dest  # another process fetched the store's copy meanwhile
        tmp = self.tmp / f"fetch-{version}-{uuid.uuid4().hex}"
        try:
            self._fetch(version, tmp)
            if dest.exists() and not (dest / MODEL_YAML).is_file():
                shutil.rmtree(dest, ignore_errors=True)  # a copy some crash left half made
            try:
                os.rename(tmp, dest)
            except OSError:
                if not self.cached_is(version, (tmp / MODEL_YAML).read_bytes()):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _fetch(self, version: str, tmp: Path) -> None:
        prefix = f"{self.entries}{version}/"
        for key in self.objects.list(prefix):
            name = key[len(prefix):]
            if name and not name.startswith("."):  # .claim is the store's bookkeeping, not the model's
                self.objects.download(key, tmp / name)
        if not (tmp / MODEL_YAML).is_file():
            raise StoreError(f"{version}: model.yaml is missing from {self.objects.url}")
        check_files(version, tmp, metadata_of((tmp / MODEL_YAML).read_text()), where=f" in {self.objects.url}")


def _read_local(models_dir: Path, version: str, name: str, missing_ok: bool) -> bytes | None:
    """A file of a version held on this machine (the folder store itself, or a checked copy of a remote one)."""
    try:
        return (models_dir / version / name).read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise StoreError(f"{version}: {name} is missing") from None
