"""Benchmark 5: retraining on the real dataset.

Every strategy through the CLI (`python -m cli train DATA --strategy S --json`, one fresh
REFIT_HOME for the series), and, over HTTP, the time from `POST /retrain/submit` with the dataset zipped
(feature_extraction) to the first `/predict` answered by the new version.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import time
import zipfile
from itertools import pairwise
from pathlib import Path

import httpx

from bench.common import PYTHON, ROOT, Plan, data_dir, flowers_dir, jpeg_files, log, md_table
from bench.servers import refit_server, wait_standby_warm

STRATEGIES = ("feature_extraction", "partial", "full", "scratch", "auto")
SUBMIT_TIMEOUT = 600  # seconds to wait for the retrained version to answer
POLL_SECONDS = 0.25


def run(plan: Plan) -> dict:
    from core.config import TrainRequest

    default_epochs = TrainRequest.model_fields["epochs"].default
    with tempfile.TemporaryDirectory(prefix="refit-bench-retrain-") as tmp:
        tmp = Path(tmp)
        data = subset(plan, tmp / "data")
        rows = [train_cli(data, s, tmp / "cli-home", plan, default_epochs) for s in STRATEGIES]
        fast = fast_runs(plan, tmp, data)
        submit = submit_to_answer(data, tmp, plan)
    return {"data": str(data_dir()), "subset": plan.retrain_subset, "rows": rows, "submit": submit,
            "default_epochs": default_epochs, "fast": fast}


# --- fine-tuning in seconds: default runs against the time targets, and partial with and without the cache --

SEEDS = (0, 1, 2)


def fast_runs(plan: Plan, tmp: Path, hymenoptera: Path) -> dict:
    """Whole default CLI runs (strategy auto, every setting at its default, a fresh store each) on both real
    datasets, and `partial` on flowers5 over three seeds with today's defaults (activation cache) and with
    the cache off (`--cache-views 0`, every step through the whole network: the path before the cache)."""
    quick = plan.retrain_subset is not None
    opts = {"head_epochs": 5, "epochs": 1} if quick else {}
    out = {"default": [default_run(hymenoptera, "hymenoptera", tmp / "fast-h", plan, opts)]}
    flowers = flowers_dir()
    if flowers is None:
        out["flowers_missing"] = "flowers5_128px not found (set REFIT_BENCH_FLOWERS); its rows are not measured"
        log(f"retrain: {out['flowers_missing']}")
        return out
    flowers = subset(plan, tmp / "flowers", flowers)
    out["default"].append(default_run(flowers, "flowers5_128px", tmp / "fast-f", plan, opts))
    out["partial"] = []
    for seed in SEEDS[:1] if quick else SEEDS:
        for label, extra in (("no cache (the path before)", {"cache_views": 0}), ("activation cache", {})):
            row = default_run(flowers, "flowers5_128px", tmp / f"fast-p{seed}-{bool(extra)}", plan,
                              {**opts, "strategy": "partial", "seed": seed, **extra})
            out["partial"].append({**row, "path": label, "seed": seed})
    return out


def default_run(data: Path, name: str, home: Path, plan: Plan, options: dict) -> dict:
    tag = "-".join(f"{k}{v}" for k, v in options.items()) or "defaults"
    result, wall, error = cli_train(data, home, cli_flags(options), plan, f"fast-{name}-{tag}.log")
    row = {"dataset": name, "options": options, "wall_seconds": wall}
    if result is None:
        log(f"retrain: {name} {tag} failed: {error[-300:]}")
        return {**row, "error": error}
    metrics = version_metrics(home, result["version"])
    row.update(version=result["version"], chosen=result["strategy"], val_accuracy=result["val_accuracy"],
               train_seconds=result["train_seconds"], total_seconds=result["total_seconds"], auto=result.get("auto"),
               epochs_run=_epochs_run(metrics), epoch_seconds=_epoch_seconds(metrics))
    log(f"retrain: {name} {tag} -> {row['chosen']} val_acc {row['val_accuracy']:.4f}, train "
        f"{row['train_seconds']:.1f}s, wall {wall:.1f}s")
    return row


def cli_train(data: Path, home: Path, args: list[str], plan: Plan, log_name: str,
              python: str = PYTHON) -> tuple[dict | None, float, str]:
    """`refit train DATA --json ARGS` in a process of its own with REFIT_HOME=home, as a user runs it: (its JSON
    summary or None, wall seconds, the error text). Its log is kept under the results' logs/."""
    cmd = [python, "-m", "cli", "train", str(data), "--json", *args]
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    _keep_log(plan, log_name, proc.stderr)
    if proc.returncode != 0:
        return None, wall, f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, ""


