"""The ASGI plumbing between BentoML and this service, and every workaround of a BentoML bug, each with its
upstream link. No other module of service/ imports BentoML's internals.

- `TimeoutMiddleware`: BentoML's request timeout pins every request in memory for the whole timeout.
- `RouteLabels`: BentoML's HTTP metrics are labelled with the raw path, so clients can grow them without bound.
- `one_error_shape`: BentoML answers a 4xx as a JSON array; guard.py gives every error one shape.
- `install()`: puts the timeout fix where BentoML looks for it; called once by service/service.py.

## The request timeout

BentoML's `TimeoutMiddleware` (BentoML 1.4,
https://github.com/bentoml/BentoML/blob/main/src/bentoml/_internal/server/http/traffic.py) starts one timer per
request with `loop.call_later(traffic.timeout, ...)` and never cancels it. An asyncio timer keeps a copy of
the request's context until it fires, and that context holds the request (BentoML keeps the Starlette
`Request` in a context variable), so every request stays in memory for `traffic.timeout` seconds after its
reply: with this service's hour-long timeout (a synchronous /retrain may take that long), a model worker grew
by about 4 KB per prediction, 90 MB per replica over 10,000 predictions, and kept growing for an hour under
steady traffic. Cancelling the timer when the request ends keeps the worker flat (docs/benchmarks.md).
No upstream issue or public setting covers it (`traffic.timeout` must be positive, so the middleware cannot
be turned off), so the class BentoML looks up when it builds each app is replaced here by one that cancels its
timer; the reply on a timeout (504) is unchanged.

## The route labels (and one 404 for paths that match no route)

BentoML's traffic-metrics middleware labels every request with its raw path (`endpoint=scope["path"]` in
`bentoml/_internal/server/http/instruments.py`, https://github.com/bentoml/BentoML/blob/main/src/bentoml/
_internal/server/http/instruments.py; the label was chosen to be the route in
https://github.com/bentoml/BentoML/pull/5186). Each distinct path a client sends, even one that only earns
a 401 or a 404, becomes new series in every worker's metric files: 600 random paths grew `/metrics` from
40 KB to 2.2 MB and 1.4 s to render, and nothing ever removes them.

Middleware added with `Service.add_asgi_middleware` runs inside BentoML's metrics middleware, which has
read the path by then. So `RouteLabels`, registered there as the first of ours, puts a small layer in front
of the whole application when the server starts (the ASGI lifespan hands it the application): that layer
replaces the path with the template of the route it matches (`/jobs/{job_id}`, `/static_content/{path}`)
or with `UNMATCHED`, and keeps the real path in the scope. By the time the request reaches
`RouteLabels` itself the metrics middleware has labelled it; `RouteLabels` puts the real path back for
routing, and answers a path that matches no route with a 404 `{"error": ...}` of its own.
"""

from __future__ import annotations

import asyncio
import json

from bentoml._internal.server.http import traffic  # no public API or upstream issue: see "The request timeout"
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Mount

from core.projects import split_path

# --- the request timeout ------------------------------------------------------------------------------------

_Original = traffic.TimeoutMiddleware


