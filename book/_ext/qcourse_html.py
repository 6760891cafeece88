"""Fixes to the HTML book's pages, loaded by Jupyter Book as a local Sphinx extension.

sphinx-thebe and sphinx-togglebutton register their inline configuration scripts at
``env-before-read-docs``, and with Jupyter Book 1 the same ``<script>`` body ends up twice in
every page; the second ``const THEBE_JS_URL = ...`` is a SyntaxError in the reader's console.
Each page keeps the first copy of every identical script.

The self-study pages (``book/exercises/STEM.md``, made by ``qcourse-course self-study``) run
each exercise's hidden tests in ``remove-cell`` cells: the page shows none of them, but its
source and its executed notebook hold them. So on those pages the download buttons offer only
the PDF, the copies in ``_sources/book/exercises/`` are deleted when the build finishes, and the
Binder button opens the learner's notebook, ``exercises/STEM.ipynb`` (Binder's image has no
``book/exercises/``: see ``postBuild``). The instructor's chapter (``book/grading.md``) gets no
Binder button at all: it releases and grades ``notebooks/``, which Binder's image leaves out.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx


def _script_key(script: Any) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # An inline script's filename is None or "" depending on who registered it.
    filename = getattr(script, "filename", None) or ""
    return (filename, tuple(sorted(attributes.items())))


def _dedupe_scripts(app: Sphinx, pagename: str, templatename: str, context: dict,
                    doctree: Any) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    kept = []
    for script in scripts:
        key = _script_key(script)
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    context["script_files"] = kept


SELF_STUDY = "book/exercises/"
NO_BINDER = {"book/grading"}
_BINDER_PATH = re.compile(r"(\?urlpath=[^&]*?/)book/exercises/([^/&]+)\.md$")


def _self_study_buttons(app: Sphinx, pagename: str, templatename: str, context: dict,
                        doctree: Any) -> None:
    if pagename in NO_BINDER:
        context["header_buttons"] = [g for g in context.get("header_buttons", [])
                                     if g.get("label") != "launch-buttons"]
    if not pagename.startswith(SELF_STUDY):
        return
    for group in context.get("header_buttons", []):
        if group.get("label") == "download-buttons":
            group["buttons"] = [b for b in group["buttons"] if b.get("label") not in
                                ("download-notebook-button", "download-source-button")]
        elif group.get("label") == "launch-buttons":
            for button in group["buttons"]:
                if "url" in button:
                    button["url"] = _BINDER_PATH.sub(r"\1exercises/\2.ipynb", button["url"])


def _drop_self_study_sources(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        shutil.rmtree(Path(app.outdir) / "_sources" / SELF_STUDY, ignore_errors=True)


HERE = Path(__file__).resolve().parent


def _audit_figures() -> None:
    """Every figure the chapters' kernels draw records what it shows in its PNG.

    The kernels inherit this process's environment: ``MATPLOTLIBRC`` names
    ``book/_ext/matplotlibrc`` (its ``figure.hooks``), and ``PYTHONPATH`` lets the kernel import
    the hook, ``qcourse_figure_audit``. See that module and ``tests/reader_view.py``.
    """
    os.environ["MATPLOTLIBRC"] = str(HERE / "matplotlibrc")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(HERE) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *paths])


def setup(app: Sphinx) -> dict[str, Any]:
    _audit_figures()
    # After every other handler has added its per-page scripts (myst-nb's widget scripts, ...).
    app.connect("html-page-context", _dedupe_scripts, priority=1000)
    # After sphinx-book-theme's header buttons (priority 501), before the page is written.
    app.connect("html-page-context", _self_study_buttons, priority=900)
    app.connect("build-finished", _drop_self_study_sources)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
