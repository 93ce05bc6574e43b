"""The candidate: a version on trial beside the promoted one, kept in the promoted pointer's own file.

`promoted.json` holds `candidate` next to `version`: {"version", "mode" (shadow | canary), "percent", "set_at",
"actor", "id", "guard"}. Living in the same file, it is changed by the same compare-and-swap, every replica
follows it with the same poll that follows the promoted version, and promote and rollback end a trial in the
same write that moves the pointer, so no replica ever sees a promoted candidate still on trial. The history
records a trial's start (`candidate`), each change, and how it ended (`candidate_end`: cleared, promoted,
rolled back, superseded by another promotion, or cleared by its guard).

Each serving worker writes what it measured of a trial to `trials/ID/WORKER.json` (service/trial.py);
`merge` sums them for `GET /candidate`.
"""
from __future__ import annotations

from core.clock import now_iso, stamp

MODES = ("shadow", "canary")
TRIALS = "trials"  # per-worker figures of each trial, under the project's records


def begin(state: dict, version: str, mode: str, percent: float, guard: dict | None, actor: str) -> dict:
    """Set (or change) the candidate in a pointer state; the history event. A new version starts a new trial
    (a new id, figures from zero); the same version with another mode or percent keeps its trial going, its
    figures split by what each setting saw only through `changed_at`."""
    old = state.get("candidate")
    at = now_iso()
    same = isinstance(old, dict) and old.get("version") == version
    cand = {"version": version, "mode": mode, "percent": percent, "guard": guard or None, "actor": actor,
            "set_at": old["set_at"] if same else at, "changed_at": at,
            "id": old["id"] if same else f"{stamp()}-{version}"}
    state["candidate"] = cand
    event = {"action": "candidate", "version": version, "mode": mode, "percent": percent, "at": at,
             "actor": actor, "trial": cand["id"], "previous": state.get("version")}
    state["history"].append(event)
    return event


def end(state: dict, how: str, actor: str, reason: str = "", only: str | None = None) -> dict | None:
    """Clear the candidate of a pointer state, recording `how` the trial ended; None when there is none (or
    when `only`, a trial id, is not the one on: a guard that fired on a trial already ended)."""
    cand = state.get("candidate")
    if not isinstance(cand, dict) or (only is not None and cand.get("id") != only):
        return None
    state["candidate"] = None
    event = {"action": "candidate_end", "version": cand.get("version"), "how": how, "at": now_iso(),
             "actor": actor, "reason": reason, "trial": cand.get("id"), "mode": cand.get("mode"),
             "percent": cand.get("percent")}
    state["history"].append(event)
    return event


def current(state: dict) -> dict | None:
    cand = state.get("candidate")
    return cand if isinstance(cand, dict) and isinstance(cand.get("version"), str) else None


def merge(records: list[dict]) -> dict:
    """Sum the figures of every worker's record of one trial (service/trial.py's `Figures.snapshot` shape)."""
    out: dict = {"versions": {}, "shadow": {}, "flips": {}, "feedback": {}}
    for r in records:
        for v, f in (r.get("versions") or {}).items():
            mine = out["versions"].setdefault(v, {"requests": 0, "errors": 0, "latency": []})
            mine["requests"] += int(f.get("requests", 0))
            mine["errors"] += int(f.get("errors", 0))
            mine["latency"] = _add(mine["latency"], f.get("latency") or [])
        for k, n in (r.get("shadow") or {}).items():
            out["shadow"][k] = out["shadow"].get(k, 0) + n
        for k, n in (r.get("flips") or {}).items():
            out["flips"][k] = out["flips"].get(k, 0) + int(n)
        for v, f in (r.get("feedback") or {}).items():
            mine = out["feedback"].setdefault(v, {"labelled": 0, "correct": 0})
            mine["labelled"] += int(f.get("labelled", 0))
            mine["correct"] += int(f.get("correct", 0))
    return out


def _add(a: list, b: list) -> list:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
