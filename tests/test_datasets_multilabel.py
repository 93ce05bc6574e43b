"""Multi-label entries in the store's datasets (issue 24, "Datasets"): an image with several labels, or none of
them, beside single-label entries; shown per label, relabelled either way, and written out to train on as a
manifest (`labels.csv` beside the images), on a folder store and on S3. Datasets made from a manifest (a folder
or a .zip with labels.csv), and images added with several labels, through `Datasets`, `refit dataset add` and
the /datasets routes of one real `bentoml serve` (its tests run in file order and share it)."""
from __future__ import annotations

import csv
import io
import json
import zipfile

import pytest
from conftest import jpeg_bytes, run_cli
from serving import AUTH, Server, copy_store

from core.data import DatasetError
from core.datasets import Datasets, MixedKinds, UnknownDataset, entry_labels
from core.manifest import read_manifest


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


# --- a manifest (labels.csv) in a folder or a .zip, images with several labels -------------------------------

def shelf_files(rows: list[tuple[str, str, str]], header: str = "image,labels,split", seed: int = 100
                ) -> dict[str, bytes]:
    """A dataset's files: labels.csv with `rows` (image, labels, split) and each listed image (a photo of
    its own per `seed`)."""
    width = header.count(",") + 1  # without a split column, rows have no split field
    text = "\n".join([header] + [",".join(r[:width]) for r in rows]) + "\n"
    files = {"labels.csv": text.encode()}
    for i, (image, _, _) in enumerate(rows):
        files[image] = jpeg_bytes(("red", "green", "blue", "yellow")[i % 4], seed + i)
    return files


def as_zip(files: dict[str, bytes], top: str = "shelf/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(top + name, data)
    return buf.getvalue()


def as_folder(files: dict[str, bytes], root) -> object:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


SHELF = [("images/a.jpg", "dented;scratched", "train"), ("images/b.jpg", "dented", "train"),
         ("images/c.jpg", "", "val"), ("images/d.jpg", "scratched;dented", "val")]


def test_a_zip_with_a_manifest_adds_labels_split_hints_and_negatives(store, tmp_path):
    ds = Datasets(store)
    files = shelf_files(SHELF)
    files["images/stray.jpg"] = jpeg_bytes("red", 999)  # an image labels.csv does not list
    out = ds.add_zip("shelf", as_zip(files))
    assert {a["name"]: a["labels"] for a in out["added"]} == {
        "images/a.jpg": ["dented", "scratched"], "images/b.jpg": ["dented"], "images/c.jpg": [],
        "images/d.jpg": ["dented", "scratched"]}, out
    (stray,) = out["refused"]
    assert stray["name"] == "images/stray.jpg" and "not listed in labels.csv" in stray["error"]
    shown = ds.show("shelf")
    assert shown["task"] == "multi_label" and shown["negatives"] == 1 and shown["images"] == 4
    assert shown["classes"] == {"dented": 3, "scratched": 2} and shown["splits"] == {"train": 2, "val": 2}
    entries = {e["name"]: e for e in ds.manifest("shelf")["entries"]}
    assert entries["c.jpg"]["labels"] == [] and entries["a.jpg"]["split"] == "train"
    # Written out to train on: the same labels and the manifest's split.
    got = sorted((r["labels"], r["split"]) for r in rows(ds.materialize("shelf", None, tmp_path / "out")))
    assert got == [("", "val"), ("dented", "train"), ("dented;scratched", "train"), ("dented;scratched", "val")]
    # The same zip again: every image a duplicate, nothing new.
    again = ds.add_zip("shelf", as_zip(files))
    assert not again["added"] and len(again["skipped"]) == 4 and again["snapshot"] == out["snapshot"]


def test_a_manifest_of_one_label_per_row_is_single_label_unless_the_dataset_is_not(store, tmp_path):
    ds = Datasets(store)
    one_each = [("x.jpg", "red", "train"), ("y.jpg", "blue", "val")]
    out = ds.add_folder("plain", as_folder(shelf_files(one_each, seed=300), tmp_path / "plain"))
    assert sorted(a["label"] for a in out["added"]) == ["blue", "red"]
    assert "task" not in ds.show("plain")  # one class per image: it stays a single-label dataset
    # The same kind of rows for a multi-label dataset: each image has that one label, as a list.
    ds.add_zip("shelf", as_zip(shelf_files(SHELF)))
    more = [("e.jpg", "dented", ""), ("f.jpg", "scratched", "")]
    out = ds.add_folder("shelf", as_folder(shelf_files(more, "image,labels", seed=200), tmp_path / "more"))
    assert out["refused"] == [] and [a["labels"] for a in out["added"]] == [["dented"], ["scratched"]]
    # A folder of images given a list of labels (the CLI's --labels): multi-label entries, split hints none.
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "g.jpg").write_bytes(jpeg_bytes("green", 7))
    out = ds.add_folder("shelf", folder, label=["dented", "rusty"])
    assert out["added"][0]["labels"] == ["dented", "rusty"] and ds.show("shelf")["classes"]["rusty"] == 1


