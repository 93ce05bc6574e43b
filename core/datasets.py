"""Named datasets that live in the store: immutable, content-addressed snapshots of labelled images.

    datasets/blobs/<ab>/<sha256>              an image's bytes, stored once whatever dataset holds it
    datasets/<name>/snapshots/<id>.json       a snapshot: its entries (sha256, label, split, source, ...), or
                                              a delta over an older snapshot (core.snapshots)
    datasets/<name>/head.json                 the newest snapshot and the history of changes, newest last

A snapshot's id is a hash of its entries, so the same images with the same labels are the same snapshot,
and a change that changes nothing (every image a duplicate) writes nothing and answers the snapshot there
is. Snapshots and images are written create-only and never rewritten; every change (add, relabel, remove)
makes a new snapshot and moves the head with a compare-and-swap (`Store.put_record(if_tag=...)`, core.cas). A writer
that loses the race reads the newer head and applies its change to it again, so two concurrent adds both
land; only the winner writes its snapshot's file, so the loser leaves nothing behind. The same code runs on a
folder store and on S3; this module needs no torch (the service imports it).

    from core.datasets import Datasets
    reply = Datasets(Store()).add("bees", [("a.jpg", data, "bee")], source="upload")
    Datasets(Store()).materialize("bees", reply["snapshot"], Path("/tmp/bees"))  # class folders to train on
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import unicodedata
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable

from core import snapshots
from core.cas import Contended, swap
from core.contract import Contract
from core.data import DatasetError, class_root, dataset_root, safe_extract_zip
from core.dataset_sweep import freshen
from core.labels import MAX_CHARS, RESERVED, label_problem
from core.manifest import read_manifest
from core.preprocess import MAX_PIXELS, ImageError, load_image
from core.scratch import run_folder
from core.store import Store, StoreError, now_iso

log = logging.getLogger("refit.datasets")

ROOT = "datasets"
BLOBS = f"{ROOT}/blobs"
SPLITS = ("train", "val")
SOURCES = ("upload", "zip", "cli", "feedback", "retrain")
MANIFEST = "labels.csv"  # a multi-label snapshot written out to train on (core.manifest reads it)
DEFAULT_MAX_FILE_BYTES = 50 << 20  # one image file, where the caller (the CLI) sets no limit of its own
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SNAPSHOT_RE = re.compile(r"^[0-9a-f]{16}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
RESERVED_NAMES = {"blobs"}
RESERVED_LABELS = RESERVED  # labels that are folder names the dataset reader reads (core.labels)
MAX_LABEL = MAX_CHARS
MAX_HISTORY = 1000  # changes listed in a dataset's head (show), newest last
# Decoding for the check uses the JPEG reduced-scale path serving uses: every byte is still decoded, so a
# truncated file fails, at a fraction of the cost of a full-size decode.
_CHECK = Contract()
# Suffixes the dataset reader recognises, by the format Pillow detected.
_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp",
           "TIFF": ".tif"}


def entry_labels(entry: dict) -> tuple[str, ...]:
    """An entry's labels: a multi-label entry's `labels` (sorted; empty: none of them), else its one `label`."""
    return tuple(entry["labels"]) if "labels" in entry else (entry["label"],)


def _labelled(entry: dict, label) -> dict:
    """`entry` with `label` (a string: one class) or `labels` (a list: a multi-label entry), the other dropped."""
    out = {k: v for k, v in entry.items() if k not in ("label", "labels")}
    return {**out, "label": label} if isinstance(label, str) else {**out, "labels": list(label)}


def _label_of(entry: dict):
    """What `_labelled` takes back: the entry's one label, or its list of labels."""
    return list(entry["labels"]) if "labels" in entry else entry["label"]


def _shown(entry: dict) -> str:
    labels = entry_labels(entry)
    return ("labelled " + ", ".join(map(repr, labels))) if labels else "with none of the labels"


def _stored_spellings(entries: list[dict]) -> dict[str, str]:
    """{NFC spelling: stored spelling} of the classes stored before labels were NFC (`cafe` + U+0301 from a
    macOS zip): a label given in NFC joins that class as it is spelt, so the dataset keeps one class. Stored
    labels are never rewritten: that would change the ids of the snapshots that hold them."""
    labels = {label for e in entries for label in entry_labels(e)}
    spelt = {unicodedata.normalize("NFC", label): label for label in labels}
    return {nfc: label for nfc, label in spelt.items() if nfc not in labels}  # an NFC class is itself


