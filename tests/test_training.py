"""Training end to end on real image files: dataset checks, strategies, ONNX parity, versions."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, jpeg_bytes, make_dataset, run_cli
from PIL import Image
from pydantic import ValidationError

from core.config import TrainRequest
from core.contract import Contract
from core.data import DatasetError, load_dataset, safe_extract_zip
from core.preprocess import ImageError, preprocess
from core.store import Store, StoreError
from training.export import export_onnx, read_contract
from training.registry import BackboneError, create_backbone, list_backbones


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# --- backbones ------------------------------------------------------------------------------------

def test_default_backbone_is_really_pretrained():
    """The packaged EfficientNet-Lite0 weights rank a cat class first on a photo of a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    cat = Image.fromarray(skimage_data.chelsea())
    b = io.BytesIO()
    cat.save(b, "JPEG")
    bb = create_backbone("efficientnet_lite0")
    bb.model.eval()
    with torch.no_grad():
        probs = bb.model(torch.from_numpy(preprocess(b.getvalue(), bb.contract))[None]).softmax(1)[0]
    top = bb.imagenet_classes[int(probs.argmax())]
    assert top in {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}, top


def test_unknown_backbone_lists_the_available_ones():
    with pytest.raises(BackboneError, match="Unknown backbone 'vgg99'.*efficientnet_lite0.*resnet18"):
        create_backbone("vgg99")
    assert {"efficientnet_lite0", "resnet18", "resnet50", "convnext_tiny"} <= set(list_backbones())


