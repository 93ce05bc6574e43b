"""Benchmark 3: the in-process limit. Real JPEG bytes -> decode + preprocess -> ONNX Runtime FP32 (the
ImageNet model a fresh service serves) at the best batch size, in one process, no HTTP. This is the
ceiling the served figures are held against."""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import Plan, cores, interleaved, jpeg_files, log, md_table
from bench.model import ort_session

DEFAULT_BATCH = 16  # used when benchmark 1 has not run: the service's default max batch size


def run(plan: Plan, model_result: dict | None = None) -> dict:
    from training.export import export_onnx
    from training.preprocess import preprocess
    from training.registry import create_backbone

    batch = _best_batch(model_result)
    threads = cores()
    bb = create_backbone("efficientnet_lite0", num_classes=None)
    contract = bb.contract
    with tempfile.TemporaryDirectory(prefix="refit-bench-inproc-") as tmp:
        sess = ort_session(export_onnx(bb.model, contract, Path(tmp) / "model.onnx"), threads)
    del bb  # only the ONNX session takes part from here on
    files = [data for _, data in jpeg_files()]
    pool = ThreadPoolExecutor(max_workers=threads)
    cursor = {"i": 0}

    def next_batch() -> list[bytes]:
        i = cursor["i"]
        cursor["i"] = (i + batch) % len(files)
        return [files[(i + k) % len(files)] for k in range(batch)]

    def sequential() -> int:
        x = np.stack([preprocess(d, contract) for d in next_batch()])
        sess.run(["probs"], {"input": x})
        return batch

    def decode_pool() -> int:
        # As the model workers do: decode the batch's images on a thread pool (PIL releases the GIL).
        x = np.stack(list(pool.map(lambda d: preprocess(d, contract), next_batch())))
        sess.run(["probs"], {"input": x})
        return batch

    pipelines = {"sequential decode": sequential, f"decode on {threads} threads": decode_pool}
    rows = []
    for name, m in interleaved(pipelines, plan.inprocess_seconds).items():
        rows.append({"pipeline": name, "batch": batch, "images_per_s": m["per_second"],
                     "min_images_per_s": m["min_per_second"], "max_images_per_s": m["max_per_second"],
                     "batch_ms": m["call_ms_median"]})
        log(f"inprocess: {name}, batch {batch}: {m['per_second']:.1f} images/s "
            f"(rounds {m['min_per_second']:.1f}..{m['max_per_second']:.1f})")
    pool.shutdown()
    limit = max(rows, key=lambda r: r["images_per_s"])
    return {"batch": batch, "threads": threads, "rows": rows, "limit_images_per_s": limit["images_per_s"],
            "limit_pipeline": limit["pipeline"], "images": len(files)}


def _best_batch(model_result: dict | None) -> int:
    rows = [r for r in (model_result or {}).get("rows", []) if r["runtime"] == "ort_fp32"]
    return max(rows, key=lambda r: r["images_per_s"])["batch"] if rows else DEFAULT_BATCH


def tables(result: dict) -> str:
    rows = [[r["pipeline"], r["batch"], r["images_per_s"], f"{r['min_images_per_s']:.1f}–{r['max_images_per_s']:.1f}",
             r["batch_ms"]] for r in result["rows"]]
    return (md_table(["pipeline", "batch", "images/s (median round)", "rounds range", "ms/batch (median)"], rows)
            + f"\n\nIn-process limit: **{result['limit_images_per_s']:.1f} images/s** ({result['limit_pipeline']}; "
            f"ONNX Runtime FP32, {result['threads']} intra-op threads, the best batch size from benchmark 1, "
            f"cycling through {result['images']} real JPEGs).")
