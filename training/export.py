"""ONNX export with the preprocessing contract inside, and the parity check that gates publishing."""
from __future__ import annotations

import copy
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from core.contract import Contract
from training.errors import ExportError
from training.heads import RegionHead, RegionPool
from training.heads import pooled as pooled_features

CONTRACT_KEY = "refit.contract"
VERSION_KEY = "refit.version"
CAM_FILE = "cam.npz"  # the head's weight and bias, for class activation maps (service/explain.py)
PARITY_TOLERANCE = 1e-4  # max |prob_torch - prob_onnx| allowed before a version may be published


class WithSoftmax(nn.Module):
    """The exported graph returns probabilities, so a client needs nothing but the file. With `classifier`
    (the dotted name of the head) it also returns `embedding`, the head's input: the pooled backbone
    features, which the service's drift monitor compares with the training features without torch and
    without a second model run. With `features` as well, it returns the last feature map before the global
    average pooling (N x C x h x w), from which the service computes class activation maps in numpy
    (`service/explain.py`). A multi-label model (`multi_label`) returns sigmoid probabilities, one per label, and
    with a RegionHead (training/heads.py) its `embedding` is the mean of the region features and `features`
    the map RegionPool pooled."""

    def __init__(self, model: nn.Module, classifier: str | None = None, features: bool = False,
                 multi_label: bool = False):
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.features = features
        self.multi_label = multi_label

    def probs(self, logits):
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)

    def forward(self, x):
        if self.classifier is None:
            return self.probs(self.model(x))
        seen, pooled = [], []
        hooks = [self.model.get_submodule(self.classifier).register_forward_pre_hook(
            lambda _module, args: seen.append(args[0]))]
        if self.features:
            # Squeeze-and-excitation blocks pool too; the global pooling is the last one the forward pass runs.
            hooks += [m.register_forward_pre_hook(lambda _module, args: pooled.append(args[0]))
                      for m in self.model.modules() if isinstance(m, (nn.AdaptiveAvgPool2d, RegionPool))]
        try:
            logits = self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        head = self.model.get_submodule(self.classifier)
        out = (self.probs(logits), pooled_features(head, torch.flatten(seen[0], 1)))
        return out + (pooled[-1],) if self.features else out


