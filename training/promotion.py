"""The promotion decision: is a new version at least as good as the promoted one (same classes, measured on
the new validation split with the promoted version's own contract) or good enough (new classes)?"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.config import TrainRequest
from core.data import Dataset
from core.preprocess import preprocess
from core.store import Store
from training.export import read_contract, run_onnx, session
from training.run import Run


def evaluate_onnx_on(path: Path, ds: Dataset, run: Run | None = None) -> float:
    """Accuracy of an existing version on this dataset's validation split, with that version's contract
    (the run's preprocessed arrays are reused when the preprocessing is the same)."""
    contract = read_contract(path)
    if run is not None and replace(contract, class_names=()) == replace(run.contract, class_names=()):
        arrays = run.val_arrays
    else:
        arrays = np.stack([preprocess(p, contract) for p, _ in ds.val])
    probs = run_onnx(session(path), arrays)
    names = list(contract.class_names)
    pred = [names[i] for i in probs.argmax(1)]
    return float(np.mean([pred[i] == ds.classes[y] for i, (_, y) in enumerate(ds.val)]))


def promotion_decision(request: TrainRequest, store: Store, ds: Dataset, val_acc: float,
                       run: Run | None = None) -> dict:
    current = store.promoted()
    d = {"policy": request.promote, "new_val_accuracy": val_acc, "current_version": current,
         "current_val_accuracy": None}
    if request.promote is True or request.promote is False:
        return {**d, "promote": request.promote, "reason": "requested by the training request"}
    if current is None:
        return {**d, "promote": True, "reason": "no version is promoted yet"}
    cur_path = store.verify(current)
    cur_classes = list(read_contract(cur_path).class_names)
    if cur_classes == ds.classes:
        cur_acc = evaluate_onnx_on(cur_path, ds, run)
        d["current_val_accuracy"] = cur_acc
        ok = val_acc >= cur_acc
        why = (f"same classes: new {val_acc:.4f} {'>=' if ok else '<'} promoted {current} {cur_acc:.4f} "
               "on the new validation split")
        return {**d, "promote": ok, "reason": why}
    ok = val_acc >= request.min_accuracy
    why = (f"classes differ from {current}: new {val_acc:.4f} {'>=' if ok else '<'} "
           f"min_accuracy {request.min_accuracy:.2f}")
    return {**d, "promote": ok, "reason": why}
