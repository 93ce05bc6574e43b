"""The serving image (issue 26, item 7, "A slim serving image"), built and run with podman: `make
container-serving` (bentoml build + bentoml containerize, the serving half of `make container`) from a store
holding one version trained on the real photos, then `podman run`. The image must stay small (no compilers,
no git, no apt cache: bentofile.yaml's Dockerfile template), run Pillow-SIMD on x86_64 (the template builds
it in a stage of its own), and answer /readyz, /predict and /ui.

Slow (marked `slow`): 1.5 minutes on 2 cores, 3.7 where the base image must first be built by
container/build-base.sh (debootstrap); most of it is training the version and installing the Python packages
into the image. Where podman has no cached build of the Pillow-SIMD stage, under a minute more (that stage
alone, the rest of the image cached: 47 s). Skips, saying why, where podman, runc or debootstrap is not
installed, or podman cannot run a container here."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, run_cli
from serving import free_port

pytestmark = pytest.mark.slow

BASE = "docker.io/library/python:3.11-slim"  # what BentoML's Dockerfile starts FROM (bentofile docker.base_image)
MAX_BYTES = 600 * 10**6  # docs/benchmarks.md, Container images: 510 MB measured
# What the apt line of BentoML's default Dockerfile brought (build-essential, git). /usr/bin/perl stays: it
# is perl-base, Essential in every Debian system; the `perl` package (its modules) came with that line.
ABSENT_TOOLS = ("gcc", "cc", "g++", "make", "git")
ANT = "val/ants/157401988_d0564a9d02.jpg"
# The Pillow-SIMD version the template builds (its PILLOW_SIMD_VERSION).
PILLOW_SIMD = re.search(r"ARG PILLOW_SIMD_VERSION=(\S+)", (ROOT / "container" / "bento.Dockerfile.j2").read_text())[1]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_image() -> str:
    """The base image, built by container/build-base.sh where it is missing, and proof podman runs it here."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install -y podman runc debootstrap; "
                    ".ci/run installs them as root)")
    if podman("image", "exists", BASE).returncode != 0:
        if os.geteuid() != 0:
            pytest.skip(f"no {BASE} image, and container/build-base.sh (debootstrap) must run as root")
        done = subprocess.run([str(ROOT / "container" / "build-base.sh")], capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probe = podman("run", "--rm", BASE, "python3", "-c", "print('ok')")
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"podman cannot run a container here ({reason}); docs/deploy.md, 'On a machine without an "
                    "image registry', has the containers.conf lines for `error setting rlimit`")
    return BASE


@pytest.fixture(scope="module")
def packed(real_data, tmp_path_factory) -> tuple[Path, dict]:
    """A store whose promoted version (trained on the real photos) the bento packs, and its summary."""
    home = tmp_path_factory.mktemp("container") / "home"
    done = run_cli("train", real_data, "--strategy", "feature_extraction", "--json", home=home)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["promoted"], summary
    return home, summary


@pytest.fixture(scope="module")
def image(real_data, base_image, packed) -> str:
    """The serving image, built by the Makefile's own recipe under a tag of its own (removed afterwards).
    real_data first: without the photos the test skips before building anything."""
    home, _ = packed
    tag = f"localhost/refit-test:{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    # `-o install`: the test runs in an environment already installed (this interpreter's), not ROOT/.venv.
    done = subprocess.run(["make", "-o", "install", "container-serving", f"BIN={Path(sys.executable).parent}",
                           "CONTAINER_BACKEND=podman", f"SERVING_IMAGE={tag}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    yield tag
    podman("rmi", "-f", tag)


@pytest.fixture(scope="module")
def served(image) -> str:
    """`podman run` of the image on a free loopback port, once /readyz answers 200: its base URL."""
    port, name = free_port(), f"refit-test-{uuid.uuid4().hex[:12]}"
    started = podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", image)
    assert started.returncode == 0, started.stderr
    url, deadline, status = f"http://127.0.0.1:{port}", time.monotonic() + 180, None
    try:
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{url}/readyz", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if status == 200 or running != "true":
                break
            time.sleep(1)
        logs = podman("logs", name)
        assert status == 200, f"/readyz never answered 200 (last: {status}):\n{(logs.stdout + logs.stderr)[-4000:]}"
        yield url
    finally:
        podman("rm", "-f", "--time", "0", name)  # no graceful stop needed


def test_image_is_small(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    layers = podman("history", "--format", "{{.Size}}\t{{printf \"%.70s\" .CreatedBy}}", image).stdout
    assert size <= MAX_BYTES, f"{size:,} bytes > {MAX_BYTES:,}; the layers:\n{layers}"


def test_image_has_no_compilers_git_or_apt_cache(image):
    # Prints each tool found, each of those packages installed, and any file apt left in its lists or cache.
    script = ("for t in " + " ".join(ABSENT_TOOLS) + "; do command -v $t; done; "
              "dpkg-query -W -f '${db:Status-Status} ${Package}\\n' perl build-essential git 2>/dev/null"
              " | grep '^installed'; find /var/lib/apt/lists /var/cache/apt -type f ! -name lock")
    done = podman("run", "--rm", "--user", "root", "--entrypoint", "sh", image, "-c", script)
    assert done.stdout.strip() == "", f"the image still has: {done.stdout.split()}"


def test_image_runs_pillow_simd_with_every_codec_serving_accepts(image):
    """On x86_64 the template swaps Pillow for Pillow-SIMD (compiled in its own build stage, with AVX2): the
    PIL that imports is Pillow-SIMD's, Pillow is gone, and it decodes every format core/preprocess.py accepts
    (JPEG, PNG by zlib, WebP, TIFF by libtiff) with no codec package installed. Elsewhere PyPI's Pillow stays."""
    script = ("import json, platform, PIL, PIL.features as f; from importlib.metadata import distributions; "
              "print(json.dumps({'machine': platform.machine(), 'version': PIL.__version__, "
              "'dists': sorted(d.name.lower() for d in distributions() if d.name.lower().startswith('pillow')), "
              "'codecs': {c: f.check(c) for c in ('jpg', 'zlib', 'webp', 'libtiff')}}))")
    done = podman("run", "--rm", "--entrypoint", "python", image, "-c", script)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert all(found["codecs"].values()), found
    if found["machine"] == "x86_64":
        assert found["dists"] == ["pillow-simd"] and found["version"] == PILLOW_SIMD, found
    else:
        assert found["dists"] == ["pillow"], found


def test_container_serves_the_packed_version(served, packed, real_data):
    """/readyz (the fixture waited for it), /predict on a real photo with the packed version, and /ui."""
    home, summary = packed
    with httpx.Client(base_url=served, timeout=60) as http:
        assert http.get("/readyz").status_code == 200
        reply = http.post("/predict", files=[("images", ("ant.jpg", (real_data / ANT).read_bytes(), "image/jpeg"))])
        assert reply.status_code == 200, reply.text
        (answer,) = reply.json()
        assert answer["version"] == summary["version"]
        assert {t["label"] for t in answer["top_k"]} == {"ants", "bees"}  # the packed version's classes
        # The same answer as the version's ONNX file gives on this machine (`refit predict`).
        local = run_cli("predict", real_data / ANT, "--json", home=home)
        assert local.returncode == 0, local.stderr[-2000:]
        (expected,) = json.loads(local.stdout.strip().splitlines()[-1])
        assert answer["label"] == expected["label"] and abs(answer["score"] - expected["score"]) < 0.01, answer
        console = http.get("/ui", follow_redirects=True)
        assert console.status_code == 200 and "<title>Refit console</title>" in console.text
