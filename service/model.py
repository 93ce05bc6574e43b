"""The model one worker serves: an onnxruntime session plus the contract read from the same file.

A watcher thread polls the promoted pointer. A new version is verified (checksum), opened and warmed up
completely before one reference assignment swaps it in, so a batch sees either the old model or the new
one, never a mix. A version that fails its checksum or does not load is refused: the worker keeps serving
what it had, logs why, and writes the reason to its status record in the store (`service/replicas.py`),
which `GET /versions` on every replica shows. So is a pointer that cannot be used (damaged, or missing beside
existing versions): whatever the file holds, the watcher logs it, keeps the model it has and keeps watching.
A second thread rewrites the status record at every heartbeat, so that it expires when this worker dies.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import Contract
from core.preprocess import preprocess
from core.settings import settings
from core.store import Store, StoreError, now_iso
from service.drift import DriftMonitor, reference_for
from service.replicas import StatusBoard, replica_id
from service.trial import Trials

log = logging.getLogger("refit.model")

CONTRACT_KEY = "refit.contract"  # written by training.export; read here without importing onnx or torch
VERSION_KEY = "refit.version"
DEFAULT_LABEL_THRESHOLD = 0.5  # a multi-label file whose contract carries no thresholds: the sigmoid's middle


class ModelUnavailable(RuntimeError):
    """No version could be loaded yet (empty store, or every candidate failed)."""


@dataclass(frozen=True)
class Loaded:
    version: str
    session: object  # onnxruntime.InferenceSession
    contract: Contract
    labels: tuple[str, ...]
    loaded_at: str
    drift: object = None  # core.drift.Reference; None: drift is not available (why: drift_note)
    drift_note: str | None = None
    folder: Path | None = None  # the version's files (cam.npz for explanations, read when first asked for)
    sha256: str | None = None  # the served file's checksum, as the store recorded it: which model, not only which id
    # Multi-label: each label's threshold as one array, made once per version so an answer compares all
    # labels in one vectorised step. None for a single-label version.
    cuts: np.ndarray | None = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probs"], {"input": batch})[0]

    def run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, when this version has a drift reference, the embeddings of the same run."""
        if self.drift is None:
            return self.run(batch), None
        probs, embeddings = self.session.run(["probs", "embedding"], {"input": batch})
        return probs, embeddings


def make_session(path: Path, threads: int):
    import onnxruntime as ort  # here: the supervisor imports this module too, and never runs a model

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning intra-op threads burn the core that image decoding, the HTTP front and a running retrain
    # need; on a small CPU letting them sleep between runs gives more throughput, not less.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def open_version(store: Store, version: str, threads: int) -> Loaded:
    """Checksum, open, read the contract and run one warm-up batch; raises with the reason on any failure."""
    path = store.verify(version)
    session = make_session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map
    if CONTRACT_KEY not in meta:
        raise ValueError(f"{version}: {path.name} has no {CONTRACT_KEY} metadata; not a Refit model file")
    stamped = meta.get(VERSION_KEY)
    if stamped and stamped != version:
        raise ValueError(f"{version}: {path.name} says it is {stamped}; the store entry was tampered with")
    contract = Contract.from_json(meta[CONTRACT_KEY])
    n_out = session.get_outputs()[0].shape[-1]
    labels = tuple(contract.class_names)
    if isinstance(n_out, int) and len(labels) != n_out:
        raise ValueError(f"{version}: the contract names {len(labels)} classes but the model has {n_out} outputs")
    # The first run allocates onnxruntime's buffers; do it here so no client request pays for it.
    session.run(["probs"], {"input": np.zeros((1, 3, contract.input_size, contract.input_size), np.float32)})
    drift, note = reference_for(session, path.parent)
    sha256 = store.info(version).get("serving_sha256")
    return Loaded(version, session, contract, labels, now_iso(), drift, note, path.parent, sha256,
                  label_cuts(contract))


def label_cuts(contract: Contract) -> np.ndarray | None:
    """A multi-label version's per-label thresholds (its contract's; 0.5 each for a file without them), in
    class order; None for a single-label version."""
    if not contract.multi_label:
        return None
    if contract.thresholds:
        return np.asarray(contract.thresholds, np.float32)
    return np.full(len(contract.class_names), DEFAULT_LABEL_THRESHOLD, np.float32)


