"""The web page in headless Chromium (Playwright), against the real service on a real index.

The page is checked against the JSON the API returns: the number of results, their scores and
movement badges, the random-weights banner, the explanation picture and the error message.
Chromium is Debian's (``/usr/bin/chromium``); the test skips without it in a user's clone and
fails in CI (``VIT_RERANK_REQUIRE_SHARED=1``), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REQUIRE_SHARED, tiny_vit_kwargs

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium fixture skips (or fails in CI) with the reason
    expect = None

CHROMIUM = Path(os.environ.get("VIT_RERANK_CHROMIUM", "/usr/bin/chromium"))
CLASSES = ("hat", "shoes", "skirt", "dress")
PER_CLASS = 5
SCREENSHOT = Path("/tmp/vit-rerank-web-page.png")


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium through Playwright: skipped in a user's clone, a failure in CI."""

    def missing(reason: str):
        if REQUIRE_SHARED:
            pytest.fail(f"{reason}, and VIT_RERANK_REQUIRE_SHARED=1 forbids skipping (.ci/run installs it)")
        pytest.skip(reason)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless=new"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    out: list[Path] = []
    for cls in CLASSES:
        out += sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:PER_CLASS]
    return out


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, photos) -> Path:
    """20 clothing photos indexed with the tiny random ViT."""
    from indexer.build import add_records, new_manifest
    from indexer.gallery import Gallery
    from indexer.sources import ImageRecord
    from reranker.backbones import create_backbone

    backbone = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    folder = tmp_path_factory.mktemp("web") / "index"
    manifest = new_manifest(backbone, patch_weights="rollout",
                            model_kwargs=tiny_vit_kwargs())
    records = [ImageRecord(path=str(p), id=f"{p.parent.name}-{p.stem[:8]}", label=p.parent.name) for p in photos]
    gallery = Gallery.create(folder, manifest)
    try:
        report = add_records(gallery, backbone, records, workers=0, progress=False)
        assert report.added == len(photos)
    finally:
        gallery.close()
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(index_dir):
    """The real app under uvicorn on a free loopback port; yields its base URL once ready."""
    import uvicorn

    from service.app import create_app
    from service.settings import ServiceSettings

    port = _free_port()
    app = create_app(ServiceSettings(index=index_dir, device="cpu", port=port))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn-web-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the service did not become ready within 60 s"
        assert thread.is_alive(), "the server thread died"
        time.sleep(0.1)
    yield base
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def movement_badge(rank_before: int, rank_after: int) -> str:
    delta = rank_before - rank_after
    return f"▲{delta}" if delta > 0 else f"▼{-delta}" if delta < 0 else "="


