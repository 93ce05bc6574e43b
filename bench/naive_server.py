"""The baseline the service is measured against: one request -> one PyTorch eager forward, no batching,
no ONNX Runtime. The same model, preprocessing and multipart upload as `POST /predict`.

    python -m bench.naive_server --port 8001

Requests are handled one at a time on the event loop, as a plain single-process app would; running them
on a thread pool instead would only make concurrent forwards fight over the same cores.
"""
from __future__ import annotations

import argparse
import os

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.preprocess import preprocess
from training.registry import create_backbone

TOP_K = 5


def build_app() -> Starlette:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    bb = create_backbone("efficientnet_lite0", num_classes=None)
    model, contract, labels = bb.model.eval(), bb.contract, bb.imagenet_classes

    async def predict(request: Request) -> JSONResponse:
        form = await request.form()
        files = form.getlist("images")
        if not files:
            return JSONResponse({"error": "send image files in the multipart field `images`"}, status_code=400)
        out = []
        for f in files:
            x = torch.from_numpy(preprocess(await f.read(), contract))[None]
            with torch.inference_mode():
                p = torch.softmax(model(x), 1)[0]
            scores, indices = torch.topk(p, TOP_K)
            ranked = [{"label": labels[i], "score": s} for s, i in zip(scores.tolist(), indices.tolist(), strict=True)]
            out.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked,
                        "version": "naive"})
        return JSONResponse(out)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
