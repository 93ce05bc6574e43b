"""`auto`'s choice: train the requested strategy, or for `auto` decide from the data size, validation and the
time budget which candidates to try (the head first, then partial and full fine-tuning behind a one-epoch
trial), keep the best on validation, and say why."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from training.registry import Backbone
from training.run import Run

# `auto`: below this many training images only the head is trained (unfreezing layers on so little data
# mostly memorises it); from here on, partial fine-tuning is also tried and kept only if validation improves.
AUTO_PARTIAL_MIN_IMAGES = 100
# From here on there is enough data to move every layer: warm-up, then full fine-tuning is tried as well.
AUTO_FULL_MIN_IMAGES = 5000

# auto's cheap signals: a head at least this accurate with a train/val gap at most this small leaves partial
# fine-tuning nothing it could show within the noise of a few hundred validation images.
AUTO_HEAD_ENOUGH_ACC = 0.98
AUTO_HEAD_ENOUGH_GAP = 0.02
AUTO_TRIAL_EPOCHS = 1  # partial epochs after which validation loss must be below the head's to go on


@dataclass
class Fitted:
    """The model a run keeps and how it got there."""
    backbone: Backbone
    strategy: str
    history: list[dict]  # one row per epoch of every phase kept (results.csv)
    auto: dict  # the choice: strategy, reason, candidates (and auto's signals)
    seconds: float  # fitting time, data decoding excluded


def fit(run: Run, log: Callable) -> Fitted:
    """Train what the request asks for (see choose_and_train), timed."""
    t0 = time.time()
    bb, strategy, history, auto = choose_and_train(run, log)
    return Fitted(bb, strategy, history, auto, time.time() - t0)


def choose_and_train(run: Run, log: Callable) -> tuple[Backbone, str, list[dict], dict]:
    """Train the requested strategy, or for `auto` decide from the data, validation and the time budget,
    and say why."""
    r = run.request
    if r.strategy == "auto":
        return _auto(run, log)
    bb, hist, summary = run.run(r.strategy)
    figures = {k: summary[k] for k in ("kept", "activation_cache") if k in summary}
    return bb, r.strategy, hist, {"strategy": r.strategy, "reason": "requested", "candidates": {}, **figures}


def _auto(run: Run, log: Callable) -> tuple[Backbone, str, list[dict], dict]:
    """The head first; then, unless its figures or the data size say fine-tuning cannot pay, the fine-tuning
    candidates the data size allows, within the time budget. The best on validation is kept."""
    r = run.request
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
    reason = _head_only(run, fe, signals, left=r.time_budget - (time.time() - t0))
    if reason is None:
        best, notes = _try_fine_tuning(run, best, signals, candidates, t0, log)
        reason = (f"{n} training images: tried {', '.join(candidates)} ({'; '.join(notes)}); kept {best[0]} "
                  f"(best validation accuracy, then loss)")
    signals["fit_seconds"] = round(time.time() - t0, 2)
    log(f"auto: {reason}")
    run.progress.best(best[3]["val_acc"])
    return best[1], best[0], best[2], {"strategy": best[0], "reason": reason, "candidates": candidates,
                                       "signals": signals}


def _head_only(run: Run, fe: dict, signals: dict, *, left: float) -> str | None:
    """Why the head alone is kept without trying fine-tuning, or None when fine-tuning is worth a try."""
    n, budget = len(run.ds.train), run.request.time_budget
    if n < AUTO_PARTIAL_MIN_IMAGES:
        return f"{n} training images < {AUTO_PARTIAL_MIN_IMAGES}: head only (feature extraction)"
    if left <= 0:
        return f"the time budget ({budget:g}s) was spent on the head; head only"
    if fe["val_acc"] >= AUTO_HEAD_ENOUGH_ACC and signals["head_gap"] <= AUTO_HEAD_ENOUGH_GAP:
        return (f"the head alone reaches {fe['val_acc']:.4f} with a train/val gap of {signals['head_gap']:.3f}: "
                "nothing left for fine-tuning to show; head only")
    return None


def _try_fine_tuning(run: Run, best: tuple, signals: dict, candidates: dict, t0: float,
                     log: Callable) -> tuple[tuple, list[str]]:
    """Partial (and with enough data full) fine-tuning from the warmed-up head, each behind a trial and within
    what is left of the budget. Fills `candidates`; returns the best (name, backbone, history, figures) and a
    note per candidate."""
    r, n = run.request, len(run.ds.train)
    _, bb, hist, fe = best
    notes = []
    for name in ["partial"] + (["full"] if n >= AUTO_FULL_MIN_IMAGES else []):
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
    return best, notes
