"""Many projects in one replica: 50 projects, each a feature-extraction version trained on its own seeded subset
of hymenoptera, served by one `bentoml serve` with REFIT_MAX_LOADED_MODELS=8, and requests spread over all 50.

The replica runs one model worker, so that which requests find their project's version loaded is known: the
client replays the same LRU over the same sequence of requests (c=1), and splits the latencies into cold (the
request loaded its version) and hot ones. The single-project p50 is measured on the same server, on one
project. A concurrent phase (8 clients, all 50 projects) counts errors, loads and evictions, and the worker's
RSS is read with only the default project loaded and with 8 projects loaded, which gives the cost of one.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import PYTHON, ROOT, Plan, data_dir, log, md_table, target_row

PROJECTS = 50
MAX_LOADED = 8
PER_CLASS = {"train": 16, "val": 8}
SEQUENCE = 600  # c=1 requests spread over the projects
CONCURRENT = 400  # requests of the concurrent phase
COLD_P50_MS = 150
HOT_RATIO = 1.2
RSS_BASE_MB = 600

TRAIN_ALL = """
import json, sys, time
from pathlib import Path
from core.config import TrainRequest
from core.projects import Registry
from core.store import Store
from training.pipeline import train

home, names = Path(sys.argv[1]), sys.argv[2:]
request = TrainRequest(strategy="feature_extraction", int8=False, parity_images=8, promote=True)
out = {}
for name in names:
    store = Store(home, project=name)
    Registry(store.base).create(name)
    t0 = time.perf_counter()
    result = train(request, str(home.parent / "data" / name), store=store, log=lambda *a, **k: None)
    out[name] = {"version": result["version"], "seconds": round(time.perf_counter() - t0, 2),
                 "val_accuracy": result.get("val_accuracy")}
print(json.dumps(out))
"""


def run(plan: Plan) -> dict:
    quick = plan.retrain_subset is not None
    n = 6 if quick else PROJECTS
    with tempfile.TemporaryDirectory(prefix="refit-bench-projects-") as tmp:
        tmp = Path(tmp)
        names = [f"p{i:02d}" for i in range(n)]
        for i, name in enumerate(names):
            subset(data_dir(), tmp / "data" / name, seed=i)
        t0 = time.perf_counter()
        trained = train_all(tmp / "home", names)
        prep = time.perf_counter() - t0
        log(f"projects: {n} versions trained in {prep:.0f}s")
        result = serve_and_measure(tmp, names, max_loaded=3 if quick else MAX_LOADED,
                                   sequence=60 if quick else SEQUENCE, concurrent=40 if quick else CONCURRENT)
    accs = [t["val_accuracy"] for t in trained.values() if t.get("val_accuracy") is not None]
    from bench import cluster

    log("projects: two projects retrained at once on a cluster (S3, Redis, two replicas, two workers)")
    try:
        together = cluster.run()
    except Exception as e:  # noqa: BLE001 - reported on the page; the figures above still stand
        together = {"error": f"{type(e).__name__}: {e}"}
    return {**result, "cluster": together, "projects": n,
            "train_seconds_mean": statistics.mean(t["seconds"] for t in trained.values()),
            "val_accuracy_mean": statistics.mean(accs) if accs else None, "prep_seconds": round(prep, 1)}


def subset(root: Path, where: Path, seed: int) -> None:
    """Links to a seeded sample of the dataset's images (nothing is copied)."""
    rng = random.Random(seed)
    for split, k in PER_CLASS.items():
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            dest = where / split / cls.name
            dest.mkdir(parents=True)
            for f in rng.sample(sorted(cls.glob("*.jp*g")), k):
                (dest / f.name).symlink_to(f)


