"""Fine-tuning modes as data, and the plain training functions.

`feature_extraction` freezes the backbone and fits a new head on cached features (seconds);
`partial` and `full` warm the head up the same way, then unfreeze the last stages or everything at a
lower learning rate; `scratch` trains the same architecture from random initialisation as the baseline
that shows what transfer buys.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.device import CPU, TorchSession, autocast, grad_scaler
from training.export import feature_body, feature_session
from training.metrics import mean_average_precision
from training.registry import Backbone, get_module


@dataclass(frozen=True)
class StrategySpec:
    name: str
    pretrained: bool  # start from ImageNet weights
    trainable: str  # "head" | "last_n" | "all"
    warmup: bool  # fit the head on cached features before unfreezing anything


STRATEGIES: dict[str, StrategySpec] = {
    "feature_extraction": StrategySpec("feature_extraction", True, "head", False),
    "partial": StrategySpec("partial", True, "last_n", True),
    "full": StrategySpec("full", True, "all", True),
    "scratch": StrategySpec("scratch", False, "all", False),
}


def apply_strategy(bb: Backbone, spec: StrategySpec, *, lr: float, backbone_lr: float,
                   unfreeze_blocks: int, log: Callable = print) -> tuple[list[dict], dict]:
    """Set requires_grad by strategy and return optimiser parameter groups plus a summary to record."""
    model = bb.model
    head = get_module(model, bb.classifier)
    for p in model.parameters():
        p.requires_grad_(spec.trainable == "all")
    for p in head.parameters():
        p.requires_grad_(True)
    unfrozen: list[str] = []
    if spec.trainable == "last_n":
        unfrozen = bb.stages[-unfreeze_blocks:]
        for name in unfrozen:
            for p in get_module(model, name).parameters():
                p.requires_grad_(True)
    elif spec.trainable == "all":
        unfrozen = list(bb.stages)
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    # From scratch there is nothing to protect, so the whole network takes the head's learning rate.
    body_lr = lr if not spec.pretrained else backbone_lr
    groups = [{"params": list(head.parameters()), "lr": lr, "name": "head"}]
    if body:
        groups.append({"params": body, "lr": body_lr, "name": "backbone"})
    n_train = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters())
    summary = {"strategy": spec.name, "trainable_params": n_train, "total_params": n_all,
               "unfrozen_stages": unfrozen, "head_lr": lr, "backbone_lr": body_lr if body else 0.0}
    log(f"{spec.name}: {n_train:,} of {n_all:,} parameters trainable"
        + (f" ({len(unfrozen)} stages unfrozen: {unfrozen[0]} .. {unfrozen[-1]})" if unfrozen else " (head only)"))
    return groups, summary


def set_train_mode(model: nn.Module) -> None:
    """train() everywhere except BatchNorm layers whose weights are frozen: their running statistics
    stay the pretrained ones, otherwise a small batch would overwrite ImageNet statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


def extract_features(bb: Backbone, arrays: np.ndarray, cache_dir: Path, batch_size: int = 8,
                     desc: str = "features", device: torch.device = CPU) -> torch.Tensor:
    """Penultimate features (the classifier's input) of preprocessed images, computed once per run.

    On the CPU the frozen backbone runs in ONNX Runtime, several times faster than eager PyTorch there, so
    feature extraction takes seconds; the feature graph is exported once per backbone and input size and kept
    in `cache_dir`. On an accelerator it runs in torch on the device (training/device.py), in larger batches."""
    if device.type == "cpu":
        sess = feature_session(bb, arrays.shape[-1], cache_dir)
    else:
        sess, batch_size = TorchSession(feature_body(bb), device), 128
    out = []
    for i in tqdm(range(0, len(arrays), batch_size), desc=desc, leave=False, unit="batch", disable=None):
        out.append(sess.run(None, {"input": arrays[i:i + batch_size]})[0])
    return torch.from_numpy(np.concatenate(out))