def test_torchvision_weights_offline_error_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        create_backbone("resnet18")
    except BackboneError as e:  # no network here: the message must say where the file goes
        assert "resnet18-f37072fd.pth" in str(e) and str(tmp_path / "torch" / "hub" / "checkpoints") in str(e)
    else:  # a machine with network downloaded it into the cache folder
        assert (tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()


def test_local_weights_file_is_accepted(tmp_path):
    src = create_backbone("efficientnet_lite0", pretrained=False)
    torch.nn.init.constant_(src.model._conv_stem.weight, 0.25)
    torch.save(src.model.state_dict(), tmp_path / "w.pth")
    bb = create_backbone("efficientnet_lite0", num_classes=3, weights=tmp_path / "w.pth")
    assert torch.all(bb.model._conv_stem.weight == 0.25)
    assert bb.model._fc.out_features == 3
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a PyTorch state dict"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "bad.pth")


# --- request model --------------------------------------------------------------------------------

def test_training_request_rejects_unknown_and_invalid_fields():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainRequest(epoch=3)
    with pytest.raises(ValidationError, match="strategy"):
        TrainRequest(strategy="magic")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TrainRequest(epochs=0)
    assert TrainRequest(promote="false").promote is False


def test_cli_rejects_invalid_option(refit_home, tmp_path):
    data = make_dataset(tmp_path / "d")
    r = run_cli("train", data, "--epochs", "-1", home=refit_home)
    assert r.returncode == 2 and "--epochs" in r.stderr and "greater than or equal to 1" in r.stderr


# --- dataset checks -------------------------------------------------------------------------------

def test_corrupt_and_non_image_files_are_reported_and_skipped(tmp_path):
    data = make_dataset(tmp_path / "d", n=6)
    good = (data / "red" / "red_0.jpg").read_bytes()
    (data / "red" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (data / "blue" / "notes.txt").write_text("not an image")
    (data / "blue" / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\nnonsense")
    ds = load_dataset(data, log_fn=lambda m: None)
    skipped = {Path(s["path"]).name for s in ds.skipped}
    assert skipped == {"broken.jpg", "fake.png"}
    assert any(p.endswith("notes.txt") for p in ds.ignored)
    assert len(ds.train) + len(ds.val) == 12


def test_one_class_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red",))
    with pytest.raises(DatasetError, match="at least 2 class folders.*found 1: red"):
        load_dataset(data)


def test_class_with_one_image_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d", n=5)
    for p in list((data / "blue").iterdir())[1:]:
        p.unlink()
    with pytest.raises(DatasetError, match=r"at least 2 usable images.*blue \(1\)"):
        load_dataset(data)


def test_seeded_stratified_split_is_reproducible(tmp_path):
    data = make_dataset(tmp_path / "d", n=10)
    a, b = load_dataset(data, seed=1), load_dataset(data, seed=1)
    assert [p for p, _ in a.val] == [p for p, _ in b.val]
    assert a.counts()["val"] == {"blue": 2, "red": 2}
    assert a.fingerprint()["content_hash"] == b.fingerprint()["content_hash"]


def test_imbalance_is_reported(tmp_path):
    data = make_dataset(tmp_path / "d", n=3)
    for i in range(12):
        (data / "red" / f"extra{i}.jpg").write_bytes(jpeg_bytes("red", 500 + i))
    assert any("imbalance" in w for w in load_dataset(data).warnings)


def test_zip_dataset_with_wrapper_folder(tmp_path):
    data = make_dataset(tmp_path / "photos", n=4)
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in data.rglob("*.jpg"):
            zf.write(p, "photos/" + p.relative_to(data).as_posix())
    ds = load_dataset(z, workdir=tmp_path / "work")
    assert ds.classes == ["blue", "red"] and len(ds.train) + len(ds.val) == 8


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg"])
def test_zip_slip_is_refused(tmp_path, name):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/a.jpg", jpeg_bytes())
        zf.writestr(name, jpeg_bytes())
    with pytest.raises(DatasetError, match="outside the archive"):
        safe_extract_zip(z, tmp_path / "out")
    assert not (tmp_path / "evil.jpg").exists()


def test_not_a_zip_is_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"hello")
    with pytest.raises(DatasetError, match="not a valid .zip"):
        load_dataset(tmp_path / "x.zip")


def test_image_errors_name_the_problem(tmp_path):
    c = Contract()
    with pytest.raises(ImageError, match="upload.bin: not an image"):
        preprocess(b"plain text", c, name="upload.bin")
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, "PNG")
    with pytest.raises(ImageError, match="over the limit"):
        preprocess(big.getvalue(), c, max_pixels=1_000_000)


# --- export ---------------------------------------------------------------------------------------

def test_preprocessing_matches_torchvision_resize_centre_crop():
    """The contract means what torchvision's Resize + CenterCrop + Normalize mean, the preprocessing the
    ImageNet weights were trained with (within one grey level: only the crop window is resampled)."""
    import skimage.data
    from torchvision.transforms import v2 as T

    c = Contract()
    reference = T.Compose([T.Resize(c.resize_size, antialias=True), T.CenterCrop(c.input_size), T.PILToTensor(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(list(c.mean), list(c.std))])
    for name, size in (("chelsea", None), ("astronaut", None), ("coffee", (301, 207))):
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        if size:
            im = im.resize(size)
        b = io.BytesIO()
        im.save(b, "PNG")  # lossless, so both sides see the same pixels
        ours = preprocess(b.getvalue(), c)
        theirs = reference(im).numpy()
        assert ours.shape == theirs.shape == (3, c.input_size, c.input_size)
        grey_level = 1 / 255 / min(c.std)
        assert np.abs(ours - theirs).max() <= 1.5 * grey_level, name
        assert np.abs(ours - theirs).mean() <= 0.1 * grey_level, name


def test_pytorch_and_onnx_agree_and_contract_travels_in_the_file(tmp_path):
    bb = create_backbone("efficientnet_lite0", num_classes=3)
    bb.model.eval()
    contract = bb.contract.with_classes(["a", "b", "c"])
    path = export_onnx(bb.model, contract, tmp_path / "m.onnx")
    assert read_contract(path) == contract
    x = preprocess(jpeg_bytes("green", 3, (300, 200)), contract)[None]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, np.concatenate([x, x, x])):  # the batch axis is dynamic
        onnx_probs = sess.run(["probs"], {"input": batch})[0]
        with torch.no_grad():
            torch_probs = bb.model(torch.from_numpy(batch)).softmax(1).numpy()
        assert np.abs(onnx_probs - torch_probs).max() <= 1e-4


# --- full runs through the CLI --------------------------------------------------------------------

def test_train_feature_extraction_publishes_a_complete_version(refit_home, tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red", "blue", "green"), n=8)
    r = run_cli("train", data, "--strategy", "feature_extraction", "--parity-images", "2", "--json",
                home=refit_home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert {"version", "strategy", "val_accuracy", "train_seconds"} <= set(out)
    assert out["version"] == "v0001" and out["strategy"] == "feature_extraction" and out["promoted"]
    assert out["val_accuracy"] >= 0.8  # colour families are easy for ImageNet features
    entry = refit_home / "models" / "refit" / "v0001"
    for name in ("model.onnx", "metrics.json", "config.json", "dataset.json", "results.csv",
                 "confusion_matrix.png", "model.yaml"):
        assert (entry / name).is_file(), name
    metrics = json.loads((entry / "metrics.json").read_text())
    assert metrics["parity"]["passed"] and metrics["parity"]["max_abs_prob_diff"] <= 1e-4
    assert metrics["parity"]["images"] == 2  # the sample asked for, spread over the validation split
    assert set(metrics["per_class"]) == {"red", "blue", "green"}
    assert len(metrics["confusion_matrix"]) == 3 and metrics["history"]
    config = json.loads((entry / "config.json").read_text())
    assert config["strategy"] == "feature_extraction" and config["seed"] == 0
    assert read_contract(entry / "model.onnx").class_names == ("blue", "green", "red")
    # The CLI's predict runs the ONNX file.
    img = tmp_path / "q.jpg"
    img.write_bytes(jpeg_bytes("green", 777))
    p = run_cli("predict", img, "--json", home=refit_home)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)[0]["top_k"][0]["label"] == "green"
    # BentoML's own tooling sees the version.
    env = {**os.environ, "BENTOML_HOME": str(refit_home)}
    ls = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "models", "list", "-o", "json"],
                        capture_output=True, text=True, env=env)
    assert "refit:v0001" in ls.stdout, ls.stderr


