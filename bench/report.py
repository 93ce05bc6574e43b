"""The targets table, the plots and the results page (docs/benchmarks.md) built from the saved results."""
from __future__ import annotations

from pathlib import Path

from bench import (
    backbones,
    candidate,
    cost,
    guard,
    imbalance,
    inprocess,
    model,
    multilabel,
    preprocessing,
    projects,
    retrain,
    served,
    transfer,
)
from bench.common import CONCURRENCY, ROOT, Plan, md_table, target_row

TABLES = {"model": model.tables, "preprocess": preprocessing.tables, "inprocess": inprocess.tables,
          "served": served.tables, "retrain": retrain.tables, "backbones": backbones.tables,
          "transfer": transfer.tables, "imbalance": imbalance.tables, "projects": projects.tables,
          "multilabel": multilabel.tables, "candidate": candidate.tables,
          "cost": cost.tables, "guard": guard.tables}
TITLES = {"model": "1. Model: PyTorch eager vs ONNX Runtime FP32 vs INT8",
          "preprocess": "2. Preprocessing: JPEG decoders, stage by stage",
          "inprocess": "3. In-process limit: decode + preprocess + ONNX Runtime",
          "served": "4. Served: `POST /predict` under load",
          "retrain": "5. Retraining on the real dataset",
          "backbones": "6. Backbones: EfficientNet-Lite0, -Lite1 and -Lite2",
          "transfer": "7. Transfer to a distant domain", "imbalance": "8. Imbalanced classes",
          "projects": "9. Projects: many classifiers in one replica",
          "multilabel": "10. Multi-label classifiers",
          "candidate": "11. Shadow and canary trials",
          "cost": "12. Per-image cost: where the core time of a prediction goes",
          "guard": "13. Accuracy guard: the pipeline before and now"}


# --- targets -----------------------------------------------------------------------------------------

_row = target_row  # the one row format, shared with the sections that state their own targets


def _ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result


def _baseline(s: dict, i: dict | None) -> tuple[dict | None, str]:
    """The in-process figures the served targets are held against: those measured in the served run itself,
    else benchmark 3's (results saved by an older bench), with where they came from."""
    if served.baseline(s):
        return served.baseline(s), "this run"
    if _ok(i):
        return {"limit_images_per_s": i["limit_images_per_s"], "single_image": i.get("single_image")}, "benchmark 3"
    return None, ""


def targets(results: dict) -> list[list]:
    rows = []
    m, i, s, r = (results.get(k) for k in ("model", "inprocess", "served", "retrain"))
    if _ok(s):
        rows += _served_targets(s, i)
    else:
        rows.append(_row("Served throughput at best concurrency vs in-process limit", "not measured", "≥ 0.90 ×",
                         None))
    if _ok(m):
        fp32, int8 = model.best(m, "ort_fp32"), model.best(m, "ort_int8")
        ratio = int8["images_per_s"] / fp32["images_per_s"]
        rows.append(_row("INT8 vs FP32 throughput (ONNX Runtime, best batch of each)",
                         f"{int8['images_per_s']:.1f} vs {fp32['images_per_s']:.1f} images/s = {ratio:.2f} ×",
                         "≥ 1.6 ×", ratio >= 1.6))
    if _ok(r):
        rows += _retrain_targets(r)
    if _ok(results.get("transfer")):
        rows += transfer.targets(results["transfer"])
    if _ok(results.get("imbalance")):
        rows += imbalance.targets(results["imbalance"])
    if results.get("projects"):
        rows += projects.targets(results["projects"])
    if results.get("multilabel"):
        rows += multilabel.targets(results["multilabel"])
    if results.get("candidate"):
        rows += candidate.targets(results["candidate"])
    if results.get("cost"):
        rows += cost.targets(results["cost"])
    if results.get("guard"):
        rows += guard.targets(results["guard"])
    rows.append(_image_row())
    return rows


IMAGE_GOAL_MB = 600


def _image_row() -> list:
    """The serving image's size, where podman holds a `refit:latest` (`make container`); tests/test_container.py
    builds one of its own and holds it to the same goal."""
    import shutil
    import subprocess

    if shutil.which("podman"):
        proc = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", "refit:latest"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.strip().isdigit():
            mb = int(proc.stdout.strip()) / 1e6
            return _row("Serving image size (`podman image inspect refit:latest`)", f"{mb:.0f} MB",
                        f"≤ {IMAGE_GOAL_MB} MB", mb <= IMAGE_GOAL_MB)
    return _row("Serving image size", "no refit:latest here (`make container`); see Container images",
                f"≤ {IMAGE_GOAL_MB} MB", None)


