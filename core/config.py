"""One training request, shared by `refit train` and the service's retrain endpoint.

Unknown fields are rejected (extra="forbid"); the resolved request is saved with every version.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from core.backbones import list_backbones, unknown_backbone
from core.data import DatasetError
from core.datasets import check_name, check_snapshot

Strategy = Literal["auto", "feature_extraction", "partial", "full", "scratch"]


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: str = Field("efficientnet_lite0", description="Backbone name (see `refit backbones`).")
    weights: Optional[str] = Field(None, description="Local state-dict file to use instead of the packaged "
                                   "pretrained weights (CLI only).")
    strategy: Strategy = Field("auto", description="feature_extraction: frozen backbone, new head; partial: "
                               "unfreeze the last blocks; full: all layers; scratch: random init baseline; "
                               "auto: choose from dataset size and validation results.")
    epochs: int = Field(10, ge=1, le=300, description="Maximum fine-tuning epochs (partial/full/scratch).")
    head_epochs: int = Field(200, ge=1, le=5000, description="Maximum epochs for fitting the head on cached "
                             "features (feature_extraction, and the warm-up of partial/full).")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Learning rate of the new head.")
    backbone_lr: float = Field(2e-4, gt=0, le=1.0, description="Learning rate of unfrozen backbone layers "
                               "(kept lower than the head's so pretrained features are not destroyed).")
    unfreeze_blocks: int = Field(4, ge=1, le=100, description="How many of the last backbone stages `partial` "
                                 "trains.")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="AdamW weight decay.")
    label_smoothing: float = Field(0.1, ge=0, lt=1.0, description="Cross-entropy label smoothing.")
    batch_size: int = Field(32, ge=1, le=1024, description="Images per optimisation step.")
    image_size: Optional[int] = Field(None, ge=32, le=1024, description="Input crop size; default is the "
                                      "backbone's own.")
    augment: bool = Field(True, description="Random resized crop, flip and colour jitter while fine-tuning.")
    int8: bool = Field(True, description="Also export a static INT8 model (calibrated on training images); it "
                       "is served when its validation accuracy is within 1 point of FP32.")
    task: Optional[Literal["single_label", "multi_label"]] = Field(
        None, description="single_label: one class per image; multi_label: any number of labels per image, or "
        "none (a labels.csv manifest). Default: what the data says (class folders are single-label).")
    val_fraction: float = Field(0.2, gt=0, lt=0.9, description="Validation share when the data has no val/ "
                                "folder or split column (stratified, seeded split).")
    cache_views: int = Field(2, ge=0, le=64, description="partial: augmented views of each training image whose "
                             "frozen-stage activations are computed once and cached, so each step runs only the "
                             "unfrozen stages (0: no cache, every step runs the whole network).")
    time_budget: float = Field(15.0, gt=0, le=86_400, description="auto: seconds it may spend fitting (the head "
                               "always, then partial fine-tuning while its trial says it pays and the time "
                               "allows); export, checks and publishing come on top.")
    patience: int = Field(3, ge=1, le=100, description="Early stopping: epochs without validation improvement.")
    parity_images: int = Field(32, ge=0, le=100_000, description="Validation images (evenly spread) on which "
                               "ONNX Runtime must match PyTorch before anything is published; 0 = all of "
                               "them. Eager PyTorch is the slow side on a CPU: 32 cost about 1 s.")
    # numpy's legacy seeding takes 0 .. 2**32 - 1; a larger seed would only fail once training starts.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for the split, initialisation and augmentation.")
    threads: Optional[int] = Field(None, ge=1, le=256, description="Torch CPU threads (default: all cores).")
    # Checked where training runs (training/device.py), not here: the service that admits a retrain has no torch
    # and a queued job may run on another machine, so `cuda` without a CUDA device fails the job, saying so.
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where fitting and fine-tuning run: auto: "
                                                   "a CUDA GPU when torch sees one, else the CPU; cuda: a GPU "
                                                   "(mixed precision), an error where there is none; cpu: "
                                                   "the CPU. The export and the version's figures are "
                                                   "computed on the CPU either way.")
    promote: Union[Literal["auto"], bool] = Field("auto", description="auto: promote when at least as good as "
                                                  "the promoted version on the new validation split (same "
                                                  "classes) or above min_accuracy (new classes); true/false: "
                                                  "always/never.")
    balance: Union[Literal["auto"], bool] = Field("auto", description="auto: class-weighted loss when the "
                                                  "training split's largest/smallest class ratio > 1.5; "
                                                  "true/false: always/never.")
    min_accuracy: float = Field(0.7, ge=0, le=1, description="Accuracy a version with new classes needs for "
                                "auto promotion.")
    note: Optional[str] = Field(None, max_length=500, description="Free text stored with the version.")
    # Lineage: a request that names a dataset of the store trains on one of its snapshots, and the version
    # records both. Fields of the request (not beside it) so the CLI and the retrain routes take them alike and
    # config.json keeps them with the rest of what made the version.
    dataset: Optional[str] = Field(None, description="Train on this dataset of the store (see `refit dataset "
                                   "list`) instead of a folder or upload.")
    snapshot: Optional[str] = Field(None, description="The dataset's snapshot to train on (default: its newest); "
                                    "recorded with the version.")

    @field_validator("backbone")
    @classmethod
    def _registered_backbone(cls, name: str) -> str:
        # Checked here, not when the model is built, so a retrain with a wrong name is refused at submit
        # (and the CLI before reading any data). The table of names needs no torch import (core/backbones.py).
        if name not in list_backbones():
            raise PydanticCustomError("unknown_backbone", "{message}", {"message": unknown_backbone(name)})
        return name


    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, name):
        try:
            return None if name is None else check_name(name)
        except DatasetError as e:
            raise PydanticCustomError("dataset_name", "{message}", {"message": str(e)}) from None

    @field_validator("snapshot")
    @classmethod
    def _snapshot_id(cls, snapshot):
        try:
            return None if snapshot is None else check_snapshot(snapshot)
        except DatasetError as e:
            raise PydanticCustomError("snapshot_id", "{message}", {"message": str(e)}) from None

    @model_validator(mode="after")
    def _snapshot_needs_dataset(self):
        if self.snapshot is not None and self.dataset is None:
            raise ValueError("snapshot names a snapshot of a dataset: give the dataset too")
        return self


def field_help() -> dict[str, str]:
    return {name: f.description or "" for name, f in TrainRequest.model_fields.items()}
