"""`refit worker` through an operator's bad day: a Redis outage while it trains, a kill right after its version
landed, a store it cannot use, and a restart under the same name after kill -9.

Real parts only: a `redis-server` of this module's own (stopped and started again on the same port), moto's
S3 server (`s3_endpoint`), `refit worker` processes, and jobs that train on a small synthetic dataset. The
jobs are admitted in this process with the same calls a replica makes (service/queue.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
from conftest import ROOT, S3_BUCKET
from serving import dataset_files, make_zip

from core.store import Store

TTL = 10  # REFIT_JOB_TTL_SECONDS: seconds without a heartbeat before a running job counts as lost
MONITOR = 2  # REFIT_WORKER_MONITOR_SECONDS: a busy worker renews its Redis registration this often
ENV = {"REFIT_TRAIN_STANDBY": "0", "REFIT_JOB_TTL_SECONDS": str(TTL), "REFIT_TRAIN_THREADS": "1",
       "REFIT_WORKER_MONITOR_SECONDS": str(MONITOR)}
REQUEST = {"strategy": "feature_extraction", "epochs": 3, "promote": True, "seed": 1}


class RedisServer:
    """A redis-server of this module, on a fixed port, that a test stops and starts again; it saves its data
    when stopped (a restart for maintenance), so what was queued is still there afterwards."""

    def __init__(self, folder: Path):
        self.exe = shutil.which("redis-server")
        if not self.exe:
            pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        from redis import Redis

        log = open(self.folder / "redis.log", "a")
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "3600 1",
                                      "--appendonly", "no", "--dir", str(self.folder)], stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                Redis.from_url(self.url).ping()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis saves its data and exits
            self.proc.wait(30)

    def connection(self):
        from redis import Redis

        return Redis.from_url(self.url)


class Worker:
    """`refit worker --name NAME` as an operator starts it, its output in a log file."""

    def __init__(self, name: str, home: Path, store_url: str, queue_url: str, **env):
        self.name, self.home = name, home
        self.log_path = home.parent / f"{name}-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, **ENV, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "REFIT_STORE": store_url,
               "REFIT_QUEUE": queue_url, **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--name", name], cwd=ROOT,
                                     env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while "Listening on" not in self.log():
            assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"worker {self.name} not listening:\n{self.log()[-3000:]}"
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGCONT)  # a horse a test stopped must be able to die
                    p.kill()
                except psutil.Error:
                    pass
        self.proc.wait(30)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("own-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("workers") / "cache"


@pytest.fixture
def worker_home(tmp_path, feature_cache):
    """REFIT_HOME of a test's workers (its own: each test's store numbers its versions from v0001, and a cached
    copy belongs to one store), with the feature graphs a worker exports while it warms up exported once."""
    home = tmp_path / "worker"
    if feature_cache.is_dir():
        shutil.copytree(feature_cache, home / "cache")
    yield home
    if not feature_cache.is_dir() and (home / "cache").is_dir():
        shutil.copytree(home / "cache", feature_cache)


@pytest.fixture
def shared(s3_endpoint, redis_server, tmp_path, monkeypatch):
    """A fresh prefix of the moto bucket as the shared store, and the calls a replica makes on it."""
    from service.queue import QueueRunner, SharedJobs

    monkeypatch.setenv("REFIT_JOB_TTL_SECONDS", str(TTL))  # this process reads jobs as a replica configured like ENV
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    jobs = SharedJobs(Store(tmp_path / "replica", url=url), redis_server.url)
    return {"url": url, "jobs": jobs, "runner": QueueRunner(jobs), "tmp": tmp_path}


def submit(shared, request: dict = REQUEST) -> str:
    """What POST /retrain/submit does on a replica with REFIT_QUEUE: record, upload the dataset, enqueue."""
    jobs = shared["jobs"]
    job = jobs.admit(request=request, source={"upload": "colours.zip"}, actor="test")
    upload = shared["tmp"] / f"{job['id']}.zip"
    upload.write_bytes(make_zip(dataset_files()))
    jobs.attach(job["id"], upload=upload, extracted=None, data=None)
    shared["runner"].submit(job["id"])
    return job["id"]


def wait_for(jobs, job_id: str, statuses, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while (state := jobs.get(job_id))["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} still {state['status']} after {timeout}s: {state}"
        time.sleep(0.3)
    return state


def keys(url: str) -> list[str]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])]


# --- item 4: a store the worker cannot use ---------------------------------------------------------------

def test_worker_pointed_at_a_missing_bucket_exits_at_start_with_the_cause(s3_endpoint, redis_server, tmp_path):
    """It must not start and take jobs from the shared queue: it exits non-zero with one line naming the
    bucket and what S3 answered, and never registers with the queue."""
    from rq import Worker as RQWorker

    env = {**os.environ, **ENV, "REFIT_HOME": str(tmp_path / "home"), "BENTOML_HOME": str(tmp_path / "home"),
           "REFIT_STORE": "s3://no-such-bucket-here/refit", "REFIT_QUEUE": redis_server.url}
    done = subprocess.run([sys.executable, "-m", "cli", "worker", "--name", "lost"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode != 0, done.stdout + done.stderr
    errors = [ln for ln in done.stderr.splitlines() if "error" in ln.lower()]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr  # botocore's INFO lines aside
    assert errors[0].startswith("refit: error: worker lost:") and "no-such-bucket-here" in errors[0], errors[0]
    assert "NoSuchBucket" in errors[0] and "create the bucket" in errors[0], errors[0]
    assert "lost" not in {w.name for w in RQWorker.all(connection=redis_server.connection())}


def test_job_a_worker_cannot_start_says_which_worker_and_why(shared, redis_server, worker_home):
    """A worker whose store is usable but is not the replicas' (another prefix) takes a job it has no record
    of: the job ends failed, and the reader says so with the worker's name and the cause, not an enum's repr."""
    other = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    w = Worker("elsewhere", worker_home, other, redis_server.url)
    try:
        w.wait_listening()
        job_id = submit(shared)
        state = wait_for(shared["jobs"], job_id, ("failed", "succeeded"), timeout=120)
    finally:
        w.kill()
    message = state["error"]["message"]
    assert state["status"] == "failed", state
    assert "JobStatus" not in message and "failed before it started, on worker elsewhere" in message, message
    assert "no record of this job in its store" in message and other in message, message
    assert shared["jobs"].active() is None  # the line is free for the next job


# --- item 5: a restart under the same name ---------------------------------------------------------------

def test_killed_worker_restarts_at_once_under_its_name_and_runs_the_job_queued_meanwhile(shared, redis_server,
                                                                                          worker_home):
    """kill -9 leaves the worker's registration in Redis; the restart (a container's restart policy) must
    not be refused for it. A second worker with the name of a live one is still refused."""
    w = Worker("W1", worker_home, shared["url"], redis_server.url)
    try:
        w.wait_listening()
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(30)
        job_id = submit(shared)  # queued while no worker runs
        t0 = time.monotonic()
        w = Worker("W1", worker_home, shared["url"], redis_server.url)
        w.wait_listening()
        print(f"restarted worker listening after {time.monotonic() - t0:.1f}s")
        twin = subprocess.run([sys.executable, "-m", "cli", "worker", "--name", "W1"], cwd=ROOT,
                              env={**os.environ, **ENV, "REFIT_HOME": str(worker_home), "REFIT_STORE": shared["url"],
                                   "BENTOML_HOME": str(worker_home), "REFIT_QUEUE": redis_server.url},
                              capture_output=True, text=True, timeout=180)
        assert twin.returncode == 2 and "already running on this host" in twin.stderr, twin.stderr
        assert w.proc.poll() is None
        state = wait_for(shared["jobs"], job_id, ("failed", "succeeded"))
    finally:
        w.kill()
    assert "retiring the registration left by its previous process" in w.log()
    assert state["status"] == "succeeded" and state["worker"].startswith("W1/"), state
    assert state["result"]["version"] in shared["jobs"].store.versions()


# --- item 2: a Redis outage while a job trains ---------------------------------------------------------

def test_busy_worker_rides_out_a_redis_outage_and_its_job_publishes(shared, redis_server, worker_home):
    """Redis stopped for several of the worker's registration renewals while it trains, then started again
    on the same port: the worker and its job live on, the version is published and promoted, and RQ's own
    record of the job says finished."""
    from rq.job import Job

    w = Worker("W2", worker_home, shared["url"], redis_server.url)
    try:
        w.wait_listening()
        # Long enough to outlast the outage on an idle machine: every epoch runs (patience as long as the epochs).
        job_id = submit(shared, {**REQUEST, "strategy": "full", "epochs": 10, "patience": 10})
        wait_for(shared["jobs"], job_id, ("running",), timeout=120)
        redis_server.stop()
        time.sleep(3 * MONITOR + 4)  # at least three renewals fail
        assert w.proc.poll() is None, f"the worker quit during the outage:\n{w.log()[-3000:]}"
        during = shared["jobs"].get(job_id)
        redis_server.start()
        assert during["status"] == "running", f"the job ended before Redis came back, so nothing was tested: {during}"
        state = wait_for(shared["jobs"], job_id, ("failed", "succeeded"))
        assert state["status"] == "succeeded", state
        assert state["result"]["promoted"] is True and state["result"]["version"] in shared["jobs"].store.versions()
        deadline = time.monotonic() + 60
        while Job.fetch(job_id, connection=redis_server.connection()).get_status().value != "finished":
            assert time.monotonic() < deadline, "RQ never recorded the job finished"
            time.sleep(0.5)
        assert w.proc.poll() is None, w.log()[-3000:]
    finally:
        w.kill()
    assert "the job queue cannot be reached" in w.log()


# --- item 3: killed after its version landed -----------------------------------------------------------

def test_job_killed_after_its_version_landed_reports_that_version(shared, redis_server, worker_home):
    """The worker is killed after the version's model.yaml is in the bucket and before the promote: the job
    does not say "no version was published; submit again" (that trains it twice); it names the version and
    says it was not promoted."""
    w = Worker("W3", worker_home, shared["url"], redis_server.url)
    try:
        w.wait_listening()
        job_id = submit(shared)
        horse = psutil.Process(int(wait_for(shared["jobs"], job_id, ("running",), timeout=120)["worker"]
                                    .split("/")[1]))
        version = _stop_after_publish(horse, worker_home)
        w.proc.send_signal(signal.SIGKILL)  # the stopped horse dies with it (PDEATHSIG)
        w.proc.wait(30)
        state = wait_for(shared["jobs"], job_id, ("failed", "succeeded"), timeout=TTL + 60)
    finally:
        w.kill()
    store = shared["jobs"].store
    assert f"models/refit/{version}/model.yaml" in keys(shared["url"]), "stopped before the version landed"
    assert version in store.versions() and store.promoted() != version
    message = state["error"]["message"]
    assert state["status"] == "failed" and f"published {version} but not promoted" in message, state
    assert "no need to train again" in message and "submit again" not in message, message
    assert state["result"]["version"] == version and state["result"]["promoted"] is False


def _stop_after_publish(horse: psutil.Process, home: Path, timeout: float = 400) -> str:
    """Stop the work horse (SIGSTOP) right after its publish and before its promote, and return the version.
    The publisher renames the entry it built into its own cache once the upload, model.yaml last, is done
    (core/store.py); the promote that follows checksums and loads the model first, which takes far longer
    than this loop's few milliseconds. (Stepping the horse while watching the bucket instead would stop it in
    the middle of a request to moto, which serves one request at a time.)"""
    deadline = time.monotonic() + timeout
    while not (landed := sorted((home / "models" / "refit").glob("v*/model.yaml"))):
        assert horse.is_running() and time.monotonic() < deadline, "no version was published"
        time.sleep(0.003)
    horse.suspend()
    return landed[-1].parent.name


# --- item 3: the reader, in process -----------------------------------------------------------------------

def _publish_for(job: dict, shared, *, promote: bool) -> str:
    """A tiny version published by `job` (its id in the metadata, as training writes it); returns its id."""
    from test_store_contract import tiny_model

    from core.store import sha256_file

    onnx = tiny_model(shared["tmp"] / "model.onnx", 1)
    sha = sha256_file(onnx)
    return shared["jobs"].store.publish(
        {"model.onnx": onnx}, {"strategy": "feature_extraction", "onnx_sha256": sha, "serving_file": "model.onnx",
                               "serving_sha256": sha, "job": job["id"], "classes": ["a", "b"],
                               "promotion": {"promote": promote}})


@pytest.mark.parametrize("promoted", [False, True])
def test_stale_job_whose_version_is_published_is_settled_from_the_version(shared, promoted):
    """A running job whose heartbeat stopped is settled from the version that names it: succeeded when the
    promote happened (only the last record write was lost), failed "published vN but not promoted" when not."""
    from service.queue import record_key

    jobs, store = shared["jobs"], shared["jobs"].store
    job = jobs.admit(request=REQUEST, source={"upload": "x.zip"}, actor="test")
    v = _publish_for(job, shared, promote=True)
    if promoted:
        store.promote(v, actor="api")
    old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - TTL - 5))
    store.put_record(record_key(job["id"]), {**job, "status": "running", "started": old, "heartbeat": old})
    state = jobs.get(job["id"])
    assert state["result"]["version"] == v and state["result"]["promoted"] is promoted, state
    if promoted:
        assert state["status"] == "succeeded" and state["error"] is None, state
    else:
        assert state["status"] == "failed" and f"published {v} but not promoted" in state["error"]["message"]
    assert jobs.active() is None
    assert jobs.get(job["id"])["status"] == state["status"]  # settled once: a second read answers the same


def test_a_damaged_newer_version_does_not_stop_a_stale_job_being_settled(shared):
    """A newer version with a damaged model.yaml (yaml.YAMLError) or metrics.json (ValueError) made every
    read of a stale job (GET /jobs, GET /jobs/{id}, retrain admission) a 500 while the reader looked for the
    job's version."""
    from test_store_contract import publish

    from core.store import ENTRIES
    from service.queue import record_key

    jobs, store = shared["jobs"], shared["jobs"].store
    job = jobs.admit(request=REQUEST, source={"upload": "x.zip"}, actor="test")
    v = _publish_for(job, shared, promote=False)
    bad_metrics, bad_yaml = publish(store, shared["tmp"], 2), publish(store, shared["tmp"], 3)
    store.remote.put(f"{ENTRIES}{bad_metrics}/metrics.json", b"{not json")
    store.remote.put(f"{ENTRIES}{bad_yaml}/model.yaml", b"metadata: [unclosed")
    old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - TTL - 5))
    store.put_record(record_key(job["id"]), {**job, "status": "running", "started": old, "heartbeat": old})
    listed = {j["id"]: j for j in jobs.list()}
    assert listed[job["id"]]["status"] == "succeeded" and listed[job["id"]]["result"]["version"] == v, listed
    assert jobs.get(job["id"])["result"]["version"] == v
    assert jobs.active() is None  # what admission asks
