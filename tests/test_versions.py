"""Versions, the promoted pointer and the service's metrics, driven as a client (and an operator with a text
editor) would: a real `bentoml serve` with two model workers, the `refit` CLI, and `promoted.json` damaged
on disk the way a black-box probe did (issue 9, items 3, 4, 6, 8 and 9).

The store holds the bootstrap ImageNet version v0001 and three small versions v0002-v0004 trained with
`refit train --promote false`. Tests run in file order and share one server; each leaves a sane pointer.
"""
from __future__ import annotations

import json
import random
import shutil
import string
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from serving import AUTH, COLOURS, Server, copy_store, dataset_files, predict, solid, wait_serving

RED = ("red.jpg", solid(COLOURS["red"], seed=5))


@pytest.fixture(scope="module")
def versions_store(imagenet_store, tmp_path_factory) -> Path:
    """v0001 (promoted, the pretrained model) plus v0002-v0004, trained and published but not promoted."""
    root = tmp_path_factory.mktemp("versions-store")
    home = copy_store(imagenet_store, root / "home")
    data = root / "colours"
    for name, content in dataset_files(6).items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(content)
    for _ in range(3):
        r = run_cli("train", data, "--strategy", "feature_extraction", "--head-epochs", "5", "--no-int8",
                    "--parity-images", "2", "--promote", "false", home=home)
        assert r.returncode == 0, r.stderr[-3000:]
    return home


