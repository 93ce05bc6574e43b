"""Multi-label classifiers, trained with the default `refit train DATA` (a labels.csv beside the images):

- the seed-7 collage set of `make_multilabel.py` built from hymenoptera and flowers5_128px (300 train / 150
  val, 7 labels, 1 to 3 photos per 2x2 collage): val mAP and micro F1, and the whole run's wall time;
- colour attributes of real photos (`attributes`): every hymenoptera and flowers5 photo labelled with the
  colours that cover a fair share of it (yellow, green, red, white, blue by hue, saturation and value), so
  labels co-occur as attributes of real photos do, and a photo may have none;
- served `/predict` throughput of the collage version against a single-label version of the same backbone, on
  the same server in the same run (wrk, 16 connections), one promoted after the other.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.common import PYTHON, Plan, data_dir, flowers_dir, log, md_table, target_row
from bench.retrain import cli_train

MAP_TARGET = 0.78
SECONDS_TARGET = 45
THROUGHPUT_RATIO = 0.95
PROBE_MAP = 0.733  # a linear probe on pooled EfficientNet-Lite0 features (the reference)
# Colour attributes: a label when at least this share of the photo's pixels has the colour.
SHARE = 0.12
COLOURS = ("yellow", "green", "red", "white", "blue")


def run(plan: Plan) -> dict:
    flowers = flowers_dir()
    tool = data_dir().parent.parent / "tools" / "make_multilabel.py"
    if flowers is None or not tool.is_file():
        return {"error": "flowers5_128px or tools/make_multilabel.py not found beside the data"}
    quick = plan.retrain_subset is not None
    with tempfile.TemporaryDirectory(prefix="refit-bench-multilabel-") as tmp:
        tmp = Path(tmp)
        sizes = ["--train", "60", "--val", "30"] if quick else []
        subprocess.run([PYTHON, str(tool), str(tmp / "collage"), str(data_dir()), str(flowers), "--seed", "7",
                        *sizes], check=True, capture_output=True)
        rows = [train(tmp / "collage", tmp / "home-collage", plan, "collage"),
                train(attributes(tmp / "attributes", [data_dir(), flowers], limit=40 if quick else None),
                      tmp / "home-attributes", plan, "attributes")]
        served = throughput(tmp, plan, rows[0])
    return {"rows": rows, "served": served, "quick": quick}


def attributes(where: Path, sources: list[Path], limit: int | None) -> Path:
    """Copies of the photos (a manifest refuses links that lead out of its folder) and a labels.csv of their
    colour attributes, split as the sources are."""
    from PIL import Image

    out = []
    for src in sources:
        for split in ("train", "val"):
            files = sorted((src / split).glob("*/*.jp*g"))[:limit]
            for f in files:
                rel = f"{src.name}/{split}/{f.parent.name}-{f.name}"
                (where / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, where / rel)
                hsv = np.asarray(Image.open(f).convert("RGB").resize((64, 64)).convert("HSV"), np.float32)
                out.append((rel, ";".join(colours(hsv)), split))
    with open(where / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image", "labels", "split"))
        w.writerows(out)
    return where


def colours(hsv: np.ndarray) -> list[str]:
    """The colours covering at least SHARE of the pixels; PIL's HSV is 0..255 on every channel."""
    h, s, v = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    vivid = (s > 0.35) & (v > 0.3)
    masks = {"yellow": vivid & (h >= 40) & (h < 70), "green": vivid & (h >= 70) & (h < 170),
             "red": vivid & ((h < 20) | (h >= 330)), "white": (s < 0.15) & (v > 0.8),
             "blue": vivid & (h >= 190) & (h < 260)}
    return [c for c in COLOURS if masks[c].mean() >= SHARE]


def train(data: Path, home: Path, plan: Plan, name: str) -> dict:
    log(f"multilabel: {name}: refit train (defaults)")
    result, wall, error = cli_train(data, home, [], plan, f"multilabel-{name}.log")
    if result is None:
        return {"set": name, "error": error, "wall_seconds": round(wall, 1)}
    row = {"set": name, "data": str(data), "wall_seconds": round(wall, 1), "version": result.get("version"),
           "strategy": result.get("strategy"), "val_map": result.get("val_map"),
           "val_micro_f1": result.get("val_micro_f1"), "precision": result.get("precision"), "home": str(home)}
    log(f"multilabel: {name}: mAP {row['val_map']}, micro F1 {row['val_micro_f1']}, {wall:.1f}s")
    return row


