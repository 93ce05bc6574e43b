"""Reading a customer's image folder (or .zip): checks, split and fingerprint, before any training.

Layout: one sub-folder per class, optionally under train/ and val/; or a manifest, labels.csv, at the root
(core/manifest.py), which may give an image several labels or none (a multi-label dataset). Unreadable images
are listed and skipped; non-image files are ignored; too few classes or images is an error and nothing is
trained.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import random
import stat
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from core.labels import label_problem
from core.preprocess import IMAGE_SUFFIXES, ImageError, load_image, prepare

log = logging.getLogger("refit.data")

MAX_ZIP_BYTES = 4 << 30  # uncompressed total a dataset archive may expand to
MAX_ZIP_FILES = 200_000
IMBALANCE_RATIO = 3.0  # largest / smallest class above this is reported


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says why and where."""


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    # Items: (image, class index) for single-label; for multi-label (image, sorted label indices into
    # `classes`), () for an image with none of them.
    train: list[tuple[Path, int]] | list[tuple[Path, tuple[int, ...]]]
    val: list[tuple[Path, int]] | list[tuple[Path, tuple[int, ...]]]
    # "folders" (train/ and val/ given), "manifest" (labels.csv's split column) or "seeded" (split made here)
    split: str
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    ignored: list[str] = field(default_factory=list)  # non-image files
    warnings: list[str] = field(default_factory=list)
    # Images the check already decoded (with the contract given to load_dataset), for the run to take
    # instead of decoding every file a second time: path -> core.preprocess.Prepared.
    decoded: dict = field(default_factory=dict, repr=False)
    task: str = "single_label"  # or "multi_label"

    def _indices(self, y) -> tuple[int, ...]:
        return tuple(y) if self.task == "multi_label" else (y,)

    def counts(self) -> dict:
        """Images per class and split; for multi-label, positive images per label and split."""
        def per(items):
            c = Counter(i for _, y in items for i in self._indices(y))
            return {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return {"train": per(self.train), "val": per(self.val)}

    def targets(self, split: str) -> np.ndarray:
        """(images, classes) float32 of a split ("train" or "val"): multi-hot, one-hot for single-label."""
        items = {"train": self.train, "val": self.val}[split]
        out = np.zeros((len(items), len(self.classes)), np.float32)
        for row, (_, y) in enumerate(items):
            out[row, np.asarray(self._indices(y), dtype=np.intp)] = 1
        return out

    def fingerprint(self) -> dict:
        """What was trained on: files, classes, counts and one content hash over every used file. A
        multi-label file records its label list (`labels`) where a single-label file has its `class`."""
        multi = self.task == "multi_label"
        h = hashlib.sha256()
        files = []
        for split, items in (("train", self.train), ("val", self.val)):
            for p, y in sorted(items, key=lambda t: str(t[0])):
                rel = p.relative_to(self.root).as_posix()
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                if multi:
                    names = [self.classes[i] for i in y]
                    h.update(f"{split}\0{rel}\0{';'.join(names)}\0{digest}\n".encode())
                    files.append({"split": split, "path": rel, "labels": names, "sha256": digest})
                else:
                    h.update(f"{split}\0{rel}\0{self.classes[y]}\0{digest}\n".encode())
                    files.append({"split": split, "path": rel, "class": self.classes[y], "sha256": digest})
        out = {"classes": self.classes, "counts": self.counts(), "num_files": len(files),
               "content_hash": h.hexdigest(), "split": self.split, "skipped": self.skipped,
               "ignored": len(self.ignored), "files": files}
        # Only a multi-label dataset says so: a single-label dataset.json stays as it always was.
        return {"task": self.task, **out} if multi else out


# Compression methods Python's zipfile can read. Windows Explorer writes Deflate64 (9) for large archives,
# which zipfile refuses with NotImplementedError; it is named in the error so the client can re-zip.
READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                    zipfile.ZIP_LZMA: "lzma"}
NAME_MAX = 255  # bytes per path component on Linux file systems (ext4, xfs, tmpfs)
PATH_MAX = 1024  # bytes per entry name, well under the OS limit (4096) once the job folder is prefixed
# OS errors that an entry's name or shape causes, i.e. the archive's fault, not the server's.
_ENTRY_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EILSEQ, errno.EINVAL}


