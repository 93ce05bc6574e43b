"""Datasets: named datasets in the store (core/datasets.py), images added over HTTP, each change a new
immutable snapshot; a retrain names one with `dataset` (and `snapshot`). Reads are open, changes need the
token (service/guard.py)."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from core.data import DatasetError
from core.datasets import Datasets, MixedKinds, UnknownDataset, blob_key
from core.labels import label_problem
from core.manifest import parse_labels
from core.settings import settings
from core.store import StoreError
from service.deps import RefitDep
from service.errors import ApiError
from service.imagebytes import media_type
from service.schemas import BodyTooLarge

log = logging.getLogger("refit.service")
router = APIRouter()
MAX_LABEL_FIELDS = 256  # repeated `labels` values in one add-images form (one value joined by ';' has no limit)


@router.get("/datasets")
def datasets_list(svc: RefitDep) -> list[dict[str, Any]]:
    """Every dataset with its newest snapshot, number of images and of classes."""
    return on_datasets(svc.store, lambda d: d.list())


@router.get("/datasets/{name}")
def dataset_show(svc: RefitDep, name: str):
    """One dataset: classes with their counts in the newest snapshot, and its snapshots, newest first."""
    return on_datasets(svc.store, lambda d: d.show(name))


@router.get("/datasets/{name}/snapshots/{snapshot}")
def dataset_snapshot(svc: RefitDep, name: str, snapshot: str):
    """One snapshot's manifest: every image's sha256, label, split hint, source and when it was added."""
    return on_datasets(svc.store, lambda d: d.manifest(name, snapshot))


@router.post("/datasets/{name}/images")
async def dataset_add(svc: RefitDep, name: str, request: Request):
    """Add images: multipart files in `images` with their class in `label`, or with several labels in
    `labels` (repeated, or joined by ';'; empty: none of them), or a .zip in `zip` of class folders (optionally
    under train/ and val/) or of images with a labels.csv. Answers the new snapshot and what was added, skipped
    (already in the dataset) or refused (not an image, corrupt, over a limit), each by file name. A dataset
    keeps one kind: single-label images for a multi-label dataset, or the other way round, are a 422."""
    form, files, label, archive = await _dataset_form(request)
    limits = settings().image_limits

    def add(d):  # reads one upload at a time from the form's spooled files: memory holds one image
        if archive is not None:
            archive.file.seek(0)
            return d.add_zip(name, archive.file, source="zip", **limits)
        images = ((f.filename or f"images[{i}]", _read(f.file), label) for i, f in enumerate(files))
        kind = "single_label" if isinstance(label, str) else "multi_label"
        return d.add(name, images, source="upload", kind=kind, **limits)

    try:
        reply = await asyncio.to_thread(on_datasets, svc.store, add)
    finally:
        await form.close()
    if reply["refused"] and not (reply["added"] or reply["skipped"]):
        names = ", ".join(f"{r['name']} ({r['error']})" for r in reply["refused"][:5])
        raise ApiError(422, f"nothing added to {name!r}: every file was refused: {names}", **reply)
    return reply


@router.post("/datasets/{name}/images/{sha256}")
async def dataset_relabel(svc: RefitDep, name: str, sha256: str, request: Request):
    """Give one image a new label (JSON `{"label": "bees"}`), or new labels in a multi-label dataset
    (`{"labels": ["dented", "scratched"]}`; `[]`: none of them): a new snapshot; the old one stays."""
    send = 'send {"label": "NEW LABEL"}, or {"labels": ["A", "B"]} in a multi-label dataset ([]: none of them)'
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise ApiError(400, f"body is not valid JSON: {e}; {send}") from None
    if not isinstance(body, dict) or set(body) not in ({"label"}, {"labels"}):
        raise ApiError(400, f"{send} (exactly one of those fields)")
    label = body.get("label", body.get("labels"))
    if "labels" in body and not isinstance(label, list):
        raise ApiError(400, 'labels: send a list of labels, e.g. {"labels": ["dented", "scratched"]} ([]: none of '
                            'them)')
    if "label" in body and not isinstance(label, str):
        raise ApiError(400, 'label: send one class as a string, e.g. {"label": "bees"} (several: "labels", a list)')
    return await asyncio.to_thread(on_datasets, svc.store,
                                   lambda d: d.relabel(name, sha256, label, same_kind=True))


@router.get("/datasets/{name}/images/{sha256}")
def dataset_image(svc: RefitDep, name: str, sha256: str):
    """One image of a dataset's newest snapshot (its bytes, for thumbnails). Token."""
    def read(d):
        if not any(e["sha256"] == sha256 for e in d.manifest(name)["entries"]):
            raise ApiError(404, f"no image {sha256[:64]!r} in the newest snapshot of {name!r}")
        return svc.store.read_bytes(blob_key(sha256))

    data = on_datasets(svc.store, read)
    if data is None:
        raise ApiError(404, f"the bytes of image {sha256[:64]!r} are missing")
    return Response(data, media_type=media_type(data), headers={"cache-control": "private, max-age=3600"})


