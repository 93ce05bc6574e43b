"""Projects: create, list, rotate a token, delete. Every other route of a project is today's route under
`/projects/NAME/` (service/projects.py); these need the admin token when REFIT_TOKEN is set (service/guard.py)."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Path
from starlette.responses import JSONResponse

from core.datasets import Datasets
from core.projects import DEFAULT, NAME_PATTERN, ProjectNameError, Registry, UnknownProject, check_name, purge
from core.store import StoreError
from service.deps import ServiceDep
from service.errors import ApiError
from service.jobs import BUSY

log = logging.getLogger("refit.service")
router = APIRouter()
NAME = Path(..., description=f"The project's name: {NAME_PATTERN}.")


def _registry(svc) -> Registry:
    return Registry(svc.store.base)


def _named(name: str) -> str:
    try:
        return check_name(name)
    except ProjectNameError as e:
        raise ApiError(422, str(e)) from None


@router.get("/projects")
def list_projects(svc: ServiceDep) -> dict[str, Any]:
    """Every project with its promoted version, its number of versions, its datasets and its running job."""
    try:
        names = _registry(svc).names()
    except StoreError as e:
        raise ApiError(503, f"the projects cannot be listed: {e}") from None
    return {"projects": [_summary(svc, n) for n in names]}


def _summary(svc, name: str) -> dict[str, Any]:
    try:
        space = svc.spaces.get(name)
    except ApiError:  # deleted since it was listed
        return {"name": name, "deleted": True}
    store = space.store
    row: dict[str, Any] = {"name": name, "created": (_registry(svc).get(name) or {}).get("created")}
    try:
        row["promoted"] = store.promoted()
    except StoreError as e:
        row["promoted"], row["problem"] = None, str(e)
    try:
        row["versions"] = len(store.versions())
        row["datasets"] = [d["dataset"] for d in Datasets(store).list()]
        running = space.jobs.active()
        row["job"] = {"id": running["id"], "status": running["status"]} if running else None
    except (StoreError, OSError) as e:
        row["problem"] = f"the store cannot be read: {e}"
    return row


@router.put("/projects/{name}", status_code=201)
def create_project(svc: ServiceDep, name: str = NAME):
    """Create a project: 201 with its token, shown this once (only its hash is kept); 200 without a token
    when it exists already."""
    _named(name)
    registry = _registry(svc)
    try:
        if registry.get(name) is None:
            purge(svc.store.base, name)  # what a delete cut short left under this name
        token = registry.create(name)
    except StoreError as e:
        raise ApiError(503, f"project {name!r} cannot be created: {e}") from None
    svc.spaces.forget(name)  # seen at once on this worker
    if token is None:
        return JSONResponse({"name": name}, status_code=200)
    log.info("project %s created", name)
    return JSONResponse({"name": name, "token": token}, status_code=201)


@router.post("/projects/{name}/token")
def new_token(svc: ServiceDep, name: str = NAME) -> dict[str, str]:
    """A new token for the project; the old one stops working (on every replica within 2 s)."""
    _named(name)
    if name == DEFAULT:
        raise ApiError(409, "the default project has no token of its own: it uses the admin token (REFIT_TOKEN)")
    try:
        token = _registry(svc).new_token(name)
    except UnknownProject as e:
        raise ApiError(404, str(e), project=name) from None
    except StoreError as e:
        raise ApiError(503, f"the token of {name!r} cannot be changed: {e}") from None
    svc.spaces.forget(name)
    log.info("project %s: new token issued", name)
    return {"name": name, "token": token}


@router.delete("/projects/{name}")
def delete_project(svc: ServiceDep, name: str = NAME) -> dict[str, Any]:
    """Delete a project and everything of it: its versions, pointer, datasets, captures and job records
    (409 while one of its jobs runs; the default project cannot be deleted). Requests already running on
    its model finish; the next ones get 404."""
    _named(name)
    if name == DEFAULT:
        raise ApiError(409, "the default project cannot be deleted")
    space = svc.spaces.get(name)  # 404 for a project that does not exist
    running = space.jobs.active()
    if running is not None:
        raise ApiError(409, f"project {name!r} has a job running ({running['id']}); {BUSY.split(';')[0]}: "
                            "delete it when the job has ended", job=running["id"])
    versions = len(space.store.versions())
    registry = _registry(svc)
    try:
        registry.remove(name)  # first: from here on the project is unknown, even while its files go
        svc.spaces.forget(name)
        files = purge(svc.store.base, name)
    except StoreError as e:
        raise ApiError(503, f"project {name!r} was only partly deleted ({e}); it is unknown now, and creating it "
                            "again clears what is left") from None
    svc.spaces.purge_local(name)
    log.info("project %s deleted: %d versions, %d files", name, versions, files)
    return {"name": name, "deleted": True, "versions": versions, "files": files}
