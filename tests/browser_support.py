"""Headless Chromium for the reader's-view tests, with the network fenced to 127.0.0.1.

Playwright (the Python package; its driver ships in the wheel) drives Debian's ``chromium``
through ``executable_path``: no browser is downloaded. Every request a page makes goes through
``Guard``: one to any host other than 127.0.0.1 is aborted and recorded, and so are failed
requests, HTTP errors, console errors and uncaught page errors, so that a test can assert that
there were none.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "_build" / "screenshots"

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


def chromium_executable() -> str | None:
    """Chromium to drive: $QCOURSE_CHROMIUM, else the first of chromium, chromium-browser."""
    candidates = [os.environ.get("QCOURSE_CHROMIUM"), "chromium", "chromium-browser"]
    for name in filter(None, candidates):
        path = shutil.which(name)
        if path:
            return path
    return None


def sync_playwright():
    """Playwright's entry point, or a skip saying what is missing."""
    api = pytest.importorskip(
        "playwright.sync_api",
        reason="the Playwright Python package is not installed (the `test` extra installs it)")
    if chromium_executable() is None:
        pytest.skip("no Chromium found (install Debian's `chromium`, as .ci/run does, "
                    "or set QCOURSE_CHROMIUM)")
    return api.sync_playwright()


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                      args=CHROMIUM_ARGS)


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname == "127.0.0.1"


@dataclass
class Guard:
    """Records what a page did wrong: requests off the machine, failures, console errors."""

    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    ignore_console: tuple[str, ...] = ()

    def attach(self, page) -> None:
        page.route("**/*", self._route)
        page.on("requestfailed", self._request_failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.console_errors.append(f"uncaught: {exc}"))

    def _route(self, route) -> None:
        url = route.request.url
        if is_local(url):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")

    def _request_failed(self, request) -> None:
        if is_local(request.url):
            self.failed.append(f"{request.url}: {request.failure}")

    def _response(self, response) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.url}: HTTP {response.status}")

    def _console(self, message) -> None:
        if message.type == "error" and not any(s in message.text for s in self.ignore_console):
            location = message.location or {}
            self.console_errors.append(f"{message.text} ({location.get('url', '')})")

    def problems(self) -> str:
        lines = [f"request off 127.0.0.1: {u}" for u in self.blocked]
        lines += [f"failed request: {u}" for u in self.failed]
        lines += [f"console error: {m}" for m in self.console_errors]
        return "\n".join(lines)


@contextlib.contextmanager
def chromium_browser():
    """One headless Chromium for a test module (the ``browser`` fixtures)."""
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def guarded_page(browser, width: int, height: int, timeout_ms: int):
    """A fresh page in its own context, its requests fenced by a ``Guard`` (``page.guard``)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    guard = Guard()
    guard.attach(page)
    page.guard = guard
    try:
        yield page
    finally:
        context.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class StaticServer:
    """Serve a folder on 127.0.0.1 from a thread (an ephemeral port)."""

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


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"
