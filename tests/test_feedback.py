"""The data loop over HTTP on the embedded default: a real `bentoml serve` with capture on, a dataset made by
upload, a retrain from it, predictions with ids, feedback that grows the dataset, and suggestions ordered by
the model's doubt. Tests run in file order and share the server."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from serving import AUTH, COLOURS, Server, copy_store, dataset_files, predict, solid, wait_serving

PURPLE = (130, 40, 130)  # halfway between the two colours: the model cannot be sure


@pytest.fixture(scope="module")
def server(tmp_path_factory, imagenet_store):
    root = tmp_path_factory.mktemp("refit-feedback")
    copy_store(imagenet_store, root / "home")
    srv = Server(root / "home", root / "data", root / "serve.log",
                 env={"REFIT_CAPTURE": "1", "REFIT_CAPTURE_MAX_IMAGES": "40"})
    srv.start()
    yield srv
    srv.stop()


def _captured(home: Path) -> list[Path]:
    return sorted((home / "captures").glob("*.json"))


def _wait_capture(home: Path, prediction_id: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not (home / "captures" / f"{prediction_id}.json").exists():
        assert time.time() < deadline, f"{prediction_id} was not captured in {timeout}s"
        time.sleep(0.1)


def _wait_captured(home: Path, n: int, timeout: float = 30) -> list[Path]:
    deadline = time.time() + timeout
    while len(_captured(home)) < n and time.time() < deadline:
        time.sleep(0.1)
    return _captured(home)


def test_dataset_retrain_predict_feedback_loop(http, server):
    files = dataset_files(per_class=8)
    for cls in COLOURS:
        r = http.post("/datasets/colours/images", headers=AUTH, data={"label": cls},
                      files=[("images", (n.split("/")[1], d, "image/jpeg")) for n, d in files.items()
                             if n.startswith(cls)])
        assert r.status_code == 200, r.text
    r = http.post("/retrain", headers=AUTH, json={"dataset": "colours", "strategy": "feature_extraction",
                                                  "head_epochs": 60})
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    wait_serving(http, version, timeout=30)

    r = predict(http, ("red.jpg", solid(COLOURS["red"], seed=900)))
    assert r.status_code == 200, r.text
    [p] = r.json()
    assert p["label"] == "red" and p["version"] == version and len(p["prediction_id"]) == 24
    _wait_capture(server.home, p["prediction_id"])

    before = http.get("/datasets/colours", headers=AUTH).json()
    # The customer says this one is blue after all: the image joins the dataset under that label.
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": p["prediction_id"], "label": "blue"})
    assert r.status_code == 200, r.text
    fb = r.json()
    assert fb["dataset"] == "colours" and fb["label"] == "blue" and fb["predicted"] == "red" and fb["added"]
    after = http.get("/datasets/colours", headers=AUTH).json()
    assert fb["snapshot"] != before["snapshot"] and after["snapshot"] == fb["snapshot"]
    assert after["classes"]["blue"] == before["classes"]["blue"] + 1
    assert after["classes"]["red"] == before["classes"]["red"]
    # Confirming it again changes nothing: the same image with the same label is one entry.
    again = http.post("/feedback", headers=AUTH, json={"prediction_id": p["prediction_id"], "label": "blue"}).json()
    assert again["snapshot"] == fb["snapshot"] and not again["added"] and not again["relabelled"]
    # A correction of that correction relabels the image (a new snapshot; the old one stays).
    fixed = http.post("/feedback", headers=AUTH, json={"prediction_id": p["prediction_id"], "label": "red"}).json()
    assert fixed["relabelled"] and fixed["snapshot"] != fb["snapshot"]

    # The next version is trained on the grown dataset and says so; its report and the drift figure are there.
    r = http.post("/retrain", headers=AUTH, json={"dataset": "colours", "strategy": "feature_extraction",
                                                  "head_epochs": 60})
    assert r.status_code == 200, r.text
    grown = r.json()["version"]
    detail = http.get(f"/versions/{grown}").json()
    assert detail["lineage"] == {"dataset": "colours", "snapshot": fixed["snapshot"]}, detail
    assert detail["label_problems"]["available"] and detail["near_duplicates"]["count"] >= 0, detail
    assert http.get(f"/versions/{version}").json()["lineage"]["snapshot"] == before["snapshot"]
    wait_serving(http, grown, timeout=30)
    assert predict(http, ("red.jpg", solid(COLOURS["red"], seed=902))).status_code == 200
    drift = {v["version"]: v for v in http.get("/drift").json()["versions"]}
    assert grown in drift, drift


def test_feedback_errors_are_named(http, server):
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": "0" * 24, "label": "red"})
    assert r.status_code == 404 and "unknown or expired prediction_id" in r.json()["error"], r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": "not-an-id", "label": "red"})
    assert r.status_code == 404, r.text
    [p] = predict(http, ("r.jpg", solid(COLOURS["red"], seed=901))).json()
    _wait_capture(server.home, p["prediction_id"])
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": p["prediction_id"], "label": "green"})
    assert r.status_code == 422 and "'green' is not a class of dataset 'colours'" in r.json()["error"], r.text
    r = http.post("/feedback", json={"prediction_id": p["prediction_id"], "label": "red"})
    assert r.status_code == 401, r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": p["prediction_id"], "label": "red",
                                                   "dataset": "nope"})
    # A dataset that does not exist yet is refused (a misspelling would start one), unless asked for.
    assert r.status_code == 404 and "no dataset 'nope'" in r.json()["error"], r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": p["prediction_id"], "label": "red",
                                                   "dataset": "nope", "create": True})
    assert r.status_code == 200 and r.json()["dataset"] == "nope", r.text


def test_suggest_puts_the_images_the_model_doubts_first(http, server):
    clear = [("r%d.jpg" % i, solid(COLOURS["red"], seed=950 + i)) for i in range(4)]
    clear += [("b%d.jpg" % i, solid(COLOURS["blue"], seed=960 + i)) for i in range(4)]
    doubtful = [("purple%d.jpg" % i, solid(PURPLE, seed=970 + i)) for i in range(3)]
    for item in clear + doubtful:
        assert predict(http, item).status_code == 200
    _wait_captured(server.home, 15)
    r = http.get("/datasets/colours/suggest", params={"n": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    s = r.json()
    names = [x["name"] for x in s["suggestions"]]
    margins = [x["margin"] for x in s["suggestions"]]
    assert len(names) == 5 and margins == sorted(margins)
    assert {n for n in names[:3]} == {"purple0.jpg", "purple1.jpg", "purple2.jpg"}, s["suggestions"]
    # The image behind a suggestion, for a person to look at.
    img = http.get(s["suggestions"][0]["image"], headers=AUTH)
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert http.get("/datasets/none-such/suggest", headers=AUTH).status_code == 404


def test_capture_keeps_at_most_the_limit(http, server):
    first = sorted(p.stem for p in _captured(server.home))[:5]
    for i in range(50):
        assert predict(http, ("x%d.jpg" % i, solid(COLOURS["blue"], seed=1000 + i))).status_code == 200
    # Each worker runs a retention pass when its captures pause for two seconds.
    deadline = time.time() + 60
    while len(_captured(server.home)) != 40 and time.time() < deadline:
        time.sleep(0.5)
    left = {p.stem for p in _captured(server.home)}
    assert len(left) == 40 and len(list((server.home / "captures").glob("*.img"))) == 40
    assert not left & set(first), "the oldest captures go first"
