"""BentoML's request timeout pins every request in memory for the whole timeout (service/compat.py); the
replacement the service installs lets go of each request when it ends. Runs the real middleware classes
around a real ASGI app on a real event loop."""
from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref

from service import compat

REQUEST = contextvars.ContextVar("request")  # where BentoML keeps each request, as far as this test is concerned


class Request:
    pass


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _one(middleware) -> weakref.ref:
    request = Request()
    REQUEST.set(request)
    sent = []

    async def send(message):
        sent.append(message)

    await middleware({"type": "http"}, None, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return weakref.ref(request)


def _alive_after(cls, n: int = 200) -> int:
    async def main() -> int:
        middleware = cls(app, timeout=3600)
        # Each request in a task of its own, with its own context, as the HTTP server runs them.
        refs = [await asyncio.create_task(_one(middleware)) for _ in range(n)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gc.collect()
        return sum(r() is not None for r in refs)

    return asyncio.run(main())


def test_bentoml_timeout_middleware_pins_requests_and_ours_does_not():
    # BentoML's own class keeps every request for the timeout. If this starts failing, BentoML fixed it
    # upstream and its part of service/compat.py can go.
    assert _alive_after(compat._Original) == 200
    assert _alive_after(compat.TimeoutMiddleware) == 0


def test_the_service_builds_its_app_with_the_replacement():
    import service.service  # noqa: F401 - installs it
    from service.compat import traffic

    assert traffic.TimeoutMiddleware is compat.TimeoutMiddleware
