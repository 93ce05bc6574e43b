"""Shared fixtures: small synthetic image datasets made on the fly, and an isolated REFIT_HOME."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = os.environ.get("REFIT_TEST_DATA")

# Colour families the pretrained features separate easily, with noise so no two images are alike.
PALETTE = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40)}


def synthetic_image(colour: str, seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(PALETTE[colour], dtype=np.float32)
    img = base + rng.normal(0, 25, (size[1], size[0], 3))
    # A few random rectangles so the images have structure, not just a flat colour.
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        img[y0:y0 + size[1] // 3, x0:x0 + size[0] // 3] *= rng.uniform(0.6, 1.2)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(colour: str = "red", seed: int = 0, size=(96, 80)) -> bytes:
    b = io.BytesIO()
    synthetic_image(colour, seed, size).save(b, "JPEG", quality=90)
    return b.getvalue()


def make_dataset(root: Path, classes=("red", "blue"), n: int = 8, split: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for ci, c in enumerate(classes):
        if split:
            for part, count, off in (("train", n, 0), ("val", max(2, n // 2), 1000)):
                d = root / part / c
                d.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    synthetic_image(c, ci * 10000 + off + i).save(d / f"{c}_{i}.jpg", quality=90)
        else:
            d = root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                synthetic_image(c, ci * 10000 + i).save(d / f"{c}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def refit_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("REFIT_HOME", str(home))
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


def run_cli(*args, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def http(server):
    """A client of the module's `server` fixture (a real `bentoml serve`), for the modules that start one."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REFIT_TEST_DATA_OK():
        pytest.skip("REFIT_TEST_DATA is not set to the hymenoptera folder (../shared/data/hymenoptera); "
                    ".ci/run sets it when the folder exists")
    return Path(REAL_DATA)


def REFIT_TEST_DATA_OK() -> bool:  # reads like the variable it checks
    return bool(REAL_DATA) and (Path(REAL_DATA) / "train").is_dir()


@pytest.fixture(scope="session")
def flowers_data() -> Path:
    """flowers5_128px (5 classes, 280 train / 120 val): small blurry photos where fine-tuning beats the head."""
    path = os.environ.get("REFIT_TEST_FLOWERS")
    if not path or not (Path(path) / "train").is_dir():
        pytest.skip("REFIT_TEST_FLOWERS is not set to the flowers5_128px folder (../shared/data/flowers5_128px); "
                    ".ci/run sets it when the folder exists")
    return Path(path)


@pytest.fixture(scope="session")
def imagenet_store(tmp_path_factory) -> Path:
    """A store holding only the bootstrap version v0001 (pretrained ImageNet model, promoted), made once per
    session; copy it with `serving.copy_store` to start a server without paying the bootstrap again."""
    home = tmp_path_factory.mktemp("imagenet-store")
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    code = "from training.pipeline import bootstrap_imagenet; bootstrap_imagenet()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return home


# --- an S3-compatible endpoint ------------------------------------------------------------------------

S3_BUCKET = "refit-test"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible server on a free loopback port, moto's own server application with one bucket;
    yields the environment a process needs to reach it (endpoint and credentials). Skips where moto's server
    is not installed (`pip install 'moto[server]'`, in the test extra)."""
    import socket
    import time

    try:
        import boto3
        import moto.server  # noqa: F401 - only checks that the server part is installed
    except ImportError as e:
        pytest.skip(f"moto's S3 server is not installed ({e}); `pip install -e '.[test]'` brings it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # moto's server application, served one request at a time: its conditional PUT checks the ETag and then
    # writes without a lock, so on its threaded server two racing conditional writes can both pass (S3
    # itself applies them atomically). One request at a time makes it the atomic endpoint the store expects.
    code = ("from werkzeug.serving import run_simple\n"
            "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, "
            "create_backend_app\n"
            f"run_simple('127.0.0.1', {port}, DomainDispatcherApplication(create_backend_app), threaded=False, "
            "request_handler=MotoRequestHandler)\n")
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "refit-test",
           "AWS_SECRET_ACCESS_KEY": "refit-test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start (exit {proc.poll()}); see {log.name}")
                time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- a Redis server -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real `redis-server` on a free loopback port, nothing persisted; yields its URL. Skips where the
    server is not installed (Debian: `apt-get install redis-server`; `.ci/run` installs it)."""
    import shutil
    import socket
    import time

    exe = shutil.which("redis-server")
    if not exe:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        from redis import Redis

        deadline = time.monotonic() + 30
        while True:
            try:
                Redis.from_url(url).ping()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start (exit {proc.poll()}); see {log.name}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(params=["folder", "s3"])
def any_store(request, tmp_path):
    """The same test on a folder store and on an S3 store (a fresh prefix of the moto bucket)."""
    import uuid

    from core.store import Store

    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        return Store(tmp_path / "home", url=f"s3://{S3_BUCKET}/{uuid.uuid4().hex}")
    return Store(tmp_path / "home")


# --- Chromium, driven by Playwright ---------------------------------------------------------------------

CHROMIUM = os.environ.get("REFIT_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright (which cannot download a browser here), for the console's tests;
    skips where either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'); the console's browser tests need it")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set REFIT_CHROMIUM); "
                    "the console's browser tests need it")
    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in a container, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield b
        b.close()


BLANK_WORDS = {"null", "undefined", "NaN", "[object"}  # what JavaScript prints for an absent value


@contextlib.contextmanager
def console_page(browser, url: str, tmp_path: Path, *, width: int = 1280, timeout_ms: int = 60_000,
                 check_words: bool = True):
    """A page of the console at `url`, for one test: a script error on it fails the test, and so (with
    `check_words`) does an absent value printed as JavaScript writes it; a screenshot of its last state is
    kept in the test's tmp_path, `page.shot(name)` takes more."""
    context = browser.new_context(base_url=url, viewport={"width": width, "height": 900})
    context.set_default_timeout(timeout_ms)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.shot = lambda name: pg.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    yield pg
    pg.shot("last")
    words = set(pg.inner_text("main").split()) if check_words and pg.url.startswith(url) else set()
    context.close()
    assert not words & BLANK_WORDS, words & BLANK_WORDS
    assert not problems, problems  # a script error in the console is a failure, whatever the page shows
