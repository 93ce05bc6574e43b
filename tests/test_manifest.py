"""Multi-label datasets (issue 24): labels.csv parsed and checked, every bad manifest refused with the rows
named, the task read from the data or forced, the seeded iterative stratification, and load_dataset on a
folder, a zip and a set made from the shared photos."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, make_dataset
from pydantic import ValidationError

from core.config import TrainRequest
from core.data import DatasetError, check_layout, load_dataset
from core.manifest import read_manifest, stratified_split

COLOURS = ("red", "green", "blue", "yellow")


def write_set(root: Path, rows: list[tuple], header: str = "image,labels", make: bool = True) -> Path:
    """labels.csv with `rows` (written as given, one CSV line each) and, when `make`, a small JPEG for each
    row's image (a different one per row)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, row in enumerate(rows):
        lines.append(",".join(row))
        if make and row[0] and not row[0].startswith("/") and ".." not in row[0]:
            p = root / row[0]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg_bytes(COLOURS[i % 4], i, size=(32, 32)))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def multi_rows(n: int = 24) -> list[tuple]:
    """A multi-label set: cat on every 2nd image, dog on every 3rd, none on the rest (negatives)."""
    rows = []
    for i in range(n):
        labels = [name for name, every in (("cat", 2), ("dog", 3)) if i % every == 0]
        rows.append((f"img/{i:03d}.jpg", ";".join(labels)))
    return rows


def refused(root: Path, **kw) -> str:
    with pytest.raises(DatasetError) as e:
        load_dataset(root, log_fn=lambda m: None, **kw)
    return str(e.value)


# --- parsing ------------------------------------------------------------------------------------------

def test_manifest_is_parsed(tmp_path):
    root = write_set(tmp_path / "d", [("a.jpg", " Cat ; dog;Cat"), ("sub\\b.jpg", ""), ("c.jpg", "dog")])
    text = (root / "labels.csv").read_text()
    # A spreadsheet's byte-order mark, a blank line and a row of empty cells are not rows.
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\nc.jpg", "\n\n,\nc.jpg").encode())
    (root / "sub").mkdir()
    (root / "sub" / "b.jpg").write_bytes(jpeg_bytes("red", 9, size=(32, 32)))
    m = read_manifest(root)
    assert [(r.line, r.image, r.labels, r.split) for r in m.rows] == [
        (2, "a.jpg", ("Cat", "dog"), None), (3, "sub\\b.jpg", (), None), (6, "c.jpg", ("dog",), None)]
    assert m.rows[1].path == root / "sub" / "b.jpg"
    assert m.labels == ["Cat", "dog"] and not m.has_split and m.task() == "multi_label"


def test_quoted_field_spanning_lines_keeps_line_numbers(tmp_path):
    root = write_set(tmp_path / "d", [("a.jpg", "cat"), ("b.jpg", "dog")])
    (root / "labels.csv").write_text('image,labels\n"a.jpg","cat;\ndog"\nb.jpg,nope;;x\n')
    msg = refused(root)
    assert "line 4 (b.jpg)" in msg and "empty label name" in msg


def test_split_column_is_used_as_given(tmp_path):
    rows = [(f"{i}.jpg", "cat" if i % 2 else "dog", "val" if i < 4 else " Train ") for i in range(12)]
    ds = load_dataset(write_set(tmp_path / "d", rows, "image,labels,split"))
    assert ds.split == "manifest" and ds.task == "single_label"
    assert sorted(p.name for p, _ in ds.val) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert ds.counts() == {"train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}}


# --- bad manifests: one test each, the message naming the rows ----------------------------------------

def test_missing_image_is_named(tmp_path):
    root = write_set(tmp_path / "d", multi_rows())
    (root / "img" / "005.jpg").unlink()
    msg = refused(root)
    assert "does not exist" in msg and "line 7 (img/005.jpg)" in msg


def test_many_bad_rows_are_capped(tmp_path):
    root = write_set(tmp_path / "d", multi_rows(30))
    for p in sorted((root / "img").iterdir())[:15]:
        p.unlink()
    msg = refused(root)
    assert "an image that does not exist (or is not a file) in 15 rows" in msg and "and 5 more" in msg
    assert "line 11 (img/009.jpg)" in msg and "img/010.jpg" not in msg


@pytest.mark.parametrize("image", ["/etc/passwd", "../outside.jpg", "img/../../outside.jpg", "C:\\x.jpg"])
def test_path_outside_the_root_is_refused(tmp_path, image):
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes())
    root = write_set(tmp_path / "d", [*multi_rows(), (image, "cat")])
    msg = refused(root)
    assert "outside the dataset" in msg and f"line 26 ({image})" in msg


