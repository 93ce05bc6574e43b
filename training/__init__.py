"""Refit training: transfer learning on a folder of images, verified ONNX export, versioned model store."""
from training.paths import refit_home

__all__ = ["refit_home"]
