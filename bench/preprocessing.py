"""Benchmark 2: JPEG decode + resize + crop + normalise for one image on one thread, on the real JPEGs
(bytes already in memory), with a plain full-size decode vs libjpeg's reduced-size (draft) decode."""
from __future__ import annotations

import io
import statistics
import time

from bench.common import Plan, jpeg_files, log, md_table

MODES = ("full_decode", "draft_decode")


def run(plan: Plan) -> dict:
    from PIL import Image

    from core.preprocess import eval_array, load_image
    from training.registry import create_backbone

    contract = create_backbone("efficientnet_lite0", num_classes=None, pretrained=False).contract
    files = [data for _, data in jpeg_files(limit=plan.preprocess_images)]
    sizes = [Image.open(io.BytesIO(d)).size for d in files]
    # Draft decoding only pays off when libjpeg can scale by 1/2 or more and stay above the resize size.
    scalable = sum(min(s) >= 2 * contract.resize_size for s in sizes)
    rows = []
    for mode in MODES:
        use = contract if mode == "draft_decode" else None
        decode_s, total_s = [], []
        for _ in range(plan.preprocess_repeats):
            for data in files:
                t0 = time.perf_counter()
                im = load_image(data, use)  # without a contract there is no draft: a full-size decode
                t1 = time.perf_counter()
                eval_array(im, contract)
                t2 = time.perf_counter()
                decode_s.append(t1 - t0)
                total_s.append(t2 - t0)
        total = sum(total_s)
        rows.append({"mode": mode, "images": len(total_s), "images_per_s": len(total_s) / total,
                     "ms_per_image": 1000 * total / len(total_s), "decode_ms": 1000 * statistics.mean(decode_s),
                     "resize_normalise_ms": 1000 * (total - sum(decode_s)) / len(total_s),
                     "ms_p95": 1000 * sorted(total_s)[int(0.95 * (len(total_s) - 1))]})
        log(f"preprocess: {mode}: {rows[-1]['images_per_s']:.1f} images/s")
    median = sorted(sizes, key=lambda s: s[0] * s[1])[len(sizes) // 2]
    return {"rows": rows, "images": len(files), "median_size": median, "scalable": scalable,
            "resize_size": contract.resize_size}


def tables(result: dict) -> str:
    rows = [[r["mode"], r["images_per_s"], r["ms_per_image"], r["decode_ms"], r["resize_normalise_ms"], r["ms_p95"]]
            for r in result["rows"]]
    w, h = result["median_size"]
    return (md_table(["decode", "images/s (1 thread)", "ms/image", "decode ms", "resize+crop+normalise ms",
                      "p95 ms/image"], rows)
            + f"\n\n{result['images']} real JPEGs, median {w}×{h}, bytes already in memory. Draft decoding can only "
            f"help images whose shorter side is at least 2 × {result['resize_size']} px (libjpeg then decodes at "
            f"1/2, 1/4 or 1/8 scale and still stays above the resize size): {result['scalable']} of "
            f"{result['images']} here.")
