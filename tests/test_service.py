"""The service over HTTP: a real `bentoml serve` (two model workers) on a free port, an empty store that the
service fills with the pretrained ImageNet model, real JPEG files, real retrains on a tiny dataset.

Tests run in file order and share the server: v0001 is the bootstrap model, the retrain test adds v0002,
the data_path test v0003. The last test kills the server mid-retrain and starts it again.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import (
    AUTH,
    COLOURS,
    REPO,
    Server,
    dataset_files,
    jpeg,
    make_zip,
    metric,
    photo,
    predict,
    solid,
    wait_serving,
    wait_task,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit-service")
    data_root = root / "data"
    for name, data in dataset_files().items():
        (data_root / "colours" / name).parent.mkdir(parents=True, exist_ok=True)
        (data_root / "colours" / name).write_bytes(data)
    srv = Server(root / "home", data_root, root / "serve.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- tests --------------------------------------------------------------------------------------------

def test_first_start_publishes_and_serves_the_imagenet_model(http):
    v = http.get("/versions").json()
    assert v["promoted"] == "v0001"
    assert [row["id"] for row in v["versions"]] == ["v0001"]
    assert v["versions"][0]["strategy"] == "pretrained" and v["versions"][0]["num_classes"] == 1000
    r = predict(http, ("chelsea.jpg", photo("chelsea")))
    assert r.status_code == 200, r.text
    [p] = r.json()
    assert set(p) == {"label", "score", "top_k", "version", "prediction_id"} and p["version"] == "v0001"
    assert len(p["top_k"]) == 5
    # skimage's Chelsea is a tabby cat: the ImageNet head must say so, through our decode and contract.
    assert any("cat" in t["label"].lower() or "tabby" in t["label"].lower() for t in p["top_k"][:3]), p


def test_predict_batch_keeps_order_and_options(http):
    images = [("coffee.jpg", photo("coffee")), ("chelsea.jpg", photo("chelsea")), ("rocket.jpg", photo("rocket"))]
    singles = [predict(http, im, top_k=3).json()[0] for im in images]
    r = predict(http, *images, top_k=3)
    assert r.status_code == 200, r.text
    batch = r.json()
    assert len(batch) == 3
    for one, many in zip(singles, batch):
        assert many["label"] == one["label"] and len(many["top_k"]) == 3
        assert abs(many["score"] - one["score"]) < 1e-4
        scores = [t["score"] for t in many["top_k"]]
        assert scores == sorted(scores, reverse=True) and many["score"] == scores[0]
    best = batch[1]["score"]
    assert predict(http, images[1], threshold=min(1.0, best + 1e-3)).json()[0]["label"] == "unknown"
    assert predict(http, images[1], threshold=best - 1e-3).json()[0]["label"] == batch[1]["label"]
    assert len(predict(http, images[1], top_k=1000).json()[0]["top_k"]) == 1000


def test_predict_base64_json_form(http):
    data = photo("coffee")
    multipart = predict(http, ("coffee.jpg", data), top_k=2).json()[0]
    r = http.post("/predict_base64", json={"images": [{"data": base64.b64encode(data).decode(), "name": "c.jpg"}],
                                           "top_k": 2})
    assert r.status_code == 200, r.text
    assert r.json()[0]["top_k"] == multipart["top_k"]


def test_concurrent_requests_are_batched_and_answered_correctly(http, server):
    images = [(f"c{i}.jpg", solid((i * 20 % 255, 100, 200 - i * 10), seed=i)) for i in range(24)]
    expected = [predict(http, im).json()[0] for im in images]
    start = threading.Barrier(len(images))

    def one(im):
        start.wait()  # all requests at once, so they queue up behind each other and get merged
        return predict(http, im)

    with ThreadPoolExecutor(len(images)) as pool:
        got = list(pool.map(one, images))
    assert all(r.status_code == 200 for r in got), [r.text for r in got if r.status_code != 200]
    for r, e in zip(got, expected):
        assert r.json()[0]["label"] == e["label"] and abs(r.json()[0]["score"] - e["score"]) < 1e-4
    text = http.get("/metrics").text
    total = metric(text, "refit_batch_size_count")  # onnxruntime runs, and how many held one image only
    singles = metric(text, "refit_batch_size_bucket", le="1.0")
    assert total and singles is not None and total > singles, "no batch ever held more than one request"


@pytest.mark.parametrize("case", ["not_image", "truncated", "unsupported", "bomb", "empty", "text_field",
                                  "bad_option", "json_to_multipart", "bad_base64", "too_many"])
def test_bad_predict_input_is_a_clear_4xx(http, case):
    good = ("ok.jpg", solid((10, 200, 10)))
    if case == "not_image":
        r, status, words = predict(http, good, ("notes.jpg", b"this is not an image")), 400, ["notes.jpg", "not an image"]
    elif case == "truncated":
        r, status, words = predict(http, ("half.jpg", photo("chelsea")[:3000])), 400, ["half.jpg"]
    elif case == "unsupported":
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "ICO")
        r, status, words = predict(http, ("icon.ico", buf.getvalue())), 400, ["icon.ico", "unsupported format"]
    elif case == "bomb":
        buf = io.BytesIO()
        Image.new("1", (9000, 9000)).save(buf, "PNG")  # 81 megapixels in a few kilobytes
        r, status, words = predict(http, ("bomb.png", buf.getvalue())), 400, ["bomb.png", "limit"]
    elif case == "empty":
        r, status, words = http.post("/predict", files={"top_k": (None, "3")}), 400, ["no images"]
    elif case == "text_field":
        r, status, words = http.post("/predict", files={"images": (None, "http://example.com/a.jpg")}), 400, ["text"]
    elif case == "bad_option":
        r, status, words = predict(http, good, top_k=0), 400, ["top_k"]
    elif case == "json_to_multipart":
        r, status, words = http.post("/predict", json={"images": []}), 415, ["multipart"]
    elif case == "bad_base64":
        r, status, words = http.post("/predict_base64", json={"images": [{"data": "%%%"}]}), 400, ["base64"]
    else:
        r, status, words = predict(http, *[good] * 17), 400, ["limit"]
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert all(w.lower() in message.lower() for w in words), message


def test_upload_over_the_size_limit_is_413(http):
    big = np.random.default_rng(0).integers(0, 255, (1400, 1400, 3))
    data = jpeg(big, quality=100)
    assert len(data) > 2 * 1024 * 1024
    r = predict(http, ("big.jpg", data))
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while streaming too
        yield b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 100_000
        yield b"\r\n--x--\r\n"

    r = http.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413, r.text
    assert predict(http, ("ok.jpg", solid((1, 2, 3)))).status_code == 200  # and the worker is fine


def test_token_guards_admin_routes_but_not_predict(http):
    assert http.post("/promote", json={"version": "v0001"}).status_code == 401
    assert http.post("/promote", json={"version": "v0001"},
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.post("/rollback", json={}).status_code == 401
    r = http.post("/retrain/submit", files={"dataset": ("d.zip", make_zip(dataset_files()))})
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert http.get("/jobs").status_code == 401
    assert predict(http, ("ok.jpg", solid((1, 2, 3)))).status_code == 200
    assert http.get("/versions").status_code == 200


def test_feedback_without_capture_says_how_to_turn_it_on(http, server):
    """Capture is off by default: a prediction still has an id, but nothing is kept for feedback."""
    [p] = predict(http, ("ok.jpg", solid((1, 2, 3)))).json()
    r = http.post("/feedback", json={"prediction_id": p["prediction_id"], "label": "x"}, headers=AUTH)
    assert r.status_code == 404 and "REFIT_CAPTURE=1" in r.json()["error"], r.text
    assert not (server.home / "captures").exists()


@pytest.mark.parametrize("case", ["zip_slip", "absolute", "not_zip", "not_dataset", "bad_field", "unknown_field",
                                  "weights", "no_dataset", "outside_root", "too_big"])
def test_bad_retrain_requests_are_refused_at_submit(http, case):
    ds = make_zip(dataset_files())
    data, files = {}, {"dataset": ("d.zip", ds)}
    if case == "zip_slip":
        files = {"dataset": ("evil.zip", make_zip({"../../escape/a.jpg": solid((1, 1, 1)), **dataset_files(2)}, ""))}
        status, words = 400, ["evil.zip", "outside"]
    elif case == "absolute":
        files = {"dataset": ("abs.zip", make_zip({"/tmp/refit-abs.jpg": solid((1, 1, 1))}, ""))}
        status, words = 400, ["outside"]
    elif case == "not_zip":
        files = {"dataset": ("d.zip", b"PK but not really a zip")}
        status, words = 400, ["not a valid .zip"]
    elif case == "not_dataset":
        files = {"dataset": ("notes.zip", make_zip({"readme.txt": b"hello", "notes/a.txt": b"x"}))}
        status, words = 422, ["not a dataset"]
    elif case == "bad_field":
        data, status, words = {"epochs": "0", "strategy": "feature_extraction"}, 422, ["epochs"]
    elif case == "unknown_field":
        data, status, words = {"epoch": "3"}, 422, ["epoch", "extra"]
    elif case == "weights":
        data, status, words = {"weights": "/etc/passwd"}, 422, ["weights"]
    elif case == "no_dataset":
        files, data, status, words = {}, {"epochs": "2"}, 400, ["dataset"]
    elif case == "outside_root":
        r = http.post("/retrain/submit", json={"data_path": "../../../etc"}, headers=AUTH)
        assert r.status_code == 400 and "outside the data root" in r.json()["error"], r.text
        return
    else:
        files = {"dataset": ("big.zip", os.urandom(5 * 1024 * 1024))}
        status, words = 413, ["limit"]
    r = http.post("/retrain/submit", files=files, data=data, headers=AUTH)
    assert r.status_code == status, r.text
    assert all(w.lower() in r.json()["error"].lower() for w in words), r.json()
    assert not (Path("/tmp") / "refit-abs.jpg").exists()


def test_retrain_round_trip_busy_and_hot_swap_without_failed_requests(http, server):
    probe = solid(COLOURS["red"], seed=99)
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def load():  # a client that keeps predicting through the whole retrain and the swap
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = predict(c, ("probe.jpg", probe), ("probe2.jpg", probe))
                answers.append((r.status_code, r.text if r.status_code != 200 else
                                ",".join(p["version"] for p in r.json())))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        r = http.post("/retrain/submit", files={"dataset": ("colours.zip", make_zip(dataset_files()))},
                      data={"strategy": "feature_extraction", "head_epochs": "60", "note": "first retrain"},
                      headers=AUTH)
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        busy = http.post("/retrain/submit", files={"dataset": ("again.zip", make_zip(dataset_files()))},
                         headers=AUTH)
        assert busy.status_code == 409, busy.text
        assert "busy" in busy.json()["error"] and busy.json()["job"]["task_id"] == task_id
        assert wait_task(http, task_id)["status"] == "completed"
        result = http.get("/retrain/get", params={"task_id": task_id}, headers=AUTH).json()
        assert result["version"] == "v0002" and result["promoted"] is True
        assert result["classes"] == ["blue", "red"] and result["metrics"]["val_accuracy"] == 1.0
        assert "min_accuracy" in result["promotion"]["reason"]  # new classes: judged against min_accuracy
        seconds = wait_serving(http, "v0002")
        time.sleep(1.0)  # the load keeps going on the new version for a moment
    finally:
        stop.set()
        thread.join(timeout=60)
    failures = [a for a in answers if a[0] != 200]
    assert not failures, failures[:5]
    assert all(len(set(a[1].split(","))) == 1 for a in answers), "a reply mixed two versions"
    versions = [a[1].split(",")[0] for a in answers]
    assert set(versions) <= {"v0001", "v0002"} and versions[-1] == "v0002"
    assert len(answers) > 5 and seconds < 10
    [p] = predict(http, ("red.jpg", solid(COLOURS["red"], seed=123))).json()
    assert p["label"] == "red" and p["version"] == "v0002" and len(p["top_k"]) == 2

    rows = {row["id"]: row for row in http.get("/versions").json()["versions"]}
    assert rows["v0002"]["promoted"] and not rows["v0001"]["promoted"]
    assert rows["v0002"]["strategy"] == "feature_extraction" and rows["v0002"]["metrics"]["val_accuracy"] == 1.0
    assert rows["v0002"]["note"] == "first retrain"
    text = http.get("/metrics").text
    assert metric(text, "refit_promoted_version_info", version="v0002") == 1
    assert metric(text, "refit_predictions_total", version="v0002", label="red") >= 1
    assert metric(text, "refit_retrains_total", status="succeeded") == 1
    assert metric(text, "refit_retrain_duration_seconds_count") == 1
    jobs = http.get("/jobs", headers=AUTH).json()
    assert jobs[0]["task_id"] == task_id and jobs[0]["status"] == "succeeded"
    # The job ran in the training process the service had warmed up beforehand, and a new one is warming.
    warmed = re.findall(r"standby (\d+): warm in", (server.home / "jobs" / ".standby.log").read_text())
    train_log = (server.home / "jobs" / jobs[0]["id"] / "train.log").read_text()
    ran_in = re.search(r"in process (\d+)", train_log).group(1)
    assert ran_in in warmed, (ran_in, warmed)


def test_retrain_from_data_path_with_promote_false(http):
    r = http.post("/retrain/submit", json={"data_path": "colours", "strategy": "feature_extraction",
                                           "head_epochs": 20, "promote": False}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert wait_task(http, r.json()["task_id"])["status"] == "completed"
    result = http.get("/retrain/get", params={"task_id": r.json()["task_id"]}, headers=AUTH).json()
    assert result["version"] == "v0003" and result["promoted"] is False
    assert http.get("/versions").json()["promoted"] == "v0002"


def test_dataset_problem_found_while_training_fails_the_task_with_422(http):
    files = {"good/1.jpg": solid((9, 9, 9)), "good/2.jpg": solid((9, 9, 9), seed=1),
             "broken/1.jpg": b"not a jpeg", "broken/2.jpg": b"nor this"}
    r = http.post("/retrain/submit", files={"dataset": ("half.zip", make_zip(files))}, headers=AUTH)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    assert wait_task(http, task_id)["status"] == "failed"
    got = http.get("/retrain/get", params={"task_id": task_id}, headers=AUTH)
    assert got.status_code == 422 and "at least 2" in got.json()["error"], got.text
    assert [row["id"] for row in http.get("/versions").json()["versions"]] == ["v0001", "v0002", "v0003"]


def test_promote_and_rollback_switch_every_worker(http):
    assert http.post("/rollback", json={"reason": "test"}, headers=AUTH).json()["promoted"] == "v0001"
    wait_serving(http, "v0001")
    assert predict(http, ("red.jpg", solid(COLOURS["red"]))).json()[0]["version"] == "v0001"
    r = http.post("/promote", json={"version": "v0003", "reason": "test"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["previous"] == "v0001"
    wait_serving(http, "v0003")
    assert predict(http, ("red.jpg", solid(COLOURS["red"]))).json()[0]["version"] == "v0003"
    assert http.post("/promote", json={"version": "v0042"}, headers=AUTH).status_code == 404
    assert http.post("/promote", json={"version": "v0002"}, headers=AUTH).status_code == 200
    wait_serving(http, "v0002")


def test_corrupt_model_is_never_served(http, server):
    files = sorted((server.home / "models" / "refit" / "v0003").glob("*.onnx"))  # fp32, and int8 if any
    originals = {f: f.read_bytes() for f in files}
    try:
        for f, data in originals.items():
            f.write_bytes(data[:-64] + bytes(64))
        r = http.post("/promote", json={"version": "v0003"}, headers=AUTH)
        assert r.status_code == 409 and "checksum" in r.json()["error"], r.text
        assert http.get("/versions").json()["promoted"] == "v0002"
        assert any(x["version"] == "v0003" for x in http.get("/versions").json()["refused"])
        # A pointer moved by hand (or by a tool that skips the checks): the workers refuse and keep serving.
        pointer = server.home / "promoted.json"
        state = json.loads(pointer.read_text())
        pointer.write_text(json.dumps({**state, "version": "v0003"}))
        deadline = time.time() + 10
        while time.time() < deadline:
            serving = http.get("/versions").json()["serving"]
            if all(w["error"] and w["error"]["version"] == "v0003" for w in serving):
                break
            time.sleep(0.2)
        assert all("checksum" in w["error"]["reason"] and w["version"] == "v0002" for w in serving), serving
        assert predict(http, ("red.jpg", solid(COLOURS["red"]))).json()[0]["version"] == "v0002"
        assert "refusing v0003" in server.log_path.read_text()
    finally:
        for f, data in originals.items():
            f.write_bytes(data)
        assert http.post("/promote", json={"version": "v0002", "reason": "restore"}, headers=AUTH).status_code == 200
    deadline = time.time() + 10
    while time.time() < deadline:  # the workers see the pointer back on v0002 and drop the refusal
        serving = http.get("/versions").json()["serving"]
        if all(w["error"] is None and w["version"] == "v0002" for w in serving):
            break
        time.sleep(0.2)
    assert all(w["error"] is None and w["version"] == "v0002" for w in serving), serving


def test_openapi_and_health(http):
    assert http.get("/livez").status_code == 200 and http.get("/readyz").status_code == 200
    assert http.get("/").status_code == 200
    spec = http.get("/docs.json").json()
    for path, method in [("/predict", "post"), ("/predict_base64", "post"), ("/versions", "get"),
                         ("/promote", "post"), ("/rollback", "post"), ("/retrain/submit", "post"),
                         ("/retrain/status", "get"), ("/retrain/get", "get"), ("/jobs", "get")]:
        op = spec["paths"][path][method]
        assert op.get("description") or op.get("summary"), path
    form = spec["paths"]["/retrain/submit"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"dataset", "data_path", "strategy", "epochs", "promote"} <= set(form["properties"])


def test_bentoml_build_packs_service_training_and_the_promoted_version(server):
    promoted = json.loads((server.home / "promoted.json").read_text())["version"]
    env = {**os.environ, "REFIT_HOME": str(server.home), "BENTOML_HOME": str(server.home),
           "BENTOML_DO_NOT_TRACK": "True"}
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    r = subprocess.run([str(bentoml_cli), "build", "--output", "tag"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    tag = re.search(r"__tag__:(\S+)", r.stdout).group(1)
    name, version = tag.split(":")
    bento = server.home / "bentos" / name / version
    assert name == "refit"
    assert (bento / "src" / "service" / "service.py").is_file() and (bento / "src" / "training" / "export.py").is_file()
    assert not (bento / "src" / "tests").exists()  # only what the container runs
    manifest = (bento / "bento.yaml").read_text()
    assert f"refit:{promoted}" in manifest and "REFIT_HOME" in manifest
    # The store keeps the model once; exporting (like containerize) packs it into the bento's models/
    archive = server.home / "refit.bento"
    r = subprocess.run([str(bentoml_cli), "export", tag, str(archive)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with tarfile.open(archive) as tar:
        sizes = {m.name.lstrip("./"): m.size for m in tar.getmembers()}
    archive.unlink()
    assert sizes.get(f"models/refit/{promoted}/model.onnx", 0) > 1_000_000, sorted(sizes)[:20]
    assert f"models/refit/{promoted}/model.yaml" in sizes


@pytest.mark.skipif(not os.environ.get("REFIT_TEST_DATA"), reason="REFIT_TEST_DATA (hymenoptera) is not set")
def test_imagenet_model_recognises_real_ants_and_bees(http):
    assert http.post("/promote", json={"version": "v0001"}, headers=AUTH).status_code == 200
    wait_serving(http, "v0001")
    val = Path(os.environ["REFIT_TEST_DATA"]) / "val"
    hits = 0
    for cls in ("ants", "bees"):
        files = sorted((val / cls).glob("*.jpg"))[:6]
        r = predict(http, *[(f.name, f.read_bytes()) for f in files])
        assert r.status_code == 200, r.text
        word = cls[:-1]
        hits += sum(any(word in t["label"].lower() for t in p["top_k"]) for p in r.json())
    assert hits >= 8, f"only {hits}/12 real photos had their class in the ImageNet top-5"
    assert http.post("/promote", json={"version": "v0002"}, headers=AUTH).status_code == 200
    wait_serving(http, "v0002")


def test_restart_during_retrain_marks_the_job_failed_and_publishes_nothing(http, server):
    before = [row["id"] for row in http.get("/versions").json()["versions"]]
    r = http.post("/retrain/submit", files={"dataset": ("colours.zip", make_zip(dataset_files()))},
                  data={"strategy": "feature_extraction"}, headers=AUTH)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    deadline = time.time() + 30
    while time.time() < deadline:
        job = http.get("/jobs", headers=AUTH).json()[0]
        if job["task_id"] == task_id and job["status"] == "running":
            break
        time.sleep(0.1)
    assert job["status"] == "running"
    server.stop(kill=True)  # a crash: supervisor, workers and the training process all die at once
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job = c.get(f"/jobs/{job['id']}", headers=AUTH).json()
        assert job["status"] == "failed" and "stopped" in job["error"]["message"]
        status = c.get("/retrain/status", params={"task_id": task_id}, headers=AUTH).json()
        assert status["status"] == "failed"
        assert c.get("/retrain/get", params={"task_id": task_id}, headers=AUTH).status_code == 500
        assert [row["id"] for row in c.get("/versions").json()["versions"]] == before
        entries = sorted(p.name for p in (server.home / "models" / "refit").iterdir() if p.name.startswith("v"))
        assert entries == before  # no half-written version folder either
        assert predict(c, ("red.jpg", solid(COLOURS["red"]))).json()[0]["version"] == "v0002"


def test_retrain_works_when_bentoml_home_is_not_refit_home(server, tmp_path):
    """As in the container (BENTOML_HOME=/home/bentoml/, REFIT_HOME=/home/bentoml/refit): a retrain submitted
    there is found again by its task id."""
    home = tmp_path / "refit"
    shutil.copytree(server.home / "models", home / "models")  # the versions, without the running server's state
    shutil.copy(server.home / "promoted.json", home / "promoted.json")
    other = Server(home, server.data_root, tmp_path / "serve.log", bentoml_home=tmp_path / "bentoml")
    other.start()
    try:
        with httpx.Client(base_url=other.url, timeout=60) as c:
            r = c.post("/retrain/submit", json={"data_path": "colours", "strategy": "feature_extraction",
                                                "promote": False}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert wait_task(c, r.json()["task_id"])["status"] == "completed"
        assert (home / "jobs" / r.json()["task_id"] / "job.json").is_file()  # the task is its job, in REFIT_HOME
    finally:
        other.stop()
