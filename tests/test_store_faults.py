"""An S3 store on a bad day, as the replicas and workers meet it: S3 gone and back, a bucket re-created empty
that numbers from v0001 again, replicas that start together on an empty store, and what publishes and jobs
cut short leave behind.

Real parts throughout: moto's S3 server (a second one, for this module, that a test stops and starts again
on the same port, empty, as a restarted S3 endpoint without persistence is), `bentoml serve` replicas with
their own REFIT_HOME caches, publishes in child processes killed or stopped with signals, and `refit worker`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from conftest import ROOT, S3_BUCKET, jpeg_bytes
from serving import Server, free_port, own_workers, predict
from test_store_contract import publish, tiny_model

from core.contract import Contract
from core.store import ENTRIES, Store, sha256_file

BUCKET = "refit-faults"
FAST = {"REFIT_TRAIN_STANDBY": "0", "REFIT_HEARTBEAT_SECONDS": "1", "REFIT_STATUS_TTL_SECONDS": "5"}
RED = ("red.jpg", jpeg_bytes("red"))


class Moto:
    """moto's S3 server on a fixed loopback port, one request at a time (as in conftest.py); `stop` is S3 gone,
    `start` again is an endpoint back without any bucket."""

    def __init__(self, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        code = ("from werkzeug.serving import run_simple\n"
                "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, "
                "create_backend_app\n"
                f"run_simple('127.0.0.1', {self.port}, DomainDispatcherApplication(create_backend_app), "
                "threaded=False, request_handler=MotoRequestHandler)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def client(self):
        return boto3.client("s3", endpoint_url=self.url)


def entry_with_classes(root: Path, version: str, classes: tuple[str, ...], seed: int) -> Path:
    """A complete version folder named `version` for a model of `classes` (as one packed into a bento is),
    made by a folder store's publish and renamed."""
    import onnx

    model = tiny_model(root / f"m-{seed}.onnx", seed)
    proto = onnx.load(model)
    for prop in proto.metadata_props:
        if prop.key == "refit.contract":
            prop.value = Contract(input_size=8, resize_size=8, class_names=classes).to_json()
    onnx.save(proto, model)
    sha = sha256_file(model)
    folder = Store(root / f"made-{seed}")
    made = folder.publish({"model.onnx": model}, {"strategy": "feature_extraction", "onnx_sha256": sha,
                                                 "serving_file": "model.onnx", "serving_sha256": sha,
                                                 "classes": list(classes)})
    return (folder.models_dir / made).rename(root / f"made-{seed}" / version)


# --- two replicas through an S3 outage and a bucket re-created empty (items 1 and 7) --------------------

@pytest.fixture(scope="module")
def pair(s3_endpoint, tmp_path_factory):
    """Replicas A and B on their own moto, serving v0001 (red/blue). B looks at the pointer only at start, so
    it keeps what it loaded: a replica that has not caught up, as a slow or partitioned one is."""
    root = tmp_path_factory.mktemp("faults")
    moto = Moto(root / "moto.log")
    moto.start()
    moto.client().create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/store"
    env = {"REFIT_STORE": url, "AWS_ENDPOINT_URL": moto.url, **FAST}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", moto.url)  # while the seeder's S3 client is made
        seeder = Store(root / "seeder", url=url)
        v1 = publish(seeder, root, 1)
        seeder.promote(v1, actor="setup")
        sha1 = seeder.info(v1)["serving_sha256"]
    (root / "data").mkdir()
    a = Server(root / "a", root / "data", root / "a.log", env=env)
    b = Server(root / "b", root / "data", root / "b.log", env={**env, "REFIT_POLL_SECONDS": "3600"})
    state = {"moto": moto, "root": root, "url": url, "env": env, "a": a, "b": b, "v1": v1, "sha1": sha1}
    try:
        for srv in (a, b):
            srv.start()
        yield state
    finally:
        for name in ("a", "b"):  # a test may have restarted one
            state[name].stop(kill=True)
        moto.stop()


