"""Benchmark 6: the offline backbones, EfficientNet-Lite0, -Lite1 and -Lite2, side by side.

For each backbone and dataset (the real ants/bees set, and flowers5_128px when it is present): the default
`refit train DATA --backbone NAME --json` through the CLI, in a fresh REFIT_HOME (wall seconds, validation
accuracy, the strategy `auto` kept, fit seconds), then the version it published served by a real
`bentoml serve` on that store, driven by wrk at the concurrency where the served benchmark peaks (c=4 on
2 cores) with the dataset's own validation JPEGs: images/s as a user of that version would get them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench import wrkgen
from bench.common import Plan, data_dir, flowers_dir, log, md_table
from bench.retrain import cli_flags, cli_train, subset
from bench.servers import refit_server, wait_standby_warm

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
DEFAULT = BACKBONES[0]
# The concurrency at which benchmark 4 found Refit's best throughput with wrk on 2 cores (its sweep:
# 1, 4, 16, 64); more connections only queue.
CONCURRENCY = 4
SERVE_SECONDS = 12.0  # measured seconds per backbone, after SERVE_WARMUP_SECONDS at the same load
SERVE_WARMUP_SECONDS = 3.0
# Validation sets of 120-153 images: one image is 0.7-0.8 points, so a smaller difference is noise.
SAME_ACCURACY = 0.01


def datasets() -> tuple[dict[str, Path], dict[str, str]]:
    """({name: folder} to measure, {name: why it is skipped})."""
    found, skipped = {"hymenoptera": data_dir()}, {}
    flowers = flowers_dir()
    if flowers is not None:
        found["flowers5_128px"] = flowers
    else:
        skipped["flowers5_128px"] = "flowers5_128px not found (set REFIT_BENCH_FLOWERS)"
    return found, skipped


def run(plan: Plan) -> dict:
    found, skipped = datasets()
    for name, why in skipped.items():
        log(f"backbones: skipping {name}: {why}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="refit-bench-backbones-") as tmp:
        tmp = Path(tmp)
        for dname, root in found.items():
            data = subset(plan, tmp / "data" / dname, root)
            images = _val_jpegs(data)
            for backbone in BACKBONES:
                home = tmp / "homes" / f"{dname}-{backbone}"
                row = {"dataset": dname, "backbone": backbone, **train(data, backbone, home, plan)}
                if "error" not in row:
                    row["served"] = serve(home, row["version"], images, plan, f"{dname}-{backbone}")
                rows.append(row)
    return {"datasets": {n: str(p) for n, p in found.items()}, "skipped": skipped, "subset": plan.retrain_subset,
            "concurrency": CONCURRENCY, "rows": rows, "recommendation": recommend(rows)}


def _val_jpegs(data: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of the validation split's JPEGs (the load generator sends them as image/jpeg)."""
    from PIL import Image

    out = []
    for p in sorted((data / "val").rglob("*")):
        if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"):
            with Image.open(p) as im:
                if im.format == "JPEG":
                    out.append((p.name, p.read_bytes()))
    return out


def train(data: Path, backbone: str, home: Path, plan: Plan) -> dict:
    """The default `refit train` with this backbone (a smoke test adds the plan's caps), as a user runs it."""
    epochs = plan.retrain_epochs.get("auto") if plan.retrain_subset else None
    options = {**plan.retrain_options, **({"epochs": epochs} if epochs else {})} if plan.retrain_subset else {}
    log(f"backbones: training {backbone} on {data.name if plan.retrain_subset is None else 'a subset'}")
    result, wall, error = cli_train(data, home, ["--backbone", backbone, *cli_flags(options)], plan,
                                    f"backbones-{home.name}-train.log")
    if result is None:
        log(f"backbones: {backbone} failed: {error[-300:]}")
        return {"wall_seconds": wall, "error": error}
    precision = _precision(home, result["version"])
    log(f"backbones: {backbone} -> {result['strategy']}: val_acc {result['val_accuracy']:.4f}, "
        f"train {result['train_seconds']:.1f}s, wall {wall:.1f}s, serves {precision}")
    return {"wall_seconds": wall, "version": result["version"], "chosen": result["strategy"],
            "val_accuracy": result["val_accuracy"], "train_seconds": result["train_seconds"],
            "total_seconds": result.get("total_seconds"), "promoted": result.get("promoted"),
            "precision": precision}


def _precision(home: Path, version: str) -> str:
    from core.store import Store

    return Store(home).info(version).get("precision", "fp32")


