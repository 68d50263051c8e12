"""Open every built page in headless Chromium and check what a reader sees.

The pages are served from ``_build/html`` by a local HTTP server on 127.0.0.1. For each page listed in
``_toc.yml`` the test waits until MathJax has finished typesetting, checks that every formula became a
MathJax element without errors, that every image loaded, that nothing was fetched from another host, and
saves a full-page screenshot to ``_build/screenshots/``.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``);
Selenium comes from PyPI (``requirements.txt``). A missing browser is a failure, not a skip.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from bookpages import SCREENSHOTS, require_build

pytestmark = pytest.mark.book

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDTH = 1280
MAX_HEIGHT = 16000
TIMEOUT_S = 60

# Resolves with "ok" once MathJax has typeset the page, "none" if the page loads no MathJax.
WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
const hasScript = Array.from(document.scripts).some(s => /mathjax/i.test(s.src));
if (!hasScript) { done("none"); return; }
const start = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done("ok"), err => done("error: " + err));
  } else if (Date.now() - start > arguments_timeout) {
    done("timeout: MathJax never started");
  } else {
    setTimeout(poll, 100);
  }
})();
"""

MATH_REPORT = """
const article = document.querySelector("article") || document.querySelector("main");
const red = Array.from(article.querySelectorAll("mjx-container [style]"))
  .filter(e => /color:\\s*red/i.test(e.getAttribute("style"))).length;
return {
  sources: article.querySelectorAll(".math").length,
  containers: article.querySelectorAll("mjx-container").length,
  errors: document.querySelectorAll("mjx-merror").length,
  undefined_macros: red,
  raw_tex: /\\\\(frac|mathbf|mathcal|begin\\{|sqrt|bar\\{)/.test(article.innerText),
  too_wide: Array.from(article.querySelectorAll("div.math mjx-container"))
    .filter(e => e.scrollWidth > e.clientWidth + 2)
    .map(e => (e.closest("div.math") || e).id),
};
"""

IMAGE_REPORT = """
return Array.from(document.images).map(img => ({
  src: img.currentSrc || img.src, complete: img.complete, width: img.naturalWidth,
}));
"""

RESOURCES = "return performance.getEntriesByType('resource').map(e => e.name);"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="session")
def server(html_dir):
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: run `make browser-deps` (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="book-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WIDTH},1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT_S)
    driver.set_script_timeout(TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(predicate, what: str, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_page_renders_in_chromium(html_dir, server, browser, page):
    require_build()
    assert page.html.is_file(), f"{page.html} was not built"
    url = f"{server}/{page.docname}.html"
    browser.get_log("browser")  # discard messages from the previous page
    browser.get(url)
    _wait(lambda: browser.execute_script("return document.readyState") == "complete", "the page to load")

    status = browser.execute_async_script(WAIT_FOR_MATHJAX.replace("arguments_timeout", str(TIMEOUT_S * 1000)))
    report = browser.execute_script(MATH_REPORT)
    if report["sources"]:
        assert status == "ok", f"{page.docname}: MathJax did not finish: {status}"
        assert report["containers"] >= report["sources"], (
            f"{page.docname}: {report['sources']} formulas but only {report['containers']} rendered by MathJax"
        )
    assert report["errors"] == 0, f"{page.docname}: {report['errors']} MathJax errors (mjx-merror)"
    assert report["undefined_macros"] == 0, f"{page.docname}: undefined TeX macros shown in red"
    assert not report["raw_tex"], f"{page.docname}: raw TeX visible in the page text"
    # A display equation wider than the text column gets a scroll bar: split it with aligned/gathered.
    assert not report["too_wide"], (
        f"{page.docname}: display equations wider than the text column at {WIDTH} px: {report['too_wide']}"
    )

    def images_done():
        images = browser.execute_script(IMAGE_REPORT)
        return (images,) if all(image["complete"] for image in images) else None

    (images,) = _wait(images_done, "the images to load")
    broken = [image["src"] for image in images if image["width"] == 0]
    assert not broken, f"{page.docname}: images that did not load: {broken}"

    resources = browser.execute_script(RESOURCES)
    foreign = [r for r in resources if not r.startswith((server, "data:", "blob:"))]
    assert not foreign, f"{page.docname}: fetched from outside the book: {foreign}"
    severe = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
    ]
    assert not severe, f"{page.docname}: browser errors: {severe}"

    height = browser.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    browser.set_window_size(WIDTH, min(max(height, 600), MAX_HEIGHT))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{page.docname.replace('/', '__')}.png"
    assert browser.save_screenshot(str(shot)), f"could not save {shot}"
    assert shot.stat().st_size > 10_000, f"{shot} is suspiciously small"
    browser.set_window_size(WIDTH, 1000)
