"""Issue 20, items 9, 12 and 20: captures cannot fill the disk, what expires is removed whether the server
captures or not, and what a client without the token can read.

Two real `bentoml serve` processes: one capturing under a small byte budget, uploads with junk after the
image; one with capture off, a token, captures planted in its store (expired, orphaned, fresh, about to
expire) and a version whose label problems name images by path."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image
from serving import AUTH, Server, copy_store, metric, photo, predict

from core.preprocess import load_image
from service.capture import Captures, new_id

BUDGET = 3 * 1024 * 1024  # REFIT_CAPTURE_MAX_MB=3
JUNK = 6 * 1024 * 1024
SECRET_NAME = "john_smith_passport.jpg"  # an upload's file name: personal data


def _noise_png(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _encoded(fmt: str) -> bytes:
    import skimage.data

    im = Image.fromarray(skimage.data.chelsea())
    buf = io.BytesIO()
    (im.convert("P") if fmt == "GIF" else im).save(buf, fmt)
    return buf.getvalue()


def _captures_bytes(home: Path) -> int:
    folder = home / "captures"
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _wait_files(home: Path, ids: list[str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not all((home / "captures" / f"{i}.json").is_file() for i in ids):
        assert time.time() < deadline, f"not all of {ids} were captured in {timeout}s"
        time.sleep(0.1)


def _settle(home: Path, seconds: float = 4.0, timeout: float = 60) -> int:
    """The captures' bytes once they stop changing for `seconds` (writes and retention passes done)."""
    deadline, last, since = time.time() + timeout, -1, time.time()
    while time.time() < deadline:
        now = _captures_bytes(home)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since > seconds:
            return now
        time.sleep(0.2)
    return last


# --- item 9: a byte budget, and only the image is kept -------------------------------------------------

