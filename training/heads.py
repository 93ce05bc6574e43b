"""The multi-label head: each label scored on regions of the last feature map, the regions pooled per label.

A head on the globally pooled features averages a small object with everything around it. Here the backbone's
global pooling is replaced by `RegionPool` (a 3 x 3 grid of overlapping windows, each a little over half the
map's side, averaged), and the classifier by `RegionHead`: the same linear layer scores every region, and each
label takes a smooth maximum (log-sum-exp) of its region scores, so a label present in one corner is not
diluted by the other three. Measured on the seed-7 collage set (300 train / 150 val, 7 labels, EfficientNet-Lite0
features, validation mAP): at 224 px, pooled features 0.714, the 3 x 3 regions 0.727 to 0.735; at 448 px,
pooled 0.781, regions 0.815 to 0.826 (max instead of log-sum-exp: 0.813; per-position scores pooled by
log-sum-exp, no windows: 0.79 and ten times slower to fit).

The linear layer is the one every region shares, so the class activation map (its weights at each position of
the feature map, service/explain.py) is what the head looks at. `embedding` for drift and label findings is
the mean of the region features.
"""
from __future__ import annotations

import math

import torch
from torch import nn

REGION_GRID = 3  # windows per side
SHARPNESS = 10.0  # log-sum-exp temperature: 10 is near the maximum without its one-region gradient
# Multi-label input size, as a multiple of the backbone's own (when the request gives no image_size): objects
# in multi-label photos are smaller than an ImageNet photo's one object (the multi-label literature trains at
# 448 on COCO). On the collage set, pooled features: 0.714 mAP at 224, 0.752 at 320, 0.781 at 448.
INPUT_SCALE = 2


class RegionPool(nn.Module):
    """(N, C, H, W) -> (N, R, C): the mean of each of R = REGION_GRID**2 overlapping windows (region-major, so
    the head's per-region linear layer reads contiguous rows).

    One average-pooling op with uniform windows: stride `(H - k) // (grid - 1)` from a window of a little over
    half the side, the window then widened so the grid covers the map exactly (at 448 px, a 14 x 14 map: window
    8, stride 3; at 224 px, 7 x 7: window 5, stride 1). Nine slices and means compute the same thing but cost
    the served INT8 file 0.2 ms per image more (each slice a separate op that breaks the quantized chain)."""

    def __init__(self, grid: int = REGION_GRID):
        super().__init__()
        self.grid = grid

    def forward(self, x):
        h, w = int(x.shape[2]), int(x.shape[3])
        (kh, sh), (kw, sw) = _window(h, self.grid), _window(w, self.grid)
        y = nn.functional.avg_pool2d(x, (kh, kw), (sh, sw))  # N, C, grid, grid
        return y.flatten(2).transpose(1, 2).contiguous()  # contiguous: EfficientNet-Lite views it flat


def _window(size: int, n: int) -> tuple[int, int]:
    """(window, stride) of n uniform windows that cover `size` exactly; one window of the whole side when the
    map is smaller than n."""
    if size < n:
        return size, 1
    stride = max(1, (size - (size // 2 + 1)) // max(1, n - 1))
    return size - (n - 1) * stride, stride


class RegionHead(nn.Module):
    """Region features (N, R*C flattened, or N, R, C) -> label logits (N, K): one linear layer (`fc`) scores
    each region, log-sum-exp over the regions (minus log R, so equal scores give that score)."""

    def __init__(self, in_features: int, out_features: int, sharpness: float = SHARPNESS):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.in_features, self.out_features, self.sharpness = in_features, out_features, sharpness

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Training's dropout on cached region features: a feature channel dropped in all regions of a photo at
        once (as Dropout2d drops a channel at every position). One draw per channel, not per region and channel:
        torch's CPU generator made per-element dropout on 11,520 features half the head's fitting time."""
        r = x.reshape(x.shape[0], -1, self.in_features)
        return nn.functional.dropout1d(r.transpose(1, 2), p, training=True).transpose(1, 2).reshape(x.shape)

    def forward(self, x):
        z = self.fc(x.reshape(x.shape[0], -1, self.in_features))  # N, R, K
        return (torch.logsumexp(self.sharpness * z, 1) - math.log(z.shape[1])) / self.sharpness


def pooled(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features (N, C) behind the head's input: the mean of the regions for a RegionHead."""
    if isinstance(head, RegionHead):
        return x.reshape(x.shape[0], -1, head.in_features).mean(1)
    return x


def install_region_head(model: nn.Module, classifier: str, num_classes: int) -> bool:
    """Replace the model's global average pooling by RegionPool and its classifier by a RegionHead, where the
    classifier's input is the flattened pooled map (EfficientNet-Lite, ResNet, EfficientNet). Checked on an
    input; a model whose head does more (MobileNetV3's two layers, ConvNeXt's normalisation) is left as it was
    (a linear head on pooled features) and False returned."""
    pool_name = next((n for n in ("_avg_pooling", "avgpool") if isinstance(getattr(model, n, None),
                                                                           nn.AdaptiveAvgPool2d)), None)
    old_head = model.get_submodule(classifier)
    if pool_name is None or not isinstance(old_head, nn.Linear):
        return False
    old_pool = getattr(model, pool_name)
    parent, _, attr = classifier.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(model, pool_name, RegionPool())
    setattr(owner, attr, RegionHead(old_head.in_features, num_classes))
    was = model.training
    try:
        with torch.no_grad():
            ok = tuple(model.eval()(torch.zeros(1, 3, 64, 64)).shape) == (1, num_classes)
    except RuntimeError:
        ok = False
    model.train(was)
    if not ok:
        setattr(model, pool_name, old_pool)
        setattr(owner, attr, old_head)
    return ok
