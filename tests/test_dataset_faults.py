"""Datasets under faults (issue 20, items 10, 11, 13, 14): one label rule in bytes and characters everywhere,
invisible and bidi characters refused and labels stored in NFC, snapshots that cost what a change changes
and leave no orphan behind a lost race, and a sweep at start of what a killed add left, never what a live
add still uses.

Store-level tests run on a folder store and on moto's S3 (`any_store`); the route tests and the kill -9 test
share one real `bentoml serve`, started on a REFIT_HOME where an add was killed and another is still running.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, jpeg_bytes, make_dataset, run_cli
from PIL import Image
from serving import AUTH, Server, copy_store, make_zip, predict, solid, wait_task

from core import snapshots
from core.data import DatasetError, load_dataset
from core.dataset_sweep import sweep_blobs
from core.datasets import Datasets, blob_key, check_label
from core.store import Store

BEES = "\U0001F41D" * 70  # 70 characters, 280 bytes in UTF-8: under the old character limit, over NAME_MAX
INVISIBLE = ["\u200b", "\u202e", "\ufeff", "\u2028", "\u0085", "\u200d", "\u00a0", "\u2066", "\ue000",
             "\ufe0f", "\u3164", "\x07"]


def tiny_png(i: int) -> bytes:
    """A distinct, valid 8 x 8 image: small synthetic blobs for datasets of thousands of entries."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def snapshot_files(store: Store, name: str) -> dict[str, dict]:
    return {k.rsplit("/", 1)[1][:-5]: v for k, v in store.records(f"datasets/{name}/snapshots/").items()}


# --- items 10 and 11: one label rule ----------------------------------------------------------------------

@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_invisible_bidi_and_control_characters_are_refused_by_name(char):
    with pytest.raises(DatasetError, match=f"U\\+{ord(char):04X}") as e:
        check_label(f"ants{char}")
    assert "not allowed" in str(e.value) and "NFC" in str(e.value)
    with pytest.raises(DatasetError, match=f"U\\+{ord(char):04X}"):
        check_label(f"{char}ants")


def test_labels_are_counted_in_bytes_and_characters_and_stored_in_nfc():
    with pytest.raises(DatasetError, match="280 bytes in UTF-8, over 255"):
        check_label(BEES)
    with pytest.raises(DatasetError, match="101 characters, over 100"):
        check_label("a" * 101)
    assert check_label("\u00e9" * 100) == "\u00e9" * 100  # 200 bytes: allowed
    assert check_label("cafe\u0301") == "caf\u00e9"  # NFD in, NFC stored
    assert check_label("  bees\r\n") == "bees" and check_label("a b") == "a b"
    for bad in ("a/b", ".hidden", "train", "", "   ", None, "\ud800"):
        with pytest.raises(DatasetError):
            check_label(bad)


def test_one_class_per_label_in_a_dataset_and_in_a_training_folder(any_store, tmp_path):
    ds = Datasets(any_store)
    r = ds.add("cafes", [("a.jpg", jpeg_bytes("red", 1), "cafe\u0301"), ("b.jpg", jpeg_bytes("red", 2), "caf\u00e9"),
                         ("c.jpg", jpeg_bytes("blue", 3), "ants\u200b")], source="upload")
    assert len(r["added"]) == 2 and "U+200B" in r["refused"][0]["error"], r
    assert ds.show("cafes")["classes"] == {"caf\u00e9": 2}
    # The training reader's class folders meet the same rule: NFD and NFC folders are one class ...
    root = make_dataset(tmp_path / "photos", classes=("red", "blue"), n=3)
    (root / "red").rename(root / "cafe\u0301")
    nfc = root / "caf\u00e9"
    nfc.mkdir()
    for i in range(2):
        (nfc / f"x{i}.jpg").write_bytes(jpeg_bytes("red", 50 + i))
    data = load_dataset(root)
    assert data.classes == ["blue", "caf\u00e9"] and data.counts()["train"]["caf\u00e9"] + \
        data.counts()["val"]["caf\u00e9"] == 5
    # ... and a folder with an invisible character, or a name over 255 bytes, is refused by name.
    (root / "blue").rename(root / "blue\u200b")
    with pytest.raises(DatasetError, match="U\\+200B"):
        load_dataset(root)
    (root / "blue\u200b").rename(root / ("\u00e9" * 101))
    with pytest.raises(DatasetError, match="101 characters"):
        load_dataset(root)


