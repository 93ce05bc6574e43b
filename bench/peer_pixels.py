"""The frozen peer's pixels: what bench/peer_service.py feeds its model. Pillow and numpy only (no BentoML), so
benchmarks 2 and 12 can also run it under stock Pillow in an interpreter of its own (bench/stock_pillow.py)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def peer_preprocess(data: bytes, contract) -> np.ndarray:
    """Decode, upright, shorter side to resize_size, centre crop, normalise: float32 CHW. Frozen: it does not
    follow the project's pipeline (core/preprocess.py), so that it stays the baseline the project is measured
    against."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("RGB", (contract.resize_size, contract.resize_size))  # libjpeg's 1/2, 1/4, 1/8 scaling
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    size, c = contract.resize_size, contract.input_size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)  # resample only the crop window
    x = np.asarray(im.resize((c, c), Image.Resampling.BILINEAR, box=box), dtype=np.float32) / 255.0
    x = (x - np.asarray(contract.mean, np.float32)) / np.asarray(contract.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
