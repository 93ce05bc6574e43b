"""The software a version was trained with, recorded in its metrics.json (`software`). The same request and
data train the same model only with the same torch and torchvision (pinned in pyproject.toml and the worker
image), so a version trained on one machine can be compared with, or retrained like, one trained on another."""
from __future__ import annotations

import platform


def software() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
