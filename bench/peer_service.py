"""The peer in benchmark 4: the image classifier a BentoML user writes from BentoML's documentation, for
comparison with Refit. It is written here from BentoML's docs and examples (a `@bentoml.service` with
`workers`, one `@bentoml.api(batchable=True)` whose argument is the batch of uploaded files, adaptive
batching across requests), not from Refit's code: no versions, no hot swap, no limits, no auth.

It serves the same model file as Refit in the same run (the benchmark version's serving ONNX, INT8 or
FP32 as its store chose) with the contract stored in the file. Its pixels are its own and frozen
(`bench/peer_pixels.py`): Pillow decode (with libjpeg's draft scaling) and resize, numpy normalisation,
which was the project's own pipeline until the project changed its decode path; the in-process limit of
this pipeline is "the limit before" in benchmark 3.

    REFIT_PEER_MODEL=/path/to/model.int8.onnx bentoml serve bench.peer_service:Peer --port 3001
    curl -F images=@bee.jpg localhost:3001/predict
"""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np

from bench.peer_pixels import peer_preprocess

MODEL_ENV = "REFIT_PEER_MODEL"
try:  # the key the service reads the contract by, without importing torch (training.export does)
    from service.model import CONTRACT_KEY
except ImportError:
    CONTRACT_KEY = "refit.contract"
WORKERS = 2
# ONNX Runtime starts a thread per core by default; with two worker processes on two cores, two threads
# would fight over each core. Each worker gets its share of the cores, as Refit's workers do, so that the
# comparison is not won by a setting the peer got wrong.
ORT_THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
# Batch 32 is ONNX Runtime's best batch for this model on 2 cores (benchmark 1). The latency bound is
# generous so that the dispatcher never sheds a request under the heaviest level (64 connections): a
# peer answering 503s would flatter Refit's throughput.
MAX_BATCH_SIZE = 32
MAX_LATENCY_MS = 20_000


@bentoml.service(workers=WORKERS, traffic={"timeout": 60})
class Peer:
    def __init__(self) -> None:
        import onnxruntime as ort

        from core.contract import Contract

        path = os.environ.get(MODEL_ENV)
        if not path or not Path(path).is_file():
            raise RuntimeError(f"set {MODEL_ENV} to the ONNX model file to serve (got {path!r})")
        so = ort.SessionOptions()
        so.intra_op_num_threads = ORT_THREADS
        self.session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        # The preprocessing contract the project stores in every model file (training/export.py writes it).
        self.contract = Contract.from_json(self.session.get_modelmeta().custom_metadata_map[CONTRACT_KEY])
        self.labels = list(self.contract.class_names)
        self.version = Path(path).parent.name  # the store keeps each version's files in a folder of its name

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: list[Path]) -> list[dict]:
        """One prediction per uploaded file (multipart field `images`); BentoML joins concurrent requests
        into one call and splits the answers back."""
        x = np.stack([peer_preprocess(p.read_bytes(), self.contract) for p in images])
        probs = self.session.run(None, {"input": x})[0]
        out = []
        for p in probs:
            top = np.argsort(-p)[:5]
            ranked = [{"label": self.labels[i], "score": float(p[i])} for i in top]
            out.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked,
                        "version": self.version})
        return out

