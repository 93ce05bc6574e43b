"""Retrain: admit a job and follow it by its task id (the job's id), or wait for it."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse

from core.settings import settings
from service.admission import admit
from service.deps import RefitDep, Service
from service.errors import ApiError
from service.runner import task_result, task_status
from service.schemas import RETRAIN_BODY

router = APIRouter()
TASK_ID = Query("", description="The id /retrain/submit answered with.")


@router.post("/retrain/submit", openapi_extra=RETRAIN_BODY)
async def retrain_submit(svc: RefitDep, request: Request) -> dict[str, str]:
    """Train a new version on the dataset and publish it, in the background: answers at once with a
    `task_id` (409 while another retrain runs); follow it with /retrain/status and /retrain/get."""
    _can_retrain(svc)
    job = await admit(request, svc.jobs, svc.store)
    await asyncio.to_thread(svc.runner.submit, job["id"]) if settings().queue else svc.runner.submit(job["id"])
    return {"task_id": job["id"], "status": "in_progress"}


@router.post("/retrain", openapi_extra=RETRAIN_BODY)
async def retrain(svc: RefitDep, request: Request) -> dict[str, Any]:
    """The same as /retrain/submit, answered when the job ends, with what /retrain/get gives; a client
    that hangs up before then stops the job."""
    _can_retrain(svc)
    job = await admit(request, svc.jobs, svc.store)
    job = await _unless_hung_up(request, svc.runner.run(job["id"]))
    if job is None:
        raise ApiError(499, "the client closed the request; the job was stopped")
    status, body = task_result(job)
    return JSONResponse(body, status_code=status)


@router.get("/retrain/status")
def retrain_status(svc: RefitDep, task_id: str = TASK_ID):
    """`in_progress` (queued or training), `completed` or `failed` (see /retrain/get for why), with the
    job's id and times, and while it trains its `progress` (see GET /jobs/{id}); tasks outlive restarts
    (a job cut short by one is `failed`)."""
    return task_status(_task(svc, task_id))


@router.get("/retrain/get")
def retrain_get(svc: RefitDep, task_id: str = TASK_ID):
    """The result of a completed task: `job_id`, `version`, `metrics`, `promoted`, `promotion`, ...; a
    failed task answers with its error and status code (422 a dataset problem, 500 a training failure);
    400 while it runs."""
    status, body = task_result(_task(svc, task_id))
    return JSONResponse(body, status_code=status)


def _task(svc: Service, task_id: str) -> dict:
    """The job of a task id (ApiError 400 or 404 without one). A task id is its job's id; records made when
    BentoML gave task ids keep them in `task_id`."""
    if not task_id:
        raise ApiError(400, "task_id is required (the id /retrain/submit answered with)")
    try:
        return svc.runner.get(task_id)
    except KeyError:
        job = next((j for j in svc.jobs.list(limit=100_000) if j.get("task_id") == task_id), None)
    shown = task_id if len(task_id) <= 100 else task_id[:100] + "..."
    if job is None:
        raise ApiError(404, f"unknown task_id {shown!r}")
    return job


def _can_retrain(svc: Service) -> None:
    if not settings().queue and not svc.trains_here:
        raise ApiError(503, "this server cannot train: its install has no training code (torch); "
                            "run `refit worker` on a machine that has it and set REFIT_QUEUE here")


async def _unless_hung_up(request: Request, work):
    """Await `work`, or cancel it when the client disconnects first (Starlette would let it run on); None
    then. The request's body has been read, so the next message the server sends is the disconnect."""
    work = asyncio.ensure_future(work)

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(hung_up())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # also when this request itself is cancelled
    if work not in done:
        await asyncio.wait({work})  # the job records its cancellation
        return None
    return work.result()