def cam_head(model: nn.Module, classifier: str, input_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The head's (weight, bias) when the model ends in global average pooling and that one linear layer,
    so that a class activation map is exact: the head's weights for the class applied to the feature map
    at each position. Checked on an input, not assumed from the architecture: a head with layers of its own
    between the pooling and the last linear layer (MobileNetV3's, ConvNeXt's normalisation) returns None."""
    head = model.get_submodule(classifier)
    linear = head.fc if isinstance(head, RegionHead) else head  # a RegionHead's regions share its linear layer
    if not isinstance(linear, nn.Linear):
        return None
    wrapper = WithSoftmax(model, classifier, features=True).eval()
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            _, embedding, fmap = wrapper(x)
    except IndexError:  # no global average pooling module ran
        return None
    if fmap.dim() != 4 or fmap.shape[1] != embedding.shape[1]:
        return None
    if not isinstance(head, RegionHead) and not torch.allclose(fmap.mean((2, 3)), embedding, rtol=1e-4, atol=1e-5):
        return None
    return (linear.weight.detach().cpu().numpy().astype(np.float32),
            linear.bias.detach().cpu().numpy().astype(np.float32) if linear.bias is not None
            else np.zeros(linear.out_features, np.float32))


def save_cam_head(weight: np.ndarray, bias: np.ndarray, path: Path | str) -> Path:
    """The version's `cam.npz`: what the service needs beside the `features` output for class activation
    maps (the serving image has no onnx package to read the head from the model file)."""
    with open(path, "wb") as f:
        np.savez_compressed(f, weight=weight, bias=bias)
    return Path(path)


def export_onnx(model: nn.Module, contract: Contract, path: Path | str, *, classifier: str | None = None,
                opset: int = 17) -> Path:
    """`classifier`: the head's dotted name, to export its input as the second output, `embedding`, and, when
    the head is a linear layer on the globally pooled feature map, that map as a third output, `features`,
    with the head's weights in `cam.npz` beside the file (see `cam_head`)."""
    path = Path(path)
    # The wrapper must be in eval mode too: the exporter restores the wrapper's mode afterwards,
    # recursively, which would otherwise leave the caller's model in training mode.
    model.eval()
    head = cam_head(model, classifier, contract.input_size) if classifier else None
    dummy = torch.zeros(2, 3, contract.input_size, contract.input_size)
    outputs = ["probs"] + (["embedding"] if classifier else []) + (["features"] if head else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: mature for CNNs, gives a single self-contained file with a dynamic batch.
        torch.onnx.export(WithSoftmax(model, classifier, features=head is not None,
                                      multi_label=contract.multi_label).eval(), dummy, str(path),
                          input_names=["input"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]},
                          opset_version=opset, dynamo=False)
    set_metadata(path, {CONTRACT_KEY: contract.to_json()})
    if head:
        save_cam_head(*head, path.with_name(CAM_FILE))
    return path


def feature_session(bb, input_size: int, cache_dir: Path):
    """An ONNX Runtime session of the frozen backbone up to the classifier's input, cached on disk by
    backbone, input size and weights (so a changed weights file is never served stale features)."""
    state_hash = hashlib.sha256()
    for k, v in sorted(bb.model.state_dict().items()):
        if not k.startswith(bb.classifier + "."):
            state_hash.update(k.encode())
            state_hash.update(v.detach().cpu().numpy().tobytes()[:4096])
    # A RegionPool (multi-label) gives region features, not the pooled ones: another file.
    regions = "-regions" if any(isinstance(m, RegionPool) for m in bb.model.modules()) else ""
    path = Path(cache_dir) / f"features-{bb.name}{regions}-{input_size}-{state_hash.hexdigest()[:12]}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        body = feature_body(bb)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(body, torch.zeros(2, 3, input_size, input_size), str(tmp), input_names=["input"],
                              output_names=["features"], dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
    return session(path)


def feature_body(bb) -> nn.Module:
    """A copy of the backbone in eval mode whose classifier passes its input through: the frozen features."""
    body = copy.deepcopy(bb.model).eval()
    parent, _, attr = bb.classifier.rpartition(".")
    setattr(body.get_submodule(parent) if parent else body, attr, nn.Identity())
    return body


def set_metadata(path: Path | str, items: dict[str, str]) -> None:
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props.update(items)
    del m.metadata_props[:]
    for k, v in sorted(props.items()):
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def read_contract(path: Path | str) -> Contract:
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    if CONTRACT_KEY not in meta.custom_metadata_map:
        raise ExportError(f"{path}: no {CONTRACT_KEY} metadata; not a Refit model file")
    return Contract.from_json(meta.custom_metadata_map[CONTRACT_KEY])


def session(path: Path | str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Follow torch's thread cap (set from the request), so a retrain beside the service stays within it.
    so.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_onnx(sess, arrays: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([sess.run(["probs"], {"input": arrays[i:i + batch_size]})[0]
                           for i in range(0, len(arrays), batch_size)])


def verify_parity(path: Path | str, torch_probs: np.ndarray, arrays: np.ndarray,
                  tolerance: float = PARITY_TOLERANCE, ort_probs: np.ndarray | None = None) -> dict:
    """ONNX Runtime must agree with PyTorch on the validation images: same top-1, max |Δprob| ≤ tolerance.
    `ort_probs`: the file's outputs on `arrays` when the caller has run them already."""
    onnx.checker.check_model(str(path))
    if ort_probs is None:
        ort_probs = run_onnx(session(path), arrays)
    diff = float(np.abs(ort_probs - torch_probs).max()) if len(arrays) else 0.0
    same = int((ort_probs.argmax(1) == torch_probs.argmax(1)).sum())  # multi-label: the top label
    result = {"images": int(len(arrays)), "max_abs_prob_diff": diff, "top1_agree": same,
              "tolerance": tolerance, "passed": same == len(arrays) and diff <= tolerance}
    if not result["passed"]:
        raise ExportError(f"ONNX parity check failed: top-1 agrees on {same}/{len(arrays)} images, "
                          f"max |Δprob| {diff:.2e} (limit {tolerance:.0e}); nothing was published")
    return result
