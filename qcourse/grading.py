"""Release, grade and give feedback on the course's exercises with nbgrader.

The exercise notebooks (``notebooks/STEM.ipynb``) are written in nbgrader's source format. This
module is the instructor's tool around them (the ``qcourse-course`` command, also runnable as
``python -m qcourse.grading``); the grading chapter (``book/grading.md``) shows it at work.

``release``
    builds a course directory (never inside ``notebooks/``): the repository's nbgrader config,
    one assignment per chapter stem in ``source/STEM/STEM.ipynb``, an sqlite gradebook, and the
    student version of every notebook made by ``nbgrader generate_assignment``; then checks that
    no solution and no hidden test survived into the release.
``grade``
    autogrades a folder of submissions with ``nbgrader autograde``, writes the scores into the
    gradebook, feedback HTML with ``nbgrader generate_feedback`` and the gradebook as CSV.

A test cell earns its points when it runs without an error. nbgrader runs a test cell in the
student's own kernel, after the student's code, so a submission can change what the tests see
(patch ``numpy`` or ``qcourse``, install an IPython hook that empties every later cell, return
objects that compare equal to anything). ``grade`` therefore scores cell :math:`c` as

.. math::

    s_c = p_c \\cdot [\\text{nbgrader passes } c] \\cdot [\\text{the split run passes } c],

where the *split run* executes the same tests in a separate trusted process that never runs
student code: the student's cells run in their own process, and the tests reach the student's
functions and values only through a narrow channel that carries plain data (numbers, strings,
tuples, lists, dicts, NumPy arrays, qcourse objects) and nothing else. Other defences: every
submission is rebuilt from the release before grading (deleted, duplicated or edited test cells
and tampered metadata are undone); each submission runs in its own scratch course outside the
course directory, which holds no source notebook (so no solution to find), with a per-cell
timeout; large outputs are truncated; writes outside the submission's own folder score zero and
the course's own files are checked, and restored, after every submission; processes a
submission leaves behind are killed; and feedback never shows hidden-test source. See the
grading chapter for the threat model and its limits.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import concurrent.futures
import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COURSE_ID",
    "DEFAULT_COURSE_DIR",
    "PUBLIC_PASS_MESSAGE",
    "CellResult",
    "DrillCase",
    "Exercise",
    "GradingError",
    "GradingReport",
    "ReleaseReport",
    "SplitVerdict",
    "SubmissionResult",
    "canonical_submission",
    "cell_source",
    "course_config_path",
    "drill",
    "drill_submissions",
    "exercises",
    "find_submissions",
    "grade",
    "hidden_part",
    "main",
    "public_part",
    "release",
    "secret_lines",
    "self_study_page",
    "split_run",
    "verify_release",
    "write_self_study_pages",
]

COURSE_ID = "qcourse"
DEFAULT_COURSE_DIR = "_build/course"

SOLUTION_BEGIN, SOLUTION_END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
PUBLIC_PASS_MESSAGE = "Public checks passed. More (hidden) tests run when your work is graded."

_PACKAGE_DIR = Path(__file__).resolve().parent
_STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
_MAX_SUBMISSION_BYTES = 50 * 2**20
_MAX_OUTPUT_CHARS = 20_000
_MAX_OUTPUTS_PER_CELL = 30
_MAX_MESSAGE_BYTES = 64 * 2**20
_STATE_DIR = ".qcourse"


class GradingError(RuntimeError):
    """The course directory or the environment does not allow grading (see the message)."""


# --------------------------------------------------------------------------------------------
# Notebooks as plain JSON (the parent process never needs nbformat).


def cell_source(cell: dict) -> str:
    """The source of a notebook cell (a JSON dict) as one string; "" when it is malformed."""
    src = cell.get("source", "")
    if isinstance(src, list):
        return "".join(s for s in src if isinstance(s, str))
    return src if isinstance(src, str) else ""


_source = cell_source


def _meta(cell: dict) -> dict:
    metadata = cell.get("metadata")
    nbg = metadata.get("nbgrader") if isinstance(metadata, dict) else None
    return nbg if isinstance(nbg, dict) else {}


def _grade_id(cell: dict) -> str | None:
    gid = _meta(cell).get("grade_id")
    return gid if isinstance(gid, str) else None


def _is_solution(cell: dict) -> bool:
    return bool(_meta(cell).get("solution"))


def _is_test(cell: dict) -> bool:
    meta = _meta(cell)
    return bool(meta.get("grade")) and not meta.get("solution") and cell.get("cell_type") == "code"


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One graded exercise of a notebook: its solution cells and the test cell that grades them.

    The test cell ``test_id`` is worth ``points``; the solution cells are the ones between the
    previous test cell and this one. See the grading chapter.
    """

    number: int
    test_id: str
    points: float
    solution_ids: tuple[str, ...]


def exercises(notebook: dict) -> list[Exercise]:
    """The graded exercises of an nbgrader notebook (a JSON dict), in notebook order.

    A test cell (``grade: true``, not a solution) closes an exercise: its solution cells are the
    ``solution: true`` cells since the previous test cell.
    """
    found: list[Exercise] = []
    pending: list[str] = []
    for cell in notebook.get("cells", []):
        gid = _grade_id(cell)
        if gid is None:
            continue
        if _is_solution(cell):
            pending.append(gid)
        elif _is_test(cell):
            points = float(_meta(cell).get("points", 0))
            found.append(Exercise(len(found) + 1, gid, points, tuple(pending)))
            pending = []
    return found


def _split_region(source: str, begin: str, end: str) -> tuple[list[str], list[str]]:
    """Split ``source`` into (lines outside, lines inside) the ``begin``/``end`` regions."""
    outside: list[str] = []
    inside: list[str] = []
    depth = 0
    for line in source.splitlines():
        if begin in line:
            depth += 1
        elif end in line:
            depth = max(depth - 1, 0)
        elif depth:
            inside.append(line)
        else:
            outside.append(line)
    return outside, inside


def public_part(test_source: str) -> str:
    """A test cell without its hidden-test region (what the student release shows)."""
    return "\n".join(_split_region(test_source, HIDDEN_BEGIN, HIDDEN_END)[0])


def hidden_part(test_source: str) -> str:
    """Only the hidden tests of a test cell."""
    return "\n".join(_split_region(test_source, HIDDEN_BEGIN, HIDDEN_END)[1])


def secret_lines(source_notebook: dict, min_length: int = 12) -> dict[str, set[str]]:
    """Lines of solutions and hidden tests that occur nowhere else in the source notebook.

    Returns ``{"solution": {...}, "hidden": {...}}`` of stripped lines at least ``min_length``
    characters long. A released notebook must contain none of them (``verify_release``).
    """
    public: set[str] = set()
    solution: set[str] = set()
    hidden: set[str] = set()
    for cell in source_notebook.get("cells", []):
        src = _source(cell)
        out_s, in_s = _split_region(src, SOLUTION_BEGIN, SOLUTION_END)
        out_h, in_h = _split_region("\n".join(out_s), HIDDEN_BEGIN, HIDDEN_END)
        public.update(line.strip() for line in out_h)
        solution.update(line.strip() for line in in_s)
        hidden.update(line.strip() for line in in_h)

    def keep(lines: set[str]) -> set[str]:
        return {s for s in lines - public if len(s) >= min_length and re.search(r"\w", s)}

    return {"solution": keep(solution), "hidden": keep(hidden)}


def verify_release(source_notebook: dict, release_notebook: dict) -> list[str]:
    """Problems that make ``release_notebook`` unfit for students (an empty list when fit).

    The release must keep every graded cell with its points, contain no solution or hidden-test
    marker, and contain none of the ``secret_lines`` of the source in any cell or output.
    """
    problems: list[str] = []
    text = "\n".join(_source(c) for c in release_notebook.get("cells", []))
    outputs = json.dumps([c.get("outputs", []) for c in release_notebook.get("cells", [])])
    for marker in (SOLUTION_BEGIN, SOLUTION_END, HIDDEN_BEGIN, HIDDEN_END):
        if marker in text:
            problems.append(f"the release contains the marker {marker!r}")
    secrets = secret_lines(source_notebook)
    release_lines = {line.strip() for line in text.splitlines()}
    for kind in ("solution", "hidden"):
        for line in sorted(secrets[kind]):
            if line in release_lines or line in outputs:
                problems.append(f"the release contains a {kind} line: {line!r}")
    want = {e.test_id: e.points for e in exercises(source_notebook)}
    got = {e.test_id: e.points for e in exercises(release_notebook)}
    if want != got:
        problems.append(f"graded cells differ: source {want}, release {got}")
    for cell in release_notebook.get("cells", []):
        if cell.get("cell_type") == "code" and cell.get("outputs"):
            problems.append(f"cell {_grade_id(cell)} has outputs in the release")
        if _is_test(cell) and PUBLIC_PASS_MESSAGE not in _source(cell):
            problems.append(f"test cell {_grade_id(cell)} lacks the public-checks message")
    return problems


# --------------------------------------------------------------------------------------------
# The course directory.


def _repo_roots() -> list[Path]:
    """Where a qcourse checkout may be: next to the package (a source checkout or an editable
    install), then the current directory (Binder runs ``postBuild`` from the repository root,
    with qcourse installed into site-packages)."""
    roots = []
    for root in (_PACKAGE_DIR.parent, Path.cwd()):
        if (root / "notebooks").is_dir() and (root / "nbgrader" / "nbgrader_config.py").is_file():
            roots.append(root)
    return roots


def course_config_path() -> Path:
    """The course's nbgrader config kept in the repository (``nbgrader/nbgrader_config.py``)."""
    for root in _repo_roots():
        return root / "nbgrader" / "nbgrader_config.py"
    raise GradingError("nbgrader/nbgrader_config.py not found: run from the qcourse repository")


def _default_notebooks_dir() -> Path:
    for root in _repo_roots():
        return root / "notebooks"
    raise GradingError("no notebooks/ directory found: run from the qcourse repository or pass "
                       "--notebooks")


def _check_course_dir(course: Path, notebooks: Path) -> None:
    course, notebooks = course.resolve(), notebooks.resolve()
    if course == notebooks or notebooks in course.parents:
        raise GradingError(f"the course directory {course} must not be inside {notebooks}")
    if course in notebooks.parents:
        raise GradingError(f"the course directory {course} must not contain {notebooks}")


def _fast_nbformat() -> None:
    """Skip building jsonschema's IRI grammar (~1 s per process); nbformat never uses it.

    Only for processes this tool owns (its workers and the ``qcourse-course`` command): a None
    entry in ``sys.modules`` makes ``import rfc3987_syntax`` fail, so jsonschema leaves out the
    two IRI formats, which no notebook schema uses.
    """
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    # nbgrader runs the `alembic` script (next to this interpreter) when it creates a gradebook
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("QCOURSE_GRADING_FDS", None)
    return env


