"""Label problems and train/validation leakage, from the frozen features a training run has cached.

    problems = label_problems(features, labels, classes, files)        # likely mislabeled images
    pairs = near_duplicates(train_features, val_features, train_files, val_files)

Both run on the pretrained backbone's pooled features (`Run.features`), so they cost a few small linear
fits and one matrix product, not another pass over the images (about a second on hymenoptera: see
`metrics.json`'s `seconds`). Both go into every version's `metrics.json`.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.drift import unit

MAX_FOLDS = 5  # k of the k-fold: each image is scored by a head that never saw it
MAX_LISTED = 50  # entries kept in metrics.json per list (the count says how many there were)
# Train/validation pairs at or above this cosine similarity of their features are reported as
# near-duplicates. Measured on hymenoptera with EfficientNet-Lite0 (bench/quality_thresholds.py): of 160
# altered copies of validation photos (re-encoded at quality 60, half size, 10 % cropped, mirrored) 91 %
# score 0.85 or more against their original (mirrored 100 %, cropped 98 %, re-encoded 95 %, half size 70 %:
# the misses are mostly half-size copies of photos that were small already), while the most similar pair
# of distinct photos across train and val scores 0.80 (99.9th percentile of all distinct pairs: 0.72).
# 0.85 finds nearly every copy and no distinct pair. (Features centred on the training mean separate no better:
# the margin was the same.)
NEAR_DUPLICATE_SIMILARITY = 0.85


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per example, each class dealt round-robin over the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _fit_linear(x: torch.Tensor, y: torch.Tensor, outputs: int, loss: Callable,
                weight_decay: float = 1e-3) -> torch.nn.Linear:
    """A linear model fit by L-BFGS on the whole fold: deterministic, converges in well under a second for a
    few hundred images, and the L2 term keeps the probabilities from saturating. `loss`: F.cross_entropy
    (multinomial logistic regression) or F.binary_cross_entropy_with_logits (one-vs-rest, every label at once)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], outputs)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(head(x), y) + weight_decay * head.weight.pow(2).sum()
        value.backward()
        return value

    opt.step(closure)
    return head


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """Each example's class probabilities from a softmax head trained on the other k-1 folds."""
    fold = stratified_folds(labels, k, seed)
    probs = np.zeros((len(labels), n_classes), np.float32)
    for f in range(k):
        tr, te = fold != f, fold == f
        mean, std = features[tr].mean(0), features[tr].std(0) + 1e-6  # standardised: L-BFGS converges faster
        x = torch.from_numpy((features[tr] - mean) / std)
        head = _fit_linear(x, torch.from_numpy(labels[tr]), n_classes, F.cross_entropy)
        with torch.no_grad():
            probs[te] = torch.softmax(head(torch.from_numpy((features[te] - mean) / std)), 1).numpy()
    return probs


def label_problems(features: np.ndarray, labels: np.ndarray, classes: list[str], files: list[dict], *,
                   seed: int = 0) -> dict:
    """Images whose given label the other images disagree with, most suspicious first.

    Confident learning (Northcutt, Jiang and Chuang, JAIR 2021), the method cleanlab implements, in its
    basic form: with out-of-fold probabilities p, each class j gets a threshold t_j, the mean p_j over the
    images labelled j (how confident the model is on its own class, so a hard class is not judged by an
    easy class's standard). An image labelled i is a likely label error when some other class j reaches
    its threshold (p_j >= t_j) and is the most probable such class; j is the suggested label. The list is
    ordered by self-confidence, the probability of the given label (lowest first), and `score` is 1 minus
    it. The few lines here avoid cleanlab's scikit-learn dependency for the one function used.

    `files`: per example, {"path", "sha256", "split"}. Training and validation images are pooled, since a
    wrong label in validation misleads the accuracy figure as much as one in training misleads the model.
    """
    t0 = time.time()
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    k = min(MAX_FOLDS, int(counts.min()))
    if k < 2:
        small = [f"{c} ({n})" for c, n in zip(classes, counts, strict=True) if n < 2]
        return {"available": False, "reason": f"too few images for {MAX_FOLDS}-fold scoring: every class needs at "
                f"least 2 (train and val together); too few in {', '.join(small)}", "items": [], "count": 0}
    probs = out_of_fold_probs(np.asarray(features, np.float32), labels, len(classes), k, seed)
    own = probs[np.arange(len(labels)), labels]
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(len(classes))])
    above = probs >= thresholds
    above[np.arange(len(labels)), labels] = False  # only another class can contradict the given label
    suggested = np.where(above, probs, -1).argmax(1)
    issue = above.any(1)
    order = np.flatnonzero(issue)[np.argsort(own[issue], kind="stable")]
    items = [{**files[i], "given": classes[labels[i]], "suggested": classes[suggested[i]],
              "score": round(float(1 - own[i]), 4)} for i in order[:MAX_LISTED]]
    accuracy = float((probs.argmax(1) == labels).mean())
    return {"available": True, "method": "confident learning on out-of-fold probabilities", "folds": k,
            "count": int(issue.sum()), "images": int(len(labels)), "out_of_fold_accuracy": round(accuracy, 4),
            "thresholds": {c: round(float(t), 4) for c, t in zip(classes, thresholds, strict=True)},
            "items": items, "seconds": round(time.time() - t0, 2)}


