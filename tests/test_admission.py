"""Retrain admission, job lifecycle, disk and processes (issue 9, items 1, 10, 11, 13, 14), over HTTP against a
real `bentoml serve` and through the real CLI.

Tests run in file order. The first server (module scope) answers the bad uploads, the field validation and
the path checks, and is stopped with SIGTERM at the end of them; its home is a small tmpfs when this machine
lets us mount one, so that "disk full" is a real ENOSPC. A second server is crashed at each stage of a job
(upload being unpacked, job running, only the supervisor killed) and started again on the same home.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest
import serving
from conftest import run_cli
from serving import AUTH, COLOURS, Server, copy_store, dataset_files, make_zip, predict, solid, wait_task

SUBMIT = "/retrain/submit"


# --- archives a hostile or unlucky client sends ---------------------------------------------------------

def _local_header_offsets(data: bytes) -> tuple[zipfile.ZipInfo, int]:
    """The first entry and the offset of its compressed data."""
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    return info, info.header_offset + 30 + name_len + extra_len


def _patch_headers(data: bytes, offset_in_local: int, offset_in_central: int, value: int) -> bytes:
    """Set a 2-byte field of every local and central header (flags, compression method)."""
    b = bytearray(data)
    for sig, off in ((b"PK\x03\x04", offset_in_local), (b"PK\x01\x02", offset_in_central)):
        i = b.find(sig)
        while i != -1:
            b[i + off:i + off + 2] = value.to_bytes(2, "little")
            i = b.find(sig, i + 4)
    return bytes(b)


def crc_error_zip() -> bytes:
    """Two bytes of the first entry's data flipped: the archive opens, the entry fails its CRC."""
    data = bytearray(make_zip(dataset_files(3)))
    _, start = _local_header_offsets(bytes(data))
    data[start + 100] ^= 0xFF
    data[start + 101] ^= 0xFF
    return bytes(data)


def corrupt_deflate_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in dataset_files(3).items():
            z.writestr("colours/" + name, blob)
    data = bytearray(buf.getvalue())
    _, start = _local_header_offsets(bytes(data))
    data[start] = 0xFF  # block type 3 does not exist: zlib.error "invalid block type"
    return bytes(data)


def encrypted_zip() -> bytes:
    # Bit 0 of the general-purpose flags marks an encrypted entry (what `zip -e` writes).
    return _patch_headers(make_zip(dataset_files(3)), 6, 8, 0x1)


def deflate64_zip() -> bytes:
    # Compression method 9: what Windows Explorer's "Send to > Compressed folder" writes for large archives.
    return _patch_headers(make_zip(dataset_files(3)), 8, 10, 9)


def long_name_zip() -> bytes:
    files = dataset_files(3)
    files["red/" + "x" * 300 + ".jpg"] = solid(COLOURS["red"])
    return make_zip(files)


def file_and_folder_zip() -> bytes:
    files = dataset_files(3)
    files["red/a"] = b"a file"
    files["red/a/b.jpg"] = solid(COLOURS["red"])
    return make_zip(files)


