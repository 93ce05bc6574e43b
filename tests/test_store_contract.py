"""The store contract, the same for both backends: a folder (REFIT_STORE unset, the store is REFIT_HOME) and
S3 (REFIT_STORE=s3://bucket/prefix on a real S3-compatible server, moto's, on loopback).

Versions are published from small real ONNX files (onnxruntime loads them, the service's model code serves
them); concurrent promoters and a publish killed midway are separate processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, S3_BUCKET, jpeg_bytes

from core.contract import Contract
from core.store import Store, StoreError, sha256_file

CLASSES = ("red", "blue")


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """A store URL factory: `url()` is the store every "replica" of one test shares (None: the home folder)."""
    if request.param == "local":
        return {"name": "local", "url": None, "env": {}}
    env = request.getfixturevalue("s3_endpoint")
    return {"name": "s3", "url": f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", "env": env}


def open_store(backend, home: Path) -> Store:
    return Store(home, url=backend["url"])


def tiny_model(path: Path, seed: int) -> Path:
    """A real Refit model file, 8x8 input, two classes: pooled colour through a random linear layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(3, len(CLASSES))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", len(CLASSES)])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    contract = Contract(input_size=8, resize_size=8, class_names=CLASSES)
    helper.set_model_props(model, {"refit.contract": contract.to_json()})
    onnx.save(model, path)
    return path


def publish(store: Store, tmp: Path, seed: int, extra: dict | None = None) -> str:
    onnx_file = tiny_model(tmp / f"model-{seed}.onnx", seed)
    sha = sha256_file(onnx_file)
    metrics = tmp / f"metrics-{seed}.json"
    metrics.write_text(json.dumps({"val_accuracy": 0.5 + seed / 100}))
    files = {"model.onnx": onnx_file, "metrics.json": metrics, **(extra or {})}
    return store.publish(files, {"strategy": "feature_extraction", "onnx_sha256": sha, "serving_file": "model.onnx",
                                 "serving_sha256": sha, "classes": list(CLASSES)})


