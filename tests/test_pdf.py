"""The PDF edition (`make pdf`): the whole book, with its math, tables and figures, offline.

``book/_ext/qcourse_pdf.py`` prints the built HTML book (the one ``book_build.py`` builds for the
other book tests) page by page with headless Chromium, fenced to 127.0.0.1, and joins the pages
with pdfunite. The test reads the PDF back with poppler's ``pdftotext`` and ``pdfimages`` and
looks for what a reader would: every page's title, an equation typeset (its symbols, not its TeX
source), a table laid out as columns, and the figures as images; and it checks that the HTML
book links the PDF where ``make pdf`` puts it.
"""

from __future__ import annotations

import html as html_lib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from book_build import built_book_html, toc_entries

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book" / "_ext"))

pytestmark = pytest.mark.slow


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is missing: install Debian's poppler-utils (as .ci/run does)")
    return path


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    for tool in ("pdftotext", "pdfimages", "pdfunite"):
        _need(tool)
    from browser_support import chromium_executable

    if chromium_executable() is None:
        pytest.skip("no Chromium found (install Debian's `chromium`, as .ci/run does)")
    import qcourse_pdf

    html = built_book_html()
    out = tmp_path_factory.mktemp("pdf") / "book.pdf"
    qcourse_pdf.build_pdf(html, out)
    return html, out


def pdf_text(path: Path, layout: bool = False) -> str:
    cmd = ["pdftotext", *(["-layout"] if layout else []), str(path), "-"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def squash(text: str) -> str:
    return " ".join(text.split())


def title_of(html_file: Path) -> str:
    found = re.search(r"<h1>(.*?)</h1>", html_file.read_text(), re.DOTALL)
    return squash(html_lib.unescape(re.sub(r"<[^>]+>", "", found.group(1)))).rstrip("#").strip()


def test_pdf_has_every_page_title(pdf):
    html, path = pdf
    def letters(s):  # compare words only: the PDF's line breaks and anchors differ from HTML's
        return re.sub(r"[^0-9a-z]+", "", s.lower())

    text = letters(pdf_text(path))
    titles = [title_of(html / f"{entry}.html") for entry in toc_entries()]
    missing = [t for t in titles if letters(t) not in text]
    assert not missing, f"titles not in the PDF: {missing}"


def test_pdf_has_typeset_math_tables_and_figures(pdf):
    html, path = pdf
    text = pdf_text(path)
    # an equation of the introduction, typeset: its symbols are there, its TeX source is not
    assert re.search(r"scale\s*⋅\s*\(\s*q\s*[−-]\s*zero_point\s*\)", text), "no typeset equation"
    # (code listings may quote TeX in docstrings; prose math must not be left as $$ source)
    assert "$$" not in text, "TeX source '$$' in the PDF"
    # the floats chapter's table of formats: each format's row laid out in columns on one line
    layout = pdf_text(path, layout=True)
    rows = [line for line in layout.splitlines() if re.match(r"\s*fp32\s+8\s+23\s+127\s", line)]
    assert rows and "|" not in rows[0], "the table of formats is not laid out as a table"
    # every figure of the chapters is an image in the PDF
    figures = sum(len(re.findall(r'<img[^>]+src="[^"]*_images/', (html / f"{e}.html").read_text()))
                  for e in toc_entries())
    listing = subprocess.run(["pdfimages", "-list", str(path)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[2:]
    images = [line for line in listing if line.split()[2] == "image"]
    assert figures > 0 and len(images) >= figures, f"{len(images)} images for {figures} figures"


def test_html_book_links_the_pdf(pdf):
    html, path = pdf
    intro = (html / "book" / "intro.html").read_text()
    assert 'href="../book.pdf"' in intro, "the introduction does not link the PDF edition"
    assert (html / "book.pdf").read_bytes() == path.read_bytes(), "make pdf did not copy it there"
    assert (ROOT / "Makefile").read_text().count("_build/pdf/book.pdf") >= 1