def train_all(home: Path, names: list[str]) -> dict:
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([PYTHON, "-c", TRAIN_ALL, str(home), *names], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"training the projects failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_and_measure(tmp: Path, names: list[str], *, max_loaded: int, sequence: int, concurrent: int) -> dict:
    from bench.servers import refit_server

    with refit_server(tmp / "home", tmp / "serve.log", max_loaded_models=max_loaded, workers=1) as srv:
        url, pid = srv.url, srv.proc.pid
        images = sample_images()
        with httpx.Client(base_url=url, timeout=60) as http:
            base_rss = worker_rss(pid)
            single = [timed(http, names[0], images[i % len(images)])[0] for i in range(sequence // 3 + 20)][20:]
            order = random.Random(7).choices(names, k=sequence)
            cold, hot, errors = replay(http, order, images, max_loaded, loaded={names[0]})
            full_rss = worker_rss(pid)
            errors += spread(url, names, images, concurrent)
            metrics = http.get("/metrics").text
    per_model = (full_rss - base_rss) / max_loaded if full_rss and base_rss else None
    return {"single_p50_ms": _p50(single), "cold_p50_ms": _p50(cold), "hot_p50_ms": _p50(hot),
            "cold": len(cold), "hot": len(hot), "errors": errors, "rss_base_mb": base_rss,
            "rss_loaded_mb": full_rss, "rss_per_model_mb": per_model, "max_loaded": max_loaded,
            "loads": _sum(metrics, "refit_model_loads_total"),
            "evictions": _sum(metrics, "refit_model_evictions_total"),
            "load_seconds_mean": _mean_histogram(metrics, "refit_model_load_seconds")}


def sample_images() -> list[bytes]:
    root = data_dir() / "val"
    files = sorted(root.glob("*/*.jp*g"))[::10][:16]
    return [f.read_bytes() for f in files]


def timed(http: httpx.Client, project: str, image: bytes) -> tuple[float, bool]:
    t0 = time.perf_counter()
    r = http.post(f"/projects/{project}/predict", files=[("images", ("x.jpg", image, "image/jpeg"))])
    return (time.perf_counter() - t0) * 1000, r.status_code == 200


def replay(http: httpx.Client, order: list[str], images: list[bytes], max_loaded: int, loaded: set[str]):
    """The requests in order, each labelled cold or hot by the same LRU the worker keeps."""
    lru: OrderedDict[str, None] = OrderedDict((n, None) for n in loaded)
    cold, hot, errors = [], [], 0
    for i, name in enumerate(order):
        was_loaded = name in lru
        lru[name] = None
        lru.move_to_end(name)
        while len(lru) > max_loaded:
            lru.popitem(last=False)
        ms, ok = timed(http, name, images[i % len(images)])
        errors += not ok
        (hot if was_loaded else cold).append(ms)
    return cold, hot, errors


def spread(url: str, names: list[str], images: list[bytes], count: int) -> int:
    rng = random.Random(11)
    order = [rng.choice(names) for _ in range(count)]
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(8) as pool:
        oks = list(pool.map(lambda iv: timed(http, iv[1], images[iv[0] % len(images)])[1], enumerate(order)))
    return oks.count(False)


def worker_rss(supervisor: int) -> float | None:
    """RSS in MB of the serving processes (the supervisor and its children) summed."""
    try:
        children = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout.split()
        total = 0
        for pid in [str(supervisor), *children]:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return round(total / 1024, 1)
    except OSError:
        return None


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _mean_histogram(text: str, name: str) -> float | None:
    total = _sum(text, name + "_sum") or sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                             if line.startswith(name + "_sum"))
    count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "_count"))
    return round(total / count, 4) if count else None


# --- report ----------------------------------------------------------------------------------------------