def serve(home: Path, version: str, images: list[tuple[str, bytes]], plan: Plan, label: str) -> dict:
    """The published version behind a real server: images/s at CONCURRENCY with wrk (a short fixed load)."""
    import httpx

    seconds = min(SERVE_SECONDS, plan.level_seconds)
    warmup = min(SERVE_WARMUP_SECONDS, plan.level_warmup_seconds)
    logs = plan.results_dir / "logs"
    try:
        with refit_server(home, logs / f"backbones-{label}-serve.log") as srv:
            wait_standby_warm(home)  # its start-up work is not the model's serving cost
            name, body = images[0]
            answer = httpx.post(srv.url + "/predict", files={"images": (name, body, "image/jpeg")}, timeout=60)
            answer.raise_for_status()
            serving = answer.json()[0]["version"]
            if serving != version:
                return {"error": f"the server answered with {serving}, not the published {version}"}
            row = wrkgen.closed_loop(srv.url, images, CONCURRENCY, seconds=seconds, warmup_seconds=warmup)
    except Exception as e:  # noqa: BLE001 - recorded in the row; the other backbones still run
        log(f"backbones: serving {label} failed: {e}")
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    log(f"backbones: {label} serves {row['throughput']:.1f} images/s at c={CONCURRENCY} "
        f"(p50 {row['p50_ms'] or 0:.0f} ms, errors {row['errors']})")
    keep = ("throughput", "p50_ms", "p99_ms", "ok", "errors", "error_kinds", "seconds")
    return {k: row[k] for k in keep} | {"startup_seconds": srv.startup_seconds}


# --- the recommendation, from the figures -----------------------------------------------------------------

def summary(rows: list[dict]) -> dict[str, dict]:
    """Per backbone, over the datasets where every backbone finished: mean accuracy, mean CLI wall seconds
    and mean served images/s."""
    ok = [r for r in rows if "error" not in r and "error" not in r.get("served", {"error": "not served"})]
    sets = {r["dataset"] for r in ok}
    complete = sorted(d for d in sets if {r["backbone"] for r in ok if r["dataset"] == d} == set(BACKBONES))
    out = {}
    for b in BACKBONES:
        mine = [r for r in ok if r["backbone"] == b and r["dataset"] in complete]
        if mine:
            out[b] = {"datasets": complete, "val_accuracy": _mean(r["val_accuracy"] for r in mine),
                      "wall_seconds": _mean(r["wall_seconds"] for r in mine),
                      "images_per_second": _mean(r["served"]["throughput"] for r in mine)}
    return out


def recommend(rows: list[dict]) -> dict:
    """The cheapest backbone (least training wall time, then most served images/s) whose mean validation
    accuracy is within SAME_ACCURACY of the best: a difference smaller than that is one image or two."""
    s = summary(rows)
    if not s:
        return {"backbone": None, "why": "no dataset where every backbone trained and served"}
    best = max(v["val_accuracy"] for v in s.values())
    near = [b for b, v in s.items() if v["val_accuracy"] >= best - SAME_ACCURACY]
    pick = min(near, key=lambda b: (s[b]["wall_seconds"], -s[b]["images_per_second"]))
    d = s[DEFAULT]
    parts = []
    for b, v in s.items():
        if b == DEFAULT:
            continue
        parts.append(f"{b} {v['val_accuracy'] - d['val_accuracy']:+.3f} accuracy for "
                     f"{v['wall_seconds'] / d['wall_seconds']:.2f} x the training time and "
                     f"{v['images_per_second'] / d['images_per_second']:.2f} x the served images/s")
    why = (f"mean over {', '.join(d['datasets'])}: {DEFAULT} {d['val_accuracy']:.3f} accuracy, "
           f"{d['wall_seconds']:.0f} s to train, {d['images_per_second']:.0f} images/s served; "
           + "; ".join(parts) + f". {pick} is the cheapest within {SAME_ACCURACY:.2f} of the best accuracy "
           f"({best:.3f}).")
    return {"backbone": pick, "why": why, "summary": s}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# --- report ----------------------------------------------------------------------------------------------

def tables(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        served = r.get("served") or {}
        ips = served.get("throughput")
        rows.append([r["dataset"], r["backbone"], r.get("chosen", "failed"), _acc(r.get("val_accuracy")),
                     r.get("train_seconds"), r.get("wall_seconds"), r.get("precision"),
                     ips if ips is not None else served.get("error", r.get("error", "–"))[:80],
                     served.get("p50_ms")])
    subset = f" Smoke test: {result['subset']} images per class and split." if result.get("subset") else ""
    text = md_table(["dataset", "backbone", "kept", "val accuracy", "train s", "CLI wall s", "serves",
                     f"served images/s (c={result['concurrency']})", "p50 ms"], rows)
    text += (f"\n\nEach row is the default `refit train DATA --backbone NAME` in a fresh store (`train s` is the "
             "fit as the CLI reports it, the wall time is the whole command), then the version it published "
             f"served by `bentoml serve` and driven by wrk with {result['concurrency']} connections, cycling "
             f"through that dataset's validation JPEGs.{subset}")
    for name, why in (result.get("skipped") or {}).items():
        text += f" {name} was skipped: {why}."
    rec = result.get("recommendation") or {}
    if rec.get("backbone"):
        text += f"\n\nFrom these figures: **{rec['backbone']}**. {rec['why']}"
    else:
        text += f"\n\nNo recommendation: {rec.get('why', 'no figures')}."
    return text


def _acc(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"
