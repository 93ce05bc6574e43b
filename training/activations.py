"""The activation cache: partial fine-tuning without running the frozen stages again and again.

`partial` freezes the first stages of the backbone. Their output for a given input never changes, so it is
computed once per augmented view of each training image (in ONNX Runtime, several times faster than eager
PyTorch on a CPU) and kept; each training step then runs only the unfrozen stages and the head. Views are
made lazily, one per epoch while fewer than K exist (an epoch that early stopping never reaches costs
nothing), after which every epoch draws one of the K cached views per image. Validation images are not
augmented, so their activations are computed once. The frozen stages run in eval mode, so their BatchNorm
layers use the ImageNet statistics as before; unlike the whole-network path, their drop-connect is off too
(it drew fresh noise in layers that do not learn).

    split = split_model(bb, unfrozen_stages)        # None: this backbone's forward cannot be cut
    cache = ViewCache(split, images, labels, transform, views=K, cache_dir=...)
    fine_tune(bb, groups, cache, cache.val(val_arrays), ..., model=split.tail)

The cut is made from the backbone's forward written as ordered segments (`forward_segments`), each naming
the stages it covers; the tail shares its modules with the backbone, so training the tail trains the model.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.settings import settings
from training.export import session
from training.registry import Backbone

# Cache memory allowed (REFIT_ACTIVATION_CACHE_MB, default 2048), and never more than this share of the memory
# available when training starts. At the defaults (EfficientNet-Lite0, 4 stages unfrozen, 224 px) an image
# costs 37 KB per view, so a few hundred images take tens of MB; the bound matters for large datasets and late
# cuts.
MAX_SHARE_OF_AVAILABLE = 0.5


class Segment(nn.Module):
    """One step of a forward pass: `fn(x)` using modules of the backbone, registered here (shared, not copied)
    so that the tail's parameters, state dict and train/eval mode are the backbone's own."""

    def __init__(self, stages: list[str], modules: dict[str, nn.Module], fn: Callable):
        super().__init__()
        self.stages = stages
        self.parts = nn.ModuleDict({k.replace(".", "_"): m for k, m in modules.items()})
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def forward_segments(bb: Backbone) -> list[Segment] | None:
    """The backbone's forward as ordered segments, the last one ending in the classifier's logits; None for
    an architecture this module does not know (partial then runs through the whole network)."""
    m = bb.model
    get = m.get_submodule
    if hasattr(m, "_blocks") and hasattr(m, "_conv_stem"):  # efficientnet_lite_pytorch.EfficientNet
        n = len(m._blocks)
        rate = m._global_params.drop_connect_rate

        def block(i):
            # The drop-connect rate grows with depth, exactly as EfficientNet.extract_features sets it.
            return lambda x: m._blocks[i](x, drop_connect_rate=rate * i / n if rate else rate)

        def head(x):
            x = m._avg_pooling(x).flatten(1)
            return m._fc(m._dropout(x))

        segs = [Segment(["_conv_stem"], {"_conv_stem": m._conv_stem}, m._conv_stem),
                Segment(["_bn0"], {"_bn0": m._bn0}, lambda x: m._swish(m._bn0(x)))]
        segs += [Segment([f"_blocks.{i}"], {f"_blocks.{i}": m._blocks[i]}, block(i)) for i in range(n)]
        segs += [Segment(["_conv_head"], {"_conv_head": m._conv_head}, m._conv_head),
                 Segment(["_bn1"], {"_bn1": m._bn1}, lambda x: m._swish(m._bn1(x))),
                 Segment([bb.classifier], {"_fc": m._fc, "_dropout": m._dropout}, head)]
        return segs
    pool = getattr(m, "avgpool", None)
    top = bb.classifier.split(".")[0]
    if pool is None or not all(_plain_child(m, s) for s in bb.stages):
        return None
    # torchvision ResNet (conv1 .. layer4) and the `features`-rooted models (MobileNetV3, EfficientNet,
    # ConvNeXt): the stages run in order, then global pooling, flatten and the classifier.
    segs = [Segment([s], {s: get(s)}, get(s)) for s in bb.stages]
    cls = get(top)
    # ConvNeXt's classifier starts with a LayerNorm2d on the pooled map and flattens itself.
    flat = not (isinstance(cls, nn.Sequential) and type(cls[0]).__name__ == "LayerNorm2d")
    segs.append(Segment([bb.classifier], {"avgpool": pool, top: cls},
                        lambda x: cls(torch.flatten(pool(x), 1) if flat else pool(x))))
    return segs


def _plain_child(model: nn.Module, stage: str) -> bool:
    """A stage that is a direct child of the model or of its `features` sequence: called as module(x)."""
    return stage.rpartition(".")[0] in ("", "features")


@dataclass
class Split:
    prefix: nn.Sequential  # the frozen stages (run once per view)
    tail: nn.Sequential  # the unfrozen stages and the head (trained)
    cut: int  # how many segments the prefix holds
    name: str  # what the prefix ends with, for logs and the cache file name


def split_model(bb: Backbone, unfrozen: list[str]) -> Split | None:
    """Cut the backbone before the first segment that holds an unfrozen stage. None when the forward is not
    known or nothing would be frozen (then there is nothing to cache)."""
    segs = forward_segments(bb)
    if not segs:
        return None
    wanted = set(unfrozen)
    cut = next((i for i, s in enumerate(segs) if wanted & set(s.stages)), len(segs) - 1)
    if cut == 0:
        return None
    split = Split(nn.Sequential(*segs[:cut]), nn.Sequential(*segs[cut:]), cut, segs[cut - 1].stages[-1])
    # The segments restate the forward pass; checked against it on a small input rather than trusted, so an
    # architecture that does something between its stages falls back to the whole network instead of
    # training a different function.
    try:
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), evaluating(bb.model):
            same = torch.allclose(split.tail(split.prefix(x)), bb.model(x), rtol=1e-4, atol=1e-5)
    except RuntimeError:
        same = False
    return split if same else None


def prefix_session(bb: Backbone, split: Split, input_size: int, cache_dir: Path, threads: int | None = None):
    """ONNX Runtime session of the frozen prefix, exported once and kept on disk by backbone, cut, input size
    and weights (a changed weights file never gives stale activations)."""
    h = hashlib.sha256()
    for k, v in sorted(split.prefix.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes()[:4096])
    path = Path(cache_dir) / f"prefix-{bb.name}-{split.cut}-{input_size}-{h.hexdigest()[:12]}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        # Exported from the backbone's own modules (the segments call them, so a copy would not be what runs),
        # in eval mode: frozen BatchNorm layers use their ImageNet statistics, as in training.
        with warnings.catch_warnings(), evaluating(split.prefix):
            warnings.simplefilter("ignore")
            torch.onnx.export(split.prefix, torch.zeros(2, 3, input_size, input_size), str(tmp),
                              input_names=["input"], output_names=["activations"], opset_version=17, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "activations": {0: "batch"}})
        os.replace(tmp, path)
    return session(path, threads)


@contextmanager
def evaluating(module: nn.Module):
    """Eval mode for the block, then every submodule's own mode back (frozen BatchNorm layers stay in eval mode
    while the rest trains: set_train_mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def limit_bytes() -> int:
    """The cache's memory bound: REFIT_ACTIVATION_CACHE_MB (default 2048), and at most half of the memory
    available now."""
    limit = settings().activation_cache_mb * 2**20
    try:
        import psutil

        limit = min(limit, MAX_SHARE_OF_AVAILABLE * psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with BentoML
        pass
    return int(limit)


class ViewCache(torch.utils.data.Dataset):
    """Cached prefix activations of K augmented views of every training image, as a dataset of
    (activation, label) for the ordinary fine-tuning loop. `set_epoch(e)` (called by the loop before each
    epoch) makes view e while fewer than K exist; later epochs draw a random cached view per image."""

    def __init__(self, split: Split, sess, images: list, labels: list[int], transform, views: int,
                 seed: int, batch_size: int = 16, log: Callable = print):
        self.split, self.sess, self.images, self.transform = split, sess, images, transform
        self.labels = torch.tensor(labels)
        self.views, self.batch_size, self.log = views, batch_size, log
        self.rng = np.random.default_rng(seed)
        self.store: np.ndarray | None = None  # (K, N, C, H, W) float32, allocated at the first view
        self.made = 0
        self.current = np.zeros(len(images), dtype=np.int64)  # which view each image uses this epoch
        self.seconds = 0.0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.store[self.current[i], i]), self.labels[i]

    @property
    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes

    def set_epoch(self, epoch: int) -> None:
        if self.made < self.views:
            self._make_view()
            self.current[:] = self.made - 1
        else:
            self.current = self.rng.integers(0, self.views, len(self.images))

    def _make_view(self) -> None:
        t0 = time.time()
        out = []
        for i in tqdm(range(0, len(self.images), self.batch_size), desc=f"view {self.made + 1}/{self.views}",
                      leave=False, unit="batch", disable=None):
            x = torch.stack([self.transform(im) for im in self.images[i:i + self.batch_size]]).numpy()
            out.append(self.sess.run(None, {"input": x})[0])
        acts = np.concatenate(out)
        if self.store is None:
            self.store = np.empty((self.views, *acts.shape), dtype=np.float32)
        self.store[self.made] = acts
        self.made += 1
        self.seconds += time.time() - t0


def activation_bytes(split: Split, input_size: int, images: int, views: int) -> int:
    """What the cache will hold: the prefix's output size (from one tiny forward pass) x views x images."""
    with torch.no_grad(), evaluating(split.prefix):
        shape = split.prefix(torch.zeros(1, 3, input_size, input_size)).shape
    return int(np.prod(shape[1:])) * 4 * images * views


def prefix_outputs(sess, arrays: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": arrays[i:i + batch_size]})[0]
                           for i in range(0, len(arrays), batch_size)])