def _served_targets(s: dict, i: dict | None) -> list[list]:
    rows = []
    base, where = _baseline(s, i)
    best = served.best_level(s, "refit")
    if base:
        limit = base["limit_images_per_s"]
        rows.append(_row(f"Served throughput at best concurrency vs in-process limit ({where})",
                         f"{best['throughput']:.1f} req/s at c={best['concurrency']} = "
                         f"{best['throughput'] / limit:.2f} × {limit:.1f} images/s", "≥ 0.90 ×",
                         best["throughput"] >= 0.90 * limit))
    refit64, peer64 = served.level(s, "refit", 64), served.level(s, "peer", 64)
    if refit64 and peer64:
        ratio = refit64["throughput"] / peer64["throughput"] if peer64["throughput"] else float("inf")
        rows.append(_row("Served vs the BentoML-docs peer at 64 connections",
                         f"{refit64['throughput']:.1f} vs {peer64['throughput']:.1f} req/s = {ratio:.2f} ×",
                         "≥ 1.5 ×", ratio >= 1.5))
    one, single = served.level(s, "refit", 1), (base or {}).get("single_image")
    if one and single and one.get("p50_ms"):
        ratio = one["p50_ms"] / single["p50_ms"]
        rows.append(_row(f"One request at a time: p50 vs one image in process, one thread ({where})",
                         f"{one['p50_ms']:.1f} ms vs {single['p50_ms']:.2f} ms = {ratio:.2f} ×", "≤ 2.0 ×",
                         ratio <= 2.0))
    naive = served.best_level(s, "naive")
    ratio = best["throughput"] / naive["throughput"] if naive["throughput"] else float("inf")
    rows.append(_row("Served vs naive (best concurrency of each)", f"{best['throughput']:.1f} vs "
                     f"{naive['throughput']:.1f} req/s = {ratio:.2f} ×", "≥ 4 ×", ratio >= 4))
    h = s["half_load"]
    tail = h["p99_ms"] / h["p50_ms"] if h.get("p50_ms") else None
    rows.append(_row(f"Tail at half the max throughput ({h['rate']:.1f} req/s, open loop)",
                     f"p99 {h['p99_ms']:.0f} ms / p50 {h['p50_ms']:.0f} ms = {tail:.2f}, {h['errors']} errors"
                     if tail else "no answers",
                     "p99 ≤ 3 × p50", tail is not None and tail <= 3 and h["errors"] == 0))
    errors, where_errors = served.all_errors(s), served.error_levels(s)
    rows.append(_row("Errors at every Refit load level (wrk, aiohttp, open loop)",
                     f"{errors}" + (f": {where_errors}" if where_errors else ""), "0", errors == 0))
    idle = s.get("idle_memory")
    if idle:
        rows.append(_row("Idle serving replica memory, training processes apart", f"{idle['replica_mb']:.0f} MB RSS "
                         f"(training processes {idle['training_mb']:.0f} MB)", "< 600 MB", idle["replica_mb"] < 600))
    mem = s.get("memory")
    if mem:
        enough = mem["predictions"] >= 10_000
        rows.append(_row("Serving replica memory after 10,000 predictions, training processes apart",
                         f"{mem['replica_mb']:.0f} MB RSS after {mem['predictions']:,} predictions (training processes "
                         f"{mem['training_mb']:.0f} MB)", "≤ 600 MB", mem["replica_mb"] <= 600 if enough else None))
    return rows


