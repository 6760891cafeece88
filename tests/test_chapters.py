"""Every exercise notebook in notebooks/ executes, cell by cell, with its solutions.

The chapters in book/ are executed once, by the book build that ``test_book.py`` runs
(``nb_execution_raise_on_error``: a failing ``assert`` in a chapter, like any cell that raises,
fails the build; ``test_book_execution.py`` proves it on a broken chapter). Executing them here
too would double the time of ``make test``. The exercise notebooks are not part of the book (the
self-study pages are made from them, but run their hidden tests too), so nbval runs them here.
One nbval process runs them all (a pytest start-up per notebook was most of their time), with
the harness's own cases: a good chapter and broken ones, which prove the harness fails them.
"""

import nbformat
import pytest
from notebook_runner import chapters, code_cell, exercise_notebooks, myst_page, run_nbval

#: The harness's own cases: a good chapter, and broken ones with the message each must report.
GOOD = ("import qcourse\nx = 2 + 2", "assert x == 4\nprint('fine')")
BROKEN = {
    "failing-assert": (("x = 2 + 2", "assert x == 5, 'arithmetic is broken'"),
                       "arithmetic is broken"),
    "library-error": (("import qcourse", "qcourse.matmul_int8([[1]], [[1]])"),
                      "must be a numpy.ndarray"),
    "raising-cell": (("raise RuntimeError('a cell that fails')", "print('not reached')"),
                     "a cell that fails"),
}


def _myst(tmp_path, name, *cells):
    path = tmp_path / "src" / f"{name}.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(myst_page("\n# A test chapter\n", *map(code_cell, cells)))
    return path


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every exercise notebook and the harness's own chapters, executed by one nbval run."""
    tmp = tmp_path_factory.mktemp("nbval")
    sources = {p.stem: p for p in exercise_notebooks()}
    sources["harness-good"] = _myst(tmp, "good", *GOOD)
    for name, (cells, _) in BROKEN.items():
        sources[f"harness-{name}"] = _myst(tmp, name, *cells)
    results, proc = run_nbval(sources, tmp / "run")
    return results, f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


def test_there_are_chapters_and_exercises():
    assert [p.stem for p in chapters()], "no chapters found in book/"
    assert [p.stem for p in exercise_notebooks()], "no exercise notebooks found in notebooks/"


@pytest.mark.parametrize("notebook", exercise_notebooks(), ids=lambda p: p.stem)
def test_exercise_solutions_execute(notebook, executed):
    results, log = executed
    result = results[notebook.stem]
    cells = sum(c.cell_type == "code" for c in nbformat.read(notebook, as_version=4).cells)
    assert result.failed == 0, f"{notebook.name}:\n{result.report[-6000:]}"
    assert result.passed == cells, f"{result.passed} of {cells} cells ran:\n{log}"


def test_harness_passes_a_good_chapter(executed):
    results, log = executed
    assert (results["harness-good"].passed, results["harness-good"].failed) == (2, 0), log


@pytest.mark.parametrize("name", BROKEN)
def test_harness_fails_a_broken_chapter(executed, name):
    results, log = executed
    result = results[f"harness-{name}"]
    assert result.failed == 1, f"{result}\n{log}"
    assert BROKEN[name][1] in result.report, result.report


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
