"""Retrain admission: read the request, validate the training fields, save and unpack the upload (or check
`data_path`), and create the job, all before the client is answered. A client hears "busy" (409), "invalid
field" (422), "unsafe zip" (400) or "disk full" (507) from the submit itself, not minutes later from
/retrain/get; every other failure is a 503 whose cause is in the server log.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from core.jobs import JobStore, public
from core.settings import settings
from service.errors import ApiError
from service.jobs import BUSY, looks_like_dataset
from service.schemas import BodyTimeout, BodyTooLarge, ClientGone, RetrainFields

log = logging.getLogger("refit.admission")

UPLOADS = "uploads"  # the dataset a retrain upload becomes a snapshot of when the request names none
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the server is out of space: 507, not the client's fault


async def admit(request: Request, jobs: JobStore, store) -> dict:
    """The admitted job, holding the one-job lock; raises ApiError with the status and reply. `store`
    holds the datasets a request may name, and receives an upload as a snapshot."""
    try:
        return await _admit(request, jobs, store)
    except ApiError as e:
        log.info("retrain refused (%s): %s", e.status, e.body["error"])
        raise
    except (BodyTimeout, ClientGone):
        raise  # the guard answers them (408, 499) and has logged them, in one line
    except OSError as e:
        if e.errno in DISK_FULL:
            log.error("retrain refused (507): out of disk space under %s: %s", jobs.root, e)
            size = request.headers.get("content-length")
            raise ApiError(507, "the server has no disk space left to store and unpack this dataset"
                                f"{f' ({size} bytes uploaded)' if size else ''}; try again later or "
                                "send a smaller one") from None
        log.exception("retrain refused (503): the server could not store the dataset")
        raise ApiError(503, f"the server could not store the dataset ({e.strerror or type(e).__name__}); "
                            "try again later") from None
    except Exception as e:  # broad on purpose: whatever it is, the client gets an answer and the log the cause
        log.exception("retrain refused (503): admission failed")
        raise ApiError(503, f"the server could not admit this retrain ({type(e).__name__}); the cause is "
                            "in the server log") from None


async def _admit(request: Request, jobs: JobStore, store) -> dict:
    incoming = jobs.incoming_dir()
    try:
        body = await _read_body(request, incoming)
        data_path = body.fields.pop("data_path", None)
        fields = _validated(body.fields)
        _check_sources(fields, body.upload, data_path)
        _refuse_if_busy(jobs)  # answer at once, before unpacking anything; jobs.admit below decides races
        fields, source, data = await _dataset(store, fields, body, data_path, incoming)
        return await _create(jobs, fields, source, data)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


@dataclass
class _Body:
    fields: dict  # the training fields as sent (and `dataset`, a dataset's name, and `data_path`)
    upload: Path | None = None  # the uploaded .zip, saved under the incoming folder
    upload_name: str = "dataset.zip"  # its file name as the client sent it


async def _read_body(request: Request, incoming: Path) -> _Body:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return await _read_form(request, incoming)
    if ctype.startswith("application/json"):
        return _Body(await _read_json(request))
    raise ApiError(415, "send multipart/form-data with a .zip in the field `dataset` "
                        "(or JSON with `dataset`, a dataset's name, or data_path)")


def _too_large() -> ApiError:
    return ApiError(413, f"request body is over the limit of {settings().max_dataset_mb:g} MB")


async def _read_json(request: Request) -> dict:
    try:
        fields = json.loads(await request.body() or b"{}")
    except BodyTooLarge:
        raise _too_large() from None
    except ValueError as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "JSON body must be an object")
    return fields


async def _read_form(request: Request, incoming: Path) -> _Body:
    try:
        form = await request.form(max_files=2, max_fields=100)
    except BodyTooLarge:
        raise _too_large() from None
    except (OSError, BodyTimeout, ClientGone):
        raise  # the server's temp space, not the client's form; or a body the guard answers
    except Exception as e:  # noqa: BLE001 - starlette raises several types for a broken form
        raise ApiError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None
    try:
        body, upload = _form_fields(form)
        if upload is not None:
            incoming.mkdir(parents=True)
            body.upload = incoming / "dataset.zip"
            await anyio.to_thread.run_sync(_save_upload, upload, body.upload)
            body.upload_name = upload.filename or "dataset.zip"
        return body
    finally:
        await form.close()


def _form_fields(form) -> tuple[_Body, UploadFile | None]:
    """`dataset` is the dataset itself (a .zip upload) or its name in the store (a text value); both may
    come together: the upload then becomes a snapshot of the dataset so named."""
    uploads = [v for v in form.getlist("dataset") if not isinstance(v, str)]
    names = [v for v in form.getlist("dataset") if isinstance(v, str)]
    fields = {}
    for k in form.keys():
        if k == "dataset":
            continue
        v = form[k]
        if isinstance(v, UploadFile):
            raise ApiError(422, f"field {k!r} must be a value, not a file")
        try:
            fields[k] = json.loads(v)  # numbers, booleans, quoted text, as a JSON body has them
        except json.JSONDecodeError:
            fields[k] = v
    if len(uploads) > 1:
        raise ApiError(400, "send exactly one .zip in the field `dataset`")
    if len(names) > 1:
        raise ApiError(400, "name one dataset in the field `dataset`")
    if names:
        fields["dataset"] = names[0]
    return _Body(fields), (uploads[0] if uploads else None)


def _validated(fields: dict) -> RetrainFields:
    try:
        return RetrainFields.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, "invalid training request: " + "; ".join(
            f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors()),
            detail=e.errors(include_url=False, include_context=False, include_input=False)) from None


def _check_sources(fields: RetrainFields, upload: Path | None, data_path) -> None:
    """Exactly one dataset: an upload (maybe naming the dataset it adds to), a dataset of the store, or a path."""
    named = fields.dataset
    if (upload is None) == (data_path is None) and not (named and upload is None):
        raise ApiError(400, "send the dataset as a .zip in the field `dataset`, name a dataset of the "
                            "store in `dataset`, or name a folder under the data root in `data_path` "
                            "(exactly one of them)")
    if named and data_path is not None:
        raise ApiError(400, "give data_path or a dataset of the store in `dataset`, not both")
    if upload is not None and fields.snapshot:
        raise ApiError(400, "snapshot names a snapshot already in the store; an uploaded .zip becomes "
                            "a new snapshot of its own, so leave snapshot out")


def _refuse_if_busy(jobs: JobStore) -> None:
    if jobs.busy():
        running = jobs.active()
        raise ApiError(409, BUSY, job=public(running) if running else None)


async def _dataset(store, fields: RetrainFields, body: _Body, data_path,
                   incoming: Path) -> tuple[RetrainFields, dict, Path | None]:
    """The request with the snapshot it trains on, the job's `source`, and the data a job reads by path."""
    named = fields.dataset
    if body.upload is not None:
        source = {"upload": body.upload_name, "bytes": body.upload.stat().st_size}
        problem = await anyio.to_thread.run_sync(_extract, body.upload, incoming / "data", body.upload_name)
        if problem:
            raise ApiError(*problem)
        # The upload becomes a snapshot of exactly its images: what the job trains on, and its lineage.
        added = await anyio.to_thread.run_sync(_snapshot_upload, store, named or UPLOADS, incoming / "data")
        fields = fields.model_copy(update={"dataset": added["dataset"], "snapshot": added["snapshot"]})
        source.update(dataset=added["dataset"], snapshot=added["snapshot"], refused=added["refused"])
        return fields, source, None
    if named:
        snapshot = await anyio.to_thread.run_sync(_resolve_snapshot, store, named, fields.snapshot)
        return fields.model_copy(update={"snapshot": snapshot}), {"dataset": named, "snapshot": snapshot}, None
    return fields, {"data_path": data_path}, _resolve_data_path(data_path)


