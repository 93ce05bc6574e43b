"""ASGI middleware in front of every route: bearer token, body size limits, and one error shape
({"error": ...}) for every 4xx; and whatever goes wrong in a route, the client gets an answer.
"""
from __future__ import annotations

import hmac
import json
import logging

from starlette.responses import JSONResponse

from service import settings
from service.schemas import BodyTooLarge

log = logging.getLogger("refit.guard")


def needs_token(method: str, path: str) -> bool:
    if path == "/retrain" or path.startswith("/retrain/") or path in ("/promote", "/rollback"):
        return True
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
    return settings.PROTECT_PREDICT and path.startswith(("/predict", "/explain"))


def authorized(scope) -> bool:
    if settings.TOKEN is None:
        return True
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.TOKEN.encode())


def body_limit(path: str) -> int:
    mb = settings.MAX_DATASET_MB if path.startswith(("/retrain", "/datasets")) else settings.MAX_REQUEST_MB
    return int(mb * 1024 * 1024)


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
        state = {"too_large": False}
        await self.app(scope, _limited(receive, limit, state), _fix_errors(send, state, limit))


# --- ASGI plumbing ----------------------------------------------------------------------------------------

async def _reply(send, status: int, body: dict, headers: dict | None = None) -> None:
    resp = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


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
