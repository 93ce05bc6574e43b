"""The console's candidate panel (Versions page): Playwright driving Debian's Chromium against a real `bentoml
serve`. The store holds two tiny real ONNX models (8x8 input, the same two classes): v0001 promoted, v0002 to
try beside it, in shadow and as a canary, then to clear and to promote, from the panel's own controls; the
figures it shows come from real /predict requests. Project `acme` gets the same two versions of its own.

Tests run in file order and share the server. Screenshots of every step are saved under each test's tmp folder."""
from __future__ import annotations

import time

import httpx
import pytest
from conftest import console_page
from serving import AUTH, TOKEN, Server, predict, solid
from test_store_contract import publish

from core.store import Store

TIMEOUT_MS = 60_000
PROJECT = "acme"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console-candidate")
    home, tmp = root / "home", root / "models"
    tmp.mkdir()
    store = Store(home)
    v1, v2 = publish(store, tmp, 1), publish(store, tmp, 2)
    store.promote(v1, actor="setup")
    (root / "data").mkdir()
    # Heartbeat 1 s: each worker writes its trial figures that often, so the panel sees them within seconds.
    srv = Server(home, root / "data", root / "serve.log",
                 env={"REFIT_TRAIN_STANDBY": "0", "REFIT_HEARTBEAT_SECONDS": "1"})
    srv.start()
    srv.versions, srv.store_home, srv.models = (v1, v2), home, tmp
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, server, tmp_path):
    with console_page(browser, server.url, tmp_path, timeout_ms=TIMEOUT_MS) as pg:
        yield pg


def use_token(page) -> None:
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-state:has-text('token set')")


def confirm(page, ok_text: str) -> None:
    page.wait_for_selector("dialog[open]")
    assert page.text_content("dialog button[value=ok]") == ok_text
    page.click("dialog button[value=ok]")


def set_from_panel(page, version: str, mode: str, percent: str) -> None:
    page.select_option("#candidate-pick", version)
    page.select_option("#candidate-pick-mode", mode)
    page.fill("#candidate-pick-percent", percent)
    page.click("#candidate-set")
    if mode == "canary":
        confirm(page, f"Set {version} as canary")
    page.wait_for_selector(f"#candidate-mode:text-is('{mode}')")


def predictions(http, n: int, prefix: str = "") -> None:
    for i in range(n):
        r = predict(http, (f"{i}.jpg", solid((220, 40, 40), seed=i)), path=f"{prefix}/predict")
        assert r.status_code == 200, r.text


def test_ui_files_are_served(server):
    for name in ("candidate.js", "versions.js"):
        assert httpx.get(f"{server.url}/ui/{name}").status_code == 200, name


