"""Benchmark 3: the in-process limit. Real JPEG bytes -> decode + preprocess -> ONNX Runtime at the best
batch size, in one process, no HTTP, on the very file the served benchmark serves (bench/version.py), and
on its FP32 file for comparison. The served figures are held against the limit of the served file."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench import version as bench_version
from bench.common import Plan, cores, interleaved, jpeg_files, log, md_table
from bench.model import ort_session

DEFAULT_BATCH = 8  # used when benchmark 1 has not run: the service's default max batch size


def run(plan: Plan, model_result: dict | None = None) -> dict:
    from training.export import read_contract
    from training.preprocess import preprocess

    v = bench_version.trained(plan)
    threads = cores()
    files = [data for _, data in jpeg_files()]
    pool = ThreadPoolExecutor(max_workers=threads)
    models = {v["precision"]: v["serving_file"]}
    if v["precision"] != "fp32":
        models["fp32"] = v["fp32_file"]
    rows = []
    for precision, path in models.items():
        batch = _best_batch(model_result, precision)
        contract = read_contract(path)
        sess = ort_session(path, threads)
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
        for name, m in interleaved(pipelines, plan.inprocess_seconds).items():
            rows.append({"precision": precision, "served": precision == v["precision"], "pipeline": name,
                         "batch": batch, "images_per_s": m["per_second"], "min_images_per_s": m["min_per_second"],
                         "max_images_per_s": m["max_per_second"], "batch_ms": m["call_ms_median"]})
            log(f"inprocess: {precision} {name}, batch {batch}: {m['per_second']:.1f} images/s "
                f"(rounds {m['min_per_second']:.1f}..{m['max_per_second']:.1f})")
    pool.shutdown()
    limit = max((r for r in rows if r["served"]), key=lambda r: r["images_per_s"])
    return {"threads": threads, "rows": rows, "limit_images_per_s": limit["images_per_s"],
            "limit_pipeline": limit["pipeline"], "limit_precision": limit["precision"], "images": len(files),
            "version": bench_version.describe(v)}


def _best_batch(model_result: dict | None, precision: str) -> int:
    rows = [r for r in (model_result or {}).get("rows", []) if r["runtime"] == f"ort_{precision}"]
    return max(rows, key=lambda r: r["images_per_s"])["batch"] if rows else DEFAULT_BATCH


def tables(result: dict) -> str:
    rows = [[r.get("precision", "fp32").upper() + (" (served)" if r.get("served", True) else ""), r["pipeline"],
             r["batch"], r["images_per_s"], f"{r['min_images_per_s']:.1f}–{r['max_images_per_s']:.1f}", r["batch_ms"]]
            for r in result["rows"]]
    v = result.get("version") or {}
    return (md_table(["model file", "pipeline", "batch", "images/s (median round)", "rounds range",
                      "ms/batch (median)"], rows)
            + f"\n\nIn-process limit: **{result['limit_images_per_s']:.1f} images/s** ({result['limit_pipeline']}, "
            f"{result.get('limit_precision', 'fp32').upper()}, the file the service serves; {result['threads']} "
            f"intra-op threads, the best batch size from benchmark 1, cycling through {result['images']} real "
            f"JPEGs). Model: {v.get('version')}, EfficientNet-Lite0 feature extraction trained on the real "
            f"dataset (val accuracy {v.get('val_accuracy', 0):.4f}); the store chose "
            f"{str(v.get('precision')).upper()} for serving ({(v.get('int8') or {}).get('reason', 'no INT8 file')}).")