def _epoch_seconds(metrics: dict) -> list[float]:
    """Wall seconds of each fine-tuning epoch (training, the cache's view if one was made, validation), from
    the history's cumulative times."""
    times = [h["time"] for h in metrics.get("history", []) if h.get("phase") not in (None, "head")]
    return [round(b - a, 2) for a, b in pairwise(times)]


def partial_summary(fast: dict) -> dict | None:
    """Means over seeds of the two partial paths on flowers5, and the speed-up of the cache."""
    rows = [r for r in fast.get("partial") or [] if "error" not in r]
    if not rows:
        return None
    out = {}
    for path in dict.fromkeys(r["path"] for r in rows):
        rs = [r for r in rows if r["path"] == path]
        out[path] = {k: sum(r[k] for r in rs) / len(rs) for k in ("val_accuracy", "train_seconds", "wall_seconds")}
        out[path]["seeds"] = len(rs)
        # Epoch 1 also pays the loop's set-up (the first optimizer step), so epochs from the second on.
        later = [t for r in rs for t in r.get("epoch_seconds", [])]
        out[path]["epoch_seconds"] = sum(later) / len(later) if later else None
    before, now = out.get("no cache (the path before)"), out.get("activation cache")
    if before and now:
        out["speedup_train"] = before["train_seconds"] / now["train_seconds"]
        out["speedup_wall"] = before["wall_seconds"] / now["wall_seconds"]
        out["accuracy_points"] = (now["val_accuracy"] - before["val_accuracy"]) * 100
    return out


def subset(plan: Plan, where: Path, root: Path | None = None) -> Path:
    """The real dataset, or for a smoke test a few images per class linked from it (nothing is copied)."""
    root = root or data_dir()
    if plan.retrain_subset is None:
        return root
    for split in ("train", "val"):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            dest = where / split / cls.name
            dest.mkdir(parents=True)
            for f in sorted(cls.glob("*.jp*g"))[:plan.retrain_subset]:
                (dest / f.name).symlink_to(f)
    return where


def cli_flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]


def train_cli(data: Path, strategy: str, home: Path, plan: Plan, default_epochs: int) -> dict:
    epochs = plan.retrain_epochs.get(strategy) if strategy != "feature_extraction" else None
    options = {**plan.retrain_options, **({"epochs": epochs} if epochs else {})}
    log(f"retrain: {strategy} ({' '.join(cli_flags(options)) or 'defaults'})")
    result, wall, error = cli_train(data, home, ["--strategy", strategy, *cli_flags(options)], plan,
                                    f"cli-{strategy}.log")
    row = {"strategy": strategy, "epochs": epochs or (None if strategy == "feature_extraction" else default_epochs),
           "epochs_capped": bool(epochs), "wall_seconds": wall}
    if result is None:
        log(f"retrain: {strategy} failed: {error[-300:]}")
        return {**row, "error": error}
    metrics = version_metrics(home, result["version"])
    row.update(version=result["version"], chosen=result["strategy"], val_accuracy=result["val_accuracy"],
               train_seconds=result["train_seconds"], total_seconds=result["total_seconds"],
               epochs_run=_epochs_run(metrics), int8=metrics.get("int8"), auto=result.get("auto"))
    log(f"retrain: {strategy} -> {row['chosen']}: val_acc {row['val_accuracy']:.4f}, "
        f"train {row['train_seconds']:.1f}s, wall {wall:.1f}s")
    return row


def _keep_log(plan: Plan, name: str, text: str) -> None:
    logs = plan.results_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / name).write_text(text)


def version_metrics(home: Path, version: str) -> dict:
    # The store's layout (core/store.py): one folder per version under models/refit/.
    path = home / "models" / "refit" / version / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _epochs_run(metrics: dict) -> int | None:
    tuned = [h for h in metrics.get("history", []) if h.get("phase") != "head"]
    return len(tuned) or None


# --- submit -> first answer from the new version ---------------------------------------------------------

