"""Test helpers for driving the real service: image bytes, dataset zips, and a `bentoml serve` process on a
free loopback port with its own REFIT_HOME. Imported by every test file that talks to the service over HTTP."""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- images and datasets ------------------------------------------------------------------------------

def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def solid(rgb, size=(96, 128), seed=0, noise=20.0) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.asarray(rgb, np.float32)[None, None, :] + rng.normal(0, noise, (*size, 3))
    return jpeg(np.clip(a, 0, 255))


def photo(name: str) -> bytes:
    import skimage.data

    return jpeg(getattr(skimage.data, name)())


COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220)}


def dataset_files(per_class: int = 8) -> dict[str, bytes]:
    """Two classes of noisy solid colours: separable from ImageNet features in a few seconds of training."""
    return {f"{cls}/{i}.jpg": solid(rgb, seed=10 * k + i) for k, (cls, rgb) in enumerate(COLOURS.items())
            for i in range(per_class)}


def make_zip(files: dict[str, bytes], prefix: str = "colours/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(prefix + name, data)
    return buf.getvalue()


# --- the server ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, data_root: Path, log_path: Path, bentoml_home: Path | None = None,
                 env: dict | None = None):
        """`env` overrides or adds server settings (a value of None removes the variable)."""
        self.home, self.data_root, self.log_path = home, data_root, log_path
        self.bentoml_home = bentoml_home or home
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.replica = ""  # its replica id, from /versions once it has started

    def start(self, timeout: float = 240, ready: bool = True, attempt: int = 1) -> None:
        """Until both model workers report; and, with `ready`, until /readyz says so (ready=False for a
        server expected to start without a model to serve)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "REFIT_HOME": str(self.home), "BENTOML_HOME": str(self.bentoml_home),
               "REFIT_TOKEN": TOKEN, "REFIT_DATA_ROOT": str(self.data_root), "REFIT_WORKERS": "2",
               "REFIT_POLL_SECONDS": "0.25", "REFIT_MAX_REQUEST_MB": "2", "REFIT_MAX_DATASET_MB": "4",
               "REFIT_MAX_IMAGES": "16", "BENTOML_DO_NOT_TRACK": "True"}
        for k, v in self.extra_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        bentoml_cli = Path(sys.executable).parent / "bentoml"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(bentoml_cli), "serve", "service.service:Refit", "--host", "127.0.0.1",
                                      "--port", str(port)], cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if "Address already in use" in self.log_tail(5) and attempt < 3:
                    # free_port() gives the port back before bentoml binds it; another process took it.
                    return self.start(timeout, ready, attempt + 1)
                pytest.fail(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                up = not ready or httpx.get(self.url + "/readyz", timeout=2).status_code == 200
                listing = httpx.get(self.url + "/versions", timeout=5).json() if up else None
                if listing and len(own_workers(listing)) == 2:
                    self.replica = listing["replica"]
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        self.stop(kill=True)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM for a clean stop; kill=True is a crash: every process of the server dies at once."""
        import psutil

        if not self.proc or self.proc.poll() is not None:
            return
        root = psutil.Process(self.proc.pid)
        tree = [root, *root.children(recursive=True)]  # workers run in sessions of their own
        for p in tree if kill else [root]:
            try:
                p.kill() if kill else p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def predict(http, *images, path: str = "/predict", headers: dict | None = None, **options) -> httpx.Response:
    files = [("images", (name, data, "image/jpeg")) for name, data in images]
    return http.post(path, files=files, data={k: str(v) for k, v in options.items()}, headers=headers)


def wait_task(http, task_id: str, timeout: float = 180, project: str | None = None) -> dict:
    prefix = f"/projects/{project}" if project else ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = http.get(f"{prefix}/retrain/status", params={"task_id": task_id}, headers=AUTH)
        assert r.status_code == 200, r.text
        if r.json()["status"] != "in_progress":
            return r.json()
        time.sleep(0.5)
    pytest.fail(f"retrain task {task_id} did not finish in {timeout}s")


def own_workers(versions: dict) -> list[dict]:
    """The workers of the replica that answered a GET /versions (a server killed earlier on the same store
    stays listed until its records expire)."""
    return [w for w in versions["serving"] if w.get("replica") == versions["replica"]]


def wait_serving(http, version: str, timeout: float = 15) -> float:
    """Until every model worker of the replica `http` talks to reports `version`; returns the seconds it took."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        serving = own_workers(http.get("/versions").json())
        if len(serving) == 2 and all(w["version"] == version for w in serving):
            return time.time() - t0
        time.sleep(0.1)
    pytest.fail(f"workers did not converge on {version}: {http.get('/versions').json()['serving']}")


def metric(text: str, name: str, **labels) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (one series per worker), None if none."""
    values = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(got.get(k) == v for k, v in labels.items()):
                values.append(float(line.rsplit(" ", 1)[1]))
    return sum(values) if values else None




def copy_store(template: Path, home: Path) -> Path:
    """A new REFIT_HOME with the versions and promoted pointer of `template` (no jobs, no server state)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template / "models", home / "models")
    shutil.copy(template / "promoted.json", home / "promoted.json")
    return home
