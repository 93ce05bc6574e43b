"""Captured predictions in the store (service/capture.py), on a folder store and on S3: written off the
caller's thread, read back by id from any process, marked with feedback, and pruned oldest first."""
from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from conftest import jpeg_bytes

from core.store import Store
from service.capture import Captures, captured_at, new_id


@pytest.fixture
def store(any_store):
    return any_store


def _result(label: str, margin: float) -> dict:
    return {"label": label, "score": 0.5 + margin / 2, "version": "v0001", "margin": margin,
            "top_k": [{"label": label, "score": 0.5 + margin / 2}, {"label": "other", "score": 0.5 - margin / 2}]}


def _wait(captures: Captures, n: int, timeout: float = 30) -> list[str]:
    deadline = time.time() + timeout
    while len(captures.ids()) < n:
        assert time.time() < deadline, f"{len(captures.ids())} of {n} captures written"
        time.sleep(0.05)
    return captures.ids()


def test_captures_are_written_read_marked_and_pruned(store):
    writer = Captures(store, max_images=3, days=30)
    images = [jpeg_bytes("red", seed=i) for i in range(5)]
    ids = []
    for i, data in enumerate(images):
        ids.append(new_id())
        assert writer.keep(ids[-1], f"img{i}.jpg", data, _result("red", 0.1 * i))
        time.sleep(0.002)  # distinct milliseconds: the ids order by time
    _wait(writer, 5)
    reader = Captures(Store(store.home, url=store.url), max_images=3, days=30)  # another process's view
    record = reader.get(ids[2])
    assert record["name"] == "img2.jpg" and record["label"] == "red" and record["margin"] == pytest.approx(0.2)
    assert record["sha256"] == hashlib.sha256(images[2]).hexdigest() and record["feedback"] is None
    assert reader.image(ids[2]) == images[2]
    assert [r["id"] for r in reader.recent(2)] == [ids[4], ids[3]]
    reader.mark(ids[2], {"label": "blue", "dataset": "d"})
    assert reader.get(ids[2])["feedback"]["label"] == "blue"
    # Retention: the newest three stay; both files of the others go.
    assert reader.prune() == 2
    assert reader.ids() == ids[2:]
    assert reader.get(ids[0]) is None and reader.image(ids[0]) is None
    assert reader.get("not-an-id") is None and reader.get("0" * 24) is None


def test_captures_past_their_days_are_gone(store):
    captures = Captures(store, max_images=100, days=1)
    old = f"{int((time.time() - 2 * 86400) * 1000):012x}{uuid.uuid4().hex[:12]}"  # captured two days ago
    assert captured_at(old) < time.time() - 86400
    captures.keep(old, "old.jpg", jpeg_bytes("blue"), _result("blue", 0.5))
    captures.keep(new_id(), "new.jpg", jpeg_bytes("red"), _result("red", 0.5))
    _wait(captures, 2)
    assert captures.get(old) is None  # expired: answered as unknown before any pass removes it
    assert captures.prune() == 1 and len(captures.ids()) == 1