def _run_batch(course: Path, ops: list[list[str]], overrides: dict | None = None) -> list[dict]:
    """Run nbgrader operations through its Python API in a fresh process rooted at ``course``."""
    job = {"course": str(course), "ops": ops, "overrides": overrides or {}}
    proc = subprocess.run(
        [sys.executable, "-m", "qcourse.grading", "_nbgrader-batch"],
        input=json.dumps(job), capture_output=True, text=True, env=_python_env(), timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise GradingError(f"nbgrader failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(lines[-1])["results"]
    for op, result in zip(ops, results, strict=True):
        if not result["success"]:
            raise GradingError(f"nbgrader {' '.join(op)} failed:\n{result.get('error', '')[-4000:]}"
                               f"\n{result.get('log', '')[-2000:]}")
    return results


@dataclasses.dataclass
class ReleaseReport:
    """What ``release`` made: the course directory, its assignments and their points."""

    course_dir: Path
    stems: list[str]
    points: dict[str, float]
    files: list[Path]

    def table(self) -> str:
        rows = [f"{'assignment':<16}{'exercises':>10}{'points':>8}  student notebook"]
        for stem, path in zip(self.stems, self.files, strict=True):
            manifest = _read_json(self.course_dir / "release.json")["assignments"][stem]
            rows.append(f"{stem:<16}{len(manifest['points']):>10}{self.points[stem]:>8g}  "
                        f"{path.relative_to(self.course_dir)}")
        return "\n".join(rows)


def release(course_dir: str | os.PathLike = DEFAULT_COURSE_DIR, *,
            notebooks_dir: str | os.PathLike | None = None, stems: Iterable[str] | None = None,
            student_dir: str | os.PathLike | None = None) -> ReleaseReport:
    """Make the student release of every exercise notebook in a course directory.

    One nbgrader assignment per chapter stem: ``notebooks/STEM.ipynb`` is copied to
    ``COURSE/source/STEM/STEM.ipynb`` and ``nbgrader generate_assignment`` writes
    ``COURSE/release/STEM/STEM.ipynb`` and records the assignment in the sqlite gradebook
    ``COURSE/gradebook.db``. Each release is then checked with ``verify_release`` and recorded
    (with checksums and points) in ``COURSE/release.json``. With ``student_dir``, the student
    notebooks are also copied there, flat (``student_dir/STEM.ipynb``): that is what learners get
    (e.g. on Binder). See the grading chapter.
    """
    notebooks = Path(notebooks_dir) if notebooks_dir else _default_notebooks_dir()
    course = Path(course_dir).resolve()
    _check_course_dir(course, notebooks)
    available = sorted(p.stem for p in notebooks.glob("*.ipynb"))
    chosen = sorted(set(stems)) if stems else available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise GradingError(f"no notebooks/{unknown[0]}.ipynb (available: {available})")
    if not chosen:
        raise GradingError(f"no exercise notebooks in {notebooks}")
    course.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(course_config_path(), course / "nbgrader_config.py")
    sources = {}
    for stem in chosen:
        data = (notebooks / f"{stem}.ipynb").read_bytes()
        nb = json.loads(data)
        if not exercises(nb):
            raise GradingError(f"notebooks/{stem}.ipynb has no graded cells")
        target = course / "source" / stem / f"{stem}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sources[stem] = nb
    _run_batch(course, [["generate_assignment", stem] for stem in chosen])
    manifest_path = course / "release.json"
    manifest = _read_json(manifest_path) if manifest_path.is_file() else {"assignments": {}}
    manifest["course_id"] = COURSE_ID
    files = []
    for stem in chosen:
        path = course / "release" / stem / f"{stem}.ipynb"
        released = _read_json(path)
        problems = verify_release(sources[stem], released)
        if problems:
            raise GradingError(f"the release of {stem} is unfit for students:\n" +
                               "\n".join(problems))
        manifest["assignments"][stem] = {
            "source_sha256": _sha256((course / "source" / stem / f"{stem}.ipynb").read_bytes()),
            "release_sha256": _sha256(path.read_bytes()),
            "points": {e.test_id: e.points for e in exercises(sources[stem])},
            "total": sum(e.points for e in exercises(sources[stem])),
        }
        files.append(path)
    _write_json_atomic(manifest_path, manifest)
    if student_dir is not None:
        out = Path(student_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stem, path in zip(chosen, files, strict=True):
            shutil.copyfile(path, out / f"{stem}.ipynb")
    points = {stem: manifest["assignments"][stem]["total"] for stem in chosen}
    return ReleaseReport(course, chosen, points, files)


def _load_course(course: Path) -> dict:
    manifest_path = course / "release.json"
    if not manifest_path.is_file():
        raise GradingError(f"{course} has no release: run `qcourse-course release` first")
    manifest = _read_json(manifest_path)
    for stem, entry in manifest["assignments"].items():
        for kind in ("source", "release"):
            path = course / kind / stem / f"{stem}.ipynb"
            if not path.is_file() or _sha256(path.read_bytes()) != entry[f"{kind}_sha256"]:
                raise GradingError(f"{path} changed since the release: release again before "
                                   "grading (or restore it)")
    return manifest


# --------------------------------------------------------------------------------------------
# Submissions: found on disk, then rebuilt from the release.


@dataclasses.dataclass
class Submission:
    """One notebook handed in: who, which assignment, the file and its bytes."""

    student: str
    stem: str
    path: Path
    data: bytes
    timestamp: str | None = None


def find_submissions(folder: str | os.PathLike, stems: Iterable[str]
                     ) -> tuple[list[Submission], list[tuple[str, str]]]:
    """Every submission in ``folder`` and every file that is not one (with the reason).

    Accepted layouts: ``folder/STUDENT/STEM.ipynb`` and nbgrader's
    ``folder/STUDENT/STEM/STEM.ipynb`` (with an optional ``timestamp.txt``). Returns
    ``(submissions, ignored)`` where ``ignored`` lists ``(path, reason)``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GradingError(f"no submissions folder {folder}")
    stems = set(stems)
    found: dict[tuple[str, str], Submission] = {}
    ignored: list[tuple[str, str]] = []

    def rel(p: Path) -> str:
        return str(p.relative_to(folder))

    for student_dir in sorted(folder.iterdir()):
        if not student_dir.is_dir():
            ignored.append((rel(student_dir), "not a student folder"))
            continue
        student = student_dir.name
        if not _STUDENT_ID.match(student):
            ignored.append((rel(student_dir), "not a valid student id (letters, digits, _.@-)"))
            continue
        for entry in sorted(student_dir.iterdir()):
            timestamp = None
            if entry.is_file() and entry.suffix == ".ipynb":
                stem, path = entry.stem, entry
            elif entry.is_dir() and (entry / f"{entry.name}.ipynb").is_file():
                stem, path = entry.name, entry / f"{entry.name}.ipynb"
                stamp = entry / "timestamp.txt"
                if stamp.is_file():
                    timestamp = stamp.read_text().strip() or None
            else:
                ignored.append((rel(entry), "not an assignment notebook"))
                continue
            if stem not in stems:
                ignored.append((rel(path), f"no released assignment named {stem!r}"))
                continue
            if (student, stem) in found:
                ignored.append((rel(path), f"{student} already has a {stem} submission "
                                f"({rel(found[student, stem].path)})"))
                continue
            size = path.stat().st_size
            data = path.read_bytes() if size <= _MAX_SUBMISSION_BYTES else b""
            sub = Submission(student, stem, path, data, timestamp)
            if size > _MAX_SUBMISSION_BYTES:
                sub.data = b"\0too large"
            found[student, stem] = sub
    return sorted(found.values(), key=lambda s: (s.stem, s.student)), ignored


def canonical_submission(release_notebook: dict, submitted: bytes | str
                         ) -> tuple[dict, list[str], bool]:
    """Rebuild a submission from the release: ``(notebook, notes, readable)``.

    Every cell of the release is kept with the release's metadata, in the release's order. A
    solution cell takes the student's source (from the *last* copy if the student duplicated it,
    as Jupyter would run that one last); a deleted solution cell keeps the release stub; locked
    cells (tasks, imports, tests) are the release's, whatever the student did to them; cells the
    student added are kept (without metadata) after the release cell that preceded them. A file
    that is not a readable notebook becomes the blank release. nbgrader then restores the hidden
    tests into the test cells from its gradebook, as for any submission.
    """
    release_cells = release_notebook["cells"]
    notes: list[str] = []
    try:
        data = json.loads(submitted)
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise ValueError("the file is JSON but not a notebook")
        if int(data.get("nbformat", 0)) < 4:
            raise ValueError(f"nbformat {data.get('nbformat')} is too old (save it with Jupyter)")
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        note = (f"The submission is not a readable notebook ({reason}); it was graded as the "
                "blank release, so every graded cell scores 0.")
        nb = copy.deepcopy(release_notebook)
        return nb, [note], False

    index = {_grade_id(c): k for k, c in enumerate(release_cells) if _grade_id(c)}
    cells = [c for c in data["cells"] if isinstance(c, dict)]
    last = {}
    for i, cell in enumerate(cells):
        gid = _grade_id(cell)
        if gid in index:
            last[gid] = i
    solutions: dict[str, str] = {}
    extras: dict[int, list[dict]] = {k: [] for k in range(-1, len(release_cells))}
    duplicated, edited, retagged = set(), set(), set()
    anchor = -1
    for i, cell in enumerate(cells):
        gid = _grade_id(cell)
        if gid in index and last[gid] == i:
            anchor = index[gid]
            original = release_cells[anchor]
            if _is_solution(original):
                solutions[gid] = _source(cell)
            elif _source(cell) != _source(original) or cell.get("cell_type") != original[
                    "cell_type"]:
                edited.add(gid)
            keys = ("grade", "solution", "locked", "points", "task")
            if any(_meta(cell).get(k) != _meta(original).get(k) for k in keys):
                retagged.add(gid)
            continue
        if gid in index:
            duplicated.add(gid)
        kind = cell.get("cell_type")
        if kind == "code":
            extras[anchor].append({"cell_type": "code", "execution_count": None, "metadata": {},
                                   "outputs": [], "source": _source(cell)})
        elif kind == "markdown":
            extras[anchor].append({"cell_type": "markdown", "metadata": {},
                                   "source": _source(cell)})
    missing = [gid for gid in index if gid not in last]
    out = list(extras[-1])
    for k, original in enumerate(release_cells):
        cell = copy.deepcopy(original)
        gid = _grade_id(original)
        if gid in solutions:
            cell["source"] = solutions[gid]
        out.append(cell)
        out.extend(extras[k])
    if missing:
        notes.append("Cells missing from the submission were restored from the release: "
                     + ", ".join(missing) + ".")
    if duplicated:
        notes.append("Cells that appear more than once: " + ", ".join(sorted(duplicated))
                     + " (the last copy was graded; earlier copies ran as ordinary cells).")
    if edited:
        notes.append("Edits to locked cells were discarded: " + ", ".join(sorted(edited)) + ".")
    if retagged:
        notes.append("Changed nbgrader metadata was replaced by the release's: "
                     + ", ".join(sorted(retagged)) + ".")
    nb = {key: copy.deepcopy(value) for key, value in release_notebook.items() if key != "cells"}
    nb["cells"] = out
    return nb, notes, True


def _note_cell(lines: list[str]) -> dict:
    body = "\n".join(f"- {line}" for line in lines)
    return {"cell_type": "markdown", "metadata": {},
            "source": f"**Notes from the grader**\n\n{body}\n"}


# --------------------------------------------------------------------------------------------
# The split run: the student's cells in one process, the tests in another.

_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict,
                set, frozenset, range, slice, type(Ellipsis), pickle.PickleBuffer)
_SAFE_GLOBALS = {
    ("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "range"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
}


def _trusted_class(module: str, name: str) -> type | None:
    """A class the tests may receive from the student's process, or None."""
    if module.split(".")[0] != "qcourse" or module == __name__ or module not in sys.modules:
        return None
    obj = getattr(sys.modules[module], name, None)
    if isinstance(obj, type) and obj.__module__ == module and not issubclass(obj, BaseException):
        return obj
    return None


def _is_plain(obj: Any) -> bool:
    """Data the student's process sends by value; anything else stays there (a handle)."""
    kind = type(obj)
    if kind in _PLAIN_TYPES or kind is np.ndarray:
        return True
    if isinstance(obj, (np.generic, np.dtype)) and kind.__module__.split(".")[0] == "numpy":
        return True
    if isinstance(obj, type):  # classes named in a pickle stream (numpy's reconstructors)
        try:
            module, name = obj.__module__, obj.__qualname__
            return (module, name) in _SAFE_GLOBALS or _trusted_class(module, name) is obj
        except Exception:
            return False
    if kind in (types.BuiltinFunctionType, types.FunctionType):
        module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
        return type(module) is str and type(name) is str and (module, name) in _SAFE_GLOBALS
    return _trusted_class(kind.__module__, kind.__qualname__) is kind


class _Handles:
    """Student side: the objects the tests hold handles to (one handle per object)."""

    def __init__(self) -> None:
        self.objects: list = []
        self.index: dict[int, int] = {}

    def add(self, obj: Any) -> int:
        k = self.index.get(id(obj))
        if k is None or self.objects[k] is not obj:
            k = len(self.objects)
            self.objects.append(obj)
            self.index[id(obj)] = k
        return k

    def find(self, obj: Any) -> int | None:
        k = self.index.get(id(obj))
        return k if k is not None and self.objects[k] is obj else None

    def __getitem__(self, k: int) -> Any:
        return self.objects[k]


class _ReplyPickler(pickle.Pickler):
    """Student side: plain data by value, every other object as a handle into ``handles``."""

    def __init__(self, file: io.BytesIO, handles: _Handles) -> None:
        super().__init__(file, protocol=5)
        self.handles = handles

    def persistent_id(self, obj: Any) -> Any:
        if _is_plain(obj):
            return None
        return ("handle", self.handles.add(obj))


class _ArgsPickler(pickle.Pickler):
    """Student side: arguments pickled back exactly as the tests pickled them (to spot changes)."""

    def __init__(self, file: io.BytesIO, handles: _Handles) -> None:
        super().__init__(file, protocol=5)
        self.handles = handles

    def persistent_id(self, obj: Any) -> Any:
        k = self.handles.find(obj)
        return None if k is None else ("handle", k)


class _NotComparable(Exception):
    pass


class _ComparePickler(pickle.Pickler):
    """Test side: pickle plain data exactly as ``_ReplyPickler`` does, or give up."""

    def persistent_id(self, obj: Any) -> Any:
        if _is_plain(obj):
            return None
        raise _NotComparable


def _plain_bytes(obj: Any) -> bytes | None:
    buf = io.BytesIO()
    try:
        _ComparePickler(buf, protocol=5).dump(obj)
    except Exception:
        return None
    return buf.getvalue()


def _reply_bytes(obj: Any, handles: _Handles) -> bytes:
    buf = io.BytesIO()
    _ReplyPickler(buf, handles).dump(obj)
    return buf.getvalue()


class _RequestUnpickler(pickle.Unpickler):
    """Student side: requests from the tests, with handles resolved."""

    def __init__(self, file: io.BytesIO, handles: _Handles) -> None:
        super().__init__(file)
        self.handles = handles

    def persistent_load(self, pid: Any) -> Any:
        return self.handles[pid[1]]


class StudentCodeError(Exception):
    """The student's code raised an exception that is not a built-in one (its name and text)."""


class StudentTimeout(Exception):
    """The student's code ran past its time budget."""


class StudentProcessGone(Exception):
    """The student's process died or broke the protocol; nothing more can be asked of it."""


class RemoteObject:
    """A student object that is not plain data: it can be called and its attributes read.

    Comparisons, hashing and truth value are *not* forwarded, so an object that claims to equal
    anything equals only itself here.
    """

    __slots__ = ("_proc", "_hid")

    def __init__(self, proc: StudentProcess, hid: int) -> None:
        self._proc = proc
        self._hid = hid

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proc.request(("call", self._hid, args, kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._proc.request(("getattr", self._hid, name))

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        n = self._proc.request(("len", self._hid))
        if type(n) is not int:
            raise TypeError("len() of a student object did not return an int")
        return n

    def __iter__(self) -> Any:
        items = self._proc.request(("list", self._hid))
        if type(items) is not list:
            raise TypeError("a student object could not be iterated")
        return iter(items)

    def __getitem__(self, key: Any) -> Any:
        return self._proc.request(("getitem", self._hid, key))

    def __repr__(self) -> str:
        return f"<student object #{self._hid}>"


class _RequestPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, proc: StudentProcess) -> None:
        super().__init__(file, protocol=5)
        self.proc = proc

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is RemoteObject:
            if obj._proc is not self.proc:
                raise pickle.PicklingError("a handle from another student process")
            return ("handle", obj._hid)
        return None


class _ReplyUnpickler(pickle.Unpickler):
    """Test side: only plain data and trusted classes; student objects become RemoteObjects."""

    def __init__(self, file: io.BytesIO, proc: StudentProcess) -> None:
        super().__init__(file)
        self.proc = proc

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        trusted = _trusted_class(module, name)
        if trusted is not None:
            return trusted
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    def persistent_load(self, pid: Any) -> Any:
        if (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "handle"
                and type(pid[1]) is int):
            return RemoteObject(self.proc, pid[1])
        raise pickle.UnpicklingError("bad handle")


_BUILTIN_EXCEPTIONS = {name: obj for name, obj in vars(builtins).items()
                       if isinstance(obj, type) and issubclass(obj, Exception)}


def _raise_student_exception(name: Any, text: Any, args: Any = b"", proc: Any = None) -> None:
    """Raise, on the tests' side, the exception the student's code raised.

    A built-in exception is raised as itself, with the same arguments when they are plain data
    (tests may expect a ValueError and read its message); anything else as ``StudentCodeError``,
    and an interrupt as ``StudentTimeout`` (never a BaseException).
    """
    name, text = str(name), str(text)
    if name == "KeyboardInterrupt":
        raise StudentTimeout("the student's code ran out of time and was interrupted")
    exc_type = _BUILTIN_EXCEPTIONS.get(name)
    exc: Exception = StudentCodeError(f"{name}: {text}")
    if exc_type is not None:
        with contextlib.suppress(Exception):
            exc = exc_type(text)
        if type(args) is bytes and args:
            with contextlib.suppress(Exception):
                values = _ReplyUnpickler(io.BytesIO(args), proc).load()
                if type(values) is tuple:
                    exc = exc_type(*values)
    raise exc


class StudentProcess:
    """The student's code, run in its own Python process (IPython semantics, no kernel).

    The tests talk to it with ``request``; replies are unpickled by ``_ReplyUnpickler``, which
    builds only plain data. Each request has a deadline; past it the process is interrupted
    (SIGINT, as a kernel is) and, if it does not answer, killed.
    """

    def __init__(self, cwd: Path) -> None:
        to_student_r, to_student_w = os.pipe()
        from_student_r, from_student_w = os.pipe()
        env = _python_env()
        env["QCOURSE_GRADING_FDS"] = f"{to_student_r},{from_student_w}"
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "qcourse.grading", "_student"], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_student_r, from_student_w))
        os.close(to_student_r)
        os.close(from_student_w)
        self.send = Connection(to_student_w, readable=False)
        self.recv = Connection(from_student_r, writable=False)
        self.seq = 0
        self.gone: str | None = None
        self.deadline = time.monotonic() + 60.0

    def request(self, message: tuple) -> Any:
        if self.gone:
            raise StudentProcessGone(self.gone)
        self.seq += 1
        buf = io.BytesIO()
        try:
            _RequestPickler(buf, self).dump((self.seq, message))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"cannot pass this value to the student's code: {exc}") from None
        try:
            self.send.send_bytes(buf.getvalue())
        except OSError:
            self._kill("the student's process has exited")
            raise StudentProcessGone(self.gone) from None
        timed_out = False
        if not self.recv.poll(max(self.deadline - time.monotonic(), 0.0)):
            timed_out = True
            with contextlib.suppress(OSError):
                self.popen.send_signal(signal.SIGINT)
            if not self.recv.poll(3.0):
                self._kill("the student's code did not stop when interrupted")
                raise StudentTimeout("the student's code ran out of time and was stopped")
        try:
            raw = self.recv.recv_bytes(_MAX_MESSAGE_BYTES)
            seq, reply = _ReplyUnpickler(io.BytesIO(raw), self).load()
        except (EOFError, OSError):
            self._kill("the student's process has exited")
            raise StudentProcessGone(self.gone) from None
        except Exception as exc:  # anything the restricted unpickler refuses
            self._kill(f"the student's process sent something that is not plain data ({exc})")
            raise StudentProcessGone(self.gone) from None
        if seq != self.seq or not isinstance(reply, tuple) or not reply:
            self._kill("the student's process broke the protocol")
            raise StudentProcessGone(self.gone)
        if reply[0] == "raise":
            if timed_out:
                raise StudentTimeout("the student's code ran out of time and was interrupted")
            _raise_student_exception(*reply[1:4], proc=self)
        if timed_out:
            raise StudentTimeout("the student's code ran out of time")
        return reply[1] if len(reply) > 1 else None

    def _kill(self, why: str) -> None:
        self.gone = self.gone or why
        with contextlib.suppress(OSError):
            self.popen.kill()

    def close(self) -> None:
        for conn in (self.send, self.recv):
            with contextlib.suppress(OSError):
                conn.close()
        with contextlib.suppress(OSError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def _exception_payload(exc: BaseException, handles: _Handles) -> tuple[str, str, bytes]:
    """Student side: an exception as (type name, text, pickled args)."""
    try:
        args = _reply_bytes(tuple(exc.args), handles)
    except Exception:
        args = b""
    return type(exc).__name__, str(exc)[:2000], args


def _student_main() -> None:
    """The student's process: run cells and answer requests until the tests hang up."""
    _die_with_parent()
    fd_in, fd_out = (int(x) for x in os.environ.pop("QCOURSE_GRADING_FDS").split(","))
    conn_in = Connection(fd_in, writable=False)
    conn_out = Connection(fd_out, readable=False)
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    handles = _Handles()
    active = [False]

    def on_interrupt(signum: int, frame: Any) -> None:
        if active[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)

    def run_batch(calls: list) -> list:
        """Call the student's functions in order: (status, result, changed arguments) each."""
        out, size = [], 0
        for hid, argbytes in calls:
            if size > _MAX_MESSAGE_BYTES // 2:
                break  # the rest of the calls will be made one by one
            args, kwargs = _RequestUnpickler(io.BytesIO(argbytes), handles).load()
            try:
                active[0] = True
                try:
                    value = handles[hid](*args, **kwargs)
                finally:
                    active[0] = False
                status, payload = "ok", _reply_bytes(value, handles)
            except KeyboardInterrupt:
                out.append(("raise", ("KeyboardInterrupt", "", b""), None))
                break
            except BaseException as exc:
                status, payload = "raise", _exception_payload(exc, handles)
            buf = io.BytesIO()
            try:
                _ArgsPickler(buf, handles).dump((args, kwargs))
                after = buf.getvalue()
            except Exception:
                after = argbytes
            changed = None if after == argbytes else after
            size += len(payload) if status == "ok" else 0
            size += len(changed) if changed is not None else 0
            out.append((status, payload, changed))
        return out

    def run(message: tuple) -> tuple:
        kind = message[0]
        if kind == "run":
            result = shell.run_cell(message[1], store_history=False)
            error = result.error_before_exec or result.error_in_exec
            if error is not None:
                return ("raise", *_exception_payload(error, handles))
            return ("ok", None)
        if kind == "get":
            names = [n for n in message[1] if n in shell.user_ns]
            return ("ok", {n: shell.user_ns[n] for n in names})
        if kind == "batch":
            return ("ok", run_batch(message[1]))
        obj = handles[message[1]]
        if kind == "call":
            return ("ok", obj(*message[2], **message[3]))
        if kind == "getattr":
            return ("ok", getattr(obj, message[2]))
        if kind == "len":
            return ("ok", len(obj))
        if kind == "list":
            return ("ok", list(obj))
        if kind == "getitem":
            return ("ok", obj[message[2]])
        return ("raise", "ValueError", f"unknown request {kind!r}", b"")

    while True:
        try:
            raw = conn_in.recv_bytes()
        except (EOFError, OSError):
            break
        seq, message = _RequestUnpickler(io.BytesIO(raw), handles).load()
        try:
            active[0] = True
            try:
                reply = run(message)
            finally:
                active[0] = False
        except BaseException as exc:  # the student's exception, reported to the tests
            reply = ("raise", *_exception_payload(exc, handles))
        buf = io.BytesIO()
        try:
            _ReplyPickler(buf, handles).dump((seq, reply))
        except Exception as exc:
            buf = io.BytesIO()
            _ReplyPickler(buf, handles).dump(
                (seq, ("raise", "TypeError", f"the result cannot be sent to the tests: {exc}",
                       b"")))
        conn_out.send_bytes(buf.getvalue())
    os._exit(0)


def _bound_names(source: str) -> tuple[set[str], list[ast.stmt]]:
    """Names a cell binds at top level, and its top-level import statements."""
    try:
        tree = ast.parse(_transform(source))
    except SyntaxError:
        return set(), []
    names: set[str] = set()
    imports: list[ast.stmt] = []

    def targets(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                targets(node.target)
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
                visit(node.body)
            elif isinstance(node, (ast.If, ast.While)):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(node)

    visit(tree.body)
    return names, imports


def _transform(source: str) -> str:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


@dataclasses.dataclass
class SplitVerdict:
    """The split run's verdict on one test cell."""

    passed: bool
    message: str = ""


def _pickle_args(proc: StudentProcess, args: tuple, kwargs: dict) -> bytes | None:
    buf = io.BytesIO()
    try:
        _RequestPickler(buf, proc).dump((args, kwargs))
    except Exception:
        return None
    return buf.getvalue()


def _apply_mutation(live: tuple, changed: tuple) -> None:
    """Copy into the tests' arguments what the student's function did to its copies."""
    live_args, live_kwargs = live
    new_args, new_kwargs = changed
    pairs = list(zip(live_args, new_args, strict=False))
    pairs += [(live_kwargs[k], new_kwargs[k]) for k in live_kwargs if k in new_kwargs]
    for old, new in pairs:
        if type(old) is np.ndarray and type(new) is np.ndarray and old.shape == new.shape \
                and old.flags.writeable:
            with contextlib.suppress(Exception):
                np.copyto(old, new, casting="unsafe")
        elif type(old) is list and type(new) is list:
            old[:] = new
        elif type(old) is dict and type(new) is dict:
            old.clear()
            old.update(new)
        elif type(old) is set and type(new) is set:
            old.clear()
            old.update(new)


_MISSING, _CALLABLE = "missing", "callable"


class _Recording:
    """Which test cell's calls are being recorded, during the reference run.

    Each reference function an exercise defines is wrapped once, right after its solution cell
    runs, so that every way of reaching it (aliases, helpers) goes through the wrapper. A call
    from a locked cell, or an exercise whose answer is callable but not a function (a class,
    say), makes the shortcut unavailable.
    """

    def __init__(self) -> None:
        self.active: _Replay | None = None
        self.in_locked_cell = False
        self.unrecorded = False
        self.opaque: set[str] = set()

    def wrap(self, name: str, function: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.active is not None:
                return self.active.record(name, function, args, kwargs)
            if self.in_locked_cell:
                self.unrecorded = True
            return function(*args, **kwargs)

        return functools.wraps(function)(recorded)


class _Replay:
    """The calls of one test cell: recorded with the reference, answered by the student.

    ``record`` (reference run): every call to an exercise's function, its arguments (pickled),
    the result and what it did to its arguments. ``player`` (student run): while the test cell
    makes the recorded calls with the same arguments, each returns the student's answer, fetched
    in advance in one round trip; from the first difference on, calls go to the student's
    process one by one.
    """

    def __init__(self, proc: StudentProcess | None = None) -> None:
        self.proc = proc
        self.calls: list[tuple[str, bytes | None]] = []
        self.expected: list[tuple] = []
        self.answers: list = []
        self.position = 0
        self.live = False

    def record(self, name: str, function: Any, args: tuple, kwargs: dict) -> Any:
        before = _pickle_args(None, args, kwargs)
        self.calls.append((name, before))
        try:
            value = function(*args, **kwargs)
        except Exception as exc:
            # comparable only if the tests' side would raise exactly this again: a built-in
            # exception with plain arguments
            args_bytes = _plain_bytes(tuple(exc.args))
            same = type(exc) is _BUILTIN_EXCEPTIONS.get(type(exc).__name__) and (
                args_bytes is not None)
            self.expected.append(("raise", (type(exc).__name__, str(exc)[:2000], args_bytes)
                                  if same else None, None))
            raise
        after = _pickle_args(None, args, kwargs)
        self.expected.append(("ok", _plain_bytes(value), None if after == before else after))
        return value

    def player(self, name: str, remote: RemoteObject) -> Any:
        def play(*args: Any, **kwargs: Any) -> Any:
            k = self.position
            if not self.live and k < len(self.answers) and self.calls[k][0] == name:
                argbytes = _pickle_args(self.proc, args, kwargs)
                if argbytes is not None and argbytes == self.calls[k][1]:
                    self.position += 1
                    status, payload, changed = self.answers[k]
                    if changed is not None:
                        new = _ReplyUnpickler(io.BytesIO(changed), self.proc).load()
                        _apply_mutation((args, kwargs), new)
                    if status == "raise":
                        _raise_student_exception(*payload, proc=self.proc)
                    return _ReplyUnpickler(io.BytesIO(payload), self.proc).load()
            self.live = True
            return remote(*args, **kwargs)

        return play


@dataclasses.dataclass
class _ReferenceCell:
    """The reference run of one test cell: what it asked of the exercises and how it ended."""

    gid: str
    code: str
    wanted: list[str]
    values: dict[str, tuple]
    calls: list[tuple[str, bytes | None]]
    expected: list[tuple]
    error: str | None
    comparable: bool


@dataclasses.dataclass
class _ReferenceRun:
    """The source notebook run on the tests' side, step by step (see ``split_run``)."""

    steps: list[tuple]
    shortcut: bool


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}".strip().rstrip(":")


def _fresh_namespace() -> dict[str, Any]:
    return {"__name__": "__main__", "__builtins__": builtins}


_SINK = _Discard()


def _run_here(code: str, ns: dict[str, Any], label: str) -> None:
    with contextlib.redirect_stdout(_SINK), contextlib.redirect_stderr(_SINK):
        exec(compile(_transform(code), label, "exec"), ns)


def _mentions(code: str, names: set[str]) -> bool:
    try:
        tree = ast.parse(_transform(code))
    except SyntaxError:
        return True
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(tree))


def _reference_run(source: dict) -> _ReferenceRun:
    """Run the source notebook here, recording each test cell's calls (``_ReferenceCell``)."""
    ns = _fresh_namespace()
    recording = _Recording()
    trusted_names: set[str] = set()
    exercise_names: set[str] = set()
    steps: list[tuple] = []
    shortcut = True

    def locked(code: str) -> None:
        before = set(ns)
        recording.in_locked_cell = True
        with contextlib.suppress(Exception):
            _run_here(code, ns, "<locked cell>")
        recording.in_locked_cell = False
        trusted_names.update(set(ns) - before)

    for cell in source["cells"]:
        if cell.get("cell_type") != "code":
            continue
        code, gid = _source(cell), _grade_id(cell)
        if gid is not None and _is_test(cell):
            wanted = sorted(exercise_names - trusted_names)
            values = {}
            for name in wanted:
                if name not in ns:
                    values[name] = (_MISSING,)
                elif callable(ns[name]):
                    values[name] = (_CALLABLE,)
                else:
                    values[name] = ("data", _plain_bytes(ns[name]))
            replay = _Replay()
            recording.active = replay
            error = None
            try:
                _run_here(code, ns, f"<{gid}>")
            except Exception as exc:
                error = _describe(exc)
            finally:
                recording.active = None
            comparable = (not recording.opaque & set(wanted) and not recording.unrecorded
                          and all(argbytes is not None for _, argbytes in replay.calls))
            steps.append(("test", _ReferenceCell(gid, code, wanted, values, replay.calls,
                                                  replay.expected, error, comparable)))
        elif gid is not None and _is_solution(cell):
            names, imports = _bound_names(code)
            exercise_names.update(names)
            import_code = [ast.unparse(node) for node in imports]
            for line in import_code:
                locked(line)
            with contextlib.suppress(Exception):
                _run_here(code, ns, "<reference solution>")
            for name in names:
                obj = ns.get(name)
                if isinstance(obj, types.FunctionType):
                    ns[name] = recording.wrap(name, obj)
                elif callable(obj):
                    recording.opaque.add(name)
            steps.append(("solution", gid, import_code))
        elif gid is not None and _meta(cell).get("locked"):
            wanted = sorted(exercise_names - trusted_names)
            if _mentions(code, set(wanted)):
                shortcut = False  # a locked cell that uses the answers: run everything for real
            locked(code)
            steps.append(("locked", gid, code, wanted))
        else:  # a cell students may edit, outside nbgrader's marks: student code
            with contextlib.suppress(Exception):
                _run_here(code, ns, "<unmarked cell>")
    return _ReferenceRun(steps, shortcut and not recording.unrecorded)


_REFERENCE_RUNS: dict[str, _ReferenceRun] = {}


def _cached_reference_run(source: dict) -> _ReferenceRun:
    key = _sha256(json.dumps(source, sort_keys=True).encode())
    if key not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[key] = _reference_run(source)
    return _REFERENCE_RUNS[key]


def _same_as_reference(ref: _ReferenceCell, values: dict[str, Any], answers: list) -> bool:
    """Whether the student's values and answers are byte-for-byte the reference's."""
    if not ref.comparable or len(answers) != len(ref.calls):
        return False
    for name in ref.wanted:
        kind = ref.values[name]
        if kind[0] == _MISSING:
            if name in values:
                return False
        elif name not in values:
            return False
        elif kind[0] == _CALLABLE:
            if type(values[name]) is not RemoteObject:
                return False
        elif kind[1] is None or type(values[name]) is RemoteObject or _plain_bytes(
                values[name]) != kind[1]:
            return False
    for got, want in zip(answers, ref.expected, strict=True):
        if type(got) is not tuple or len(got) != 3 or want[1] is None or got != want:
            return False
    return True


def split_run(source: dict, canonical: dict, cwd: Path, cell_timeout: float,
              nbgrader_passed: dict[str, bool]) -> dict[str, SplitVerdict]:
    """Run the tests of ``source`` against the student's cells of ``canonical``, split in two.

    The student's cells (solution cells and cells they added) run in a ``StudentProcess``
    started in ``cwd``; every test cell, with its hidden tests, runs here, in a process that
    never executes student code; locked cells (imports, helpers) run on both sides. The tests
    reach the names the source's solution cells define through the student's process: plain
    data by value, functions and other objects as ``RemoteObject``s.

    To keep this fast, the source notebook is first run here by itself (``_reference_run``,
    once per notebook), recording the calls each test cell makes to the exercises' functions.
    For each test cell the student's process then answers those calls in one round trip. While
    the student's values and answers are byte-for-byte the reference's, running the test cell
    again would repeat the reference run exactly, so its verdict is the reference run's. At the
    first difference, the tests' namespace is rebuilt by replaying the earlier cells with the
    student's (identical) answers, and from then on every test cell runs here for real, its
    calls answered from the student's answers while they match and live after. A test cell
    passes when it raises nothing within its time budget (generous for cells nbgrader passed).
    """
    ref = _cached_reference_run(source)
    steps = {step[1] if step[0] != "test" else step[1].gid: step for step in ref.steps}
    test_of = {sid: e.test_id for e in exercises(source) for sid in e.solution_ids}
    verdicts: dict[str, SplitVerdict] = {}
    history: list[tuple] = []  # what rebuilding the tests' namespace must replay
    # the tests' namespace exists from the start when the shortcut cannot hold, else from the
    # first test cell whose answers differ from the reference's
    namespace: dict[str, Any] | None = None if ref.shortcut else _fresh_namespace()
    proc = StudentProcess(cwd)

    def fetch(wanted: list[str]) -> dict[str, Any]:
        values = proc.request(("get", wanted)) if wanted else {}
        if type(values) is not dict:
            raise StudentProcessGone("the student's process broke the protocol")
        return values

    def bind(ns: dict[str, Any], wanted: list[str], values: dict[str, Any],
             replay: _Replay | None = None) -> None:
        for name in wanted:
            if name not in values:
                ns.pop(name, None)
            elif replay is not None and type(values[name]) is RemoteObject:
                ns[name] = replay.player(name, values[name])
            else:
                ns[name] = values[name]

    def answer(cell: _ReferenceCell, values: dict[str, Any]) -> _Replay:
        replay = _Replay(proc)
        replay.calls = cell.calls
        batch = []
        for name, argbytes in cell.calls:
            if type(values.get(name)) is not RemoteObject or argbytes is None:
                break
            batch.append((values[name]._hid, argbytes))
        if batch:
            replay.answers = proc.request(("batch", batch))
            if type(replay.answers) is not list:
                raise StudentProcessGone("the student's process broke the protocol")
        return replay

    def rebuild() -> dict[str, Any]:
        ns = _fresh_namespace()
        for item in history:
            with contextlib.suppress(Exception):
                if item[0] == "locked":
                    _run_here(item[1], ns, "<locked cell>")
                else:
                    _, cell, values, replay = item
                    replay.position, replay.live = 0, False
                    bind(ns, cell.wanted, values, replay)
                    _run_here(cell.code, ns, f"<{cell.gid}>")
        return ns

    try:
        for cell in canonical["cells"]:
            if cell.get("cell_type") != "code":
                continue
            gid = _grade_id(cell)
            step = steps.get(gid) if gid else None
            kind = step[0] if step else "student"
            if kind == "test":
                ref_cell: _ReferenceCell = step[1]
                budget = 3 * cell_timeout + 10 if nbgrader_passed.get(gid) else min(
                    cell_timeout, 5.0)
                proc.deadline = time.monotonic() + budget
                try:
                    values = fetch(ref_cell.wanted)
                    replay = answer(ref_cell, values)
                    if namespace is None and ref.shortcut and _same_as_reference(
                            ref_cell, values, replay.answers):
                        history.append(("test", ref_cell, values, replay))
                        if ref_cell.error is not None:
                            verdicts[gid] = SplitVerdict(False, ref_cell.error)
                        else:
                            verdicts[gid] = SplitVerdict(True)
                        continue
                    if namespace is None:
                        namespace = rebuild()
                    bind(namespace, ref_cell.wanted, values, replay)
                    _run_here(ref_cell.code, namespace, f"<{gid}>")
                    verdicts[gid] = SplitVerdict(True)
                except Exception as exc:
                    verdicts[gid] = SplitVerdict(False, _describe(exc))
                    if namespace is None:
                        namespace = rebuild()
                continue
            budget = cell_timeout + 2
            if gid in test_of and not nbgrader_passed.get(test_of[gid]):
                budget = min(cell_timeout, 2.0)  # its exercise scores 0 whatever happens here
            proc.deadline = time.monotonic() + budget
            if kind == "locked":
                code, wanted = step[2], step[3]
                with contextlib.suppress(Exception):
                    proc.request(("run", code))
                if namespace is None:
                    history.append(("locked", code))
                    continue
                with contextlib.suppress(Exception):
                    bind(namespace, wanted, fetch(wanted))
                with contextlib.suppress(Exception):
                    _run_here(code, namespace, "<locked cell>")
                continue
            if kind == "solution":
                for line in step[2]:  # the source's own imports, on the tests' side too
                    history.append(("locked", line))
                    if namespace is not None:
                        with contextlib.suppress(Exception):
                            _run_here(line, namespace, "<import>")
            with contextlib.suppress(Exception):
                proc.request(("run", _source(cell)))
    finally:
        proc.close()
    return verdicts


# --------------------------------------------------------------------------------------------
# The grading worker: one submission at a time, in a scratch course outside the course dir.


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def _kill_descendants() -> int:
    """Kill every process this one adopted or started (background processes a submission left)."""
    if not Path("/proc").is_dir():
        return 0
    me, killed = os.getpid(), 0
    for _ in range(5):
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 1 and int(fields[1]) == me and fields[0] != "Z":
                children.append(int(entry))
        if not children:
            break
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
    return killed


def _tree_state(root: Path, skip: Path) -> dict[str, str]:
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and skip not in path.parents:
            try:
                state[str(path.relative_to(root))] = _sha256(path.read_bytes())
            except OSError:
                state[str(path.relative_to(root))] = "unreadable"
    return state


def _truncate_outputs(nb: dict) -> None:
    """Keep outputs readable: at most a few dozen per cell, each at most ~20k characters."""
    for cell in nb.get("cells", []):
        outputs = cell.get("outputs")
        if not isinstance(outputs, list):
            continue
        if len(outputs) > _MAX_OUTPUTS_PER_CELL:
            kept = outputs[:_MAX_OUTPUTS_PER_CELL]
            kept.append({"output_type": "stream", "name": "stdout",
                         "text": f"... {len(outputs) - len(kept)} more outputs removed ...\n"})
            cell["outputs"] = outputs = kept
        for out in outputs:
            if out.get("output_type") == "stream":
                text = _source({"source": out.get("text", "")})
                if len(text) > _MAX_OUTPUT_CHARS:
                    out["text"] = (text[:_MAX_OUTPUT_CHARS] + f"\n... output truncated "
                                   f"({len(text):,} characters) ...\n")
            elif out.get("output_type") in ("display_data", "execute_result"):
                data = out.get("data", {})
                size = len(json.dumps(data))
                if size > 20 * _MAX_OUTPUT_CHARS:
                    out["data"] = {"text/plain": f"[output removed: {size:,} bytes]"}
            elif out.get("output_type") == "error":
                tb = out.get("traceback", [])
                if len(tb) > 60:
                    out["traceback"] = tb[:30] + ["... traceback truncated ..."] + tb[-29:]
                out["traceback"] = [line[:_MAX_OUTPUT_CHARS] for line in out["traceback"]]


def _grade_one(task: dict) -> dict:
    """Autograde one canonical submission in a scratch course, then run the split run."""
    from nbformat import from_dict
    from nbgrader.api import Gradebook, MissingEntry
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import determine_grade
    from traitlets.config.loader import PyFileConfigLoader

    student, stem = task["student"], task["stem"]
    scratch = Path(tempfile.mkdtemp(prefix="qcourse-grade-"))
    private = Path(tempfile.mkdtemp(prefix="qcourse-gradebook-"))
    result: dict[str, Any] = {"student": student, "stem": stem}
    try:
        (scratch / "nbgrader_config.py").write_text(task["config"])
        # nbgrader restores the tests from its gradebook; the source notebook (solutions and
        # hidden tests) stays out of reach of the submission's code, which runs two levels below
        (scratch / "source" / stem).mkdir(parents=True)
        sub_dir = scratch / "submitted" / student / stem
        sub_dir.mkdir(parents=True)
        (sub_dir / f"{stem}.ipynb").write_text(json.dumps(task["canonical"]))
        if task.get("timestamp"):
            (sub_dir / "timestamp.txt").write_text(task["timestamp"])
        db = private / "gradebook.db"
        shutil.copyfile(task["template"], db)
        own = scratch / "autograded" / student / stem
        before = _tree_state(scratch, own)

        cfg = PyFileConfigLoader("nbgrader_config.py", path=str(scratch)).load_config()
        cfg.CourseDirectory.root = str(scratch)
        cfg.CourseDirectory.course_id = task["course_id"]
        cfg.CourseDirectory.db_url = f"sqlite:///{db}"
        cfg.Execute.timeout = int(task["cell_timeout"])
        api = NbGraderAPI(coursedir=CourseDirectory(config=cfg), config=cfg)
        started = time.monotonic()
        outcome = api.autograde(stem, student, force=True, create=True)
        result["seconds_nbgrader"] = round(time.monotonic() - started, 2)
        _kill_descendants()
        result["autograde_success"] = bool(outcome["success"])
        result["autograde_error"] = (outcome.get("error") or "")[-3000:]
        result["log_tail"] = (outcome.get("log") or "")[-3000:]

        graded_path = own / f"{stem}.ipynb"
        notebook_scores: dict[str, float | None] = {}
        gradebook_scores: dict[str, float | None] = {}
        penalty = 0.0
        autograded = None
        if outcome["success"] and graded_path.is_file():
            autograded = json.loads(graded_path.read_text())
            for cell in autograded["cells"]:
                gid = _grade_id(cell)
                if gid in task["points"] and _is_test(cell):
                    notebook_scores[gid] = determine_grade(from_dict(cell))[0]
            with Gradebook(f"sqlite:///{db}", task["course_id"]) as gb:
                for gid in task["points"]:
                    try:
                        gradebook_scores[gid] = gb.find_grade(gid, stem, stem, student).auto_score
                    except MissingEntry:
                        gradebook_scores[gid] = None
                with contextlib.suppress(MissingEntry):
                    snb = gb.find_submission_notebook(stem, stem, student)
                    penalty = float(snb.late_submission_penalty or 0.0)
        result["nbgrader"] = notebook_scores
        result["nbgrader_gradebook"] = gradebook_scores
        result["late_penalty"] = penalty

        passed = {gid: bool(notebook_scores.get(gid)) for gid in task["points"]}
        if any(passed.values()):
            own.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            try:
                verdicts = split_run(task["source"], task["canonical"], own,
                                     float(task["cell_timeout"]), passed)
                result["split"] = {g: dataclasses.asdict(v) for g, v in verdicts.items()}
            except Exception:
                result["split_error"] = traceback.format_exc()[-3000:]
            result["seconds_split"] = round(time.monotonic() - started, 2)
            _kill_descendants()
        after = _tree_state(scratch, own)
        result["tampered"] = sorted(
            path for path in set(before) | set(after) if before.get(path) != after.get(path))
        if autograded is not None:
            _truncate_outputs(autograded)
        result["autograded"] = autograded
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _preflight(kernel_name: str) -> str | None:
    """Check that the kernel nbgrader will start imports this qcourse (None when it does).

    If every student silently scored 0 because the kernel's environment lacks qcourse or numpy,
    nobody would notice; so grading stops first. A kernelspec that runs plain ``python`` runs
    this interpreter (jupyter_client substitutes it); any other gets the import tried with its
    own interpreter, or, failing that, a kernel started and asked.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    import qcourse

    try:
        argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
    except NoSuchKernel:
        return f"there is no Jupyter kernel named {kernel_name!r}"
    pythons = {"python", f"python{sys.version_info[0]}",
               "python{}.{}".format(*sys.version_info[:2]), sys.executable}
    if argv and argv[0] in pythons:
        return None
    probe = "import numpy, qcourse; print(qcourse.__file__)"
    if argv and "ipykernel_launcher" in argv:
        proc = subprocess.run([argv[0], "-c", probe], capture_output=True, text=True,
                              timeout=120, env=_python_env())
        text = proc.stdout.strip() or proc.stderr.strip()[-300:]
    else:
        text = _probe_kernel(kernel_name, probe)
    if text != qcourse.__file__:
        return (f"the kernel {kernel_name!r} cannot import this qcourse ({text!r}); every "
                "student would score 0. Install qcourse into the kernel's environment.")
    return None


def _probe_kernel(kernel_name: str, code: str) -> str:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    lines: list[str] = []
    try:
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)

        def hook(msg: dict) -> None:
            content = msg.get("content", {})
            if msg.get("msg_type") == "stream":
                lines.append(content.get("text", ""))
            elif msg.get("msg_type") == "error":
                lines.append(f"{content.get('ename')}: {content.get('evalue')}")

        kc.execute_interactive(code, timeout=120, output_hook=hook)
        kc.stop_channels()
    except Exception as exc:
        lines.append(f"the kernel did not start: {exc}")
    finally:
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=True)
    return "".join(lines).strip()


def _worker_main() -> None:
    """A grading worker: reads tasks (JSON lines) on stdin, answers on its original stdout."""
    import warnings

    warnings.simplefilter("ignore")
    _die_with_parent()
    _become_subreaper()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    import nbgrader.apps  # noqa: F401 - load nbgrader before any student code runs

    import qcourse  # noqa: F401 - the tests' copy of the library, loaded before student code

    while True:
        line = sys.stdin.readline()
        if not line:
            break
        task = json.loads(line)
        if task.get("op") == "preflight":
            reply = {"problem": _preflight(task["kernel"])}
        else:
            try:
                reply = _grade_one(task)
            except Exception:
                reply = {"worker_error": traceback.format_exc()[-3000:]}
            _kill_descendants()
        out.write(json.dumps(reply) + "\n")


def _batch_main() -> None:
    """Run nbgrader operations (JSON job on stdin) through its API; print results as JSON."""
    import warnings

    warnings.simplefilter("ignore")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    job = json.loads(sys.stdin.read())
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    course = Path(job["course"])
    os.chdir(course)
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    cfg.CourseDirectory.root = str(course)
    cfg.merge(Config(job.get("overrides", {})))
    api = NbGraderAPI(coursedir=CourseDirectory(config=cfg), config=cfg)
    results = []
    for op, *args in job["ops"]:
        if op == "generate_assignment":
            r = api.generate_assignment(args[0], force=True, create=True)
        elif op == "generate_feedback":
            r = api.generate_feedback(args[0], force=True)
        else:
            r = {"success": False, "error": f"unknown operation {op}"}
        results.append({k: r.get(k) for k in ("success", "error", "log")})
    out.write(json.dumps({"results": results}) + "\n")
    out.flush()


# --------------------------------------------------------------------------------------------
# The parent: schedule, merge into the gradebook, feedback, export.


class _Protected:
    """Files the grading run must find unchanged; restored (and reported) when they are not."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[bytes, tuple]] = {}

    @staticmethod
    def _stat(path: Path) -> tuple:
        try:
            st = path.stat()
        except OSError:
            return ()
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def add(self, path: Path) -> None:
        path = Path(path)
        if path.is_file():
            self.files[path] = (path.read_bytes(), self._stat(path))

    def add_tree(self, root: Path, patterns: Iterable[str] = ("*",)) -> None:
        for pattern in patterns:
            for path in sorted(Path(root).rglob(pattern)):
                if path.is_file() and "__pycache__" not in path.parts:
                    self.add(path)

    def changed(self) -> list[Path]:
        return [p for p, (_, stat) in self.files.items() if self._stat(p) != stat]

    def restore(self, paths: Iterable[Path]) -> None:
        for path in paths:
            data = self.files[path][0]
            if path.is_file() and path.read_bytes() == data:
                self.files[path] = (data, self._stat(path))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.restore")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.files[path] = (data, self._stat(path))


class _WorkerSlot:
    """One grading worker process and the thread that feeds it tasks."""

    def __init__(self, index: int, results: queue.Queue, kernel: str) -> None:
        self.index = index
        self.results = results
        self.kernel = kernel
        self.tasks: queue.Queue = queue.Queue()
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _start(self) -> str | None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qcourse.grading", "_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_python_env(),
            start_new_session=True, cwd=tempfile.gettempdir())
        reply = self._ask({"op": "preflight", "kernel": self.kernel}, 300)
        if reply is None:
            return "a grading worker died while starting"
        return reply.get("problem")

    def _ask(self, task: dict, timeout: float) -> dict | None:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        timer = threading.Timer(timeout, self.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (OSError, ValueError):
            line = ""
        finally:
            timer.cancel()
        if not line:
            self.kill()
            return None
        return json.loads(line)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def _loop(self) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                self.kill()
                return
            task, hard_timeout = item
            if self.proc is None or self.proc.poll() is not None:
                problem = self._start()
                if problem:
                    self.results.put((self.index, task, {"fatal": problem}))
                    continue
            started = time.monotonic()
            reply = self._ask(task, hard_timeout)
            if reply is None:
                elapsed = time.monotonic() - started
                why = ("grading took longer than the hard limit of "
                       f"{hard_timeout:.0f} s and was stopped" if elapsed >= hard_timeout - 1
                       else "the grading process died while running this submission (the "
                       "submission may have killed it)")
                reply = {"student": task["student"], "stem": task["stem"], "grader_died": why}
            self.results.put((self.index, task, reply))


@dataclasses.dataclass
class CellResult:
    """The score of one test cell, with the two verdicts it combines."""

    grade_id: str
    points: float
    nbgrader: float | None
    split: bool | None
    score: float
    note: str = ""


@dataclasses.dataclass
class SubmissionResult:
    """The grade of one submission and how it came about."""

    student: str
    stem: str
    file: str
    status: str
    flagged: bool
    cells: list[CellResult]
    notes: list[str]

    @property
    def score(self) -> float:
        return sum(c.score for c in self.cells)

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.cells)

    @property
    def nbgrader_score(self) -> float:
        return sum(c.nbgrader or 0.0 for c in self.cells)