def fit_head(head: nn.Linear, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
             val_y: torch.Tensor, *, lr: float, weight_decay: float, label_smoothing: float, epochs: int,
             batch_size: int, seed: int, dropout: float = 0.2, patience: int = 25, log: Callable = print,
             progress=None, class_weights: torch.Tensor | None = None, device: torch.device = CPU) -> list[dict]:
    """Fit a linear head on cached features with early stopping on validation; best epoch restored.
    `class_weights` (training/balance.py) weight the training loss per class; validation loss is unweighted.
    On `device` (the features copied there; the head back on the CPU when done)."""
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    class_weights = class_weights.to(device) if class_weights is not None else None

    def loss(logits, y):
        return F.cross_entropy(logits, y, weight=class_weights, label_smoothing=label_smoothing)

    @torch.no_grad()
    def scores() -> dict:
        head.eval()
        tr_logits, va_logits = head(train_x), head(val_x)
        return {"train_acc": (tr_logits.argmax(1) == train_y).float().mean().item(),
                "val_loss": F.cross_entropy(va_logits, val_y).item(),
                "val_acc": (va_logits.argmax(1) == val_y).float().mean().item()}

    history, t0 = _fit(head, train_x, train_y, loss, scores, "val_acc", lr=lr, weight_decay=weight_decay,
                       epochs=epochs, batch_size=batch_size, seed=seed, dropout=dropout, patience=patience,
                       progress=progress, device=device)
    b = max(history, key=score_key)
    log(f"head: best epoch {b['epoch']}/{len(history)} val_acc {b['val_acc']:.4f} train_acc {b['train_acc']:.4f} "
        f"({time.time() - t0:.1f}s)")
    return history


def score_key(row: dict) -> tuple[float, float]:
    """What validation rows are compared by: accuracy (mAP for a multi-label row), then lower loss."""
    return row.get("val_map", row["val_acc"]), -row["val_loss"]


def _fit(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, loss: Callable, scores: Callable,
         shown: str, *, lr: float, weight_decay: float, epochs: int, batch_size: int, seed: int, dropout: float,
         patience: int, progress, device: torch.device = CPU) -> tuple[list[dict], float]:
    """The head's loop, for either task: AdamW with a cosine schedule over shuffled batches of the cached
    features (dropout on them), `scores()` after each epoch, early stopping by `score_key`, the best epoch's
    weights restored. Returns the history and when it started. The features are on `device` already; the head
    goes there for the loop and back to the CPU after it, in float32 on any device (one linear layer)."""
    head.to(device)
    try:
        return _fit_loop(head, train_x, train_y, loss, scores, shown, lr=lr, weight_decay=weight_decay,
                         epochs=epochs, batch_size=batch_size, seed=seed, dropout=dropout, patience=patience,
                         progress=progress)
    finally:
        head.to(CPU)


