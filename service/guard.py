"""ASGI middleware in front of every route: bearer token, body size limits, retrain admission, and one
error shape ({"error": ...}) for every 4xx.

Retrain admission happens here, before BentoML's task machinery stores the request and answers with a
task id, because a client must hear "busy" (409), "invalid field" (422) or "unsafe zip" (400) from the
submit itself, not minutes later from /retrain/get.
"""
from __future__ import annotations

import errno
import hmac
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import anyio
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from service import settings
from service.jobs import AdmissionError, Jobs, public, looks_like_dataset
from service.schemas import BodyTooLarge, RetrainFields

log = logging.getLogger("refit.guard")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the server is out of space: 507, not the client's fault

JOB_HEADER = "x-refit-job"  # set by admission, read by the retrain task to find its job
ADMIT_PATHS = ("/retrain", "/retrain/submit")


def needs_token(method: str, path: str) -> bool:
    if path == "/retrain" or path.startswith("/retrain/") or path in ("/promote", "/rollback"):
        return True
    if path == "/jobs" or path.startswith("/jobs/"):
        return True
    return settings.PROTECT_PREDICT and path.startswith("/predict")


def authorized(scope) -> bool:
    if settings.TOKEN is None:
        return True
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.TOKEN.encode())


def body_limit(path: str) -> int:
    mb = settings.MAX_DATASET_MB if path.startswith("/retrain") else settings.MAX_REQUEST_MB
    return int(mb * 1024 * 1024)