@dataclasses.dataclass
class GradingReport:
    """Everything ``grade`` did: one result per submission and every file it did not grade."""

    course_dir: Path
    results: list[SubmissionResult]
    ignored: list[tuple[str, str]]

    def result(self, student: str, stem: str) -> SubmissionResult:
        for r in self.results:
            if (r.student, r.stem) == (student, stem):
                return r
        raise KeyError((student, stem))

    def table(self) -> str:
        rows = [f"{'student':<18}{'assignment':<14}{'score':>7}{'max':>6}{'nbgrader':>10}  status"]
        for r in self.results:
            status = r.status + (" (flagged)" if r.flagged and r.status == "graded" else "")
            rows.append(f"{r.student:<18}{r.stem:<14}{r.score:>7g}{r.max_score:>6g}"
                        f"{r.nbgrader_score:>10g}  {status}")
        for path, reason in self.ignored:
            rows.append(f"  not graded: {path}: {reason}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {
            "course_dir": str(self.course_dir),
            "submissions": [dataclasses.asdict(r) | {"score": r.score, "max_score": r.max_score}
                            for r in self.results],
            "ignored": [{"path": p, "reason": why} for p, why in self.ignored],
        }


def _combine(task: dict, reply: dict, notes: list[str]) -> SubmissionResult:
    """Turn a worker's reply into scores: s_c = p_c [nbgrader passes c] [split run passes c]."""
    points: dict[str, float] = task["points"]
    notes = list(notes)
    flagged = not task["readable"]
    status = "graded" if task["readable"] else "unreadable"
    ng: dict[str, Any] = reply.get("nbgrader") or {}
    ng_db: dict[str, Any] = reply.get("nbgrader_gradebook") or {}
    split = reply.get("split")
    cells: list[CellResult] = []
    failure = reply.get("grader_died") or reply.get("worker_error")
    if failure:
        status, flagged = "failed", True
        notes.append(f"Grading failed: {failure.strip().splitlines()[-1]} Every cell scores 0.")
    elif not reply.get("autograde_success"):
        status, flagged = "failed", True
        last = (reply.get("autograde_error") or "").strip().splitlines()[-1:] or ["?"]
        notes.append("nbgrader could not grade the notebook (did the code kill its kernel?): "
                     f"{last[0][:300]} Every cell scores 0.")
    tampered = reply.get("tampered") or []
    if tampered and not failure:
        status, flagged = "tampered", True
        notes.append("The code wrote files outside its own folder ("
                     + ", ".join(tampered[:5]) + ("..." if len(tampered) > 5 else "")
                     + "); grading infrastructure is off limits. Every cell scores 0.")
    if reply.get("split_error"):
        flagged = True
        notes.append("The split run could not run; the scores are nbgrader's alone.")
    for gid, pts in points.items():
        nb_score = ng.get(gid)
        if gid in ng_db and ng_db[gid] != nb_score:
            flagged = True
            nb_score = min(nb_score or 0.0, ng_db[gid] or 0.0)
            notes.append(f"{gid}: the gradebook and the notebook disagree; the lower is used.")
        note = ""
        verdict = None
        if isinstance(split, dict) and gid in split:
            verdict = bool(split[gid]["passed"])
        score = float(nb_score or 0.0)
        if status in ("failed", "tampered"):
            score = 0.0
        elif score > 0 and verdict is False:
            note = ("passed in the student's kernel but failed when the tests ran in a separate "
                    f"process ({split[gid]['message']}): the code changes what the tests see")
            flagged = True
            score = 0.0
        elif score > 0 and verdict is None and split is not None:
            note = "the split run did not reach this cell"
            flagged = True
            score = 0.0
        cells.append(CellResult(gid, pts, nb_score, verdict, min(score, pts), note))
    for cell in cells:
        if cell.note:
            notes.append(f"{cell.grade_id}: {cell.note}; score set to 0.")
    return SubmissionResult(task["student"], task["stem"], task["file"], status, flagged, cells,
                            notes)