def child_env(backend, home: Path) -> dict:
    env = {**os.environ, **backend["env"], "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    env.pop("REFIT_STORE", None)
    if backend["url"]:
        env["REFIT_STORE"] = backend["url"]
    return env


def test_publish_list_info_and_verify(backend, tmp_path):
    """Published versions are listed in order with their metadata and metrics, and pass their checksum."""
    store = open_store(backend, tmp_path / "home")
    assert store.versions() == []
    v1, v2 = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    assert (v1, v2) == ("v0001", "v0002")
    assert store.versions() == ["v0001", "v0002"] and store.resolve("latest") == "v0002"
    info = store.info("refit:v0002")
    assert info["version"] == "v0002" and info["strategy"] == "feature_extraction"
    assert info["metrics"] == {"val_accuracy": 0.52} and info["classes"] == list(CLASSES)
    assert [i["version"] for i in store.list_info()] == ["v0001", "v0002"]
    assert store.verify("v0001").name == "model.onnx"
    with pytest.raises(StoreError, match="unknown version 'v0009'; known: v0001, v0002"):
        store.resolve("v0009")


def test_tampered_file_is_refused(backend, tmp_path):
    """A model file changed after publish fails its checksum: it is not promoted, and (S3) not cached."""
    store = open_store(backend, tmp_path / "home")
    v1, v2 = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    store.promote(v1)
    evil = tiny_model(tmp_path / "evil.onnx", 99).read_bytes()
    if backend["name"] == "local":
        (store.models_dir / v2 / "model.onnx").write_bytes(evil)
        reader = store
    else:
        store.remote.put(f"models/refit/{v2}/model.onnx", evil)
        reader = open_store(backend, tmp_path / "other-home")  # a replica that has no copy yet
    with pytest.raises(StoreError, match=f"{v2}: checksum mismatch for model.onnx"):
        reader.verify(v2)
    with pytest.raises(StoreError, match="checksum mismatch"):
        reader.promote(v2)
    assert reader.promoted() == v1
    if backend["name"] == "s3":
        assert not (reader.models_dir / v2).exists(), "a version that failed its checksum was cached"


def test_promote_and_rollback_walk_the_history(backend, tmp_path):
    """Rollback walks back along what was promoted, and says when there is nothing earlier."""
    store = open_store(backend, tmp_path / "home")
    vs = [publish(store, tmp_path, i) for i in range(1, 5)]
    assert store.promoted() is None and store.pointer_problem() is not None  # versions, nothing promoted
    for v in vs:
        store.promote(v, actor="test")
    assert store.promoted() == "v0004" and store.pointer_problem() is None
    assert [store.rollback()["version"] for _ in range(3)] == ["v0003", "v0002", "v0001"]
    with pytest.raises(StoreError, match="nothing to roll back to: v0001 is the earliest"):
        store.rollback()
    assert [e["action"] for e in store.history()] == ["promote"] * 4 + ["rollback"] * 3


def test_damaged_pointer_is_repaired_by_promote(backend, tmp_path):
    """A pointer that is not JSON is reported, refuses rollback, and is repaired (kept aside) by a promote."""
    store = open_store(backend, tmp_path / "home")
    v1 = publish(store, tmp_path, 1)
    store.promote(v1)
    garbage = b"\x00{not json"
    if backend["name"] == "local":
        store.pointer.write_bytes(garbage)
    else:
        store.remote.put("promoted.json", garbage)
    assert "promoted.json is not valid JSON" in store.pointer_problem()
    with pytest.raises(StoreError, match="cannot roll back: promoted.json is not valid JSON"):
        store.rollback()
    event = store.promote(v1, actor="test")
    kept = event["repaired"]["kept_as"]
    assert kept.startswith("promoted.json.broken-")
    kept_bytes = (store.root / kept).read_bytes() if backend["name"] == "local" else store.remote.get(kept)[0]
    assert kept_bytes == garbage
    assert store.promoted() == v1 and store.pointer_problem() is None
    assert [e["action"] for e in store.history()] == ["repair", "promote"]


PROMOTER = """
import json, sys, time
from pathlib import Path
from core.store import Store
go, rounds, mine, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
store = Store()
store.verify(mine)  # cache it now, so every round races on the pointer alone
for r in range(rounds):
    (go / f"ready-{r}-{mine}").touch()
    while not (go / f"go-{r}").exists():
        time.sleep(0.001)
    event = store.promote(mine, actor=mine, reason=f"round {r}")
    with open(out, "a") as f:
        f.write(json.dumps({"round": r, "at": time.time(), **event}) + "\\n")
"""

READER = """
import json, sys, time
from pathlib import Path
from core.store import Store
stop, out = Path(sys.argv[1]), Path(sys.argv[2])
store, reads, bad = Store(), 0, []
while not stop.exists():
    try:
        store.read_pointer()
        reads += 1
    except Exception as e:
        bad.append(repr(e))
out.write_text(json.dumps({"reads": reads, "bad": bad}))
"""


def test_concurrent_promotes_never_lose_an_update(backend, tmp_path):
    """Two processes promote at the same instant, round after round: every promote is in the history, the
    pointer names the last one, and a reader never sees a torn or damaged pointer."""
    rounds = 6
    home = tmp_path / "home"
    store = open_store(backend, home)
    va, vb = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    store.promote(va, actor="setup")
    go = tmp_path / "go"
    go.mkdir()
    env = child_env(backend, home)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(go / "stop"), str(tmp_path / "reads.json")],
                              cwd=ROOT, env=env)
    outs = {v: tmp_path / f"events-{v}.jsonl" for v in (va, vb)}
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, str(go), str(rounds), v, str(outs[v])],
                              cwd=ROOT, env=env) for v in (va, vb)]
    try:
        for r in range(rounds):
            deadline = time.monotonic() + 120
            while not all((go / f"ready-{r}-{v}").exists() for v in (va, vb)):
                assert all(p.poll() is None for p in procs), "a promoter died"
                assert time.monotonic() < deadline, f"promoters not ready for round {r}"
                time.sleep(0.01)
            (go / f"go-{r}").touch()
        for p in procs:
            assert p.wait(180) == 0
    finally:
        (go / "stop").touch()
        reader.wait(60)
        for p in procs:
            p.kill()
    events = [json.loads(line) for v in (va, vb) for line in outs[v].read_text().splitlines()]
    assert len(events) == 2 * rounds
    history = store.history()
    promotes = [(e["actor"], e["reason"]) for e in history if e["actor"] in (va, vb)]
    assert sorted(promotes) == sorted((e["actor"], e["reason"]) for e in events), "an update was lost"
    for r in range(rounds):  # each round: both recorded once, the second written names the first as previous
        pair = [e for e in history if e["reason"] == f"round {r}"]
        assert len(pair) == 2 and pair[1]["previous"] == pair[0]["version"]
    assert store.promoted() == history[-1]["version"]
    reads = json.loads((tmp_path / "reads.json").read_text())
    assert reads["bad"] == [] and reads["reads"] > 0, reads


