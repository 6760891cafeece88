"""A fix to the HTML book's pages, loaded by Jupyter Book as a local Sphinx extension.

sphinx-thebe and sphinx-togglebutton register their inline configuration scripts at
``env-before-read-docs``, and with Jupyter Book 1 the same ``<script>`` body ends up twice in
every page; the second ``const THEBE_JS_URL = ...`` is a SyntaxError in the reader's console.
Each page keeps the first copy of every identical script.
"""

from __future__ import annotations

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


def setup(app: Sphinx) -> dict[str, Any]:
    # After every other handler has added its per-page scripts (myst-nb's widget scripts, ...).
    app.connect("html-page-context", _dedupe_scripts, priority=1000)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
