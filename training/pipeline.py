"""`train(request, data)`: resolve the data -> load and check it -> fit by strategy -> ONNX export and parity
check -> evaluate (INT8, promotion decision, label findings, drift reference) -> write the artifacts ->
publish (atomic) -> promote. Used by `refit train` and the service's retrain job.

Each step is a function of its own module: `Run` (training/run.py) holds the decoded data and trains one
strategy, `choose_and_train` (training/choose.py) is `auto`'s choice, training/checks.py the export and its
checks, training/promotion.py the decision, training/findings.py the label findings and drift reference,
training/artifacts.py the files and the publish, training/bootstrap.py the first start's ImageNet version.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from core.config import TrainRequest
from core.data import Dataset, DatasetError, load_dataset
from core.datasets import Datasets
from core.drift import FILE as DRIFT_FILE
from core.progress import Progress
from core.scratch import run_folder
from core.store import Store
from training.artifacts import Evaluation, publish_version, version_meta, write_artifacts
from training.bootstrap import bootstrap_imagenet
from training.checks import Checked, export_and_check, try_int8
from training.choose import Fitted, fit
from training.device import describe, resolve_device
from training.findings import drift_reference, label_findings
from training.promotion import promotion_decision
from training.run import Run, input_contract, seed_everything

# Also imported from here by other code: `bootstrap_imagenet` (the service's first start runs it in a
# subprocess), `Run`, `input_contract` and `_publish` (the tests).
_publish = publish_version
__all__ = ["train", "Run", "input_contract", "bootstrap_imagenet", "_publish"]


def train(request: TrainRequest, data: str | Path | Dataset | None = None, *, store: Store | None = None,
          actor: str = "cli", log: Callable = print, progress: Callable[[dict], None] | None = None,
          job_id: str | None = None) -> dict:
    """Train on `data` (a folder or .zip), or on the dataset of the store that `request.dataset` names (its
    snapshot `request.snapshot`, else its newest, which the version then records). `progress` is called with
    the run's phase, epoch, best validation accuracy so far and time left (core/progress.py). `job_id`,
    the retrain job running this, is recorded in the version's metadata (`job`): a reader finds the version
    of a job whose process stopped after publishing (core/outcome.py)."""
    t_start = time.time()
    tracker = Progress(progress)
    device = set_up_torch(request)
    log(f"device: {describe(device)}")
    store = store or Store()
    parent = store.promoted()
    # Under REFIT_HOME, not the system temp dir: a killed run's folder is found and removed at the service's
    # next start (core/scratch.py).
    with run_folder(store.home, "run") as tmp:
        data, request, lineage = resolve_data(request, data, store, tmp / "snapshot", log)
        ds = load_data(request, data, tmp, log)
        run = Run(request, ds, log, store.home / "cache", tracker, device=device)
        fitted = fit(run, log)
        tracker.phase("finishing")
        checked = export_and_check(run, fitted.backbone, fitted.strategy, fitted.history, tmp / "model.onnx", log)
        evaluation = evaluate_version(run, fitted, checked, store, tmp, log)
        files, metrics = write_artifacts(tmp, run, fitted, checked, evaluation, lineage)
        version = publish_version(store, files, run.contract, version_meta(
            run, fitted, checked, evaluation, parent=parent, actor=actor, lineage=lineage, job_id=job_id))
    log(f"published {version}: {fitted.strategy}, val_accuracy {checked.report['accuracy']:.4f}, "
        + (f"val_map {checked.report['map']:.4f}, " if run.multi_label else "") + f"train {fitted.seconds:.1f}s")
    log(f"strategy: {fitted.auto['summary']}")
    tracker.phase("done")
    promoted = promote(store, version, evaluation.decision, actor, log)
    return summary(version, promoted, run, fitted, checked, evaluation, metrics, lineage,
                   total_seconds=time.time() - t_start)


def set_up_torch(request: TrainRequest) -> torch.device:
    """The run's device (first: `cuda` where there is none fails before any data is read), threads and seeds,
    and torch's optimizer import started off the critical path."""
    device = resolve_device(request.device)
    _prepare_optimizer_in_background()
    if request.threads:
        torch.set_num_threads(request.threads)
    seed_everything(request.seed)
    return device


def _prepare_optimizer_in_background() -> None:
    """torch.optim's first optimizer imports torch's compiler (about 1.6 s on 2 cores, measured), which every
    strategy pays before its first step. Done on a thread while the images decode (Pillow and ONNX Runtime
    release the GIL), it is off the critical path; the main thread's first optimizer waits on the import lock
    if it is not done yet. Nothing to do in a process that made one already (the service's standby)."""
    if "torch._dynamo" in sys.modules:
        return
    threading.Thread(target=lambda: torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), daemon=True,
                     name="optimizer-import").start()


def resolve_data(request: TrainRequest, data, store: Store, dest: Path, log: Callable):
    """What to train on: (a folder or .zip, the request with a store snapshot resolved, lineage or None)."""
    if request.dataset is not None:
        return _from_store(request, data, store, dest, log)
    if data is None:
        raise DatasetError("nothing to train on: give a data folder (or .zip) or a dataset of the store")
    return data, request, None


