"""Benchmark 4: `POST /predict` over HTTP with one real JPEG per request, at concurrency 1, 4, 16 and 64.

Three servers: Refit with adaptive batching (the service's default max batch size), Refit with batching
off (bench/unbatched_service.py: the service has no setting for it and BentoML refuses a max batch size
of 1), and the naive baseline (bench/naive_server.py). Refit also gets one open-loop level at half its best
throughput, where tail latency is judged.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil

from bench import version as bench_version
from bench.common import CONCURRENCY, Plan, jpeg_files, log, md_table
from bench.loadgen import closed_loop, open_loop
from bench.servers import REFIT_UNBATCHED, Server, naive_server, refit_server, wait_standby_warm

HALF = 0.5


def run(plan: Plan) -> dict:
    from service import settings  # only to record the defaults the server will read from the same env

    images = jpeg_files()
    logs = plan.results_dir / "logs"
    out = {"images": len(images), "levels": list(CONCURRENCY), "max_batch_size": settings.MAX_BATCH_SIZE,
           "workers": settings.WORKERS, "ort_threads": settings.ORT_THREADS, "servers": {}}
    v = bench_version.trained(plan)
    out["version"] = bench_version.describe(v)
    with tempfile.TemporaryDirectory(prefix="refit-bench-served-") as tmp:
        # A copy of the trained store per server (each writes its own logs and job state beside it)
        homes = {name: Path(tmp) / name for name in ("unbatched", "batched")}
        for home in homes.values():
            shutil.copytree(v["home"], home)
        with refit_server(homes["unbatched"], logs / "refit-unbatched.log", REFIT_UNBATCHED) as srv:
            wait_standby_warm(homes["unbatched"])
            out["servers"]["refit_unbatched"] = _sweep(srv, images, plan)
        with refit_server(homes["batched"], logs / "refit.log") as srv:
            wait_standby_warm(homes["batched"])
            out["idle_memory"] = idle_memory(srv.proc.pid)
            log(f"served: idle replica {out['idle_memory']['replica_mb']:.0f} MB RSS without training processes "
                f"(training standby {out['idle_memory']['training_mb']:.0f} MB)")
            out["servers"]["refit"] = sweep = _sweep(srv, images, plan)
            best = max(sweep["levels"], key=lambda r: r["throughput"])
            rate = HALF * best["throughput"]
            log(f"served: open loop at {rate:.1f} requests/s (half of {best['throughput']:.1f})")
            out["half_load"] = _measure(srv, partial(open_loop, srv.url, images, rate, seconds=plan.level_seconds,
                                                     max_requests=plan.level_max_requests))
    with naive_server(logs / "naive.log") as srv:
        out["servers"]["naive"] = _sweep(srv, images, plan)
    return out


def _sweep(srv: Server, images: list, plan: Plan) -> dict:
    levels = []
    for c in CONCURRENCY:
        row = _measure(srv, partial(closed_loop, srv.url, images, c, seconds=plan.level_seconds,
                                    warmup_seconds=plan.level_warmup_seconds, max_requests=plan.level_max_requests))
        log(f"served: {srv.name} c={c}: {row['throughput']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
            f"p99 {row['p99_ms']:.0f} ms, errors {row['errors']}")
        levels.append(row)
    return {"name": srv.name, "startup_seconds": srv.startup_seconds, "levels": levels}


def _measure(srv: Server, fn) -> dict:
    """Run one load level and add the CPU the server's processes and this client used meanwhile: on a
    2-core machine the client's share is CPU the server did not get."""
    server0, client0, t0 = _tree_cpu(srv.proc.pid), _own_cpu(), time.perf_counter()
    row = fn()
    wall = time.perf_counter() - t0
    server1 = _tree_cpu(srv.proc.pid)
    row["server_cpu_cores"] = (sum(server1.values()) - sum(server0.values())) / wall
    row["client_cpu_cores"] = (_own_cpu() - client0) / wall
    # Where the server's CPU went: the in-process limit pays only for the model workers' kind of work, so
    # the front's share is the price of serving over HTTP.
    row["server_cpu_cores_by_role"] = {role: (server1[role] - server0.get(role, 0.0)) / wall for role in server1}
    return row


def idle_memory(pid: int) -> dict:
    """RSS of a started, idle serving tree, by role; the training processes (the warm standby) apart, since
    a serving replica without local training does not hold them."""
    root = psutil.Process(pid)
    by_role: dict[str, float] = {}
    training = 0.0
    for p in [root] + root.children(recursive=True):
        try:
            mb, cmd = p.memory_info().rss / 2**20, " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "service.jobs" in cmd:
            training += mb
        else:
            role = "supervisor" if p.pid == root.pid else _role(p)
            by_role[role] = by_role.get(role, 0.0) + mb
    return {"replica_mb": sum(by_role.values()), "by_role_mb": by_role, "training_mb": training}


