"""Serving a multi-label version (issue 24, "Serving"): a real multi-label ONNX file made without torch (pooled
colour through a fixed linear layer and a sigmoid, per-label thresholds in its contract, a `features` output
and the matching cam.npz), published into a store and served by a real `bentoml serve`; beside it a
single-label version, whose replies keep their shape. The console's Try-it page in Chromium.

The three labels are the colour channels: a label's logit is SCALE x (the channel's mean - 0.5), so an
image's probabilities follow from its colour, and a solid colour can be put on either side of a threshold."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import console_page
from serving import AUTH, TOKEN, Server, predict, wait_serving

from core.contract import Contract
from core.store import Store, sha256_file

LABELS = ("red", "green", "blue")
THRESHOLDS = (0.9, 0.2, 0.6)  # red's high and green's low: one image is under red's and over green's
SCALE = 10.0
SIZE = 32  # the model's input; its feature map is SIZE / 4 on a side
TIMEOUT_MS = 60_000


def png(rgb, size=(48, 48), right=None) -> bytes:
    """A solid colour (exact: PNG keeps it), or with `right` its right half in that colour."""
    import io

    from PIL import Image

    a = np.empty((*size, 3), np.uint8)
    a[:] = rgb
    if right is not None:
        a[:, size[1] // 2:] = right
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def expected(rgb) -> np.ndarray:
    """The model's probabilities for a solid colour."""
    return sigmoid(SCALE * (np.asarray(rgb, np.float64) / 255.0 - 0.5))