def test_split_column_absent_gives_no_hints(store, tmp_path):
    ds = Datasets(store)
    out = ds.add_folder("shelf", as_folder(shelf_files(SHELF, "image,labels"),
                                           tmp_path / "d"))
    assert len(out["added"]) == 4 and ds.show("shelf")["splits"] == {"none": 4}


def test_a_dataset_keeps_one_kind(store, tmp_path):
    ds = Datasets(store)
    ds.add("colours", [("a.jpg", jpeg_bytes("red", 1), "red"), ("b.jpg", jpeg_bytes("blue", 2), "blue")],
           source="upload")
    before = ds.show("colours")["snapshot"]
    with pytest.raises(MixedKinds, match="dataset 'colours' is single-label .* send one class per image"):
        ds.add_zip("colours", as_zip(shelf_files(SHELF)))
    with pytest.raises(MixedKinds, match="is single-label"):
        ds.add("colours", [("c.jpg", jpeg_bytes("red", 3), ["red", "blue"])], source="upload", kind="multi_label")
    ds.add_zip("shelf", as_zip(shelf_files(SHELF)))
    folders = as_folder({"red/r.jpg": jpeg_bytes("red", 5), "blue/b.jpg": jpeg_bytes("blue", 6)}, tmp_path / "cf")
    with pytest.raises(MixedKinds, match="dataset 'shelf' is multi-label .* send them with `labels`"):
        ds.add_folder("shelf", folders)
    assert ds.show("colours")["snapshot"] == before and ds.show("shelf")["images"] == 4  # nothing changed
    # A relabel to the other kind is refused the same way when asked (the HTTP route asks).
    sha = ds.manifest("colours")["entries"][0]["sha256"]
    with pytest.raises(MixedKinds, match="is single-label"):
        ds.relabel("colours", sha, ["red", "blue"], same_kind=True)
    shelf_sha = ds.manifest("shelf")["entries"][0]["sha256"]
    with pytest.raises(MixedKinds, match="is multi-label"):
        ds.relabel("shelf", shelf_sha, "dented", same_kind=True)
    assert ds.relabel("shelf", shelf_sha, ["rusty"], same_kind=True)["labels"] == ["rusty"]
    # A replace (a retrain upload) holds only what was sent: its kind is its own.
    out = ds.add_folder("colours", as_folder(shelf_files(SHELF), tmp_path / "replace"), source="retrain",
                        replace=True)
    assert len(out["added"]) == 4 and ds.show("colours")["task"] == "multi_label"


def test_a_bad_manifest_is_refused_with_the_readers_message(store, tmp_path):
    ds = Datasets(store)
    bad = shelf_files(SHELF[:2] + [("images/c.jpg", "dented", "test")])
    bad["labels.csv"] += b"images/gone.jpg,dented,train\nimages/a.jpg,scratched,val\n"
    folder = as_folder(bad, tmp_path / "bad")
    with pytest.raises(DatasetError) as direct:
        read_manifest(folder)
    with pytest.raises(DatasetError) as added:
        ds.add_folder("shelf", folder)
    assert str(added.value) == str(direct.value)
    for what in ("line 4 (images/c.jpg): 'test'", "line 5 (images/gone.jpg)", "line 6 (images/a.jpg) repeats "
                 "line 2", "an unknown split"):
        assert what in str(added.value), added.value
    # From a zip: the same message, naming the file in the archive and no folder of this machine.
    with pytest.raises(DatasetError) as zipped:
        ds.add_zip("shelf", as_zip(bad))
    assert str(zipped.value) == str(direct.value).replace(str(folder), "shelf")
    assert str(store.home) not in str(zipped.value) and str(zipped.value).startswith("shelf/labels.csv: ")
    with pytest.raises(DatasetError, match="header"):
        ds.add_zip("shelf", as_zip({"labels.csv": b"file,tags\nx.jpg,a\n"}))
    with pytest.raises(DatasetError, match="names each image's labels: leave the label out"):
        ds.add_folder("shelf", as_folder(shelf_files(SHELF), tmp_path / "ok"), label="dented")
    with pytest.raises(UnknownDataset):
        ds.show("shelf")  # nothing was made


