"""The retrain routes as plain routes over the job runner, over HTTP against a real `bentoml serve`: task ids
are job ids and outlive a restart, an unknown task id is a JSON 404, the synchronous POST /retrain answers
with the result, and a client hanging up on it stops its job.

Tests run in file order and share one server; the last one restarts it on the same home.
"""
from __future__ import annotations

import time

import httpx
import psutil
import pytest
from serving import AUTH, Server, copy_store, dataset_files

FAST = {"strategy": "feature_extraction", "head_epochs": 20, "promote": False, "int8": False}


@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    data_root = root / "data"
    for name, data in dataset_files(4).items():
        (data_root / "colours" / name).parent.mkdir(parents=True, exist_ok=True)
        (data_root / "colours" / name).write_bytes(data)
    srv = Server(copy_store(imagenet_store, root / "home"), data_root, root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop(kill=True)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
        yield c


def _trainers(srv: Server) -> list[psutil.Process]:
    procs = psutil.Process(srv.proc.pid).children(recursive=True)
    return [p for p in procs if "training.jobrun" in " ".join(p.cmdline())]


def test_unknown_or_missing_task_id_is_a_json_error(http):
    """A task id the server never gave is a 404 with the one error shape, on both routes."""
    for route in ("/retrain/status", "/retrain/get"):
        r = http.get(route, params={"task_id": "20990101-000000-deadbeef"})
        assert r.status_code == 404, r.text
        assert "20990101-000000-deadbeef" in r.json()["error"], r.text
        r = http.get(route, params={"task_id": "../../etc/passwd" + "x" * 300})
        assert r.status_code == 404 and "error" in r.json(), r.text
        r = http.get(route)
        assert r.status_code == 400 and "task_id" in r.json()["error"], r.text
    assert http.get("/retrain/status", params={"task_id": "x"}, headers={"Authorization": ""}).status_code == 401


def test_synchronous_retrain_answers_with_the_result(http):
    """POST /retrain admits like /retrain/submit and answers when the job has ended."""
    r = http.post("/retrain", json={"data_path": "colours", **FAST}, timeout=600)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["version"] == "v0002" and result["promoted"] is False
    job = http.get(f"/jobs/{result['job_id']}").json()
    assert job["status"] == "succeeded" and job["task_id"] == result["job_id"]
    # Admission is the same as for submit: the same checks, the same words.
    r = http.post("/retrain", json={"data_path": "colours", "epochs": 0})
    assert r.status_code == 422 and "epochs" in r.json()["error"], r.text


def test_a_device_the_trainer_lacks_fails_the_job_saying_so(http):
    """`device` is checked by pydantic at admission (a 422 naming it) and, for `cuda`, by the training process,
    the one place that knows its machine: there a job asking for CUDA without a device fails with a 422 that
    says so, and publishes nothing."""
    r = http.post("/retrain", json={"data_path": "colours", **FAST, "device": "tpu"})
    assert r.status_code == 422 and "device" in r.json()["error"], r.text
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device: a cuda job would train")
    r = http.post("/retrain", json={"data_path": "colours", **FAST, "device": "cuda"}, timeout=600)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith("device 'cuda' was asked for, but there is no CUDA device"), r.text
    job = http.get(f"/jobs/{r.json()['job_id']}").json()
    assert job["status"] == "failed" and job["error"]["status"] == 422, job
    assert [v["id"] for v in http.get("/versions").json()["versions"]][-1] == "v0002"


def test_hanging_up_on_synchronous_retrain_stops_its_job(http, server):
    """A client that leaves POST /retrain takes its job with it: the trainer is killed, the lock is free."""
    slow = {**FAST, "strategy": "full", "epochs": 300}  # still training when the client leaves
    with pytest.raises(httpx.ReadTimeout):
        http.post("/retrain", json={"data_path": "colours", **slow}, timeout=httpx.Timeout(120, read=4))
    job = http.get("/jobs").json()[0]
    deadline = time.time() + 60
    while time.time() < deadline and job["status"] in ("queued", "running"):
        time.sleep(0.2)
        job = http.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "failed" and "cancelled" in job["error"]["message"], job
    assert not _trainers(server)
    assert http.get("/retrain/status", params={"task_id": job["id"]}).json()["status"] == "failed"


def test_task_id_is_the_job_id_and_survives_a_restart(http, server):
    """A task finished before a restart is answered after it from the job record, result included."""
    r = http.post("/retrain/submit", json={"data_path": "colours", **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "in_progress"
    task_id = r.json()["task_id"]
    assert http.get(f"/jobs/{task_id}").json()["task_id"] == task_id
    deadline = time.time() + 300
    while time.time() < deadline:
        status = http.get("/retrain/status", params={"task_id": task_id}).json()
        if status["status"] != "in_progress":
            break
        time.sleep(0.5)
    assert status["status"] == "completed", status
    before = http.get("/retrain/get", params={"task_id": task_id}).json()
    assert before["job_id"] == task_id and before["version"] == "v0003"
    server.stop()
    server.start()
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        status = c.get("/retrain/status", params={"task_id": task_id})
        assert status.status_code == 200 and status.json()["status"] == "completed", status.text
        after = c.get("/retrain/get", params={"task_id": task_id})
        assert after.status_code == 200 and after.json() == before, after.text
