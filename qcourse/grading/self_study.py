"""The self-study edition: each exercise notebook as a MyST page, solutions behind toggles.

``make self-study`` writes ``book/exercises/STEM.md`` for every ``notebooks/STEM.ipynb``; the
HTML book lists each page after its chapter (``_toc.yml``).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable
from pathlib import Path

from .notebook import (
    SOLUTION_BEGIN,
    SOLUTION_END,
    cell_source,
    hidden_part,
    is_solution,
    is_test,
    public_part,
    read_json,
)

_MYST_HEADER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


# The toggle over a solution says what it hides (MyST-NB's default is "Show code cell source").
SOLUTION_PROMPT_SHOW, SOLUTION_PROMPT_HIDE = "Solution", "Hide the solution"
_SOLUTION_OPTIONS = ("---\ntags: [hide-input]\nmystnb:\n"
                     f"  code_prompt_show: {SOLUTION_PROMPT_SHOW}\n"
                     f"  code_prompt_hide: {SOLUTION_PROMPT_HIDE}\n---\n")


def _fence(code: str, tags: list[str] | None = None, options: str = "") -> str:
    """A MyST code cell: ``tags`` as a ``:tags:`` line, or ``options`` as a YAML block."""
    ticks = "```"
    while ticks in code:
        ticks += "`"
    head = f"{ticks}{{code-cell}} ipython3\n"
    if options:
        head += options
    elif tags:
        head += f":tags: [{', '.join(tags)}]\n\n"
    return f"{head}{code.rstrip()}\n{ticks}\n"


def _strip_markers(code: str) -> str:
    lines = [line for line in code.splitlines()
             if SOLUTION_BEGIN not in line and SOLUTION_END not in line]
    return textwrap.dedent("\n".join(lines)).strip("\n")


def self_study_page(notebook: dict, stem: str) -> str:
    """A MyST notebook page of an exercise notebook with each solution behind a toggle.

    Task text and locked code are shown as they are; each solution cell becomes a code cell
    tagged ``hide-input`` whose toggle says "Solution" (MyST-NB's cell-level
    ``code_prompt_show``); each test cell shows its public checks, and runs its hidden tests in
    a ``remove-cell`` cell, so building the page checks the solution without showing the hidden
    tests. The page gets the label ``self-study-STEM``.
    """
    parts = [_MYST_HEADER, f"\n(self-study-{stem})=\n"]
    title_done = False
    for cell in notebook["cells"]:
        src = cell_source(cell)
        if cell.get("cell_type") == "markdown":
            if not title_done and src.lstrip().startswith("# "):
                first, _, rest = src.lstrip().partition("\n")
                parts.append(f"{first} (self-study edition)\n")
                parts.append(textwrap.dedent(f"""
                    :::{{note}}
                    This page is the self-study edition of `notebooks/{stem}.ipynb`. Work in the
                    notebook first; here each solution is folded away behind a toggle above its
                    checks. The copy an instructor releases for grading has no solutions.
                    :::
                    """))
                if rest.strip():
                    parts.append("\n" + rest.strip("\n") + "\n")
                title_done = True
            else:
                parts.append("\n" + src.strip("\n") + "\n")
        elif cell.get("cell_type") == "code":
            if is_solution(cell):
                parts.append("\n" + _fence(_strip_markers(src), options=_SOLUTION_OPTIONS))
            elif is_test(cell):
                parts.append("\n" + _fence(public_part(src)))
                hidden = hidden_part(src)
                if hidden.strip():
                    parts.append("\n" + _fence(textwrap.dedent(hidden), ["remove-cell"]))
            else:
                parts.append("\n" + _fence(src))
    return "".join(parts)


def write_self_study_pages(notebooks: Iterable[str | os.PathLike], out_dir: str | os.PathLike
                           ) -> list[Path]:
    """Write ``out_dir/STEM.md`` (``self_study_page``) for each notebook; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, notebooks):
        target = out / f"{path.stem}.md"
        page = self_study_page(read_json(path), path.stem)
        if not target.is_file() or target.read_text() != page:
            target.write_text(page)
        written.append(target)
    return written
