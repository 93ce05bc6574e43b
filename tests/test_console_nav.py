"""The console's pages stop when they are left (issue 20, item 19): a page still loading when another is chosen
must not go on rendering into the new one. Playwright drives Debian's Chromium against a real `bentoml serve`;
a page is made slow by holding the browser's request for one of its reads until the next page is on screen,
then letting it through to the real server (the real answer, late, as from a slow store)."""
from __future__ import annotations

import re
import time

import httpx
import pytest
from conftest import console_page
from serving import AUTH, TOKEN, Server, copy_store, dataset_files

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    """The bootstrap model promoted, and two datasets, alpha and beta, for the Data page to list."""
    root = tmp_path_factory.mktemp("console-nav")
    home = copy_store(imagenet_store, root / "home")
    (root / "data").mkdir()
    srv = Server(home, root / "data", root / "serve.log", env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    images = [("images", (name.replace("/", "-"), data, "image/jpeg")) for name, data in dataset_files(2).items()]
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for name in ("alpha", "beta"):
            r = c.post(f"/datasets/{name}/images", files=images[:2], data={"label": "red"}, headers=AUTH)
            assert r.status_code == 200, r.text
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, server, tmp_path):
    with console_page(browser, server.url, tmp_path, timeout_ms=TIMEOUT_MS, check_words=False) as pg:
        yield pg


class Held:
    """Holds the browser's requests whose path (with query) matches `pattern` until `release()`, then lets them
    through to the real server; records how each held one ended (finished, or failed: aborted by the page)."""

    def __init__(self, page, pattern: str):
        self.page, self.routes, self.holding = page, [], True
        self.ended: dict[str, str] = {}
        rx = re.compile(pattern)
        self.matches = lambda url: bool(rx.fullmatch(re.sub(r"^https?://[^/]+", "", url)))
        page.route(self.matches, self._handle)
        page.on("requestfinished", lambda r: self._end(r, "finished"))
        page.on("requestfailed", lambda r: self._end(r, f"failed: {r.failure}"))

    def _handle(self, route) -> None:
        if self.holding:
            self.routes.append(route)
        else:
            route.continue_()

    def _end(self, request, how: str) -> None:
        if self.matches(request.url):
            self.ended[request.url] = how

    def wait_held(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not self.routes and time.time() < deadline:
            self.page.wait_for_timeout(100)
        assert self.routes, "the page never asked for the held path"

    def release(self, timeout: float = 60) -> dict[str, str]:
        """Lets the held requests go on; answers how each ended, once all have (a request the page aborted
        while held ends as failed; continuing it is then refused, which is what it should be)."""
        from playwright.sync_api import Error

        self.holding = False
        for route in self.routes:
            try:
                route.continue_()
            except Error:
                pass
        urls = {r.request.url for r in self.routes}
        deadline = time.time() + timeout
        while not urls <= self.ended.keys() and time.time() < deadline:
            self.page.wait_for_timeout(100)
        assert urls <= self.ended.keys(), (urls, self.ended)
        # Long enough for a late answer to be parsed and drawn, and for the reads it would start to be sent.
        self.page.wait_for_timeout(1500)
        return {u: self.ended[u] for u in urls}


def headings(page) -> list[str]:
    return page.locator("#page h2").all_text_contents()


def use_token(page) -> None:
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-state:has-text('token set')")


def test_data_left_while_loading_draws_nothing_on_versions(page):
    """The issue's steps: Data lists its datasets one by one; Versions is chosen while one is still loading."""
    page.goto("/ui/#try")
    use_token(page)
    held = Held(page, r"/datasets/beta")
    page.click("nav a[href='#data']")
    page.wait_for_selector("section.dataset[data-dataset=alpha]")
    held.wait_held()
    page.click("nav a[href='#versions']")
    page.wait_for_selector("#versions-table")
    ended = held.release()
    assert headings(page) == ["Versions"]
    assert page.locator("#page section.dataset, #page #drift, #page .suggest").count() == 0
    assert all(how.startswith("failed") for how in ended.values()), ended  # the left page's read was aborted
    assert page.locator("#versions-table tr[data-version=v0001]").count() == 1
    assert page.is_hidden("#error"), page.text_content("#error")  # leaving a page is not an error
    # Back on Data, it is drawn once, whole: nothing of the render that was left is added to it.
    page.click("nav a[href='#data']")
    page.wait_for_selector("#drift")
    assert headings(page) == ["Data"]
    assert page.locator("section.dataset[data-dataset=alpha]").count() == 1
    assert page.locator("section.dataset[data-dataset=beta]").count() == 1
    # ... and its label buttons are this render's own, inside its sections.
    assert page.locator("#page button:has-text('Suggest images for beta')").count() == 1


@pytest.mark.parametrize(("start", "slow", "then", "shows"), [
    ("data", r"/datasets", "try", "#drop"),
    ("versions", r"/versions", "data", "#drift"),
    ("retrain", r"/jobs\?limit=10", "try", "#drop"),
])
def test_a_left_page_stops_rendering(page, start, slow, then, shows):
    """Every page that reads before it draws: its late answer lands nowhere once another page is shown."""
    page.goto("/ui/#try")
    use_token(page)
    page.wait_for_selector("#drop")
    held = Held(page, slow)
    page.click(f"nav a[href='#{start}']")
    held.wait_held()
    page.click(f"nav a[href='#{then}']")
    page.wait_for_selector(shows)
    held.release()
    expected = {"try": "Try it", "data": "Data"}[then]
    assert headings(page) == [expected]
    left_behind = {"data": "#page section.dataset", "versions": "#versions-table",
                   "retrain": "#retrain-form, #recent-jobs"}[start]
    assert page.locator(left_behind).count() == 0
    assert page.is_hidden("#error"), page.text_content("#error")
