"""Servers under test, each a subprocess on a free 127.0.0.1 port in its own process group, so stopping it
stops its workers too."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import httpx

from bench.common import PYTHON, ROOT, log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, ready: Callable[[str], bool]):
        self.name, self.cmd, self.env, self.log_path, self.ready = name, cmd, env, log_path, ready
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self, timeout: float = 300) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [c.replace("{port}", str(self.port)) for c in self.cmd]
        t0 = time.time()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if self.ready(self.url):
                    self.startup_seconds = round(time.time() - t0, 1)
                    log(f"{self.name} ready on port {self.port} after {self.startup_seconds}s")
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


REFIT = "service.service:Refit"


def refit_server(home: Path, log_path: Path, target: str = REFIT, **settings: str) -> Server:
    """`bentoml serve TARGET` on an isolated store; settings are REFIT_* env overrides."""
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           **{f"REFIT_{k.upper()}": str(v) for k, v in settings.items()}}
    env.pop("REFIT_TOKEN", None)  # the bench drives retrain without a token
    bentoml = str(Path(PYTHON).parent / "bentoml")
    cmd = [bentoml, "serve", target, "--host", "127.0.0.1", "--port", "{port}"]
    return Server(target, cmd, env, log_path, _refit_ready)


def _refit_ready(url: str) -> bool:
    if httpx.get(url + "/readyz", timeout=2).status_code != 200:
        return False
    listing = httpx.get(url + "/versions", timeout=5).json()
    # This server's own workers: a server stopped earlier on the same store stays listed until its records expire.
    serving = [w for w in listing["serving"] if w.get("replica") == listing.get("replica")]
    return bool(serving) and all(w.get("version") for w in serving)


PEER = "bench.peer_service:Peer"


def peer_server(model_file: Path, log_path: Path) -> Server:
    """The service a BentoML user writes from BentoML's docs (bench/peer_service.py), serving `model_file`."""
    from bench import stock_pillow
    from bench.peer_service import MODEL_ENV

    env = {**os.environ, MODEL_ENV: str(model_file), "BENTOML_DO_NOT_TRACK": "True"}
    # Frozen with its pixels: where the project runs Pillow-SIMD, the peer runs under stock Pillow, as it did.
    stock = stock_pillow.python() if stock_pillow.simd_in_use() else None
    python = str(stock) if stock else PYTHON
    cmd = [python, "-m", "bentoml", "serve", PEER, "--host", "127.0.0.1", "--port", "{port}"]
    return Server("BentoML-docs peer", cmd, env, log_path,
                  lambda url: httpx.get(url + "/readyz", timeout=2).status_code == 200)


def naive_server(log_path: Path) -> Server:
    cmd = [PYTHON, "-m", "bench.naive_server", "--port", "{port}"]
    return Server("naive server", cmd, dict(os.environ), log_path,
                  lambda url: httpx.get(url + "/healthz", timeout=2).status_code == 200)


def wait_standby_warm(home: Path, timeout: float = 120) -> None:
    """Measure a service that has been up for a while: wait until its standby training process has
    finished warming up (service/jobs.py), so neither a retrain nor a load level times the start-up."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        log_file = home / "jobs" / ".standby.log"
        if log_file.is_file() and "warm" in log_file.read_text(errors="replace"):
            return
        time.sleep(0.5)
    log("the standby training process did not report warm; going on")
