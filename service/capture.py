"""Captured predictions: with `REFIT_CAPTURE=1` a worker keeps each predicted image and what the model said
about it, in the store, so that a person can later confirm or correct it (`POST /feedback`) and be shown the
images most worth labelling (`GET /datasets/{name}/suggest`).

Layout in the store (a folder or S3, shared by every replica, so feedback can reach any worker):
    captures/<id>.img    the uploaded bytes, as sent
    captures/<id>.json   {id, at, name, version, label, score, margin, top_k, sha256, feedback}
The record is written after the image, so a record always has its image. An id starts with the capture time
in milliseconds (hex), so age and order come from the key alone: pruning lists keys and reads no record.

Writes happen on one background thread per worker with a bounded queue: a prediction never waits for the
store, and when the store is slower than the traffic, captures are dropped (and counted), never predictions.
Retention: at most `REFIT_CAPTURE_MAX_IMAGES` images and `REFIT_CAPTURE_DAYS` days, oldest removed first, by
a pass every PRUNE_EVERY captures and whenever captures pause for IDLE_SECONDS (so the limits hold once
traffic pauses; under steady traffic each worker may be up to PRUNE_EVERY captures over).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import numpy as np

from training.store import Store, now_iso

log = logging.getLogger("refit.capture")

PREFIX = "captures/"
PRUNE_EVERY = 200  # captures written between two retention passes (and at least every PRUNE_SECONDS)
PRUNE_SECONDS = 300.0
IDLE_SECONDS = 2.0  # a pause in captures this long ends with a retention pass


def new_id() -> str:
    """Time-ordered and unguessable: 12 hex digits of milliseconds, then 12 random ones."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:12]}"


def captured_at(capture_id: str) -> float:
    """Seconds since the epoch from the id alone; 0 for an id that is not one of ours."""
    try:
        return int(capture_id[:12], 16) / 1000
    except ValueError:
        return 0.0


def valid_id(capture_id: str) -> bool:
    return len(capture_id) == 24 and all(c in "0123456789abcdef" for c in capture_id)


def top_margin(probs) -> float:
    """Top probability minus the second: near 0 the model could not tell the two apart (margin sampling,
    the usual first choice for what to label next: cheap, and it ranks about as well as entropy does when
    a few classes share the probability)."""
    if len(probs) < 2:
        return 1.0
    second, first = np.partition(np.asarray(probs), -2)[-2:]
    return float(first - second)


class Captures:
    """Reading captures (any worker, any replica) and writing them (the worker that predicted)."""

    def __init__(self, store: Store, *, max_images: int, days: float, queue_size: int = 256):
        self.store = store
        self.max_images, self.days = max_images, days
        self.dropped = 0  # captures not written because the queue was full
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._since_prune, self._pruned_at = 0, time.monotonic()

    # -- writing ----------------------------------------------------------------------------------
    def keep(self, capture_id: str, name: str, data: bytes, result: dict) -> bool:
        """Queue one image and its prediction for the store; False when the queue is full (dropped)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="refit-capture", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((capture_id, name, data, result))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _write_loop(self) -> None:
        dirty = False  # written since the last retention pass
        while True:
            try:
                item = self._queue.get(timeout=IDLE_SECONDS if dirty else None)
            except queue.Empty:  # traffic paused: a retention pass now leaves the store within its limits
                dirty = not self._prune_quietly()
                continue
            try:
                self._write(*item)
                dirty = True
            except Exception as e:  # noqa: BLE001 - a store outage loses captures, never the worker
                log.warning("capture %s not stored: %s", item[0], e)
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY or time.monotonic() - self._pruned_at > PRUNE_SECONDS:
                dirty = not self._prune_quietly()

    def _prune_quietly(self) -> bool:
        self._since_prune, self._pruned_at = 0, time.monotonic()
        try:
            self.prune()
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("capture retention pass failed: %s", e)
            return False

    def _write(self, capture_id: str, name: str, data: bytes, result: dict) -> None:
        import hashlib

        self.store.put_bytes(f"{PREFIX}{capture_id}.img", data)
        record = {"id": capture_id, "at": now_iso(), "name": name, "version": result["version"],
                  "label": result["label"], "score": result["score"], "top_k": result["top_k"],
                  "margin": result["margin"], "sha256": hashlib.sha256(data).hexdigest(),
                  "bytes": len(data), "feedback": None}
        self.store.put_record(f"{PREFIX}{capture_id}.json", record)

    def prune(self, now: float | None = None) -> int:
        """Remove captures past the age limit, then the oldest beyond the count limit; how many went."""
        ids = self.ids()
        cutoff = (now or time.time()) - self.days * 86400
        old = [i for i in ids if captured_at(i) < cutoff]
        keep = [i for i in ids if captured_at(i) >= cutoff]
        old += keep[:max(0, len(keep) - self.max_images)]
        for capture_id in old:
            # The record first: a capture without its record is never listed, one without its image would be.
            self.store.delete_record(f"{PREFIX}{capture_id}.json")
            self.store.delete_file(f"{PREFIX}{capture_id}.img")
        if old:
            log.info("capture retention: removed %d (limits %d images, %g days)", len(old), self.max_images, self.days)
        return len(old)

    # -- reading ----------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every capture id with a record, oldest first."""
        names = self.store.keys(PREFIX)
        return sorted(n[len(PREFIX):-5] for n in names if n.endswith(".json") and valid_id(n[len(PREFIX):-5]))

    def get(self, capture_id: str) -> dict | None:
        """The record, or None: unknown, expired (past the retention limits) or not a capture id."""
        if not valid_id(capture_id) or captured_at(capture_id) < time.time() - self.days * 86400:
            return None
        data, _ = self.store.record(f"{PREFIX}{capture_id}.json")
        return data

    def image(self, capture_id: str) -> bytes | None:
        return self.store.read_bytes(f"{PREFIX}{capture_id}.img")

    def recent(self, limit: int) -> list[dict]:
        """The newest `limit` records, newest first."""
        out = []
        for capture_id in reversed(self.ids()):
            if len(out) >= limit:
                break
            record = self.get(capture_id)
            if record is not None:
                out.append(record)
        return out

    def mark(self, capture_id: str, feedback: dict) -> None:
        """Record the feedback given on a capture (the latest wins)."""
        record, _ = self.store.record(f"{PREFIX}{capture_id}.json")
        if record is not None:
            self.store.put_record(f"{PREFIX}{capture_id}.json", {**record, "feedback": feedback})