def _fit_loop(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, loss: Callable, scores: Callable,
              shown: str, *, lr: float, weight_decay: float, epochs: int, batch_size: int, seed: int,
              dropout: float, patience: int, progress) -> tuple[list[dict], float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best, best_state, history, since, t0 = None, None, [], 0, time.time()
    for epoch in range(1, epochs + 1):
        head.train()
        perm = torch.randperm(len(train_x), generator=g)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size].to(train_x.device)
            x = train_x[idx]
            x = head.dropout(x, dropout) if hasattr(head, "dropout") else F.dropout(x, dropout, training=True)
            step = loss(head(x), train_y[idx])
            opt.zero_grad()
            step.backward()
            opt.step()
            total += step.item() * len(idx)
        sched.step()
        row = {"epoch": epoch, "phase": "head", "time": round(time.time() - t0, 3),
               "train_loss": total / len(train_x), **scores()}
        history.append(row)
        if progress is not None:
            progress.epoch(epoch, val_acc=row[shown])
        if best is None or score_key(row) > best:
            best, best_state, since = score_key(row), copy.deepcopy(head.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    head.load_state_dict(best_state)
    return history, t0


def fit_multilabel_head(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                        val_y: torch.Tensor, *, lr: float, weight_decay: float, epochs: int, batch_size: int,
                        seed: int, dropout: float = 0.2, patience: int = 25, log: Callable = print, progress=None,
                        pos_weight: torch.Tensor | None = None, device: torch.device = CPU) -> list[dict]:
    """fit_head for multi-label: BCE on multi-hot targets (`pos_weight` per label, validation unweighted),
    early stopping on validation mAP then loss; best epoch restored. `val_acc` is the subset accuracy at 0.5.

    On one thread: steps this small (32 rows of a few thousand features) gain nothing from a second, and with
    another process on the cores torch's threads wait on each other (20 epochs on the collage set's region
    features: 1.7 s on one thread, 14 s on two, measured with a second training run on the 2 cores)."""
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    pos_weight = pos_weight.to(device) if pos_weight is not None else None

    def loss(logits, y):
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    def scores() -> dict:
        return {**_multilabel_eval(head, train_x, train_y, "train"), **_multilabel_eval(head, val_x, val_y, "val")}

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history, t0 = _fit(head, train_x, train_y, loss, scores, "val_map", lr=lr, weight_decay=weight_decay,
                           epochs=epochs, batch_size=batch_size, seed=seed, dropout=dropout, patience=patience,
                           progress=progress, device=device)
    finally:
        torch.set_num_threads(previous)
    b = max(history, key=score_key)
    log(f"head: best epoch {b['epoch']}/{len(history)} val_map {b['val_map']:.4f} train_map {b['train_map']:.4f} "
        f"({time.time() - t0:.1f}s)")
    return history


@torch.no_grad()
def _multilabel_eval(head: nn.Module, x: torch.Tensor, y: torch.Tensor, split: str) -> dict:
    head.eval()
    logits = head(x)
    out = {f"{split}_map": mean_average_precision(y.cpu().numpy(), torch.sigmoid(logits).cpu().numpy()),
           f"{split}_acc": ((logits > 0) == (y > 0.5)).all(1).float().mean().item()}
    if split == "val":
        out["val_loss"] = F.binary_cross_entropy_with_logits(logits, y).item()
    return out


def train_one_epoch(model: nn.Module, criterion, optimizer, data_loader, epoch: int, *, scheduler=None,
                    desc: str = "train", device: torch.device = CPU, scaler=None) -> dict:
    """One pass over `data_loader` on `device` (where model and criterion are), under its autocast; `scaler`
    (training/device.py's grad_scaler) scales float16 losses and is a pass-through otherwise."""
    set_train_mode(model)
    scaler = scaler if scaler is not None else grad_scaler(device)
    total, correct, seen, t0 = 0.0, 0, 0, time.time()
    bar = tqdm(data_loader, desc=f"{desc} epoch {epoch}", leave=False, unit="batch", disable=None)
    for x, y in bar:
        x = x.contiguous(memory_format=torch.channels_last).to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(y)
        # Multi-label (multi-hot targets): an image counts as right when every label is.
        hit = ((logits > 0) == (y > 0.5)).all(1) if y.dim() == 2 else logits.argmax(1) == y
        correct += hit.sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return {"train_loss": total / seen, "train_acc": correct / seen, "train_seconds": time.time() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, arrays: np.ndarray, labels: np.ndarray, batch_size: int | None = None,
             device: torch.device = CPU) -> dict:
    """Loss, accuracy and probabilities on preprocessed images (the exact serving preprocessing); with
    multi-hot `labels` (multi-label) sigmoid probabilities, BCE, subset accuracy and mAP (`val_map`).
    Small batches: eager PyTorch on a CPU runs this network at half the speed per image at batch 32
    (activations fall out of cache) as at 16, so the default batch holds 16 images' worth of 224 px pixels (4 at
    a multi-label run's 448 px: 32 parity images in 3.9 s instead of 5.8). The model in channels-last memory,
    as the input is (oneDNN's NHWC kernels; 3.1 s). On an accelerator (`device`, where the model is) under its
    autocast, 16 times the batch; the probabilities come back to the CPU."""
    if batch_size is None:
        images = 16 if device.type == "cpu" else 256
        batch_size = max(2, images * 224 * 224 // max(1, int(np.prod(arrays.shape[2:])) if arrays.ndim == 4 else 1))
    model.eval().to(memory_format=torch.channels_last)
    multi = labels.ndim == 2
    probs = []
    for i in range(0, len(arrays), batch_size):
        x = torch.from_numpy(arrays[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = model(x.to(device, non_blocking=True)).float()
        probs.append((torch.sigmoid(logits) if multi else logits.softmax(1)).cpu())
    p = torch.cat(probs)
    y = torch.from_numpy(labels)
    if multi:
        return {"val_loss": F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y).item(),
                "val_acc": ((p >= 0.5) == (y > 0.5)).all(1).float().mean().item(),
                "val_map": mean_average_precision(labels, p.numpy()), "probs": p.numpy()}
    loss = F.nll_loss(torch.log(p.clamp_min(1e-12)), y).item()
    return {"val_loss": loss, "val_acc": (p.argmax(1) == y).float().mean().item(), "probs": p.numpy()}


class ImageListDataset(torch.utils.data.Dataset):
    """Decoded images held in memory (decoded once at reduced size); the transform augments each draw."""

    def __init__(self, images: list, labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def fine_tune(bb: Backbone, groups: list[dict], train_ds, val_arrays: np.ndarray, val_labels: np.ndarray, *,
              epochs: int, batch_size: int, weight_decay: float, label_smoothing: float, patience: int,
              seed: int, phase: str, warm_started: bool = False, log: Callable = print, model: nn.Module | None = None,
              budget: float | None = None, trial: Callable[[list[dict]], str | None] | None = None,
              progress=None, class_weights: torch.Tensor | None = None,
              pos_weight: torch.Tensor | None = None, device: torch.device = CPU) -> tuple[list[dict], dict]:
    """The fine-tuning loop: one epoch, evaluate, keep the best weights, stop when validation stalls.

    `model` is what runs on `train_ds`'s inputs: the whole backbone on images, or, with the activation cache
    (training/activations.py), the unfrozen tail on cached activations; a dataset with `set_epoch` is told
    each epoch first. `budget`: seconds this may take; an epoch that the last one's duration says would end
    past it is not started. `trial`: asked after every epoch with the history so far, it returns why to stop
    or None (auto's test of whether fine-tuning pays, training/choose.py's Trial). Patience counts from
    fine-tuning's own best epoch: the warmed-up head stays the fallback the weights return to, but an epoch
    below it is not a stall of fine-tuning. `class_weights` weight the training loss per class
    (training/balance.py); validation stays unweighted. Returns the history and the kept epoch's figures.
    Trains on `device` (training/device.py); the whole backbone is back on the CPU when this returns."""
    model = (model if model is not None else bb.model).to(memory_format=torch.channels_last)  # oneDNN: NHWC on CPU
    try:
        return _tune(bb, model.to(device), groups, train_ds, val_arrays, val_labels, epochs=epochs,
                     batch_size=batch_size, weight_decay=weight_decay, label_smoothing=label_smoothing,
                     patience=patience, seed=seed, phase=phase, warm_started=warm_started, log=log, budget=budget,
                     trial=trial, progress=progress, class_weights=class_weights, pos_weight=pos_weight,
                     device=device)
    finally:
        bb.model.to(CPU)


def _tune(bb: Backbone, model: nn.Module, groups: list[dict], train_ds, val_arrays: np.ndarray,
          val_labels: np.ndarray, *, epochs: int, batch_size: int, weight_decay: float, label_smoothing: float,
          patience: int, seed: int, phase: str, warm_started: bool, log: Callable, budget: float | None, trial,
          progress, class_weights, pos_weight, device: torch.device) -> tuple[list[dict], dict]:
    """fine_tune's loop, with `model` on `device`."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g,
                                         num_workers=0, drop_last=len(train_ds) > batch_size,
                                         pin_memory=device.type == "cuda")  # pinned: copies overlap the step
    opt, sched = _optimizer(groups, weight_decay, steps=max(1, epochs * len(loader)), per_epoch=len(loader))
    criterion = _criterion(val_labels, class_weights, label_smoothing, pos_weight).to(device)
    step = _Step(device, criterion, opt, sched, grad_scaler(device))
    best, best_state, history, t0 = None, None, [], time.time()
    kept = {"epoch": 0, "val_acc": None, "val_loss": None, "stopped": "epochs"}
    if warm_started:
        # The warmed-up head is the point to beat: fine-tuning that only hurts validation is undone.
        best, best_state = _warm_start(model, val_arrays, val_labels, kept, phase, log, progress, device)
    own_best, since = None, 0  # fine-tuning's own best epoch, from which patience counts
    for epoch in range(1, epochs + 1):
        if _over_budget(budget, time.time() - t0, history, phase, log):
            kept["stopped"] = "budget"
            break
        row = _epoch(model, step, loader, train_ds, val_arrays, val_labels, epoch, phase, t0)
        history.append(row)
        key = score_key(row)
        improved = best is None or key > best
        _log_epoch(log, row, epochs, improved)
        if progress is not None:
            progress.epoch(epoch, val_acc=key[0])
        if improved:
            best, best_state = key, copy.deepcopy(model.state_dict())
            kept.update(epoch=epoch, val_acc=row["val_acc"], val_loss=row["val_loss"],
                        **({"val_map": row["val_map"]} if "val_map" in row else {}))
        if own_best is None or key > own_best:
            own_best, since = key, 0
        else:
            since += 1
            if since >= patience:
                log(f"{phase}: early stop, no validation improvement for {patience} epochs")
                kept["stopped"] = "patience"
                break
        stop = trial(history) if trial is not None else None
        if stop:
            log(f"{phase}: trial: {stop}; stopping")
            kept.update(stopped="trial", trial=stop)
            break
    model.load_state_dict(best_state)
    kept["epochs_run"] = len(history)
    kept["tuned_val_acc"] = own_best[0] if own_best is not None else None  # the best fine-tuning reached
    # (its mAP for multi-label, as every comparison here)
    kept["seconds"] = round(time.time() - t0, 2)
    return history, kept


def _criterion(val_labels: np.ndarray, class_weights, label_smoothing: float, pos_weight) -> nn.Module:
    """BCE for multi-hot labels (multi-label), else cross-entropy with the class weights and smoothing."""
    if val_labels.ndim == 2:
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def _warm_start(model: nn.Module, val_arrays: np.ndarray, val_labels: np.ndarray, kept: dict, phase: str,
                log: Callable, progress, device: torch.device) -> tuple[tuple, dict]:
    """The warmed-up model's validation figures: (best key, its weights)."""
    ev = evaluate(model, val_arrays, val_labels, device=device)
    kept.update({k: v for k, v in ev.items() if k != "probs"})
    log(f"{phase} epoch 0 (warmed-up head)  val_loss {ev['val_loss']:.4f} val_acc {ev['val_acc']:.4f}"
        + (f" val_map {ev['val_map']:.4f}" if "val_map" in ev else ""))
    key = score_key(ev)
    if progress is not None:
        progress.best(key[0])
    return key, copy.deepcopy(model.state_dict())


def _optimizer(groups: list[dict], weight_decay: float, *, steps: int, per_epoch: int):
    """AdamW over the parameter groups, with a short linear warm-up then cosine decay, per step: protects
    pretrained layers from the first noisy steps."""
    opt = torch.optim.AdamW([{k: v for k, v in gr.items() if k != "name"} for gr in groups],
                            weight_decay=weight_decay)
    warm = min(per_epoch, steps // 10 + 1)

    def factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class _Step:
    """What every epoch of fine_tune steps with: where, the loss, the optimiser, its schedule and loss scaler."""
    device: torch.device
    criterion: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def _epoch(model, step: _Step, loader, train_ds, val_arrays, val_labels, epoch: int, phase: str,
           t0: float) -> dict:
    """One epoch of fine-tuning and its validation: a results.csv row."""
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)
    row = {"epoch": epoch, "phase": phase}
    row.update(train_one_epoch(model, step.criterion, step.opt, loader, epoch, scheduler=step.sched, desc=phase,
                               device=step.device, scaler=step.scaler))
    ev = evaluate(model, val_arrays, val_labels, device=step.device)
    row.update({k: v for k, v in ev.items() if k != "probs"}, time=round(time.time() - t0, 3))
    return row


def _over_budget(budget: float | None, spent: float, history: list[dict], phase: str, log: Callable) -> bool:
    """Whether another epoch, as long as the last one, would end past the budget. The last epoch, not the
    mean: with the activation cache the first epochs also make the cached views and cost more than the rest."""
    if budget is None or not history:
        return False
    last = history[-1]["time"] - (history[-2]["time"] if len(history) > 1 else 0.0)
    if spent + last > budget:
        log(f"{phase}: time budget: {spent:.1f}s spent of {budget:.1f}s, another epoch would not fit")
        return True
    return False


def _log_epoch(log: Callable, row: dict, epochs: int, improved: bool) -> None:
    log(f"{row['phase']} epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}"
        + (f" val_map {row['val_map']:.4f}" if "val_map" in row else "")
        + f"  {row['train_seconds']:.1f}s" + ("  *" if improved else ""))
