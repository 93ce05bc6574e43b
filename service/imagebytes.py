"""What a capture keeps of an upload: the image, and nothing a client sent after it.

A decoder stops at the end of the image's container (JPEG's EOI marker, PNG's IEND chunk, GIF's trailer, the
RIFF length of a WebP), so bytes past that end never reach the model and are cut. Where no such end can be
found (BMP, TIFF, a JPEG without its end marker), or the container is far larger than its pixels could need
(a huge comment or metadata block), the pixels the model saw are kept instead, as a lossless PNG: decoded the
way the model decoded them (the contract's reduced-scale JPEG decode included), so decoding the stored bytes
gives the model's input again, exactly.
"""
from __future__ import annotations

import io

from PIL import Image

from core.preprocess import load_image

# A container may carry metadata (EXIF, ICC, a thumbnail) beside its pixels; more than this over 8 bytes a
# pixel (16-bit RGBA, uncompressed) is not needed by any image, and is kept as the pixels instead.
SLACK_BYTES = 1 << 20


def stored_form(data: bytes, contract=None) -> bytes:
    """The bytes to keep for an upload the model decoded with `contract`: a prefix of `data`, or a PNG."""
    end = container_end(data)
    if end is not None:
        kept = data[:end]
        if _same_header(kept, data) and len(kept) <= _plausible_bytes(kept):
            return kept
    return _as_png(data, contract)


def container_end(data: bytes) -> int | None:
    """Where the image's container ends in `data`, or None when that cannot be told from its structure."""
    for magic, finder in ((b"\xff\xd8", _jpeg_end), (b"\x89PNG\r\n\x1a\n", _png_end), (b"GIF87a", _gif_end),
                          (b"GIF89a", _gif_end), (b"RIFF", _webp_end)):
        if data.startswith(magic):
            end = finder(data)
            return end if end is not None and 0 < end <= len(data) else None
    return None


def _jpeg_end(d: bytes) -> int | None:
    """Walk the marker segments; after each start of scan, the entropy-coded data runs to the next marker
    that is neither a stuffed 0xFF00 nor a restart marker. The first EOI outside a segment ends the image
    (an EXIF thumbnail's own EOI lies inside its APP1 segment and is skipped with it)."""
    i, n = 2, len(d)
    while i < n:
        if d[i] != 0xFF:
            return None
        while i < n and d[i] == 0xFF:  # fill bytes before a marker
            i += 1
        if i >= n:
            return None
        marker = d[i]
        i += 1
        if marker == 0xD9:
            return i
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        if i + 2 > n:
            return None
        length = int.from_bytes(d[i:i + 2], "big")
        if length < 2:
            return None
        i += length
        if marker == 0xDA:
            i = _scan_end(d, i)
            if i is None:
                return None
    return None


def _scan_end(d: bytes, i: int) -> int | None:
    """The offset of the marker that ends the entropy-coded data starting at `i`."""
    while True:
        j = d.find(b"\xff", i)
        if j < 0 or j + 1 >= len(d):
            return None
        follower = d[j + 1]
        if follower == 0x00 or 0xD0 <= follower <= 0xD7:
            i = j + 2
        elif follower == 0xFF:
            i = j + 1
        else:
            return j


def _png_end(d: bytes) -> int | None:
    i, n = 8, len(d)
    while i + 8 <= n:
        length = int.from_bytes(d[i:i + 4], "big")
        kind = d[i + 4:i + 8]
        i += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return i
    return None


def _gif_end(d: bytes) -> int | None:
    n = len(d)
    if n < 13:
        return None
    i = 13 + ((3 << ((d[10] & 7) + 1)) if d[10] & 0x80 else 0)  # header, screen descriptor, global palette
    while i < n:
        block = d[i]
        if block == 0x3B:  # trailer
            return i + 1
        if block == 0x21:  # extension: label, then data sub-blocks
            i = _sub_blocks_end(d, i + 2)
        elif block == 0x2C:  # image: descriptor, local palette, LZW code size, data sub-blocks
            if i + 10 > n:
                return None
            flags = d[i + 9]
            i += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
            i = _sub_blocks_end(d, i + 1)
        else:
            return None
        if i is None:
            return None
    return None


def _sub_blocks_end(d: bytes, i: int) -> int | None:
    n = len(d)
    while i < n:
        size = d[i]
        i += 1
        if size == 0:
            return i
        i += size
    return None


def _webp_end(d: bytes) -> int | None:
    if len(d) < 12 or d[8:12] != b"WEBP":
        return None
    size = int.from_bytes(d[4:8], "little")
    return 8 + size + (size & 1)  # a RIFF chunk is padded to an even length


def _same_header(kept: bytes, data: bytes) -> bool:
    """The cut bytes still open as the same image (format and size): the cut did not fall inside it."""
    try:
        a, b = Image.open(io.BytesIO(kept)), Image.open(io.BytesIO(data))
        return (a.format, a.size, a.mode) == (b.format, b.size, b.mode)
    except Exception:  # noqa: BLE001 - anything PIL raises on a cut it cannot read
        return False


def _plausible_bytes(kept: bytes) -> int:
    w, h = Image.open(io.BytesIO(kept)).size
    return 8 * w * h + SLACK_BYTES


def _as_png(data: bytes, contract) -> bytes:
    buf = io.BytesIO()
    # The model's own decode (reduced-scale for a JPEG, upright, RGB): its PNG decodes to the same pixels.
    load_image(data, contract, max_pixels=1 << 62).save(buf, "PNG", compress_level=3)
    return buf.getvalue()


def media_type(data: bytes) -> str:
    """The media type of an image's bytes, by their first bytes (for serving a stored image)."""
    for magic, kind in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"
