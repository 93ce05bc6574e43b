"""`Run`: what one training run shares between strategies: the data, decoded once, the cached frozen
features, and `Run.run(strategy)`, which trains one strategy (head on cached features, then fine-tuning)."""
from __future__ import annotations

import copy
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.config import TrainRequest
from core.contract import Contract
from core.data import Dataset
from core.preprocess import Prepared, load_image, prepare
from core.progress import Progress
from training.activations import ViewCache, activation_bytes, limit_bytes, prefix_outputs, prefix_session, split_model
from training.augment import train_transform
from training.balance import class_weights, decide
from training.device import TorchSession, resolve_device
from training.finetune import (
    STRATEGIES,
    ImageListDataset,
    apply_strategy,
    extract_features,
    fine_tune,
    fit_head,
    fit_multilabel_head,
)
from training.heads import INPUT_SCALE, install_region_head
from training.metrics import mean_average_precision
from training.registry import Backbone, create_backbone, get_module


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_contract(request: TrainRequest, task: str = "single_label") -> Contract:
    """The backbone's preprocessing contract, at the request's image size (no classes yet); a multi-label run
    without one takes INPUT_SCALE times the backbone's own (training/heads.py: its objects are smaller)."""
    contract = create_backbone(request.backbone, num_classes=None, pretrained=False).contract
    if request.image_size:
        return contract.with_input_size(request.image_size)
    if task == "multi_label":
        return contract.with_input_size(contract.input_size * INPUT_SCALE)
    return contract