@pytest.fixture
def on_pair_s3(pair, monkeypatch):
    """In-process stores of a test talk to the pair's moto."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", pair["moto"].url)
    return pair


def listing(srv: Server) -> httpx.Response:
    return httpx.get(srv.url + "/versions", timeout=120)


def recreate_empty(moto: Moto) -> None:
    """The bucket as a restarted S3 endpoint re-created empty has it, whatever the tests before left."""
    s3 = moto.client()
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=o["Key"])


def test_versions_answers_its_json_with_the_problem_while_s3_is_down_or_the_bucket_is_missing(pair):
    """/versions was a bare text 500 while S3 was unreachable or the bucket missing."""
    a, moto = pair["a"], pair["moto"]
    assert listing(a).json()["problem"] is None
    moto.stop()
    try:
        down = listing(a)
        moto.start()  # S3 back, without the bucket
        missing = listing(a)
    finally:  # the next tests start from a bucket re-created empty, whatever happened here
        if moto.proc.poll() is not None:
            moto.start()
        moto.client().create_bucket(Bucket=BUCKET)
    for r in (down, missing):
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text[:300]
        assert set(r.json()) >= {"promoted", "problem", "versions", "replica", "serving", "refused"}, r.json()
    assert "cannot be read" in down.json()["problem"] and "cannot be reached" in down.json()["problem"], down.json()
    assert "NoSuchBucket" in missing.json()["problem"], missing.json()
    assert predict(httpx.Client(base_url=a.url, timeout=60), RED).status_code == 200  # A kept serving v0001


def test_a_store_recreated_empty_numbers_after_the_versions_the_replicas_hold(on_pair_s3, tmp_path):
    """Numbering restarted from the bucket's highest claim: the next publish was v0001 again, an id both
    replicas' caches hold as another model."""
    pair = on_pair_s3
    a, b = pair["a"], pair["b"]
    recreate_empty(pair["moto"])
    deadline = time.monotonic() + 30
    while len((workers := listing(a).json()["serving"])) < 4:  # their heartbeats land in the new bucket
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)
    assert {w["replica"] for w in workers} == {a.replica, b.replica}
    publisher = Store(tmp_path / "worker", url=pair["url"])  # a worker's home: nothing cached
    assert publisher.versions() == []
    assert publish(publisher, tmp_path, 5) == "v0002"


def test_replica_serves_the_stores_model_for_a_reused_id_and_versions_shows_it(on_pair_s3, tmp_path):
    """A re-created store's v0001 is another model (ants/bees). A replica served its cached v0001 (red/blue)
    under that id: a running one kept the model it had, a restarted one trusted its cache. /versions showed
    every worker on "v0001"."""
    pair = on_pair_s3
    a, b, v1 = pair["a"], pair["b"], pair["v1"]
    recreate_empty(pair["moto"])  # once more: whatever the test before published goes
    deadline = time.monotonic() + 30
    while len(before := [w for w in listing(a).json()["serving"] if w["replica"] == b.replica]) < 2:
        assert time.monotonic() < deadline, before  # B's heartbeats write its records again
        time.sleep(0.25)
    assert {w["version"] for w in before} == {v1}, before
    store = Store(tmp_path / "operator", url=pair["url"])
    assert store.add_entry(entry_with_classes(tmp_path, v1, ("ants", "bees"), 7)) == v1  # e.g. seeded from a bento
    new_sha = store.info(v1)["serving_sha256"]
    assert new_sha != pair["sha1"]
    store.promote(v1, actor="test", reason="the re-created store's first model")
    deadline = time.monotonic() + 30
    while {w.get("sha256") for w in own_workers(listing(a).json())} != {new_sha}:
        if time.monotonic() > deadline:
            with httpx.Client(base_url=a.url, timeout=60) as c:
                pytest.fail(f"A still serves its old {v1}: it predicts {predict(c, RED).json()[0]['label']}")
        time.sleep(0.25)
    with httpx.Client(base_url=a.url, timeout=60) as c:
        assert predict(c, RED).json()[0]["label"] in ("ants", "bees")
    # B has not looked at the pointer since: it serves the old model under the same id, and /versions says so.
    shown = listing(a).json()["disagreement"]
    assert shown and f"{v1} is served as different models" in shown["message"], shown
    assert f"serve a {v1} that is not the store's" in shown["message"] and b.replica in shown["message"], shown
    assert {(s["version"], s["sha256"]) for s in shown["served"]} == {(v1, new_sha), (v1, pair["sha1"])}, shown
    # Restarted, B checks its cached v0001 against the store's record and fetches the store's.
    b.stop()
    restarted = Server(b.home, b.data_root, b.log_path, env=pair["env"])
    pair["b"] = restarted
    restarted.start()
    with httpx.Client(base_url=restarted.url, timeout=60) as c:
        assert predict(c, RED).json()[0]["label"] in ("ants", "bees")
    deadline = time.monotonic() + 30
    while (now := listing(restarted).json())["disagreement"] is not None or len(now["serving"]) != 4:
        assert time.monotonic() < deadline, now["disagreement"] or now["serving"]
        time.sleep(0.25)
    assert {w["sha256"] for w in now["serving"]} == {new_sha}
    assert "not the store's" in restarted.log_path.read_text(errors="replace")  # the replaced copy is logged


