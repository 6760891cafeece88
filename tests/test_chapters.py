"""Every chapter in book/ and every exercise notebook in notebooks/ executes, cell by cell.

Checks inside the chapters are `assert` statements in cells: a failing assert, like any cell that
raises, fails the run.  The last tests prove the harness itself by feeding it broken notebooks.
"""

import textwrap

import pytest
from notebook_runner import chapters, exercise_notebooks, run_nbval

HEADER = textwrap.dedent("""\
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
    """)


def _report(proc):
    return f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


def test_there_are_chapters_and_exercises():
    assert [p.stem for p in chapters()], "no chapters found in book/"
    assert [p.stem for p in exercise_notebooks()], "no exercise notebooks found in notebooks/"


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)
def test_chapter_executes(chapter, tmp_path):
    proc = run_nbval(chapter, tmp_path)
    assert proc.returncode == 0, _report(proc)
    assert " passed" in proc.stdout and "failed" not in proc.stdout, _report(proc)


@pytest.mark.parametrize("notebook", exercise_notebooks(), ids=lambda p: p.stem)
def test_exercise_solutions_execute(notebook, tmp_path):
    proc = run_nbval(notebook, tmp_path)
    assert proc.returncode == 0, _report(proc)


def _myst(tmp_path, name, *cells):
    body = "".join(f"\n```{{code-cell}} ipython3\n{c}\n```\n" for c in cells)
    path = tmp_path / "src" / f"{name}.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(HEADER + "\n# A test chapter\n" + body)
    return path


def test_harness_passes_a_good_chapter(tmp_path):
    src = _myst(tmp_path, "good", "import qcourse\nx = 2 + 2", "assert x == 4\nprint('fine')")
    run = tmp_path / "run"
    run.mkdir()
    proc = run_nbval(src, run)
    assert proc.returncode == 0, _report(proc)
    assert "2 passed" in proc.stdout


@pytest.mark.parametrize(
    "cells, message",
    [
        (("x = 2 + 2", "assert x == 5, 'arithmetic is broken'"), "arithmetic is broken"),
        (("import qcourse", "qcourse.matmul_int8([[1]], [[1]])"), "must be a numpy.ndarray"),
        (("raise RuntimeError('a cell that fails')", "print('not reached')"), "a cell that fails"),
    ],
    ids=["failing-assert", "library-error", "raising-cell"],
)
def test_harness_fails_a_broken_chapter(tmp_path, cells, message):
    src = _myst(tmp_path, "broken", *cells)
    run = tmp_path / "run"
    run.mkdir()
    proc = run_nbval(src, run)
    assert proc.returncode != 0, _report(proc)
    assert "1 failed" in proc.stdout and message in proc.stdout, _report(proc)