def near_duplicates(train_features: np.ndarray, val_features: np.ndarray, train_files: list[dict],
                    val_files: list[dict], threshold: float = NEAR_DUPLICATE_SIMILARITY) -> dict:
    """Validation images that nearly repeat a training image (re-encoded, resized, cropped, mirrored):
    they make validation accuracy look better than it is. Each validation image is paired with its most
    similar training image; pairs at or above `threshold` are listed, most similar first."""
    t0 = time.time()
    if len(train_features) == 0 or len(val_features) == 0:
        return {"threshold": threshold, "count": 0, "items": [], "seconds": 0.0}
    sim = unit(val_features) @ unit(train_features).T
    best = sim.argmax(1)
    best_sim = sim[np.arange(len(best)), best]
    hits = np.flatnonzero(best_sim >= threshold)
    hits = hits[np.argsort(-best_sim[hits], kind="stable")]
    items = [{"val": val_files[v], "train": train_files[best[v]], "similarity": round(float(best_sim[v]), 4)}
             for v in hits[:MAX_LISTED]]
    return {"threshold": threshold, "count": int(len(hits)), "items": items,
            "seconds": round(time.time() - t0, 2)}


def summary_lines(problems: dict, duplicates: dict) -> list[str]:
    """The short report `refit train` prints."""
    if problems.get("available"):
        line = f"label problems: {problems['count']} of {problems['images']} images look mislabeled"
        if problems["items"]:
            top = problems["items"][0]
            line += (f" (most suspicious: {top['path']}, given {top['given']}, suggested {top['suggested']}, "
                     f"score {top['score']:.2f})")
    else:
        line = f"label problems: not checked ({problems['reason']})"
    dup = f"near-duplicates across train/val: {duplicates['count']} (cosine similarity >= {duplicates['threshold']})"
    if duplicates["items"]:
        top = duplicates["items"][0]
        dup += f", e.g. {top['val']['path']} ~ {top['train']['path']} ({top['similarity']:.3f})"
    return [line, dup]


def multilabel_problems(features: np.ndarray, targets: np.ndarray, classes: list[str], files: list[dict], *,
                        seed: int = 0) -> dict:
    """label_problems for multi-label: images with a label that is likely missing or wrong.

    What cleanlab's multilabel_classification.filter.find_label_issues does (confident learning per label,
    one-vs-rest, on out-of-fold probabilities), in numpy: cleanlab is not a dependency of the training image
    (it brings scikit-learn for this one function). Per label j, t1 = the mean p_j over the images that have j
    and t0 = the mean 1 - p_j over those that lack it; an image that has j is suspect when 1 - p_j >= t0, one
    that lacks it when p_j >= t1. `suggested` is the label set with those flipped; `score` is 1 minus the
    lowest self-confidence (p_j of a given label, 1 - p_j of an absent one)."""
    t0 = time.time()
    y = np.asarray(targets, np.float32)
    k = min(MAX_FOLDS, len(y))
    if k < 2 or (y.sum(0) < 2).any():
        return {"available": False, "reason": "too few images: every label needs 2 positives (train and val "
                "together)", "items": [], "count": 0}
    fold = np.random.default_rng(seed).permutation(len(y)) % k
    probs = np.zeros_like(y)
    for f in range(k):
        tr, te = fold != f, fold == f
        mean, std = features[tr].mean(0), features[tr].std(0) + 1e-6
        head = _fit_linear(torch.from_numpy((features[tr] - mean) / std), torch.from_numpy(y[tr]), y.shape[1],
                           F.binary_cross_entropy_with_logits)
        with torch.no_grad():
            probs[te] = torch.sigmoid(head(torch.from_numpy((features[te] - mean) / std))).numpy()
    has = y > 0.5
    t1 = np.array([probs[has[:, j], j].mean() for j in range(y.shape[1])])
    t0_ = np.array([(1 - probs[~has[:, j], j]).mean() if (~has[:, j]).any() else 1.0 for j in range(y.shape[1])])
    flagged = np.where(has, 1 - probs >= t0_, probs >= t1)
    self_conf = np.where(has, probs, 1 - probs).min(1)
    issue = flagged.any(1)
    order = np.flatnonzero(issue)[np.argsort(self_conf[issue], kind="stable")]
    items = [{**files[i], "given": [c for c, h in zip(classes, has[i], strict=True) if h],
              "suggested": [c for c, h, fl in zip(classes, has[i], flagged[i], strict=True) if h != fl],
              "score": round(float(1 - self_conf[i]), 4)} for i in order[:MAX_LISTED]]
    return {"available": True, "method": "confident learning per label (one-vs-rest) on out-of-fold probabilities",
            "folds": k, "count": int(issue.sum()), "images": int(len(y)), "items": items,
            "seconds": round(time.time() - t0, 2)}