def _retrain_targets(r: dict) -> list[list]:
    rows = []
    fe, auto, scratch = (retrain.by_strategy(r, k) for k in ("feature_extraction", "auto", "scratch"))
    int8 = fe.get("int8") or {}
    if int8.get("val_accuracy") is not None:
        drop = (int8["fp32_val_accuracy"] - int8["val_accuracy"]) * 100
        rows.append(_row("INT8 val accuracy vs FP32 (feature_extraction version)",
                         f"{int8['val_accuracy']:.4f} vs {int8['fp32_val_accuracy']:.4f} ({drop:.1f} points lower); "
                         f"{'INT8' if int8.get('chosen') else 'FP32'} served", "drop ≤ 1 point", drop <= 1.0))
    for row, goal, name in ((auto, 0.95, "auto"), (fe, 0.93, "feature_extraction")):
        acc = row.get("val_accuracy")
        kept = f" (kept {row['chosen']})" if name == "auto" and row.get("chosen") else ""
        rows.append(_row(f"{name} val accuracy", f"{acc:.4f}{kept}" if acc is not None else "failed",
                         f"≥ {goal}", acc is not None and acc >= goal))
    fast = r.get("fast") or {}
    for d in fast.get("default", []):
        acc, wall = d.get("val_accuracy"), d["wall_seconds"]
        goal_acc, goal_s = {"hymenoptera": (0.955, 30), "flowers5_128px": (0.73, 30)}[d["dataset"]]
        rows.append(_row(f"{d['dataset']}: default `refit train`, whole CLI run",
                         f"{acc:.4f} in {wall:.1f} s (kept {d['chosen']})" if acc is not None else "failed",
                         f"≥ {goal_acc} in ≤ {goal_s} s", acc is not None and acc >= goal_acc and wall <= goal_s))
    summary = retrain.partial_summary(fast)
    if summary and "speedup_train" in summary:
        rows.append(_row("partial on flowers5_128px: activation cache vs the path before (mean of 3 seeds)",
                         f"{summary['speedup_train']:.2f} × faster (train s; whole run "
                         f"{summary['speedup_wall']:.2f} ×), {summary['accuracy_points']:+.1f} points",
                         "≥ 3 ×, same accuracy ± 1 point",
                         summary["speedup_train"] >= 3 and summary["accuracy_points"] >= -1))
    answered = (r.get("submit") or {}).get("submit_to_answer_seconds")
    rows.append(_row("feature_extraction: /retrain/submit → first /predict by the new version",
                     f"{answered:.1f} s" if answered else r["submit"].get("error", "failed"), "≤ 20 s",
                     answered is not None and answered <= 20))
    if fe.get("val_accuracy") is not None and scratch.get("val_accuracy") is not None:
        gap = (fe["val_accuracy"] - scratch["val_accuracy"]) * 100
        rows.append(_row("feature_extraction − scratch val accuracy",
                         f"{fe['val_accuracy']:.4f} − {scratch['val_accuracy']:.4f} = {gap:.1f} points "
                         f"(scratch ≤ {scratch.get('epochs')} epochs)", "≥ 25 points", gap >= 25))
    return rows


def notes(results: dict, mach: dict) -> list[str]:
    """Facts from the figures themselves that bound or explain a target."""
    out = []
    s, i = results.get("served"), results.get("inprocess")
    if _ok(s):
        base, _ = _baseline(s, i)
        best, naive = served.best_level(s, "refit"), served.best_level(s, "naive")
        limit = base["limit_images_per_s"] if base else None
        if limit and 4 * naive["throughput"] > limit:
            out.append(f"Served ≥ 4 × naive needs {4 * naive['throughput']:.1f} req/s, more than the in-process "
                       f"limit of {limit:.1f} images/s for the served model: no serving overhead, however small, "
                       "reaches it here.")
        out.append(f"At the best level (c={best['concurrency']}, {best.get('generator', 'aiohttp')}) the Refit "
                   f"processes used {best['server_cpu_cores']:.2f} cores and the load generator "
                   f"{best['client_cpu_cores']:.2f} of the {mach['cores']} cores.")
        # CPU cores over the level's wall time (warm-up included) / answered requests per second
        split = {role: 1000 * cores / best["throughput"]
                 for role, cores in best.get("server_cpu_cores_by_role", {}).items() if cores >= 0.005}
        if split and limit:
            parts = ", ".join(f"{role} {ms:.2f} ms" for role, ms in split.items())
            threads = (base or {}).get("threads") or (i or {}).get("threads") or mach["cores"]
            front = ("the HTTP front (request parsing, multipart, the call to a model worker, the JSON reply) and "
                     "the workers' own HTTP plumbing are" if "HTTP front" in split else
                     "the model workers parse the requests themselves; their HTTP handling (request parsing, "
                     "multipart, batching, the JSON reply) and the supervisor are")
            out.append(f"CPU per answered request at that level: {parts} (total {sum(split.values()):.2f} ms); the "
                       f"in-process limit spends {1000 * threads / limit:.2f} ms of CPU per image on decode, "
                       f"preprocessing and ONNX Runtime; {front} the served path's extra CPU; with every core busy, "
                       "that CPU is throughput.")
    flags = mach["cpu"]["flags"]
    if _ok(results.get("model")) and not (flags.get("avx512_vnni") or flags.get("avx_vnni")):
        out.append("No VNNI on this CPU (see Machine): ONNX Runtime's INT8 convolutions run on AVX2 without a "
                   "single-instruction 8-bit dot product.")
    return out


