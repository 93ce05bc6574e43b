"""`train(request, data)`: dataset checks -> fit by strategy -> metrics -> ONNX export -> parity check ->
promotion decision -> publish (atomic) -> promote. Used by `refit train` and the service's retrain job.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.config import TrainRequest
from core.contract import Contract
from core.data import Dataset, DatasetError, load_dataset
from core.drift import FILE as DRIFT_FILE
from training.export import CAM_FILE, CONTRACT_KEY, VERSION_KEY, export_onnx, read_contract, run_onnx, session, \
    set_metadata, verify_parity
from training.finetune import STRATEGIES, ImageListDataset, apply_strategy, evaluate, extract_features, \
    fine_tune, fit_head
from training.metrics import classification_report, save_confusion_png, save_results_csv
from core.progress import Progress
from core.preprocess import Prepared, load_image, prepare, preprocess
from training.augment import train_transform
from training.registry import Backbone, create_backbone, get_module
from core.scratch import run_folder
from training.software import software
from core.store import Store, age_seconds, now_iso, sha256_file

# `auto`: below this many training images only the head is trained (unfreezing layers on so little data
# mostly memorises it); from here on, partial fine-tuning is also tried and kept only if validation improves.
AUTO_PARTIAL_MIN_IMAGES = 100
# From here on there is enough data to move every layer: warm-up, then full fine-tuning is tried as well.
AUTO_FULL_MIN_IMAGES = 5000


def _prepare_optimizer_in_background() -> None:
    """torch.optim's first optimizer imports torch's compiler (about 1.6 s on 2 cores, measured), which every
    strategy pays before its first step. Done on a thread while the images decode (Pillow and ONNX Runtime
    release the GIL), it is off the critical path; the main thread's first optimizer waits on the import lock
    if it is not done yet. Nothing to do in a process that made one already (the service's standby)."""
    import sys
    import threading

    if "torch._dynamo" in sys.modules:
        return
    threading.Thread(target=lambda: torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), daemon=True,
                     name="optimizer-import").start()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_contract(request: TrainRequest) -> Contract:
    """The backbone's preprocessing contract, at the request's image size (no classes yet)."""
    contract = create_backbone(request.backbone, num_classes=None, pretrained=False).contract
    return contract.with_input_size(request.image_size) if request.image_size else contract


