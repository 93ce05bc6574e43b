"""Projects over HTTP: a real `bentoml serve` (two model workers, REFIT_TOKEN set) on a copy of the ImageNet
store, two projects created, retrained and served beside the default one, every kind of token on every kind of
route, the LRU of loaded versions under concurrent requests, and delete.

Tests run in file order and share the server: `acme` and `beta` get one version each, trained on the colours.
"""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import AUTH, COLOURS, REPO, Server, copy_store, dataset_files, metric, photo, predict, solid, wait_task

from core.projects import NAME_PATTERN

PROJECT_ROUTES = ["/versions", "/jobs", "/datasets", "/drift"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, imagenet_store):
    root = tmp_path_factory.mktemp("refit-projects")
    data_root = root / "data"
    for name, data in dataset_files().items():
        (data_root / "colours" / name).parent.mkdir(parents=True, exist_ok=True)
        (data_root / "colours" / name).write_bytes(data)
    home = copy_store(imagenet_store, root / "home")
    srv = Server(home, data_root, root / "serve.log", env={"REFIT_MAX_LOADED_MODELS": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(http):
    made = {}
    for name in ("acme", "beta"):
        r = http.put(f"/projects/{name}", headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["name"] == name
        made[name] = r.json()["token"]
    return made


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def retrain(http, project: str, headers: dict) -> dict:
    r = http.post(f"/projects/{project}/retrain/submit", headers=headers,
                  json={"data_path": "colours", "strategy": "feature_extraction", "epochs": 2})
    assert r.status_code == 200, r.text
    done = wait_task(http, r.json()["task_id"], project=project)
    assert done["status"] == "completed", done
    return http.get(f"/projects/{project}/retrain/get", params={"task_id": r.json()["task_id"]},
                    headers=headers).json()


def test_create_is_idempotent_and_the_token_is_shown_once(http, tokens):
    again = http.put("/projects/acme", headers=AUTH)
    assert again.status_code == 200 and again.json() == {"name": "acme"}
    assert tokens["acme"].startswith("acme.") and tokens["acme"] != tokens["beta"]
    listed = {p["name"]: p for p in http.get("/projects", headers=AUTH).json()["projects"]}
    assert list(listed)[:1] == ["default"] and {"acme", "beta"} <= set(listed)
    assert listed["acme"]["versions"] == 0 and listed["acme"]["promoted"] is None
    assert listed["default"]["promoted"] == "v0001"
    assert tokens["acme"] not in http.get("/projects", headers=AUTH).text  # only a hash is kept


def test_bad_names_and_unknown_projects(http, tokens):
    for bad in ("Acme", "-x", "a_b", "x" * 64):
        r = http.put(f"/projects/{bad}", headers=AUTH)
        assert r.status_code == 422 and NAME_PATTERN in r.json()["error"], (bad, r.text)
        r = http.get(f"/projects/{bad}/versions", headers=AUTH)
        assert r.status_code == 422 and NAME_PATTERN in r.json()["error"], (bad, r.text)
    r = http.get("/projects/nosuch/versions", headers=AUTH)
    assert r.status_code == 404 and "nosuch" in r.json()["error"]
    r = http.post("/projects/nosuch/retrain/submit", headers=AUTH, json={"data_path": "colours"})
    assert r.status_code == 404 and "nosuch" in r.json()["error"]
    r = predict(http, ("a.jpg", solid(COLOURS["red"])), path="/projects/nosuch/predict")
    assert r.status_code == 404 and "nosuch" in r.json()["error"]


def test_every_kind_of_token_on_every_kind_of_route(http, tokens):
    acme, beta = bearer(tokens["acme"]), bearer(tokens["beta"])
    wrong = bearer("acme.not-the-secret")
    for route in PROJECT_ROUTES:
        assert http.get(f"/projects/acme{route}", headers=acme).status_code == 200, route
        assert http.get(f"/projects/acme{route}", headers=AUTH).status_code == 200, route
        assert http.get(f"/projects/acme{route}", headers=beta).status_code == 403, route
        assert http.get(f"/projects/acme{route}").status_code == 401, route
        assert http.get(f"/projects/acme{route}", headers=wrong).status_code == 401, route
    image = ("a.jpg", solid(COLOURS["red"]))
    assert predict(http, image, path="/projects/acme/predict").status_code == 401
    assert predict(http, image, path="/projects/acme/predict", headers=beta).status_code == 403
    # acme has no version yet: its token opens its predict, which names why there is nothing to answer with
    r = predict(http, image, path="/projects/acme/predict", headers=acme)
    assert r.status_code == 503 and r.json()["project"] == "acme", r.text
    # the project admin routes: the admin token only
    for method, path in (("GET", "/projects"), ("PUT", "/projects/gamma"), ("POST", "/projects/acme/token"),
                         ("DELETE", "/projects/acme")):
        assert http.request(method, path, headers=acme).status_code == 403, path
        assert http.request(method, path).status_code == 401, path
    # the default project keeps its rules: predict open, its admin routes need the admin token
    assert predict(http, ("c.jpg", photo("chelsea"))).status_code == 200
    assert http.post("/promote", json={"version": "v0001"}, headers=acme).status_code == 403
    assert http.post("/projects/default/promote", json={"version": "v0001"}, headers=acme).status_code == 403
    assert http.post("/promote", json={"version": "v0001"}).status_code == 401
    assert http.post("/promote", json={"version": "v0001"}, headers=AUTH).status_code == 200


def test_two_projects_retrained_at_once_each_on_its_own_line(http, tokens, server):
    acme, beta = bearer(tokens["acme"]), bearer(tokens["beta"])
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda pt: retrain(http, *pt), [("acme", acme), ("beta", beta)])
    assert a["version"] == "v0001" and b["version"] == "v0001", (a, b)
    for name, headers in (("acme", acme), ("beta", beta)):
        v = http.get(f"/projects/{name}/versions", headers=headers).json()
        assert v["promoted"] == "v0001" and [row["id"] for row in v["versions"]] == ["v0001"]
        jobs = http.get(f"/projects/{name}/jobs", headers=headers).json()
        assert [j["project"] for j in jobs] == [name]
    assert http.get("/versions").json()["promoted"] == "v0001"  # the default project is untouched
    assert len(http.get("/versions").json()["versions"]) == 1
    listing = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"], cwd=REPO,
                             env={"BENTOML_HOME": str(server.home), "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    tags = set(re.findall(r'"(refit(?:-[a-z0-9-]+)?:v\d{4})"', listing.stdout))
    assert {"refit:v0001", "refit-acme:v0001", "refit-beta:v0001"} <= tags, listing.stdout


def test_each_project_answers_with_its_own_model(http, tokens):
    acme, beta = bearer(tokens["acme"]), bearer(tokens["beta"])
    red, blue = ("r.jpg", solid(COLOURS["red"], seed=3)), ("b.jpg", solid(COLOURS["blue"], seed=4))
    r = predict(http, red, blue, path="/projects/acme/predict", headers=acme)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()] == ["red", "blue"] and {p["version"] for p in r.json()} == {"v0001"}
    r = http.post("/projects/beta/predict_base64", headers=beta,
                  json={"images": [{"data": base64.b64encode(red[1]).decode(), "name": "r.jpg"}]})
    assert r.status_code == 200 and r.json()[0]["label"] == "red", r.text
    r = predict(http, ("c.jpg", photo("chelsea")))
    assert r.status_code == 200 and len(r.json()[0]["top_k"]) >= 1 and r.json()[0]["label"] not in COLOURS


def test_datasets_explain_and_training_on_a_dataset_stay_in_their_project(http, tokens):
    acme = bearer(tokens["acme"])
    files = [("images", (f"b{i}.jpg", solid(COLOURS["blue"], seed=40 + i), "image/jpeg")) for i in range(6)]
    r = http.post("/projects/acme/datasets/shapes/images", files=files, data={"label": "blue"}, headers=acme)
    assert r.status_code == 200 and len(r.json()["added"]) == 6, r.text
    files = [("images", (f"r{i}.jpg", solid(COLOURS["red"], seed=50 + i), "image/jpeg")) for i in range(6)]
    assert http.post("/projects/acme/datasets/shapes/images", files=files, data={"label": "red"},
                     headers=acme).status_code == 200
    assert [d["dataset"] for d in http.get("/projects/acme/datasets", headers=acme).json()] == ["shapes"]
    assert http.get("/datasets").json() == []  # the default project has none
    assert http.get("/projects/beta/datasets/shapes", headers=AUTH).status_code == 404
    listed = {p["name"]: p for p in http.get("/projects", headers=AUTH).json()["projects"]}
    assert listed["acme"]["datasets"] == ["shapes"] and listed["beta"]["datasets"] == []
    r = http.post("/projects/acme/explain", headers=acme,
                  files={"image": ("r.jpg", solid(COLOURS["red"], seed=8), "image/jpeg")})
    assert r.status_code == 200 and r.json()["label"] == "red" and r.json()["version"] == "v0001", r.text


def test_lru_loads_and_evicts_under_concurrent_requests(http, tokens, server):
    """REFIT_MAX_LOADED_MODELS=1: requests alternating between two projects make every worker load and evict,
    and none of them fails."""
    acme, beta = bearer(tokens["acme"]), bearer(tokens["beta"])
    red = ("r.jpg", solid(COLOURS["red"], seed=5))

    def one(i: int) -> tuple[int, str]:
        name, headers = ("acme", acme) if i % 2 else ("beta", beta)
        r = predict(http, red, path=f"/projects/{name}/predict", headers=headers)
        return r.status_code, r.json()[0]["label"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(64)))
    assert all(code == 200 and label == "red" for code, label in results), results
    text = http.get("/metrics").text
    loads = sum(metric(text, "refit_model_loads_total", project=p) or 0 for p in ("acme", "beta"))
    evictions = sum(metric(text, "refit_model_evictions_total", project=p) or 0 for p in ("acme", "beta"))
    assert loads >= 3 and evictions >= 1, (loads, evictions)
    assert (metric(text, "refit_project_predictions_total", project="acme") or 0) >= 32


def copy_project(home, source: str, name: str, *, break_file: bool = False) -> None:
    """A project whose store holds a copy of `source`'s version and pointer (damaged, with `break_file`)."""
    src, dest = home / "models" / f"refit-{source}" / "v0001", home / "models" / f"refit-{name}" / "v0001"
    shutil.copytree(src, dest)
    if break_file:
        with open(dest / "model.onnx", "ab") as f:
            f.write(b"not the file that was published")
    shutil.copy(home / "projects" / source / "promoted.json", home / "projects" / name / "promoted.json")


def test_a_version_that_fails_to_load_is_a_503_for_its_project_only(http, tokens, server):
    assert http.put("/projects/broken", headers=AUTH).status_code == 201
    copy_project(server.home, "acme", "broken", break_file=True)
    image = ("r.jpg", solid(COLOURS["red"], seed=6))
    r = predict(http, image, path="/projects/broken/predict", headers=AUTH)
    assert r.status_code == 503 and r.json()["project"] == "broken", r.text
    assert "checksum" in r.json()["error"] or "sha256" in r.json()["error"], r.text
    ok = predict(http, image, path="/projects/acme/predict", headers=bearer(tokens["acme"]))
    assert ok.status_code == 200 and ok.json()[0]["label"] == "red"
    assert predict(http, ("c.jpg", photo("chelsea"))).status_code == 200


def test_a_project_deleted_under_traffic_answers_200_or_404_never_500(http, tokens, server):
    assert http.put("/projects/doomed", headers=AUTH).status_code == 201
    copy_project(server.home, "acme", "doomed")
    image = ("r.jpg", solid(COLOURS["red"], seed=7))
    assert predict(http, image, path="/projects/doomed/predict", headers=AUTH).status_code == 200
    stop, codes = threading.Event(), []

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                codes.append(predict(c, image, path="/projects/doomed/predict", headers=AUTH).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert http.delete("/projects/doomed", headers=AUTH).status_code == 200
    time.sleep(3.5)  # past every worker's registry cache
    stop.set()
    for t in threads:
        t.join()
    assert codes and set(codes) <= {200, 404}, sorted(set(codes))
    assert codes[-1] == 404 and 200 in codes


def test_a_new_token_replaces_the_old(http, tokens):
    old = bearer(tokens["acme"])
    r = http.post("/projects/acme/token", headers=AUTH)
    assert r.status_code == 200, r.text
    new = bearer(r.json()["token"])
    time.sleep(2.5)  # every worker's registry cache
    assert http.get("/projects/acme/versions", headers=old).status_code == 401
    assert http.get("/projects/acme/versions", headers=new).status_code == 200
    assert http.post("/projects/default/token", headers=AUTH).status_code == 409
    tokens["acme"] = r.json()["token"]


def test_delete_refuses_while_a_job_runs_then_removes_everything(http, tokens, server):
    beta = bearer(tokens["beta"])
    r = http.post("/projects/beta/retrain/submit", headers=beta,
                  json={"data_path": "colours", "strategy": "feature_extraction", "epochs": 2})
    assert r.status_code == 200, r.text
    refused = http.delete("/projects/beta", headers=AUTH)
    assert refused.status_code == 409 and "job" in refused.json()["error"], refused.text
    wait_task(http, r.json()["task_id"], project="beta")
    gone = http.delete("/projects/beta", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["versions"] == 2, gone.text
    time.sleep(2.5)  # every worker's registry cache
    assert http.get("/projects/beta/versions", headers=AUTH).status_code == 404
    r = predict(http, ("r.jpg", solid(COLOURS["red"])), path="/projects/beta/predict", headers=AUTH)
    assert r.status_code == 404
    assert not (server.home / "models" / "refit-beta").exists()
    deadline = time.time() + 10  # a worker that had beta loaded withdraws its status record once it sees
    while list((server.home / "projects" / "beta").rglob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    assert not list((server.home / "projects" / "beta").rglob("*.json"))
    assert http.delete("/projects/default", headers=AUTH).status_code == 409
    assert "beta" not in {p["name"] for p in http.get("/projects", headers=AUTH).json()["projects"]}
    # the name can be used again, from nothing
    again = http.put("/projects/beta", headers=AUTH)
    assert again.status_code == 201
    assert http.get("/projects/beta/versions", headers=AUTH).json()["versions"] == []
