"""Static INT8 quantization with onnxruntime, calibrated on training images.

Every op is quantized except the final Softmax (a multi-label file's final Sigmoid), so scores stay
full-precision probabilities. On a CPU
without an 8-bit dot-product instruction (VNNI) weights use a 7-bit range (reduce_range): the AVX2 u8s8
kernels sum pairs of products in 16 bits and can saturate with full 8-bit weights. With VNNI the products
are summed in 32 bits, and the full range is more accurate (hymenoptera, EfficientNet-Lite0 head: 0.954
with the full range vs 0.948 with 7 bits; FP32 0.961). The model is quantized for the CPU it is trained
on, which is the one the service runs on; the choice is recorded with the version.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

# 32 images at 224 px: the same INT8 accuracy as 64 on hymenoptera (0.954), in half the calibration time.
# Calibration runs a copy of the model that outputs every intermediate tensor (2.1 s per batch of 8 at 448 px),
# so the count is a pixel budget: 8 images at a multi-label run's 448 px. On the collage set INT8's mAP was the
# same with 4, 8, 16 or 32 of them (0.785 to 0.789 on one draw), and 8 take 5 s instead of 13.
MAX_CALIBRATION_IMAGES = 32
CALIBRATION_PIXELS = MAX_CALIBRATION_IMAGES * 224 * 224
MIN_CALIBRATION_IMAGES = 8
MAX_ACCURACY_DROP = 0.01  # INT8 is served only when it is within 1 point of FP32 on validation
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has an 8-bit dot-product instruction (x86 VNNI or AMX); unknown counts as no."""
    try:
        for line in open(cpuinfo, encoding="utf-8", errors="replace"):
            if line.startswith("flags"):
                return any(f in line.split() for f in VNNI_FLAGS)
    except OSError:
        pass
    return False


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray,
                  reduce_range: bool | None = None) -> Path:
    """Static INT8 with per-channel weights; `reduce_range` None decides by this CPU (see the module doc)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calibration):
                return None
            batch = calibration[self.i:self.i + 8]
            self.i += 8
            return {"input": batch}

    # The quantizer logs a line per adjusted bias scale; keep the run's log readable.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return _quantize(fp32_path, out_path, Reader(), quant_pre_process, quantize_static, QuantFormat, QuantType,
                         (not has_vnni()) if reduce_range is None else reduce_range)
    finally:
        logging.disable(previous)


def _quantize(fp32_path, out_path, reader, quant_pre_process, quantize_static, QuantFormat, QuantType,
              reduce_range: bool) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        # The output's probabilities stay full precision: the Softmax, or a multi-label file's final Sigmoid.
        graph = onnx.load(str(pre)).graph
        softmax = [n.name for n in graph.node if n.op_type == "Softmax"
                   or (n.op_type == "Sigmoid" and "probs" in n.output)]
        quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range, nodes_to_exclude=softmax)
    return out_path


def calibration_sample(arrays: np.ndarray, seed: int) -> np.ndarray:
    """A seeded sample of the training images within the calibration pixel budget (at least 8 images)."""
    pixels = int(np.prod(arrays.shape[2:])) if arrays.ndim == 4 else 224 * 224
    count = min(MAX_CALIBRATION_IMAGES, max(MIN_CALIBRATION_IMAGES, CALIBRATION_PIXELS // max(1, pixels)))
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(arrays))[:count]
    return np.ascontiguousarray(arrays[np.sort(idx)])
