"""Stock Pillow beside Pillow-SIMD. Where `make install` swapped Pillow for Pillow-SIMD (the Makefile's
`pillow-simd` step), the pipeline before can no longer run in this interpreter, since both are `PIL`. So an
interpreter is made once under bench/results/: a venv of the same Python holding only PyPI's Pillow, with the
project's environment behind it on sys.path (a .pth file), so it imports stock Pillow and everything else
the project's interpreter has (about 30 s to make). Benchmarks 2, 3 and 12 run the pipeline before there on
the same JPEG files, measured the same way, and benchmark 13 trains there."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, log

VENV = RESULTS / "stock-pillow"
# Both scripts run in the stock interpreter and measure with the benchmarks' own functions, which it imports
# from the project (PYTHONPATH), so the figures are taken exactly as in this interpreter.
_STAGES = """
import io, json, sys
import numpy as np, PIL
from PIL import Image
from bench.peer_pixels import peer_preprocess
from bench.preprocessing import cpu_ms
from core.contract import Contract
from core.preprocess import eval_array, load_image, resize_crop
c, files = Contract(**json.loads(sys.argv[1])), [open(p, "rb").read() for p in sys.argv[3:]]
def peer_decode(d):
    im = Image.open(io.BytesIO(d))
    im.draft("RGB", (c.resize_size, c.resize_size))
    return im.convert("RGB")
images = [load_image(d, c) for d in files]
out = {"version": PIL.__version__, "decode_ms": cpu_ms(lambda d: load_image(d, c), files),
       "resize_ms": cpu_ms(lambda im: resize_crop(im, c), images),
       "eval_ms": cpu_ms(lambda im: eval_array(im, c), images), "peer_decode_ms": cpu_ms(peer_decode, files),
       "peer_total_ms": cpu_ms(lambda d: peer_preprocess(d, c), files)}
np.save(sys.argv[2], np.stack([np.asarray(resize_crop(im, c)) for im in images]))
print(json.dumps(out))
"""
_LIMIT = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from bench.inprocess import pipelines
model, batch, threads, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
files = [open(p, "rb").read() for p in sys.argv[5:]]
with ThreadPoolExecutor(max_workers=threads) as pool:
    (m,) = pipelines(model, files, batch, threads, pool, seconds, only=f"decode on {threads} threads").values()
print(json.dumps(m))
"""
_stages_cache: dict = {}


def simd_in_use() -> bool:
    try:
        importlib.metadata.distribution("pillow-simd")
    except importlib.metadata.PackageNotFoundError:
        return False
    import PIL

    return importlib.metadata.version("pillow-simd") == PIL.__version__


def python() -> Path | None:
    """The stock-Pillow interpreter, made on first use; None (logged) where it cannot be made."""
    exe = VENV / "bin" / "python"
    if exe.is_file():
        return exe
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", "--no-deps", "pillow"], check=True,
                       capture_output=True, env=env, timeout=900)
        own = subprocess.run([str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log(f"stock Pillow: cannot make {VENV}: {getattr(e, 'stderr', b'')[-300:]!r}")
        return None
    # Its own site-packages (stock Pillow) first, then the project's: a .pth line appends a directory.
    (Path(own) / "refit_project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return exe


def stages(files: list[bytes], contract) -> tuple[dict, list[np.ndarray]] | None:
    """CPU ms per image on one thread under stock Pillow: the project's decode, resize + crop and
    eval_array, the frozen peer's decode and whole pipeline; and the project's crops, for pixel gaps.
    Measured once per process for the same images (benchmarks 2 and 12 both ask)."""
    key = (contract.to_json(), len(files), sum(map(len, files)))
    if key not in _stages_cache:
        with tempfile.TemporaryDirectory(prefix="refit-bench-pillow-") as tmp:
            crops = Path(tmp) / "crops.npy"
            m = _run(_STAGES, [contract.to_json(), str(crops)], files, Path(tmp), "the stages")
            _stages_cache[key] = (m, list(np.load(crops).astype(np.float32))) if m else None
    return _stages_cache[key]


def limit(files: list[bytes], model: Path, batch: int, threads: int, seconds: float) -> dict | None:
    """The in-process limit before: benchmark 3's pipeline (decode on a thread per core, ONNX Runtime at
    `batch`) under stock Pillow; `interleaved`'s figures (per_second and its rounds' range)."""
    with tempfile.TemporaryDirectory(prefix="refit-bench-pillow-") as tmp:
        return _run(_LIMIT, [str(model), str(batch), str(threads), str(seconds)], files, Path(tmp), "the limit")


def _run(script: str, args: list[str], files: list[bytes], tmp: Path, what: str) -> dict | None:
    """`script ARGS FILE...` in the stock interpreter, the files written under `tmp`; its last line's JSON."""
    exe = python()
    if exe is None:
        return None
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp / f"{i:04d}.jpg")
        paths[-1].write_bytes(data)
    proc = subprocess.run([str(exe), "-c", script, *args, *map(str, paths)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        log(f"stock Pillow: {what} failed: {proc.stderr[-500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
