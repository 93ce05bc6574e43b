"""The candidate: a version on trial beside the promoted one, in shadow or canary mode (service/trial.py)."""
from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from core.store import StoreError
from service.deps import RefitDep
from service.errors import ApiError, clip
from service.model import open_version
from service.schemas import CandidateInput
from service.trial import report

log = logging.getLogger("refit.service")
router = APIRouter()
# What shadow mode runs the candidate on is the promoted version's decoded input: these must match.
SAME_INPUT = ("input_size", "resize_size", "mean", "std", "interpolation")


@router.get("/candidate")
def get_candidate(svc: RefitDep) -> dict[str, Any] | None:
    """The candidate, its mode and percent, when it was set, and the figures every worker of every replica
    measured of it since (summed); `null` when none is set."""
    try:
        cand, promoted = svc.store.candidate(), svc.store.promoted()
    except StoreError as e:
        raise ApiError(503, f"the store cannot be read: {e}") from None
    if cand is None:
        return None
    return _shown(svc, cand, promoted)


@router.post("/candidate", response_model=None, **CandidateInput.openapi("candidate"))
def set_candidate(svc: RefitDep, body: Annotated[CandidateInput, Depends(CandidateInput.parse)]) -> dict[str, Any]:
    """Try `version` beside the promoted one: `shadow` (it also runs on `percent` % of requests, its answers
    discarded and compared) or `canary` (it answers `percent` % of clients). Setting it again changes mode or
    percent. 404 for an unknown version; 409 for the promoted version itself, nothing promoted, or a version
    with other classes (or, for shadow, other preprocessing); 422 for a version that does not load."""
    versions = svc.store.versions()
    if body.version not in versions:
        raise ApiError(404, f"unknown version {clip(body.version)}; known: {', '.join(versions) or 'none'}")
    try:
        promoted = svc.store.promoted()
    except StoreError as e:
        raise ApiError(409, f"refused: {e}") from None
    if promoted is None:
        raise ApiError(409, "nothing is promoted: a candidate is tried beside the promoted version")
    if body.version == promoted:
        raise ApiError(409, f"{body.version} is the promoted version; a candidate is another version tried beside it")
    try:
        theirs = open_version(svc.store, body.version, 1)
    except Exception as e:  # noqa: BLE001 - whatever stops it loading is the reason it is refused
        raise ApiError(422, f"{body.version} does not load: {e}") from None
    _check_match(svc, body, promoted, theirs)
    guard = body.guard.model_dump() if body.guard else None
    try:
        svc.store.set_candidate(body.version, mode=body.mode, percent=body.percent, guard=guard, actor="api")
    except StoreError as e:
        raise ApiError(409, f"refused: {e}") from None
    log.info("candidate %s set: %s at %g %%", body.version, body.mode, body.percent)
    return _shown(svc, svc.store.candidate(), promoted)


@router.delete("/candidate")
def clear_candidate(svc: RefitDep) -> dict[str, Any]:
    """End the trial; `cleared` is the version that was on trial (null when none was)."""
    try:
        event = svc.store.clear_candidate(actor="api", reason="cleared over HTTP")
    except StoreError as e:
        raise ApiError(409, f"refused: {e}") from None
    return {"cleared": event["version"] if event else None, "event": event}


def _check_match(svc, body: CandidateInput, promoted: str, theirs) -> None:
    ours = svc.holder.current
    if ours is None or ours.version != promoted:  # this worker has not caught up yet: read the promoted file
        try:
            ours = open_version(svc.store, promoted, 1)
        except Exception as e:  # noqa: BLE001 - the promoted version itself is broken here
            raise ApiError(409, f"the promoted version {promoted} does not load here: {e}") from None
    if tuple(theirs.labels) != tuple(ours.labels) or theirs.contract.task != ours.contract.task:
        raise ApiError(409, f"{body.version} has other classes than the promoted {promoted}: "
                            f"{', '.join(theirs.labels)} vs {', '.join(ours.labels)}",
                       classes=list(theirs.labels), promoted_classes=list(ours.labels))
    if body.mode == "shadow":
        differ = [k for k in SAME_INPUT if getattr(theirs.contract, k) != getattr(ours.contract, k)]
        if differ:
            raise ApiError(409, f"shadow runs {body.version} on the promoted version's decoded input, but their "
                                f"preprocessing differs ({', '.join(differ)}); try it as a canary")


def _shown(svc, cand: dict, promoted: str | None) -> dict[str, Any]:
    merged, workers = svc.holder.trials.merged(cand["id"])
    return {"version": cand["version"], "mode": cand["mode"], "percent": cand["percent"], "set_at": cand["set_at"],
            "changed_at": cand.get("changed_at"), "actor": cand.get("actor"), "guard": cand.get("guard"),
            "trial": cand["id"], "promoted": promoted, "figures": report(merged, promoted, cand["version"]),
            "workers_reporting": workers,
            "figures_note": "summed over every model worker of every replica; each writes its figures every "
                            "heartbeat (REFIT_HEARTBEAT_SECONDS), the one answering now writes its own first"}
