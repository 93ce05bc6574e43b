"""How a dataset's snapshots are stored: as deltas, so that a change costs what it changes.

A snapshot is still named by the hash of its entries (core.datasets.snapshot_id) and still read whole
(`entries`), but its file holds either every entry (a full snapshot, the only format before deltas, which is
still read as it is) or a delta over an older snapshot of the same line, its `base`:

    {"format": "delta", "id", "parent", "created", "base": ID or null, "depth": N, "bases": [...],
     "changed": C, "images": n, "put": [entries added or changed over the base], "drop": [sha256, ...]}

The base is chosen as Subversion's skip-deltas choose theirs: snapshot number N since the last full one has
for base number N with its lowest set bit cleared, so a read follows at most log2(N) + 1 deltas and a
one-image change writes about log2(N) entries on average, whatever the size of the dataset. A full snapshot
is written again once the entries changed since the last one reach the dataset's size (and at least
CHECKPOINT_MIN), so a read never has more than a few times the dataset's entries to apply, and that
checkpoint costs one entry per entry changed since the one before.

No snapshot is written before its change has won the head's compare-and-swap: the head carries the new
snapshot's record (`record`), and the winner writes the snapshot's file after winning (create-only). A writer
that loses writes nothing, so it leaves nothing behind. A winner that dies before writing the file leaves
the record in the head, where readers find it and the next writer writes it out first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from core.store import Store, StoreError

CHECKPOINT_MIN = 64  # entries changed since the last full snapshot before the next one may be full
SLIM_ENTRIES = 64  # a head carries a written snapshot's record only while it is this small
_CACHE_SIZE = 6  # resolved snapshots kept per process (immutable: an id is the hash of its entries)
_cache: OrderedDict[tuple, tuple[dict, dict]] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass
class Tip:
    """A snapshot as read: its record and its entries by sha256 (shared with the cache: never mutate)."""
    id: str
    record: dict
    entries: dict = field(repr=False)

    @property
    def depth(self) -> int:
        return int(self.record.get("depth", 0)) if is_delta(self.record) else 0

    @property
    def bases(self) -> list:
        return list(self.record.get("bases", [])) if is_delta(self.record) else []

    @property
    def changed(self) -> int:
        return int(self.record.get("changed", 0)) if is_delta(self.record) else 0

    def doc(self) -> dict:
        """What a manifest reads as, whatever the file's format: {dataset, id, parent, created, entries}."""
        r = self.record
        return {"dataset": r.get("dataset"), "id": self.id, "parent": r.get("parent"), "created": r.get("created"),
                "entries": [dict(self.entries[s]) for s in sorted(self.entries)]}


def key(name: str, sid: str) -> str:
    return f"datasets/{name}/snapshots/{sid}.json"


def is_delta(record: dict) -> bool:
    return record.get("format") == "delta"


def pending(head: dict | None, sid: str) -> dict | None:
    """The record the head carries for `sid` (written by a winner that may not have written its file yet)."""
    rec = (head or {}).get("record")
    return rec if isinstance(rec, dict) and head.get("snapshot") == sid and rec.get("id") == sid else None


def load(store: Store, name: str, sid: str, head: dict | None = None) -> Tip:
    """The snapshot `sid` of dataset `name`, its entries resolved through its bases."""
    return Tip(sid, *_resolve(store, name, sid, head, hops=0))


def _resolve(store: Store, name: str, sid: str | None, head: dict | None, hops: int) -> tuple[dict, dict]:
    """(a record of `sid`, its entries by sha256). Any record of an id will do: the id is the entries' hash."""
    if sid is None:
        return {}, {}  # the base of a dataset's first snapshot: nothing
    ck = (store.describe(), name, sid)
    with _cache_lock:
        if ck in _cache:
            _cache.move_to_end(ck)
            return _cache[ck]
    record, _ = store.record(key(name, sid))
    record = record or pending(head, sid)
    if record is None or hops > 64:
        raise StoreError(f"dataset {name!r}: snapshot {sid} cannot be read from {store.describe()}")
    if is_delta(record):
        out = dict(_resolve(store, name, record.get("base"), head, hops + 1)[1])
        for sha in record.get("drop", []):
            out.pop(sha, None)
        out.update((e["sha256"], e) for e in record.get("put", []))
    elif isinstance(record.get("entries"), list):
        out = {e["sha256"]: e for e in record["entries"]}
    else:
        raise StoreError(f"dataset {name!r}: snapshot {sid} in {store.describe()} is damaged (neither entries nor "
                         "a delta)")
    _remember(ck, record, out)
    return record, out


