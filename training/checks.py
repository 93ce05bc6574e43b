"""Export and check: the ONNX file, held to PyTorch's outputs before anything is published (parity), the
validation figures measured on the file's own outputs, and the INT8 file, served only within 1 point of FP32."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from training.export import CONTRACT_KEY, export_onnx, run_onnx, session, set_metadata, verify_parity
from training.finetune import evaluate, score_key
from training.metrics import best_f1_threshold, classification_report, mean_average_precision, multilabel_report
from training.quantize import MAX_ACCURACY_DROP, calibration_sample, has_vnni, quantize_int8
from training.registry import Backbone
from training.run import Run


@dataclass
class Checked:
    """The exported file and what was measured on it."""
    path: Path
    parity: dict
    report: dict  # classification_report of the validation split: accuracy, per_class, macro_f1, confusion;
    # multi-label: multilabel_report (map, micro_f1, macro_f1, subset_accuracy = accuracy, per_label)
    val_loss: float
    train_acc: float  # at the kept epoch, as training measured it


def export_and_check(run: Run, bb: Backbone, strategy: str, history: list[dict], out: Path,
                     log: Callable) -> Checked:
    """Export `bb` with the run's contract to `out`, check parity, and score the validation split."""
    onnx_path = export_onnx(bb.model, run.contract, out, classifier=bb.classifier)
    parity, val_probs = _parity(run, bb, strategy, onnx_path)
    log(f"onnx parity: top-1 agrees on {parity['top1_agree']}/{parity['images']}, "
        f"max |Δprob| {parity['max_abs_prob_diff']:.2e}")
    if run.multi_label:
        report, val_loss = _multilabel_figures(run, val_probs, onnx_path, log)
        kept = max((r for r in history if "train_acc" in r), key=score_key)
        return Checked(onnx_path, parity, report, val_loss, float(kept["train_acc"]))
    val_loss = float(-np.log(np.clip(val_probs[np.arange(len(val_probs)), run.val_labels], 1e-12, 1)).mean())
    report = classification_report(run.val_labels, val_probs.argmax(1), run.ds.classes)
    # Train accuracy at the kept epoch, as training measured it (on cached features for the head,
    # on the augmented stream while fine-tuning): another full pass would double the export time.
    kept = max((r for r in history if "train_acc" in r), key=lambda r: (r["val_acc"], -r["val_loss"]))
    return Checked(onnx_path, parity, report, val_loss, float(kept["train_acc"]))


def _multilabel_figures(run: Run, val_probs: np.ndarray, onnx_path: Path, log: Callable) -> tuple[dict, float]:
    """Each label's threshold chosen on validation (best F1), written into the run's contract and the file's;
    then the multi-label report at those thresholds and the validation BCE."""
    y = run.val_labels
    thresholds = tuple(best_f1_threshold(val_probs[:, j], y[:, j]) for j in range(y.shape[1]))
    run.contract = replace(run.contract, thresholds=thresholds)
    set_metadata(onnx_path, {CONTRACT_KEY: run.contract.to_json()})
    report = multilabel_report(y, val_probs, thresholds, run.ds.classes)
    p = np.clip(val_probs, 1e-7, 1 - 1e-7)
    val_loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    for name, v in report["per_label"].items():
        log(f"  {name:>20}: AP {v['ap'] if v['ap'] is not None else float('nan'):.3f}  threshold {v['threshold']:.3f}  "
            f"P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f}  ({v['support']} positives)")
    log(f"multi-label: val mAP {report['map']:.4f}, micro F1 {report['micro_f1']:.4f}, macro F1 "
        f"{report['macro_f1']:.4f}, subset accuracy {report['subset_accuracy']:.4f}")
    return report, val_loss


def _parity(run: Run, bb: Backbone, strategy: str, onnx_path: Path) -> tuple[dict, np.ndarray]:
    """Parity: PyTorch against ONNX Runtime on (request.parity_images of) the validation images. Eager
    PyTorch is the slow side on a CPU, so a capped, evenly spread sample keeps retraining fast. Returns the
    parity figures and the validation probabilities the metrics come from."""
    n_val = len(run.val_arrays)
    n_parity = min(run.request.parity_images or n_val, n_val)
    pick = np.unique(np.linspace(0, n_val - 1, n_parity).astype(int))
    torch_probs = evaluate(bb.model, run.val_arrays[pick], run.val_labels[pick])["probs"]
    # Features cached on an accelerator were computed in its half precision (training/device.py): there the
    # figures come from the file's own outputs, as for every strategy that moved the backbone.
    cached = strategy == "feature_extraction" and run.device.type == "cpu"
    head_probs = run.head_val_probs(bb) if cached else None
    if head_probs is None:
        # The exported file runs on every validation image once: the parity sample is taken from that
        # pass, and once parity holds the metrics come from the same outputs, run as serving runs them.
        val_probs = run_onnx(session(onnx_path), run.val_arrays)
        return verify_parity(onnx_path, torch_probs, run.val_arrays[pick], ort_probs=val_probs[pick]), val_probs
    # Frozen backbone: the validation features are cached, and the file computes the same function
    # as backbone + head (the parity check holds it to that), so no second pass over the images.
    return verify_parity(onnx_path, torch_probs, run.val_arrays[pick]), head_probs


def try_int8(fp32_path: Path, out: Path, run: Run, fp32_acc: float, log: Callable) -> dict:
    """Quantize, measure on validation, and choose INT8 for serving only within 1 point of FP32 (of mAP for
    a multi-label version: `fp32_acc` is then its mAP)."""
    t0 = time.time()
    reduce_range = not has_vnni()
    try:
        quantize_int8(fp32_path, out, calibration_sample(run.train_arrays, run.request.seed), reduce_range)
    except Exception as e:  # noqa: BLE001 - INT8 is an optimisation; FP32 is still published
        log(f"int8: quantization failed ({e}); serving FP32")
        out.unlink(missing_ok=True)
        return {"chosen": False, "reason": f"quantization failed: {e}"}
    probs = run_onnx(session(out), run.val_arrays)
    if run.multi_label:
        acc = mean_average_precision(run.val_labels, probs)
    else:
        acc = float((probs.argmax(1) == run.val_labels).mean())
    chosen = fp32_acc - acc <= MAX_ACCURACY_DROP
    metric = "val_map" if run.multi_label else "val_acc"
    reason = (f"int8 {metric} {acc:.4f} vs fp32 {fp32_acc:.4f}: "
              + ("within 1 point, serving int8" if chosen else "more than 1 point lower, serving fp32"))
    log(f"int8: {reason} ({time.time() - t0:.1f}s)")
    if run.multi_label:
        return {"chosen": chosen, "metric": "map", "val_map": acc, "fp32_val_map": fp32_acc, "reason": reason,
                "reduce_range": reduce_range, "seconds": round(time.time() - t0, 2)}
    return {"chosen": chosen, "val_accuracy": acc, "fp32_val_accuracy": fp32_acc, "reason": reason,
            "reduce_range": reduce_range, "seconds": round(time.time() - t0, 2)}
