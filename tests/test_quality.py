"""Label problems and train/validation near-duplicates in every version's report (issue 12): a real
`refit train` (feature extraction) on a tmp copy of hymenoptera with a bee photo filed under ants and a
validation photo copied into train, then what metrics.json, the CLI output and the model file say."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import run_cli
from PIL import Image

BEE = "train/bees/1092977343_cb42b38d62.jpg"  # filed under ants as well, with a new name
VAL_PHOTO = "val/ants/10308379_1b6c72e180.jpg"  # saved again (JPEG quality 80) into train/ants


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    data = root / "hymenoptera"
    shutil.copytree(real_data, data)
    shutil.copy(data / BEE, data / "train/ants/injected_bee.jpg")
    buf = io.BytesIO()
    Image.open(data / VAL_PHOTO).save(buf, "JPEG", quality=80)
    (data / "train/ants/copy_of_val.jpg").write_bytes(buf.getvalue())
    home = root / "home"
    r = run_cli("train", data, "--strategy", "feature_extraction", "--no-int8", "--parity-images", "4", "--json",
                home=home, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    folder = home / "models" / "refit" / result["version"]
    return {"result": result, "stderr": r.stderr, "folder": folder,
            "metrics": json.loads((folder / "metrics.json").read_text())}


def test_injected_mislabel_is_at_the_top_of_label_problems(trained):
    problems = trained["metrics"]["label_problems"]
    assert problems["available"] and problems["folds"] == 5
    top = [item["path"] for item in problems["items"][:5]]
    assert "train/ants/injected_bee.jpg" in top, problems["items"][:5]
    item = next(i for i in problems["items"] if i["path"] == "train/ants/injected_bee.jpg")
    assert item["given"] == "ants" and item["suggested"] == "bees" and item["score"] > 0.5
    assert len(item["sha256"]) == 64 and item["split"] == "train"
    # Most suspicious first; a short list, not half the dataset.
    scores = [i["score"] for i in problems["items"]]
    assert scores == sorted(scores, reverse=True)
    assert problems["count"] < 0.1 * problems["images"]
    assert problems["seconds"] < 30


def test_duplicate_across_train_and_val_is_found(trained):
    dup = trained["metrics"]["near_duplicates"]
    pairs = {(i["val"]["path"], i["train"]["path"]): i["similarity"] for i in dup["items"]}
    assert (VAL_PHOTO, "train/ants/copy_of_val.jpg") in pairs, dup
    assert pairs[(VAL_PHOTO, "train/ants/copy_of_val.jpg")] >= dup["threshold"]
    # hymenoptera itself has no such pair at this threshold (bench/quality_thresholds.py): only the copy
    assert dup["count"] == 1


def test_cli_prints_a_summary_and_json_carries_the_lists(trained):
    err = trained["stderr"]
    assert "label problems:" in err and "injected_bee.jpg" in err
    assert "near-duplicates across train/val: 1" in err
    res = trained["result"]
    assert res["label_problems"]["count"] == trained["metrics"]["label_problems"]["count"]
    assert res["near_duplicates"]["items"][0]["train"]["path"] == "train/ants/copy_of_val.jpg"


def test_version_has_embedding_output_and_drift_reference(trained):
    from core.drift import load_reference

    folder = trained["folder"]
    outputs = [o.name for o in onnx.load(str(folder / "model.onnx")).graph.output]
    assert outputs == ["probs", "embedding", "features"]  # features: for explanations (tests/test_explain.py)
    ref = load_reference(folder / "drift.npz")
    assert ref.embeddings.shape[1] == 1280 and 0 < len(ref.embeddings) <= 256
    assert ref.classes == ("ants", "bees") and abs(ref.val_labels.sum() - 1) < 1e-9
    assert (folder / "drift.npz").stat().st_size < 1_000_000
    assert trained["metrics"]["drift"]["file"] == "drift.npz"


def test_too_few_images_per_class_says_so():
    from training.quality import label_problems

    rng = np.random.default_rng(0)
    x = rng.random((7, 16), dtype=np.float32)
    files = [{"path": f"{i}.jpg", "sha256": None, "split": "train"} for i in range(7)]
    out = label_problems(x, np.array([0, 0, 0, 0, 0, 0, 1]), ["a", "b"], files)
    assert out["available"] is False and "b (1)" in out["reason"]
    out = label_problems(x, np.array([0, 0, 0, 0, 1, 1, 1]), ["a", "b"], files)
    assert out["available"] is True and out["folds"] == 3  # fewer folds, not a failure


def test_small_synthetic_dataset_trains_with_fewer_folds(tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "colours", n=3)  # 3 images per class: 2 train + 1 val each
    r = run_cli("train", data, "--strategy", "feature_extraction", "--no-int8", "--parity-images", "2",
                "--head-epochs", "3", "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["label_problems"]["available"] and res["label_problems"]["folds"] == 3


def test_reports_and_drift_reference_travel_through_an_s3_store(s3_endpoint, tmp_path, monkeypatch):
    """Published to S3: the version's metrics carry the lists, and a replica's checked copy has drift.npz."""
    from conftest import S3_BUCKET, make_dataset

    from core.drift import load_reference
    from core.store import Store

    url = f"s3://{S3_BUCKET}/quality-{tmp_path.name}"
    monkeypatch.setenv("REFIT_STORE", url)
    data = make_dataset(tmp_path / "colours", n=6)
    r = run_cli("train", data, "--strategy", "feature_extraction", "--no-int8", "--parity-images", "2",
                "--head-epochs", "3", "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    version = json.loads(r.stdout.strip().splitlines()[-1])["version"]
    store = Store(tmp_path / "replica", url=url)  # another machine: nothing of it is local yet
    metrics = store.info(version)["metrics"]
    assert metrics["label_problems"]["available"] and "near_duplicates" in metrics
    ref = load_reference(store.path(version) / "drift.npz")
    assert ref is not None and ref.classes == ("blue", "red")
