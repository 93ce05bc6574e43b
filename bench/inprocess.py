"""Benchmark 3: the in-process limit. Real JPEG bytes -> decode + preprocess -> ONNX Runtime at the best
batch size, in one process, no HTTP, on the very file the served benchmark serves (bench/version.py), and
on its FP32 file for comparison. The served figures are held against the limit of the served file.

Also the latency of one image on its own (decode + preprocess + one run at batch 1, one thread): what a
single request costs without any serving around it. Benchmark 4 measures both again, just before its
servers start, so that its targets compare figures of one run (`served_baseline`)."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench import version as bench_version
from bench.common import Plan, cores, interleaved, jpeg_files, log, md_table, percentile
from bench.model import ort_session

DEFAULT_BATCH = 8  # used when benchmark 1 has not run: the service's default max batch size
SINGLE_SECONDS = 3.0  # single-image latency: enough for a few hundred images at about 8 ms each
BEFORE = "before"  # the pipelines whose figure is the limit before


def run(plan: Plan, model_result: dict | None = None) -> dict:
    v = bench_version.trained(plan)
    threads = cores()
    files = [data for _, data in jpeg_files()]
    models = {v["precision"]: v["serving_file"]}
    if v["precision"] != "fp32":
        models["fp32"] = v["fp32_file"]
    from bench import stock_pillow

    # Under Pillow-SIMD the frozen pipeline here is not the one before: that runs under stock Pillow, below.
    simd = stock_pillow.simd_in_use()
    rows = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for precision, path in models.items():
            batch = best_batch(model_result, precision)
            for name, m in pipelines(path, files, batch, threads, pool, plan.inprocess_seconds,
                                     frozen=not simd).items():
                rows.append({"precision": precision, "served": precision == v["precision"], "pipeline": name,
                             "batch": batch, "images_per_s": m["per_second"],
                             "min_images_per_s": m["min_per_second"], "max_images_per_s": m["max_per_second"],
                             "batch_ms": m["call_ms_median"]})
                log(f"inprocess: {precision} {name}, batch {batch}: {m['per_second']:.1f} images/s "
                    f"(rounds {m['min_per_second']:.1f}..{m['max_per_second']:.1f})")
    if simd:
        stock = _stock_before(files, v["serving_file"], v["precision"], best_batch(model_result, v["precision"]),
                              threads, plan.inprocess_seconds)
        rows += [stock] if stock else []
    served = [r for r in rows if r["served"]]
    limit = max((r for r in served if not r["pipeline"].startswith(BEFORE)), key=lambda r: r["images_per_s"])
    before = max((r for r in served if r["pipeline"].startswith(BEFORE)), key=lambda r: r["images_per_s"],
                 default={"images_per_s": None})
    single = single_image(v["serving_file"], files, min(SINGLE_SECONDS, plan.inprocess_seconds))
    log(f"inprocess: one image, one thread: p50 {single['p50_ms']:.2f} ms")
    return {"threads": threads, "rows": rows, "limit_images_per_s": limit["images_per_s"],
            "before_limit_images_per_s": before["images_per_s"],
            "limit_pipeline": limit["pipeline"], "limit_precision": limit["precision"], "images": len(files),
            "single_image": single, "version": bench_version.describe(v)}


def served_baseline(v: dict, files: list[bytes], plan: Plan, model_result: dict | None = None) -> dict:
    """The in-process limit of the served file (decode on a thread per core, the best batch) and the
    single-image latency, measured now with the pipeline of today's code: what benchmark 4's targets are
    held against, measured minutes before the servers, on the same machine state."""
    threads = cores()
    batch = best_batch(model_result, v["precision"])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        m = pipelines(v["serving_file"], files, batch, threads, pool, plan.inprocess_seconds,
                       only=f"decode on {threads} threads")
    (name, row), = m.items()
    single = single_image(v["serving_file"], files, min(SINGLE_SECONDS, plan.inprocess_seconds))
    log(f"served: in-process limit {row['per_second']:.1f} images/s ({name}, batch {batch}); one image, one "
        f"thread: p50 {single['p50_ms']:.2f} ms")
    return {"limit_images_per_s": row["per_second"], "limit_pipeline": name, "batch": batch, "threads": threads,
            "precision": v["precision"], "rounds": [row["min_per_second"], row["max_per_second"]],
            "single_image": single}


def pipelines(path: Path, files: list[bytes], batch: int, threads: int, pool: ThreadPoolExecutor,
              seconds: float, only: str | None = None, frozen: bool = True) -> dict:
    """Each pipeline's `interleaved` figures on this file; `frozen` adds the frozen peer's pixels (the limit
    before, where this interpreter runs the PIL the project ran before)."""
    from bench.peer_pixels import peer_preprocess
    from core.preprocess import preprocess
    from training.export import read_contract

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

    def before_pool() -> int:
        # The frozen peer's pixels (bench/peer_pixels.py) with the same session: the limit before.
        x = np.stack(list(pool.map(lambda d: peer_preprocess(d, contract), next_batch())))
        sess.run(["probs"], {"input": x})
        return batch

    cells = {"sequential decode": sequential, f"decode on {threads} threads": decode_pool}
    if frozen:
        cells[f"{BEFORE}: the frozen peer's pipeline, decode on {threads} threads"] = before_pool
    if only:
        cells = {only: cells[only]}
    return interleaved(cells, seconds)


def _stock_before(files: list[bytes], path: Path, precision: str, batch: int, threads: int,
                  seconds: float) -> dict | None:
    """Where this interpreter runs Pillow-SIMD, the limit before: the decode-on-threads pipeline under stock
    Pillow (bench/stock_pillow.py), measured right after the others."""
    from bench import stock_pillow

    m = stock_pillow.limit(files, path, batch, threads, seconds)
    if m is None:
        return None
    log(f"inprocess: before, under stock Pillow: {m['per_second']:.1f} images/s")
    return {"precision": precision, "served": True,
            "pipeline": f"{BEFORE}: the pipeline under stock Pillow, decode on {threads} threads",
            "batch": batch, "images_per_s": m["per_second"], "min_images_per_s": m["min_per_second"],
            "max_images_per_s": m["max_per_second"], "batch_ms": m["call_ms_median"]}


def single_image(path: Path, files: list[bytes], seconds: float) -> dict:
    """Decode + preprocess + ONNX Runtime at batch 1 for one image at a time, on one thread (a session
    with one intra-op thread): the work of one request, with nothing around it. Percentiles over the
    images, cycled for `seconds` after a short warm-up."""
    from core.preprocess import preprocess
    from training.export import read_contract

    contract = read_contract(path)
    sess = ort_session(path, 1)

    def one(data: bytes) -> float:
        t0 = time.perf_counter()
        sess.run(["probs"], {"input": preprocess(data, contract)[None]})
        return (time.perf_counter() - t0) * 1000

    for data in files[:5]:
        one(data)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        times.append(one(files[len(times) % len(files)]))
    return {"threads": 1, "images": len(times), "p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90),
            "p99_ms": percentile(times, 99), "mean_ms": statistics.mean(times)}


def best_batch(model_result: dict | None, precision: str) -> int:
    rows = [r for r in (model_result or {}).get("rows", []) if r["runtime"] == f"ort_{precision}"]
    return max(rows, key=lambda r: r["images_per_s"])["batch"] if rows else DEFAULT_BATCH


def tables(result: dict) -> str:
    rows = [[r.get("precision", "fp32").upper() + (" (served)" if r.get("served", True) else ""), r["pipeline"],
             r["batch"], r["images_per_s"], f"{r['min_images_per_s']:.1f}–{r['max_images_per_s']:.1f}", r["batch_ms"]]
            for r in result["rows"]]
    v = result.get("version") or {}
    single = result.get("single_image")
    single_line = (f" One image on its own (decode + preprocess + ONNX Runtime at batch 1, one thread, "
                   f"{single['images']} images): p50 **{single['p50_ms']:.2f} ms**, p90 {single['p90_ms']:.2f} ms."
                   if single else "")
    return (md_table(["model file", "pipeline", "batch", "images/s (median round)", "rounds range",
                      "ms/batch (median)"], rows)
            + f"\n\nIn-process limit: **{result['limit_images_per_s']:.1f} images/s** ({result['limit_pipeline']}, "
            f"{result.get('limit_precision', 'fp32').upper()}, the file the service serves; {result['threads']} "
            f"intra-op threads, the best batch size from benchmark 1, cycling through {result['images']} real "
            f"JPEGs){_before(result)}.{single_line} Model: {v.get('version')}, EfficientNet-Lite0 feature "
            f"extraction trained on the real dataset (val accuracy {v.get('val_accuracy', 0):.4f}); the store chose "
            f"{str(v.get('precision')).upper()} for serving ({(v.get('int8') or {}).get('reason', 'no INT8 file')}).")


def _before(result: dict) -> str:
    b = result.get("before_limit_images_per_s")
    return (f"; the limit before (the frozen peer's pixels, under stock Pillow): {b:.1f} images/s "
            f"({result['limit_images_per_s'] / b:.2f} ×)") if b else ""
