"""Every built page, opened once in headless Chromium, read as a reader and printed as the PDF.

The book is the one ``book_build.built_book_html()`` builds for the other book tests. One pass
(the ``visited`` fixture) opens each page of it once, in a page whose requests are fenced to
127.0.0.1 by ``browser_support.Guard``, waits until MathJax has typeset it, its images have
decoded and its saved widgets have rendered, and then:

- reads it as a reader does (``reader_view.py``): every problem that ``reader_view.problems``
  finds fails the test: tables left as Markdown, NumPy reprs in the prose, TeX left as source,
  images without pixels, figures with unlabelled axes, legends over data or unreadably small
  text, console errors and requests that leave 127.0.0.1;
- checks what each page of the table of contents must show: its title, its math typeset by the
  book's own MathJax, its figures, and its widgets rendered by the book's own widget manager;
  saves screenshots in ``_build/screenshots/``;
- prints it: the pages of the table of contents are printed to PDF by the PDF edition's own code
  (``book/_ext/qcourse_pdf.py``, which ``make pdf`` runs) in the same pass, and the PDF is read
  back with poppler's ``pdftotext`` and ``pdfimages`` for what a reader would look for.

Opening each page once instead of three times (reader's view, browser checks, PDF) saves about
four minutes of CPU in ``make test``. The last tests feed the reader's view a page with one of
each problem and check that each is reported: the check can fail.
"""

from __future__ import annotations

import html as html_lib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from book_build import built_book_html, toc_entries
from browser_support import (
    ROOT,
    StaticServer,
    chromium_browser,
    guarded_page,
    open_settled,
    screenshot_path,
)
from reader_view import FIGURE_KEY, inspect_page, read_page

sys.path.insert(0, str(ROOT / "book" / "_ext"))

pytestmark = pytest.mark.slow


def built_pages(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if not p.relative_to(html).parts[0].startswith("_"))


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is missing: install Debian's poppler-utils (as .ci/run does)")
    return path


@pytest.fixture(scope="module")
def built_book() -> Path:
    return built_book_html()


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as chromium:
        yield chromium


def _screenshots(page, rel: str) -> None:
    """The screenshots of a chapter or self-study page (``_build/screenshots/``)."""
    stem = Path(rel).stem
    page.screenshot(path=screenshot_path(f"book_{stem}"))
    if rel.startswith("book/") and "/exercises/" not in rel:
        shutil.copyfile(screenshot_path(f"book_{stem}"), screenshot_path(f"reader_{stem}"))
    display_math = page.locator("article div.math")
    if display_math.count():
        display_math.first.evaluate("(el) => el.scrollIntoView({block: 'start'})")
        page.evaluate("() => window.scrollBy(0, -250)")
        page.screenshot(path=screenshot_path(f"book_{stem}_math"))


@pytest.fixture(scope="module")
def visited(built_book, browser, tmp_path_factory):
    """Each built page opened once: ``{"pages": {rel: (report, problems)}, "pdf": path}``."""
    for tool in ("pdftotext", "pdfimages", "pdfunite"):
        _need(tool)
    import qcourse_pdf

    seen: dict[str, tuple[dict, list[str]]] = {}

    def look(page, rel: str) -> None:
        seen[rel] = inspect_page(page, built_book, rel)
        if rel.startswith("book/"):
            _screenshots(page, rel)

    def open_page(chromium):
        return guarded_page(chromium, 1280, 900, 60_000)

    out = tmp_path_factory.mktemp("pdf") / "book.pdf"
    qcourse_pdf.build_pdf(built_book, out, browser=browser, open_page=open_page,
                          inspect=lambda page, name: look(page, f"{name}.html"))
    with StaticServer(built_book) as server:  # the pages outside the table of contents
        for rel in built_pages(built_book):
            if rel not in seen:
                with open_page(browser) as page:
                    open_settled(page, server.url + rel)
                    look(page, rel)
    return {"pages": seen, "pdf": out}


# --------------------------------------------------------------------------------------------
# The reader's view of every page.


def test_every_built_page_reads_cleanly(built_book, visited):
    pages = built_pages(built_book)
    assert "book/floats.html" in pages and "index.html" in pages
    assert sorted(visited["pages"]) == pages
    found = {rel: problems for rel, (_, problems) in visited["pages"].items() if problems}
    assert not found, "\n".join(f"{rel}:\n  " + "\n  ".join(p) for rel, p in found.items())


