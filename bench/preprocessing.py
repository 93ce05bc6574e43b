"""Benchmark 2: what preparing one image costs, stage by stage, on the real JPEGs (bytes already in memory),
for each way of decoding them: Pillow's draft (1/2, 1/4, 1/8 only), which is the project's one decode path
(core/preprocess.load_image), under the PIL installed (Pillow-SIMD where `make install` could build it) and
under stock Pillow (the pipeline before: bench/stock_pillow.py); a full-size decode; libjpeg-turbo through
simplejpeg (bench extra) at the smallest n/8 that covers the resize, and the same with the fast integer
IDCT; and a 1/8 decode, which shows what entropy decoding alone costs. CPU time of one thread per image, so
that outside load on a shared machine lengthens a round but barely changes the figure.

Each variant's 224x224 crop is also compared with a reference rendering (the full decode resized with
Lanczos), in mean absolute 8-bit levels, and with the one used, so a faster decode that moves the pixels
shows it."""
from __future__ import annotations

import io
import time

import numpy as np

from bench.common import Plan, jpeg_files, log, md_table

ROUNDS = 3  # each stage's figure is the fastest of these rounds over all the images
USED = "Pillow draft, used"


def cpu_ms(fn, items: list, rounds: int = ROUNDS) -> float:
    """CPU milliseconds of this thread per item, the fastest round."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for x in items:
            fn(x)
        best = min(best, (time.thread_time() - t0) / len(items))
    return 1000 * best


def _decoders(contract) -> dict:
    """name -> bytes -> 8-bit RGB image, upright, at the size it is resized from."""
    import simplejpeg
    from PIL import Image

    from core.preprocess import load_image

    size = contract.resize_size

    def pillow_full(data):
        return Image.open(io.BytesIO(data)).convert("RGB")

    def turbo(**kw):
        # The photos here carry no EXIF orientation, so the decode alone is the whole comparison.
        return lambda data: Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", **kw), "RGB")

    import PIL

    return {f"{USED} ({PIL.__version__})": lambda data: load_image(data, contract), "Pillow, full size": pillow_full,
            "libjpeg-turbo n/8": turbo(min_height=size, min_width=size),
            "libjpeg-turbo n/8, fast IDCT": turbo(min_height=size, min_width=size, fastdct=True),
            "libjpeg-turbo 1/8 (entropy decoding floor)": turbo(min_height=1, min_width=1)}


def run(plan: Plan) -> dict:
    from PIL import Image

    from core.preprocess import crop_window, eval_array, resize_crop
    from training.registry import create_backbone

    contract = create_backbone("efficientnet_lite0", num_classes=None, pretrained=False).contract
    files = [data for _, data in jpeg_files(limit=plan.preprocess_images)]
    sizes = [Image.open(io.BytesIO(d)).size for d in files]
    reference = []
    for d in files:
        full = Image.open(io.BytesIO(d)).convert("RGB")
        nw, nh, left, top = crop_window(*full.size, contract)
        c = contract.input_size
        resized = full.resize((nw, nh), Image.Resampling.LANCZOS)
        reference.append(np.asarray(resized.crop((left, top, left + c, top + c)), np.float32))
    rows, used = [], None
    for name, decode in _decoders(contract).items():
        images = [decode(d) for d in files]
        crops = [resize_crop(im, contract) for im in images]
        pixels = [np.asarray(c, np.float32) for c in crops]
        decode_ms = cpu_ms(decode, files, plan.preprocess_repeats)
        resize_ms = cpu_ms(lambda im: resize_crop(im, contract), images, plan.preprocess_repeats)
        # eval_array = resize_crop + normalisation; the difference is what normalising costs
        evaluated_ms = cpu_ms(lambda im: eval_array(im, contract), images, plan.preprocess_repeats)
        normalise_ms = max(0.0, evaluated_ms - resize_ms)
        if name.startswith(USED):
            used = pixels
        rows.append({"decoder": name, "decode_ms": decode_ms, "resize_ms": resize_ms, "normalise_ms": normalise_ms,
                     "total_ms": decode_ms + resize_ms + normalise_ms,
                     "gap_reference": gap(pixels, reference), "gap_used": gap(pixels, used),
                     "decoded_median": sorted(im.size for im in images)[len(images) // 2]})
        log(f"preprocess: {name}: {rows[-1]['total_ms']:.2f} ms/image (decode {decode_ms:.2f})")
    stock = stock_row(files, contract, used, reference)
    if stock:
        rows.insert(1, stock)
    median = sorted(sizes, key=lambda s: s[0] * s[1])[len(sizes) // 2]
    scalable = sum(min(s) >= 2 * contract.resize_size for s in sizes)
    return {"rows": rows, "images": len(files), "median_size": median, "scalable": scalable,
            "resize_size": contract.resize_size, "mean_kb": sum(map(len, files)) / len(files) / 1024}


def stock_row(files: list[bytes], contract, used: list[np.ndarray], reference: list[np.ndarray]) -> dict | None:
    """The used path under stock Pillow, where this interpreter runs Pillow-SIMD (bench/stock_pillow.py)."""
    from bench import stock_pillow

    if not stock_pillow.simd_in_use():
        return None
    got = stock_pillow.stages(files, contract)
    if got is None:
        return None
    m, pixels = got
    log(f"preprocess: stock Pillow {m['version']}: resize + crop {m['resize_ms']:.2f} ms")
    return {"decoder": f"stock Pillow {m['version']}, draft (before)", "decode_ms": m["decode_ms"],
            "resize_ms": m["resize_ms"], "normalise_ms": max(0.0, m["eval_ms"] - m["resize_ms"]),
            "total_ms": m["decode_ms"] + max(m["eval_ms"], m["resize_ms"]),
            "gap_reference": gap(pixels, reference), "gap_used": gap(pixels, used), "decoded_median": None}


def gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean absolute difference of two renderings of the same crops, in 8-bit levels."""
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, b, strict=True)]))


def row(result: dict, decoder_prefix: str) -> dict | None:
    return next((r for r in result.get("rows", []) if r["decoder"].startswith(decoder_prefix)), None)


def tables(result: dict) -> str:
    rows = [[r["decoder"], r["decode_ms"], r["resize_ms"], r["normalise_ms"], r["total_ms"],
             "as used" if not r["decoded_median"] else f"{r['decoded_median'][0]}×{r['decoded_median'][1]}",
             r["gap_reference"],
             r["gap_used"]] for r in result["rows"]]
    w, h = result["median_size"]
    return (md_table(["decode", "decode ms", "resize + crop ms", "normalise ms", "total ms/image",
                      "decoded size (median)", "levels from the Lanczos reference", "levels from the one used"], rows)
            + f"\n\nCPU time of one thread per image, fastest of {ROUNDS} rounds over {result['images']} real JPEGs "
            f"(median {w}×{h}, {result['mean_kb']:.0f} KB on average), bytes already in memory. Pillow's draft can "
            f"only help images whose shorter side is at least 2 × {result['resize_size']} px: {result['scalable']} of "
            f"{result['images']} here; libjpeg-turbo's n/8 scaling helps all that are larger than the resize. "
            "\"levels\": mean absolute difference of the 224×224 crop, in 8-bit levels.")