def test_cli_dataset_add_takes_the_same_rule(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg_bytes("red", 1))
    r = run_cli("dataset", "add", "d", image, "--label", "ants\u200b", home=tmp_path / "home")
    assert r.returncode == 2 and "U+200B" in r.stdout, r.stdout + r.stderr
    r = run_cli("dataset", "add", "d", image, "--label", BEES, home=tmp_path / "home")
    assert r.returncode == 2 and "280 bytes" in r.stdout, r.stdout + r.stderr


# --- item 13: snapshots as deltas, no orphans ----------------------------------------------------------------

def _dataset_bytes(store: Store, name: str) -> int:
    base = store.root / "datasets" / name
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())


def _cost_per_change(tmp_path: Path, size: int, changes: int = 32) -> tuple[float, Datasets, list]:
    store = Store(tmp_path / f"home-{size}")
    ds = Datasets(store)
    ds.add("big", [(f"{i}.png", tiny_png(i), f"c{i % 7}") for i in range(size)], source="zip")
    before = _dataset_bytes(store, "big")
    seen = []  # (snapshot, the entries it must hold) for every change
    extra = [(f"n{i}.png", tiny_png(10_000_000 + size + i), "new") for i in range(changes)]
    for i in range(changes):
        if i % 3 == 0:
            r = ds.add("big", [extra[i]], source="feedback")
        elif i % 3 == 1:
            sha = ds.manifest("big")["entries"][i]["sha256"]
            r = ds.relabel("big", sha, f"relabelled{i}")
        else:
            r = ds.remove("big", ds.manifest("big")["entries"][i]["sha256"])
        seen.append((r["snapshot"], {(e["sha256"], e["label"]) for e in ds.manifest("big")["entries"]}))
    return (_dataset_bytes(store, "big") - before) / changes, ds, seen


def test_a_one_image_change_costs_what_it_changes_not_the_dataset_size(tmp_path):
    small, _, _ = _cost_per_change(tmp_path, 300)
    large, ds, seen = _cost_per_change(tmp_path, 3000)
    # A full manifest of 3000 entries is about 800 kB; a change now writes a few entries and a history event.
    assert large < 8_000, f"{large:.0f} bytes per one-image change on 3000 images"
    assert large < 2 * small + 1_000, f"{small:.0f} bytes per change on 300 images, {large:.0f} on 3000"
    # Every version of the history still reads whole, from a fresh process's view (no cache).
    snapshots._cache.clear()
    for sid, expected in seen:
        doc = ds.manifest("big", sid)
        assert doc["id"] == sid and {(e["sha256"], e["label"]) for e in doc["entries"]} == expected
        assert set(doc) == {"dataset", "id", "parent", "created", "entries"}


def test_full_checkpoints_bound_the_reads(tmp_path):
    """Relabelling over and over: once the entries changed since the last full snapshot reach the dataset's
    size (at least CHECKPOINT_MIN), the next snapshot is written full again."""
    store = Store(tmp_path / "home")
    ds = Datasets(store)
    first = ds.add("small", [(f"{i}.png", tiny_png(i), "a") for i in range(10)], source="zip")
    shas = [a["sha256"] for a in first["added"]]
    expected = {}
    for i in range(3 * snapshots.CHECKPOINT_MIN):
        r = ds.relabel("small", shas[i % 10], f"l{i}")
        expected[r["snapshot"]] = {e["sha256"]: e["label"] for e in ds.manifest("small")["entries"]}
    files = snapshot_files(store, "small")
    full = [sid for sid, rec in files.items() if "entries" in rec]
    deltas = [rec for rec in files.values() if snapshots.is_delta(rec)]
    assert len(full) == 4 and len(deltas) == len(files) - 4, [r.get("depth") for r in files.values()]
    # A read follows at most log2(depth) + 1 deltas: each base's depth is the depth with its lowest bit cleared.
    for rec in deltas:
        base = files.get(rec["base"], {})
        assert base.get("depth", 0) == rec["depth"] & (rec["depth"] - 1) and rec["depth"] <= snapshots.CHECKPOINT_MIN
    snapshots._cache.clear()
    for sid, labels in expected.items():
        assert {e["sha256"]: e["label"] for e in ds.manifest("small", sid)["entries"]} == labels


