"""Image decoding and the two transforms built from a Contract.

`load_image` + `eval_array` are the exact path serving uses, so validation figures mean what a client
will see. `train_transform` adds augmentation on top of the same contract for training only.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.contract import Contract

# Formats a customer's camera or export tool produces; anything else is refused by name.
SUPPORTED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 50_000_000  # decompression-bomb guard: about 7000 x 7000

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """An input that is not a usable image; the message names what was wrong."""


def load_image(source: bytes | str | Path, contract: Contract | None = None, *,
               max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode to RGB. With a contract, JPEGs are decoded at reduced scale (libjpeg DCT scaling) but never
    below the contract's resize size, which is most of the decode time saved on large photos."""
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognised bytes)") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot be read ({e})") from None
    if im.format not in SUPPORTED_FORMATS:
        raise ImageError(f"{label}: unsupported format {im.format}; use one of {sorted(SUPPORTED_FORMATS)}")
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} pixels is over the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageError(f"{label}: empty image")
    if contract is not None and im.format in ("JPEG", "MPO"):
        im.draft("RGB", (contract.resize_size, contract.resize_size))
    try:
        im = im.convert("RGB")  # forces the full decode: truncated or corrupt data fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: corrupt or truncated image data ({e})") from None
    return im


def resize_crop(im: Image.Image, contract: Contract) -> Image.Image:
    """Shorter side to resize_size, then a centre crop of input_size (torchvision's Resize + CenterCrop).

    Only the crop window is resampled (PIL's `box`): the same pixels as resizing the whole image and
    cropping it, without computing the third of the resized image the crop throws away."""
    w, h = im.size
    size, c = contract.resize_size, contract.input_size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
    if (nw, nh) == (w, h):
        return im.crop((left, top, left + c, top + c))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
    return im.resize((c, c), _RESAMPLE[contract.interpolation], box=box)


def eval_array(im: Image.Image, contract: Contract) -> np.ndarray:
    """The model input for one image: float32 CHW, normalised with the contract's mean and std."""
    x = np.asarray(resize_crop(im, contract))  # HWC uint8
    std = np.asarray(contract.std, dtype=np.float32)
    scale = np.float32(1.0 / 255.0) / std
    bias = -np.asarray(contract.mean, dtype=np.float32) / std
    # (x / 255 - mean) / std as one multiply-add per channel, written straight into the CHW layout:
    # five times faster than normalising in HWC and transposing.
    out = np.empty((3, *x.shape[:2]), dtype=np.float32)
    for ch in range(3):
        np.multiply(x[:, :, ch], scale[ch], out=out[ch], casting="unsafe")
        out[ch] += bias[ch]
    return out


def preprocess(source: bytes | str | Path, contract: Contract, **kw) -> np.ndarray:
    return eval_array(load_image(source, contract, **kw), contract)


def train_transform(contract: Contract, augment: bool = True):
    """Augmentation for training: random resized crop, horizontal flip, light colour jitter."""
    from torchvision.transforms import v2 as T
    import torch

    interp = T.InterpolationMode(contract.interpolation)
    if not augment:
        return lambda im: torch.from_numpy(eval_array(im, contract))
    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop(contract.input_size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(contract.mean), std=list(contract.std)),
    ])
