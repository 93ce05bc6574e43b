"""The times the store writes into its records, and how old such a time is."""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def now_ms() -> str:
    # A claim's heartbeat is judged against a grace of a few heartbeats: whole seconds would age it by up to one.
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def age_seconds(iso) -> float:
    """Seconds since an ISO time a record carries; infinite for a missing or foreign one."""
    try:
        return time.time() - datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return float("inf")


def seconds(iso) -> str | None:
    """An ISO time to the second (BentoML's creation_time has microseconds); a foreign value as it is."""
    try:
        return datetime.fromisoformat(str(iso)).isoformat(timespec="seconds")
    except ValueError:
        return None if iso is None else str(iso)


def stamp() -> str:
    """A name part that sorts by time and never repeats: 20260101T000000Z-1a2b3c."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
