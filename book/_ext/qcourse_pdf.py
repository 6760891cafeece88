"""The PDF edition: the built HTML book, page by page in reading order, printed by Chromium.

    python book/_ext/qcourse_pdf.py _build/html _build/pdf/book.pdf     (what `make pdf` runs)

Every page of ``_toc.yml`` (the chapters and their self-study sections, in order) is served
from 127.0.0.1 and opened in headless Chromium (Debian's ``chromium`` through Playwright's
``executable_path``; no browser is downloaded, and every request off 127.0.0.1 is refused, so
the PDF is made offline from exactly what the HTML build wrote: the fence of
``qcourse_chromium.py``, which the reader's-view tests use too). Once MathJax has typeset the
page and its images have decoded, the page is printed to PDF (A4, backgrounds on, the theme's
print stylesheet hides the navigation), and ``pdfunite`` (poppler-utils) joins the pages into
one file. A copy is written next to the HTML as ``book.pdf``, which the introduction links.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qcourse_chromium import (  # noqa: E402  (the fence, shared with the tests)
    StaticServer,
    chromium_executable,
    fenced_route,
    launch,
    open_settled,
)

ROOT = Path(__file__).resolve().parents[2]
PRINT_CSS = """
@media print {
  .bd-header, .bd-sidebar-primary, .bd-sidebar-secondary, .bd-footer, .bd-footer-content,
  .bd-header-article, .prev-next-area, .header-article-items, #pst-skip-link,
  .bd-search, .theme-switch-button, button, .toggle-details__summary { display: none !important; }
  .bd-main, .bd-content, .bd-article-container, .bd-page-width { max-width: 100% !important; }
  details, details > * { display: block !important; }
  img { max-width: 100% !important; break-inside: avoid; }
  table { break-inside: avoid; }
  div.cell_output { break-inside: auto; }
}
"""


def toc_pages(toc_file: Path) -> list[str]:
    """Every page of ``_toc.yml`` in reading order."""
    toc = yaml.safe_load(toc_file.read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries:
            pages.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return pages


@contextlib.contextmanager
def fenced_page(browser, blocked: list[str]):
    """A page in a context of its own, every request off 127.0.0.1 refused and appended to
    ``blocked``."""
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    try:
        page = context.new_page()
        page.route("**/*", fenced_route(blocked))
        yield page
    finally:
        context.close()


def build_pdf(html: Path, out: Path, toc_file: Path = ROOT / "_toc.yml", *, browser=None,
              open_page=None, inspect=None) -> Path:
    """Print every page of ``toc_file`` from the built ``html`` and join them into ``out``.

    The reader's-view tests print the book in the same pass in which they read it, so that each
    page is opened once: they pass their ``browser``, ``open_page(browser)`` (a context manager
    giving a page fenced by their own guard) and ``inspect(page, name)``, which looks at each
    settled page before it is printed.
    """
    from playwright.sync_api import sync_playwright

    pages = toc_pages(toc_file)
    missing = [p for p in pages if not (html / f"{p}.html").is_file()]
    if missing:
        sys.exit(f"not built: {missing}; run `make book` first")
    if shutil.which("pdfunite") is None:
        sys.exit("make pdf needs pdfunite: install Debian's `poppler-utils`")
    if chromium_executable() is None:
        sys.exit("make pdf needs Chromium: install Debian's `chromium` (as .ci/run does)")
    blocked: list[str] = []
    if open_page is None:
        open_page = functools.partial(fenced_page, blocked=blocked)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (StaticServer(html) as server, tempfile.TemporaryDirectory() as tmp,
          contextlib.ExitStack() as stack):
        if browser is None:
            browser = launch(stack.enter_context(sync_playwright()))
            stack.callback(browser.close)
        parts = []
        for i, name in enumerate(pages):
            with open_page(browser) as page:
                # MathJax typeset, every image decoded, nothing else loading (widgets)
                open_settled(page, server.url + f"{name}.html", idle_timeout_ms=20_000)
                if inspect is not None:
                    inspect(page, name)
                page.add_style_tag(content=PRINT_CSS)
                part = Path(tmp) / f"{i:03d}.pdf"
                page.pdf(path=str(part), format="A4", print_background=True,
                         margin={"top": "15mm", "bottom": "15mm", "left": "12mm",
                                 "right": "12mm"})
            parts.append(str(part))
            print(f"  {name}", flush=True)
        subprocess.run(["pdfunite", *parts, str(out)], check=True)
    if blocked:
        sys.exit(f"the pages asked for files off this machine: {sorted(set(blocked))[:5]}")
    shutil.copyfile(out, html / "book.pdf")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the built HTML book (_build/html)")
    parser.add_argument("out", type=Path, help="where to write the PDF (_build/pdf/book.pdf)")
    args = parser.parse_args(argv)
    path = build_pdf(args.html, args.out)
    print(f"The PDF edition is in {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
