"""What a run leaves in its version: metrics.json, config.json, dataset.json, results.csv and the confusion
matrix beside the model files, and the version's metadata; then the atomic publish that stamps the version id
into the ONNX files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.contract import Contract
from core.drift import FILE as DRIFT_FILE
from core.store import Store, sha256_file
from training.checks import Checked
from training.choose import Fitted
from training.device import record
from training.export import CAM_FILE, CONTRACT_KEY, VERSION_KEY, set_metadata
from training.metrics import save_confusion_png, save_results_csv
from training.run import Run
from training.software import software

# The files a version may hold, in the order they are listed; those a run did not make are left out.
VERSION_FILES = ("model.onnx", "metrics.json", "config.json", "dataset.json", "results.csv", "confusion_matrix.png",
                 "model.int8.onnx", DRIFT_FILE, CAM_FILE)


@dataclass
class Evaluation:
    """What is decided and found after the export: INT8, promotion, label findings and the drift reference."""
    int8: dict | None
    decision: dict
    fingerprint: dict  # dataset.json: what was trained on
    problems: dict
    duplicates: dict
    drift: dict


def metrics_record(run: Run, fitted: Fitted, checked: Checked, ev: Evaluation, lineage: dict | None) -> dict:
    """metrics.json."""
    ds, report = run.ds, checked.report
    metrics = {
        "val_accuracy": report["accuracy"], "train_accuracy": checked.train_acc,
        "train_val_gap": checked.train_acc - report["accuracy"], "val_loss": checked.val_loss,
        "balanced_accuracy": report.get("balanced_accuracy"), "balance": run.balance,
        "per_class": report.get("per_class"), "macro_f1": report["macro_f1"],
        "confusion_matrix": report.get("confusion_matrix"), "classes": ds.classes,
        "strategy": fitted.strategy, "auto": fitted.auto, "parity": checked.parity,
        "train_seconds": round(fitted.seconds, 2), "history": fitted.history, "counts": ds.counts(),
        "skipped": ds.skipped, "warnings": ds.warnings, "promotion": ev.decision, "int8": ev.int8,
        "lineage": lineage, "label_problems": ev.problems, "near_duplicates": ev.duplicates, "drift": ev.drift,
    }
    if run.multi_label:
        # The per-label figures in place of the single-label ones (there is no confusion matrix of labels).
        for k in ("balanced_accuracy", "per_class", "confusion_matrix"):
            metrics.pop(k)
        metrics.update(task="multi_label", val_map=report["map"], val_micro_f1=report["micro_f1"],
                       subset_accuracy=report["subset_accuracy"], per_label=report["per_label"],
                       thresholds=dict(zip(ds.classes, run.contract.thresholds, strict=True)))
    metrics["software"] = software()
    metrics["device"] = record(run.device, run.request.device)
    return metrics


def config_record(run: Run, strategy: str) -> dict:
    """config.json: the request as resolved, with what the run chose."""
    return {**run.request.model_dump(), "resolved": {"strategy": strategy, "contract": json.loads(
        run.contract.to_json()), "train_images": len(run.ds.train), "val_images": len(run.ds.val),
        "device": run.device.type}}


def write_artifacts(folder: Path, run: Run, fitted: Fitted, checked: Checked, ev: Evaluation,
                    lineage: dict | None) -> tuple[dict[str, Path], dict]:
    """Write the records beside the model files in `folder`; returns the version's files and the metrics."""
    metrics = metrics_record(run, fitted, checked, ev, lineage)
    for name, obj in (("metrics.json", metrics), ("config.json", config_record(run, fitted.strategy)),
                      ("dataset.json", ev.fingerprint)):
        (folder / name).write_text(json.dumps(obj, indent=2, default=str))
    save_results_csv(fitted.history, folder / "results.csv")
    report = checked.report
    if not run.multi_label:
        save_confusion_png(report["confusion_matrix"], run.ds.classes, folder / "confusion_matrix.png",
                           f"{fitted.strategy}: val acc {report['accuracy']:.3f}")
    return {n: folder / n for n in VERSION_FILES if (folder / n).is_file()}, metrics


def version_meta(run: Run, fitted: Fitted, checked: Checked, ev: Evaluation, *, parent: str | None, actor: str,
                 lineage: dict | None, job_id: str | None) -> dict:
    """The version's metadata in the store (what `refit versions` and `/versions` list)."""
    request = run.request
    return {"strategy": fitted.strategy, "backbone": request.backbone, "parent": parent, "classes": run.ds.classes,
            "val_accuracy": checked.report["accuracy"], "train_seconds": round(fitted.seconds, 2),
            "parity_max_abs_diff": checked.parity["max_abs_prob_diff"], "promotion": ev.decision, "actor": actor,
            "dataset_hash": ev.fingerprint["content_hash"], "note": request.note or "",
            "precision": "int8" if ev.int8 and ev.int8["chosen"] else "fp32", "lineage": lineage,
            "job": job_id, "why": fitted.auto.get("summary", ""),
            **({"task": "multi_label", "val_map": checked.report["map"]} if run.multi_label else {})}


def publish_version(store: Store, files: dict[str, Path], contract: Contract, meta: dict) -> str:
    """Publish atomically; the version id is written into the ONNX file and its checksum recorded."""
    onnx_file = files["model.onnx"]

    int8_file = files.get("model.int8.onnx")

    def stamp(version: str) -> dict:
        for f in filter(None, (onnx_file, int8_file)):
            set_metadata(f, {VERSION_KEY: version, CONTRACT_KEY: contract.to_json()})
        digest = sha256_file(onnx_file)
        serving = int8_file if int8_file is not None and meta.get("precision") == "int8" else onnx_file
        return {"onnx_sha256": digest, "serving_file": serving.name, "serving_sha256": sha256_file(serving),
                "num_classes": len(contract.class_names)}

    return store.publish(files, meta, labels={"strategy": meta.get("strategy", ""),
                                              "backbone": meta.get("backbone", "")}, stamp=stamp)