PUBLISHER = """
import json, sys, time
from pathlib import Path
from core.store import Store
flag, files = Path(sys.argv[1]), json.loads(sys.argv[2])
store = Store()
if store.remote:  # hold the publish after its first file is uploaded: killed mid-upload
    upload = type(store.remote).upload
    def held(self, rel, path):
        upload(self, rel, path)
        flag.write_text(rel)
        time.sleep(600)
    type(store.remote).upload = held
    stamp = None
else:  # a folder store's publish is held once its staging entry is being built
    def stamp(version):
        flag.write_text(version)
        time.sleep(600)
        return {}
store.publish({k: Path(v) for k, v in files.items()}, {"onnx_sha256": "0" * 64}, stamp=stamp)
"""


def test_publish_killed_midway_leaves_no_version(backend, tmp_path):
    """kill -9 during a publish: no version appears, and the next publish succeeds (on S3 under a new number,
    since the claimed one is never reused)."""
    home = tmp_path / "home"
    store = open_store(backend, home)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    files = {"a-big.bin": str(big), "model.onnx": str(tiny_model(tmp_path / "m.onnx", 3))}
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(flag), json.dumps(files)], cwd=ROOT,
                            env=child_env(backend, home))
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, "the publisher exited before it was held"
        assert time.monotonic() < deadline, "the publisher never got going"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    if backend["name"] == "s3":
        assert flag.read_text().startswith("models/refit/v0001/"), flag.read_text()  # a file really was uploaded
        assert store.remote.list("models/refit/v0001/model.yaml") == []
    fresh = open_store(backend, tmp_path / "home-2" if backend["name"] == "s3" else home)
    assert fresh.versions() == []
    with pytest.raises(StoreError, match="the store has no versions yet"):
        fresh.resolve("latest")
    v = publish(fresh, tmp_path, 4)
    assert fresh.versions() == [v] and v == ("v0002" if backend["name"] == "s3" else "v0001")


def test_s3_version_published_by_one_replica_is_served_from_anothers_cache(tmp_path, s3_endpoint):
    """Replica A publishes and promotes through S3; replica B (its own REFIT_HOME) downloads the version,
    checks it, serves it from BentoML's local model store, and follows A's next promote."""
    from service.model import ModelHolder

    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    a = Store(tmp_path / "replica-a", url=url)
    v1, v2 = publish(a, tmp_path, 1), publish(a, tmp_path, 2)
    a.promote(v1, actor="replica-a")
    b = Store(tmp_path / "replica-b", url=url)
    assert b.versions() == [v1, v2] and not (b.models_dir / v1).exists()
    holder = ModelHolder(b, threads=1, poll_seconds=0.1)
    try:
        item = {"name": "red.jpg", "data": jpeg_bytes("red"), "top_k": 2, "threshold": 0.0}
        assert holder.classify([item])[0]["version"] == v1
        assert (b.models_dir / v1 / "model.yaml").is_file() and not (b.models_dir / v2).exists()
        bentoml_cli = str(Path(sys.executable).parent / "bentoml")
        listed = subprocess.run([bentoml_cli, "models", "list", "-o", "json"], cwd=ROOT, capture_output=True,
                                env={**os.environ, "BENTOML_HOME": str(b.home)}, text=True, timeout=120)
        assert f"refit:{v1}" in listed.stdout, listed.stdout + listed.stderr
        a.promote(v2, actor="replica-a")
        deadline = time.monotonic() + 5
        while holder.classify([item])[0]["version"] != v2:
            assert time.monotonic() < deadline, "replica B did not follow the promote within 5 s"
            time.sleep(0.05)
        assert sha256_file(b.models_dir / v2 / "model.onnx") == b.info(v2)["onnx_sha256"]
    finally:
        holder.close()


