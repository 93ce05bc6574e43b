"""Datasets in the store: content-addressed, immutable snapshots on a folder store and on S3, the `refit dataset`
CLI with lineage through `refit train --dataset`, and the /datasets routes and retrain-by-name over HTTP against
one real `bentoml serve`.

HTTP tests run in file order and share one server.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import uuid
import zipfile

import httpx
import pytest
from conftest import S3_BUCKET, jpeg_bytes, make_dataset, run_cli
from serving import AUTH, Server, copy_store, make_zip, wait_task

from core.data import DatasetError
from core.datasets import Datasets, UnknownDataset, blob_key
from core.store import Store

FAST = {"strategy": "feature_extraction", "head_epochs": 20, "promote": False, "int8": False}


@pytest.fixture
def store(any_store):
    return any_store


def blob_count(store: Store) -> int:
    if store.remote:
        return len(store.remote.list("datasets/blobs/"))
    return sum(1 for p in (store.root / "datasets" / "blobs").rglob("*") if p.is_file())


def items(colour: str, seeds, label: str | None = None):
    return [(f"{colour}_{i}.jpg", jpeg_bytes(colour, i), label or colour) for i in seeds]


def test_same_upload_twice_is_the_same_snapshot_and_one_object_per_photo(store):
    ds = Datasets(store)
    photos = items("red", range(3)) + items("blue", range(3))
    first = ds.add("colours", photos, source="upload")
    assert first["snapshot"] and len(first["added"]) == 6 and not first["skipped"] and not first["refused"]
    assert blob_count(store) == 6
    again = ds.add("colours", photos, source="upload")
    assert again["snapshot"] == first["snapshot"] and not again["added"]
    assert [s["name"] for s in again["skipped"]] == [p[0] for p in photos]
    assert all("duplicate" in s["reason"] for s in again["skipped"])
    assert blob_count(store) == 6 and len(ds.show("colours")["snapshots"]) == 1  # nothing new was written
    # The same photo in another dataset is the same object too.
    ds.add("other", photos[:2], source="cli")
    assert blob_count(store) == 6
    # The id is the hash of the content: the entries, as stored.
    doc = ds.manifest("colours")
    assert doc["id"] == first["snapshot"] and len(doc["entries"]) == 6
    e = doc["entries"][0]
    assert {"sha256", "label", "split", "source", "added_at"} <= set(e) and e["source"] == "upload"
    sha = hashlib.sha256(photos[0][1]).hexdigest()
    assert ds.has_image(sha) and not ds.has_image("0" * 64)


def test_relabel_and_remove_make_new_snapshots_and_the_old_ones_stay(store):
    ds = Datasets(store)
    first = ds.add("colours", items("red", range(3)) + items("blue", range(2)), source="upload")
    sha = first["added"][0]["sha256"]
    before = ds.manifest("colours", first["snapshot"])
    relabelled = ds.relabel("colours", sha, "blue")
    assert relabelled["changed"] and relabelled["parent"] == first["snapshot"]
    assert relabelled["snapshot"] != first["snapshot"]
    removed = ds.remove("colours", first["added"][1]["sha256"])
    assert removed["parent"] == relabelled["snapshot"]
    info = ds.show("colours")
    assert info["snapshot"] == removed["snapshot"] and info["classes"] == {"blue": 3, "red": 1}
    assert [h["snapshot"] for h in info["snapshots"]] == [removed["snapshot"], relabelled["snapshot"],
                                                          first["snapshot"]]
    assert [h["action"] for h in info["snapshots"]] == ["remove", "relabel", "add"]
    assert ds.manifest("colours", first["snapshot"]) == before  # immutable: the old snapshot is unchanged
    assert ds.has_image(first["added"][1]["sha256"])  # removing from a snapshot keeps the bytes
    # Relabelling to the label it has changes nothing.
    same = ds.relabel("colours", sha, "blue")
    assert not same["changed"] and same["snapshot"] == removed["snapshot"]
    with pytest.raises(UnknownDataset, match="no image"):
        ds.remove("colours", "f" * 64)
    with pytest.raises(UnknownDataset, match="nope"):
        ds.show("nope")
    with pytest.raises(UnknownDataset, match="no snapshot"):
        ds.manifest("colours", "0123456789abcdef")
    with pytest.raises(DatasetError, match="not allowed"):
        ds.relabel("colours", sha, "a/b")


def test_concurrent_adds_both_land(store):
    """Several writers add to one dataset at once: every image ends up in the newest snapshot."""
    writers = [Datasets(Store(store.home, url=store.url)) for _ in range(4)]
    replies, errors = [], []

    def add(k: int) -> None:
        try:
            replies.append(writers[k].add("shared", items("green", range(10 * k, 10 * k + 3)), source="upload"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    info = Datasets(store).show("shared")
    assert info["images"] == 12, info
    assert len(info["snapshots"]) == 4  # one per add, each on top of the one before
    chain = info["snapshots"]
    assert all(chain[i]["parent"] == chain[i + 1]["snapshot"] for i in range(3)) and chain[-1]["parent"] is None


def test_refusals_by_name_zip_layout_and_split_hints(store, tmp_path):
    ds = Datasets(store)
    broken = jpeg_bytes("red", 99, size=(300, 300))[:3000]  # header intact, pixel data cut short
    big = jpeg_bytes("red", 5, size=(600, 600))
    r = ds.add("checks", items("red", range(2)) + [("notes.txt", b"hello", "red"), ("cut.jpg", broken, "red"),
                                                   ("big.jpg", big, "red")],
               source="upload", max_file_bytes=len(big) - 1)
    refused = {x["name"]: x["error"] for x in r["refused"]}
    assert set(refused) == {"notes.txt", "cut.jpg", "big.jpg"}, refused
    assert "not an image" in refused["notes.txt"] and "corrupt or truncated" in refused["cut.jpg"], refused
    assert "over the limit" in refused["big.jpg"] and len(r["added"]) == 2
    with pytest.raises(DatasetError, match="dataset name"):
        ds.add("../evil", items("red", [0]), source="upload")
    bad_label = ds.add("checks", [("x.jpg", jpeg_bytes("blue", 7), ".hidden")], source="upload")
    assert "not allowed" in bad_label["refused"][0]["error"]
    # A zip with train/ and val/ gives split hints; materialized, it is a train/val folder training reads.
    folder = make_dataset(tmp_path / "split", classes=("red", "blue"), n=3, split=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in folder.rglob("*.jpg"):
            z.write(p, "photos/" + p.relative_to(folder).as_posix())
    z_reply = ds.add_zip("split", buf.getvalue())
    assert len(z_reply["added"]) == 10 and not z_reply["refused"], z_reply
    assert ds.show("split")["splits"] == {"train": 6, "val": 4}
    out = ds.materialize("split", None, tmp_path / "out")
    assert sorted(p.relative_to(out).parts[:2] for p in out.rglob("*.jpg")).count(("val", "red")) == 2
    assert {p.relative_to(out).parts[0] for p in out.rglob("*.jpg")} == {"train", "val"}
    with pytest.raises(DatasetError, match="not a valid .zip"):
        ds.add_zip("split", b"PK not a zip")


# --- the CLI ------------------------------------------------------------------------------------------------

def test_cli_dataset_add_list_show_and_train_with_lineage(tmp_path, imagenet_store):
    home = copy_store(imagenet_store, tmp_path / "home")
    folder = make_dataset(tmp_path / "photos", classes=("red", "blue"), n=6)
    r = run_cli("dataset", "add", "colours", folder, "--json", home=home)
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    assert len(added["added"]) == 12
    # One more image with --label, and a non-image refused by name.
    extra = tmp_path / "extra.jpg"
    extra.write_bytes(jpeg_bytes("red", 777))
    r = run_cli("dataset", "add", "colours", extra, "--label", "red", home=home)
    assert r.returncode == 0 and "added 1" in r.stdout, r.stdout + r.stderr
    (tmp_path / "notes.jpg").write_text("not a photo")
    r = run_cli("dataset", "add", "colours", tmp_path / "notes.jpg", "--label", "red", home=home)
    assert r.returncode == 2 and "refused notes.jpg: not an image" in r.stdout, r.stdout + r.stderr
    r = run_cli("dataset", "add", "bad/name", folder, home=home)
    assert r.returncode == 2 and "dataset name" in r.stderr, r.stderr
    listing = json.loads(run_cli("dataset", "list", "--json", home=home).stdout)
    [row] = listing
    assert row["dataset"] == "colours" and row["images"] == 13 and row["classes"] == 2
    shown = run_cli("dataset", "show", "colours", home=home)
    assert "red" in shown.stdout and "7" in shown.stdout and row["snapshot"] in shown.stdout, shown.stdout
    r = run_cli("dataset", "show", "nope", home=home)
    assert r.returncode == 2 and "no dataset 'nope'" in r.stderr
    # Train on the first snapshot by id, then on the newest by name.
    r = run_cli("train", "--dataset", "colours", "--snapshot", added["snapshot"], "--strategy",
                "feature_extraction", "--head-epochs", "10", "--no-int8", "--promote", "false", "--json", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["lineage"] == {"dataset": "colours", "snapshot": added["snapshot"]}
    version = result["version"]
    meta = Store(home).info(version)
    assert meta["lineage"] == result["lineage"] and meta["metrics"]["lineage"] == result["lineage"]
    config = json.loads((Store(home).path(version) / "config.json").read_text())
    assert config["dataset"] == "colours" and config["snapshot"] == added["snapshot"]
    versions = run_cli("versions", home=home).stdout
    assert f"dataset colours@{added['snapshot']}" in versions, versions
    r = run_cli("train", "--dataset", "nope", home=home)
    assert r.returncode == 2 and "no dataset 'nope'" in r.stderr, r.stderr


# --- over HTTP -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    (root / "data").mkdir()
    srv = Server(copy_store(imagenet_store, root / "home"), root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop(kill=True)


def upload(http, name: str, files: list[tuple[str, bytes]], label: str | None, headers=AUTH):
    data = {"label": label} if label is not None else {}
    return http.post(f"/datasets/{name}/images", files=[("images", (n, b, "image/jpeg")) for n, b in files],
                     data=data, headers=headers)


def test_http_add_files_with_a_label_duplicates_skipped_non_images_refused(http, server):
    reds = [(f"r{i}.jpg", jpeg_bytes("red", i)) for i in range(4)]
    r = upload(http, "colours", reds, "red")
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["dataset"] == "colours" and len(first["added"]) == 4 and first["snapshot"]
    # The same photos again plus a new one and a non-image: one added, four skipped, one refused by name.
    r = upload(http, "colours", reds + [("r9.jpg", jpeg_bytes("red", 9)), ("notes.jpg", b"not an image")], "red")
    assert r.status_code == 200, r.text
    again = r.json()
    assert [a["name"] for a in again["added"]] == ["r9.jpg"]
    assert sorted(s["name"] for s in again["skipped"]) == [n for n, _ in reds]
    assert [x["name"] for x in again["refused"]] == ["notes.jpg"] and "not an image" in again["refused"][0]["error"]
    assert again["snapshot"] != first["snapshot"]
    # Only a non-image: nothing added, a 422 naming it.
    r = upload(http, "colours", [("readme.txt", b"hello")], "red")
    assert r.status_code == 422 and "readme.txt" in r.json()["error"], r.text
    # Writes need the token; a label is required; a bad name is a 400 naming what is allowed.
    assert upload(http, "colours", reds, "red", headers={}).status_code == 401
    r = upload(http, "colours", reds, None)
    assert r.status_code == 400 and "label" in r.json()["error"], r.text
    r = upload(http, "bad name!", reds, "red")
    assert r.status_code == 400 and "dataset name" in r.json()["error"], r.text
    # The objects in the store: one per photo.
    blobs = [p for p in (server.home / "datasets" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 5


def test_http_add_zip_show_list_relabel_remove(http):
    blues = {f"blue/b{i}.jpg": jpeg_bytes("blue", i) for i in range(4)}
    r = http.post("/datasets/colours/images", files={"zip": ("blues.zip", make_zip(blues))}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert sorted(a["label"] for a in r.json()["added"]) == ["blue"] * 4
    shown = http.get("/datasets/colours").json()
    assert shown["classes"] == {"blue": 4, "red": 5} and shown["images"] == 9
    assert [d["dataset"] for d in http.get("/datasets").json()] == ["colours"]
    sha = r.json()["added"][0]["sha256"]
    r = http.post(f"/datasets/colours/images/{sha}", json={"label": "red"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["changed"], r.text
    relabelled = r.json()["snapshot"]
    r = http.delete(f"/datasets/colours/images/{sha}", headers=AUTH)
    assert r.status_code == 200 and r.json()["parent"] == relabelled, r.text
    assert http.get("/datasets/colours").json()["classes"] == {"blue": 3, "red": 5}
    old = http.get(f"/datasets/colours/snapshots/{relabelled}", headers=AUTH).json()  # a manifest: token
    assert any(e["sha256"] == sha and e["label"] == "red" for e in old["entries"])  # the old one stays
    r = http.delete(f"/datasets/colours/images/{sha}", headers=AUTH)
    assert r.status_code == 404 and sha in r.json()["error"], r.text
    r = http.post("/datasets/colours/images/abc", json={"label": "a/b"}, headers=AUTH)
    assert r.status_code == 400 and "not allowed" in r.json()["error"], r.text
    assert http.delete(f"/datasets/colours/images/{sha}").status_code == 401


def test_http_unknown_dataset_or_snapshot_is_404_with_the_name(http):
    r = http.get("/datasets/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"], r.text
    r = http.get("/datasets/colours/snapshots/0123456789abcdef", headers=AUTH)
    assert r.status_code == 404 and "0123456789abcdef" in r.json()["error"], r.text
    r = http.post("/retrain/submit", json={"dataset": "nope", **FAST}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["error"], r.text
    r = http.post("/retrain/submit", data={"dataset": "colours", "snapshot": "0123456789abcdef"}, headers=AUTH)
    assert r.status_code == 404 and "0123456789abcdef" in r.json()["error"], r.text
    assert http.get("/jobs", headers=AUTH).json() == []  # nothing admitted


def test_http_retrain_from_a_dataset_name_records_lineage(http):
    newest = http.get("/datasets/colours").json()["snapshot"]
    r = http.post("/retrain/submit", json={"dataset": "colours", **FAST}, headers=AUTH)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    assert wait_task(http, task, timeout=300)["status"] == "completed", \
        http.get("/retrain/get", params={"task_id": task}, headers=AUTH).text
    result = http.get("/retrain/get", params={"task_id": task}, headers=AUTH).json()
    assert result["lineage"] == {"dataset": "colours", "snapshot": newest}
    rows = {v["id"]: v for v in http.get("/versions").json()["versions"]}
    assert rows[result["version"]]["lineage"] == {"dataset": "colours", "snapshot": newest}
    assert sorted(result["classes"]) == ["blue", "red"]


def test_http_retrain_upload_becomes_a_snapshot_and_the_version_names_it(http):
    files = {f"{c}/{i}.jpg": jpeg_bytes(c, 50 + i) for c in ("red", "green") for i in range(4)}
    files["red/broken.jpg"] = b"not a jpeg"
    r = http.post("/retrain/submit", files={"dataset": ("colours.zip", make_zip(files))},
                  data={k: json.dumps(v) for k, v in FAST.items()}, headers=AUTH)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    assert wait_task(http, task, timeout=300)["status"] == "completed"
    result = http.get("/retrain/get", params={"task_id": task}, headers=AUTH).json()
    uploads = http.get("/datasets/uploads").json()
    assert result["lineage"] == {"dataset": "uploads", "snapshot": uploads["snapshot"]}
    assert uploads["classes"] == {"green": 4, "red": 4}  # exactly what was uploaded
    assert [s["path"] for s in result["skipped"]] == ["red/broken.jpg"]
    rows = {v["id"]: v for v in http.get("/versions").json()["versions"]}
    assert rows[result["version"]]["lineage"]["dataset"] == "uploads"


# --- on the job queue, with an S3 store --------------------------------------------------------------------

def test_queue_retrain_from_a_dataset_name_on_s3(s3_endpoint, redis_url, tmp_path):
    """With REFIT_STORE on S3 and REFIT_QUEUE, images added over HTTP land in the bucket, a retrain by dataset
    name carries no dataset.zip, and `refit worker` materializes the snapshot from the store and records it."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_store_contract import publish

    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    seeder = Store(tmp_path / "seeder", url=url)
    seeder.promote(publish(seeder, tmp_path, 1), actor="setup")
    (tmp_path / "data").mkdir()
    env = {"REFIT_STORE": url, "REFIT_QUEUE": redis_url, "REFIT_TRAIN_STANDBY": "0"}
    srv = Server(tmp_path / "replica", tmp_path / "data", tmp_path / "serve.log", env=env)
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120, headers=AUTH) as http:
            for colour in ("red", "blue"):
                r = upload(http, "colours", [(f"{colour}{i}.jpg", jpeg_bytes(colour, i)) for i in range(4)], colour)
                assert r.status_code == 200 and len(r.json()["added"]) == 4, r.text
            snapshot = r.json()["snapshot"]
            assert Datasets(Store(tmp_path / "reader", url=url)).show("colours")["images"] == 8  # in the bucket
            r = http.post("/retrain/submit", json={"dataset": "colours", **FAST})
            assert r.status_code == 200, r.text
            task = r.json()["task_id"]
            record, _ = seeder.record(f"jobs/{task}/job.json")
            assert record["request"]["snapshot"] == snapshot and not record.get("dataset")  # no zip carried
            worker = subprocess.run([sys.executable, "-m", "cli", "worker", "--burst"], cwd=ROOT,
                                    env={**os.environ, **env, "REFIT_HOME": str(tmp_path / "worker"),
                                         "BENTOML_HOME": str(tmp_path / "worker")},
                                    capture_output=True, text=True, timeout=600)
            assert worker.returncode == 0, worker.stderr[-3000:]
            assert wait_task(http, task, timeout=60)["status"] == "completed", http.get(f"/jobs/{task}").text
            result = http.get("/retrain/get", params={"task_id": task}).json()
            assert result["lineage"] == {"dataset": "colours", "snapshot": snapshot}
            rows = {v["id"]: v for v in http.get("/versions").json()["versions"]}
            assert rows[result["version"]]["lineage"] == result["lineage"]
    finally:
        srv.stop(kill=True)


