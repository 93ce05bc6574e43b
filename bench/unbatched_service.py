"""Refit with adaptive batching switched off, for benchmark 4's batching on/off comparison.

service/ has no setting that turns batching off, and BentoML refuses `max_batch_size=1`, so this module
declares the service's batchable APIs unbatched (every request is its own `classify` call, as BentoML
runs any non-batchable API) and then imports service/service.py unchanged:

    bentoml serve bench.unbatched_service:Refit
"""
from __future__ import annotations

import bentoml

_api = bentoml.api


def _unbatched_api(func=None, /, **options):
    options["batchable"] = False
    for key in ("batch_dim", "max_batch_size", "max_latency_ms"):
        options.pop(key, None)
    return _api(func, **options) if func is not None else _api(**options)


bentoml.api = _unbatched_api
# Imported after the patch, so the service's decorators use it.
from service.service import Classifier, Refit  # noqa: E402

__all__ = ["Classifier", "Refit"]
