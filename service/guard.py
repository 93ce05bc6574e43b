"""ASGI middleware in front of every route: bearer token, body size limits, and one error shape
({"error": ...}) for every 4xx; and whatever goes wrong in a route, the client gets an answer.
"""
from __future__ import annotations

import hmac
import logging

import anyio

from core.objects import StoreError
from core.projects import DEFAULT, token_matches, token_project
from core.settings import settings
from service.compat import one_error_shape
from service.errors import send_error
from service.projects import PROJECT, directory
from service.schemas import BodyTimeout, BodyTooLarge, ClientGone

log = logging.getLogger("refit.guard")


def needs_token(method: str, path: str) -> bool:
    if path == "/retrain" or path.startswith("/retrain/") or path in ("/promote", "/rollback"):
        return True
    if path == "/candidate" and method not in ("GET", "HEAD"):
        return True  # reading the trial is open, as /versions is; setting or clearing one is an admin's
    if path == "/jobs" or path.startswith("/jobs/"):
        return True
    if (path == "/datasets" or path.startswith("/datasets/")) and method not in ("GET", "HEAD"):
        return True  # reading a dataset is open, as /versions is; changing one is not
    # Captured images and what is done with them are the customer's data: suggestions show captured images.
    if path == "/feedback" or path.startswith("/captures/") or (path.startswith("/datasets/")
                                                                 and path.endswith("/suggest")):
        return True
    if path.startswith("/datasets/") and "/images/" in path:
        return True  # an image's bytes, as a captured image's: the listing is open, the photos are not
    if path.startswith("/datasets/") and path.split("/")[3:4] == ["snapshots"]:
        return True  # a manifest names every image by its upload's file name, often personal data
    return settings().protect_predict and path.startswith(("/predict", "/explain"))


def bearer(scope) -> str | None:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, sent = header.partition(" ")
    return sent.strip() if scheme.lower() == "bearer" and sent.strip() else None


def refusal(scope) -> tuple[int, str] | None:
    """Why a request may not pass (401 or 403, and the message), or None. Without REFIT_TOKEN nothing needs a
    token. With it: the admin token opens everything; a project's token opens that project's routes and
    nothing else; the default project keeps its rules (`needs_token`); the project admin routes and every
    route of another project need a token. Tokens are compared in constant time and never echoed."""
    admin = settings().token
    if admin is None:
        return None
    method, path = scope["method"], scope["path"]
    project = scope.get(PROJECT, DEFAULT)
    sent = bearer(scope)
    if sent is not None and hmac.compare_digest(sent.encode(), admin.encode()):
        return None
    admin_route = path == "/projects" or path.startswith("/projects/")  # what ProjectScope left: the admin routes
    if not admin_route and project == DEFAULT and not needs_token(method, path):
        return None
    if sent is None:
        return 401, "missing bearer token (Authorization: Bearer ...)"
    claimed = token_project(sent)
    try:
        valid = claimed is not None and token_matches(directory().get(claimed), sent)
    except StoreError:
        valid = False
    if not valid:
        return 401, "wrong bearer token (Authorization: Bearer ...)"
    if claimed == project and not admin_route and project != DEFAULT:
        return None
    if admin_route:
        return 403, "a project's token does not open the project admin routes; use the admin token"
    return 403, f"this token is for project {claimed!r}; it does not open project {project!r}"


def authorized(scope) -> bool:
    """Whether this request carries what its project's protected routes need (to show what only they show)."""
    return refusal({**scope, "method": "POST", "path": "/promote"}) is None


def body_limit(path: str) -> int:
    s = settings()
    return s.max_dataset_bytes if path.startswith(("/retrain", "/datasets")) else s.max_request_bytes


