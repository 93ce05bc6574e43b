"""Shadow and canary trials on one `bentoml serve` (two model workers): two feature-extraction versions of
hymenoptera (seeds 0 and 1, INT8), the first promoted, the second the candidate.

- The served maximum: wrk at 64 connections with no candidate.
- Shadow at 100 % at half that maximum: an open-loop load (requests on a fixed schedule, latency from the
  scheduled start) of half the maximum's rate, with no candidate, with the shadow on, and with no candidate
  again at the end; the shadow's p50 and p99 against the mean of the two runs without; errors.
- Shadow at 100 % at the maximum: wrk at 64 connections again with the shadow on; the samples dropped and the
  reply latency against no candidate.
- Canary at 50 % over 100 clients (`X-Refit-Client`), 5 requests each: how many clients saw one version only,
  and the share answered by the candidate.
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx

from bench.common import Plan, data_dir, log, md_table, target_row
from bench.retrain import cli_train

LATENCY_RATIO = 1.10
CANARY_PERCENT, CANARY_CLIENTS, CANARY_SPREAD = 50, 100, 15


def run(plan: Plan) -> dict:
    import tempfile

    from bench import loadgen, wrkgen
    from bench.servers import refit_server

    if not wrkgen.available():
        return {"error": "wrk is not installed"}
    quick = plan.retrain_subset is not None
    seconds = 4 if quick else 15
    with tempfile.TemporaryDirectory(prefix="refit-bench-candidate-") as tmp:
        home = Path(tmp) / "home"
        versions = []
        for seed in (0, 1):
            out, _, error = cli_train(data_dir(), home, ["--strategy", "feature_extraction", "--seed", str(seed),
                                                         "--promote", "true" if seed == 0 else "false"],
                                      plan, f"candidate-train-{seed}.log")
            if out is None:
                return {"error": error}
            versions.append(out["version"])
        images = [(f.name, f.read_bytes()) for f in sorted((data_dir() / "val").glob("*/*.jp*g"))[:32]]
        # No warm training process: starting one takes a core for seconds, which would land on the first load.
        with refit_server(home, Path(tmp) / "serve.log", train_standby="0") as srv:
            http = httpx.Client(base_url=srv.url, timeout=60)
            r = {"promoted": versions[0], "candidate": versions[1]}
            r["max"] = wrkgen.closed_loop(srv.url, images, 64, seconds=seconds, warmup_seconds=3)
            rate = r["max"]["throughput"] / 2
            r["half"] = loadgen.open_loop(srv.url, images, rate, seconds=seconds, max_requests=100_000,
                                          warmup_seconds=2)
            _set(http, versions[1], "shadow", 100)
            r["half_shadow"] = loadgen.open_loop(srv.url, images, rate, seconds=seconds, max_requests=100_000,
                                                 warmup_seconds=2)
            r["half_shadow_figures"] = _shadow_figures(http)
            _clear(http)
            _set(http, versions[1], "shadow", 100)
            r["max_shadow"] = wrkgen.closed_loop(srv.url, images, 64, seconds=seconds, warmup_seconds=3)
            r["max_shadow_figures"] = _shadow_figures(http)
            _clear(http)
            # No candidate again: the mean of the runs before and after is the baseline (the machine drifts).
            r["half_after"] = loadgen.open_loop(srv.url, images, rate, seconds=seconds, max_requests=100_000,
                                                warmup_seconds=2)
            r["canary"] = canary(http, images, versions)
            _clear(http)
    for k in ("max", "half", "half_shadow", "max_shadow", "half_after"):
        log(f"candidate: {k}: {r[k].get('throughput'):.1f}/s p50 {r[k].get('p50_ms')} p99 {r[k].get('p99_ms')} "
            f"errors {r[k].get('errors')}")
    return r


def _set(http, version: str, mode: str, percent: float) -> None:
    got = http.post("/candidate", json={"version": version, "mode": mode, "percent": percent})
    got.raise_for_status()
    time.sleep(1.5)  # every worker follows the pointer within its 0.25 s poll, and loads the candidate


def _clear(http) -> None:
    http.delete("/candidate").raise_for_status()
    time.sleep(1.0)


def _shadow_figures(http) -> dict:
    time.sleep(6)  # the other worker writes its figures every heartbeat (5 s)
    return http.get("/candidate").json()["figures"]["shadow"]


def canary(http, images: list, versions: list[str]) -> dict:
    _set(http, versions[1], "canary", CANARY_PERCENT)
    seen: dict[int, set] = {}
    for c in range(CANARY_CLIENTS):
        for k in range(5):
            name, data = images[(c * 5 + k) % len(images)]
            reply = http.post("/predict", files=[("images", (name, data, "image/jpeg"))],
                              headers={"X-Refit-Client": f"client-{c}"})
            reply.raise_for_status()
            seen.setdefault(c, set()).add(reply.json()[0]["version"])
    one = sum(len(s) == 1 for s in seen.values())
    share = 100 * sum(s == {versions[1]} for s in seen.values()) / len(seen)
    return {"clients": len(seen), "one_version": one, "candidate_share_percent": share}


def tables(r: dict) -> str:
    if "error" in r:
        return r["error"] + "\n"
    rows = []
    for key, what in (("max", "wrk 64 connections, no candidate"), ("max_shadow", "wrk 64 connections, shadow 100 %"),
                      ("half", "open loop at half the maximum, no candidate"),
                      ("half_shadow", "open loop at half the maximum, shadow 100 %"),
                      ("half_after", "open loop at half the maximum, no candidate again")):
        x = r[key]
        rows.append([what, f"{x['throughput']:.1f}", x.get("p50_ms"), x.get("p99_ms"), x.get("errors")])
    text = md_table(["load", "requests/s", "p50 ms", "p99 ms", "errors"],
                    [[a, b, _ms(c), _ms(d), e] for a, b, c, d, e in rows])
    sh = [["half the maximum", *_shadow_row(r["half_shadow_figures"])],
          ["the maximum", *_shadow_row(r["max_shadow_figures"])]]
    text += "\n\n" + md_table(["shadow at 100 %, load", "compared", "dropped", "top-1 agreement",
                               "mean abs Δ probability"], sh)
    c = r["canary"]
    text += (f"\n\nCanary at {CANARY_PERCENT} %: {c['one_version']} of {c['clients']} clients saw one version only; "
             f"{c['candidate_share_percent']:.0f} % of clients were answered by the candidate.\n")
    return text


def _shadow_row(f: dict) -> list:
    return [f.get("compared"), f.get("dropped"), f.get("agreement"), f.get("mean_abs_delta")]


def _ms(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def targets(r: dict) -> list[list]:
    if "error" in r:
        return [target_row("candidate: shadow and canary", r["error"][:120], "–", None)]
    hs, m, ms = r["half_shadow"], r["max"], r["max_shadow"]
    base = [r["half"], r.get("half_after") or r["half"]]
    p50 = hs["p50_ms"] / (sum(b["p50_ms"] for b in base) / 2)
    p99 = hs["p99_ms"] / (sum(b["p99_ms"] for b in base) / 2)
    ok_half = p50 <= LATENCY_RATIO and p99 <= LATENCY_RATIO and not hs.get("errors")
    dropped = (r["max_shadow_figures"].get("dropped") or 0) > 0
    slower = ms["p50_ms"] / m["p50_ms"]
    c = r["canary"]
    split_ok = abs(c["candidate_share_percent"] - CANARY_PERCENT) <= CANARY_SPREAD
    return [
        target_row("candidate: shadow 100 % at half the served maximum, p50 / p99 vs no candidate",
                   f"{p50:.3f}× / {p99:.3f}×, {hs.get('errors')} errors", f"≤ {LATENCY_RATIO}×, 0 errors", ok_half),
        target_row("candidate: shadow 100 % at the served maximum, samples dropped, reply p50 vs no candidate",
                   f"{r['max_shadow_figures'].get('dropped')} dropped, {slower:.3f}×",
                   f"dropped > 0, ≤ {LATENCY_RATIO}×",
                   dropped and slower <= LATENCY_RATIO),
        target_row("candidate: canary 50 % over 100 clients, one version per client, split",
                   f"{c['one_version']}/{c['clients']}, {c['candidate_share_percent']:.0f} %",
                   f"100/100, {CANARY_PERCENT} ± {CANARY_SPREAD} %",
                   c["one_version"] == c["clients"] and split_ok)]
