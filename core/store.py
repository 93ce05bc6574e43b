"""Versions in BentoML's model store layout, and the promoted pointer beside it, in a folder or on S3.

`REFIT_STORE` names the store: a folder (default: `REFIT_HOME`) or `s3://bucket/prefix` on any S3-compatible
endpoint. Both hold the same layout: `models/refit/vNNNN/` (model.onnx, model.yaml, config.json,
metrics.json, results.csv, dataset.json, confusion_matrix.png) and `promoted.json`.

The store is written once over an object store (core.objects: `Folder`, or core.s3's `Bucket`). What differs
between the two is chosen once, here, by what the backend is:

- where this machine reads a version (core.cache): in place in a folder, from a checked copy of an S3 store's
  version under `REFIT_HOME/models/refit/vNNNN`;
- how a version becomes visible, all or nothing (core.publish, core.claims): renamed into place under the
  folder's lock, or uploaded under a claimed number with `model.yaml`, the marker listing looks for, last.

The promoted pointer (core.pointer) is a small JSON file changed by compare-and-swap; every promote and
rollback is appended to its history. Records (job state, the one-job line, dataset heads) are small JSON
objects written whole, optionally only over the state read or only where there is none.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from core import cache, candidate, claims, projects, publish
from core.cas import ATTEMPTS as CAS_ATTEMPTS
from core.clock import age_seconds, now_iso, seconds
from core.entry import ENTRIES, MODEL_NAME, MODEL_YAML, VERSION_RE, check_files, check_loadable
from core.objects import Conflict, StoreError, atomic_write_json, open_objects, sha256_file
from core.pointer import POINTER, Pointer, PointerError, promotion_stack
from core.settings import refit_home, settings

__all__ = ["CAS_ATTEMPTS", "ENTRIES", "MODEL_NAME", "POINTER", "PointerError", "Store", "StoreError", "age_seconds",
           "atomic_write_json", "check_loadable", "now_iso", "promotion_stack", "sha256_file"]

SERVING_RECORDS = "serving/"  # the replicas' status records (service/replicas.py); numbering reads them
log = logging.getLogger("refit.store")


class Store:
    """`home` is this machine's folder (REFIT_HOME: jobs, caches, the version cache of an S3 store); `url`
    is where versions and the pointer live (default: REFIT_STORE, else `home`)."""

    def __init__(self, home: Path | str | None = None, url: str | None = None, project: str = projects.DEFAULT):
        self.home = Path(home).resolve() if home else refit_home()
        # BentoML's home is Refit's, for what this process runs of BentoML (the service's packed model) and
        # starts: `bentoml models list` shows the versions (the Makefile and the tests set it as well).
        os.environ["BENTOML_HOME"] = str(self.home)
        self.url = url or (settings().store or str(self.home))
        self.project = projects.check_name(project)
        self.model_name = projects.model_name(project)  # BentoML's name of this project's versions
        self.entries = projects.entries(project)
        self.base = open_objects(self.url)  # the whole store: every project's versions, the project records
        # This project's records (pointer, jobs, datasets, captures, status): the root for `default`, else
        # projects/NAME/ (core/projects.py).
        self.objects = self.base if project == projects.DEFAULT else open_objects(projects.records_url(self.url,
                                                                                                         project))
        self.root = self.base.root or self.home  # where the versions are read on this machine
        self.models_dir = self.root / "models" / self.model_name
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.pointer = self.objects.root / POINTER if self.objects.root else None  # the local file; None on S3
        self._pointer = Pointer(self.objects)
        self._staging = publish.Staging(self.root / "tmp", self.model_name)
        if self.base.root:  # a folder: the store is here
            self.copies = cache.InPlace(self.models_dir)
            self.commits = publish.RenameCommit(self.base, self.models_dir, self.root / "tmp", self.versions)
        else:
            self.copies = cache.CheckedCopies(self.base, self.models_dir, self.root / "tmp", self.entries)
            self.commits = claims.ClaimedCommit(self.base, self._seen_elsewhere, self.copies.adopt, self.entries)

    def for_project(self, project: str) -> Store:
        """The same store seen as another project (same home and URL)."""
        return self if project == self.project else Store(self.home, self.url, project)

    @property
    def remote(self):
        """The S3 bucket of an S3 store (its own calls, for callers that need them); None for a folder."""
        return None if self.base.root else self.objects

    def describe(self) -> str:
        return self.objects.url

    def lock(self):
        """One writer at a time across processes of one machine, where the store needs it (a folder store);
        an S3 store needs none: its writes are conditional."""
        return self.objects.locked()

    # -- reading -----------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Version ids in creation order; only complete entries (model.yaml present) count."""
        out = [v for v in self.base.folders_with(self.entries, MODEL_YAML) if VERSION_RE.match(v)]
        return sorted(out, key=lambda v: int(v[1:]))

    def path(self, version: str) -> Path:
        """The version's folder on this machine (downloaded into the cache first for an S3 store)."""
        return self.copies.path(self.resolve(version))

    def resolve(self, version: str) -> str:
        """Accepts vNNNN, refit:vNNNN, 'latest' and 'promoted'."""
        v = version.split(":", 1)[1] if version.startswith(f"{self.model_name}:") else version
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
        record = self.copies.entry_file(v, MODEL_YAML)
        entry = yaml.safe_load(record)
        if not isinstance(entry, dict):
            raise StoreError(f"{v}: model.yaml is not a BentoML model entry")
        info = dict(entry.get("metadata") or {})
        created = info.get("created") or seconds(entry.get("creation_time"))
        info.update(version=v, tag=f"{self.model_name}:{v}", path=str(self.models_dir / v), created=created)
        metrics = self.copies.entry_file(v, "metrics.json", missing_ok=True, record=record)
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
        root = self.copies.path(v)
        return check_files(v, root, self.info(v))

    def version_file(self, version: str, name: str) -> bytes | None:
        """One file of a version (its confusion matrix, its results.csv), or None when the version has none;
        read alone, so an S3 store does not download the whole version to show one figure."""
        return self.copies.entry_file(self.resolve(version), name, missing_ok=True)

    def cached_newest(self) -> str | None:
        """The newest version this machine's cache of an S3 store holds (None for a folder store, or none)."""
        return self.copies.newest_held()

    # The S3 cache's checks, by their names of old (tests drive them directly).
    def _store_record(self, version: str, missing_ok: bool = False) -> bytes | None:
        return self.copies.store_record(version, missing_ok)

    def _cached_is(self, version: str, record: bytes | None) -> bool:
        return self.copies.cached_is(version, record)

    def _evict(self, version: str, record: bytes | None, why: str) -> None:
        self.copies.evict(version, record, why)

    # -- promoted pointer --------------------------------------------------------------------------
    def pointer_signature(self) -> object:
        """Changes whenever the pointer does; cheap enough to poll (a stat, or a HEAD request on S3)."""
        return self._pointer.signature()

    def read_pointer(self) -> dict:
        """The pointer as {"version": str | None, "history": [event, ...]}; a missing file is an empty one.
        Raises PointerError when the file exists but is not what Refit writes."""
        return self._pointer.read()

    def promoted(self) -> str | None:
        """The promoted version id, None when nothing is promoted; PointerError for a damaged pointer."""
        return self.read_pointer()["version"]

    def history(self) -> list[dict]:
        return self.read_pointer()["history"]

    def pointer_problem(self) -> str | None:
        """Why serving has no promoted version to follow, or None when the pointer is usable."""
        return self._pointer.problem(self.versions)

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
            _end_trial(state, "promoted" if (candidate.current(state) or {}).get("version") == v else "superseded",
                       actor, f"{v} was promoted")
            return {**event, "repaired": repaired} if repaired else event

        return self._pointer.update(change, actor=actor, repair=True)

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
            _end_trial(state, "rolled_back", actor, f"rolled back to {target}")
            return event

        return self._pointer.update(change, actor=actor, repair=False)

    # -- the candidate (core/candidate.py) -----------------------------------------------------------
    def candidate(self) -> dict | None:
        """The version on trial beside the promoted one, None when none is; PointerError for a damaged pointer."""
        return candidate.current(self.read_pointer())

    def set_candidate(self, version: str, *, mode: str, percent: float, guard: dict | None = None,
                      actor: str = "api") -> dict:
        """Put `version` on trial (or change its mode or percent). StoreError when it is the promoted version
        or nothing is promoted: a trial compares with the promoted version. The caller has checked that it loads
        and has the promoted version's classes (service/trial.py)."""
        v = self.resolve(version)

        def change(state: dict, _repaired) -> dict:
            if state["version"] is None:
                raise StoreError("nothing is promoted: a candidate is tried beside the promoted version")
            if state["version"] == v:
                raise StoreError(f"{v} is the promoted version; a candidate is another version tried beside it")
            return candidate.begin(state, v, mode, percent, guard, actor)

        return self._pointer.update(change, actor=actor, repair=False)

    def clear_candidate(self, *, actor: str = "api", reason: str = "", how: str = "cleared",
                        only: str | None = None) -> dict | None:
        """End the trial (`how`: cleared, or guard); the history event, None when no candidate was set (or
        `only`, a trial id, is no longer the one on)."""
        # A round that finds nothing to end writes the state back unchanged; {} (not None: None is a lost race)
        done = self._pointer.update(lambda state, _r: candidate.end(state, how, actor, reason, only) or {},
                                    actor=actor, repair=False)
        return done or None

    # -- writing -----------------------------------------------------------------------------------
    def publish(self, files: dict[str, Path], metadata: dict, labels: dict | None = None,
                stamp: Callable[[str], dict] | None = None) -> str:
        """Create the next version from files (name in the entry -> source path). All or nothing.
        `stamp(version)` runs once the id is known and is this publish's own (to write it into the files)
        and returns extra metadata."""
        with self.commits.claim(None) as version:
            built, staging = self._staging.build(version, files, metadata, labels, stamp)
            try:
                self.commits.commit(version, built, move=True)
            finally:
                self._staging.drop(staging)
        return version

    def add_entry(self, src: Path) -> str:
        """Add a complete entry folder made elsewhere (the version packed into a bento) under its own id."""
        with self.commits.claim(src.name) as version:
            self.commits.commit(version, src, move=False)
        return version

    def _seen_elsewhere(self) -> set[int]:
        return claims.seen_elsewhere(lambda: self.records(SERVING_RECORDS).values(), self.cached_newest())

    def sweep_orphans(self, *, every_project: bool = False) -> list[str]:
        """Remove what publishes cut short left, never what a live publish is writing: staging folders under
        this machine's `tmp/` that no process holds (each is flocked while its publish runs), and on S3 the
        files of claimed versions without a model.yaml whose claim nobody has rewritten for the grace period
        (a live publish rewrites it every heartbeat). The claim itself stays, so its number is never handed
        out again. With `every_project`, the claims of every project's model (a replica or worker at start:
        either may have been publishing into any of them). Best effort: a store that cannot be reached is
        logged, not raised. Returns what went."""
        removed = self._staging.sweep() + self.commits.sweep()
        if not every_project or self.base.root:
            return removed  # a folder store has no claims: each publish's own lock cleans up after a killed one
        try:
            names = projects.Registry(self.base).names()
        except StoreError as e:
            log.warning("the projects' orphan claims not swept: %s", e)
            return removed
        for name in names:
            if name != self.project:
                removed += self.for_project(name).commits.sweep()
        return removed

    # -- small records beside the versions (what each replica serves, job state, dataset heads) ----------
    def put_record(self, rel: str, data: dict, *, if_tag: str | None = None, create_only: bool = False) -> bool:
        """Write a small JSON object whole: an atomic rename in a folder, one PUT on S3. With `if_tag` (from
        `record`) only over that state of it, with `create_only` only where there is none: False when that
        condition does not hold (another writer came first), which is how job state and the one-job lock
        are shared between machines without a lock server."""
        raw = json.dumps(data, indent=self.objects.json_indent, sort_keys=True).encode()
        return self._put(rel, raw, if_match=if_tag, create_only=create_only)

    def _put(self, rel: str, data: bytes, **condition) -> bool:
        try:
            self.objects.put(rel, data, **condition)
        except Conflict:
            return False
        return True

    def record(self, rel: str) -> tuple[dict | None, str | None]:
        """One JSON record and the tag a conditional write over it needs; (None, None) when there is none or
        it does not parse (a record is only ever written whole, so that is damage, not a half write)."""
        raw, tag = self.objects.get(rel) or (None, None)
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            return None, tag
        return (data, tag) if isinstance(data, dict) else (None, tag)

    def put_file(self, rel: str, path: Path) -> None:
        """A file beside the records (a job's dataset): an upload, or an atomic copy in a folder store."""
        self.objects.upload(rel, path)

    def get_file(self, rel: str, dest: Path) -> None:
        """FileNotFoundError when the store has no such file."""
        if not self.objects.exists(rel):
            raise FileNotFoundError(f"{self.describe()}/{rel}")
        self.objects.download(rel, dest)

    def delete_file(self, rel: str) -> None:
        self.delete_record(rel)

    def put_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> bool:
        """A whole object from memory (an image of a dataset). With `create_only` it is written only where
        there is none (False then): content-addressed objects are never rewritten."""
        return self._put(rel, data, create_only=create_only)

    def read_bytes(self, rel: str) -> bytes | None:
        """A whole object beside the records (an image of a dataset), or None when there is none."""
        got = self.objects.get(rel)
        return got[0] if got else None

    def exists(self, rel: str) -> bool:
        return self.objects.exists(rel)

    def folders(self, prefix: str) -> list[str]:
        """Names of the sub-folders directly under `prefix` (common key prefixes on S3), sorted."""
        return self.objects.folders(prefix)

    def records(self, prefix: str) -> dict[str, object]:
        """Every JSON record under `prefix` (key relative to the store -> parsed object). One that is gone or
        does not parse by the time it is read (another reader removed it) is left out."""
        out = {}
        for key in self.objects.list(prefix):
            try:
                got = self.objects.get(key) if key.endswith(".json") else None
                if got is not None:
                    out[key] = json.loads(got[0])
            except (OSError, ValueError):
                continue
        return out

    def keys(self, prefix: str) -> list[str]:
        """The keys (relative to the store) of every file under `prefix`, without reading any of them."""
        return self.objects.list(prefix)

    def delete_record(self, rel: str) -> None:
        self.objects.delete(rel)

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


def _end_trial(state: dict, how: str, actor: str, reason: str) -> None:
    """A promotion or rollback ends the trial on, in the same pointer write (core/candidate.py)."""
    candidate.end(state, how, actor, reason)
