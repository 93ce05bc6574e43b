"""The wrk load generator of the benchmarks (bench/wrkgen.py + bench/wrk/predict.lua) against a stub server:
it uploads the images it is given as multipart `images` and counts every answer that is not a 2xx
prediction list as an error, by kind."""
from __future__ import annotations

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import jpeg_bytes

from bench import wrkgen

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


class Stub(BaseHTTPRequestHandler):
    """Answers like /predict for image 0, 503 for image 1 and a body without a version for image 2."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the servers under test

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = (self.path == "/predict" and b'name="images"' in body and b"multipart/form-data; boundary="
              in self.headers["Content-Type"].encode() and b"\xff\xd8" in body)  # a JPEG's first bytes
        if not ok or b'filename="1.jpg"' in body:
            status, reply = 503, b'{"error": "busy"}'
        elif b'filename="2.jpg"' in body:
            status, reply = 200, b"[]"
        else:
            status, reply = 200, b'[{"label": "x", "version": "v0001"}]'
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # wrk drops its connections when the time is up


def test_wrk_counts_non_2xx_and_bad_bodies_as_errors():
    """One level of wrk gives loadgen's row shape, with 503s and answers that are no prediction apart."""
    server = Quiet(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        images = [(f"photo{i}.jpg", jpeg_bytes(seed=i)) for i in range(3)]
        row = wrkgen.closed_loop(f"http://127.0.0.1:{server.server_port}", images, 2, seconds=1)
    finally:
        server.shutdown()
    assert row["generator"] == "wrk" and row["concurrency"] == 2
    assert row["ok"] > 0 and row["error_kinds"].get("HTTP 503", 0) > 0 and row["error_kinds"].get("bad body", 0) > 0
    assert row["errors"] == sum(row["error_kinds"].values())
    assert row["requests"] == row["ok"] + row["errors"]
    # Every image is sent in turn: about a third of the answers each.
    assert row["ok"] == pytest.approx(row["errors"] / 2, rel=0.2)
    assert 0 < row["p50_ms"] <= row["p99_ms"] and row["throughput"] > 0