def test_concurrent_adds_leave_no_orphan_snapshot(any_store):
    """Writers racing on one head: each loser retries on the newer head and writes nothing while it loses."""
    base = Datasets(any_store)
    base.add("race", [("seed.jpg", jpeg_bytes("red", 0), "red")], source="upload")
    n_threads, per = 8, 3
    gate, errors = threading.Barrier(n_threads), []

    def writer(k: int) -> None:
        ds = Datasets(Store(any_store.home, url=any_store.url))
        try:
            gate.wait(30)
            for j in range(per):
                ds.add("race", [(f"{k}-{j}.jpg", jpeg_bytes("blue", 100 * k + j), "blue")], source="upload")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    info = base.show("race")
    assert info["images"] == 1 + n_threads * per
    history = {h["snapshot"] for h in info["snapshots"]}
    files = snapshot_files(any_store, "race")
    assert set(files) == history, f"orphans: {sorted(set(files) - history)}; missing: {sorted(history - set(files))}"
    for h in info["snapshots"]:
        assert len(base.manifest("race", h["snapshot"])["entries"]) == h["images"]


def test_a_winner_killed_before_its_snapshot_file_is_still_read_and_written_by_the_next(any_store):
    ds = Datasets(any_store)
    first = ds.add("k", [("a.jpg", jpeg_bytes("red", 1), "red")], source="upload")
    second = ds.add("k", [("b.jpg", jpeg_bytes("red", 2), "red")], source="upload")
    any_store.delete_record(snapshots.key("k", second["snapshot"]))  # the state a kill right after the CAS leaves
    snapshots._cache.clear()
    assert len(ds.manifest("k")["entries"]) == 2 and ds.resolve("k", second["snapshot"]) == second["snapshot"]
    third = ds.add("k", [("c.jpg", jpeg_bytes("red", 3), "red")], source="upload")
    assert set(snapshot_files(any_store, "k")) == {first["snapshot"], second["snapshot"], third["snapshot"]}
    snapshots._cache.clear()
    assert len(ds.manifest("k", second["snapshot"])["entries"]) == 2


def test_a_large_change_leaves_the_head_small_once_its_file_is_written(any_store):
    ds = Datasets(any_store)
    r = ds.add("wide", [(f"{i}.png", tiny_png(300 + i), "a") for i in range(snapshots.SLIM_ENTRIES + 6)], source="zip")
    head, _ = any_store.record("datasets/wide/head.json")
    assert head["snapshot"] == r["snapshot"] and "record" not in head
    assert "entries" in snapshot_files(any_store, "wide")[r["snapshot"]]  # a dataset's first snapshot is full
    one = ds.add("wide", [("b.png", tiny_png(1), "b")], source="upload")
    head, _ = any_store.record("datasets/wide/head.json")
    assert head["record"]["id"] == one["snapshot"] and len(head["record"]["put"]) == 1
    snapshots._cache.clear()
    assert len(ds.manifest("wide")["entries"]) == snapshots.SLIM_ENTRIES + 7


def _old_format_dataset(store: Store, name: str, entries: list[dict]) -> str:
    """A dataset as the store held it before deltas: full snapshots and a head without a record."""
    from core.datasets import snapshot_id

    sid = snapshot_id(entries)
    doc = {"dataset": name, "id": sid, "parent": None, "created": "2026-01-01T00:00:00+00:00",
           "entries": sorted(entries, key=lambda e: e["sha256"])}
    store.put_record(snapshots.key(name, sid), doc, create_only=True)
    event = {"snapshot": sid, "parent": None, "action": "add", "at": doc["created"], "images": len(entries),
             "classes": len({e["label"] for e in entries})}
    store.put_record(f"datasets/{name}/head.json", {"dataset": name, "snapshot": sid, "updated": doc["created"],
                                                   "history": [event]})
    return sid


