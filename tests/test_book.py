"""The HTML book builds with warnings as errors, executes its chapters, and shows their outputs."""

import re

import pytest
import yaml
from book_build import built_book_html
from notebook_runner import ROOT, chapters


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return files


def test_every_chapter_is_in_the_toc_and_every_toc_entry_exists():
    listed = toc_files()
    assert len(listed) == len(set(listed)), f"duplicate toc entries: {listed}"
    for entry in listed:
        assert (ROOT / f"{entry}.md").is_file(), f"_toc.yml lists {entry} but {entry}.md is missing"
    for chapter in chapters():
        assert f"book/{chapter.stem}" in listed, f"{chapter} is not in _toc.yml"


@pytest.fixture(scope="module")
def built_book():
    # One build per set of sources, shared with the browser tests (tests/book_build.py).
    html = built_book_html()
    assert (html / "index.html").is_file()
    return html


def test_book_builds_with_warnings_as_errors(built_book):
    for entry in toc_files():
        assert (built_book / f"{entry}.html").is_file(), f"{entry}.html was not built"


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)
def test_chapter_page_has_text_math_code_outputs_and_figures(built_book, chapter):
    page = (built_book / "book" / f"{chapter.stem}.html").read_text()
    assert re.search(r"<h1>.+</h1>", page), "no title"
    assert 'class="cell_input' in page, "no code cells"
    assert 'class="cell_output' in page, "no executed outputs"
    assert "math notranslate" in page, "no math"
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    figures = [src for src in images if "_images/" in src or src.startswith("data:image")]
    assert figures, "no figures"
    for src in figures:
        if not src.startswith("data:"):
            assert (built_book / "book" / src).resolve().is_file(), f"missing image {src}"
