"""Every built page, read in headless Chromium as a reader reads it (``reader_view.py``).

The book is the one ``book_build.built_book_html()`` builds for the other book tests. Every HTML
page of it is opened (chapters, self-study pages, the bibliography, the index and search pages;
not the theme's own files), and every problem that ``reader_view.problems`` finds fails the test:
tables left as Markdown, NumPy reprs in the prose, TeX left as source, images without pixels,
figures with unlabelled axes, legends over data or unreadably small text, console errors and
requests that leave 127.0.0.1. The last test feeds it a page with one of each and checks that
each is reported: the check can fail.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from book_build import built_book_html
from browser_support import StaticServer, chromium_browser, guarded_page, screenshot_path
from reader_view import FIGURE_KEY, read_page

pytestmark = pytest.mark.slow


def built_pages(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if not p.relative_to(html).parts[0].startswith("_"))


@pytest.fixture(scope="module")
def built_book() -> Path:
    return built_book_html()


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as chromium:
        yield chromium


def test_every_built_page_reads_cleanly(built_book, browser):
    pages = built_pages(built_book)
    assert "book/floats.html" in pages and "index.html" in pages
    found = {}
    with StaticServer(built_book) as server:
        for rel in pages:
            with guarded_page(browser, 1280, 900, 60_000) as page:
                report, problems = read_page(page, server.url + rel, built_book, rel)
                if rel.startswith("book/") and "/exercises/" not in rel:
                    page.screenshot(path=screenshot_path(f"reader_{Path(rel).stem}"),
                                    full_page=False)
            if problems:
                found[rel] = problems
    assert not found, "\n".join(f"{rel}:\n  " + "\n  ".join(p) for rel, p in found.items())


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
        "<article><h1>Fine</h1><table><tr><td>fp16</td><td>16</td></tr></table>"
        "<p>The layer has 29 outputs that differ; |x| is fine in prose.</p>"
        "<div class='cell_output'><img src='good.png' width='400'></div></article></body></html>")
    with StaticServer(site) as server, guarded_page(browser, 1280, 900, 30_000) as page:
        report, problems = read_page(page, server.url + "good.html", site, "good.html")
    assert problems == [] and report["tables"] == 1


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