def test_symlink_leading_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes())
    root = write_set(tmp_path / "d", [*multi_rows(), ("link.jpg", "cat")], make=True)
    (root / "link.jpg").unlink()
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    msg = refused(root)
    assert "symbolic link" in msg and "line 26 (link.jpg)" in msg


def test_repeated_image_is_refused(tmp_path):
    rows = multi_rows()
    root = write_set(tmp_path / "d", [*rows, ("img/./003.jpg", "cat")])
    msg = refused(root)
    assert "an image listed before in 1 row" in msg and "line 26 (img/./003.jpg) repeats line 5" in msg


@pytest.mark.parametrize("header,why", [("image", "missing labels"), ("file,labels", "missing image"),
                                        ("image,labels,splt", "unknown 'splt'"),
                                        ("image,labels,labels", "repeated labels")])
def test_bad_header_is_refused(tmp_path, header, why):
    root = write_set(tmp_path / "d", [("a.jpg", "cat", "train")], header)
    msg = refused(root)
    assert "line 1 must be the header" in msg and why in msg


def test_wrong_number_of_fields_is_refused(tmp_path):
    root = write_set(tmp_path / "d", [*multi_rows(), ("x.jpg", "cat", "train", "extra"), ("y.jpg",)])
    msg = refused(root)
    assert "line 26 (x.jpg): 4 fields" in msg and "line 27 (y.jpg): 1 fields" in msg


def test_undecodable_text_names_the_line(tmp_path):
    root = write_set(tmp_path / "d", multi_rows())
    (root / "labels.csv").write_bytes(b"image,labels\nimg/000.jpg,cat\nimg/001.jpg,caf\xe9\n")
    msg = refused(root)
    assert "line 3 is not UTF-8" in msg


def test_malformed_quoting_names_the_line(tmp_path):
    root = write_set(tmp_path / "d", multi_rows())
    (root / "labels.csv").write_text('image,labels\nimg/000.jpg,cat\nimg/001.jpg,"cat"dog\n')
    msg = refused(root)
    assert "line 3 is not valid CSV" in msg


def test_unknown_split_is_refused(tmp_path):
    rows = [(f"{i}.jpg", "cat;dog", "train") for i in range(6)] + [("6.jpg", "cat", "test"), ("7.jpg", "dog", "")]
    msg = refused(write_set(tmp_path / "d", rows, "image,labels,split"))
    assert "unknown split" in msg and "line 8 (6.jpg): 'test'" in msg
    assert "no split" in msg and "line 9 (7.jpg): ''" in msg


def test_empty_label_name_is_refused(tmp_path):
    root = write_set(tmp_path / "d", [*multi_rows(), ("x.jpg", "cat;;dog")])
    msg = refused(root)
    assert "empty label name" in msg and "line 26 (x.jpg)" in msg


def test_label_breaking_the_label_rule_is_refused(tmp_path):
    root = write_set(tmp_path / "d", [*multi_rows(), ("x.jpg", "cat;a/b")])
    msg = refused(root)
    assert "line 26 (x.jpg)" in msg and "'/'" in msg


def test_label_with_too_few_training_positives_is_refused(tmp_path):
    rows = [(f"{i}.jpg", "cat", "train" if i < 4 else "val") for i in range(6)]
    rows += [("6.jpg", "cat;owl", "train"), ("7.jpg", "owl", "val")]
    msg = refused(write_set(tmp_path / "d", rows, "image,labels,split"))
    assert "'owl' has 1 in train and 1 in val" in msg and "line 8 (6.jpg), line 9 (7.jpg)" in msg
    assert "'cat'" not in msg


def test_label_with_no_validation_positive_is_refused(tmp_path):
    rows = [(f"{i}.jpg", "cat;owl" if i < 3 else "cat", "train" if i < 5 else "val") for i in range(8)]
    msg = refused(write_set(tmp_path / "d", rows, "image,labels,split"))
    assert "'owl' has 3 in train and 0 in val" in msg and "line 2 (0.jpg)" in msg


def test_label_whose_images_are_unreadable_is_refused(tmp_path):
    root = write_set(tmp_path / "d", [*multi_rows(), ("owl1.jpg", "owl"), ("owl2.jpg", "owl"), ("owl3.jpg", "owl")])
    for name in ("owl1.jpg", "owl2.jpg"):
        (root / name).write_bytes(b"not a jpeg")
    msg = refused(root)
    assert "'owl' has" in msg and "line 28 (owl3.jpg)" in msg


