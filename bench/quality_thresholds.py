"""How the near-duplicate and drift thresholds were chosen (training/quality.py, core/drift.py): measured
on hymenoptera with EfficientNet-Lite0's pretrained features, the features a feature-extraction version
serves as its `embedding` output.

    REFIT_TEST_DATA=../shared/data/hymenoptera .venv/bin/python -m bench.quality_thresholds

Prints: the similarity of altered copies of validation photos to their originals against the most similar
distinct train/val pairs; where injected wrong labels rank; and drift scores of windows of validation
photos, other photos, line drawings and colour noise.
"""
from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from core.drift import build_reference, thresholds, unit
from core.preprocess import preprocess
from core.settings import settings
from training.export import feature_session
from training.quality import NEAR_DUPLICATE_SIMILARITY as T
from training.quality import label_problems, near_duplicates
from training.registry import create_backbone

WINDOW = 32


def files(root: Path, split: str) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    return [(f, i) for i, c in enumerate(classes) for f in sorted((root / split / c).iterdir())]


def encode(im: Image.Image, quality: int = 90) -> bytes:
    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG", quality=quality)
    return b.getvalue()


def variants(data: bytes) -> dict[str, bytes]:
    """What a duplicate in a real dataset looks like: the same photo saved again, smaller, cropped, mirrored."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    return {"reencoded_q60": encode(im, 60), "half_size": encode(im.resize((w // 2, h // 2))),
            "crop_10pct": encode(im.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
            "mirrored": encode(ImageOps.mirror(im))}


def noise_image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)))


def sketch_image(seed: int) -> bytes:
    """A line drawing: black strokes, circles and polygons on white."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (256, 256), "white")
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        pts = [tuple(int(v) for v in rng.integers(0, 256, 2)) for _ in range(int(rng.integers(2, 5)))]
        kind = rng.integers(0, 3)
        if kind == 0:
            d.line(pts + pts[:1], fill="black", width=int(rng.integers(1, 4)))
        elif kind == 1:
            x, y = pts[0]
            r = int(rng.integers(8, 60))
            d.ellipse((x - r, y - r, x + r, y + r), outline="black", width=int(rng.integers(1, 4)))
        else:
            d.polygon(pts + [(int(rng.integers(0, 256)), int(rng.integers(0, 256)))], outline="black")
    return encode(im)


def other_photos() -> list[bytes]:
    import skimage.data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "cat", "colorwheel", "logo"]
    out = []
    for n in names:
        a = getattr(skimage.data, n)()
        out.append(encode(Image.fromarray(a).convert("RGB")))
    return out


def main() -> None:
    root = settings().test_data
    if root is None:
        raise SystemExit("set REFIT_TEST_DATA to the hymenoptera folder (train/ and val/ of ants and bees)")
    bb = create_backbone("efficientnet_lite0", num_classes=2, pretrained=True)
    contract = bb.contract
    sess = feature_session(bb, contract.input_size, Path(tempfile.mkdtemp()))

    def feats(datas: list[bytes]) -> np.ndarray:
        arrays = np.stack([preprocess(d, contract) for d in datas])
        return np.concatenate([sess.run(None, {"input": arrays[i:i + 16]})[0] for i in range(0, len(arrays), 16)])

    train, val = files(root, "train"), files(root, "val")
    tr = feats([p.read_bytes() for p, _ in train])
    va = feats([p.read_bytes() for p, _ in val])
    ty, vy = np.array([y for _, y in train]), np.array([y for _, y in val])
    near_duplicate_figures(feats, train, val, tr, va)
    label_problem_figures(train, val, tr, va, ty, vy)
    drift_figures(feats, tr, va, vy)


def meta(items: list[tuple[Path, int]], split: str) -> list[dict]:
    return [{"path": f"{split}/{p.parent.name}/{p.name}", "sha256": "", "split": split} for p, _ in items]


def near_duplicate_figures(feats: Callable, train: list, val: list, tr: np.ndarray, va: np.ndarray) -> None:
    """Altered copies of 40 validation photos vs their originals placed in train."""
    pick = np.linspace(0, len(val) - 1, 40).astype(int)
    sims: dict[str, list[float]] = {}
    for i in pick:
        for name, data in variants(val[i][0].read_bytes()).items():
            s = float((unit(feats([data])) @ unit(va[i:i + 1]).T)[0, 0])
            sims.setdefault(name, []).append(s)
    for name, s in sims.items():
        print(f"near-duplicate {name:14s} similarity min {min(s):.3f} median {np.median(s):.3f}, "
              f"{np.mean(np.array(s) >= T):.0%} at or above {T}")
    found = np.mean(np.concatenate([np.array(s) for s in sims.values()]) >= T)
    print(f"all altered copies: {found:.0%} at or above {T}")
    distinct = unit(va) @ unit(tr).T
    print(f"distinct train/val pairs: max {distinct.max():.3f}, 99.9th percentile {np.quantile(distinct, 0.999):.3f}, "
          f"highest per val image: median {np.median(distinct.max(1)):.3f}")
    t0 = time.time()
    dup = near_duplicates(tr, va, meta(train, "train"), meta(val, "val"))
    print(f"near_duplicates on hymenoptera as it is: {dup['count']} pairs ({time.time() - t0:.2f}s)")


def label_problem_figures(train: list, val: list, tr: np.ndarray, va: np.ndarray, ty: np.ndarray,
                          vy: np.ndarray) -> None:
    """Three bee photos copied into ants: where they rank."""
    bees = [i for i, (_, y) in enumerate(train) if y == 1][:3]
    x = np.concatenate([tr, tr[bees], va])
    y = np.concatenate([ty, np.zeros(3, np.int64), vy])
    names = meta(train, "train") + [{"path": f"injected/ants/bee{k}.jpg", "sha256": "", "split": "train"}
                                    for k in range(3)] + meta(val, "val")
    t0 = time.time()
    lp = label_problems(x, y, ["ants", "bees"], names)
    ranks = [k for k, it in enumerate(lp["items"]) if it["path"].startswith("injected/")]
    print(f"label problems: {lp['count']} flagged of {lp['images']} in {time.time() - t0:.2f}s; injected at ranks "
          f"{ranks}; out-of-fold accuracy {lp['out_of_fold_accuracy']}")


def drift_figures(feats: Callable, tr: np.ndarray, va: np.ndarray, vy: np.ndarray) -> None:
    """Drift scores of windows of WINDOW inputs."""
    ref = build_reference(tr, va, vy, ["ants", "bees"])
    t_emb, t_lab = thresholds(ref, WINDOW)
    print(f"thresholds at a window of {WINDOW}: embedding {t_emb:.3f}, labels {t_lab:.3f}")
    rng = np.random.default_rng(0)

    def window_scores(emb: np.ndarray, label: str, windows: int = 20) -> None:
        d = ref.distances(emb)
        s = [d[rng.integers(0, len(d), WINDOW)].mean() / ref.val_distances.mean() for _ in range(windows)]
        print(f"drift {label:22s} window score min {min(s):.3f} max {max(s):.3f}")

    window_scores(va, "validation photos", 200)
    window_scores(feats(other_photos()), "other photos (skimage)")
    window_scores(feats([sketch_image(s) for s in range(64)]), "line drawings")
    window_scores(feats([noise_image(s) for s in range(64)]), "colour noise")


if __name__ == "__main__":
    main()
