"""What every model worker of every replica serves, kept in the store where all replicas can read it.

Each `bentoml serve` is one replica, named by `replica_id()`. Each of its model workers keeps one record,
`serving/<replica>/<pid>.json` in the store (a folder: an atomic rename; S3: one PUT), with the version it
serves, when it loaded it, the version it refused and why, and `updated`. The worker rewrites it when
something changes and at every heartbeat (`REFIT_HEARTBEAT_SECONDS`), and removes it when it shuts down
cleanly. A worker that dies without doing so (kill -9, the OOM killer, a machine that is gone) stops
rewriting it; readers treat a record older than `REFIT_STATUS_TTL_SECONDS` as gone and remove it. No
process ids are checked: a reader on another machine could not check them.

A refused promote is kept the same way, one record per refusal under `refused/`, so every replica lists it.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from datetime import datetime, timezone

from core.clock import age_seconds, now_ms
from core.settings import settings
from core.store import Store, StoreError

log = logging.getLogger("refit.replicas")

SERVING = "serving/"
REFUSED = "refused/"
KEEP_REFUSALS = 20
_RECORD_RE = re.compile(r"^serving/([^/]+)/(\d+)\.json$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def replica_id() -> str:
    """`REFIT_REPLICA`, else this machine's hostname and the `bentoml serve` supervisor's pid: the same in
    the front and every model worker of one `bentoml serve`, and different for the next one."""
    given, supervisor = settings().replica, settings().supervisor_pid
    if given:
        if not _ID_RE.match(given):
            raise ValueError(f"REFIT_REPLICA={given!r} cannot name a replica: use 1 to 100 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
        return given
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-._") or "host"
    return f"{host}-{supervisor or os.getppid()}"


class StatusBoard:
    """Worker status records and refusals in one store."""

    def __init__(self, store: Store, ttl: float | None = None):
        self.store = store
        self.ttl = settings().status_ttl_seconds if ttl is None else ttl

    # -- written by a model worker ----------------------------------------------------------------
    def publish(self, replica: str, pid: int, status: dict) -> None:
        """Write (or refresh) one worker's record. Raises StoreError or OSError when the store refuses."""
        self.store.put_record(f"{SERVING}{replica}/{pid}.json",
                              {**status, "replica": replica, "pid": pid, "updated": now_ms()})

    def withdraw(self, replica: str, pid: int) -> None:
        self.store.delete_record(f"{SERVING}{replica}/{pid}.json")

    # -- read by every replica --------------------------------------------------------------------
    def live(self, replica: str | None = None) -> list[dict]:
        """The records of live workers (of one replica, or of all), by replica and pid. Expired records are
        removed on the way, best effort: a worker that is alive after all writes its record again at its next
        heartbeat."""
        out = []
        for key, record in self.store.records(f"{SERVING}{replica}/" if replica else SERVING).items():
            m = _RECORD_RE.match(key)
            if not m or not isinstance(record, dict) or record.get("replica") != m.group(1):
                continue  # not a worker record (an older release's serving/worker-<pid>.json, say)
            if age_seconds(record.get("updated")) > self.ttl:
                self._remove(key)
                continue
            out.append(record)
        return sorted(out, key=lambda r: (str(r["replica"]), int(r.get("pid") or 0)))

    def _remove(self, key: str) -> None:
        try:
            self.store.delete_record(key)
        except (OSError, StoreError) as e:
            log.warning("cannot remove %s from the store: %s", key, e)

    # -- refusals ---------------------------------------------------------------------------------
    def record_refusal(self, version: str, reason: str, replica: str) -> None:
        """One record per refusal (no read-modify-write, so refusals on two replicas at once both stay); only
        the newest KEEP_REFUSALS are kept."""
        at = datetime.now(timezone.utc)
        key = f"{REFUSED}{at.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"
        self.store.put_record(key, {"version": version, "reason": reason, "at": at.isoformat(timespec="seconds"),
                                    "replica": replica})
        for old in sorted(self.store.records(REFUSED))[:-KEEP_REFUSALS]:
            self._remove(old)

    def refusals(self) -> list[dict]:
        """The newest refused promotes, oldest first (their keys sort by time)."""
        found = self.store.records(REFUSED)
        return [found[k] for k in sorted(found)[-KEEP_REFUSALS:] if isinstance(found[k], dict)]


def disagreement(workers: list[dict], recorded: dict[str, str | None]) -> dict | None:
    """What the live workers disagree on, or None when they all serve one model: workers on different
    versions, one id served with different checksums (a replica kept a copy from a store since re-created),
    or a worker serving an id whose checksum is not the one the store records for it now (`recorded`:
    version -> serving checksum). A promote in progress shows here for the second or two of its rollout."""
    served: dict[tuple[str, str | None], list[str]] = {}
    for w in workers:
        if w.get("version"):
            served.setdefault((w["version"], w.get("sha256")), []).append(f"{w.get('replica')}/{w.get('pid')}")
    served = dict(sorted(served.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))))
    problems = []
    ids = sorted({v for v, _ in served})
    if len(ids) > 1:
        problems.append(f"the workers serve different versions ({', '.join(ids)})")
    for v in ids:
        if len({sha for (version, sha) in served if version == v}) > 1:
            problems.append(f"{v} is served as different models (different checksums)")
    for (v, sha), who in served.items():
        if v in recorded and sha and recorded[v] and sha != recorded[v]:
            problems.append(f"{', '.join(who)} serve a {v} that is not the store's ({sha[:12]}, the store records "
                            f"{recorded[v][:12]})")
    if not problems:
        return None
    return {"message": "; ".join(problems),
            "served": [{"version": v, "sha256": sha, "store_sha256": recorded.get(v), "workers": who}
                       for (v, sha), who in served.items()]}
