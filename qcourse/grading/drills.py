"""The drill: submissions with known right answers, to prove a grading setup.

``drill_submissions`` builds, for any exercise notebook, a set of submissions (the solution, the
blank release, a partly solved notebook, and hostile or broken ones) with the score each test
cell must get; ``drill`` releases, grades them and compares (``qcourse-course drill``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import textwrap
from collections.abc import Iterable
from typing import Any

from .autograde import grade
from .gradebook import GradingReport
from .notebook import Exercise, cell_source, exercises, grade_id, is_solution, is_test, read_json
from .reference import bound_names
from .releases import release


@dataclasses.dataclass
class DrillCase:
    """A submission built to test the grader, and the score each test cell must get."""

    name: str
    description: str
    content: str
    expected: dict[str, float]
    fools_nbgrader: bool = False


# An answer that claims to be everything: equal to anything, callable, iterable, indexable.
_ANYTHING = textwrap.dedent("""\
    class Anything:
        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

        def __call__(self, *args, **kwargs):
            return self

        def __getattr__(self, name):
            return self

        def __iter__(self):
            return iter([self, self, self])

        def __getitem__(self, key):
            return self

        def __len__(self):
            return 3

        def __bool__(self):
            return True

        __hash__ = object.__hash__
        __lt__ = __le__ = __gt__ = __ge__ = __eq__

    """)

# Writes into the course above the submission's folder (the scratch course, when graded).
_WRITES_OUTSIDE = textwrap.dedent("""\
    from pathlib import Path

    _course = Path("../../..")
    for _path in [_course / "gradebook.db", _course / "nbgrader_config.py",
                  *_course.glob("source/*/*.ipynb"), Path("../../someone_else/notes.txt")]:
        _path.parent.mkdir(parents=True, exist_ok=True)
        _path.write_text("overwritten by a submission")
    """)

# Looks for the course's source notebook above its folder and runs the solution it finds.
_READS_SOLUTIONS = textwrap.dedent("""\
    import json
    import pathlib

    for _nb in pathlib.Path("../../..").glob("source/*/*.ipynb"):
        for _cell in json.loads(_nb.read_text())["cells"]:
            if _cell["metadata"].get("nbgrader", {}).get("grade_id") == GRADE_ID:
                exec("".join(_cell["source"]))
    """)

# Prevented by the sandbox only (never run unsandboxed: the fork bomb would be real).
_READS_OTHERS = textwrap.dedent("""\
    import os

    _found = []
    for _root, _dirs, _files in os.walk("/"):
        _dirs[:] = [d for d in _dirs if d not in ("proc", "sys", "dev", "usr", "etc")]
        for _name in _files:
            if _name.endswith((".ipynb", ".db", ".csv", "nbgrader_config.py")):
                _found.append(os.path.join(_root, _name))
        if len(_found) > 40:
            break
    for _path in _found:
        try:
            print(_path, open(_path, errors="replace").read(3000))
        except OSError as _error:
            print(_path, _error)
    """)

_OPENS_SOCKET = textwrap.dedent("""\
    import socket

    for _port in PORTS:
        try:
            with socket.create_connection(("127.0.0.1", _port), timeout=2) as _s:
                _s.sendall(b"a submission was here")
                print("connected to", _port)
        except OSError as _error:
            print(_port, _error)
    """)

_FORK_BOMB = textwrap.dedent("""\
    import os
    import time

    _children = 0
    for _ in range(100_000):
        try:
            _pid = os.fork()
        except OSError as _error:
            print("fork refused after", _children, "children:", _error)
            break
        if _pid == 0:
            try:
                while True:
                    time.sleep(60)
            finally:
                os._exit(0)
        _children += 1
    """)

_FILLS_DISK = textwrap.dedent("""\
    import os

    _written = 0
    for _folder in (".", "/tmp", "../../.."):
        for _k in range(4096):
            try:
                with open(os.path.join(_folder, f"_fill{_k}"), "wb") as _f:
                    _f.write(b"x" * 2**20)
                _written += 2**20
            except OSError as _error:
                print(_folder, _error)
                break
    print("bytes written:", _written)
    """)

_REDEFINE_ASSERT = ("import builtins\n\n\nclass AssertionError(Exception):\n    pass\n\n\n"
                    "builtins.AssertionError = AssertionError")


class _Notebooks:
    """The source and release of one exercise notebook, and ways to build variants of it."""

    def __init__(self, source: dict, release_nb: dict) -> None:
        self.release_nb = release_nb
        self.exs = exercises(source)
        self.points = {e.test_id: e.points for e in self.exs}
        self.src_cells = {grade_id(c): c for c in source["cells"] if grade_id(c)}
        self.rel_cells = [copy.deepcopy(c) for c in release_nb["cells"]]

    def notebook(self, cells: list[dict]) -> str:
        """The release with ``cells``, as the text of a submitted file."""
        out = {k: v for k, v in self.release_nb.items() if k != "cells"}
        out["cells"] = cells
        return json.dumps(out, indent=1)

    def blank(self) -> list[dict]:
        return copy.deepcopy(self.rel_cells)

    def solved(self, which: set[str] | None = None) -> list[dict]:
        """The release with the source's solution cells of exercises ``which`` (None: all)."""
        chosen = {sid for e in self.exs if which is None or e.test_id in which
                  for sid in e.solution_ids}
        cells = self.blank()
        for cell in cells:
            if grade_id(cell) in chosen:
                cell["source"] = cell_source(self.src_cells[grade_id(cell)])
        return cells

    def exercise_at(self, k: int) -> Exercise:
        return self.exs[min(k, len(self.exs) - 1)]

    @staticmethod
    def first_solution_cell(cells: list[dict], ex: Exercise) -> dict:
        return next(c for c in cells if grade_id(c) == ex.solution_ids[0])

    def prepend(self, cells: list[dict], ex: Exercise, code: str) -> list[dict]:
        cell = self.first_solution_cell(cells, ex)
        cell["source"] = code + "\n" + cell_source(cell)
        return cells

    def all_but(self, *dropped: Exercise) -> dict[str, float]:
        lost = {e.test_id for e in dropped}
        return {g: (0.0 if g in lost else p) for g, p in self.points.items()}

    def zero(self) -> dict[str, float]:
        return dict.fromkeys(self.points, 0.0)

    @staticmethod
    def after_imports(cells: list[dict], code: str) -> list[dict]:
        first_sol = next(k for k, c in enumerate(cells) if is_solution(c))
        cells.insert(first_sol, {"cell_type": "code", "execution_count": None, "metadata": {},
                                 "outputs": [], "source": code})
        return cells

    def bound_by(self, ex: Exercise) -> list[str]:
        """The names exercise ``ex``'s solution cells define."""
        return sorted({n for sid in ex.solution_ids
                       for n in bound_names(cell_source(self.src_cells[sid]))[0]})