def safe_extract_zip(zip_path: Path | str, dest: Path | str) -> Path:
    """Extract a dataset archive, refusing entries that would land outside `dest` (zip-slip), absolute
    paths, symlinks, archives that expand past MAX_ZIP_BYTES, and anything zipfile cannot unpack
    (encrypted entries, unsupported compression, damaged data, over-long names, a file and a folder of the
    same name). Every refusal is a DatasetError naming the entry. Running out of disk space is not the
    archive's fault: that OSError (ENOSPC) is raised as it is, for the caller to report as such."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        if isinstance(e, OSError) and e.errno not in (None, *_ENTRY_ERRNOS):
            raise
        raise DatasetError(f"{zip_path.name}: not a valid .zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_FILES:
            raise DatasetError(f"{zip_path.name}: {len(infos)} entries is over the limit of {MAX_ZIP_FILES}")
        total = 0
        files: set[PurePosixPath] = set()
        folders: set[PurePosixPath] = set()
        for info in infos:
            _check_entry(zip_path.name, info)
            pp = PurePosixPath(info.filename.replace("\\", "/"))
            (folders if info.is_dir() else files).add(pp)
            folders.update(pp.parents)
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise DatasetError(f"{zip_path.name}: expands to more than {MAX_ZIP_BYTES >> 20} MiB")
        clash = sorted(files & folders)
        if clash:
            raise DatasetError(f"{zip_path.name}: {clash[0].as_posix()!r} is both a file and a folder in the "
                               f"archive; rename one of them")
        dest.mkdir(parents=True, exist_ok=True)
        for info in infos:
            if "__MACOSX" in info.filename.split("/"):
                continue
            try:
                zf.extract(info, dest)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # CRC mismatch, corrupt deflate stream
                raise DatasetError(f"{zip_path.name}: entry {info.filename!r} is damaged ({e}); "
                                   "make the archive again") from None
            except OSError as e:
                if e.errno not in _ENTRY_ERRNOS:
                    raise  # the server's problem (disk full, permissions): not a bad upload
                raise DatasetError(f"{zip_path.name}: entry {info.filename!r} cannot be unpacked here "
                                   f"({e.strerror})") from None
    return dest


def _check_entry(archive: str, info: zipfile.ZipInfo) -> None:
    """Refuse, before anything is written, an entry that is unsafe or that zipfile cannot unpack."""
    name = info.filename
    pp = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in pp.parts:
        raise DatasetError(f"{archive}: entry {name!r} points outside the archive (unsafe path)")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(f"{archive}: entry {name!r} is a symbolic link (not allowed)")
    if info.flag_bits & 0x1:
        raise DatasetError(f"{archive}: entry {name!r} is encrypted; send an archive without a password")
    if info.compress_type not in READABLE_METHODS:
        method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
        raise DatasetError(f"{archive}: entry {name!r} uses {method} compression, which cannot be read; "
                           f"re-zip with one of: {', '.join(READABLE_METHODS.values())}")
    long_part = next((part for part in pp.parts if len(part.encode()) > NAME_MAX), None)
    if long_part is not None:
        raise DatasetError(f"{archive}: entry {name[:80]!r}... has a name part of {len(long_part.encode())} bytes, "
                           f"over the limit of {NAME_MAX}")
    if len(name.encode()) > PATH_MAX:
        raise DatasetError(f"{archive}: entry {name[:80]!r}... has a path of {len(name.encode())} bytes, over "
                           f"the limit of {PATH_MAX}")


def class_root(root: Path) -> Path:
    """Descend through single wrapper folders (photos.zip -> photos/ -> classes)."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        dirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if len(dirs) == 1 and not files and any(q.is_dir() for q in dirs[0].iterdir()):
            root = dirs[0]
        else:
            return root