def multilabel_model(folder: Path) -> dict[str, Path]:
    """model.onnx (probs = sigmoid of the pooled features through W, features = the input average-pooled 4 x 4)
    and cam.npz (W and the bias as the head: the class activation map's weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (SCALE * np.eye(3)).astype(np.float32)  # (channels, labels)
    b = np.full(3, -SCALE / 2, np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["features"], kernel_shape=[4, 4], strides=[4, 4]),
         helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["probs"])],
        "multilabel", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 3, SIZE // 4, SIZE // 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    contract = Contract(input_size=SIZE, resize_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                        class_names=LABELS, task="multi_label", thresholds=THRESHOLDS)
    helper.set_model_props(model, {"refit.contract": contract.to_json()})
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    np.savez(folder / "cam.npz", weight=w.T.copy(), bias=b)
    return {"model.onnx": folder / "model.onnx", "cam.npz": folder / "cam.npz"}


def single_label_model(folder: Path) -> dict[str, Path]:
    """The same colours as one answer each: a softmax over the same logits, no thresholds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (SCALE * np.eye(3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "single", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    contract = Contract(input_size=SIZE, resize_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                        class_names=LABELS)
    helper.set_model_props(model, {"refit.contract": contract.to_json()})
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return {"model.onnx": folder / "model.onnx"}


# What training writes into a multi-label version's metrics.json (issue 24, "Figures"); the Versions page reads it.
METRICS = {"val_accuracy": 0.5, "map": 0.81, "micro_f1": 0.7, "macro_f1": 0.66, "subset_accuracy": 0.5,
           "per_label": {name: {"ap": 0.8 + i / 100, "precision": 0.7, "recall": 0.6 + i / 10, "f1": 0.65,
                                "threshold": t, "support": 10 + i}
                         for i, (name, t) in enumerate(zip(LABELS, THRESHOLDS, strict=True))}}


def publish(store: Store, files: dict[str, Path], metrics: dict, task: str) -> str:
    sha = sha256_file(files["model.onnx"])
    path = files["model.onnx"].parent / "metrics.json"
    path.write_text(json.dumps(metrics))
    return store.publish({**files, "metrics.json": path},
                         {"strategy": "feature_extraction", "onnx_sha256": sha, "serving_file": "model.onnx",
                          "serving_sha256": sha, "classes": list(LABELS), "task": task})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """v0001 single-label, v0002 multi-label (promoted), captures on."""
    root = tmp_path_factory.mktemp("multilabel")
    store = Store(root / "home")
    single = publish(store, single_label_model(root / "single"), {"val_accuracy": 0.9}, "single_label")
    multi = publish(store, multilabel_model(root / "multi"), METRICS, "multi_label")
    assert (single, multi) == ("v0001", "v0002")
    store.promote(multi, actor="test")
    (root / "data").mkdir()
    srv = Server(root / "home", root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0", "REFIT_CAPTURE": "1"})
    srv.start()
    yield srv
    srv.stop()


def scored(items) -> dict[str, float]:
    return {x["label"]: x["score"] for x in items}


# --- replies -------------------------------------------------------------------------------------------

def test_labels_over_each_labels_own_threshold_from_the_model_file(http):
    """Red at 0.80 is under its 0.9, green at 0.30 over its 0.2: the reply names green alone."""
    rgb = (163, 106, 20)
    p = expected(rgb)
    assert p[0] < THRESHOLDS[0] and p[1] > THRESHOLDS[1] and p[2] < THRESHOLDS[2] and p[0] > p[1]
    r = predict(http, ("mixed.png", png(rgb)), top_k=3)
    assert r.status_code == 200, r.text
    (item,) = r.json()
    assert set(item) == {"label", "score", "top_k", "version", "labels", "prediction_id"}
    assert item["version"] == "v0002" and len(item["prediction_id"]) == 24
    assert [x["label"] for x in item["labels"]] == ["green"]
    assert item["labels"][0]["score"] == pytest.approx(p[1], abs=2e-3)
    # The best label of the answer is the best of those over their threshold, with its score.
    assert item["label"] == "green" and item["score"] == pytest.approx(p[1], abs=2e-3)
    assert [x["label"] for x in item["top_k"]] == ["red", "green", "blue"]  # the scores, whatever the thresholds
    assert scored(item["top_k"]) == pytest.approx(dict(zip(LABELS, p, strict=True)), abs=2e-3)


def test_several_labels_sorted_by_score_and_none_of_them(http):
    both = predict(http, ("yellow.png", png((240, 200, 10))), ("black.png", png((5, 5, 5)))).json()
    assert [x["label"] for x in both[0]["labels"]] == ["red", "green"]
    assert both[0]["labels"][0]["score"] >= both[0]["labels"][1]["score"] and both[0]["label"] == "red"
    # No label over its threshold: an empty list, and "unknown" with the top score.
    assert both[1]["labels"] == [] and both[1]["label"] == "unknown"
    assert both[1]["score"] == pytest.approx(float(expected((5, 5, 5)).max()), abs=2e-3)


def test_the_requests_threshold_overrides_every_labels(http):
    rgb = (163, 106, 20)
    half = predict(http, ("mixed.png", png(rgb)), threshold=0.5).json()[0]
    assert [x["label"] for x in half["labels"]] == ["red"] and half["label"] == "red"
    low = predict(http, ("mixed.png", png(rgb)), threshold=0.01).json()[0]
    assert [x["label"] for x in low["labels"]] == ["red", "green", "blue"]
    # JSON clients: the same rule, and the same answer without a threshold.
    import base64

    body = {"images": [{"data": base64.b64encode(png(rgb)).decode(), "name": "mixed.png"}]}
    given = http.post("/predict_base64", json={**body, "threshold": 0.5}).json()[0]
    assert [x["label"] for x in given["labels"]] == ["red"]
    default = http.post("/predict_base64", json=body).json()[0]
    assert [x["label"] for x in default["labels"]] == ["green"]
    assert predict(http, ("mixed.png", png(rgb)), threshold=1.5).status_code == 400


def test_explain_a_named_label_of_a_multilabel_version(http):
    """Red on the left, blue on the right: each label's map peaks on its own half; the answer part is the
    multi-label one."""
    data = png((230, 20, 20), right=(20, 20, 230))
    for label, left in (("red", True), ("blue", False)):
        r = http.post("/explain", files={"image": ("halves.png", data, "image/png")}, data={"label": label})
        assert r.status_code == 200, r.text
        e = r.json()
        assert e["explained"] == label and (e["peak"]["x"] < 0.5) == left, e["peak"]
        assert len(e["heatmap"]) == SIZE // 4 and len(e["heatmap"][0]) == SIZE // 4
        assert e["version"] == "v0002" and "labels" in e
        assert e["explained_score"] == pytest.approx(scored(e["top_k"])[label], abs=1e-6)
    r = http.post("/explain", files={"image": ("halves.png", data, "image/png")}, data={"label": "purple"})
    assert r.status_code == 422 and r.json()["classes"] == list(LABELS)


def test_the_version_detail_carries_the_thresholds_and_per_label_figures(http):
    d = http.get("/versions/v0002").json()
    assert d["task"] == "multi_label" and d["thresholds"] == pytest.approx(dict(zip(LABELS, THRESHOLDS, strict=True)))
    assert d["map"] == 0.81 and d["per_label"]["green"]["threshold"] == 0.2
    assert "task" not in http.get("/versions/v0001").json()


# --- feedback ------------------------------------------------------------------------------------------

def captured(server, prediction_id: str, timeout: float = 10) -> dict:
    path = server.home / "captures" / f"{prediction_id}.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            return json.loads(path.read_text())
        time.sleep(0.1)
    pytest.fail(f"capture {prediction_id} was not written")


def test_feedback_with_several_labels(http, server):
    p = predict(http, ("mixed.png", png((163, 106, 20)))).json()[0]
    record = captured(server, p["prediction_id"])
    assert [x["label"] for x in record["labels"]] == ["green"]
    pid = p["prediction_id"]
    # One label alone is a single-label version's feedback; an unknown label is refused by name.
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "label": "red"})
    assert r.status_code == 422 and '"labels"' in r.json()["error"], r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": ["red", "purple"]})
    assert r.status_code == 422 and "'purple'" in r.json()["error"], r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": ["red", "green"], "label": "red"})
    assert r.status_code == 422 and "send either" in r.json()["error"], r.text
    # The person says: red and green. Recorded on the capture (the version has no dataset of its own).
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": ["red", "green", "red"]})
    assert r.status_code == 200, r.text
    fb = r.json()
    assert fb["labels"] == ["green", "red"] and fb["predicted"] == ["green"] and not fb["added"]
    assert fb["dataset"] is None and fb["snapshot"] is None
    assert captured(server, pid)["feedback"]["labels"] == ["green", "red"]
    # Into a dataset: a misspelt one is refused, a new one is started with "create" and holds the labels.
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": ["red"], "dataset": "colours"})
    assert r.status_code == 404 and "create" in r.json()["error"], r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": ["green", "red"],
                                                   "dataset": "colours", "create": True})
    assert r.status_code == 200 and r.json()["added"] and not r.json()["relabelled"], r.text
    shown = http.get("/datasets/colours", headers=AUTH).json()
    assert shown["classes"] == {"green": 1, "red": 1} and shown["task"] == "multi_label" and shown["negatives"] == 0
    # None of them: an answer too, which relabels the image there.
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": [], "dataset": "colours"})
    assert r.status_code == 200 and r.json()["relabelled"] and r.json()["labels"] == [], r.text
    shown = http.get("/datasets/colours", headers=AUTH).json()
    assert shown["images"] == 1 and shown["classes"] == {} and shown["negatives"] == 1
    kept = captured(server, pid)["feedback"]
    assert kept["labels"] == [] and kept["dataset"] == "colours" and kept["snapshot"] == r.json()["snapshot"]
    # A dataset of one class per image takes no list of labels: it would make its next version multi-label.
    r = http.post("/datasets/plain/images", headers=AUTH, data={"label": "red"},
                  files=[("images", ("p.png", png((201, 31, 31)), "image/png"))])
    assert r.status_code == 200, r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "labels": ["red"], "dataset": "plain"})
    assert r.status_code == 422 and "single-label" in r.json()["error"], r.text


