"""Projects: many classifiers in one store, each with its own versions, pointer, jobs, datasets and token.

A project is a name (`NAME_PATTERN`). `default` always exists and is the store as it was before projects: its
versions are BentoML's model `refit` (`models/refit/`) and its records sit at the store's root, so an existing
store opens as `default` with nothing to migrate. Every other project `NAME` is

- its own BentoML model, `refit-NAME` (`models/refit-NAME/vNNNN/`), so `bentoml models list` shows one line of
  versions per project, and
- its own records under `projects/NAME/`: `project.json` (the registry entry: created, the token's sha256),
  `promoted.json`, `jobs/`, `datasets/`, `captures/`, `serving/`: the layout of the default project, one level
  down. A `core.store.Store(project=NAME)` reads and writes exactly there.

A project's token is `NAME.SECRET`: it names its project, so a token of another project is told apart from a
wrong one (403, not 401) without reading every project's record. Only its sha256 is stored, compared in
constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets

from core.clock import now_iso
from core.objects import Conflict, ObjectStore, StoreError

NAME_PATTERN = "[a-z0-9][a-z0-9-]{0,62}"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
DEFAULT = "default"
PREFIX = "projects/"
RECORD = "project.json"


class ProjectNameError(ValueError):
    """Not a project name: the message gives the pattern."""


class UnknownProject(StoreError):
    def __init__(self, name: str):
        super().__init__(f"unknown project {name!r}; create it with PUT /projects/{name} "
                         f"(or `refit project create {name}`)")
        self.name = name


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name) if len(str(name)) <= 80 else repr(str(name)[:80]) + "..."
        raise ProjectNameError(f"project name {shown} does not match {NAME_PATTERN}")
    return name


def model_name(project: str) -> str:
    """BentoML's model name of the project's versions."""
    return "refit" if project == DEFAULT else f"refit-{project}"


def entries(project: str) -> str:
    """Where the project's versions live, relative to the store's root."""
    return f"models/{model_name(project)}/"


def records_url(url: str, project: str) -> str:
    """The store URL (folder or s3://) under which the project's records live."""
    return url if project == DEFAULT else f"{url.rstrip('/')}/{PREFIX}{project}"


def split_path(path: str) -> tuple[str | None, str]:
    """`/projects/NAME/rest` -> (NAME, `/rest`); any other path -> (None, path). The project admin routes
    (`/projects`, `/projects/NAME`, `/projects/NAME/token`) are paths of their own, not a project's."""
    if not path.startswith(f"/{PREFIX}"):
        return None, path
    name, slash, rest = path[len(PREFIX) + 1:].partition("/")
    if not slash or not rest or rest == "token":
        return None, path
    return name, "/" + rest


def purge(objects: ObjectStore, name: str) -> int:
    """Delete every file of a project but its record: its versions and its records. Returns how many went. A
    folder store's emptied folders go too."""
    keys = [k for k in objects.list(f"{PREFIX}{name}/") if k != f"{PREFIX}{name}/{RECORD}"]
    keys += objects.list(entries(name))
    for k in keys:
        objects.delete(k)
    if objects.root is not None:
        record = objects.root / PREFIX / name / RECORD
        for top in (objects.root / PREFIX / name, objects.root / entries(name)):
            for f in [p for p in top.rglob("*") if not p.is_dir() and p != record]:
                f.unlink(missing_ok=True)  # what the listing leaves out: lock files, BentoML's `latest`
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(d)
            _rmdir(top)
    return len(keys)


def _rmdir(d) -> None:
    try:
        d.rmdir()
    except OSError:
        pass  # not empty (the record, or a file written since): left


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_project(token: str) -> str | None:
    """The project a token names (`NAME.SECRET`), or None for a token of no project (the admin token)."""
    name, dot, secret = token.partition(".")
    return name if dot and secret and NAME_RE.match(name) else None


class Registry:
    """The projects of one store, over the store's root objects (`Store.base`)."""

    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def _key(self, name: str) -> str:
        return f"{PREFIX}{name}/{RECORD}"

    def get(self, name: str) -> dict | None:
        """The project's record (None for one that does not exist); the default project's is made up."""
        check_name(name)
        if name == DEFAULT:
            return {"name": DEFAULT, "created": None, "token_sha256": None}
        got = self.objects.get(self._key(name))
        if got is None:
            return None
        try:
            record = json.loads(got[0])
        except ValueError:
            raise StoreError(f"{self.objects.url}/{self._key(name)} is not valid JSON") from None
        return record if isinstance(record, dict) else None

    def exists(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self) -> list[str]:
        """Every project, `default` first, the others by name."""
        found = [n for n in self.objects.folders(PREFIX) if NAME_RE.match(n) and n != DEFAULT
                 and self.objects.exists(self._key(n))]
        return [DEFAULT, *sorted(found)]

    def create(self, name: str) -> str | None:
        """Make the project; returns its token, shown this once, or None when it exists already."""
        check_name(name)
        if name == DEFAULT:
            return None
        token = _new_token(name)
        record = {"name": name, "created": now_iso(), "token_sha256": token_hash(token)}
        try:
            self.objects.put(self._key(name), json.dumps(record, sort_keys=True).encode(), create_only=True)
        except Conflict:
            return None
        return token

    def new_token(self, name: str) -> str:
        """Issue a new token; the old one stops working (on every replica within `guard.TOKEN_TTL`)."""
        check_name(name)
        if name == DEFAULT:
            raise StoreError("the default project has no token of its own: it uses the admin token, REFIT_TOKEN")
        for _ in range(20):
            got = self.objects.get(self._key(name))
            if got is None:
                raise UnknownProject(name)
            record = {**json.loads(got[0]), "token_rotated": now_iso()}
            token = _new_token(name)
            record["token_sha256"] = token_hash(token)
            try:
                self.objects.put(self._key(name), json.dumps(record, sort_keys=True).encode(), if_match=got[1])
            except Conflict:
                continue  # another rotation came first: this one goes on top of it
            return token
        raise StoreError(f"could not rotate the token of {name!r}: the record keeps changing")

    def remove(self, name: str) -> None:
        """The record first: from then on the project is unknown, even while its files are being removed."""
        self.objects.delete(self._key(name))


def token_matches(record: dict | None, token: str) -> bool:
    wanted = (record or {}).get("token_sha256")
    return bool(wanted) and hmac.compare_digest(token_hash(token), wanted)


def _new_token(name: str) -> str:
    return f"{name}.{secrets.token_urlsafe(32)}"
