"""The web console at /ui: static files (plain HTML, small ES modules, CSS) from service/ui, served by the
service itself, with no build step; and a link to it on the OpenAPI page at /.

Every page talks to the same HTTP API a script would (the console has no routes of its own), so what it
shows is what the API answers, errors included.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "ui"
LINK = "**Console: [/ui](/ui)**: try the model, manage versions, retrain and label data from a browser.\n\n"
# Files of a version that the console shows (training writes them); other files of a version (the model, its
# checksums) are not served.
VERSION_FILES = {"confusion_matrix.png": "image/png", "results.csv": "text/csv"}


# The console's pages are the service's own files: scripts and styles from here only (ES modules, no inline
# script), images from here, as data: URLs (the explanation's heatmap) and blob: URLs (guarded images fetched
# with the token), and no page may frame it (clickjacking of promote and retrain buttons).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "x-frame-options": "DENY",
           "referrer-policy": "same-origin"}


def mount(admin: FastAPI) -> None:
    # html=True: /ui/ answers index.html. /ui itself is a route of its own that redirects to /ui/, so that
    # the page's relative module imports resolve under /ui/ (a mount matches only the paths below it, and
    # service/compat.py answers a path that matches no route with a 404 before Starlette's slash redirect).
    admin.add_api_route("/ui", lambda: RedirectResponse("/ui/", headers=HEADERS), include_in_schema=False)
    admin.mount("/ui", WithHeaders(StaticFiles(directory=UI_DIR, html=True)), name="ui")


class WithHeaders:
    """ASGI wrapper: HEADERS on every reply of the wrapped app (its files, its 404s and redirects)."""

    def __init__(self, app):
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in HEADERS.items()]

    async def __call__(self, scope, receive, send):
        async def add(message):
            if message["type"] == "http.response.start":
                names = set(HEADERS)
                kept = [(k, v) for k, v in message.get("headers", []) if k.decode("latin-1").lower() not in names]
                message = {**message, "headers": kept + self.extra}
            await send(message)

        await self.app(scope, receive, add)


class ConsoleLink:
    """ASGI middleware: puts a link to the console at the top of the OpenAPI page's description. BentoML
    builds the spec at /docs.json (which the page at / renders) from its own service readme, which a
    service cannot change without being packed as a bento, so the link is added to the reply."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            data = bytes(body)
            if start.get("status") == 200:
                try:
                    spec = json.loads(data)
                    spec["info"]["description"] = LINK + (spec["info"].get("description") or "")
                    data = json.dumps(spec).encode()
                except (ValueError, KeyError, TypeError):
                    pass  # not the spec we know: passed on as it is
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(data)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, capture)
