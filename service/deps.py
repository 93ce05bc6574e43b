"""What a route of service/routers/ depends on: the serving parts of the request's project, `RefitDep`.

BentoML injects a route method's `self` with `Depends(bentoml.get_current_service)`; a router in its own
module reaches the service the same way, and through it the `Space` of the project the request is for
(service/projects.py: `/projects/NAME/...`, else `default`), which has the same attributes. So a router serves
every project without knowing of projects; `ServiceDep` is the service itself (the project admin routes).
The annotation is a Protocol naming what the routers use, so that this module (and the routers) need not
import service/service.py, which imports them.
"""
from __future__ import annotations

from typing import Annotated, Any, Protocol

import bentoml
from fastapi import Depends, Request

from service.projects import PROJECT


class Service(Protocol):
    """The parts of `service.service.Refit` the routers use (its `__init__` makes them)."""

    store: Any  # core.store.Store
    board: Any  # service.replicas.StatusBoard
    replica: str
    holder: Any  # service.model.ModelHolder
    drift_monitor: Any  # service.drift.DriftMonitor
    captures: Any  # service.capture.Captures
    jobs: Any  # service.jobs.Jobs or service.queue.SharedJobs
    runner: Any  # service.runner.LocalRunner or service.queue.QueueRunner
    trains_here: bool


ServiceDep = Annotated[Any, Depends(bentoml.get_current_service)]


def current_space(request: Request, svc: ServiceDep) -> Service:
    return svc.spaces.get(request.scope.get(PROJECT, "default"))


RefitDep = Annotated[Service, Depends(current_space)]
