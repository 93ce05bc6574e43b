"""Class balancing on an imbalanced copy of flowers5_128px: one class cut to a few training images (validation
untouched), trained through the CLI with `--balance false` and with the default (`auto`, which balances), a
fresh REFIT_HOME each, over a few seeds. Measured on the validation split: the rare class's recall, the other
classes' accuracy, balanced accuracy, and the time."""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Plan, flowers_dir, log, md_table, target_row
from bench.retrain import cli_flags, cli_train, version_metrics

RARE = "rose"  # the class cut down
RARE_TRAIN = 8  # its training images (the others keep their 56)
SEEDS = (0, 1, 2)
MODES = {"off": {"balance": "false"}, "on": {}}  # "on": the default, auto, balances at this ratio
RECALL_GAIN_POINTS = 10  # the rare class's recall must rise at least this much with balancing
OTHERS_DROP_POINTS = 1  # and the other classes' accuracy fall at most this much


def run(plan: Plan) -> dict:
    flowers = flowers_dir()
    if flowers is None:
        return {"error": "flowers5_128px not found (set REFIT_BENCH_FLOWERS)"}
    quick = plan.retrain_subset is not None
    options = {**plan.retrain_options, **({"head_epochs": 5, "epochs": 1} if quick else {})}
    with tempfile.TemporaryDirectory(prefix="refit-bench-imbalance-") as tmp:
        tmp = Path(tmp)
        data = imbalanced_copy(flowers, tmp / "data", rare_train=2 if quick else RARE_TRAIN,
                               others=plan.retrain_subset)
        rows = [train(data, tmp / f"home-{mode}-{seed}", plan, mode, {**options, **extra, "seed": seed})
                for seed in (SEEDS[:1] if quick else SEEDS) for mode, extra in MODES.items()]
    return {"data": str(flowers), "rare": RARE, "rare_train": 2 if quick else RARE_TRAIN,
            "subset": plan.retrain_subset, "rows": rows, "means": means(rows)}


def imbalanced_copy(root: Path, where: Path, *, rare_train: int, others: int | None) -> Path:
    """Links to the dataset's images (nothing is copied): `rare_train` training images of RARE, every other
    training image (or `others` per class) and the whole validation split (or `others` per class)."""
    for split in ("train", "val"):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            dest = where / split / cls.name
            dest.mkdir(parents=True)
            keep = rare_train if split == "train" and cls.name == RARE else others
            for f in sorted(cls.glob("*.jp*g"))[:keep]:
                (dest / f.name).symlink_to(f)
    return where


def train(data: Path, home: Path, plan: Plan, mode: str, options: dict) -> dict:
    log(f"imbalance: balance {mode}, {' '.join(cli_flags(options))}")
    result, wall, error = cli_train(data, home, cli_flags(options), plan,
                                    f"imbalance-{mode}-seed{options['seed']}.log")
    row = {"mode": mode, "seed": options["seed"], "wall_seconds": round(wall, 1)}
    if result is None:
        log(f"imbalance: balance {mode} failed: {error[-300:]}")
        return {**row, "error": error}
    m = version_metrics(home, result["version"])
    row.update(strategy=result["strategy"], balance=m.get("balance"), train_seconds=result["train_seconds"],
               total_seconds=result["total_seconds"], **scores(m))
    log(f"imbalance: balance {mode} seed {row['seed']}: {RARE} recall {row['rare_recall']:.4f}, others "
        f"{row['others_accuracy']:.4f}, balanced {row['balanced_accuracy']:.4f}, {row['train_seconds']:.1f}s")
    return row


def scores(metrics: dict) -> dict:
    """The rare class's recall and the other classes' accuracy (their recalls weighted by support), from
    metrics.json's per-class figures."""
    per = metrics["per_class"]
    others = [v for c, v in per.items() if c != RARE]
    hits = sum(v["recall"] * v["support"] for v in others)
    return {"rare_recall": per[RARE]["recall"], "others_accuracy": hits / sum(v["support"] for v in others),
            "balanced_accuracy": metrics["balanced_accuracy"], "val_accuracy": metrics["val_accuracy"]}


def means(rows: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode and "error" not in r]
        if rs:
            out[mode] = {k: sum(r[k] for r in rs) / len(rs) for k in
                         ("rare_recall", "others_accuracy", "balanced_accuracy", "val_accuracy", "train_seconds",
                          "wall_seconds")}
            out[mode]["seeds"] = len(rs)
    return out


# --- report ----------------------------------------------------------------------------------------------

def tables(result: dict) -> str:
    if "error" in result:
        return result["error"] + "\n"
    rows = [[r["mode"], r["seed"], r.get("strategy", "failed"), _f(r.get("rare_recall")),
             _f(r.get("others_accuracy")), _f(r.get("balanced_accuracy")), _f(r.get("val_accuracy")),
             r.get("train_seconds"), r["wall_seconds"]] for r in result["rows"]]
    rows += [[f"{mode} (mean)", f"{m['seeds']} seeds", "", _f(m["rare_recall"]), _f(m["others_accuracy"]),
              _f(m["balanced_accuracy"]), _f(m["val_accuracy"]), round(m["train_seconds"], 1),
              round(m["wall_seconds"], 1)] for mode, m in result["means"].items()]
    text = md_table(["balance", "seed", "kept", f"{result['rare']} recall", "other classes' accuracy",
                     "balanced accuracy", "val accuracy", "train s", "wall s"], rows)
    on = next((r.get("balance") for r in result["rows"] if r["mode"] == "on" and r.get("balance")), None)
    kept = (f"the others {result['subset']} per class and split (smoke test)" if result.get("subset")
            else "validation untouched")
    return text + (f"\n\nflowers5_128px with {result['rare']} cut to {result['rare_train']} training images "
                   f"({kept}), default `refit train` (`auto`) with `--balance false` and without"
                   + (f"; balancing recorded: {on['why']}, weights {on['weights']}" if on else "") + ".\n")


def targets(result: dict) -> list[list]:
    """Rows as bench/report.py's targets table takes them: target, measured, goal, PASS/FAIL."""
    off, on = (result.get("means") or {}).get("off"), (result.get("means") or {}).get("on")
    if not off or not on:
        return [target_row("imbalance: rare-class recall with balancing", result.get("error", "failed"),
                     f"≥ +{RECALL_GAIN_POINTS} points", None)]
    gain = (on["rare_recall"] - off["rare_recall"]) * 100
    drop = (off["others_accuracy"] - on["others_accuracy"]) * 100
    return [target_row(f"imbalance: {RARE} recall ({result['rare_train']} training images), balancing vs not",
                 f"{on['rare_recall']:.4f} vs {off['rare_recall']:.4f} ({gain:+.1f} points)",
                 f"≥ +{RECALL_GAIN_POINTS} points", gain >= RECALL_GAIN_POINTS),
            target_row("imbalance: other classes' accuracy, balancing vs not",
                 f"{on['others_accuracy']:.4f} vs {off['others_accuracy']:.4f} ({-drop:+.1f} points)",
                 f"down ≤ {OTHERS_DROP_POINTS} point", drop <= OTHERS_DROP_POINTS)]


def _f(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"