# --- two replicas starting together on an empty store (item 6) ---------------------------------------------

def test_two_replicas_starting_together_on_an_empty_store_bootstrap_one_version(s3_endpoint, tmp_path):
    """The bootstrap flock is per REFIT_HOME: two replicas on one empty S3 store each published and promoted an
    ImageNet version, a second apart."""
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    (tmp_path / "data").mkdir()
    servers = [Server(tmp_path / n, tmp_path / "data", tmp_path / f"{n}.log", env={"REFIT_STORE": url, **FAST})
               for n in ("a", "b")]
    threads = [threading.Thread(target=s.start, kwargs={"timeout": 900}) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(960)
        store = Store(tmp_path / "reader", url=url)
        assert store.versions() == ["v0001"], store.versions()
        assert [e["action"] for e in store.history()] == ["promote"], store.history()
        for s in servers:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                assert predict(c, RED).json()[0]["version"] == "v0001"
        waited = "another process is bootstrapping"
        assert sum(waited in s.log_path.read_text(errors="replace") for s in servers) == 1
    finally:
        for s in servers:
            s.stop(kill=True)


# --- orphans: a publish cut short, a worker killed mid-job (item 8) ---------------------------------------

HELD = """
import json, os, sys, time
from pathlib import Path
from core.store import Store
ready, go, files = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
store = Store()
upload, calls = type(store.remote).upload, []
def slow(self, rel, path):  # a slow network: the third file's upload waits for `go`
    calls.append(rel)
    if len(calls) == 3:
        ready.write_text(rel)
        while not go.exists():
            time.sleep(0.05)
    upload(self, rel, path)
type(store.remote).upload = slow
try:
    print("published", store.publish({k: Path(v) for k, v in files.items()}, json.loads(sys.argv[4])), flush=True)
except Exception as e:
    print("refused:", e, flush=True)
    sys.exit(3)
"""
GRACE = 3  # seconds without a claim heartbeat before a claim counts as abandoned; short, for the test
ORPHANS = {"REFIT_CLAIM_HEARTBEAT_SECONDS": "0.3", "REFIT_ORPHAN_GRACE_SECONDS": str(GRACE)}


class Held:
    """A real publish in a child process, held in the middle of its upload until `go`."""

    def __init__(self, tmp: Path, home: Path, url: str, name: str):
        files = {"model.onnx": str(tiny_model(tmp / f"{name}.onnx", 3))}
        for i in range(4):
            (tmp / f"{name}-{i}.bin").write_bytes(os.urandom(256 << 10))
            files[f"extra-{i}.bin"] = str(tmp / f"{name}-{i}.bin")
        sha = sha256_file(Path(files["model.onnx"]))
        meta = {"onnx_sha256": sha, "serving_file": "model.onnx", "serving_sha256": sha}
        self.ready, self.go, self.out = tmp / f"{name}.ready", tmp / f"{name}.go", tmp / f"{name}.out"
        env = {**os.environ, **ORPHANS, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "REFIT_STORE": url}
        self.proc = subprocess.Popen([sys.executable, "-c", HELD, str(self.ready), str(self.go), json.dumps(files),
                                      json.dumps(meta)], cwd=ROOT, env=env, stdout=open(self.out, "w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.ready.exists():
            assert self.proc.poll() is None, self.out.read_text()
            assert time.monotonic() < deadline, "the publish never reached its upload"
            time.sleep(0.05)
        self.version = self.ready.read_text().split("/")[2]

    def finish(self) -> tuple[int, str]:
        self.go.write_text("go")
        return self.proc.wait(120), self.out.read_text()


def keys(store: Store, version: str) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in store.remote.list(f"{ENTRIES}{version}/")}


def claim(store: Store, version: str) -> dict:
    return store.record(f"{ENTRIES}{version}/.claim")[0]


def test_sweep_removes_a_publish_cut_short_and_never_one_that_is_alive(s3_endpoint, tmp_path, monkeypatch):
    """A publish killed mid-upload left its claimed prefix and files in the bucket for good."""
    for k, v in ORPHANS.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    sweeper = Store(tmp_path / "sweeper", url=url)
    killed = Held(tmp_path, tmp_path / "p1", url, "killed")
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.proc.wait(30)
    left = keys(sweeper, killed.version)
    assert ".claim" in left and len(left) >= 3 and "model.yaml" not in left, left
    first = publish(sweeper, tmp_path, 8)  # within the grace: it could be a publish that is only slow
    assert keys(sweeper, killed.version) == left
    time.sleep(GRACE + 0.5)
    second = publish(sweeper, tmp_path, 9)  # the next publish sweeps it
    assert keys(sweeper, killed.version) == {".claim"} and claim(sweeper, killed.version)["abandoned"]
    assert killed.version not in (first, second)  # a claimed number is never handed out again

    # Alive: its claim is rewritten while it uploads, however long that takes; the sweep leaves it alone.
    alive = Held(tmp_path, tmp_path / "p2", url, "alive")
    assert alive.version != killed.version  # a claimed number is never handed out again
    time.sleep(3 * GRACE)
    assert sweeper.sweep_orphans() == [] and "abandoned" not in claim(sweeper, alive.version)
    rc, out = alive.finish()
    assert rc == 0 and f"published {alive.version}" in out, out
    sweeper.verify(alive.version)  # whole and checked

    # Stalled (SIGSTOP) past the grace: swept; when it goes on, it stops before its model.yaml.
    stalled = Held(tmp_path, tmp_path / "p3", url, "stalled")
    os.kill(stalled.proc.pid, signal.SIGSTOP)
    time.sleep(GRACE + 0.5)
    assert sweeper.sweep_orphans() == [f"{url}/{ENTRIES}{stalled.version}"]
    os.kill(stalled.proc.pid, signal.SIGCONT)
    rc, out = stalled.finish()
    assert rc == 3 and "taken over by an orphan sweep" in out, out
    assert "model.yaml" not in keys(sweeper, stalled.version) and stalled.version not in sweeper.versions()
    sweeper.sweep_orphans()  # what it uploaded after the sweep goes at the next one
    assert keys(sweeper, stalled.version) == {".claim"}
    assert sweeper.versions() == sorted([first, second, alive.version])


def test_restarted_worker_removes_what_its_killed_job_left_and_nothing_a_live_job_uses(s3_endpoint, redis_url,
                                                                                        tmp_path):
    """A worker's tmp/staging-* and jobs/<id> survived its restart."""
    from core.store import now_iso
    from service.queue import record_key

    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    home = tmp_path / "w1"
    store = Store(home, url=url)
    live_publish = Held(tmp_path, home, url, "live")  # a live publish on this machine: its staging is in use
    dead_staging = home / "tmp" / f"staging-{uuid.uuid4().hex}"
    (dead_staging / "refit" / "v0009").mkdir(parents=True)
    (dead_staging / "refit" / "v0009" / "model.onnx").write_bytes(os.urandom(1 << 20))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    jobs = {"20260101-000000-aaaaaaaa": live_publish.proc.pid, "20260101-000000-ffffffff": int(gone.stdout)}
    for job_id, horse in jobs.items():
        record = {"id": job_id, "status": "running", "created": now_iso(), "started": now_iso(),
                  "heartbeat": now_iso(), "worker": f"w1/{horse}"}
        store.put_record(record_key(job_id), record)  # running, heartbeat fresh: killed moments ago
        (home / "jobs" / job_id / "data" / "ants").mkdir(parents=True)
        (home / "jobs" / job_id / "job.json").write_text(json.dumps(record))
    live_job, dead_job = (home / "jobs" / j for j in jobs)
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "REFIT_STORE": url,
           "REFIT_QUEUE": redis_url, "REFIT_TRAIN_THREADS": "1"}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--name", "w1"], cwd=ROOT, env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while dead_job.exists() or dead_staging.exists():  # the dead job's folder is the sweep's last
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not swept at the worker's start:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        worker.kill()
        worker.wait(30)
    assert live_job.is_dir() and [p for p in (home / "tmp").glob("staging-*")], "a live job's files were removed"
    rc, out = live_publish.finish()
    assert rc == 0 and "published" in out, out


# --- a bootstrap, a claim heartbeat and a cache eviction cut short or raced (items 1, 4, 6, 8) -------------

def test_a_bootstrap_claim_left_by_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path, monkeypatch):
    """A first bootstrap killed during its export left `bootstrap.json` without `done`: every start in the next
    15 minutes waited 300 s for it and then served nothing."""
    import socket

    from core.store import now_iso
    from training import bootstrap as pipeline

    monkeypatch.setattr(pipeline, "BOOTSTRAP_WAIT_SECONDS", 3)  # waiting would fail in 3 s, not 300
    store = Store(tmp_path / "home")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(60)
    dead = {"at": now_iso(), "host": socket.gethostname(), "pid": gone.pid}
    said: list[str] = []
    for claim in (dead, {**dead, "pid": os.getpid()}):  # ours: a dead container's that had our hostname and pid
        store.put_record(pipeline.BOOTSTRAP_CLAIM, claim)
        assert pipeline._claim_bootstrap(store, said.append) and said == []
        assert store.record(pipeline.BOOTSTRAP_CLAIM)[0]["pid"] == os.getpid()
    # Kept: a live process here (another REFIT_HOME on the same store), or any claim from another host.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        for claim in ({**dead, "pid": live.pid}, {**dead, "host": "elsewhere"}):
            store.put_record(pipeline.BOOTSTRAP_CLAIM, claim)
            assert not pipeline._claim_bootstrap(store, said.append)
            assert "another process is bootstrapping" in said[0], said
            said.clear()
            assert store.record(pipeline.BOOTSTRAP_CLAIM)[0] == claim
    finally:
        live.kill()
        live.wait(30)


