"""What a route of service/routers/ depends on: the running service instance, `RefitDep`.

BentoML injects a route method's `self` with `Depends(bentoml.get_current_service)`; a router in its own
module reaches the service the same way. The annotation is a Protocol naming what the routers use, so that
this module (and the routers) need not import service/service.py, which imports them.
"""
from __future__ import annotations

from typing import Annotated, Any, Protocol

import bentoml
from fastapi import Depends


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


RefitDep = Annotated[Service, Depends(bentoml.get_current_service)]
