"""Versions in BentoML's model store layout, and the promoted pointer beside it, in a folder or on S3.

`REFIT_STORE` names the store: a folder (default: `REFIT_HOME`) or `s3://bucket/prefix` on any S3-compatible
endpoint. Both hold the same layout: `models/refit/vNNNN/` (model.onnx, model.yaml, config.json,
metrics.json, results.csv, dataset.json, confusion_matrix.png) and `promoted.json`.

Versions are immutable and appear only when complete. In a folder a version is built in a staging store and
renamed into place. On S3, where there is no rename, the number is claimed with a create-only write of
`vNNNN/.claim`, the files are uploaded, and `model.yaml`, the marker `versions()` looks for, goes last; a
publish killed midway leaves a claimed number that is never reused and no visible version. Each process
that serves or checks a version from S3 keeps a copy under `REFIT_HOME/models/refit/vNNNN`, downloaded to a
temp folder, checked against the checksums recorded at publish time, then renamed into place: BentoML's
local model store is the cache, so `bentoml models list` shows what a replica holds.

"promoted" is a small JSON file; every promote and rollback is appended to its history. It is changed by
read-modify-write: under a file lock with an atomic rename in a folder, and with a compare-and-swap on S3
(a write conditional on the ETag that was read, retried when another writer got there first), so two
promoters at once never lose an update and never leave a torn pointer.

The pointer is read in one place, `Store.read_pointer`, which checks its shape and raises PointerError for
anything else, so a hand-edited or damaged file is one typed error for every caller (workers, API, CLI).
Promoting a version over a damaged pointer repairs it: the damaged file is kept beside it and the
history records the repair.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from core.paths import refit_home

MODEL_NAME = "refit"
POINTER = "promoted.json"
ENTRIES = f"models/{MODEL_NAME}/"  # where versions live, relative to the store's root (folder or prefix)
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_MARKER_RE = re.compile(rf"^{ENTRIES}(v\d{{4,}})/model\.yaml$")
_CLAIMED_RE = re.compile(rf"^{ENTRIES}v(\d{{4,}})/")
CAS_ATTEMPTS = 50  # compare-and-swap rounds before a pointer update gives up (each loss means progress)
SERVING_RECORDS = "serving/"  # the replicas' status records (service/replicas.py); numbering reads them
log = logging.getLogger("refit.store")


def _env_seconds(name: str, default: float) -> float:
    # Read at each use, not at import: a test (or an operator's shell) shrinks them for one process.
    return float(os.environ.get(name) or default)


def claim_heartbeat_seconds() -> float:
    """How often a publish in progress on S3 rewrites its claim, so the orphan sweep can tell it is alive."""
    return _env_seconds("REFIT_CLAIM_HEARTBEAT_SECONDS", 30)


def orphan_grace_seconds() -> float:
    """A claim not rewritten for this long, without a model.yaml, belongs to a publish that was cut short."""
    return _env_seconds("REFIT_ORPHAN_GRACE_SECONDS", 600)


class StoreError(Exception):
    pass


class PointerError(StoreError):
    """promoted.json exists but cannot be used: unreadable, not JSON, or not the shape Refit writes. The
    message ends with how to repair it; `problem` is what is wrong, alone."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}; promote a version to repair it (`refit promote VERSION` or POST /promote)")
        self.problem = problem


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _now_ms() -> str:
    # A claim's heartbeat is judged against a grace of a few heartbeats: whole seconds would age it by up to one.
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: Path, data) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_url(home: Path) -> str:
    """REFIT_STORE, or the home folder when it is not set."""
    return os.environ.get("REFIT_STORE") or str(home)