@pytest.mark.parametrize("entry", toc_entries())
def test_page_renders_offline_with_math_figures_and_widgets(visited, entry):
    report, problems = visited["pages"][f"{entry}.html"]
    guard = [p for p in problems if p.startswith(("request off", "failed request", "console"))]
    assert not guard, f"{entry}:\n" + "\n".join(guard)
    assert report["title"], f"{entry} has no title"

    source = (ROOT / f"{entry}.md").read_text()
    if re.search(r"\$[^$\n]+\$|\{math\}|```\{math\}", source):
        assert report["mathNodes"] > 0, f"{entry} has math in its source but none on the page"
    assert report["mjx"] >= report["mathNodes"], f"{entry}: math not typeset: {report['mjx']}"
    assert not report["untypeset"], f"{entry}: math left untypeset: {report['untypeset']}"
    assert report["mathErrors"] == 0, f"{entry}: MathJax reported {report['mathErrors']} errors"
    assert not report["rawTex"], f"{entry}: TeX source left in the text: {report['rawTex']}"

    broken = [img["src"] for img in report["images"] if not img["ok"]]
    assert not broken, f"{entry}: images that did not load: {broken}"
    if "```{code-cell}" in source and "plt." in source:
        figures = [i for i in report["images"] if "_images/" in (i["src"] or "")]
        assert figures, f"{entry} plots with matplotlib but shows no figure"

    if re.search(r"^import ipywidgets|^from ipywidgets", source, re.MULTILINE):
        assert report["widgetState"] == 1, f"{entry} makes widgets but stored no widget state"
        assert report["views"] > 0, f"{entry} makes widgets but shows no widget view"
    assert report["renderedViews"] == report["views"], (
        f"{entry}: {report['views'] - report['renderedViews']} of {report['views']} widget "
        "views did not render")


# --------------------------------------------------------------------------------------------
# The PDF edition (`make pdf`): the whole book, with its math, tables and figures, offline.