def dataset_root(root: Path) -> Path:
    """The folder holding labels.csv when there is one at `root` or under single wrapper folders (a zip's top
    folder), else the class folders' root (class_root)."""
    from core.manifest import MANIFEST  # imported where used: core.manifest raises this module's DatasetError

    base = root
    while not (base / MANIFEST).is_file():
        entries = [p for p in base.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            return class_root(root)
        base = entries[0]
    return base


def check_layout(root: Path) -> str | None:
    """Cheap layout check (no image is decoded): at least two class folders holding image files, or a
    manifest whose rows and paths check out. Returns a message naming the problem, or None. `load_dataset`
    does the thorough check."""
    from core.manifest import MANIFEST, read_manifest

    base = dataset_root(Path(root))
    if (base / MANIFEST).is_file():
        try:
            read_manifest(base)
        except DatasetError as e:
            return str(e)
        return None
    if (base / "train").is_dir():
        base = base / "train"
    found = [d.name for d in sorted(base.iterdir()) if d.is_dir() and not d.name.startswith((".", "__MACOSX"))
             and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*") if f.is_file())]
    if len(found) < 2:
        return (f"not a dataset: expected one folder per class with images inside (at least 2 classes), "
                f"found {len(found)} class folder(s) with images{': ' + ', '.join(found) if found else ''}")
    return None


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name (a folder's name under the one label rule, core.labels) -> its files. Two folders whose
    names are the same text in different Unicode forms (NFC and NFD, as macOS writes) are one class."""
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))):
        problem, label = label_problem(d.name)
        if problem:
            raise DatasetError(f"{d}: this class folder's name cannot be a class: {problem}")
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        out[label] = sorted(out.get(label, []) + files)
    return out


def _usable(files: list[Path], ds_skipped: list, ds_ignored: list, contract=None, decoded: dict | None = None
            ) -> list[Path]:
    """Fully decode every image file (a truncated JPEG only fails there). When asked, keep what training
    needs of each (`Prepared`: the model input and a copy bounded by the contract), never the full-size
    decode: a few 7000 x 7000 PNGs would otherwise hold gigabytes."""
    good = []
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            ds_ignored.append(str(p))
            continue
        try:
            im = load_image(p, contract)
        except ImageError as e:
            ds_skipped.append({"path": str(p), "reason": str(e).split(": ", 1)[-1]})
            continue
        if decoded is not None:
            decoded[p] = prepare(im, contract)
        del im  # the full-size decode goes before the next one is made
        good.append(p)
    return good


def _relative_to(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def load_dataset(data: Path | str, *, val_fraction: float = 0.2, seed: int = 0, workdir: Path | None = None,
                 log_fn=log.info, contract=None, task: str | None = None) -> Dataset:
    """Check and split a dataset folder or .zip. `workdir` receives the extracted archive. With a
    `contract`, images are decoded as training will use them and kept, bounded, in `Dataset.decoded`; it may
    be a function of the task (a multi-label run decodes at another size), called once the task is known.
    `task` (single_label | multi_label) forces one; None takes what the data says: a manifest (labels.csv
    at the root) tells, class folders are single-label."""
    from core import manifest

    manifest.check_task(task)
    root = dataset_root(_unpacked(Path(data), workdir))
    skipped: list[dict] = []
    ignored: list[str] = []
    decoded: dict | None = {} if contract is not None else None
    chosen: list = [None]  # the contract images are decoded with, once the task is known

    def usable(files):
        return _usable(files, skipped, ignored, chosen[0], decoded)

    def decode_for(task: str) -> None:
        chosen[0] = contract(task) if callable(contract) else contract

    if (root / manifest.MANIFEST).is_file():
        m = manifest.read_manifest(root)
        task = manifest.resolve_task(m, task)
        decode_for(task)
        good = set(usable([r.path for r in m.rows]))
        _report(root, skipped, ignored, log_fn)
        ds = manifest.split_dataset(m, [r for r in m.rows if r.path in good], task, val_fraction, seed)
        manifest.note_unlisted(ds, m, log_fn)
    else:
        decode_for(task or "single_label")
        scan = _scan_folders(root, usable)
        _report(root, skipped, ignored, log_fn)
        ds = _split_folders(root, scan, val_fraction, seed)
        if task == "multi_label":  # each image has its one folder's label
            ds.train, ds.val = [(p, (y,)) for p, y in ds.train], [(p, (y,)) for p, y in ds.val]
        ds.task = task or "single_label"
    ds.skipped, ds.ignored, ds.decoded = skipped, ignored, decoded or {}
    _warn_imbalance(ds, log_fn)
    return ds


def _report(root: Path, skipped: list[dict], ignored: list[str], log_fn) -> None:
    for s in skipped:
        log_fn(f"skipped unreadable image {s['path']}: {s['reason']}")
        # Recorded (metrics, the retrain reply) relative to the dataset, as in dataset.json: the full path
        # is the server's business and stays in its log.
        s["path"] = _relative_to(s["path"], root)
    if ignored:
        log_fn(f"ignored {len(ignored)} non-image file(s), e.g. {ignored[0]}")


def _scan_folders(root: Path, usable) -> tuple[bool, dict | None, dict | None, dict]:
    """Class folders scanned and their images checked: (train/ and val/ given, their files per class or
    None, every usable file per class)."""
    has_split = (root / "train").is_dir() and (root / "val").is_dir()
    tr, va, per_class = _scan_split(root, usable) if has_split else \
        (None, None, {c: usable(f) for c, f in _scan_classes(root).items()})
    return has_split, tr, va, per_class


def _split_folders(root: Path, scan: tuple, val_fraction: float, seed: int) -> Dataset:
    has_split, tr, va, per_class = scan
    per_class = {c: f for c, f in per_class.items() if f or not has_split}
    _check_classes(root, per_class)
    classes = sorted(per_class)
    if has_split:
        train, val = _given_split(root, classes, tr, va)
    else:
        train, val = _seeded_split(classes, per_class, val_fraction, seed)
    return Dataset(root, classes, train, val, "folders" if has_split else "seeded")


def _warn_imbalance(ds: Dataset, log_fn) -> None:
    counts = ds.counts()
    sizes = {c: counts["train"][c] + counts["val"][c] for c in ds.classes}
    if not sizes or max(sizes.values()) <= IMBALANCE_RATIO * min(sizes.values()):
        return
    if ds.task == "multi_label":
        ds.warnings.append(f"label imbalance: positive images per label {sizes} (largest/smallest > "
                           f"{IMBALANCE_RATIO:g}); check each label's precision and recall, not only the mean")
    else:
        ds.warnings.append(f"class imbalance: {sizes} (largest/smallest > {IMBALANCE_RATIO:g}); "
                           "accuracy may flatter the large class, check per-class recall")
    log_fn(ds.warnings[-1])


def _unpacked(data: Path, workdir: Path | None) -> Path:
    """The dataset folder: `data` itself, or a .zip extracted under `workdir`."""
    if not data.exists():
        raise DatasetError(f"{data}: no such file or folder")
    if not data.is_file():
        return data
    if data.suffix.lower() != ".zip":
        raise DatasetError(f"{data}: expected a folder of class sub-folders or a .zip of one")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="refit-data-"))
    return safe_extract_zip(data, workdir / "dataset")


def _scan_split(root: Path, usable) -> tuple[dict, dict, dict]:
    """train/ and val/ given: their usable files per class, and both together per class."""
    tr, va = _scan_classes(root / "train"), _scan_classes(root / "val")
    if set(tr) != set(va):
        raise DatasetError(f"{root}: train/ and val/ have different classes: "
                           f"train {sorted(tr)}, val {sorted(va)}")
    tr = {c: usable(f) for c, f in tr.items()}
    va = {c: usable(f) for c, f in va.items()}
    return tr, va, {c: tr[c] + va[c] for c in tr}


def _check_classes(root: Path, per_class: dict) -> None:
    if len(per_class) < 2:
        found = ", ".join(f"{c} ({len(f)} images)" for c, f in per_class.items()) or "none"
        raise DatasetError(f"{root}: need at least 2 class folders with images, found {len(per_class)}: {found}. "
                           "Put each class's images in its own sub-folder.")
    small = {c: len(f) for c, f in per_class.items() if len(f) < 2}
    if small:
        raise DatasetError(f"{root}: every class needs at least 2 usable images; too few in: "
                           + ", ".join(f"{c} ({n})" for c, n in small.items()))


def _given_split(root: Path, classes: list[str], tr: dict, va: dict) -> tuple[list, list]:
    empty_val = [c for c in classes if not va[c]]
    if empty_val:
        raise DatasetError(f"{root}: val/ has no usable images for class(es) {empty_val}")
    idx = {c: i for i, c in enumerate(classes)}
    return [(p, idx[c]) for c in classes for p in tr[c]], [(p, idx[c]) for c in classes for p in va[c]]


def _seeded_split(classes: list[str], per_class: dict, val_fraction: float, seed: int) -> tuple[list, list]:
    """A stratified split: each class's share of validation images, at least one, leaving one to train on."""
    rng = random.Random(seed)
    train, val = [], []
    for i, c in enumerate(classes):
        files = list(per_class[c])
        rng.shuffle(files)
        n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
        val += [(p, i) for p in files[:n_val]]
        train += [(p, i) for p in files[n_val:]]
    return train, val
