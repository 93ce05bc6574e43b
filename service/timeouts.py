"""A request timeout that lets go of its request. Imported by service/service.py before BentoML builds the app.

BentoML's `TimeoutMiddleware` (bentoml/_internal/server/http/traffic.py, BentoML 1.4) starts one timer per
request with `loop.call_later(traffic.timeout, ...)` and never cancels it. An asyncio timer keeps a copy of
the request's context until it fires, and that context holds the request (BentoML keeps the Starlette
`Request` in a context variable), so every request stays in memory for `traffic.timeout` seconds after its
reply: with this service's hour-long timeout (a synchronous /retrain may take that long), a model worker grew
by about 4 KB per prediction, 90 MB per replica over 10,000 predictions, and kept growing for an hour under
steady traffic. Cancelling the timer when the request ends keeps the worker flat (docs/benchmarks.md).
No upstream issue or public setting covers it (`traffic.timeout` must be positive, so the middleware cannot
be turned off), so the class BentoML looks up when it builds each app is replaced here by one that cancels its
timer; the reply on a timeout (504) is unchanged.
"""
from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic  # no public API names this middleware

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
                from starlette.responses import JSONResponse

                reply = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                     status_code=504)
                await reply(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()  # the one line BentoML's version lacks


def install() -> None:
    """BentoML imports the class from this module each time it builds an app (base_app.middlewares)."""
    traffic.TimeoutMiddleware = TimeoutMiddleware