class UnknownDataset(DatasetError):
    """A dataset, snapshot or image that does not exist (HTTP 404); the message names it."""


class MixedKinds(DatasetError):
    """Single-label entries for a multi-label dataset, or the other way round (HTTP 422); the message names the
    dataset's kind and what to send instead."""


KINDS = ("single_label", "multi_label")


def kind_of(entries: Iterable[dict]) -> str | None:
    """A dataset's kind by its entries: multi_label when one carries a list of labels, single_label when each
    has its one class, None for no entries."""
    kinds = {"multi_label" if "labels" in e else "single_label" for e in entries}
    return "multi_label" if "multi_label" in kinds else kinds.pop() if kinds else None


def check_kind(name: str, have: str | None, adding: str | None) -> None:
    """MixedKinds when entries of kind `adding` would join a dataset of the other kind: a photo with several
    labels (or none) in a single-label dataset would quietly make its next version multi-label, and one class
    per photo in a multi-label one says nothing of its other labels."""
    if have is None or adding is None or have == adding:
        return
    if have == "multi_label":
        raise MixedKinds(f"dataset {name!r} is multi-label (its images carry lists of labels); these images come "
                         "with one class each (`label`, or class folders): send them with `labels` (a labels.csv "
                         "in a .zip, `--labels` in the CLI), or add them to another dataset")
    raise MixedKinds(f"dataset {name!r} is single-label (each image has one class); these images come with a "
                     "list of labels (`labels`, or a labels.csv with a row of none or several labels): send one "
                     "class per image with `label`, or add them to another dataset")


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED_NAMES:
        raise DatasetError(f"dataset name {str(name)[:80]!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                           f"or '-', starting with a letter or digit (not {', '.join(sorted(RESERVED_NAMES))})")
    return name


def check_label(label) -> str:
    """The label as stored (trimmed, NFC), or a DatasetError saying what is wrong (core.labels)."""
    problem, label = label_problem(label)
    if problem:
        raise DatasetError(problem)
    return label


def check_labels(labels) -> list[str]:
    """A multi-label entry's labels as stored: each by the label rule (core.labels) and without ';' (which
    joins labels in a manifest, labels.csv), each once, sorted. An empty list: none of the labels."""
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise DatasetError("labels: send a list of labels (an empty list: none of them)")
    out = set()
    for label in labels:
        label = check_label(label)
        if ";" in label:
            raise DatasetError(f"label {label[:80]!r} is not allowed with several labels: ';' joins labels in "
                               "labels.csv")
        out.add(label)
    return sorted(out)


def checked(label):
    """One label (a string) or several (a list), as stored; DatasetError when one is not allowed."""
    return check_label(label) if isinstance(label, str) else check_labels(label)


def check_snapshot(snapshot) -> str:
    if not isinstance(snapshot, str) or not SNAPSHOT_RE.match(snapshot):
        raise DatasetError(f"snapshot {str(snapshot)[:80]!r} is not a snapshot id (16 hex digits, as "
                           "`refit dataset show NAME` lists them)")
    return snapshot


def snapshot_id(entries: list[dict]) -> str:
    """The hash of a snapshot's canonical content: its entries, sorted, as canonical JSON."""
    canon = json.dumps(sorted(entries, key=lambda e: e["sha256"]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def blob_key(sha256: str) -> str:
    return f"{BLOBS}/{sha256[:2]}/{sha256}"


class Datasets:
    """Every dataset of one store. The service, the CLI and training call these same methods."""

    def __init__(self, store: Store):
        self.store = store

    # -- images ----------------------------------------------------------------------------------
    def has_image(self, sha256: str) -> bool:
        return bool(SHA256_RE.match(sha256 or "")) and self.store.exists(blob_key(sha256))

    def put_blob(self, data: bytes) -> str:
        """Store an image's bytes under their sha256, only when they are not there yet; returns the hash."""
        sha = hashlib.sha256(data).hexdigest()
        if not freshen(self.store, blob_key(sha), data):  # stored already: made recent for the sweep's grace
            self.store.put_bytes(blob_key(sha), data, create_only=True)  # False: another writer was first
        return sha

    # -- reading ---------------------------------------------------------------------------------
    def _head(self, name: str) -> tuple[dict | None, str | None]:
        return self.store.record(f"{ROOT}/{check_name(name)}/head.json")

    def list(self) -> list[dict]:
        """Every dataset with its newest snapshot, image and class counts."""
        out = []
        for name in self.store.folders(ROOT):
            if name in RESERVED_NAMES or not NAME_RE.match(name):
                continue
            head, _ = self._head(name)
            if not head:
                continue
            last = head["history"][-1] if head.get("history") else {}
            out.append({"dataset": name, "snapshot": head["snapshot"], "images": last.get("images"),
                        "classes": last.get("classes"), "updated": head.get("updated")})
        return out

    def kind(self, name: str) -> str | None:
        """The dataset's kind (kind_of its newest snapshot), None when it does not exist yet."""
        head, _ = self._head(name)
        return kind_of(self.manifest(name, head["snapshot"])["entries"]) if head else None

    def resolve(self, name: str, snapshot: str | None = None) -> str:
        """The snapshot id to use: `snapshot` once it is known to exist in `name`, else the newest one."""
        return self._resolve(name, snapshot)[0]

    def _resolve(self, name: str, snapshot: str | None) -> tuple[str, dict]:
        head, _ = self._head(name)
        if not head:
            known = ", ".join(d["dataset"] for d in self.list()) or "none"
            raise UnknownDataset(f"no dataset {name!r}; datasets: {known}")
        if snapshot is None:
            return head["snapshot"], head
        check_snapshot(snapshot)
        if not (snapshots.pending(head, snapshot) or self.store.exists(snapshots.key(name, snapshot))):
            recent = ", ".join(h["snapshot"] for h in reversed(head.get("history", [])[-5:]))
            raise UnknownDataset(f"dataset {name!r} has no snapshot {snapshot!r}; its newest: {recent}")
        return snapshot, head

    def manifest(self, name: str, snapshot: str | None = None) -> dict:
        """The snapshot document: {dataset, id, parent, created, entries: [...]}, whether its file is a full
        snapshot or a delta (core.snapshots)."""
        sid, head = self._resolve(name, snapshot)
        return snapshots.load(self.store, name, sid, head).doc()

    def show(self, name: str) -> dict:
        """Classes with their counts (per split hint too) in the newest snapshot, and the snapshots, newest
        first, with what made each."""
        head, _ = self._head(name)
        if not head:
            self.resolve(name)  # raises UnknownDataset with the known names
        doc = self.manifest(name, head["snapshot"])
        classes = Counter(label for e in doc["entries"] for label in entry_labels(e))
        splits = Counter(e.get("split") or "none" for e in doc["entries"])
        # A multi-label dataset (images with lists of labels; kind_of): its classes count positives.
        several = {"task": "multi_label", "negatives": sum(not entry_labels(e) for e in doc["entries"])} if (
            kind_of(doc["entries"]) == "multi_label") else {}
        return {"dataset": name, "snapshot": head["snapshot"], "images": len(doc["entries"]),
                "classes": dict(sorted(classes.items())), "splits": dict(sorted(splits.items())), **several,
                "snapshots": list(reversed(head.get("history", [])))}

    # -- changing ----------------------------------------------------------------------------------
    def _change(self, name: str, change: Callable[[list[dict]], tuple[list[dict], dict]], *, action: str,
                create: bool = False) -> dict:
        """Apply `change(entries) -> (new entries, facts)` to the newest snapshot and move the head to the result
        by compare-and-swap (core.cas), the new snapshot's record in it; on losing the race, start again from the
        newer head. Only the winner writes the snapshot's file (core.snapshots), so a loser leaves nothing.
        Returns {"dataset", "snapshot", "parent", "changed", **facts}."""
        check_name(name)
        try:
            return swap(lambda: self._change_once(name, change, action, create),
                        what=f"dataset {name!r}: the head")
        except Contended as e:
            raise StoreError(str(e)) from None

    def _change_once(self, name: str, change: Callable, action: str, create: bool) -> dict | None:
        """One round of `_change`: its reply, or None when another writer moved the head first."""
        head_key = f"{ROOT}/{name}/head.json"
        head, tag = self.store.record(head_key)
        if head is None and tag is not None:
            raise StoreError(f"{self.store.describe()}/{head_key} is damaged (not JSON); it was not changed")
        if head is None and not create:
            self.resolve(name)  # raises UnknownDataset
        parent = head["snapshot"] if head else None
        snapshots.settle(self.store, name, head)  # a winner killed before it wrote its snapshot's file
        tip = snapshots.load(self.store, name, parent, head) if parent else None
        new, facts = change([dict(e) for e in tip.entries.values()] if tip else [])
        if new is None or (parent and snapshot_id(new) == parent) or (not new and not parent):
            return {"dataset": name, "snapshot": parent, "parent": parent, "changed": False, **facts}
        sid = snapshot_id(new)
        record, full = snapshots.make(self.store, name, sid, tip, new, now_iso())
        labels = {label for e in new for label in entry_labels(e)}
        event = {"snapshot": sid, "parent": parent, "action": action, "at": record["created"],
                 "images": len(new), "classes": len(labels),
                 **{k: len(v) if isinstance(v, list) else v for k, v in facts.items()}}
        # The head keeps the newest MAX_HISTORY changes, so its size (rewritten by every change) stays
        # bounded; older snapshots stay in the store, reachable through each snapshot's `parent`.
        history = ((head or {}).get("history", []) + [event])[-MAX_HISTORY:]
        state = {"dataset": name, "snapshot": sid, "updated": event["at"], "history": history, "record": record}
        if not self.store.put_record(head_key, state, if_tag=tag, create_only=tag is None):
            return None
        try:
            snapshots.write(self.store, name, record, new, full)
            snapshots.slim(self.store, head_key, record)
        except StoreError as e:  # the change landed; the head carries its record and the next settle
            # (any writer's) writes the file: not an error to the caller
            log.warning("dataset %r: snapshot %s is the head, its file not written yet: %s", name, sid, e)
        return {"dataset": name, "snapshot": sid, "parent": parent, "changed": True, **facts}

    def add(self, name: str, items: Iterable[tuple], *, source: str, replace: bool = False,
            max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS, kind: str | None = None,
            refused: Iterable[dict] = ()) -> dict:
        """Add images to a dataset (created by its first add). `items` are (filename, bytes, label) or
        (filename, bytes, label, split) with split "train", "val" or None; a label is a class name, or a list
        of them for an image with several labels (an empty list: none of them; a multi-label entry). Each
        image is decoded first; what is not an image, is corrupt or is over a limit is refused by name, and
        an image the dataset already holds (same bytes) is skipped. With `replace` the new snapshot holds
        only these images (a retrain upload: what it trains on is exactly what was sent). `kind`
        (single_label | multi_label: the kind of entries these items are) refuses them with MixedKinds when
        the dataset holds the other kind, before any image is read; `refused` are refusals the caller found
        (files a manifest does not list). Returns {"dataset", "snapshot", "added", "skipped", "refused"};
        "snapshot" is the unchanged newest one when nothing was added."""
        check_name(name)
        if source not in SOURCES:
            raise DatasetError(f"source {source!r} is not one of {', '.join(SOURCES)}")
        if kind not in (None, *KINDS):
            raise DatasetError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        kind = None if replace else kind  # a replace keeps nothing of what the dataset held
        check_kind(name, self.kind(name) if kind else None, kind)
        accepted, refused = [], list(refused)
        for item in items:
            filename, data, label = item[0], item[1], item[2]
            split = item[3] if len(item) > 3 else None
            problem, fmt = _problem(filename, data, label, split, max_file_bytes, max_pixels)
            if problem:
                refused.append({"name": filename, "error": problem})
                continue
            sha = self.put_blob(data)
            accepted.append(_labelled({"name": filename, "sha256": sha, "split": split, "format": fmt},
                                      checked(label)))
        if not accepted:  # nothing to add (and a replace by nothing would empty the dataset)
            head, _ = self.store.record(f"{ROOT}/{name}/head.json")
            return {"dataset": name, "snapshot": head["snapshot"] if head else None, "added": [], "skipped": [],
                    "refused": refused}
        change = _adding(name, accepted, refused, source=source, replace=replace, kind=kind)
        out = self._change(name, change, action="replace" if replace else "add", create=True)
        return {k: out[k] for k in ("dataset", "snapshot", "added", "skipped", "refused")}

    def add_zip(self, name: str, zip_file: Path | str | bytes | BinaryIO, *, source: str = "zip",
                replace: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                max_pixels: int = MAX_PIXELS) -> dict:
        """Add a .zip (a path, its bytes, or an open binary file) of class folders, optionally under train/
        and val/ (which become split hints), or of images with a labels.csv manifest (add_folder). The archive
        passes the training reader's checks (core.data.safe_extract_zip)."""
        # A folder locked for as long as this process lives: a sweep at start removes it once the process is
        # gone, however it died (core.dataset_sweep), and never while it is in use.
        with run_folder(self.store.home, "refit-dataset") as tmp:
            path = Path(tmp) / "upload.zip"
            if isinstance(zip_file, bytes):
                path.write_bytes(zip_file)
            elif hasattr(zip_file, "read"):
                with open(path, "wb") as f:
                    shutil.copyfileobj(zip_file, f, 1 << 20)
            else:
                path = Path(zip_file)
            folder = safe_extract_zip(path, Path(tmp) / "unpacked")
            try:
                return self.add_folder(name, folder, source=source, replace=replace,
                                       max_file_bytes=max_file_bytes, max_pixels=max_pixels)
            except DatasetError as e:  # a manifest's messages name its path: in the archive, not this folder
                raise type(e)(str(e).replace(f"{folder}{os.sep}", "")) from None

    def add_folder(self, name: str, folder: Path, *, source: str = "cli", label: str | list | None = None,
                   replace: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                   max_pixels: int = MAX_PIXELS) -> dict:
        """A folder of class folders (optionally under train/ and val/); a dataset with a labels.csv manifest
        at its root (core.manifest's reader, so its checks and messages are training's: its `split` gives the
        split hints, a row with no labels is an image with none of them); or, with `label` (a class, or a list
        of labels), a folder of images that all have it. A manifest with one label on every row adds
        single-label entries, unless the dataset is multi-label; any row of none or several labels makes them
        multi-label. Either way a dataset keeps one kind (MixedKinds)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: not a folder")
        root = dataset_root(folder)
        refused: list[dict] = []
        if (root / MANIFEST).is_file():
            if label is not None:
                raise DatasetError(f"{root / MANIFEST} names each image's labels: leave the label out, or add "
                                   "a folder without labels.csv")
            multi = not replace and self.kind(name) == "multi_label"
            items, kind, refused = _manifest_items(root, multi)
        else:
            items = _folder_items(folder, label)
            kind = "multi_label" if isinstance(label, list) else "single_label"
        return self.add(name, items, source=source, replace=replace, max_file_bytes=max_file_bytes,
                        max_pixels=max_pixels, kind=kind, refused=refused)

    def relabel(self, name: str, sha256: str, label, *, same_kind: bool = False) -> dict:
        """A new snapshot in which the image has `label` (a list: these labels, a multi-label entry); the old
        snapshot stays as it was. With `same_kind`, a label of the kind the dataset's other images do not have
        is refused (MixedKinds)."""
        label = checked(label)

        def change(entries):
            i = _find(name, entries, sha256)
            if same_kind:
                check_kind(name, kind_of(entries[:i] + entries[i + 1:]),
                           "single_label" if isinstance(label, str) else "multi_label")
            old = _label_of(entries[i])
            as_stored = _respelt(label, _stored_spellings(entries[:i] + entries[i + 1:]))
            new = list(entries)
            new[i] = _labelled(entries[i], as_stored)
            key, was = ("label" if isinstance(as_stored, str) else "labels"), (
                "previous_label" if isinstance(old, str) else "previous_labels")
            return new, {"sha256": sha256, key: as_stored, was: old}

        return self._change(name, change, action="relabel")

    def remove(self, name: str, sha256: str) -> dict:
        """A new snapshot without the image; the old snapshot (and the image's bytes) stay."""

        def change(entries):
            i = _find(name, entries, sha256)
            return entries[:i] + entries[i + 1:], {"sha256": sha256, "removed": _label_of(entries[i])}

        return self._change(name, change, action="remove")

    # -- training ----------------------------------------------------------------------------------
    def materialize(self, name: str, snapshot: str | None, dest: Path) -> Path:
        """Write the snapshot as a dataset folder for `training.pipeline.train`: class folders, under train/
        and val/ when the split hints give every class images in both (images without a hint go to train/);
        otherwise flat class folders, split by the training request's seed. A snapshot with a multi-label
        entry is written as a manifest instead (`labels.csv` beside the images, core.manifest's layout).
        Files are named by their hash."""
        doc = self.manifest(name, snapshot)
        entries = doc["entries"]
        if not entries:
            raise DatasetError(f"dataset {name!r} snapshot {doc['id']} holds no images")
        labels = {label for e in entries for label in entry_labels(e)}
        for label in sorted(labels):  # a label stored before the rule (core.labels) was what it is now
            problem, _ = label_problem(label)
            if problem:
                raise DatasetError(f"dataset {name!r} snapshot {doc['id']} cannot be trained on: {problem}; "
                                   f"relabel its images (POST /datasets/{name}/images/SHA256)")
        val = {label for e in entries if e.get("split") == "val" for label in entry_labels(e)}
        train = {label for e in entries if e.get("split") != "val" for label in entry_labels(e)}
        use_split = bool(val) and val == labels and train == labels
        dest = Path(dest)
        several = any("labels" in e for e in entries)

        def target(e: dict) -> Path:
            file = f"{e['sha256'][:20]}{_SUFFIX.get(e.get('format'), '.jpg')}"
            if several:
                return dest / "images" / file
            part = ("val" if e.get("split") == "val" else "train") if use_split else ""
            return dest / part / e["label"] / file

        jobs = [(blob_key(e["sha256"]), target(e)) for e in entries]
        for _, path in jobs:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:  # hard links in a folder store (the run only reads them), a few downloads at a time from S3
            self.store.objects.download_all(jobs)
        except FileNotFoundError as e:
            sha = str(e.args[0] if e.args else e).rsplit("/", 1)[-1]
            raise StoreError(f"dataset {name!r}: image {sha} is missing from {self.store.describe()}") from None
        if several:
            # The hints are the split only when every image has one and every label is in both parts.
            hinted = use_split and all(e.get("split") in SPLITS for e in entries)
            _write_manifest(dest, [(path.relative_to(dest).as_posix(), entry_labels(e), e.get("split"))
                                   for e, (_, path) in zip(entries, jobs, strict=True)], hinted)
        return dest


def _adding(name: str, accepted: list[dict], refused: list[dict], *, source: str, replace: bool,
            kind: str | None) -> Callable[[list[dict]], tuple[list[dict] | None, dict]]:
    """The change (for `Datasets._change`) that adds the `accepted` images to the entries it is given. The kind
    is checked again on those entries: another writer may have changed the dataset since `add` looked."""
    stamp = now_iso()

    def change(entries: list[dict]):
        check_kind(name, kind_of(entries) if kind else None, kind)
        have = {} if replace else {e["sha256"]: e for e in entries}
        added, skipped, new = [], [], [] if replace else list(entries)
        spelled = {} if replace else _stored_spellings(entries)
        for a in accepted:
            a = _labelled(a, _respelt(_label_of(a), spelled))
            if a["sha256"] in have:
                was = have[a["sha256"]]
                why = (f"duplicate of {was['name']!r} already in {name!r}, {_shown(was)}"
                       + ("" if entry_labels(was) == entry_labels(a) else "; relabel it to change its label"))
                skipped.append({"name": a["name"], "sha256": a["sha256"], "reason": why})
                continue
            entry = _labelled({"sha256": a["sha256"], "split": a["split"], "source": source, "added_at": stamp,
                               "name": PurePosixPath(a["name"]).name, "format": a["format"]}, _label_of(a))
            if replace:  # an image that was in the dataset keeps its first record
                entry = _labelled(next((e for e in entries if e["sha256"] == a["sha256"]), entry),
                                  _label_of(a)) | {"split": a["split"]}
            have[a["sha256"]] = entry
            new.append(entry)
            added.append(_labelled({"name": a["name"], "sha256": a["sha256"]}, _label_of(a)))
        return (new if added or replace else None), {"added": added, "skipped": skipped,
                                                      "refused": refused, "source": source}

    return change


def _write_manifest(dest: Path, rows: list[tuple[str, tuple[str, ...], str | None]], with_split: bool) -> None:
    """`labels.csv` at `dest`: image, its labels joined by ';' (empty: none of them), and the split when given."""
    import csv

    with open(dest / MANIFEST, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels", "split"] if with_split else ["image", "labels"])
        for image, labels, split in rows:
            w.writerow([image, ";".join(labels), split] if with_split else [image, ";".join(labels)])


def _problem(filename: str, data: bytes, label, split, max_bytes: int, max_pixels: int
             ) -> tuple[str | None, str | None]:
    """(why this item cannot be added, None), or (None, the image format Pillow detected)."""
    try:
        checked(label)
    except DatasetError as e:
        return str(e), None
    if split not in (None, *SPLITS):
        return f"split {split!r} is not one of train, val (or none)", None
    if not isinstance(data, bytes) or not data:
        return "empty file", None
    if len(data) > max_bytes:
        return f"{len(data)} bytes is over the limit of {max_bytes} bytes per image", None
    try:
        load_image(data, _CHECK, max_pixels=max_pixels, name=filename)
    except ImageError as e:
        return str(e).removeprefix(f"{filename}: "), None
    from PIL import Image

    return None, Image.open(io.BytesIO(data)).format


def _respelt(label, spelled: dict[str, str]):
    """A label, or a list of them, as the dataset already spells each (`_stored_spellings`)."""
    if isinstance(label, str):
        return spelled.get(label, label)
    return sorted(spelled.get(x, x) for x in label)


def _find(name: str, entries: list[dict], sha256: str) -> int:
    i = next((i for i, e in enumerate(entries) if e["sha256"] == sha256), None)
    if i is None:
        raise UnknownDataset(f"dataset {name!r} has no image {str(sha256)[:80]!r} in its newest snapshot")
    return i


def _manifest_items(root: Path, multi: bool) -> tuple[Iterable[tuple], str, list[dict]]:
    """(filename, bytes, labels, split) for every row of `root/labels.csv`, checked by core.manifest first; the
    kind of entries they make (multi-label when `multi`, the dataset's kind, or when the rows say so); and the
    files under the root it does not list, refused by name: an image left out is not quietly dropped."""
    m = read_manifest(root)
    multi = multi or m.task() == "multi_label"
    listed = {r.path.resolve() for r in m.rows}
    refused = [{"name": p.relative_to(root).as_posix(),
                "error": f"not listed in {MANIFEST}, so not added (an image with none of the labels is a row "
                         "with an empty labels field)"}
               for p in sorted(q for q in root.rglob("*") if q.is_file() and not _hidden(q, root))
               if p != root / MANIFEST and p.resolve() not in listed]
    items = ((r.path.relative_to(root).as_posix(), r.path.read_bytes(), list(r.labels) if multi else r.labels[0],
              r.split) for r in m.rows)
    return items, "multi_label" if multi else "single_label", refused


def _folder_items(folder: Path, label: str | None):
    """(filename, bytes, label, split) for every file: class folders, optionally under train/ and val/, or
    with `label` every file of the folder. Files outside a class folder come with no label (refused)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    if label is not None:
        for p in sorted(q for q in folder.rglob("*") if q.is_file() and not _hidden(q, folder)):
            yield p.relative_to(folder).as_posix(), p.read_bytes(), label
        return
    root = class_root(folder)
    parts = [(root / s, s) for s in SPLITS if (root / s).is_dir()] or [(root, None)]
    found = False
    for base, split in parts:
        for p in sorted(q for q in base.rglob("*") if q.is_file() and not _hidden(q, root)):
            rel = p.relative_to(base)
            found = True
            yield (p.relative_to(root).as_posix(), p.read_bytes(),
                   rel.parts[0] if len(rel.parts) > 1 else None, split)
    if not found:
        raise DatasetError(f"{folder.name}: no files found; expected one folder per class with images inside")


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)
