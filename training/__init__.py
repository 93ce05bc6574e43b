"""Refit training: transfer learning on a folder of images, verified ONNX export, published to the store."""