def test_set_shadow_then_canary_clear_and_promote_from_the_panel(page, server, tmp_path):
    v1, v2 = server.versions
    http = httpx.Client(base_url=server.url, timeout=60)
    page.goto("/ui/#versions")
    use_token(page)
    page.wait_for_selector(f"#candidate-state:has-text('No candidate: {v1}')")
    # Only a version other than the promoted one can be picked; nothing to promote or clear yet.
    assert page.eval_on_selector_all("#candidate-pick option", "os => os.map((o) => o.value)") == [v2]
    assert page.is_disabled("#candidate-promote") and page.is_disabled("#candidate-clear")
    page.shot("1-no-candidate")

    set_from_panel(page, v2, "shadow", "100")
    assert page.text_content("#candidate-version") == v2 and page.text_content("#candidate-percent") == "100 %"
    assert page.is_hidden("#error"), page.text_content("#error")
    got = http.get("/candidate").json()
    assert (got["version"], got["mode"], got["percent"], got["promoted"]) == (v2, "shadow", 100, v1)

    # Real requests: v0001 answers them, v0002 runs beside it; the panel re-reads the figures by itself.
    time.sleep(1)  # the workers follow the pointer within a poll (0.25 s)
    predictions(http, 6)
    page.wait_for_function("() => Number(document.getElementById('shadow-compared')?.textContent) > 0",
                           timeout=30_000)
    page.wait_for_selector(f"#candidate-figures tr[data-version={v1}]")
    page.wait_for_selector(f"#candidate-figures tr[data-version={v2}]")
    assert page.text_content("#shadow-agreement").endswith("%")
    assert page.text_content("#shadow-delta") != "–" and page.text_content("#shadow-dropped") == "0"
    row = page.locator(f"#candidate-figures tr[data-version={v1}] td")
    assert row.nth(0).text_content() == "promoted" and int(row.nth(1).text_content()) > 0
    page.shot("2-shadow-figures")

    set_from_panel(page, v2, "canary", "100")
    assert http.get("/candidate").json()["mode"] == "canary"
    time.sleep(1)
    assert predict(http, ("c.jpg", solid((220, 40, 40)))).json()[0]["version"] == v2  # 100 %: every client
    page.shot("3-canary")

    page.click("#candidate-clear")
    confirm(page, "Clear candidate")
    page.wait_for_selector(f"#candidate-state:has-text('No candidate: {v1}')")
    assert page.text_content("#candidate-said") == f"Cleared {v2}: the trial has ended."
    assert http.get("/candidate").json() is None
    assert page.is_disabled("#candidate-clear")
    page.shot("4-cleared")

    set_from_panel(page, v2, "shadow", "50")
    page.click("#candidate-promote")
    confirm(page, f"Promote {v2}")
    page.wait_for_selector(f"#versions-promoted:text-is('{v2}')")
    assert http.get("/versions").json()["promoted"] == v2
    assert http.get("/candidate").json() is None  # promoting the candidate ended its trial
    page.wait_for_selector(f"#candidate-state:has-text('No candidate: {v2}')")
    assert page.eval_on_selector_all("#candidate-pick option", "os => os.map((o) => o.value)") == [v1]
    assert page.text_content("#promoted") == v2
    page.shot("5-promoted")
    http.close()


def test_a_refused_set_is_shown_as_the_api_words_it(page, server):
    """Without the token the API refuses (401); the page-wide error says so, and nothing is set."""
    page.goto("/ui/#versions")
    page.wait_for_selector("#candidate-state")
    page.select_option("#candidate-pick-mode", "shadow")
    page.click("#candidate-set")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("401: ")
    assert httpx.get(f"{server.url}/candidate").json() is None
    assert page.text_content("#candidate-said") == ""


def test_the_panel_works_on_the_chosen_project(page, server):
    """A project's panel reads and sets that project's candidate (/projects/acme/candidate), not the default's."""
    r = httpx.put(f"{server.url}/projects/{PROJECT}", headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    store = Store(server.store_home, project=PROJECT)
    a1, a2 = publish(store, server.models, 11), publish(store, server.models, 12)
    store.promote(a1, actor="setup")
    sent: list[str] = []
    page.on("request", lambda req: sent.append(req.url))
    page.goto(f"/ui/?project={PROJECT}#versions")
    use_token(page)  # the admin token, the default's: it opens every project
    page.wait_for_selector(f"#candidate-state:has-text('No candidate: {a1}')")
    set_from_panel(page, a2, "shadow", "20")
    # Every route of a project other than the default needs a token, reads too (service/guard.py).
    got = httpx.get(f"{server.url}/projects/{PROJECT}/candidate", headers=AUTH, timeout=60).json()
    assert (got["version"], got["percent"]) == (a2, 20)
    assert httpx.get(f"{server.url}/candidate", timeout=60).json() is None
    assert any(u.endswith(f"/projects/{PROJECT}/candidate") for u in sent), sent
    page.click("#candidate-clear")
    confirm(page, "Clear candidate")
    page.wait_for_selector(f"#candidate-state:has-text('No candidate: {a1}')")
    assert httpx.get(f"{server.url}/projects/{PROJECT}/candidate", headers=AUTH, timeout=60).json() is None
