"""The decode budget of a predict or explain request: what decoding its images would cost, read from their
headers (microseconds each), against REFIT_MAX_REQUEST_MEGAPIXELS. Checked before anything is decoded, so
that the model workers, which every client shares, never start on a request they would spend seconds of CPU
on.
"""
from __future__ import annotations

from core.preprocess import ImageError, decode_cost
from core.settings import settings
from service.errors import ApiError

HOW = "(counted as PNG megapixels: a baseline JPEG counts a quarter, a row narrower than 8 pixels as 8)"


def check(files: list[tuple[str, bytes]]) -> None:
    """Raise ApiError naming the image(s) and the limit when the request is over its budget: 400 for a
    header that cannot be read or one image over it alone, 413 for images over it together."""
    s = settings()
    budget = s.max_request_megapixels
    costs = []
    for name, data in files:
        try:
            costs.append((decode_cost(data, name, max_pixels=s.max_image_pixels), name))
        except ImageError as e:
            raise ApiError(400, str(e)) from None
    for cost, name in costs:
        if cost > budget:
            raise ApiError(400, f"{name}: decoding it costs {cost:.1f} megapixels, over the limit of {budget:g} "
                                f"megapixels per request {HOW}; send a smaller image")
    total = sum(c for c, _ in costs)
    if total > budget:
        costliest = ", ".join(f"{n} {c:.1f}" for c, n in sorted(costs, key=lambda t: -t[0])[:3])
        raise ApiError(413, f"these {len(costs)} images cost {total:.1f} megapixels to decode, over the limit of "
                            f"{budget:g} megapixels per request {HOW}; costliest: {costliest}. "
                            "Send them in several requests, or smaller")