@pytest.fixture(scope="module")
def server(versions_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("versions-server")
    home = root / "home"
    shutil.copytree(versions_store, home)
    (root / "data").mkdir()
    srv = Server(home, root / "data", root / "serve.log", env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def promote(http, version: str) -> httpx.Response:
    return http.post("/promote", json={"version": version, "reason": "test"}, headers=AUTH)


def wait_refused(http, words: list[str], timeout: float = 15) -> list[dict]:
    """Until every model worker reports a refusal whose reason holds all `words`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        serving = http.get("/versions").json()["serving"]
        if len(serving) == 2 and all(w["error"] and all(x in w["error"]["reason"] for x in words)
                                     for w in serving):
            return serving
        time.sleep(0.2)
    pytest.fail(f"workers did not report the damaged pointer: {http.get('/versions').text}")


# --- item 8 ---------------------------------------------------------------------------------------------

def test_item08_repeated_rollback_walks_back_the_promotion_history(http, server):
    """Probe: after promoting v2, v3, v4, three rollbacks gave v3, v4, v3 (the second re-promoted the version
    just rolled back from)."""
    for v in ("v0002", "v0003", "v0004"):
        assert promote(http, v).status_code == 200
    got = []
    for _ in range(3):
        r = http.post("/rollback", json={"reason": "test"}, headers=AUTH)
        assert r.status_code == 200, r.text
        got.append((r.json()["previous"], r.json()["promoted"]))
    assert got == [("v0004", "v0003"), ("v0003", "v0002"), ("v0002", "v0001")]
    r = http.post("/rollback", json={}, headers=AUTH)
    assert r.status_code == 409 and "nothing to roll back" in r.json()["error"] and "v0001" in r.json()["error"]
    cli = run_cli("rollback", home=server.home)
    assert cli.returncode == 2 and "nothing to roll back" in cli.stderr, cli.stderr
    assert http.get("/versions").json()["promoted"] == "v0001"
    wait_serving(http, "v0001")
    # Promoting again starts a new step on the same path: v2 now rolls back to v1, not to an older v4.
    assert promote(http, "v0002").status_code == 200
    assert http.post("/rollback", json={}, headers=AUTH).json()["promoted"] == "v0001"


# --- item 3 ---------------------------------------------------------------------------------------------

def test_item03_pointer_that_is_json_but_not_an_object_leaves_the_watchers_running(http, server):
    """Probe: a promoted.json holding valid JSON that is not an object killed every worker's watcher thread;
    later promotes answered 200 while replies kept naming the old version until the workers restarted."""
    assert promote(http, "v0002").status_code == 200
    wait_serving(http, "v0002")
    pointer = server.home / "promoted.json"
    for damaged in ('["v0003"]', '"v0003"', "42", "null", '{"version": 3}', '{"version": "v0003", "history": 1}'):
        pointer.write_text(damaged)
        serving = wait_refused(http, ["promoted.json"])
        assert all(w["version"] == "v0002" for w in serving), serving
        listing = http.get("/versions")
        assert listing.status_code == 200 and "promoted.json" in listing.json()["problem"], listing.text
        assert any("promoted.json" in x["reason"] for x in listing.json()["refused"])
        r = predict(http, RED)
        assert r.status_code == 200 and r.json()[0]["version"] == "v0002", r.text
    # The watchers are alive: a pointer written by hand again (as a tool would) is followed at once.
    pointer.write_text(json.dumps({"version": "v0003", "history": []}))
    wait_serving(http, "v0003")
    assert predict(http, RED).json()[0]["version"] == "v0003"
    assert "promoted.json holds a JSON array, not an object" in server.log_path.read_text()
    assert promote(http, "v0002").status_code == 200
    wait_serving(http, "v0002")


# --- item 4 ---------------------------------------------------------------------------------------------

def test_item04_garbage_pointer_can_be_inspected_and_repaired_through_api_and_cli(http, server):
    """Probe: with a garbage promoted.json, /readyz and /metrics stopped answering, /versions was a text 500,
    and /promote, /rollback, `refit versions` and `refit promote` all failed: no way to repair it."""
    assert promote(http, "v0002").status_code == 200
    wait_serving(http, "v0002")
    pointer = server.home / "promoted.json"
    garbage = b"\x00\xffnot json{"
    pointer.write_bytes(garbage)
    wait_refused(http, ["promoted.json", "not valid JSON"])
    assert http.get("/readyz").status_code == 200  # the workers still serve v0002
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "refit_promoted_pointer_ok 0" in metrics.text
    listing = http.get("/versions")
    assert listing.status_code == 200, listing.text
    body = listing.json()
    assert body["promoted"] is None and "not valid JSON" in body["problem"] and "promote" in body["problem"]
    assert [row["id"] for row in body["versions"]] == ["v0001", "v0002", "v0003", "v0004"]
    r = http.post("/rollback", json={}, headers=AUTH)
    assert r.status_code == 409 and "promoted.json" in r.json()["error"], r.text
    cli = run_cli("versions", "--json", home=server.home)
    assert cli.returncode == 0 and "not valid JSON" in cli.stderr, cli.stderr
    assert [row["version"] for row in json.loads(cli.stdout)] == ["v0001", "v0002", "v0003", "v0004"]
    cli = run_cli("rollback", home=server.home)
    assert cli.returncode == 2 and "promoted.json" in cli.stderr, cli.stderr
    assert pointer.read_bytes() == garbage  # nothing above wrote to it

    r = promote(http, "v0004")
    assert r.status_code == 200, r.text
    repaired = r.json()["repaired"]
    assert repaired and "not valid JSON" in repaired["reason"]
    kept = server.home / repaired["kept_as"]
    assert kept.parent == server.home and kept.read_bytes() == garbage
    state = json.loads(pointer.read_text())
    assert state["version"] == "v0004"
    assert [e["action"] for e in state["history"]] == ["repair", "promote"]
    wait_serving(http, "v0004")
    assert "refit_promoted_pointer_ok 1" in http.get("/metrics").text
    assert http.get("/versions").json()["problem"] is None

    # The same through the CLI.
    pointer.write_text('"v0004"')
    cli = run_cli("promote", "v0003", home=server.home)
    assert cli.returncode == 0 and "repaired" in cli.stdout and "string" in cli.stdout, cli.stdout + cli.stderr
    assert len(list(server.home.glob("promoted.json.broken-*"))) == 2
    assert [e["action"] for e in json.loads(pointer.read_text())["history"]] == ["repair", "promote"]
    wait_serving(http, "v0003")


# --- item 6 ---------------------------------------------------------------------------------------------

def test_item06_random_request_paths_do_not_grow_the_metrics(http, server):
    """Probe: 2,000 random unmatched paths (even ones answered 401) grew /metrics from 120 KB to 7 MB and
    3 s to render: BentoML labels its HTTP metrics with the raw request path."""
    before = len(http.get("/metrics").content)
    rng = random.Random(6)
    prefixes = ["/", "/jobs/", "/retrain/", "/static_content/", "/predict/", "/versions/", "/readyz/", "/x/y/"]
    requests = []
    for i in range(3000):
        token = "".join(rng.choices(string.ascii_lowercase + string.digits, k=14))
        requests.append((rng.choice(["GET", "POST", "PUT", "DELETE"]), rng.choice(prefixes) + token))
    tokens = {path.rsplit("/", 1)[1] for _, path in requests}

    def send(req):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return [(m, p, c.request(m, p)) for m, p in req]

    with ThreadPoolExecutor(6) as pool:
        replies = [x for part in pool.map(send, [requests[i::6] for i in range(6)]) for x in part]
    t0 = time.time()
    after = http.get("/metrics")
    seconds = time.time() - t0
    assert after.status_code == 200
    leaked = [t for t in tokens if t in after.text]
    assert not leaked, f"{len(leaked)} of {len(tokens)} request paths became metric labels, e.g. {leaked[:3]}"
    assert len(after.content) - before < 30_000, (before, len(after.content))
    assert 'endpoint="<unmatched>"' in after.text and 'endpoint="/jobs/{job_id}"' in after.text
    assert seconds < 5, seconds
    for method, path, r in replies:
        if path.startswith("/jobs/"):
            assert r.status_code == 401, (method, path, r.text)  # a real route: the token comes first
        elif path.startswith("/versions/"):  # a real route too (GET /versions/{id}): an unknown id, or its method
            assert r.status_code == (404 if method == "GET" else 405), (method, path, r.status_code, r.text)
        elif not path.startswith("/static_content/"):
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert "no route" in r.json()["error"], r.text
    # Known routes still work and are labelled as themselves.
    assert predict(http, RED).status_code == 200
    assert 'endpoint="/predict"' in http.get("/metrics").text


# --- item 9 ---------------------------------------------------------------------------------------------

def test_item09_missing_pointer_promotes_nothing_until_someone_does(versions_store, tmp_path):
    """Probe: with promoted.json missing, a start promoted the newest version (even one trained with
    promote=false) and began a new history."""
    home = tmp_path / "home"
    shutil.copytree(versions_store, home)
    (home / "promoted.json").unlink()
    srv = Server(home, tmp_path, tmp_path / "serve.log", env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start(ready=False)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            time.sleep(1.0)  # a few more polls of the pointer
            assert not (home / "promoted.json").exists()
            body = c.get("/versions").json()
            assert body["promoted"] is None and all(w["version"] is None for w in body["serving"]), body
            assert "(promoted.json is missing)" in body["problem"] and "promote" in body["problem"]
            assert c.get("/readyz").status_code == 503
            r = predict(c, RED)
            assert r.status_code == 503 and "promote" in r.json()["error"], r.text
            assert "(promoted.json is missing)" in srv.log_path.read_text()
            cli = run_cli("versions", home=home)
            assert cli.returncode == 0 and "(promoted.json is missing)" in cli.stderr
            assert "*" not in cli.stdout

            r = promote(c, "v0002")
            assert r.status_code == 200 and r.json()["previous"] is None, r.text
            wait_serving(c, "v0002")
            assert c.get("/readyz").status_code == 200
            assert predict(c, RED).json()[0]["version"] == "v0002"
            history = json.loads((home / "promoted.json").read_text())["history"]
            assert [(e["action"], e["version"]) for e in history] == [("promote", "v0002")]
    finally:
        srv.stop()