def test_partial_unfreezes_the_last_stages_and_keeps_frozen_bn_in_eval():
    from training.finetune import STRATEGIES, apply_strategy, set_train_mode

    bb = create_backbone("efficientnet_lite0", num_classes=2)
    groups, summary = apply_strategy(bb, STRATEGIES["partial"], lr=1e-3, backbone_lr=1e-4, unfreeze_blocks=2,
                                     log=lambda m: None)
    assert summary["unfrozen_stages"] == ["_conv_head", "_bn1"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert not any(p.requires_grad for p in bb.model._blocks[0].parameters())
    set_train_mode(bb.model)
    assert not bb.model._bn0.training and bb.model._bn1.training


def test_partial_run_and_versions_promote_rollback(refit_home, tmp_path):
    data = make_dataset(tmp_path / "d", n=6, split=True)
    r = run_cli("train", data, "--strategy", "partial", "--epochs", "1", "--unfreeze-blocks", "2",
                "--promote", "false", "--json", home=refit_home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["strategy"] == "partial" and not out["promoted"]
    store = Store(refit_home)
    assert store.promoted() is None
    r2 = run_cli("train", data, "--strategy", "feature_extraction", "--json", home=refit_home)
    assert last_json(r2.stdout)["version"] == "v0002"
    assert store.promoted() == "v0002"
    assert run_cli("promote", "v0001", home=refit_home).returncode == 0
    assert store.promoted() == "v0001"
    rb = run_cli("rollback", home=refit_home)
    assert rb.returncode == 0 and store.promoted() == "v0002"
    assert [e["action"] for e in store.history()] == ["promote", "promote", "rollback"]
    bad = run_cli("promote", "v0099", home=refit_home)
    assert bad.returncode == 2 and "unknown version 'v0099'" in bad.stderr
    listing = run_cli("versions", "--json", home=refit_home)
    rows = json.loads(listing.stdout)
    assert [r["version"] for r in rows] == ["v0001", "v0002"] and rows[1]["promoted"]


def test_one_class_folder_publishes_nothing(refit_home, tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red",))
    r = run_cli("train", data, home=refit_home)
    assert r.returncode == 2 and "at least 2 class folders" in r.stderr
    assert Store(refit_home).versions() == []


def test_corrupted_version_file_is_never_promoted(refit_home, tmp_path):
    data = make_dataset(tmp_path / "d", n=5)
    assert run_cli("train", data, "--strategy", "feature_extraction", "--promote", "false",
                   home=refit_home).returncode == 0
    store = Store(refit_home)
    onnx_file = refit_home / "models" / "refit" / "v0001" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.promote("v0001")
    assert store.promoted() is None


def test_killed_run_leaves_no_partial_version(refit_home, tmp_path):
    data = make_dataset(tmp_path / "d", n=6)
    env = {**os.environ, "REFIT_HOME": str(refit_home), "BENTOML_HOME": str(refit_home)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train", str(data), "--strategy", "full",
                             "--epochs", "50"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # Kill -9 once fine-tuning is under way (well before anything could be published).
    deadline = time.time() + 240
    seen = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "epoch 0" in line or "epoch 1/" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert "full" in seen, seen[-2000:]
    store = Store(refit_home)
    assert store.versions() == []
    # The next run publishes normally, as v0001.
    r = run_cli("train", data, "--strategy", "feature_extraction", "--json", home=refit_home)
    assert last_json(r.stdout)["version"] == "v0001"


def test_failed_publish_leaves_nothing(refit_home, tmp_path):
    store = Store(refit_home)
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")

    def boom(version):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.publish({"model.onnx": f}, {"strategy": "x"}, stamp=boom)
    assert store.versions() == []
    assert not list((refit_home / "models" / "refit").glob("v*"))


# --- the real dataset -----------------------------------------------------------------------------

def test_real_data_feature_extraction_reaches_093(refit_home, real_data, tmp_path):
    data = tmp_path / "hymenoptera"
    shutil.copytree(real_data, data)
    good = (data / "train" / "ants").glob("*.jpg").__next__().read_bytes()
    (data / "train" / "bees" / "corrupt.jpg").write_bytes(good[:2000])  # a corrupt JPEG is skipped
    r = run_cli("train", data, "--strategy", "feature_extraction", "--json", home=refit_home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["val_accuracy"] >= 0.93, out
    assert out["train_seconds"] < 60
    assert [Path(s["path"]).name for s in out["skipped"]] == ["corrupt.jpg"]
    assert "corrupt.jpg" in r.stderr