def pdf_text(path: Path, layout: bool = False) -> str:
    cmd = ["pdftotext", *(["-layout"] if layout else []), str(path), "-"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def squash(text: str) -> str:
    return " ".join(text.split())


def title_of(html_file: Path) -> str:
    found = re.search(r"<h1>(.*?)</h1>", html_file.read_text(), re.DOTALL)
    return squash(html_lib.unescape(re.sub(r"<[^>]+>", "", found.group(1)))).rstrip("#").strip()


def test_pdf_has_every_page_title(built_book, visited):
    def letters(s):  # compare words only: the PDF's line breaks and anchors differ from HTML's
        return re.sub(r"[^0-9a-z]+", "", s.lower())

    text = letters(pdf_text(visited["pdf"]))
    titles = [title_of(built_book / f"{entry}.html") for entry in toc_entries()]
    missing = [t for t in titles if letters(t) not in text]
    assert not missing, f"titles not in the PDF: {missing}"


def test_pdf_has_typeset_math_tables_and_figures(built_book, visited):
    path = visited["pdf"]
    text = pdf_text(path)
    # an equation of the introduction, typeset: its symbols are there, its TeX source is not
    assert re.search(r"scale\s*⋅\s*\(\s*q\s*[−-]\s*zero_point\s*\)", text), "no typeset equation"
    # (code listings may quote TeX in docstrings; prose math must not be left as $$ source)
    assert "$$" not in text, "TeX source '$$' in the PDF"
    # the floats chapter's table of formats (one column per format): its header and its row of
    # biases each laid out in columns on one line
    layout = pdf_text(path, layout=True).splitlines()
    for row in (r"format\s+fp32\s+fp16\s+bf16\s+e4m3fn\s+e5m2", r"bias\s+127\s+15\s+127\s+7\s+15"):
        lines = [line for line in layout if re.fullmatch(rf"\s*{row}\s*", line)]
        assert lines, f"the table of formats is not laid out as a table (no line {row!r})"
    # every figure of the chapters is an image in the PDF
    figures = sum(len(re.findall(r'<img[^>]+src="[^"]*_images/',
                                 (built_book / f"{e}.html").read_text()))
                  for e in toc_entries())
    listing = subprocess.run(["pdfimages", "-list", str(path)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[2:]
    images = [line for line in listing if line.split()[2] == "image"]
    assert figures > 0 and len(images) >= figures, f"{len(images)} images for {figures} figures"


def test_html_book_links_the_pdf(built_book, visited):
    intro = (built_book / "book" / "intro.html").read_text()
    assert 'href="../book.pdf"' in intro, "the introduction does not link the PDF edition"
    assert (built_book / "book.pdf").read_bytes() == visited["pdf"].read_bytes(), (
        "make pdf did not copy it there")
    assert (ROOT / "Makefile").read_text().count("_build/pdf/book.pdf") >= 1


# --------------------------------------------------------------------------------------------
# The reader's view can fail.


def _png(record: dict | None) -> bytes:
    """A small PNG, with the figure record that the book build would write into it."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if record is not None:
        info.add_text(FIGURE_KEY, json.dumps(record))
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), "white").save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


BROKEN_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>broken</title></head><body><article>
<h1>A page with one of each</h1>
<p>| format | bits |
| --- | --- |
| fp16 | 16 |</p>
<p>The layer has np.int64(29) outputs that differ.</p>
<p>The scale is $S_x$ here, untypeset.</p>
<table><tr><td>bare</td><td>table</td></tr></table>
<div style="width: 300px; overflow-x: auto"><table class="table"><tr><td>wide</td>
<td>a_cell_that_has_no_place_to_break_and_so_pushes_the_table_far_past_its_300_pixels</td>
</tr></table></div>
<div style="width: 300px"><mjx-container display="true" style="display: block; overflow-x: auto">
<mjx-math style="display: inline-block; width: 900px">y = a + b + c</mjx-math>
<mjx-assistive-mml style="display: none">y = a + b + c, one long line</mjx-assistive-mml>
</mjx-container></div>
<div class="cell_output"><img src="unlabelled.png" width="400"></div>
<div class="cell_output"><img src="covered.png" width="400"></div>
<div class="cell_output"><img src="tiny.png" width="100"></div>
<div class="cell_output"><img src="nometa.png" width="400"></div>
<img src="missing.png">
<script>console.error("deliberate console error");</script>
<script src="https://cdn.example.org/lib.js"></script>
</article></body></html>
"""


def test_reader_view_reports_each_kind_of_problem(tmp_path, browser):
    good_axes = {"title": "", "x": "label", "y": "label", "legend_covers": 0}
    figures = {
        "unlabelled.png": {"axes": [dict(good_axes, y="unlabelled")], "min_font_pt": 10,
                           "dpi": 100},
        "covered.png": {"axes": [dict(good_axes, legend_covers=12)], "min_font_pt": 10,
                        "dpi": 100},
        "tiny.png": {"axes": [good_axes], "min_font_pt": 5, "dpi": 100},
        "nometa.png": None,
    }
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken.html").write_text(BROKEN_PAGE)
    for name, record in figures.items():
        (site / name).write_bytes(_png(record))
    with StaticServer(site) as server, guarded_page(browser, 1280, 900, 30_000) as page:
        _, problems = read_page(page, server.url + "broken.html", site, "broken.html")
    text = "\n".join(problems)
    expected = [
        "a Markdown table left as text",
        "a NumPy repr in the prose: 'The layer has np.int64(29)",
        "TeX source left in the text: 'The scale is $S_x$",
        "figure unlabelled.png, axes 1: the y axis has numbers and no label",
        "figure covered.png, axes 1: the legend covers 12 data points",
        "figure tiny.png: its smallest text is 5 pt",
        "figure nometa.png: no measurements in the PNG",
        "a table without the book's table style (a bare <table>): 'bare table'",
        "a table wider than the page (",
        "px in 300 px: its last columns are out of view): 'wide a_cell",
        "an equation wider than the page (900 px in 300 px: its right end is out of view): "
        "'y = a + b + c, one long line'",
        "an image without pixels: missing.png",
        "console error: deliberate console error",
        "request off 127.0.0.1: https://cdn.example.org/lib.js",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"not reported: {missing}\nreported:\n{text}"


def test_the_same_checks_pass_a_clean_page(tmp_path, browser):
    site = tmp_path / "site"
    site.mkdir()
    (site / "good.png").write_bytes(_png({"axes": [{"title": "", "x": "label", "y": "categories",
                                                    "legend_covers": 0}],
                                          "min_font_pt": 9, "dpi": 100}))
    (site / "good.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ok</title></head><body>"
        "<article><h1>Fine</h1><table class='table'><tr><td>fp16</td><td>16</td></tr></table>"
        "<p>The layer has 29 outputs that differ; |x| is fine in prose.</p>"
        "<mjx-container display='true' style='display: block'><mjx-math style='display: "
        "inline-block; width: 200px'>y = x</mjx-math></mjx-container>"
        "<div class='cell_output'><img src='good.png' width='400'></div></article></body></html>")
    with StaticServer(site) as server, guarded_page(browser, 1280, 900, 30_000) as page:
        report, problems = read_page(page, server.url + "good.html", site, "good.html")
    assert problems == [] and report["tables"] == 1 and len(report["mathBoxes"]) == 1


def test_figure_hook_records_labels_legends_and_font_sizes(tmp_path):
    """The build's matplotlib hook measures a real figure the way the test above reads it."""
    import subprocess
    import sys

    ext = Path(__file__).resolve().parent.parent / "book" / "_ext"
    script = tmp_path / "fig.py"
    script.write_text(
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "fig, (a, b) = plt.subplots(1, 2)\n"
        "a.plot(range(10), range(10), label='data'); a.legend(loc='upper left')\n"
        "a.set_xlabel('x')\n"
        "b.plot(range(10), range(10), label='data'); b.legend(loc='center')\n"
        "b.set_xlabel('x'); b.set_ylabel('y'); b.tick_params(labelsize=5)\n"
        f"fig.savefig({str(tmp_path / 'out.png')!r})\n")
    env = {"MATPLOTLIBRC": str(ext / "matplotlibrc"), "PYTHONPATH": str(ext), "PATH": "/usr/bin"}
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, env=env)
    from reader_view import figure_record

    record = figure_record(tmp_path / "out.png")
    assert record is not None
    (a, b) = record["axes"]
    assert (a["x"], a["y"], a["legend_covers"]) == ("label", "unlabelled", 0)
    assert (b["x"], b["y"]) == ("label", "label") and b["legend_covers"] > 0
    assert record["min_font_pt"] == 5
