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
from pathlib import Path

import anyio
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service import settings
from service.jobs import AdmissionError, Jobs, looks_like_dataset, public  # Jobs or service.queue.SharedJobs
from service.schemas import BodyTimeout, BodyTooLarge, ClientGone, RetrainFields

log = logging.getLogger("refit.admission")

UPLOADS = "uploads"  # the dataset a retrain upload becomes a snapshot of when the request names none
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the server is out of space: 507, not the client's fault


async def admit(request: Request, jobs: Jobs, store) -> dict:
    """The admitted job, holding the one-job lock; raises AdmissionError with the status and reply. `store`
    holds the datasets a request may name, and receives an upload as a snapshot."""
    try:
        return await _admit(request, jobs, store)
    except AdmissionError as e:
        log.info("retrain refused (%s): %s", e.status, e.body["error"])
        raise
    except (BodyTimeout, ClientGone):
        raise  # the guard answers them (408, 499) and has logged them, in one line
    except OSError as e:
        if e.errno in DISK_FULL:
            log.error("retrain refused (507): out of disk space under %s: %s", jobs.root, e)
            size = request.headers.get("content-length")
            raise AdmissionError(507, "the server has no disk space left to store and unpack this dataset"
                                      f"{f' ({size} bytes uploaded)' if size else ''}; try again later or "
                                      "send a smaller one") from None
        log.exception("retrain refused (503): the server could not store the dataset")
        raise AdmissionError(503, f"the server could not store the dataset ({e.strerror or type(e).__name__}); "
                                  "try again later") from None
    except Exception as e:  # noqa: BLE001 - whatever it is, the client gets an answer and the log the cause
        log.exception("retrain refused (503): admission failed")
        raise AdmissionError(503, f"the server could not admit this retrain ({type(e).__name__}); the cause is "
                                  "in the server log") from None


