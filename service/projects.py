"""Projects on one model worker: the routes' prefix, the registry read with a short cache, and each project's
serving parts (`Space`), with the loaded versions of projects other than `default` in an LRU.

- **The prefix.** `ProjectScope` (ASGI middleware) turns `/projects/NAME/<route>` into `/<route>` for project
  NAME: it refuses a bad name (422, with the pattern) and an unknown project (404), and marks the request's
  scope (`PROJECT`) and context (`current`), so every route of today serves every project unchanged. What
  remains under `/projects` is the project admin resource (service/routers/projects.py).
- **The registry** (`Directory`) is read through a cache of `TTL` seconds: a project created, deleted or given
  a new token on another replica is seen within it; on this worker at once.
- **Spaces.** A project's `Space` has the attributes a route reaches (`service.deps.Service`): its store, jobs
  and runner, captures, drift window, status board, and `holder`. The default project's are the service's own
  and its version is always loaded (`/readyz` follows it). Another project's version loads on its first
  request, and at most `REFIT_MAX_LOADED_MODELS` of them stay loaded, the least recently used evicted first;
  concurrent first requests wait on one load. An evicted holder stops watching its pointer; requests that hold
  its model (`Loaded`) finish on it, since nothing is closed under them.
"""
from __future__ import annotations

import contextvars
import logging
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable

from core.objects import StoreError, open_objects
from core.projects import DEFAULT, ProjectNameError, Registry, UnknownProject, check_name, model_name, split_path
from core.settings import settings
from core.store import Store
from service.capture import Captures
from service.drift import DriftMonitor
from service.errors import ApiError, send_error
from service.jobs import Jobs
from service.model import ModelHolder
from service.replicas import StatusBoard

log = logging.getLogger("refit.projects")

PROJECT = "refit.project"  # scope key: the project a request is for
TTL = 2.0  # seconds a registry read is trusted (a deleted project, a rotated token: seen within this)
current: contextvars.ContextVar[str] = contextvars.ContextVar("refit_project", default=DEFAULT)


class Directory:
    """The registry, read through a short cache (one per worker process)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._seen: dict[str, tuple[float, dict | None]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> dict | None:
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(name)
        if hit and now - hit[0] < TTL:
            return hit[1]
        record = self.registry.get(name)
        with self._lock:
            self._seen[name] = (now, record)
            if len(self._seen) > 4096:  # random names cannot grow it without bound
                self._seen.clear()
        return record

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)


_directory: Directory | None = None


def directory() -> Directory:
    global _directory
    if _directory is None:
        _directory = Directory(Registry(open_objects(settings().store_url)))
    return _directory


class ProjectScope:
    """ASGI middleware: `/projects/NAME/...` served as `/...` of project NAME."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        name, rest = split_path(scope["path"])
        if name is None:
            return await self.app(scope, receive, send)
        try:
            check_name(name)
            known = directory().get(name) is not None
        except ProjectNameError as e:
            return await send_error(send, 422, {"error": str(e)})
        except StoreError as e:
            return await send_error(send, 503, {"error": f"the project registry cannot be read: {e}"})
        if not known:
            return await send_error(send, 404, {"error": str(UnknownProject(name)), "project": name})
        raw = rest.encode()
        scope = {**scope, "path": rest, "raw_path": raw, PROJECT: name}
        token = current.set(name)
        try:
            await self.app(scope, receive, send)
        finally:
            current.reset(token)


class Space:
    """One project's serving parts on this worker: what its routes reach."""

    def __init__(self, project: str, store: Store, *, replica: str, board, captures, jobs, runner, drift_monitor,
                 trains_here: bool, holder: Callable[[], ModelHolder]):
        self.project, self.store, self.replica, self.board = project, store, replica, board
        self.captures, self.jobs, self.runner, self.drift_monitor = captures, jobs, runner, drift_monitor
        self.trains_here = trains_here
        self._holder = holder

    @property
    def holder(self) -> ModelHolder:
        """The project's model holder, loaded now if it is not (the default project's always is)."""
        return self._holder()


