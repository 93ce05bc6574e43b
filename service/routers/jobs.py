"""Retrain jobs, newest first; their records outlive restarts."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import RefitDep
from service.errors import ApiError, clip
from service.jobs import public

router = APIRouter()


@router.get("/jobs")
def list_jobs(svc: RefitDep, limit: int = 20) -> list[dict[str, Any]]:
    """Retrain jobs, newest first; their state survives restarts (an interrupted job shows as failed)."""
    return [public(j) for j in svc.jobs.list(limit=max(1, min(limit, 500)))]


@router.get("/jobs/{job_id}")
def get_job(svc: RefitDep, job_id: str):
    """One retrain job: status, request, times, result or error, and `progress`: where its training run
    is, {phase, epoch, epochs, best_val_acc, eta_seconds, elapsed_seconds, message} (phases: preparing,
    features, head, partial/full/scratch, finishing, done)."""
    try:
        return public(svc.jobs.get(job_id))
    except KeyError:
        raise ApiError(404, f"no job {clip(job_id)}") from None
