"""Run a chapter (MyST Markdown) or an exercise notebook the way `make test` checks it.

A chapter is converted to .ipynb with jupytext, then executed by `pytest --nbval-lax` in a fresh
directory, in a subprocess with its own pytest configuration (so that the project's settings do
not leak into the notebook run and the run cannot depend on the working directory).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

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


@dataclass
class NbvalResult:
    """One notebook's cells under ``pytest --nbval-lax``: how many passed and failed, and the
    failures' reports (tracebacks)."""

    passed: int = 0
    failed: int = 0
    report: str = ""


def run_nbval(sources: dict[str, Path], workdir: Path,
              timeout: int = 600) -> tuple[dict[str, NbvalResult], subprocess.CompletedProcess]:
    """Execute every cell of each notebook of ``sources`` (key -> .md or .ipynb) under one
    ``pytest --nbval-lax`` process (each notebook in a kernel of its own; one pytest start-up for
    all, which is most of the time of a short notebook); ``timeout`` bounds each cell.

    Returns each key's result (read from pytest's JUnit XML) and the process; a key without
    results (its notebook was not collected) has none passed and none failed."""
    bad = [key for key in sources if not key.replace("_", "").replace("-", "").isalnum()]
    if bad:
        raise ValueError(f"keys must be letters, digits, '-' and '_': {bad}")
    notebooks = []
    for key, source in sources.items():
        (workdir / key).mkdir(parents=True, exist_ok=True)
        notebooks.append(str(to_ipynb(source, workdir / key).relative_to(workdir)))
    (workdir / "pytest.ini").write_text("[pytest]\n")
    junit = workdir / "nbval.xml"
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
           "--nbval-cell-timeout", str(timeout), "-c", str(workdir / "pytest.ini"),
           "--rootdir", str(workdir), "--junitxml", str(junit), *notebooks]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=timeout * 2 + 60 * len(sources))
    results = {key: NbvalResult() for key in sources}
    if junit.is_file():
        for case in ElementTree.parse(junit).iter("testcase"):
            result = results.get(case.get("classname", "").split(".")[0])
            if result is None:
                continue
            failures = [c for c in case if c.tag in ("failure", "error")]
            if failures:
                result.failed += 1
                result.report += "".join(f"{c.get('message', '')}\n{c.text or ''}\n"
                                         for c in failures)
            elif not any(c.tag == "skipped" for c in case):
                result.passed += 1
    return results, proc