def tables(r: dict) -> str:
    if "error" in r:
        return r["error"] + "\n"
    rows = [["single project (hot)", r["single_p50_ms"], ""],
            [f"spread over {r['projects']}, hot", r["hot_p50_ms"], r["hot"]],
            [f"spread over {r['projects']}, cold (loads its version)", r["cold_p50_ms"], r["cold"]]]
    text = md_table(["requests (c=1, one image)", "p50 ms", "requests"], rows)
    return text + (f"\n\n{r['projects']} projects, each a feature-extraction version (FP32) on its own seeded "
                   f"subset of hymenoptera ({PER_CLASS['train']} train / {PER_CLASS['val']} val per class; "
                   f"{r['train_seconds_mean']:.1f} s each, mean validation accuracy "
                   f"{(r['val_accuracy_mean'] or 0):.3f}), one replica with one model worker and "
                   f"REFIT_MAX_LOADED_MODELS={r['max_loaded']}. Loads {r['loads']:.0f}, evictions "
                   f"{r['evictions']:.0f}, mean load {(r['load_seconds_mean'] or 0) * 1000:.0f} ms (from /metrics), "
                   f"errors {r['errors']} (c=1 and 8 concurrent clients). RSS of the replica: "
                   f"{r['rss_base_mb']} MB with the default project loaded, {r['rss_loaded_mb']} MB with "
                   f"{r['max_loaded']} more: {(r['rss_per_model_mb'] or 0):.1f} MB per loaded version.\n"
                   + cluster_text(r.get("cluster")))


def cluster_text(c: dict | None) -> str:
    if not c or "error" in c:
        return f"\n\nTwo projects retrained at once on a cluster: {(c or {}).get('error', 'not measured')}.\n"
    rows = [[x["project"], x.get("version"), x.get("worker"), x.get("seconds"), x.get("serve_lag_seconds"),
             x.get("error")] for x in c["rows"]]
    return ("\n\nTwo projects retrained at once on a cluster on loopback (moto's S3 server, Redis, two replicas, "
            f"two `refit worker`s); trained at the same time: {'yes' if c['trained_together'] else 'no'}.\n\n"
            + md_table(["project", "version", "worker", "job s", "both replicas serve it, s after the job ended",
                        "error"], rows) + "\n")


def cluster_targets(c: dict | None) -> list[list]:
    rows = (c or {}).get("rows") or []
    ok = bool(rows) and all("error" not in x for x in rows)
    lags = [x["serve_lag_seconds"] for x in rows if x.get("serve_lag_seconds") is not None]
    figure = (f"both finished, trained together: {c['trained_together']}; served by both replicas "
              f"{max(lags):.2f} s after" if ok and lags else (c or {}).get("error", "failed"))
    from bench.cluster import CONVERGE_SECONDS

    return [target_row("projects: two projects retrained at once on two workers", figure,
                       f"both finish, both replicas serve both ≤ {CONVERGE_SECONDS} s",
                       None if not rows else ok and bool(lags) and max(lags) <= CONVERGE_SECONDS
                       and c["trained_together"])]


def targets(r: dict) -> list[list]:
    if "error" in r or r.get("cold_p50_ms") is None:
        return [target_row("projects: 50 projects in one replica", r.get("error", "failed"), "", None)]
    ratio = r["hot_p50_ms"] / r["single_p50_ms"] if r.get("hot_p50_ms") else None
    allowed = RSS_BASE_MB + r["max_loaded"] * (r["rss_per_model_mb"] or 0)
    return [target_row("projects: cold-load p50 (request that loads its version)", f"{r['cold_p50_ms']:.1f} ms",
                       f"≤ {COLD_P50_MS} ms", r["cold_p50_ms"] <= COLD_P50_MS),
            target_row("projects: hot p50 over 50 projects vs one project",
                       f"{r['hot_p50_ms']:.1f} vs {r['single_p50_ms']:.1f} ms ({ratio:.2f}×)",
                       f"≤ {HOT_RATIO}×", ratio is not None and ratio <= HOT_RATIO),
            target_row("projects: errors", str(r["errors"]), "0", r["errors"] == 0),
            target_row("projects: RSS with 8 loaded", f"{r['rss_loaded_mb']} MB ({r['rss_per_model_mb']:.1f} MB "
                       "per version)", f"≤ {RSS_BASE_MB} MB + 8 × per-version", r["rss_loaded_mb"] <= allowed),
            *cluster_targets(r.get("cluster"))]