def _hard_timeout(source: dict, cell_timeout: float) -> float:
    n_code = sum(c.get("cell_type") == "code" for c in source["cells"])
    n_test = len(exercises(source))
    return 120 + cell_timeout * (2 * n_code + 4 * n_test)


def _quiet_gradebook(db_url: str) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nbgrader.api import Gradebook

        return Gradebook(db_url, COURSE_ID)


@contextlib.contextmanager
def _no_warnings() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _make_template(course: Path, target: Path) -> None:
    """A copy of the course gradebook with its assignments and no students."""
    with contextlib.closing(sqlite3.connect(course / "gradebook.db")) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    with _no_warnings(), _quiet_gradebook(f"sqlite:///{target}") as gb:
        for student in [s.id for s in gb.students]:
            gb.remove_student(student)


def _merge(course: Path, result: SubmissionResult, task: dict, reply: dict) -> None:
    """Write one result into the course gradebook (and its autograded notebook to disk)."""
    from nbgrader.api import MissingEntry

    student, stem = result.student, result.stem
    autograded = reply.get("autograded")
    target = course / "autograded" / student / stem / f"{stem}.ipynb"
    if autograded is not None:
        if result.notes:
            autograded["cells"].insert(0, _note_cell(result.notes))
        for cell in autograded["cells"]:
            if _is_test(cell):
                gid = _grade_id(cell)
                for c in result.cells:
                    if c.grade_id == gid and c.note:
                        cell.setdefault("outputs", []).append({
                            "output_type": "stream", "name": "stdout",
                            "text": f"[grader] {c.note}; score set to 0.\n"})
        _write_json_atomic(target, autograded)
    else:
        blank = copy.deepcopy(task["canonical"])
        blank["cells"].insert(0, _note_cell(result.notes or ["This submission was not graded."]))
        _write_json_atomic(target, blank)
    comments = {}
    for ex in exercises(task["source"]):
        cell = next(c for c in result.cells if c.grade_id == ex.test_id)
        for sid in ex.solution_ids:
            comments[sid] = None
        if cell.note and ex.solution_ids:
            comments[ex.solution_ids[0]] = f"{cell.note}; score set to 0."
    unchanged = set(task.get("unanswered", []))
    with _no_warnings(), _quiet_gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        gb.update_or_create_student(student)
        kwargs = {"timestamp": task["timestamp"]} if task.get("timestamp") else {}
        gb.update_or_create_submission(stem, student, **kwargs)
        for cell in result.cells:
            grade = gb.find_grade(cell.grade_id, stem, stem, student)
            grade.auto_score = cell.score
            grade.needs_manual_grade = grade.manual_score is not None
        for sid, text in comments.items():
            with contextlib.suppress(MissingEntry):
                comment = gb.find_comment(sid, stem, stem, student)
                comment.auto_comment = text or ("No response." if sid in unchanged else None)
        snb = gb.find_submission_notebook(stem, stem, student)
        snb.flagged = result.flagged
        snb.late_submission_penalty = float(reply.get("late_penalty") or 0.0)
        gb.db.commit()


