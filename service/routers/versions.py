"""Versions: list them, show one and its figures, promote one, roll back."""
from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from core.store import StoreError
from service import console
from service.deps import RefitDep
from service.errors import ApiError, clip
from service.guard import authorized
from service.replicas import disagreement
from service.schemas import PromoteInput, RollbackInput

log = logging.getLogger("refit.service")
router = APIRouter()


@router.get("/versions")
def versions(svc: RefitDep) -> dict[str, Any]:
    """Every version (id, created, strategy, metrics), which one is promoted, and what each model
    worker of every live replica serves, with the reason when a worker refused a version. `replica` is
    the replica that answered. `problem` says why nothing is promoted when the pointer is damaged or
    missing (promote a version to repair it), or that the store cannot be read; `disagreement` what the
    live workers disagree on (service/replicas.py), null when they all serve one model."""
    try:
        infos = svc.store.list_info()
    except StoreError as e:  # S3 unreachable, or the bucket gone: the same shape, with the cause
        log.error("cannot list the versions in the store: %s", e)
        return {"promoted": None, "problem": f"the store cannot be read: {e}", "versions": [],
                "replica": svc.replica, "serving": [], "refused": [], "disagreement": None}
    try:
        promoted = svc.store.promoted()
    except StoreError:
        promoted = None
    rows = [version_row(i) for i in infos]
    try:
        workers, refused = svc.board.live(), svc.board.refusals()
    except StoreError as e:  # the store is unreachable: `problem` says so too
        log.error("cannot read the replicas' status from the store: %s", e)
        workers, refused = [], []
    refusals = [w["error"] for w in workers if w.get("error")] + refused
    recorded = {i["version"]: i.get("serving_sha256") for i in infos}
    return {"promoted": promoted, "problem": svc.store.pointer_problem(), "versions": rows,
            "replica": svc.replica, "serving": workers, "refused": refusals,
            "disagreement": disagreement(workers, recorded)}


@router.get("/versions/{version}")
def version_detail(svc: RefitDep, version: str, request: Request):
    """One version: what /versions lists for it, plus its label problems (likely mislabeled images with
    their given and suggested labels) and the near-duplicates found across its train and validation sets.
    The images' paths of both lists are given with the token only (when the server has one); without
    it, their counts."""
    try:
        info = svc.store.info(version)
    except StoreError as e:
        raise ApiError(404, str(e)) from None
    try:
        info["promoted"] = info["version"] == svc.store.promoted()
    except StoreError:
        info["promoted"] = False
    metrics = info.get("metrics") or {}
    none = {"available": False, "reason": "not recorded for this version (published before these checks)"}
    # Per-class figures and the confusion matrix as numbers, for pages that draw their own table; the
    # figures training drew are at /versions/{id}/files/{name}.
    detail = {k: metrics[k] for k in ("per_class", "confusion_matrix", "int8", "parity") if k in metrics}
    # `why`: the one line saying which strategy won and why (older versions: their metrics' auto summary).
    why = info.get("why") or (metrics.get("auto") or {}).get("summary")
    detail.update(_labels_of(svc, info, metrics))
    return {**version_row(info), **detail, "precision": info.get("precision"), "why": why,
            "balanced_accuracy": metrics.get("balanced_accuracy"), "balance": metrics.get("balance"),
            "files": [n for n in console.VERSION_FILES if svc.store.version_file(version, n) is not None],
            **_image_lists({"label_problems": metrics.get("label_problems", none),
                            "near_duplicates": metrics.get("near_duplicates", none)}, authorized(request.scope))}


def _labels_of(svc, info: dict, metrics: dict) -> dict:
    """A multi-label version's task, thresholds and figures: `task`, `thresholds` ({label: threshold}: the
    served contract's when this worker serves the version, else the ones training recorded) and, as training
    wrote them, `per_label`, `map`, `micro_f1`, `macro_f1`, `subset_accuracy`. Nothing for a single-label one."""
    model = svc.holder.current
    served = model is not None and model.version == info["version"]
    per_label = metrics.get("per_label") if isinstance(metrics.get("per_label"), dict) else None
    multi = (model.contract.multi_label if served else None) or info.get("task") == "multi_label" or bool(per_label)
    if not multi:
        return {}
    if served and model.cuts is not None:
        thresholds = {label: round(float(t), 6) for label, t in zip(model.labels, model.cuts, strict=True)}
    else:
        thresholds = {label: m["threshold"] for label, m in (per_label or {}).items()
                      if isinstance(m, dict) and isinstance(m.get("threshold"), (int, float))}
    figures = {k: metrics[k] for k in ("map", "micro_f1", "macro_f1", "subset_accuracy") if k in metrics}
    return {"task": "multi_label", "thresholds": thresholds, **figures,
            **({"per_label": per_label} if per_label is not None else {})}


