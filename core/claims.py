"""How a version becomes visible in a store without rename (S3): its number is claimed with a create-only
write of `vNNNN/.claim`, the files are uploaded, and `model.yaml`, the marker listing looks for, goes last.

A publish killed midway leaves a claimed number that is never reused and no visible version. While a publish
runs, its claim is rewritten every heartbeat (`ClaimBeat`), so the orphan sweep can tell a live publish from
one that was cut short: a claim not rewritten for the grace, without a model.yaml, is marked abandoned (a write
conditional on what was read) and its files are removed; the claim itself stays, so its number is never
handed out again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterator

from core.clock import age_seconds, now_iso, now_ms
from core.entry import ENTRIES, MODEL_YAML, VERSION_RE
from core.objects import Conflict, ObjectStore, StoreError
from core.settings import settings

CLAIM_ATTEMPTS = 50  # numbers tried one after another before a publish gives up
log = logging.getLogger("refit.store")


class ClaimedCommit:
    """Claims, uploads and sweeps over `objects`. `seen()` gives the version numbers known elsewhere (the
    replicas' status records, this machine's cache): a re-created store numbers on after them. `adopt` keeps
    the files a publish uploaded as this machine's cached copy."""

    def __init__(self, objects: ObjectStore, seen: Callable[[], set[int]], adopt: Callable[[str, Path], None],
                 entries: str = ENTRIES):
        self.objects, self.seen, self.adopt = objects, seen, adopt
        self.entries = entries  # the model line's folder: one per project (core.projects.entries)
        self._claimed = re.compile(rf"^{re.escape(entries)}v(\d{{4,}})/")
        self._beats: dict[str, ClaimBeat] = {}  # versions this process claimed and is still writing

    @contextlib.contextmanager
    def claim(self, version: str | None) -> Iterator[str]:
        """Make a version number this publish's own: the next free number (None), or exactly `version`. A
        number once claimed is never handed out again, even when the publish that claimed it died before its
        model.yaml was written. Kept fresh from a thread until the block ends."""
        note = {"at": now_ms(), "updated": now_ms(), "pid": os.getpid(), "host": os.uname().nodename}
        version, tag = self._exact(version, note) if version is not None else self._next(note)
        beat = ClaimBeat(self.objects, f"{self.entries}{version}/.claim", note, tag,
                         settings().claim_heartbeat_seconds)
        beat.start()
        self._beats[version] = beat
        try:
            yield version
        finally:
            self._beats.pop(version, None)
            beat.finish()

    def _exact(self, version: str, note: dict) -> tuple[str, str]:
        try:
            return version, self.objects.put(f"{self.entries}{version}/.claim", json.dumps(note).encode(),
                                             create_only=True)
        except Conflict:
            raise StoreError(f"{version} is already taken in {self.objects.url}") from None

    def _next(self, note: dict) -> tuple[str, str]:
        keys = self.objects.list(self.entries)
        # The listing a claim needs also shows the claims of publishes cut short: swept here, past their grace,
        # as a folder store's publish removes its partial entries.
        try:
            self._sweep_claims(keys)
        except StoreError as e:  # a bucket that refuses deletes, say: publishing still works
            log.warning("orphan claims not swept: %s", e)
        taken = {int(m.group(1)) for k in keys if (m := self._claimed.match(k))}
        n = max(taken | self.seen(), default=0) + 1
        for _ in range(CLAIM_ATTEMPTS):
            try:
                key = f"{self.entries}v{n:04d}/.claim"
                return f"v{n:04d}", self.objects.put(key, json.dumps(note).encode(), create_only=True)
            except Conflict:
                n += 1  # another publisher claimed it a moment ago
        raise StoreError(f"could not claim a version number in {self.objects.url} ({CLAIM_ATTEMPTS} tries)")

    def commit(self, version: str, folder: Path, *, move: bool) -> None:
        """Every file, model.yaml last: until it is there, the version is not listed. Just before it, one
        last conditional write of the claim: when an orphan sweep has taken the claim over (this publish
        stalled past the grace), this publish stops here instead of making a version the sweep is deleting.
        With `move` the folder becomes this machine's cached copy."""
        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == MODEL_YAML)
        try:
            for p in files:
                if p.name == MODEL_YAML and version in self._beats:
                    self._beats[version].confirm()
                self.objects.upload(f"{self.entries}{version}/{p.relative_to(folder).as_posix()}", p)
        finally:
            beat = self._beats.pop(version, None)
            if beat is not None:
                beat.finish()
        if move:
            self.adopt(version, folder)

    def sweep(self) -> list[str]:
        """What publishes cut short left in the store (best effort: logged, not raised)."""
        try:
            return [f"{self.objects.url}/{self.entries}{v}" for v in self._sweep_claims()]
        except StoreError as e:
            log.warning("orphan claims not swept: %s", e)
            return []

    def _sweep_claims(self, keys: list[str] | None = None) -> list[str]:
        """The claimed versions (from a listing of ENTRIES) a publish cut short left without a model.yaml,
        emptied but for their claim once it is past the grace; returns their ids."""
        files: dict[str, list[str]] = {}
        for k in self.objects.list(self.entries) if keys is None else keys:
            if m := self._claimed.match(k):
                files.setdefault(f"v{m.group(1)}", []).append(k)
        swept = []
        for version, found in sorted(files.items()):
            names = {k.rsplit("/", 1)[1] for k in found}
            if MODEL_YAML in names or ".claim" not in names or names == {".claim"}:
                continue  # complete, not Refit's, or nothing but the claim (kept: its number stays taken)
            note = self._abandon(f"{self.entries}{version}/.claim")
            if note is None:
                continue
            log.warning("removing %s from %s: its publish was cut short (claimed %s, last alive %s)", version,
                        self.objects.url, note.get("at"), note.get("updated"))
            for k in found:
                if not k.endswith("/.claim"):
                    self.objects.delete(k)
            swept.append(version)
        return swept

    def _abandon(self, claim: str) -> dict | None:
        """The claim's note once it is marked abandoned (by this sweep, or by one cut short before it removed
        the files); None while it is alive, or not Refit's."""
        got = self.objects.get(claim)
        note = _note(got)
        if note is None or note.get("abandoned"):
            return note  # else a sweep cut short: finish it
        if age_seconds(note.get("updated") or note.get("at")) < settings().orphan_grace_seconds:
            return None
        mark = {**note, "abandoned": now_iso(), "by": f"{os.uname().nodename}/{os.getpid()}"}
        try:  # only over the state read: a publish that beat again since then keeps its claim
            self.objects.put(claim, json.dumps(mark).encode(), if_match=got[1])
        except Conflict:
            return None
        return note


