"""Fine-tuning in seconds: the activation cache of `partial`, and auto's time budget.

The cache must give the frozen stages' exact outputs, hold no more than it plans (and fall back to the whole
network when that would not fit), and train the backbone's own unfrozen layers; auto must publish a valid
version whatever its budget.
"""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_dataset, run_cli

from core.config import TrainRequest
from core.data import load_dataset
from training.activations import ViewCache, activation_bytes, prefix_outputs, prefix_session, split_model
from training.augment import train_transform
from training.finetune import STRATEGIES, apply_strategy
from training.pipeline import Run, input_contract
from training.registry import create_backbone


def partial_split(name: str, unfreeze: int = 4, pretrained: bool = True):
    bb = create_backbone(name, num_classes=3, pretrained=pretrained)
    _, summary = apply_strategy(bb, STRATEGIES["partial"], lr=1e-3, backbone_lr=1e-4, unfreeze_blocks=unfreeze,
                                log=lambda _: None)
    return bb, summary, split_model(bb, summary["unfrozen_stages"])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "mobilenet_v3_large", "efficientnet_b0",
                                  "convnext_tiny"])
def test_prefix_then_tail_is_the_whole_network(name):
    """Cut before the unfrozen stages, the frozen prefix followed by the tail computes exactly the model."""
    bb, summary, split = partial_split(name, pretrained=name == "efficientnet_lite0")
    assert split is not None, f"{name}: the forward pass could not be cut"
    prefix_stages = {s for seg in split.prefix for s in seg.stages}
    assert not prefix_stages & set(summary["unfrozen_stages"])  # nothing trainable is cached
    assert all(not p.requires_grad for p in split.prefix.parameters())
    tail_params = {id(p) for p in split.tail.parameters()}
    assert all(id(p) in tail_params for p in bb.model.parameters() if p.requires_grad)  # all trained there
    bb.model.eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(split.tail(split.prefix(x)), bb.model(x))


def test_cached_views_are_the_frozen_stages_outputs(tmp_path):
    """The ONNX prefix gives the frozen stages' outputs (as PyTorch computes them), and each cached view holds
    exactly the prefix's output for that view of each image."""
    bb, _, split = partial_split("efficientnet_lite0")
    sess = prefix_session(bb, split, 224, tmp_path)
    images = [__import__("conftest").synthetic_image(c, i, (300, 240)) for i, c in enumerate(["red", "blue"] * 3)]
    transform = train_transform(bb.contract, augment=False)  # deterministic: the view is the eval crop
    arrays = np.stack([transform(im).numpy() for im in images])
    split.prefix.eval()
    with torch.no_grad():
        direct = split.prefix(torch.from_numpy(arrays)).numpy()
    cache = ViewCache(split, sess, images, [0, 1] * 3, transform, views=2, seed=0, batch_size=4)
    cache.set_epoch(1)
    cache.set_epoch(2)
    assert cache.made == 2 and len(cache) == 6
    np.testing.assert_allclose(cache.store[0], direct, atol=1e-4)
    np.testing.assert_allclose(prefix_outputs(sess, arrays), direct, atol=1e-4)
    x, y = cache[3]
    np.testing.assert_array_equal(x.numpy(), cache.store[cache.current[3], 3])
    assert int(y) == 1
    # Bounded: what it holds is what was planned, views x images x the prefix's output.
    assert cache.nbytes == activation_bytes(split, 224, 6, 2) == 2 * 6 * direct[0].nbytes
    # Past K views, each epoch draws one of the cached views per image and makes none.
    cache.set_epoch(3)
    assert cache.made == 2 and set(cache.current) <= {0, 1}


