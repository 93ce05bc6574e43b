"""Explanations (issue 13, "Explanations"): class activation maps from the model file's `features` output and
the version's `cam.npz`, computed in numpy, over a real `bentoml serve` (POST /explain) and the real CLI
(`refit explain`). The model is the bootstrap EfficientNet-Lite0 with its ImageNet head, whose classes
include `ant` and `bee`; an older version without the feature-map output stands beside it.

The figure: on 20 hymenoptera validation photos with boxes drawn by hand around the insect
(tests/fixtures/insect_boxes.json), how often the map's peak for `ant` / `bee` falls inside the box, against
the chance that a random point of the crop does."""
from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import run_cli
from PIL import Image, ImageOps
from serving import AUTH, Server, copy_store, predict, wait_serving

BOXES = json.loads((Path(__file__).parent / "fixtures" / "insect_boxes.json").read_text())["boxes"]
IMAGENET = {"ants": "ant", "bees": "bee"}  # the hymenoptera folders' ImageNet classes
ANT = "val/ants/157401988_d0564a9d02.jpg"  # a small ant on bare ground: the map must find it


def without_features(src: Path, dest: Path) -> Path:
    """The same model as a release before explanations exported it: no `features` output."""
    m = onnx.load(str(src))
    keep = [o for o in m.graph.output if o.name != "features"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, str(dest))
    return dest


