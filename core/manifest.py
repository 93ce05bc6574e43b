"""labels.csv: a dataset's labels as a table beside its images, for photos with several labels or none (a
multi-label dataset), and for single-label photos not sorted into class folders.

    image,labels,split
    images/0001.jpg,cat;dog,train
    images/0002.jpg,,val

`image` is a path relative to the folder holding labels.csv; `labels` holds label names joined by ';' (each
trimmed of spaces, its case kept, under the one label rule of core.labels), empty for an image with none of
them (a negative); `split` (train or val), when the column is there, is used as given. Every problem is a
DatasetError naming the rows by line number and image.

numpy only: core.data imports this module where it reads a dataset (this module raises core.data's error).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from core.data import Dataset, DatasetError
from core.labels import RULE, label_problem
from core.preprocess import IMAGE_SUFFIXES

MANIFEST = "labels.csv"
COLUMNS = ("image", "labels", "split")  # the first two required
SEPARATOR = ";"
SPLITS = ("train", "val")
TASKS = ("single_label", "multi_label")
SHOWN = 10  # rows named in one message; the rest are counted
MIN_TRAIN, MIN_VAL = 2, 1  # positives a label needs on each side of the split
LABEL_KIND = "a label name that is not allowed"


@dataclass(frozen=True)
class Row:
    line: int  # where the record starts in labels.csv (line 1 is the header)
    image: str  # as written (trimmed)
    path: Path  # root / image
    labels: tuple[str, ...]  # sorted, each once; () = a negative
    split: str | None  # "train" | "val", or None without a split column

    def where(self) -> str:
        return _where(self.line, self.image)


def _where(line: int, image: str) -> str:
    """How a message names a row: its line and image, the image shortened and escaped when it must be."""
    shown = image if len(image) <= 100 else image[:97] + "..."
    return f"line {line} ({shown if shown.isprintable() else repr(shown)[1:-1]})" if image else f"line {line}"


@dataclass
class Manifest:
    root: Path
    rows: list[Row]
    has_split: bool

    @property
    def labels(self) -> list[str]:
        return sorted({name for r in self.rows for name in r.labels})

    def task(self) -> str:
        """What the data says: one label on every row is single-label, else multi-label."""
        return "single_label" if all(len(r.labels) == 1 for r in self.rows) else "multi_label"


def listing(items: list[str]) -> str:
    """The first SHOWN items, then how many more: a message stays readable on a manifest of 100 000 rows."""
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def read_manifest(root: Path) -> Manifest:
    """Parse and check `root/labels.csv`: its text, header, fields, paths, label names and split values. All
    problems of a kind are reported together, each kind naming its rows."""
    name = root / MANIFEST
    records = _records(_text(name), name)
    header = next(records, None)
    if header is None:
        raise DatasetError(f"{name}: empty; the first line must be the header image,labels[,split]")
    columns = _header(name, header[1])
    rows, problems = [], _Problems()
    for line, fields in records:
        if not any(f.strip() for f in fields):
            continue  # a blank line, or a row of empty cells as spreadsheets write at the end
        image = fields[columns["image"]].strip() if columns["image"] < len(fields) else ""
        where = _where(line, image)
        if len(fields) != len(columns):
            problems.add(f"{'more' if len(fields) > len(columns) else 'fewer'} fields than the header's "
                         f"{len(columns)} ({','.join(columns)})", f"{where}: {len(fields)} fields")
            continue
        row = _row(root, line, image, fields, columns, problems)
        if row is not None:
            rows.append(row)
    _check_paths(root, rows, problems)
    problems.raise_for(name, f". The label rule: {RULE}" if LABEL_KIND in problems.kinds else "")
    if not rows:
        raise DatasetError(f"{name}: no rows; list one image per line under the header image,labels[,split]")
    return Manifest(root, rows, "split" in columns)


class _Problems:
    """Rows grouped by what is wrong with them, for one message."""

    def __init__(self):
        self.kinds: dict[str, list[str]] = {}

    def add(self, what: str, where: str) -> None:
        self.kinds.setdefault(what, []).append(where)

    def raise_for(self, name: Path, advice: str = "") -> None:
        if self.kinds:
            parts = [f"{what} in {len(w)} row{'s' if len(w) > 1 else ''}: {listing(w)}"
                     for what, w in self.kinds.items()]
            raise DatasetError(f"{name}: " + "; ".join(parts) + advice)


def _text(name: Path) -> str:
    raw = name.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # the byte-order mark spreadsheets put before "CSV UTF-8"
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetError(f"{name}: line {line} is not UTF-8 text (byte {e.start}: {e.reason}); save the file "
                           "as UTF-8 (\"CSV UTF-8\" in a spreadsheet)") from None


def _records(text: str, name: Path):
    """(the line a record starts on, its fields): a quoted field may span lines, so csv counts them."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DatasetError(f"{name}: line {start} is not valid CSV ({e})") from None
        yield start, fields
        start = reader.line_num + 1