def _basic_cases(nb: _Notebooks) -> list[DrillCase]:
    """The solution, the blank release, and the odd-numbered exercises solved."""
    odd = {e.test_id for e in nb.exs if e.number % 2 == 1}
    return [
        DrillCase("solution", "the source notebook itself, solutions and all",
                  nb.notebook(nb.solved()), dict(nb.points)),
        DrillCase("blank", "the student release, unchanged", nb.notebook(nb.blank()), nb.zero()),
        DrillCase("partial", "odd-numbered exercises solved, the others left blank",
                  nb.notebook(nb.solved(odd)),
                  {g: (p if g in odd else 0.0) for g, p in nb.points.items()}),
    ]


def _broken_code_cases(nb: _Notebooks) -> list[DrillCase]:
    """Code that raises, never ends, or prints too much."""
    ex_a, ex_b = nb.exercise_at(1), nb.exercise_at(2)
    return [
        DrillCase("raises", f"exercise {ex_a.number}'s cell raises before defining anything",
                  nb.notebook(nb.prepend(nb.solved(), ex_a, "raise RuntimeError('oops')")),
                  nb.all_but(ex_a)),
        DrillCase("infinite-loop",
                  f"exercise {ex_b.number}'s cell never finishes (per-cell timeout)",
                  nb.notebook(nb.prepend(nb.solved(), ex_b, "while True:\n    pass")),
                  nb.all_but(ex_b)),
        DrillCase("huge-output", "solved, but prints 20 MB in one line and 20,000 short lines",
                  nb.notebook(nb.prepend(nb.solved(), nb.exs[0], (
                      "print('x' * 20_000_000)\nfor _i in range(20_000):\n    print(_i)"))),
                  dict(nb.points)),
    ]


def _duplicated_cells(nb: _Notebooks) -> list[dict]:
    """Solved; each test cell has an emptied copy before it, the first solution a blank copy."""
    dup = []
    for cell in nb.solved():
        if is_test(cell):
            fake = copy.deepcopy(cell)
            fake["source"] = "pass"
            dup.append(fake)
        dup.append(cell)
        if grade_id(cell) == nb.exs[0].solution_ids[-1]:
            dup.append(copy.deepcopy(next(c for c in nb.rel_cells
                                          if grade_id(c) == grade_id(cell))))
    return dup


