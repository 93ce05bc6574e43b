"""What every benchmark shares: the plan (how long to measure), the data, the machine and small helpers."""
from __future__ import annotations

import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from core.settings import settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
PYTHON = sys.executable

# EfficientNet-Lite0 at 224x224: about 0.41 G multiply-accumulates per image, counted as 2 FLOPs each.
GFLOP_PER_IMAGE = 0.82
BATCH_SIZES = (1, 8, 32)
CONCURRENCY = (1, 4, 16, 64)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Plan:
    """How much each benchmark measures. `full` fits the whole run in about 45 minutes on 2 cores."""

    name: str
    model_seconds: float  # per (runtime, batch size) cell
    model_images: int | None  # real images per split to preprocess and calibrate on; None: all
    preprocess_images: int | None  # None: every real JPEG
    preprocess_repeats: int
    inprocess_seconds: float
    level_seconds: float  # measured time per load level (after the warm-up)
    level_warmup_seconds: float
    level_max_requests: int
    memory_predictions: int  # Refit's memory is read after at least this many answered predictions
    retrain_subset: int | None  # images per class and split; None: the whole dataset
    retrain_epochs: dict  # strategy -> --epochs cap (absent: the CLI default)
    retrain_options: dict  # more training-request fields for every run (CLI flags and retrain form fields)

    @property
    def results_dir(self) -> Path:
        return RESULTS if self.name == "full" else RESULTS / self.name


FULL = Plan("full", model_seconds=4.0, model_images=None, preprocess_images=None, preprocess_repeats=2,
            inprocess_seconds=10.0, level_seconds=12.0, level_warmup_seconds=2.0, level_max_requests=4000,
            memory_predictions=10_000, retrain_subset=None,
            retrain_epochs={"partial": 6, "full": 6, "scratch": 6, "auto": 6}, retrain_options={})
QUICK = Plan("quick", model_seconds=0.3, model_images=16, preprocess_images=16, preprocess_repeats=1,
             inprocess_seconds=1.0, level_seconds=1.5, level_warmup_seconds=0.3, level_max_requests=40,
             memory_predictions=200, retrain_subset=6,
             retrain_epochs={"partial": 1, "full": 1, "scratch": 1, "auto": 1}, retrain_options={"head_epochs": 5})


# --- data --------------------------------------------------------------------------------------------

def data_dir() -> Path:
    """The real dataset (ants vs bees); read in place, never copied into the project."""
    path = Path(settings().bench_data or ROOT.parent / "shared" / "data" / "hymenoptera").resolve()
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        raise SystemExit(f"bench: no dataset at {path} (expected train/ and val/ class folders); "
                         "set REFIT_BENCH_DATA")
    return path


def flowers_dir() -> Path | None:
    """The second real dataset (5 flower classes, small blurry photos where fine-tuning beats a frozen
    backbone): REFIT_BENCH_FLOWERS, else flowers5_128px beside the project; None when absent."""
    path = Path(settings().bench_flowers or ROOT.parent / "shared" / "data" / "flowers5_128px").resolve()
    return path if (path / "train").is_dir() and (path / "val").is_dir() else None


def jpeg_files(split: str | None = None, limit: int | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of the dataset's JPEGs in a fixed order; other formats are skipped so every
    figure is about JPEG decoding."""
    from PIL import Image

    root = data_dir()
    paths = sorted((root / split).rglob("*") if split else root.rglob("*"))
    out = []
    for p in paths:
        if not p.is_file() or p.suffix.lower() not in (".jpg", ".jpeg"):
            continue
        data = p.read_bytes()
        if Image.open(io.BytesIO(data)).format != "JPEG":
            continue
        out.append((p.name, data))
        if limit and len(out) >= limit:
            break
    return out


# --- the machine -------------------------------------------------------------------------------------

def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model, flags = platform.processor() or "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("unknown", "", "x86_64"):
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}, "hypervisor": "hypervisor" in flags}


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> dict:
    import numpy
    import onnxruntime
    import PIL
    import torch

    return {"cpu": cpu_info(), "cores": cores(), "memory_gib": memory_gib(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "load_average": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# --- measuring ---------------------------------------------------------------------------------------

def repeat_for(fn: Callable[[], int], seconds: float, warmup: int = 2, min_calls: int = 3) -> dict:
    """Call fn (which returns how many items it handled) until `seconds` have passed; items/s and the
    per-call times. The warm-up calls let allocators and thread pools settle first."""
    for _ in range(warmup):
        fn()
    times, items = [], 0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        items += fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds and len(times) >= min_calls:
            break
    elapsed = time.perf_counter() - start
    return {"items": items, "calls": len(times), "seconds": elapsed, "per_second": items / elapsed,
            "call_ms_median": statistics.median(times) * 1000}


def interleaved(cells: dict, seconds: float, rounds: int = 3) -> dict:
    """Measure several alternatives in turns, `rounds` times each, and keep each one's median round. On a
    shared machine a burst of outside load then costs one round of every alternative instead of all of one,
    and the spread between rounds shows how noisy the figure is."""
    runs: dict = {key: [] for key in cells}
    for fn in cells.values():  # allocators and thread pools settle before any round counts
        fn()
        fn()
    for _ in range(rounds):
        for key, fn in cells.items():
            runs[key].append(repeat_for(fn, seconds / rounds, warmup=0, min_calls=1))
    out = {}
    for key, rs in runs.items():
        rates = sorted(r["per_second"] for r in rs)
        out[key] = {"per_second": statistics.median(rates), "min_per_second": rates[0], "max_per_second": rates[-1],
                    "call_ms_median": statistics.median(r["call_ms_median"] for r in rs),
                    "calls": sum(r["calls"] for r in rs), "rounds": rounds}
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- results -----------------------------------------------------------------------------------------

def save_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable))
    return path


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def target_row(target: str, figure: str, goal: str, passed: bool | None) -> list:
    """One row of the targets table: what, the measured figure, the goal, PASS/FAIL (– when not judged)."""
    return [target, figure, goal, "–" if passed is None else ("PASS" if passed else "FAIL")]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