def _header(name: Path, fields: list[str]) -> dict[str, int]:
    """Column name -> index. Unknown columns are refused: a misspelt `split` would otherwise be ignored."""
    names = [f.strip().lower() for f in fields]
    missing = [c for c in COLUMNS[:2] if c not in names]
    unknown = [f for f, n in zip(fields, names, strict=True) if n not in COLUMNS]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if missing or unknown or repeated:
        why = "; ".join(s for s in (missing and f"missing {', '.join(missing)}",
                                    unknown and f"unknown {', '.join(map(repr, unknown))}",
                                    repeated and f"repeated {', '.join(repeated)}") if s)
        raise DatasetError(f"{name}: line 1 must be the header image,labels[,split] ({why}); found "
                           f"{','.join(fields)!r}")
    return {n: i for i, n in enumerate(names)}


def _row(root: Path, line: int, image: str, fields: list[str], columns: dict[str, int],
         problems: _Problems) -> Row | None:
    """One record as a Row, or None with its problems added."""
    where = _where(line, image)
    bad = []
    labels, why = parse_labels(fields[columns["labels"]])
    if why:
        bad.append((LABEL_KIND, f"{where}: {why}"))
    split = None
    if "split" in columns:
        given = fields[columns["split"]]
        split = given.strip().lower()
        if split not in SPLITS:
            bad.append(("an unknown split (train or val)" if split else
                        "no split (with a split column every row needs train or val)", f"{where}: {given!r}"))
    rel = image.replace("\\", "/")  # a path written on Windows
    if not rel:
        bad.append(("no image path", where))
    elif rel.startswith("/") or (len(rel) > 1 and rel[1] == ":") or ".." in PurePosixPath(rel).parts:
        bad.append(("an image outside the dataset (paths are relative to the folder of labels.csv, without "
                    "'..')", where))
    for what, detail in bad:
        problems.add(what, detail)
    return None if bad else Row(line, image, root / PurePosixPath(rel), labels, split)


def parse_labels(text: str) -> tuple[tuple[str, ...], str | None]:
    """(the sorted label names of a `labels` field, why it is not allowed or None). Empty = a negative."""
    if not text.strip():
        return (), None
    names = set()
    for part in text.split(SEPARATOR):
        if not part.strip():
            return (), f"an empty label name in {text!r} (labels are joined by a single '{SEPARATOR}')"
        problem, label = label_problem(part)
        if problem:
            return (), problem.removesuffix("; " + RULE)
        names.add(label)
    return tuple(sorted(names)), None