def zeros_zip(megabytes: int) -> bytes:
    """A valid dataset plus one file of zeros: a small upload that expands to `megabytes` when unpacked."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in dataset_files(3).items():
            z.writestr("colours/" + name, blob)
        with z.open("colours/padding.bin", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(megabytes):
                f.write(chunk)
    return buf.getvalue()


def random_zip(megabytes: int) -> bytes:
    """A dataset padded with incompressible bytes, stored: the upload itself is `megabytes` large."""
    files = dataset_files(3)
    files["padding.bin"] = os.urandom(megabytes << 20)
    return make_zip(files)


# --- servers ----------------------------------------------------------------------------------------------

def _mount_tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _dir_mb(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) >> 20


# Free space left on the tmpfs home after the store is copied in: enough for jobs, logs and one published
# version, less than the "disk full" uploads below need.
TMPFS_SPARE_MB = 128


@pytest.fixture(scope="module")
def first(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("admission")
    data_root = root / "data"
    for name, data in dataset_files().items():
        (data_root / "colours" / name).parent.mkdir(parents=True, exist_ok=True)
        (data_root / "colours" / name).write_bytes(data)
    home = root / "home"
    mounted = os.geteuid() == 0 and _mount_tmpfs(home, _dir_mb(imagenet_store) + TMPFS_SPARE_MB)
    copy_store(imagenet_store, home)
    srv = Server(home, data_root, root / "serve.log", env={"REFIT_TRAIN_STANDBY": "0",
                                                           "REFIT_MAX_DATASET_MB": "256"})
    srv.tmpfs = mounted
    srv.start()
    yield srv
    srv.stop(kill=True)
    if mounted:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


@pytest.fixture(scope="module")
def http(first):
    with httpx.Client(base_url=first.url, timeout=120) as c:
        yield c


def _no_server_paths(text: str, srv: Server) -> None:
    for path in (srv.home, srv.data_root, Path(serving.REPO)):
        assert str(path) not in text, f"server path {path} in a reply: {text}"


def finished(http, task_id: str) -> str:
    """Wait for a retrain task; its status, and the job's error in the assertion message when it failed."""
    status = wait_task(http, task_id, timeout=300)["status"]
    if status != "completed":
        return f"{status}: " + http.get("/retrain/get", params={"task_id": task_id}, headers=AUTH).text
    return status


def submit(http, data: bytes, name: str = "colours.zip", **fields) -> httpx.Response:
    return http.post(SUBMIT, files={"dataset": (name, data, "application/zip")},
                     data={k: json.dumps(v) if not isinstance(v, str) else v for k, v in fields.items()},
                     headers=AUTH, timeout=60)


# --- item 11: every field that can be checked is checked at submit -------------------------------------------

def test_item11_unknown_backbone_is_refused_at_submit_like_the_cli(http, first, tmp_path):
    """The probe found backbone="nope" accepted with 200, then the job failed with a 500."""
    r = submit(http, make_zip(dataset_files(3)), backbone="resnet9000", strategy="feature_extraction")
    assert r.status_code == 422, r.text
    msg = r.json()["error"]
    assert "resnet9000" in msg and "efficientnet_lite0" in msg and "resnet18" in msg, msg
    # The CLI gives the same message, before any data is read.
    cli = run_cli("train", tmp_path / "nothing-here", "--backbone", "resnet9000", home=tmp_path / "home")
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert "Unknown backbone 'resnet9000'; available: " in cli.stderr
    assert "Unknown backbone 'resnet9000'; available: " in msg
    # JSON submits go through the same validation.
    r = http.post(SUBMIT, json={"data_path": "colours", "backbone": "resnet9000"}, headers=AUTH)
    assert r.status_code == 422 and "resnet9000" in r.json()["error"], r.text
    assert http.get("/jobs", headers=AUTH).json() == []  # nothing was admitted


def test_item11_seed_out_of_range_is_refused_at_submit(http):
    """A seed over 2**32 - 1 was accepted and failed the job later (numpy cannot take it)."""
    r = submit(http, make_zip(dataset_files(3)), seed=2**40)
    assert r.status_code == 422 and "seed" in r.json()["error"], r.text


# --- item 1: every failure during admission is answered at once, and logged --------------------------------