def test_manifest_without_rows_is_refused(tmp_path):
    assert "no rows" in refused(write_set(tmp_path / "d", []))


# --- task ---------------------------------------------------------------------------------------------

def test_one_label_on_every_row_is_single_label(tmp_path):
    ds = load_dataset(write_set(tmp_path / "d", [(f"{i}.jpg", ("cat", "dog", "owl")[i % 3]) for i in range(15)]))
    assert ds.task == "single_label" and ds.split == "seeded" and ds.classes == ["cat", "dog", "owl"]
    assert all(isinstance(y, int) for _, y in ds.train + ds.val)
    assert ds.counts()["val"] == {"cat": 1, "dog": 1, "owl": 1}
    assert ds.targets("train").sum(1).tolist() == [1.0] * len(ds.train)


def test_negatives_or_several_labels_make_it_multi_label(tmp_path):
    ds = load_dataset(write_set(tmp_path / "d", multi_rows()), log_fn=lambda m: None)
    assert ds.task == "multi_label" and ds.classes == ["cat", "dog"]
    labels = {p.name: y for p, y in ds.train + ds.val}
    assert labels["000.jpg"] == (0, 1) and labels["001.jpg"] == () and labels["003.jpg"] == (1,)
    targets = ds.targets("val")
    assert targets.dtype == np.float32 and targets.shape == (len(ds.val), 2)
    assert targets.tolist() == [[float(0 in y), float(1 in y)] for _, y in ds.val]
    counts = ds.counts()
    assert {k: counts["train"][k] + counts["val"][k] for k in ("cat", "dog")} == {"cat": 12, "dog": 8}
    fp = ds.fingerprint()
    assert fp["task"] == "multi_label" and fp["num_files"] == 24
    assert {f["path"]: f["labels"] for f in fp["files"]}["img/000.jpg"] == ["cat", "dog"]


def test_forcing_single_label_on_a_multi_label_manifest_names_the_rows(tmp_path):
    msg = refused(write_set(tmp_path / "d", multi_rows()), task="single_label")
    assert "task single_label needs exactly one label" in msg
    assert "line 2 (img/000.jpg): 2 labels" in msg and "line 3 (img/001.jpg): 0 labels" in msg


def test_forcing_multi_label_on_class_folders(tmp_path):
    data = make_dataset(tmp_path / "d", n=6)
    single, multi = load_dataset(data), load_dataset(data, task="multi_label")
    assert multi.task == "multi_label" and multi.classes == single.classes
    assert multi.train == [(p, (y,)) for p, y in single.train] and multi.counts() == single.counts()
    assert np.array_equal(multi.targets("val"), single.targets("val"))
    assert [f["labels"] for f in multi.fingerprint()["files"]] == [[f["class"]] for f in single.fingerprint()["files"]]


def test_forcing_multi_label_on_a_one_label_manifest(tmp_path):
    ds = load_dataset(write_set(tmp_path / "d", [(f"{i}.jpg", ("cat", "dog")[i % 2]) for i in range(12)]),
                      task="multi_label")
    assert ds.task == "multi_label" and all(len(y) == 1 for _, y in ds.train + ds.val)


def test_unknown_task_is_refused(tmp_path):
    assert "unknown task 'both'" in refused(make_dataset(tmp_path / "d", n=4), task="both")
    with pytest.raises(ValidationError, match="single_label"):
        TrainRequest(task="both")
    assert TrainRequest().task is None and TrainRequest(task="multi_label").task == "multi_label"


def test_request_task_reaches_the_training_pipeline(tmp_path):
    pytest.importorskip("torch")
    from training.pipeline import load_data

    root = write_set(tmp_path / "d", multi_rows())
    with pytest.raises(DatasetError, match="line 2 \\(img/000.jpg\\): 2 labels"):
        load_data(TrainRequest(task="single_label"), root, tmp_path / "w", lambda m: None)
    ds = load_data(TrainRequest(), make_dataset(tmp_path / "c", n=4), tmp_path / "w2", lambda m: None)
    assert ds.task == "single_label" and len(ds.decoded) == 8


# --- the stratified split -----------------------------------------------------------------------------

