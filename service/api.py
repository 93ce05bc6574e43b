"""The admin app mounted on the service at /: one router per resource (service/routers/), the one error
shape, and the web console at /ui."""
from __future__ import annotations

from fastapi import FastAPI

from service import console, errors
from service.routers import candidate, captures, datasets, drift, feedback, jobs, projects, retrain, versions

# the OpenAPI page lists them in this order
ROUTERS = (versions, candidate, drift, retrain, jobs, feedback, captures, datasets, projects)


def create_app() -> FastAPI:
    app = FastAPI(title="Refit admin", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)  # ApiError and validation errors as {"error": ...}, nothing echoed back at length
    console.mount(app)  # the web console at /ui
    for module in ROUTERS:
        app.include_router(module.router)
    return app
