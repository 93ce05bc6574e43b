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
import sys
import time
import zipfile
import zlib
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
TMPFS_SPARE_MB = 48


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
                                                           "REFIT_MAX_DATASET_MB": "128"})
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
