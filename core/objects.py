"""What the store needs of the place its objects live, and that place as a folder.

The store (versions, the promoted pointer, claims, records, datasets) is written once over `ObjectStore`: keys
relative to the store's root, objects read and written whole, and two conditional writes (`create_only`,
`if_match`) that raise `Conflict` when another writer came first. Two backends implement it: `Folder` (here) and
`core.s3.Bucket`. Where a folder has no ETags, its conditional writes compare a hash of the bytes under a file
lock (`locked()`), which on S3 is a no-op: S3's writes are conditional on the server.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Protocol


class StoreError(Exception):
    pass


class Conflict(Exception):
    """A conditional write lost: the object changed (If-Match) or already exists (If-None-Match)."""


class Listed(NamedTuple):
    key: str
    size: int
    modified: float  # seconds since the epoch


class ObjectStore(Protocol):
    url: str  # how the store is named to a person (a folder's path, s3://bucket/prefix)
    root: Optional[Path]  # the folder its objects are files in, on this machine; None for a remote store
    json_indent: Optional[int]  # how records are written: indented in a folder (read by people), compact on S3

    def get(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and the tag a conditional write over it needs; None when there is none."""

    def put(self, rel: str, data: bytes, *, if_match: str | None = None, create_only: bool = False) -> str:
        """Write the object whole; with `if_match` only over that tag, with `create_only` only where there is
        none (Conflict otherwise). Returns the new tag."""

    def exists(self, rel: str) -> bool: ...

    def signature(self, rel: str) -> object:
        """Changes whenever the object does; cheap enough to poll. None when there is none."""

    def modified(self, rel: str) -> float | None: ...

    def freshen(self, rel: str, data: bytes, older_than: float) -> bool:
        """Make the object recent (its bytes are `data`) where it is older than `older_than` seconds; False when
        there is none."""

    def delete(self, rel: str) -> None:
        """Removing an object that is not there is not an error."""

    def list(self, prefix: str) -> list[str]:
        """Keys of every object under `prefix`, sorted."""

    def listing(self, prefix: str) -> list[Listed]: ...

    def folders(self, prefix: str) -> list[str]:
        """Names of the folders directly under `prefix`, sorted."""

    def folders_with(self, prefix: str, name: str) -> list[str]:
        """Names of the folders directly under `prefix` that hold an object `name` (versions with their marker)."""

    def upload(self, rel: str, path: Path) -> None: ...

    def download(self, rel: str, path: Path) -> None: ...

    def download_all(self, pairs: list[tuple[str, Path]]) -> None:
        """Every (key, path), as cheaply as the backend can; FileNotFoundError(key) for a missing one."""

    def sweep_temp(self, prefix: str, age: float) -> list[str]:
        """Remove half-written files (of writers that died) under `prefix` older than `age`; their names."""

    def locked(self) -> contextlib.AbstractContextManager:
        """One writer at a time where the backend needs it for a read-modify-write (a folder); re-entrant."""


def open_objects(url: str) -> ObjectStore:
    """The backend a REFIT_STORE value names: s3://bucket/prefix, or a folder path."""
    if url.startswith("s3://"):
        from core.s3 import Bucket  # boto3 only for a store that needs it

        return Bucket(url)
    if "://" in url:
        raise StoreError(f"REFIT_STORE={url!r} is not a store this version knows; use a folder path "
                         "or s3://bucket/prefix")
    return Folder(Path(url).expanduser().resolve())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: Path, data) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    _atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode())


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # `sweep_temp` knows this name


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    _write_synced(tmp, data)
    os.replace(tmp, path)


class Folder:
    """Objects as files under `root`. Whole writes are a temp file renamed into place; a create-only write is a
    hard link (which fails where the target exists); a write over a tag compares under the folder's lock."""

    json_indent = 2

    def __init__(self, root: Path):
        self.root = root
        self.url = str(root)
        self._held = threading.local()  # this thread's depth in `locked()`: the flock is taken once

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across processes of one machine (CLI, service workers, retrain jobs)."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".refit.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, rel: str) -> tuple[bytes, str] | None:
        try:
            raw = (self.root / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return raw, hashlib.sha256(raw).hexdigest()

    def put(self, rel: str, data: bytes, *, if_match: str | None = None, create_only: bool = False) -> str:
        dest = self.root / rel
        if if_match:
            with self.locked():  # compare and write under the machine's lock
                got = self.get(rel)
                if got is None or got[1] != if_match:
                    raise Conflict(f"{self.url}/{rel}: changed since it was read")
                _atomic_write(dest, data)
        elif create_only:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_beside(dest)
            _write_synced(tmp, data)
            try:
                os.link(tmp, dest)  # fails when the target exists: a create-only write without a lock
            except FileExistsError:
                raise Conflict(f"{self.url}/{rel}: exists") from None
            finally:
                tmp.unlink(missing_ok=True)
        else:
            _atomic_write(dest, data)
        return hashlib.sha256(data).hexdigest()

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def signature(self, rel: str) -> object:
        try:
            st = (self.root / rel).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def modified(self, rel: str) -> float | None:
        try:
            return (self.root / rel).stat().st_mtime
        except FileNotFoundError:
            return None

    def freshen(self, rel: str, data: bytes, older_than: float) -> bool:
        try:
            os.utime(self.root / rel)  # costs nothing here, so always
            return True
        except FileNotFoundError:
            return False
        except OSError:  # not ours to touch (another user's store): stored all the same
            return True

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if base.is_file():
            return [prefix]
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith(".")) if base.is_dir() else []

    def listing(self, prefix: str) -> list[Listed]:
        out = []
        for rel in self.list(prefix):
            try:
                st = (self.root / rel).stat()
            except FileNotFoundError:
                continue
            out.append(Listed(rel, st.st_size, st.st_mtime))
        return out

    def folders(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def folders_with(self, prefix: str, name: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir() if (p / name).is_file()) if base.is_dir() else []

    def upload(self, rel: str, path: Path) -> None:
        """An atomic copy."""
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(dest)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def download(self, rel: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / rel, path)

    def download_all(self, pairs: list[tuple[str, Path]]) -> None:
        for rel, path in pairs:
            src = self.root / rel
            if not src.is_file():
                raise FileNotFoundError(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, path)  # no copy of the bytes: objects are never changed in place
            except OSError:
                shutil.copyfile(src, path)

    def sweep_temp(self, prefix: str, age: float) -> list[str]:
        now, out = time.time(), []
        for p in sorted((self.root / prefix).rglob(".*.tmp")):
            try:
                if now - p.stat().st_mtime >= age:
                    p.unlink()
                    out.append(p.name)
            except FileNotFoundError:
                continue  # its writer renamed it into place meanwhile
        return out
