"""The targets table, the plots and the results page (docs/benchmarks.md) built from the saved results."""
from __future__ import annotations

from pathlib import Path

from bench import inprocess, model, preprocessing, retrain, served
from bench.common import CONCURRENCY, ROOT, Plan, md_table

TABLES = {"model": model.tables, "preprocess": preprocessing.tables, "inprocess": inprocess.tables,
          "served": served.tables, "retrain": retrain.tables}
TITLES = {"model": "1. Model: PyTorch eager vs ONNX Runtime FP32 vs INT8",
          "preprocess": "2. Preprocessing: full vs reduced-size (draft) JPEG decoding",
          "inprocess": "3. In-process limit: decode + preprocess + ONNX Runtime",
          "served": "4. Served: `POST /predict` under load",
          "retrain": "5. Retraining on the real dataset"}


# --- targets -----------------------------------------------------------------------------------------

def _row(target: str, figure: str, goal: str, passed: bool | None) -> list:
    return [target, figure, goal, "–" if passed is None else ("PASS" if passed else "MISS")]


def _ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result


def targets(results: dict) -> list[list]:
    rows = []
    m, i, s, r = (results.get(k) for k in ("model", "inprocess", "served", "retrain"))
    if _ok(s) and _ok(i):
        best, limit = served.best_level(s, "refit"), i["limit_images_per_s"]
        rows.append(_row("Served throughput at best concurrency vs in-process limit",
                         f"{best['throughput']:.1f} req/s at c={best['concurrency']} = "
                         f"{best['throughput'] / limit:.2f} × {limit:.1f} images/s", "≥ 0.90 ×",
                         best["throughput"] >= 0.90 * limit))
    else:
        rows.append(_row("Served throughput at best concurrency vs in-process limit", "not measured", "≥ 0.90 ×", None))
    if _ok(s):
        best, naive = served.best_level(s, "refit"), served.best_level(s, "naive")
        ratio = best["throughput"] / naive["throughput"] if naive["throughput"] else float("inf")
        rows.append(_row("Served vs naive (best concurrency of each)", f"{best['throughput']:.1f} vs "
                         f"{naive['throughput']:.1f} req/s = {ratio:.2f} ×", "≥ 4 ×", ratio >= 4))
        h = s["half_load"]
        tail = h["p99_ms"] / h["p50_ms"] if h.get("p50_ms") else None
        rows.append(_row(f"Tail at half the max throughput ({h['rate']:.1f} req/s, open loop)",
                         f"p99 {h['p99_ms']:.0f} ms / p50 {h['p50_ms']:.0f} ms = {tail:.2f}, {h['errors']} errors"
                         if tail else "no answers",
                         "p99 ≤ 3 × p50", tail is not None and tail <= 3 and h["errors"] == 0))
        mem = s.get("idle_memory")
        if mem:
            rows.append(_row("Idle serving replica memory, no training process in it",
                             f"{mem['replica_mb']:.0f} MB RSS", "< 600 MB", mem["replica_mb"] < 600))
        errors, where = served.all_errors(s), served.error_levels(s)
        rows.append(_row("Errors at every Refit load level (batching on and off, open loop)",
                         f"{errors}" + (f": {where}" if where else ""), "0", errors == 0))
    if _ok(m):
        fp32, int8 = model.best(m, "ort_fp32"), model.best(m, "ort_int8")
        ratio = int8["images_per_s"] / fp32["images_per_s"]
        rows.append(_row("INT8 vs FP32 throughput (ONNX Runtime, best batch of each)",
                         f"{int8['images_per_s']:.1f} vs {fp32['images_per_s']:.1f} images/s = {ratio:.2f} ×",
                         "≥ 1.6 ×", ratio >= 1.6))
    if _ok(r):
        rows += _retrain_targets(r)
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
    if _ok(s) and _ok(i):
        best, naive = served.best_level(s, "refit"), served.best_level(s, "naive")
        need, limit = 4 * naive["throughput"], i["limit_images_per_s"]
        if need > limit:
            out.append(f"Served ≥ 4 × naive needs {need:.1f} req/s, more than the in-process limit of {limit:.1f} "
                       "images/s for the served model: no serving overhead, however small, reaches it here.")
        out.append(f"At the best level (c={best['concurrency']}) the Refit processes used "
                   f"{best['server_cpu_cores']:.2f} cores and the load generator {best['client_cpu_cores']:.2f} of the "
                   f"{mach['cores']} cores.")
        # CPU cores over the level's wall time (warm-up included) / answered requests per second
        split = {role: 1000 * cores / best["throughput"]
                 for role, cores in best.get("server_cpu_cores_by_role", {}).items() if cores >= 0.005}
        if split:
            parts = ", ".join(f"{role} {ms:.2f} ms" for role, ms in split.items())
            out.append(f"CPU per answered request at that level: {parts} (total {sum(split.values()):.2f} ms); "
                       f"the in-process limit spends {1000 * i.get('threads', mach['cores']) / limit:.2f} ms of CPU "
                       "per image on decode, preprocessing and ONNX Runtime. The HTTP front (request parsing, "
                       "multipart, the call to a model worker, the JSON reply) and the workers' own HTTP "
                       "plumbing are the served path's extra CPU; with every core busy, that CPU is throughput.")
    flags = mach["cpu"]["flags"]
    if _ok(results.get("model")) and not (flags.get("avx512_vnni") or flags.get("avx_vnni")):
        out.append("No VNNI on this CPU (see Machine): ONNX Runtime's INT8 convolutions run on AVX2 without a "
                   "single-instruction 8-bit dot product.")
    return out


# --- plots -------------------------------------------------------------------------------------------

SERIES = (("refit", "Refit, adaptive batching"), ("refit_unbatched", "Refit, batching off"),
          ("naive", "naive PyTorch eager"))


def plots(results: dict, where: Path) -> list[str]:
    """Throughput and latency against concurrency; returns the file names written."""
    s = results.get("served")
    if not _ok(s):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in SERIES:
        levels = s["servers"][key]["levels"]
        ax.plot([lv["concurrency"] for lv in levels], [lv["throughput"] for lv in levels], "o-", label=label)
    if _ok(results.get("inprocess")):
        ax.axhline(results["inprocess"]["limit_images_per_s"], color="grey", ls="--", label="in-process limit")
    ax.set_ylim(bottom=0)
    _axes(ax, "requests/s (one image each)", "Throughput vs concurrency")
    fig.savefig(where / "benchmarks-throughput.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for n, (key, label) in enumerate(SERIES):
        levels = s["servers"][key]["levels"]
        c = [lv["concurrency"] for lv in levels]
        ax.plot(c, [lv["p50_ms"] for lv in levels], "o-", color=f"C{n}", label=f"{label} p50")
        ax.plot(c, [lv["p99_ms"] for lv in levels], "o:", color=f"C{n}", label=f"{label} p99")
    ax.set_yscale("log")
    _axes(ax, "latency, ms (log scale)", "Latency vs concurrency")
    fig.savefig(where / "benchmarks-latency.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["benchmarks-throughput.png", "benchmarks-latency.png"]


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