def test_a_claim_heartbeat_that_landed_on_a_retry_is_not_a_takeover(s3_endpoint, tmp_path):
    """A conditional heartbeat PUT that botocore retried after it had landed got a 412; that counted as the
    sweep's takeover for good, and the publish was refused at its last step."""
    from core.claims import ClaimBeat as _ClaimBeat
    from core.store import StoreError, now_iso

    store = Store(tmp_path / "home", url=f"s3://{S3_BUCKET}/{uuid.uuid4().hex}")
    key, note = f"{ENTRIES}v0042/.claim", {"at": now_iso(), "host": "h", "pid": 1}
    beat = _ClaimBeat(store.remote, key, note, store.remote.put(key, json.dumps(note).encode(), create_only=True),
                      every=3600)
    # What the first try of a retried PUT leaves: our heartbeat, under an ETag this beat never got back.
    store.remote.put(key, json.dumps({**note, "updated": "earlier"}).encode())
    beat.confirm()
    beat.confirm()  # and it goes on writing over the ETag it read
    assert beat.lost is None and json.loads(store.remote.get(key)[0])["updated"] != "earlier"
    store.remote.put(key, json.dumps({**note, "abandoned": now_iso(), "by": "sweeper/1"}).encode())
    with pytest.raises(StoreError, match="taken over by an orphan sweep"):
        beat.confirm()


def test_evicting_a_stale_cached_copy_keeps_the_store_copy_another_process_fetched(s3_endpoint, tmp_path):
    """Two processes of one replica both found a cached copy that was not the store's; the one that got there
    second moved aside the good copy the first had just fetched."""
    import shutil

    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    v = publish(Store(tmp_path / "writer", url=url), tmp_path, 1)
    first, second = Store(tmp_path / "replica", url=url), Store(tmp_path / "replica", url=url)
    shutil.copytree(entry_with_classes(tmp_path, v, ("ants", "bees"), 7), first.models_dir / v)  # the old store's
    record = first._store_record(v)
    assert not first._cached_is(v, record)  # what the first process saw before the second went ahead
    second.verify(v)  # evicts it, fetches the store's copy
    assert second._cached_is(v, record)
    first._evict(v, record, "its model.yaml differs")
    assert first._cached_is(v, record) and first.verify(v) == first.models_dir / v / "model.onnx"