def _entry(store: Store, data: bytes, label: str) -> dict:
    sha = Datasets(store).put_blob(data)
    return {"sha256": sha, "label": label, "split": None, "source": "upload", "added_at": "2026-01-01T00:00:00+00:00",
            "name": f"{sha[:8]}.jpg", "format": "JPEG"}


def test_a_store_written_before_deltas_still_reads_and_grows(any_store):
    written = [_entry(any_store, jpeg_bytes("red", i), "red") for i in range(3)]
    old = _old_format_dataset(any_store, "old", written)
    ds = Datasets(any_store)
    assert len(ds.manifest("old", old)["entries"]) == 3 and ds.show("old")["classes"] == {"red": 3}
    new = ds.add("old", [("n.jpg", jpeg_bytes("blue", 9), "blue")], source="upload")
    assert new["snapshot"] != old and snapshots.is_delta(snapshot_files(any_store, "old")[new["snapshot"]])
    snapshots._cache.clear()
    assert ds.manifest("old", old)["entries"] == sorted(written, key=lambda e: e["sha256"])
    assert len(ds.manifest("old", new["snapshot"])["entries"]) == 4
    assert [h["snapshot"] for h in ds.show("old")["snapshots"]] == [new["snapshot"], old]


def test_a_class_stored_in_nfd_stays_one_class(tmp_path):
    store = Store(tmp_path / "home")
    nfd = "cafe\u0301"
    _old_format_dataset(store, "mac", [_entry(store, jpeg_bytes("red", i), nfd) for i in range(2)])
    ds = Datasets(store)
    added = ds.add("mac", [("n.jpg", jpeg_bytes("red", 9), "caf\u00e9")], source="upload")
    assert added["added"][0]["label"] == nfd and ds.show("mac")["classes"] == {nfd: 3}
    moved = ds.relabel("mac", added["added"][0]["sha256"], "blue")
    back = ds.relabel("mac", added["added"][0]["sha256"], "caf\u00e9")
    assert moved["label"] == "blue" and back["label"] == nfd and ds.show("mac")["classes"] == {nfd: 3}


def test_a_snapshot_write_that_fails_after_the_head_moved_is_not_an_error(any_store, monkeypatch):
    from core.store import StoreError

    ds = Datasets(any_store)
    ds.add("late", [("a.jpg", jpeg_bytes("red", 1), "red")], source="upload")
    real = snapshots.write

    def fails(*a, **k):
        raise StoreError("the store dropped the connection")

    monkeypatch.setattr(snapshots, "write", fails)
    landed = ds.add("late", [("b.jpg", jpeg_bytes("red", 2), "red")], source="upload")
    monkeypatch.setattr(snapshots, "write", real)
    assert landed["added"] and ds.resolve("late") == landed["snapshot"]
    assert landed["snapshot"] not in snapshot_files(any_store, "late")
    ds.add("late", [("c.jpg", jpeg_bytes("red", 3), "red")], source="upload")  # its settle writes the file
    assert landed["snapshot"] in snapshot_files(any_store, "late")
    snapshots._cache.clear()
    assert len(ds.manifest("late", landed["snapshot"])["entries"]) == 2


# --- item 14: what a killed add leaves ---------------------------------------------------------------------

def test_a_sweep_between_making_a_scratch_folder_and_locking_it_leaves_it(tmp_path, monkeypatch):
    import fcntl

    from core import scratch

    home, swept = tmp_path / "home", []

    class Racing:  # fcntl as run_folder sees it, with a sweep of another process just before its lock
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        def flock(self, fd, op):
            if op == fcntl.LOCK_EX and not swept:
                swept.append(scratch.sweep(home))
            return fcntl.flock(fd, op)

    monkeypatch.setattr(scratch, "fcntl", Racing())
    with scratch.run_folder(home, "refit-dataset") as path:
        assert swept == [[]] and path.is_dir()
        (path / "upload.zip").write_bytes(b"zip")
        assert scratch.sweep(home) == [] and path.is_dir()  # locked while in use
    assert not path.exists()
    hidden = scratch.scratch_root(home) / ".refit-dataset-1-dead"  # a maker killed between mkdir and rename
    hidden.mkdir()
    assert scratch.sweep(home) == [] and hidden.is_dir()
    os.utime(hidden, (time.time() - 2 * scratch.HIDDEN_GRACE,) * 2)
    assert scratch.sweep(home) == [hidden.name] and not hidden.exists()