def throughput(tmp: Path, plan: Plan, collage: dict) -> dict:
    """On one server, one promoted after the other: the collage version (its default input, twice the
    backbone's), a multi-label version of the same set at the backbone's own size, and a single-label version
    at that size: the serving path's cost is the comparison at equal input size."""
    if "error" in collage:
        return {"error": "no multi-label version"}
    from bench import wrkgen
    from bench.servers import refit_server
    from core.store import Store

    home = Path(collage["home"])
    single, _, error = cli_train(data_dir(), home, ["--strategy", "feature_extraction", "--promote", "false"],
                                 plan, "multilabel-single.log")
    small, _, error2 = cli_train(Path(collage["data"]), home, ["--strategy", "feature_extraction", "--image-size",
                                                               "224", "--promote", "false"], plan,
                                 "multilabel-224.log")
    if single is None or small is None or not wrkgen.available():
        return {"error": error or error2 or "wrk is not installed"}
    images = [(f.name, f.read_bytes()) for f in sorted((data_dir() / "val").glob("*/*.jp*g"))[:32]]
    seconds = 3 if plan.retrain_subset is not None else 10
    out = {}
    with refit_server(home, tmp / "serve.log") as srv:
        for kind, version in (("multi_label", collage["version"]), ("multi_label_224", small["version"]),
                              ("single_label", single["version"])):
            Store(home).promote(version, actor="bench")
            _wait_serving(srv.url, version)
            row = wrkgen.closed_loop(srv.url, images, 16, seconds=seconds, warmup_seconds=2)
            out[kind] = {"version": version, "images_per_s": round(row["throughput"], 1),
                         "errors": row.get("errors"), "p50_ms": row.get("p50_ms")}
            log(f"multilabel: served {kind} {version}: {out[kind]}")
    return out


def _wait_serving(url: str, version: str) -> None:
    import time

    import httpx

    for _ in range(200):
        serving = httpx.get(url + "/versions", timeout=10).json()["serving"]
        if serving and all(w.get("version") == version for w in serving):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not swap to {version}")


# --- report ----------------------------------------------------------------------------------------------

def tables(r: dict) -> str:
    if "error" in r:
        return r["error"] + "\n"
    rows = [[x["set"], x.get("strategy"), _f(x.get("val_map")), _f(x.get("val_micro_f1")), x.get("precision"),
             x["wall_seconds"], x.get("error", "")[:80]] for x in r["rows"]]
    text = md_table(["set", "kept", "val mAP", "val micro F1", "served file", "whole run s", "error"], rows)
    s = r.get("served") or {}
    if "error" not in s and s:
        names = {"multi_label": "multi-label, 448 px (the default)", "multi_label_224": "multi-label, 224 px",
                 "single_label": "single-label, 224 px"}
        text += ("\n\n" + md_table(["served version", "images/s (wrk, 16 connections)", "p50 ms", "errors"],
                                   [[f"{names[k]} {v['version']}", v["images_per_s"], v["p50_ms"], v["errors"]]
                                    for k, v in s.items() if k in names]))
    return text + (f"\n\nThe collage set: `make_multilabel.py` seed 7 from hymenoptera and flowers5_128px; a linear "
                   f"probe on pooled features reaches {PROBE_MAP} mAP there. The attribute set: every photo of "
                   f"both datasets labelled with the colours ({', '.join(COLOURS)}) that cover at least "
                   f"{SHARE:.0%} of it, by hue, saturation and value; the datasets' own split.\n")


def targets(r: dict) -> list[list]:
    collage = next((x for x in r.get("rows", []) if x["set"] == "collage"), None)
    if not collage or collage.get("val_map") is None:
        return [target_row("multi-label: collage set mAP", (collage or r).get("error", "failed"),
                           f"≥ {MAP_TARGET}", None)]
    rows = [target_row("multi-label: collage set (seed 7) val mAP", f"{collage['val_map']:.4f} "
                       f"(micro F1 {collage['val_micro_f1']:.4f})", f"≥ {MAP_TARGET}",
                       collage["val_map"] >= MAP_TARGET),
            target_row("multi-label: collage set, whole CLI run", f"{collage['wall_seconds']:.1f} s",
                       f"≤ {SECONDS_TARGET} s", collage["wall_seconds"] <= SECONDS_TARGET)]
    s = r.get("served") or {}
    if s.get("multi_label_224") and s.get("single_label"):
        m, one = s["multi_label_224"], s["single_label"]
        ratio = m["images_per_s"] / one["images_per_s"]
        rows.append(target_row("multi-label: served /predict throughput vs single-label, same input size",
                               f"{m['images_per_s']:.1f} vs {one['images_per_s']:.1f} images/s ({ratio:.3f}×)",
                               f"≥ {THROUGHPUT_RATIO}×", ratio >= THROUGHPUT_RATIO))
        big = s["multi_label"]["images_per_s"] / one["images_per_s"]
        rows.append(target_row("multi-label: served throughput of the default (448 px) version vs single-label",
                               f"{s['multi_label']['images_per_s']:.1f} vs {one['images_per_s']:.1f} images/s "
                               f"({big:.3f}×: four times the pixels)", "–", None))
    return rows


def _f(value) -> str | None:
    return None if value is None else f"{value:.4f}"