class Run:
    """What one training run shares between strategies: the data, decoded once, and cached features."""

    def __init__(self, request: TrainRequest, ds: Dataset, log: Callable, cache_dir: Path,
                 progress: Progress | None = None):
        self.request, self.ds, self.log, self.cache_dir = request, ds, log, cache_dir
        self.progress = progress or Progress()
        self.progress.set_images(len(ds.val))
        self.contract = input_contract(request).with_classes(ds.classes)
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
        self.val_labels = np.array([y for _, y in ds.val], dtype=np.int64)
        log(f"preprocessed {len(self.train_images)} train + {len(self.val_arrays)} val images in "
            f"{time.time() - t0:.1f}s")
        self._features = None
        self._aug_images = None

    @property
    def aug_images(self) -> list:
        """Training crops are taken from a copy no larger than needed, which keeps augmentation cheap;
        made on first use, since feature extraction never augments. It replaces the kept images."""
        if self._aug_images is None:
            self._aug_images = [_shrink(im, self.contract.resize_size) for im in self.train_images]
            self.train_images = self._aug_images
        return self._aug_images

    def features(self, bb: Backbone):
        """Frozen pretrained features of train and val images, computed once. (Mirrored copies of the
        training images were tried as augmentation: the same validation accuracy on hymenoptera for
        twice the extraction time.)"""
        if self._features is None:
            t0 = time.time()
            cache = self.cache_dir
            tr = extract_features(bb, self.train_arrays, cache, desc="features train")
            va = extract_features(bb, self.val_arrays, cache, desc="features val")
            ty = torch.tensor(self.train_labels)
            self._features = (tr, ty, va, torch.from_numpy(self.val_labels))
            self.log(f"cached features {tuple(tr.shape)} + {tuple(va.shape)} in {time.time() - t0:.1f}s")
        return self._features

    def head_val_probs(self, bb: Backbone) -> np.ndarray | None:
        """Validation probabilities from the cached frozen features through `bb`'s head (None: no cache)."""
        if self._features is None:
            return None
        head = get_module(bb.model, bb.classifier).eval()
        with torch.no_grad():
            return torch.softmax(head(self._features[2]), dim=1).numpy()

    def head_eval(self, bb: Backbone) -> dict:
        """Validation loss and accuracy of `bb`'s head on the cached frozen features: the same numbers as
        running the whole network on the images, without running it."""
        probs = self.head_val_probs(bb)
        y = self.val_labels
        return {"val_acc": float((probs.argmax(1) == y).mean()),
                "val_loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean())}

    def backbone(self, pretrained: bool) -> Backbone:
        bb = create_backbone(self.request.backbone, num_classes=len(self.ds.classes), pretrained=pretrained,
                             weights=self.request.weights if pretrained else None)
        return bb

    def run(self, name: str, start: Backbone | None = None, *, budget: float | None = None,
            trial: int = 0) -> tuple[Backbone, list[dict], dict]:
        """Train one strategy. `start` continues from an already warmed-up model (used by auto), within
        `budget` seconds and after a `trial` of that many epochs (see fine_tune)."""
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
            history += fit_head(get_module(bb.model, bb.classifier), tr, ty, va, vy, lr=r.lr,
                                weight_decay=r.weight_decay, label_smoothing=r.label_smoothing,
                                epochs=r.head_epochs, batch_size=r.batch_size, seed=r.seed, log=self.log,
                                progress=self.progress)
        if spec.trainable != "head":
            self.progress.phase(name, epochs=r.epochs, budget=budget)
            train_ds, model, val_inputs, cache = self._tuning_inputs(bb, spec, summary)
            tuned, kept = fine_tune(bb, groups, train_ds, val_inputs, self.val_labels, epochs=r.epochs,
                                    batch_size=r.batch_size, weight_decay=r.weight_decay,
                                    label_smoothing=r.label_smoothing, patience=r.patience, seed=r.seed,
                                    phase=name, warm_started=spec.pretrained, log=self.log, model=model,
                                    budget=budget, trial=trial, progress=self.progress)
            history += tuned
            summary["kept"] = kept
            if cache is not None:
                summary["activation_cache"].update(views_made=cache.made, bytes=cache.nbytes,
                                                   view_seconds=round(cache.seconds, 2))
                self.log(f"activation cache: {cache.made} view(s) of {len(cache)} images, "
                         f"{cache.nbytes / 2**20:.0f} MB, made in {cache.seconds:.1f}s")
        summary["seconds"] = round(time.time() - t0, 2)
        return bb, history, summary

    def _tuning_inputs(self, bb: Backbone, spec, summary: dict):
        """What fine-tuning runs on: for `partial`, the unfrozen tail on cached activations of the frozen
        stages (training/activations.py) when the cut is known and the cache fits its memory bound; else,
        the whole network on augmented images. Returns (dataset, model, validation inputs, cache or None)."""
        r = self.request
        transform = train_transform(self.contract, r.augment)
        whole = (ImageListDataset(self.aug_images, self.train_labels, transform), None, self.val_arrays, None)
        if spec.trainable != "last_n" or r.cache_views == 0:
            return whole
        from training.activations import ViewCache, activation_bytes, limit_bytes, prefix_outputs, \
            prefix_session, split_model

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
        sess = prefix_session(bb, split, size, self.cache_dir, threads=torch.get_num_threads())
        val_acts = prefix_outputs(sess, self.val_arrays)
        cache = ViewCache(split, sess, self.aug_images, self.train_labels, transform, views=views, seed=r.seed,
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


# auto's cheap signals: a head at least this accurate with a train/val gap at most this small leaves partial
# fine-tuning nothing it could show within the noise of a few hundred validation images.
AUTO_HEAD_ENOUGH_ACC = 0.98
AUTO_HEAD_ENOUGH_GAP = 0.02
AUTO_TRIAL_EPOCHS = 1  # partial epochs after which validation loss must be below the head's to go on


def choose_and_train(run: Run, log: Callable) -> tuple[Backbone, str, list[dict], dict]:
    """Train the requested strategy, or for `auto` decide from the data, validation and the time budget,
    and say why."""
    r = run.request
    if r.strategy != "auto":
        bb, hist, summary = run.run(r.strategy)
        figures = {k: summary[k] for k in ("kept", "activation_cache") if k in summary}
        return bb, r.strategy, hist, {"strategy": r.strategy, "reason": "requested", "candidates": {}, **figures}
    t0 = time.time()
    n = len(run.ds.train)
    bb, hist, summary = run.run("feature_extraction")
    fe = run.head_eval(bb)
    head_row = max(hist, key=lambda h: (h["val_acc"], -h["val_loss"]))
    signals = {"train_images": n, "head_val_acc": round(fe["val_acc"], 4),
               "head_train_acc": round(head_row["train_acc"], 4),
               "head_gap": round(head_row["train_acc"] - fe["val_acc"], 4), "time_budget": r.time_budget}
    candidates = {"feature_extraction": {"val_acc": fe["val_acc"], "val_loss": fe["val_loss"],
                                         "seconds": summary["seconds"]}}
    best = ("feature_extraction", bb, hist, fe)
    left = r.time_budget - (time.time() - t0)
    if n < AUTO_PARTIAL_MIN_IMAGES:
        reason = f"{n} training images < {AUTO_PARTIAL_MIN_IMAGES}: head only (feature extraction)"
    elif left <= 0:
        reason = f"the time budget ({r.time_budget:g}s) was spent on the head; head only"
    elif fe["val_acc"] >= AUTO_HEAD_ENOUGH_ACC and signals["head_gap"] <= AUTO_HEAD_ENOUGH_GAP:
        reason = (f"the head alone reaches {fe['val_acc']:.4f} with a train/val gap of {signals['head_gap']:.3f}: "
                  "nothing left for fine-tuning to show; head only")
    else:
        tries = ["partial"] + (["full"] if n >= AUTO_FULL_MIN_IMAGES else [])
        notes = []
        for name in tries:
            left = r.time_budget - (time.time() - t0)
            if left <= 0:
                notes.append(f"{name} not tried: time budget spent")
                continue
            log(f"auto: {n} training images, head val_acc {fe['val_acc']:.4f} (train/val gap "
                f"{signals['head_gap']:.3f}); trying {name} fine-tuning for at most {left:.1f}s of the "
                f"{r.time_budget:g}s budget")
            bb2, hist2, s2 = run.run(name, start=bb, budget=left, trial=AUTO_TRIAL_EPOCHS)
            kept = s2["kept"]
            ev = {"val_acc": kept["val_acc"], "val_loss": kept["val_loss"]}
            candidates[name] = {**ev, "seconds": s2["seconds"], "epochs_run": kept["epochs_run"],
                                "stopped": kept["stopped"], "best_epoch": kept["epoch"]}
            if "activation_cache" in s2:
                candidates[name]["activation_cache"] = s2["activation_cache"]
            notes.append(f"{name} stopped by {kept['stopped']} after {kept['epochs_run']} epoch(s)")
            if kept["epoch"] > 0 and (ev["val_acc"], -ev["val_loss"]) > (best[3]["val_acc"], -best[3]["val_loss"]):
                best = (name, bb2, hist + hist2, ev)
        reason = (f"{n} training images: tried {', '.join(candidates)} ({'; '.join(notes)}); kept {best[0]} "
                  f"(best validation accuracy, then loss)")
    signals["fit_seconds"] = round(time.time() - t0, 2)
    log(f"auto: {reason}")
    run.progress.best(best[3]["val_acc"])
    return best[1], best[0], best[2], {"strategy": best[0], "reason": reason, "candidates": candidates,
                                       "signals": signals}


def evaluate_onnx_on(path: Path, ds: Dataset, run: Run | None = None) -> float:
    """Accuracy of an existing version on this dataset's validation split, with that version's contract
    (the run's preprocessed arrays are reused when the preprocessing is the same)."""
    contract = read_contract(path)
    if run is not None and replace(contract, class_names=()) == replace(run.contract, class_names=()):
        arrays = run.val_arrays
    else:
        arrays = np.stack([preprocess(p, contract) for p, _ in ds.val])
    probs = run_onnx(session(path), arrays)
    names = list(contract.class_names)
    pred = [names[i] for i in probs.argmax(1)]
    return float(np.mean([pred[i] == ds.classes[y] for i, (_, y) in enumerate(ds.val)]))


def promotion_decision(request: TrainRequest, store: Store, ds: Dataset, val_acc: float,
                       run: Run | None = None) -> dict:
    current = store.promoted()
    d = {"policy": request.promote, "new_val_accuracy": val_acc, "current_version": current,
         "current_val_accuracy": None}
    if request.promote is True or request.promote is False:
        return {**d, "promote": request.promote, "reason": "requested by the training request"}
    if current is None:
        return {**d, "promote": True, "reason": "no version is promoted yet"}
    cur_path = store.verify(current)
    cur_classes = list(read_contract(cur_path).class_names)
    if cur_classes == ds.classes:
        cur_acc = evaluate_onnx_on(cur_path, ds, run)
        d["current_val_accuracy"] = cur_acc
        ok = val_acc >= cur_acc
        why = (f"same classes: new {val_acc:.4f} {'>=' if ok else '<'} promoted {current} {cur_acc:.4f} "
               "on the new validation split")
        return {**d, "promote": ok, "reason": why}
    ok = val_acc >= request.min_accuracy
    why = (f"classes differ from {current}: new {val_acc:.4f} {'>=' if ok else '<'} "
           f"min_accuracy {request.min_accuracy:.2f}")
    return {**d, "promote": ok, "reason": why}


def train(request: TrainRequest, data: str | Path | None = None, *, store: Store | None = None,
          actor: str = "cli", log: Callable = print, progress: Callable[[dict], None] | None = None,
          job_id: str | None = None) -> dict:
    """Train on `data` (a folder or .zip), or on the dataset of the store that `request.dataset` names (its
    snapshot `request.snapshot`, else its newest, which the version then records). `progress` is called with
    the run's phase, epoch, best validation accuracy so far and time left (core/progress.py). `job_id`,
    the retrain job running this, is recorded in the version's metadata (`job`): a reader finds the version
    of a job whose process stopped after publishing (service/outcome.py)."""
    t_start = time.time()
    tracker = Progress(progress)
    _prepare_optimizer_in_background()
    store = store or Store()
    if request.threads:
        torch.set_num_threads(request.threads)
    seed_everything(request.seed)
    parent = store.promoted()
    # Under REFIT_HOME, not the system temp dir: a killed run's folder is found and removed at the service's
    # next start (core/scratch.py).
    with run_folder(store.home, "run") as tmp:
        lineage = None
        if request.dataset is not None:
            data, request, lineage = _from_store(request, data, store, tmp / "snapshot", log)
        elif data is None:
            raise DatasetError("nothing to train on: give a data folder (or .zip) or a dataset of the store")
        ds = load_dataset(data, val_fraction=request.val_fraction, seed=request.seed, workdir=tmp, log_fn=log,
                          contract=input_contract(request))
        counts = ds.counts()
        log(f"dataset {ds.root}: {len(ds.classes)} classes {ds.classes}, {len(ds.train)} train / {len(ds.val)} val "
            f"({ds.split} split), {len(ds.skipped)} skipped")
        run = Run(request, ds, log, store.home / "cache", tracker)
        t_fit = time.time()
        bb, strategy, history, auto = choose_and_train(run, log)
        train_seconds = time.time() - t_fit
        tracker.phase("finishing")
        onnx_path = export_onnx(bb.model, run.contract, tmp / "model.onnx", classifier=bb.classifier)
        # Parity: PyTorch against ONNX Runtime on (request.parity_images of) the validation images. Eager
        # PyTorch is the slow side on a CPU, so a capped, evenly spread sample keeps retraining fast.
        n_val = len(run.val_arrays)
        n_parity = min(request.parity_images or n_val, n_val)
        pick = np.unique(np.linspace(0, n_val - 1, n_parity).astype(int))
        torch_probs = evaluate(bb.model, run.val_arrays[pick], run.val_labels[pick])["probs"]
        head_probs = run.head_val_probs(bb) if strategy == "feature_extraction" else None
        if head_probs is None:
            # The exported file runs on every validation image once: the parity sample is taken from that
            # pass, and once parity holds the metrics come from the same outputs, run as serving runs them.
            val_probs = run_onnx(session(onnx_path), run.val_arrays)
            parity = verify_parity(onnx_path, torch_probs, run.val_arrays[pick], ort_probs=val_probs[pick])
        else:
            # Frozen backbone: the validation features are cached, and the file computes the same function
            # as backbone + head (the parity check holds it to that), so no second pass over the images.
            parity = verify_parity(onnx_path, torch_probs, run.val_arrays[pick])
            val_probs = head_probs
        log(f"onnx parity: top-1 agrees on {parity['top1_agree']}/{parity['images']}, "
            f"max |Δprob| {parity['max_abs_prob_diff']:.2e}")
        ev = {"val_loss": float(-np.log(np.clip(val_probs[np.arange(len(val_probs)), run.val_labels], 1e-12, 1)).mean())}
        report = classification_report(run.val_labels, val_probs.argmax(1), ds.classes)
        # Train accuracy at the kept epoch, as training measured it (on cached features for the head,
        # on the augmented stream while fine-tuning): another full pass would double the export time.
        kept = max((r for r in history if "train_acc" in r), key=lambda r: (r["val_acc"], -r["val_loss"]))
        train_acc = float(kept["train_acc"])
        int8 = None
        if request.int8:
            int8 = _try_int8(onnx_path, tmp / "model.int8.onnx", run, report["accuracy"], log)
        decision = promotion_decision(request, store, ds, report["accuracy"], run)
        fingerprint = ds.fingerprint()
        problems, duplicates = _quality(run, bb, fingerprint, log)
        drift = _drift_reference(run, bb, strategy, onnx_path, tmp / DRIFT_FILE)
        metrics = {
            "val_accuracy": report["accuracy"], "train_accuracy": train_acc,
            "train_val_gap": train_acc - report["accuracy"], "val_loss": ev["val_loss"],
            "per_class": report["per_class"], "macro_f1": report["macro_f1"],
            "confusion_matrix": report["confusion_matrix"], "classes": ds.classes,
            "strategy": strategy, "auto": auto, "parity": parity, "train_seconds": round(train_seconds, 2),
            "history": history, "counts": counts, "skipped": ds.skipped, "warnings": ds.warnings,
            "promotion": decision, "int8": int8, "lineage": lineage,
            "label_problems": problems, "near_duplicates": duplicates, "drift": drift,
        }
        metrics["software"] = software()
        config = {**request.model_dump(), "resolved": {"strategy": strategy, "contract": json.loads(
            run.contract.to_json()), "train_images": len(ds.train), "val_images": len(ds.val)}}
        for name, obj in (("metrics.json", metrics), ("config.json", config), ("dataset.json", fingerprint)):
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str))
        save_results_csv(history, tmp / "results.csv")
        save_confusion_png(report["confusion_matrix"], ds.classes, tmp / "confusion_matrix.png",
                           f"{strategy}: val acc {report['accuracy']:.3f}")
        files = {n: tmp / n for n in ("model.onnx", "metrics.json", "config.json", "dataset.json", "results.csv",
                                      "confusion_matrix.png", "model.int8.onnx", DRIFT_FILE, CAM_FILE)
                 if (tmp / n).is_file()}
        version = _publish(store, files, run.contract, {
            "strategy": strategy, "backbone": request.backbone, "parent": parent, "classes": ds.classes,
            "val_accuracy": report["accuracy"], "train_seconds": round(train_seconds, 2),
            "parity_max_abs_diff": parity["max_abs_prob_diff"], "promotion": decision, "actor": actor,
            "dataset_hash": fingerprint["content_hash"], "note": request.note or "",
            "precision": "int8" if int8 and int8["chosen"] else "fp32", "lineage": lineage,
            "job": job_id})
    log(f"published {version}: {strategy}, val_accuracy {report['accuracy']:.4f}, train {train_seconds:.1f}s")
    tracker.phase("done")
    promoted = False
    if decision["promote"]:
        store.promote(version, actor=actor, reason=decision["reason"])
        promoted = True
        log(f"promoted {version} ({decision['reason']})")
    else:
        log(f"not promoted: {decision['reason']}")
    return {"version": version, "strategy": strategy, "val_accuracy": report["accuracy"],
            "train_seconds": round(train_seconds, 2), "total_seconds": round(time.time() - t_start, 2),
            "promoted": promoted, "promotion": decision, "parity": parity, "classes": ds.classes,
            "train_val_gap": metrics["train_val_gap"], "auto": auto, "skipped": ds.skipped, "lineage": lineage,
            "warnings": ds.warnings, "metrics": {k: metrics[k] for k in ("val_accuracy", "train_accuracy",
                                                                          "macro_f1", "per_class")},
            "label_problems": {**problems, "items": problems["items"][:5]},
            "near_duplicates": {**duplicates, "items": duplicates["items"][:5]}}