class Run:
    """What one training run shares between strategies: the data, decoded once, and cached features."""

    def __init__(self, request: TrainRequest, ds: Dataset, log: Callable, cache_dir: Path,
                 progress: Progress | None = None, device: torch.device | None = None):
        self.request, self.ds, self.log, self.cache_dir = request, ds, log, cache_dir
        # Where fitting and fine-tuning run (training/device.py); between steps every model is on the CPU.
        self.device = device if device is not None else resolve_device(request.device)
        self.progress = progress or Progress()
        self.progress.set_images(len(ds.val))
        self.multi_label = ds.task == "multi_label"
        self.contract = replace(input_contract(request, ds.task).with_classes(ds.classes), task=ds.task)
        size = self.contract.input_size
        if any(kept.array.shape[-1] != size for kept in ds.decoded.values()):
            ds.decoded.clear()  # decoded by a caller at another size (a fixed contract, before the task was known)
        t0 = time.time()

        def image(path) -> Prepared:  # decoded by the dataset check already, unless it ran without this contract
            kept = ds.decoded.pop(path, None)
            return kept if kept is not None else prepare(load_image(path, self.contract), self.contract)

        # Each image decoded once (at reduced JPEG scale, exactly as serving does); what is kept is bounded
        # by the contract (Prepared), so memory grows with the number of images, not their resolution.
        train = [image(p) for p, _ in ds.train]
        self.train_images = [t.image for t in train]
        self.train_labels = [y for _, y in ds.train]
        self.train_arrays = np.stack([t.array for t in train])
        del train  # the per-image arrays: stacked above
        self.val_arrays = np.stack([image(p).array for p, _ in ds.val])
        # Multi-label: multi-hot rows (images x labels), which every loss and metric here tells by their shape.
        self.val_labels = ds.targets("val") if self.multi_label else np.array([y for _, y in ds.val], dtype=np.int64)
        if self.multi_label:
            self.train_labels = list(ds.targets("train"))
        log(f"preprocessed {len(self.train_images)} train + {len(self.val_arrays)} val images in "
            f"{time.time() - t0:.1f}s")
        self._decide_balance(request, log)
        self._features = None
        self._aug_images = None

    def _decide_balance(self, request: TrainRequest, log: Callable) -> None:
        """Class weights, decided once from the training split; every strategy's training loss takes the same.
        Multi-label: plain BCE. A `pos_weight` of negatives / positives per label was measured on the collage set
        (7 labels, 55 to 86 positives of 300; region head at 448 px, 3 seeds): mAP 0.8256 against 0.8239 without,
        0.8235 with its square root, all within the seeds' spread of 0.5 points, so it is not the default."""
        self.class_weights, self.pos_weight = None, None
        if self.multi_label:
            self.balance = {"on": False, "why": "multi-label: BCE without pos_weight (measured: within noise)",
                            "ratio": None, "method": None, "weights": None}
            log(f"balance: off ({self.balance['why']})")
            return
        counts = {c: self.train_labels.count(i) for i, c in enumerate(self.ds.classes)}
        self.balance = decide(request.balance, counts)
        self.class_weights = class_weights(counts.values()) if self.balance["on"] else None
        log(f"balance: {'on' if self.balance['on'] else 'off'} ({self.balance['why']})")

    @property
    def aug_images(self) -> list:
        """Training crops are taken from a copy no larger than needed, which keeps augmentation cheap;
        made on first use, since feature extraction never augments. It replaces the kept images."""
        if self._aug_images is None:
            self._aug_images = [_shrink(im, self.contract.resize_size) for im in self.train_images]
            self.train_images = self._aug_images
        return self._aug_images

    @property
    def has_features(self) -> bool:
        """Whether a strategy cached the frozen pretrained features (all but `scratch` do)."""
        return self._features is not None

    def features(self, bb: Backbone):
        """Frozen pretrained features of train and val images, computed once. (Mirrored copies of the
        training images were tried as augmentation: the same validation accuracy on hymenoptera for
        twice the extraction time.)"""
        if self._features is None:
            t0 = time.time()
            cache = self.cache_dir
            tr = extract_features(bb, self.train_arrays, cache, desc="features train", device=self.device)
            va = extract_features(bb, self.val_arrays, cache, desc="features val", device=self.device)
            ty = torch.from_numpy(np.stack(self.train_labels)) if self.multi_label else torch.tensor(self.train_labels)
            self._features = (tr, ty, va, torch.from_numpy(self.val_labels))
            self.log(f"cached features {tuple(tr.shape)} + {tuple(va.shape)} in {time.time() - t0:.1f}s")
        return self._features

    def head_val_probs(self, bb: Backbone) -> np.ndarray | None:
        """Validation probabilities from the cached frozen features through `bb`'s head (None: no cache)."""
        if self._features is None:
            return None
        head = get_module(bb.model, bb.classifier).eval()
        with torch.no_grad():
            logits = head(self._features[2])
            return (torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)).numpy()

    def head_eval(self, bb: Backbone) -> dict:
        """Validation loss and accuracy (multi-label: subset accuracy, and mAP) of `bb`'s head on the cached
        frozen features: the same numbers as running the whole network on the images, without running it."""
        probs = self.head_val_probs(bb)
        y = self.val_labels
        if self.multi_label:
            p = np.clip(probs, 1e-7, 1 - 1e-7)
            return {"val_acc": float(((probs >= 0.5) == (y > 0.5)).all(1).mean()),
                    "val_map": mean_average_precision(y, probs),
                    "val_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())}
        return {"val_acc": float((probs.argmax(1) == y).mean()),
                "val_loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean())}

    def backbone(self, pretrained: bool) -> Backbone:
        bb = create_backbone(self.request.backbone, num_classes=len(self.ds.classes), pretrained=pretrained,
                             weights=self.request.weights if pretrained else None)
        if self.multi_label:
            install_region_head(bb.model, bb.classifier, len(self.ds.classes))
        return bb

    def run(self, name: str, start: Backbone | None = None, *, budget: float | None = None,
            trial: Callable[[list[dict]], str | None] | None = None) -> tuple[Backbone, list[dict], dict]:
        """Train one strategy. `start` continues from an already warmed-up model (used by auto), within
        `budget` seconds and while `trial` finds no reason to stop (see fine_tune)."""
        r, spec = self.request, STRATEGIES[name]
        seed_everything(r.seed)
        t0 = time.time()
        bb = copy.deepcopy(start) if start is not None else self.backbone(spec.pretrained)
        groups, summary = apply_strategy(bb, spec, lr=r.lr, backbone_lr=r.backbone_lr,
                                         unfreeze_blocks=min(r.unfreeze_blocks, len(bb.stages)), log=self.log)
        history: list[dict] = []
        if start is None and (spec.trainable == "head" or spec.warmup):
            self.progress.phase("features")
            tr, ty, va, vy = self.features(bb)
            self.progress.phase("head", epochs=r.head_epochs)
            history += self._fit_head(bb, tr, ty, va, vy)
        if spec.trainable != "head":
            self.progress.phase(name, epochs=r.epochs, budget=budget)
            train_ds, model, val_inputs, cache = self._tuning_inputs(bb, spec, summary)
            tuned, kept = fine_tune(bb, groups, train_ds, val_inputs, self.val_labels, epochs=r.epochs,
                                    batch_size=r.batch_size, weight_decay=r.weight_decay,
                                    label_smoothing=r.label_smoothing, patience=r.patience, seed=r.seed,
                                    phase=name, warm_started=spec.pretrained, log=self.log, model=model,
                                    budget=budget, trial=trial, progress=self.progress,
                                    class_weights=self.class_weights, device=self.device)
            history += tuned
            summary["kept"] = kept
            if cache is not None:
                summary["activation_cache"].update(views_made=cache.made, bytes=cache.nbytes,
                                                   view_seconds=round(cache.seconds, 2))
                self.log(f"activation cache: {cache.made} view(s) of {len(cache)} images, "
                         f"{cache.nbytes / 2**20:.0f} MB, made in {cache.seconds:.1f}s")
        summary["seconds"] = round(time.time() - t0, 2)
        return bb, history, summary

    def _fit_head(self, bb: Backbone, tr, ty, va, vy) -> list[dict]:
        r, head = self.request, get_module(bb.model, bb.classifier)
        if self.multi_label:
            return fit_multilabel_head(head, tr, ty, va, vy, lr=r.lr, weight_decay=r.weight_decay,
                                       epochs=r.head_epochs, batch_size=r.batch_size, seed=r.seed, log=self.log,
                                       progress=self.progress, pos_weight=self.pos_weight, device=self.device)
        return fit_head(head, tr, ty, va, vy, lr=r.lr, weight_decay=r.weight_decay,
                        label_smoothing=r.label_smoothing, epochs=r.head_epochs, batch_size=r.batch_size,
                        seed=r.seed, log=self.log, progress=self.progress, class_weights=self.class_weights,
                        device=self.device)

    def _tuning_inputs(self, bb: Backbone, spec, summary: dict):
        """What fine-tuning runs on: for `partial`, the unfrozen tail on cached activations of the frozen
        stages (training/activations.py) when the cut is known and the cache fits its memory bound; else,
        the whole network on augmented images. Returns (dataset, model, validation inputs, cache or None)."""
        r = self.request
        transform = train_transform(self.contract, r.augment)
        whole = (ImageListDataset(self.aug_images, self.train_labels, transform), None, self.val_arrays, None)
        if spec.trainable != "last_n" or r.cache_views == 0:
            return whole
        split = split_model(bb, summary["unfrozen_stages"])
        if split is None:
            self.log(f"activation cache: {bb.name}'s forward pass cannot be cut before its unfrozen stages; "
                     "fine-tuning runs the whole network every step")
            return whole
        views = r.cache_views if r.augment else 1  # without augmentation every view is the same
        size = self.contract.input_size
        need = activation_bytes(split, size, len(self.train_labels), views) + \
            activation_bytes(split, size, len(self.val_labels), 1)
        limit = limit_bytes()
        summary["activation_cache"] = {"views": views, "cut_after": split.name, "planned_bytes": need,
                                       "limit_bytes": limit}
        if need > limit:
            self.log(f"activation cache: {views} views of {len(self.train_labels)} images would need "
                     f"{need / 2**20:.0f} MB, over the limit of {limit / 2**20:.0f} MB "
                     "(REFIT_ACTIVATION_CACHE_MB, at most half the available memory); fine-tuning runs the "
                     "whole network every step instead")
            summary["activation_cache"]["used"] = False
            return whole
        t0 = time.time()
        # The frozen prefix in ONNX Runtime on the CPU; on an accelerator in torch there (its modules go back to
        # the CPU with the backbone when fine-tuning ends).
        sess = prefix_session(bb, split, size, self.cache_dir, threads=torch.get_num_threads()) \
            if self.device.type == "cpu" else TorchSession(split.prefix, self.device)
        val_acts = prefix_outputs(sess, self.val_arrays)
        cache = ViewCache(split, sess, self.aug_images, np.stack(self.train_labels) if self.multi_label
                          else self.train_labels, transform, views=views, seed=r.seed,
                          log=self.log)
        summary["activation_cache"]["used"] = True
        self.log(f"activation cache: frozen stages up to {split.name} run once per view; {views} view(s) of "
                 f"{len(self.train_labels)} images planned, {need / 2**20:.0f} MB (limit {limit / 2**20:.0f} MB); "
                 f"validation activations in {time.time() - t0:.1f}s")
        return cache, split.tail, val_acts, cache


def _shrink(im, size: int):
    w, h = im.size
    s = size / min(w, h)
    return im if s >= 1 else im.resize((max(1, round(w * s)), max(1, round(h * s))))
