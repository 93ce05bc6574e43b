"""Class balancing: when the training split is imbalanced, the loss weights each class by a tempered inverse of
its image count, so a rare class is not drowned out by the large ones. What was decided goes into
metrics.json (`balance`)."""
from __future__ import annotations

from typing import Literal, Union

import torch

# `auto` balances when the training split's largest / smallest class count is above this.
BALANCE_RATIO = 1.5
# Weights go as n_c ** -POWER, tempered rather than full inverse frequency (1.0), which over-corrects when the
# rare class has a handful of images: each of 8 images counted as 7 pulls the boundaries into the other classes.
# Measured on flowers5 with each class in turn cut to 8 training images (the head on cached features, 2 seeds):
# rare-class recall 0.14 unbalanced, 0.50 at 0.75, 0.65 at 1.0, but the other classes' accuracy fell 0.9 points
# at 0.75 and 2.8 at 1.0. A balanced sampler (torch's WeightedRandomSampler, 1/n_c per image) lifted the rare
# class less (0.40) and cost the others more (1.8 points): drawn with replacement, an epoch repeats the 8 and
# leaves out part of each large class.
POWER = 0.75


def class_weights(counts) -> torch.Tensor:
    """Loss weights, one per class in index order, proportional to count ** -POWER and with mean 1 (so the
    loss keeps its scale and the learning rate means what it did)."""
    n = torch.tensor([float(c) for c in counts]).clamp_min(1.0)
    w = n.pow(-POWER)
    return w / w.mean()


def ratio(counts) -> float:
    """Largest / smallest class count (classes with no image left out)."""
    sizes = [c for c in counts if c > 0]
    return max(sizes) / min(sizes) if sizes else 1.0


def decide(request_balance: Union[Literal["auto"], bool], counts: dict[str, int]) -> dict:
    """Whether to balance this run, and why: what metrics.json records. `counts`: training images per class, in
    the classes' index order."""
    r = round(ratio(counts.values()), 2)
    if request_balance is True:
        on, why = True, "requested"
    elif request_balance is False:
        on, why = False, "switched off by the request"
    elif r > BALANCE_RATIO:
        on, why = True, f"train ratio {r:g} > {BALANCE_RATIO:g}"
    else:
        on, why = False, f"balanced (ratio {r:g} <= {BALANCE_RATIO:g})"
    weights = class_weights(counts.values()) if on else None
    named = None if weights is None else {c: round(float(w), 4) for c, w in zip(counts, weights, strict=True)}
    return {"on": on, "why": why, "ratio": r, "method": "loss_weights" if on else None, "weights": named}

