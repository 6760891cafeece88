"""Release, grade and give feedback on the course's exercises with nbgrader.

The exercise notebooks (``notebooks/STEM.ipynb``) are written in nbgrader's source format. This
package is the instructor's tool around them (the ``qcourse-course`` command, also runnable as
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

The package, by part:

``notebook``      exercise notebooks as JSON: cells, nbgrader metadata, exercises, secret regions
``course``        the course directory and its checks; ``GradingError``
``releases``      the student release (``release``, ``verify_release``)
``submissions``   finding submissions, rebuilding them from the release
``channel``       the trusted-process channel: what may cross from student code to the tests
``student``       the student's process of the split run, and the tests' side of it
``reference``     the reference run that the split run compares against
``split``         the split run itself
``processes``     process isolation and clean-up; the course's files checked and restored
``batch``         nbgrader operations in a fresh process
``worker``        the grading worker: one submission in a scratch course
``gradebook``     scores, the sqlite gradebook, CSV exports
``autograde``    ``grade``: scheduling the workers, merging results
``feedback``      output truncation and feedback without hidden tests
``drills``        submissions with known scores, to prove a setup
``self_study``    the self-study pages of the HTML book
``cli``           the command line (``__main__`` runs it)
"""

from __future__ import annotations

from typing import Any

from .autograde import grade
from .cli import main
from .course import COURSE_ID, DEFAULT_COURSE_DIR, GradingError, course_config_path
from .drills import DrillCase, drill, drill_submissions
from .gradebook import CellResult, GradingReport, SubmissionResult
from .notebook import (
    PUBLIC_PASS_MESSAGE,
    Exercise,
    cell_source,
    exercises,
    grade_id,
    hidden_part,
    is_solution,
    is_test,
    public_part,
    secret_lines,
)
from .releases import ReleaseReport, release, verify_release
from .self_study import self_study_page, write_self_study_pages
from .split import SplitVerdict, split_run
from .submissions import canonical_submission, find_submissions

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
    "grade_id",
    "hidden_part",
    "is_solution",
    "is_test",
    "main",
    "public_part",
    "release",
    "secret_lines",
    "self_study_page",
    "split_run",
    "verify_release",
    "write_self_study_pages",
]


def __getattr__(name: str) -> Any:
    """``qcourse.grading.SanitizeFeedback``, the feedback preprocessor the course config names,
    built on first use (it subclasses an nbgrader class; importing this package does not import
    nbgrader)."""
    if name == "SanitizeFeedback":
        from .feedback import sanitize_feedback_class

        cls = sanitize_feedback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
