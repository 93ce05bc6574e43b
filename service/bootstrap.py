"""What a deployment does: declare the model a bento packs (`Refit.packed`), and once per `bentoml serve`,
before its workers start (`Refit.prepare`), record jobs a previous run left unfinished as failed, sweep what
killed writes left, and give an empty store its first model: the version packed into the bento, else the
pretrained ImageNet model, published by a child process. A store that holds versions is never given one
promoted here: without a usable pointer it serves nothing until someone promotes.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException

from core.dataset_sweep import sweep
from core.settings import PACKAGE_ROOT, refit_home, settings
from core.store import Store, StoreError
from service.jobs import Jobs
from service.lifeline import record_supervisor
from service.replicas import replica_id

log = logging.getLogger("refit.service")


def packed_model():
    """The version promoted now, declared as the service's model so that `bentoml build` packs it into the
    bento. Declared only when BentoML's model store has it, so a start never fails over it; serving itself
    always follows the promoted pointer, not this declaration."""
    if not (settings().home / "models").is_dir():
        return None  # no model store here (BentoML's is the same folder), and a Store() would make one
    try:
        version = Store().promoted()
        return bentoml.models.BentoModel(bentoml.models.get(f"refit:{version}").tag) if version else None
    except (OSError, StoreError, BentoMLException):
        return None


def prepare(bento) -> None:
    """The deployment hook's work; `bento` is the service's bento (None when not served from one)."""
    home = refit_home()
    record_supervisor()  # the workers started after this hook exit when this process dies
    log.info("replica %s, store %s", replica_id(), Store(home).describe())  # a bad REFIT_REPLICA stops here
    Jobs(home).recover()
    sweep_datasets(Store(home))
    # What publishes cut short left: this machine's staging, the store's claims, of every project's model.
    Store(home).sweep_orphans(every_project=True)
    problem = Store(home).pointer_problem()
    if problem:
        log.error("%s; predictions answer 503 until then", problem)
    if not Store(home).versions():
        seed_from_bento(Store(home), bento)
    if not Store(home).versions():
        log.info("no versions in %s: publishing the pretrained ImageNet model", home)
        publish_imagenet()


def publish_imagenet() -> None:
    """In a child process, so this process (the server's supervisor) never holds torch in memory."""
    code = "from training.pipeline import bootstrap_imagenet; bootstrap_imagenet()"
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE_ROOT, env={**os.environ})
    if done.returncode != 0:
        log.error("bootstrap failed (exit %s); the service starts without a model until a retrain "
                  "or promote", done.returncode)


def seed_from_bento(store, bento) -> None:
    """In a container whose store volume is still empty, start from the version packed into the bento."""
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


def sweep_datasets(store) -> None:
    """What killed dataset adds left (temp folders, half-written files, images no snapshot names), once per
    start; a problem here is logged, never a reason not to serve. Images only on a folder store: on S3 finding
    them reads every snapshot of every dataset (one GET each), which would hold the replica's start."""
    try:
        sweep(store, blobs=not store.remote)
        if store.remote:
            log.info("dataset sweep at start: temp files only; images no snapshot names are removed from S3 by "
                     "`refit dataset sweep`")
    except Exception:  # broad on purpose: the sweep is housekeeping
        log.exception("the dataset sweep at start failed; nothing else is affected")
