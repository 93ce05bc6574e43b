"""Benchmark 4: `POST /predict` over HTTP with one real JPEG per request, at concurrency 1, 4, 16 and 64.

Three servers in one run, each driven by wrk (bench/wrkgen.py, a C load generator that leaves the cores to the
server): Refit as `bentoml serve service.service:Refit` starts it; the peer, the service a BentoML user writes
from BentoML's docs (bench/peer_service.py), serving the same model file with the preprocessing the project
had before (frozen in bench/peer_pixels.py); and the naive baseline (bench/naive_server.py). Refit and the
peer are up together and measured in turns, level by level, so that load from outside the benchmark on a
shared machine falls on both alike instead of on one server's whole sweep. Refit is also swept with the Python
load generator (bench/loadgen.py), and gets one open-loop level at half its best throughput, where tail
latency is judged. Just before the servers, the in-process limit and the single-image latency are measured
again (bench/inprocess.py), so every ratio in the targets comes from one run. Refit's memory is read when it
is idle and again after at least `plan.memory_predictions` answered predictions."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil

from bench import inprocess, loadgen, wrkgen
from bench import version as bench_version
from bench.common import CONCURRENCY, Plan, jpeg_files, log, md_table
from bench.servers import Server, naive_server, peer_server, refit_server, wait_standby_warm
from core.settings import settings

HALF = 0.5


def run(plan: Plan, model_result: dict | None = None) -> dict:
    if not wrkgen.available():  # before minutes of training and measuring
        raise RuntimeError("wrk is not installed: the served benchmark drives its servers with it "
                           "(Debian/Ubuntu: apt-get install wrk)")
    images = jpeg_files()
    logs = plan.results_dir / "logs"
    # The defaults the server will read from the same environment, recorded with the results.
    current = settings()
    out = {"images": len(images), "levels": list(CONCURRENCY), "servers": {},
           **{key: getattr(current, key) for key in ("max_batch_size", "workers", "ort_threads")}}
    v = bench_version.trained(plan)
    out["version"] = bench_version.describe(v)
    out["inprocess"] = inprocess.served_baseline(v, [data for _, data in images], plan, model_result)
    with tempfile.TemporaryDirectory(prefix="refit-bench-served-") as tmp:
        home = Path(tmp) / "refit"  # a copy of the trained store: the server writes logs and job state beside it
        shutil.copytree(v["home"], home)
        with refit_server(home, logs / "refit.log") as srv:
            wait_standby_warm(home)
            out["idle_memory"] = memory(srv.proc.pid)
            log(f"served: idle replica {out['idle_memory']['replica_mb']:.0f} MB RSS without training processes "
                f"(training processes {out['idle_memory']['training_mb']:.0f} MB)")
            with peer_server(v["serving_file"], logs / "peer.log") as peer:  # idle while not measured
                out["servers"]["refit"], out["servers"]["peer"] = _sweep([srv, peer], images, plan, wrkgen.closed_loop)
            sweep = out["servers"]["refit"]
            out["servers"]["refit_aiohttp"], = _sweep([srv], images, plan, loadgen.closed_loop)
            best = max(sweep["levels"], key=lambda r: r["throughput"])
            rate = HALF * best["throughput"]
            log(f"served: open loop at {rate:.1f} requests/s (half of {best['throughput']:.1f})")
            out["half_load"] = _measure(srv, partial(loadgen.open_loop, srv.url, images, rate,
                                                     seconds=plan.level_seconds, max_requests=plan.level_max_requests,
                                                     warmup_seconds=plan.level_warmup_seconds))
            out["half_load"]["rss_mb"] = memory(srv.proc.pid)["replica_mb"]
            out["memory"] = _memory_after(srv, images, plan, out, best)
    with naive_server(logs / "naive.log") as srv:
        out["servers"]["naive"], = _sweep([srv], images, plan, wrkgen.closed_loop)
    return out


def _sweep(servers: list[Server], images: list, plan: Plan, generator) -> list[dict]:
    """Every concurrency level on each server; with several servers, one level on each in turn."""
    levels: list[list[dict]] = [[] for _ in servers]
    for c in CONCURRENCY:
        for srv, rows in zip(servers, levels, strict=True):
            row = _measure(srv, partial(generator, srv.url, images, c, seconds=plan.level_seconds,
                                        warmup_seconds=plan.level_warmup_seconds,
                                        max_requests=plan.level_max_requests))
            # After each level, so that growth with the number of predictions shows, not only its end point.
            row["rss_mb"] = memory(srv.proc.pid)["replica_mb"]
            log(f"served: {srv.name} c={c} ({row['generator']}): {row['throughput']:.1f} req/s, "
                f"p50 {_ms(row['p50_ms'])}, p99 {_ms(row['p99_ms'])}, errors {row['errors']}")
            rows.append(row)
    return [{"name": srv.name, "startup_seconds": srv.startup_seconds, "levels": rows}
            for srv, rows in zip(servers, levels, strict=True)]


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"  # None: no answer came back within the level


def _measure(srv: Server, fn) -> dict:
    """Run one load level and add the CPU the server's processes and the load generator used meanwhile: on
    a 2-core machine the generator's share is CPU the server did not get."""
    server0, client0, t0 = _tree_cpu(srv.proc.pid), _own_cpu(), time.perf_counter()
    row = fn()
    wall = time.perf_counter() - t0
    server1 = _tree_cpu(srv.proc.pid)
    row["server_cpu_cores"] = (sum(server1.values()) - sum(server0.values())) / wall
    row["client_cpu_cores"] = (_own_cpu() - client0) / wall
    # Where the server's CPU went: the in-process limit pays only for the model's kind of work, so the rest
    # is the price of serving over HTTP.
    row["server_cpu_cores_by_role"] = {role: (server1[role] - server0.get(role, 0.0)) / wall for role in server1}
    return row


