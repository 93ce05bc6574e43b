"""Classification metrics for a version: accuracy, balanced accuracy, per-class precision/recall/F1, confusion
matrix."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        prec = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        rec = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {"precision": round(float(prec), 4), "recall": round(float(rec), 4),
                        "f1": round(float(f1), 4), "support": int(cm[i, :].sum())}
    return {"accuracy": float(np.trace(cm) / max(1, cm.sum())), "per_class": per_class,
            "balanced_accuracy": balanced_accuracy(cm),
            "macro_f1": round(float(np.mean([v["f1"] for v in per_class.values()])), 4),
            "confusion_matrix": cm.tolist()}


def balanced_accuracy(cm) -> float:
    """Mean recall over the classes with images in the split (rows of the confusion matrix): accuracy as if
    every class counted alike, so a model that ignores a rare class cannot hide behind the large ones."""
    cm = np.asarray(cm)
    support = cm.sum(1)
    has = support > 0
    return float(np.mean(np.diag(cm)[has] / support[has])) if has.any() else 0.0


def save_results_csv(history: list[dict], path: Path) -> None:
    """One row per epoch (Ultralytics' results.csv): epoch, phase, time, then the metrics."""
    cols = ["epoch", "phase", "time", "train_loss", "train_acc", "val_loss", "val_acc"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({c: (round(row[c], 5) if isinstance(row.get(c), float) else row.get(c)) for c in cols})


def save_confusion_png(cm: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm_a = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * n + 2), max(3, 0.6 * n + 1.5)), dpi=100)
    ax.imshow(cm_a, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm_a[i, j]), ha="center", va="center",
                        color="white" if cm_a[i, j] > cm_a.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
