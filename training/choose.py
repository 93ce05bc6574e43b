"""`auto`'s choice: train the requested strategy, or for `auto` decide from the data size, validation and the
time budget which candidates to try (the head first, then partial and full fine-tuning behind a trial),
keep the best on validation, and say why in one line (`summary`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from training.finetune import score_key
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


@dataclass(frozen=True)
class Trial:
    """auto's test of whether fine-tuning pays, asked after every epoch (fine_tune's `trial`).

    The first epoch of fine-tuning is often below the warmed-up head: augmentation starts and the backbone's
    learning rate warms up; the gain comes in the epochs after it. So one epoch is never judged alone. Until
    an epoch beats the head (validation accuracy, then lower loss), the trial looks twice: after `epochs`
    epochs it goes on only if the least-squares line through their validation accuracies reaches the head's
    within `reach` more epochs; after `last_look` epochs it stops. Once the head is beaten, patience and the
    budget decide. Measured on flowers5 (partial beats the head from epoch 3 to 5 and keeps +1.7 points) and
    on line drawings (partial stays 3-20 points below the head: stopped at epoch 3)."""
    head: tuple[float, float]  # the warmed-up head's (validation accuracy, loss): the point to beat
    epochs: int = 3
    reach: int = 2
    last_look: int = 6

    def __call__(self, history: list[dict]) -> str | None:
        acc, loss = self.head  # multi-label: the head's mAP, and every row's mAP (score_key)
        if any(score_key(r) > (acc, -loss) for r in history):
            return None
        n, best = len(history), max(score_key(r)[0] for r in history)
        if n == self.epochs:
            reached = trend([score_key(r)[0] for r in history], n + self.reach)
            if reached < acc:
                return (f"{n} epochs without beating the head's {acc:.4f} (best {best:.4f}), and their trend "
                        f"reaches {reached:.4f} by epoch {n + self.reach}")
        if n >= self.last_look:
            return f"{n} epochs without beating the head's {acc:.4f} (best {best:.4f})"
        return None


def trend(values: list[float], at: int) -> float:
    """The least-squares line through (1, values[0]) .. (n, values[-1]), read at epoch `at`."""
    x = np.arange(1, len(values) + 1, dtype=float)
    slope, intercept = np.polyfit(x, np.asarray(values, dtype=float), 1) if len(values) > 1 else (0.0, values[0])
    return float(slope * at + intercept)


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
    return bb, r.strategy, hist, {"strategy": r.strategy, "reason": "requested", "candidates": {},
                                  "summary": _requested_line(r.strategy, hist), **figures}


def _auto(run: Run, log: Callable) -> tuple[Backbone, str, list[dict], dict]:
    """The head first; then, unless its figures or the data size say fine-tuning cannot pay, the fine-tuning
    candidates the data size allows, within the time budget. The best on validation is kept."""
    r = run.request
    t0 = time.time()
    n = len(run.ds.train)
    bb, hist, summary = run.run("feature_extraction")
    fe = run.head_eval(bb)
    head_row = max(hist, key=score_key)
    # Multi-label: judged by mAP (train mAP for the gap), which score_key and `_score` read first.
    score, train_score = score_key(fe)[0], head_row.get("train_map", head_row["train_acc"])
    signals = {"train_images": n, "head_val_acc": round(fe["val_acc"], 4),
               "head_train_acc": round(head_row["train_acc"], 4),
               "head_gap": round(train_score - score, 4), "time_budget": r.time_budget}
    candidates = {"feature_extraction": {k: fe[k] for k in ("val_acc", "val_map", "val_loss") if k in fe}
                  | {"seconds": summary["seconds"]}}
    best = ("feature_extraction", bb, hist, fe)
    reason, line = _head_only(run, fe, signals, left=r.time_budget - (time.time() - t0))
    if reason is None:
        best, notes = _try_fine_tuning(run, best, signals, candidates, t0, log)
        reason = (f"{n} training images: tried {', '.join(candidates)} ({'; '.join(notes)}); kept {best[0]} "
                  f"(best validation accuracy, then loss)")
        line = _tried_line(best[0], candidates)
    signals["fit_seconds"] = round(time.time() - t0, 2)
    log(f"auto: {reason}")
    run.progress.best(score_key(best[3])[0])
    return best[1], best[0], best[2], {"strategy": best[0], "reason": reason, "summary": line,
                                       "candidates": candidates, "signals": signals}


def _head_only(run: Run, fe: dict, signals: dict, *, left: float) -> tuple[str | None, str | None]:
    """Why the head alone is kept without trying fine-tuning, and the one-line summary: (None, None) when
    fine-tuning is worth a try."""
    n, budget = len(run.ds.train), run.request.time_budget
    if n < AUTO_PARTIAL_MIN_IMAGES:
        return (f"{n} training images < {AUTO_PARTIAL_MIN_IMAGES}: head only (feature extraction)",
                f"kept the head: {n} training images are too few to fine-tune (under {AUTO_PARTIAL_MIN_IMAGES})")
    if left <= 0:
        return (f"the time budget ({budget:g}s) was spent on the head; head only",
                f"kept the head: the {budget:g}s time budget was spent fitting it")
    if score_key(fe)[0] >= AUTO_HEAD_ENOUGH_ACC and signals["head_gap"] <= AUTO_HEAD_ENOUGH_GAP:
        return (f"the head alone reaches {score_key(fe)[0]:.4f} with a train/val gap of {signals['head_gap']:.3f}: "
                "nothing left for fine-tuning to show; head only",
                f"kept the head: it reaches {score_key(fe)[0]:.1%} with no train/val gap left to close")
    return None, None


def _tried_line(kept: str, candidates: dict) -> str:
    """One line a data scientist reads: what was kept and by how much, or why fine-tuning was not."""
    head = _score(candidates["feature_extraction"])
    tuned = {k: v for k, v in candidates.items() if k != "feature_extraction"}
    if kept != "feature_extraction":
        c = candidates[kept]
        return (f"kept {kept}: {100 * (_score(c) - head):+.1f} points over the head "
                f"({head:.1%} -> {_score(c):.1%}) at epoch {c['best_epoch']} of {c['epochs_run']}")
    parts = []
    for name, c in tuned.items():
        gap = 100 * (c["tuned_val_acc"] - head)
        by = {"trial": "the trial", "budget": "the time budget", "patience": "early stopping"}.get(
            c["stopped"], "its epoch limit")
        parts.append(f"{name} reached {c['tuned_val_acc']:.1%} ({gap:+.1f} points) in {c['epochs_run']} "
                     f"epochs, stopped by {by}")
    return f"kept the head ({head:.1%}): " + ("; ".join(parts) or "no time was left in the budget to fine-tune")


def _score(figures: dict) -> float:
    return score_key(figures)[0]


def _requested_line(strategy: str, history: list[dict]) -> str:
    best = max((h for h in history if h["phase"] != "head"), default=None, key=score_key)
    best = best or max(history, key=score_key)
    what = "mAP" if "val_map" in best else "accuracy"
    return f"trained {strategy} as requested: best validation {what} {score_key(best)[0]:.1%} at epoch {best['epoch']}"


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
        bb2, hist2, s2 = run.run(name, start=bb, budget=left, trial=Trial((_score(fe), fe["val_loss"])))
        kept = s2["kept"]
        ev = {k: kept[k] for k in ("val_acc", "val_map", "val_loss") if k in kept}
        candidates[name] = {**ev, "seconds": s2["seconds"], "epochs_run": kept["epochs_run"],
                            "stopped": kept["stopped"], "best_epoch": kept["epoch"],
                            "tuned_val_acc": kept["tuned_val_acc"], "trial": kept.get("trial")}
        if "activation_cache" in s2:
            candidates[name]["activation_cache"] = s2["activation_cache"]
        notes.append(f"{name} stopped by {kept['stopped']} after {kept['epochs_run']} epoch(s)")
        if kept["epoch"] > 0 and score_key(ev) > score_key(best[3]):
            best = (name, bb2, hist + hist2, ev)
    return best, notes