async def _admit(request: Request, jobs: Jobs, store) -> dict:
    ctype = request.headers.get("content-type", "")
    upload_path: Path | None = None
    incoming = jobs.incoming_dir()
    try:
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                form = await request.form(max_files=2, max_fields=100)
            except BodyTooLarge:
                raise AdmissionError(413, f"request body is over the limit of {settings.MAX_DATASET_MB:g} MB") from None
            except (OSError, BodyTimeout, ClientGone):
                raise  # the server's temp space, not the client's form; or a body the guard answers
            except Exception as e:  # noqa: BLE001 - starlette raises several types for a broken form
                raise AdmissionError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None
            try:
                # `dataset` is the dataset itself (a .zip upload) or its name in the store (a text value);
                # both may come together: the upload then becomes a snapshot of the dataset so named.
                uploads = [v for v in form.getlist("dataset") if not isinstance(v, str)]
                names = [v for v in form.getlist("dataset") if isinstance(v, str)]
                fields = {}
                for k in form.keys():
                    if k == "dataset":
                        continue
                    v = form[k]
                    if isinstance(v, UploadFile):
                        raise AdmissionError(422, f"field {k!r} must be a value, not a file")
                    try:
                        fields[k] = json.loads(v)  # numbers, booleans, quoted text, as a JSON body has them
                    except json.JSONDecodeError:
                        fields[k] = v
                if len(uploads) > 1:
                    raise AdmissionError(400, "send exactly one .zip in the field `dataset`")
                if len(names) > 1:
                    raise AdmissionError(400, "name one dataset in the field `dataset`")
                if names:
                    fields["dataset"] = names[0]
                if uploads:
                    incoming.mkdir(parents=True)
                    upload_path = incoming / "dataset.zip"
                    await anyio.to_thread.run_sync(_save_upload, uploads[0], upload_path)
                    upload_name = uploads[0].filename or "dataset.zip"
            finally:
                await form.close()
        elif ctype.startswith("application/json"):
            try:
                fields = json.loads(await request.body() or b"{}")
            except BodyTooLarge:
                raise AdmissionError(413, f"request body is over the limit of {settings.MAX_DATASET_MB:g} MB") from None
            except ValueError as e:
                raise AdmissionError(400, f"body is not valid JSON: {e}") from None
            if not isinstance(fields, dict):
                raise AdmissionError(400, "JSON body must be an object")
        else:
            raise AdmissionError(415, "send multipart/form-data with a .zip in the field `dataset` "
                                      "(or JSON with `dataset`, a dataset's name, or data_path)")
        data_path = fields.pop("data_path", None)
        try:
            request_fields = RetrainFields.model_validate(fields)
        except ValidationError as e:
            raise AdmissionError(422, "invalid training request: " + "; ".join(
                f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors()),
                detail=e.errors(include_url=False, include_context=False, include_input=False)) from None
        named = request_fields.dataset
        if (upload_path is None) == (data_path is None) and not (named and upload_path is None):
            raise AdmissionError(400, "send the dataset as a .zip in the field `dataset`, name a dataset of the "
                                      "store in `dataset`, or name a folder under the data root in `data_path` "
                                      "(exactly one of them)")
        if named and data_path is not None:
            raise AdmissionError(400, "give data_path or a dataset of the store in `dataset`, not both")
        if upload_path is not None and request_fields.snapshot:
            raise AdmissionError(400, "snapshot names a snapshot already in the store; an uploaded .zip becomes "
                                      "a new snapshot of its own, so leave snapshot out")
        if jobs.busy():  # answer at once, before unpacking anything; admit() below decides races
            running = jobs.active()
            raise AdmissionError(409, "busy: a retrain is already running; submit again when it has "
                                      "finished", job=public(running) if running else None)
        if upload_path is not None:
            source = {"upload": upload_name, "bytes": upload_path.stat().st_size}
            problem = await anyio.to_thread.run_sync(_extract, upload_path, incoming / "data", upload_name)
            if problem:
                raise AdmissionError(*problem)
            # The upload becomes a snapshot of exactly its images: what the job trains on, and its lineage.
            added = await anyio.to_thread.run_sync(_snapshot_upload, store, named or UPLOADS, incoming / "data")
            request_fields = request_fields.model_copy(update={"dataset": added["dataset"],
                                                               "snapshot": added["snapshot"]})
            source.update(dataset=added["dataset"], snapshot=added["snapshot"], refused=added["refused"])
            data = None
        elif named:
            snapshot = await anyio.to_thread.run_sync(_resolve_snapshot, store, named, request_fields.snapshot)
            request_fields = request_fields.model_copy(update={"snapshot": snapshot})
            data, source = None, {"dataset": named, "snapshot": snapshot}
        else:
            data, source = _resolve_data_path(data_path), {"data_path": data_path}
        job = jobs.admit(request=request_fields.model_dump(mode="json", exclude_none=True),
                         source=source, actor="api")
        try:
            return await anyio.to_thread.run_sync(lambda: jobs.attach(job["id"], upload=None, extracted=None,
                                                                      data=data))
        except BaseException as e:
            # Admitted but not started: give the lock back, or every later submit would be "busy".
            jobs.abandon(job["id"], f"admission failed: {type(e).__name__}")
            raise
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _snapshot_upload(store, name: str, folder: Path) -> dict:
    from core.data import DatasetError
    from core.datasets import Datasets

    try:
        added = Datasets(store).add_folder(name, folder, source="retrain", replace=True, **settings.IMAGE_LIMITS)
    except DatasetError as e:
        raise AdmissionError(422, f"dataset: {e}") from None
    if added["snapshot"] is None or not (added["added"] or added["skipped"]):
        raise AdmissionError(422, "dataset: no usable images in the upload", refused=added["refused"])
    return added


def _resolve_snapshot(store, name: str, snapshot: str | None) -> str:
    from core.datasets import Datasets, UnknownDataset

    try:
        return Datasets(store).resolve(name, snapshot)
    except UnknownDataset as e:
        raise AdmissionError(404, str(e)) from None


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
    if settings.DATA_ROOT is None:
        raise AdmissionError(400, "data_path is disabled on this server (REFIT_DATA_ROOT is not set); upload a "
                                  ".zip in the field `dataset` instead")
    if not isinstance(data_path, str) or not data_path.strip():
        raise AdmissionError(422, "data_path must be a non-empty string")
    if "\0" in data_path:
        raise AdmissionError(422, "data_path must not contain a NUL character")
    shown = data_path if len(data_path) <= 200 else data_path[:200] + "..."
    try:
        p = (settings.DATA_ROOT / data_path).resolve()
        if not p.is_relative_to(settings.DATA_ROOT):
            raise AdmissionError(400, f"data_path {shown!r} is outside the data root; only datasets under "
                                      f"the data root can be named")
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES: the name cannot be used, whatever it points to
        raise AdmissionError(400, f"data_path {shown!r} cannot be opened: {e.strerror}") from None
    if not exists:
        raise AdmissionError(400, f"data_path {shown!r} does not exist under the data root")
    if is_dir:
        problem = looks_like_dataset(p)
        if problem:
            raise AdmissionError(422, problem)
    elif p.suffix.lower() != ".zip":
        raise AdmissionError(400, f"data_path {shown!r} is neither a folder nor a .zip")
    return p
