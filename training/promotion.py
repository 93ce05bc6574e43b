"""The promotion decision: is a new version at least as good as the promoted one (same classes, measured on
the new validation split with the promoted version's own contract; by balanced accuracy when that split is
imbalanced) or good enough (new classes)?"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.config import TrainRequest
from core.data import Dataset
from core.preprocess import preprocess
from core.store import Store
from training.balance import BALANCE_RATIO, ratio
from training.export import read_contract, run_onnx, session
from training.metrics import mean_average_precision
from training.run import Run


def evaluate_onnx_on(path: Path, ds: Dataset, run: Run | None = None, *, metric: str = "accuracy") -> float:
    """Accuracy (or with metric="balanced_accuracy" the mean per-class recall) of an existing version on this
    dataset's validation split, with that version's contract (see onnx_scores)."""
    return onnx_scores(path, ds, run)[metric]


def onnx_scores(path: Path, ds: Dataset, run: Run | None = None) -> dict:
    """Accuracy and balanced accuracy of an existing version on this dataset's validation split, with that
    version's contract (the run's preprocessed arrays are reused when the preprocessing is the same)."""
    contract = read_contract(path)
    if run is not None and replace(contract, class_names=()) == replace(run.contract, class_names=()):
        arrays = run.val_arrays
    else:
        arrays = np.stack([preprocess(p, contract) for p, _ in ds.val])
    probs = run_onnx(session(path), arrays)
    names = list(contract.class_names)
    pred = np.array([names[i] for i in probs.argmax(1)])
    true = np.array([ds.classes[y] for _, y in ds.val])
    hit = pred == true
    recalls = [hit[true == c].mean() for c in ds.classes if (true == c).any()]
    return {"accuracy": float(hit.mean()), "balanced_accuracy": float(np.mean(recalls))}


def val_ratio(ds: Dataset) -> float:
    """Largest / smallest class count of the validation split."""
    labels = [y for _, y in ds.val]
    return round(ratio([labels.count(i) for i in range(len(ds.classes))]), 2)


def promotion_decision(request: TrainRequest, store: Store, ds: Dataset, val_acc: float,
                       run: Run | None = None, val_balanced: float | None = None,
                       val_map: float | None = None) -> dict:
    """Promote or not, and why. With the same classes the new version is held to the promoted one on the new
    validation split: by accuracy, or by balanced accuracy (`val_balanced`, the new version's) when that split is
    imbalanced (largest / smallest class above BALANCE_RATIO), where accuracy would reward ignoring a rare class."""
    current = store.promoted()
    vr = val_ratio(ds) if ds.task != "multi_label" else None
    d = {"policy": request.promote, "new_val_accuracy": val_acc, "current_version": current,
         "current_val_accuracy": None, "metric": "accuracy", "val_ratio": vr}
    if request.promote is True or request.promote is False:
        return {**d, "promote": request.promote, "reason": "requested by the training request"}
    if current is None:
        return {**d, "promote": True, "reason": "no version is promoted yet"}
    cur_path = store.verify(current)
    cur_contract = read_contract(cur_path)
    cur_classes = list(cur_contract.class_names)
    if ds.task == "multi_label" or cur_contract.multi_label:
        return _multilabel_decision(d, request, ds, run, cur_path, cur_contract, val_map)
    if cur_classes == ds.classes:
        scores = onnx_scores(cur_path, ds, run)
        d["current_val_accuracy"] = scores["accuracy"]
        if vr > BALANCE_RATIO and val_balanced is not None:
            return _by_balanced_accuracy(d, val_balanced, scores["balanced_accuracy"])
        ok = val_acc >= scores["accuracy"]
        why = (f"same classes: new {val_acc:.4f} {'>=' if ok else '<'} promoted {current} {scores['accuracy']:.4f} "
               "on the new validation split")
        return {**d, "promote": ok, "reason": why}
    ok = val_acc >= request.min_accuracy
    why = (f"classes differ from {current}: new {val_acc:.4f} {'>=' if ok else '<'} "
           f"min_accuracy {request.min_accuracy:.2f}")
    return {**d, "promote": ok, "reason": why}


def _by_balanced_accuracy(d: dict, new: float, cur: float) -> dict:
    ok = new >= cur
    why = (f"same classes, imbalanced validation split (ratio {d['val_ratio']:g} > {BALANCE_RATIO:g}): new balanced "
           f"accuracy {new:.4f} {'>=' if ok else '<'} promoted {d['current_version']} {cur:.4f}")
    return {**d, "metric": "balanced_accuracy", "new_val_balanced_accuracy": new,
            "current_val_balanced_accuracy": cur, "promote": ok, "reason": why}


def _multilabel_decision(d: dict, request: TrainRequest, ds: Dataset, run: Run | None, cur_path: Path, cur_contract,
                         val_map: float) -> dict:
    """A multi-label version is held to the promoted one by validation mAP when both are multi-label with the
    same labels; otherwise (a change of task or of labels) it needs min_accuracy of mAP."""
    current = d["current_version"]
    d = {**d, "metric": "map", "new_val_map": val_map}
    if ds.task == "multi_label" and cur_contract.multi_label and list(cur_contract.class_names) == ds.classes:
        cur = multilabel_onnx_map(cur_path, ds, run)
        ok = val_map >= cur
        why = (f"same labels: new mAP {val_map:.4f} {'>=' if ok else '<'} promoted {current} {cur:.4f} on the new "
               "validation split")
        return {**d, "current_val_map": cur, "promote": ok, "reason": why}
    ok = (val_map if ds.task == "multi_label" else d["new_val_accuracy"]) >= request.min_accuracy
    figure = "mAP" if ds.task == "multi_label" else "accuracy"
    return {**d, "promote": ok, "reason": f"labels or task differ from {current}: new {figure} "
            f"{'>=' if ok else '<'} min_accuracy {request.min_accuracy:.2f}"}


def multilabel_onnx_map(path: Path, ds: Dataset, run: Run | None = None) -> float:
    """mAP of an existing multi-label version on this dataset's validation split, with its own contract."""
    contract = read_contract(path)
    if run is not None and replace(contract, class_names=(), thresholds=()) == \
            replace(run.contract, class_names=(), thresholds=()):
        arrays = run.val_arrays
    else:
        arrays = np.stack([preprocess(p, contract) for p, _ in ds.val])
    return mean_average_precision(ds.targets("val"), run_onnx(session(path), arrays))
