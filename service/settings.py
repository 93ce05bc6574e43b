"""Service settings, read once from the environment. Each has a default that works on a 2-core machine.

    REFIT_TOKEN=s3cret REFIT_WORKERS=2 bentoml serve service.service:Refit --port 3000
"""
from __future__ import annotations

import os
from pathlib import Path


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

TOKEN = os.environ.get("REFIT_TOKEN") or None  # bearer token for retrain/promote/rollback; unset = open
PROTECT_PREDICT = os.environ.get("REFIT_PROTECT_PREDICT", "") in ("1", "true", "yes")  # token on predict too
DATA_ROOT = Path(os.environ["REFIT_DATA_ROOT"]).resolve() if os.environ.get("REFIT_DATA_ROOT") else None

# One model worker per core, each with one ONNX Runtime thread: while one worker decodes, the other
# runs the model (measured: 63 vs 50 images/s served over 1 worker with 2 threads, docs/benchmarks.md).
WORKERS = _int("REFIT_WORKERS", CPUS)  # model worker processes; each one watches the promoted pointer
ORT_THREADS = _int("REFIT_ORT_THREADS", max(1, CPUS // WORKERS))  # intra-op threads per model worker
# Adaptive batching: most images in one onnxruntime run. On 2 cores EfficientNet-Lite0 runs about twice
# as fast per image at batch 8 as at batch 1, and slower again at 32 (bench/results/model.json).
MAX_BATCH_SIZE = _int("REFIT_MAX_BATCH_SIZE", 8)
# How long a queued image may wait before the batcher sheds it with a 503. Generous, because a retrain
# running beside the model on the same cores slows every batch down and must not cost failed requests.
MAX_LATENCY_MS = _int("REFIT_MAX_LATENCY_MS", 20_000)

DEFAULT_TOP_K = _int("REFIT_TOP_K", 5)
DEFAULT_THRESHOLD = _float("REFIT_THRESHOLD", 0.0)  # best score under this answers "unknown"
MAX_IMAGES = _int("REFIT_MAX_IMAGES", 64)  # images per predict request
MAX_REQUEST_MB = _float("REFIT_MAX_REQUEST_MB", 32)  # predict body size limit (413 above it)
MAX_DATASET_MB = _float("REFIT_MAX_DATASET_MB", 1024)  # retrain upload size limit (413 above it)
MAX_DATASET_FILES = _int("REFIT_MAX_DATASET_FILES", 1000)  # images in one POST /datasets/{name}/images

POLL_SECONDS = _float("REFIT_POLL_SECONDS", 0.25)  # how often each worker checks the promoted pointer
# Each model worker keeps a status record in the store (what it serves), rewritten every heartbeat; a record
# not rewritten for the TTL belongs to a worker that died without removing it (kill -9, a lost machine), and
# readers drop it. The TTL is a few heartbeats, so one late write never makes a live worker disappear.
HEARTBEAT_SECONDS = _float("REFIT_HEARTBEAT_SECONDS", 5)
STATUS_TTL_SECONDS = _float("REFIT_STATUS_TTL_SECONDS", 3 * HEARTBEAT_SECONDS)
# Training threads are capped below the core count so predictions keep a core while a retrain runs.
TRAIN_THREADS = _int("REFIT_TRAIN_THREADS", max(1, CPUS - 1))
# Keep one training process warm (imports done, feature graph exported): about 5 s off every retrain, for
# about 1 GB of memory held while idle (measured RSS; service/jobs.py).
TRAIN_STANDBY = os.environ.get("REFIT_TRAIN_STANDBY", "1") not in ("0", "false", "no")
# OpenTelemetry spans for predictions: off unless asked for. With no trace exporter configured they go
# nowhere, yet creating them cost about a quarter of the model workers' HTTP handling (profiled).
TRACE_PREDICTIONS = os.environ.get("REFIT_TRACE_PREDICTIONS", "") in ("1", "true", "yes")

# What one predict request may cost to decode, read from the images' headers before any is decoded. The
# cost is counted in megapixels of a PNG (core.preprocess.decode_cost: a baseline JPEG counts a
# quarter, a row narrower than 8 pixels as 8 wide); 64 is at most about 1.8 s of one core (measured,
# docs/service.md), and still takes 20 twelve-megapixel phone photos in one request.
MAX_REQUEST_MEGAPIXELS = _float("REFIT_MAX_REQUEST_MEGAPIXELS", 64)
MAX_IMAGE_PIXELS = int(_float("REFIT_MAX_IMAGE_MEGAPIXELS", 50) * 1_000_000)  # one image as stored (400 above)
# An image added to a dataset (POST /datasets/{name}/images, a retrain upload) meets the limits one image of a
# predict request meets: an image the service could not be asked to classify is no use to train on.
IMAGE_LIMITS = {"max_file_bytes": int(MAX_REQUEST_MB * 1024 * 1024), "max_pixels": MAX_IMAGE_PIXELS}
# After SIGTERM, how long a worker waits for open requests (a synchronous retrain, a long upload) before it
# stops them and exits; `bentoml serve` on its own would wait for them without limit (service/lifeline.py).
SHUTDOWN_SECONDS = _float("REFIT_SHUTDOWN_SECONDS", 30)
# The longest pause in a request body before the request is answered 408: a client that declares more than it
# sends would otherwise hold its connection, and a worker's coroutine, as long as the request timeout (an hour).
BODY_TIMEOUT = _float("REFIT_BODY_TIMEOUT", 30)

# Drift (service/drift.py): each model worker keeps the last DRIFT_WINDOW inputs per served version; GET /drift
# pools the windows of a replica's workers. 200 per worker: a window of validation-like photos then scores
# within a few percent of 1.0 (the threshold is computed for the window's fill, core/drift.py).
DRIFT_WINDOW = _int("REFIT_DRIFT_WINDOW", 200)

# Retrain jobs on a Redis queue for `refit worker`s on any machine (service/queue.py); unset, jobs run in a
# training process of this machine, with nothing else to install.
QUEUE = os.environ.get("REFIT_QUEUE") or None
# A running job's worker rewrites its record every JOB_TTL/6 s; a record older than JOB_TTL belongs to a dead
# worker, and the first reader records the job as failed. Long enough that a worker starved of CPU by its own
# training is not declared dead (the write happens from a thread that waits for the GIL).
JOB_TTL = _float("REFIT_JOB_TTL_SECONDS", 60)
JOB_TIMEOUT = _int("REFIT_JOB_TIMEOUT_SECONDS", 6 * 3600)  # a job running longer is stopped by its worker
# How often a busy `refit worker` renews its registration in Redis (RQ's job_monitoring_interval). While Redis
# is away these renewals fail and are retried at this pace; the job trains on (service/worker.py).
WORKER_MONITOR_SECONDS = max(1, _int("REFIT_WORKER_MONITOR_SECONDS", 30))

# Capture (service/capture.py): keep each predicted image and its prediction in the store, for feedback and
# for choosing what to label next. Off by default: the images are the customer's data. Retention: the newest
# CAPTURE_MAX_IMAGES within CAPTURE_DAYS (about 1 KB of record plus the upload per image).
CAPTURE = os.environ.get("REFIT_CAPTURE", "") in ("1", "true", "yes")
CAPTURE_MAX_IMAGES = _int("REFIT_CAPTURE_MAX_IMAGES", 10_000)
CAPTURE_DAYS = _float("REFIT_CAPTURE_DAYS", 30)
# The bytes all captures of the store may take (images and records; each image kept without what was sent
# after its end). Without it a client could fill the disk: /predict is open by default, and a request may
# carry REFIT_MAX_REQUEST_MB. The oldest go first when a new capture would not fit.
CAPTURE_MAX_BYTES = int(_float("REFIT_CAPTURE_MAX_MB", 2048) * 1024 * 1024)
# How often one worker of each replica removes what is past these limits, capture on or off (and once at start).
CAPTURE_PRUNE_SECONDS = _float("REFIT_CAPTURE_PRUNE_SECONDS", 300)
# `suggest` ranks at most this many of the newest captures (each one read from the store per call).
SUGGEST_POOL = _int("REFIT_SUGGEST_POOL", 1000)
