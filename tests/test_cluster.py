"""Refit on several machines, on loopback: two serving replicas (two `bentoml serve`, each with its own cache
folder), one S3 store (moto's server), Redis, and `refit worker` processes taking retrain jobs from the queue.

A retrain submitted to one replica is trained by a worker and served by both, with every prediction sent
during the job and the swap answered. A worker killed with kill -9 mid-job leaves its job failed and
nothing published, and another worker takes the next job.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
from conftest import ROOT, S3_BUCKET, jpeg_bytes
from serving import AUTH, Server, dataset_files, make_zip, predict
from test_store_contract import publish

from core.store import Store

TTL = 10  # seconds without a heartbeat before a running job counts as lost; short, so a test sees it
ENV = {"REFIT_TRAIN_STANDBY": "0", "REFIT_JOB_TTL_SECONDS": str(TTL), "REFIT_HEARTBEAT_SECONDS": "1",
       "REFIT_STATUS_TTL_SECONDS": "5", "REFIT_TRAIN_THREADS": "1"}
RED = ("red.jpg", jpeg_bytes("red"))
FIELDS = {"strategy": "feature_extraction", "epochs": "3", "promote": "true", "seed": "1"}


class Worker:
    """`refit worker` as an operator starts it: its own REFIT_HOME, the shared store and the queue."""

    def __init__(self, name: str, home: Path, store_url: str, queue_url: str):
        self.name, self.home = name, home
        self.log_path = home.parent / f"{name}.log"
        env = {**os.environ, **ENV, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "REFIT_STORE": store_url,
               "REFIT_QUEUE": queue_url}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--name", name], cwd=ROOT,
                                     env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)

    def wait_listening(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "Listening on" not in self.log_path.read_text(errors="replace"):
            assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"worker {self.name} not listening:\n{self.log_tail()}"
            time.sleep(0.5)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        for p in ([psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
                  if self.proc.poll() is None else []):
            p.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def cluster(s3_endpoint, redis_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    seeder = Store(root / "seeder", url=url)
    v1 = publish(seeder, root, 1)
    seeder.promote(v1, actor="setup")
    (root / "data").mkdir()
    env = {"REFIT_STORE": url, "REFIT_QUEUE": redis_url, **ENV}
    servers = {name: Server(root / name, root / "data", root / f"{name}.log", env=env) for name in ("a", "b")}
    workers = {"w1": Worker("w1", root / "w1", url, redis_url)}
    for srv in servers.values():
        srv.start()
    workers["w1"].wait_listening()
    bucket, prefix = url[len("s3://"):].split("/", 1)
    yield {"url": url, "queue": redis_url, "root": root, "v1": v1, "workers": workers, "bucket": bucket,
           "prefix": prefix, **servers}
    for w in workers.values():
        w.stop()
    for srv in servers.values():
        srv.stop(kill=True)


def submit(srv: Server, fields: dict = FIELDS) -> str:
    r = httpx.post(srv.url + "/retrain/submit", files={"dataset": ("colours.zip", make_zip(dataset_files()))},
                   data=fields, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["task_id"]


def wait_status(srv: Server, task_id: str, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(srv.url + "/retrain/status", params={"task_id": task_id}, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        if r.json()["status"] != "in_progress":
            return r.json()["status"]
        time.sleep(1)
    pytest.fail(f"task {task_id} still in progress after {timeout}s: {job(srv, task_id)}")


def job(srv: Server, job_id: str) -> dict:
    r = httpx.get(f"{srv.url}/jobs/{job_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def published(cluster) -> list[str]:
    """Versions visible in the bucket: a version is complete when its model.yaml is there."""
    keys = boto3.client("s3").list_objects_v2(Bucket=cluster["bucket"], Prefix=cluster["prefix"] + "/")
    return sorted(k["Key"].split("/")[-2] for k in keys.get("Contents", []) if k["Key"].endswith("/model.yaml"))


def test_retrain_on_one_replica_is_trained_by_a_worker_and_served_by_both(cluster):
    """A retrain submitted to replica A runs on the worker; A and B both serve the new version, and every
    prediction sent to either replica during the job and the swap is answered."""
    a, b = cluster["a"], cluster["b"]
    statuses, stop = [], threading.Event()

    def load(srv: Server) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                r = predict(c, RED)
                statuses.append((r.status_code, r.text[:200]))
                time.sleep(0.05)

    threads = [threading.Thread(target=load, args=(srv,)) for srv in (a, b)]
    for t in threads:
        t.start()
    try:
        task = submit(a)
        # Any replica answers for the job: its state is in the store, not in the replica that admitted it.
        seen_running = None
        deadline = time.monotonic() + 400
        while (state := job(b, task))["status"] in ("queued", "running"):
            if state["status"] == "running" and state.get("progress"):
                seen_running = state
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["status"] == "succeeded", state
        new = state["result"]["version"]
        assert state["result"]["promoted"] is True
        for srv in (a, b):
            r = httpx.get(srv.url + "/retrain/get", params={"task_id": task}, headers=AUTH, timeout=30)
            assert r.status_code == 200 and r.json()["version"] == new, r.text
        t0 = time.monotonic()
        while True:
            workers = httpx.get(b.url + "/versions", timeout=30).json()["serving"]
            if len(workers) == 4 and all(w["version"] == new for w in workers):
                break
            assert time.monotonic() - t0 < 5, f"not every worker of both replicas serves {new} 5 s later: {workers}"
            time.sleep(0.1)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    print(f"{len(statuses)} predictions during the job and the swap; progress seen: {seen_running and seen_running['progress']}")
    assert seen_running is not None and seen_running["worker"].startswith("w1/"), "no progress reported while running"
    assert statuses and all(code == 200 for code, _ in statuses), [s for s in statuses if s[0] != 200][:5]
    assert {r.json()[0]["version"] for r in (predict(httpx.Client(base_url=s.url, timeout=60), RED) for s in (a, b))} == {new}
    assert new in published(cluster)


def test_worker_killed_mid_job_fails_the_job_publishes_nothing_and_another_worker_takes_the_next(cluster):
    """kill -9 of the worker training a job: the job ends failed, no version appears, the line is free again,
    and the next job is trained by the other worker."""
    a, b = cluster["a"], cluster["b"]
    w2 = cluster["workers"]["w2"] = Worker("w2", cluster["root"] / "w2", cluster["url"], cluster["queue"])
    w2.wait_listening()
    before = published(cluster)
    task = submit(b)
    deadline = time.monotonic() + 180
    while not (state := job(a, task)).get("progress"):
        assert state["status"] in ("queued", "running") and time.monotonic() < deadline, state
        time.sleep(0.2)
    name, horse = state["worker"].split("/")
    victim = cluster["workers"][name]
    victim.proc.send_signal(signal.SIGKILL)  # the worker process only; its work horse must not outlive it
    victim.proc.wait(30)
    t0 = time.monotonic()
    while psutil.pid_exists(int(horse)) and psutil.Process(int(horse)).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() - t0 < 10, "the work horse kept training after its worker was killed"
        time.sleep(0.1)
    assert wait_status(a, task, timeout=TTL + 60) == "failed"
    failed = httpx.get(a.url + "/retrain/get", params={"task_id": task}, headers=AUTH, timeout=30)
    assert failed.status_code == 500 and "stopped" in failed.json()["error"], failed.text
    print(f"job {task} recorded failed {time.monotonic() - t0:.1f}s after its worker was killed")
    assert published(cluster) == before  # nothing of the killed job is visible
    listed = [v["id"] for v in httpx.get(b.url + "/versions", timeout=30).json()["versions"]]
    assert listed == before, listed
    # The next job goes to the worker still alive.
    survivor = "w1" if name == "w2" else "w2"
    task2 = submit(a)
    assert wait_status(b, task2) == "completed", job(b, task2)
    assert job(b, task2)["worker"].startswith(survivor + "/")
    assert len(published(cluster)) == len(before) + 1


def test_second_submit_while_a_job_holds_the_line_is_refused_on_the_other_replica(cluster):
    """One job per model line across replicas: B refuses while A's job is queued or running."""
    a, b = cluster["a"], cluster["b"]
    task = submit(a)
    r = httpx.post(b.url + "/retrain/submit", files={"dataset": ("c.zip", make_zip(dataset_files()))}, data=FIELDS,
                   headers=AUTH, timeout=120)
    assert r.status_code == 409 and "busy" in r.json()["error"] and r.json()["job"]["id"] == task, r.text
    assert wait_status(b, task) == "completed"


