"""The web page in a real headless Chromium against a live server: upload, label, classify, read the bars."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _server_fixtures import LABELS, demo_images, expected_label, serve_process

torch.set_num_threads(1)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("STEADYCLIP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SCREENSHOT_DIR = Path(os.environ.get("STEADYCLIP_SCREENSHOT_DIR", "/tmp"))


def _require_chromium() -> str:
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return CHROMIUM
    reason = f"no Chromium at {CHROMIUM}; install it with `make browser` (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " - CI must run this test", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = _require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _blocked_external(page: object, external: list[str]) -> None:
    """Fail any request that leaves loopback (the page must be fully self-contained)."""
    def route(r: object) -> None:
        url = r.request.url  # type: ignore[attr-defined]
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            r.continue_()  # type: ignore[attr-defined]
        else:
            external.append(url)
            r.abort()  # type: ignore[attr-defined]

    page.route("**/*", route)  # type: ignore[attr-defined]


def test_classify_an_example_image_in_the_browser(browser: object, workdir: Path) -> None:
    images = [p for p in demo_images(workdir / "images") if expected_label(p) in LABELS]
    image = images[0]
    want = expected_label(image)
    with serve_process(workdir) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 820})  # type: ignore[attr-defined]
        external: list[str] = []
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        _blocked_external(page, external)
        page.goto(url + "/")
        page.wait_for_selector("#model-fingerprint")  # the model card loaded from /v1/model
        page.set_input_files("#file", str(image))
        page.fill("#labels", "\n".join(LABELS))
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        top = page.inner_text("#top-label").strip()
        badge = page.inner_text("#badge")
        first_bar = page.get_attribute("#bars li.first", "data-label")
        page.click("#again")
        page.wait_for_selector("#compare:not(.hidden)", timeout=60_000)
        compare = page.inner_text("#compare")
        page.click("#provenance summary")
        prov_text = page.inner_text("#provenance-table")
        page.screenshot(path=str(SCREENSHOT_DIR / "steadyclip-web-page.png"), full_page=True)
        page.close()
    assert top == want == first_bar, f"page says {top!r} for {image.name}"
    assert "Reproducible" in badge
    assert "bit-for-bit identical" in compare
    assert "weights sha256" in prov_text
    assert not external, f"the page tried to load external resources: {external}"
    assert not console_errors, console_errors


def test_page_asks_for_the_token_and_uses_it(browser: object, workdir: Path) -> None:
    image = demo_images(workdir / "images")[0]
    with serve_process(workdir, "--token", "page-secret") as url:
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(url + "/")
        page.wait_for_selector("#token-section:not(.hidden)")
        page.fill("#token", "page-secret")
        page.dispatch_event("#token", "change")
        page.wait_for_selector("#model-fingerprint")
        page.set_input_files("#file", str(image))
        page.fill("#labels", "\n".join(LABELS))
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        assert page.inner_text("#top-label").strip() in LABELS
        page.close()