def _quality(run: Run, bb: Backbone, fingerprint: dict, log: Callable) -> tuple[dict, dict]:
    """Likely label errors and train/val near-duplicates, from the frozen pretrained features (cached by
    every strategy but `scratch`, whose random backbone says nothing about the images: it extracts them)."""
    from training.quality import label_problems, near_duplicates, summary_lines

    tr, ty, va, vy = run.features(bb if run._features is not None else run.backbone(pretrained=True))
    sha = {(f["split"], f["path"]): f["sha256"] for f in fingerprint["files"]}

    def files(items, split):
        rels = (p.relative_to(run.ds.root).as_posix() for p, _ in items)
        return [{"path": r, "sha256": sha.get((split, r)), "split": split} for r in rels]

    train_files, val_files = files(run.ds.train, "train"), files(run.ds.val, "val")
    problems = label_problems(np.concatenate([tr.numpy(), va.numpy()]), np.concatenate([ty.numpy(), vy.numpy()]),
                              run.ds.classes, train_files + val_files, seed=run.request.seed)
    duplicates = near_duplicates(tr.numpy(), va.numpy(), train_files, val_files)
    for line in summary_lines(problems, duplicates):
        log(line)
    return problems, duplicates


def _drift_reference(run: Run, bb: Backbone, strategy: str, onnx_path: Path, out: Path) -> dict:
    """The version's drift reference (core/drift.py), in the space of the file's `embedding` output:
    the cached features when the backbone stayed frozen (the same numbers), else the exported file run on
    the validation images and a sample of the training images."""
    from core.drift import REFERENCE_SIZE, build_reference, save_reference

    if strategy == "feature_extraction":
        tr, _, va, _ = run.features(bb)
        train_emb, val_emb = tr.numpy(), va.numpy()
    else:
        sess = session(onnx_path)
        pick = np.sort(np.random.default_rng(run.request.seed).permutation(len(run.train_arrays))[:REFERENCE_SIZE])
        emb = lambda arrays: np.concatenate([sess.run(["embedding"], {"input": arrays[i:i + 32]})[0]
                                             for i in range(0, len(arrays), 32)])
        train_emb, val_emb = emb(run.train_arrays[pick]), emb(run.val_arrays)
    ref = build_reference(train_emb, val_emb, run.val_labels, run.ds.classes, seed=run.request.seed)
    save_reference(ref, out)
    return {"file": out.name, "reference_embeddings": int(len(ref.embeddings)),
            "val_mean_distance": round(float(ref.val_distances.mean()), 4),
            "val_labels": {c: round(float(p), 4) for c, p in zip(ref.classes, ref.val_labels)}}


