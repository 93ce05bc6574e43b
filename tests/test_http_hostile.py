"""What a hostile or careless client sends, against a real `bentoml serve` with a token and captures on:
malformed bodies get a 4xx, never a 500 or a traceback; every error reply has one shape, {"error": ...},
naming the field without echoing a long value back; feedback never starts a dataset by a misspelling; a
body that stops arriving is answered 408 within REFIT_BODY_TIMEOUT; a client that hangs up mid-body is
logged in one line and counted as 499. Tests share the server; raw sockets stand in for the bad clients."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from serving import AUTH, TOKEN, Server, copy_store, predict, solid

BODY_TIMEOUT = 3  # REFIT_BODY_TIMEOUT for this server (default 30)
LONG = "x" * 10_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, imagenet_store):
    root = tmp_path_factory.mktemp("refit-hostile")
    copy_store(imagenet_store, root / "home")
    srv = Server(root / "home", root / "data", root / "serve.log",
                 env={"REFIT_CAPTURE": "1", "REFIT_BODY_TIMEOUT": str(BODY_TIMEOUT)})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prediction_id(http, server) -> str:
    """A captured prediction, for /feedback."""
    r = predict(http, ("red.jpg", solid((220, 40, 40), seed=7)))
    assert r.status_code == 200, r.text
    pid = r.json()[0]["prediction_id"]
    deadline = time.time() + 30
    while not (server.home / "captures" / f"{pid}.json").exists():
        assert time.time() < deadline, "the prediction was not captured"
        time.sleep(0.1)
    return pid


class LogWatch:
    """What the server logged since it was made."""

    def __init__(self, server: Server):
        self.path, self.start = server.log_path, server.log_path.stat().st_size

    def new(self, settle: float = 1.0) -> str:
        time.sleep(settle)  # the workers' lines reach the file through the supervisor
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")


def _shape(r: httpx.Response, status: int) -> str:
    """The reply is `status` with {"error": "..."} and nothing of FastAPI's or BentoML's own shapes."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and "detail" not in body, body
    assert "validation error for" not in body["error"], body
    assert len(r.content) < 600, f"{len(r.content)} bytes: a long value is echoed back: {r.text[:300]}"
    return body["error"]


def _raw(server: Server, path: str, head: bytes, ctype: str = "application/json") -> socket.socket:
    """A connection that sent the request line and headers, declaring a body of 100,000 bytes, and `head`."""
    port = int(server.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
              f"Content-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n".encode() + head)
    return s


def _requests(metrics: str, endpoint: str, status: int) -> float:
    """bentoml_service_request_total for one route and status, summed over the workers (serving.metric
    cannot read a label value with braces in it, as route templates have)."""
    labels = f'endpoint="{endpoint}",http_response_code="{status}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("bentoml_service_request_total{") and labels in line)


MULTIPART_HEAD = (b'--xx\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
                  b"Content-Type: image/jpeg\r\n\r\n" + b"\xff\xd8\xff\xe0" * 40)


# --- 15: malformed requests get a 4xx --------------------------------------------------------------------

def test_malformed_requests_get_a_4xx_and_no_traceback(http, server, prediction_id):
    watch = LogWatch(server)
    for name in ("../etc", "a b"):
        r = http.post("/feedback", headers=AUTH, json={"prediction_id": prediction_id, "label": "red",
                                                       "dataset": name})
        assert "dataset name" in _shape(r, 400) and repr(name) in r.json()["error"], r.text
    binary = bytes(range(256)) * 4  # not UTF-8: FastAPI's own handler failed turning it into JSON
    r = http.post("/feedback", headers=AUTH, files={"file": ("x.bin", binary, "application/octet-stream")})
    assert "application/json" in _shape(r, 415)
    r = http.post("/promote", headers={**AUTH, "content-type": "multipart/form-data"}, content=binary)
    assert "application/json" in _shape(r, 415)
    logged = watch.new()
    assert "Traceback" not in logged and "[ERROR]" not in logged, logged[-3000:]


# --- 16: one error shape ---------------------------------------------------------------------------------

SHAPES = [  # (method, path, request keywords, status, words the error must contain)
    ("post", "/feedback", {"json": {"prediction_id": LONG, "label": "red"}}, 422, ["prediction_id"]),
    ("post", "/feedback", {"json": {"prediction_id": "0" * 24, "label": "red", "extra": 1}}, 422, ["extra"]),
    ("post", "/feedback", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     ["not valid JSON"]),
    ("get", "/jobs?limit=abc", {}, 422, ["limit"]),
    ("get", "/datasets/colours/suggest?n=abc", {}, 422, ["n"]),
    ("get", f"/datasets/colours/suggest?n={LONG}", {}, 422, ["n"]),
    ("get", f"/jobs/{LONG}", {}, 404, ["no job"]),
    ("get", f"/versions/{LONG}", {}, 404, ["unknown version"]),
    ("post", "/promote", {"json": {}}, 400, ["version"]),
    ("post", "/promote", {"json": {"version": LONG}}, 400, ["version"]),
    ("post", "/promote", {"json": {"version": "v" + "9" * 150}}, 404, ["unknown version", "..."]),  # clipped
    ("post", "/promote", {"json": {"version": "v0001", "force": True}}, 400, ["force", "unknown field"]),
    ("post", "/promote", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     ["not valid JSON"]),
    ("post", "/rollback", {"json": {"reason": "x", "to": "v0001"}}, 400, ["to", "unknown field"]),
    ("post", "/rollback", {"json": {"reason": LONG}}, 400, ["reason"]),
    ("get", "/promote", {}, 405, ["Method Not Allowed"]),
    ("put", "/versions", {}, 405, ["Method Not Allowed"]),
]


