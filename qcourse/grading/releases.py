"""The student release: ``nbgrader generate_assignment`` for each chapter, then checked.

``release`` builds the course directory; ``verify_release`` is the check that no solution and
no hidden test reached the students.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .batch import run_batch
from .course import (
    COURSE_ID,
    DEFAULT_COURSE_DIR,
    GradingError,
    check_course_dir,
    course_config_path,
    default_notebooks_dir,
)
from .notebook import (
    HIDDEN_BEGIN,
    HIDDEN_END,
    PUBLIC_PASS_MESSAGE,
    SOLUTION_BEGIN,
    SOLUTION_END,
    cell_source,
    exercises,
    grade_id,
    is_test,
    read_json,
    secret_lines,
    sha256,
    write_json_atomic,
)


def verify_release(source_notebook: dict, release_notebook: dict) -> list[str]:
    """Problems that make ``release_notebook`` unfit for students (an empty list when fit).

    The release must keep every graded cell with its points, contain no solution or hidden-test
    marker, and contain none of the ``secret_lines`` of the source in any cell or output.
    """
    problems: list[str] = []
    text = "\n".join(cell_source(c) for c in release_notebook.get("cells", []))
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
            problems.append(f"cell {grade_id(cell)} has outputs in the release")
        if is_test(cell) and PUBLIC_PASS_MESSAGE not in cell_source(cell):
            problems.append(f"test cell {grade_id(cell)} lacks the public-checks message")
    return problems


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
            manifest = read_json(self.course_dir / "release.json")["assignments"][stem]
            rows.append(f"{stem:<16}{len(manifest['points']):>10}{self.points[stem]:>8g}  "
                        f"{path.relative_to(self.course_dir)}")
        return "\n".join(rows)


def _chosen_stems(notebooks: Path, stems: Iterable[str] | None) -> list[str]:
    available = sorted(p.stem for p in notebooks.glob("*.ipynb"))
    chosen = sorted(set(stems)) if stems else available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise GradingError(f"no notebooks/{unknown[0]}.ipynb (available: {available})")
    if not chosen:
        raise GradingError(f"no exercise notebooks in {notebooks}")
    return chosen


def _copy_source(notebooks: Path, course: Path, stem: str) -> dict:
    """``notebooks/STEM.ipynb`` -> ``COURSE/source/STEM/STEM.ipynb``; returns the notebook."""
    data = (notebooks / f"{stem}.ipynb").read_bytes()
    nb = json.loads(data)
    if not exercises(nb):
        raise GradingError(f"notebooks/{stem}.ipynb has no graded cells")
    target = course / "source" / stem / f"{stem}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return nb


def _check_release(course: Path, stem: str, source: dict, manifest: dict) -> Path:
    """Refuse a release unfit for students; record its checksums and points in ``manifest``."""
    path = course / "release" / stem / f"{stem}.ipynb"
    problems = verify_release(source, read_json(path))
    if problems:
        raise GradingError(f"the release of {stem} is unfit for students:\n" +
                           "\n".join(problems))
    manifest["assignments"][stem] = {
        "source_sha256": sha256((course / "source" / stem / f"{stem}.ipynb").read_bytes()),
        "release_sha256": sha256(path.read_bytes()),
        "points": {e.test_id: e.points for e in exercises(source)},
        "total": sum(e.points for e in exercises(source)),
    }
    return path


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
    notebooks = Path(notebooks_dir) if notebooks_dir else default_notebooks_dir()
    course = Path(course_dir).resolve()
    check_course_dir(course, notebooks)
    chosen = _chosen_stems(notebooks, stems)
    course.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(course_config_path(), course / "nbgrader_config.py")
    sources = {stem: _copy_source(notebooks, course, stem) for stem in chosen}
    run_batch(course, [["generate_assignment", stem] for stem in chosen])
    manifest_path = course / "release.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {"assignments": {}}
    manifest["course_id"] = COURSE_ID
    files = [_check_release(course, stem, sources[stem], manifest) for stem in chosen]
    write_json_atomic(manifest_path, manifest)
    if student_dir is not None:
        out = Path(student_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stem, path in zip(chosen, files, strict=True):
            shutil.copyfile(path, out / f"{stem}.ipynb")
    points = {stem: manifest["assignments"][stem]["total"] for stem in chosen}
    return ReleaseReport(course, chosen, points, files)