# --- a single-label version beside it: replies as they always were --------------------------------------

def test_a_single_label_versions_reply_has_no_labels_key(http):
    r = http.post("/promote", json={"version": "v0001", "reason": "single-label again"}, headers=AUTH)
    assert r.status_code == 200, r.text
    try:
        wait_serving(http, "v0001", timeout=30)
        item = predict(http, ("mixed.png", png((163, 106, 20))), top_k=2).json()[0]
        assert set(item) == {"label", "score", "top_k", "version", "prediction_id"}, item
        assert item["label"] == "red" and item["version"] == "v0001" and len(item["top_k"]) == 2
        best = item["score"]
        assert predict(http, ("mixed.png", png((163, 106, 20))), threshold=min(1.0, best + 1e-3)).json()[0][
            "label"] == "unknown"
        e = http.post("/explain", files={"image": ("m.png", png((163, 106, 20)), "image/png")})
        assert e.status_code == 409 and "labels" not in e.json()  # no feature map: as before
    finally:
        r = http.post("/promote", json={"version": "v0002", "reason": "back"}, headers=AUTH)
        assert r.status_code == 200, r.text
        wait_serving(http, "v0002", timeout=30)


def test_the_openapi_page_describes_the_labels(http):
    spec = http.get("/docs.json").json()
    props = spec["components"]["schemas"]["Prediction"]["properties"]
    assert "labels" in props and "Multi-label versions only" in json.dumps(props["labels"])
    # The request's threshold is optional: not given, a multi-label version keeps each label's own.
    threshold = spec["components"]["schemas"]["PredictBase64Input"]["properties"]["threshold"]
    assert "each label's own" in json.dumps(threshold), threshold


