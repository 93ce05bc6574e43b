"""Class balancing: the weights, the switch, what a real run records, and the promotion rule on an imbalanced
validation split. The runs train on real photos: flowers5_128px (REFIT_TEST_FLOWERS) with one class cut down."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import TrainRequest
from core.store import Store
from training.balance import BALANCE_RATIO, POWER, class_weights, decide
from training.metrics import classification_report

CLASSES = ("daisy", "dandelion", "rose")  # three of the five keep the runs short
RARE = "rose"


def imbalanced(root: Path, where: Path, *, train: dict, val: dict) -> Path:
    """Links to the first `train[c]` / `val[c]` photos of each class (nothing is copied)."""
    for split, counts in (("train", train), ("val", val)):
        for c in CLASSES:
            dest = where / split / c
            dest.mkdir(parents=True)
            for f in sorted((root / split / c).glob("*.jp*g"))[:counts[c]]:
                (dest / f.name).symlink_to(f)
    return where


def fast_request(**fields) -> TrainRequest:
    return TrainRequest(strategy="feature_extraction", head_epochs=30, parity_images=2, int8=False, **fields)


def train(request: TrainRequest, data: Path, home: Path) -> tuple[dict, dict]:
    from training.pipeline import train as pipeline_train

    out = pipeline_train(request, data, store=Store(home), log=lambda m: None)
    metrics = json.loads((home / "models" / "refit" / out["version"] / "metrics.json").read_text())
    return out, metrics


# --- the weights and the switch ---------------------------------------------------------------------------

def test_class_weights_favour_the_rare_class_and_keep_mean_one():
    w = class_weights([56, 56, 8])
    assert w.mean().item() == pytest.approx(1.0)
    assert w[2] > w[0] == w[1]
    assert (w[2] / w[0]).item() == pytest.approx(7 ** POWER)  # tempered: below the full inverse, 7
    assert torch.allclose(class_weights([10, 10, 10]), torch.ones(3))


def test_decide_switches_on_above_the_ratio_off_below_and_obeys_the_request():
    skewed, even = {"a": 56, "b": 56, "c": 8}, {"a": 12, "b": 10, "c": 11}
    on = decide("auto", skewed)
    assert on["on"] and on["why"] == f"train ratio 7 > {BALANCE_RATIO:g}" and on["ratio"] == 7.0
    assert on["method"] == "loss_weights" and on["weights"]["c"] > on["weights"]["a"]
    off = decide("auto", even)
    assert not off["on"] and off["why"] == "balanced (ratio 1.2 <= 1.5)" and off["weights"] is None
    refused = decide(False, skewed)
    assert not refused["on"] and refused["why"] == "switched off by the request" and refused["ratio"] == 7.0
    forced = decide(True, even)
    assert forced["on"] and forced["why"] == "requested" and set(forced["weights"]) == {"a", "b", "c"}


def test_balance_option_takes_auto_true_and_false_from_the_cli():
    from cli.main import build_parser

    def parsed(*flags):
        args = build_parser().parse_args(["train", "d", *flags])
        return TrainRequest.model_validate({k: v for k, v in vars(args).items() if k in TrainRequest.model_fields})

    assert parsed().balance == "auto"
    assert parsed("--balance", "false").balance is False
    assert parsed("--balance", "true").balance is True


def test_balanced_accuracy_is_mean_recall_over_classes_with_images():
    # A model that calls everything the large class: 0.9 accurate, 0.5 balanced.
    y = np.array([0] * 9 + [1])
    report = classification_report(y, np.zeros(10, dtype=int), ["big", "rare", "absent"])
    assert report["accuracy"] == pytest.approx(0.9)
    assert report["balanced_accuracy"] == pytest.approx(0.5)  # "absent" has no image: not counted


# --- real runs ------------------------------------------------------------------------------------------

def test_run_records_balance_and_promotion_uses_balanced_accuracy_on_an_imbalanced_split(refit_home, tmp_path,
                                                                                         flowers_data):
    data = imbalanced(flowers_data, tmp_path / "d", train={"daisy": 24, "dandelion": 24, RARE: 8},
                      val={"daisy": 12, "dandelion": 12, RARE: 3})
    first, m1 = train(fast_request(), data, refit_home)
    assert m1["balance"]["on"] and m1["balance"]["why"] == "train ratio 3 > 1.5"
    assert m1["balance"]["weights"][RARE] > m1["balance"]["weights"]["daisy"]
    assert 0 <= m1["balanced_accuracy"] <= 1
    assert first["metrics"]["balanced_accuracy"] == m1["balanced_accuracy"]
    assert first["promoted"]  # the first version
    second, m2 = train(fast_request(balance=False), data, refit_home)
    assert m2["balance"] == {"on": False, "why": "switched off by the request", "ratio": 3.0, "method": None,
                             "weights": None}
    decision = second["promotion"]
    assert decision["metric"] == "balanced_accuracy" and decision["val_ratio"] == 4.0
    assert "imbalanced validation split (ratio 4 > 1.5): new balanced accuracy" in decision["reason"]
    # The promoted version measured again on the same split gives the figure its own run recorded.
    assert decision["current_val_balanced_accuracy"] == pytest.approx(m1["balanced_accuracy"], abs=1e-6)
    assert decision["new_val_balanced_accuracy"] == m2["balanced_accuracy"]
    assert decision["promote"] == (m2["balanced_accuracy"] >= m1["balanced_accuracy"])
    assert decision["new_val_accuracy"] == m2["val_accuracy"]


def test_promotion_compares_accuracy_on_a_balanced_split(refit_home, tmp_path, flowers_data):
    data = imbalanced(flowers_data, tmp_path / "d", train={"daisy": 24, "dandelion": 24, RARE: 8},
                      val={c: 8 for c in CLASSES})
    _, m1 = train(fast_request(), data, refit_home)
    second, m2 = train(fast_request(seed=1), data, refit_home)
    decision = second["promotion"]
    assert decision["metric"] == "accuracy" and decision["val_ratio"] == 1.0
    assert decision["reason"].startswith("same classes: new ")
    assert decision["current_val_accuracy"] == pytest.approx(m1["val_accuracy"], abs=1e-6)
    assert decision["promote"] == (m2["val_accuracy"] >= decision["current_val_accuracy"])
    assert "new_val_balanced_accuracy" not in decision