# --- memory ------------------------------------------------------------------------------------------

def _predictions(out: dict) -> int:
    """Answered predictions Refit has made in this run so far (warm-ups included)."""
    rows = [r for key in ("refit", "refit_aiohttp") for r in out["servers"].get(key, {}).get("levels", [])]
    rows += [out["half_load"]] if "half_load" in out else []
    return sum(r["ok"] + r.get("warmup_ok", 0) for r in rows)


def _memory_after(srv: Server, images: list, plan: Plan, out: dict, best: dict) -> dict:
    """The replica's RSS once it has answered at least plan.memory_predictions predictions: more wrk load at
    the best concurrency if the sweeps sent fewer."""
    sent, extra = _predictions(out), []
    for _ in range(5):
        missing = plan.memory_predictions - sent
        if missing <= 0:
            break
        seconds = max(1.0, 1.2 * missing / max(best["throughput"], 1.0))
        log(f"served: {missing} more predictions before reading memory ({seconds:.0f} s at c={best['concurrency']})")
        row = wrkgen.closed_loop(srv.url, images, best["concurrency"], seconds=seconds)
        extra.append(row)
        sent += row["ok"]
    mem = memory(srv.proc.pid)
    log(f"served: after {sent} predictions the replica holds {mem['replica_mb']:.0f} MB RSS without training "
        f"processes ({mem['training_mb']:.0f} MB in training processes)")
    return {**mem, "predictions": sent, "extra_errors": sum(r["errors"] for r in extra)}


def memory(pid: int) -> dict:
    """RSS of a serving tree by role; training processes (the warm standby, a running job) apart, since a
    serving replica without local training does not hold them."""
    root = psutil.Process(pid)
    by_role: dict[str, float] = {}
    processes: dict[str, int] = {}
    training = 0.0
    for p in [root] + root.children(recursive=True):
        try:
            mb, role = p.memory_info().rss / 2**20, _role(p, pid)
        except psutil.Error:
            continue
        if role == "training":
            training += mb
            continue
        by_role[role] = by_role.get(role, 0.0) + mb
        processes[role] = processes.get(role, 0) + 1
    return {"replica_mb": sum(by_role.values()), "by_role_mb": by_role, "processes": processes,
            "training_mb": training}


def _role(p: psutil.Process, root: int) -> str:
    """The job of one process of a served tree. Model workers are the processes that have ONNX Runtime
    loaded, whatever their service is called: with a separate HTTP front they are the classifier's workers,
    and in a service whose request-parsing processes run the model, they are those processes."""
    cmd = " ".join(p.cmdline())
    if "service.jobs" in cmd or "training." in cmd:
        return "training"
    if p.pid == root:
        return "supervisor" if "bentoml" in cmd else "server process"
    if "--service-name" in cmd:
        return "model workers" if _loads_onnxruntime(p.pid) else "HTTP front"
    return "other"


