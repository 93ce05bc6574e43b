"""Adaptive batching inside the process that parsed the requests: one onnxruntime run for many requests.

Each request's images are decoded and preprocessed with the contract of the model that will run them, then
queued. One thread per process runs the model: while a run is on, arriving images wait, and the next run
takes all of them, up to the batch limit. No timer is needed: under load batches fill on their own, and a
lone request runs at once. A run takes only requests decoded for the same model, so a swap between decode
and run never mixes versions in a batch or a reply.

This replaces a second BentoML service reached over local HTTP (the hop cost more CPU than the model run:
docs/benchmarks.md). BentoML's own batching needs one batchable argument per call and answers a batch as a
whole, while a prediction request carries options and gets its own 4xx for its own bad image.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("refit.batcher")


class Overloaded(RuntimeError):
    """A request waited longer than the latency limit before its run started."""


@dataclass
class _Pending:
    model: object  # service.model.Loaded: the version whose contract decoded these arrays
    arrays: np.ndarray  # (n, 3, H, W)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, *, max_batch_size: int, max_latency_ms: float, on_batch=None, on_idle=None, on_outputs=None):
        self.max_batch_size = max_batch_size
        self.on_outputs = on_outputs  # called with (model, probs, embeddings) after each run (drift)
        self.max_wait = max_latency_ms / 1000
        self.on_batch = on_batch  # called with each run's size (the batch-size metric)
        self.on_idle = on_idle  # called when the queue runs empty, at most once a second (heap trimming)
        self._last_idle = 0.0
        self._pending: deque[_Pending] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="refit-batcher", daemon=True)
        self._thread.start()

    async def run(self, model, arrays: np.ndarray) -> np.ndarray:
        """The model's output rows for `arrays`, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        item = _Pending(model, arrays, loop.create_future(), loop)
        with self._ready:
            self._pending.append(item)
            self._ready.notify()
        return await item.future

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    # -- the model thread ------------------------------------------------------------------------
    def _take(self) -> list[_Pending]:
        """Every waiting request of the first one's model, up to the batch limit (at least one request)."""
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if self._closed:
                return []
            first = self._pending.popleft()
            batch, size, rest = [first], len(first.arrays), deque()
            while self._pending:
                item = self._pending.popleft()
                if item.model is first.model and size + len(item.arrays) <= self.max_batch_size:
                    batch.append(item)
                    size += len(item.arrays)
                else:
                    rest.append(item)
            self._pending.extendleft(reversed(rest))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            now = time.monotonic()
            late = [b for b in batch if now - b.queued > self.max_wait]
            for b in late:
                _settle(b, Overloaded(f"the request waited over {self.max_wait * 1000:.0f} ms for the model; "
                                      "the server is overloaded, try again"))
            batch = [b for b in batch if b not in late]
            if not batch:
                continue
            arrays = batch[0].arrays if len(batch) == 1 else np.concatenate([b.arrays for b in batch])
            try:
                # A request larger than the limit runs in slices of it, still on its one model.
                outs = [batch[0].model.run_outputs(arrays[i:i + self.max_batch_size])
                        for i in range(0, len(arrays), self.max_batch_size)]
                probs = np.concatenate([o[0] for o in outs])
            except Exception as e:  # broad on purpose: every waiting request gets the error, the thread lives on
                log.exception("model run failed")
                for b in batch:
                    _settle(b, e)
                continue
            if self.on_batch:
                self.on_batch(len(arrays))
            start = 0
            for b in batch:
                _settle(b, probs[start:start + len(b.arrays)])
                start += len(b.arrays)
            if self.on_outputs and outs[0][1] is not None:  # after the replies: drift never delays one
                self.on_outputs(batch[0].model, probs, np.concatenate([o[1] for o in outs]))
            del batch, arrays, probs, outs
            if self.on_idle and not self._pending and time.monotonic() - self._last_idle > 1.0:
                self._last_idle = time.monotonic()
                self.on_idle()


def _settle(item: _Pending, outcome) -> None:
    def set_() -> None:
        if item.future.done():  # the request was cancelled (client gone)
            return
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)

    try:
        item.loop.call_soon_threadsafe(set_)
    except RuntimeError:  # the event loop is closed: the worker is stopping
        pass
