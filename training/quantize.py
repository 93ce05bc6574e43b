"""Static INT8 quantization with onnxruntime, calibrated on training images.

Every op is quantized except the final Softmax, so scores stay full-precision probabilities. Weights use
7-bit range (reduce_range): u8s8 kernels without AVX-512 VNNI (AVX2 ones, as on this project's CI
machines) can saturate their 16-bit intermediate sums with full 8-bit weights, which costs accuracy.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

MAX_CALIBRATION_IMAGES = 64
MAX_ACCURACY_DROP = 0.01  # INT8 is served only when it is within 1 point of FP32 on validation


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
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
        return _quantize(fp32_path, out_path, Reader(), quant_pre_process, quantize_static, QuantFormat, QuantType)
    finally:
        logging.disable(previous)


def _quantize(fp32_path, out_path, reader, quant_pre_process, quantize_static, QuantFormat, QuantType) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        softmax = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Softmax"]
        quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True, nodes_to_exclude=softmax)
    return out_path


def calibration_sample(arrays: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(arrays))[:MAX_CALIBRATION_IMAGES]
    return np.ascontiguousarray(arrays[np.sort(idx)])