# --- the queue's failure cases, in process against the same real S3 and Redis servers -------------------

def test_queue_that_cannot_be_reached_answers_503_and_frees_the_line(cluster, tmp_path):
    """Redis away at submit: the client hears 503 at once, the job is recorded failed, the next may start."""
    from service.errors import ApiError as AdmissionError
    from service.queue import QueueRunner, SharedJobs

    with socket_port() as port:
        jobs = SharedJobs(Store(tmp_path / "home", url=cluster["url"]), f"redis://127.0.0.1:{port}/0")
        job = jobs.admit(request={}, source={"upload": "x.zip"}, actor="test")
        with pytest.raises(AdmissionError) as e:
            QueueRunner(jobs).submit(job["id"])
    assert e.value.status == 503 and "cannot be reached" in e.value.body["error"]
    assert jobs.get(job["id"])["status"] == "failed" and jobs.active() is None


def test_queued_job_that_redis_lost_is_recorded_failed_and_frees_the_line(cluster, tmp_path):
    """A job queued in a Redis that was emptied (restarted without persistence) would hold the line forever."""
    from redis import Redis

    from core.settings import settings
    from service.queue import QueueRunner, SharedJobs, record_key

    other_db = cluster["queue"].rsplit("/", 1)[0] + "/5"  # no worker listens there: the job stays queued
    jobs = SharedJobs(Store(tmp_path / "home", url=cluster["url"]), other_db)
    job = jobs.admit(request={}, source={"upload": "x.zip"}, actor="test")
    QueueRunner(jobs).submit(job["id"])
    assert jobs.get(job["id"])["status"] == "queued" and jobs.active()["id"] == job["id"]
    Redis.from_url(other_db).flushdb()
    old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - settings().job_ttl_seconds - 5))
    jobs.store.put_record(record_key(job["id"]), {**jobs.get(job["id"]), "created": old})
    state = jobs.get(job["id"])
    assert state["status"] == "failed" and "no record of this job" in state["error"]["message"], state
    assert jobs.active() is None


@contextlib.contextmanager
def socket_port():
    """A loopback port bound but never listening, so connections to it are refused, for the block's life."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
