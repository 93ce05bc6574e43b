"""Feedback on predictions and what to label next: a captured image joins a dataset with a person's label,
and the captures the served model is least sure of are suggested first."""
from __future__ import annotations

import unicodedata

import numpy as np
from fastapi import APIRouter, Query

from core.datasets import UnknownDataset, entry_labels
from core.settings import settings
from core.store import now_iso
from service.capture import doubt
from service.deps import RefitDep, Service
from service.errors import ApiError
from service.model import ModelHolder, unavailable
from service.routers.datasets import on_datasets
from service.schemas import FeedbackRequest

router = APIRouter()


@router.post("/feedback")
def feedback(svc: RefitDep, body: FeedbackRequest):
    """Confirm or correct a prediction: its image (kept while the server captures, REFIT_CAPTURE=1) joins a
    dataset with this label, as a new snapshot. A multi-label version's prediction takes `labels` (a list;
    empty: none of them) instead of `label`, and joins the dataset with them. 404 for an unknown or expired
    prediction_id."""
    record = svc.captures.get(body.prediction_id)
    data = svc.captures.image(body.prediction_id) if record else None
    if data is None:
        s = settings()
        why = (f"captures are kept {s.capture_days:g} days, the newest {s.capture_max_images}"
               if s.capture else "this server does not capture predictions (REFIT_CAPTURE=1 turns it on)")
        raise ApiError(404, f"unknown or expired prediction_id {body.prediction_id[:64]!r}; {why}")
    multi = "labels" in record  # captured from a multi-label version's answer
    if multi != (body.labels is not None):
        raise ApiError(422, f"{record['version']}, which answered, is a "
                            + ('multi-label version: send "labels", a list of its labels (empty: none of them)'
                               if multi else 'single-label version: send "label", one of its classes'))
    if multi:
        return _several_labels(svc, body, record, data)
    name = body.dataset or _trained_on(svc.store, record["version"])
    if not name:
        raise ApiError(400, f"name the dataset to add this image to: {record['version']}, which answered, was "
                            "not trained on a dataset of the store")
    # No such dataset (and no "create"), a name that is not allowed, or the store is down: raised here.
    known = _classes(svc.store, name, body.create)
    # The label is NFC (FeedbackRequest); a class stored before that rule may be spelt otherwise (NFD).
    label = body.label if not known or body.label in known else next(
        (k for k in known if unicodedata.normalize("NFC", k) == body.label), None)
    if label is None:
        raise ApiError(422, f"label {body.label!r} is not a class of dataset {name!r}: {', '.join(known)}")

    def add(datasets):
        added = datasets.add(name, [(record["name"], data, label)], source="feedback", kind="single_label",
                             **settings().image_limits)
        if added["refused"]:
            raise ApiError(422, added["refused"][0]["error"])
        entry = next(e for e in datasets.manifest(name)["entries"] if e["sha256"] == record["sha256"])
        if entry_labels(entry) != (label,):  # already in the dataset under another label: this corrects it
            return {**added, "snapshot": datasets.relabel(name, record["sha256"], label)["snapshot"],
                    "relabelled": True}
        return {**added, "relabelled": False}

    added = on_datasets(svc.store, add)
    given = {"label": label, "dataset": name, "snapshot": added["snapshot"], "at": now_iso()}
    svc.captures.mark(body.prediction_id, given)
    svc.holder.trials.feedback(record, label)  # a prediction made during a trial: each version's accuracy
    return {"prediction_id": body.prediction_id, "predicted": record["label"], "version": record["version"],
            "added": bool(added["added"]), "relabelled": added["relabelled"], **given}


def _several_labels(svc: Service, body: FeedbackRequest, record: dict, data: bytes) -> dict:
    """Feedback on a multi-label version's prediction: the labels must be the version's. The image joins the
    dataset as a multi-label entry (or is relabelled there); the labels are recorded on the capture either
    way, so without a dataset to add it to that is all that happens."""
    classes = _version_classes(svc.store, record["version"])
    unknown = [label for label in body.labels if classes and label not in classes]
    if unknown:
        raise ApiError(422, f"{', '.join(map(repr, unknown))} not among the labels of {record['version']}: "
                            f"{', '.join(classes)}", classes=classes)
    name = body.dataset or _trained_on(svc.store, record["version"])
    predicted = [x["label"] for x in record.get("labels") or ()]
    added = {"added": [], "snapshot": None, "relabelled": False}
    if name:
        _classes(svc.store, name, body.create)  # no such dataset (and no "create"): 404, as for one label

        def add(datasets):
            out = datasets.add(name, [(record["name"], data, body.labels)], source="feedback", kind="multi_label",
                               **settings().image_limits)
            if out["refused"]:
                raise ApiError(422, out["refused"][0]["error"])
            entry = next(e for e in datasets.manifest(name)["entries"] if e["sha256"] == record["sha256"])
            if list(entry_labels(entry)) != body.labels:  # in the dataset with other labels: this corrects them
                return {**out, "snapshot": datasets.relabel(name, record["sha256"], body.labels)["snapshot"],
                        "relabelled": True}
            return {**out, "relabelled": False}

        added = on_datasets(svc.store, add)
    given = {"labels": body.labels, "dataset": name, "snapshot": added["snapshot"], "at": now_iso()}
    svc.captures.mark(body.prediction_id, given)
    svc.holder.trials.feedback(record, list(body.labels))
    return {"prediction_id": body.prediction_id, "predicted": predicted, "version": record["version"],
            "added": bool(added["added"]), "relabelled": added["relabelled"], **given}