class Store:
    """`home` is this machine's folder (REFIT_HOME: jobs, caches, the version cache of an S3 store); `url`
    is where versions and the pointer live (default: REFIT_STORE, else `home`)."""

    def __init__(self, home: Path | str | None = None, url: str | None = None):
        self.home = Path(home).resolve() if home else refit_home()
        if home:
            os.environ["BENTOML_HOME"] = str(self.home)
        self.url = url or store_url(self.home)
        self.remote = None
        if self.url.startswith("s3://"):
            from core.s3 import Bucket

            self.remote = Bucket(self.url)
            self.root = self.home  # local copies of remote versions: the cache
        elif "://" in self.url:
            raise StoreError(f"REFIT_STORE={self.url!r} is not a store this version knows; use a folder path "
                             "or s3://bucket/prefix")
        else:
            self.root = Path(self.url).expanduser().resolve()
        self.models_dir = self.root / "models" / MODEL_NAME
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.pointer = None if self.remote else self.root / POINTER  # the local file; None on S3
        self._claims: dict[str, _ClaimBeat] = {}  # S3 versions this process claimed and is still writing
        self._staging_locks: dict[Path, int] = {}  # staging folder -> fd of the flock that marks it in use

    def describe(self) -> str:
        return self.remote.url if self.remote else str(self.root)

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """One writer at a time across processes of one machine (CLI, service workers, retrain jobs); a
        folder store's writes happen under it. An S3 store needs none: its writes are conditional."""
        with open(self.root / ".refit.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Version ids in creation order; only complete entries (model.yaml present) count."""
        if self.remote:
            out = [m.group(1) for k in self.remote.list(ENTRIES) if (m := _MARKER_RE.match(k))]
        else:
            out = [p.name for p in (self.models_dir.iterdir() if self.models_dir.exists() else [])
                   if _VERSION_RE.match(p.name) and (p / "model.yaml").is_file()]
        return sorted(out, key=lambda v: int(v[1:]))

    def path(self, version: str) -> Path:
        """The version's folder on this machine (downloaded into the cache first for an S3 store)."""
        return self._local_copy(self.resolve(version))

    def resolve(self, version: str) -> str:
        """Accepts vNNNN, refit:vNNNN, 'latest' and 'promoted'."""
        v = version.split(":", 1)[1] if version.startswith(f"{MODEL_NAME}:") else version
        if v == "latest":
            vs = self.versions()
            if not vs:
                raise StoreError("the store has no versions yet; run `refit train DATA` first")
            return vs[-1]
        if v == "promoted":
            p = self.promoted()
            if p is None:
                raise StoreError("no version is promoted; run `refit promote VERSION`")
            return p
        known = self.versions()
        if v not in known:
            shown = repr(version) if len(version) <= 80 else repr(version[:80]) + "..."  # a client's text, clipped
            raise StoreError(f"unknown version {shown}; known: {', '.join(known) or 'none'}")
        return v

    def info(self, version: str) -> dict:
        """The version's metadata (as stored in BentoML's model.yaml) plus its metrics file."""
        import yaml  # BentoML's own dependency; model.yaml is plain YAML

        v = self.resolve(version)
        record = self._entry_file(v, "model.yaml")
        entry = yaml.safe_load(record)
        if not isinstance(entry, dict):
            raise StoreError(f"{v}: model.yaml is not a BentoML model entry")
        info = dict(entry.get("metadata") or {})
        created = info.get("created") or _seconds(entry.get("creation_time"))
        info.update(version=v, tag=f"{MODEL_NAME}:{v}", path=str(self.models_dir / v), created=created)
        metrics = self._entry_file(v, "metrics.json", missing_ok=True, record=record)
        if metrics is not None:
            info["metrics"] = json.loads(metrics)
        return info

    def onnx_path(self, version: str, precision: str | None = None) -> Path:
        p = self.path(version)
        if precision == "int8" and (p / "model.int8.onnx").is_file():
            return p / "model.int8.onnx"
        return p / "model.onnx"

    def verify(self, version: str) -> Path:
        """Checksum the version's ONNX files against those recorded at publish time; returns the path of
        the file to serve (FP32, or INT8 when it was chosen), on this machine."""
        v = self.resolve(version)
        root = self._local_copy(v)
        return _check_files(v, root, self.info(v))

    def version_file(self, version: str, name: str) -> bytes | None:
        """One file of a version (its confusion matrix, its results.csv), or None when the version has none;
        read alone, so an S3 store does not download the whole version to show one figure."""
        return self._entry_file(self.resolve(version), name, missing_ok=True)

    def _entry_file(self, version: str, name: str, missing_ok: bool = False,
                    record: bytes | None = None) -> bytes | None:
        """One file of a version: from its folder in a folder store. On S3, model.yaml (the store's own record
        of the version) always from S3, and any other file from this machine's cached copy only when that copy
        is the store's (the same model.yaml; `record`, when the caller has just read it), else from S3."""
        local = self.models_dir / version / name
        if self.remote and name == "model.yaml":
            return self._store_record(version, missing_ok=missing_ok)
        if not self.remote or self._cached_is(version, record or self._store_record(version, missing_ok=True)):
            try:
                return local.read_bytes()
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise StoreError(f"{version}: {name} is missing") from None
        got = self.remote.get(f"{ENTRIES}{version}/{name}")
        if got is None and not missing_ok:
            raise StoreError(f"{version}: {name} is missing from {self.remote.url}")
        return got[0] if got else None

    def _store_record(self, version: str, missing_ok: bool = False) -> bytes | None:
        """The version's model.yaml as the S3 store holds it now."""
        got = self.remote.get(f"{ENTRIES}{version}/model.yaml")
        if got is None and not missing_ok:
            raise StoreError(f"{version}: model.yaml is missing from {self.remote.url}")
        return got[0] if got else None

    def _cached_is(self, version: str, record: bytes | None) -> bool:
        """Whether this machine's cached copy of `version` is the one whose model.yaml is `record`. An id alone
        does not name a model: a bucket re-created empty hands out v0001 again, and a copy cached from the old
        one must never be served for it."""
        try:
            return record is not None and (self.models_dir / version / "model.yaml").read_bytes() == record
        except OSError:
            return False

    def cached_newest(self) -> str | None:
        """The newest version this machine's cache of an S3 store holds (None for a folder store, or none)."""
        if not self.remote:
            return None
        held = [p.name for p in self.models_dir.iterdir() if _VERSION_RE.match(p.name) and (p / "model.yaml").is_file()]
        return max(held, key=lambda v: int(v[1:]), default=None)

    def _evict(self, version: str, record: bytes | None, why: str) -> None:
        """Move a cached copy that is not the store's (`record`) out of the cache (a rename: a process reading
        it keeps its open files), then remove it. Another process of this machine may have evicted it and
        fetched the store's copy since we looked: that one is checked again before and after the move, and
        put back."""
        if self._cached_is(version, record):
            return
        aside = self.root / "tmp" / f"replaced-{version}-{uuid.uuid4().hex}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.models_dir / version, aside)
        except FileNotFoundError:
            return  # another process of this machine moved it first
        try:
            fetched = record is not None and (aside / "model.yaml").read_bytes() == record
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

    def _local_copy(self, version: str) -> Path:
        """The version's folder on this machine. From S3: used from the cache only when its model.yaml is the
        store's (the checksums the store records for this id), else downloaded into a temp folder, checked
        against the checksums in its model.yaml, then renamed into the cache, so the cache only ever holds
        whole, checked versions (several processes may race; the first rename wins, the others drop theirs)."""
        dest = self.models_dir / version
        if not self.remote:
            return dest
        record = self._store_record(version)
        if self._cached_is(version, record):
            return dest
        if (dest / "model.yaml").is_file():
            self._evict(version, record, f"its model.yaml differs from the one in {self.remote.url}")
            if self._cached_is(version, record):
                return dest  # another process fetched the store's copy meanwhile
        import yaml

        tmp = self.root / "tmp" / f"fetch-{version}-{uuid.uuid4().hex}"
        try:
            prefix = f"{ENTRIES}{version}/"
            for key in self.remote.list(prefix):
                name = key[len(prefix):]
                if name and not name.startswith("."):  # .claim is the store's bookkeeping, not the model's
                    self.remote.download(key, tmp / name)
            if not (tmp / "model.yaml").is_file():
                raise StoreError(f"{version}: model.yaml is missing from {self.remote.url}")
            meta = (yaml.safe_load((tmp / "model.yaml").read_text()) or {}).get("metadata") or {}
            _check_files(version, tmp, meta, where=f" in {self.remote.url}")
            if dest.exists() and not (dest / "model.yaml").is_file():
                shutil.rmtree(dest, ignore_errors=True)  # a copy some crash left half made
            try:
                os.rename(tmp, dest)
            except OSError:
                if not self._cached_is(version, (tmp / "model.yaml").read_bytes()):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # -- promoted pointer --------------------------------------------------------------------------
    def _pointer_raw(self) -> tuple[bytes | None, str | None]:
        """The pointer's bytes (None when there is none) and the ETag a conditional write needs (S3)."""
        if self.remote:
            got = self.remote.get(POINTER)
            return (got[0], got[1]) if got else (None, None)
        try:
            return self.pointer.read_bytes(), None
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise PointerError(f"{POINTER} cannot be read ({e.strerror})") from None

    def pointer_signature(self) -> object:
        """Changes whenever the pointer does; cheap enough to poll (a stat, or a HEAD request on S3)."""
        if self.remote:
            return self.remote.etag(POINTER)
        try:
            st = self.pointer.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read_pointer(self) -> dict:
        """The pointer as {"version": str | None, "history": [event, ...]}; a missing file is an empty one.
        Raises PointerError when the file exists but is not what Refit writes."""
        return _parse_pointer(self._pointer_raw()[0])

    def promoted(self) -> str | None:
        """The promoted version id, None when nothing is promoted; PointerError for a damaged pointer."""
        return self.read_pointer()["version"]

    def history(self) -> list[dict]:
        return self.read_pointer()["history"]

    def pointer_problem(self) -> str | None:
        """Why serving has no promoted version to follow, or None when the pointer is usable: a damaged
        pointer, an unreachable store, or a missing pointer in a store that holds versions (nothing is
        promoted without a decision)."""
        try:
            raw, _ = self._pointer_raw()
            _parse_pointer(raw)
            versions = self.versions() if raw is None else []
        except StoreError as e:
            return str(e)
        if versions:
            return (f"no version is promoted ({POINTER} is missing) while the store holds "
                    f"{', '.join(versions)}; promote one (`refit promote VERSION` or POST /promote)")
        return None

    def _update_pointer(self, change: Callable[[dict, dict | None], dict], *, actor: str, repair: bool) -> dict:
        """Read the pointer, apply `change(state, repaired)` (which edits state and returns the event), write it
        back. A folder store does this under the lock; an S3 store writes only over the ETag it read (or only
        where there is no pointer yet) and starts again from a fresh read when another writer came first."""
        for attempt in range(CAS_ATTEMPTS):
            with self.lock() if not self.remote else contextlib.nullcontext():
                raw, etag, exists = None, None, True  # a pointer that cannot even be read is there
                try:
                    raw, etag = self._pointer_raw()
                    exists = raw is not None
                    state, repaired = _parse_pointer(raw), None
                except PointerError as e:
                    if not repair:
                        raise PointerError(f"cannot roll back: {e.problem}, so the versions promoted before "
                                           "are unknown") from None
                    state, repaired = self._repair(e, raw, actor)
                event = change(state, repaired)
                if self._write_pointer(state, etag, exists=exists):
                    return event
            time.sleep(random.uniform(0.01, 0.05) * min(attempt + 1, 10))  # let the winner finish
        raise StoreError(f"{POINTER} in {self.describe()} kept changing under this update ({CAS_ATTEMPTS} "
                         "tries); try again")

    def _write_pointer(self, state: dict, etag: str | None, *, exists: bool) -> bool:
        """False when an S3 compare-and-swap lost the race."""
        if not self.remote:
            atomic_write_json(self.pointer, state)
            return True
        from core.s3 import Conflict

        data = json.dumps(state, indent=2, sort_keys=True).encode()
        try:
            self.remote.put(POINTER, data, if_match=etag if exists else None, create_only=not exists)
        except Conflict:
            return False
        return True

    def _repair(self, damage: PointerError, raw: bytes | None, actor: str) -> tuple[dict, dict]:
        """A new pointer state whose first event records the repair of a damaged one; the damaged bytes are
        kept beside it first, so nothing is lost."""
        kept = f"{POINTER}.broken-{_stamp()}"
        try:
            self._keep_aside(kept, raw)
            where = f"the damaged file is kept as {kept}"
        except (OSError, StoreError) as e:
            where = f"the damaged file could not be kept ({getattr(e, 'strerror', None) or e})"
            kept = None
        event = {"action": "repair", "version": None, "previous": None, "at": now_iso(), "actor": actor,
                 "reason": f"{damage.problem}; {where}", "kept_as": kept}
        return {"version": None, "history": [event]}, event

    def _keep_aside(self, name: str, raw: bytes | None) -> None:
        if self.remote:
            self.remote.put(name, raw or b"", create_only=True)
        else:
            shutil.copyfile(self.pointer, self.pointer.with_name(name))

    def promote(self, version: str, *, actor: str = "cli", reason: str = "") -> dict:
        """Point serving at `version` after checking its file loads; recorded in the history. Repairs a
        damaged pointer (the returned event then carries `repaired`)."""
        v = self.resolve(version)
        check_loadable(self.verify(v))  # versions never change, so this holds for every round below

        def change(state: dict, repaired: dict | None) -> dict:
            event = {"action": "promote", "version": v, "previous": state["version"], "at": now_iso(),
                     "actor": actor, "reason": reason}
            state["version"] = v
            state["history"].append(event)
            return {**event, "repaired": repaired} if repaired else event

        return self._update_pointer(change, actor=actor, repair=True)

    def rollback(self, *, actor: str = "cli", reason: str = "") -> dict:
        """Go back one step along the promotion history: after promoting v2, v3 and v4, rollbacks give v3,
        then v2, then v1 (versions deleted since are skipped); a StoreError says when there is nothing
        earlier."""

        def change(state: dict, _repaired) -> dict:
            current = state["version"]
            if current is None:
                raise StoreError("nothing is promoted, so there is nothing to roll back; "
                                 "promote a version by name (`refit promote VERSION` or POST /promote)")
            stack = promotion_stack(state["history"])
            while stack and stack[-1] == current:
                stack.pop()
            existing = set(self.versions())
            while stack and stack[-1] not in existing:
                stack.pop()
            if not stack:
                raise StoreError(f"nothing to roll back to: {current} is the earliest version in the promotion "
                                 "history; promote a version by name instead")
            target = stack[-1]
            check_loadable(self.verify(target))
            event = {"action": "rollback", "version": target, "previous": current, "at": now_iso(),
                     "actor": actor, "reason": reason}
            state["version"] = target
            state["history"].append(event)
            return event

        return self._update_pointer(change, actor=actor, repair=False)

    # -- writing -----------------------------------------------------------------------------------
    def publish(self, files: dict[str, Path], metadata: dict, labels: dict | None = None,
                stamp: Callable[[str], dict] | None = None) -> str:
        """Create the next version from files (name in the entry -> source path). All or nothing.
        `stamp(version)` runs once the id is known and is this publish's own (to write it into the files)
        and returns extra metadata."""
        if self.remote:
            version = self._claim(None)
            built, staging = self._build(version, files, metadata, labels, stamp)
            try:
                self._upload(version, built)
                self._into_cache(version, built)
            finally:
                self._drop_staging(staging)
            return version
        with self.lock():
            tmp_root = self.root / "tmp"
            tmp_root.mkdir(exist_ok=True)
            # Anything left in staging while we hold the lock belongs to a crashed publish.
            for stale in tmp_root.glob("staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
            existing = self.versions()
            partial = [p for p in self.models_dir.glob("v*") if p.is_dir() and p.name not in existing]
            for p in partial:
                shutil.rmtree(p, ignore_errors=True)
            n = max([int(v[1:]) for v in existing] + [int(p.name[1:]) for p in partial
                                                        if _VERSION_RE.match(p.name)] + [0]) + 1
            version = f"v{n:04d}"
            built, staging = self._build(version, files, metadata, labels, stamp)
            for f in built.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(built, self.models_dir / version)  # the commit point
            tmp_latest = self.models_dir / f".latest.{uuid.uuid4().hex}"
            tmp_latest.write_text(version)
            os.replace(tmp_latest, self.models_dir / "latest")
            self._drop_staging(staging)
            return version

    def add_entry(self, src: Path) -> str:
        """Add a complete entry folder made elsewhere (the version packed into a bento) under its own id."""
        version = src.name
        if self.remote:
            self._claim(version)
            self._upload(version, src)
        else:
            shutil.copytree(src, self.models_dir / version)
        return version

    def _build(self, version, files, metadata, labels, stamp) -> tuple[Path, Path]:
        """The entry built by BentoML in a staging store of its own; returns (entry folder, staging root)."""
        import bentoml
        from bentoml._internal.models import ModelStore  # no public API names a store other than the global one

        staging = self.root / "tmp" / f"staging-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        self._staging_locks[staging] = _hold_flock(staging)  # in use: `sweep_orphans` leaves it alone
        try:
            extra = stamp(version) if stamp else {}
            # BentoML's metadata takes basic types only; absent values (None) are left out.
            metadata = _drop_none({**metadata, **extra, "version": version, "created": now_iso()})
            with bentoml.models.create(f"{MODEL_NAME}:{version}", labels=labels or {}, metadata=metadata,
                                       _model_store=ModelStore(staging)) as m:
                for name, src in files.items():
                    shutil.copyfile(src, m.path_of(name))
        except BaseException:
            self._drop_staging(staging)
            self._end_claim(version)
            raise
        return staging / MODEL_NAME / version, staging

    def _drop_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        fd = self._staging_locks.pop(staging, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def _claim(self, version: str | None) -> str:
        """Make a version number this publish's own with a create-only write of its claim object: the next
        free number (None), or exactly `version`. A number once claimed is never handed out again, even when
        the publish that claimed it died before its model.yaml was written."""
        from core.s3 import Conflict

        note = {"at": _now_ms(), "updated": _now_ms(), "pid": os.getpid(), "host": os.uname().nodename}
        data = json.dumps(note).encode()
        if version is not None:
            try:
                tag = self.remote.put(f"{ENTRIES}{version}/.claim", data, create_only=True)
            except Conflict:
                raise StoreError(f"{version} is already taken in {self.remote.url}") from None
            return self._hold(version, note, tag)
        keys = self.remote.list(ENTRIES)
        # The listing a claim needs also shows the claims of publishes cut short: swept here, past their grace,
        # as a folder store's publish removes its partial entries.
        try:
            self._sweep_claims(keys)
        except StoreError as e:  # a bucket that refuses deletes, say: publishing still works
            log.warning("orphan claims not swept: %s", e)
        taken = {int(m.group(1)) for k in keys if (m := _CLAIMED_RE.match(k))}
        n = max(taken | self._seen_elsewhere(), default=0) + 1
        for _ in range(CAS_ATTEMPTS):
            try:
                tag = self.remote.put(f"{ENTRIES}v{n:04d}/.claim", data, create_only=True)
                return self._hold(f"v{n:04d}", note, tag)
            except Conflict:
                n += 1  # another publisher claimed it a moment ago
        raise StoreError(f"could not claim a version number in {self.remote.url} ({CAS_ATTEMPTS} tries)")

    def _seen_elsewhere(self) -> set[int]:
        """Version numbers that live replicas serve or hold in their caches (their status records, rewritten at
        every heartbeat, land in a bucket re-created empty too) and that this machine's cache holds: a
        re-created store numbers on after them, instead of handing out an id some cache knows as another model."""
        seen: set[int] = set()
        try:
            records = list(self.records(SERVING_RECORDS).values())
        except StoreError:
            records = []
        for r in [*records, {"cached": self.cached_newest()}]:
            for key in ("version", "cached"):
                m = _VERSION_RE.match(str(r.get(key) or "")) if isinstance(r, dict) else None
                if m:
                    seen.add(int(m.group(1)))
        return seen

    def _hold(self, version: str, note: dict, tag: str) -> str:
        """Keep the claim fresh from a thread until the version is uploaded (or its publish fails)."""
        beat = _ClaimBeat(self.remote, f"{ENTRIES}{version}/.claim", note, tag, claim_heartbeat_seconds())
        beat.start()
        self._claims[version] = beat
        return version

    def _end_claim(self, version: str) -> None:
        beat = self._claims.pop(version, None)
        if beat is not None:
            beat.finish()

    def _upload(self, version: str, folder: Path) -> None:
        """Every file, model.yaml last: until it is there, the version is not listed. Just before it, one
        last conditional write of the claim: when an orphan sweep has taken the claim over (this publish
        stalled past the grace), this publish stops here instead of making a version the sweep is deleting."""
        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == "model.yaml")
        try:
            for p in files:
                if p.name == "model.yaml" and version in self._claims:
                    self._claims[version].confirm()
                self.remote.upload(f"{ENTRIES}{version}/{p.relative_to(folder).as_posix()}", p)
        finally:
            self._end_claim(version)

    def _into_cache(self, version: str, built: Path) -> None:
        """The publisher has the files it just uploaded: they become its cached copy at no cost."""
        try:
            os.rename(built, self.models_dir / version)
        except OSError:
            pass  # another process of this machine cached it first

    # -- orphans: what publishes cut short leave behind --------------------------------------------
    def sweep_orphans(self) -> list[str]:
        """Remove what publishes cut short left, never what a live publish is writing: staging folders under
        this machine's `tmp/` that no process holds (each is flocked while its publish runs), and on S3 the
        files of claimed versions without a model.yaml whose claim nobody has rewritten for the grace period
        (a live publish rewrites it every heartbeat). The claim itself stays, so its number is never handed
        out again. Best effort: a store that cannot be reached is logged, not raised. Returns what went."""
        removed = []
        for staging in sorted((self.root / "tmp").glob("staging-*")):
            if staging.is_dir() and _unheld(staging):
                log.warning("removing a staging folder a killed publish left: %s", staging)
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(str(staging))
        if self.remote:
            try:
                removed += [f"{self.remote.url}/{ENTRIES}{v}" for v in self._sweep_claims()]
            except StoreError as e:
                log.warning("orphan claims not swept: %s", e)
        return removed

    def _sweep_claims(self, keys: list[str] | None = None) -> list[str]:
        """The claimed versions (from a listing of ENTRIES) a publish cut short left without a model.yaml,
        emptied but for their claim once it is past the grace; returns their ids."""
        from core.s3 import Conflict

        files: dict[str, list[str]] = {}
        for k in self.remote.list(ENTRIES) if keys is None else keys:
            if m := _CLAIMED_RE.match(k):
                files.setdefault(f"v{m.group(1)}", []).append(k)
        swept = []
        for version, found in sorted(files.items()):
            names = {k.rsplit("/", 1)[1] for k in found}
            if "model.yaml" in names or ".claim" not in names or names == {".claim"}:
                continue  # complete, not Refit's, or nothing but the claim (kept: its number stays taken)
            claim = f"{ENTRIES}{version}/.claim"
            got = self.remote.get(claim)
            try:
                note = json.loads(got[0]) if got else None
            except ValueError:
                note = None
            if not isinstance(note, dict):
                continue
            if not note.get("abandoned"):  # else a sweep cut short: finish it
                if age_seconds(note.get("updated") or note.get("at")) < orphan_grace_seconds():
                    continue
                mark = {**note, "abandoned": now_iso(), "by": f"{os.uname().nodename}/{os.getpid()}"}
                try:  # only over the state read: a publish that beat again since then keeps its claim
                    self.remote.put(claim, json.dumps(mark).encode(), if_match=got[1])
                except Conflict:
                    continue
            log.warning("removing %s from %s: its publish was cut short (claimed %s, last alive %s)", version,
                        self.remote.url, note.get("at"), note.get("updated"))
            for k in found:
                if not k.endswith("/.claim"):
                    self.remote.delete(k)
            swept.append(version)
        return swept

    # -- small records beside the versions (what each replica serves) ------------------------------
    def put_record(self, rel: str, data: dict, *, if_tag: str | None = None, create_only: bool = False) -> bool:
        """Write a small JSON object whole: an atomic rename in a folder, one PUT on S3. With `if_tag` (from
        `record`) only over that state of it, with `create_only` only where there is none: False when that
        condition does not hold (another writer came first), which is how job state and the one-job lock
        are shared between machines without a lock server."""
        if self.remote:
            from core.s3 import Conflict

            try:
                self.remote.put(rel, json.dumps(data, sort_keys=True).encode(), if_match=if_tag,
                                create_only=create_only)
            except Conflict:
                return False
            return True
        if if_tag is None and not create_only:
            atomic_write_json(self.root / rel, data)
            return True
        with self.lock():  # a folder store's conditional write: compare and write under the machine's lock
            _, tag = self.record(rel)
            if (tag is not None) if create_only else (tag != if_tag):
                return False
            atomic_write_json(self.root / rel, data)
            return True

    def record(self, rel: str) -> tuple[dict | None, str | None]:
        """One JSON record and the tag a conditional write over it needs; (None, None) when there is none or
        it does not parse (a record is only ever written whole, so that is damage, not a half write)."""
        if self.remote:
            got = self.remote.get(rel)
            raw, tag = got if got else (None, None)
        else:
            try:
                raw = (self.root / rel).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                raw = None
            tag = hashlib.sha256(raw).hexdigest() if raw is not None else None
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            return None, tag
        return (data, tag) if isinstance(data, dict) else (None, tag)

    def put_file(self, rel: str, path: Path) -> None:
        """A file beside the records (a job's dataset): an upload, or an atomic copy in a folder store."""
        if self.remote:
            self.remote.upload(rel, path)
            return
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def get_file(self, rel: str, dest: Path) -> None:
        """FileNotFoundError when the store has no such file."""
        if self.remote:
            if self.remote.etag(rel) is None:
                raise FileNotFoundError(f"{self.describe()}/{rel}")
            self.remote.download(rel, dest)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / rel, dest)

    def delete_file(self, rel: str) -> None:
        self.delete_record(rel)

    def put_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> bool:
        """A whole object from memory (an image of a dataset). With `create_only` it is written only where
        there is none (False then): content-addressed objects are never rewritten."""
        if self.remote:
            from core.s3 import Conflict

            try:
                self.remote.put(rel, data, create_only=create_only)
            except Conflict:
                return False
            return True
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if not create_only:
                os.replace(tmp, dest)
                return True
            try:
                os.link(tmp, dest)  # fails when the target exists: a create-only write without a lock
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, rel: str) -> bytes | None:
        """A whole object beside the records (an image of a dataset), or None when there is none."""
        if self.remote:
            got = self.remote.get(rel)
            return got[0] if got else None
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        if self.remote:
            return self.remote.etag(rel) is not None
        return (self.root / rel).is_file()

    def folders(self, prefix: str) -> list[str]:
        """Names of the sub-folders directly under `prefix` (common key prefixes on S3), sorted."""
        if self.remote:
            return self.remote.folders(prefix)
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def records(self, prefix: str) -> dict[str, object]:
        """Every JSON record under `prefix` (key relative to the store -> parsed object). One that is gone or
        does not parse by the time it is read (another reader removed it) is left out."""
        raw: dict[str, bytes] = {}
        if self.remote:
            for key in self.remote.list(prefix):
                got = self.remote.get(key) if key.endswith(".json") else None
                if got is not None:
                    raw[key] = got[0]
        else:
            base = self.root / prefix
            for p in sorted(base.rglob("*.json")) if base.is_dir() else []:
                try:
                    raw[p.relative_to(self.root).as_posix()] = p.read_bytes()
                except OSError:
                    continue
        out = {}
        for key, data in raw.items():
            try:
                out[key] = json.loads(data)
            except ValueError:
                continue
        return out

    def keys(self, prefix: str) -> list[str]:
        """The keys (relative to the store) of every file under `prefix`, without reading any of them."""
        if self.remote:
            return list(self.remote.list(prefix))
        base = self.root / prefix
        return [p.relative_to(self.root).as_posix() for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")] if base.is_dir() else []

    def delete_record(self, rel: str) -> None:
        if self.remote:
            self.remote.delete(rel)
        else:
            (self.root / rel).unlink(missing_ok=True)

    def list_info(self) -> list[dict]:
        """Every version with its metadata; listing works whatever state the pointer is in."""
        try:
            promoted = self.promoted()
        except StoreError:
            promoted = None
        out = []
        for v in self.versions():
            try:
                i = self.info(v)
            except Exception as e:  # noqa: BLE001 - a damaged entry is listed, not fatal
                i = {"version": v, "error": str(e)}
            i["promoted"] = v == promoted
            out.append(i)
        return out


class _ClaimBeat(threading.Thread):
    """Rewrites a claim (`updated`) every few seconds while its publish runs, each write conditional on the
    last one: the orphan sweep takes a claim over only when it is older than the grace, with a write
    conditional on what it read, so of a stalled publisher and a sweep exactly one goes on."""

    def __init__(self, remote, key: str, note: dict, tag: str, every: float):
        super().__init__(name=f"claim {key}", daemon=True)
        self.remote, self.key, self.note, self.tag, self.every = remote, key, note, tag, every
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            try:
                self._write()
            except StoreError as e:  # S3 away for a moment: the next beat tries again
                log.warning("%s not kept fresh: %s", self.key, e)

    def _write(self) -> None:
        from core.s3 import Conflict

        with self._lock:
            if self.lost or self._done.is_set():
                return
            data = json.dumps({**self.note, "updated": _now_ms()}).encode()
            try:
                self.tag = self.remote.put(self.key, data, if_match=self.tag)
            except Conflict:
                self._reread()

    def _reread(self) -> None:
        """After a failed condition: a PUT that botocore retried after it had landed fails its own condition
        too, so only the sweep's `abandoned` mark (or no claim at all) means the claim is lost; else the
        claim is still ours, and its new ETag is the one the next beat writes over."""
        got = self.remote.get(self.key)
        try:
            note = json.loads(got[0]) if got else None
        except ValueError:
            note = None
        if isinstance(note, dict) and not note.get("abandoned"):
            self.tag = got[1]
            return
        self.lost = (f"{self.key} was taken over by an orphan sweep: this publish went without a "
                     f"heartbeat for over {orphan_grace_seconds():g} s; publish again")

    def confirm(self) -> None:
        """The last write before the version becomes visible; raises when the claim is not ours any more."""
        self._write()
        if self.lost:
            raise StoreError(self.lost)

    def finish(self) -> None:
        self._done.set()


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


def age_seconds(iso) -> float:
    """Seconds since an ISO time a record carries; infinite for a missing or foreign one."""
    try:
        return time.time() - datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return float("inf")


def _parse_pointer(raw: bytes | None) -> dict:
    if raw is None:
        return {"version": None, "history": []}
    try:
        state = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise PointerError(f"{POINTER} is not valid JSON ({e})") from None
    problem = _pointer_shape_problem(state)
    if problem:
        raise PointerError(f"{POINTER} {problem}")
    state.setdefault("version", None)
    state.setdefault("history", [])
    return state


def _check_files(version: str, root: Path, meta: dict, where: str = "") -> Path:
    """Check the ONNX files in `root` against the checksums recorded at publish; returns the file to serve."""
    serving = root / meta.get("serving_file", "model.onnx")
    checks = {root / "model.onnx": meta.get("onnx_sha256"), serving: meta.get("serving_sha256")}
    for path, want in checks.items():
        if not path.is_file():
            raise StoreError(f"{version}: {path.name} is missing{where}")
        if want and sha256_file(path) != want:
            raise StoreError(f"{version}: checksum mismatch for {path.name} (file changed since publish){where}")
    return serving


def _seconds(iso) -> str | None:
    try:
        return datetime.fromisoformat(str(iso)).isoformat(timespec="seconds")
    except ValueError:
        return None if iso is None else str(iso)


def promotion_stack(history: list[dict]) -> list[str]:
    """The versions promoted one after another, oldest first, replayed from the history: a promote pushes
    its version, a rollback pops back to the version it went to, a repair starts afresh. Rollback walks
    back along this stack, so repeated rollbacks never return to a version just rolled back from."""
    stack: list[str] = []
    for e in history:
        action, version = e.get("action"), e.get("version")
        if action == "repair":
            stack = []
        elif action == "rollback" and version in stack:
            while stack[-1] != version:
                stack.pop()
        elif action in ("promote", "rollback") and version and (not stack or stack[-1] != version):
            stack.append(version)  # a rollback to a version not on the stack: written before this rule
    return stack


def _pointer_shape_problem(state) -> str | None:
    """What is wrong with a parsed pointer, in words, or None when it has the shape Refit writes."""
    if not isinstance(state, dict):
        return f"holds a JSON {_json_type(state)}, not an object"
    version = state.get("version")
    if version is not None and not (isinstance(version, str) and _VERSION_RE.match(version)):
        return f"names version {version!r}, not a version id like v0003"
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        return "has a history that is not a list of events"
    return None


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj if v is not None]
    return obj


def check_loadable(path: Path) -> None:
    """A version is only promoted when onnxruntime can open it."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"{path} does not load in onnxruntime: {e}") from None