def _from_store(request: TrainRequest, data, store: Store, dest: Path, log: Callable):
    """The dataset snapshot the request names, written out as a folder: (folder, the request with the
    snapshot resolved, lineage)."""
    if data is not None:
        raise DatasetError(f"give a data folder or a dataset of the store, not both ({data} and dataset "
                           f"{request.dataset!r})")
    datasets = Datasets(store)
    snapshot = datasets.resolve(request.dataset, request.snapshot)
    folder = datasets.materialize(request.dataset, snapshot, dest)
    log(f"dataset {request.dataset!r} snapshot {snapshot}")
    request = request.model_copy(update={"snapshot": snapshot})
    return folder, request, {"dataset": request.dataset, "snapshot": snapshot}


def load_data(request: TrainRequest, data, workdir: Path, log: Callable) -> Dataset:
    """Check and split the dataset, decoding each image once with the backbone's contract. A `Dataset` already
    checked and split (a caller that made one in process) is trained on as it is."""
    if isinstance(data, Dataset):
        return data
    # Decoded once, at the size the task trains at (a multi-label run's is larger: training/heads.py).
    ds = load_dataset(data, val_fraction=request.val_fraction, seed=request.seed, workdir=workdir, log_fn=log,
                      contract=lambda task: input_contract(request, task), task=request.task)
    log(f"dataset {ds.root}: {len(ds.classes)} classes {ds.classes}, {len(ds.train)} train / {len(ds.val)} val "
        f"({ds.split} split), {len(ds.skipped)} skipped")
    return ds


def evaluate_version(run: Run, fitted: Fitted, checked: Checked, store: Store, folder: Path,
                     log: Callable) -> Evaluation:
    """INT8 (when asked for), the promotion decision, the label findings and the drift reference."""
    accuracy = checked.report["accuracy"]  # multi-label: subset accuracy; its INT8 gate compares mAP
    gate = checked.report["map"] if run.multi_label else accuracy
    int8 = try_int8(checked.path, folder / "model.int8.onnx", run, gate, log) if run.request.int8 else None
    decision = promotion_decision(run.request, store, run.ds, accuracy, run,
                                  val_balanced=checked.report.get("balanced_accuracy"),
                                  val_map=checked.report.get("map"))
    fingerprint = run.ds.fingerprint()
    problems, duplicates = label_findings(run, fitted.backbone, fingerprint, log)
    drift = drift_reference(run, fitted.backbone, fitted.strategy, checked.path, folder / DRIFT_FILE)
    return Evaluation(int8, decision, fingerprint, problems, duplicates, drift)


def promote(store: Store, version: str, decision: dict, actor: str, log: Callable) -> bool:
    """Promote the published version when the decision says so; whether it was."""
    if not decision["promote"]:
        log(f"not promoted: {decision['reason']}")
        return False
    store.promote(version, actor=actor, reason=decision["reason"])
    log(f"promoted {version} ({decision['reason']})")
    return True


def summary(version: str, promoted: bool, run: Run, fitted: Fitted, checked: Checked, ev: Evaluation,
            metrics: dict, lineage: dict | None, *, total_seconds: float) -> dict:
    """What `train` returns: the CLI's --json line and the retrain job's result."""
    ds = run.ds
    if run.multi_label:
        return multilabel_summary(version, promoted, run, fitted, checked, ev, metrics, lineage,
                                  total_seconds=total_seconds)
    return {"version": version, "strategy": fitted.strategy, "val_accuracy": checked.report["accuracy"],
            "train_seconds": round(fitted.seconds, 2), "total_seconds": round(total_seconds, 2),
            "promoted": promoted, "promotion": ev.decision, "parity": checked.parity, "classes": ds.classes,
            "train_val_gap": metrics["train_val_gap"], "auto": fitted.auto, "skipped": ds.skipped,
            "lineage": lineage, "warnings": ds.warnings, "device": metrics["device"],
            "metrics": {k: metrics[k] for k in ("val_accuracy", "balanced_accuracy", "train_accuracy", "macro_f1",
                                                "per_class")},
            "label_problems": {**ev.problems, "items": ev.problems["items"][:5]},
            "near_duplicates": {**ev.duplicates, "items": ev.duplicates["items"][:5]}}


def multilabel_summary(version: str, promoted: bool, run: Run, fitted: Fitted, checked: Checked, ev: Evaluation,
                       metrics: dict, lineage: dict | None, *, total_seconds: float) -> dict:
    """`summary` of a multi-label version: val_accuracy is the subset accuracy, with val_map and val_micro_f1."""
    ds, report = run.ds, checked.report
    return {"version": version, "task": "multi_label", "strategy": fitted.strategy,
            "val_accuracy": report["accuracy"], "val_map": report["map"], "val_micro_f1": report["micro_f1"],
            "val_macro_f1": report["macro_f1"],
            "thresholds": dict(zip(ds.classes, run.contract.thresholds, strict=True)),
            "train_seconds": round(fitted.seconds, 2), "total_seconds": round(total_seconds, 2),
            "promoted": promoted, "promotion": ev.decision, "parity": checked.parity, "classes": ds.classes,
            "train_val_gap": metrics["train_val_gap"], "auto": fitted.auto, "skipped": ds.skipped,
            "lineage": lineage, "warnings": ds.warnings, "int8": ev.int8, "device": metrics["device"],
            "metrics": {k: metrics[k] for k in ("val_accuracy", "val_map", "val_micro_f1", "macro_f1",
                                                "subset_accuracy", "train_accuracy", "per_label")},
            "label_problems": {**ev.problems, "items": ev.problems["items"][:5]},
            "near_duplicates": {**ev.duplicates, "items": ev.duplicates["items"][:5]}}