def _version_classes(store, version: str) -> list[str]:
    """A version's class names as the store recorded them ([] when it cannot say)."""
    try:
        return list(store.info(version).get("classes") or [])
    except Exception:  # noqa: BLE001 - a version removed or unreadable: its labels cannot be checked
        return []


@router.get("/datasets/{name}/suggest")
def suggest(svc: RefitDep, name: str, n: int = Query(20, ge=1, le=500, description="How many images to suggest.")):
    """Captured images worth labelling next for dataset `name`, most useful first: those the served model
    is least sure of (smallest margin between its top two scores), not yet in the dataset and without
    feedback. Label one with POST /feedback."""
    manifest = on_datasets(svc.store, lambda d: d.manifest(name))  # no such dataset, or the store is down
    model = svc.holder.current
    if model is None:
        raise ApiError(503, unavailable(svc.store, svc.holder))
    have = {e["sha256"] for e in manifest["entries"]}
    pool, seen = [], set()
    for r in svc.captures.recent(settings().suggest_pool):
        if r.get("feedback") or r["sha256"] in have or r["sha256"] in seen:
            continue
        seen.add(r["sha256"])
        pool.append(r)
    _score_again(svc, model, pool)
    ranked = sorted((r for r in pool if r["margin"] is not None), key=lambda r: r["margin"])[:n]
    ranked_by = ("distance of the label nearest its threshold, smallest first" if model.cuts is not None
                 else "margin between the top two scores, smallest first")
    return {"dataset": name, "version": model.version, "ranked_by": ranked_by, "candidates": len(pool),
            "suggestions": [{"prediction_id": r["id"], "predicted": r["label"], "score": r["score"],
                             "margin": round(r["margin"], 4), "top_k": r["top_k"], "name": r["name"],
                             "captured_at": r["at"], "image": f"/captures/{r['id']}/image",
                             **({"labels": r["labels"]} if r.get("labels") is not None else {})} for r in ranked]}


def _score_again(svc: Service, model, pool: list[dict]) -> None:
    """Captures answered by another version are scored again by the one served now: "least sure" is the
    current model's doubt, not that of a model already replaced."""
    for r in pool:
        if r["version"] == model.version:
            continue
        data = svc.captures.image(r["id"])
        arrays = svc.holder.decode(model, [(r["name"], data)]) if data else [None]
        if not isinstance(arrays[0], np.ndarray):
            r["margin"] = None
            continue
        p = model.run(arrays[0][None])[0]
        r.pop("labels", None)  # the answer of the version that captured it, not of this one
        # A multi-label version answers by its own thresholds; a single-label one lists its best class.
        r.update(ModelHolder.answer(model, p, 5, 0.0 if model.cuts is None else None), margin=doubt(model, p))


def _trained_on(store, version: str) -> str | None:
    """The dataset a version was trained on (its lineage), if it was trained on one of the store's."""
    try:
        info = store.info(version)
    except Exception:  # noqa: BLE001 - a version removed or unreadable: no lineage to follow
        return None
    return (info.get("lineage") or {}).get("dataset")


def _classes(store, name: str, create: bool) -> list[str]:
    """The dataset's classes ([] for a dataset `create` is to start); ApiError 404 for a dataset that does
    not exist (a misspelt name would otherwise start a new dataset with whatever label it got), 400 for a
    name that is not allowed, 503 when the store cannot be read."""
    def classes(datasets):
        try:
            return list(datasets.show(name)["classes"])
        except UnknownDataset as e:
            if create:
                return []
            raise UnknownDataset(f'{e}; send "create": true to start dataset {name!r} with this image') from None

    return on_datasets(store, classes)
