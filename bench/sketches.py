"""Edge drawings of a photo dataset: a domain far from ImageNet's photos, with the same classes and labels.

How a drawing is made from each photo: the image in greyscale (EXIF orientation applied), scikit-image's
Canny edge detector at sigma 1.75 (smooths away texture and JPEG noise, keeps outlines), the edges dilated by a
3 × 3 square so lines stay visible after the model's resize, then inverted: dark lines on white, no colour, no
shading. Each drawing is saved as a greyscale PNG (lossless, so the lines stay crisp) under the same relative
path as its photo, class folders and train/ and val/ splits included; files that are not images (a licence,
an attribution) are copied as they are. The source folder is only read.

    python -m bench.sketches SRC DEST       # e.g. ../shared/data/flowers5_128px /tmp/flowers5-drawings
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIGMA = 1.75
LINE = 0  # the drawing's ink; the paper is 255


def drawing(photo: Image.Image, sigma: float = SIGMA) -> Image.Image:
    """One photo as dark edge lines on white, same size, greyscale."""
    from skimage.feature import canny
    from skimage.morphology import dilation

    grey = np.asarray(ImageOps.exif_transpose(photo).convert("L"), dtype=np.float32) / 255.0
    edges = dilation(canny(grey, sigma=sigma), np.ones((3, 3), dtype=bool))
    return Image.fromarray(np.where(edges, LINE, 255).astype(np.uint8), "L")


def make(src: Path | str, dest: Path | str, sigma: float = SIGMA) -> Path:
    """Drawings of every image under src, in the same layout under dest (created); returns dest."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"no dataset folder at {src}")
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        out = dest / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(path) as im:
                im.load()
                sketch = drawing(im, sigma)
        except UnidentifiedImageError:
            shutil.copyfile(path, out)
            continue
        sketch.save(out.with_suffix(".png"), optimize=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sketches",
                                 description="Turn a photo dataset folder into edge drawings, same layout.")
    ap.add_argument("src", type=Path, help="dataset folder: class folders, optionally under train/ and val/")
    ap.add_argument("dest", type=Path, help="where the drawings go (created)")
    ap.add_argument("--sigma", type=float, default=SIGMA, help=f"Canny smoothing (default {SIGMA})")
    args = ap.parse_args(argv)
    dest = make(args.src, args.dest, args.sigma)
    print(f"{sum(1 for p in dest.rglob('*.png'))} drawings in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