class Guard:
    def __init__(self, app):
        self.app = app

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
        except Exception as e:  # broad on purpose: the last line of defence: log it, answer it
            problem = _body_problem(e)
            if problem is not None:  # a late body or a client that hung up: _limited logged it in one line
                if not started:
                    await _refuse(send, problem)
                return
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await send_error(send, 500, {"error": "internal error; the cause is in the server log"})

    async def _route(self, scope, receive, send):
        path = scope["path"]
        refused = refusal(scope)
        if refused is not None:
            status, message = refused
            return await send_error(send, status, {"error": message},
                                headers={"www-authenticate": "Bearer"} if status == 401 else None)
        limit = body_limit(path)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_error(send, 413, {"error": f"request body of {int(length)} bytes is over the limit of "
                                                     f"{limit} bytes for {path}"})
        state: dict = {}  # "problem": the error _limited raised, whatever the route then answered
        await self.app(scope, _limited(scope, receive, limit, state), _fix_errors(send, state))


# --- ASGI plumbing ----------------------------------------------------------------------------------------

async def _refuse(send, problem: Exception) -> None:
    """Answer a body _limited refused; after a late or cut-off body the connection is not reused."""
    status = getattr(problem, "status", 413)  # BodyTooLarge carries none
    await send_error(send, status, {"error": str(problem)}, headers=None if status == 413 else {"connection": "close"})


def _limited(scope, receive, limit: int, state: dict):
    """The body as the route reads it, with its problems raised as the error to answer (and kept in `state`,
    for a route that catches it): over the limit without Content-Length (chunked, 413), no part of it for
    REFIT_BODY_TIMEOUT seconds (408; uvicorn would wait for it as long as the request timeout, an hour), or
    the client hanging up before its end (499; Starlette raises ClientDisconnect, and it was a 500 with a
    traceback). Once the body is complete, messages pass unbounded: a route may wait for the disconnect."""
    seen, done = 0, False
    timeout = settings().body_timeout
    declared = dict(scope["headers"]).get(b"content-length", b"?").decode("latin-1")

    def fail(problem: Exception, level: int, what: str):
        state["problem"] = problem
        log.log(level, "%s %s: %s after %d of %s bytes", scope["method"], scope["path"], what, seen, declared)
        return problem

    async def wrapped():
        nonlocal seen, done
        if done:
            return await receive()
        if "problem" in state:  # read again after a refusal: the same answer, not another wait
            raise state["problem"]
        try:
            with anyio.fail_after(timeout):
                message = await receive()
        except TimeoutError:
            raise fail(BodyTimeout(timeout), logging.WARNING, "body timed out") from None
        if message["type"] == "http.disconnect":
            raise fail(ClientGone(), logging.INFO, "client hung up mid-body")
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            done = not message.get("more_body", False)
            if seen > limit:
                state["problem"] = BodyTooLarge(f"request body is over the limit of {limit} bytes")
                raise state["problem"]
        return message

    return wrapped


def _body_problem(e: BaseException | None, depth: int = 0):
    """The error _limited raised, if `e` is it or was caused by it (a route may wrap it)."""
    if e is None or depth > 8:
        return None
    if isinstance(e, (BodyTimeout, ClientGone, BodyTooLarge)):
        return e
    for inner in getattr(e, "exceptions", None) or ():  # an exception group (anyio task groups)
        found = _body_problem(inner, depth + 1)
        if found is not None:
            return found
    return _body_problem(e.__cause__ or e.__context__, depth + 1)


def _fix_errors(send, state: dict):
    """BentoML 1.4 wraps a 4xx message in a one-element list ([{"error": ...}], service/compat.py), and
    Starlette answers a wrong method as text ("Method Not Allowed") or FastAPI's {"detail": "..."}; rewrite
    them so every error reply has the same shape. Also answers a body _limited refused (413, 408, 499) with
    that error, whatever the route made of it (a 500, or FastAPI's "There was an error parsing the body")."""
    pending: dict = {}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            problem = state.get("problem")
            if problem is not None:
                pending["replace"] = True
                return await _refuse(send, problem)
            status = message["status"]
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            if 400 <= status < 500 and ctype.startswith((b"application/json", b"text/plain")):
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
                start = pending.pop("start")
                text = dict(start.get("headers", [])).get(b"content-type", b"").startswith(b"text/plain")
                body = one_error_shape(body, text)
                drop = (b"content-length", b"content-type") if text else (b"content-length",)
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
                if text:
                    headers.append((b"content-type", b"application/json"))
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                return await send({"type": "http.response.body", "body": body})
        return await send(message)

    return wrapped