@router.get("/versions/{version}/files/{name}")
def version_file(svc: RefitDep, version: str, name: str):
    """A figure of a version that training wrote: `confusion_matrix.png` or `results.csv` (one row per
    epoch, for the curves). 404 for an unknown version, a file this version lacks, or another name."""
    if name not in console.VERSION_FILES:
        raise ApiError(404, f"no file {name[:100]!r} is served; files: {', '.join(console.VERSION_FILES)}")
    try:
        data = svc.store.version_file(version, name)
    except StoreError as e:
        raise ApiError(404, str(e)) from None
    if data is None:
        raise ApiError(404, f"{version} has no {name} (it was not trained here, or predates it)")
    return Response(data, media_type=console.VERSION_FILES[name],
                    headers={"cache-control": "max-age=86400, immutable"})  # versions never change


@router.post("/promote", response_model=None, **PromoteInput.openapi("promote"))
def promote(svc: RefitDep, body: Annotated[PromoteInput, Depends(PromoteInput.parse)]) -> dict[str, Any]:
    """Serve `version`: its checksum and loadability are checked first; every worker follows within
    seconds. Over a damaged pointer this repairs it (the damaged file is kept aside; see `repaired`)."""
    version = body.version
    if version not in svc.store.versions():
        raise ApiError(404, f"unknown version {clip(version)}; known: {', '.join(svc.store.versions()) or 'none'}")
    try:
        event = svc.store.promote(version, actor="api", reason=body.reason)
    except StoreError as e:
        log.error("promotion of %s refused: %s", version, e)
        try:
            svc.board.record_refusal(version, str(e), svc.replica)
        except StoreError as why:
            log.error("cannot record the refusal in the store: %s", why)
        raise ApiError(409, f"refused: {e}") from None
    repaired = event.pop("repaired", None)
    if repaired:
        log.warning("promoted pointer repaired by promote %s: %s", version, repaired["reason"])
    return {"promoted": event["version"], "previous": event["previous"], "event": event, "repaired": repaired}


@router.post("/rollback", response_model=None, **RollbackInput.openapi("rollback"))
def rollback(svc: RefitDep, body: Annotated[RollbackInput, Depends(RollbackInput.parse)]) -> dict[str, Any]:
    """Go back one step along the promotion history (v4 -> v3 -> v2 ...); 409 when there is nothing
    earlier or the pointer is damaged."""
    try:
        event = svc.store.rollback(actor="api", reason=body.reason)
    except StoreError as e:
        raise ApiError(409, f"refused: {e}") from None
    return {"promoted": event["version"], "previous": event["previous"], "event": event}


def version_row(info: dict) -> dict:
    """A version as /versions lists it: its figures summed up, the counts of its label problems."""
    metrics = info.get("metrics") or {}
    summary = {k: metrics[k] for k in ("val_accuracy", "train_accuracy", "macro_f1", "val_loss", "train_val_gap",
                                       "train_seconds", "map", "micro_f1") if k in metrics}
    for k in ("label_problems", "near_duplicates"):  # the counts; GET /versions/{id} lists them
        if isinstance(metrics.get(k), dict) and "count" in metrics[k]:
            summary[k] = metrics[k]["count"]
    if "val_accuracy" not in summary and info.get("val_accuracy") is not None:
        summary["val_accuracy"] = info["val_accuracy"]
    row = {"id": info["version"], "tag": info.get("tag"), "created": info.get("created"),
           "strategy": info.get("strategy"), "backbone": info.get("backbone"), "classes": info.get("classes"),
           "num_classes": info.get("num_classes"),
           "metrics": summary, "promoted": info.get("promoted", False), "promotion": info.get("promotion"),
           "parent": info.get("parent"), "note": info.get("note"), "lineage": info.get("lineage")}
    if info.get("error"):
        row["error"] = info["error"]
    return row


def _image_lists(lists: dict, authorized: bool) -> dict:
    """A version's label problems and near-duplicates name dataset images by path (upload file names, often
    personal): without the token their items are left out and `items_hidden` says so; counts stay."""
    if authorized:
        return lists
    return {k: ({**v, "items": [], "items_hidden": "the images' paths are listed with the token only"}
                if isinstance(v, dict) and "items" in v else v) for k, v in lists.items()}