def score_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def test_page_shows_the_reranked_results_and_their_explanations(page, server, photos):
    query = photos[PER_CLASS + 1]  # a gallery photo: its own copy must come first by global cosine
    page.goto("/")
    assert page.title().startswith("vit-rerank")

    info = httpx.get(f"{server}/index").json()
    assert info["random_weights"] is True
    banner = page.get_by_test_id("random-weights-banner")
    banner.wait_for(state="visible")
    assert "random" in banner.inner_text().lower()
    page.wait_for_function("document.getElementById('index-info').textContent.includes('images indexed')")
    assert f"{info['images']} images indexed" in page.get_by_test_id("index-info").inner_text()

    # Options go with the query: 7 results, half the mass matched, uniform patch weights.
    page.get_by_label("Results (top_k)").fill("7")
    page.get_by_label("Matched mass (s)").fill("0.5")
    page.get_by_label("Patch weights").select_option("uniform")
    with page.expect_response(lambda r: r.url.endswith("/search") and r.request.method == "POST") as answer:
        page.get_by_test_id("query-image").set_input_files(str(query))
    assert answer.value.status == 200
    shown = answer.value.json()
    assert shown["settings"]["top_k"] == 7 and shown["settings"]["s"] == 0.5
    assert shown["settings"]["marginals"] == "uniform" and shown["marginals"] == "uniform"

    cards = page.get_by_test_id("result")
    cards.first.wait_for()
    assert cards.count() == len(shown["results"]) == 7

    # The page's grid is the API's answer, in rank order, with the API's numbers.
    for i, hit in enumerate(shown["results"]):
        card = cards.nth(i)
        assert hit["rank_after"] == i
        assert card.get_attribute("data-id") == hit["id"]
        assert card.get_by_test_id("result-rank").inner_text() == f"#{i + 1}"
        assert card.get_by_test_id("result-label").inner_text() == hit["label"]
        assert card.get_by_test_id("score-final").inner_text() == score_text(hit["final_score"])
        assert card.get_by_test_id("score-global").inner_text() == score_text(hit["global_score"])
        assert card.get_by_test_id("score-structural").inner_text() == score_text(hit["structural_score"])
        assert card.get_by_test_id("result-movement").inner_text() == movement_badge(hit["rank_before"], hit["rank_after"])
    # Screen readers get each result's label and movement in words.
    first = shown["results"][0]
    moved = first["rank_before"] - first["rank_after"]
    words = "did not move" if moved == 0 else f"moved {'up' if moved > 0 else 'down'} {abs(moved)} place"
    expect(cards.nth(0).get_by_role("button")).to_have_accessible_name(
        re.compile(rf"{re.escape(first['label'])}.*{words}"))
    # The query is in the gallery, so it was first by global cosine.
    assert [h for h in shown["results"] if h["rank_before"] == 0][0]["label"] == query.parent.name

    # The same image sent by another client gets the same ranking (the page sent what it showed).
    with query.open("rb") as fh:
        direct = httpx.post(f"{server}/search", files={"image": (query.name, fh, "image/jpeg")},
                            data={"top_k": "7", "s": "0.5", "marginals": "uniform"}, timeout=60).json()
    assert [h["id"] for h in direct["results"]] == [h["id"] for h in shown["results"]]
    for a, b in zip(direct["results"], shown["results"]):
        assert a["final_score"] == pytest.approx(b["final_score"], abs=1e-5)
        assert a["rank_before"] == b["rank_before"]

    # Every thumbnail loaded; stage timings are shown.
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=result-thumb]')].every(i => i.complete && i.naturalWidth > 0)"
    )
    timings = page.get_by_test_id("timings")
    assert timings.is_visible()
    assert page.get_by_test_id("timing-total").inner_text() == f"{shown['timings_ms']['total']:.1f} ms"
    for stage in ("embed", "search", "rerank"):
        assert page.get_by_test_id(f"timing-{stage}").is_visible()

    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Keyboard: focus the third result and press Enter: its patch-matching picture opens.
    hit = shown["results"][2]
    assert hit["explanation_url"]
    button = cards.nth(2).get_by_test_id("result-button")
    button.focus()
    with page.expect_response(lambda r: "/explanations/" in r.url) as picture:
        page.keyboard.press("Enter")
    assert picture.value.status == 200 and picture.value.headers["content-type"] == "image/png"
    assert picture.value.url.endswith(hit["explanation_url"])
    dialog = page.get_by_test_id("explanation-dialog")
    dialog.wait_for(state="visible")
    image = page.get_by_test_id("explanation-image")
    image.wait_for(state="visible")
    assert image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
    assert hit["id"] in page.get_by_test_id("explanation-caption").inner_text()
    page.screenshot(path=str(SCREENSHOT.with_name("vit-rerank-web-explanation.png")))
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # A click opens another result's picture.
    cards.nth(0).get_by_test_id("result-button").click()
    image.wait_for(state="visible")
    assert image.evaluate("img => img.naturalWidth > 0")
    assert image.get_attribute("src") == shown["results"][0]["explanation_url"]
    page.get_by_test_id("explanation-close").click()
    dialog.wait_for(state="hidden")


def test_api_errors_are_shown_and_the_page_recovers(page, server, photos, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    with text.open("rb") as fh:
        api = httpx.post(f"{server}/search", files={"image": (text.name, fh, "text/plain")}, timeout=60)
    assert api.status_code in (400, 415)
    detail = api.json()["detail"]

    page.goto("/")
    error = page.get_by_test_id("error-message")
    assert error.is_hidden()
    page.get_by_test_id("query-image").set_input_files(str(text))
    error.wait_for(state="visible")
    assert detail in error.inner_text() and str(api.status_code) in error.inner_text()
    assert page.get_by_test_id("result").count() == 0

    # A bad option: the API's 422 message is shown too.
    with photos[0].open("rb") as fh:
        api = httpx.post(f"{server}/search", files={"image": (photos[0].name, fh, "image/jpeg")},
                         data={"s": "2"}, timeout=60)
    assert api.status_code == 422
    page.get_by_label("Matched mass (s)").fill("2")
    page.get_by_test_id("query-image").set_input_files(str(photos[0]))
    page.wait_for_function("document.getElementById('error-message').textContent.includes('422')")
    assert api.json()["detail"] in error.inner_text()

    # A good query afterwards clears the message.
    page.get_by_label("Matched mass (s)").fill("")
    page.get_by_test_id("search-button").click()
    page.get_by_test_id("result").first.wait_for()
    assert error.is_hidden()

    # An explanation the server no longer has: its 404 message appears in the panel.
    page.route("**/explanations/**", lambda route: route.continue_(
        url=route.request.url.replace("/explanations/", "/explanations/0000expired", 1)))
    page.get_by_test_id("result-button").first.click()
    panel_error = page.get_by_test_id("explanation-error")
    panel_error.wait_for(state="visible")
    assert "404" in panel_error.inner_text()
    assert page.get_by_test_id("explanation-image").is_hidden()


def test_layout_is_usable_on_a_phone(chromium, server, photos):
    context = chromium.new_context(base_url=server, viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto("/")
        page.get_by_test_id("query-image").set_input_files(str(photos[3]))
        page.get_by_test_id("result").first.wait_for()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width} px wide)"
        page.screenshot(path=str(SCREENSHOT.with_name("vit-rerank-web-phone.png")))
    finally:
        context.close()
