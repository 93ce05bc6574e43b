"""How a refused request is told what was wrong, in the one error shape {"error": ...}: `ApiError`, the one
error type every route and helper raises; one line naming each field that failed validation, with what was
sent shown clipped (a 10,000-character id is not echoed back); and the FastAPI handlers that render both.

FastAPI's own handler answers {"detail": [...]} with every input repeated whole, and fails with a 500 on an
input it cannot turn into JSON (the bytes of a binary multipart body sent to a JSON route).
"""
from __future__ import annotations

import functools

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request refused: `status`, a message for the person who sent it, and extra fields for the body
    (`{"error": message, **extra}`). Raised anywhere below a route; rendered once, by `rendered`."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra

    @property
    def body(self) -> dict:
        return {"error": self.message, **self.extra}


def rendered(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status)


async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return rendered(exc)


def answered(api):
    """Around a BentoML API method (/predict, /predict_base64, /explain), which is no FastAPI route: its
    ApiErrors rendered as FastAPI's handler renders them, and so is the refusal its input model handed it in
    place of an argument (service/schemas.py, SelfParsed): BentoML answers any exception as a 500."""

    @functools.wraps(api)
    async def wrapper(self, **kwargs):
        try:
            refused = next((v for v in kwargs.values() if isinstance(v, ApiError)), None)
            if refused is not None:
                raise refused
            return await api(self, **kwargs)
        except ApiError as e:
            return rendered(e)

    return wrapper


CLIP = 80  # characters of a client's value shown in an error
SHOWN = 5  # errors listed in one reply; the rest are counted
_WHERE = {"query": "query parameter ", "path": "path parameter ", "header": "header ", "cookie": "cookie "}


def clip(value, limit: int = CLIP) -> str:
    """repr(value), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def field_name(loc) -> str:
    """`prediction_id`, `images.0.data`, `query parameter limit`; `body` for the body as a whole."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _WHERE:
        return _WHERE[parts[0]] + ".".join(parts[1:])
    if parts[:1] == ["body"]:
        parts = parts[1:]
    return ".".join(parts) or "body"


def describe(errors: list[dict], fields=None) -> str:
    """Pydantic's (or FastAPI's) error list as one line: `field: what is wrong (got 'value')`; ... An unknown
    field is said to be one, with the `fields` there are when they are given."""
    parts = []
    for e in errors[:SHOWN]:
        name, kind = field_name(e.get("loc", ())), e.get("type")
        if kind == "extra_forbidden":
            parts.append(f"{name}: unknown field" + (f" (fields: {', '.join(fields)})" if fields else ""))
            continue
        msg = e.get("msg") or "invalid"
        got = e.get("input")
        if kind != "missing" and isinstance(got, (str, int, float)) and not isinstance(got, bool):
            msg += f" (got {clip(got)})"
        parts.append(f"{name}: {msg}")
    if len(errors) > SHOWN:
        parts.append(f"and {len(errors) - SHOWN} more")
    return "; ".join(parts)


def json_problem(errors: list[dict]) -> str | None:
    """Why the body is not JSON, when that is what the errors say; else None."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return str((e.get("ctx") or {}).get("error") or e.get("msg") or "invalid JSON")
    return None


def is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's RequestValidationError as {"error": ...}: 400 for a body that is not JSON, 415 for a body
    that is not sent as JSON at all, 422 for fields that fail their rules (FastAPI's status for them)."""
    errors = list(exc.errors())
    bad_json = json_problem(errors)
    if bad_json:
        return JSONResponse({"error": f"body is not valid JSON: {bad_json}"}, status_code=400)
    ctype = request.headers.get("content-type", "")
    if not is_json(ctype) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        got = clip(ctype) if ctype else "no content type"
        return JSONResponse({"error": f"send the body as application/json (got {got})"}, status_code=415)
    return JSONResponse({"error": describe(errors)}, status_code=422)


def install(app) -> None:
    """Answer the FastAPI app's ApiErrors and validation errors in the one error shape."""
    app.add_exception_handler(RequestValidationError, validation_failed)
    app.add_exception_handler(ApiError, api_error)


async def send_error(send, status: int, body: dict, headers: dict | None = None) -> None:
    """A whole JSON reply from ASGI middleware (service/guard.py, service/projects.py), before any route runs."""
    resp = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})
