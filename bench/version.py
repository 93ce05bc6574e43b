"""The model the in-process and served benchmarks run: a version trained on the real dataset, as a
customer's service would serve it after its first retrain (not the ImageNet model a fresh service starts
with). It is trained once per `make bench` by the CLI into a store of its own, with the product's
defaults and feature extraction; the store's policy decides FP32 or INT8 for serving, and both files are
kept, so the benchmarks can hold each against the other."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench.common import PYTHON, ROOT, Plan, log

_cache: dict[str, dict] = {}


def trained(plan: Plan) -> dict:
    """{"home", "version", "precision", "serving_file", "fp32_file", "int8", "val_accuracy"}; trained on
    first use in this process, into a temporary store removed at exit."""
    if plan.name in _cache:
        return _cache[plan.name]
    from bench.retrain import subset
    from core.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="refit-bench-version-"))
    data = subset(plan, tmp / "data")
    home = tmp / "home"
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    cmd = [PYTHON, "-m", "cli", "train", str(data), "--strategy", "feature_extraction", "--json",
           "--note", "benchmark model"]
    log("version: training the benchmark model (feature_extraction on the real dataset)")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"training the benchmark model failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    store = Store(home)
    info = store.info(result["version"])
    root = Path(info["path"])
    out = {"home": home, "version": result["version"], "precision": info.get("precision", "fp32"),
           "serving_file": root / info.get("serving_file", "model.onnx"), "fp32_file": root / "model.onnx",
           "int8_file": root / "model.int8.onnx" if (root / "model.int8.onnx").is_file() else None,
           "int8": (info.get("metrics") or {}).get("int8"), "val_accuracy": result["val_accuracy"]}
    log(f"version: {out['version']} serves {out['precision'].upper()} (val accuracy {out['val_accuracy']:.4f})")
    _cache[plan.name] = out
    return out


def describe(v: dict) -> dict:
    """The JSON-safe part, recorded with each benchmark's results."""
    keep = ("version", "precision", "val_accuracy", "int8")
    return {k: v.get(k) for k in keep} | {"serving_file": Path(v["serving_file"]).name}
