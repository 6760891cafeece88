"""What a reader sees on a built page, and what is wrong with it.

``read_page(page, url, folder)`` opens a page of the built book in a guarded headless Chromium
page (``browser_support.guarded_page``: no request may leave 127.0.0.1, and console errors are
recorded), waits for MathJax and the images, and returns ``problems(...)``: one line per thing a
reader would notice, or an empty list. It looks for

- a Markdown table that was not rendered: a paragraph holding a table row or its separator
  (``| --- |``, or ``|—|`` after the smart-quotes pass);
- a NumPy scalar's repr in the prose (``np.int64(29)``, ``np.float64(...)``), which is how a
  glued NumPy number prints;
- TeX left as source: ``$``, ``$$``, ``\\(``, ``\\[``, ``\\begin{`` in the text outside code and
  typeset math, math that MathJax did not typeset or reported an error in, and a TeX command
  that MathJax drew as text (``\\_`` inside ``\\text{}``);
- a table without the book's table style (a bare ``<table>`` from a cell's HTML), or one wider
  than the room it has, so that its last columns are scrolled out of view (at the test's
  1280-pixel window); likewise a displayed equation wider than its column (its right end cut
  off behind a scroll bar: break it into lines with ``aligned``);
- an image without pixels (not found, or not decodable);
- in a figure made by a cell, an axis with numbers and no label, a legend drawn over data, or
  text smaller than ``MIN_TEXT_PX`` as displayed: read from the figure's PNG, where the book
  build records them (``book/_ext/qcourse_figure_audit.py``);
- a console error, a failed request, an HTTP error, a request off 127.0.0.1 (``Guard``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from browser_support import open_settled

MIN_TEXT_PX = 6.0  # the smallest figure text, in CSS pixels as displayed, that is still read
TABLE_SLACK_PX = 8  # a table may overhang its column by part of a cell's padding, no more
MATH_SLACK_PX = 2  # a displayed equation may overhang its column by rounding, no more
FIGURE_KEY = "qcourse-figure"

REPORT = r"""
() => {
  const article = document.querySelector("article") || document.body;
  // the text under root outside the elements matching skip, its pieces joined by sep
  const textIn = (root, skip, sep) => {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
      acceptNode: (n) => n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT
                                                         : NodeFilter.FILTER_ACCEPT});
    let text = "";
    while (walker.nextNode()) { text += walker.currentNode.textContent + sep; }
    return text;
  };
  const skip = "pre, code, script, style, mjx-container, .highlight, .cell_input, .math";
  const textOf = (root) => textIn(root, skip, "");
  const blockTags = "p, li, dd, td, th, h1, h2, h3, h4, figcaption";
  const blocks = Array.from(article.querySelectorAll(blockTags))
    .filter((el) => !el.closest("pre, .highlight, .cell_input"))
    .map((el) => textOf(el));
  const math = Array.from(article.querySelectorAll(".math"));
  const skipAll = "pre, code, script, style, mjx-container, .highlight, .output";
  const textOfAll = (root) => textIn(root, skipAll, " ");
  const STATE = "application/vnd.jupyter.widget-state+json";
  const views = Array.from(document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"]'));
  const rendered = (script) => {
    const area = script.previousElementSibling;
    if (!area || !area.classList.contains("widget-subarea")) { return false; }
    const box = area.getBoundingClientRect();
    return area.querySelector(".jupyter-widgets") !== null && box.width > 0 && box.height > 0;
  };
  return {
    title: (document.querySelector("h1") || {textContent: ""}).textContent.trim(),
    blocks: blocks,
    untypeset: math.filter((m) => m.querySelector("mjx-container") === null)
                   .map((m) => m.textContent.trim().slice(0, 80)),
    mathErrors: article.querySelectorAll("mjx-merror, [data-mjx-error]").length,
    // typeset math that still shows a TeX command as text (e.g. \_ inside \text{})
    mathTexLeft: Array.from(article.querySelectorAll("mjx-assistive-mml mtext"))
      .map((t) => t.textContent).filter((t) => t.includes("\\")).slice(0, 5),
    tables: article.querySelectorAll("table").length,
    // every table outside a live widget: its style, and whether its box fits the room it has
    tableBoxes: Array.from(article.querySelectorAll("table"))
      .filter((t) => !t.closest(".jupyter-widgets"))
      .map((t) => ({styled: t.classList.contains("table"), width: t.scrollWidth,
                    room: t.parentElement.clientWidth,
                    head: (t.rows[0] ? t.rows[0].innerText : "").replace(/\s+/g, " ")
                      .trim().slice(0, 60)})),
    // every displayed equation: the width MathJax typeset it at and the width of its column
    mathBoxes: Array.from(article.querySelectorAll('mjx-container[display="true"]'))
      .map((m) => ({width: Math.round((m.querySelector("mjx-math") || m)
                                        .getBoundingClientRect().width),
                    room: m.clientWidth,
                    text: (m.querySelector("mjx-assistive-mml") || m).textContent
                      .replace(/\s+/g, " ").trim().slice(0, 60)})),
    images: Array.from(document.images).map((i) => ({
      src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0,
      naturalWidth: i.naturalWidth, width: i.getBoundingClientRect().width,
      cellOutput: i.closest(".cell_output, .output") !== null})),
    // what tests/test_browser.py's per-page checks read: math, TeX left anywhere in the
    // article's text outside code and outputs, and the saved widget views
    mathNodes: math.length,
    mjx: article.querySelectorAll("mjx-container").length,
    rawTex: (textOfAll(article).match(/\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/g) || [])
      .slice(0, 5),
    views: views.length,
    renderedViews: views.filter(rendered).length,
    widgetState: document.querySelectorAll(`script[type="${STATE}"]`).length,
  };
}
"""

#: True once the book's widget manager has rendered every saved widget view.
WIDGETS_RENDERED = r"""
() => Array.from(document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"]')).every((script) => {
  const area = script.previousElementSibling;
  return area && area.classList.contains("widget-subarea") &&
         area.querySelector(".jupyter-widgets") !== null;
})
"""

TABLE_ROW = re.compile(r"\|\s*:?[-—–]+:?\s*\||(^|\n)\s*\|[^|\n]+\|[^|\n]+\|")
NUMPY_REPR = re.compile(r"\bnp\.(?:u?int\d+|float\d+|complex\d+|bool_?|str_)\(")
RAW_TEX = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|\\begin\{")


def figure_record(png: Path) -> dict | None:
    """The measurements that the book build wrote into a figure's PNG, or None."""
    from PIL import Image

    try:
        with Image.open(png) as image:
            text = getattr(image, "text", {}) or {}
    except OSError:
        return None
    return json.loads(text[FIGURE_KEY]) if FIGURE_KEY in text else None