def _export_csv(course: Path) -> Path:
    from nbgrader.plugins import CsvExportPlugin

    path = course / "grades.csv"
    tmp = course / ".grades.csv.tmp"
    with _no_warnings(), _quiet_gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        CsvExportPlugin(to=str(tmp)).export(gb)
    os.replace(tmp, path)
    return path


def _lock(course: Path) -> Any:
    handle = open(course / _STATE_DIR / "lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        handle.close()
        raise GradingError(f"another grading run is using {course}") from None
    return handle


def grade(submissions_dir: str | os.PathLike, course_dir: str | os.PathLike = DEFAULT_COURSE_DIR,
          *, jobs: int = 2, cell_timeout: float = 30, feedback: bool = True,
          progress: Any = None) -> GradingReport:
    """Autograde every submission in ``submissions_dir`` into the course's gradebook.

    For each submission (``find_submissions``): rebuild it from the release
    (``canonical_submission``), run ``nbgrader autograde`` on it in a scratch course outside the
    course directory (``cell_timeout`` seconds per cell), run the split run on the cells nbgrader
    passed, and score test cell :math:`c` as
    :math:`s_c = p_c\\,[\\text{nbgrader passes } c]\\,[\\text{split run passes } c]`. Scores,
    comments and flags go into ``COURSE/gradebook.db`` as each submission finishes, through
    nbgrader's update-or-create calls, so a crash loses nothing already graded and grading again
    replaces rather than adds; then
    ``nbgrader generate_feedback`` writes ``COURSE/feedback/STUDENT/STEM/STEM.html`` and the
    gradebook is exported to ``COURSE/grades.csv`` (nbgrader's CSV) and
    ``COURSE/grades_by_cell.csv``; ``COURSE/grading-report.json`` records every submission and
    every file that was not graded. See the grading chapter.
    """
    course = Path(course_dir).resolve()
    manifest = _load_course(course)
    stems = sorted(manifest["assignments"])
    subs, ignored = find_submissions(submissions_dir, stems)
    (course / _STATE_DIR).mkdir(exist_ok=True)
    lock = _lock(course)
    log = progress or (lambda message: None)
    slots: list[_WorkerSlot] = []
    work = Path(tempfile.mkdtemp(prefix="qcourse-template-"))
    try:
        config_text = (course / "nbgrader_config.py").read_text()
        sources = {s: _read_json(course / "source" / s / f"{s}.ipynb") for s in stems}
        releases = {s: _read_json(course / "release" / s / f"{s}.ipynb") for s in stems}
        template = work / "template.db"
        _make_template(course, template)
        protected = _Protected()
        protected.add(course / "nbgrader_config.py")
        protected.add(course / "release.json")
        for kind in ("source", "release"):
            protected.add_tree(course / kind)

        tasks = []
        for sub in subs:
            canonical, notes, readable = canonical_submission(releases[sub.stem], sub.data)
            copy_to = course / "submitted" / sub.student / sub.stem / f"{sub.stem}.ipynb"
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            copy_to.write_bytes(sub.data)
            protected.add(copy_to)
            release_src = {_grade_id(c): _source(c) for c in releases[sub.stem]["cells"]}
            unanswered = [_grade_id(c) for c in canonical["cells"] if _is_solution(c)
                          and _source(c) == release_src.get(_grade_id(c))]
            tasks.append({
                "student": sub.student, "stem": sub.stem, "file": str(sub.path),
                "course_id": manifest.get("course_id", COURSE_ID), "config": config_text,
                "source": sources[sub.stem], "canonical": canonical, "notes": notes,
                "readable": readable, "timestamp": sub.timestamp, "template": str(template),
                "points": manifest["assignments"][sub.stem]["points"],
                "cell_timeout": cell_timeout, "unanswered": unanswered,
            })
        results: dict[tuple[str, str], SubmissionResult] = {}
        if tasks:
            kernel = sources[stems[0]].get("metadata", {}).get("kernelspec", {}).get(
                "name", "python3")
            answers: queue.Queue = queue.Queue()
            slots = [_WorkerSlot(i, answers, kernel) for i in range(max(1, min(jobs, len(tasks))))]
            pending = deque(range(len(tasks)))
            solo: deque[int] = deque()  # suspects of tampering, re-graded one at a time
            running: dict[int, int] = {}
            suspects: set[int] = set()
            alone: int | None = None  # the task running by itself, if any
            idle = list(range(len(slots)))
            db_path = course / "gradebook.db"
            db_state = _Protected._stat(db_path)

            def dispatch(i: int) -> None:
                slot = idle.pop()
                running[i] = slot
                sent = {k: v for k, v in tasks[i].items()
                        if k not in ("notes", "file", "readable", "unanswered")}
                slots[slot].tasks.put((sent | {"id": i},
                                       _hard_timeout(sources[tasks[i]["stem"]], cell_timeout)))

            while pending or solo or running:
                if solo:
                    if not running:
                        alone = solo.popleft()
                        dispatch(alone)
                else:
                    while pending and idle:
                        dispatch(pending.popleft())
                slot, sent, reply = answers.get()
                i = sent["id"]
                idle.append(slot)
                running.pop(i, None)
                if "fatal" in reply:
                    raise GradingError(reply["fatal"])
                if _Protected._stat(db_path) != db_state:
                    raise GradingError(f"{db_path} was modified by another process during "
                                       "grading; restore it from a backup and grade again")
                changed = protected.changed()
                if changed:
                    protected.restore(changed)
                    if i == alone:  # it ran by itself: it is the one that wrote there
                        reply = dict(reply, tampered=sorted(
                            [*(reply.get("tampered") or []),
                             *(str(p.relative_to(course)) for p in changed)]))
                    else:
                        suspects.update([i, *running])
                        solo.append(i)
                        continue
                elif i in suspects and i != alone:
                    solo.append(i)
                    continue
                if i == alone:
                    alone = None
                task = tasks[i]
                result = _combine(task, reply, task["notes"])
                _merge(course, result, task, reply)
                db_state = _Protected._stat(db_path)
                protected.add(course / "autograded" / task["student"] / task["stem"]
                              / f"{task['stem']}.ipynb")
                results[task["student"], task["stem"]] = result
                log(f"graded {task['student']}/{task['stem']}: {result.score:g}/"
                    f"{result.max_score:g} ({result.status}; nbgrader "
                    f"{reply.get('seconds_nbgrader', 0):.1f} s, split run "
                    f"{reply.get('seconds_split', 0):.1f} s)")
        for slot in slots:
            slot.tasks.put(None)
        ordered = [results[s.student, s.stem] for s in subs]
        graded_stems = sorted({r.stem for r in ordered})
        if feedback and graded_stems:
            groups = [graded_stems[k::max(1, jobs)] for k in range(max(1, jobs))]
            with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
                runs = [pool.submit(_run_batch, course, [["generate_feedback", s] for s in g])
                        for g in groups if g]
                for run in runs:
                    run.result()
        report = GradingReport(course, ordered, ignored)
        _export_csv(course)
        with open(course / ".grades_by_cell.csv.tmp", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["student_id", "assignment", "grade_id", "points", "nbgrader",
                             "split_run", "score", "status", "flagged"])
            for r in ordered:
                for c in r.cells:
                    writer.writerow([r.student, r.stem, c.grade_id, f"{c.points:g}",
                                     "" if c.nbgrader is None else f"{c.nbgrader:g}",
                                     "" if c.split is None else ("pass" if c.split else "fail"),
                                     f"{c.score:g}", r.status, int(r.flagged)])
        os.replace(course / ".grades_by_cell.csv.tmp", course / "grades_by_cell.csv")
        _write_json_atomic(course / "grading-report.json", report.to_json())
        return report
    finally:
        for slot in slots:
            slot.tasks.put(None)
            slot.kill()
        shutil.rmtree(work, ignore_errors=True)
        lock.close()


# --------------------------------------------------------------------------------------------
# Feedback without hidden tests.


def _sanitize_feedback_class() -> type:
    from nbgrader.preprocessors import NbGraderPreprocessor

    class SanitizeFeedback(NbGraderPreprocessor):
        """Feedback preprocessor: remove hidden tests and their tracebacks from graded cells.

        A graded cell keeps its public checks and a note where the hidden tests ran; an error in
        it is shown as ``ExceptionName: message`` only, since a traceback would quote the hidden
        test that raised it.
        """

        def preprocess_cell(self, cell: Any, resources: Any, index: int) -> tuple:
            if _is_test(cell):
                src = cell.source
                if HIDDEN_BEGIN in src:
                    lines, depth, out = src.splitlines(), 0, []
                    for line in lines:
                        if HIDDEN_BEGIN in line:
                            if depth == 0:
                                out.append("# (hidden tests ran here; they are not shown)")
                            depth += 1
                        elif HIDDEN_END in line:
                            depth = max(depth - 1, 0)
                        elif not depth:
                            out.append(line)
                    cell.source = "\n".join(out)
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "error":
                        output["traceback"] = [f"{output.get('ename')}: {output.get('evalue')}"]
            return cell, resources

    return SanitizeFeedback


def __getattr__(name: str) -> Any:
    if name == "SanitizeFeedback":
        cls = _sanitize_feedback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# The drill: submissions with known right answers, to prove a grading setup.


@dataclasses.dataclass
class DrillCase:
    """A submission built to test the grader, and the score each test cell must get."""

    name: str
    description: str
    content: str
    expected: dict[str, float]
    fools_nbgrader: bool = False


def _with_cells(nb: dict, cells: list[dict]) -> str:
    out = {k: v for k, v in nb.items() if k != "cells"}
    out["cells"] = cells
    return json.dumps(out, indent=1)


def drill_submissions(source: dict, release_nb: dict) -> list[DrillCase]:
    """Submissions that probe a grader, for any exercise notebook, with their expected scores.

    ``source`` and ``release_nb`` are the notebook and its student release (JSON dicts). The
    cases: the solution, the blank release, a partly solved notebook (odd exercises), a cell that
    raises, an infinite loop, huge output, deleted and duplicated cells, edited tests and
    metadata, a redefined ``AssertionError``, an IPython hook that empties every later cell,
    objects that compare equal to anything, solution cells retagged as graded cells, writes
    outside the submission's folder, code that looks for the solutions there, a file that is not
    JSON, code that kills its kernel, and code that kills the grading process.
    """
    exs = exercises(source)
    points = {e.test_id: e.points for e in exs}
    full = dict(points)
    zero = dict.fromkeys(points, 0.0)
    src_cells = {_grade_id(c): c for c in source["cells"] if _grade_id(c)}
    rel_cells = [copy.deepcopy(c) for c in release_nb["cells"]]

    def solved(which: set[str] | None = None) -> list[dict]:
        """The release with the source's solution cells of exercises ``which`` (None: all)."""
        chosen = {sid for e in exs if which is None or e.test_id in which
                  for sid in e.solution_ids}
        cells = copy.deepcopy(rel_cells)
        for cell in cells:
            if _grade_id(cell) in chosen:
                cell["source"] = _source(src_cells[_grade_id(cell)])
        return cells

    def exercise_at(k: int) -> Exercise:
        return exs[min(k, len(exs) - 1)]

    def first_solution_cell(cells: list[dict], ex: Exercise) -> dict:
        return next(c for c in cells if _grade_id(c) == ex.solution_ids[0])

    def prepend(cells: list[dict], ex: Exercise, code: str) -> list[dict]:
        cell = first_solution_cell(cells, ex)
        cell["source"] = code + "\n" + _source(cell)
        return cells

    def all_but(*dropped: Exercise) -> dict[str, float]:
        return {g: (0.0 if g in {e.test_id for e in dropped} else p) for g, p in points.items()}

    def after_imports(cells: list[dict], code: str) -> list[dict]:
        first_sol = next(k for k, c in enumerate(cells) if _is_solution(c))
        cells.insert(first_sol, {"cell_type": "code", "execution_count": None, "metadata": {},
                                 "outputs": [], "source": code})
        return cells

    odd = {e.test_id for e in exs if e.number % 2 == 1}
    cases = [
        DrillCase("solution", "the source notebook itself, solutions and all",
                  _with_cells(release_nb, solved()), full),
        DrillCase("blank", "the student release, unchanged", _with_cells(release_nb, rel_cells),
                  zero),
        DrillCase("partial", "odd-numbered exercises solved, the others left blank",
                  _with_cells(release_nb, solved(odd)),
                  {g: (p if g in odd else 0.0) for g, p in points.items()}),
    ]
    ex_a, ex_b = exercise_at(1), exercise_at(2)
    cases.append(DrillCase(
        "raises", f"exercise {ex_a.number}'s cell raises before defining anything",
        _with_cells(release_nb, prepend(solved(), ex_a, "raise RuntimeError('oops')")),
        all_but(ex_a)))
    cases.append(DrillCase(
        "infinite-loop", f"exercise {ex_b.number}'s cell never finishes (per-cell timeout)",
        _with_cells(release_nb, prepend(solved(), ex_b, "while True:\n    pass")),
        all_but(ex_b)))
    cases.append(DrillCase(
        "huge-output", "solved, but prints 20 MB in one line and 200,000 short lines",
        _with_cells(release_nb, prepend(solved(), exs[0], (
            "print('x' * 20_000_000)\nfor _i in range(200_000):\n    print(_i)"))), full))
    cells = [c for c in solved() if not _is_test(c)]
    cases.append(DrillCase("deleted-cells", "solved, with every test cell deleted",
                           _with_cells(release_nb, cells), full))
    cells = solved()
    dup = []
    for cell in cells:
        if _is_test(cell):
            fake = copy.deepcopy(cell)
            fake["source"] = "pass"
            dup.append(fake)
        dup.append(cell)
        if _grade_id(cell) == exs[0].solution_ids[-1]:
            stub = copy.deepcopy(next(c for c in rel_cells if _grade_id(c) == _grade_id(cell)))
            dup.append(stub)
    cases.append(DrillCase(
        "duplicated-cells", "solved; each test cell has an emptied copy before it, and exercise "
        f"{exs[0].number}'s solution cell a blank copy after it (the last copy counts)",
        _with_cells(release_nb, dup), all_but(exs[0])))
    cells = copy.deepcopy(rel_cells)
    for cell in cells:
        if _is_test(cell):
            cell["source"] = "pass"
            cell["metadata"]["nbgrader"].update(points=100, locked=False)
            cell["metadata"]["editable"] = True
    cases.append(DrillCase("edited-tests", "blank, with every test replaced by `pass`, unlocked "
                           "and worth 100 points", _with_cells(release_nb, cells), zero))
    cells = solved()
    for cell in cells:
        if _is_solution(cell):
            cell["metadata"]["nbgrader"].update(grade=True, points=50)
    cases.append(DrillCase("retagged-cells", "solved, with every solution cell marked as a "
                           "graded cell worth 50 points (nbgrader alone cannot grade it)",
                           _with_cells(release_nb, cells), full))
    cells = solved({e.test_id for e in exs[1:]})
    wrong = "\n".join(f"{n} = lambda *args, **kwargs: None" for n in sorted(
        {n for sid in exs[0].solution_ids for n in _bound_names(_source(src_cells[sid]))[0]}))
    first_solution_cell(cells, exs[0])["source"] = wrong
    cases.append(DrillCase(
        "redefined-assert", f"solved except exercise {exs[0].number} (answers that return None), "
        "with AssertionError redefined in builtins and in the notebook",
        _with_cells(release_nb, after_imports(cells, (
            "import builtins\n\n\nclass AssertionError(Exception):\n    pass\n\n\n"
            "builtins.AssertionError = AssertionError"))), all_but(exs[0])))
    cases.append(DrillCase(
        "silenced-tests", "blank, plus an IPython input transformer that empties every later "
        "cell, tests included", _with_cells(release_nb, after_imports(
            copy.deepcopy(rel_cells),
            "get_ipython().input_transformers_post.append(lambda lines: [])")), zero,
        fools_nbgrader=True))
    names = sorted({n for e in exs for sid in e.solution_ids
                    for n in _bound_names(_source(src_cells[sid]))[0]})
    everything = textwrap.dedent("""\
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
    cells = copy.deepcopy(rel_cells)
    for ex in exs:
        cell = first_solution_cell(cells, ex)
        bound = sorted({n for sid in ex.solution_ids
                        for n in _bound_names(_source(src_cells[sid]))[0]})
        cell["source"] = (everything if ex is exs[0] else "") + "\n".join(
            f"{n} = Anything()" for n in bound)
        for sid in ex.solution_ids[1:]:
            next(c for c in cells if _grade_id(c) == sid)["source"] = ""
    cases.append(DrillCase("anything-objects", "every answer (" + ", ".join(names) + ") is an "
                           "object that equals anything and returns itself when called",
                           _with_cells(release_nb, cells), zero))
    writes = textwrap.dedent("""\
        from pathlib import Path

        _course = Path("../../..")
        for _path in [_course / "gradebook.db", _course / "nbgrader_config.py",
                      *_course.glob("source/*/*.ipynb"), Path("../../someone_else/notes.txt")]:
            _path.parent.mkdir(parents=True, exist_ok=True)
            _path.write_text("overwritten by a submission")
        """)
    cases.append(DrillCase(
        "writes-outside", "solved, but writes into the course above its own folder",
        _with_cells(release_nb, after_imports(solved(), writes)), zero))
    steal = textwrap.dedent("""\
        import json
        import pathlib

        for _nb in pathlib.Path("../../..").glob("source/*/*.ipynb"):
            for _cell in json.loads(_nb.read_text())["cells"]:
                if _cell["metadata"].get("nbgrader", {}).get("grade_id") == GRADE_ID:
                    exec("".join(_cell["source"]))
        """)
    cells = copy.deepcopy(rel_cells)
    for cell in cells:
        if _is_solution(cell):
            cell["source"] = steal.replace("GRADE_ID", repr(_grade_id(cell)))
    cases.append(DrillCase(
        "reads-solutions", "every solution cell looks for the course's source notebook above its "
        "folder and runs the solution it finds there", _with_cells(release_nb, cells), zero))
    cases.append(DrillCase("not-json", "a file that is not JSON", "{\"cells\": [oops", zero))
    cases.append(DrillCase(
        "kills-kernel", f"solved, but exercise {ex_a.number}'s cell ends its own process",
        _with_cells(release_nb, prepend(solved(), ex_a, "import os\n\nos._exit(1)")), zero))
    cases.append(DrillCase(
        "kills-grader", "solved, but kills the process that started its kernel",
        _with_cells(release_nb, after_imports(
            solved(), "import os\nimport signal\n\nos.kill(os.getppid(), signal.SIGKILL)")),
        zero))
    return cases


def drill(course_dir: str | os.PathLike, *, notebooks_dir: str | os.PathLike | None = None,
          stems: Iterable[str] | None = None, cases: Iterable[str] | None = None,
          jobs: int = 2, cell_timeout: float = 10, progress: Any = None
          ) -> tuple[GradingReport, list[dict]]:
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
        src = _read_json(course / "source" / stem / f"{stem}.ipynb")
        rls = _read_json(course / "release" / stem / f"{stem}.ipynb")
        for case in drill_submissions(src, rls):
            if wanted is not None and case.name not in wanted:
                continue
            path = subs / case.name / f"{stem}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(case.content)
            expected[case.name, stem] = case
    report = grade(subs, course, jobs=jobs, cell_timeout=cell_timeout, progress=progress)
    rows = []
    for r in report.results:
        case = expected[r.student, r.stem]
        got = {c.grade_id: c.score for c in r.cells}
        rows.append({"case": r.student, "assignment": r.stem, "expected": sum(
            case.expected.values()), "nbgrader": r.nbgrader_score, "score": r.score,
            "status": r.status, "ok": got == case.expected})
    return report, rows


# --------------------------------------------------------------------------------------------
# The self-study edition: solutions behind toggles in the HTML book.

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


def _fence(code: str, tags: list[str] | None = None) -> str:
    ticks = "```"
    while ticks in code:
        ticks += "`"
    head = f"{ticks}{{code-cell}} ipython3\n"
    if tags:
        head += f":tags: [{', '.join(tags)}]\n\n"
    return f"{head}{code.rstrip()}\n{ticks}\n"


def _strip_markers(code: str) -> str:
    lines = [line for line in code.splitlines()
             if SOLUTION_BEGIN not in line and SOLUTION_END not in line]
    return textwrap.dedent("\n".join(lines)).strip("\n")


def self_study_page(notebook: dict, stem: str) -> str:
    """A MyST notebook page of an exercise notebook with each solution behind a toggle.

    Task text and locked code are shown as they are; each solution cell becomes a code cell
    tagged ``hide-input`` (the HTML book shows a "show code" toggle); each test cell shows its
    public checks, and runs its hidden tests in a ``remove-cell`` cell, so building the page
    checks the solution without showing the hidden tests. The page gets the label
    ``self-study-STEM``.
    """
    parts = [_MYST_HEADER, f"\n(self-study-{stem})=\n"]
    title_done = False
    for cell in notebook["cells"]:
        src = _source(cell)
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
            if _is_solution(cell):
                parts.append("\n" + _fence(_strip_markers(src), ["hide-input"]))
            elif _is_test(cell):
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
        page = self_study_page(_read_json(path), path.stem)
        if not target.is_file() or target.read_text() != page:
            target.write_text(page)
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------
# The command line.


def main(argv: list[str] | None = None) -> int:
    """``qcourse-course``: release, grade, drill and self-study pages (see ``--help``)."""
    argv = sys.argv[1:] if argv is None else argv
    internal = {"_student": _student_main, "_worker": _worker_main,
                "_nbgrader-batch": _batch_main}
    _fast_nbformat()
    if argv and argv[0] in internal:
        internal[argv[0]]()
        return 0
    parser = argparse.ArgumentParser(
        prog="qcourse-course", description="Release and grade the qcourse exercises with nbgrader.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_rel = sub.add_parser("release", help="make the student version of every exercise notebook")
    p_rel.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_rel.add_argument("--notebooks", default=None, help="exercise notebooks (default notebooks/)")
    p_rel.add_argument("--stems", default=None, help="comma-separated chapter stems (default all)")
    p_rel.add_argument("--student-dir", default=None,
                       help="also copy the student notebooks here, flat (e.g. for Binder)")
    p_gr = sub.add_parser("grade", help="autograde a folder of submissions")
    p_gr.add_argument("submissions", help="folder with STUDENT/STEM.ipynb files")
    p_gr.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_gr.add_argument("--jobs", type=int, default=2, help="submissions graded at once")
    p_gr.add_argument("--timeout", type=float, default=30, help="seconds per cell")
    p_gr.add_argument("--no-feedback", action="store_true", help="skip feedback HTML")
    p_dr = sub.add_parser("drill", help="grade submissions with known scores, to test a setup")
    p_dr.add_argument("--course", default="_build/drill", help="scratch course directory")
    p_dr.add_argument("--notebooks", default=None)
    p_dr.add_argument("--stems", default=None)
    p_dr.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    p_dr.add_argument("--jobs", type=int, default=2)
    p_dr.add_argument("--timeout", type=float, default=10)
    p_ss = sub.add_parser("self-study", help="write MyST pages with solutions behind toggles")
    p_ss.add_argument("notebooks", nargs="+", help="exercise notebooks")
    p_ss.add_argument("--out", required=True, help="output directory")
    for p in (p_gr, p_dr):
        p.add_argument("-v", "--verbose", action="store_true", help="report each submission")
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)

    def progress(message: str) -> None:
        if args.verbose:
            print(message, file=sys.stderr, flush=True)

    def split(value: str | None) -> list[str] | None:
        return [s for s in value.split(",") if s] if value else None

    try:
        if args.command == "release":
            rep = release(args.course, notebooks_dir=args.notebooks, stems=split(args.stems),
                          student_dir=args.student_dir)
            print(f"released {len(rep.stems)} assignment(s) into {rep.course_dir}")
            print(rep.table())
            if args.student_dir:
                print(f"student notebooks copied to {args.student_dir}")
        elif args.command == "grade":
            rep = grade(args.submissions, args.course, jobs=args.jobs, cell_timeout=args.timeout,
                        feedback=not args.no_feedback, progress=progress)
            print(rep.table())
            print(f"gradebook: {rep.course_dir / 'gradebook.db'}")
            print(f"grades:    {rep.course_dir / 'grades.csv'} and grades_by_cell.csv")
            if not args.no_feedback:
                print(f"feedback:  {rep.course_dir / 'feedback'}")
        elif args.command == "drill":
            _, rows = drill(args.course, notebooks_dir=args.notebooks, stems=split(args.stems),
                            cases=split(args.cases), jobs=args.jobs, cell_timeout=args.timeout,
                            progress=progress)
            print(f"{'case':<18}{'assignment':<14}{'expected':>9}{'nbgrader':>9}{'score':>7}  ok")
            for row in rows:
                print(f"{row['case']:<18}{row['assignment']:<14}{row['expected']:>9g}"
                      f"{row['nbgrader']:>9g}{row['score']:>7g}  {'yes' if row['ok'] else 'NO'}")
            if not all(row["ok"] for row in rows):
                return 1
        elif args.command == "self-study":
            for path in write_self_study_pages(args.notebooks, args.out):
                print(f"wrote {path}")
    except GradingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