def random_labels(seed: int, n: int = 300) -> np.ndarray:
    """Labels of very different frequency, some pairs co-occurring, a few labels of 2 and 3 positives, and
    negatives."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, 8)) < np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0, 0])
    y[:, 1] |= y[:, 0] & (rng.random(n) < 0.5)
    y[rng.choice(n, 2, replace=False), 6] = True
    y[rng.choice(n, 3, replace=False), 7] = True
    return y


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_stratified_split_spreads_every_label(seed):
    y = random_labels(seed)
    val = stratified_split(y, 0.2, seed)
    pos = y.sum(0)
    assert (y[val].sum(0)[pos >= 2] >= 1).all() and (y[~val].sum(0)[pos >= 2] >= 1).all()
    assert abs(val.mean() - 0.2) < 0.02
    common = pos >= 20
    assert np.all(np.abs(y[val].sum(0)[common] / pos[common] - 0.2) < 0.05)  # each label's share, not only the total
    negatives = ~y.any(1)
    assert 0.1 < val[negatives].mean() < 0.3


def test_stratified_split_is_seeded():
    y = random_labels(0)
    a, b, c = stratified_split(y, 0.25, 7), stratified_split(y, 0.25, 7), stratified_split(y, 0.25, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_seeded_split_of_a_manifest_is_reproducible(tmp_path):
    root = write_set(tmp_path / "d", multi_rows(40))
    a, b = load_dataset(root, seed=3, val_fraction=0.25), load_dataset(root, seed=3, val_fraction=0.25)
    assert a.split == "seeded" and a.val == b.val and len(a.val) == 10
    assert a.fingerprint()["content_hash"] == b.fingerprint()["content_hash"]
    assert all(n >= 1 for n in a.counts()["val"].values())


# --- where a manifest is found, and what it is reported with ------------------------------------------

@pytest.mark.parametrize("prefix", ["", "photos/"])
def test_zip_with_a_manifest(tmp_path, prefix):
    root = write_set(tmp_path / "d", [(f"{i}.jpg", r[1]) for i, r in enumerate(multi_rows())])
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in root.iterdir():  # images beside labels.csv: no sub-folder for class_root to descend into
            zf.write(p, prefix + p.name)
    ds = load_dataset(z, workdir=tmp_path / "work")
    assert ds.task == "multi_label" and len(ds.train) + len(ds.val) == 24
    assert ds.root == tmp_path / "work" / "dataset" / prefix.rstrip("/")
    assert check_layout(tmp_path / "work" / "dataset") is None


def test_check_layout_reads_the_manifest(tmp_path):
    root = write_set(tmp_path / "d", [*multi_rows(), ("gone.jpg", "cat")])
    (root / "gone.jpg").unlink()
    assert "line 26 (gone.jpg)" in check_layout(root)


def test_unreadable_and_unlisted_images_are_reported(tmp_path):
    root = write_set(tmp_path / "d", [*multi_rows(), ("broken.jpg", "cat")])
    (root / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "img" / "stray.jpg").write_bytes(jpeg_bytes(size=(32, 32)))
    logs = []
    ds = load_dataset(root, log_fn=logs.append)
    assert [s["path"] for s in ds.skipped] == ["broken.jpg"] and len(ds.train) + len(ds.val) == 24
    assert any("img/stray.jpg" in w and "not in labels.csv" in w for w in ds.warnings)
    assert any(line.startswith("skipped unreadable image") for line in logs)


# --- a set made from the shared photos ----------------------------------------------------------------

def test_load_dataset_on_the_shared_collage_set(tmp_path, real_data, flowers_data):
    tool = real_data.resolve().parents[1] / "tools" / "make_multilabel.py"
    if not tool.is_file():
        pytest.skip(f"make_multilabel.py is not beside the shared data ({tool.parent})")
    out = tmp_path / "ml"
    subprocess.run([sys.executable, str(tool), str(out), str(real_data), str(flowers_data), "--train", "40",
                    "--val", "20", "--seed", "7"], check=True, capture_output=True, timeout=300,
                   env={**os.environ})
    ds = load_dataset(out, log_fn=lambda m: None)
    assert ds.task == "multi_label" and ds.split == "manifest" and (len(ds.train), len(ds.val)) == (40, 20)
    assert ds.classes == ["ants", "bees", "daisy", "dandelion", "rose", "sunflower", "tulip"]
    rows = [line.split(",") for line in (out / "labels.csv").read_text().splitlines()[1:]]
    expected = {f"{part}/{name}": labels.split(";") for name, labels, part in rows}
    got = {f"{f['split']}/{f['path']}": f["labels"] for f in ds.fingerprint()["files"]}
    assert got == expected
    assert ds.targets("train").shape == (40, 7) and ds.targets("train").sum() == sum(ds.counts()["train"].values())