def _role(p: psutil.Process) -> str:
    """The job of one process of a served tree, from its command line."""
    cmd = " ".join(p.cmdline())
    if "--service-name refit-classifier" in cmd:
        return "model workers"
    if "--service-name refit" in cmd:
        return "HTTP front"
    return "other (supervisor, training standby, naive server)"


def _tree_cpu(pid: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return totals
    for p in procs:
        try:
            t = p.cpu_times()
            role = _role(p)
        except psutil.NoSuchProcess:
            continue
        totals[role] = totals.get(role, 0.0) + t.user + t.system
    return totals


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def best_level(result: dict, server: str) -> dict:
    return max(result["servers"][server]["levels"], key=lambda r: r["throughput"])


def all_errors(result: dict) -> int:
    refit = [r for s in ("refit", "refit_unbatched") for r in result["servers"][s]["levels"]]
    return sum(r["errors"] for r in refit + [result["half_load"]])


def error_levels(result: dict) -> str:
    """Where errors happened and what they were, e.g. "adaptive batching c=4: 2 × HTTP 500"."""
    names = {"refit": "adaptive batching", "refit_unbatched": "batching off"}
    levels = [(f"{names[s]} c={r['concurrency']}", r) for s in names for r in result["servers"][s]["levels"]]
    levels.append(("open loop", result["half_load"]))
    return "; ".join(f"{where}: {_kinds(r)}" for where, r in levels if r["errors"])


def _errors(row: dict) -> str:
    return f"{row['errors']} ({_kinds(row)})" if row["errors"] else "0"


def _kinds(row: dict) -> str:
    return ", ".join(f"{n} × {kind}" for kind, n in row["error_kinds"].items())


def _model(result: dict) -> str:
    v = result.get("version")
    if not v:
        return "the ImageNet version a fresh service bootstraps (FP32 ONNX)"
    return (f"{v['version']}, feature extraction trained on the real dataset, as its store chose to serve it "
            f"({v['precision'].upper()}: {(v.get('int8') or {}).get('reason', 'no INT8 file')}); the naive "
            "baseline runs the same backbone in PyTorch eager FP32 with its ImageNet head (the head is under 0.5% "
            "of the compute)")


def tables(result: dict) -> str:
    names = {"refit": f"Refit, adaptive batching (max batch {result['max_batch_size']})",
             "refit_unbatched": "Refit, batching off", "naive": "naive: PyTorch eager, 1 request = 1 forward"}
    rows = []
    for key, label in names.items():
        for r in result["servers"][key]["levels"]:
            rows.append([label, r["concurrency"], r["requests"], r["throughput"], r["p50_ms"], r["p95_ms"],
                         r["p99_ms"], _errors(r), r["server_cpu_cores"], r["client_cpu_cores"]])
    h = result["half_load"]
    rows.append([names["refit"] + f", open loop at {h['rate']:.1f} req/s", "open", h["requests"], h["throughput"],
                 h["p50_ms"], h["p95_ms"], h["p99_ms"], _errors(h), h["server_cpu_cores"], h["client_cpu_cores"]])
    return (md_table(["server", "concurrency", "requests", "req/s (= images/s)", "p50 ms", "p95 ms", "p99 ms",
                      "errors", "server CPU (cores)", "load generator CPU (cores)"], rows)
            + f"\n\nRefit serves {_model(result)}; {result['images']} real "
            f"JPEGs cycled, one per request; {result['workers']} model worker(s), "
            f"{result['ort_threads']} ONNX Runtime threads; each level is a closed loop of N clients after a "
            "warm-up, and the open-loop level starts requests on a fixed schedule at half the best throughput. "
            "The load generator runs on the same 2 cores; its CPU use is shown because it is CPU the server "
            "did not get." + _memory_line(result))


def _memory_line(result: dict) -> str:
    m = result.get("idle_memory")
    if not m:
        return ""
    parts = ", ".join(f"{role} {mb:.0f} MB" for role, mb in m["by_role_mb"].items())
    return (f"\n\nIdle memory of the Refit replica, started and warmed up, before the load: "
            f"{m['replica_mb']:.0f} MB RSS without training processes ({parts}); the warm training "
            f"standby adds {m['training_mb']:.0f} MB.")
