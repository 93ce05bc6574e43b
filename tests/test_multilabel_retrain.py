"""A multi-label version through the service: a zip with a labels.csv retrained over HTTP on a real `bentoml
serve`, then served with its labels and thresholds; and the same zip trained by a `refit worker` from the Redis
queue on an S3 store is in tests/test_cluster.py."""
from __future__ import annotations

import io
import zipfile

import httpx
import pytest
from serving import AUTH, Server, copy_store, predict, wait_task
from test_multilabel_training import COLOURS, collage, make_collages


def collage_zip(tmp_path) -> bytes:
    make_collages(tmp_path / "collages")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted((tmp_path / "collages").rglob("*")):
            if f.is_file():
                z.write(f, f"collages/{f.relative_to(tmp_path / 'collages').as_posix()}")
    return buf.getvalue()


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


FIELDS = {"strategy": "feature_extraction", "parity_images": "2", "promote": "true"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, imagenet_store):
    root = tmp_path_factory.mktemp("refit-multilabel")
    (root / "data").mkdir()
    srv = Server(copy_store(imagenet_store, root / "home"), root / "data", root / "serve.log")
    srv.start()
    yield srv
    srv.stop()


def test_retrain_over_http_on_a_manifest_serves_labels(server, tmp_path):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/retrain/submit", files={"dataset": ("collages.zip", collage_zip(tmp_path))}, data=FIELDS,
                      headers=AUTH)
        assert r.status_code == 200, r.text
        done = wait_task(http, r.json()["task_id"], timeout=400)
        assert done["status"] == "completed", http.get(f"/jobs/{r.json()['task_id']}", headers=AUTH).text
        result = http.get("/retrain/get", params={"task_id": r.json()["task_id"]}, headers=AUTH).json()
        assert result["version"] == "v0002" and {"val_map", "val_micro_f1"} <= set(result["metrics"])
        served = None
        for _ in range(100):
            reply = predict(http, ("c.jpg", jpeg(collage(["blue", "red"], seed=4242))))
            if reply.status_code == 200 and reply.json()[0]["version"] == "v0002":
                served = reply.json()[0]
                break
        assert served is not None, "the new version was not served"
        assert {x["label"] for x in served["labels"]} <= set(COLOURS)
        assert len(served["top_k"]) >= 1
        every = predict(http, ("c.jpg", jpeg(collage(["green"], seed=4243))), threshold=0.0, top_k=len(COLOURS))
        assert len(every.json()[0]["labels"]) == len(COLOURS)  # the request's threshold overrides every label's
        detail = http.get("/versions/v0002").json()
        assert detail["task"] == "multi_label" and len(detail["thresholds"]) == len(COLOURS)
