"""The one decode path (core/preprocess.load_image) on every kind of JPEG a camera or an export tool writes,
and on the other formats, as real encoded files: the contract's reduced-size decode gives the crop a full
decode gives, upright, and broken files are refused by name. Benchmark 2 measures the other decoders this
path was held against (docs/benchmarks.md)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import core.preprocess as pp
from core.contract import Contract

CONTRACT = Contract()  # a 224 crop of a 256 resize, as every built-in backbone
UPRIGHT = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}  # EXIF 2.3, tag 0x0112


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.Resampling.BILINEAR)


def levels(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two model inputs, in 8-bit levels."""
    return float(np.abs(a - b).mean() * 0.225 * 255)


def full_decode_input(data: bytes) -> np.ndarray:
    """The model input from a plain full-size decode, as any reader of the file would make it."""
    return pp.eval_array(Image.open(io.BytesIO(data)).convert("RGB"), CONTRACT)


JPEG_CASES = {
    "baseline_420": (lambda: photo(500, 375), {"quality": 90}),
    "baseline_444": (lambda: photo(500, 375), {"quality": 90, "subsampling": 0}),
    "progressive": (lambda: photo(640, 480), {"quality": 85, "progressive": True}),
    "grayscale": (lambda: photo(500, 375).convert("L"), {"quality": 90}),
    "cmyk": (lambda: photo(500, 375).convert("CMYK"), {"quality": 90}),
    "phone_4000x3000": (lambda: photo(4000, 3000), {"quality": 80}),
    "portrait_1200x1600": (lambda: photo(1200, 1600), {"quality": 90}),
    "smaller_than_the_resize": (lambda: photo(200, 150), {"quality": 90}),
}


@pytest.mark.parametrize("case", list(JPEG_CASES))
def test_every_kind_of_jpeg_gives_the_crop_a_full_decode_gives(case):
    make, kw = JPEG_CASES[case]
    data = encode(make(), "JPEG", **kw)
    im = pp.load_image(data, CONTRACT)
    assert im.mode == "RGB"
    assert min(im.size) >= min(CONTRACT.resize_size, *Image.open(io.BytesIO(data)).size)
    # A reduced-size decode (libjpeg's 1/2, 1/4 or 1/8) resamples less, but shows the same crop of the scene.
    assert levels(pp.eval_array(im, CONTRACT), full_decode_input(data)) < 2.0, case


def test_a_large_jpeg_is_decoded_at_reduced_size_but_never_below_the_resize():
    w, h = pp.load_image(encode(photo(4000, 3000), "JPEG", quality=80), CONTRACT).size
    assert (w, h) == (500, 375)  # 1/8: the largest scale libjpeg offers that keeps 256 px on the shorter side
    w, h = pp.load_image(encode(photo(1200, 1600), "JPEG", quality=80), CONTRACT).size
    assert (w, h) == (300, 400)  # 1/4
    assert pp.load_image(encode(photo(500, 375), "JPEG", quality=90), CONTRACT).size == (500, 375)


def test_a_jpeg_decoded_at_full_size_has_the_pixels_of_any_decoder():
    data = encode(photo(500, 375), "JPEG", quality=92)
    assert np.array_equal(np.asarray(pp.load_image(data, CONTRACT)),
                          np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("orientation", list(UPRIGHT))
def test_every_exif_orientation_is_turned_upright_also_at_reduced_size(orientation):
    upright = photo(1200, 900)
    # What a camera stores: the upright scene turned by the inverse of the tag's transpose.
    inverse = {5: 5, 6: 8, 8: 6, 7: 7}.get(orientation, orientation)
    stored = upright if UPRIGHT[inverse] is None else upright.transpose(UPRIGHT[inverse])
    exif = Image.Exif()
    exif[pp.ORIENTATION_TAG] = orientation
    im = pp.load_image(encode(stored, "JPEG", quality=92, exif=exif), CONTRACT)
    assert im.size == (600, 450)  # upright, at 1/2
    want = pp.eval_array(upright, CONTRACT)
    assert levels(pp.eval_array(im, CONTRACT), want) < 2.0


def test_mpo_is_decoded_from_its_first_picture():
    first, second = photo(640, 480), photo(640, 480).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    got = pp.eval_array(pp.load_image(data, CONTRACT), CONTRACT)
    near, far = levels(got, pp.eval_array(first, CONTRACT)), levels(got, pp.eval_array(second, CONTRACT))
    assert near < 2.0 < far


def test_a_jpeg_libjpeg_only_warns_about_is_answered():
    data = encode(photo(500, 375), "JPEG", quality=90)
    sos = data.index(b"\xff\xda")
    # Junk before the scan marker: libjpeg warns "extraneous bytes before marker" and decodes the image.
    warned = data[:sos] + b"\x00\x00\x00" + data[sos:]
    assert np.array_equal(np.asarray(pp.load_image(warned, CONTRACT)), np.asarray(pp.load_image(data, CONTRACT)))


def test_a_truncated_or_corrupt_jpeg_is_refused_by_name():
    data = encode(photo(500, 375), "JPEG", quality=90)
    with pytest.raises(pp.ImageError, match="photo.jpg: corrupt or truncated"):
        pp.load_image(data[: len(data) // 2], CONTRACT, name="photo.jpg")
    # Zeros after the headers: Pillow 13 fails the decode, Pillow-SIMD 12 the header parse; both refuse it by name.
    with pytest.raises(pp.ImageError, match="photo.jpg: (corrupt or truncated|not an image)"):
        pp.load_image(data[:600] + bytes(2000), CONTRACT, name="photo.jpg")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP", "TIFF"])
def test_other_formats_decode_to_their_exact_pixels(fmt):
    im = photo(500, 375)
    data = encode(im, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.array_equal(np.asarray(pp.load_image(data, CONTRACT)), np.asarray(im))


def test_a_path_and_its_bytes_decode_alike(tmp_path):
    data = encode(photo(1200, 900), "JPEG", quality=90)
    (tmp_path / "a.jpg").write_bytes(data)
    assert np.array_equal(np.asarray(pp.load_image(tmp_path / "a.jpg", CONTRACT)),
                          np.asarray(pp.load_image(data, CONTRACT)))
