"""Run a chapter (MyST Markdown) or an exercise notebook the way `make test` checks it.

A chapter is converted to .ipynb with jupytext, then executed by `pytest --nbval-lax` in a fresh
directory, in a subprocess with its own pytest configuration (so that the project's settings do
not leak into the notebook run and the run cannot depend on the working directory).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
JUPYTEXT_MARKER = "format_name: myst"
#: The front matter of a MyST notebook page (what a chapter in book/ starts with).
MYST_HEADER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


def code_cell(code: str) -> str:
    """One MyST code cell holding ``code``, with a blank line before it."""
    return f"\n```{{code-cell}} ipython3\n{code}\n```\n"


def myst_page(*parts: str) -> str:
    """A MyST notebook page: the header, then ``parts`` (Markdown, cells from ``code_cell``)."""
    return MYST_HEADER + "".join(parts)


def chapters() -> list[Path]:
    """Every executable chapter in book/ (MyST notebooks with a jupytext header)."""
    book = ROOT / "book"
    return sorted(p for p in book.glob("*.md") if JUPYTEXT_MARKER in p.read_text()[:400])


def exercise_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def to_ipynb(source: Path, workdir: Path) -> Path:
    """Copy an .ipynb, or convert a MyST .md with jupytext, into workdir."""
    target = workdir / (source.stem + ".ipynb")
    nb = jupytext.read(source) if source.suffix == ".md" else nbformat.read(source, as_version=4)
    nbformat.write(nb, target)
    return target


def run_nbval(source: Path, workdir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Execute every cell of ``source`` under ``pytest --nbval-lax``; return the process."""
    notebook = to_ipynb(source, workdir)
    (workdir / "pytest.ini").write_text("[pytest]\n")
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
           "--nbval-cell-timeout", str(timeout), "-c", str(workdir / "pytest.ini"),
           "--rootdir", str(workdir), str(notebook)]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout * 2)