def test_real_photos_are_content_addressed(store, real_data):
    """Hymenoptera photos: the same upload twice is the same snapshot; a photo renamed or in another dataset is
    still one object; train/ and val/ become split hints."""
    photos = [(f"{split}/{cls}/{p.name}", p.read_bytes(), cls, split)
              for split in ("train", "val") for cls in ("ants", "bees")
              for p in sorted((real_data / split / cls).glob("*.jpg"))[:3]]
    ds = Datasets(store)
    first = ds.add("hymenoptera", photos, source="upload")
    assert len(first["added"]) == 12 and not first["refused"], first["refused"]
    assert ds.add("hymenoptera", photos, source="upload")["snapshot"] == first["snapshot"]
    renamed = [("copy-of-" + n.split("/")[-1], b, c) for n, b, c, _ in photos[:4]]
    dup = ds.add("hymenoptera", renamed, source="upload")
    assert not dup["added"] and len(dup["skipped"]) == 4 and dup["snapshot"] == first["snapshot"]
    ds.add("elsewhere", renamed, source="upload")
    assert blob_count(store) == 12
    assert ds.show("hymenoptera")["splits"] == {"train": 6, "val": 6}
    for e in ds.manifest("hymenoptera")["entries"]:
        assert store.exists(blob_key(e["sha256"])) and e["format"] == "JPEG"