def zipped(data: Path) -> bytes:
    """The dataset as a client would upload it: class folders under train/ and val/. JPEGs do not compress,
    so they are stored as they are."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(data.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(data).as_posix())
    return buf.getvalue()


def _predict_version(client: httpx.Client, image: tuple[str, bytes]) -> str:
    name, body = image
    r = client.post("/predict", files={"images": (name, body, "image/jpeg")})
    r.raise_for_status()
    return r.json()[0]["version"]


def submit_to_answer(data: Path, workdir: Path, plan: Plan) -> dict:
    archive = zipped(data)
    probe = jpeg_files("val", limit=1)[0]
    fields = {"strategy": "feature_extraction", **plan.retrain_options}
    logs = plan.results_dir / "logs"
    with refit_server(workdir / "serve-home", logs / "refit-retrain.log") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        wait_standby_warm(workdir / "serve-home")
        before = _predict_version(client, probe)
        log(f"retrain: submitting {len(archive) / 2**20:.1f} MB zip (feature_extraction); serving {before}")
        t0 = time.perf_counter()
        r = client.post("/retrain/submit", files={"dataset": ("hymenoptera.zip", archive, "application/zip")},
                        data={k: str(v) for k, v in fields.items()}, timeout=300)
        upload_seconds = time.perf_counter() - t0
        if r.status_code != 200:
            return {"error": f"submit answered {r.status_code}: {r.text[:500]}"}
        task_id = r.json()["task_id"]
        answered, version, status = None, before, "in_progress"
        while time.perf_counter() - t0 < SUBMIT_TIMEOUT:
            version = _predict_version(client, probe)
            if version != before:
                answered = time.perf_counter() - t0
                break
            status = client.get("/retrain/status", params={"task_id": task_id}).json().get("status")
            if status not in ("in_progress", "completed"):
                break
            time.sleep(POLL_SECONDS)
        result = _task_result(client, task_id)
    # The job's own log says where its time went; the server's home is deleted with the temp folder.
    for f in (workdir / "serve-home" / "jobs").glob("*/train.log"):
        _keep_log(plan, "retrain-job.log", f.read_text(errors="replace"))
    out = {"zip_mb": len(archive) / 2**20, "upload_seconds": upload_seconds, "submit_to_answer_seconds": answered,
           "previous_version": before, "new_version": version if answered else None, "task_status": status,
           "result": result}
    if answered is None:
        out["error"] = f"the new version did not answer within {SUBMIT_TIMEOUT}s (task status {status})"
    log(f"retrain: submit -> answer by {version}: "
        + (f"{answered:.1f}s" if answered else out["error"]))
    return out


def _task_result(client: httpx.Client, task_id: str, wait: float = 60) -> dict:
    """The job's own timings (training process wall time, fit time), once the job has ended."""
    deadline = time.perf_counter() + wait
    while time.perf_counter() < deadline:
        r = client.get("/retrain/get", params={"task_id": task_id})
        if r.status_code == 200:
            body = r.json()
            keep = ("version", "strategy", "val_accuracy", "train_seconds", "total_seconds", "promoted")
            return {k: body.get(k) for k in keep}
        time.sleep(0.5)
    return {}


# --- report ----------------------------------------------------------------------------------------------

def by_strategy(result: dict, strategy: str) -> dict:
    return next((r for r in result["rows"] if r["strategy"] == strategy), {})


