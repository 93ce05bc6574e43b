"""Captured predictions: with `REFIT_CAPTURE=1` a worker keeps each predicted image and what the model said
about it, in the store, so that a person can later confirm or correct it (`POST /feedback`) and be shown the
images most worth labelling (`GET /datasets/{name}/suggest`).

Layout in the store (a folder or S3, shared by every replica, so feedback can reach any worker):
    captures/<id>.img    the uploaded bytes, as sent
    captures/<id>.json   {id, at, name, version, label, score, margin, top_k, sha256, feedback}, and `labels`
                         for an answer of a multi-label version
The record is written after the image, so a record always has its image. An id starts with the capture time
in milliseconds (hex), so age and order come from the key alone: pruning lists keys and reads no record.

Writes happen on one background thread per worker with a bounded queue: a prediction never waits for the
store, and when the store is slower than the traffic, captures are dropped (and counted), never predictions.
What is kept of an upload is the image alone (service/imagebytes.py): bytes sent after its end are cut.
Retention: at most `REFIT_CAPTURE_MAX_IMAGES` images, `REFIT_CAPTURE_DAYS` days and `REFIT_CAPTURE_MAX_MB`
bytes, oldest removed first, by a pass every PRUNE_EVERY captures, whenever captures pause for IDLE_SECONDS,
before a write that would pass the byte budget (down to LOW_WATER of it, so passes stay rare), and on a
timer that runs whether the server captures or not (`start_pruning`: a server with capture turned off
still removes what expires). Each worker counts its own writes between passes, so with several writing
workers the store may pass the budget by up to a tenth of it per other worker until the next pass.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from typing import Callable

import numpy as np

from core.store import Store, now_iso
from service.imagebytes import stored_form

log = logging.getLogger("refit.capture")

PREFIX = "captures/"
PRUNE_EVERY = 200  # captures written between two retention passes (and at least every PRUNE_SECONDS)
PRUNE_SECONDS = 300.0
IDLE_SECONDS = 2.0  # a pause in captures this long ends with a retention pass
LOW_WATER = 0.9  # a pass forced by the byte budget leaves the captures at this share of it
RECORD_BYTES = 2048  # what a record is counted as before it is written (they are about 1 KB)
ORPHAN_SECONDS = 600.0  # an image this old without its record is a write that died between the two files


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


def doubt(model, probs) -> float:
    """How unsure `model` (service.model.Loaded) was, smaller is less sure: the top margin for a single-label
    version; for a multi-label one, how near the label nearest its threshold came to it (the one a person's
    answer would most likely change)."""
    if getattr(model, "cuts", None) is None:
        return top_margin(probs)
    return float(np.min(np.abs(np.asarray(probs) - model.cuts)))


class Captures:
    """Reading captures (any worker, any replica) and writing them (the worker that predicted)."""

    def __init__(self, store: Store, *, max_images: int, days: float, max_bytes: int = 2 << 30,
                 queue_size: int = 256, on_drop: Callable[[], None] | None = None):
        self.store = store
        self.max_images, self.days, self.max_bytes = max_images, days, max_bytes
        self.dropped = 0  # captures not written: the queue was full, or one image alone is over the budget
        self.on_drop = on_drop  # called for each capture the writer drops (the queue-full drops are the caller's)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._since_prune, self._pruned_at = 0, time.monotonic()
        self._used: int | None = None  # bytes of captures by the last pass, plus this worker's writes since
        self._prune_lock = threading.Lock()

    # -- writing ----------------------------------------------------------------------------------
    def keep(self, capture_id: str, name: str, data: bytes, result: dict, contract=None) -> bool:
        """Queue one image and its prediction for the store; False when the queue is full (dropped).
        `contract` is the one the model decoded the image with (service/imagebytes.py)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="refit-capture", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((capture_id, name, data, result, contract))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def start_pruning(self, every_seconds: float) -> threading.Thread:
        """A retention pass now and then every `every_seconds`, for the life of the process, whether this
        server captures or not: what expires is removed although nothing new is written."""
        def loop() -> None:
            while True:
                self._prune_quietly()
                time.sleep(every_seconds)

        thread = threading.Thread(target=loop, name="refit-capture-prune", daemon=True)
        thread.start()
        return thread

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
        except Exception as e:  # noqa: BLE001 - retention is housekeeping: the next pass tries again
            log.warning("capture retention pass failed: %s", e)
            return False

    def _write(self, capture_id: str, name: str, data: bytes, result: dict, contract=None) -> None:
        data = stored_form(data, contract)
        size = len(data) + RECORD_BYTES
        if size > self.max_bytes:
            self._drop(f"capture {capture_id} not stored: {size} bytes alone is over the capture budget of "
                       f"{self.max_bytes} bytes (REFIT_CAPTURE_MAX_MB)")
            return
        if self._used is None or self._used + size > self.max_bytes:
            self.prune(reserve=size)
        self.store.put_bytes(f"{PREFIX}{capture_id}.img", data)
        record = {"id": capture_id, "at": now_iso(), "name": name, "version": result["version"],
                  "label": result["label"], "score": result["score"], "top_k": result["top_k"],
                  "margin": result["margin"], "sha256": hashlib.sha256(data).hexdigest(),
                  "bytes": len(data), "feedback": None}
        if result.get("labels") is not None:  # a multi-label version's answer: the labels it gave
            record["labels"] = result["labels"]
        if result.get("trial") is not None:  # made during a trial: what each version answered (service/trial.py)
            record["trial"] = result["trial"]
        self.store.put_record(f"{PREFIX}{capture_id}.json", record)
        self._used = (self._used or 0) + size

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning(why)
        if self.on_drop is not None:
            self.on_drop()

    def prune(self, now: float | None = None, reserve: int = 0) -> int:
        """Remove captures past the age limit, then the oldest beyond the count limit, then the oldest until
        the rest and `reserve` more bytes fit the byte budget; also images whose record never came (a write
        cut short). How many captures went."""
        with self._prune_lock:
            now = now or time.time()
            files = _sizes(self.store)
            cutoff = now - self.days * 86400
            gone = {i for i, f in files.items() if captured_at(i) < cutoff
                    or ("json" not in f and captured_at(i) < now - ORPHAN_SECONDS)}
            keep = [i for i in sorted(files) if i not in gone and "json" in files[i]]
            gone.update(keep[:max(0, len(keep) - self.max_images)])
            keep = keep[max(0, len(keep) - self.max_images):]
            total = sum(sum(f.values()) for i, f in files.items() if i not in gone)
            if total + reserve > self.max_bytes:
                for capture_id in keep:
                    if total + reserve <= LOW_WATER * self.max_bytes:
                        break
                    gone.add(capture_id)
                    total -= sum(files[capture_id].values())
            for capture_id in sorted(gone):
                # The record first: a capture without its record is never listed, one without its image would be.
                self.store.delete_record(f"{PREFIX}{capture_id}.json")
                self.store.delete_file(f"{PREFIX}{capture_id}.img")
            self._used = total
        if gone:
            log.info("capture retention: removed %d (limits %d images, %g days, %d bytes); %d bytes kept", len(gone),
                     self.max_images, self.days, self.max_bytes, total)
        return len(gone)

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


def _sizes(store: Store) -> dict[str, dict[str, int]]:
    """capture id -> {"img": bytes, "json": bytes} for every capture file in the store, from one listing (no
    object is read). Keys that are not a capture's are left out: they are not ours to count or remove."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for key, size in _listing(store):
        stem, _, ext = key[len(PREFIX):].rpartition(".")
        if ext in ("img", "json") and valid_id(stem):
            out[stem][ext] = size
    return dict(out)


def _listing(store: Store):
    """(key, size) under PREFIX, from one listing of the store's objects (S3 lists sizes with the keys)."""
    return ((o.key, o.size) for o in store.objects.listing(PREFIX))