async def _create(jobs: JobStore, fields: RetrainFields, source: dict, data: Path | None) -> dict:
    job = jobs.admit(request=fields.model_dump(mode="json", exclude_none=True), source=source, actor="api")
    try:
        return await anyio.to_thread.run_sync(lambda: jobs.attach(job["id"], upload=None, extracted=None,
                                                                  data=data))
    except BaseException as e:
        # Admitted but not started: give the lock back, or every later submit would be "busy".
        jobs.abandon(job["id"], f"admission failed: {type(e).__name__}")
        raise


def _snapshot_upload(store, name: str, folder: Path) -> dict:
    from core.data import DatasetError
    from core.datasets import Datasets

    try:
        added = Datasets(store).add_folder(name, folder, source="retrain", replace=True, **settings().image_limits)
    except DatasetError as e:
        raise ApiError(422, f"dataset: {e}") from None
    if added["snapshot"] is None or not (added["added"] or added["skipped"]):
        raise ApiError(422, "dataset: no usable images in the upload", refused=added["refused"])
    return added


def _resolve_snapshot(store, name: str, snapshot: str | None) -> str:
    from core.datasets import Datasets, UnknownDataset

    try:
        return Datasets(store).resolve(name, snapshot)
    except UnknownDataset as e:
        raise ApiError(404, str(e)) from None


def _save_upload(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "wb") as f:
        shutil.copyfileobj(upload.file, f, 1 << 20)


def _extract(zip_path: Path, dest: Path, upload_name: str) -> tuple[int, str] | None:
    """Unpack with the training module's zip-slip and size guards; (status, message) when refused."""
    from core.data import DatasetError, safe_extract_zip

    try:
        safe_extract_zip(zip_path, dest)
    except DatasetError as e:
        return 400, str(e).replace(zip_path.name, upload_name, 1)
    problem = looks_like_dataset(dest)
    return (422, problem) if problem else None


def _resolve_data_path(data_path) -> Path:
    """A dataset named by path must lie under the data root, after resolving symlinks and '..'."""
    root = settings().data_root
    if root is None:
        raise ApiError(400, "data_path is disabled on this server (REFIT_DATA_ROOT is not set); upload a "
                            ".zip in the field `dataset` instead")
    if not isinstance(data_path, str) or not data_path.strip():
        raise ApiError(422, "data_path must be a non-empty string")
    if "\0" in data_path:
        raise ApiError(422, "data_path must not contain a NUL character")
    shown = data_path if len(data_path) <= 200 else data_path[:200] + "..."
    try:
        p = (root / data_path).resolve()
        if not p.is_relative_to(root):
            raise ApiError(400, f"data_path {shown!r} is outside the data root; only datasets under "
                                f"the data root can be named")
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES: the name cannot be used, whatever it points to
        raise ApiError(400, f"data_path {shown!r} cannot be opened: {e.strerror}") from None
    if not exists:
        raise ApiError(400, f"data_path {shown!r} does not exist under the data root")
    if is_dir:
        problem = looks_like_dataset(p)
        if problem:
            raise ApiError(422, problem)
    elif p.suffix.lower() != ".zip":
        raise ApiError(400, f"data_path {shown!r} is neither a folder nor a .zip")
    return p