@pytest.fixture(scope="module")
def store(imagenet_store, real_data, tmp_path_factory) -> Path:
    """v0001: the bootstrap ImageNet model (promoted), v0002: the same model without `features` or cam.npz,
    v0003: trained on hymenoptera (feature extraction; INT8 chosen for serving, as by default)."""
    from core.contract import Contract
    from core.store import Store
    from training.export import CONTRACT_KEY
    from training.pipeline import _publish

    root = tmp_path_factory.mktemp("explain-store")
    home = copy_store(imagenet_store, root / "home")
    v1 = home / "models" / "refit" / "v0001"
    old = without_features(v1 / "model.onnx", root / "model.onnx")
    contract = Contract.from_json({p.key: p.value for p in onnx.load(str(old)).metadata_props}[CONTRACT_KEY])
    version = _publish(Store(home), {"model.onnx": old}, contract,
                       {"strategy": "pretrained", "backbone": "efficientnet_lite0", "classes": ["<imagenet-1k>"],
                        "note": "exported before explanations"})
    assert version == "v0002"
    r = run_cli("train", real_data, "--strategy", "feature_extraction", "--parity-images", "4", "--promote", "false",
                "--json", home=home, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["version"] == "v0003"
    return home


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-server")
    home = root / "home"
    shutil.copytree(store, home)
    (root / "data").mkdir()
    srv = Server(home, root / "data", root / "serve.log", env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop()


def explain(http, data: bytes, name: str = "photo.jpg", **fields) -> httpx.Response:
    return http.post("/explain", files={"image": (name, data, "image/jpeg")},
                     data={k: str(v) for k, v in fields.items()})


def png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def test_bootstrap_version_has_the_feature_map_and_the_map_is_exact(store, real_data):
    """The exported file's `features` and cam.npz give back the model's own scores: the mean of the class
    activation map plus the bias is the logit (what makes the map an explanation of this model)."""
    import onnxruntime as ort

    from core.contract import Contract
    from core.preprocess import preprocess
    from service.explain import head_for
    from training.export import CONTRACT_KEY

    folder = store / "models" / "refit" / "v0001"
    m = onnx.load(str(folder / "model.onnx"))
    assert [o.name for o in m.graph.output] == ["probs", "embedding", "features"]
    contract = Contract.from_json({p.key: p.value for p in m.metadata_props}[CONTRACT_KEY])
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    head = head_for("v0001", sess, folder)
    assert head.weight.shape == (1000, 1280) and head.bias.shape == (1000,)
    x = preprocess(real_data / ANT, contract)[None]
    probs, emb, feats = sess.run(["probs", "embedding", "features"], {"input": x})
    assert feats.shape == (1, 1280, 7, 7)
    np.testing.assert_allclose(feats.mean((2, 3)), emb, atol=1e-4)
    logits = np.einsum("kc,chw->khw", head.weight, feats[0]).mean((1, 2)) + head.bias
    mine = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(mine, probs[0], atol=1e-5)


def test_heads_that_are_not_linear_on_the_pooled_map_export_no_feature_map(tmp_path):
    """MobileNetV3's head has a hidden layer after the pooling: no exact map, so no `features` output and no
    cam.npz (such a version answers /explain with the clear 409); EfficientNet-Lite0's head is linear on it."""
    from core.contract import Contract
    from training.export import CAM_FILE, cam_head, export_onnx
    from training.registry import create_backbone

    mobile = create_backbone("mobilenet_v3_large", num_classes=3, pretrained=False)
    assert cam_head(mobile.model, mobile.classifier, 96) is None
    lite = create_backbone("efficientnet_lite0", num_classes=3, pretrained=False)
    contract = Contract(input_size=96, resize_size=110, class_names=("a", "b", "c"))
    for name in ("mobile", "lite"):
        (tmp_path / name).mkdir()
    path = export_onnx(mobile.model, contract, tmp_path / "mobile" / "model.onnx", classifier=mobile.classifier)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["probs", "embedding"]
    assert not (path.parent / CAM_FILE).exists()
    path = export_onnx(lite.model, contract, tmp_path / "lite" / "model.onnx", classifier=lite.classifier)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["probs", "embedding", "features"]
    with np.load(path.parent / CAM_FILE) as z:
        assert z["weight"].shape == (3, 1280) and z["bias"].shape == (3,)


def test_explain_an_ant_photo(http, real_data):
    data = (real_data / ANT).read_bytes()
    r = explain(http, data, "ant.jpg", top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    # The top-k as /predict answers it, and the version that answered.
    p = predict(http, ("ant.jpg", data), top_k=3).json()[0]
    assert body["version"] == p["version"] == "v0001"
    assert [t["label"] for t in body["top_k"]] == [t["label"] for t in p["top_k"]]
    np.testing.assert_allclose([t["score"] for t in body["top_k"]], [t["score"] for t in p["top_k"]], atol=1e-4)
    assert body["label"] == "ant" and body["explained"] == "ant"
    assert body["explained_score"] == pytest.approx(body["score"])
    heat = np.array(body["heatmap"])
    assert heat.shape == (7, 7) and heat.min() == 0.0 and heat.max() == 1.0
    im = png(body["overlay_png"])
    assert im.size == (224, 224) and im.mode == "RGB"
    assert 0 < body["peak"]["x"] < 1 and 0 < body["peak"]["y"] < 1
    # 500 x 375, resized to 341 x 256: the 224 x 224 crop at (58, 16)
    assert body["crop"] == pytest.approx({"left": 58 / 341, "top": 16 / 256, "width": 224 / 341,
                                          "height": 224 / 256}, abs=1e-6)


def test_explain_is_on_the_openapi_page(http):
    spec = http.get("/docs.json").json()
    op = spec["paths"]["/explain"]["post"]
    assert "class activation map" in op["description"]
    assert "image" in json.dumps(op["requestBody"]) and "overlay_png" in json.dumps(spec)


def test_explain_a_chosen_label(http, real_data):
    data = (real_data / ANT).read_bytes()
    ant = explain(http, data).json()
    bee = explain(http, data, label="bee")
    assert bee.status_code == 200, bee.text
    bee = bee.json()
    assert bee["explained"] == "bee" and bee["label"] == "ant"  # the answer is the same; the map is for bee
    assert bee["explained_score"] < ant["explained_score"]
    assert bee["heatmap"] != ant["heatmap"]


def test_unknown_label_is_a_422_listing_the_classes(http, real_data):
    r = explain(http, (real_data / ANT).read_bytes(), label="ants")
    assert r.status_code == 422, r.text
    body = r.json()
    assert "'ants' is not a class of this version" in body["error"] and "tench" in body["error"]
    assert len(body["classes"]) == 1000 and "ant" in body["classes"]


def test_bad_requests_get_the_errors_predict_gives(http, real_data):
    data = (real_data / ANT).read_bytes()
    r = http.post("/explain", json={"image": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = http.post("/explain", files={"images": ("a.jpg", data, "image/jpeg")})
    assert r.status_code == 400 and "unknown form field(s) ['images']" in r.json()["error"]
    two = [("image", (f"{n}.jpg", data, "image/jpeg")) for n in "ab"]
    r = http.post("/explain", files=two)
    assert r.status_code == 400 and "exactly one image" in r.json()["error"]
    r = http.post("/explain", files={"image": (None, "https://example.com/a.jpg")})  # a text part, no file
    assert r.status_code == 400 and "not a file upload" in r.json()["error"]
    r = explain(http, b"not an image at all", "notes.txt")
    assert r.status_code == 400 and r.json()["error"].startswith("notes.txt: not an image")
    r = explain(http, data, top_k=0)
    assert r.status_code == 400 and "top_k" in r.json()["error"]
    r = explain(http, data, label="  ")
    assert r.status_code == 400 and "label" in r.json()["error"]


def test_a_version_without_the_feature_map_gets_a_clear_409(http):
    from serving import photo

    r = http.post("/promote", json={"version": "v0002", "reason": "explain test"}, headers=AUTH)
    assert r.status_code == 200, r.text
    try:
        wait_serving(http, "v0002")
        r = explain(http, photo("coffee"))
        assert r.status_code == 409, r.text
        assert r.json()["error"] == ("v0002 has no feature-map output (it was exported before explanations); "
                                     "retrain to get explanations")
        assert predict(http, ("coffee.jpg", photo("coffee"))).status_code == 200  # it still serves
    finally:
        assert http.post("/promote", json={"version": "v0001"}, headers=AUTH).status_code == 200
        wait_serving(http, "v0001")


def test_cli_writes_the_heatmap_png(store, real_data, tmp_path):
    home = copy_store(store, tmp_path / "home")
    out = tmp_path / "heatmap.png"
    r = run_cli("explain", real_data / ANT, "-o", out, "--json", home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["explained"] == "ant" and result["version"] == "v0001" and result["overlay"] == str(out)
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (224, 224)
    r = run_cli("explain", real_data / ANT, "--label", "bee", home=home)
    assert r.returncode == 0 and "explained bee" in r.stdout and len(r.stdout.strip().splitlines()) == 9
    r = run_cli("explain", real_data / ANT, "--version", "v0002", home=home)
    assert r.returncode == 2 and "no feature-map output" in r.stderr and "retrain" in r.stderr
    r = run_cli("explain", real_data / ANT, "--label", "ants", home=home)
    assert r.returncode == 2 and "'ants' is not a class" in r.stderr


def peak_in_box(reply: dict, box: list[int], size: tuple[int, int]) -> tuple[bool, float]:
    """Whether the map's peak falls in the box, and the chance that a random point of the crop does."""
    w, h = size
    c = reply["crop"]
    x = (c["left"] + reply["peak"]["x"] * c["width"]) * w
    y = (c["top"] + reply["peak"]["y"] * c["height"]) * h
    x0, y0, x1, y1 = box
    inside = x0 <= x <= x1 and y0 <= y <= y1
    cl, ct, cr, cb = c["left"] * w, c["top"] * h, (c["left"] + c["width"]) * w, (c["top"] + c["height"]) * h
    overlap = max(0.0, min(x1, cr) - max(x0, cl)) * max(0.0, min(y1, cb) - max(y0, ct))
    return inside, overlap / ((cr - cl) * (cb - ct))


def off_centre(data: bytes, box: list[int], margin: float = 0.25):
    """The photo cut so that the insect sits towards a corner, away from the centre of the crop the model
    sees: (JPEG bytes, the box in it, its size), or None where that cannot be done with most of the insect
    still in the crop. Photographers centre their subject (the crop's centre lies in 18 of the 20 boxes), so
    a map that always peaked in the middle would score well on the photos alone; here it scores nothing."""
    from core.contract import Contract
    from service.explain import crop_fractions

    contract = Contract(input_size=224, resize_size=256)  # EfficientNet-Lite0's crop fraction
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    # Cut just past the box on the side it leans to; keep the image on the other side.
    left, right = (0, min(w, x1 + mx)) if x0 + x1 >= w else (max(0, x0 - mx), w)
    top, bottom = (0, min(h, y1 + my)) if y0 + y1 >= h else (max(0, y0 - my), h)
    left, top, right, bottom = (int(round(v)) for v in (left, top, right, bottom))
    new = [x0 - left, y0 - top, x1 - left, y1 - top]
    size = (right - left, bottom - top)
    c = crop_fractions(size, contract)
    crop = (c["left"] * size[0], c["top"] * size[1], (c["left"] + c["width"]) * size[0],
            (c["top"] + c["height"]) * size[1])
    centre = ((crop[0] + crop[2]) / 2, (crop[1] + crop[3]) / 2)
    if new[0] <= centre[0] <= new[2] and new[1] <= centre[1] <= new[3]:
        return None
    seen = max(0, min(new[2], crop[2]) - max(new[0], crop[0])) * max(0, min(new[3], crop[3]) - max(new[1], crop[1]))
    if seen < 0.5 * (new[2] - new[0]) * (new[3] - new[1]):
        return None
    buf = io.BytesIO()
    im.crop((left, top, right, bottom)).save(buf, "JPEG", quality=95)
    return buf.getvalue(), new, size


def cases(real_data: Path) -> list[tuple[str, str, bytes, list[int], tuple[int, int]]]:
    """(set, label, image bytes, box, size): the 20 photos, then those of them that can be cut off-centre."""
    photos = [("photos", b["label"], (real_data / b["photo"]).read_bytes(), b["box"], tuple(b["size"])) for b in BOXES]
    cut = [off_centre(data, box) for _, _, data, box, _ in photos]
    return photos + [("off-centre", p[1], *c) for p, c in zip(photos, cut) if c is not None]


def score(replies: list[dict], cases: list[tuple], what: str) -> dict:
    """Per set: the share of peaks in the box, against the chance that a random point of the crop is in it."""
    out = {}
    for name in dict.fromkeys(c[0] for c in cases):
        pairs = [peak_in_box(r, c[3], c[4]) for r, c in zip(replies, cases) if c[0] == name]
        hits, chance = zip(*pairs)
        rate, baseline = float(np.mean(hits)), float(np.mean(chance))
        print(f"{what}, {name}: peak in the hand-drawn box {sum(hits)}/{len(hits)} = {rate:.2f}; a random point "
              f"of the crop {baseline:.2f}")
        assert rate > 0.5  # on the insect more often than not
        assert rate > baseline + 0.2  # and clearly more often than a point chosen at random
        out[name] = (rate, len(hits))
    assert out["off-centre"][1] >= 6  # enough photos can be cut for the second figure to mean something
    return out


def test_the_peak_falls_on_the_insect(http, real_data):
    """The ImageNet model over HTTP, explaining its classes `ant` and `bee`."""
    replies, todo = [], cases(real_data)
    for _, label, data, _, _ in todo:
        r = explain(http, data, "photo.jpg", label=IMAGENET[label])
        assert r.status_code == 200, r.text
        replies.append(r.json())
    score(replies, todo, "ImageNet v0001 over HTTP")


def test_a_version_trained_here_explains_its_classes(store, real_data):
    """The hymenoptera version, as the service opens it (its INT8 file: quantized features, FP32 head) and its
    FP32 file: the peak falls on the insect for `ants` and `bees`, and the two maps agree."""
    import onnxruntime as ort

    from core.store import Store
    from service.explain import explain_upload
    from service.model import open_version

    assert Store(store).info("v0003")["serving_file"] == "model.int8.onnx"
    model = open_version(Store(store), "v0003", threads=2)  # the file the service serves: INT8
    assert (model.folder / "cam.npz").is_file()
    fp32 = ort.InferenceSession(str(model.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    served, full, todo = [], [], cases(real_data)
    for _, label, data, _, _ in todo:
        served.append(explain_upload(model, "photo.jpg", data, label, max_pixels=50_000_000))
        full.append(explain_upload(replace(model, session=fp32), "photo.jpg", data, label, max_pixels=50_000_000))
    score(served, todo, "hymenoptera v0003, INT8")
    score(full, todo, "hymenoptera v0003, FP32")
    a, b = np.array([r["heatmap"] for r in served]), np.array([r["heatmap"] for r in full])
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
