"""Refit's BentoML service: predict with the promoted model, list and promote versions, retrain over HTTP.

    bentoml serve service.service:Refit --port 3000        # or: make serve

One service, `Refit`, with one worker process per core: each worker parses requests, decodes them with the
served model's contract and runs onnxruntime itself, batching concurrent requests in process
(`service/batcher.py`); it also serves the admin routes (service/routers/, one per resource, mounted by
service/api.py) and admits retrain jobs. Each worker watches the promoted pointer and swaps versions without
a restart. This class holds the wiring and the three routes that reach the model: /predict, /predict_base64
and /explain.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import importlib.util
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypeVar

import bentoml
import numpy as np
from bentoml.validators import ContentType

from core.preprocess import ImageError
from core.projects import DEFAULT
from core.settings import refit_home, settings
from core.store import Store
from service import bootstrap, budget, compat, console, metrics
from service.api import create_app
from service.batcher import Batcher, Overloaded
from service.capture import Captures, doubt
from service.capture import new_id as new_capture_id
from service.drift import DriftMonitor
from service.errors import ApiError, answered
from service.explain import NotExplainable, UnknownLabel, explain_upload
from service.guard import Guard
from service.jobs import Jobs
from service.lifeline import bound_shutdown, die_with_supervisor, trim_heap
from service.model import ModelHolder, unavailable
from service.projects import ProjectScope, Space, Spaces
from service.projects import current as current_project
from service.queue import QueueRunner, SharedJobs
from service.replicas import StatusBoard, replica_id
from service.runner import LocalRunner
from service.schemas import ExplainInput, Explanation, PredictBase64Input, PredictInput, Prediction
from service.trial import ClientKey, client_key, decision

# The one module-level call: BentoML builds each worker's app right after importing this module, before any
# hook of the service runs, and its request timeout keeps every request for an hour (service/compat.py).
compat.install()
log = logging.getLogger("refit.service")

# BentoML works out the media type of a list reply from its JSON schema, which it builds again on every
# call: a fifth of the front's CPU under load (py-spy). These replies are always JSON; the return
# annotation says so once (bentoml.validators.ContentType). A model reply (/explain) is JSON without a schema.
T = TypeVar("T")
JsonReply = Annotated[T, ContentType("application/json")]


def _show_info_logs() -> None:
    # BentoML leaves other loggers at WARNING; version swaps and retrain admissions are worth seeing by default.
    logging.getLogger("refit").setLevel(logging.INFO)


# The service's configuration is read when the class is made, as BentoML reads it: the number of workers,
# and whether BentoML's OpenTelemetry middleware skips /predict (REFIT_TRACE_PREDICTIONS).
_UNTRACED = {} if settings().trace_predictions else {"tracing": {"excluded_urls": ["/predict"]}}


@bentoml.asgi_app(create_app(), path="/")
@bentoml.service(name="refit", traffic={"timeout": 3600}, workers=settings().workers, **_UNTRACED)
class Refit:
    """Image classification with versioned transfer-learned models: predict, list/promote/rollback
    versions, and retrain on an uploaded dataset. Retrain, promote and rollback need
    `Authorization: Bearer $REFIT_TOKEN` when the server has a token."""

    packed = bootstrap.packed_model()

    def __init__(self) -> None:
        _show_info_logs()
        s = settings()
        die_with_supervisor()
        bound_shutdown(s.shutdown_seconds)
        self.store = Store()
        self.replica = replica_id()
        self.board = StatusBoard(self.store)
        Jobs(refit_home()).recover()
        self.metrics = metrics.Counters(s.max_batch_size)
        self._retraining(s)
        self.drift_monitor = DriftMonitor(s.drift_window)
        self.holder = ModelHolder(self.store, threads=s.ort_threads, poll_seconds=s.poll_seconds,
                                  drift=self.drift_monitor)
        self.batcher = Batcher(max_batch_size=s.max_batch_size, max_latency_ms=s.max_latency_ms,
                               on_batch=self.metrics.batch.observe, on_idle=trim_heap,
                               on_outputs=self.drift_monitor.observe)
        # Decoding releases the GIL: on its own thread it overlaps the event loop's parsing and the model run.
        self.decoder = ThreadPoolExecutor(max_workers=s.ort_threads, thread_name_prefix="refit-decode")
        # Explanations run on a thread of their own, one at a time per worker, beside the batcher: they never
        # join a /predict batch, and a burst of them holds at most one model run's worth of cores.
        self.explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-explain")
        self.captures = Captures(self.store, max_images=s.capture_max_images, days=s.capture_days,
                                 max_bytes=s.capture_max_bytes, on_drop=self.metrics.capture_dropped.inc)
        if bentoml.server_context.worker_index in (None, 1):  # one retention timer per replica, capture on or off
            self.captures.start_pruning(s.capture_prune_seconds)
        self.spaces = Spaces(Space(DEFAULT, self.store, replica=self.replica, board=self.board,
                                   captures=self.captures, jobs=self.jobs, runner=self.runner,
                                   drift_monitor=self.drift_monitor, trains_here=self.trains_here,
                                   holder=lambda: self.holder),
                             make_runner=self._runner_for, metrics=self.metrics)
        # Loading another project's version (a checksum, a session, a warm-up run) happens off the event loop.
        self.loader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="refit-load")
        # Everything made so far (BentoML, onnxruntime's bindings, the model) lives as long as the worker: moved
        # out of the garbage collector's sight, a full collection during traffic scans only what requests made,
        # which shortens the pauses that land on a request's latency.
        gc.collect()
        gc.freeze()

    def _retraining(self, s) -> None:
        """Retraining: on the job queue's workers when REFIT_QUEUE is set, else in a training process here, when
        this install has the training code (the serving image has not: it answers retrains with a 503)."""
        self.trains_here = not s.queue and importlib.util.find_spec("torch") is not None
        self.jobs = SharedJobs(self.store, s.queue) if s.queue else Jobs(refit_home())
        self.runner = self._runner_for(self.jobs)
        # One warm training process per replica, not per worker: it holds about 1 GB. A job admitted by
        # another worker starts a fresh process (about 5 s more).
        if self.trains_here and s.train_standby and bentoml.server_context.worker_index in (None, 1):
            self.jobs.start_standby(s.train_threads)

    def _runner_for(self, jobs):
        """A project's job runner: on the queue when REFIT_QUEUE is set, else in a training process here."""
        s = settings()
        if s.queue:
            return QueueRunner(jobs)
        return LocalRunner(jobs, train_threads=s.train_threads, on_finish=self.metrics.finished)

    async def _served(self):
        """The request's project (`/projects/NAME/...`, else default), and its holder, loaded if need be."""
        space = self.spaces.get(current_project.get())
        if space.project == DEFAULT:
            return space, self.holder
        loop = asyncio.get_running_loop()
        return space, await loop.run_in_executor(self.loader, self.spaces.holder, space.project)

    @bentoml.on_deployment
    def prepare() -> None:
        """Once per `bentoml serve`, before workers start: give an empty store its first model, and record
        jobs that a previous run of the server left unfinished as failed (service/bootstrap.py)."""
        _show_info_logs()
        bootstrap.prepare(Refit.bento)

    # -- predict ---------------------------------------------------------------------------------
    @bentoml.api(route="/predict", input_spec=PredictInput)
    @answered
    async def predict(self, images: list, top_k: int, threshold: float | None) -> JsonReply[list[Prediction]]:
        """Classify one or more images uploaded as multipart/form-data in the field `images`."""
        return await self._classify([(u.name, u.data) for u in images], top_k, threshold)

    @bentoml.api(route="/predict_base64", input_spec=PredictBase64Input)
    @answered
    async def predict_base64(self, images: list, top_k: int, threshold: float | None) -> JsonReply[list[Prediction]]:
        """The same as /predict for clients that cannot send multipart: JSON with base64-encoded images."""
        return await self._classify([(u.name, u.data) for u in images], top_k, threshold)

    async def _classify(self, files: list[tuple[str, bytes]], top_k: int, threshold: float | None):
        limit = settings().max_images
        if len(files) > limit:
            raise ApiError(400, f"{len(files)} images is over the limit of {limit} per request")
        budget.check(files)
        space, holder = await self._served()
        model = holder.current  # read once: the whole request runs on this version even if a swap happens now
        if model is None:
            raise ApiError(503, unavailable(space.store, holder), **_named(space))
        trial = holder.trials.on  # read once too: the candidate on trial (service/trial.py), if any
        role = "promoted"
        if trial is not None and trial.mode == "canary" and trial.answers(client_key.get()):
            model, role = trial.model, "candidate"
        t0 = time.perf_counter()
        arrays = await asyncio.get_running_loop().run_in_executor(self.decoder, holder.decode, model, files)
        bad = [str(a) for a in arrays if not isinstance(a, np.ndarray)]
        if bad:
            raise ApiError(400, "; ".join(bad))
        batch = np.stack(arrays)
        try:
            probs = await self.batcher.run(model, batch)
        except Overloaded as e:
            raise ApiError(503, str(e)) from None
        except Exception as e:  # noqa: BLE001 - logged by the batcher; the client is told, not given a bare 500
            if trial is not None:
                holder.trials.figures.served(model.version, time.perf_counter() - t0, error=True, role=role)
            raise ApiError(503, f"the model failed on this batch ({type(e).__name__}); try again") from None
        s = settings()  # read once per request: it looks at the environment each time
        if threshold is None and model.cuts is None:  # single-label: REFIT_THRESHOLD when none is given
            threshold = s.threshold
        replies = [ModelHolder.answer(model, p, top_k, threshold) for p in probs]
        keep = self._keeper(space, model, files, probs, replies, trial, s.capture)
        if trial is not None:
            holder.trials.figures.served(model.version, time.perf_counter() - t0, role=role)
            if trial.mode == "shadow" and trial.samples(random.random()):
                holder.trials.shadow(trial, batch, probs, [decision(r) for r in replies], threshold, after=keep)
                keep = None
        if keep is not None:
            keep([])
        return [Prediction(**r) for r in replies]

    def _keeper(self, space, model, files, probs, replies, trial, capture: bool):
        """Count the replies and give each its prediction id; the returned function captures them (when the
        server captures) with the trial's answers, the candidate's given by a shadow run afterwards."""
        for r in replies:
            self.metrics.predicted(space.project, r["version"], r["label"])
            r["prediction_id"] = new_capture_id()
        if not capture:
            return None

        def keep(theirs: list) -> None:
            for i, ((name, data), p, r) in enumerate(zip(files, probs, replies, strict=True)):
                record = {**r, "margin": doubt(model, p)}
                if trial is not None:
                    answers = {model.version: decision(r)}
                    if i < len(theirs):
                        answers[trial.version] = theirs[i]
                    record["trial"] = {"id": trial.id, "answers": answers}
                if not space.captures.keep(r["prediction_id"], name, data, record, contract=model.contract):
                    self.metrics.capture_dropped.inc()

        return keep

    # -- explain ---------------------------------------------------------------------------------
    @bentoml.api(route="/explain", input_spec=ExplainInput)
    @answered
    async def explain(self, image, label: str | None, top_k: int, threshold: float | None) -> Explanation:
        """Classify one image (multipart field `image`) and show why: a class activation map for `label`
        (default: the top class) as a PNG overlay and as a small array. 409 for a version exported without
        the feature map, 422 for a label that is not one of its classes."""
        budget.check([(image.name, image.data)])
        space, holder = await self._served()
        model = holder.current  # read once, as /predict does
        if model is None:
            raise ApiError(503, unavailable(space.store, holder), **_named(space))
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self.explainer, explain_upload, model, image.name, image.data, label, settings().max_image_pixels)
        except NotExplainable as e:
            raise ApiError(409, str(e), version=model.version) from None
        except UnknownLabel as e:
            raise ApiError(422, str(e), version=model.version, classes=list(e.classes)) from None
        except ImageError as e:
            msg = str(e)
            raise ApiError(400, msg if msg.startswith(image.name) else f"{image.name}: {msg}") from None
        except Exception as e:  # broad on purpose: the client is told, not given a bare 500
            log.exception("explain failed on %s", model.version)
            raise ApiError(503, f"the model failed on this image ({type(e).__name__}); try again") from None
        answer = ModelHolder.answer(model, found.pop("probs"), top_k, threshold)
        found["overlay_png"] = base64.b64encode(found["overlay_png"]).decode("ascii")
        return Explanation(**answer, **found)

    # -- health, metrics, shutdown ---------------------------------------------------------------
    def __is_ready__(self) -> bool:
        """Ready while this worker serves a version. A damaged pointer does not make a serving worker unready;
        a worker with nothing to serve is."""
        return self.holder.current is not None

    def __metrics__(self, content: str) -> str:
        return metrics.text(self, content)

    @bentoml.on_shutdown
    async def close(self) -> None:
        self.batcher.close()
        for name in self.spaces.loaded():
            self.spaces.forget(name)
        self.holder.close()
        for space in self.spaces.spaces():  # as an open request would be: until done, or the worker's time is up
            await space.runner.drain()
        if isinstance(self.jobs, Jobs):
            self.jobs.stop_standby()


def _named(space) -> dict:
    """The project a refusal is about, in its body, for every project but the default (whose replies are as
    they always were)."""
    return {} if space.project == DEFAULT else {"project": space.project}


# compat.RouteLabels first: it gives the real path back to the middleware after it (service/compat.py).
Refit.add_asgi_middleware(compat.RouteLabels)
Refit.add_asgi_middleware(ProjectScope)  # /projects/NAME/... as /... of project NAME, before the token check
Refit.add_asgi_middleware(Guard)
Refit.add_asgi_middleware(ClientKey)  # the canary's client key (X-Refit-Client, else the peer's address)
Refit.add_asgi_middleware(console.ConsoleLink)
