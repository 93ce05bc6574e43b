"""A trial on one worker: the candidate's loaded model, which requests it answers (canary) or shadows, and what
this worker measured of it.

The candidate is set in the store (core/candidate.py); each worker's ModelHolder follows it with the pointer and
hands it to its `Trials`, which loads the candidate's version beside the promoted one.

- **Canary.** A client is told apart by its `X-Refit-Client` header, else by its address (the peer of the
  connection: behind a proxy every client is the proxy, so send the header). `sha256(trial id, client)` picks
  `percent` % of clients, so a client keeps its version while the trial and its percent stay.
- **Shadow.** The reply comes from the promoted version; for `percent` % of requests, sampled, the same decoded
  batch waits in a bounded queue for a thread of its own at idle CPU priority (SCHED_IDLE: it runs only on a
  core nothing else wants) that runs the candidate and compares. Under full load it gets almost no CPU, the
  queue fills, and samples are dropped and counted: shadow work never builds up. Measured at half load
  (bench 11, p50 against no candidate; runs vary by several points): SCHED_IDLE for the thread 1.09x; nice 19
  1.13x; SCHED_IDLE for the model run only 1.30x; the candidate on the batcher's thread between batches 1.63x.
- **Figures.** Per version: requests, errors, latency (a histogram of geometric buckets, 10 % wide, so the
  workers' records can be summed); shadow comparisons; accuracy on predictions that later got feedback. Each
  worker writes its figures to `trials/ID/WORKER.json` every heartbeat; `GET /candidate` sums them.
- **Guard.** Optional, per trial: clear a canary when the candidate's error rate is over `max_error_rate`, or its
  feedback accuracy is under the promoted version's by more than `max_accuracy_drop` with at least
  `min_labelled` labelled predictions of each. The clearing is a pointer write recorded in the history.
"""
from __future__ import annotations

import contextvars
import hashlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from core import candidate as cand
from core.store import Store, StoreError

log = logging.getLogger("refit.trial")

CLIENT_HEADER = b"x-refit-client"
client_key: contextvars.ContextVar[str] = contextvars.ContextVar("refit_client", default="")
SHADOW_QUEUE = 64  # sampled requests waiting for the candidate; beyond this a sample is dropped
BUCKET_BASE, BUCKET_GROWTH, BUCKETS = 0.0005, 1.1, 140  # 0.5 ms .. about 300 s, each bucket 10 % wide
FLIPS_SHOWN = 10


