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
    from indexer.index_dir import IndexDir
    from indexer.sources import ImageRecord
    from reranker.backbones import create_backbone

    backbone = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    folder = tmp_path_factory.mktemp("web") / "index"
    manifest = new_manifest(backbone, patch_weights="rollout",
                            model_kwargs=tiny_vit_kwargs())
    records = [ImageRecord(path=str(p), id=f"{p.parent.name}-{p.stem[:8]}", label=p.parent.name) for p in photos]
    gallery = IndexDir.create(folder, manifest)
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
        # what moved it: the rank change and the structural score's contribution lambda * sigma
        contribution = hit["structural_contribution"]
        assert contribution == pytest.approx(shown["settings"]["lambda"] * hit["structural_score"], abs=1e-6)
        sign = "+" if contribution >= 0 else "−"
        assert card.get_by_test_id("result-why").inner_text() == (
            f"rank {hit['rank_before'] + 1} → {i + 1} · λσ {sign}{abs(contribution):.4f}")
        assert card.get_by_test_id("near-duplicate").is_hidden()  # random weights: never flagged
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

    # The before/after toggle: the same results in the global order, then back.
    toggle = page.get_by_test_id("order-toggle")
    assert toggle.is_visible()
    assert page.get_by_test_id("order-reranked").get_attribute("aria-pressed") == "true"
    page.get_by_test_id("order-global").click()
    expect(page.get_by_test_id("order-global")).to_have_attribute("aria-pressed", "true")
    by_global = sorted(shown["results"], key=lambda h: h["rank_before"])
    assert [cards.nth(i).get_attribute("data-id") for i in range(7)] == [h["id"] for h in by_global]
    for i, hit in enumerate(by_global):
        assert cards.nth(i).get_by_test_id("result-rank").inner_text() == f"#{hit['rank_before'] + 1}"
    assert by_global != shown["results"] or all(h["rank_before"] == h["rank_after"] for h in by_global)
    page.screenshot(path=str(SCREENSHOT.with_name("vit-rerank-web-global-order.png")), full_page=True)
    page.get_by_test_id("order-reranked").click()
    assert [cards.nth(i).get_attribute("data-id") for i in range(7)] == [h["id"] for h in shown["results"]]

    # Keyboard: focus the third result and press Enter: its patch-matching picture opens.
    hit = shown["results"][2]
    assert hit["explanation_url"]
    button = cards.nth(2).get_by_test_id("result-button")
    button.focus()
    with page.expect_response(lambda r: "/explanations/" in r.url and ".png" in r.url) as picture:
        page.keyboard.press("Enter")
    assert picture.value.status == 200 and picture.value.headers["content-type"] == "image/png"
    assert f"{hit['explanation_url']}?size=" in picture.value.url
    dialog = page.get_by_test_id("explanation-dialog")
    dialog.wait_for(state="visible")
    image = page.get_by_test_id("explanation-image")
    image.wait_for(state="visible")
    assert image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
    assert hit["id"] in page.get_by_test_id("explanation-caption").inner_text()
    # The larger picture, and the dialog gives it the room it has.
    assert image.evaluate("img => img.naturalWidth") >= 896
    assert image.bounding_box()["width"] >= 0.6 * 1280
    # The numbers beside the picture are the JSON explanation's.
    numbers = httpx.get(f"{server}{hit['explanation_json_url']}", params={"top": 6}).json()
    panel = page.get_by_test_id("explanation-numbers")
    panel.wait_for(state="visible")
    assert panel.get_by_test_id("num-global").inner_text() == score_text(hit["global_score"])
    assert panel.get_by_test_id("num-sigma").inner_text() == score_text(hit["structural_score"])
    assert panel.get_by_test_id("num-final").inner_text() == score_text(hit["final_score"])
    assert panel.get_by_test_id("num-ranks").inner_text() == f"#{hit['rank_before'] + 1} → #{hit['rank_after'] + 1}"
    assert panel.get_by_test_id("num-matched").inner_text().startswith(f"{100 * numbers['matched_mass']:.1f} %")
    rows = page.get_by_test_id("explanation-pairs").locator("tbody tr")
    assert rows.count() == min(6, len(numbers["pairs"]))  # as many as the picture draws
    first = numbers["pairs"][0]
    assert rows.nth(0).inner_text().split() == [
        "1", f"({first['query']['row']},", f"{first['query']['col']})", f"({first['candidate']['row']},",
        f"{first['candidate']['col']})", f"{first['similarity']:.3f}", f"{first['mass']:.4f}"]
    page.screenshot(path=str(SCREENSHOT.with_name("vit-rerank-web-explanation-plain.png")))
    # The heat map is an optional layer: asked for, the picture is fetched again with it.
    with page.expect_response(lambda r: "heatmap=true" in r.url) as heat:
        page.get_by_test_id("explanation-heatmap").check()
    assert heat.value.status == 200
    page.wait_for_function("document.getElementById('explanation-image').src.includes('heatmap=true') && "
                           "document.getElementById('explanation-image').complete")
    page.screenshot(path=str(SCREENSHOT.with_name("vit-rerank-web-explanation.png")))
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # A click opens another result's picture.
    cards.nth(0).get_by_test_id("result-button").click()
    image.wait_for(state="visible")
    assert image.evaluate("img => img.naturalWidth > 0")
    assert image.get_attribute("src").startswith(shown["results"][0]["explanation_url"] + "?")
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


def test_options_filters_and_a_region_reach_the_search(page, server, photos, tmp_path):
    """λ, rerank_k and a label filter are sent with the search; a box dragged on the photo searches that region;
    a failed search afterwards keeps the previous results."""
    page.goto("/")
    page.get_by_label("Candidates reranked (rerank_k)").fill("12")
    page.get_by_label("Structure weight (λ)").fill("0.5")
    label = photos[0].parent.name
    page.get_by_label("Only labels (comma-separated)").fill(f"{label}, nowhere")
    with page.expect_response("**/search") as first:
        page.get_by_test_id("query-image").set_input_files(str(photos[0]))
    answer = first.value.json()
    assert answer["settings"]["rerank_k"] == 12 and answer["settings"]["lambda"] == 0.5 and answer["crop"] is None
    page.get_by_test_id("result").first.wait_for()
    results = page.get_by_test_id("result")
    assert results.count() > 0
    assert all(label in results.nth(i).inner_text() for i in range(results.count()))

    stage = page.get_by_test_id("region-stage")
    stage.wait_for()
    box = page.get_by_test_id("region-image").bounding_box()
    with page.expect_response("**/search") as second:
        page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.2 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.8 * box["height"], steps=5)
        page.mouse.up()
    x0, y0, x1, y1 = second.value.json()["crop"]
    assert abs(x0 - 0.1) < 0.03 and abs(y0 - 0.2) < 0.03 and abs(x1 - 0.6) < 0.03 and abs(y1 - 0.8) < 0.03
    assert page.get_by_test_id("region-box").is_visible()
    page.wait_for_function("document.getElementById('search-status').textContent.includes('result')")
    shown = page.get_by_test_id("result").count()
    assert shown > 0

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.get_by_test_id("query-image").set_input_files(str(bad))
    page.get_by_test_id("error-message").wait_for(state="visible")
    assert page.get_by_test_id("result").count() == shown  # the previous results stay
    assert "previous search" in page.get_by_test_id("search-status").inner_text()
    assert page.get_by_test_id("query-preview").is_hidden()  # no broken picture
