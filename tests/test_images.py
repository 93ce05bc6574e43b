"""Images as a hostile or careless client sends them (issue 9, items 2, 5, 7, 12 and 15): a real `bentoml serve`
for predictions, the real `refit train` CLI for training, real image files and zips.

One server for the module (a copy of the session's ImageNet store, no warm training process); the training
tests run the CLI in a child process and read its `--json` line and its peak memory.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from serving import Server, copy_store, dataset_files, make_zip, photo, predict


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def camera() -> np.ndarray:
    import skimage.data

    return skimage.data.camera()  # 512 x 512, 8-bit grayscale


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.fixture(scope="module")
def server(tmp_path_factory, imagenet_store):
    root = tmp_path_factory.mktemp("refit-images")
    srv = Server(copy_store(imagenet_store, root / "home"), root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop()


def answer(http, name: str, data: bytes) -> dict:
    r = predict(http, (name, data), top_k=5)
    assert r.status_code == 200, r.text
    return r.json()[0]


def assert_same_answer(got: dict, want: dict, tol: float = 1e-4):
    assert got["label"] == want["label"], (got, want)
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]], (got, want)
    assert abs(got["score"] - want["score"]) <= tol, (got, want)


# --- item 5: what one request may cost --------------------------------------------------------------

def test_item05_request_pixel_budget_refuses_costly_requests_before_decoding(http):
    """Probe: 64 large PNGs in one request (9 MB), or one 1 x 40,000,000 PNG, each cost seconds of CPU."""
    many = [(f"big{i}.png", encode(Image.new("RGB", (4000, 3000), (i, 90, 200)), "PNG")) for i in range(16)]
    assert sum(len(d) for _, d in many) < 2 * 1024 * 1024  # under the server's body size limit
    t0 = time.time()
    r = predict(http, *many)
    assert r.status_code == 413, r.text
    message = r.json()["error"]
    assert "megapixel" in message and "per request" in message and "big0.png" in message, message
    assert time.time() - t0 < 10, "refused after decoding, not before"

    thin = encode(Image.new("L", (1, 40_000_000), 7), "PNG")
    r = predict(http, ("thin.png", thin))
    assert r.status_code == 400, r.text
    assert "thin.png" in r.json()["error"] and "megapixel" in r.json()["error"], r.json()

    r = http.post("/predict_base64", json={"images": [{"data": base64.b64encode(d).decode(), "name": n}
                                                      for n, d in many]})
    assert r.status_code == 413 and "per request" in r.json()["error"], r.text
    # Within the budget everything is answered: four of those PNGs, and six 12-megapixel JPEGs (72 megapixels,
    # but a JPEG is decoded at reduced scale, so it counts a quarter).
    assert predict(http, *many[:4]).status_code == 200
    phone = encode(Image.linear_gradient("L").resize((4000, 3000)).convert("RGB"), "JPEG", quality=70)
    r = predict(http, *[(f"p{i}.jpg", phone) for i in range(6)])
    assert r.status_code == 200, r.text


# --- item 12: modes and orientation -----------------------------------------------------------------

def _mode_twins() -> dict[str, tuple[bytes, bytes]]:
    """Each case: (a file in an unusual mode, the 8-bit RGB file a viewer would show for it)."""
    gray = camera()
    rgb = Image.fromarray(gray).convert("RGB")
    twin = encode(rgb, "PNG")
    hole = np.zeros(gray.shape, bool)
    hole[:, :200] = True  # fully transparent on the left, with a colour underneath that must not show
    shown = np.asarray(rgb).copy()
    shown[hole] = 255  # transparent pixels are shown on white
    rgba = np.dstack([np.asarray(rgb), np.where(hole, 0, 255)]).astype(np.uint8)
    rgba[hole, :3] = (0, 200, 0)
    la = Image.fromarray(np.dstack([gray, np.where(hole, 0, 255)]).astype(np.uint8), "LA")
    la_gray = gray.copy()
    la_gray[hole] = 255
    p = Image.fromarray(gray).convert("P")
    p_pixels = np.asarray(p).copy()
    p_pixels[hole] = 255
    p_pixels[~hole] = np.minimum(p_pixels[~hole], 254)
    p = Image.fromarray(p_pixels, "P")
    palette = np.asarray(Image.fromarray(gray).convert("P").getpalette()[:768]).reshape(-1, 3)
    palette[255] = (0, 200, 0)  # the transparent index
    p.putpalette(palette.astype(np.uint8).ravel().tolist())
    p_shown = palette[p_pixels].astype(np.uint8)
    p_shown[hole] = 255
    return {
        "png_16bit_gray": (encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), twin),
        "tiff_32bit_int": (encode(Image.fromarray(gray.astype(np.int32) * 257), "TIFF"), twin),
        "tiff_float_0_1": (encode(Image.fromarray(gray.astype(np.float32) / 255), "TIFF"), twin),
        "png_rgba": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), encode(Image.fromarray(shown), "PNG")),
        "png_la": (encode(la, "PNG"), encode(Image.fromarray(la_gray).convert("RGB"), "PNG")),
        "png_palette_transparency": (encode(p, "PNG", transparency=255),
                                     encode(Image.fromarray(p_shown), "PNG")),
        "tiff_cmyk": (encode(rgb.convert("CMYK"), "TIFF"), twin),
    }


@pytest.mark.parametrize("case", list(_mode_twins()))
def test_item12_every_image_mode_answers_like_its_8bit_rgb_twin(http, case):
    """Probe: 16-bit grayscale PNGs came out almost white; alpha, 32-bit and float images were also wrong."""
    odd, twin = _mode_twins()[case]
    assert_same_answer(answer(http, f"{case}.img", odd), answer(http, "twin.png", twin))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_item12_exif_orientation_is_applied(http, orientation):
    """Probe: EXIF orientation was ignored, so phone photos were classified lying on their side."""
    upright = Image.fromarray(photo_array("rocket"))
    # What a phone writes: the sensor's pixels plus the tag that says how to turn them upright.
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    want = answer(http, "upright.png", encode(upright, "PNG"))
    assert_same_answer(answer(http, "tagged.png", encode(stored, "PNG", exif=exif_orientation(orientation))), want)
    got = answer(http, "tagged.jpg", encode(stored, "JPEG", quality=95, exif=exif_orientation(orientation)))
    assert got["label"] == answer(http, "upright.jpg", encode(upright, "JPEG", quality=95))["label"]


def photo_array(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


# --- item 15: /predict_base64 encodings and content type -----------------------------------------------

def test_item15_predict_base64_accepts_common_encodings_and_refuses_garbage(http):
    """Probe: wrapped base64, data: URLs and the URL-safe alphabet were refused; text/plain was accepted."""
    data = photo("coffee")
    want = answer(http, "coffee.jpg", data)
    plain = base64.b64encode(data).decode()
    variants = {
        "wrapped": "\n".join(textwrap.wrap(plain, 76)) + "\n",  # what `base64` prints
        "crlf": "\r\n".join(textwrap.wrap(plain, 64)),
        "data_url": "data:image/jpeg;base64," + plain,
        "url_safe": base64.urlsafe_b64encode(data).decode(),
        "unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
    }
    for how, text in variants.items():
        r = http.post("/predict_base64", json={"images": [{"data": text, "name": how}], "top_k": 5})
        assert r.status_code == 200, (how, r.text)
        assert_same_answer(r.json()[0], want)
    for garbage in ("%%%", "abcde", "data:image/jpeg;base64,@@@@", plain[:-10] + "!!!!" + plain[-6:]):
        r = http.post("/predict_base64", json={"images": [{"data": garbage, "name": "bad.jpg"}]})
        assert r.status_code == 400, (garbage, r.text)
        assert "bad.jpg" in r.json()["error"] and "base64" in r.json()["error"], r.text
    body = json.dumps({"images": [{"data": plain}]})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": ctype} if ctype else {}
        r = http.post("/predict_base64", content=body, headers=headers)
        assert r.status_code == 415, (ctype, r.text)
        assert "application/json" in r.json()["error"], r.text
    r = http.post("/predict_base64", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    r = http.post("/predict_base64", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"], r.text
    r = http.post("/predict_base64", json={"images": [{"data": plain}], "top_k": 0})
    assert r.status_code == 400 and "top_k" in r.json()["error"], r.text
    spec = http.get("/docs.json").json()["paths"]["/predict_base64"]["post"]["requestBody"]["content"]
    assert "application/json" in spec, spec


# --- training through the CLI -------------------------------------------------------------------------

def train_cli(home, data, *args, timeout: int = 900) -> tuple[dict, float, str]:
    """`refit train DATA ... --json` in a child process; (its JSON line, its peak RSS in MB, its stderr)."""
    # A wrapper process whose only child is the CLI, so RUSAGE_CHILDREN is the CLI's own peak.
    code = textwrap.dedent("""
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "cli", "train", *sys.argv[1:]],
                              capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        sys.exit(done.returncode)
    """)
    import os

    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", code, str(data), *map(str, args), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(lines[-2]), float(lines[-1]), done.stderr


def _stripes(horizontal: bool, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    period = int(rng.integers(16, 24))
    line = ((np.arange(160) // (period // 2)) % 2 * 170 + 40).astype(np.float32)
    a = np.repeat(line[:, None], 160, axis=1) if horizontal else np.repeat(line[None, :], 160, axis=0)
    a = a + rng.normal(0, 12, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def big_16bit_and_rotated_run(tmp_path_factory, imagenet_store):
    """One `refit train` on a 1.3 MB zip: sixteen 6000x6000 16-bit grayscale PNGs in two classes, dark and
    light, and two classes of JPEGs holding the same stored pixels (vertical stripes), one of them with an
    EXIF tag that turns them horizontal. Returns (the JSON result, the run's peak RSS in MB)."""
    tmp = tmp_path_factory.mktemp("train-images")
    files = {}
    for cls, level in (("dark", 60), ("light", 190)):
        for i in range(8):
            a = np.full((6000, 6000), (level + 3 * i) * 257, np.uint16)
            files[f"{cls}/{i}.png"] = encode(Image.fromarray(a), "PNG")
    for i in range(8):
        files[f"across/{i}.jpg"] = encode(_stripes(False, i), "JPEG", quality=92, exif=exif_orientation(6))
        files[f"down/{i}.jpg"] = encode(_stripes(False, 100 + i), "JPEG", quality=92)
    zip_path = tmp / "modes.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    assert zip_path.stat().st_size < 2 << 20
    home = copy_store(imagenet_store, tmp / "home")
    result, peak_mb, _ = train_cli(home, zip_path, "--strategy", "feature_extraction", "--head-epochs", "30",
                                   "--promote", "false")
    return result, peak_mb


def test_item02_training_memory_is_bounded_by_images_times_training_resolution(big_16bit_and_rotated_run, tmp_path,
                                                                              imagenet_store):
    """Probe: 40 solid 7000x7000 PNGs (680 KB zipped) took the training process to 9.1 GB RSS."""
    _, peak_mb = big_16bit_and_rotated_run
    # The same run on 32 small JPEGs is the reference: torch, the backbone and ONNX Runtime (about 1.3 GB).
    zip_path = tmp_path / "small.zip"
    zip_path.write_bytes(make_zip(dataset_files(16)))
    _, small_mb, _ = train_cli(copy_store(imagenet_store, tmp_path / "home"), zip_path, "--strategy",
                               "feature_extraction", "--head-epochs", "30", "--promote", "false")
    # Sixteen 6000x6000 images kept decoded would add 1.7 GB (RGB). Bounded by images x training resolution,
    # the run adds only the decode of one image at a time (a few hundred MB for 36 megapixels of 16-bit).
    print(f"peak RSS {peak_mb:.0f} MB; {small_mb:.0f} MB on small images")
    assert peak_mb - small_mb < 800, f"peak RSS {peak_mb:.0f} MB, {small_mb:.0f} MB on small images"


def test_item12_training_reads_16bit_pngs_and_exif_orientation(big_16bit_and_rotated_run):
    """Probe: 16-bit PNGs trained as white images, and EXIF-rotated photos trained lying on their side."""
    result, _ = big_16bit_and_rotated_run
    per_class = result["metrics"]["per_class"]
    for cls in ("dark", "light", "across", "down"):
        assert per_class[cls]["recall"] == 1.0, (cls, per_class)


def test_item07_oversized_image_is_skipped_not_fatal(tmp_path, imagenet_store):
    """Probe: one image over PIL's decompression-bomb limit failed the whole retrain with a 500."""
    files = dataset_files(4)
    files["red/huge.png"] = encode(Image.new("1", (20000, 10000)), "PNG")  # 200 megapixels in 25 KB
    zip_path = tmp_path / "bomb.zip"
    zip_path.write_bytes(make_zip(files))
    home = copy_store(imagenet_store, tmp_path / "home")
    result, _, _ = train_cli(home, zip_path, "--strategy", "feature_extraction", "--head-epochs", "5",
                             "--promote", "false")
    [skipped] = result["skipped"]
    assert skipped["path"].endswith("red/huge.png") and "limit" in skipped["reason"], skipped
    assert result["version"] and sum(result["metrics"]["per_class"][c]["support"] for c in ("red", "blue")) > 0
