"""Refit's BentoML service: predict with the promoted model, list and promote versions, retrain over HTTP.

    bentoml serve service.service:Refit --port 3000        # or: make serve

One service, `Refit`, with one worker process per core: each worker parses requests, decodes them with the
served model's contract and runs onnxruntime itself, batching concurrent requests in process
(`service/batcher.py`); it also serves the admin routes and admits retrain jobs. Each worker watches the
promoted pointer and swaps versions without a restart.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse as FastJSON
from starlette.responses import JSONResponse, Response

from service import settings, timeouts
from service.admission import admit
from service.batcher import Batcher, Overloaded
from service import console, errors
from service.capture import Captures, new_id as new_capture_id, top_margin
from service.drift import DriftMonitor
from service.guard import Guard
from service.jobs import PACKAGE_ROOT, AdmissionError, Jobs, public
from service.lifeline import bound_shutdown, die_with_supervisor, record_supervisor, trim_heap
from service.model import ModelHolder
from service.queue import QueueRunner, SharedJobs
from service.replicas import StatusBoard, disagreement, replica_id
from service.routes import RouteLabels
from service.runner import LocalRunner, task_result, task_status
from service.schemas import RETRAIN_BODY, ExplainInput, Explanation, FeedbackRequest, PredictBase64Input, \
    PredictInput, Prediction, PromoteInput, Rejected, RollbackInput
from core.store import now_iso

timeouts.install()  # before BentoML builds the app: its request timeout keeps every request for an hour
log = logging.getLogger("refit.service")
# BentoML leaves other loggers at WARNING; version swaps and retrain admissions are worth seeing by default.
logging.getLogger("refit").setLevel(logging.INFO)

def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _packed_model():
    """The version promoted now, declared as the service's model so that `bentoml build` packs it into the
    bento. Declared only when BentoML's model store has it, so a start never fails over it; serving itself
    always follows the promoted pointer, not this declaration."""
    from core.store import Store, StoreError

    try:
        version = Store().promoted()
        return bentoml.models.BentoModel(bentoml.models.get(f"refit:{version}").tag) if version else None
    except (OSError, StoreError, BentoMLException):
        return None


# Tracing config: BentoML's OpenTelemetry middleware skips the URLs that match these patterns.
_UNTRACED = {} if settings.TRACE_PREDICTIONS else {"tracing": {"excluded_urls": ["/predict"]}}


admin = FastAPI(title="Refit admin", docs_url=None, redoc_url=None, openapi_url=None)
admin.add_exception_handler(AdmissionError, lambda request, e: FastJSON(e.body, status_code=e.status))
errors.install(admin)  # validation errors as {"error": ...}, nothing echoed back at length
console.mount(admin)  # the web console at /ui


@bentoml.asgi_app(admin, path="/")
@bentoml.service(name="refit", traffic={"timeout": 3600}, workers=settings.WORKERS, **_UNTRACED)
class Refit:
    """Image classification with versioned transfer-learned models: predict, list/promote/rollback
    versions, and retrain on an uploaded dataset. Retrain, promote and rollback need
    `Authorization: Bearer $REFIT_TOKEN` when the server has a token."""

    packed = _packed_model()

    def __init__(self) -> None:
        import prometheus_client as prom  # here, not at import: the worker has set up multiprocess metrics

        from core.paths import refit_home
        from core.store import Store

        die_with_supervisor()
        bound_shutdown(settings.SHUTDOWN_SECONDS)
        self.store = Store()
        self.replica = replica_id()
        self.board = StatusBoard(self.store)
        Jobs(refit_home()).recover()
        # Retraining: on the job queue's workers when REFIT_QUEUE is set, else in a training process here, when
        # this install has the training code (the serving image has not: it answers retrains with a 503).
        self.trains_here = not settings.QUEUE and importlib.util.find_spec("torch") is not None
        if settings.QUEUE:
            self.jobs = SharedJobs(self.store, settings.QUEUE)
            self.runner = QueueRunner(self.jobs)
        else:
            self.jobs = Jobs(refit_home())
            self.runner = LocalRunner(self.jobs, train_threads=settings.TRAIN_THREADS, on_finish=self._finished)
        # One warm training process per replica, not per worker: it holds about 1 GB. A job admitted by
        # another worker starts a fresh process (about 5 s more).
        if self.trains_here and settings.TRAIN_STANDBY and bentoml.server_context.worker_index in (None, 1):
            self.jobs.start_standby(settings.TRAIN_THREADS)
        self.m_predictions = prom.Counter("refit_predictions", "Images classified, by version and label",
                                          ["version", "label"])
        self.m_batch = prom.Histogram("refit_batch_size", "Images per onnxruntime run (adaptive batching)",
                                      buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, settings.MAX_BATCH_SIZE})))
        self.drift_monitor = DriftMonitor(settings.DRIFT_WINDOW)
        self.holder = ModelHolder(self.store, threads=settings.ORT_THREADS, poll_seconds=settings.POLL_SECONDS,
                                  drift=self.drift_monitor)
        self.batcher = Batcher(max_batch_size=settings.MAX_BATCH_SIZE, max_latency_ms=settings.MAX_LATENCY_MS,
                               on_batch=self.m_batch.observe, on_idle=trim_heap, on_outputs=self.drift_monitor.observe)
        # Decoding releases the GIL: on its own thread it overlaps the event loop's parsing and the model run.
        self.decoder = ThreadPoolExecutor(max_workers=settings.ORT_THREADS, thread_name_prefix="refit-decode")
        # Explanations run on a thread of their own, one at a time per worker, beside the batcher: they never
        # join a /predict batch, and a burst of them holds at most one model run's worth of cores.
        self.explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-explain")
        self.m_capture_dropped = prom.Counter("refit_capture_dropped", "Predicted images not captured because "
                                              "the store fell behind, or one image alone was over the capture "
                                              "budget (the predictions were answered)")
        self.captures = Captures(self.store, max_images=settings.CAPTURE_MAX_IMAGES, days=settings.CAPTURE_DAYS,
                                 max_bytes=settings.CAPTURE_MAX_BYTES, on_drop=self.m_capture_dropped.inc)
        if bentoml.server_context.worker_index in (None, 1):  # one retention timer per replica, capture on or off
            self.captures.start_pruning(settings.CAPTURE_PRUNE_SECONDS)
        self.m_retrains = prom.Counter("refit_retrains", "Retrain jobs finished, by status", ["status"])
        self.m_retrain_seconds = prom.Histogram("refit_retrain_duration_seconds", "Retrain job wall time",
                                                buckets=(10, 30, 60, 120, 300, 600, 1200, 3600, 7200))
        # Everything made so far (BentoML, onnxruntime's bindings, the model) lives as long as the worker: moved
        # out of the garbage collector's sight, a full collection during traffic scans only what requests made,
        # which shortens the pauses that land on a request's latency.
        gc.collect()
        gc.freeze()

    @bentoml.on_deployment
    def prepare() -> None:
        """Once per `bentoml serve`, before workers start: give an empty store its first model, and record
        jobs that a previous run of the server left unfinished as failed. A store that holds versions is
        never given one promoted here: without a usable pointer it serves nothing until someone promotes."""
        from core.paths import refit_home
        from core.store import Store

        home = refit_home()
        record_supervisor()  # the workers started after this hook exit when this process dies
        log.info("replica %s, store %s", replica_id(), Store(home).describe())  # a bad REFIT_REPLICA stops here
        Jobs(home).recover()
        _sweep_datasets(Store(home))
        Store(home).sweep_orphans()  # what publishes cut short left: this machine's staging, the store's claims
        problem = Store(home).pointer_problem()
        if problem:
            log.error("%s; predictions answer 503 until then", problem)
        if not Store(home).versions():
            _seed_from_bento(Store(home))
        if not Store(home).versions():
            log.info("no versions in %s: publishing the pretrained ImageNet model", home)
            # In a child process, so this process (the server's supervisor) never holds torch in memory.
            code = "from training.pipeline import bootstrap_imagenet; bootstrap_imagenet()"
            done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE_ROOT, env={**os.environ})
            if done.returncode != 0:
                log.error("bootstrap failed (exit %s); the service starts without a model until a retrain "
                          "or promote", done.returncode)

    # -- predict ---------------------------------------------------------------------------------
    @bentoml.api(route="/predict", input_spec=PredictInput)
    async def predict(self, images: list, top_k: int, threshold: float) -> list[Prediction]:
        """Classify one or more images uploaded as multipart/form-data in the field `images`."""
        if isinstance(images, Rejected):
            return error(images.status, images.message)
        return await self._classify([(u.name, u.data) for u in images], top_k, threshold)

    @bentoml.api(route="/predict_base64", input_spec=PredictBase64Input)
    async def predict_base64(self, images: list, top_k: int, threshold: float) -> list[Prediction]:
        """The same as /predict for clients that cannot send multipart: JSON with base64-encoded images."""
        if isinstance(images, Rejected):
            return error(images.status, images.message)
        return await self._classify([(u.name, u.data) for u in images], top_k, threshold)

    async def _classify(self, files: list[tuple[str, bytes]], top_k: int, threshold: float):
        if len(files) > settings.MAX_IMAGES:
            return error(400, f"{len(files)} images is over the limit of {settings.MAX_IMAGES} per request")
        refused = _over_budget(files)
        if refused:
            return refused
        model = self.holder.current  # read once: the whole request runs on this version even if a swap happens now
        if model is None:
            return error(503, _unavailable(self.store, self.holder))
        arrays = await asyncio.get_running_loop().run_in_executor(self.decoder, self.holder.decode, model, files)
        bad = [str(a) for a in arrays if not isinstance(a, np.ndarray)]
        if bad:
            return error(400, "; ".join(bad))
        try:
            probs = await self.batcher.run(model, np.stack(arrays))
        except Overloaded as e:
            return error(503, str(e))
        except Exception as e:  # noqa: BLE001 - logged by the batcher; the client is told, not given a bare 500
            return error(503, f"the model failed on this batch ({type(e).__name__}); try again")
        replies = []
        for (name, data), p in zip(files, probs, strict=True):
            r = ModelHolder.answer(model, p, top_k, threshold)
            self.m_predictions.labels(version=r["version"], label=r["label"]).inc()
            r["prediction_id"] = new_capture_id()
            if settings.CAPTURE and not self.captures.keep(r["prediction_id"], name, data, {**r, "margin": top_margin(p)},
                                                           contract=model.contract):
                self.m_capture_dropped.inc()
            replies.append(Prediction(**r))
        return replies

    # -- explain ---------------------------------------------------------------------------------
    @bentoml.api(route="/explain", input_spec=ExplainInput)
    async def explain(self, image, label: str | None, top_k: int, threshold: float) -> Explanation:
        """Classify one image (multipart field `image`) and show why: a class activation map for `label`
        (default: the top class) as a PNG overlay and as a small array. 409 for a version exported without
        the feature map, 422 for a label that is not one of its classes."""
        from service.explain import NotExplainable, UnknownLabel, explain_upload
        from core.preprocess import ImageError

        if isinstance(image, Rejected):
            return error(image.status, image.message)
        refused = _over_budget([(image.name, image.data)])
        if refused:
            return refused
        model = self.holder.current  # read once, as /predict does
        if model is None:
            return error(503, _unavailable(self.store, self.holder))
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self.explainer, explain_upload, model, image.name, image.data, label, settings.MAX_IMAGE_PIXELS)
        except NotExplainable as e:
            return error(409, str(e), version=model.version)
        except UnknownLabel as e:
            return error(422, str(e), version=model.version, classes=list(e.classes))
        except ImageError as e:
            msg = str(e)
            return error(400, msg if msg.startswith(image.name) else f"{image.name}: {msg}")
        except Exception as e:  # noqa: BLE001 - the client is told, not given a bare 500
            log.exception("explain failed on %s", model.version)
            return error(503, f"the model failed on this image ({type(e).__name__}); try again")
        answer = ModelHolder.answer(model, found.pop("probs"), top_k, threshold)
        found["overlay_png"] = base64.b64encode(found["overlay_png"]).decode("ascii")
        return Explanation(**answer, **found)

    # -- versions --------------------------------------------------------------------------------
    @admin.get("/versions")
    def versions(self) -> dict[str, Any]:
        """Every version (id, created, strategy, metrics), which one is promoted, and what each model
        worker of every live replica serves, with the reason when a worker refused a version. `replica` is
        the replica that answered. `problem` says why nothing is promoted when the pointer is damaged or
        missing (promote a version to repair it), or that the store cannot be read; `disagreement` what the
        live workers disagree on (service/replicas.py), null when they all serve one model."""
        from core.store import StoreError

        try:
            infos = self.store.list_info()
        except StoreError as e:  # S3 unreachable, or the bucket gone: the same shape, with the cause
            log.error("cannot list the versions in the store: %s", e)
            return {"promoted": None, "problem": f"the store cannot be read: {e}", "versions": [],
                    "replica": self.replica, "serving": [], "refused": [], "disagreement": None}
        try:
            promoted = self.store.promoted()
        except StoreError:
            promoted = None
        rows = [_version_row(i) for i in infos]
        try:
            workers, refused = self.board.live(), self.board.refusals()
        except StoreError as e:  # the store is unreachable: `problem` says so too
            log.error("cannot read the replicas' status from the store: %s", e)
            workers, refused = [], []
        refusals = [w["error"] for w in workers if w.get("error")] + refused
        recorded = {i["version"]: i.get("serving_sha256") for i in infos}
        return {"promoted": promoted, "problem": self.store.pointer_problem(), "versions": rows,
                "replica": self.replica, "serving": workers, "refused": refusals,
                "disagreement": disagreement(workers, recorded)}

    @admin.get("/versions/{version}")
    def version_detail(self, version: str, request: Request):
        """One version: what /versions lists for it, plus its label problems (likely mislabeled images with
        their given and suggested labels) and the near-duplicates found across its train and validation sets.
        The images' paths of both lists are given with the token only (when the server has one); without
        it, their counts."""
        from service.guard import authorized
        from core.store import StoreError

        try:
            info = self.store.info(version)
        except StoreError as e:
            return FastJSON({"error": str(e)}, status_code=404)
        try:
            info["promoted"] = info["version"] == self.store.promoted()
        except StoreError:
            info["promoted"] = False
        metrics = info.get("metrics") or {}
        none = {"available": False, "reason": "not recorded for this version (published before these checks)"}
        # Per-class figures and the confusion matrix as numbers, for pages that draw their own table; the
        # figures training drew are at /versions/{id}/files/{name}.
        detail = {k: metrics[k] for k in ("per_class", "confusion_matrix", "int8", "parity") if k in metrics}
        return {**_version_row(info), **detail, "precision": info.get("precision"),
                "files": [n for n in console.VERSION_FILES if self.store.version_file(version, n) is not None],
                **_image_lists({"label_problems": metrics.get("label_problems", none),
                                "near_duplicates": metrics.get("near_duplicates", none)}, authorized(request.scope))}

    @admin.get("/versions/{version}/files/{name}")
    def version_file(self, version: str, name: str):
        """A figure of a version that training wrote: `confusion_matrix.png` or `results.csv` (one row per
        epoch, for the curves). 404 for an unknown version, a file this version lacks, or another name."""
        from core.store import StoreError

        if name not in console.VERSION_FILES:
            return error(404, f"no file {name[:100]!r} is served; files: {', '.join(console.VERSION_FILES)}")
        try:
            data = self.store.version_file(version, name)
        except StoreError as e:
            return error(404, str(e))
        if data is None:
            return error(404, f"{version} has no {name} (it was not trained here, or predates it)")
        return Response(data, media_type=console.VERSION_FILES[name],
                        headers={"cache-control": "max-age=86400, immutable"})  # versions never change

    @admin.get("/drift")
    def drift_report(self) -> dict[str, Any]:
        """Drift per served version: how far recent inputs lie from the training images (embedding score)
        and how the predicted labels differ from the validation labels (total variation), over the pooled
        windows of this replica's workers, with the thresholds and whether drift is flagged."""
        return {"replica": self.replica, **self._drift()}

    def _drift(self) -> dict:
        from service.drift import pool, report
        from core.drift import FILE, load_reference
        from core.store import StoreError

        try:
            others = [w for w in self.board.live(self.replica) if w.get("pid") != os.getpid()]
        except StoreError as e:
            log.error("cannot read the other workers' drift windows: %s", e)
            others = []
        pooled = pool([self.drift_monitor.summary()] + [w.get("drift") for w in others])
        current = self.holder.current
        served = [current.version] if current else []
        versions = list(dict.fromkeys(served + [w.get("version") for w in others if w.get("version")] + list(pooled)))
        out = []
        for v in versions:
            ref, why = self.drift_monitor.references.get(v), None
            if current is not None and v == current.version:
                ref, why = current.drift, current.drift_note
            elif ref is None:
                try:
                    ref = load_reference(self.store.path(v) / FILE)
                except (OSError, StoreError, ValueError) as e:
                    why = f"not available for this version: {e}"
            out.append(report(v, ref, pooled.get(v), settings.DRIFT_WINDOW, why))
        return {"window_per_worker": settings.DRIFT_WINDOW, "versions": out}

    @bentoml.api(route="/promote", input_spec=PromoteInput)
    def promote(self, version: str, reason: str) -> dict[str, Any]:
        """Serve `version`: its checksum and loadability are checked first; every worker follows within
        seconds. Over a damaged pointer this repairs it (the damaged file is kept aside; see `repaired`)."""
        from core.store import StoreError

        if isinstance(version, Rejected):
            return error(version.status, version.message)
        if version not in self.store.versions():
            return error(404, f"unknown version {errors.clip(version)}; known: "
                              f"{', '.join(self.store.versions()) or 'none'}")
        try:
            event = self.store.promote(version, actor="api", reason=reason)
        except StoreError as e:
            log.error("promotion of %s refused: %s", version, e)
            try:
                self.board.record_refusal(version, str(e), self.replica)
            except StoreError as why:
                log.error("cannot record the refusal in the store: %s", why)
            return error(409, f"refused: {e}")
        repaired = event.pop("repaired", None)
        if repaired:
            log.warning("promoted pointer repaired by promote %s: %s", version, repaired["reason"])
        return {"promoted": event["version"], "previous": event["previous"], "event": event, "repaired": repaired}

    @bentoml.api(route="/rollback", input_spec=RollbackInput)
    def rollback(self, reason: str) -> dict[str, Any]:
        """Go back one step along the promotion history (v4 -> v3 -> v2 ...); 409 when there is nothing
        earlier or the pointer is damaged."""
        from core.store import StoreError

        if isinstance(reason, Rejected):
            return error(reason.status, reason.message)
        try:
            event = self.store.rollback(actor="api", reason=reason)
        except StoreError as e:
            return error(409, f"refused: {e}")
        return {"promoted": event["version"], "previous": event["previous"], "event": event}

    # -- retrain ---------------------------------------------------------------------------------
    @admin.post("/retrain/submit", openapi_extra=RETRAIN_BODY)
    async def retrain_submit(self, request: Request) -> dict[str, str]:
        """Train a new version on the dataset and publish it, in the background: answers at once with a
        `task_id` (409 while another retrain runs); follow it with /retrain/status and /retrain/get."""
        self._can_retrain()
        job = await admit(request, self.jobs, self.store)
        await asyncio.to_thread(self.runner.submit, job["id"]) if settings.QUEUE else self.runner.submit(job["id"])
        return {"task_id": job["id"], "status": "in_progress"}

    @admin.post("/retrain", openapi_extra=RETRAIN_BODY)
    async def retrain(self, request: Request) -> dict[str, Any]:
        """The same as /retrain/submit, answered when the job ends, with what /retrain/get gives; a client
        that hangs up before then stops the job."""
        self._can_retrain()
        job = await admit(request, self.jobs, self.store)
        job = await _unless_hung_up(request, self.runner.run(job["id"]))
        if job is None:
            return error(499, "the client closed the request; the job was stopped")
        status, body = task_result(job)
        return FastJSON(body, status_code=status)

    @admin.get("/retrain/status")
    def retrain_status(self, task_id: str = Query("", description="The id /retrain/submit answered with.")):
        """`in_progress` (queued or training), `completed` or `failed` (see /retrain/get for why), with the
        job's id and times, and while it trains its `progress` (see GET /jobs/{id}); tasks outlive restarts
        (a job cut short by one is `failed`)."""
        job = self._task(task_id)
        return task_status(job) if isinstance(job, dict) else job

    @admin.get("/retrain/get")
    def retrain_get(self, task_id: str = Query("", description="The id /retrain/submit answered with.")):
        """The result of a completed task: `job_id`, `version`, `metrics`, `promoted`, `promotion`, ...; a
        failed task answers with its error and status code (422 a dataset problem, 500 a training failure);
        400 while it runs."""
        job = self._task(task_id)
        if not isinstance(job, dict):
            return job
        status, body = task_result(job)
        return FastJSON(body, status_code=status)

    def _task(self, task_id: str) -> dict | JSONResponse:
        """The job of a task id, or the error reply. A task id is its job's id; records made when BentoML
        gave task ids keep them in `task_id`."""
        if not task_id:
            return error(400, "task_id is required (the id /retrain/submit answered with)")
        try:
            return self.runner.get(task_id)
        except KeyError:
            job = next((j for j in self.jobs.list(limit=100_000) if j.get("task_id") == task_id), None)
        shown = task_id if len(task_id) <= 100 else task_id[:100] + "..."
        return job or error(404, f"unknown task_id {shown!r}")

    def _can_retrain(self) -> None:
        if not settings.QUEUE and not self.trains_here:
            raise AdmissionError(503, "this server cannot train: its install has no training code (torch); "
                                      "run `refit worker` on a machine that has it and set REFIT_QUEUE here")

    def _finished(self, job: dict) -> None:
        self.m_retrains.labels(status=job["status"]).inc()
        if job.get("seconds") is not None:
            self.m_retrain_seconds.observe(job["seconds"])

    @admin.get("/jobs")
    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """Retrain jobs, newest first; their state survives restarts (an interrupted job shows as failed)."""
        return [public(j) for j in self.jobs.list(limit=max(1, min(limit, 500)))]

    @admin.get("/jobs/{job_id}")
    def get_job(self, job_id: str):
        """One retrain job: status, request, times, result or error, and `progress`: where its training run
        is, {phase, epoch, epochs, best_val_acc, eta_seconds, elapsed_seconds, message} (phases: preparing,
        features, head, partial/full/scratch, finishing, done)."""
        try:
            return public(self.jobs.get(job_id))
        except KeyError:
            return FastJSON({"error": f"no job {errors.clip(job_id)}"}, status_code=404)

    # -- feedback and what to label next ---------------------------------------------------------
    @admin.post("/feedback")
    def feedback(self, body: FeedbackRequest):
        """Confirm or correct a prediction: its image (kept while the server captures, REFIT_CAPTURE=1) joins a
        dataset with this label, as a new snapshot. 404 for an unknown or expired prediction_id."""
        record = self.captures.get(body.prediction_id)
        data = self.captures.image(body.prediction_id) if record else None
        if data is None:
            why = (f"captures are kept {settings.CAPTURE_DAYS:g} days, the newest {settings.CAPTURE_MAX_IMAGES}"
                   if settings.CAPTURE else "this server does not capture predictions (REFIT_CAPTURE=1 turns it on)")
            return error(404, f"unknown or expired prediction_id {body.prediction_id[:64]!r}; {why}")
        name = body.dataset or _trained_on(self.store, record["version"])
        if not name:
            return error(400, f"name the dataset to add this image to: {record['version']}, which answered, was "
                              "not trained on a dataset of the store")
        known = _classes(self.store, name, body.create)
        if isinstance(known, JSONResponse):
            return known  # no such dataset (and no "create"), a name that is not allowed, or the store is down
        # The label is NFC (FeedbackRequest); a class stored before that rule may be spelt otherwise (NFD).
        label = body.label if not known or body.label in known else next(
            (k for k in known if unicodedata.normalize("NFC", k) == body.label), None)
        if label is None:
            return error(422, f"label {body.label!r} is not a class of dataset {name!r}: {', '.join(known)}")

        def add(datasets):
            added = datasets.add(name, [(record["name"], data, label)], source="feedback",
                                 **settings.IMAGE_LIMITS)
            if added["refused"]:
                return error(422, added["refused"][0]["error"])
            entry = next(e for e in datasets.manifest(name)["entries"] if e["sha256"] == record["sha256"])
            if entry["label"] != label:  # already in the dataset under another label: this corrects it
                return {**added, "snapshot": datasets.relabel(name, record["sha256"], label)["snapshot"],
                        "relabelled": True}
            return {**added, "relabelled": False}

        added = _on_datasets(self.store, add)
        if not isinstance(added, dict):
            return added
        snapshot, relabelled = added["snapshot"], added["relabelled"]
        given = {"label": label, "dataset": name, "snapshot": snapshot, "at": now_iso()}
        self.captures.mark(body.prediction_id, given)
        return {"prediction_id": body.prediction_id, "predicted": record["label"], "version": record["version"],
                "added": bool(added["added"]), "relabelled": relabelled, **given}

    @admin.get("/datasets/{name}/suggest")
    def suggest(self, name: str, n: int = Query(20, ge=1, le=500, description="How many images to suggest.")):
        """Captured images worth labelling next for dataset `name`, most useful first: those the served model
        is least sure of (smallest margin between its top two scores), not yet in the dataset and without
        feedback. Label one with POST /feedback."""
        manifest = _on_datasets(self.store, lambda d: d.manifest(name))
        if not isinstance(manifest, dict):
            return manifest  # the error reply: no such dataset, or the store cannot be read
        model = self.holder.current
        if model is None:
            return error(503, _unavailable(self.store, self.holder))
        have = {e["sha256"] for e in manifest["entries"]}
        pool, seen = [], set()
        for r in self.captures.recent(settings.SUGGEST_POOL):
            if r.get("feedback") or r["sha256"] in have or r["sha256"] in seen:
                continue
            seen.add(r["sha256"])
            pool.append(r)
        # Captures answered by another version are scored again by the one served now: "least sure" is the
        # current model's doubt, not that of a model already replaced.
        stale = [r for r in pool if r["version"] != model.version]
        for r in stale:
            data = self.captures.image(r["id"])
            arrays = self.holder.decode(model, [(r["name"], data)]) if data else [None]
            if not isinstance(arrays[0], np.ndarray):
                r["margin"] = None
                continue
            p = model.run(arrays[0][None])[0]
            r.update(ModelHolder.answer(model, p, 5, 0.0), margin=top_margin(p))
        ranked = sorted((r for r in pool if r["margin"] is not None), key=lambda r: r["margin"])[:n]
        return {"dataset": name, "version": model.version, "ranked_by": "margin between the top two scores, "
                "smallest first", "candidates": len(pool),
                "suggestions": [{"prediction_id": r["id"], "predicted": r["label"], "score": r["score"],
                                 "margin": round(r["margin"], 4), "top_k": r["top_k"], "name": r["name"],
                                 "captured_at": r["at"], "image": f"/captures/{r['id']}/image"} for r in ranked]}

    @admin.get("/captures/{capture_id}/image")
    def capture_image(self, capture_id: str):
        """The image a prediction was made on, while it is captured (for a labelling page)."""
        data = self.captures.image(capture_id) if self.captures.get(capture_id) else None
        if data is None:
            return error(404, f"no captured image {capture_id[:64]!r}")
        return Response(data, media_type=_media_type(data))

    # -- datasets --------------------------------------------------------------------------------
    # Named datasets in the store (core/datasets.py): images added over HTTP, each change a new immutable
    # snapshot; a retrain names one with `dataset` (and `snapshot`). Reads are open, changes need the token.
    @admin.get("/datasets")
    def datasets_list(self) -> list[dict[str, Any]]:
        """Every dataset with its newest snapshot, number of images and of classes."""
        return _on_datasets(self.store, lambda d: d.list())

    @admin.get("/datasets/{name}")
    def dataset_show(self, name: str):
        """One dataset: classes with their counts in the newest snapshot, and its snapshots, newest first."""
        return _on_datasets(self.store, lambda d: d.show(name))

    @admin.get("/datasets/{name}/snapshots/{snapshot}")
    def dataset_snapshot(self, name: str, snapshot: str):
        """One snapshot's manifest: every image's sha256, label, split hint, source and when it was added."""
        return _on_datasets(self.store, lambda d: d.manifest(name, snapshot))

    @admin.post("/datasets/{name}/images")
    async def dataset_add(self, name: str, request: Request):
        """Add images: multipart files in `images` with their class in `label`, or a .zip of class folders
        (optionally under train/ and val/) in `zip`. Answers the new snapshot and what was added, skipped
        (already in the dataset) or refused (not an image, corrupt, over a limit), each by file name."""
        parsed = await _dataset_form(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        form, files, label, archive = parsed

        def add(d):  # reads one upload at a time from the form's spooled files: memory holds one image
            if archive is not None:
                archive.file.seek(0)
                return d.add_zip(name, archive.file, source="zip", **settings.IMAGE_LIMITS)
            images = ((f.filename or f"images[{i}]", _read(f.file), label) for i, f in enumerate(files))
            return d.add(name, images, source="upload", **settings.IMAGE_LIMITS)

        try:
            reply = await asyncio.to_thread(_on_datasets, self.store, add)
        finally:
            await form.close()
        if isinstance(reply, dict) and reply["refused"] and not (reply["added"] or reply["skipped"]):
            names = ", ".join(f"{r['name']} ({r['error']})" for r in reply["refused"][:5])
            return error(422, f"nothing added to {name!r}: every file was refused: {names}", **reply)
        return reply

    @admin.post("/datasets/{name}/images/{sha256}")
    async def dataset_relabel(self, name: str, sha256: str, request: Request):
        """Give one image a new label (JSON `{"label": "bees"}`): a new snapshot; the old one stays."""
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as e:
            return error(400, f'body is not valid JSON: {e}; send {{"label": "NEW LABEL"}}')
        if not isinstance(body, dict) or set(body) != {"label"}:
            return error(400, 'send {"label": "NEW LABEL"} (exactly that one field)')
        return await asyncio.to_thread(_on_datasets, self.store, lambda d: d.relabel(name, sha256, body["label"]))

    @admin.get("/datasets/{name}/images/{sha256}")
    def dataset_image(self, name: str, sha256: str):
        """One image of a dataset's newest snapshot (its bytes, for thumbnails). Token."""
        from core.datasets import blob_key

        def read(d):
            if not any(e["sha256"] == sha256 for e in d.manifest(name)["entries"]):
                return error(404, f"no image {sha256[:64]!r} in the newest snapshot of {name!r}")
            return self.store.read_bytes(blob_key(sha256))

        data = _on_datasets(self.store, read)
        if isinstance(data, bytes):
            return Response(data, media_type=_media_type(data), headers={"cache-control": "private, max-age=3600"})
        return data if data is not None else error(404, f"the bytes of image {sha256[:64]!r} are missing")

    @admin.delete("/datasets/{name}/images/{sha256}")
    def dataset_remove(self, name: str, sha256: str):
        """Remove one image: a new snapshot without it; the old one (and the image's bytes) stay."""
        return _on_datasets(self.store, lambda d: d.remove(name, sha256))

    # -- health and metrics ----------------------------------------------------------------------
    def __is_ready__(self) -> bool:
        """Ready while this worker serves a version. A damaged pointer does not make a serving worker unready;
        a worker with nothing to serve is."""
        return self.holder.current is not None

    @bentoml.on_shutdown
    async def close(self) -> None:
        self.batcher.close()
        self.holder.close()
        await self.runner.drain()  # as an open request would be: until done, or the worker's time is up
        if isinstance(self.jobs, Jobs):
            self.jobs.stop_standby()

    def __metrics__(self, content: str) -> str:
        from core.store import StoreError

        lines = ["# HELP refit_promoted_version_info The promoted version.",
                 "# TYPE refit_promoted_version_info gauge"]
        try:
            promoted = self.store.promoted()
        except StoreError:  # damaged pointer: shown by refit_promoted_pointer_ok and /versions
            promoted = None
        if promoted:
            lines.append(f'refit_promoted_version_info{{version="{promoted}"}} 1')
        lines += ["# HELP refit_worker_version_info The version each model worker of this replica serves.",
                  "# TYPE refit_worker_version_info gauge"]
        try:
            workers = self.board.live(self.replica)
        except StoreError:
            workers = []  # /versions names the store's problem
        for w in workers:
            lines.append(f'refit_worker_version_info{{replica="{self.replica}",pid="{w["pid"]}",'
                         f'version="{w.get("version")}"}} 1')
        lines += ["# HELP refit_promoted_pointer_ok 1 when a version is promoted or the store is empty; 0 when "
                  "the pointer is damaged or missing beside versions (see GET /versions).",
                  "# TYPE refit_promoted_pointer_ok gauge",
                  f"refit_promoted_pointer_ok {0 if self.store.pointer_problem() else 1}"]
        lines += ["# HELP refit_drift_score Drift of recent inputs against the training data, per version: "
                  "signal=embedding (distance ratio, about 1 without drift) and signal=labels (total variation of "
                  "predicted labels against validation); see GET /drift for the thresholds.",
                  "# TYPE refit_drift_score gauge",
                  "# HELP refit_drift_flagged 1 when a version's drift score is over its threshold.",
                  "# TYPE refit_drift_flagged gauge"]
        for d in self._drift()["versions"]:
            if d["available"] and d["window_fill"]:
                v = d["version"]
                lines += [f'refit_drift_score{{version="{v}",signal="embedding"}} {d["embedding"]["score"]}',
                          f'refit_drift_score{{version="{v}",signal="labels"}} {d["labels"]["score"]}',
                          f'refit_drift_flagged{{version="{v}"}} {int(d["flagged"])}']
        return content + "\n".join(lines) + "\n"


# RouteLabels first: it gives the real path back to the middleware after it (service/routes.py).
Refit.add_asgi_middleware(RouteLabels)
Refit.add_asgi_middleware(Guard)
Refit.add_asgi_middleware(console.ConsoleLink)

# BentoML works out a reply's media type from its output's JSON schema, which it builds again on every
# call: a fifth of the front's CPU under load (py-spy). These replies are always JSON; say so once.
for _service in (Refit,):
    for _api in _service.apis.values():
        if _api.output_spec.mime_type() == "application/json":
            _api.output_spec.media_type = "application/json"


def _over_budget(files: list[tuple[str, bytes]]) -> JSONResponse | None:
    """The request's decode cost, from the images' headers (microseconds each), against its budget; an error
    reply naming the image(s) and the limit, or None. Checked here so that the model workers, which every
    client shares, never start on a request they would spend seconds of CPU on."""
    from core.preprocess import ImageError, decode_cost

    budget = settings.MAX_REQUEST_MEGAPIXELS
    costs = []
    for name, data in files:
        try:
            costs.append((decode_cost(data, name, max_pixels=settings.MAX_IMAGE_PIXELS), name))
        except ImageError as e:
            return error(400, str(e))
    how = "(counted as PNG megapixels: a baseline JPEG counts a quarter, a row narrower than 8 pixels as 8)"
    for cost, name in costs:
        if cost > budget:
            return error(400, f"{name}: decoding it costs {cost:.1f} megapixels, over the limit of {budget:g} "
                              f"megapixels per request {how}; send a smaller image")
    total = sum(c for c, _ in costs)
    if total > budget:
        costliest = ", ".join(f"{n} {c:.1f}" for c, n in sorted(costs, key=lambda t: -t[0])[:3])
        return error(413, f"these {len(costs)} images cost {total:.1f} megapixels to decode, over the limit of "
                          f"{budget:g} megapixels per request {how}; costliest: {costliest}. "
                          "Send them in several requests, or smaller")
    return None


def _seed_from_bento(store) -> None:
    """In a container whose store volume is still empty, start from the version packed into the bento."""
    from core.store import StoreError

    bento = Refit.bento
    if bento is None or store.versions():
        return
    for info in bento.info.all_models:
        src = Path(bento.path) / "models" / info.tag.name / info.tag.version
        if info.tag.name == "refit" and (src / "model.yaml").is_file():
            try:
                version = store.add_entry(src)
            except StoreError as e:
                # Replicas started together on an empty shared store: one claims the version, the others wait
                # for it to appear instead of failing their start.
                log.info("another replica is seeding the store (%s); waiting for it", e)
                deadline = time.monotonic() + 300
                while not store.versions() and time.monotonic() < deadline:
                    time.sleep(1)
                return
            store.promote(version, actor="bootstrap", reason="packed in the bento")
            log.info("seeded %s from the bento", info.tag.version)
            return


async def _unless_hung_up(request: Request, work):
    """Await `work`, or cancel it when the client disconnects first (Starlette would let it run on); None
    then. The request's body has been read, so the next message the server sends is the disconnect."""
    work = asyncio.ensure_future(work)

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(hung_up())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # also when this request itself is cancelled
    if work not in done:
        await asyncio.wait({work})  # the job records its cancellation
        return None
    return work.result()


def _version_row(info: dict) -> dict:
    metrics = info.get("metrics") or {}
    summary = {k: metrics[k] for k in ("val_accuracy", "train_accuracy", "macro_f1", "val_loss", "train_val_gap",
                                       "train_seconds") if k in metrics}
    for k in ("label_problems", "near_duplicates"):  # the counts; GET /versions/{id} lists them
        if isinstance(metrics.get(k), dict) and "count" in metrics[k]:
            summary[k] = metrics[k]["count"]
    if "val_accuracy" not in summary and info.get("val_accuracy") is not None:
        summary["val_accuracy"] = info["val_accuracy"]
    row = {"id": info["version"], "created": info.get("created"), "strategy": info.get("strategy"),
           "backbone": info.get("backbone"), "classes": info.get("classes"), "num_classes": info.get("num_classes"),
           "metrics": summary, "promoted": info.get("promoted", False), "promotion": info.get("promotion"),
           "parent": info.get("parent"), "note": info.get("note"), "lineage": info.get("lineage")}
    if info.get("error"):
        row["error"] = info["error"]
    return row


def _sweep_datasets(store) -> None:
    """What killed dataset adds left (temp folders, half-written files, images no snapshot names), once per
    start; a problem here is logged, never a reason not to serve. Images only on a folder store: on S3 finding
    them reads every snapshot of every dataset (one GET each), which would hold the replica's start."""
    from core.dataset_sweep import sweep

    try:
        sweep(store, blobs=not store.remote)
        if store.remote:
            log.info("dataset sweep at start: temp files only; images no snapshot names are removed from S3 by "
                     "`refit dataset sweep`")
    except Exception:  # noqa: BLE001 - the sweep is housekeeping
        log.exception("the dataset sweep at start failed; nothing else is affected")


def _image_lists(lists: dict, authorized: bool) -> dict:
    """A version's label problems and near-duplicates name dataset images by path (upload file names, often
    personal): without the token their items are left out and `items_hidden` says so; counts stay."""
    if authorized:
        return lists
    return {k: ({**v, "items": [], "items_hidden": "the images' paths are listed with the token only"}
                if isinstance(v, dict) and "items" in v else v) for k, v in lists.items()}


def _on_datasets(store, call):
    """`call(Datasets(store))`, its errors as replies: 404 for an unknown dataset, snapshot or image, 400 for
    a bad name, label or archive, 503 when the store cannot be reached."""
    from core.data import DatasetError
    from core.datasets import Datasets, UnknownDataset
    from core.store import StoreError

    try:
        return call(Datasets(store))
    except UnknownDataset as e:
        return error(404, str(e))
    except DatasetError as e:
        return error(400, str(e))
    except StoreError as e:
        log.error("datasets: %s", e)
        return error(503, f"the store cannot be used right now: {e}")


def _read(f) -> bytes:
    f.seek(0)
    return f.read()


async def _dataset_form(request: Request):
    """(the form, image uploads, label, the zip upload or None) from POST /datasets/{name}/images, or an error
    reply. The caller closes the form once it has read the uploads."""
    from service.schemas import BodyTooLarge

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return error(415, "send multipart/form-data: image files in `images` with their class in `label`, or a "
                          ".zip of class folders in `zip`")
    try:
        form = await request.form(max_files=settings.MAX_DATASET_FILES + 1, max_fields=10)
    except BodyTooLarge:
        return error(413, f"request body is over the limit of {settings.MAX_DATASET_MB:g} MB")
    except Exception as e:  # noqa: BLE001 - starlette raises several types for a broken form
        detail = str(getattr(e, "detail", e))
        if "too many files" in detail.lower():
            return error(400, f"too many files: the limit is {settings.MAX_DATASET_FILES} per request; send a "
                              ".zip in `zip`, or several requests")
        return error(400, f"malformed multipart form: {detail}")
    problem = _form_problem(form)
    if problem:
        await form.close()
        return problem
    files, zips, label = form.getlist("images"), form.getlist("zip"), form.get("label")
    return form, files, label, (zips[0] if zips else None)


def _form_problem(form) -> JSONResponse | None:
    """What is wrong with the fields of an add-images form, as the error reply, or None."""
    unknown = sorted(set(form.keys()) - {"images", "label", "zip"})
    if unknown:
        return error(400, f"unknown form field(s) {unknown}; expected images with label, or zip")
    files, zips, label = form.getlist("images"), form.getlist("zip"), form.get("label")
    if bool(files) == bool(zips) or len(zips) > 1:
        return error(400, "send image files in `images` (with `label`), or one .zip in `zip`; not both")
    if any(isinstance(f, str) for f in files + zips):
        return error(400, "`images` and `zip` take file uploads, not text values")
    if zips and label is not None:
        return error(400, "a .zip holds one folder per class, which names the labels; leave `label` out")
    if files and (not isinstance(label, str) or not label.strip()):
        return error(400, "`label` is required with `images`: the class of the images, e.g. label=bees")
    if files:
        from core.labels import label_problem

        problem, _ = label_problem(label)
        if problem:  # the same rule as every other way in (zip folders, relabel, feedback, the CLI)
            return error(400, problem)
    return None


def _unavailable(store, holder: ModelHolder) -> str:
    """Why a predict gets a 503: the store's problem when it has one (nothing promoted, a damaged pointer),
    else the version this worker refused."""
    problem = store.pointer_problem()
    if problem:
        return f"no model to answer with: {problem}"
    reason = f" ({holder.error['reason']})" if holder.error else ""
    return f"no model is loaded yet{reason}"


def _trained_on(store, version: str) -> str | None:
    """The dataset a version was trained on (its lineage), if it was trained on one of the store's."""
    try:
        info = store.info(version)
    except Exception:  # noqa: BLE001 - a version removed or unreadable: no lineage to follow
        return None
    return (info.get("lineage") or {}).get("dataset")


def _classes(store, name: str, create: bool) -> list[str] | JSONResponse:
    """The dataset's classes ([] for a dataset `create` is to start), or the error reply: 404 for a dataset
    that does not exist (a misspelt name would otherwise start a new dataset with whatever label it got), 400
    for a name that is not allowed, 503 when the store cannot be read."""
    from core.datasets import UnknownDataset

    def classes(datasets):
        try:
            return list(datasets.show(name)["classes"])
        except UnknownDataset as e:
            if create:
                return []
            raise UnknownDataset(f'{e}; send "create": true to start dataset {name!r} with this image') from None

    return _on_datasets(store, classes)


def _media_type(data: bytes) -> str:
    for magic, kind in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"
