"""Benchmark 1: the network alone. PyTorch eager vs ONNX Runtime FP32 vs ONNX Runtime INT8 (static,
calibrated on training images), images/s at batch 1, 8 and 32, on already preprocessed real images."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.common import BATCH_SIZES, GFLOP_PER_IMAGE, Plan, cores, interleaved, jpeg_files, log, md_table

RUNTIMES = ("pytorch_eager", "ort_fp32", "ort_int8")


def ort_session(path: Path, threads: int):
    """The session the service's model workers make, so these figures are the ones they can reach."""
    from service.model import make_session

    return make_session(path, threads)


def export_and_quantize(bb, workdir: Path, calibration: np.ndarray) -> tuple[Path, Path]:
    """The pretrained backbone with its ImageNet head (what a fresh service serves), exported to ONNX and
    quantized to INT8 with the project's own functions."""
    from training.export import export_onnx
    from training.quantize import quantize_int8

    fp32 = export_onnx(bb.model, bb.contract, workdir / "model.onnx")
    return fp32, quantize_int8(fp32, workdir / "model.int8.onnx", calibration)


def preprocessed(split: str, contract, limit: int | None) -> np.ndarray:
    from core.preprocess import preprocess

    return np.stack([preprocess(data, contract) for _, data in jpeg_files(split, limit)])


def batch_of(arrays: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(arrays))
    return np.ascontiguousarray(np.concatenate([arrays] * reps)[:n])


def run(plan: Plan) -> dict:
    import torch

    from training.quantize import calibration_sample
    from training.registry import create_backbone

    threads = cores()
    torch.set_num_threads(threads)
    bb = create_backbone("efficientnet_lite0", num_classes=None)
    bb.model.eval()
    train, val = (preprocessed(split, bb.contract, plan.model_images) for split in ("train", "val"))
    with tempfile.TemporaryDirectory(prefix="refit-bench-model-") as tmp:
        log(f"model: exporting and quantizing (calibration: {min(len(train), 64)} training images)")
        fp32_path, int8_path = export_and_quantize(bb, Path(tmp), calibration_sample(train, seed=0))
        sessions = {"ort_fp32": ort_session(fp32_path, threads), "ort_int8": ort_session(int8_path, threads)}
    cells = {}
    for runtime in RUNTIMES:
        for bs in BATCH_SIZES:
            x = batch_of(val, bs)
            cells[runtime, bs] = _torch_call(bb.model, x) if runtime == "pytorch_eager" else \
                _ort_call(sessions[runtime], x)
    rows = []
    for (runtime, bs), m in interleaved(cells, plan.model_seconds).items():
        rows.append({"runtime": runtime, "batch": bs, "images_per_s": m["per_second"],
                     "min_images_per_s": m["min_per_second"], "max_images_per_s": m["max_per_second"],
                     "batch_ms": m["call_ms_median"], "gflops": m["per_second"] * GFLOP_PER_IMAGE,
                     "calls": m["calls"]})
        log(f"model: {runtime} batch {bs}: {m['per_second']:.1f} images/s "
            f"(rounds {m['min_per_second']:.1f}..{m['max_per_second']:.1f})")
    return {"threads": threads, "gflop_per_image": GFLOP_PER_IMAGE, "rows": rows,
            "int8_agreement": _int8_agreement(sessions, val), "val_images": len(val)}


def _torch_call(model, x: np.ndarray):
    import torch

    t = torch.from_numpy(x)

    def call() -> int:
        with torch.inference_mode():
            model(t)
        return len(x)
    return call


def _ort_call(sess, x: np.ndarray):
    def call() -> int:
        sess.run(["probs"], {"input": x})
        return len(x)
    return call


def _int8_agreement(sessions: dict, val: np.ndarray) -> dict:
    """How often INT8 picks the same ImageNet class as FP32 on the validation photos (1000 classes is a
    harder test of quantization error than the 2-class heads trained on this data)."""
    from training.export import run_onnx

    p32, p8 = run_onnx(sessions["ort_fp32"], val, 32), run_onnx(sessions["ort_int8"], val, 32)
    return {"images": len(val), "top1_agree": int((p32.argmax(1) == p8.argmax(1)).sum()),
            "max_abs_prob_diff": float(np.abs(p32 - p8).max())}


def best(result: dict, runtime: str) -> dict:
    return max((r for r in result["rows"] if r["runtime"] == runtime), key=lambda r: r["images_per_s"])


def tables(result: dict) -> str:
    rows = [[r["runtime"], r["batch"], r["images_per_s"], f"{r['min_images_per_s']:.1f}–{r['max_images_per_s']:.1f}",
             r["batch_ms"], r["gflops"]] for r in result["rows"]]
    a = result["int8_agreement"]
    return (md_table(["runtime", "batch", "images/s (median round)", "rounds range", "ms/batch (median)",
                      "GFLOP/s achieved"], rows)
            + f"\n\nGFLOP/s = images/s × {result['gflop_per_image']} GFLOP per 224×224 image (0.41 GMAC × 2); "
            f"for INT8 the same count is integer operations. {result['threads']} intra-op threads; the cells are "
            "measured in 3 interleaved rounds. "
            f"INT8 vs FP32 ImageNet top-1 agreement on {a['images']} validation photos: "
            f"{a['top1_agree']}/{a['images']} (max |Δprob| {a['max_abs_prob_diff']:.3f}).")
