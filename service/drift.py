"""Drift per served version: a sliding window of recent inputs in each model worker, scored against the
version's training reference (`core/drift.py`, numpy only).

The batch thread hands each run's `embedding` rows and probabilities to `DriftMonitor.observe` (no extra
model run), which appends them to the window of their version: the last `REFIT_DRIFT_WINDOW` inputs per
worker. Each input's distance to the nearest training embeddings is computed later, once, off the batch
thread (at the heartbeat, or when a reader asks). A worker's window summary
(count, summed distance, label counts) rides on its status record in the store, so `GET /drift` and
`/metrics` on any worker pool the windows of all the live workers of its replica (at most one heartbeat
old), and the answer does not depend on which worker the load balancer picked.

A version without a reference (its model file has no `embedding` output, or it has no `drift.npz`: made
before drift monitoring, or the bootstrap ImageNet model, which saw no training data here) keeps serving;
its drift is reported as not available.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

import numpy as np

from core.drift import FILE, MIN_WINDOW, Reference, load_reference
from core.settings import settings
from core.store import StoreError

log = logging.getLogger("refit.drift")

KEEP_VERSIONS = 4  # windows kept per worker: the version it serves and the few it served before


def reference_for(session, folder: Path) -> tuple[Reference | None, str | None]:
    """The drift reference of a version being opened, or None and why there is none."""
    if "embedding" not in {o.name for o in session.get_outputs()}:
        return None, ("not available for this version: its model file has no 'embedding' output "
                      "(published before drift monitoring)")
    try:
        ref = load_reference(folder / FILE)
    except Exception as e:  # noqa: BLE001 - a damaged reference costs the drift figure, never the version
        log.error("%s: %s cannot be read (%s); drift is not available for it", folder.name, FILE, e)
        return None, f"not available for this version: its {FILE} cannot be read ({type(e).__name__})"
    if ref is None:
        return None, f"not available for this version: it has no {FILE} (no training reference)"
    return ref, None


class DriftMonitor:
    def __init__(self, window: int):
        self.window = window
        self._lock = threading.Lock()
        self._windows: dict[str, deque] = {}  # version -> deque of [embedding or None, label, distance or None]
        self.references: dict[str, Reference] = {}

    def observe(self, model, probs: np.ndarray, embeddings: np.ndarray | None) -> None:
        """One model run's outputs, called by the batch thread: only appended here (microseconds); the
        distances are computed by `summary`, on the heartbeat or a reader's thread, never on the batch
        thread, where a matrix product would compete with the model for the cores."""
        ref = getattr(model, "drift", None)
        if ref is None or embeddings is None:
            return
        rows = [[e, y, None] for e, y in zip(embeddings, probs.argmax(1).tolist(), strict=True)]
        with self._lock:
            w = self._windows.get(model.version)
            if w is None:
                while len(self._windows) >= KEEP_VERSIONS:
                    oldest = next(iter(self._windows))
                    self._windows.pop(oldest)
                    self.references.pop(oldest, None)
                w = self._windows[model.version] = deque(maxlen=self.window)
                self.references[model.version] = ref
            w.extend(rows)

    def summary(self) -> dict:
        """This worker's windows: {version: {"n", "distance_sum", "labels": [count per class]}}."""
        with self._lock:
            windows = {v: list(w) for v, w in self._windows.items()}
            refs = dict(self.references)
        out = {}
        for v, rows in windows.items():
            ref = refs[v]
            todo = [r for r in rows if r[2] is None]
            if todo:
                try:
                    for r, d in zip(todo, ref.distances(np.stack([r[0] for r in todo])).tolist(), strict=True):
                        r[2], r[0] = d, None  # scored once; the embedding is not needed any more
                except Exception:  # broad on purpose: an embedding of another width, say: logged, left out
                    log.exception("drift: cannot score the embeddings of %s", v)
                    for r in todo:
                        r[2], r[0] = float("nan"), None
            scored = [r for r in rows if r[2] == r[2]]  # NaN: could not be scored
            labels = np.bincount([r[1] for r in scored], minlength=len(ref.classes))
            out[v] = {"n": len(scored), "distance_sum": float(sum(r[2] for r in scored)), "labels": labels.tolist()}
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


def served_report(svc) -> dict:
    """Drift of every version this replica's live workers serve, their windows pooled (`GET /drift` and
    `/metrics`); `svc` is the service instance (service/deps.py)."""
    window = settings().drift_window
    try:
        others = [w for w in svc.board.live(svc.replica) if w.get("pid") != os.getpid()]
    except StoreError as e:
        log.error("cannot read the other workers' drift windows: %s", e)
        others = []
    pooled = pool([svc.drift_monitor.summary()] + [w.get("drift") for w in others])
    current = svc.holder.current
    served = [current.version] if current else []
    versions = list(dict.fromkeys(served + [w.get("version") for w in others if w.get("version")] + list(pooled)))
    out = []
    for v in versions:
        ref, why = svc.drift_monitor.references.get(v), None
        if current is not None and v == current.version:
            ref, why = current.drift, current.drift_note
        elif ref is None:
            try:
                ref = load_reference(svc.store.path(v) / FILE)
            except (OSError, StoreError, ValueError) as e:
                why = f"not available for this version: {e}"
        out.append(report(v, ref, pooled.get(v), window, why))
    return {"window_per_worker": window, "versions": out}
