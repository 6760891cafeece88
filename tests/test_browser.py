"""The HTML book in headless Chromium, with no network: what a reader does on it.

The book is built with ``jupyter-book build -W -n`` (once for all the test files that need it,
and again only when its sources change: see ``book_build.py``) and served from 127.0.0.1 by a
thread, every request routed through ``browser_support.Guard``: a request to any other host
fails the test, and so does a failed request, an HTTP error or a console error. What every page
shows (math typeset, images, widgets, screenshots) is checked in ``test_reader_view.py``, in the
one pass that opens each page; the tests here use the book as a reader does: the bit explorer's
static view, the self-study pages' folded solutions, every link from the table of contents,
search, the launch and download buttons and the bibliography.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import nbformat
import pytest
import yaml
from book_build import built_book_html, toc_entries
from browser_support import ROOT, StaticServer, guarded_page, open_settled, screenshot_path
from notebook_runner import chapters
from reader_view import WIDGETS_RENDERED

from qcourse import grading
from qcourse.floats import FORMATS, encode

pytestmark = pytest.mark.slow

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def toc_files() -> list[str]:
    """Every page of the table of contents: chapters and their sections (the self-study pages)."""
    return toc_entries()


def chapter_stems() -> list[str]:
    """The chapters (MyST notebooks) that the table of contents lists."""
    listed = set(toc_files())
    return [p.stem for p in chapters() if f"book/{p.stem}" in listed]


def self_study_stems() -> list[str]:
    """The self-study editions of the exercise notebooks that the table of contents lists."""
    return [e.removeprefix("book/exercises/") for e in toc_files()
            if e.startswith("book/exercises/")]


# Chapters without a Binder button: the instructor's chapter needs notebooks/, which the Binder
# image leaves out (postBuild; book/_ext/qcourse_html.py drops the button).
NO_BINDER = {"grading"}


@pytest.fixture(scope="module")
def built_book() -> Path:
    return built_book_html()


@pytest.fixture(scope="module")
def server(built_book):
    with StaticServer(built_book) as srv:
        yield srv


@pytest.fixture
def page(browser):
    with guarded_page(browser, 1280, 900, 30_000) as page:
        yield page


def open_page(page, url: str) -> None:
    """Open ``url`` and wait until it has settled and its saved widget views have rendered."""
    open_settled(page, url)
    page.wait_for_function(WIDGETS_RENDERED, timeout=30_000)


def test_bit_explorer_static_view(server, page):
    """The floats chapter's widget renders as the reader's static copy: screenshot for README."""
    if "floats" not in chapter_stems():
        pytest.skip("no floats chapter")
    open_page(page, server.url + "book/floats.html")
    widget = page.locator(".widget-subarea .jupyter-widgets.widget-vbox").first
    widget.scroll_into_view_if_needed()
    fmt_name = widget.locator("select").input_value()
    value = widget.locator("input[type=text]").input_value()
    fmt = FORMATS[fmt_name]
    bits = int(encode(float(value), fmt))
    toggles = widget.locator(".widget-toggle-button")
    assert toggles.count() == fmt.total_bits, f"{fmt_name} needs one toggle button per bit"
    shown = "".join(toggles.all_inner_texts())
    assert shown == format(bits, f"0{fmt.total_bits}b"), f"{value} in {fmt_name}: bits {shown}"
    assert f"0x{bits:X}" in widget.inner_text(), f"{value} in {fmt_name} is 0x{bits:X}"
    widget.screenshot(path=screenshot_path("book_bit_explorer"))
    assert not page.guard.problems(), page.guard.problems()


def test_self_study_solution_is_hidden_until_its_toggle_is_clicked(server, page):
    """On a self-study page a solution's code is folded away; one click on its toggle shows it."""
    stems = self_study_stems()
    if not stems:
        pytest.skip("no self-study pages in the table of contents")
    stem = "floats" if "floats" in stems else stems[0]
    notebook = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
    solution = next(c for c in notebook["cells"] if grading.is_solution(c))
    first_line = next(line for line in grading.cell_source(solution).splitlines()
                      if line.strip() and "### " not in line).strip()

    open_page(page, server.url + f"book/exercises/{stem}.html")
    cell = page.locator("article div.cell.tag_hide-input").first
    code = cell.locator("div.cell_input pre")
    cell.scroll_into_view_if_needed()
    article = page.locator("article")
    assert not code.is_visible(), "the solution is shown before its toggle is clicked"
    assert first_line not in article.inner_text(), f"{first_line!r} is readable before the click"
    page.screenshot(path=screenshot_path(f"book_self_study_{stem}_folded"))

    cell.locator("summary").click()
    code.wait_for(state="visible", timeout=10_000)
    assert first_line in code.inner_text()
    assert first_line in article.inner_text()
    page.wait_for_timeout(600)  # only for the screenshot: the toggle fades the code in
    page.screenshot(path=screenshot_path(f"book_self_study_{stem}_unfolded"))
    assert not page.guard.problems(), page.guard.problems()


def test_self_study_toggle_says_solution(server, page):
    """A learner looking for the answer sees a toggle labelled "Solution"."""
    stems = self_study_stems()
    if not stems:
        pytest.skip("no self-study pages in the table of contents")
    open_page(page, server.url + f"book/exercises/{stems[0]}.html")
    labels = page.locator("article div.cell.tag_hide-input summary").all_inner_texts()
    assert labels, "no folded solution on the page"
    assert all("Solution" in label for label in labels), f"toggle labels: {sorted(set(labels))}"


