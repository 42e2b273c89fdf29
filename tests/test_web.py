"""The search page (scripts.web): the page server alone, in-process, then in a real Chromium against the
session's TorchServe."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import io
import json
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from scripts import api, web
from scripts.serve import free_ports
from tests.conftest import skip_or_fail
from tests.serving_fixtures import NAME
from training.tiny_run import CLASSES, photo_jpeg

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by `make venv`; Playwright downloads no browser
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # no calls to the closed network
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
PAGE = {web.PAGE_HEADER: "1"}


@pytest.fixture
def photos(tmp_path) -> web.Photos:
    folder = tmp_path / "work" / "photos"
    folder.mkdir(parents=True)
    for number in range(3):
        (folder / f"img-{number:03d}.jpg").write_bytes(photo_jpeg(number, size=(640, 480)))
    (folder / "notes.txt").write_text("not a photo")
    (tmp_path / "secret.jpg").write_bytes(photo_jpeg(9))  # beside the folder: never served
    return web.Photos([tmp_path / "work"], tmp_path / "cache")


class Listener:
    """A TCP port that counts the connections made to it and answers none: where a forwarded search would go."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            connection, _ = self.socket.accept()
            self.connections += 1
            connection.close()


def client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1:8090")


def test_thumbnails_come_from_the_catalogue_folder_only(photos, tmp_path):
    page = client(web.create_app("http://127.0.0.1:9", photos, web.InferenceKey("key")))
    response = page.get("/photos/img-001")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (web.THUMBNAIL_SIZE, web.THUMBNAIL_SIZE * 3 // 4)
    cached = tmp_path / "cache" / "img-001.jpg"
    made = cached.stat().st_mtime_ns
    assert page.get("/photos/img-001").content == response.content and cached.stat().st_mtime_ns == made
    assert page.get("/photos/img-999").json() == {"code": 404, "type": "unknown_photo",
                                                  "error": "no catalogue photo has the id 'img-999'"}
    for hostile in ("../secret", "../../secret", "/etc/passwd", "..\\secret", "notes", str(tmp_path / "secret")):
        assert page.get(f"/photos/{hostile.replace('/', '%2F')}").status_code == 404, hostile
        found = page.post("/api/search", data={"image_id": hostile}, headers=PAGE)
        assert found.status_code == 404 and found.json()["type"] == "unknown_photo", hostile
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["img-001.jpg"]
    (photos.folders[0] / "img-003.png").write_bytes(photo_jpeg(3))  # a photo added later is found
    photos.scanned -= web.RESCAN_AFTER
    assert page.get("/photos/img-003").status_code == 200


def test_searches_are_bounded_and_refusals_are_clear_before_anything_is_forwarded(photos):
    torchserve = Listener()
    page = client(web.create_app(torchserve.url, photos, web.InferenceKey("key"), max_upload=4096))
    too_large = page.post("/api/search", files={"photo": ("big.jpg", photo_jpeg(1, size=(400, 400)))}, headers=PAGE)
    assert too_large.status_code == 413
    assert page.post("/api/search", files={"photo": ("p.jpg", b"\xff\xd8\xff" + bytes(100))}).status_code == 403
    assert page.post("/api/search", headers=PAGE).json()["type"] == "empty_request"
    assert page.get("/", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert torchserve.connections == 0
    answer = page.post("/api/search", data={"title": "a sofa"}, headers=PAGE)  # forwarded: no answer comes
    assert torchserve.connections == 1 and answer.status_code == 503
    assert page.get("/api/settings").json() == {"categories": [], "max_upload": 4096}


def test_a_torchserve_that_is_down_is_a_clear_503(photos):
    [port] = free_ports(1)
    page = client(web.create_app(f"http://127.0.0.1:{port}", photos, web.InferenceKey("key")))
    down = page.post("/api/search", files={"photo": ("p.jpg", photo_jpeg(1))}, headers=PAGE)
    assert down.status_code == 503 and down.json()["type"] == "service_unavailable"
    assert "is not answering" in down.json()["error"] and "try again" in down.json()["error"]


def test_the_page_has_no_external_resources_and_a_strict_policy(photos):
    page = client(web.create_app("http://127.0.0.1:9", photos, web.InferenceKey("key")))
    response = page.get("/")
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    for name in ("index.html", "page.js", "page.css"):
        text = (web.STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        assert page.get("/" if name == "index.html" else f"/static/{name}").text == text
    assert "innerHTML" not in (web.STATIC / "page.js").read_text()  # sellers' titles are drawn as text only


@pytest.mark.server
def test_the_page_server_reads_a_renewed_key(served, recipe, photos, tmp_path):
    key_file = tmp_path / "key_file.json"
    real = json.loads((served.workdir / api.KEY_FILE).read_text())
    key_file.write_text(json.dumps({**real, "inference": {"key": "expired"}}))
    page = client(web.create_app(served.inference_url, photos, web.InferenceKey(key_file=key_file)))
    refused = page.post("/api/search", data={"title": "large vinyl"}, headers=PAGE)
    assert refused.status_code == 502 and "the inference key from key file" in refused.json()["error"]
    key_file.write_text(json.dumps(real))  # what TorchServe does when it renews its keys
    answer = page.post("/api/search", data={"title": "large vinyl", "k": "2"}, headers=PAGE).json()
    assert answer["inputs"] == ["title"] and len(answer["neighbours"]) == 2
    refused = page.post("/api/search", data={"title": "large vinyl", "k": "0"}, headers=PAGE)
    assert refused.status_code == 400 and refused.json()["type"] == "bad_option"  # TorchServe's refusal, as it is


@pytest.fixture(scope="module")
def page_address(served, recipe, module_tmp):
    workdir = module_tmp("page")
    address = web.start_page(workdir, served.inference_url, [recipe.work], free_ports(1)[0],
                             key_file=served.workdir / api.KEY_FILE)
    yield address
    assert web.stop_page(workdir) is not None and web.page_address(workdir) is None


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        skip_or_fail(f"{CHROMIUM} is missing: `make venv` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def expect(locator):
    """Playwright's retrying assertions: they read the page without evaluating strings, which the page's CSP
    forbids (wait_for_function's polling does, and fails whenever its first look is too early)."""
    from playwright.sync_api import expect

    return expect(locator)


WAIT = {"timeout": 30_000}


def wait_for_answer(page, inputs: str):
    expect(page.locator("#answer")).to_be_visible(**WAIT)
    expect(page.locator("#provenance")).to_have_text(re.compile("^from " + re.escape(inputs) + " "), **WAIT)


@pytest.mark.server
@pytest.mark.slow
def test_a_photo_in_a_real_browser(browser, page_address, served, recipe, tmp_path):
    keys = {entry["key"] for entry in json.loads((served.workdir / api.KEY_FILE).read_text()).values()}
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    seen = []
    page.on("requestfinished", lambda request: seen.append(request))
    page.goto(page_address)
    photo = recipe.run.photos["img-002"]
    page.set_input_files("#photo", str(photo))
    wait_for_answer(page, "photo")
    direct = api.predict(served, photo.read_bytes(), k=12)
    assert page.inner_text("#category-line").startswith(direct["category"] + " (")
    assert direct["category"] in CLASSES
    cards = page.locator("#grid li")
    assert [cards.nth(n).get_attribute("data-image-id") for n in range(cards.count())] == [
        neighbour["image_id"] for neighbour in direct["neighbours"]]
    images = page.locator("#grid img")
    assert images.count() == len(direct["neighbours"]) > 1
    for number in range(images.count()):
        expect(images.nth(number)).to_have_js_property("complete", True, **WAIT)
    assert page.evaluate("[...document.querySelectorAll('#grid img')].every(i => i.naturalWidth > 0)")
    assert f"model {NAME} 1.0" in page.inner_text("#provenance")
    page.screenshot(path=os.environ.get("MARKETPLACE_SCREENSHOT", str(tmp_path / "search-page.png")), full_page=True)

    page.fill("#title", "large vinyl")  # the keyboard: Enter in a field searches
    page.press("#title", "Enter")
    wait_for_answer(page, "photo + title")
    assert "words" in page.inner_text("#grid li >> nth=0")

    page.fill("#title", "")
    wanted = cards.nth(1).get_attribute("data-image-id")
    cards.nth(1).get_by_role("button", name="More like this").click()
    expect(cards.first).to_have_attribute("data-image-id", wanted, **WAIT)

    page.set_input_files("#photo", files=[{"name": "invoice.pdf", "mimeType": "application/pdf", "buffer": PDF}])
    page.wait_for_selector("#message", state="visible")
    message = page.inner_text("#message")
    assert "not a photo the service can read" in message and "unsupported_format" in message
    assert page.locator("#answer").is_hidden()

    shown = page.content() + "".join(str(request.all_headers()) + request.url + (request.post_data or "")
                                     for request in seen)
    shown += "".join(request.response().text() for request in seen  # the document itself: page.content()
                     if request.resource_type in ("fetch", "script", "stylesheet"))
    assert keys and not any(key in shown for key in keys)
    outside = [request.url for request in seen if not request.url.startswith((page_address, f"blob:{page_address}"))]
    assert not outside  # nothing from another origin (blob: is the chosen photo's preview)
    context.close()


@pytest.mark.server
@pytest.mark.slow
def test_the_page_fits_a_phone(browser, page_address, recipe):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(page_address)
    assert page.locator("#camera").get_attribute("capture") == "environment"
    page.set_input_files("#photo", str(recipe.run.photos["img-004"]))
    wait_for_answer(page, "photo")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.evaluate("document.querySelector('#grid li').getBoundingClientRect().width") < 375 / 2
    page.fill("#category", "Spaceships")  # TorchServe's 400, shown with its own words
    page.click("#go")
    page.wait_for_selector("#message", state="visible")
    assert "could not use that request" in page.inner_text("#message") and "bad_option" in page.inner_text("#message")
    huge = {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8\xff" + bytes(web.MAX_UPLOAD)}
    page.set_input_files("#photo", files=[huge])  # refused by the page before it is sent
    expect(page.locator("#message")).to_contain_text("takes up to 20 MiB", **WAIT)
    context.close()
