"""wrk, a load generator written in C, driving `POST /predict` with real JPEGs (bench/wrk/predict.lua).

On a 2-core machine the load generator's CPU is CPU the server does not get; wrk spends a fraction of what
the Python generator (bench/loadgen.py) spends per request, so a closed-loop level measured with it is
closer to what the server alone can do. It has no open-loop mode with the latency accounting we need, so
the half-load level stays on bench/loadgen.py.

    closed_loop(url, images, 64, seconds=12, warmup_seconds=2)  # the row shape of loadgen.closed_loop
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import ROOT
from bench.loadgen import _check_local

SCRIPT = ROOT / "bench" / "wrk" / "predict.lua"
MARK = "WRK_JSON "


def available() -> str | None:
    return shutil.which("wrk")


def closed_loop(url: str, images: list[tuple[str, bytes]], concurrency: int, *, seconds: float,
                warmup_seconds: float = 0.0, timeout: float = 60, **_ignored) -> dict:
    """`concurrency` connections, each sending its next request when the last is answered, for `seconds`
    after a warm-up at the same concurrency; a row like bench.loadgen.closed_loop's."""
    _check_local(url)
    if not available():
        raise RuntimeError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="refit-bench-wrk-") as tmp:
        for i, (_, data) in enumerate(images):
            Path(tmp, f"{i}.jpg").write_bytes(data)
        warmup = summary(_run(url, tmp, len(images), concurrency, warmup_seconds, timeout), concurrency) \
            if warmup_seconds > 0 else {"ok": 0}
        raw = _run(url, tmp, len(images), concurrency, seconds, timeout)
    # The warm-up's answers count as predictions the server made (the memory target counts them).
    return {**summary(raw, concurrency), "warmup_ok": warmup["ok"]}


def _run(url: str, image_dir: str, count: int, concurrency: int, seconds: float, timeout: float) -> dict:
    threads = min(concurrency, 2)
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={int(timeout)}s",
           "-s", str(SCRIPT), url, "--", image_dir, str(count), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout + 60)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    said = proc.stderr.strip()[-1000:] or proc.stdout[-1000:]
    raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {said}")


def summary(raw: dict, concurrency: int) -> dict:
    """wrk's counts as a loadgen row: errors are answers other than a 2xx prediction list, plus socket
    errors and timeouts; latencies (ms) are over every answer wrk received."""
    kinds = {f"HTTP {code}": n for code, n in raw["statuses"].items()}
    for key, label in (("bad_body", "bad body"), ("connect", "connect error"), ("read", "read error"),
                       ("write", "write error"), ("timeout", "timeout")):
        if raw[key]:
            kinds[label] = raw[key]
    errors = raw["non2xx"] + raw["bad_body"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    ok = max(0, raw["requests"] - raw["non2xx"] - raw["bad_body"])
    secs = raw["duration_us"] / 1e6
    answered = raw["requests"] > 0
    ms = {f"p{q}_ms": raw[f"p{q}_us"] / 1000 if answered else None for q in (50, 90, 95, 99)}
    return {"mode": "closed", "generator": "wrk", "concurrency": concurrency, "rate": None, "ok": ok,
            "errors": errors, "error_kinds": kinds, "seconds": secs, "requests": ok + errors,
            "throughput": ok / secs if secs else 0.0, **ms, "max_ms": raw["max_us"] / 1000 if answered else None}
