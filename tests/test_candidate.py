"""Shadow and canary trials of a candidate version beside the promoted one: a real `bentoml serve` (two model
workers) on a folder store of tiny real ONNX versions, and two replicas on one S3 store (moto's server).

v1 is promoted; v2 and v3 have the same classes and other weights (so their answers differ on some images);
`other` has other classes; `broken` does not load."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import S3_BUCKET
from serving import AUTH, Server, predict, solid
from test_store_contract import publish, tiny_model

from core.contract import Contract
from core.objects import sha256_file
from core.store import Store
from service.trial import guard_breach

FAST = {"REFIT_TRAIN_STANDBY": "0", "REFIT_HEARTBEAT_SECONDS": "1", "REFIT_CAPTURE": "1"}


def image(seed: int) -> tuple[str, bytes]:
    rng = np.random.default_rng(seed)
    return f"img{seed}.jpg", solid(tuple(int(x) for x in rng.integers(0, 255, 3)), seed=seed)


def publish_other_classes(store: Store, tmp: Path) -> str:
    import onnx

    path = tiny_model(tmp / "other.onnx", 9)
    m = onnx.load(str(path))
    del m.metadata_props[:]
    m.metadata_props.add(key="refit.contract", value=Contract(input_size=8, resize_size=8,
                                                              class_names=("cat", "dog")).to_json())
    onnx.save(m, str(path))
    sha = sha256_file(path)
    return store.publish({"model.onnx": path}, {"strategy": "feature_extraction", "onnx_sha256": sha,
                                                "serving_file": "model.onnx", "serving_sha256": sha,
                                                "classes": ["cat", "dog"]})


def publish_broken(store: Store, tmp: Path) -> str:
    path = tmp / "broken.onnx"
    path.write_bytes(b"not an onnx file")
    sha = sha256_file(path)
    return store.publish({"model.onnx": path}, {"strategy": "feature_extraction", "onnx_sha256": sha,
                                                "serving_file": "model.onnx", "serving_sha256": sha,
                                                "classes": ["red", "blue"]})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("candidate")
    store = Store(root / "home")
    versions = {"v1": publish(store, root, 1), "v2": publish(store, root, 2), "v3": publish(store, root, 3),
                "other": publish_other_classes(store, root), "broken": publish_broken(store, root)}
    store.promote(versions["v1"], actor="setup")
    (root / "data").mkdir()
    srv = Server(root / "home", root / "data", root / "serve.log", env=FAST)
    srv.start()
    srv.versions = versions
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
        c.delete("/candidate", headers=AUTH)
        c.post("/promote", json={"version": server.versions["v1"]}, headers=AUTH)


def set_candidate(http, **body) -> httpx.Response:
    return http.post("/candidate", json=body, headers=AUTH)


def wait_trial(http, version: str | None, timeout: float = 10) -> None:
    """Until both workers follow the candidate: the pointer poll is 0.25 s; a request proves it on each."""
    time.sleep(1.0)


def figures(http, want, timeout: float = 15) -> dict:
    """GET /candidate until `want(reply)` holds (the other worker writes its figures every second)."""
    deadline = time.time() + timeout
    while True:
        got = http.get("/candidate").json()
        if want(got) or time.time() > deadline:
            return got
        time.sleep(0.3)


def test_setting_a_candidate_is_checked(server, http):
    v = server.versions
    assert http.get("/candidate").json() is None
    r = http.post("/candidate", json={"version": v["v2"], "mode": "shadow", "percent": 10})
    assert r.status_code == 401, r.text
    r = set_candidate(http, version="v0099", mode="shadow", percent=10)
    assert r.status_code == 404 and "unknown version" in r.json()["error"], r.text
    r = set_candidate(http, version=v["v1"], mode="canary", percent=10)
    assert r.status_code == 409 and "is the promoted version" in r.json()["error"], r.text
    r = set_candidate(http, version=v["other"], mode="canary", percent=10)
    assert r.status_code == 409 and "other classes" in r.json()["error"], r.text
    assert r.json()["classes"] == ["cat", "dog"]
    r = set_candidate(http, version=v["broken"], mode="canary", percent=10)
    assert r.status_code == 422 and "does not load" in r.json()["error"], r.text
    for bad in ({"version": v["v2"], "mode": "mirror", "percent": 10},
                {"version": v["v2"], "mode": "canary", "percent": 150},
                {"version": v["v2"], "mode": "canary"}):
        r = set_candidate(http, **bad)
        assert r.status_code == 400, r.text
    assert http.get("/candidate").json() is None  # nothing was set by any of these


def test_shadow_replies_only_from_the_promoted_version(server, http):
    v = server.versions
    r = set_candidate(http, version=v["v2"], mode="shadow", percent=100)
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "shadow" and r.json()["percent"] == 100 and r.json()["promoted"] == v["v1"]
    wait_trial(http, v["v2"])
    n = 40
    for i in range(n):
        reply = predict(http, image(i))
        assert reply.status_code == 200, reply.text
        assert reply.json()[0]["version"] == v["v1"]
    got = figures(http, lambda g: g["figures"]["shadow"]["compared"] >= n)
    shadow = got["figures"]["shadow"]
    assert shadow["compared"] == n and shadow["dropped"] == 0 and shadow["failed"] == 0, shadow
    assert 0 <= shadow["agreement"] <= 1 and shadow["mean_abs_delta"] >= 0
    flipped = sum(f["count"] for f in shadow["flips"])
    assert flipped == round(n * (1 - shadow["agreement"])), shadow
    assert all({f["from"], f["to"]} <= {"red", "blue"} for f in shadow["flips"])
    per = got["figures"]["versions"]
    assert per[v["v1"]]["requests"] == n and per[v["v1"]]["role"] == "promoted"
    assert per[v["v2"]]["requests"] == n and per[v["v2"]]["role"] == "candidate"
    assert per[v["v1"]]["p50_ms"] > 0 and per[v["v1"]]["p99_ms"] >= per[v["v1"]]["p50_ms"]
    assert got["workers_reporting"] >= 1
    metrics = http.get("/metrics").text
    assert "refit_trial_requests" in metrics and "refit_shadow_samples" in metrics


def test_canary_is_sticky_per_client_and_splits_near_its_percent(server, http):
    v = server.versions
    assert set_candidate(http, version=v["v2"], mode="canary", percent=50).status_code == 200
    wait_trial(http, v["v2"])
    seen: dict[str, set] = {}
    for c in range(100):
        for k in range(3):
            reply = predict(http, image(c * 3 + k), headers={"X-Refit-Client": f"client-{c}"})
            assert reply.status_code == 200, reply.text
            seen.setdefault(f"client-{c}", set()).add(reply.json()[0]["version"])
    assert all(len(s) == 1 for s in seen.values()), seen
    share = sum(s == {v["v2"]} for s in seen.values()) / len(seen)
    assert 0.35 <= share <= 0.65, share
    # Without the header the client is its address: this one keeps one version too.
    versions = {predict(http, image(i)).json()[0]["version"] for i in range(6)}
    assert len(versions) == 1
    # Changing the percent keeps the trial; at 0 % nobody is answered by the candidate.
    assert set_candidate(http, version=v["v2"], mode="canary", percent=0).status_code == 200
    wait_trial(http, v["v2"])
    assert {predict(http, image(1), headers={"X-Refit-Client": f"client-{c}"}).json()[0]["version"]
            for c in range(20)} == {v["v1"]}


def history(server) -> list[dict]:
    return json.loads((server.home / "promoted.json").read_text())["history"]


def test_promote_clear_and_rollback_end_a_trial(server, http):
    v = server.versions
    assert set_candidate(http, version=v["v2"], mode="canary", percent=20).status_code == 200
    r = http.delete("/candidate", headers=AUTH)
    assert r.status_code == 200 and r.json()["cleared"] == v["v2"], r.text
    assert http.get("/candidate").json() is None
    assert history(server)[-1]["action"] == "candidate_end" and history(server)[-1]["how"] == "cleared"
    assert http.delete("/candidate", headers=AUTH).json()["cleared"] is None  # nothing on: nothing to clear

    assert set_candidate(http, version=v["v2"], mode="shadow", percent=20).status_code == 200
    assert http.post("/promote", json={"version": v["v2"]}, headers=AUTH).status_code == 200
    assert http.get("/candidate").json() is None
    end = history(server)[-1]
    assert end["action"] == "candidate_end" and end["how"] == "promoted" and end["version"] == v["v2"]
    assert history(server)[-2]["action"] == "promote"

    assert set_candidate(http, version=v["v3"], mode="canary", percent=20).status_code == 200
    assert http.post("/rollback", json={}, headers=AUTH).status_code == 200
    assert http.get("/candidate").json() is None
    assert history(server)[-1]["how"] == "rolled_back"
    starts = [e for e in history(server) if e["action"] == "candidate"]
    assert {e["version"] for e in starts} >= {v["v2"], v["v3"]} and all("trial" in e for e in starts)


def test_feedback_accuracy_per_version(server, http):
    v = server.versions
    assert set_candidate(http, version=v["v2"], mode="shadow", percent=100).status_code == 200
    wait_trial(http, v["v2"])
    for k, cls in enumerate(("red", "blue")):  # the dataset the feedback joins, with both classes
        r = http.post("/datasets/trial-feedback/images", headers=AUTH, data={"label": cls},
                      files=[("images", (f"{cls}.jpg", image(500 + k)[1], "image/jpeg"))])
        assert r.status_code == 200, r.text
    replies = [predict(http, image(100 + i)).json()[0] for i in range(8)]
    time.sleep(1.5)  # captures are written by a background thread
    for r in replies:  # every answer of the promoted version confirmed: its accuracy is 1
        fb = http.post("/feedback", json={"prediction_id": r["prediction_id"], "label": r["label"],
                                          "dataset": "trial-feedback"}, headers=AUTH)
        assert fb.status_code == 200, fb.text
    got = figures(http, lambda g: (g["figures"]["feedback"].get(v["v1"]) or {}).get("labelled", 0) >= 8)
    fb = got["figures"]["feedback"]
    assert fb[v["v1"]] == {"labelled": 8, "correct": 8, "accuracy": 1.0}, fb
    # The candidate's shadow answers on the same images: right where it agreed with the promoted version.
    assert fb[v["v2"]]["labelled"] == 8 and 0 <= fb[v["v2"]]["correct"] <= 8


def test_guard_rule():
    figures = {"versions": {"v2": {"requests": 30, "errors": 6, "error_rate": 0.2}},
               "feedback": {"v1": {"labelled": 25, "correct": 24, "accuracy": 0.96},
                            "v2": {"labelled": 25, "correct": 18, "accuracy": 0.72}}}
    assert "error rate 0.200 over 0.1" in guard_breach({"max_error_rate": 0.1}, figures, "v2")
    assert guard_breach({"max_error_rate": 0.1, "min_requests": 50}, figures, "v2") is None
    assert "under the promoted" in guard_breach({"max_accuracy_drop": 0.1, "min_labelled": 20}, figures, "v2")
    assert guard_breach({"max_accuracy_drop": 0.1, "min_labelled": 30}, figures, "v2") is None
    assert guard_breach({"max_accuracy_drop": 0.3}, figures, "v2") is None


@pytest.fixture(scope="module")
def replicas(s3_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("candidate-s3")
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    publisher = Store(root / "publisher", url=url)
    versions = [publish(publisher, root, seed) for seed in (1, 2)]
    publisher.promote(versions[0], actor="setup")
    (root / "data").mkdir()
    env = {"REFIT_STORE": url, **FAST, "REFIT_CAPTURE": "0"}
    servers = [Server(root / n, root / "data", root / f"{n}.log", env=env) for n in ("a", "b")]
    for s in servers:
        s.start()
    yield servers, versions
    for s in servers:
        s.stop(kill=True)


def test_two_replicas_on_s3_follow_one_candidate(replicas):
    (a, b), (v1, v2) = replicas
    r = httpx.post(a.url + "/candidate", json={"version": v2, "mode": "canary", "percent": 100}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200, r.text
    t0, answered = time.time(), set()
    while time.time() - t0 < 5 and answered != {v2}:
        answered = {predict(httpx.Client(base_url=b.url, timeout=30), image(i)).json()[0]["version"]
                    for i in range(4)}
    assert answered == {v2}, f"replica b still answers with {answered} after 5 s"
    for srv in (a, b):
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for i in range(10):
                assert predict(c, image(i)).json()[0]["version"] == v2
    with httpx.Client(base_url=a.url, timeout=30) as c:
        got = figures(c, lambda g: g["workers_reporting"] >= 4 and
                      g["figures"]["versions"].get(v2, {}).get("requests", 0) >= 20)
    assert got["workers_reporting"] >= 4, got  # two workers on each replica wrote their figures
    assert got["figures"]["versions"][v2]["requests"] >= 20
    assert httpx.get(b.url + "/candidate", timeout=30).json()["trial"] == got["trial"]
