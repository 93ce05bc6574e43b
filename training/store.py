"""Versions in BentoML's model store, and the promoted pointer beside it.

Each version is one immutable store entry `refit:vNNNN` holding model.onnx, config.json, metrics.json,
results.csv, dataset.json and confusion_matrix.png. It is built in a staging store and renamed into
place, so a crash at any point leaves either the whole version or nothing. "promoted" is a small JSON
file replaced atomically; every promote and rollback is appended to its history.

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
import os
import re
import shutil

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from training.paths import refit_home

MODEL_NAME = "refit"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


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


class Store:
    def __init__(self, home: Path | str | None = None):
        self.home = Path(home).resolve() if home else refit_home()
        if home:
            os.environ["BENTOML_HOME"] = str(self.home)
        self.models_dir = self.home / "models" / MODEL_NAME
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.pointer = self.home / "promoted.json"

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """One writer at a time across processes (CLI, service workers, retrain jobs)."""
        with open(self.home / ".refit.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Version ids in creation order; only complete entries (model.yaml present) count."""
        out = []
        for p in self.models_dir.iterdir() if self.models_dir.exists() else []:
            if _VERSION_RE.match(p.name) and (p / "model.yaml").is_file():
                out.append(p.name)
        return sorted(out, key=lambda v: int(v[1:]))

    def path(self, version: str) -> Path:
        version = self.resolve(version)
        return self.models_dir / version

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
        if v not in self.versions():
            raise StoreError(f"unknown version {version!r}; known: {', '.join(self.versions()) or 'none'}")
        return v

    def info(self, version: str) -> dict:
        """The version's metadata (as stored in BentoML's model.yaml) plus its metrics file."""
        from bentoml._internal.models import ModelStore

        v = self.resolve(version)
        # This store, not BentoML's global one: inside a bento, BentoML points the global store at the
        # bento's packed models, and retrained versions live under REFIT_HOME.
        m = ModelStore(self.home / "models").get(f"{MODEL_NAME}:{v}")
        info = dict(m.info.metadata)
        info.update(version=v, tag=str(m.tag), path=str(m.path),
                    created=info.get("created") or m.info.creation_time.isoformat(timespec="seconds"))
        metrics = Path(m.path) / "metrics.json"
        if metrics.is_file():
            info["metrics"] = json.loads(metrics.read_text())
        return info

    def onnx_path(self, version: str, precision: str | None = None) -> Path:
        p = self.path(version)
        if precision == "int8" and (p / "model.int8.onnx").is_file():
            return p / "model.int8.onnx"
        return p / "model.onnx"

    def verify(self, version: str) -> Path:
        """Checksum the version's ONNX files against those recorded at publish time; returns the path of
        the file to serve (FP32, or INT8 when it was chosen)."""
        info = self.info(version)
        root = Path(info["path"])
        serving = root / info.get("serving_file", "model.onnx")
        checks = {root / "model.onnx": info.get("onnx_sha256"), serving: info.get("serving_sha256")}
        for path, want in checks.items():
            if not path.is_file():
                raise StoreError(f"{version}: {path.name} is missing")
            if want and sha256_file(path) != want:
                raise StoreError(f"{version}: checksum mismatch for {path.name} (file changed since publish)")
        return serving

    # -- promoted pointer --------------------------------------------------------------------------
    def read_pointer(self) -> dict:
        """The pointer as {"version": str | None, "history": [event, ...]}; a missing file is an empty one.
        Raises PointerError when the file exists but is not what Refit writes."""
        try:
            raw = self.pointer.read_bytes()
        except FileNotFoundError:
            return {"version": None, "history": []}
        except OSError as e:
            raise PointerError(f"{self.pointer.name} cannot be read ({e.strerror})") from None
        try:
            state = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
            raise PointerError(f"{self.pointer.name} is not valid JSON ({e})") from None
        problem = _pointer_shape_problem(state)
        if problem:
            raise PointerError(f"{self.pointer.name} {problem}")
        state.setdefault("version", None)
        state.setdefault("history", [])
        return state

    def promoted(self) -> str | None:
        """The promoted version id, None when nothing is promoted; PointerError for a damaged pointer."""
        return self.read_pointer()["version"]

    def history(self) -> list[dict]:
        return self.read_pointer()["history"]

    def pointer_problem(self) -> str | None:
        """Why serving has no promoted version to follow, or None when the pointer is usable: a damaged
        pointer, or a missing one in a store that holds versions (nothing is promoted without a decision)."""
        try:
            state = self.read_pointer()
        except PointerError as e:
            return str(e)
        if state["version"] is None and not self.pointer.exists() and self.versions():
            return (f"no version is promoted ({self.pointer.name} is missing) while the store holds "
                    f"{', '.join(self.versions())}; promote one (`refit promote VERSION` or POST /promote)")
        return None

    def _pointer_for_update(self, actor: str) -> tuple[dict, dict | None]:
        """The pointer state to change, under the lock. A damaged pointer starts a new state whose first
        event records the repair; the damaged file is copied aside first, so nothing is lost."""
        try:
            state = self.read_pointer()
        except PointerError as e:
            kept = self.pointer.with_name(f"{self.pointer.name}.broken-{_stamp()}")
            try:
                shutil.copyfile(self.pointer, kept)
                where = f"the damaged file is kept as {kept.name}"
            except OSError as copy_error:
                kept, where = None, f"the damaged file could not be kept ({copy_error.strerror})"
            event = {"action": "repair", "version": None, "previous": None, "at": now_iso(), "actor": actor,
                     "reason": f"{e.problem}; {where}", "kept_as": kept.name if kept else None}
            return {"version": None, "history": [event]}, event
        return state, None

    def promote(self, version: str, *, actor: str = "cli", reason: str = "") -> dict:
        """Point serving at `version` after checking its file loads; recorded in the history. Repairs a
        damaged pointer (the returned event then carries `repaired`)."""
        with self.lock():
            v = self.resolve(version)
            path = self.verify(v)
            check_loadable(path)
            state, repaired = self._pointer_for_update(actor)
            event = {"action": "promote", "version": v, "previous": state["version"], "at": now_iso(),
                     "actor": actor, "reason": reason}
            state["version"] = v
            state["history"].append(event)
            atomic_write_json(self.pointer, state)
            return {**event, "repaired": repaired} if repaired else event

    def rollback(self, *, actor: str = "cli", reason: str = "") -> dict:
        """Go back one step along the promotion history: after promoting v2, v3 and v4, rollbacks give v3,
        then v2, then v1 (versions deleted since are skipped); a StoreError says when there is nothing
        earlier."""
        with self.lock():
            try:
                state = self.read_pointer()
            except PointerError as e:
                raise PointerError(f"cannot roll back: {e.problem}, so the versions promoted before are "
                                   "unknown") from None
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
            atomic_write_json(self.pointer, state)
            return event

    # -- writing -----------------------------------------------------------------------------------
    def publish(self, files: dict[str, Path], metadata: dict, labels: dict | None = None,
                stamp: Callable[[str], dict] | None = None) -> str:
        """Create the next version from files (name in the entry -> source path). All or nothing.
        `stamp(version)` runs under the lock once the id is known (to write it into the files) and
        returns extra metadata."""
        import bentoml
        from bentoml._internal.models import ModelStore

        with self.lock():
            tmp_root = self.home / "tmp"
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
            staging = tmp_root / f"staging-{uuid.uuid4().hex}"
            extra = stamp(version) if stamp else {}
            # BentoML's metadata takes basic types only; absent values (None) are left out.
            metadata = _drop_none({**metadata, **extra, "version": version, "created": now_iso()})
            with bentoml.models.create(f"{MODEL_NAME}:{version}", labels=labels or {}, metadata=metadata,
                                       _model_store=ModelStore(staging)) as m:
                for name, src in files.items():
                    shutil.copyfile(src, m.path_of(name))
            built = staging / MODEL_NAME / version
            for f in built.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(built, self.models_dir / version)  # the commit point
            tmp_latest = self.models_dir / f".latest.{uuid.uuid4().hex}"
            tmp_latest.write_text(version)
            os.replace(tmp_latest, self.models_dir / "latest")
            shutil.rmtree(staging, ignore_errors=True)
            return version

    def list_info(self) -> list[dict]:
        """Every version with its metadata; listing works whatever state the pointer is in."""
        try:
            promoted = self.promoted()
        except PointerError:
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