class TimeoutMiddleware(_Original):
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                reply = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                     status_code=504)
                await reply(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()  # the one line BentoML's version lacks


def install() -> None:
    """Replace BentoML's TimeoutMiddleware by ours. BentoML imports the class from its module each time it
    builds a worker's app (`BaseAppFactory.middlewares`), and a worker builds its app right after importing
    the service's module, before it makes the service instance or runs the app's lifespan: no hook of the
    service runs early enough, so service/service.py calls this once, at the top."""
    traffic.TimeoutMiddleware = TimeoutMiddleware



# --- the route labels ---------------------------------------------------------------------------------------

UNMATCHED = "<unmatched>"  # the one label every path that matches no route shares; never a real path
_REAL_PATH = "refit.path"  # scope key: the path as the client sent it, while the label stands in for it


def route_template(routes: list[BaseRoute], scope) -> str | None:
    """The template of the route Starlette would pick for this request (a route that matches only by path,
    answered with 405, counts), or None when no route matches. Mounted applications are searched the way
    BentoML's mounts match: a mount with routes of its own matches only through one of them."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        path = getattr(route, "path", None)
        path = path if isinstance(path, str) else ""
        inner = _inner_routes(route)
        if inner is not None:
            found = route_template(inner, {**scope, **child})
            if found is None:
                continue
            template = path + found
        elif isinstance(route, Mount) or not path:  # static files: any name under the mount
            template = path + "/{path}"
        else:
            template = path
        if match == Match.FULL:
            return template
        partial = partial or template
    return partial


def _inner_routes(route: BaseRoute) -> list[BaseRoute] | None:
    """The routes a route dispatches to: a mounted application's, or (FastAPI 0.16x) those of the router
    that FastAPI wraps an application's own routes in."""
    if isinstance(route, Mount):
        return getattr(route.app, "routes", None)
    return getattr(getattr(route, "original_router", None), "routes", None)


def _template(routes: list[BaseRoute], scope) -> str:
    """The route template, for a project's route (`/projects/NAME/...`, core/projects.py) that of the route it
    is, under `/projects/{name}`: project names never become labels."""
    name, rest = split_path(scope["path"])
    if name is None:
        return route_template(routes, scope) or UNMATCHED
    inner = route_template(routes, {**scope, "path": rest})
    return "/projects/{name}" + inner if inner else UNMATCHED


class _Relabel:
    """In front of the whole application: the path becomes its route template for the layers before
    RouteLabels (BentoML's metrics, tracing and access log), and the real one is kept in the scope."""

    def __init__(self, app, starlette: Starlette):
        self.app = app
        self.starlette = starlette

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            template = _template(self.starlette.routes, scope)
            if template != scope["path"]:
                scope = {**scope, "path": template, _REAL_PATH: scope["path"]}
        await self.app(scope, receive, send)


class RouteLabels:
    """ASGI middleware; register it first with `add_asgi_middleware` so the real path is back before any
    other middleware of ours reads it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            _install(scope.get("app"))
        elif scope["type"] == "http" and _REAL_PATH in scope:
            if scope["path"] == UNMATCHED:
                return await _not_found(scope, send)
            scope = {**scope, "path": scope[_REAL_PATH]}
        await self.app(scope, receive, send)


def _install(app) -> None:
    """Put _Relabel in front of the application's middleware stack, once. Starlette builds the stack on
    its first call (this lifespan) and reads the attribute on every call after it."""
    if not isinstance(app, Starlette) or app.middleware_stack is None:
        return
    if not isinstance(app.middleware_stack, _Relabel):
        app.middleware_stack = _Relabel(app.middleware_stack, app)


async def _not_found(scope, send) -> None:
    path = scope[_REAL_PATH]
    shown = path if len(path) <= 200 else path[:200] + "..."
    reply = JSONResponse({"error": f"no route {scope['method']} {shown}; the API is listed at / "
                                   "(OpenAPI spec: /docs.json)"}, status_code=404)
    await send({"type": "http.response.start", "status": reply.status_code, "headers": reply.raw_headers})
    await send({"type": "http.response.body", "body": reply.body})


# --- the error shape ---------------------------------------------------------------------------------------

def one_error_shape(body: bytes, text: bool) -> bytes:
    """A 4xx body as {"error": ...}: BentoML's [{"error": ...}], a framework's {"detail": "..."} or plain text.

    BentoML 1.4 answers a 4xx BentoMLException with `JSONResponse(({"error": ...},))`, a one-element tuple, so
    the body is a JSON array, unlike its other errors and its own OpenAPI schema:
    https://github.com/bentoml/BentoML/issues/4232 (fix proposed in https://github.com/bentoml/BentoML/pull/5709).
    Starlette answers a wrong method as text, FastAPI as {"detail": "..."}; guard.py rewrites all three."""
    if text:
        return json.dumps({"error": body.decode("utf-8", "replace").strip()[:500] or "refused"}).encode()
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
        return json.dumps(data[0]).encode()
    if isinstance(data, dict) and "error" not in data and isinstance(data.get("detail"), str):
        return json.dumps({"error": data["detail"]}).encode()
    return body