def _remember(ck: tuple, record: dict, entries: dict) -> None:
    with _cache_lock:
        _cache[ck] = (record, entries)
        _cache.move_to_end(ck)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def _base_depth(depth: int) -> int:
    return depth & (depth - 1)  # the lowest set bit cleared


def make(store: Store, name: str, sid: str, parent: Tip | None, new: list[dict], created: str) -> tuple[dict, bool]:
    """The record of snapshot `sid` holding `new`, a delta over the base its depth gives, and whether its file
    should be written full instead (a checkpoint)."""
    new_map = {e["sha256"]: e for e in new}
    if parent is None:
        depth, bases, base_map, changed = 1, [None], {}, len(new_map)
    else:
        depth = parent.depth + 1
        line = [parent.id, *parent.bases]  # ids at depths parent.depth, its base's, ... down to 0
        depths = [parent.depth]
        while depths[-1] > 0:
            depths.append(_base_depth(depths[-1]))
        k = depths.index(_base_depth(depth))
        bases = line[k:]
        base_map = parent.entries if k == 0 else _resolve(store, name, bases[0], None, hops=0)[1]
        changed = parent.changed + _difference(parent.entries, new_map)
    put = [new_map[s] for s in sorted(new_map) if base_map.get(s) != new_map[s]]
    drop = sorted(set(base_map) - set(new_map))
    record = {"format": "delta", "dataset": name, "id": sid, "parent": parent.id if parent else None,
              "created": created, "base": bases[0], "depth": depth, "bases": bases, "changed": changed,
              "images": len(new_map), "put": put, "drop": drop}
    return record, parent is None or changed >= max(CHECKPOINT_MIN, len(new_map))


def _difference(old: dict, new: dict) -> int:
    return sum(1 for s, e in new.items() if old.get(s) != e) + sum(1 for s in old if s not in new)


def write(store: Store, name: str, record: dict, entries: list[dict], full: bool) -> None:
    """The snapshot's file, after its change won the head: every entry when `full` (a checkpoint), else the
    delta. Create-only: a file with this id holds these same entries already, in one format or the other."""
    doc = record
    if full:
        doc = {"dataset": name, "id": record["id"], "parent": record["parent"], "created": record["created"],
               "entries": sorted(entries, key=lambda e: e["sha256"])}
    store.put_record(key(name, record["id"]), doc, create_only=True)
    # The record as written: after a checkpoint the next change counts its depth from there.
    _remember((store.describe(), name, record["id"]), doc, {e["sha256"]: e for e in entries})


def slim(store: Store, head_key: str, record: dict) -> None:
    """Once a large change's file is written, the head need not carry it (every reader reads the head):
    dropped by one more compare-and-swap, which may lose to a newer change that replaced it anyway."""
    if len(record["put"]) + len(record["drop"]) <= SLIM_ENTRIES:
        return
    head, tag = store.record(head_key)
    if head and head.get("snapshot") == record["id"] and head.pop("record", None) is not None:
        store.put_record(head_key, head, if_tag=tag)


def settle(store: Store, name: str, head: dict | None) -> None:
    """Write out the snapshot the head carries if its writer did not get to it (killed after winning)."""
    rec = (head or {}).get("record")
    if isinstance(rec, dict) and rec.get("id") == head.get("snapshot") and not store.exists(key(name, rec["id"])):
        store.put_record(key(name, rec["id"]), rec, create_only=True)


def referenced(record: dict) -> set[str]:
    """Every image a snapshot file (or a head's record) names: its entries, or the entries its delta puts.
    The union over a dataset's files is every image any of its snapshots holds."""
    return {e["sha256"] for e in record.get("put" if is_delta(record) else "entries", []) if isinstance(e, dict)}
