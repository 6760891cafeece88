"""Every exercise notebook in notebooks/ executes, cell by cell, with its solutions.

The chapters in book/ are executed once, by the book build that ``test_book.py`` runs
(``nb_execution_raise_on_error``: a failing ``assert`` in a chapter, like any cell that raises,
fails the build; ``test_book_execution.py`` proves it on a broken chapter). Executing them here
too would double the time of ``make test``. The exercise notebooks are not part of the book (the
self-study pages are made from them, but run their hidden tests too), so nbval runs them here.
The last tests prove the nbval harness itself by feeding it broken notebooks.
"""

import pytest
from notebook_runner import chapters, code_cell, exercise_notebooks, myst_page, run_nbval


def _report(proc):
    return f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


def test_there_are_chapters_and_exercises():
    assert [p.stem for p in chapters()], "no chapters found in book/"
    assert [p.stem for p in exercise_notebooks()], "no exercise notebooks found in notebooks/"


@pytest.mark.parametrize("notebook", exercise_notebooks(), ids=lambda p: p.stem)
def test_exercise_solutions_execute(notebook, tmp_path):
    proc = run_nbval(notebook, tmp_path)
    assert proc.returncode == 0, _report(proc)


def _myst(tmp_path, name, *cells):
    path = tmp_path / "src" / f"{name}.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(myst_page("\n# A test chapter\n", *map(code_cell, cells)))
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


# --------------------------------------------------------------------------------------------
# Public checks tell the learner what was expected and what came back.


def vague_public_checks(source: str) -> list[str]:
    """The asserts of a test cell's public part whose message shows no computed value.

    A message must be an f-string with at least one ``{...}`` field (what came back), or an
    expression that is itself the value; a constant string such as "this result is not what the
    task asks for" only says that something is wrong.
    """
    import ast

    public = source.split("### BEGIN HIDDEN TESTS")[0]
    problems = []
    for node in ast.walk(ast.parse(public)):
        if not isinstance(node, ast.Assert):
            continue
        msg = node.msg
        shows_value = msg is not None and not isinstance(msg, ast.Constant) and (
            not isinstance(msg, ast.JoinedStr)
            or any(isinstance(v, ast.FormattedValue) for v in msg.values))
        if not shows_value:
            problems.append(ast.get_source_segment(public, node).splitlines()[0])
    return problems


@pytest.mark.parametrize("notebook", exercise_notebooks(), ids=lambda p: p.stem)
def test_public_checks_say_what_came_back(notebook):
    import json

    cells = json.loads(notebook.read_text())["cells"]
    problems = []
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and "Public checks passed" in source:
            problems += vague_public_checks(source)
    assert not problems, "public checks whose message shows nothing computed:\n" + "\n".join(
        problems)


def test_vague_check_finder_catches_a_constant_message():
    cell = ("got = f(1)\n"
            "assert got == 2, 'public check failed: this result is not what the task asks for'\n"
            "assert got > 0\n"
            "assert got < 9, f'expected below 9, got {got}'\n"
            "### BEGIN HIDDEN TESTS\nassert got == 2, 'hidden'\n")
    assert vague_public_checks(cell) == [
        "assert got == 2, 'public check failed: this result is not what the task asks for'",
        "assert got > 0"]
