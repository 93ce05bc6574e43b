"""The preprocessing contract: how to turn an image into the model's input.

It is defined once here, built into the eval transform, written into the ONNX file's metadata and read
back by the service, so training evaluation and serving preprocess identically.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
TASKS = ("single_label", "multi_label")  # one class per image (softmax), or any number of labels (sigmoid)


@dataclass(frozen=True)
class Contract:
    input_size: int = 224  # square crop fed to the network
    resize_size: int = 256  # shorter side is resized to this before the centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    class_names: tuple[str, ...] = field(default_factory=tuple)
    task: str = "single_label"
    # Multi-label only: each label's decision threshold on its probability, in class_names order, chosen on
    # validation when the version was trained, so serving needs nothing else to answer.
    thresholds: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        if self.thresholds and len(self.thresholds) != len(self.class_names):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.class_names)} classes")
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")

    def with_input_size(self, size: int) -> "Contract":
        """Scale the resize with the crop so the crop fraction stays what the backbone was trained with."""
        ratio = self.resize_size / self.input_size
        return replace(self, input_size=size, resize_size=int(round(size * ratio)))

    def with_classes(self, class_names) -> "Contract":
        return replace(self, class_names=tuple(class_names), thresholds=())  # thresholds belong to one set of classes

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Contract":
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["class_names"] = tuple(d.get("class_names", ()))
        d["thresholds"] = tuple(float(t) for t in d.get("thresholds", ()))  # a file made before them has none
        return cls(**d)

    @property
    def multi_label(self) -> bool:
        return self.task == "multi_label"
