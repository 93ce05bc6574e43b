"""The promoted pointer: `promoted.json`, the version serving follows and the history of every promote and
rollback, changed by compare-and-swap (`core.cas.swap`) over any `ObjectStore`: a write conditional on the tag
that was read (an ETag on S3; on a folder a hash compared under its lock, held for the whole round), started
again from a fresh read when another writer came first. So two promoters at once never lose an update and never
leave a torn pointer.

The pointer is read in one place, `Pointer.read`, which checks its shape and raises PointerError for anything
else, so a hand-edited or damaged file is one typed error for every caller (workers, API, CLI). Promoting a
version over a damaged pointer repairs it: the damaged file is kept beside it and the history records the repair.
"""
from __future__ import annotations

import json
from typing import Callable

from core.cas import Contended, swap
from core.clock import now_iso, stamp
from core.entry import VERSION_RE
from core.objects import Conflict, ObjectStore, StoreError

POINTER = "promoted.json"


class PointerError(StoreError):
    """promoted.json exists but cannot be used: unreadable, not JSON, or not the shape Refit writes. The
    message ends with how to repair it; `problem` is what is wrong, alone."""

    def __init__(self, problem: str, unread: str | None = None):
        super().__init__(f"{problem}; promote a version to repair it (`refit promote VERSION` or POST /promote)")
        self.problem = problem
        self.unread = unread  # why the file could not even be read (its bytes are then unknown)


class Pointer:
    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def raw(self) -> tuple[bytes | None, str | None]:
        """The pointer's bytes (None when there is none) and the tag a conditional write over it needs."""
        try:
            got = self.objects.get(POINTER)
        except OSError as e:
            raise PointerError(f"{POINTER} cannot be read ({e.strerror})", unread=e.strerror) from None
        return got if got else (None, None)

    def signature(self) -> object:
        return self.objects.signature(POINTER)

    def read(self) -> dict:
        return parse(self.raw()[0])

    def problem(self, versions: Callable[[], list[str]]) -> str | None:
        """Why serving has no promoted version to follow, or None when the pointer is usable: a damaged
        pointer, an unreachable store, or a missing pointer in a store that holds versions (nothing is
        promoted without a decision)."""
        try:
            raw, _ = self.raw()
            parse(raw)
            held = versions() if raw is None else []
        except StoreError as e:
            return str(e)
        if held:
            return (f"no version is promoted ({POINTER} is missing) while the store holds "
                    f"{', '.join(held)}; promote one (`refit promote VERSION` or POST /promote)")
        return None

    def update(self, change: Callable[[dict, dict | None], dict], *, actor: str, repair: bool) -> dict:
        """Read the pointer, apply `change(state, repaired)` (which edits state and returns the event), write it
        back only over the state read (or only where there is no pointer yet); a round that lost starts again."""
        def attempt() -> dict | None:
            with self.objects.locked():  # a folder's round under its lock; nothing to hold on S3
                raw, tag, exists = None, None, True  # a pointer that cannot even be read is there
                try:
                    raw, tag = self.raw()
                    exists = raw is not None
                    state, repaired = parse(raw), None
                except PointerError as e:
                    if not repair:
                        raise PointerError(f"cannot roll back: {e.problem}, so the versions promoted before "
                                           "are unknown") from None
                    state, repaired = self._repair(e, raw, actor)
                event = change(state, repaired)
                data = json.dumps(state, indent=2, sort_keys=True).encode()
                try:
                    self.objects.put(POINTER, data, if_match=tag if exists else None, create_only=not exists)
                except Conflict:
                    return None
                return event

        try:
            return swap(attempt, what=f"{POINTER} in {self.objects.url}")
        except Contended as e:
            raise StoreError(str(e)) from None

    def _repair(self, damage: PointerError, raw: bytes | None, actor: str) -> tuple[dict, dict]:
        """A new pointer state whose first event records the repair of a damaged one; the damaged bytes are
        kept beside it first, so nothing is lost."""
        kept = f"{POINTER}.broken-{stamp()}"
        try:
            if raw is None:
                raise OSError(damage.unread)
            self.objects.put(kept, raw, create_only=True)
            where = f"the damaged file is kept as {kept}"
        except (OSError, StoreError, Conflict) as e:
            where = f"the damaged file could not be kept ({getattr(e, 'strerror', None) or e})"
            kept = None
        event = {"action": "repair", "version": None, "previous": None, "at": now_iso(), "actor": actor,
                 "reason": f"{damage.problem}; {where}", "kept_as": kept}
        return {"version": None, "history": [event]}, event


def parse(raw: bytes | None) -> dict:
    """The pointer as {"version": str | None, "history": [event, ...]}; no file is an empty one."""
    if raw is None:
        return {"version": None, "history": []}
    try:
        state = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise PointerError(f"{POINTER} is not valid JSON ({e})") from None
    problem = _shape_problem(state)
    if problem:
        raise PointerError(f"{POINTER} {problem}")
    state.setdefault("version", None)
    state.setdefault("history", [])
    return state


def promotion_stack(history: list[dict]) -> list[str]:
    """The versions promoted one after another, oldest first, replayed from the history: a promote pushes
    its version, a rollback pops back to the version it went to, a repair starts afresh. Rollback walks
    back along this stack, so repeated rollbacks never return to a version just rolled back from."""
    stack: list[str] = []
    for e in history:
        action, version = e.get("action"), e.get("version")
        if action == "repair":
            stack = []
        elif action == "rollback" and version in stack:
            while stack[-1] != version:
                stack.pop()
        elif action in ("promote", "rollback") and version and (not stack or stack[-1] != version):
            stack.append(version)  # a rollback to a version not on the stack: written before this rule
    return stack


def _shape_problem(state) -> str | None:
    """What is wrong with a parsed pointer, in words, or None when it has the shape Refit writes."""
    if not isinstance(state, dict):
        return f"holds a JSON {_json_type(state)}, not an object"
    version = state.get("version")
    if version is not None and not (isinstance(version, str) and VERSION_RE.match(version)):
        return f"names version {version!r}, not a version id like v0003"
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        return "has a history that is not a list of events"
    return None


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