class ModelHolder:
    """The current model of this worker process and the thread that keeps it in step with the pointer."""

    def __init__(self, store: Store, *, threads: int, poll_seconds: float, drift: DriftMonitor | None = None):
        self.store = store
        self.drift = drift  # its window summary goes into the status record (service/drift.py)
        self.threads = threads
        self.poll_seconds = poll_seconds
        self.current: Loaded | None = None
        self.error: dict | None = None  # the last refused version and why
        self._seen: object = object()  # pointer signature at the last look; a fresh object never matches
        self._stop = threading.Event()
        self.replica = replica_id()
        self.board = StatusBoard(store)
        self._status_lock = threading.Lock()  # the watcher and the heartbeat write the same record
        self._closed = False
        self._status_failing = False
        self.trials = Trials(store, open_version=lambda v: open_version(store, v, threads), answer=ModelHolder.answer,
                             worker=f"{self.replica}-{os.getpid()}", flush_seconds=settings().heartbeat_seconds)
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="refit-model-watch", daemon=True)
        self._thread.start()
        # Its own thread, not the watcher's: loading a large version from S3 can take longer than the TTL,
        # and the record must not expire (and the replica look unready) while the old version still serves.
        self._beat = threading.Thread(target=self._heartbeat, args=(settings().heartbeat_seconds,),
                                      name="refit-heartbeat", daemon=True)
        self._beat.start()

    # -- keeping up with the promoted pointer -----------------------------------------------------
    def refresh(self) -> None:
        """Load the promoted version if it changed since the last look. Never raises."""
        try:
            sig = self.store.pointer_signature()
        except StoreError as e:  # an S3 store that cannot be reached: reported once, not at every look
            sig = ("unreachable", str(e))
        if sig == self._seen:
            return
        self._seen = sig
        try:
            state = self.store.read_pointer()  # read once: the promoted version and the candidate beside it
        except (OSError, StoreError) as e:  # StoreError: a damaged pointer (PointerError), named and explained
            self._refuse(None, str(e))
            return
        self._follow_promoted(state["version"])
        self.trials.follow(state)

    def _follow_promoted(self, target: str | None) -> None:
        if target is None:
            # Nothing promoted. A worker keeps what it serves (a decision made earlier); one that has nothing
            # serves nothing until a version is promoted: a missing pointer never promotes one by itself.
            problem = self.store.pointer_problem()
            if problem:
                self._refuse(None, problem)
            else:
                self.error = None
                self._write_status()
            return
        if self.current is not None and self.current.version == target and self._still_the_stores(self.current):
            self.error = None  # the pointer is back on a version this worker serves: nothing is refused
            self._write_status()
            return
        try:
            t0 = time.perf_counter()
            new = open_version(self.store, target, self.threads)
        except Exception as e:  # noqa: BLE001 - any failure means: keep serving the last good model
            self._refuse(target, str(e))
            if self.current is None:
                self._fall_back(exclude=target)
            return
        previous = self.current.version if self.current else None
        self.current = new  # the swap: one reference assignment, atomic under the GIL
        self.error = None
        log.info("serving %s (was %s), loaded in %.2fs", new.version, previous, time.perf_counter() - t0)
        self._write_status()

    def _still_the_stores(self, model: Loaded) -> bool:
        """Whether the store's record of `model`'s id is still the model this worker loaded. A store re-created
        empty numbers from v0001 again: the same id then names another model, which must be loaded."""
        try:
            recorded = self.store.info(model.version).get("serving_sha256")
        except Exception:  # noqa: BLE001 - gone from the store, or the store away: keep what serves, say why later
            return True
        if recorded == model.sha256:
            return True
        log.warning("%s in %s is not the %s this worker serves (checksum %s, loaded %s): loading the store's",
                    model.version, self.store.describe(), model.version, recorded, model.sha256)
        return False

    def _refuse(self, version: str | None, reason: str) -> None:
        serving = self.current.version if self.current else None
        log.error("refusing %s: %s; still serving %s", version or "the promoted version", reason, serving)
        self.error = {"version": version, "reason": reason, "at": now_iso()}
        self._write_status()

    def _fall_back(self, exclude: str) -> None:
        """A worker that starts while the promoted version is broken serves the last good one before it."""
        try:
            history = self.store.history()
        except (OSError, StoreError):
            return  # refresh read this pointer a moment ago; it changed under us, and the next look sees it
        chain = [e["version"] for e in reversed(history) if e.get("version")]
        for version in dict.fromkeys(v for v in chain if v != exclude):
            try:
                self.current = open_version(self.store, version, self.threads)
            except Exception as e:  # noqa: BLE001 - a fallback that fails to load: try the one before it
                log.error("fallback %s does not load either: %s", version, e)
                continue
            log.warning("serving %s, the last good version before %s", version, exclude)
            self._write_status()
            return

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # broad on purpose: a watcher that dies leaves this worker on its version for good
                log.exception("the promoted-pointer watcher failed; it keeps watching")

    def _heartbeat(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self._write_status()

    def _write_status(self) -> None:
        """This worker's record in the store. A store that cannot be written is logged once per outage: the
        worker keeps serving, and its record expires on the other replicas until the store is back."""
        with self._status_lock:  # the state is read under the lock, so an older state never lands last
            if self._closed:
                return
            model, error = self.current, self.error
            status = {"version": model.version if model else None, "loaded_at": model.loaded_at if model else None,
                      "error": error, "drift": self.drift.summary() if self.drift else None,
                      "sha256": model.sha256 if model else None, "cached": self._cached_newest()}
            try:
                self.board.publish(self.replica, os.getpid(), status)
            except (OSError, StoreError) as e:
                if not self._status_failing:
                    log.warning("cannot write this worker's status record to %s: %s", self.store.describe(), e)
                self._status_failing = True
                return
            if self._status_failing:
                log.info("status record written to %s again", self.store.describe())
            self._status_failing = False

    def _cached_newest(self) -> str | None:
        """The newest version in this replica's cache: a publish into a re-created store numbers after it."""
        try:
            return self.store.cached_newest()
        except OSError:
            return None

    def close(self) -> None:
        self._stop.set()
        self.trials.close()
        with self._status_lock:
            self._closed = True
            try:
                self.board.withdraw(self.replica, os.getpid())
            except (OSError, StoreError) as e:  # it expires on its own
                log.warning("cannot remove this worker's status record: %s", e)

    # -- inference --------------------------------------------------------------------------------
    @staticmethod
    def decode(model: Loaded, files: list[tuple[str, bytes]]) -> list:
        """Each image decoded and preprocessed with `model`'s contract: an array, or a ValueError naming the
        image that cannot be decoded."""
        out = []
        for name, data in files:
            try:
                # The front checked the request's decode budget from the headers; the per-image limit is held
                # here too, at decode time.
                out.append(preprocess(data, model.contract, name=name, max_pixels=settings().max_image_pixels))
            except Exception as e:  # noqa: BLE001 - ImageError, decompression-bomb guard, anything PIL raises
                msg = str(e)
                out.append(ValueError(msg if msg.startswith(name) else f"{name}: {msg}"))
        return out

    def classify(self, items: list[dict]) -> list[dict]:
        """items: {"name", "data" (bytes), "top_k", "threshold"}; one result per item, in order, all on one
        version: a prediction, or {"error": ...} for an image that cannot be decoded. (The service batches
        across requests itself; this is the one-call path.)"""
        model = self.current  # read once: the whole call runs on this version even if a swap happens now
        if model is None:
            reason = f" ({self.error['reason']})" if self.error else ""
            raise ModelUnavailable(f"no model is loaded yet{reason}")
        arrays = self.decode(model, [(i["name"], i["data"]) for i in items])
        good = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray)]
        probs = model.run(np.stack([arrays[i] for i in good])) if good else None
        out: list[dict] = [{"error": str(a), "version": model.version} if not isinstance(a, np.ndarray) else {}
                           for a in arrays]
        for row, i in enumerate(good):
            out[i] = self.answer(model, probs[row], items[i]["top_k"], items[i]["threshold"])
        return out

    @staticmethod
    def answer(model: Loaded, p: np.ndarray, top_k: int, threshold: float | None = None) -> dict:
        """One image's reply from its probabilities. `threshold`: the request's (None: not given). A
        single-label version answers its best class, or "unknown" under the threshold (REFIT_THRESHOLD when
        not given). A multi-label version also lists `labels`, every label at or over its own threshold (or
        over the request's, which then holds for every label), best first; `label` is the first of them."""
        k = max(1, min(int(top_k), len(p)))
        top = np.argpartition(-p, k - 1)[:k]
        top = top[np.argsort(-p[top], kind="stable")]
        names, n = model.labels, len(model.labels)
        # tolist(): Python floats and ints in one call each, cheaper than a numpy scalar per class listed
        ranked = [{"label": names[i] if i < n else f"class_{i}", "score": score}
                  for i, score in zip(top.tolist(), p[top].tolist(), strict=True)]
        best = ranked[0]
        if model.cuts is None:
            cut = settings().threshold if threshold is None else threshold
            label = best["label"] if best["score"] >= cut else "unknown"
            return {"label": label, "score": best["score"], "top_k": ranked, "version": model.version}
        # One comparison of every label with its threshold; what loops is only the labels over it, usually few.
        over = (p >= (model.cuts if threshold is None else threshold)).nonzero()[0]
        pairs = sorted(zip((-p[over]).tolist(), over.tolist(), strict=True))  # best first; a tie in class order
        labels = [{"label": names[i], "score": -score} for score, i in pairs]
        first = labels[0] if labels else {"label": "unknown", "score": best["score"]}
        return {**first, "top_k": ranked, "version": model.version, "labels": labels}


def unavailable(store: Store, holder: ModelHolder) -> str:
    """Why a request for the model gets a 503: the store's problem when it has one (nothing promoted, a
    damaged pointer), else the version this worker refused."""
    problem = store.pointer_problem()
    if problem:
        return f"no model to answer with: {problem}"
    reason = f" ({holder.error['reason']})" if holder.error else ""
    return f"no model is loaded yet{reason}"
