"""The course directory: where it is, what it must not be, and whether its release is intact.

A course directory (default ``_build/course``) holds the repository's nbgrader config,
``source/STEM/STEM.ipynb`` and ``release/STEM/STEM.ipynb`` for each chapter stem, the sqlite
gradebook and ``release.json`` (checksums and points of each release); see ``release``.
"""

from __future__ import annotations

from pathlib import Path

from .notebook import read_json, sha256

COURSE_ID = "qcourse"
DEFAULT_COURSE_DIR = "_build/course"
STATE_DIR = ".qcourse"  # inside the course directory: the grading lock

# qcourse/grading/course.py -> the repository (or site-packages) is two folders up
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class GradingError(RuntimeError):
    """The course directory or the environment does not allow grading (see the message)."""


# The course directory.


def _repo_roots() -> list[Path]:
    """Where a qcourse checkout may be: next to the package (a source checkout or an editable
    install), then the current directory (Binder runs ``postBuild`` from the repository root,
    with qcourse installed into site-packages)."""
    roots = []
    for root in (_PACKAGE_ROOT, Path.cwd()):
        if (root / "notebooks").is_dir() and (root / "nbgrader" / "nbgrader_config.py").is_file():
            roots.append(root)
    return roots


def course_config_path() -> Path:
    """The course's nbgrader config kept in the repository (``nbgrader/nbgrader_config.py``)."""
    for root in _repo_roots():
        return root / "nbgrader" / "nbgrader_config.py"
    raise GradingError("nbgrader/nbgrader_config.py not found: run from the qcourse repository")


def default_notebooks_dir() -> Path:
    for root in _repo_roots():
        return root / "notebooks"
    raise GradingError("no notebooks/ directory found: run from the qcourse repository or pass "
                       "--notebooks")


def check_course_dir(course: Path, notebooks: Path) -> None:
    course, notebooks = course.resolve(), notebooks.resolve()
    if course == notebooks or notebooks in course.parents:
        raise GradingError(f"the course directory {course} must not be inside {notebooks}")
    if course in notebooks.parents:
        raise GradingError(f"the course directory {course} must not contain {notebooks}")


def load_course(course: Path) -> dict:
    manifest_path = course / "release.json"
    if not manifest_path.is_file():
        raise GradingError(f"{course} has no release: run `qcourse-course release` first")
    manifest = read_json(manifest_path)
    for stem, entry in manifest["assignments"].items():
        for kind in ("source", "release"):
            path = course / kind / stem / f"{stem}.ipynb"
            if not path.is_file() or sha256(path.read_bytes()) != entry[f"{kind}_sha256"]:
                raise GradingError(f"{path} changed since the release: release again before "
                                   "grading (or restore it)")
    return manifest
