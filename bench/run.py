"""Run the benchmarks and write bench/results/ (JSON + markdown) and docs/benchmarks.md with its plots.

    python -m bench.run                     # everything, about 45 minutes on 2 cores (make bench)
    python -m bench.run --quick             # tiny counts: a smoke test, written under bench/results/quick/
    python -m bench.run --only served       # one benchmark (repeatable); the page keeps the others' saved figures
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from datetime import datetime, timezone

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
    report,
    retrain,
    served,
    transfer,
)
from bench.common import DOCS, FULL, QUICK, Plan, load_json, log, machine, md_table, save_json

SECTIONS = ("model", "preprocess", "inprocess", "served", "retrain", "backbones", "transfer", "imbalance",
            "projects", "multilabel", "candidate", "cost", "guard")


def run_section(name: str, plan: Plan, results: dict) -> dict:
    if name == "model":
        return model.run(plan)
    if name == "preprocess":
        return preprocessing.run(plan)
    if name == "inprocess":
        return inprocess.run(plan, results.get("model"))  # at benchmark 1's best batch size
    if name == "served":
        return served.run(plan, results.get("model"))  # its in-process baseline at benchmark 1's best batch
    if name == "retrain":
        return retrain.run(plan)
    if name == "backbones":
        return backbones.run(plan)
    if name == "transfer":
        return transfer.run(plan)
    if name == "imbalance":
        return imbalance.run(plan)
    if name == "projects":
        return projects.run(plan)
    if name == "multilabel":
        return multilabel.run(plan)
    if name == "candidate":
        return candidate.run(plan)
    if name == "cost":
        return cost.run(plan)
    if name == "guard":
        return guard.run(plan)
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(SECTIONS)}")


def measure(name: str, plan: Plan, results: dict) -> dict:
    """One benchmark, timed; a failure is recorded in its result so the others still run and report."""
    log(f"=== {name} ({plan.name})")
    t0 = time.perf_counter()
    try:
        result = run_section(name, plan, results)
    except Exception as e:  # noqa: BLE001 - report it on the page and carry on with the next benchmark
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    result["_meta"] = {"seconds": round(time.perf_counter() - t0, 1), "plan": plan.name,
                       "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    save_json(plan.results_dir / f"{name}.json", result)
    if "error" not in result:
        (plan.results_dir / f"{name}.md").write_text(report.TABLES[name](result) + "\n")
    log(f"=== {name} done in {result['_meta']['seconds']:.0f}s")
    return result


CONTAINER_SECTION = "## Container images"


def write_page(plan: Plan, results: dict, mach: dict, wall: float) -> None:
    page_dir = DOCS if plan.name == "full" else plan.results_dir
    save_json(plan.results_dir / "machine.json", mach)
    save_json(plan.results_dir / "targets.json", report.targets(results))
    images = report.plots(results, page_dir)
    page_dir.mkdir(parents=True, exist_ok=True)
    text = report.page(results, mach, plan, wall, images)
    # Image sizes are measured with podman (`make container`), not by this run: their section is carried over.
    old = (page_dir / "benchmarks.md").read_text() if (page_dir / "benchmarks.md").is_file() else ""
    if CONTAINER_SECTION in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(CONTAINER_SECTION):].rstrip("\n") + "\n"
    (page_dir / "benchmarks.md").write_text(text)
    (plan.results_dir / "targets.md").write_text(md_table(["target", "measured", "goal", "status"],
                                                                 report.targets(results)) + "\n")
    log(f"wrote {page_dir / 'benchmarks.md'}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description="Refit benchmarks.")
    ap.add_argument("--quick", action="store_true", help="tiny counts, for a smoke test (results under "
                    "bench/results/quick/, the docs page is left alone)")
    ap.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                    help=f"run only this benchmark (repeatable): {', '.join(SECTIONS)}")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    mach = machine()  # before anything runs, so the load average is the machine's, not the benchmark's
    # Earlier figures are kept for the benchmarks not run now, so `--only` refreshes one part of the page.
    results = {n: load_json(plan.results_dir / f"{n}.json") for n in SECTIONS}
    for name in [n for n in SECTIONS if not args.only or n in args.only]:
        results[name] = measure(name, plan, results)
    write_page(plan, results, mach, time.perf_counter() - t0)
    failed = [n for n in SECTIONS if results.get(n) and "error" in results[n]]
    log(f"finished in {(time.perf_counter() - t0) / 60:.1f} min" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