def test_the_start_sweep_looks_for_unreferenced_images_on_a_folder_store_only(any_store, monkeypatch):
    from service.bootstrap import sweep_datasets as _sweep_datasets

    monkeypatch.setenv("REFIT_DATASET_BLOB_GRACE_SECONDS", "0.01")
    orphan = Datasets(any_store).put_blob(jpeg_bytes("blue", 5))
    time.sleep(0.05)
    _sweep_datasets(any_store)
    assert Datasets(any_store).has_image(orphan) == bool(any_store.remote)

def test_only_unreferenced_old_images_are_swept(any_store):
    ds = Datasets(any_store)
    first = ds.add("keep", [(f"{i}.jpg", jpeg_bytes("red", i), "red") for i in range(3)], source="upload")
    removed = first["added"][0]["sha256"]
    ds.remove("keep", removed)  # still named by the first snapshot: kept
    only_in_head = ds.add("keep", [("h.jpg", jpeg_bytes("red", 77), "red")], source="upload")
    any_store.delete_record(snapshots.key("keep", only_in_head["snapshot"]))  # named only by the head's record
    orphan = ds.put_blob(jpeg_bytes("blue", 5))  # written by an add that was killed before its snapshot
    assert sweep_blobs(any_store, blob_age=3600) == []  # younger than the grace: an add may be in flight
    assert sweep_blobs(any_store, blob_age=0) == [orphan]
    assert not ds.has_image(orphan) and ds.has_image(removed) and ds.has_image(only_in_head["added"][0]["sha256"])
    snapshots._cache.clear()
    assert len(ds.manifest("keep", first["snapshot"])["entries"]) == 3


def test_an_add_refreshes_an_old_image_it_names_again(tmp_path, monkeypatch):
    store = Store(tmp_path / "home")
    ds = Datasets(store)
    data = jpeg_bytes("blue", 5)
    sha = ds.put_blob(data)
    path = store.root / blob_key(sha)
    os.utime(path, (time.time() - 3 * 86400,) * 2)  # an orphan from days ago ...
    ds.put_blob(data)  # ... that an add in flight stores again
    assert sweep_blobs(store, blob_age=86400) == [] and path.is_file()


def test_cli_sweep_removes_half_written_files_and_orphans(tmp_path):
    home = tmp_path / "home"
    store = Store(home)
    Datasets(store).add("d", [("a.jpg", jpeg_bytes("red", 1), "red")], source="cli")
    orphan = Datasets(store).put_blob(jpeg_bytes("red", 2))
    half = store.root / "datasets" / "blobs" / "ab" / ".abc.1234.tmp"
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"half")
    env = {"REFIT_DATASET_BLOB_GRACE_SECONDS": "0.01", "REFIT_DATASET_TMP_GRACE_SECONDS": "0.01"}
    time.sleep(0.05)
    done = subprocess.run([sys.executable, "-m", "cli", "dataset", "sweep", "--json"], cwd=ROOT,
                          env={**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    removed = json.loads(done.stdout)
    assert removed["blobs"] == [orphan] and removed["temp files"] == [half.name] and not half.exists()
    assert len(Datasets(store).manifest("d")["entries"]) == 1


# --- over HTTP, on a REFIT_HOME where an add was killed and another one is running ---------------------------

def _zip_of(n: int, seed: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            z.writestr(f"photos/{'ab'[i % 2]}/{i}.png", tiny_png(seed + i))
    return buf.getvalue()


def _blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "datasets" / "blobs").rglob("*") if p.is_file() and not p.name.startswith(".")}


def _add_folders(home: Path) -> list[Path]:
    """Temp folders of dataset adds: locked ones under tmp/runs, and those of the layout before locks."""
    return sorted([*(home / "tmp" / "runs").glob("refit-dataset-*"), *(home / "tmp").glob("refit-dataset-*")])


def _kill_an_add(home: Path, tmp: Path) -> subprocess.Popen:
    """`refit dataset add` of a large zip, killed with SIGKILL once it has stored some of its images."""
    (tmp / "big.zip").write_bytes(_zip_of(1500, 1_000_000))
    before = len(_blobs(home))
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "dataset", "add", "big", str(tmp / "big.zip")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_blobs(home)) < before + 20:
        assert proc.poll() is None and time.time() < deadline, "the add ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return proc


