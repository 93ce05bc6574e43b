"""bench.sketches on real photos (scikit-image's sample images): same layout, dark lines on white."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import sketches

PHOTOS = {("train", "cat"): "chelsea", ("train", "cup"): "coffee", ("val", "cat"): "cat",
          ("val", "person"): "astronaut"}


def test_drawings_keep_the_layout_and_are_dark_lines_on_white(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    src = tmp_path / "photos"
    for (split, label), name in PHOTOS.items():
        (src / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(src / split / label / f"{name}.jpg",
                                                                           quality=90)
    (src / "ATTRIBUTION.txt").write_text("scikit-image sample images\n")

    dest = sketches.make(src, tmp_path / "drawings")

    drawings = sorted(p.relative_to(dest) for p in dest.rglob("*.png"))
    assert drawings == sorted(Path(split, label, f"{name}.png") for (split, label), name in PHOTOS.items())
    assert (dest / "ATTRIBUTION.txt").read_text() == "scikit-image sample images\n"
    for (split, label), name in PHOTOS.items():
        photo = Image.open(src / split / label / f"{name}.jpg")
        drawing = Image.open(dest / split / label / f"{name}.png")
        assert drawing.mode == "L" and drawing.size == photo.size
        pixels = np.asarray(drawing)
        white, ink = (pixels == 255).mean(), (pixels == 0).mean()
        assert set(np.unique(pixels)) <= {0, 255}
        assert white > 0.6, f"{name}: only {white:.0%} of the drawing is paper"
        assert ink > 0.02, f"{name}: only {ink:.1%} of the drawing is line"