def test_guard_catches_a_request_off_the_machine(server, page):
    """The fence works: a page that asks for a CDN script is caught (the test can fail)."""
    page.goto(server.url + "book/intro.html", wait_until="load")
    page.evaluate("""() => new Promise((resolve) => {
        const s = document.createElement("script");
        s.src = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js";
        s.onerror = s.onload = resolve;
        document.head.appendChild(s);
    })""")
    assert page.guard.blocked == ["https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"]


def test_guard_catches_console_errors_and_missing_files(server, page):
    page.goto(server.url + "book/intro.html", wait_until="load")
    page.evaluate("""() => new Promise((resolve) => {
        console.error("deliberate");
        const img = document.createElement("img");
        img.src = "../_static/no-such-image.png";
        img.onerror = img.onload = resolve;
        document.body.appendChild(img);
    })""")
    problems = page.guard.problems()
    assert "deliberate" in problems and "no-such-image.png: HTTP 404" in problems


# --------------------------------------------------------------------------------------------
# Links, search, buttons, bibliography.


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.refresh: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            self.refresh = (attrs.get("content") or "").partition("url=")[2] or None


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_every_page_is_reachable_from_the_toc_and_no_internal_link_is_broken(built_book):
    index = _parse(built_book / "index.html")
    root = toc_files()[0]
    assert index.refresh == f"{root}.html", "index.html does not lead to the first page"
    pages: dict[str, _Links] = {}
    queue = [f"{root}.html"]
    broken = []
    while queue:
        rel = queue.pop()
        if rel in pages:
            continue
        pages[rel] = _parse(built_book / rel)
        for href in pages[rel].hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = unquote(parts.path)
            target_rel = (Path(urljoin("/" + rel, target)).as_posix().lstrip("/") if target
                          else rel)
            path = built_book / target_rel
            if target_rel == "book.pdf":
                continue  # the PDF edition: `make pdf` writes it after the HTML
            if not path.exists():
                broken.append(f"{rel}: {href} (no {target_rel})")
                continue
            if target_rel.endswith(".html") and not target_rel.startswith("_"):
                queue.append(target_rel)
    for rel, links in pages.items():
        for href in links.hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or not parts.fragment:
                continue
            target = unquote(parts.path)
            target_rel = (Path(urljoin("/" + rel, target)).as_posix().lstrip("/") if target
                          else rel)
            if target_rel in pages and parts.fragment not in pages[target_rel].ids:
                broken.append(f"{rel}: {href} (no id {parts.fragment!r} in {target_rel})")
    assert not broken, "broken internal links:\n" + "\n".join(broken)
    unreachable = [f"{e}.html" for e in toc_files() if f"{e}.html" not in pages]
    assert not unreachable, f"pages not reachable from the table of contents: {unreachable}"


def test_search_finds_a_chapter_by_a_word_in_it(server, page):
    if "floats" not in chapter_stems():
        pytest.skip("no floats chapter")
    page.goto(server.url + "search.html?q=subnormal", wait_until="load")
    results = page.locator("#search-results ul.search li a")
    results.first.wait_for(timeout=30_000)
    hrefs = results.evaluate_all("(els) => els.map((e) => e.getAttribute('href'))")
    assert any("book/floats.html" in h for h in hrefs), f"search for 'subnormal': {hrefs}"
    page.goto(server.url + "search.html?q=qzxjvwkq", wait_until="load")
    page.locator("#search-results p.search-summary").wait_for(timeout=30_000)
    assert page.locator("#search-results ul.search li").count() == 0
    assert not page.guard.problems(), page.guard.problems()


@pytest.mark.parametrize("stem", chapter_stems())
def test_chapter_has_binder_and_notebook_download_buttons(built_book, stem):
    html = built_book / "book" / f"{stem}.html"
    hrefs = _parse(html).hrefs
    repo = urlsplit(CONFIG["repository"]["url"]).path.strip("/")
    binder = CONFIG["launch_buttons"]["binderhub_url"].rstrip("/")
    branch = CONFIG["repository"]["branch"]
    prefix = {"jupyterlab": "lab/tree", "classic": "tree"}[
        CONFIG["launch_buttons"].get("notebook_interface", "classic")]
    expected = f"{binder}/v2/gh/{repo}/{branch}?urlpath={prefix}/book/{stem}.md"
    if stem in NO_BINDER:
        assert not [h for h in hrefs if h.startswith(binder)], f"{html.name} has a Binder button"
    else:
        assert expected in hrefs, f"no Binder button {expected} in {html.name}"
    download = f"../_sources/book/{stem}.ipynb"
    assert download in hrefs, f"no .ipynb download button in {html.name}"
    nb = nbformat.read(built_book / "_sources" / "book" / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "the download is not executed"
    assert any(c.outputs for c in code)


def test_bibliography_lists_every_source(built_book):
    assert "book/references" in toc_files(), "add book/references to _toc.yml"
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = re.findall(r"^@\w+\{([^,]+),", bib, re.MULTILINE)
    page = (built_book / "book" / "references.html").read_text()
    entries = re.findall(r'role="doc-biblioentry"', page)
    assert len(entries) == len(keys) > 0, f"{len(entries)} entries on the page, {len(keys)} in bib"
    for name in ("Jacob", "Horowitz", "Micikevicius", "Goto", "Williams", "Alpaydin"):
        assert name in page, f"{name} is missing from the bibliography"


def test_readme_screenshots_exist_and_are_small():
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    assert len(images) >= 2, "the README shows the book and the bit explorer"
    for rel in images:
        path = ROOT / rel
        assert path.is_file(), f"README shows {rel}, which does not exist"
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), f"{rel} is not a PNG"
        assert len(data) < 300_000, f"{rel} is {len(data)} bytes; keep README images < 300 KB"
