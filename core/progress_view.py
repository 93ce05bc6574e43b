"""Showing a training run's progress (core/progress.py states) to whoever waits on it.

    view = ProgressView(sys.stderr)          # a bar on a terminal, a line per phase otherwise
    train(request, data, log=view.write_to(sys.stdout), progress=view)
    view.close()

    sink = throttled(write_state, every=0.5) # at most every 0.5 s, and on every phase change

The head's epochs come by the hundred in a second: everything that draws or stores a state goes through
`throttled`, which lets a phase change (and the last epoch of a phase) through at once and other updates at
most every `every` seconds. No torch here: the service imports this module.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from core.progress import describe

# Phases whose every epoch is worth a line in a log: fine-tuning epochs take seconds each, the head's do not.
EPOCH_LINES = ("partial", "full", "scratch")


def throttled(sink: Callable[[dict], None], every: float) -> Callable[[dict], None]:
    """`sink`, called at most every `every` seconds, except that a new phase or a phase's last epoch is
    passed on at once (a reader should never miss 'finishing' or 'done')."""
    last = {"phase": None, "at": float("-inf")}

    def pass_on(state: dict) -> None:
        now = time.monotonic()
        final = state.get("epochs") and state.get("epoch") == state["epochs"]
        if state.get("phase") != last["phase"] or final or now - last["at"] >= every:
            last.update(phase=state.get("phase"), at=now)
            sink(state)

    return pass_on


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class ProgressView:
    """The CLI's progress display on `stream` (stderr). On a terminal: a tqdm bar (phase, epoch of epochs,
    best validation accuracy, time left) redrawn in place, with log lines printed above it. Otherwise (CI,
    a job's log, a pipe): no redrawing, one `progress: ...` line per phase and per fine-tuning epoch."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.bar = None
        self._phase: str | None = None
        self._show = throttled(self._draw if self.live else self._line, every=0.1 if self.live else 0.0)
        if self.live:
            from tqdm import tqdm

            # leave=False: the bar goes when the run ends; the log lines and the summary stay. A terminal
            # that reports no size (a pty nobody sized) would get no bar at all: 100 x 20 then.
            sized = _columns(self.stream) > 0
            self.bar = tqdm(total=None, desc="preparing", file=self.stream, leave=False, dynamic_ncols=sized,
                            ncols=None if sized else 100, nrows=None if sized else 20,
                            bar_format="{desc}{postfix}")  # tqdm puts ", " before a postfix
        else:
            self._print("progress: preparing")

    def __call__(self, state: dict) -> None:
        self._show(state)

    def write_to(self, stream: TextIO) -> Callable[[str], None]:
        """A log function printing to `stream` above the bar (the bar is cleared and redrawn around it)."""
        def log(msg: str) -> None:
            if self.bar is not None:
                self.bar.write(str(msg), file=stream)
            else:
                print(msg, file=stream, flush=True)
        return log

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- terminal -----------------------------------------------------------------------------------
    def _draw(self, state: dict) -> None:
        bar = self.bar
        if bar is None:
            return
        epochs = state.get("epochs")
        extra = []
        if state.get("best_val_acc") is not None:
            extra.append(f"best val acc {state['best_val_acc']:.4f}")
        if state.get("eta_seconds") is not None:
            extra.append(f"about {state['eta_seconds']:.0f} s left")
        extra.append(f"{state.get('elapsed_seconds') or 0:.0f} s in")
        bar.set_postfix_str(", ".join(extra), refresh=False)
        if state.get("phase") != self._phase:  # a new phase: its own description, bar and length
            self._phase = state.get("phase")
            bar.bar_format = "{desc} {n_fmt}/{total_fmt} |{bar:20}|{postfix}" if epochs else "{desc}{postfix}"
            bar.set_description_str(self._phase or "?", refresh=False)
            bar.reset(total=epochs)
        bar.n = state.get("epoch") or 0
        bar.refresh()

    # -- logs ---------------------------------------------------------------------------------------
    def _line(self, state: dict) -> None:
        phase = state.get("phase")
        if phase != self._phase or (phase in EPOCH_LINES and state.get("epoch")):
            self._phase = phase
            self._print(f"progress: {describe(state)}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