def _edited_notebook_cases(nb: _Notebooks) -> list[DrillCase]:
    """Test cells deleted, duplicated or edited; metadata changed."""
    edited = nb.blank()
    for cell in edited:
        if is_test(cell):
            cell["source"] = "pass"
            cell["metadata"]["nbgrader"].update(points=100, locked=False)
            cell["metadata"]["editable"] = True
    retagged = nb.solved()
    for cell in retagged:
        if is_solution(cell):
            cell["metadata"]["nbgrader"].update(grade=True, points=50)
    return [
        DrillCase("deleted-cells", "solved, with every test cell deleted",
                  nb.notebook([c for c in nb.solved() if not is_test(c)]), dict(nb.points)),
        DrillCase("duplicated-cells", "solved; each test cell has an emptied copy before it, and "
                  f"exercise {nb.exs[0].number}'s solution cell a blank copy after it (the last "
                  "copy counts)", nb.notebook(_duplicated_cells(nb)), nb.all_but(nb.exs[0])),
        DrillCase("edited-tests", "blank, with every test replaced by `pass`, unlocked and worth "
                  "100 points", nb.notebook(edited), nb.zero()),
        DrillCase("retagged-cells", "solved, with every solution cell marked as a graded cell "
                  "worth 50 points (nbgrader alone cannot grade it)", nb.notebook(retagged),
                  dict(nb.points)),
    ]


def _fooling_cases(nb: _Notebooks) -> list[DrillCase]:
    """Attacks on the tests themselves: a redefined assert, silenced cells, anything-objects."""
    cells = nb.solved({e.test_id for e in nb.exs[1:]})
    nb.first_solution_cell(cells, nb.exs[0])["source"] = "\n".join(
        f"{n} = lambda *args, **kwargs: None" for n in nb.bound_by(nb.exs[0]))
    anything = nb.blank()
    for ex in nb.exs:
        cell = nb.first_solution_cell(anything, ex)
        cell["source"] = (_ANYTHING if ex is nb.exs[0] else "") + "\n".join(
            f"{n} = Anything()" for n in nb.bound_by(ex))
        for sid in ex.solution_ids[1:]:
            next(c for c in anything if grade_id(c) == sid)["source"] = ""
    names = sorted({n for ex in nb.exs for n in nb.bound_by(ex)})
    return [
        DrillCase("redefined-assert", f"solved except exercise {nb.exs[0].number} (answers "
                  "that return None), with AssertionError redefined in builtins and in the "
                  "notebook", nb.notebook(nb.after_imports(cells, _REDEFINE_ASSERT)),
                  nb.all_but(nb.exs[0])),
        DrillCase("silenced-tests", "blank, plus an IPython input transformer that empties "
                  "every later cell, tests included", nb.notebook(nb.after_imports(
                      nb.blank(),
                      "get_ipython().input_transformers_post.append(lambda lines: [])")),
                  nb.zero(), fools_nbgrader=True),
        DrillCase("anything-objects", "every answer (" + ", ".join(names) + ") is an object "
                  "that equals anything and returns itself when called", nb.notebook(anything),
                  nb.zero()),
    ]


def _infrastructure_cases(nb: _Notebooks) -> list[DrillCase]:
    """Attacks on the grader: its files, its secrets, its processes; and a file not JSON."""
    steal = nb.blank()
    for cell in steal:
        if is_solution(cell):
            cell["source"] = _READS_SOLUTIONS.replace("GRADE_ID", repr(grade_id(cell)))
    ex_a = nb.exercise_at(1)
    return [
        DrillCase("writes-outside", "solved, but writes into the course above its own folder",
                  nb.notebook(nb.after_imports(nb.solved(), _WRITES_OUTSIDE)), nb.zero()),
        DrillCase("reads-solutions", "every solution cell looks for the course's source "
                  "notebook above its folder and runs the solution it finds there",
                  nb.notebook(steal), nb.zero()),
        DrillCase("not-json", "a file that is not JSON", "{\"cells\": [oops", nb.zero()),
        DrillCase("kills-kernel", f"solved, but exercise {ex_a.number}'s cell ends its own "
                  "process", nb.notebook(nb.prepend(nb.solved(), ex_a,
                                                    "import os\n\nos._exit(1)")), nb.zero()),
        DrillCase("kills-grader", "solved, but kills the process that started its kernel",
                  nb.notebook(nb.after_imports(nb.solved(), (
                      "import os\nimport signal\n\nos.kill(os.getppid(), signal.SIGKILL)"))),
                  nb.zero()),
    ]


