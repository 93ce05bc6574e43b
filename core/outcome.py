"""What a retrain job whose process is gone left behind: a version it published, promoted or not.

Training records the job's id in the version's metadata (`job`, in model.yaml), so a reader that finds a job
whose worker stopped looks for its version before it says that nothing was published: a worker killed after
the version's model.yaml landed has published it, and submitting again would train it twice.

The requested promotion is reported, not carried out: the reader is a replica or another worker, possibly
much later, and the pointer may have moved since the job made its decision (an operator's promote or
rollback); promoting then would overrule a later decision. So a job whose version is listed but whose promote
never happened ends failed with a message that names the version and the one call that finishes it.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from core.jobs import Status, failed
from core.store import Store, StoreError

log = logging.getLogger("refit.jobs")

CLOCK_SLACK = timedelta(minutes=10)  # machines' clocks differ: versions a little older than the job still count


def published_outcome(store: Store, job: dict) -> dict | None:
    """The job's end as its version shows it ({"status", "result", "error"}), or None when it published none."""
    info = _version_of(store, job)
    if info is None:
        return None
    v = info["version"]
    try:
        promoted = any(e.get("action") == "promote" and e.get("version") == v for e in store.history())
    except StoreError:
        promoted = False
    decision = info.get("promotion") or {}
    metrics = info.get("metrics") or {}
    result = {"version": v, "strategy": info.get("strategy"), "val_accuracy": info.get("val_accuracy"),
              "train_seconds": info.get("train_seconds"), "promoted": promoted, "promotion": decision,
              "classes": info.get("classes"), "lineage": info.get("lineage"),
              "metrics": {k: metrics[k] for k in ("val_accuracy", "train_accuracy", "macro_f1", "per_class")
                          if k in metrics},
              "recovered": "the process running this job stopped after publishing; this result is read from "
                           "the version"}
    if decision.get("promote") and not promoted:
        return failed(500, f"published {v} but not promoted: the process running this job stopped before "
                      f"promoting it; promote {v} to serve it (POST /promote or `refit promote {v}`), there is no "
                      "need to train again", result=result)
    return {"status": Status.SUCCEEDED, "result": result, "error": None}


def _version_of(store: Store, job: dict) -> dict | None:
    """The newest version whose metadata names this job; only versions created since the job was admitted
    (within the clock slack) are read."""
    since = _when(job.get("created"))
    for v in reversed(store.versions()):
        try:
            info = store.info(v)
        except Exception as e:  # noqa: BLE001 - a damaged model.yaml (YAMLError) or metrics.json (ValueError) too
            log.warning("job %s: version %s cannot be read (%s)", job.get("id"), v, e)
            continue
        if info.get("job") == job.get("id"):
            return info
        created = _when(info.get("created"))
        if since and created and created < since - CLOCK_SLACK:
            return None
    return None


def _when(iso) -> datetime | None:
    try:
        t = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