BAD_UPLOADS = {
    "crc_error": (crc_error_zip, 400, "damaged"),
    "corrupt_deflate": (corrupt_deflate_zip, 400, "damaged"),
    "encrypted": (encrypted_zip, 400, "encrypted"),
    "deflate64": (deflate64_zip, 400, "deflate64 compression"),
    "name_over_255_bytes": (long_name_zip, 400, "over the limit of 255"),
    "file_and_folder_same_name": (file_and_folder_zip, 400, "both a file and a folder"),
    # Bigger than the free space on the tmpfs home: the upload itself, then what it unpacks to.
    "disk_full_saving": (lambda: random_zip(TMPFS_SPARE_MB + 32), 507, "disk space"),
    "disk_full_extracting": (lambda: zeros_zip(TMPFS_SPARE_MB + 32), 507, "disk space"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_item01_bad_upload_is_answered_at_once(http, first, case):
    """The probe found these uploads hanging the submit for an hour with nothing logged."""
    make, status, words = BAD_UPLOADS[case]
    if case.startswith("disk_full") and not first.tmpfs:
        pytest.skip("disk full needs a small tmpfs as REFIT_HOME; mounting one is not permitted here")
    t0 = time.time()
    r = submit(http, make(), strategy="feature_extraction")
    assert time.time() - t0 < 30, f"{case}: answered after {time.time() - t0:.0f}s"
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.text
    _no_server_paths(r.text, first)
    assert http.get("/jobs", headers=AUTH).json() == []  # nothing admitted, the lock is free
    assert not list((first.home / "jobs").glob(".incoming-*"))  # nothing left of the upload
    if status == 507:
        assert "out of disk space" in first.log_tail(200)  # the cause, with the path, is in the server log


@pytest.mark.parametrize("data_path,status,words", [
    ("colours\x00.zip", 422, "NUL"),
    ("x" * 300, 400, "File name too long"),
    ("a/" * 3000, 400, "File name too long"),
], ids=["nul", "name_over_255_bytes", "path_over_4096_bytes"])
def test_item01_unusable_data_path_is_answered_at_once(http, first, data_path, status, words):
    """The probe found a data_path with a NUL or over the OS path limits hanging the submit."""
    t0 = time.time()
    r = http.post(SUBMIT, json={"data_path": data_path}, headers=AUTH)
    assert time.time() - t0 < 30
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.text
    _no_server_paths(r.text, first)


def test_item01_server_is_still_admitting_after_the_bad_uploads(http):
    """After every refusal above, a good dataset is admitted (no lock, no disk space was kept)."""
    r = http.post(SUBMIT, json={"data_path": "colours", "strategy": "feature_extraction", "promote": False,
                                "int8": False}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert finished(http, r.json()["task_id"]) == "completed"


# --- item 13: no server paths in replies ------------------------------------------------------------------

def test_item13_skipped_image_paths_are_relative_to_the_dataset(http, first):
    """The probe found skipped[].path in results naming the server's job folder."""
    files = dataset_files(4)
    files["red/broken.jpg"] = b"this is not a jpeg"
    r = submit(http, make_zip(files), strategy="feature_extraction", promote=False, int8=False)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    assert finished(http, task) == "completed"
    got = http.get("/retrain/get", params={"task_id": task}, headers=AUTH)
    assert got.status_code == 200, got.text
    assert [s["path"] for s in got.json()["skipped"]] == ["red/broken.jpg"], got.json()["skipped"]
    _no_server_paths(got.text, first)
    _no_server_paths(json.dumps(http.get("/jobs", headers=AUTH).json()), first)
    # The upload became a snapshot without it; the job's log on the server names it and why.
    log = (first.home / "jobs" / got.json()["job_id"] / "train.log").read_text()
    assert "refused when the upload was admitted: red/broken.jpg: not an image" in log, log


def _trainers(srv: Server) -> list[psutil.Process]:
    procs = psutil.Process(srv.proc.pid).children(recursive=True)
    return [p for p in procs if "training.jobrun" in " ".join(p.cmdline())]


def test_item13_killed_trainer_error_names_no_server_path(http, first):
    """The probe found "training exited with code -9; see /.../train.log" in the reply."""
    r = http.post(SUBMIT, json={"data_path": "colours", "strategy": "feature_extraction", "promote": False},
                  headers=AUTH)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    deadline = time.time() + 60
    while time.time() < deadline and not _trainers(first):
        time.sleep(0.1)
    [trainer] = _trainers(first)
    trainer.kill()
    assert wait_task(http, task, timeout=120)["status"] == "failed"
    got = http.get("/retrain/get", params={"task_id": task}, headers=AUTH)
    assert got.status_code == 500 and "train.log" in got.json()["error"], got.text
    _no_server_paths(got.text, first)
    _no_server_paths(json.dumps(http.get("/jobs", headers=AUTH).json()), first)


def test_item01_sigterm_stops_the_server_in_time(http, first):
    """The probe found the server ignoring SIGTERM after the hung submits."""
    r = submit(http, crc_error_zip())  # one more bad upload right before the signal
    assert r.status_code == 400
    tree = [psutil.Process(first.proc.pid), *psutil.Process(first.proc.pid).children(recursive=True)]
    t0 = time.time()
    first.proc.send_signal(signal.SIGTERM)
    gone, alive = psutil.wait_procs(tree, timeout=45)
    assert not alive, f"still running {time.time() - t0:.0f}s after SIGTERM: {[p.pid for p in alive]}"


# --- items 10 and 14: a crash at each stage leaves nothing behind --------------------------------------------

@pytest.fixture(scope="module")
def second(imagenet_store, tmp_path_factory):
    """A server to crash: the warm standby on, its own system temp dir to watch for leftovers."""
    root = tmp_path_factory.mktemp("crash")
    data_root = root / "data"
    data_root.mkdir()
    tmpdir = root / "system-tmp"
    tmpdir.mkdir()
    srv = Server(copy_store(imagenet_store, root / "home"), data_root, root / "serve.log",
                 env={"TMPDIR": tmpdir, "REFIT_MAX_DATASET_MB": "64"})
    srv.tmpdir = tmpdir
    srv.start()
    yield srv
    srv.stop(kill=True)


def _leftovers(srv: Server) -> list[str]:
    """What a dead job or upload may leave: partial uploads, unpacked datasets, temp folders."""
    jobs = srv.home / "jobs"
    found = [*jobs.glob(".incoming-*"), *jobs.glob("*/data"), *jobs.glob("*/tmp"),
             *(p for p in (srv.home / "tmp").rglob("*") if p.is_file()), *srv.tmpdir.glob("refit-*")]
    return sorted(str(p.relative_to(p.anchor)) for p in found)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def test_item10_upload_killed_while_unpacking_is_removed_at_restart(second):
    """The probe found jobs/.incoming-* (1.5 GB) surviving restarts."""
    upload = zeros_zip(800)  # a 1 MB upload that takes a while to unpack
    errors = []

    def send():
        try:
            with httpx.Client(base_url=second.url, timeout=60) as c:
                submit(c, upload)
        except httpx.HTTPError as e:
            errors.append(e)  # expected: the server dies under the request

    import threading

    t = threading.Thread(target=send)
    t.start()
    _wait_for(lambda: list((second.home / "jobs").glob(".incoming-*/data")), 60, "the upload to be unpacked")
    second.stop(kill=True)
    t.join(60)
    assert list((second.home / "jobs").glob(".incoming-*")), "the crash came too late to test anything"
    second.start()
    assert _leftovers(second) == []


def test_item10_job_killed_while_training_leaves_nothing_after_restart(second):
    """The probe found a killed job's dataset under jobs/<id>/data and its run folder in the system temp dir."""
    with httpx.Client(base_url=second.url, timeout=60) as c:
        r = submit(c, make_zip(dataset_files(6)), strategy="feature_extraction")
        assert r.status_code == 200, r.text
        job_id = c.get("/jobs", headers=AUTH).json()[0]["id"]
    # Wait until the training process has made its temp folder, wherever it keeps it.
    _wait_for(lambda: [p for p in _leftovers(second) if "data" not in Path(p).parts[-1:]], 120,
              "the run's temp folder")
    # The upload became a dataset snapshot in the store; the run trains on a copy written out in its temp folder.
    assert not (second.home / "jobs" / job_id / "data").exists()
    second.stop(kill=True)  # supervisor, workers, standby and trainer die at once
    second.start()
    assert _leftovers(second) == []
    with httpx.Client(base_url=second.url, timeout=60) as c:
        assert c.get(f"/jobs/{job_id}", headers=AUTH).json()["status"] == "failed"


def test_item14_killing_only_the_supervisor_stops_every_process(second, monkeypatch):
    """The probe found workers keeping the port and the trainer publishing after kill -9 of the supervisor."""
    before = sorted(p.name for p in (second.home / "models" / "refit").iterdir() if p.name.startswith("v"))
    with httpx.Client(base_url=second.url, timeout=60) as c:
        r = submit(c, make_zip(dataset_files(6)), strategy="feature_extraction", promote=True)
        assert r.status_code == 200, r.text
        job_id = c.get("/jobs", headers=AUTH).json()[0]["id"]
        _wait_for(lambda: c.get(f"/jobs/{job_id}", headers=AUTH).json()["status"] == "running", 60,
                  "the job to run")
    supervisor = psutil.Process(second.proc.pid)
    children = supervisor.children(recursive=True)
    assert any("training.jobrun" in " ".join(p.cmdline()) for p in children), "no training process to orphan"
    supervisor.kill()
    second.proc.wait(10)
    t0 = time.time()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [(p.pid, " ".join(p.cmdline())[:120]) for p in alive]
    print(f"every worker and trainer gone {time.time() - t0:.1f}s after the supervisor")
    time.sleep(3)  # a trainer left running would publish within seconds on this tiny dataset
    after = sorted(p.name for p in (second.home / "models" / "refit").iterdir() if p.name.startswith("v"))
    assert after == before
    # The same port is free again, and a restart on the same home serves and records the job as failed.
    port = int(second.url.rsplit(":", 1)[1])
    monkeypatch.setattr(serving, "free_port", lambda: port)
    second.start()
    assert second.url.endswith(f":{port}")
    with httpx.Client(base_url=second.url, timeout=60) as c:
        job = c.get(f"/jobs/{job_id}", headers=AUTH).json()
        assert job["status"] == "failed" and "stopped" in job["error"]["message"], job
        assert predict(c, ("red.jpg", solid(COLOURS["red"]))).json()[0]["version"] == before[-1]
    assert _leftovers(second) == []


def test_item01_sigterm_stops_the_server_while_a_slow_upload_runs(imagenet_store, tmp_path):
    """uvicorn waits without limit for open requests after SIGTERM: a client trickling a dataset upload kept
    the server up for as long as it kept sending. Now the workers give open requests REFIT_SHUTDOWN_SECONDS,
    then stop."""
    import socket

    srv = Server(copy_store(imagenet_store, tmp_path / "home"), tmp_path, tmp_path / "serve.log",
                 env={"REFIT_SHUTDOWN_SECONDS": "5", "REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    try:
        head = (f"POST /retrain/submit HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 3000000\r\n\r\n"
                '--x\r\nContent-Disposition: form-data; name="dataset"; filename="slow.zip"\r\n\r\n')
        sock.sendall(head.encode())
        for _ in range(20):  # the upload is under way: a few kilobytes a second
            sock.sendall(b"\0" * 1000)
            time.sleep(0.1)
        tree = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
        t0 = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
            try:
                sock.sendall(b"\0" * 1000)  # the client keeps sending
            except OSError:
                pass
            time.sleep(0.2)
        took = time.time() - t0
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"still running {took:.0f}s after SIGTERM: {[' '.join(p.cmdline())[:80] for p in alive]}"
        print(f"server gone {took:.1f}s after SIGTERM with an upload still arriving")
        assert took < 30
        assert "graceful shutdown took more than 5" in srv.log_path.read_text()
    finally:
        sock.close()
        srv.stop(kill=True)