# --- plots -------------------------------------------------------------------------------------------

SERIES = (("refit", "Refit (wrk)"), ("refit_aiohttp", "Refit (aiohttp generator)"),
          ("peer", "peer: BentoML docs"), ("naive", "naive PyTorch eager"), ("refit_unbatched", "Refit, batching off"))
COLORS = {key: f"C{n}" for n, (key, _) in enumerate(SERIES)}


def plots(results: dict, where: Path) -> list[str]:
    """Throughput and latency against concurrency; returns the file names written."""
    s = results.get("served")
    if not _ok(s):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(key, label) for key, label in SERIES if key in s["servers"]]
    where.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in series:
        levels = s["servers"][key]["levels"]
        ax.plot([lv["concurrency"] for lv in levels], [lv["throughput"] for lv in levels], "o-", color=COLORS[key],
                label=label)
    base, _ = _baseline(s, results.get("inprocess"))
    if base:
        ax.axhline(base["limit_images_per_s"], color="grey", ls="--", label="in-process limit")
    ax.set_ylim(bottom=0)
    _axes(ax, "requests/s (one image each)", "Throughput vs concurrency")
    fig.savefig(where / "benchmarks-throughput.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    # One Refit series is enough here: the generators' latencies differ less than the servers'.
    for key, label in series:
        if key == "refit_aiohttp":
            continue
        levels = s["servers"][key]["levels"]
        c = [lv["concurrency"] for lv in levels]
        # nan (a gap in the line) where no answer came back within the level
        ax.plot(c, [_nan(lv["p50_ms"]) for lv in levels], "o-", color=COLORS[key], label=f"{label} p50")
        ax.plot(c, [_nan(lv["p99_ms"]) for lv in levels], "o:", color=COLORS[key], label=f"{label} p99")
    ax.set_yscale("log")
    _axes(ax, "latency, ms (log scale)", "Latency vs concurrency")
    fig.savefig(where / "benchmarks-latency.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["benchmarks-throughput.png", "benchmarks-latency.png"]


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _axes(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


# --- the page ----------------------------------------------------------------------------------------

def machine_section(mach: dict) -> str:
    cpu = mach["cpu"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    rows = [["CPU", cpu["model"] + (" (virtual machine)" if cpu["hypervisor"] else "")],
            ["cores available", mach["cores"]], ["instruction sets (/proc/cpuinfo)", flags],
            ["memory", f"{mach['memory_gib']} GiB"], ["OS", mach["os"]],
            ["software", f"Python {mach['python']}, torch {mach['torch']}, onnxruntime {mach['onnxruntime']}, "
                         f"numpy {mach['numpy']}, Pillow {mach['pillow']}"],
            ["load average at start (1/5/15 min)", " / ".join(f"{x:.2f}" for x in mach["load_average"])],
            ["date (UTC)", mach["date"]]]
    text = md_table(["", ""], rows)
    return text


def page(results: dict, mach: dict, plan: Plan, wall_seconds: float, images: list[str]) -> str:
    """The markdown page; `images` are plot files written beside it."""
    command = "python -m bench.run --quick" if plan.name == "quick" else "make bench"
    raw = plan.results_dir.relative_to(ROOT)
    measured = sum((r or {}).get("_meta", {}).get("seconds", 0) for r in results.values())
    parts = ["# Benchmarks", "",
             f"Generated by `{command}`: the benchmarks ran for {measured / 60:.1f} min (the last invocation, "
             f"set-up and page included: {wall_seconds / 60:.1f} min). Raw figures: `{raw}/*.json`. "
             "Every figure below was measured on the machine described here, with the load generator and the "
             "server sharing its cores.", "", "## Machine", "", machine_section(mach), "",
             "## Targets", "", md_table(["target", "measured", "goal", "status"], targets(results)), ""]
    parts += [f"- {n}" for n in notes(results, mach)] + [""]
    for name, title in TITLES.items():
        parts += [f"## {title}", ""]
        r = results.get(name)
        if not r:
            parts += ["Not measured yet: `python -m bench.run --only " + name + "`.", ""]
            continue
        meta = r.get("_meta", {})
        parts += [f"Measured {meta.get('measured_at', '?')} in {meta.get('seconds', 0):.0f} s.", ""]
        parts += [f"Failed: `{r['error']}`" if "error" in r else TABLES[name](r), ""]
        if name == "served":
            parts += [f"![{n}]({n})" for n in images] + [""]
    return "\n".join(parts)