@pytest.fixture(scope="module")
def capturing(tmp_path_factory, imagenet_store):
    root = tmp_path_factory.mktemp("capture-limits")
    home = copy_store(imagenet_store, root / "home")
    srv = Server(home, root / "data", root / "serve.log",
                 env={"REFIT_CAPTURE": "1", "REFIT_CAPTURE_MAX_MB": "3", "REFIT_MAX_REQUEST_MB": "8",
                      "REFIT_TRAIN_STANDBY": "0", "REFIT_CAPTURE_PRUNE_SECONDS": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cap_http(capturing):
    with httpx.Client(base_url=capturing.url, timeout=120) as c:
        yield c


def test_junk_after_the_image_is_not_stored(cap_http, capturing):
    """The issue's attack: a photo followed by megabytes of junk, over the open /predict. The capture keeps
    the photo's own bytes; each format still decodes to the pixels the model saw."""
    home = capturing.home
    image = photo("astronaut")
    ids = []
    for i in range(5):
        r = predict(cap_http, (f"p{i}.jpg", image + os.urandom(JUNK)))  # no token: /predict is open
        assert r.status_code == 200, r.text
        ids.append(r.json()[0]["prediction_id"])
    _wait_files(home, ids)
    for i in ids:
        assert (home / "captures" / f"{i}.img").read_bytes() == image
    formats = {fmt: _encoded(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")}
    r = predict(cap_http, *[(f"cat.{fmt.lower()}", data + os.urandom(512 * 1024)) for fmt, data in formats.items()])
    assert r.status_code == 200, r.text
    by_format = dict(zip(formats, (p["prediction_id"] for p in r.json()), strict=True))
    _wait_files(home, list(by_format.values()))
    for fmt, data in formats.items():
        stored = (home / "captures" / f"{by_format[fmt]}.img").read_bytes()
        if fmt in ("JPEG", "PNG", "GIF", "WEBP"):
            assert stored == data, fmt  # cut where the image ends
        else:  # BMP and TIFF have no end to cut at: their pixels, as a lossless PNG
            assert stored.startswith(b"\x89PNG") and len(stored) < len(data) + 512 * 1024, fmt
        assert np.array_equal(np.asarray(load_image(stored)), np.asarray(load_image(data))), fmt
        record = json.loads((home / "captures" / f"{by_format[fmt]}.json").read_text())
        assert record["bytes"] == len(stored)
    sent = 5 * (len(image) + JUNK) + sum(len(d) + 512 * 1024 for d in formats.values())
    kept = _captures_bytes(home)
    assert kept < 5 * len(image) + sum(len(d) for d in formats.values()) + 64 * 1024, (kept, sent)
    # What was captured is what the feedback loop reads back.
    got = cap_http.get(f"/captures/{ids[0]}/image", headers=AUTH)
    assert got.status_code == 200 and got.content == image


def test_captures_stay_within_the_byte_budget(cap_http, capturing):
    """Images of about 0.75 MB each, 10 of them under a 3 MB budget: the oldest go, the total stays within
    the budget (and within a tenth more per other worker while both write), the newest are kept."""
    home = capturing.home
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _captures_bytes(home))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ids = []
    try:
        for i in range(10):
            r = predict(cap_http, (f"noise{i}.png", _noise_png(500, seed=i)))
            assert r.status_code == 200, r.text
            ids.append(r.json()[0]["prediction_id"])
        _wait_files(home, ids[-1:])
        settled = _settle(home)
    finally:
        stop.set()
        watcher.join()
    assert settled <= BUDGET, settled
    assert peak[0] <= 1.1 * BUDGET + 800_000, peak[0]  # two workers: one other's writes between passes
    assert (home / "captures" / f"{ids[-1]}.img").read_bytes() == _noise_png(500, seed=9)
    assert not (home / "captures" / f"{ids[0]}.img").exists()  # the oldest went first
    # An image alone over the budget is not captured, and is counted; the prediction is answered.
    dropped = metric(cap_http.get("/metrics").text, "refit_capture_dropped_total") or 0
    r = predict(cap_http, ("huge.png", _noise_png(1100, seed=99)))
    assert r.status_code == 200, r.text
    big = r.json()[0]["prediction_id"]
    deadline = time.time() + 30
    while (metric(cap_http.get("/metrics").text, "refit_capture_dropped_total") or 0) <= dropped:
        assert time.time() < deadline, "the oversized capture was not counted as dropped"
        time.sleep(0.2)
    assert not (home / "captures" / f"{big}.img").exists()
    assert _settle(home) <= BUDGET


def test_byte_budget_on_each_store(any_store):
    """The same budget on the folder store and on S3 (sizes come from the listing)."""
    captures = Captures(any_store, max_images=100, days=30, max_bytes=400_000)
    images = [_noise_png(150, seed=i) for i in range(8)]  # about 68 KB each
    ids = []
    for i, data in enumerate(images):
        ids.append(new_id())
        result = {"label": "x", "score": 0.5, "version": "v0001", "margin": 0.1, "top_k": []}
        captures.keep(ids[-1], f"n{i}.png", data + os.urandom(200_000), result)
        time.sleep(0.002)
    deadline = time.time() + 60
    while ids[-1] not in captures.ids():
        assert time.time() < deadline
        time.sleep(0.05)
    captures.prune()
    kept = captures.ids()
    total = sum(len(captures.image(i)) for i in kept)
    assert total <= 400_000 and kept == ids[-len(kept):] and len(kept) < len(ids)
    assert captures.image(ids[-1]) == images[-1]


# --- items 12 and 20: a server with capture off and a token --------------------------------------------

def _capture_id(at: float) -> str:
    return f"{int(at * 1000):012x}{uuid.uuid4().hex[:12]}"


def _plant(home: Path, capture_id: str, record: bool = True) -> bytes:
    folder = home / "captures"
    folder.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes("red", seed=int(capture_id[-4:], 16))
    (folder / f"{capture_id}.img").write_bytes(data)
    if record:
        (folder / f"{capture_id}.json").write_text(json.dumps({
            "id": capture_id, "at": "2026-01-01T00:00:00Z", "name": SECRET_NAME, "version": "v0001",
            "label": "tabby", "score": 0.5, "margin": 0.1, "top_k": [{"label": "tabby", "score": 0.5}],
            "sha256": "0" * 64, "bytes": len(data), "feedback": None}))
    return data


def _publish_with_problems(home: Path, root: Path) -> str:
    """v0002: the bootstrap model again, with label problems and near-duplicates that name images by path."""
    import onnx

    from core.contract import Contract
    from core.store import Store
    from training.export import CONTRACT_KEY
    from training.pipeline import _publish

    model = root / "model.onnx"
    shutil.copy(home / "models" / "refit" / "v0001" / "model.onnx", model)
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    item = {"path": f"train/cats/{SECRET_NAME}", "split": "train", "given": "cats", "suggested": "dogs",
            "score": 0.9}
    metrics = {"label_problems": {"available": True, "count": 1, "images": 10, "items": [item]},
               "near_duplicates": {"threshold": 0.98, "count": 1,
                                   "items": [{"val": {"path": f"val/cats/{SECRET_NAME}"},
                                              "train": {"path": "train/cats/a.jpg"}, "similarity": 0.99}]}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    meta = {"strategy": "pretrained", "backbone": "efficientnet_lite0", "classes": ["<imagenet-1k>"]}
    return _publish(Store(home), {"model.onnx": model, "metrics.json": root / "metrics.json"},
                    Contract.from_json(props[CONTRACT_KEY]), meta)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, imagenet_store):
    """Capture off, token set, one day of retention, a retention pass every second; planted before start:
    an expired capture, an image whose record never came, and a fresh capture."""
    root = tmp_path_factory.mktemp("capture-off")
    home = copy_store(imagenet_store, root / "home")
    assert _publish_with_problems(home, root) == "v0002"
    now = time.time()
    planted = {"expired": _capture_id(now - 2 * 86400), "orphan": _capture_id(now - 3600),
               "fresh": _capture_id(now - 3600)}
    _plant(home, planted["expired"])
    _plant(home, planted["orphan"], record=False)
    fresh = _plant(home, planted["fresh"])
    srv = Server(home, root / "data", root / "serve.log",
                 env={"REFIT_CAPTURE": "0", "REFIT_CAPTURE_DAYS": "1", "REFIT_CAPTURE_PRUNE_SECONDS": "1",
                      "REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    srv.planted, srv.fresh = planted, fresh
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def quiet_http(quiet):
    with httpx.Client(base_url=quiet.url, timeout=120) as c:
        yield c


def test_expired_captures_go_at_start_and_on_a_timer_with_capture_off(quiet):
    folder = quiet.home / "captures"
    planted = quiet.planted
    deadline = time.time() + 30
    while (folder / f"{planted['expired']}.img").exists() or (folder / f"{planted['orphan']}.img").exists():
        assert time.time() < deadline, sorted(p.name for p in folder.iterdir())
        time.sleep(0.2)
    assert not (folder / f"{planted['expired']}.json").exists()
    assert (folder / f"{planted['fresh']}.img").read_bytes() == quiet.fresh  # within its day: kept
    # One that expires a few seconds from now, while the server runs and captures nothing.
    soon = _capture_id(time.time() - 86400 + 3)
    _plant(quiet.home, soon)
    assert (folder / f"{soon}.img").exists()
    deadline = time.time() + 30
    while (folder / f"{soon}.img").exists() or (folder / f"{soon}.json").exists():
        assert time.time() < deadline, "a capture that expired while the server ran is still on disk"
        time.sleep(0.2)
    assert (folder / f"{planted['fresh']}.json").exists()


# Every route, and whether it needs the token once the server has one (docs/service.md, "Captures, privacy
# and the token"): (method, path, request kwargs, status without the token, status with it).
def _routes(ctx: dict) -> list[tuple]:
    img = jpeg_bytes("red", seed=5)
    b64 = base64.b64encode(img).decode()
    name, sha, snap, cap = ctx["dataset"], ctx["sha256"], ctx["snapshot"], ctx["capture"]
    return [
        ("GET", "/versions", {}, 200, 200),
        ("GET", "/versions/v0002", {}, 200, 200),
        ("GET", "/versions/v0001/files/results.csv", {}, 404, 404),  # open (404: the bootstrap has none)
        ("GET", "/drift", {}, 200, 200),
        ("GET", "/datasets", {}, 200, 200),
        ("GET", f"/datasets/{name}", {}, 200, 200),
        ("GET", f"/datasets/{name}/snapshots/{snap}", {}, 401, 200),
        ("GET", f"/datasets/{name}/images/{sha}", {}, 401, 200),
        ("GET", f"/datasets/{name}/suggest", {}, 401, 200),
        ("GET", f"/captures/{cap}/image", {}, 401, 200),
        ("POST", "/feedback", {"json": {"prediction_id": "0" * 24, "label": "x"}}, 401, 404),
        ("POST", f"/datasets/{name}/images", {"files": [("images", ("b.jpg", img, "image/jpeg"))],
                                               "data": {"label": "blue"}}, 401, 200),
        ("POST", f"/datasets/{name}/images/{'f' * 64}", {"json": {"label": "red"}}, 401, 404),
        ("DELETE", f"/datasets/{name}/images/{'f' * 64}", {}, 401, 404),
        ("GET", "/jobs", {}, 401, 200),
        ("GET", "/jobs/nope", {}, 401, 404),
        ("POST", "/retrain", {"json": {"dataset": "no-such-dataset"}}, 401, 404),
        ("POST", "/retrain/submit", {"json": {"dataset": "no-such-dataset"}}, 401, 404),
        ("GET", "/retrain/status", {"params": {"task_id": "nope"}}, 401, 404),
        ("GET", "/retrain/get", {"params": {"task_id": "nope"}}, 401, 404),
        ("POST", "/promote", {"json": {"version": "v0009"}}, 401, 404),
        ("POST", "/rollback", {"json": {}}, 401, 409),
        ("POST", "/predict", {"files": [("images", ("a.jpg", img, "image/jpeg"))]}, 200, 200),
        ("POST", "/predict_base64", {"json": {"images": [{"name": "a.jpg", "data": b64}]}}, 200, 200),
        ("POST", "/explain", {"files": [("image", ("a.jpg", img, "image/jpeg"))]}, 200, 200),
        ("GET", "/metrics", {}, 200, 200),
        ("GET", "/readyz", {}, 200, 200),
        ("GET", "/ui/", {}, 200, 200),
        ("GET", "/docs.json", {}, 200, 200),
    ]


def test_every_route_with_and_without_the_token(quiet_http, quiet):
    r = quiet_http.post("/datasets/people/images", headers=AUTH, data={"label": "red"},
                        files=[("images", (SECRET_NAME, jpeg_bytes("red", seed=1), "image/jpeg"))])
    assert r.status_code == 200, r.text
    sha = r.json()["added"][0]["sha256"]
    ctx = {"dataset": "people", "sha256": sha, "snapshot": r.json()["snapshot"], "capture": quiet.planted["fresh"]}
    for method, path, kwargs, without, with_token in _routes(ctx):
        r = quiet_http.request(method, path, **kwargs)
        assert r.status_code == without, (method, path, r.status_code, r.text[:300])
        if r.status_code != 401:  # what anyone can read names no upload and no image hash
            assert SECRET_NAME not in r.text and sha not in r.text, (method, path, r.text[:500])
        r = quiet_http.request(method, path, headers=AUTH, **kwargs)
        assert r.status_code == with_token, (method, path, r.status_code, r.text[:300])
    # The public listing keeps counts and classes; the manifest, with the token, names the upload.
    listing = {d["dataset"]: d for d in quiet_http.get("/datasets").json()}
    assert listing["people"]["images"] == 2 and listing["people"]["classes"] == 2
    assert quiet_http.get("/datasets/people").json()["classes"] == {"blue": 1, "red": 1}
    manifest = quiet_http.get(f"/datasets/people/snapshots/{ctx['snapshot']}", headers=AUTH).json()
    assert manifest["entries"][0]["name"] == SECRET_NAME


def test_label_problems_list_images_with_the_token_only(quiet_http):
    open_ = quiet_http.get("/versions/v0002").json()
    for key in ("label_problems", "near_duplicates"):
        assert open_[key]["count"] == 1 and open_[key]["items"] == [] and open_[key]["items_hidden"], open_[key]
    assert SECRET_NAME not in json.dumps(open_)
    full = quiet_http.get("/versions/v0002", headers=AUTH).json()
    assert full["label_problems"]["items"][0]["path"] == f"train/cats/{SECRET_NAME}"
    assert "items_hidden" not in full["label_problems"]
    assert SECRET_NAME in json.dumps(full["near_duplicates"])
    row = next(v for v in quiet_http.get("/versions").json()["versions"] if v["id"] == "v0002")
    assert row["metrics"]["label_problems"] == 1  # the listing has the count only


def test_console_headers(quiet_http):
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css"):
        r = quiet_http.get(path)
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, (path, r.headers)
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
        assert r.headers.get("x-content-type-options") == "nosniff", path
        assert r.headers.get("x-frame-options") == "DENY", path


def test_console_works_under_its_csp(quiet, quiet_http, browser):
    """In Chromium: the pages that use data: and blob: images and inline widths render with no CSP
    violation (the heatmap, guarded thumbnails, the score bars)."""
    from serving import TOKEN

    r = quiet_http.post("/datasets/thumbs/images", headers=AUTH, data={"label": "red"},
                        files=[("images", ("t.jpg", jpeg_bytes("red", seed=2), "image/jpeg"))])
    assert r.status_code == 200, r.text
    page = browser.new_page(base_url=quiet.url)
    try:
        page.set_default_timeout(60_000)
        problems: list[str] = []
        # Chromium reports what the policy refused as console errors ("Refused to load ... Content Security
        # Policy"); the listener below names any violation the page itself sees.
        page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text
                or "CSP violation" in m.text else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.add_init_script("document.addEventListener('securitypolicyviolation', (e) => "
                             "console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))")
        page.goto("/ui/")
        page.fill("#token", TOKEN)
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("#token-state:has-text('token set')")
        page.set_input_files("#files", {"name": "red.jpg", "mimeType": "image/jpeg",
                                        "buffer": jpeg_bytes("red", seed=3)})
        heat = page.wait_for_selector("img.heatmap")
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=heat)
        width = page.evaluate("() => document.querySelector('.bars .bar span').style.width")
        assert width.endswith("%"), width
        page.goto("/ui/#data")
        thumb = page.wait_for_selector("section.dataset[data-dataset=thumbs] .thumbs img")
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumb)
        page.goto("/ui/#versions")
        page.click("button[aria-label='Details of v0002']")
        page.wait_for_selector("#detail-title:has-text('v0002')")
    finally:
        page.close()
    assert not problems, problems
