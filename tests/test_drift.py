"""Drift against a real `bentoml serve` (two model workers): a version trained on hymenoptera (feature
extraction, INT8 served as by default), real validation photos that must not raise the drift score, colour
noise and line drawings that must, and an older version without the `embedding` output that keeps serving
and says drift is not available (issue 12, "Drift")."""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import httpx
import onnx
import pytest
from conftest import run_cli
from serving import AUTH, Server, copy_store, metric, wait_serving

from bench.quality_thresholds import noise_image, sketch_image

WINDOW = 32  # per worker, small so the test fills it quickly


# The images the drift threshold was measured against (bench/quality_thresholds.py), so the test and the
# figures in docs/service.md speak of the same inputs.
noise, sketch = noise_image, sketch_image


def without_embedding(src: Path, dest: Path) -> Path:
    """The same model as an older release exported it: `probs` only (the embedding output and the node
    that fed nothing else removed)."""
    m = onnx.load(str(src))
    keep = [o for o in m.graph.output if o.name != "embedding"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in keep}
    nodes = [n for n in m.graph.node if any(o in used for o in n.output)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(dest))
    return dest


@pytest.fixture(scope="module")
def drift_store(real_data, imagenet_store, tmp_path_factory) -> Path:
    """v0001 bootstrap (promoted), v0002 trained on hymenoptera, v0003 = v0002's model without `embedding`."""
    from core.contract import Contract
    from core.store import Store
    from training.export import CONTRACT_KEY
    from training.pipeline import _publish

    root = tmp_path_factory.mktemp("drift-store")
    home = copy_store(imagenet_store, root / "home")
    r = run_cli("train", real_data, "--strategy", "feature_extraction", "--parity-images", "4", "--promote",
                "false", "--json", home=home, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    v2 = home / "models" / "refit" / json.loads(r.stdout.strip().splitlines()[-1])["version"]
    old = without_embedding(v2 / "model.onnx", root / "model.onnx")
    contract = Contract.from_json({p.key: p.value for p in onnx.load(str(old)).metadata_props}[CONTRACT_KEY])
    (root / "metrics.json").write_text((v2 / "metrics.json").read_text())
    store = Store(home)
    version = _publish(store, {"model.onnx": old, "metrics.json": root / "metrics.json"}, contract,
                       {"strategy": "feature_extraction", "backbone": "efficientnet_lite0", "classes": ["ants", "bees"],
                        "note": "exported before drift monitoring"})
    assert version == "v0003"
    return home


@pytest.fixture(scope="module")
def server(drift_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift-server")
    home = root / "home"
    shutil.copytree(drift_store, home)
    (root / "data").mkdir()
    srv = Server(home, root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0", "REFIT_DRIFT_WINDOW": WINDOW, "REFIT_HEARTBEAT_SECONDS": "1",
                      "REFIT_MAX_REQUEST_MB": "8"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def promote(http, version: str) -> None:
    r = http.post("/promote", json={"version": version, "reason": "drift test"}, headers=AUTH)
    assert r.status_code == 200, r.text
    wait_serving(http, version, timeout=60)


def send(server, images: list[tuple[str, bytes]], per_request: int = 8) -> None:
    """New connection per request, so both workers get a share (a kept-alive connection stays on one)."""
    for i in range(0, len(images), per_request):
        chunk = images[i:i + per_request]
        r = httpx.post(server.url + "/predict", files=[("images", (n, d, "image/jpeg")) for n, d in chunk],
                       timeout=120)
        assert r.status_code == 200, r.text


def entry(http, version: str, min_fill: int = 0, timeout: float = 20) -> dict:
    """The version's /drift entry, once the pooled windows hold `min_fill` inputs (records refresh every 1 s)."""
    deadline = time.time() + timeout
    while True:
        body = http.get("/drift").json()
        found = [v for v in body["versions"] if v["version"] == version]
        if found and (not found[0].get("available") or found[0]["window_fill"] >= min_fill):
            return found[0]
        if time.time() > deadline:
            pytest.fail(f"/drift has no entry for {version} with {min_fill} inputs: {body}")
        time.sleep(0.5)


def test_validation_photos_do_not_raise_drift_but_noise_and_drawings_do(http, server, real_data):
    promote(http, "v0002")
    first = entry(http, "v0002")
    assert first["available"] and first["window_fill"] == 0 and first["flagged"] is False
    val = [p for c in ("ants", "bees") for p in sorted((real_data / "val" / c).iterdir())]
    random.Random(0).shuffle(val)  # a mix of both classes, as a real stream of this model's subjects
    send(server, [(p.name, p.read_bytes()) for p in val[:96]])
    time.sleep(2.5)  # both workers' records rewritten after the last batch, so every reply below agrees
    calm = entry(http, "v0002", min_fill=WINDOW)
    assert calm["embedding"]["score"] < calm["embedding"]["threshold"], calm
    assert calm["labels"]["score"] < calm["labels"]["threshold"], calm
    assert calm["flagged"] is False and calm["workers"] >= 1
    print("validation photos:", calm["window_fill"], calm["embedding"], calm["labels"])
    text = http.get("/metrics").text
    assert metric(text, "refit_drift_score", version="v0002", signal="embedding") == calm["embedding"]["score"]
    assert metric(text, "refit_drift_flagged", version="v0002") == 0

    odd = [(f"noise{i}.jpg", noise(i)) for i in range(96)] + [(f"sketch{i}.jpg", sketch(i)) for i in range(96)]
    random.Random(1).shuffle(odd)
    send(server, odd)
    time.sleep(2.5)  # both workers' records rewritten after the last batch
    drifted = entry(http, "v0002", min_fill=WINDOW)
    assert drifted["embedding"]["score"] > drifted["embedding"]["threshold"], drifted
    assert drifted["flagged"] is True
    print("noise and drawings:", drifted["window_fill"], drifted["embedding"], drifted["labels"]["score"])
    assert drifted["embedding"]["score"] > calm["embedding"]["score"] + 0.3
    assert metric(http.get("/metrics").text, "refit_drift_flagged", version="v0002") == 1


def test_version_without_embedding_serves_and_drift_is_unavailable(http, server, real_data):
    promote(http, "v0003")
    photo = next((real_data / "val" / "bees").iterdir())
    r = httpx.post(server.url + "/predict", files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    assert r.json()[0]["version"] == "v0003" and r.json()[0]["label"] in ("ants", "bees")
    e = entry(http, "v0003")
    assert e["available"] is False and "no 'embedding' output" in e["reason"]
    # The bootstrap ImageNet model has the output but no training reference: not available either.
    promote(http, "v0001")
    e = entry(http, "v0001")
    assert e["available"] is False and "drift.npz" in e["reason"]


def test_version_detail_lists_label_problems(http):
    r = http.get("/versions/v0002", headers=AUTH)  # the images' paths are listed with the token
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label_problems"]["available"] and body["label_problems"]["items"]
    assert body["near_duplicates"]["threshold"] == 0.85
    assert set(body["label_problems"]["items"][0]) >= {"path", "sha256", "given", "suggested", "score"}
    listed = {v["id"]: v for v in http.get("/versions").json()["versions"]}
    assert listed["v0002"]["metrics"]["label_problems"] == body["label_problems"]["count"]
    assert http.get("/versions/v0099").status_code == 404
    assert http.get("/versions/v0001").json()["label_problems"]["available"] is False
