"""Drift of the versions this replica serves."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import RefitDep
from service.drift import served_report

router = APIRouter()


@router.get("/drift")
def drift_report(svc: RefitDep) -> dict[str, Any]:
    """Drift per served version: how far recent inputs lie from the training images (embedding score)
    and how the predicted labels differ from the validation labels (total variation), over the pooled
    windows of this replica's workers, with the thresholds and whether drift is flagged."""
    return {"replica": svc.replica, **served_report(svc)}