def _note(got: tuple[bytes, str] | None) -> dict | None:
    try:
        note = json.loads(got[0]) if got else None
    except ValueError:
        return None
    return note if isinstance(note, dict) else None


def seen_elsewhere(records: Callable[[], list], cached: str | None) -> set[int]:
    """Version numbers that live replicas serve or hold in their caches (their status records, rewritten at
    every heartbeat, land in a bucket re-created empty too) and that this machine's cache holds: a re-created
    store numbers on after them, instead of handing out an id some cache knows as another model."""
    seen: set[int] = set()
    try:
        held = list(records())
    except StoreError:
        held = []
    for r in [*held, {"cached": cached}]:
        for key in ("version", "cached"):
            m = VERSION_RE.match(str(r.get(key) or "")) if isinstance(r, dict) else None
            if m:
                seen.add(int(m.group(1)))
    return seen


class ClaimBeat(threading.Thread):
    """Rewrites a claim (`updated`) every few seconds while its publish runs, each write conditional on the
    last one: the orphan sweep takes a claim over only when it is older than the grace, with a write
    conditional on what it read, so of a stalled publisher and a sweep exactly one goes on."""

    def __init__(self, remote: ObjectStore, key: str, note: dict, tag: str, every: float):
        super().__init__(name=f"claim {key}", daemon=True)
        self.remote, self.key, self.note, self.tag, self.every = remote, key, note, tag, every
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            try:
                self._write()
            except StoreError as e:  # S3 away for a moment: the next beat tries again
                log.warning("%s not kept fresh: %s", self.key, e)

    def _write(self) -> None:
        with self._lock:
            if self.lost or self._done.is_set():
                return
            data = json.dumps({**self.note, "updated": now_ms()}).encode()
            try:
                self.tag = self.remote.put(self.key, data, if_match=self.tag)
            except Conflict:
                self._reread()

    def _reread(self) -> None:
        """After a failed condition: a PUT that botocore retried after it had landed fails its own condition
        too, so only the sweep's `abandoned` mark (or no claim at all) means the claim is lost; else the
        claim is still ours, and its new ETag is the one the next beat writes over."""
        got = self.remote.get(self.key)
        note = _note(got)
        if note is not None and not note.get("abandoned"):
            self.tag = got[1]
            return
        self.lost = (f"{self.key} was taken over by an orphan sweep: this publish went without a "
                     f"heartbeat for over {settings().orphan_grace_seconds:g} s; publish again")

    def confirm(self) -> None:
        """The last write before the version becomes visible; raises when the claim is not ours any more."""
        self._write()
        if self.lost:
            raise StoreError(self.lost)

    def finish(self) -> None:
        self._done.set()