# --- the console in Chromium ----------------------------------------------------------------------------

@pytest.fixture
def page(browser, server, tmp_path):
    with console_page(browser, server.url, tmp_path, timeout_ms=TIMEOUT_MS) as pg:
        yield pg


def chips(page) -> list[str]:
    return [c.get_attribute("data-label") for c in page.query_selector_all("[data-testid=labels] .chip")]


def test_try_it_shows_the_label_set_and_per_label_threshold_sliders(page, tmp_path):
    image = tmp_path / "mixed.png"
    image.write_bytes(png((163, 106, 20)))
    page.goto("/ui/")
    page.wait_for_selector("#label-thresholds input[type=range]")
    # One slider per label, at the model's thresholds.
    values = {s.get_attribute("data-label"): float(s.input_value())
              for s in page.query_selector_all("#label-thresholds input[type=range]")}
    assert values == pytest.approx(dict(zip(LABELS, THRESHOLDS, strict=True)))
    page.set_input_files("#files", str(image))
    page.wait_for_selector("[data-testid=labels]")
    assert chips(page) == ["green"] and page.text_content("[data-testid=answer]") == "green"
    assert "30" in page.text_content("[data-testid=labels] .chip")  # its score, as a percentage
    # Every label's score came back (top_k = the number of labels), so a slider re-filters here.
    assert page.locator(".bars li").count() == 3
    page.fill("#label-thresholds input[data-label=red]", "0.5")
    page.dispatch_event("#label-thresholds input[data-label=red]", "input")
    assert chips(page) == ["red", "green"] and page.text_content("[data-testid=answer]") == "red"
    page.fill("#label-thresholds input[data-label=green]", "0.95")
    page.dispatch_event("#label-thresholds input[data-label=green]", "input")
    assert chips(page) == ["red"]
    page.fill("#label-thresholds input[data-label=red]", "0.99")
    page.dispatch_event("#label-thresholds input[data-label=red]", "input")
    assert chips(page) == [] and page.text_content("[data-testid=answer]") == "unknown"
    assert "none of the labels" in page.text_content("[data-testid=labels]")


def test_versions_page_shows_per_label_figures(page):
    page.goto("/ui/#versions")
    page.click("button[aria-label='Details of v0002']")
    table = page.wait_for_selector("#per-label")
    text = table.inner_text()
    for name in LABELS:
        assert name in text
    assert "0.900" in text and "0.200" in text  # the thresholds
    assert "0.810" in page.text_content("#multi-label-summary")  # mAP


def use_token(page) -> None:
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-state:has-text('token set')")


def test_data_page_sends_several_labels_in_one_click(page, http, server):
    """A multi-label version's suggested capture: a checkbox per label, the answered ones ticked, one send;
    the image joins the dataset with those labels."""
    r = http.post("/datasets/paints/images", headers=AUTH, data={"labels": "red"},
                  files=[("images", (f"r{i}.png", png((200 + i, 30, 30)), "image/png")) for i in range(2)])
    assert r.status_code == 200, r.text
    pid = predict(http, ("orange.png", png((240, 200, 10)))).json()[0]["prediction_id"]
    captured(server, pid)
    page.goto("/ui/#data")
    use_token(page)
    section = page.locator("section.dataset[data-dataset=paints]")
    section.locator("button:has-text('Suggest images for paints')").click()
    card = section.locator(".suggest .card").filter(has_text="orange.png")
    card.locator("input[type=checkbox]").first.wait_for()
    ticked = {b.get_attribute("value"): b.is_checked() for b in card.locator("input[type=checkbox]").all()}
    assert ticked == {"red": True, "green": True, "blue": False}, ticked
    card.locator("input[value=green]").uncheck()
    card.locator("input[value=blue]").check()
    card.locator("button:has-text('Send labels')").click()
    done = card.locator("[role=status]:has-text('orange.png labelled blue, red')")
    done.wait_for()
    assert captured(server, pid)["feedback"]["labels"] == ["blue", "red"]
    shown = http.get("/datasets/paints", headers=AUTH).json()
    assert shown["classes"] == {"blue": 1, "red": 3} and shown["snapshot"] in done.text_content()
