"""Replicas on one store: every model worker of every replica keeps a status record in the store, with an
expiry, so `/versions` on any replica shows what all of them serve, and a dead replica's workers drop out
after the TTL without anyone checking process ids (a reader on another machine could not).

Two `bentoml serve` replicas on one S3 store (moto's server on loopback), each with its own REFIT_HOME as
its cache, serving small real ONNX versions; and one folder store that a killed server leaves records in.
"""
from __future__ import annotations

import threading
import time
import uuid

import boto3
import httpx
import pytest
from conftest import S3_BUCKET, jpeg_bytes
from serving import AUTH, Server, own_workers, predict
from test_store_contract import publish

from core.store import ENTRIES, Store

HEARTBEAT, TTL = 1, 5  # seconds; short, so an expiry is seen within a test
FAST = {"REFIT_TRAIN_STANDBY": "0", "REFIT_HEARTBEAT_SECONDS": str(HEARTBEAT), "REFIT_STATUS_TTL_SECONDS": str(TTL)}
RED = ("red.jpg", jpeg_bytes("red"))


def replicas_of(listing: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for w in listing["serving"]:
        out.setdefault(w["replica"], []).append(w)
    return out


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Replicas A and B on one S3 store holding v1 (promoted), v2, and v3 whose model file was changed in the
    bucket after publish."""
    root = tmp_path_factory.mktemp("replicas")
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    publisher = Store(root / "publisher", url=url)
    versions = [publish(publisher, root, seed) for seed in (1, 2, 3)]
    publisher.promote(versions[0], actor="setup")
    bucket, prefix = url[len("s3://"):].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{ENTRIES}{versions[2]}/model.onnx", Body=b"changed")
    (root / "data").mkdir()
    servers = {name: Server(root / name, root / "data", root / f"{name}.log", env={"REFIT_STORE": url, **FAST})
               for name in ("a", "b")}
    for srv in servers.values():
        srv.start()
    yield {"url": url, "bucket": bucket, "prefix": prefix, "versions": versions, **servers}
    for srv in servers.values():
        srv.stop(kill=True)


def test_versions_on_one_replica_lists_every_live_replicas_workers(cluster):
    """A replica's status used to be pid files on its own disk: another machine's replica saw nothing of it."""
    a, b, v1 = cluster["a"], cluster["b"], cluster["versions"][0]
    assert a.replica != b.replica
    for srv in (a, b):
        listing = httpx.get(srv.url + "/versions", timeout=30).json()
        assert listing["replica"] == srv.replica
        workers = replicas_of(listing)
        assert sorted(workers) == sorted([a.replica, b.replica]), listing["serving"]
        assert all(len(ws) == 2 and all(w["version"] == v1 and w["error"] is None for w in ws)
                   for ws in workers.values()), listing["serving"]
        assert all({"pid", "loaded_at", "updated"} <= set(w) for w in listing["serving"])
        # Readiness and the per-worker metric are this replica's own.
        assert httpx.get(srv.url + "/readyz", timeout=30).status_code == 200
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
        series = [line for line in metrics.splitlines() if line.startswith("refit_worker_version_info{")]
        assert len(series) == 2 and all(f'replica="{srv.replica}"' in line for line in series), series


def test_refused_promote_on_one_replica_is_listed_by_the_other(cluster):
    """Refusals were kept in a file on the replica that refused."""
    a, b, v3 = cluster["a"], cluster["b"], cluster["versions"][2]
    r = httpx.post(b.url + "/promote", json={"version": v3, "reason": "test"}, headers=AUTH, timeout=60)
    assert r.status_code == 409 and "checksum" in r.json()["error"], r.text
    refused = httpx.get(a.url + "/versions", timeout=30).json()["refused"]
    assert any(x["version"] == v3 and "checksum" in x["reason"] and x["replica"] == b.replica for x in refused), \
        refused


def test_promote_through_one_replica_reaches_every_worker_of_both_within_5s(cluster):
    """Every replica serves a promote made through any one within 5 s, and no request fails during the swap."""
    a, b, v2 = cluster["a"], cluster["b"], cluster["versions"][1]
    statuses, stop = [], threading.Event()

    def load(srv: Server) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                r = predict(c, RED)
                statuses.append((r.status_code, r.text[:200]))

    threads = [threading.Thread(target=load, args=(srv,)) for srv in (a, b, a, b)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        asked = time.monotonic()
        r = httpx.post(a.url + "/promote", json={"version": v2, "reason": "roll out"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        # From the moment the promote is made: its reply, which comes once the pointer is written (the
        # promote itself first downloads and checks the version, about a second here under this load).
        t0, seconds = time.monotonic(), None
        while time.monotonic() - t0 < 15:
            workers = httpx.get(b.url + "/versions", timeout=30).json()["serving"]
            if len(workers) == 4 and all(w["version"] == v2 for w in workers):
                seconds = time.monotonic() - t0
                break
            time.sleep(0.1)
        time.sleep(1)  # a little load on the new version too
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    print(f"4 workers of 2 replicas on {v2} {seconds}s after the promote's reply ({t0 - asked:.2f}s after it "
          f"was asked); {len(statuses)} predictions")
    assert seconds is not None and seconds < 5, f"not every worker serves {v2} ({seconds}s): {workers}"
    assert statuses and all(code == 200 for code, _ in statuses), [s for s in statuses if s[0] != 200][:5]
    for srv in (a, b):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert predict(c, RED).json()[0]["version"] == v2
        assert (srv.home / "models" / "refit" / v2 / "model.yaml").is_file()  # served from its own cache


def test_killed_replica_drops_out_of_every_listing_after_the_ttl(cluster):
    """A replica killed with kill -9 cannot remove its records; they must expire instead of staying forever."""
    a, b = cluster["a"], cluster["b"]
    assert b.replica in replicas_of(httpx.get(a.url + "/versions", timeout=30).json())
    b.stop(kill=True)  # supervisor, front and both model workers at once
    t0 = time.monotonic()
    while b.replica in replicas_of(httpx.get(a.url + "/versions", timeout=30).json()):
        assert time.monotonic() - t0 < TTL + 10, f"{b.replica} still listed {TTL + 10}s after it was killed"
        time.sleep(0.25)
    print(f"killed replica gone from the listing {time.monotonic() - t0:.1f}s after the kill (TTL {TTL}s)")
    listing = httpx.get(a.url + "/versions", timeout=30).json()
    assert list(replicas_of(listing)) == [a.replica] and len(own_workers(listing)) == 2, listing["serving"]
    left = boto3.client("s3").list_objects_v2(Bucket=cluster["bucket"],
                                              Prefix=f"{cluster['prefix']}/serving/{b.replica}/")
    assert left.get("KeyCount", 0) == 0, left.get("Contents")  # the reader removed the expired records
    assert httpx.get(a.url + "/readyz", timeout=30).status_code == 200


def test_folder_store_dead_servers_records_expire_without_a_pid_check(tmp_path):
    """Liveness was `os.kill(pid, 0)` on pid files: meaningless for a replica on another machine."""
    home = tmp_path / "home"
    store = Store(home)
    store.promote(publish(store, tmp_path, 1), actor="setup")
    first = Server(home, tmp_path, tmp_path / "first.log", env=FAST)
    first.start()
    first.stop(kill=True)
    assert len(list((home / "serving" / first.replica).glob("*.json"))) == 2  # nobody removed them
    second = Server(home, tmp_path, tmp_path / "second.log", env=FAST)
    second.start()
    try:
        t0 = time.monotonic()
        while first.replica in replicas_of(listing := httpx.get(second.url + "/versions", timeout=30).json()):
            assert time.monotonic() - t0 < TTL + 10, f"the dead server's workers are still listed: {listing}"
            time.sleep(0.25)
        assert list(replicas_of(listing)) == [second.replica], listing["serving"]
        assert not list((home / "serving" / first.replica).glob("*.json"))
        # A clean stop removes the records at once, without waiting for the TTL.
        second.stop()
        assert not list((home / "serving" / second.replica).glob("*.json"))
    finally:
        second.stop(kill=True)