def tables(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        epochs = "head only" if r["strategy"] == "feature_extraction" else (
            f"≤ {r['epochs']}" + (" (capped for time)" if r["epochs_capped"] else " (default)"))
        if r.get("epochs_run"):
            epochs += f", ran {r['epochs_run']}"
        int8 = r.get("int8") or {}
        int8_cell = (f"{int8['val_accuracy']:.4f} ({'served' if int8.get('chosen') else 'not served'})"
                     if int8.get("val_accuracy") is not None else int8.get("reason", "–"))
        rows.append([r["strategy"], r.get("chosen", "failed"), epochs, _acc(r.get("val_accuracy")), int8_cell,
                     r.get("train_seconds"), r.get("total_seconds"), r["wall_seconds"]])
    s = result["submit"]
    res = s.get("result") or {}
    subset = f" (smoke test: {result['subset']} images per class and split)" if result["subset"] else ""
    text = md_table(["strategy", "kept", "fine-tuning epochs", "val accuracy", "INT8 val accuracy",
                     "train s", "CLI total s", "wall s (with start-up)"], rows)
    text += (f"\n\nDataset: {Path(result['data']).name}{subset}. `train s` is the fit alone as the CLI reports it; "
             "`CLI total s` adds decoding, export, the parity check, INT8 quantization and publishing; the wall time "
             "adds Python and torch start-up. Epoch caps apply to fine-tuning; feature extraction and warm-ups "
             "fit the head on cached features with early stopping.\n\n")
    answered = s.get("submit_to_answer_seconds")
    job = res.get("total_seconds")
    rest = answered - s["upload_seconds"] - job if answered and job else None
    upload = f"{s.get('upload_seconds', 0):.1f} s ({s.get('zip_mb', 0):.0f} MB zip)"
    text += md_table(["submit → first answer from the new version", "upload + admission", "training process: total",
                      "of which fit", "rest (process start, hot swap, polling)", "new version", "val accuracy"],
                     [[f"{answered:.1f} s" if answered else s.get("error", "–"), upload, job,
                       res.get("train_seconds"), rest, res.get("version"), _acc(res.get("val_accuracy"))]])
    text += ("\n\nThe training process's total is what `refit train` reports (decoding, features, head, export, "
             "parity check, INT8 quantization and its validation, publishing); the service runs it with "
             "REFIT_TRAIN_THREADS threads (default: cores − 1) at lower CPU priority, so predictions keep a core, "
             "in the standby process it keeps warm (imports done, feature graph exported; the submit waits "
             "until the service reports it warm). Its log, with the time of each step, is kept in "
             "`logs/retrain-job.log` beside the JSON results.")
    return text + fast_tables(result.get("fast") or {})


def fast_tables(fast: dict) -> str:
    if not fast:
        return ""
    text = "\n\n### Fine-tuning in seconds\n\n"
    rows = [[r["dataset"], r.get("chosen", "failed"), _acc(r.get("val_accuracy")), r.get("train_seconds"),
             r.get("total_seconds"), round(r["wall_seconds"], 1), _auto_note(r)] for r in fast.get("default", [])]
    text += md_table(["dataset", "kept", "val accuracy", "train s", "CLI total s", "wall s (whole run)",
                      "auto's decision"], rows)
    text += ("\n\nDefault `refit train DATA` (strategy `auto`, every setting at its default, a fresh store, so "
             "the frozen graphs are exported too). The wall time is the whole command, from Python start-up to "
             "the published and promoted version.\n\n")
    if fast.get("flowers_missing"):
        return text + fast["flowers_missing"] + "\n"
    rows = [[r["path"], r["seed"], _acc(r.get("val_accuracy")), r.get("epochs_run"), r.get("train_seconds"),
             round(r["wall_seconds"], 1)] for r in fast.get("partial", [])]
    text += md_table(["partial on flowers5_128px", "seed", "val accuracy", "epochs", "train s", "wall s"], rows)
    summary = partial_summary(fast)
    if summary and "speedup_train" in summary:
        before, now = summary["no cache (the path before)"], summary["activation cache"]
        text += (f"\n\nMean of {now['seeds']} seeds: {now['val_accuracy']:.4f} with the cache vs "
                 f"{before['val_accuracy']:.4f} before ({summary['accuracy_points']:+.1f} points); train "
                 f"{now['train_seconds']:.1f} s vs {before['train_seconds']:.1f} s = "
                 f"{summary['speedup_train']:.2f} × faster, whole run {summary['speedup_wall']:.2f} × faster. "
                 "`train s` includes the head's warm-up on cached features, which both paths run first.")
        if before.get("epoch_seconds") and now.get("epoch_seconds"):
            text += (f" A fine-tuning epoch after the first (training, validation, and with the cache the view it "
                     f"makes while fewer than K exist): {before['epoch_seconds']:.1f} s before, "
                     f"{now['epoch_seconds']:.1f} s with the cache, "
                     f"{before['epoch_seconds'] / now['epoch_seconds']:.1f} × less.")
        text += "\n"
    return text


def _auto_note(row: dict) -> str:
    auto = row.get("auto") or {}
    cands = auto.get("candidates") or {}
    return "; ".join(f"{k} {v['val_acc']:.4f} in {v['seconds']:.1f}s"
                     + (f" (stopped by {v['stopped']})" if v.get("stopped") else "") for k, v in cands.items())


def _acc(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"