def figure_problems(record: dict | None, name: str, shown_width: float,
                    natural_width: float) -> list[str]:
    """What a reader cannot read in one figure (``record`` from :func:`figure_record`)."""
    if record is None:
        return [f"figure {name}: no measurements in the PNG (made outside the book build's "
                "matplotlib hook, book/_ext/matplotlibrc)"]
    out = []
    for i, ax in enumerate(record["axes"]):
        label = f"figure {name}, axes {i + 1}" + (f" ({ax['title']!r})" if ax["title"] else "")
        for which in ("x", "y"):
            if ax[which] == "unlabelled":
                out.append(f"{label}: the {which} axis has numbers and no label")
        if ax["legend_covers"]:
            out.append(f"{label}: the legend covers {ax['legend_covers']} data points")
    if record.get("min_font_pt") and natural_width:
        px = record["min_font_pt"] * record["dpi"] / 72 * shown_width / natural_width
        if px < MIN_TEXT_PX:
            out.append(f"figure {name}: its smallest text is {record['min_font_pt']:g} pt, "
                       f"{px:.1f} px as displayed (at least {MIN_TEXT_PX:g} px is readable)")
    return out


def problems(report: dict, guard_problems: str, folder: Path, page_rel: str) -> list[str]:
    """Everything wrong with one page, from the browser's ``REPORT`` and the ``Guard``."""
    out = [line for line in guard_problems.splitlines() if line]
    for text in report["blocks"]:
        snippet = " ".join(text.split())[:100]
        if TABLE_ROW.search(text):
            out.append(f"a Markdown table left as text: {snippet!r}")
        if NUMPY_REPR.search(text):
            out.append(f"a NumPy repr in the prose: {snippet!r}")
        if RAW_TEX.search(text):
            out.append(f"TeX source left in the text: {snippet!r}")
    for table in report["tableBoxes"]:
        if not table["styled"]:
            out.append(f"a table without the book's table style (a bare <table>): "
                       f"{table['head']!r}")
        if table["width"] > table["room"] + TABLE_SLACK_PX:
            out.append(f"a table wider than the page ({table['width']} px in {table['room']} px: "
                       f"its last columns are out of view): {table['head']!r}")
    for eq in report["mathBoxes"]:
        if eq["width"] > eq["room"] + MATH_SLACK_PX:
            out.append(f"an equation wider than the page ({eq['width']} px in {eq['room']} px: "
                       f"its right end is out of view): {eq['text']!r}")
    out += [f"math not typeset: {m!r}" for m in report["untypeset"]]
    out += [f"a TeX command shown as text in typeset math: {t!r}" for t in report["mathTexLeft"]]
    if report["mathErrors"]:
        out.append(f"MathJax reported {report['mathErrors']} errors")
    for image in report["images"]:
        src = image["src"] or ""
        if not image["ok"]:
            out.append(f"an image without pixels: {src}")
            continue
        if not image["cellOutput"] or src.startswith("data:"):
            continue
        target = urljoin("/" + page_rel, unquote(urlsplit(src).path)).lstrip("/")
        out += figure_problems(figure_record(folder / target), Path(target).name,
                               image["width"], image["naturalWidth"])
    return out


def read_page(page, url: str, folder: Path, page_rel: str) -> tuple[dict, list[str]]:
    """Open ``url`` (the page ``page_rel`` of the built ``folder``); its report and problems."""
    open_settled(page, url)
    return inspect_page(page, folder, page_rel)


def inspect_page(page, folder: Path, page_rel: str) -> tuple[dict, list[str]]:
    """The report and problems of a page that ``open_settled`` has opened, once its saved
    widget views have rendered (or 30 s have passed: then the report counts those that did)."""
    try:
        page.wait_for_function(WIDGETS_RENDERED, timeout=30_000)
    except Exception as exc:  # Playwright's TimeoutError
        if "Timeout" not in str(exc):
            raise
    report = page.evaluate(REPORT)
    return report, problems(report, page.guard.problems(), folder, page_rel)