@pytest.mark.parametrize("method, path, kwargs, status, words", SHAPES,
                         ids=[f"{m} {p[:32]} {status}" for m, p, _, status, _ in SHAPES])
def test_every_error_has_one_shape_and_echoes_nothing_long(http, method, path, kwargs, status, words):
    kwargs = dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    message = _shape(http.request(method.upper(), path, headers=headers, **kwargs), status)
    assert all(w in message for w in words), message


def test_promote_and_rollback_still_work(http):
    r = http.post("/promote", headers=AUTH, json={"version": "v0001", "reason": "hostile test"})
    assert r.status_code == 200 and r.json()["promoted"] == "v0001", r.text
    r = http.post("/rollback", headers=AUTH, json={"reason": "hostile test"})
    assert r.status_code == 409 and "nothing to roll back" in r.json()["error"], r.text


# --- 17: feedback does not start a dataset by a misspelling -----------------------------------------------

def test_feedback_to_an_unknown_dataset_is_refused_unless_created(http, prediction_id):
    r = http.post("/datasets/colours/images", headers=AUTH, data={"label": "red"},
                  files=[("images", ("r.jpg", solid((220, 40, 40), seed=70), "image/jpeg"))])
    assert r.status_code == 200, r.text
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": prediction_id, "label": "red",
                                                   "dataset": "colour"})
    message = _shape(r, 404)
    assert "'colour'" in message and "colours" in message and '"create": true' in message, message
    assert http.get("/datasets/colour").status_code == 404  # nothing was made
    r = http.post("/feedback", headers=AUTH, json={"prediction_id": prediction_id, "label": "red",
                                                   "dataset": "colour", "create": True})
    assert r.status_code == 200 and r.json()["dataset"] == "colour" and r.json()["added"], r.text
    assert http.get("/datasets/colour").json()["classes"] == {"red": 1}


# --- 18: slow and vanishing clients ---------------------------------------------------------------------

@pytest.mark.parametrize("path, ctype, head", [("/feedback", "application/json", b'{"predicti'),
                                                ("/predict", "multipart/form-data; boundary=xx", MULTIPART_HEAD),
                                                ("/retrain", "multipart/form-data; boundary=xx", MULTIPART_HEAD)])
def test_a_body_that_stops_arriving_is_answered_408(server, path, ctype, head):
    watch = LogWatch(server)
    t0 = time.monotonic()
    with _raw(server, path, head, ctype) as s:
        reply = b""
        while chunk := s.recv(4096):  # until the server closes; the socket's timeout (60 s) fails the test
            reply += chunk
    waited = time.monotonic() - t0
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), reply
    assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 20, waited
    assert b"connection: close" in rest.lower(), reply
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert "REFIT_BODY_TIMEOUT" in body["error"], body
    logged = watch.new()
    assert "body timed out" in logged and "Traceback" not in logged and "[ERROR]" not in logged, logged[-3000:]


@pytest.mark.parametrize("path, ctype, head", [("/predict", "multipart/form-data; boundary=xx", MULTIPART_HEAD),
                                                ("/feedback", "application/json", b'{"predicti'),
                                                ("/datasets/colours/images", "multipart/form-data; boundary=xx",
                                                 MULTIPART_HEAD)])
def test_a_client_that_hangs_up_mid_body_is_one_line_and_a_499(http, server, path, ctype, head):
    endpoint = path if not path.startswith("/datasets/") else "/datasets/{name}/images"
    before = http.get("/metrics").text
    watch = LogWatch(server)
    s = _raw(server, path, head, ctype)
    time.sleep(0.5)  # the server is reading the body by now
    s.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        text = http.get("/metrics").text
        if _requests(text, endpoint, 499) > _requests(before, endpoint, 499):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"no 499 counted for {endpoint}:\n" + "\n".join(
            line for line in text.splitlines() if line.startswith("bentoml_service_request_total")))
    assert _requests(text, endpoint, 500) == _requests(before, endpoint, 500)
    logged = watch.new()
    assert "Traceback" not in logged and "[ERROR]" not in logged, logged[-3000:]
    lines = [line for line in logged.splitlines() if "client hung up mid-body" in line]
    assert len(lines) == 1 and path in lines[0], logged[-3000:]
