"""Headless Chromium on the built book, offline: the one home of the network fence.

The PDF edition (``qcourse_pdf.py``) and the reader's-view tests (``tests/browser_support.py``,
which adds pytest's skips and a ``Guard`` that records what a page did wrong) open the built
HTML pages the same way, from here:

- Debian's ``chromium`` (or ``$QCOURSE_CHROMIUM``) driven by Playwright through
  ``executable_path`` with :data:`CHROMIUM_ARGS`: no browser is downloaded;
- the pages served from 127.0.0.1 by a :class:`StaticServer` on an ephemeral port;
- every request fenced (:func:`fenced_route`): one to any host other than 127.0.0.1 is aborted
  and its URL recorded, so that a build or a test can refuse a page that asks the network;
- :data:`SETTLE`, the script that waits until MathJax has typeset the page and every image has
  decoded, and :func:`open_settled`, which opens a page and waits for it, before a page is read
  or printed.

Not a Sphinx extension: plain Python (no pytest, no Sphinx), imported by both.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

# Flags that work here, also as root. Playwright adds --headless and a fresh, empty
# --user-data-dir of its own for every launch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SETTLE = """
async () => {
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    await window.MathJax.startup.promise;
  }
  const images = Array.from(document.images);
  for (const img of images) { img.loading = "eager"; }
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
}
"""


def open_settled(page, url: str, idle_timeout_ms: int = 30_000) -> None:
    """Open ``url`` in ``page`` and wait until it has settled: :data:`SETTLE` (MathJax typeset,
    images decoded), then nothing loading for a moment (widgets); a page still busy after
    ``idle_timeout_ms`` is judged (or printed) as it stands."""
    page.goto(url, wait_until="load")
    for _ in range(3):  # a page that redirects (index.html) replaces its document once
        try:
            page.evaluate(SETTLE)
            break
        except Exception as exc:  # Playwright's Error: "Execution context was destroyed"
            if "context was destroyed" not in str(exc):
                raise
            page.wait_for_load_state("load")
    try:
        page.wait_for_load_state("networkidle", timeout=idle_timeout_ms)
    except Exception as exc:  # Playwright's TimeoutError
        if "Timeout" not in str(exc):
            raise


def chromium_executable() -> str | None:
    """Chromium to drive: $QCOURSE_CHROMIUM, else the first of chromium, chromium-browser."""
    candidates = [os.environ.get("QCOURSE_CHROMIUM"), "chromium", "chromium-browser"]
    for name in filter(None, candidates):
        path = shutil.which(name)
        if path:
            return path
    return None


def launch(playwright):
    """A headless Chromium from ``playwright`` (``sync_playwright()``'s object)."""
    return playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                      args=CHROMIUM_ARGS)


def is_local(url: str) -> bool:
    """A URL that stays on this machine: 127.0.0.1, or data:, blob:, about:."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname == "127.0.0.1"


def fenced_route(blocked: list[str]):
    """A handler for ``page.route("**/*", ...)``: local requests go on, any other is aborted
    and its URL appended to ``blocked``."""

    def route(request_route) -> None:
        url = request_route.request.url
        if is_local(url):
            request_route.continue_()
        else:
            blocked.append(url)
            request_route.abort("blockedbyclient")

    return route


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class StaticServer:
    """Serve a folder on 127.0.0.1 from a thread (an ephemeral port); ``url`` ends with ``/``."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StaticServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
