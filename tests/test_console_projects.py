"""The console's project picker and its token per project: Playwright driving Debian's Chromium against a real
`bentoml serve` with REFIT_TOKEN set. The default project holds the bootstrap ImageNet model (v0001); project
`acme` gets a v0001 of its own, trained on the colours (red, blue), before the browser opens.

Tests run in file order and share the server. Screenshots are saved under each test's tmp folder."""
from __future__ import annotations

import pytest
from conftest import console_page
from serving import AUTH, COLOURS, TOKEN, Server, copy_store, dataset_files, solid, wait_task

TIMEOUT_MS = 60_000
PROJECT = "acme"


@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("console-projects")
    data_root = root / "data"
    for name, data in dataset_files().items():
        (data_root / "colours" / name).parent.mkdir(parents=True, exist_ok=True)
        (data_root / "colours" / name).write_bytes(data)
    home = copy_store(imagenet_store, root / "home")
    srv = Server(home, data_root, root / "serve.log", env={"REFIT_TRAIN_STANDBY": "0"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def acme(http) -> dict:
    """Project acme, created over HTTP and given one version: its token and its job's id."""
    r = http.put(f"/projects/{PROJECT}", headers=AUTH)
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    r = http.post(f"/projects/{PROJECT}/retrain/submit", headers=AUTH,
                  json={"data_path": "colours", "strategy": "feature_extraction", "epochs": 2})
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    assert wait_task(http, task, timeout=600, project=PROJECT)["status"] == "completed"
    listing = http.get(f"/projects/{PROJECT}/versions", headers=AUTH).json()
    assert listing["promoted"] == "v0001" and [v["id"] for v in listing["versions"]] == ["v0001"], listing
    assert listing["versions"][0]["tag"] == f"refit-{PROJECT}:v0001"
    assert http.get("/versions").json()["versions"][0]["tag"] == "refit:v0001"
    return {"token": token, "job": task}


@pytest.fixture
def page(browser, server, tmp_path):
    with console_page(browser, server.url, tmp_path, timeout_ms=TIMEOUT_MS, width=1400) as pg:
        yield pg


def use_token(page, value: str) -> None:
    page.fill("#token", value)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-state:has-text('token set')")


def open_typed(page, name: str) -> None:
    page.fill("#project-name", name)
    page.press("#project-name", "Enter")
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('project') === '{name}'")


def version_rows(page) -> dict[str, str]:
    """The Versions table once drawn: version id -> its classes as shown."""
    page.wait_for_selector("#versions-table")
    rows = page.locator("#versions-table tbody tr")
    return {rows.nth(i).get_attribute("data-version"): rows.nth(i).locator("td.classes").text_content()
            for i in range(rows.count())}


def options(page) -> list[str]:
    return page.eval_on_selector_all("#project option", "os => os.map((o) => o.value)")


def test_a_project_token_opens_its_project_and_the_default_keeps_its_own(page, acme):
    page.goto("/ui/#versions")
    # No token: GET /projects is refused, so the picker offers the default and a name to type.
    page.wait_for_selector("#project-state:has-text('needs the admin token')")
    assert options(page) == ["default"]
    assert version_rows(page) == {"v0001": "<imagenet-1k>"}
    open_typed(page, PROJECT)
    assert "401: missing bearer token" in page.wait_for_selector("#error:not([hidden])").text_content()
    use_token(page, f"{PROJECT}.not-the-secret")
    page.wait_for_selector("#error:has-text('401: wrong bearer token')")
    page.shot("wrong-token")
    use_token(page, acme["token"])
    page.wait_for_selector("#versions-model:has-text('refit-acme')")
    assert version_rows(page) == {"v0001": "blue, red"}
    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.text_content("#token-state") == f"token set for {PROJECT}"
    page.wait_for_function("() => document.getElementById('promoted').textContent === 'v0001'")
    # The detail: acme's per-class figures, and its confusion matrix, a guarded file fetched with the token.
    page.click("button[aria-label='Details of v0001']")
    img = page.wait_for_selector("#version-detail img")
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img)
    assert {"red", "blue"} <= set(page.locator("#version-detail tbody th").all_text_contents())
    page.shot("acme-versions")
    # A reload stays on the project, with its token.
    page.reload()
    assert version_rows(page) == {"v0001": "blue, red"}
    assert page.input_value("#project") == PROJECT
    # Back to the default: its own list, through the unprefixed routes, and no token of its own.
    page.select_option("#project", "default")
    page.wait_for_selector("#versions-model:text-is('Project default, BentoML model refit')")
    assert version_rows(page) == {"v0001": "<imagenet-1k>"}
    assert "project=" not in page.url and page.text_content("#token-state") == "no token"
    # ... and to acme again: its token comes back with it.
    page.select_option("#project", PROJECT)
    page.wait_for_selector("#versions-model:has-text('refit-acme')")
    assert version_rows(page) == {"v0001": "blue, red"}
    assert page.is_hidden("#error"), page.text_content("#error")


def test_every_page_works_for_the_chosen_project(page, http, acme):
    images = [("images", (n.replace("/", "-"), d, "image/jpeg")) for n, d in dataset_files(2).items()]
    r = http.post(f"/projects/{PROJECT}/datasets/shapes/images", files=images[:2], data={"label": "red"},
                  headers=AUTH)
    assert r.status_code == 200, r.text
    page.goto(f"/ui/?project={PROJECT}#try")
    use_token(page, acme["token"])
    page.set_input_files("#files", {"name": "red.jpg", "mimeType": "image/jpeg",
                                    "buffer": solid(COLOURS["red"], seed=3)})
    page.wait_for_selector("[data-testid=answer]")
    assert page.text_content("[data-testid=answer]") == "red"
    assert page.text_content(".answered-by") == "v0001"
    page.click("nav a[href='#retrain']")
    page.wait_for_selector(f"#recent-jobs td:text-is('{acme['job']}')")
    assert page.locator("#dataset-name option").all_text_contents() == ["shapes (2 images, 1 classes)"]
    page.click("nav a[href='#data']")
    page.wait_for_selector("section.dataset[data-dataset=shapes] .thumbs img")  # guarded images, acme's token
    page.wait_for_selector("#drift")
    assert page.is_hidden("#error"), page.text_content("#error")
    page.shot("acme-data")
    # The default project has no such dataset.
    page.select_option("#project", "default")
    page.wait_for_selector("#drift")
    assert page.locator("section.dataset[data-dataset=shapes]").count() == 0


def test_the_admin_token_lists_projects_and_creates_one(page, http, acme):
    page.goto("/ui/#versions")
    use_token(page, TOKEN)  # the default's token: the admin one
    page.wait_for_selector(f"#project option[value={PROJECT}]", state="attached")
    assert options(page)[0] == "default" and PROJECT in options(page)
    listed = {p["name"]: p for p in http.get("/projects", headers=AUTH).json()["projects"]}
    assert listed[PROJECT]["datasets"] == ["shapes"]  # the previous test's: a project with a dataset is listed
    page.fill("#project-name", "fresh")
    page.click("#project-create")
    shown = page.wait_for_selector("#new-token").text_content()
    assert shown.startswith("fresh.")
    page.wait_for_selector("#versions-model:text-is('Project fresh')")
    assert version_rows(page) == {}
    assert page.input_value("#project") == "fresh" and page.text_content("#token-state") == "token set for fresh"
    page.shot("created")
    assert http.get("/projects/fresh/versions", headers={"Authorization": f"Bearer {shown}"}).status_code == 200
    # A project without a token of its own is opened with the admin token.
    page.select_option("#project", PROJECT)
    assert version_rows(page) == {"v0001": "blue, red"}
    assert page.text_content("#token-state") == f"no token for {PROJECT}: the default's is used"
    # A bad name is refused by the form, before any request.
    page.fill("#project-name", "Not_A_Name")
    page.press("#project-name", "Enter")
    assert page.evaluate("() => !document.getElementById('project-name').validity.valid")
    assert page.input_value("#project") == PROJECT and f"project={PROJECT}" in page.url
