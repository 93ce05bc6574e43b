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
_SCRIPT = """
import io, json, sys, time
import numpy as np, PIL
from PIL import Image
from bench.peer_pixels import peer_preprocess
from core.contract import Contract
from core.preprocess import eval_array, load_image, resize_crop
c = Contract(**json.loads(sys.argv[1]))
files = [open(p, "rb").read() for p in sys.argv[3:]]
def cpu(fn, xs):
    best = 1e9
    for _ in range(3):
        t0 = time.thread_time()
        for x in xs:
            fn(x)
        best = min(best, (time.thread_time() - t0) / len(xs))
    return 1000 * best
def peer_decode(d):
    im = Image.open(io.BytesIO(d))
    im.draft("RGB", (c.resize_size, c.resize_size))
    return im.convert("RGB")
images = [load_image(d, c) for d in files]
out = {"version": PIL.__version__, "decode_ms": cpu(lambda d: load_image(d, c), files),
       "resize_ms": cpu(lambda im: resize_crop(im, c), images), "eval_ms": cpu(lambda im: eval_array(im, c), images),
       "peer_decode_ms": cpu(peer_decode, files), "peer_total_ms": cpu(lambda d: peer_preprocess(d, c), files)}
np.save(sys.argv[2], np.stack([np.asarray(resize_crop(im, c)) for im in images]))
print(json.dumps(out))
"""


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
    eval_array, the frozen peer's decode and whole pipeline; and the project's crops, for pixel gaps."""
    exe = python()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="refit-bench-pillow-") as tmp:
        paths = _write(files, Path(tmp))
        crops = Path(tmp) / "crops.npy"
        fields = {"input_size": contract.input_size, "resize_size": contract.resize_size,
                  "mean": list(contract.mean), "std": list(contract.std), "interpolation": contract.interpolation}
        proc = subprocess.run([str(exe), "-c", _SCRIPT, json.dumps(fields), str(crops), *map(str, paths)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            log(f"stock Pillow: the stages failed: {proc.stderr[-500:]}")
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1]), list(np.load(crops).astype(np.float32))


_LIMIT = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, onnxruntime as ort
from bench.peer_pixels import peer_preprocess
from core.contract import Contract
c = Contract(**json.loads(sys.argv[1]))
model, batch, threads, seconds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
files = [open(p, "rb").read() for p in sys.argv[6:]]
so = ort.SessionOptions()
so.intra_op_num_threads = threads
sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
pool = ThreadPoolExecutor(threads)
i = 0
def one():
    global i
    chunk = [files[(i + k) % len(files)] for k in range(batch)]
    i = (i + batch) % len(files)
    sess.run(None, {"input": np.stack(list(pool.map(lambda d: peer_preprocess(d, c), chunk)))})
    return batch
one(); one()
rates = []
for _ in range(3):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 3:
        n += one()
    rates.append(n / (time.perf_counter() - t0))
print(json.dumps({"images_per_s": sorted(rates)[1], "min": min(rates), "max": max(rates)}))
"""


def limit(files: list[bytes], contract, model: Path, batch: int, threads: int, seconds: float) -> dict | None:
    """The in-process limit before: the frozen peer's pipeline under stock Pillow, decoding on a thread per
    core, with ONNX Runtime at `batch` (median of 3 rounds, images/s)."""
    exe = python()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="refit-bench-pillow-") as tmp:
        paths = _write(files, Path(tmp))
        fields = {"input_size": contract.input_size, "resize_size": contract.resize_size,
                  "mean": list(contract.mean), "std": list(contract.std)}
        proc = subprocess.run([str(exe), "-c", _LIMIT, json.dumps(fields), str(model), str(batch), str(threads),
                               str(seconds), *map(str, paths)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        log(f"stock Pillow: the limit before failed: {proc.stderr[-500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write(files: list[bytes], where: Path) -> list[Path]:
    paths = []
    for i, data in enumerate(files):
        paths.append(where / f"{i:04d}.jpg")
        paths[-1].write_bytes(data)
    return paths