@router.delete("/datasets/{name}/images/{sha256}")
def dataset_remove(svc: RefitDep, name: str, sha256: str):
    """Remove one image: a new snapshot without it; the old one (and the image's bytes) stay."""
    return on_datasets(svc.store, lambda d: d.remove(name, sha256))


def on_datasets(store, call):
    """`call(Datasets(store))`, its errors raised as ApiError: 404 for an unknown dataset, snapshot or image,
    422 for images of the kind the dataset is not, 400 for a bad name, label, archive or manifest, 503 when the
    store cannot be reached."""
    try:
        return call(Datasets(store))
    except UnknownDataset as e:
        raise ApiError(404, str(e)) from None
    except MixedKinds as e:
        raise ApiError(422, str(e)) from None
    except DatasetError as e:
        raise ApiError(400, str(e)) from None
    except StoreError as e:
        log.error("datasets: %s", e)
        raise ApiError(503, f"the store cannot be used right now: {e}") from None


def _read(f) -> bytes:
    f.seek(0)
    return f.read()


async def _dataset_form(request: Request):
    """(the form, image uploads, their label (a string) or labels (a list), the zip upload or None) from POST
    /datasets/{name}/images; ApiError for a form that is not one. The caller closes the form once it has read
    the uploads."""
    s = settings()
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send multipart/form-data: image files in `images` with their class in `label` (or "
                            "several labels in `labels`), or a .zip of class folders or with a labels.csv in `zip`")
    try:
        form = await request.form(max_files=s.max_dataset_files + 1, max_fields=10 + MAX_LABEL_FIELDS)
    except BodyTooLarge:
        raise ApiError(413, f"request body is over the limit of {s.max_dataset_mb:g} MB") from None
    except Exception as e:  # noqa: BLE001 - starlette raises several types for a broken form
        detail = str(getattr(e, "detail", e))
        if "too many files" in detail.lower():
            raise ApiError(400, f"too many files: the limit is {s.max_dataset_files} per request; send a "
                                ".zip in `zip`, or several requests") from None
        if "too many fields" in detail.lower():
            raise ApiError(400, f"too many form fields: `labels` may be repeated {MAX_LABEL_FIELDS} times; "
                                "join more labels with ';' in one value") from None
        raise ApiError(400, f"malformed multipart form: {detail}") from None
    try:
        label = _check_form(form)
    except ApiError:
        await form.close()
        raise
    zips = form.getlist("zip")
    return form, form.getlist("images"), label, (zips[0] if zips else None)


def _check_form(form) -> str | list[str] | None:
    """The images' label, or their labels; ApiError (400) saying what is wrong with the form's fields."""
    unknown = sorted(set(form.keys()) - {"images", "label", "labels", "zip"})
    if unknown:
        raise ApiError(400, f"unknown form field(s) {unknown}; expected images with label (or labels), or zip")
    files, zips, label, labels = form.getlist("images"), form.getlist("zip"), form.get("label"), form.getlist(
        "labels")
    if bool(files) == bool(zips) or len(zips) > 1:
        raise ApiError(400, "send image files in `images` (with `label` or `labels`), or one .zip in `zip`; not "
                            "both")
    if any(isinstance(f, str) for f in files + zips):
        raise ApiError(400, "`images` and `zip` take file uploads, not text values")
    if zips and (label is not None or labels):
        raise ApiError(400, "a .zip names its labels (one folder per class, or a labels.csv); leave `label` and "
                            "`labels` out")
    if zips:
        return None
    if label is not None and labels:
        raise ApiError(400, "send `label` (one class for every image) or `labels` (several, for a multi-label "
                            "dataset), not both")
    if labels:
        return _form_labels(labels)
    if not isinstance(label, str) or not label.strip():
        raise ApiError(400, "`label` is required with `images`: the class of the images, e.g. label=bees (or "
                            "`labels` for several: labels=dented&labels=scratched, or labels=dented;scratched)")
    problem, _ = label_problem(label)
    if problem:  # the same rule as every other way in (zip folders, relabel, feedback, the CLI)
        raise ApiError(400, problem)
    return label


def _form_labels(values: list) -> list[str]:
    """The labels of repeated `labels` fields, each one label or several joined by ';' (labels.csv's way,
    core.manifest.parse_labels); one empty value: none of the labels (a negative)."""
    if any(not isinstance(v, str) for v in values):
        raise ApiError(400, "`labels` takes text values (label names), not files")
    if len(values) == 1 and not values[0].strip():
        return []
    out: list[str] = []
    for v in values:
        names, why = parse_labels(v)
        if why or not names:
            raise ApiError(400, f"labels: {why or 'an empty value beside others'}; send each label once, in "
                                "repeated `labels` fields or joined by ';' in one (one empty `labels`: none of "
                                "them)")
        out += names
    return sorted(set(out))