def test_augmented_views_differ_and_train_the_backbones_own_layers(tmp_path):
    """partial on the cache: every view is a new augmentation, the unfrozen stages of the model move and the
    frozen ones do not."""
    data = make_dataset(tmp_path / "data", classes=("red", "blue", "green"), n=12, split=True)
    req = TrainRequest(strategy="partial", epochs=3, cache_views=2, unfreeze_blocks=2, head_epochs=5, patience=5)
    ds = load_dataset(data, contract=input_contract(req), log_fn=lambda _: None)
    logs: list[str] = []
    run = Run(req, ds, logs.append, tmp_path / "cache")
    start = run.backbone(pretrained=True)
    before = {k: v.clone() for k, v in start.model.state_dict().items()}
    bb, history, summary = run.run("partial")
    cache = summary["activation_cache"]
    assert cache["used"] and cache["views"] == 2 and cache["views_made"] == 2
    assert cache["bytes"] <= cache["planned_bytes"] <= cache["limit_bytes"]
    after = bb.model.state_dict()
    assert not torch.equal(after["_conv_head.weight"], before["_conv_head.weight"])  # unfrozen: trained
    assert torch.equal(after["_blocks.15._project_conv.weight"], before["_blocks.15._project_conv.weight"])
    assert torch.equal(after["_bn0.running_mean"], before["_bn0.running_mean"])  # frozen BN kept ImageNet stats
    assert [h["epoch"] for h in history if h["phase"] == "partial"] == [1, 2, 3]
    assert any("activation cache: 2 view(s)" in line for line in logs)


def test_cache_over_its_memory_bound_falls_back_and_still_publishes(tmp_path, monkeypatch):
    """With the bound below what the views need, partial runs the whole network each step, says so, records
    it, and publishes a working version."""
    data = make_dataset(tmp_path / "data", classes=("red", "blue"), n=10, split=True)
    home = tmp_path / "home"
    monkeypatch.setenv("REFIT_ACTIVATION_CACHE_MB", "0.5")  # 10 images x 4 views x 37 KB is 1.5 MB
    r = run_cli("train", data, "--strategy", "partial", "--epochs", "1", "--head-epochs", "3", "--json",
                "--no-int8", "--parity-images", "2", "--cache-views", "4", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "over the limit of 0 MB" in r.stderr and "runs the whole network every step instead" in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    metrics = json.loads((home / "models" / "refit" / out["version"] / "metrics.json").read_text())
    assert metrics["strategy"] == "partial"
    cache = metrics["auto"]["activation_cache"]
    assert cache["used"] is False and cache["planned_bytes"] > cache["limit_bytes"] == int(0.5 * 2**20)
    assert any(h["phase"] == "partial" for h in metrics["history"])
    sess = ort.InferenceSession(str(home / "models" / "refit" / out["version"] / "model.onnx"))
    probs = sess.run(["probs"], {"input": np.zeros((1, 3, 224, 224), np.float32)})[0]
    assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-5


def test_auto_on_a_tiny_budget_publishes_the_head(tmp_path):
    """The head always fits (it is the floor); a budget spent on it skips fine-tuning and says why."""
    data = make_dataset(tmp_path / "data", classes=("red", "blue"), n=60, split=True)  # 120 train: partial allowed
    r = run_cli("train", data, "--time-budget", "0.01", "--json", "--no-int8", "--parity-images", "2",
                home=tmp_path / "home")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["strategy"] == "feature_extraction" and out["promoted"] and out["val_accuracy"] > 0.9
    assert "time budget" in out["auto"]["reason"] and out["auto"]["signals"]["time_budget"] == 0.01
    assert list(out["auto"]["candidates"]) == ["feature_extraction"]


def test_budget_stops_fine_tuning_between_epochs(tmp_path):
    """An epoch whose expected end is past the budget is not started; the kept model is the best so far."""
    data = make_dataset(tmp_path / "data", classes=("red", "blue"), n=12, split=True)
    req = TrainRequest(strategy="partial", epochs=20, patience=20, head_epochs=3, unfreeze_blocks=2)
    ds = load_dataset(data, contract=input_contract(req), log_fn=lambda _: None)
    run = Run(req, ds, lambda _: None, tmp_path / "cache")
    warm, _, _ = run.run("feature_extraction")
    _, history, summary = run.run("partial", start=warm, budget=1e-3)
    assert summary["kept"]["stopped"] == "budget" and summary["kept"]["epochs_run"] == 1
    assert len([h for h in history if h["phase"] == "partial"]) == 1
