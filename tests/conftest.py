"""Shared fixtures: small synthetic image datasets made on the fly, and an isolated REFIT_HOME."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = os.environ.get("REFIT_TEST_DATA")

# Colour families the pretrained features separate easily, with noise so no two images are alike.
PALETTE = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40)}


def synthetic_image(colour: str, seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(PALETTE[colour], dtype=np.float32)
    img = base + rng.normal(0, 25, (size[1], size[0], 3))
    # A few random rectangles so the images have structure, not just a flat colour.
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        img[y0:y0 + size[1] // 3, x0:x0 + size[0] // 3] *= rng.uniform(0.6, 1.2)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(colour: str = "red", seed: int = 0, size=(96, 80)) -> bytes:
    b = io.BytesIO()
    synthetic_image(colour, seed, size).save(b, "JPEG", quality=90)
    return b.getvalue()


def make_dataset(root: Path, classes=("red", "blue"), n: int = 8, split: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for ci, c in enumerate(classes):
        if split:
            for part, count, off in (("train", n, 0), ("val", max(2, n // 2), 1000)):
                d = root / part / c
                d.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    synthetic_image(c, ci * 10000 + off + i).save(d / f"{c}_{i}.jpg", quality=90)
        else:
            d = root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                synthetic_image(c, ci * 10000 + i).save(d / f"{c}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def refit_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("REFIT_HOME", str(home))
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


def run_cli(*args, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REFIT_TEST_DATA_OK():
        pytest.skip("REFIT_TEST_DATA is not set to the hymenoptera folder (../shared/data/hymenoptera); "
                    ".ci/run sets it when the folder exists")
    return Path(REAL_DATA)


def REFIT_TEST_DATA_OK() -> bool:  # noqa: N802 - reads like the variable it checks
    return bool(REAL_DATA) and (Path(REAL_DATA) / "train").is_dir()


@pytest.fixture(scope="session")
def imagenet_store(tmp_path_factory) -> Path:
    """A store holding only the bootstrap version v0001 (pretrained ImageNet model, promoted), made once per
    session; copy it with `serving.copy_store` to start a server without paying the bootstrap again."""
    home = tmp_path_factory.mktemp("imagenet-store")
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    code = "from training.pipeline import bootstrap_imagenet; bootstrap_imagenet()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return home