def _check_paths(root: Path, rows: list[Row], problems: _Problems) -> None:
    """Every image exists, is a file inside the root once symlinks are followed, and is listed once."""
    top = root.resolve()
    seen: dict[Path, Row] = {}
    for r in rows:
        try:
            real = r.path.resolve()
            inside = real.is_relative_to(top)
            found = inside and r.path.is_file()
        # A symlink loop (RuntimeError before Python 3.13), a name over the OS's limit, a NUL in the path: the
        # row's fault, reported as a missing image.
        except (OSError, RuntimeError, ValueError):
            real, inside, found = None, True, False
        if not inside:
            problems.add("an image outside the dataset (a symbolic link leads out of it)", r.where())
        elif not found:
            problems.add("an image that does not exist (or is not a file)", r.where())
        elif real in seen:
            problems.add("an image listed before", f"{r.where()} repeats line {seen[real].line}")
        else:
            seen[real] = r


def check_task(task: str | None) -> None:
    if task not in (None, *TASKS):
        raise DatasetError(f"unknown task {task!r}: expected {' or '.join(TASKS)} (or none: what the data says)")


def resolve_task(manifest: Manifest, forced: str | None) -> str:
    """`forced`, else what the data says. single_label needs exactly one label on every row; multi_label takes
    any manifest (a row of one label is an image with that one label)."""
    check_task(forced)
    if forced == "single_label":
        odd = [f"{r.where()}: {len(r.labels)} labels" for r in manifest.rows if len(r.labels) != 1]
        if odd:
            raise DatasetError(f"{manifest.root / MANIFEST}: task single_label needs exactly one label on every "
                               f"row; {len(odd)} row{'s' if len(odd) > 1 else ''} have none or several: "
                               f"{listing(odd)}. Leave the task unset (or multi_label) to train a multi-label "
                               "classifier.")
    return forced or manifest.task()


def check_positives(name: Path, labels: list[str], train: list[Row], val: list[Row]) -> None:
    """Every label has MIN_TRAIN positive images in train and MIN_VAL in val: a label learnt from one image, or
    never validated, gets a threshold and figures that mean nothing."""
    def count(rows):
        return {label: sum(label in r.labels for r in rows) for label in labels}
    tr, va = count(train), count(val)
    short = [label for label in labels if tr[label] < MIN_TRAIN or va[label] < MIN_VAL]
    if not short:
        return
    parts = []
    for label in short[:SHOWN]:
        rows = [r.where() for r in train + val if label in r.labels]
        parts.append(f"{label!r} has {tr[label]} in train and {va[label]} in val"
                     + (f" ({listing(rows)})" if rows else " (no usable image)"))
    more = f" and {len(short) - SHOWN} more labels" if len(short) > SHOWN else ""
    raise DatasetError(f"{name}: every label needs at least {MIN_TRAIN} positive images in train and {MIN_VAL} "
                       f"in val; too few for {len(short)} label{'s' if len(short) > 1 else ''}: "
                       + "; ".join(parts) + more + ". Add images with these labels, or split them differently.")


def stratified_split(y, val_fraction: float, seed: int) -> np.ndarray:
    """Which images go to validation (a bool per row of the (n, labels) multi-hot `y`): iterative
    stratification (Sechidis, Tsoumakas and Vlahavas 2011, "On the stratification of multi-label data"). The
    label with the fewest positives not yet placed goes first, each of its images to the side that most lacks
    that label, so rare labels are spread before common ones use up the images they share; images with no
    label then go to the side that most lacks images. Seeded: the same rows and seed give the same split."""
    y = np.asarray(y, dtype=bool)
    n, n_labels = y.shape
    rng = np.random.default_rng(seed)
    pos = y.sum(0)
    # Wanted positives of each label in val, in whole images: at least one per side for a label with two.
    in_val = np.where(pos >= 2, np.clip(np.rint(pos * val_fraction), 1, np.maximum(pos - 1, 1)), pos * val_fraction)
    want = np.stack([pos - in_val, in_val]).astype(float)  # (side, label): 0 = train, 1 = val
    size = np.array([n * (1 - val_fraction), n * val_fraction])
    side = np.full(n, -1)
    order = rng.permutation(n)
    while True:
        open_ = order[side[order] < 0]
        remaining = y[open_].sum(0)
        if not remaining.any():
            break
        label = rng.choice(np.flatnonzero(remaining == remaining[remaining > 0].min()))
        for i in open_[y[open_, label]]:
            s = _most_lacking(want[:, label], size, rng)
            side[i] = s
            want[s, y[i]] -= 1
            size[s] -= 1
    for i in order[side[order] < 0]:
        s = _most_lacking(size, size, rng)
        side[i] = s
        size[s] -= 1
    return _repair(y, side == 1)