def _from_store(request: TrainRequest, data, store: Store, dest: Path, log: Callable):
    """The dataset snapshot the request names, written out as a folder: (folder, the request with the
    snapshot resolved, lineage)."""
    from core.datasets import Datasets

    if data is not None:
        raise DatasetError(f"give a data folder or a dataset of the store, not both ({data} and dataset "
                           f"{request.dataset!r})")
    datasets = Datasets(store)
    snapshot = datasets.resolve(request.dataset, request.snapshot)
    folder = datasets.materialize(request.dataset, snapshot, dest)
    log(f"dataset {request.dataset!r} snapshot {snapshot}")
    request = request.model_copy(update={"snapshot": snapshot})
    return folder, request, {"dataset": request.dataset, "snapshot": snapshot}


def _publish(store: Store, files: dict[str, Path], contract: Contract, meta: dict) -> str:
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


def _try_int8(fp32_path: Path, out: Path, run: Run, fp32_acc: float, log: Callable) -> dict:
    """Quantize, measure on validation, and choose INT8 for serving only within 1 point of FP32."""
    from training.quantize import MAX_ACCURACY_DROP, calibration_sample, has_vnni, quantize_int8

    t0 = time.time()
    reduce_range = not has_vnni()
    try:
        quantize_int8(fp32_path, out, calibration_sample(run.train_arrays, run.request.seed), reduce_range)
    except Exception as e:  # noqa: BLE001 - INT8 is an optimisation; FP32 is still published
        log(f"int8: quantization failed ({e}); serving FP32")
        out.unlink(missing_ok=True)
        return {"chosen": False, "reason": f"quantization failed: {e}"}
    acc = float((run_onnx(session(out), run.val_arrays).argmax(1) == run.val_labels).mean())
    chosen = fp32_acc - acc <= MAX_ACCURACY_DROP
    reason = (f"int8 val_acc {acc:.4f} vs fp32 {fp32_acc:.4f}: "
              + ("within 1 point, serving int8" if chosen else "more than 1 point lower, serving fp32"))
    log(f"int8: {reason} ({time.time() - t0:.1f}s)")
    return {"chosen": chosen, "val_accuracy": acc, "fp32_val_accuracy": fp32_acc, "reason": reason,
            "reduce_range": reduce_range, "seconds": round(time.time() - t0, 2)}


