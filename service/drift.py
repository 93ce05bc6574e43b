"""Drift per served version: a sliding window of recent inputs in each model worker, scored against the
version's training reference (`training/drift.py`, numpy only).

The batch thread hands each run's `embedding` rows and probabilities to `DriftMonitor.observe` (no extra
model run): each input becomes one (distance to the nearest training embeddings, predicted label) pair in
the window of its version, the last `REFIT_DRIFT_WINDOW` inputs per worker. A worker's window summary
(count, summed distance, label counts) rides on its status record in the store, so `GET /drift` and
`/metrics` on any worker pool the windows of all the live workers of its replica (at most one heartbeat
old), and the answer does not depend on which worker the load balancer picked.

A version without a reference (its model file has no `embedding` output, or it has no `drift.npz`: made
before drift monitoring, or the bootstrap ImageNet model, which saw no training data here) keeps serving;
its drift is reported as not available.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path

import numpy as np

from training.drift import FILE, MIN_WINDOW, Reference, load_reference

log = logging.getLogger("refit.drift")

KEEP_VERSIONS = 4  # windows kept per worker: the version it serves and the few it served before


def reference_for(session, folder: Path) -> tuple[Reference | None, str | None]:
    """The drift reference of a version being opened, or None and why there is none."""
    if "embedding" not in {o.name for o in session.get_outputs()}:
        return None, ("not available for this version: its model file has no 'embedding' output "
                      "(published before drift monitoring)")
    ref = load_reference(folder / FILE)
    if ref is None:
        return None, f"not available for this version: it has no {FILE} (no training reference)"
    return ref, None


class DriftMonitor:
    def __init__(self, window: int):
        self.window = window
        self._lock = threading.Lock()
        self._windows: dict[str, deque] = {}  # version -> deque of (distance, label index)
        self.references: dict[str, Reference] = {}

    def observe(self, model, probs: np.ndarray, embeddings: np.ndarray | None) -> None:
        """One model run's outputs (called by the batch thread; a few microseconds per image). Never raises:
        a drift figure is not worth the batch thread."""
        ref = getattr(model, "drift", None)
        if ref is None or embeddings is None:
            return
        try:
            rows = list(zip(ref.distances(embeddings).tolist(), probs.argmax(1).tolist()))
        except Exception:  # noqa: BLE001 - an embedding of another width, say: logged, the window skips it
            log.exception("drift: cannot score this run's embeddings for %s", model.version)
            return
        with self._lock:
            w = self._windows.get(model.version)
            if w is None:
                while len(self._windows) >= KEEP_VERSIONS:
                    self._windows.pop(next(iter(self._windows)))
                w = self._windows[model.version] = deque(maxlen=self.window)
                self.references[model.version] = ref
            w.extend(rows)

    def summary(self) -> dict:
        """This worker's windows: {version: {"n", "distance_sum", "labels": [count per class]}}."""
        with self._lock:
            windows = {v: list(w) for v, w in self._windows.items()}
        out = {}
        for v, rows in windows.items():
            n_classes = len(self.references[v].classes)
            labels = np.bincount([y for _, y in rows], minlength=n_classes) if rows else np.zeros(n_classes, int)
            out[v] = {"n": len(rows), "distance_sum": float(sum(d for d, _ in rows)), "labels": labels.tolist()}
        return out


def pool(summaries: list[dict]) -> dict:
    """Several workers' summaries added up per version."""
    out: dict[str, dict] = {}
    for s in summaries:
        for v, w in (s or {}).items():
            acc = out.setdefault(v, {"n": 0, "distance_sum": 0.0, "labels": None, "workers": 0})
            acc["n"] += int(w["n"])
            acc["distance_sum"] += float(w["distance_sum"])
            labels = np.asarray(w["labels"], np.int64)
            acc["labels"] = labels if acc["labels"] is None else acc["labels"] + labels
            acc["workers"] += 1
    return out


def report(version: str, ref: Reference | None, pooled: dict | None, window: int, why_not: str | None) -> dict:
    """One version's entry in GET /drift."""
    if ref is None:
        return {"version": version, "available": False,
                "reason": why_not or "not available for this version (no training reference)"}
    n = pooled["n"] if pooled else 0
    labels = pooled["labels"] if pooled else np.zeros(len(ref.classes), np.int64)
    workers = pooled["workers"] if pooled else 0
    scores = ref.scores(n, pooled["distance_sum"] if pooled else 0.0, labels)
    return {"version": version, "available": True, "window_fill": n, "window_size": window * max(1, workers),
            "workers": workers, "min_fill": MIN_WINDOW, **scores}