class ClientKey:
    """ASGI middleware: the canary's client key for this request (the header, else the peer's address)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(CLIENT_HEADER)
            peer = scope.get("client") or ("", 0)
            client_key.set(sent.decode("latin-1")[:200] if sent else f"addr:{peer[0]}")
        await self.app(scope, receive, send)


@dataclass
class Trial:
    id: str
    version: str
    mode: str
    percent: float
    set_at: str
    changed_at: str
    guard: dict | None
    model: object  # service.model.Loaded of the candidate
    state: dict = field(default_factory=dict)  # the candidate as the store holds it

    def answers(self, client: str) -> bool:
        """Whether the candidate answers this client (canary): a stable draw per trial and client."""
        h = int.from_bytes(hashlib.sha256(f"{self.id}|{client}".encode()).digest()[:8], "big")
        return (h % 10_000) < self.percent * 100

    def samples(self, draw: float) -> bool:
        return draw * 100 < self.percent


def bucket(seconds: float) -> int:
    if seconds <= BUCKET_BASE:
        return 0
    return min(BUCKETS - 1, int(math.log(seconds / BUCKET_BASE, BUCKET_GROWTH)) + 1)


def quantile_ms(hist: list, q: float) -> float | None:
    """The upper edge of the bucket holding the q-quantile, in ms (10 % resolution); None with no sample."""
    total = sum(hist)
    if not total:
        return None
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= q * total:
            return round(BUCKET_BASE * BUCKET_GROWTH ** i * 1000, 2)
    return None


_PROM: dict = {}


def prom() -> dict:
    """The trial's Prometheus series, made on first use (after BentoML set up its multiprocess registry)."""
    if not _PROM:
        import prometheus_client as p

        _PROM["requests"] = p.Counter("refit_trial_requests", "Requests answered (or shadowed) during a trial, "
                                      "by version and its role", ["version", "role"])
        _PROM["errors"] = p.Counter("refit_trial_errors", "Failed model runs during a trial", ["version", "role"])
        _PROM["latency"] = p.Histogram("refit_trial_latency_seconds", "Request (or shadow run) time during a "
                                       "trial", ["role"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        _PROM["shadow"] = p.Counter("refit_shadow_samples", "Shadow samples: compared, agreed (same top answer), "
                                    "dropped (queue full) or failed", ["outcome"])
    return _PROM


class Figures:
    """One trial's counts on this worker (thread-safe: the event loop, the shadow thread and feedback add)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.versions: dict[str, dict] = {}
        self.shadow = {"compared": 0, "agree": 0, "abs_delta_sum": 0.0, "dropped": 0, "failed": 0}
        self.flips: dict[str, int] = {}
        self.feedback: dict[str, dict] = {}
        self.dirty = True

    def served(self, version: str, seconds: float, *, error: bool = False, role: str = "promoted") -> None:
        m = prom()
        m["requests"].labels(version, role).inc()
        if error:
            m["errors"].labels(version, role).inc()
        else:
            m["latency"].labels(role).observe(seconds)
        with self.lock:
            f = self.versions.setdefault(version, {"requests": 0, "errors": 0, "latency": [0] * BUCKETS})
            f["requests"] += 1
            f["errors"] += int(error)
            if not error:
                f["latency"][bucket(seconds)] += 1
            self.dirty = True

    def compared(self, promoted: list[str], candidate: list[str], deltas: list[float]) -> None:
        agreed = sum(a == b for a, b in zip(promoted, candidate, strict=True))
        prom()["shadow"].labels("compared").inc(len(promoted))
        prom()["shadow"].labels("agreed").inc(agreed)
        with self.lock:
            s = self.shadow
            s["compared"] += len(promoted)
            s["agree"] += agreed
            s["abs_delta_sum"] += float(sum(deltas))
            for a, b in zip(promoted, candidate, strict=True):
                if a != b:
                    k = f"{_name(a)}\u2192{_name(b)}"
                    self.flips[k] = self.flips.get(k, 0) + 1
            self.dirty = True

    def count(self, what: str) -> None:
        prom()["shadow"].labels(what).inc()
        with self.lock:
            self.shadow[what] += 1
            self.dirty = True

    def labelled(self, version: str, correct: bool) -> None:
        with self.lock:
            f = self.feedback.setdefault(version, {"labelled": 0, "correct": 0})
            f["labelled"] += 1
            f["correct"] += int(correct)
            self.dirty = True

    def snapshot(self) -> dict:
        with self.lock:
            self.dirty = False
            return {"versions": {v: {**f, "latency": list(f["latency"])} for v, f in self.versions.items()},
                    "shadow": dict(self.shadow), "flips": dict(self.flips),
                    "feedback": {v: dict(f) for v, f in self.feedback.items()}}


def report(merged: dict, promoted: str | None, candidate: str) -> dict:
    """The merged figures as `GET /candidate` shows them."""
    versions = {}
    for v, f in merged["versions"].items():
        n = f["requests"]
        versions[v] = {"role": "candidate" if v == candidate else "promoted" if v == promoted else "earlier",
                       "requests": n, "errors": f["errors"], "error_rate": round(f["errors"] / n, 4) if n else None,
                       "p50_ms": quantile_ms(f["latency"], 0.5), "p99_ms": quantile_ms(f["latency"], 0.99)}
    s = merged["shadow"]
    compared = int(s.get("compared", 0))
    flips = sorted(merged["flips"].items(), key=lambda kv: -kv[1])[:FLIPS_SHOWN]
    shadow = {"compared": compared, "dropped": int(s.get("dropped", 0)), "failed": int(s.get("failed", 0)),
              "agreement": round(s.get("agree", 0) / compared, 4) if compared else None,
              "mean_abs_delta": round(s.get("abs_delta_sum", 0.0) / compared, 5) if compared else None,
              "flips": [{"from": k.split("\u2192")[0], "to": k.split("\u2192")[1], "count": n} for k, n in flips]}
    feedback = {v: {**f, "accuracy": round(f["correct"] / f["labelled"], 4) if f["labelled"] else None}
                for v, f in merged["feedback"].items()}
    return {"versions": versions, "shadow": shadow, "feedback": feedback}


class Trials:
    """The trial of one project on this worker: follows the store's candidate, runs shadows, keeps figures."""

    def __init__(self, store: Store, *, open_version: Callable[[str], object], answer: Callable,
                 worker: str, flush_seconds: float):
        self.store, self.open_version, self.answer, self.worker = store, open_version, answer, worker
        self.on: Trial | None = None  # read once per request
        self.figures = Figures()
        self._figures_of = ""  # the trial id the figures are of
        self._queue: queue.Queue = queue.Queue(maxsize=SHADOW_QUEUE)
        self._shadow: threading.Thread | None = None
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_seconds,), name="refit-trial",
                                         daemon=True)
        self._flusher.start()

    # -- following the store ---------------------------------------------------------------------
    def follow(self, state: dict | None) -> None:
        """Take the candidate of a freshly read pointer state: load its version when it is new."""
        c = cand.current(state or {})
        if c is None:
            if self.on is not None:
                log.info("trial of %s ended", self.on.version)
                self._flush()
            self.on = None
            return
        model = self.on.model if self.on is not None and self.on.version == c["version"] else None
        if model is None:
            try:
                model = self.open_version(c["version"])
            except Exception as e:  # noqa: BLE001 - a candidate that does not load here: no trial on this worker
                log.error("candidate %s does not load on this worker: %s", c["version"], e)
                self.on = None
                return
        if c["id"] != self._figures_of:
            self._flush()
            self.figures, self._figures_of = Figures(), c["id"]
        self.on = Trial(c["id"], c["version"], c["mode"], float(c["percent"]), c["set_at"],
                        c.get("changed_at", c["set_at"]), c.get("guard"), model, c)
        log.info("trial: %s as %s at %g %%", c["version"], c["mode"], float(c["percent"]))

    # -- shadow ----------------------------------------------------------------------------------
    def shadow(self, trial: Trial, batch: np.ndarray, probs: np.ndarray, promoted_labels: list[str],
               threshold: float | None, after: Callable[[list[str]], None] | None = None) -> bool:
        """Queue a sampled request for the candidate; False (counted as dropped) when the queue is full, and
        `after` is then called at once with no candidate answers."""
        if self._shadow is None:
            self._shadow = threading.Thread(target=self._shadow_loop, name="refit-shadow", daemon=True)
            self._shadow.start()
        try:
            self._queue.put_nowait((trial, batch, probs, promoted_labels, threshold, after))
            return True
        except queue.Full:
            self.figures.count("dropped")
            if after is not None:
                after([])
            return False

    def _shadow_loop(self) -> None:
        idle_priority()
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            self._run_shadow(*item)

    def _run_shadow(self, trial: Trial, batch, probs, promoted_labels, threshold, after) -> None:
        theirs: list = []
        t0 = time.perf_counter()
        try:
            cp = trial.model.run(batch)
            theirs = [decision(self.answer(trial.model, p, 1, threshold)) for p in cp]
            top = probs.argmax(1)
            deltas = np.abs(cp[np.arange(len(top)), top] - probs[np.arange(len(top)), top]).tolist()
            if trial is self.on:
                self.figures.served(trial.version, time.perf_counter() - t0, role="candidate")
                self.figures.compared(promoted_labels, theirs, deltas)
        except Exception:  # broad on purpose: a failing candidate is a figure, never a reply's problem
            log.exception("shadow run of %s failed", trial.version)
            if trial is self.on:
                self.figures.served(trial.version, time.perf_counter() - t0, error=True, role="candidate")
                self.figures.count("failed")
        if after is not None:
            after(theirs)

    # -- feedback --------------------------------------------------------------------------------
    def feedback(self, record: dict, given) -> None:
        """A captured prediction got its label(s): count, per version that answered it in this trial, whether
        it was right."""
        t = record.get("trial")
        if not isinstance(t, dict) or self.on is None or t.get("id") != self.on.id:
            return
        truth = sorted(given) if isinstance(given, list) else given
        for version, said in (t.get("answers") or {}).items():
            self.figures.labelled(version, (sorted(said) if isinstance(said, list) else said) == truth)

    # -- figures ---------------------------------------------------------------------------------
    def key(self, trial_id: str) -> str:
        return f"{cand.TRIALS}/{trial_id}/{self.worker}.json"

    def _flush(self) -> None:
        if not self._figures_of or not self.figures.dirty:
            return
        try:
            self.store.put_record(self.key(self._figures_of), {"worker": self.worker, "at": time.time(),
                                                               **self.figures.snapshot()})
        except (OSError, StoreError) as e:
            log.warning("trial figures not written: %s", e)

    def merged(self, trial_id: str) -> tuple[dict, int]:
        """Every worker's figures of a trial, summed, and how many workers wrote them (this one's fresh)."""
        if trial_id == self._figures_of:
            self._flush()
        records = [r for r in self.store.records(f"{cand.TRIALS}/{trial_id}/").values() if isinstance(r, dict)]
        return cand.merge(records), len(records)

    def _flush_loop(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self._flush()
            try:
                self._check_guard()
            except Exception:  # broad on purpose: the guard is optional; a failure is logged, serving goes on
                log.exception("trial guard check failed")

    def _check_guard(self) -> None:
        trial = self.on
        if trial is None or not trial.guard or trial.mode != "canary":
            return
        why = guard_breach(trial.guard, report(self.merged(trial.id)[0], None, trial.version), trial.version)
        if why:
            log.warning("guard clears candidate %s: %s", trial.version, why)
            self.store.clear_candidate(actor="guard", reason=why, how="guard", only=trial.id)

    def close(self) -> None:
        self._stop.set()
        self._flush()
        if self._shadow is not None:
            self._queue.put(None)


def guard_breach(guard: dict, figures: dict, candidate: str) -> str | None:
    """Why the guard clears the canary, or None."""
    mine = figures["versions"].get(candidate) or {}
    cap = guard.get("max_error_rate")
    if cap is not None and (mine.get("requests") or 0) >= guard.get("min_requests", 20) \
            and (mine.get("error_rate") or 0) > cap:
        return f"error rate {mine['error_rate']:.3f} over {cap:g} after {mine['requests']} requests"
    drop, need = guard.get("max_accuracy_drop"), guard.get("min_labelled", 20)
    fb = figures["feedback"]
    theirs = fb.get(candidate) or {}
    others = [f for v, f in fb.items() if v != candidate and f["labelled"] >= need]
    if drop is not None and theirs.get("labelled", 0) >= need and others:
        best = max(others, key=lambda f: f["labelled"])
        mine_acc, their_acc = theirs.get("accuracy"), best.get("accuracy")
        if mine_acc is not None and their_acc is not None and their_acc - mine_acc > drop:
            return (f"feedback accuracy {theirs['accuracy']:.3f} ({theirs['labelled']} labelled) under the promoted "
                    f"version's {best['accuracy']:.3f} ({best['labelled']}) by more than {drop:g}")
    return None


def decision(answer: dict):
    """What a reply decided, as feedback compares it: a label, or a multi-label reply's sorted labels."""
    if "labels" in answer:
        return sorted(x["label"] for x in answer["labels"])
    return answer["label"]


def _name(decision) -> str:
    return ";".join(decision) or "(none)" if isinstance(decision, list) else decision


def idle_priority() -> None:
    """This thread at SCHED_IDLE (Linux, per thread): it runs only on a core nothing else wants; nice 19 where
    that is refused, and normal priority where neither is allowed."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            log.warning("the shadow thread could not lower its priority; it competes with replies for the CPU")