def _loads_onnxruntime(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "onnxruntime" in f.read()
    except OSError:
        return False


def _tree_cpu(pid: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return totals
    for p in procs:
        try:
            t = p.cpu_times()
            role = _role(p, pid)
        except psutil.Error:
            continue
        totals[role] = totals.get(role, 0.0) + t.user + t.system
    return totals


def _own_cpu() -> float:
    """This process and its finished children: wrk runs as a child and is waited for before this is read."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- figures the targets and the page use ------------------------------------------------------------

def best_level(result: dict, server: str) -> dict:
    return max(result["servers"][server]["levels"], key=lambda r: r["throughput"])


def level(result: dict, server: str, concurrency: int) -> dict | None:
    return next((r for r in result["servers"].get(server, {}).get("levels", []) if r["concurrency"] == concurrency),
                None)


def baseline(result: dict) -> dict | None:
    """The in-process figures measured in this run (results saved before this version of the bench have
    none: the targets then use benchmark 3's)."""
    return result.get("inprocess")


def all_errors(result: dict) -> int:
    return sum(r["errors"] for _, r in _refit_levels(result)) + (result.get("memory") or {}).get("extra_errors", 0)


def error_levels(result: dict) -> str:
    """Where Refit's errors happened and what they were, e.g. "wrk c=4: 2 × HTTP 500"."""
    return "; ".join(f"{where}: {_kinds(r)}" for where, r in _refit_levels(result) if r["errors"])


def _refit_levels(result: dict) -> list[tuple[str, dict]]:
    levels = [(f"{r.get('generator', 'aiohttp')} c={r['concurrency']}", r)
              for s in ("refit", "refit_aiohttp", "refit_unbatched")
              for r in result["servers"].get(s, {}).get("levels", [])]
    return levels + [("open loop", result["half_load"])]


def _errors(row: dict) -> str:
    return f"{row['errors']} ({_kinds(row)})" if row["errors"] else "0"


def _kinds(row: dict) -> str:
    return ", ".join(f"{n} × {kind}" for kind, n in row["error_kinds"].items())


def _model(result: dict) -> str:
    v = result.get("version")
    if not v:
        return "the ImageNet version a fresh service bootstraps (FP32 ONNX)"
    return (f"{v['version']}, feature extraction trained on the real dataset, as its store chose to serve it "
            f"({v['precision'].upper()}: {(v.get('int8') or {}).get('reason', 'no INT8 file')}); the peer serves the "
            f"same file ({v.get('serving_file')}); the naive baseline runs the same backbone in PyTorch eager FP32 "
            "with its ImageNet head (the head is under 0.5% of the compute)")


LABELS = {"refit": "Refit", "refit_aiohttp": "Refit", "refit_unbatched": "Refit, batching off",
          "peer": "peer: BentoML docs, batchable API, 2 workers",
          "naive": "naive: PyTorch eager, 1 request = 1 forward"}


def tables(result: dict) -> str:
    h = result["half_load"]
    # Refit's rows in the order they ran on its one server, so that the RSS column follows the predictions.
    levels = [(LABELS[key], r) for key in ("refit", "refit_aiohttp") for r in result["servers"].get(key, {})
              .get("levels", [])]
    levels.append((f"Refit, open loop at {h['rate']:.1f} req/s", {**h, "concurrency": "open"}))
    levels += [(LABELS[key], r) for key in ("peer", "naive", "refit_unbatched")
               for r in result["servers"].get(key, {}).get("levels", [])]
    rows = [[label, r.get("generator", "aiohttp"), r["concurrency"], r["requests"], r["throughput"], r["p50_ms"],
             r.get("p90_ms"), r["p99_ms"], _errors(r), r["server_cpu_cores"], r["client_cpu_cores"], r.get("rss_mb")]
            for label, r in levels]
    defaults = ", ".join(text for key, text in (("workers", "{} worker process(es)"),
                                                 ("ort_threads", "{} ONNX Runtime thread(s) each"),
                                                 ("max_batch_size", "max batch {}")) if result.get(key)
                         for text in [text.format(result[key])])
    return (md_table(["server", "load generator", "concurrency", "requests", "req/s (= images/s)", "p50 ms", "p90 ms",
                      "p99 ms", "errors", "server CPU (cores)", "load generator CPU (cores)",
                      "server RSS after, MB"], rows)
            + f"\n\nRefit serves {_model(result)}; {result['images']} real JPEGs cycled, one per request; Refit's "
            f"defaults: {defaults}. Each level is a closed loop of N connections after a warm-up; wrk runs "
            "min(N, 2) threads. Refit and the peer were up together and measured in turns at each concurrency "
            "(the one not measured sat idle). The open-loop level starts requests on a fixed schedule at half "
            "Refit's best wrk throughput. The load generators run on the same 2 cores; their CPU use is shown "
            "because it is CPU the server did not get. The RSS is the server's processes (training processes "
            "apart) read after the level; Refit's levels ran in the order shown, on one "
            "server, so its column follows the predictions made so far." + _baseline_line(result)
            + _memory_line(result) + PROFILE)


# Not measured by this run: a py-spy profile taken by hand (`py-spy record -p WORKER -d 10 -r 200 -f raw`,
# one of the two workers, wrk at 64 connections, the INT8 hymenoptera version, 192 req/s served), kept here
# so that the page says where a prediction's CPU goes. Take it again after changing the serving path.
PROFILE = """

**Where the CPU of one prediction goes** (py-spy, 200 samples/s for 10 s on one of the two workers at 64
connections, 192 req/s served; share of that worker's busy samples, by thread):

| thread | share | what |
|---|---|---|
| model (`service/batcher.py`) | 43 % | onnxruntime `Session.run` on batches of up to 8 (40 %), the batching itself under 1 % |
| decode | 36 % | JPEG decode (Pillow, reduced-scale `draft` where it applies) 12 %, resize + crop 13 %, normalise 1 %, thread hand-off |
| event loop | 21 % | uvicorn's HTTP parsing, multipart, BentoML's request handling, JSON reply; waking the loop when a decode or a batch is done about 7 % of it |
| watcher, heartbeat, lifeline | 1 % | pointer polls and status records |

Before this design, each prediction also crossed a local HTTP call from the front process to a model worker
(BentoML's dependency client, JSON in and out): one request at a time took 36 ms at p50 for about 6 ms of
work; in one process it takes the p50 above. What is left beyond the work itself is the event loop's share:
HTTP and multipart parsing and BentoML's per-request handling, about 2 ms of a core per request.

**Memory after load.** A replica used to grow by about 4 KB per prediction (619 MB after 19,000) and keep
growing: BentoML's request timeout starts a timer per request and never cancels it, and the timer keeps the
request's context, which holds the request, until the timeout fires, an hour here (`traffic.timeout` covers
synchronous retrains). The service replaces that middleware with one that cancels its timer
(`service/compat.py`): a replica now stays flat, within a few MB of the same figure from 2,000 to 13,000
predictions at 64 connections.

**Why not 1.5 × the peer.** The peer is frozen: its own pixels (`bench/peer_pixels.py`, under stock Pillow in
an interpreter of its own where the project runs Pillow-SIMD) and ONNX Runtime with default options. At 64
connections both servers keep the two cores busy, so the ratio of their throughputs is about the inverse
ratio of what one image costs each of them: benchmark 12 measures Refit's core time per image at about
0.77 × the peer's, all of it from the resize and the normalisation, which puts Refit about 1.2–1.3 × ahead
at best. 1.5 × would need one image to cost 0.67 × the peer's work, the same wall as benchmark 12's target:
the model and the JPEG decode alone cost more than that. What separates the two otherwise: Refit answers one
request at a time in under 2 × the work's own time, keeps every reply on one version through hot swaps,
refuses bad input with named 4xx errors, and enforces body, pixel and per-request limits and the token."""  # noqa: E501 - markdown table rows are one line each


def _baseline_line(result: dict) -> str:
    b = baseline(result)
    if not b:
        return ""
    s = b["single_image"]
    return (f"\n\nIn-process figures of this run, measured just before the servers with today's pipeline: limit "
            f"{b['limit_images_per_s']:.1f} images/s ({b['limit_pipeline']}, batch {b['batch']}, "
            f"{b['precision'].upper()}); one image on its own (decode + preprocess + ONNX Runtime, one thread) "
            f"p50 {s['p50_ms']:.2f} ms.")


def _memory_line(result: dict) -> str:
    parts = []
    for key, when in (("idle_memory", "idle, started and warmed up, before the load"),
                      ("memory", "after {n:,} predictions")):
        m = result.get(key)
        if not m:
            continue
        roles = ", ".join(f"{role} {mb:.0f} MB" + (f" ({m['processes'][role]} processes)"
                                                   if m.get("processes", {}).get(role, 1) > 1 else "")
                          for role, mb in m["by_role_mb"].items())
        parts.append(f"{when.format(n=m.get('predictions'))}: {m['replica_mb']:.0f} MB RSS ({roles}); training "
                     f"processes apart, {m['training_mb']:.0f} MB")
    return ("\n\nMemory of the Refit replica (every process of `bentoml serve` except training processes): "
            + "; ".join(parts) + ".") if parts else ""