class Guard:
    def __init__(self, app, jobs: Callable[[], Jobs] | None = None):
        self.app = app
        self._jobs = jobs  # a factory: the Jobs object is made on first use, inside the worker

    @property
    def jobs(self) -> Jobs:
        return self._jobs()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # BentoML's TimeoutMiddleware, outside this one, waits for the first message of a reply and only
        # then for the request itself: an exception raised before any reply is neither answered nor logged
        # until traffic.timeout (an hour here), and the stuck request then holds up a graceful shutdown.
        # https://github.com/bentoml/BentoML/pull/5670 . So nothing raises past this point unanswered.
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._route(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer it
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await _reply(send, 500, {"error": "internal error; the cause is in the server log"})

    async def _route(self, scope, receive, send):
        method, path = scope["method"], scope["path"]
        if needs_token(method, path) and not authorized(scope):
            return await _reply(send, 401, {"error": "missing or wrong bearer token (Authorization: Bearer ...)"},
                                headers={"www-authenticate": "Bearer"})
        limit = body_limit(path)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reply(send, 413, {"error": f"request body of {int(length)} bytes is over the limit of "
                                                     f"{limit} bytes for {path}"})
        if method == "POST" and path in ADMIT_PATHS and self._jobs is not None:
            return await self._admit_retrain(scope, receive, send, limit)
        if path == "/retrain/retry":
            return await _reply(send, 400, {"error": "retry is not supported: submit the dataset again"})
        if method == "GET" and path in ("/retrain/status", "/retrain/get") and self._jobs is not None:
            return await self._task_lookup(scope, receive, send)
        state = {"too_large": False}
        await self.app(scope, _limited(receive, limit, state), _fix_errors(send, state, limit))

    # -- retrain ---------------------------------------------------------------------------------
    async def _task_lookup(self, scope, receive, send):
        """BentoML forgets its tasks when the server restarts; the jobs on disk do not. A task id BentoML
        no longer knows is answered from the job that recorded it."""
        held: dict = {}

        async def capture(message):
            if message["type"] == "http.response.start" and message["status"] == 404:
                held["start"] = message
                return
            if "start" in held:
                return
            await send(message)

        await self.app(scope, receive, capture)
        if "start" not in held:
            return
        task_id = Request(scope).query_params.get("task_id")
        job = next((j for j in self.jobs.list(limit=100_000) if task_id and j.get("task_id") == task_id), None)
        if job is None:
            return await _reply(send, 404, {"error": f"unknown task_id {task_id!r}"})
        status = {"queued": "in_progress", "running": "in_progress", "succeeded": "completed"}.get(
            job["status"], job["status"])  # BentoML's task status words
        if scope["path"].endswith("/status"):
            return await _reply(send, 200, {"task_id": task_id, "status": status, "created_at": job.get("created"),
                                            "executed_at": job.get("started"), "job_id": job["id"]})
        if job["status"] == "succeeded":
            return await _reply(send, 200, {"job_id": job["id"], **(job.get("result") or {})})
        if job["status"] == "failed":
            err = job.get("error") or {}
            return await _reply(send, int(err.get("status") or 500), {"error": err.get("message"),
                                                                      "job_id": job["id"]})
        return await _reply(send, 400, {"error": f"task {task_id} is not completed yet"})

    async def _admit_retrain(self, scope, receive, send, limit: int):
        try:
            body = await _read_body(receive, limit)
        except BodyTooLarge:
            return await _reply(send, 413, {"error": f"request body is over the limit of {limit} bytes"})
        try:
            job = await self._admit(scope, body)
        except AdmissionError as e:
            log.info("retrain refused (%s): %s", e.status, e.body["error"])
            return await _reply(send, e.status, e.body)
        except OSError as e:
            if e.errno in DISK_FULL:
                log.error("retrain refused (507): out of disk space under %s: %s", self.jobs.root, e)
                return await _reply(send, 507, {"error": "the server has no disk space left to store and unpack "
                                                         f"this dataset ({len(body)} bytes uploaded); try again "
                                                         "later or send a smaller one"})
            log.exception("retrain refused (503): the server could not store the dataset")
            return await _reply(send, 503, {"error": f"the server could not store the dataset "
                                                     f"({e.strerror or type(e).__name__}); try again later"})
        except Exception as e:  # noqa: BLE001 - whatever it is, the client gets an answer and the log the cause
            log.exception("retrain refused (503): admission failed")
            return await _reply(send, 503, {"error": f"the server could not admit this retrain "
                                                     f"({type(e).__name__}); the cause is in the server log"})
        job_id = job["id"]
        # BentoML gets the validated fields as a small JSON body: the upload is unpacked already, and
        # parsing a large multipart body a second time would only delay the start of training.
        body = json.dumps(job["request"]).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length", JOB_HEADER.encode())]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (JOB_HEADER.encode(), job_id.encode())]
        scope = {**scope, "headers": headers}
        reply: dict = {}

        async def capture(message):
            if message["type"] == "http.response.start":
                reply["status"] = message["status"]
            elif message["type"] == "http.response.body" and reply.get("status") == 200:
                reply["body"] = reply.get("body", b"") + message.get("body", b"")
                if not message.get("more_body") and scope["path"].endswith("/submit"):
                    try:
                        self.jobs.update(job_id, task_id=json.loads(reply["body"])["task_id"])
                    except (ValueError, KeyError):
                        pass
            await send(message)

        try:
            await self.app(scope, _replay(body), capture)
        finally:
            if reply.get("status") != 200 and self.jobs.holds(job_id):
                # BentoML refused the request after admission: the job never starts.
                self.jobs.update(job_id, status="failed", error={"status": reply.get("status"),
                                                                 "message": "the request was not accepted"})
                self.jobs.release(job_id)
                shutil.rmtree(self.jobs.dir(job_id) / "data", ignore_errors=True)

    async def _admit(self, scope, body: bytes) -> dict:
        """Validate the request, make the data ready and create the job; raises AdmissionError."""
        ctype = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        upload_path: Path | None = None
        incoming = self.jobs.incoming_dir()
        try:
            if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                request = Request(scope, _replay(body))
                try:
                    form = await request.form(max_files=2, max_fields=100)
                except Exception as e:  # noqa: BLE001 - starlette raises several types for a broken form
                    raise AdmissionError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None
                uploads = form.getlist("dataset")
                fields = {}
                for k in form.keys():
                    if k == "dataset":
                        continue
                    v = form[k]
                    if isinstance(v, UploadFile):
                        raise AdmissionError(422, f"field {k!r} must be a value, not a file")
                    try:
                        fields[k] = json.loads(v)  # as BentoML will parse it: numbers, booleans, quoted text
                    except json.JSONDecodeError:
                        fields[k] = v
                if len(uploads) > 1:
                    raise AdmissionError(400, "send exactly one .zip in the field `dataset`")
                if uploads:
                    if not isinstance(uploads[0], UploadFile):
                        raise AdmissionError(400, "`dataset` must be an uploaded .zip file, not a text value")
                    incoming.mkdir(parents=True)
                    upload_path = incoming / "dataset.zip"
                    await anyio.to_thread.run_sync(_save_upload, uploads[0], upload_path)
                    upload_name = uploads[0].filename or "dataset.zip"
            elif ctype.startswith("application/json"):
                try:
                    fields = json.loads(body or b"{}")
                except ValueError as e:
                    raise AdmissionError(400, f"body is not valid JSON: {e}") from None
                if not isinstance(fields, dict):
                    raise AdmissionError(400, "JSON body must be an object")
                if fields.get("dataset") is not None:
                    raise AdmissionError(400, "upload the dataset as multipart/form-data, or use data_path")
                fields.pop("dataset", None)
            else:
                raise AdmissionError(415, "send multipart/form-data with a .zip in the field `dataset` "
                                          "(or JSON with data_path)")
            data_path = fields.pop("data_path", None)
            try:
                request_fields = RetrainFields.model_validate(fields)
            except ValidationError as e:
                raise AdmissionError(422, "invalid training request: " + "; ".join(
                    f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors()),
                    detail=e.errors(include_url=False, include_context=False, include_input=False)) from None
            if (upload_path is None) == (data_path is None):
                raise AdmissionError(400, "send the dataset as a .zip in the field `dataset`, or name a folder "
                                          "under the data root in `data_path` (exactly one of the two)")
            if self.jobs.busy():  # answer at once, before unpacking anything; admit() below decides races
                running = self.jobs.active()
                raise AdmissionError(409, "busy: a retrain is already running; submit again when it has "
                                          "finished", job=public(running) if running else None)
            if upload_path is not None:
                source = {"upload": upload_name, "bytes": upload_path.stat().st_size}
                problem = await anyio.to_thread.run_sync(_extract, upload_path, incoming / "data", upload_name)
                if problem:
                    raise AdmissionError(*problem)
            else:
                data, source = _resolve_data_path(data_path), {"data_path": data_path}
            job = self.jobs.admit(request=request_fields.model_dump(mode="json", exclude_none=True),
                                  source=source, actor="api")
            job_dir = self.jobs.dir(job["id"])
            try:
                if upload_path is not None:
                    (incoming / "data").rename(job_dir / "data")
                    data = job_dir / "data"
                return self.jobs.update(job["id"], data=str(data))
            except BaseException as e:
                # Admitted but not started: give the lock back, or every later submit would be "busy".
                self.jobs.abandon(job["id"], f"admission failed: {type(e).__name__}")
                raise
        finally:
            shutil.rmtree(incoming, ignore_errors=True)


def _save_upload(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "wb") as f:
        shutil.copyfileobj(upload.file, f, 1 << 20)


def _extract(zip_path: Path, dest: Path, upload_name: str) -> tuple[int, str] | None:
    """Unpack with the training module's zip-slip and size guards; (status, message) when refused."""
    from training.data import DatasetError, safe_extract_zip

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


# --- ASGI plumbing ----------------------------------------------------------------------------------------

async def _reply(send, status: int, body: dict, headers: dict | None = None) -> None:
    resp = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _limited(receive, limit: int, state: dict):
    """Count a body sent without Content-Length (chunked) and stop reading once it passes the limit."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                state["too_large"] = True
                raise BodyTooLarge()
        return message

    return wrapped


def _fix_errors(send, state: dict, limit: int):
    """BentoML 1.4 wraps a 4xx message in a one-element list ([{"error": ...}]); unwrap it so every error
    reply has the same shape. Also turns the 500 caused by an oversized chunked body into a 413."""
    pending: dict = {}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            if state["too_large"]:
                pending["replace"] = True
                return await _reply(send, 413, {"error": f"request body is over the limit of {limit} bytes"})
            status = message["status"]
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            if 400 <= status < 500 and ctype.startswith(b"application/json"):
                pending["start"], pending["body"] = message, b""
                return
            return await send(message)
        if message["type"] == "http.response.body":
            if pending.get("replace"):
                return
            if "start" in pending:
                pending["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                body = pending["body"]
                try:
                    data = json.loads(body)
                    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
                        body = json.dumps(data[0]).encode()
                except ValueError:
                    pass
                start = pending.pop("start")
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                return await send({"type": "http.response.body", "body": body})
        return await send(message)

    return wrapped