def bootstrap_imagenet(store: Store | None = None, log: Callable = print) -> str | None:
    """On an empty store, publish and promote the pretrained backbone with its 1000-class ImageNet head,
    so a fresh service answers at once. Returns the new version, or None when versions already exist:
    those are left as they are, promoted or not (choosing one to serve is a decision, not a default)."""
    import fcntl

    store = store or Store()
    with open(store.home / ".bootstrap.lock", "a") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # several workers may start together; one bootstraps
        if store.versions() or not _claim_bootstrap(store, log):
            return None
        try:
            version = _bootstrap_version(store)
        except BaseException:
            store.delete_record(BOOTSTRAP_CLAIM)  # the next start tries again, without waiting out a stale claim
            raise
        store.promote(version, actor="bootstrap", reason="first start: pretrained ImageNet model")
        store.put_record(BOOTSTRAP_CLAIM, {**(store.record(BOOTSTRAP_CLAIM)[0] or {}), "done": version})
        log(f"bootstrapped {version}: efficientnet_lite0 with its ImageNet head")
        return version


def _bootstrap_version(store: Store) -> str:
    """Publish the pretrained backbone with its ImageNet head; returns the version."""
    bb = create_backbone("efficientnet_lite0", num_classes=None, pretrained=True)
    contract = bb.contract.with_classes(bb.imagenet_classes)
    with run_folder(store.home, "bootstrap") as tmp:
        path = export_onnx(bb.model, contract, tmp / "model.onnx", classifier=bb.classifier)
        rng = np.random.default_rng(0)
        arrays = rng.standard_normal((4, 3, contract.input_size, contract.input_size)).astype(np.float32)
        with torch.no_grad():
            probs = torch.softmax(bb.model(torch.from_numpy(arrays)), 1).numpy()
        parity = verify_parity(path, probs, arrays)
        (tmp / "metrics.json").write_text(json.dumps({"parity": parity, "strategy": "pretrained",
                                                      "note": "ImageNet-1k head, no customer data"}))
        (tmp / "config.json").write_text(json.dumps({"backbone": "efficientnet_lite0", "strategy": "pretrained"}))
        files = {n: tmp / n for n in ("model.onnx", "metrics.json", "config.json", CAM_FILE) if (tmp / n).is_file()}
        version = _publish(store, files, contract,
                           {"strategy": "pretrained", "backbone": "efficientnet_lite0", "parent": None,
                            "classes": ["<imagenet-1k>"], "val_accuracy": None, "actor": "bootstrap",
                            "parity_max_abs_diff": parity["max_abs_prob_diff"]})
    return version


