"""Refit on several machines, on loopback: two serving replicas (two `bentoml serve`, each with its own cache
folder), one S3 store (moto's server), Redis, and `refit worker` processes taking retrain jobs from the queue.

A retrain submitted to one replica is trained by a worker and served by both, with every prediction sent
during the job and the swap answered. A worker killed with kill -9 mid-job leaves its job failed and
nothing published, and another worker takes the next job. Two projects retrained at once are trained by two
workers together and served by both replicas within seconds, as is a promote in one project, while the other
keeps serving its own version.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
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
    """The default project's versions visible in the bucket: a version is complete when its model.yaml is there
    (other projects' versions are other BentoML models, `models/refit-NAME/`)."""
    keys = boto3.client("s3").list_objects_v2(Bucket=cluster["bucket"], Prefix=cluster["prefix"] + "/models/refit/")
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


# --- projects on the cluster: two projects trained at once by two workers, served by both replicas ----------

PROJECTS = ("alpha", "bravo")
SWAP_SECONDS = 5  # a version a job published, or a promote on one replica, is served everywhere within this
STEADY = 4  # replies in a row that must carry the version: a replica's two model workers take turns


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def projects(cluster):
    """alpha and bravo, created on replica A; alpha gets a version published before its job (so the job's is
    v0002 and bravo's v0001: the listings tell the projects apart). Their tokens, by name."""
    made = {}
    for name in PROJECTS:
        r = httpx.put(f"{cluster['a'].url}/projects/{name}", headers=AUTH, timeout=30)
        assert r.status_code == 201, r.text
        made[name] = r.json()["token"]
    alpha = Store(cluster["root"] / "seeder", url=cluster["url"], project="alpha")
    assert publish(alpha, cluster["root"], 3) == "v0001"
    return made


def live_workers(cluster, n: int) -> list[str]:
    """At least `n` `refit worker`s listening (an earlier test killed one): new ones started as needed."""
    workers = cluster["workers"]
    while len(alive := [k for k, w in workers.items() if w.proc.poll() is None]) < n:
        name = f"w{len(workers) + 1}"
        workers[name] = Worker(name, cluster["root"] / name, cluster["url"], cluster["queue"])
        workers[name].wait_listening()
    return alive


def project_submit(srv: Server, name: str, token: str) -> str:
    r = httpx.post(f"{srv.url}/projects/{name}/retrain/submit", headers=bearer(token), data=FIELDS,
                   files={"dataset": ("colours.zip", make_zip(dataset_files()))}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["task_id"]


def project_job(srv: Server, name: str, job_id: str, token: str) -> dict:
    r = httpx.get(f"{srv.url}/projects/{name}/jobs/{job_id}", headers=bearer(token), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def served_in(srv: Server, name: str, token: str, version: str, since: float, timeout: float = 30) -> float:
    """Seconds from `since` until STEADY predictions in a row on the project's route of `srv` carry `version`."""
    row = 0
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        while row < STEADY:
            r = predict(c, RED, path=f"/projects/{name}/predict", headers=bearer(token))
            row = row + 1 if r.status_code == 200 and r.json()[0]["version"] == version else 0
            assert time.monotonic() - since < timeout, f"{srv.url} {name}: {r.status_code} {r.text[:300]}"
            if row < STEADY:
                time.sleep(0.05)
    return time.monotonic() - since


def train_both(cluster, tokens: dict) -> tuple[dict, dict, bool]:
    """Both projects' jobs submitted at once on replica A and followed on B until both end; as each ends, the
    time until each replica serves its version is measured (while the other job may still train). Returns the
    final job records, the measured seconds by (project, replica), and whether both were seen running at once."""
    a, b = cluster["a"], cluster["b"]
    with ThreadPoolExecutor(2) as pool:
        ids = dict(zip(PROJECTS, pool.map(lambda n: project_submit(a, n, tokens[n]), PROJECTS)))
    ended, timings, both_running, pool = {}, {}, False, ThreadPoolExecutor(4)
    deadline = time.monotonic() + 600
    while len(ended) < len(PROJECTS):
        states = {n: project_job(b, n, ids[n], tokens[n]) for n in PROJECTS if n not in ended}
        both_running |= len(states) == 2 and all(s["status"] == "running" for s in states.values())
        for name, state in states.items():
            if state["status"] in ("queued", "running"):
                continue
            ended[name], t0 = state, time.monotonic()
            assert state["status"] == "succeeded", state
            for label, srv in (("a", a), ("b", b)):
                timings[name, label] = pool.submit(served_in, srv, name, tokens[name], state["result"]["version"], t0)
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    pool.shutdown(wait=True)
    return ended, {k: f.result() for k, f in timings.items()}, both_running


def test_two_projects_trained_at_once_by_two_workers_are_served_by_both_replicas(cluster, projects):
    """A retrain in each of two projects, submitted together: two workers train them at once, both succeed,
    and both replicas serve each project's new version within SWAP_SECONDS of its job's end. The records name
    their project, the versions are the project's BentoML model, and each project lists its own versions only."""
    live_workers(cluster, 2)
    default_before = published(cluster)
    ended, timings, both_running = train_both(cluster, projects)
    print("seconds from a job's end to its version served by replica:",
          {f"{n}@{r}": round(t, 2) for (n, r), t in sorted(timings.items())}, "both seen running:", both_running,
          {n: (j["worker"], j["started"], j["finished"]) for n, j in ended.items()})
    assert {n: j["project"] for n, j in ended.items()} == {n: n for n in PROJECTS}
    assert {n: j["result"]["version"] for n, j in ended.items()} == {"alpha": "v0002", "bravo": "v0001"}
    horses = {n: j["worker"] for n, j in ended.items()}
    assert len({w.split("/")[0] for w in horses.values()}) == 2, f"one worker trained both: {horses}"
    starts = {n: datetime.fromisoformat(j["started"]) for n, j in ended.items()}
    ends = {n: datetime.fromisoformat(j["finished"]) for n, j in ended.items()}
    assert both_running or (starts["alpha"] < ends["bravo"] and starts["bravo"] < ends["alpha"]), ended
    assert all(t <= SWAP_SECONDS for t in timings.values()), timings
    s3 = boto3.client("s3")
    for name, job_state in ended.items():
        s3.head_object(Bucket=cluster["bucket"],
                       Key=f"{cluster['prefix']}/models/refit-{name}/{job_state['result']['version']}/model.yaml")
    s3.head_object(Bucket=cluster["bucket"], Key=f"{cluster['prefix']}/projects/bravo/jobs/{ended['bravo']['id']}/job.json")
    listed = {n: httpx.get(f"{cluster['b'].url}/projects/{n}/versions", headers=bearer(projects[n]), timeout=30).json()
              for n in PROJECTS}
    assert [v["id"] for v in listed["bravo"]["versions"]] == ["v0001"], listed["bravo"]
    assert [v["id"] for v in listed["alpha"]["versions"]] == ["v0001", "v0002"], listed["alpha"]
    assert listed["bravo"]["promoted"] == "v0001" and listed["alpha"]["promoted"] == "v0002"
    assert published(cluster) == default_before  # the default project is untouched


def test_promote_in_one_project_on_replica_a_is_served_by_replica_b_while_the_other_keeps_its_own(cluster, projects):
    """Hot swap per project on every replica: a new version of alpha promoted on A is what B answers for alpha
    within SWAP_SECONDS, while every bravo prediction on both replicas, during and after, answers with bravo's
    v0001."""
    a, b = cluster["a"], cluster["b"]
    new = publish(Store(cluster["root"] / "seeder", url=cluster["url"], project="alpha"), cluster["root"], 4)
    assert new == "v0003"
    for srv in (a, b):  # both replicas serve alpha's v0002 first (the test before trained it)
        served_in(srv, "alpha", projects["alpha"], "v0002", time.monotonic())
    replies, stop = [], threading.Event()

    def bravo(srv: Server) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                r = predict(c, RED, path="/projects/bravo/predict", headers=bearer(projects["bravo"]))
                replies.append((r.status_code, r.json()[0]["version"] if r.status_code == 200 else r.text[:200]))
                time.sleep(0.05)

    threads = [threading.Thread(target=bravo, args=(srv,)) for srv in (a, b)]
    for t in threads:
        t.start()
    try:
        r = httpx.post(f"{a.url}/projects/alpha/promote", json={"version": new},
                       headers=bearer(projects["alpha"]), timeout=60)
        assert r.status_code == 200 and r.json()["promoted"] == new, r.text
        t0 = time.monotonic()
        on_b = served_in(b, "alpha", projects["alpha"], new, t0)
        on_a = served_in(a, "alpha", projects["alpha"], new, t0)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"alpha's promote on A served by B {on_b:.2f}s later (by A {on_a:.2f}s); {len(replies)} bravo replies")
    assert on_b <= SWAP_SECONDS and on_a <= SWAP_SECONDS, (on_a, on_b)
    assert replies and set(replies) == {(200, "v0001")}, [x for x in replies if x != (200, "v0001")][:5]
    assert httpx.get(f"{b.url}/projects/bravo/versions", headers=AUTH, timeout=30).json()["promoted"] == "v0001"


# --- the queue's failure cases, in process against the same real S3 and Redis servers -------------------

def test_a_starting_workers_sweep_reads_each_jobs_record_in_its_project(cluster, projects, tmp_path):
    """What `refit worker` sweeps at start, on the cluster's store: a job folder is kept or removed by its
    record under its project's prefix (found in every project when the folder has no job.json yet), a lost
    project job is recorded failed, and a cut-short publish of a project's model is emptied but for its claim."""
    from core.jobs import Status, new_id, new_record
    from core.queue import record_key
    from core.settings import settings
    from core.store import atomic_write_json
    from training.orphans import ProjectRecords, sweep_worker_home

    store = Store(tmp_path / "home", url=cluster["url"])
    horse = subprocess.Popen(["sleep", "120"])  # a live process of this machine, as a running job's horse is
    # Stale for this process (the settings' TTL) and for the replicas (the fixture's TTL) alike.
    fresh, old = time.time(), time.time() - max(TTL, settings().job_ttl_seconds) - 30
    jobs = {}
    for key, project, status, beat, folder_record in (("running", "alpha", Status.RUNNING, fresh, True),
                                                      ("lost", "bravo", Status.RUNNING, old, True),
                                                      ("downloading", "bravo", Status.QUEUED, fresh, False)):
        job = {**new_record(new_id(), request={}, source={}, actor="test", stamped=True, project=project),
               "status": status, "created": stamp(beat), "heartbeat": stamp(beat), "worker": f"wx/{horse.pid}"}
        store.for_project(project).put_record(record_key(job["id"]), job, create_only=True)
        (store.home / "jobs" / job["id"]).mkdir(parents=True)
        if folder_record:
            atomic_write_json(store.home / "jobs" / job["id"] / "job.json", job)
        jobs[key] = job
    cut = f"{cluster['prefix']}/models/refit-alpha/v0090"
    s3 = boto3.client("s3")
    s3.put_object(Bucket=cluster["bucket"], Key=f"{cut}/.claim",
                  Body=json.dumps({"at": stamp(old - 3600), "updated": stamp(old - 3600), "pid": 1, "host": "gone"}))
    s3.put_object(Bucket=cluster["bucket"], Key=f"{cut}/model.onnx", Body=b"half a model")
    try:
        removed = sweep_worker_home(store, ProjectRecords(store, cluster["queue"]))
    finally:
        horse.kill()
        horse.wait(10)
    left = {p.name for p in (store.home / "jobs").iterdir()}
    assert left == {jobs["running"]["id"], jobs["downloading"]["id"]}, (left, removed)
    lost = httpx.get(f"{cluster['a'].url}/projects/bravo/jobs/{jobs['lost']['id']}", headers=AUTH, timeout=30).json()
    assert lost["status"] == "failed" and "stopped" in lost["error"]["message"] and lost["project"] == "bravo", lost
    keys = {k["Key"].rsplit("/", 1)[1] for k in s3.list_objects_v2(Bucket=cluster["bucket"], Prefix=cut + "/")["Contents"]}
    assert keys == {".claim"} and f"{cluster['url']}/models/refit-alpha/v0090" in removed, (keys, removed)


def test_a_multilabel_manifest_is_trained_by_a_worker_and_served_with_its_labels_by_both_replicas(cluster, tmp_path):
    """A zip with a labels.csv, submitted to replica A, trained by a `refit worker` from the queue: both replicas
    answer with the version's labels over their thresholds."""
    from test_multilabel_retrain import collage_zip, jpeg
    from test_multilabel_training import COLOURS, collage

    live_workers(cluster, 1)
    r = httpx.post(cluster["a"].url + "/retrain/submit", headers=AUTH, timeout=120,
                   files={"dataset": ("collages.zip", collage_zip(tmp_path))},
                   data={"strategy": "feature_extraction", "parity_images": "2", "promote": "true"})
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    assert wait_status(cluster["a"], task) == "completed", job(cluster["a"], task)
    version = job(cluster["a"], task)["result"]["version"]
    image = ("c.jpg", jpeg(collage(["red", "yellow"], seed=77)))
    for srv in (cluster["a"], cluster["b"]):
        deadline = time.monotonic() + 30
        while True:
            reply = predict(httpx.Client(base_url=srv.url, timeout=30), image).json()[0]
            if reply["version"] == version or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert reply["version"] == version and {x["label"] for x in reply["labels"]} <= set(COLOURS), reply


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


def stamp(t: float) -> str:
    """A time as the store's records carry it."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def socket_port():
    """A loopback port bound but never listening, so connections to it are refused, for the block's life."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
