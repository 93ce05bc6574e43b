"""Image decoding and the two transforms built from a Contract.

`load_image` + `eval_array` are the exact path serving uses, so validation figures mean what a client
will see. `training/augment.py` adds augmentation on top of the same contract for training only.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.contract import Contract

# Formats a customer's camera or export tool produces; anything else is refused by name.
SUPPORTED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 50_000_000  # decompression-bomb guard: about 7000 x 7000
ORIENTATION_TAG = 0x0112  # EXIF
# Decode cost model (decode_cost): a baseline JPEG at reduced scale costs about a quarter of a PNG per
# pixel, and a row narrower than this costs as much as a row this wide.
JPEG_COST = 0.25
ROW_COST_PIXELS = 8
MAX_KEPT_ASPECT = 4  # longer side / shorter side of the images a training run keeps

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """An input that is not a usable image; the message names what was wrong."""


def _open(source: bytes | str | Path, label: str, max_pixels: int) -> Image.Image:
    """Open without decoding: format and size come from the header, and are checked before any decode."""
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognised bytes)") from None
    except Image.DecompressionBombError:
        # PIL refuses on its own above twice Image.MAX_IMAGE_PIXELS, before our check can run; it is the
        # same refusal, so say it the same way (and it must be an ImageError: the dataset check skips those).
        raise ImageError(f"{label}: more pixels than the limit of {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{label}: cannot be read ({e})") from None
    if im.format not in SUPPORTED_FORMATS:
        raise ImageError(f"{label}: unsupported format {im.format}; use one of {sorted(SUPPORTED_FORMATS)}")
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} pixels is over the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageError(f"{label}: empty image")
    return im


def load_image(source: bytes | str | Path, contract: Contract | None = None, *,
               max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode to 8-bit RGB, upright. The one decode path of training and serving alike.

    With a contract, JPEGs are decoded at reduced scale (libjpeg DCT scaling) but never below the
    contract's resize size, which is most of the decode time saved on large photos."""
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    im = _open(source, label, max_pixels)
    if contract is not None and im.format in ("JPEG", "MPO"):
        im.draft("RGB", (contract.resize_size, contract.resize_size))
    try:
        im.load()  # the full decode: truncated or corrupt data fails here
        _upright(im)
        return to_rgb(im)
    except ImageError as e:
        raise ImageError(f"{label}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: corrupt or truncated image data ({e})") from None


def _upright(im: Image.Image) -> None:
    """Apply the EXIF orientation (phones store the sensor's pixels plus a tag saying how to turn them)."""
    try:
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: viewers show such files as stored, so do we
        return
    if orientation in range(2, 9):
        ImageOps.exif_transpose(im, in_place=True)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image. Pillow's `convert("RGB")` clips 16- and 32-bit samples at
    255 (a 16-bit grayscale PNG turns almost white) and drops alpha (showing whatever colour lies under
    transparent pixels), so those modes are converted here. Upstream: Pillow clips rather than scales on
    conversion, https://github.com/python-pillow/Pillow/issues/3159 (open)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (mode I is how some decoders hand them over): keep the high byte.
        a = np.asarray(im)
        if im.mode == "I":
            a = np.clip(a, 0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        # Float images are taken as 0..1 when they stay within it (the usual convention), else as 0..255.
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        rgba = im.convert("RGBA")  # also turns a palette's or a colour key's transparency into alpha
        out = Image.new("RGB", im.size, (255, 255, 255))  # transparent pixels are shown on white
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except ValueError:
        raise ImageError(f"colour mode {im.mode} is not supported") from None


def decode_cost(source: bytes, name: str = "image", *, max_pixels: int = MAX_PIXELS) -> float:
    """What decoding this image costs, in megapixels of a PNG, read from its header alone (no decode).

    Measured on one core (docs/service.md): a PNG, WebP or progressive JPEG costs 10-28 ms of CPU per
    megapixel; a baseline JPEG decoded at reduced scale (draft) costs a quarter of that; and every row
    has a fixed cost, which makes a 1-pixel-wide PNG about four times dearer per pixel than a wide one,
    so a row narrower than ROW_COST_PIXELS pixels counts as that wide. Raises ImageError for a file that
    is not a supported image or is over `max_pixels`."""
    im = _open(source, name, max_pixels)
    w, h = im.size
    weight = 1.0
    if im.format in ("JPEG", "MPO") and not im.info.get("progressive"):
        weight = JPEG_COST
    return weight * h * max(w, ROW_COST_PIXELS) / 1e6


def resize_crop(im: Image.Image, contract: Contract) -> Image.Image:
    """Shorter side to resize_size, then a centre crop of input_size (torchvision's Resize + CenterCrop).

    Only the crop window is resampled (PIL's `box`): the same pixels as resizing the whole image and
    cropping it, without computing the third of the resized image the crop throws away."""
    w, h = im.size
    c = contract.input_size
    nw, nh, left, top = crop_window(w, h, contract)
    if (nw, nh) == (w, h):
        return im.crop((left, top, left + c, top + c))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
    return im.resize((c, c), _RESAMPLE[contract.interpolation], box=box)


def crop_window(w: int, h: int, contract: Contract) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of `resize_crop` for a w x h image: the crop is the
    input_size square at (left, top) of the image resized to that size."""
    size, c = contract.resize_size, contract.input_size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return nw, nh, int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))


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


@dataclass(frozen=True)
class Prepared:
    """What a training run keeps of one image: bounded by the contract, not by the file.

    `array` is exactly what serving computes (from the full decode); `image` is the source for
    augmentation, under 2 x resize_size on its shorter side and at most 4:1 (MAX_KEPT_ASPECT), so one
    image costs at most 48 x resize_size^2 + 12 x input_size^2 bytes whatever the file's resolution:
    under 4 MB at the default 224/256 pixels, and about 1 MB for a photo."""

    array: np.ndarray
    image: Image.Image


def prepare(im: Image.Image, contract: Contract) -> Prepared:
    return Prepared(eval_array(im, contract), _bounded(im, contract))


def _bounded(im: Image.Image, contract: Contract) -> Image.Image:
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if long > MAX_KEPT_ASPECT * short:
        # Training's random resized crops take 3:4 to 4:3 windows of at least 35 % of the area; beyond
        # about 3.8:1 none fits and torchvision takes the centre window, which this crop keeps.
        keep = MAX_KEPT_ASPECT * short
        if w > h:
            left = (w - keep) // 2
            im = im.crop((left, 0, left + keep, h))
        else:
            top = (h - keep) // 2
            im = im.crop((0, top, w, top + keep))
    factor = short // contract.resize_size
    # An integer box reduction (fast, and no finer than needed): what a JPEG's draft decode does too.
    return im.reduce(factor) if factor >= 2 else im
