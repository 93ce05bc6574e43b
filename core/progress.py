"""Where a training run is, for whoever waits on it: phase, epoch, best validation accuracy so far and an
estimate of the time left. The CLI draws it as a progress bar; a retrain job keeps it in its state.

    progress = Progress(sink)             # sink(dict) is called on every change
    progress.phase("partial", epochs=10, budget=12.5)
    progress.epoch(1, val_acc=0.93)

The estimate is the mean epoch time of this phase times the epochs left (capped by what is left of auto's
time budget), plus what the run still has to do after fitting: export, checks and publishing, whose cost
grows with the number of validation images (FINISH_SECONDS + FINISH_PER_IMAGE x images, measured on 2 cores).
"""
from __future__ import annotations

import time
from typing import Callable

FINISH_SECONDS = 6.0
FINISH_PER_IMAGE = 0.02
PHASES = ("preparing", "features", "head", "partial", "full", "scratch", "finishing", "done")


class Progress:
    def __init__(self, sink: Callable[[dict], None] | None = None):
        self.sink = sink
        self.t0 = time.monotonic()
        self.finish_estimate = FINISH_SECONDS
        self.state: dict = {"phase": "preparing", "epoch": None, "epochs": None, "best_val_acc": None,
                            "eta_seconds": None, "elapsed_seconds": 0.0}
        self._phase_t0 = self.t0
        self._first_epoch_end: float | None = None
        self._budget_end: float | None = None

    def set_images(self, val_images: int) -> None:
        self.finish_estimate = FINISH_SECONDS + FINISH_PER_IMAGE * val_images

    def phase(self, name: str, *, epochs: int | None = None, budget: float | None = None) -> None:
        """A new phase starts; `budget`: seconds it may take at most (auto's time budget)."""
        now = time.monotonic()
        self._phase_t0 = now
        self._first_epoch_end = None
        self._budget_end = now + budget if budget is not None else None
        eta = None if epochs else (self.finish_estimate if name not in ("done",) else 0.0)
        self._emit(phase=name, epoch=0 if epochs else None, epochs=epochs, eta_seconds=eta)

    def epoch(self, epoch: int, *, val_acc: float | None = None) -> None:
        now = time.monotonic()
        st = self.state
        best = st["best_val_acc"]
        if val_acc is not None and (best is None or val_acc > best):
            best = val_acc
        eta = None
        if epoch == 1 or self._first_epoch_end is None:
            self._first_epoch_end = now
        if st["epochs"]:
            # The first epoch pays one-off costs (an optimizer's first step, a view of the activation cache):
            # from the second on, the mean of the later ones is the better guess.
            per = (now - self._first_epoch_end) / (epoch - 1) if epoch > 1 else now - self._phase_t0
            left = per * max(0, st["epochs"] - epoch)
            if self._budget_end is not None:
                left = min(left, max(0.0, self._budget_end - now))
            eta = left + self.finish_estimate
        self._emit(epoch=epoch, best_val_acc=best, eta_seconds=eta)

    def best(self, val_acc: float) -> None:
        """A validation accuracy reached outside an epoch loop (the warmed-up head, a kept candidate)."""
        if self.state["best_val_acc"] is None or val_acc > self.state["best_val_acc"]:
            self._emit(best_val_acc=val_acc)

    def _emit(self, **changes) -> None:
        self.state.update(changes)
        self.state["elapsed_seconds"] = round(time.monotonic() - self.t0, 1)
        if self.state["eta_seconds"] is not None:
            self.state["eta_seconds"] = round(self.state["eta_seconds"], 1)
        if self.state["best_val_acc"] is not None:
            self.state["best_val_acc"] = round(self.state["best_val_acc"], 4)
        if self.sink is not None:
            self.sink(dict(self.state))


def describe(state: dict) -> str:
    """One line for logs and the console: 'partial epoch 3/10, best val acc 0.9412, about 12 s left'."""
    if state.get("phase") == "done":
        best = state.get("best_val_acc")
        return f"done in {state.get('elapsed_seconds') or 0:.0f} s" + (f", best val acc {best:.4f}" if best else "")
    parts = [state.get("phase") or "?"]
    if state.get("epochs"):
        parts[0] += f" epoch {state.get('epoch') or 0}/{state['epochs']}"
    if state.get("best_val_acc") is not None:
        parts.append(f"best val acc {state['best_val_acc']:.4f}")
    if state.get("eta_seconds") is not None:
        parts.append(f"about {state['eta_seconds']:.0f} s left")
    return ", ".join(parts)
