"""Two projects retrained at once on a cluster on loopback: an S3 store (moto's server), Redis, two serving
replicas and two `refit worker`s. Both jobs are submitted together, one per project; measured: that both
finish, each job's time, whether the two trained at the same time, and how long after each job ended both
replicas answered that project's predictions with its new version (polled every 50 ms)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

from bench.common import PYTHON, ROOT, data_dir, log
from bench.servers import refit_server

BUCKET = "refit-bench"
CONVERGE_SECONDS = 5
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "refit-bench", "AWS_SECRET_ACCESS_KEY": "refit-bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
# moto's server one request at a time: its conditional PUT is atomic only so (tests/conftest.py says why).
MOTO = ("import sys\nfrom werkzeug.serving import run_simple\n"
        "from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,\n"
        "    create_backend_app)\n"
        "run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False, "
        "request_handler=MotoRequestHandler)\n")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if ready():
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.2)


@contextlib.contextmanager
def services(tmp: Path):
    """moto's S3 server with one bucket and a redis-server, on free loopback ports: (env for S3, redis URL)."""
    import boto3
    from redis import Redis

    s3_port, redis_port = _port(), _port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", **CREDENTIALS}
    procs = [subprocess.Popen([PYTHON, "-c", MOTO, str(s3_port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL),
             subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)]
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="refit-bench",
                              aws_secret_access_key="refit-bench", region_name="us-east-1")
        _wait(lambda: client.create_bucket(Bucket=BUCKET), procs[0], "moto's S3 server")
        url = f"redis://127.0.0.1:{redis_port}/0"
        _wait(lambda: Redis.from_url(url).ping(), procs[1], "redis-server")
        yield env, url
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


def run() -> dict:
    missing = [m for m in ("redis-server",) if not shutil.which(m)]
    try:
        import moto.server  # noqa: F401 - only checks that the server part is installed
    except ImportError:
        missing.append("moto[server]")
    if missing:
        return {"error": f"not measured: {', '.join(missing)} not installed"}
    with tempfile.TemporaryDirectory(prefix="refit-bench-cluster-") as tmp:
        tmp = Path(tmp)
        with services(tmp) as (s3, queue), contextlib.ExitStack() as stack:
            saved = {k: os.environ.get(k) for k in s3}
            os.environ.update(s3)  # the replicas and workers this starts inherit them
            try:
                return measure(tmp, stack, f"s3://{BUCKET}/{uuid.uuid4().hex}", queue)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def measure(tmp: Path, stack: contextlib.ExitStack, store: str, queue: str) -> dict:
    settings = {"store": store, "queue": queue, "train_standby": "0", "train_threads": "1", "heartbeat_seconds": "1"}
    replicas = [stack.enter_context(refit_server(tmp / name, tmp / f"{name}.log", **settings)) for name in "ab"]
    workers = [start_worker(tmp, f"w{i}", store, queue) for i in (1, 2)]
    stack.callback(lambda: [w.kill() for w in workers])
    zips = {name: zip_subset(tmp, name, seed) for seed, name in enumerate(("alpha", "beta"))}
    a = httpx.Client(base_url=replicas[0].url, timeout=120)
    for name in zips:
        assert a.put(f"/projects/{name}").status_code in (200, 201)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda n: one_job(a, replicas, n, zips[n], t0), zips))
    spans = [(r["started"], r["finished"]) for r in rows if r.get("started")]
    overlap = len(spans) == 2 and max(s for s, _ in spans) < min(f for _, f in spans)
    return {"rows": rows, "trained_together": overlap, "workers": 2, "replicas": 2}


def start_worker(tmp: Path, name: str, store: str, queue: str) -> subprocess.Popen:
    env = {**os.environ, "REFIT_HOME": str(tmp / name), "BENTOML_HOME": str(tmp / name), "REFIT_STORE": store,
           "REFIT_QUEUE": queue, "REFIT_TRAIN_THREADS": "1"}
    return subprocess.Popen([PYTHON, "-m", "cli", "worker", "--name", name], cwd=ROOT, env=env,
                            stdout=open(tmp / f"{name}.log", "ab"), stderr=subprocess.STDOUT)


def zip_subset(tmp: Path, name: str, seed: int) -> Path:
    """A zip of 20 training and 10 validation images per class of hymenoptera, a different sample per project."""
    import random
    import zipfile

    rng, out = random.Random(seed), tmp / f"{name}.zip"
    with zipfile.ZipFile(out, "w") as z:
        for split, k in (("train", 20), ("val", 10)):
            for cls in sorted(p for p in (data_dir() / split).iterdir() if p.is_dir()):
                for f in rng.sample(sorted(cls.glob("*.jp*g")), k):
                    z.write(f, f"{split}/{cls.name}/{f.name}")
    return out


def one_job(a: httpx.Client, replicas, name: str, data: Path, t0: float) -> dict:
    with open(data, "rb") as f:
        r = a.post(f"/projects/{name}/retrain/submit", files={"dataset": (data.name, f)},
                   data={"strategy": "feature_extraction", "promote": "true"})
    if r.status_code != 200:
        return {"project": name, "error": r.text}
    task = r.json()["task_id"]
    status = "in_progress"
    while status == "in_progress":
        time.sleep(0.2)
        status = a.get(f"/projects/{name}/retrain/status", params={"task_id": task}).json()["status"]
    job = a.get(f"/projects/{name}/jobs/{task}").json()
    if status != "completed":
        return {"project": name, "error": str(job.get("error"))}
    version = job["result"]["version"]
    image = next(iter(sorted((data_dir() / "val").glob("*/*.jp*g")))).read_bytes()
    seen = [converge(rep.url, name, version, image) for rep in replicas]
    finished = _ts(job.get("finished"))
    lag = max(seen) - finished if finished else None
    log(f"cluster: {name} {version} by {job.get('worker')}; both replicas serve it {lag:.2f}s after the job ended")
    started = _ts(job.get("started"))
    return {"project": name, "version": version, "worker": job.get("worker"),
            "seconds": round(finished - started, 1) if started and finished else None,
            "started": started, "finished": finished, "serve_lag_seconds": round(lag, 2),
            "since_submit": round(time.monotonic() - t0, 1)}


def converge(url: str, project: str, version: str, image: bytes, timeout: float = 60) -> float:
    """The wall-clock time at which `url` first answers project's predictions with `version`."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            r = c.post(f"/projects/{project}/predict", files=[("images", ("x.jpg", image, "image/jpeg"))])
            if r.status_code == 200 and r.json()[0]["version"] == version:
                return time.time()
            time.sleep(0.05)
    return float("inf")


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None
