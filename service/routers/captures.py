"""Captured images: the image a prediction was made on, while it is kept (REFIT_CAPTURE=1)."""
from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.deps import RefitDep
from service.errors import ApiError
from service.imagebytes import media_type

router = APIRouter()


@router.get("/captures/{capture_id}/image")
def capture_image(svc: RefitDep, capture_id: str):
    """The image a prediction was made on, while it is captured (for a labelling page)."""
    data = svc.captures.image(capture_id) if svc.captures.get(capture_id) else None
    if data is None:
        raise ApiError(404, f"no captured image {capture_id[:64]!r}")
    return Response(data, media_type=media_type(data))