BOOTSTRAP_CLAIM = "bootstrap.json"
BOOTSTRAP_STALE_SECONDS = 900  # a bootstrap takes a minute or two; a claim this old belongs to a dead one
BOOTSTRAP_WAIT_SECONDS = 300


def _claim_bootstrap(store: Store, log: Callable) -> bool:
    """Whether this process bootstraps the store. The flock above is per machine (REFIT_HOME); replicas on
    one shared store claim `bootstrap.json` with a conditional write, as seeding from the bento claims its
    version id: one wins; the others wait for its version (up to BOOTSTRAP_WAIT_SECONDS) and publish
    nothing. A claim that is done (its versions since deleted) or older than BOOTSTRAP_STALE_SECONDS (its
    bootstrap died) is taken over by the next one, over the state read."""
    import socket

    deadline, told = time.monotonic() + BOOTSTRAP_WAIT_SECONDS, False
    while not store.versions():
        claim, tag = store.record(BOOTSTRAP_CLAIM)
        mine = {"at": now_iso(), "host": socket.gethostname(), "pid": os.getpid()}
        if tag is None:
            if store.put_record(BOOTSTRAP_CLAIM, mine, create_only=True):
                return True
        elif claim is None or claim.get("done") or age_seconds(claim.get("at")) > BOOTSTRAP_STALE_SECONDS \
                or _claimant_dead(claim):
            if store.put_record(BOOTSTRAP_CLAIM, mine, if_tag=tag):
                return True
        elif not told:
            log(f"another process is bootstrapping {store.describe()} (since {claim.get('at')}, "
                f"{claim.get('host')} pid {claim.get('pid')}); waiting for its version")
            told = True
        if time.monotonic() > deadline:
            log(f"no version in {store.describe()} after {BOOTSTRAP_WAIT_SECONDS} s; starting without one")
            return False
        time.sleep(1)
    return False


def _claimant_dead(claim: dict) -> bool:
    """Whether a claim was made on this host by a process that is gone (Ctrl-C'd hard, kill -9, OOM): its
    bootstrap will never finish, and waiting out BOOTSTRAP_STALE_SECONDS would leave every start until then
    serving nothing. Our own pid counts as gone: we hold no claim while asking, so it is a dead earlier
    container's that had our hostname and pid. A claim from another host, or from a live process here
    (another REFIT_HOME on the same store), is kept."""
    import socket

    pid = claim.get("pid")
    if claim.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False
