"""Drift: does what the service sees still look like what the model was trained on? numpy only (the serving
image has no torch).

Every version published by training carries a small reference, `drift.npz`: a bounded sample of its
training embeddings (the pooled backbone features the head reads, the model file's `embedding` output),
each validation image's distance to that sample, and the validation label distribution. Two scores compare
a window of recent inputs with it:

- embedding: the window's mean distance to the nearest training embeddings, divided by the same mean over
  the validation images. About 1 for inputs like the training data; photos of other things, drawings or
  noise lie further from every training image.
- labels: total variation distance between the predicted labels in the window and the validation label
  distribution (0 = the same mix, 1 = disjoint).

Each has a threshold for the window's size (`thresholds`), and a window over either is flagged.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

REFERENCE_SIZE = 256  # training embeddings kept per version (256 x 1280 float16: 640 KB for EfficientNet-Lite0)
NEIGHBOURS = 5  # distance to an input = mean cosine distance to its 5 nearest reference embeddings
# The embedding threshold is never below this ratio. Measured on hymenoptera with EfficientNet-Lite0
# (bench/quality_thresholds.py, windows of 32 inputs): 200 windows of validation photos score 0.89 to 1.11;
# windows of photos of other subjects (skimage's astronaut, coffee, cat, rocket, ...) 1.77 to 1.83, line
# drawings 1.71 to 1.75, colour noise 1.89 to 1.90. 1.4 lies between, with room on both sides.
MIN_EMBEDDING_RATIO = 1.4
# Window statistics without drift are simulated from the validation set, and the threshold is their 99.9th
# percentile: one false alarm in a thousand windows of inputs that are like the validation images.
FALSE_ALARM_RATE = 0.001
SIMULATIONS = 4000
MIN_WINDOW = 20  # fewer inputs than this: scores are shown, never flagged (too noisy to mean anything)
FILE = "drift.npz"


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so a dot product is a cosine similarity."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distance(z: np.ndarray, reference: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Per row of `z` (unit length): mean cosine distance to its k nearest reference rows."""
    # einsum, not `@`: numpy's own loop on the calling thread. `@` goes to OpenBLAS, whose thread pool would
    # spin on the cores a model worker shares with onnxruntime (at most a window of 200 rows: about 50 ms).
    d = 1.0 - np.einsum("id,rd->ir", z, reference)
    k = min(k, reference.shape[0])
    return np.partition(d, k - 1, axis=1)[:, :k].mean(1)


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so thresholds can be cached per reference
class Reference:
    embeddings: np.ndarray  # (R, D) unit-length training embeddings (float16 on disk, float32 here)
    val_distances: np.ndarray  # (V,) each validation image's knn_distance
    val_labels: np.ndarray  # (C,) validation label distribution (sums to 1)
    classes: tuple[str, ...]

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        return knn_distance(unit(embeddings), self.embeddings)

    def scores(self, n: int, distance_sum: float, label_counts: np.ndarray) -> dict:
        """Both scores, their thresholds for a window of `n` inputs, and whether drift is flagged."""
        emb = distance_sum / n / float(self.val_distances.mean()) if n else None
        observed = label_counts / n if n else None
        tv = 0.5 * float(np.abs(observed - self.val_labels).sum()) if n else None
        t_emb, t_lab = thresholds(self, n) if n else (None, None)
        flagged = n >= MIN_WINDOW and (emb > t_emb or tv > t_lab)
        return {"embedding": {"score": _r(emb), "threshold": _r(t_emb)},
                "labels": {"score": _r(tv), "threshold": _r(t_lab),
                           "expected": {c: _r(float(p)) for c, p in zip(self.classes, self.val_labels, strict=True)},
                           "observed": None if observed is None else
                           {c: _r(float(p)) for c, p in zip(self.classes, observed, strict=True)}},
                "flagged": bool(flagged)}


def _r(x):
    return None if x is None else round(float(x), 4)


def build_reference(train_embeddings: np.ndarray, val_embeddings: np.ndarray, val_labels: np.ndarray,
                    classes: list[str], seed: int = 0) -> Reference:
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(train_embeddings))[:REFERENCE_SIZE])
    ref = unit(np.asarray(train_embeddings)[pick]).astype(np.float16).astype(np.float32)  # as loaded
    val_d = knn_distance(unit(val_embeddings), ref)
    dist = np.bincount(np.asarray(val_labels, np.int64), minlength=len(classes)) / max(1, len(val_labels))
    return Reference(ref, val_d.astype(np.float32), dist.astype(np.float64), tuple(classes))


def save_reference(ref: Reference, path: Path | str) -> Path:
    with open(path, "wb") as f:
        np.savez_compressed(f, embeddings=ref.embeddings.astype(np.float16), val_distances=ref.val_distances,
                            val_labels=ref.val_labels, classes=np.array(ref.classes))
    return Path(path)


def load_reference(path: Path | str) -> Reference | None:
    """The version's reference, or None when it has none (published before drift monitoring)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Reference(z["embeddings"].astype(np.float32), z["val_distances"], z["val_labels"],
                             tuple(str(c) for c in z["classes"]))
    except FileNotFoundError:
        return None


@lru_cache(maxsize=256)
def _thresholds(ref: Reference, n: int) -> tuple[float, float]:
    rng = np.random.default_rng(n)
    d = ref.val_distances
    means = d[rng.integers(0, len(d), (SIMULATIONS, n))].mean(1) / d.mean()
    t_emb = max(MIN_EMBEDDING_RATIO, float(np.quantile(means, 1 - FALSE_ALARM_RATE)))
    draws = rng.multinomial(n, ref.val_labels / ref.val_labels.sum(), SIMULATIONS) / n
    tv = 0.5 * np.abs(draws - ref.val_labels).sum(1)
    return t_emb, float(np.quantile(tv, 1 - FALSE_ALARM_RATE))


def thresholds(ref: Reference, n: int) -> tuple[float, float]:
    """(embedding, labels) thresholds for a window of n inputs: the 99.9th percentile of the statistic over
    windows of n validation images drawn at random (so a window that looks like validation data trips it
    once in a thousand), the embedding one never under MIN_EMBEDDING_RATIO."""
    return _thresholds(ref, n)