@pytest.fixture(scope="module")
def leftovers(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset-faults")
    home = copy_store(imagenet_store, root / "home")
    make_dataset(root / "keep", classes=("red", "blue"), n=3)
    assert run_cli("dataset", "add", "keep", root / "keep", home=home).returncode == 0
    kept = _blobs(home)
    _kill_an_add(home, root)
    killed_folders = _add_folders(home)
    assert killed_folders and (killed_folders[0] / "unpacked").is_dir()  # the CLI's zip is unpacked there
    assert len(_blobs(home) - kept) >= 20 and not (home / "datasets" / "big").exists()
    legacy = home / "tmp" / "refit-dataset-abc123"  # the folder an add killed before this version left
    (legacy / "unpacked").mkdir(parents=True)
    half = home / "datasets" / "blobs" / "00" / ".0000.deadbeef.tmp"  # a blob write cut short
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"partial")
    # An add still running in another process: its upload is half received when the server starts.
    live_zip = _zip_of(6, 2_000_000)
    live = subprocess.Popen([sys.executable, "-c", "import sys; from core.datasets import Datasets; from "
                             "core.store import Store; r = Datasets(Store()).add_zip('live', sys.stdin.buffer); "
                             "print(len(r['added']))"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home)})
    live.stdin.write(live_zip[:len(live_zip) // 2])
    live.stdin.flush()
    deadline = time.time() + 60
    while not [p for p in _add_folders(home) if p not in killed_folders + [legacy]]:
        assert time.time() < deadline and live.poll() is None, "the live add did not start"
        time.sleep(0.05)
    yield {"home": home, "root": root, "kept": kept, "killed": killed_folders, "legacy": legacy, "half": half,
           "live": live, "live_zip": live_zip}
    if live.poll() is None:
        live.kill()


@pytest.fixture(scope="module")
def server(leftovers):
    root = leftovers["root"]
    (root / "data").mkdir()
    srv = Server(leftovers["home"], root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0", "REFIT_CAPTURE": "1", "REFIT_DATASET_BLOB_GRACE_SECONDS": "0.01",
                      "REFIT_DATASET_TMP_GRACE_SECONDS": "0.01"})
    srv.start()
    yield srv
    srv.stop(kill=True)


def test_a_killed_add_is_swept_at_start_and_a_live_one_is_not(http, leftovers):
    home = leftovers["home"]
    assert not any(p.exists() for p in leftovers["killed"]), "the killed add's upload and unpacked copy stay"
    assert not leftovers["legacy"].exists() and not leftovers["half"].exists()
    assert _blobs(home) == leftovers["kept"], "images no snapshot names stay, or named ones went"
    live_folders = _add_folders(home)
    assert len(live_folders) == 1 and (live_folders[0] / "upload.zip").is_file(), live_folders
    live = leftovers["live"]
    out, _ = live.communicate(leftovers["live_zip"][len(leftovers["live_zip"]) // 2:], timeout=120)
    assert live.returncode == 0 and out.strip() == b"6"
    assert not _add_folders(home)
    assert http.get("/datasets/live").json()["images"] == 6
    assert len(Datasets(Store(home)).manifest("keep")["entries"]) == 6


def test_http_images_route_refuses_what_the_zip_route_refuses(http):
    reds = [("r.jpg", jpeg_bytes("red", 1))]
    for label, named in ((BEES, "280 bytes"), ("ants\u200b", "U+200B"), ("\u202eants", "U+202E"),
                         ("ants\u0085", "U+0085")):
        r = http.post("/datasets/labels/images", headers=AUTH, data={"label": label},
                      files=[("images", (n, b, "image/jpeg")) for n, b in reds])
        assert r.status_code == 400 and named in r.json()["error"], r.text
    # The same names as class folders of a zip are refused too (a folder name over 255 bytes by the archive
    # check, an invisible character by the label rule).
    for folder, named in ((BEES, "bytes"), ("ants\u200b", "U+200B")):
        r = http.post("/datasets/labels/images", headers=AUTH,
                      files={"zip": ("x.zip", make_zip({f"{folder}/a.jpg": jpeg_bytes("red", 2)}))})
        assert r.status_code in (400, 422) and named in r.json()["error"], r.text
    r = http.post("/datasets/labels/images", headers=AUTH, data={"label": "cafe\u0301"},
                  files=[("images", ("c.jpg", jpeg_bytes("red", 3), "image/jpeg"))])
    assert r.status_code == 200 and r.json()["added"][0]["label"] == "caf\u00e9", r.text
    assert unicodedata.is_normalized("NFC", list(http.get("/datasets/labels").json()["classes"])[0])
    sha = r.json()["added"][0]["sha256"]
    r = http.post(f"/datasets/labels/images/{sha}", json={"label": "caf\u00e9\u200b"}, headers=AUTH)
    assert r.status_code == 400 and "U+200B" in r.json()["error"], r.text


def _captured(http, server, image) -> str:
    """Predict `image` on the capturing server and wait for its capture record; returns the prediction_id."""
    r = predict(http, image)
    assert r.status_code == 200, r.text
    pid = r.json()[0]["prediction_id"]
    deadline = time.time() + 30
    while not (server.home / "captures" / f"{pid}.json").exists():
        assert time.time() < deadline, "not captured"
        time.sleep(0.1)
    return pid


def test_http_feedback_takes_the_same_rule(http, server):
    http.post("/datasets/fb/images", headers=AUTH, data={"label": "caf\u00e9"},
              files=[("images", ("c.jpg", jpeg_bytes("red", 4), "image/jpeg"))]).raise_for_status()
    pid = _captured(http, server, ("x.jpg", solid((200, 40, 40), seed=5)))
    for label, named in (("caf\u00e9\u200b", "U+200B"), (BEES, "280 bytes")):
        r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "label": label, "dataset": "fb"})
        assert r.status_code in (400, 422) and named in r.text, r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "label": "cafe\u0301", "dataset": "fb"})
    assert r.status_code == 200 and r.json()["label"] == "caf\u00e9", r.text
    assert http.get("/datasets/fb").json()["classes"] == {"caf\u00e9": 2}