def _sandbox_cases(nb: _Notebooks, ports: tuple[int, ...]) -> list[DrillCase]:
    """Attacks that only a sandbox prevents: each is harmless there, so the score is full."""
    def solved_after(code: str) -> str:
        return nb.notebook(nb.after_imports(nb.solved(), code))

    return [
        DrillCase("reads-others", "solved, but searches the file system for notebooks, "
                  "gradebooks and CSV files and prints them", solved_after(_READS_OTHERS),
                  dict(nb.points)),
        DrillCase("opens-socket", f"solved, but connects to 127.0.0.1 on ports {list(ports)}",
                  solved_after(_OPENS_SOCKET.replace("PORTS", repr(list(ports)))),
                  dict(nb.points)),
        DrillCase("fork-bomb", "solved, but forks until the system refuses",
                  solved_after(_FORK_BOMB), dict(nb.points)),
        DrillCase("fills-disk", "solved, but writes up to 4 GiB into its folder, /tmp and "
                  "the course above it", solved_after(_FILLS_DISK), dict(nb.points)),
    ]


def _prevented(cases: list[DrillCase], points: dict[str, float]) -> list[DrillCase]:
    """In the sandbox, writes outside and signals to the grader fail: the answers count."""
    return [dataclasses.replace(case, expected=dict(points))
            if case.name in ("writes-outside", "kills-grader") else case for case in cases]


def drill_submissions(source: dict, release_nb: dict, *, sandboxed: bool = True,
                      ports: tuple[int, ...] = (22, 80, 8000, 8081, 8888)
                      ) -> list[DrillCase]:
    """Submissions that probe a grader, for any exercise notebook, with their expected scores.

    ``source`` and ``release_nb`` are the notebook and its student release (JSON dicts). The
    cases: the solution, the blank release, a partly solved notebook (odd exercises), a cell that
    raises, an infinite loop, huge output, deleted and duplicated cells, edited tests and
    metadata, a redefined ``AssertionError``, an IPython hook that empties every later cell,
    objects that compare equal to anything, solution cells retagged as graded cells, writes
    outside the submission's folder, code that looks for the solutions there, a file that is not
    JSON, code that kills its kernel, and code that kills the grading process. With
    ``sandboxed`` (grading inside bubblewrap, the default), the writes and the kill fail, so
    those submissions keep the points their answers earn, and four more attacks join (reading
    the file system, a socket to ``ports`` on 127.0.0.1, a fork bomb, filling the disk).
    """
    nb = _Notebooks(source, release_nb)
    cases = [*_basic_cases(nb), *_broken_code_cases(nb), *_edited_notebook_cases(nb),
             *_fooling_cases(nb), *_infrastructure_cases(nb)]
    if not sandboxed:
        return cases
    return [*_prevented(cases, nb.points), *_sandbox_cases(nb, tuple(ports))]


def drill(course_dir: str | os.PathLike, *, notebooks_dir: str | os.PathLike | None = None,
          stems: Iterable[str] | None = None, cases: Iterable[str] | None = None,
          jobs: int = 2, cell_timeout: float = 10, progress: Any = None,
          sandbox: bool = True) -> tuple[GradingReport, list[dict]]:
    """Release into ``course_dir`` (a scratch course), grade ``drill_submissions``, compare.

    Returns the grading report and one row per (case, assignment) with the expected score, the
    score nbgrader alone gave, the final score and whether every cell got its expected score.
    """
    rel = release(course_dir, notebooks_dir=notebooks_dir, stems=stems)
    course = rel.course_dir
    subs = course / "drill-submissions"
    shutil.rmtree(subs, ignore_errors=True)
    expected: dict[tuple[str, str], DrillCase] = {}
    wanted = set(cases) if cases else None
    for stem in rel.stems:
        src = read_json(course / "source" / stem / f"{stem}.ipynb")
        rls = read_json(course / "release" / stem / f"{stem}.ipynb")
        for case in drill_submissions(src, rls, sandboxed=sandbox):
            if wanted is not None and case.name not in wanted:
                continue
            path = subs / case.name / f"{stem}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(case.content)
            expected[case.name, stem] = case
    report = grade(subs, course, jobs=jobs, cell_timeout=cell_timeout, progress=progress,
                   sandbox=sandbox)
    rows = []
    for r in report.results:
        case = expected[r.student, r.stem]
        got = {c.grade_id: c.score for c in r.cells}
        rows.append({"case": r.student, "assignment": r.stem, "expected": sum(
            case.expected.values()), "nbgrader": r.nbgrader_score, "score": r.score,
            "status": r.status, "ok": got == case.expected})
    return report, rows
