"""Augmentation for training, on top of the one decode path (core/preprocess.py) and its contract."""
from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from core.contract import Contract
from core.preprocess import eval_array


def train_transform(contract: Contract, augment: bool = True):
    """Augmentation for training: random resized crop, horizontal flip, light colour jitter."""
    interp = T.InterpolationMode(contract.interpolation)
    if not augment:
        return lambda im: torch.from_numpy(eval_array(im, contract))
    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop(contract.input_size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(contract.mean), std=list(contract.std)),
    ])