class Spaces:
    """Every project's `Space` on this worker, and the LRU of loaded holders of projects other than default."""

    def __init__(self, default: Space, *, make_runner: Callable, metrics=None):
        self.default = default
        self.make_runner = make_runner  # jobs -> runner, as the service makes its own
        self.metrics = metrics  # service.metrics.Counters
        self._spaces: dict[str, Space] = {}
        self._loaded: OrderedDict[str, ModelHolder] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        # A project deleted on another worker or replica: its loaded holder would watch its pointer and rewrite
        # its status record for good, so loaded projects are looked up again now and then.
        threading.Thread(target=self._janitor, name="refit-projects", daemon=True).start()

    def _janitor(self) -> None:
        while True:
            time.sleep(1.0)
            for name in self.loaded():
                try:
                    gone = directory().get(name) is None
                except Exception:  # noqa: BLE001 - the store away: keep serving what is loaded, look again later
                    continue
                if gone:
                    log.info("project %s was deleted: its version is unloaded", name)
                    self.forget(name)

    def get(self, name: str) -> Space:
        """The space of a project that exists; ApiError 404 for one that does not (deleted a moment ago)."""
        if name == DEFAULT:
            return self.default
        if directory().get(name) is None:
            self.forget(name)
            raise ApiError(404, str(UnknownProject(name)), project=name)
        with self._lock:
            space = self._spaces.get(name)
            if space is None:
                space = self._spaces[name] = self._make(name)
        return space

    def _make(self, name: str) -> Space:
        s = settings()
        d = self.default
        store = d.store.for_project(name)
        if s.queue:
            from service.queue import SharedJobs

            jobs = SharedJobs(store, s.queue)
        else:
            jobs = Jobs(store.home, name)
            jobs.recover()
        captures = Captures(store, max_images=s.capture_max_images, days=s.capture_days,
                            max_bytes=s.capture_max_bytes, on_drop=d.captures.on_drop)
        return Space(name, store, replica=d.replica, board=StatusBoard(store), captures=captures, jobs=jobs,
                     runner=self.make_runner(jobs), drift_monitor=DriftMonitor(s.drift_window),
                     trains_here=d.trains_here, holder=lambda: self.holder(name))

    def holder(self, name: str) -> ModelHolder:
        """The project's holder, from the LRU or loaded now (one load however many callers wait on it)."""
        if name == DEFAULT:
            return self.default.holder
        with self._lock:
            held = self._loaded.get(name)
            if held is not None:
                self._loaded.move_to_end(name)
                return held
            pending = self._loading.get(name)
            mine = pending is None
            if mine:
                pending = self._loading[name] = Future()
        if not mine:
            return pending.result()
        try:
            held = self._load(name)
        except BaseException as e:
            with self._lock:
                self._loading.pop(name, None)
            pending.set_exception(e)
            raise
        evicted = []
        with self._lock:
            self._loaded[name] = held
            self._loading.pop(name, None)
            while len(self._loaded) > settings().max_loaded_models:
                evicted.append(self._loaded.popitem(last=False))
        pending.set_result(held)
        for old_name, old in evicted:
            self._evict(old_name, old)
        return held

    def _load(self, name: str) -> ModelHolder:
        space = self.get(name)
        s = settings()
        t0 = time.perf_counter()
        held = ModelHolder(space.store, threads=s.ort_threads, poll_seconds=s.poll_seconds,
                           drift=space.drift_monitor)
        seconds = time.perf_counter() - t0
        log.info("project %s: loaded %s in %.3fs", name, held.current.version if held.current else None, seconds)
        if self.metrics:
            self.metrics.loaded(name, seconds)
        return held

    def _evict(self, name: str, held: ModelHolder) -> None:
        """Stop watching; a request holding its model finishes on it (nothing it uses is closed)."""
        held.close()
        log.info("project %s: evicted %s (least recently used)", name, held.current.version if held.current else None)
        if self.metrics:
            self.metrics.evicted(name)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def forget(self, name: str) -> None:
        """A project deleted: its holder stops, its space goes, the next request of it is a 404."""
        directory().forget(name)
        with self._lock:
            held = self._loaded.pop(name, None)
            self._spaces.pop(name, None)
        if held is not None:
            held.close()

    def purge_local(self, name: str) -> None:
        """This machine's copies of a deleted project: its job folders and its cache of versions."""
        store = self.default.store
        shutil.rmtree(store.home / "projects" / name, ignore_errors=True)
        if store.remote is not None:
            shutil.rmtree(store.home / "models" / model_name(name), ignore_errors=True)

    def spaces(self) -> list[Space]:
        with self._lock:
            return [self.default, *self._spaces.values()]
