"""Benchmark 13: the accuracy guard. A faster decoder or resize changes pixels, so each dataset is trained twice
with the same request and seed: once under stock Pillow (the pipeline before, bench/stock_pillow.py) and once
under the PIL the project runs now (Pillow-SIMD where `make install` built it). Validation accuracy of the
FP32 and INT8 files and the ONNX parity check come from each version's metrics.json.

    hymenoptera:    refit train DATA --strategy feature_extraction
    flowers5_128px: refit train DATA --strategy partial   (fixed strategies: auto's choice depends on time)"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench import stock_pillow
from bench.common import PYTHON, Plan, data_dir, flowers_dir, log, md_table, target_row
from bench.retrain import cli_train, subset

MAX_POINTS = 0.5  # the largest change in validation accuracy the new pipeline may cause
RUNS = (("hymenoptera", "feature_extraction"), ("flowers5_128px", "partial"))


def run(plan: Plan) -> dict:
    import PIL

    if not stock_pillow.simd_in_use():
        return {"skipped": f"the project runs stock Pillow {PIL.__version__} here: no pixels changed, nothing to guard"}
    stock = stock_pillow.python()
    if stock is None:
        return {"error": "could not make the stock Pillow interpreter (bench/stock_pillow.py)"}
    roots = {"hymenoptera": data_dir(), "flowers5_128px": flowers_dir()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="refit-bench-guard-") as tmp:
        for dataset, strategy in RUNS:
            if roots[dataset] is None:
                log(f"guard: {dataset} is not here (REFIT_BENCH_FLOWERS); skipped")
                continue
            data = subset(plan, Path(tmp) / f"data-{dataset}", roots[dataset])
            for label, python in (("stock Pillow (before)", stock), (f"Pillow-SIMD {PIL.__version__} (now)", PYTHON)):
                home = Path(tmp) / f"home-{dataset}-{len(rows)}"
                result, wall, error = cli_train(data, home, ["--strategy", strategy, *_epochs(plan, strategy)], plan,
                                                f"guard-{dataset}-{len(rows)}.log", python=str(python))
                rows.append({"dataset": dataset, "strategy": strategy, "pil": label, "wall_seconds": wall,
                             **(_figures(home, result["version"]) if result else {"error": error})})
                log(f"guard: {dataset} {label}: {rows[-1].get('fp32')} / {rows[-1].get('int8')}")
    return {"rows": rows}


def _epochs(plan: Plan, strategy: str) -> list[str]:
    epochs = plan.retrain_epochs.get(strategy) if plan.name != "full" else None
    return ["--epochs", str(epochs)] if epochs else []


def _figures(home: Path, version: str) -> dict:
    metrics = json.loads(next(home.rglob(f"{version}/metrics.json")).read_text())
    int8 = metrics.get("int8") or {}
    parity = metrics.get("parity") or {}
    return {"fp32": metrics.get("val_accuracy"), "int8": int8.get("val_accuracy"),
            "parity_max_abs_diff": parity.get("max_abs_prob_diff"), "parity_passed": parity.get("passed")}


def pairs(result: dict) -> list[tuple[dict, dict]]:
    rows = [r for r in result.get("rows", []) if "error" not in r]
    return [(a, b) for a in rows for b in rows
            if a["dataset"] == b["dataset"] and a["pil"].startswith("stock") and not b["pil"].startswith("stock")]


def tables(result: dict) -> str:
    if result.get("skipped"):
        return result["skipped"] + "."
    rows = [[r["dataset"], r["strategy"], r["pil"], r.get("fp32"), r.get("int8"), r.get("parity_max_abs_diff"),
             r.get("parity_passed"), r["wall_seconds"]] if "error" not in r else
            [r["dataset"], r["strategy"], r["pil"], r["error"][:200], "", "", "", r["wall_seconds"]]
            for r in result["rows"]]
    return (md_table(["dataset", "strategy", "PIL", "val accuracy FP32", "val accuracy INT8",
                      "parity: largest |Δprob| ONNX vs torch", "parity passed", "whole run s"], rows)
            + "\n\nThe same request, seed and data, trained under each PIL in one run.")


def targets(result: dict) -> list[list]:
    if result.get("skipped"):
        return [target_row("Accuracy guard: the new pipeline's val accuracy vs the pipeline before", result["skipped"],
                           f"within {MAX_POINTS} points", None)]
    rows = []
    for before, now in pairs(result):
        gaps = [abs(now[k] - before[k]) * 100 for k in ("fp32", "int8") if now.get(k) is not None
                and before.get(k) is not None]
        ok = bool(gaps) and max(gaps) <= MAX_POINTS and bool(now.get("parity_passed"))
        rows.append(target_row(f"Accuracy guard, {now['dataset']} ({now['strategy']}): now vs before, FP32 / INT8; "
                               "ONNX parity", f"{now['fp32']:.4f} vs {before['fp32']:.4f} / "
                               f"{now['int8']:.4f} vs {before['int8']:.4f}; parity "
                               f"{'passed' if now.get('parity_passed') else 'FAILED'}",
                               f"within {MAX_POINTS} points, parity passes", ok))
    return rows or [target_row("Accuracy guard", "no pair of runs finished", f"within {MAX_POINTS} points", False)]