def test_http_a_label_stored_before_the_rule_fails_a_retrain_by_name_not_with_a_500(http, server):
    store = Store(server.home)
    _old_format_dataset(store, "legacy", [_entry(store, jpeg_bytes("red", 60 + i), BEES) for i in range(3)]
                        + [_entry(store, jpeg_bytes("blue", 70 + i), "blue") for i in range(3)])
    shown = http.get("/datasets/legacy").json()
    assert shown["classes"] == {BEES: 3, "blue": 3}, shown  # an old store still reads
    r = http.post("/retrain/submit", json={"dataset": "legacy", "strategy": "feature_extraction", "head_epochs": 5,
                                           "promote": False, "int8": False}, headers=AUTH)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    assert wait_task(http, task, timeout=300)["status"] == "failed"
    result = http.get("/retrain/get", params={"task_id": task}, headers=AUTH)
    assert result.status_code == 422 and "280 bytes" in result.json()["error"], result.text


def test_http_a_class_stored_in_nfd_takes_feedback_and_images_as_one_class(http, server):
    nfd = "cafe\u0301"  # a class from a macOS zip, stored before labels were NFC
    store = Store(server.home)
    _old_format_dataset(store, "mac", [_entry(store, jpeg_bytes("red", 80 + i), nfd) for i in range(2)])
    pid = _captured(http, server, ("y.jpg", solid((40, 200, 40), seed=7)))
    for label in (nfd, "caf\u00e9"):  # the console's label button sends the class as stored; a person types NFC
        r = http.post("/feedback", headers=AUTH, json={"prediction_id": pid, "label": label, "dataset": "mac"})
        assert r.status_code == 200 and r.json()["label"] == nfd and not r.json()["relabelled"], r.text
    r = http.post("/datasets/mac/images", headers=AUTH, data={"label": "caf\u00e9"},
                  files=[("images", ("c.jpg", jpeg_bytes("red", 90), "image/jpeg"))])
    assert r.status_code == 200 and r.json()["added"][0]["label"] == nfd, r.text
    assert http.get("/datasets/mac").json()["classes"] == {nfd: 4}