def _most_lacking(first: np.ndarray, then: np.ndarray, rng) -> int:
    """The side with the most still wanted by `first`, ties by `then`, remaining ties at random."""
    best = np.flatnonzero(first == first.max())
    best = best[then[best] == then[best].max()]
    return int(best[0] if len(best) == 1 else rng.choice(best))


def _repair(y: np.ndarray, val: np.ndarray) -> np.ndarray:
    """The shared images of common labels can use up a rarer label's: a label with two positives or more but
    none on one side gets one moved there, the image whose move leaves the fewest labels without a positive
    on the side it leaves (then the one with the fewest labels)."""
    for label in range(y.shape[1]):
        for side in (False, True):
            here = y[:, label] & (val == side)
            if here.sum() < 2 or (y[:, label] & (val != side)).any():
                continue
            cand = np.flatnonzero(here)
            left = y[val == side].sum(0)
            harm = (y[cand] & (left == 1)).sum(1) * y.shape[1] + y[cand].sum(1)
            val[cand[np.argmin(harm)]] = not side
    return val


def split_dataset(m: Manifest, rows: list[Row], task: str, val_fraction: float, seed: int) -> Dataset:
    """The Dataset of a manifest's usable `rows`: split by its column, else stratified here; every label checked
    for enough positives on both sides. The labels are those of every row, so a label whose images were all
    unreadable is reported, not quietly dropped."""
    classes = m.labels
    name = m.root / MANIFEST
    if task == "single_label" and len(classes) < 2:
        raise DatasetError(f"{name}: a single-label dataset needs at least 2 labels, found {len(classes)}: "
                           f"{', '.join(classes)}")
    if not classes:
        raise DatasetError(f"{name}: no row has a label (every image is a negative); give each positive image "
                           "its labels, joined by ';'")
    index = {c: i for i, c in enumerate(classes)}
    if m.has_split:
        is_val = [r.split == "val" for r in rows]
    else:
        y = np.zeros((len(rows), len(classes)), dtype=bool)
        for i, r in enumerate(rows):
            y[i, [index[label] for label in r.labels]] = True
        is_val = stratified_split(y, val_fraction, seed).tolist()
    train = [r for r, v in zip(rows, is_val, strict=True) if not v]
    val = [r for r, v in zip(rows, is_val, strict=True) if v]
    check_positives(name, classes, train, val)
    if task == "single_label":
        def item(r):
            return r.path, index[r.labels[0]]
    else:
        def item(r):
            return r.path, tuple(index[label] for label in r.labels)
    return Dataset(m.root, classes, [item(r) for r in train], [item(r) for r in val],
                   "manifest" if m.has_split else "seeded", task=task)


def note_unlisted(ds: Dataset, m: Manifest, log_fn) -> None:
    """Images under the root that labels.csv does not name are not trained on: say so, once."""
    listed = {r.path for r in m.rows}
    unlisted = sorted(p for p in m.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p not in listed
                      and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(m.root).parts)
                      and p.is_file())
    if unlisted:
        ds.warnings.append(f"{len(unlisted)} image file(s) are not in {MANIFEST} and are not used, e.g. "
                           f"{unlisted[0].relative_to(m.root).as_posix()}")
        log_fn(ds.warnings[-1])
