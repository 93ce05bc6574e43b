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
    if any("val_map" in row for row in history):  # multi-label: val_acc is the subset accuracy, mAP beside it
        cols.append("val_map")
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


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """The area under the precision-recall curve as scikit-learn's average_precision_score computes it: the
    precision at each threshold weighted by the recall it adds (tied scores are one threshold). NaN without
    a positive."""
    positive = np.asarray(positive) > 0.5
    if not positive.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each run of tied scores
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The probability threshold (predict the label when score >= it) with the best F1 on these images; of
    equal F1s the lower threshold. 0.5 for a label without a positive here (nothing to choose it on)."""
    positive = np.asarray(positive) > 0.5
    if not positive.any():
        return 0.5
    candidates = np.unique(np.asarray(scores, np.float64))  # ascending: argmax keeps the first, the lowest
    pred = np.asarray(scores, np.float64)[None, :] >= candidates[:, None]
    tp = (pred & positive).sum(1)
    f1 = 2 * tp / (pred.sum(1) + positive.sum())
    best = int(np.argmax(f1))
    # Halfway to the next lower score, not the score itself: the same decisions on these images, and a served
    # file whose probability differs from training's in the 7th digit (another pooling kernel) makes them too.
    below = candidates[best - 1] if best > 0 else 0.0
    return float((candidates[best] + below) / 2)


def multilabel_report(targets: np.ndarray, probs: np.ndarray, thresholds, classes: list[str]) -> dict:
    """Per label: AP, and precision, recall and F1 at its threshold (with the threshold and the positives);
    then mAP (over the labels with a positive), micro and macro F1, and subset accuracy (every label right).
    `accuracy` is the subset accuracy, the figure a multi-label version's val_accuracy carries."""
    y = np.asarray(targets) > 0.5
    pred = np.asarray(probs) >= np.asarray(thresholds, np.float64)[None, :]
    per_label, aps = {}, []
    for j, c in enumerate(classes):
        p, t = pred[:, j], y[:, j]
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        ap = average_precision(probs[:, j], y[:, j])
        if not np.isnan(ap):
            aps.append(ap)
        per_label[c] = {"ap": None if np.isnan(ap) else round(ap, 4), **_prf(tp, fp, fn),
                        "threshold": round(float(thresholds[j]), 4), "support": int(y[:, j].sum())}
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    subset = float((pred == y).all(1).mean()) if len(y) else 0.0
    return {"map": float(np.mean(aps)) if aps else 0.0, "micro_f1": _prf(tp, fp, fn)["f1"],
            "macro_f1": round(float(np.mean([v["f1"] for v in per_label.values()])), 4),
            "subset_accuracy": subset, "accuracy": subset, "per_label": per_label}


def _prf(tp: int, fp: int, fn: int) -> dict:
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4)}


def mean_average_precision(targets: np.ndarray, probs: np.ndarray) -> float:
    """mAP over the labels with a positive among these images."""
    aps = [average_precision(probs[:, j], targets[:, j]) for j in range(targets.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else 0.0
