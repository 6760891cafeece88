"""Headless Chromium for the reader's-view tests, with the network fenced to 127.0.0.1.

Playwright (the Python package; its driver ships in the wheel) drives Debian's ``chromium``
through ``executable_path``: no browser is downloaded. The fence, the launch flags, the static
server and the settle script live in ``book/_ext/qcourse_chromium.py``, which the PDF edition
uses too; this module adds pytest's skips and ``Guard``: every request a page makes goes through
it, one to any host other than 127.0.0.1 is aborted and recorded, and so are failed requests,
HTTP errors, console errors and uncaught page errors, so that a test can assert that there were
none.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "_build" / "screenshots"
sys.path.insert(0, str(ROOT / "book" / "_ext"))

from qcourse_chromium import (  # noqa: E402  (book/_ext, the one home of the fence)
    CHROMIUM_ARGS,
    SETTLE,
    StaticServer,
    chromium_executable,
    fenced_route,
    is_local,
    launch,
    open_settled,
)

__all__ = ["CHROMIUM_ARGS", "SETTLE", "Guard", "StaticServer", "chromium_browser",
           "chromium_executable", "guarded_page", "is_local", "launch", "open_settled",
           "screenshot_path",
           "sync_playwright"]


def sync_playwright():
    """Playwright's entry point, or a skip saying what is missing."""
    api = pytest.importorskip(
        "playwright.sync_api",
        reason="the Playwright Python package is not installed (the `test` extra installs it)")
    if chromium_executable() is None:
        pytest.skip("no Chromium found (install Debian's `chromium`, as .ci/run does, "
                    "or set QCOURSE_CHROMIUM)")
    return api.sync_playwright()


@dataclass
class Guard:
    """Records what a page did wrong: requests off the machine, failures, console errors."""

    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    ignore_console: tuple[str, ...] = ()

    def attach(self, page) -> None:
        page.route("**/*", fenced_route(self.blocked))
        page.on("requestfailed", self._request_failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.console_errors.append(f"uncaught: {exc}"))

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


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"