# --- the CLI and HTTP ---------------------------------------------------------------------------------------

def test_cli_dataset_add_a_manifest_and_images_with_several_labels(tmp_path):
    home = tmp_path / "home"
    folder = as_folder(shelf_files(SHELF), tmp_path / "shelf")
    r = run_cli("dataset", "add", "shelf", folder, "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert sorted(len(a["labels"]) for a in json.loads(r.stdout)["added"]) == [0, 1, 2, 2]
    one = tmp_path / "one.jpg"
    one.write_bytes(jpeg_bytes("green", 501))
    r = run_cli("dataset", "add", "shelf", one, "--labels", "rusty;dented", home=home)
    assert r.returncode == 0 and "added 1" in r.stdout, r.stdout + r.stderr
    batch = tmp_path / "batch"
    batch.mkdir()
    for i in range(2):
        (batch / f"n{i}.jpg").write_bytes(jpeg_bytes("yellow", 600 + i))
    r = run_cli("dataset", "add", "shelf", batch, "--labels", "", home=home)  # '': none of the labels
    assert r.returncode == 0 and "added 2" in r.stdout, r.stdout + r.stderr
    shown = json.loads(run_cli("dataset", "show", "shelf", "--json", home=home).stdout)
    assert shown["classes"] == {"dented": 4, "rusty": 1, "scratched": 2} and shown["negatives"] == 3
    assert "multi-label, 3 with none of the labels" in run_cli("dataset", "show", "shelf", home=home).stdout
    # Refusals, each saying what was wrong.
    r = run_cli("dataset", "add", "shelf", one, "--label", "dented", home=home)
    assert r.returncode == 2 and "dataset 'shelf' is multi-label" in r.stderr, r.stderr
    r = run_cli("dataset", "add", "shelf", folder, "--labels", "dented", home=home)
    assert r.returncode == 2 and "names each image's labels" in r.stderr, r.stderr
    r = run_cli("dataset", "add", "shelf", one, "--labels", "a;;b", home=home)
    assert r.returncode == 2 and "--labels 'a;;b': an empty label name" in r.stderr, r.stderr
    r = run_cli("dataset", "add", "shelf", one, "--label", "a", "--labels", "b", home=home)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("mldatasets")
    (root / "data").mkdir()
    srv = Server(copy_store(imagenet_store, root / "home"), root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop(kill=True)


def post(http, name: str, files: list[tuple[str, bytes]], fields: list[tuple[str, str]], headers=AUTH):
    """`fields` in order, a name repeated as often as it is given (a repeated `labels`)."""
    data: dict[str, list[str]] = {}
    for k, v in fields:
        data.setdefault(k, []).append(v)
    return http.post(f"/datasets/{name}/images", files=[("images", (n, b, "image/jpeg")) for n, b in files],
                     data=data, headers=headers)


def test_http_a_zip_with_labels_csv_and_files_with_several_labels(http, server):
    r = http.post("/datasets/shelf/images", files={"zip": ("shelf.zip", as_zip(shelf_files(SHELF)))}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["added"]) == 4, r.text
    # Repeated `labels`, one value joined by ';', and one empty value (none of the labels).
    r = post(http, "shelf", [("e.jpg", jpeg_bytes("red", 701)), ("f.jpg", jpeg_bytes("blue", 702))],
             [("labels", "rusty"), ("labels", "dented")])
    assert r.status_code == 200 and [a["labels"] for a in r.json()["added"]] == [["dented", "rusty"]] * 2, r.text
    r = post(http, "shelf", [("g.jpg", jpeg_bytes("green", 703))], [("labels", "scratched;rusty")])
    assert r.status_code == 200 and r.json()["added"][0]["labels"] == ["rusty", "scratched"], r.text
    r = post(http, "shelf", [("h.jpg", jpeg_bytes("yellow", 704))], [("labels", "")])
    assert r.status_code == 200 and r.json()["added"][0]["labels"] == [], r.text
    shown = http.get("/datasets/shelf").json()
    assert shown["task"] == "multi_label" and shown["negatives"] == 2 and shown["images"] == 8
    assert shown["classes"] == {"dented": 5, "rusty": 3, "scratched": 3}, shown
    # Relabel with a list; a single label or a string for `labels` is refused, saying why.
    sha = r.json()["added"][0]["sha256"]
    r = http.post(f"/datasets/shelf/images/{sha}", json={"labels": ["dented"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["labels"] == ["dented"] and r.json()["previous_labels"] == [], r.text
    r = http.post(f"/datasets/shelf/images/{sha}", json={"label": "dented"}, headers=AUTH)
    assert r.status_code == 422 and "dataset 'shelf' is multi-label" in r.json()["error"], r.text
    r = http.post(f"/datasets/shelf/images/{sha}", json={"labels": "dented"}, headers=AUTH)
    assert r.status_code == 400 and "labels: send a list of labels" in r.json()["error"], r.text
    r = http.post(f"/datasets/shelf/images/{sha}", json={"label": ["dented"]}, headers=AUTH)
    assert r.status_code == 400 and "label: send one class as a string" in r.json()["error"], r.text
    r = http.post(f"/datasets/shelf/images/{sha}", json={"label": "a", "labels": []}, headers=AUTH)
    assert r.status_code == 400 and "exactly one of those fields" in r.json()["error"], r.text
    assert http.get("/datasets/shelf").json()["negatives"] == 1


def test_http_one_kind_per_dataset_and_bad_fields_named(http, server):
    r = post(http, "shelf", [("i.jpg", jpeg_bytes("red", 801))], [("label", "dented")])
    assert r.status_code == 422 and "dataset 'shelf' is multi-label" in r.json()["error"], r.text
    r = post(http, "colours", [("r.jpg", jpeg_bytes("red", 802))], [("label", "red")])
    assert r.status_code == 200, r.text
    r = post(http, "colours", [("s.jpg", jpeg_bytes("red", 803))], [("labels", "red;blue")])
    assert r.status_code == 422 and "dataset 'colours' is single-label" in r.json()["error"], r.text
    r = http.post("/datasets/colours/images", files={"zip": ("shelf.zip", as_zip(shelf_files(SHELF, seed=900)))},
                  headers=AUTH)
    assert r.status_code == 422 and "is single-label" in r.json()["error"], r.text
    r = post(http, "shelf", [("j.jpg", jpeg_bytes("red", 804))], [("label", "a"), ("labels", "b")])
    assert r.status_code == 400 and "not both" in r.json()["error"], r.text
    r = post(http, "shelf", [("j.jpg", jpeg_bytes("red", 804))], [("labels", "a;;b")])
    assert r.status_code == 400 and "an empty label name in 'a;;b'" in r.json()["error"], r.text
    r = post(http, "shelf", [("j.jpg", jpeg_bytes("red", 804))], [("labels", "a"), ("labels", "")])
    assert r.status_code == 400 and "an empty value beside others" in r.json()["error"], r.text
    r = post(http, "shelf", [("j.jpg", jpeg_bytes("red", 804))], [("labels", "ok"), ("labels", "train")])
    assert r.status_code == 400 and "reserved" in r.json()["error"], r.text
    r = http.post("/datasets/shelf/images", files={"zip": ("s.zip", as_zip(shelf_files(SHELF)))},
                  data={"labels": "a"}, headers=AUTH)
    assert r.status_code == 400 and "a .zip names its labels" in r.json()["error"], r.text
    bad = shelf_files(SHELF)
    bad["labels.csv"] += b"images/gone.jpg,dented,maybe\n"
    r = http.post("/datasets/shelf/images", files={"zip": ("bad.zip", as_zip(bad))}, headers=AUTH)
    error = r.json()["error"]
    assert r.status_code == 400 and error.startswith("shelf/labels.csv: ") and "line 6 (images/gone.jpg)" in error
    assert "an unknown split" in error and str(server.home) not in error, error
    assert http.get("/datasets/shelf").json()["images"] == 8  # nothing was added by a refusal