def test_s3_service_serves_the_promoted_version_and_follows_a_cli_promote(tmp_path, s3_endpoint):
    """`bentoml serve` with REFIT_STORE=s3://... serves the promoted version from its cache, lists the
    store's versions, and follows a promote made by the `refit` CLI on another REFIT_HOME within 5 s."""
    import httpx
    from serving import AUTH, Server, predict, wait_serving

    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    publisher = Store(tmp_path / "publisher", url=url)
    v1, v2 = publish(publisher, tmp_path, 1), publish(publisher, tmp_path, 2)
    publisher.promote(v1, actor="setup")
    (tmp_path / "data").mkdir()
    server = Server(tmp_path / "replica", tmp_path / "data", tmp_path / "serve.log",
                    env={"REFIT_STORE": url, "REFIT_TRAIN_STANDBY": "0"})
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            wait_serving(http, v1)
            r = predict(http, ("red.jpg", jpeg_bytes("red")))
            assert r.status_code == 200 and r.json()[0]["version"] == v1, r.text
            listed = http.get("/versions").json()
            assert [row["id"] for row in listed["versions"]] == [v1, v2] and listed["promoted"] == v1
            assert (server.home / "models" / "refit" / v1 / "model.yaml").is_file()
            cli = subprocess.run([sys.executable, "-m", "cli", "promote", v2, "--reason", "from the CLI"],
                                 cwd=ROOT, env=child_env({"url": url, "env": s3_endpoint}, tmp_path / "operator"),
                                 capture_output=True, text=True, timeout=300)
            assert cli.returncode == 0, cli.stdout + cli.stderr
            assert wait_serving(http, v2, timeout=5) < 5
            assert predict(http, ("red.jpg", jpeg_bytes("red"))).json()[0]["version"] == v2
            rolled = http.post("/rollback", json={"reason": "back"}, headers=AUTH)
            assert rolled.status_code == 200 and rolled.json()["promoted"] == v1, rolled.text
            assert publisher.promoted() == v1
    finally:
        server.stop()


def test_records_are_written_whole_and_conditionally(backend, tmp_path):
    """Job state and the one-job line are records two machines write: create-only and compare-and-swap must
    refuse the second writer on both backends, never tear the record."""
    shared = backend["url"] is None  # a folder store is its home folder: two writers share it
    a, b = open_store(backend, tmp_path / "a"), open_store(backend, tmp_path / ("a" if shared else "b"))
    assert a.record("jobs/line.json") == (None, None)
    assert a.put_record("jobs/line.json", {"job": "one"}, create_only=True)
    assert not b.put_record("jobs/line.json", {"job": "two"}, create_only=True)  # it exists now
    got, tag = b.record("jobs/line.json")
    assert got == {"job": "one"} and tag
    assert a.put_record("jobs/line.json", {"job": "three"}, if_tag=tag)
    assert not b.put_record("jobs/line.json", {"job": "four"}, if_tag=tag)  # the record changed since b read it
    assert a.record("jobs/line.json")[0] == {"job": "three"}
    src = tmp_path / "dataset.zip"
    src.write_bytes(b"PK\x05\x06" + bytes(18))
    a.put_file("jobs/x/dataset.zip", src)
    b.get_file("jobs/x/dataset.zip", tmp_path / "copy.zip")
    assert (tmp_path / "copy.zip").read_bytes() == src.read_bytes()
    b.delete_file("jobs/x/dataset.zip")
    with pytest.raises(FileNotFoundError):
        a.get_file("jobs/x/dataset.zip", tmp_path / "again.zip")
