"""The web console (issue 13, "The console" and "Tests in a real browser"): Playwright driving Debian's
Chromium against a real `bentoml serve` with a bearer token. The store starts with the bootstrap ImageNet
model (v0001, promoted; its classes include `ant`) and a second publish of it (v0002) to promote.

Screenshots of every step are saved under the test's tmp folder."""
from __future__ import annotations

import shutil
import time

import httpx
import pytest
from conftest import console_page
from serving import AUTH, TOKEN, Server, copy_store, dataset_files, make_zip, predict, solid, wait_serving

ANT = "val/ants/157401988_d0564a9d02.jpg"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(imagenet_store, tmp_path_factory):
    """v0001 promoted, v0002 the same model published again (with its feature map) to be promoted."""
    import onnx

    from core.contract import Contract
    from core.store import Store
    from training.export import CONTRACT_KEY
    from training.pipeline import _publish

    root = tmp_path_factory.mktemp("console")
    home = copy_store(imagenet_store, root / "home")
    v1 = home / "models" / "refit" / "v0001"
    files = {}
    for name in ("model.onnx", "cam.npz"):  # copies: publishing stamps the version id into the model file
        files[name] = root / name
        shutil.copy(v1 / name, files[name])
    props = {p.key: p.value for p in onnx.load(str(files["model.onnx"])).metadata_props}
    version = _publish(Store(home), files, Contract.from_json(props[CONTRACT_KEY]),
                       {"strategy": "pretrained", "backbone": "efficientnet_lite0", "classes": ["<imagenet-1k>"],
                        "note": "the bootstrap model again, to promote from the console"})
    assert version == "v0002"
    (root / "data").mkdir()
    srv = Server(home, root / "data", root / "serve.log", env={"REFIT_TRAIN_STANDBY": "0", "REFIT_CAPTURE": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, server, tmp_path):
    with console_page(browser, server.url, tmp_path, timeout_ms=TIMEOUT_MS) as pg:
        yield pg


def use_token(page, value: str) -> None:
    page.fill("#token", value)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-state:has-text('token set')")


def promoted_shown(page) -> str:
    page.wait_for_function("() => /^v\\d{4}$/.test(document.getElementById('promoted').textContent)")
    return page.text_content("#promoted")


# --- without a browser: what the console stands on ------------------------------------------------------

def test_console_is_served_and_linked_from_the_openapi_page(http):
    r = http.get("/ui", follow_redirects=True)
    assert r.status_code == 200 and "<title>Refit console</title>" in r.text
    for name in ("app.js", "api.js", "tryit.js", "versions.js", "retrain.js", "data.js", "style.css"):
        assert http.get(f"/ui/{name}").status_code == 200, name
    assert http.get("/ui/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    spec = http.get("/docs.json").json()
    assert "[/ui](/ui)" in spec["info"]["description"]
    assert http.get("/ui/missing.js").status_code == 404


def test_version_files_are_served_by_name_only(http, tmp_path):
    r = http.get("/versions/v0001/files/model.onnx")
    assert r.status_code == 404 and "confusion_matrix.png" in r.json()["error"]
    r = http.get("/versions/v0009/files/results.csv")
    assert r.status_code == 404 and "v0009" in r.json()["error"]
    r = http.get("/versions/v0001/files/confusion_matrix.png")  # the bootstrap model was not trained here
    assert r.status_code == 404 and "has no confusion_matrix.png" in r.json()["error"]
    detail = http.get("/versions/v0001").json()
    assert detail["files"] == []


# --- in a real browser ----------------------------------------------------------------------------------

def test_wrong_token_shows_the_401_message_and_changes_nothing(page, http):
    before = http.get("/versions").json()["promoted"]
    page.goto("/ui/#versions")
    use_token(page, "not-the-token")
    target = "v0002" if before != "v0002" else "v0001"
    page.click(f"button[aria-label='Promote {target}']")
    page.click("dialog button[value=ok]")
    alert = page.wait_for_selector("#error:not([hidden])")
    assert "401: wrong bearer token" in alert.text_content()
    page.shot("wrong-token")
    assert http.get("/versions").json()["promoted"] == before


def test_try_it_shows_the_ant_label_and_a_heatmap(page, real_data, tmp_path):
    page.goto("/ui/")
    page.set_input_files("#files", str(real_data / ANT))
    page.wait_for_selector("[data-testid=answer]")
    assert page.text_content("[data-testid=answer]") == "ant"
    heat = page.wait_for_selector("img.heatmap")
    # Rendered, not just present: the browser decoded the PNG the API sent (the 224 x 224 crop).
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=heat)
    assert page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", heat) == [224, 224]
    assert "ant" in heat.get_attribute("alt")
    version = promoted_shown(page)
    assert page.text_content(".answered-by") == version
    assert page.locator(".bars li").count() == 5
    # The threshold slider: over the top score, the answer is "unknown" (as /predict's threshold).
    page.fill("#threshold", "1")
    page.dispatch_event("#threshold", "input")
    assert page.text_content("[data-testid=answer]") == "unknown"
    page.fill("#threshold", "0")
    page.dispatch_event("#threshold", "input")
    page.shot("try-it")


def test_promote_from_the_versions_page_shows_everywhere(page, http, server):
    before = http.get("/versions").json()["promoted"]
    target = "v0002" if before != "v0002" else "v0001"
    page.goto("/ui/#versions")
    use_token(page, TOKEN)
    page.click(f"button[aria-label='Promote {target}']")
    page.wait_for_selector("dialog[open]")
    page.shot("confirm")
    page.click("dialog button[value=ok]")
    page.wait_for_selector(f"[role=status]:has-text('Promoted {target}')")
    assert page.text_content("#versions-promoted") == target
    assert http.get("/versions").json()["promoted"] == target
    with httpx.Client(base_url=server.url, timeout=60) as c:
        wait_serving(c, target, timeout=60)
    for name in ("try", "versions", "retrain", "data"):
        page.goto(f"/ui/#{name}")
        page.wait_for_function(f"() => document.getElementById('promoted').textContent === '{target}'")
        page.shot(f"promoted-{name}")
    # The Try-it page answers with it too.
    page.goto("/ui/#try")
    page.set_input_files("#files", {"name": "red.jpg", "mimeType": "image/jpeg",
                                    "buffer": dataset_files(1)["red/0.jpg"]})
    page.wait_for_selector(f".answered-by:has-text('{target}')")
    # Details of a version: its figures and lineage, as the API gives them.
    page.goto("/ui/#versions")
    page.click(f"button[aria-label='Details of {target}']")
    page.wait_for_selector(f"#detail-title:has-text('{target}')")


def test_retrain_from_a_zip_shows_progress_then_the_new_version(page, http, tmp_path):
    archive = tmp_path / "colours.zip"
    archive.write_bytes(make_zip(dataset_files(8)))
    known = {v["id"] for v in http.get("/versions").json()["versions"]}
    page.goto("/ui/#retrain")
    use_token(page, TOKEN)
    assert page.input_value("#strategy") == "auto"  # the default
    page.set_input_files("#zip", str(archive))
    page.select_option("#strategy", "feature_extraction")
    page.select_option("#promote", "true")
    page.click("#start")
    seen: list[str] = []
    figures: set[str] = set()
    deadline = time.time() + 600
    while time.time() < deadline and not page.locator("#job-result").count():
        line = page.locator("#job-line").text_content() if page.locator("#job-line").count() else ""
        if page.locator("#job-figures").count():
            figures.add(page.locator("#job-figures").text_content())
        if line and (not seen or seen[-1] != line):
            seen.append(line)
            if line.startswith("running:") and len(seen) == 2:
                page.shot("retrain-running")
        time.sleep(0.3)
    page.shot("retrain-done")
    result = page.text_content("#job-result")
    assert result.startswith("Published v"), (result, seen)
    new = result.split()[1]
    assert new not in known and new in [v["id"] for v in http.get("/versions").json()["versions"]]
    # Progress was live: lines of the training log while the job ran, before the result.
    assert any(s.startswith("running: ") for s in seen), seen
    # ... drawn from the job's structured progress: the phase in words, with the time so far.
    phases = ("Preparing the data", "Computing features", "Training the head", "Exporting, checking and publishing")
    assert any(f.startswith(phases) and " s in" in f for f in figures), figures
    assert "Promoted:" in result
    # Which strategy won and why, in the one line the run logged.
    assert page.text_content("#job-why").startswith("Strategy: trained feature_extraction as requested")
    page.wait_for_function(f"() => document.getElementById('promoted').textContent === '{new}'")
    # The new version's figures: per-class table, confusion matrix and curves drawn from results.csv.
    page.goto("/ui/#versions")
    page.click(f"button[aria-label='Details of {new}']")
    img = page.wait_for_selector("#version-detail img")
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img)
    page.wait_for_selector("#curves svg")
    assert page.locator("#version-detail table >> text=red").count() >= 1
    assert page.text_content("#version-why").startswith("Strategy: trained feature_extraction as requested")
    # Balanced accuracy beside accuracy, and the balancing decision (these classes are even: off).
    shown = page.text_content("#balanced-accuracy")
    assert "balanced accuracy (mean recall per class)" in shown and "class balancing off (balanced" in shown
    page.shot("version-detail")
    # The Data page lists the uploaded dataset with its counts and thumbnails (fetched with the token).
    page.goto("/ui/#data")
    page.wait_for_selector("section.dataset[data-dataset=uploads] .thumbs img")
    assert page.locator("section.dataset[data-dataset=uploads] td.num").first.text_content() == "8"
    page.shot("data")


