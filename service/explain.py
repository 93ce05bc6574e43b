"""Class activation maps: which part of the image made the model answer a label. numpy and Pillow only (the
serving image has no torch and no matplotlib; the colour map is written out here).

For a backbone that ends in global average pooling and one linear layer (the head), the logit of class k is
b_k + the mean over positions (y, x) of W_k . F[:, y, x], with F the last feature map (C x h x w). The map
W_k . F[:, y, x] is that logit spread over the positions it came from (Zhou et al., "Learning Deep Features
for Discriminative Localization", CVPR 2016), so it needs no gradients: the model file's `features` output
gives F, and the version's `cam.npz` (written at export, `training/export.py`) gives W and b.

    refit explain ant.jpg -o heatmap.png          # or POST /explain with the image in `image`
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.contract import Contract
from core.preprocess import crop_window, eval_array, load_image

CAM_FILE = "cam.npz"  # the name training.export writes (not imported from there: that module imports torch)
FEATURES = "features"
# Jet: dark blue (cold) through cyan and yellow to dark red (hot), as (position, RGB) stops.
JET = ((0.0, (0, 0, 128)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)), (0.625, (255, 255, 0)),
       (0.875, (255, 0, 0)), (1.0, (128, 0, 0)))
# The photo shows through cold regions and the colour covers hot ones: alpha grows with the map.
ALPHA_MIN, ALPHA_MAX = 0.2, 0.65
MAX_LISTED_CLASSES = 50  # an unknown label's message lists this many classes; the reply's `classes` has all


class NotExplainable(Exception):
    """This version cannot give class activation maps (no `features` output, or no head weights)."""


class UnknownLabel(ValueError):
    def __init__(self, label: str, classes: tuple[str, ...]):
        shown = ", ".join(classes[:MAX_LISTED_CLASSES])
        more = (f", ... ({len(classes)} classes in all, listed in `classes`)"
                if len(classes) > MAX_LISTED_CLASSES else "")
        super().__init__(f"label {label!r} is not a class of this version; its classes: {shown}{more}")
        self.classes = classes


@dataclass(frozen=True)
class Head:
    weight: np.ndarray  # (K, C) float32
    bias: np.ndarray  # (K,)


_heads: dict[tuple[str, str], Head] = {}  # (version, folder): a version's files never change
_heads_lock = threading.Lock()


def head_for(version: str, session, folder: Path | None) -> Head:
    """The version's head weights, read once per process (a version's files never change), or
    NotExplainable saying why there are none."""
    if FEATURES not in {o.name for o in session.get_outputs()}:
        raise NotExplainable(f"{version} has no feature-map output (it was exported before explanations); "
                             "retrain to get explanations")
    key = (version, str(folder))
    with _heads_lock:
        head = _heads.get(key)
    if head is not None:
        return head
    path = Path(folder or ".") / CAM_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            head = Head(z["weight"].astype(np.float32), z["bias"].astype(np.float32))
    except FileNotFoundError:
        raise NotExplainable(f"{version} has no {CAM_FILE} (the head's weights); retrain to get explanations") from None
    except (OSError, KeyError, ValueError) as e:
        raise NotExplainable(f"{version}: {CAM_FILE} cannot be read ({type(e).__name__}: {e})") from None
    with _heads_lock:
        _heads[key] = head
    return head


def class_index(label: str | None, probs: np.ndarray, classes: tuple[str, ...]) -> int:
    """The class to explain: `label`, or the most probable one."""
    if label is None:
        return int(np.argmax(probs))
    try:
        return classes.index(label)
    except ValueError:
        raise UnknownLabel(label, classes) from None


def activation_map(features: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """One image's (C, h, w) feature map and a class's (C,) head weights: the (h, w) map, scaled to 0..1
    (a flat map is all zeros). The bias is left out: a constant, which the scaling removes anyway."""
    cam = np.einsum("c,chw->hw", weight.astype(np.float32), features.astype(np.float32))
    low, high = float(cam.min()), float(cam.max())
    return (cam - low) / (high - low) if high > low else np.zeros_like(cam)


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """The map stretched bilinearly over the size x size crop (each cell's value at its centre)."""
    return np.asarray(Image.fromarray(cam.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))


def colormap(values: np.ndarray) -> np.ndarray:
    """0..1 values to uint8 RGB through JET."""
    at = np.array([p for p, _ in JET])
    rgb = np.array([c for _, c in JET], np.float32)
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, at, rgb[:, i]) for i in range(3)], axis=-1).astype(np.uint8)


def crop_rgb(array: np.ndarray, contract: Contract) -> np.ndarray:
    """The model input back as the uint8 RGB crop it was made from (HWC)."""
    mean = np.asarray(contract.mean, np.float32)[:, None, None]
    std = np.asarray(contract.std, np.float32)[:, None, None]
    return np.clip(np.rint((array * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def overlay(crop: np.ndarray, heat: np.ndarray) -> Image.Image:
    """The heat map blended over the crop (both size x size)."""
    alpha = (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * heat)[..., None]
    blended = (1.0 - alpha) * crop.astype(np.float32) + alpha * colormap(heat).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def prepare(data: bytes, contract: Contract, *, name: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The model input for one image and the size of the decoded, upright image."""
    im = load_image(data, contract, name=name, max_pixels=max_pixels)
    return eval_array(im, contract), im.size


def crop_fractions(size: tuple[int, int], contract: Contract) -> dict:
    """Where the crop the map covers lies in the image, as fractions of its width and height (the same for
    the image as uploaded and as decoded at reduced scale)."""
    w, h = size
    nw, nh, left, top = crop_window(w, h, contract)
    c = contract.input_size
    return {"left": left / nw, "top": top / nh, "width": c / nw, "height": c / nh}


def explain(session, head: Head, contract: Contract, labels: tuple[str, ...], array: np.ndarray,
            image_size: tuple[int, int], label: str | None = None) -> dict:
    """Run the model on one preprocessed image and explain `label` (default: the top class). Returns the
    probabilities and what the reply needs: the explained class, the native-resolution map, the overlay (PNG
    bytes), the peak and the crop's place in the image."""
    probs, features = session.run(["probs", FEATURES], {"input": array[None]})
    probs = probs[0]
    k = class_index(label, probs, labels)
    if head.weight.shape != (len(probs), features.shape[1]):
        raise NotExplainable(f"{CAM_FILE} holds a {head.weight.shape[0]} x {head.weight.shape[1]} head, but the "
                             f"model has {len(probs)} classes and {features.shape[1]} feature channels")
    cam = activation_map(features[0], head.weight[k])
    heat = upsample(cam, contract.input_size)
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    size = contract.input_size
    return {"probs": probs, "explained": labels[k], "explained_score": float(probs[k]),
            "heatmap": np.round(cam, 3).tolist(),
            "overlay_png": png_bytes(overlay(crop_rgb(array, contract), heat)),
            "peak": {"x": (px + 0.5) / size, "y": (py + 0.5) / size},
            "crop": crop_fractions(image_size, contract)}


def explain_upload(model, name: str, data: bytes, label: str | None, max_pixels: int) -> dict:
    """`explain` for an uploaded image on a served model (`service.model.Loaded`): NotExplainable before
    any decoding when the version cannot give maps, ImageError for an image that cannot be used."""
    head = head_for(model.version, model.session, model.folder)
    array, size = prepare(data, model.contract, name=name, max_pixels=max_pixels)
    return explain(model.session, head, model.contract, model.labels, array, size, label)
