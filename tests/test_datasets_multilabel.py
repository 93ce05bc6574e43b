"""Multi-label entries in the store's datasets (issue 24, "Datasets"): an image with several labels, or none of
them, beside single-label entries; shown per label, relabelled either way, and written out to train on as a
manifest (`labels.csv` beside the images), on a folder store and on S3."""
from __future__ import annotations

import csv

import pytest
from conftest import jpeg_bytes

from core.data import DatasetError
from core.datasets import Datasets, entry_labels


@pytest.fixture
def store(any_store):
    return any_store


def rows(folder) -> list[dict]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_several_labels_none_and_one_in_one_dataset(store, tmp_path):
    ds = Datasets(store)
    ds.add("shelf", [("a.jpg", jpeg_bytes("red", 1), "red")], source="upload")
    out = ds.add("shelf", [("b.jpg", jpeg_bytes("green", 2), ["green", "red", "green"]),
                           ("c.jpg", jpeg_bytes("blue", 3), [])], source="feedback")
    assert [a.get("labels") for a in out["added"]] == [["green", "red"], []] and not out["refused"]
    shown = ds.show("shelf")
    assert shown["images"] == 3 and shown["classes"] == {"green": 1, "red": 2}
    assert shown["task"] == "multi_label" and shown["negatives"] == 1
    entries = {e["name"]: e for e in ds.manifest("shelf")["entries"]}
    assert entry_labels(entries["a.jpg"]) == ("red",) and "labels" not in entries["a.jpg"]
    assert entries["b.jpg"]["labels"] == ["green", "red"] and "label" not in entries["b.jpg"]
    # The same bytes again with other labels: skipped, saying how it is labelled and how to change that.
    again = ds.add("shelf", [("b2.jpg", jpeg_bytes("green", 2), ["blue"])], source="upload")
    assert not again["added"] and "labelled 'green', 'red'; relabel it" in again["skipped"][0]["reason"]


def test_a_single_label_dataset_keeps_its_shape(store):
    ds = Datasets(store)
    ds.add("plain", [("a.jpg", jpeg_bytes("red", 1), "red"), ("b.jpg", jpeg_bytes("blue", 2), "blue")],
           source="upload")
    shown = ds.show("plain")
    assert "task" not in shown and "negatives" not in shown and shown["classes"] == {"blue": 1, "red": 1}


def test_relabel_between_one_label_and_several(store):
    ds = Datasets(store)
    ds.add("shelf", [("a.jpg", jpeg_bytes("red", 1), "red")], source="upload")
    sha = ds.manifest("shelf")["entries"][0]["sha256"]
    r = ds.relabel("shelf", sha, ["red", "dented"])
    assert r["changed"] and r["labels"] == ["dented", "red"] and r["previous_label"] == "red"
    (entry,) = ds.manifest("shelf")["entries"]
    assert entry["labels"] == ["dented", "red"] and "label" not in entry
    r = ds.relabel("shelf", sha, "red")
    (entry,) = ds.manifest("shelf")["entries"]
    assert entry["label"] == "red" and "labels" not in entry and r["previous_labels"] == ["dented", "red"]
    assert ds.relabel("shelf", sha, "red")["changed"] is False  # the same labels: the same snapshot


def test_labels_that_cannot_be_joined_are_refused(store):
    ds = Datasets(store)
    out = ds.add("shelf", [("a.jpg", jpeg_bytes("red", 1), ["red;blue"]),
                           ("b.jpg", jpeg_bytes("red", 2), ["ok", "train"])], source="upload")
    assert not out["added"] and len(out["refused"]) == 2
    assert "';' joins labels" in out["refused"][0]["error"] and "reserved" in out["refused"][1]["error"]
    (refused,) = ds.add("shelf", [("a.jpg", jpeg_bytes("red", 1), 3)], source="upload")["refused"]
    assert "a list of labels" in refused["error"]
    with pytest.raises(DatasetError, match="reserved"):
        ds.relabel("shelf", "0" * 64, ["val"])


def test_a_multilabel_snapshot_is_written_as_a_manifest(store, tmp_path):
    ds = Datasets(store)
    ds.add("shelf", [("a.jpg", jpeg_bytes("red", 1), ["red"], "train"),
                     ("b.jpg", jpeg_bytes("green", 2), ["green", "red"], "train"),
                     ("c.jpg", jpeg_bytes("blue", 3), [], "val"),
                     ("d.jpg", jpeg_bytes("green", 4), ["green", "red"], "val")], source="upload")
    out = ds.materialize("shelf", None, tmp_path / "hinted")
    got = rows(out)
    assert {r["labels"] for r in got} == {"red", "green;red", ""} and len(got) == 4
    assert sorted(r["split"] for r in got) == ["train", "train", "val", "val"]
    for r in got:  # each row names its image, which is there
        assert (out / r["image"]).is_file() and r["image"].startswith("images/")
    # A hint missing on one image: no split column, the split is the training run's.
    ds.add("shelf", [("e.jpg", jpeg_bytes("yellow", 5), ["red"])], source="upload")
    got = rows(ds.materialize("shelf", None, tmp_path / "unhinted"))
    assert len(got) == 5 and set(got[0]) == {"image", "labels"}