def test_data_page_labels_a_suggested_image_with_one_click(page, http):
    """A captured prediction is suggested for a dataset, and its label button adds it there (POST /feedback)."""
    files = [("images", (name.replace("/", "-"), data, "image/jpeg")) for name, data in dataset_files(3).items()]
    r = http.post("/datasets/shapes/images", files=files[:3], data={"label": "red"}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = http.post("/datasets/shapes/images", files=files[3:], data={"label": "blue"}, headers=AUTH)
    assert r.status_code == 200, r.text
    # A purple image, captured as it is predicted: neither class, so worth labelling.
    assert predict(http, ("purple.jpg", solid((150, 40, 150), seed=7))).status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline:  # captures are written by a background thread
        got = http.get("/datasets/shapes/suggest", headers=AUTH).json()
        if got.get("suggestions"):
            break
        time.sleep(0.5)
    assert got["suggestions"], got
    page.goto("/ui/#data")
    use_token(page, TOKEN)
    section = page.locator("section.dataset[data-dataset=shapes]")
    section.locator("button:has-text('Suggest images for shapes')").click()
    card = section.locator(".suggest .card").filter(has_text="purple.jpg")
    card.locator("img").wait_for()
    page.shot("suggest")
    card.locator("button:has-text('blue')").click()
    done = section.locator("[role=status]:has-text('purple.jpg labelled blue')")
    done.wait_for()
    shown = http.get("/datasets/shapes").json()
    assert shown["images"] == 7 and shown["classes"] == {"blue": 4, "red": 3}
    assert shown["snapshot"] in done.text_content()
