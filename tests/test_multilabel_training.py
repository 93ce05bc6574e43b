"""Multi-label training: a sigmoid head with BCE, per-label thresholds in the model file, the multi-label figures.

The images are 2x2 collages of coloured tiles (the rest grey): an image's labels are the colours in it, so the
labels genuinely co-occur and a single-label model could not be right on them.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import PALETTE, synthetic_image
from PIL import Image

from core.config import TrainRequest
from core.data import Dataset
from core.preprocess import preprocess
from core.store import Store
from training.export import CONTRACT_KEY
from training.metrics import average_precision, best_f1_threshold, multilabel_report
from training.pipeline import train

COLOURS = sorted(PALETTE)  # blue, green, red, yellow


def collage(colours: list[str], seed: int, tile: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    grid = Image.new("RGB", (2 * tile, 2 * tile), (128, 128, 128))
    for cell, (c, k) in zip(rng.permutation(4), [(c, i) for i, c in enumerate(colours)], strict=False):
        grid.paste(synthetic_image(c, seed * 10 + k, (tile, tile)), ((cell % 2) * tile, (cell // 2) * tile))
    return grid


def make_collages(root, n_train: int = 24, n_val: int = 12, seed: int = 0) -> Dataset:
    """A multi-label Dataset of collages (every label with positives in both splits), and its labels.csv."""
    rng = np.random.default_rng(seed)
    items = {"train": [], "val": []}
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k = 1 + i % 3
            picked = sorted({COLOURS[i % 4], *rng.choice(COLOURS, k - 1, replace=False)})
            path = root / split / f"{i:03d}.jpg"
            collage(picked, seed * 1000 + i + (500 if split == "val" else 0)).save(path, quality=90)
            items[split].append((path, tuple(COLOURS.index(c) for c in picked)))
            rows.append((f"{split}/{i:03d}.jpg", ";".join(picked), split))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "labels", "split"), *rows])
    return Dataset(root, list(COLOURS), items["train"], items["val"], "manifest", task="multi_label")


def test_thresholds_and_average_precision():
    """AP as scikit-learn defines it; thresholds at the best F1, the lower of equal ones, 0.5 without a positive."""
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    y = np.array([1, 0, 1, 0, 0, 1])
    # precision at each positive's rank: 1/1, 2/3, 3/6; each adds a third of the recall
    assert average_precision(scores, y) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert np.isnan(average_precision(scores, np.zeros(6)))
    # halfway between the lowest score kept and the next lower one, so a 7th-digit difference changes nothing
    assert best_f1_threshold(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.5)
    # 0.3 and 0.7 both give F1 2/3 here: the lower is kept (halfway to 0)
    assert best_f1_threshold(np.array([0.3, 0.5, 0.7]), np.array([1, 0, 1])) == pytest.approx(0.15)
    assert best_f1_threshold(np.array([0.3, 0.9]), np.array([0, 0])) == 0.5
    report = multilabel_report(np.array([[1, 0], [0, 1], [1, 1]]), np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.3]]),
                               (0.5, 0.5), ["a", "b"])
    assert report["subset_accuracy"] == pytest.approx(2 / 3) and report["map"] == pytest.approx(1.0)
    assert report["per_label"]["b"] == {"ap": 1.0, "precision": 1.0, "recall": 0.5, "f1": 0.6667, "threshold": 0.5,
                                        "support": 2}
    assert report["micro_f1"] == pytest.approx(0.8571, abs=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ml")
    home = tmp / "home"
    ds = make_collages(tmp / "data")
    store = Store(home)
    lines: list[str] = []
    request = TrainRequest(strategy="feature_extraction", parity_images=4, threads=2)
    result = train(request, ds, store=store, log=lines.append)
    return result, store, ds, lines, request


def test_a_multilabel_version_is_published_with_its_thresholds(trained):
    result, store, ds, lines, _ = trained
    assert result["task"] == "multi_label" and result["promoted"]
    assert result["val_map"] >= 0.9 and 0 < result["val_micro_f1"] <= 1  # colour tiles: easy for ImageNet features
    entry = store.home / "models" / "refit" / result["version"]
    meta = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    contract = json.loads(meta.custom_metadata_map[CONTRACT_KEY])
    assert contract["task"] == "multi_label" and contract["class_names"] == COLOURS
    assert len(contract["thresholds"]) == 4 and all(0 < t < 1 for t in contract["thresholds"])
    assert contract["thresholds"] == pytest.approx([result["thresholds"][c] for c in COLOURS])
    assert contract["input_size"] == 448  # twice the backbone's own: multi-label objects are small
    # probs: one sigmoid per label (rows do not sum to 1), as the graph's last op says
    graph = onnx.load(str(entry / "model.onnx")).graph
    assert next(n for n in graph.node if "probs" in n.output).op_type == "Sigmoid"
    from core.contract import Contract
    c = Contract.from_json(meta.custom_metadata_map[CONTRACT_KEY])
    x = np.stack([preprocess(p, c) for p, _ in ds.val])
    sess = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, emb, fmap = sess.run(["probs", "embedding", "features"], {"input": x})
    assert probs.shape == (12, 4) and ((probs > 0) & (probs < 1)).all()
    assert np.abs(probs.sum(1) - 1).max() > 0.2
    assert emb.shape == (12, 1280) and fmap.shape[1] == 1280
    assert np.load(entry / "cam.npz")["weight"].shape == (4, 1280)
    hit = probs >= np.array(contract["thresholds"])
    assert (hit == ds.targets("val").astype(bool)).all(1).mean() == pytest.approx(result["val_accuracy"], abs=1e-6)


def test_metrics_json_results_csv_and_summary_carry_the_multilabel_figures(trained):
    result, store, _, lines, _ = trained
    entry = store.home / "models" / "refit" / result["version"]
    metrics = json.loads((entry / "metrics.json").read_text())
    assert metrics["task"] == "multi_label" and set(metrics["per_label"]) == set(COLOURS)
    for figures in metrics["per_label"].values():
        assert set(figures) == {"ap", "precision", "recall", "f1", "threshold", "support"}
        assert figures["support"] > 0
    assert metrics["val_map"] == pytest.approx(result["val_map"])
    assert metrics["val_accuracy"] == metrics["subset_accuracy"] == result["val_accuracy"]
    assert {"val_micro_f1", "macro_f1", "thresholds"} <= set(metrics) and "confusion_matrix" not in metrics
    assert metrics["int8"]["metric"] == "map" and isinstance(metrics["int8"]["chosen"], bool)
    assert "int8 val_map" in metrics["int8"]["reason"]
    assert metrics["label_problems"]["available"] and metrics["drift"]["reference_embeddings"] > 0
    with open(entry / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert "val_map" in rows[0] and max(float(r["val_map"]) for r in rows) == pytest.approx(result["val_map"], abs=1e-4)
    assert any("val mAP" in line for line in lines)
    assert {"val_map", "val_micro_f1", "val_accuracy"} <= set(json.loads(json.dumps(result, default=str)))


def test_the_next_multilabel_version_is_held_to_the_promoted_ones_map(trained):
    result, store, ds, _, request = trained
    again = train(request.model_copy(update={"seed": 1, "int8": False}), ds, store=store, log=lambda _: None)
    decision = again["promotion"]
    assert decision["metric"] == "map" and decision["current_version"] == result["version"]
    assert decision["current_val_map"] > 0.5 and decision["promote"] == (again["val_map"] >= decision["current_val_map"])


def test_partial_fine_tuning_trains_with_bce_on_the_activation_cache(tmp_path):
    ds = make_collages(tmp_path / "data", n_train=16, n_val=8, seed=3)
    request = TrainRequest(strategy="partial", epochs=2, head_epochs=20, parity_images=2, int8=False, threads=2,
                           image_size=224)
    lines: list[str] = []
    result = train(request, ds, store=Store(tmp_path / "home"), log=lines.append)
    assert result["strategy"] == "partial" and result["auto"]["activation_cache"]["used"]
    assert result["parity"]["passed"] and 0 <= result["val_map"] <= 1
    assert any(line.startswith("partial epoch 1/2") and "val_map" in line for line in lines)


def test_the_cli_trains_a_multilabel_manifest(tmp_path):
    """From a labels.csv to a version, and `refit predict` answering with the labels over their thresholds."""
    from conftest import run_cli

    make_collages(tmp_path / "data")
    r = run_cli("train", tmp_path / "data", "--strategy", "feature_extraction", "--parity-images", "2", "--json",
                home=tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["task"] == "multi_label" and {"val_map", "val_micro_f1"} <= set(out)
    image = next(iter(sorted((tmp_path / "data").rglob("*.jpg"))))
    p = run_cli("predict", image, "--json", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    answer = json.loads(p.stdout)[0]
    assert isinstance(answer["labels"], list) and answer["version"] == out["version"]
    assert all(x["score"] >= 0 for x in answer["labels"])
    everything = json.loads(run_cli("predict", image, "--json", "--threshold", "0", home=tmp_path / "home").stdout)
    assert len(everything[0]["labels"]) == len(out["classes"])  # a threshold of 0 lets every label through
