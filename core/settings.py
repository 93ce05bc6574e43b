"""Every `REFIT_*` setting, in one pydantic-settings model. Each has a default that works on a 2-core machine.

    REFIT_TOKEN=s3cret REFIT_WORKERS=2 bentoml serve service.service:Refit --port 3000

`settings()` reads the environment once and hands out the same object until a `REFIT_*` variable changes
(a test, or a process that sets one for its children), so nothing reads `os.environ` for a setting elsewhere.
An empty variable counts as unset. A value that does not parse is refused with the variable's name.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or the bento's src folder)
DEFAULT_HOME = PACKAGE_ROOT / "models"


def cpus() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFIT_", env_ignore_empty=True, extra="ignore", frozen=True)

    # -- where things live ---------------------------------------------------------------------------------
    # The root folder for versions, the promoted pointer and job state; BentoML's own home is the same folder.
    home: Path = DEFAULT_HOME
    # Where versions and the pointer live: a folder (default: home) or s3://bucket/prefix.
    store: Optional[str] = None
    # Retrain jobs on a Redis queue for `refit worker`s on any machine (service/queue.py); unset, jobs run in a
    # training process of this machine, with nothing else to install.
    queue: Optional[str] = None
    # A folder the server may read training data from by path (`"data": "..."` in a retrain request).
    data_root: Optional[Path] = None
    replica: Optional[str] = None  # this replica's name in status records (default: host and supervisor pid)

    # -- access ----------------------------------------------------------------------------------------------
    token: Optional[str] = None  # bearer token for retrain/promote/rollback; unset = open
    protect_predict: bool = False  # the token on predict too

    # -- serving -----------------------------------------------------------------------------------------------
    # One model worker per core, each with one ONNX Runtime thread: while one worker decodes, the other
    # runs the model (measured: 63 vs 50 images/s served over 1 worker with 2 threads, docs/benchmarks.md).
    workers: int = Field(default_factory=cpus, ge=1)
    ort_threads_: Optional[int] = Field(None, alias="REFIT_ORT_THREADS", ge=1)  # intra-op threads per worker
    # Adaptive batching: most images in one onnxruntime run. On 2 cores EfficientNet-Lite0 runs about twice
    # as fast per image at batch 8 as at batch 1, and slower again at 32 (bench/results/model.json).
    max_batch_size: int = Field(8, ge=1)
    # How long a queued image may wait before the batcher sheds it with a 503. Generous, because a retrain
    # running beside the model on the same cores slows every batch down and must not cost failed requests.
    max_latency_ms: int = 20_000
    top_k: int = 5
    threshold: float = 0.0  # best score under this answers "unknown"
    max_images: int = 64  # images per predict request
    max_request_mb: float = 32  # predict body size limit (413 above it)
    max_dataset_mb: float = 1024  # retrain upload size limit (413 above it)
    max_dataset_files: int = 1000  # images in one POST /datasets/{name}/images
    # What one predict request may cost to decode, read from the images' headers before any is decoded. The
    # cost is counted in megapixels of a PNG (core.preprocess.decode_cost: a baseline JPEG counts a quarter, a
    # row narrower than 8 pixels as 8 wide); 64 is at most about 1.8 s of one core (measured, docs/service.md),
    # and still takes 20 twelve-megapixel phone photos in one request.
    max_request_megapixels: float = 64
    max_image_megapixels: float = 50  # one image as stored (400 above)
    poll_seconds: float = 0.25  # how often each worker checks the promoted pointer
    # Projects other than `default` whose versions each model worker keeps loaded, the least recently used
    # evicted first (service/projects.py); the default project's version is always loaded and not counted.
    max_loaded_models: int = Field(8, ge=1)
    # The project the `refit` command works on (`refit --project NAME` overrides it); the service ignores it.
    project: str = "default"
    # Projects named in the per-project metrics series; any further project is counted under "_other", so that
    # a service of many projects cannot grow the series without bound (service/metrics.py).
    metrics_projects: int = Field(20, ge=1)
    # Each model worker keeps a status record in the store (what it serves), rewritten every heartbeat; a record
    # not rewritten for the TTL belongs to a worker that died without removing it (kill -9, a lost machine), and
    # readers drop it. The TTL is a few heartbeats, so one late write never makes a live worker disappear.
    heartbeat_seconds: float = 5
    status_ttl_seconds_: Optional[float] = Field(None, alias="REFIT_STATUS_TTL_SECONDS")
    # After SIGTERM, how long a worker waits for open requests (a synchronous retrain, a long upload) before it
    # stops them and exits; `bentoml serve` on its own would wait for them without limit (service/lifeline.py).
    shutdown_seconds: float = 30
    # The longest pause in a request body before the request is answered 408: a client that declares more than
    # it sends would otherwise hold its connection, and a worker's coroutine, as long as the request timeout.
    body_timeout: float = 30
    # OpenTelemetry spans for predictions: off unless asked for. With no trace exporter configured they go
    # nowhere, yet creating them cost about a quarter of the model workers' HTTP handling (profiled).
    trace_predictions: bool = False
    # Drift (service/drift.py): each model worker keeps the last DRIFT_WINDOW inputs per served version.
    # 200 per worker: a window of validation-like photos then scores within a few percent of 1.0.
    drift_window: int = 200

    # -- training ----------------------------------------------------------------------------------------------
    # Training threads are capped below the core count so predictions keep a core while a retrain runs.
    train_threads_: Optional[int] = Field(None, alias="REFIT_TRAIN_THREADS", ge=1)
    # Keep one training process warm (imports done, feature graph exported): about 5 s off every retrain, for
    # about 1 GB of memory held while idle (measured RSS; service/jobs.py).
    train_standby: bool = True
    activation_cache_mb: float = 2048  # the activation cache's memory bound (training/activations.py)

    # -- jobs ----------------------------------------------------------------------------------------------
    # A running job's worker rewrites its record every JOB_TTL/6 s; a record older than JOB_TTL belongs to a dead
    # worker, and the first reader records the job as failed. Long enough that a worker starved of CPU by its own
    # training is not declared dead (the write happens from a thread that waits for the GIL).
    job_ttl_seconds: float = 60
    job_timeout_seconds: int = 6 * 3600  # a job running longer is stopped by its worker
    # How often a busy `refit worker` renews its registration in Redis (RQ's job_monitoring_interval). While
    # Redis is away these renewals fail and are retried at this pace; the job trains on (training/worker.py).
    worker_monitor_seconds: int = 30
    # How often a publish in progress on S3 rewrites its claim, so the orphan sweep can tell it is alive.
    claim_heartbeat_seconds: float = 30
    # A claim not rewritten for this long, without a model.yaml, belongs to a publish that was cut short.
    orphan_grace_seconds: float = 600
    # A dataset's temporary folders and unreferenced blobs older than these are swept (core/dataset_sweep.py).
    dataset_tmp_grace_seconds: float = 3600
    dataset_blob_grace_seconds: float = 86400

    # -- captures ----------------------------------------------------------------------------------------------
    # Keep each predicted image and its prediction in the store, for feedback and for choosing what to label
    # next. Off by default: the images are the customer's data. Retention: the newest CAPTURE_MAX_IMAGES within
    # CAPTURE_DAYS (about 1 KB of record plus the upload per image).
    capture: bool = False
    capture_max_images: int = 10_000
    capture_days: float = 30
    # The bytes all captures of the store may take. Without it a client could fill the disk: /predict is open by
    # default, and a request may carry REFIT_MAX_REQUEST_MB. The oldest go first when a new one would not fit.
    capture_max_mb: float = 2048
    # How often one worker of each replica removes what is past these limits, capture on or off (and at start).
    capture_prune_seconds: float = 300
    suggest_pool: int = 1000  # `suggest` ranks at most this many of the newest captures

    # -- development: where the tests and benchmarks find their photos (bench/common.py, tests/) ---------------
    test_data: Optional[Path] = None  # the hymenoptera photos (train/ and val/ of ants and bees)
    bench_data: Optional[Path] = None  # the benchmarks' photos (default: ../shared/data/hymenoptera)
    bench_flowers: Optional[Path] = None  # the retrain benchmark's flowers (default: ../shared/data/flowers5_128px)

    # -- process plumbing: set by Refit for the processes it starts, not by an operator --------------------------
    parent_pid: Optional[int] = None  # a `refit worker`'s work horses die with this process
    supervisor_pid: Optional[int] = None  # `bentoml serve`'s supervisor, for the model workers (lifeline.py)

    @field_validator("home", "data_root")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def ort_threads(self) -> int:
        return self.ort_threads_ or max(1, cpus() // self.workers)

    @property
    def train_threads(self) -> int:
        return self.train_threads_ or max(1, cpus() - 1)

    @property
    def status_ttl_seconds(self) -> float:
        return self.status_ttl_seconds_ or 3 * self.heartbeat_seconds

    @property
    def store_url(self) -> str:
        return self.store or str(self.home)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def max_dataset_bytes(self) -> int:
        return int(self.max_dataset_mb * 1024 * 1024)

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_megapixels * 1_000_000)

    @property
    def image_limits(self) -> dict:
        # An image added to a dataset meets the limits one image of a predict request meets: an image the
        # service could not be asked to classify is no use to train on.
        return {"max_file_bytes": self.max_request_bytes, "max_pixels": self.max_image_pixels}

    @property
    def capture_max_bytes(self) -> int:
        return int(self.capture_max_mb * 1024 * 1024)


def settings() -> Settings:
    """The settings of this process's environment, parsed once per distinct set of `REFIT_*` values."""
    return _parsed(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("REFIT_"))))


class SettingsError(ValueError):
    """A REFIT_* variable whose value does not parse; the message names each one and what was wrong."""


@lru_cache(maxsize=8)
def _parsed(_env: tuple) -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        prefix = Settings.model_config["env_prefix"]
        fields = Settings.model_fields
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err.get("loc") else "?"
            field = fields.get(name)  # an aliased field is reported by its alias, the variable itself
            var = (field.alias if field is not None and field.alias else name if name.upper().startswith(prefix.upper())
                   else prefix + name).upper()
            problems.append(f"{var}={os.environ.get(var, '')!r}: {err['msg']}")
        raise SettingsError("; ".join(problems)) from None


def refit_home() -> Path:
    """REFIT_HOME, created on first use (not at import)."""
    home = settings().home
    home.mkdir(parents=True, exist_ok=True)
    return home
