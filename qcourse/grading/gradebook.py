"""The gradebook: scores per cell and per submission, written into nbgrader's sqlite database.

``combine`` turns a worker's reply into a ``SubmissionResult``,
:math:`s_c = p_c\\,[\\text{nbgrader passes } c]\\,[\\text{split run passes } c]`; ``merge``
writes it into the course gradebook with nbgrader's update-or-create calls (so grading again
replaces rather than adds), and the exports write ``grades.csv`` (nbgrader's CSV) and
``grades_by_cell.csv``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

from .course import COURSE_ID
from .notebook import exercises, grade_id, is_test, write_json_atomic
from .submissions import note_cell


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
    seconds_late: float = 0.0
    late_penalty: float = 0.0
    seconds_nbgrader: float = 0.0
    seconds_split: float = 0.0

    @property
    def score(self) -> float:
        return sum(c.score for c in self.cells)

    @property
    def final_score(self) -> float:
        """The score after the late penalty (what the LMS export reports)."""
        return max(0.0, self.score - self.late_penalty)

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
            "submissions": [dataclasses.asdict(r) | {"score": r.score, "max_score": r.max_score,
                                                     "final_score": r.final_score}
                            for r in self.results],
            "ignored": [{"path": p, "reason": why} for p, why in self.ignored],
        }


def combine(task: dict, reply: dict, notes: list[str]) -> SubmissionResult:
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


def make_template(course: Path, target: Path) -> None:
    """A copy of the course gradebook with its assignments and no students."""
    with contextlib.closing(sqlite3.connect(course / "gradebook.db")) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    with _no_warnings(), _quiet_gradebook(f"sqlite:///{target}") as gb:
        for student in [s.id for s in gb.students]:
            gb.remove_student(student)


def merge(course: Path, result: SubmissionResult, task: dict, reply: dict) -> None:
    """Write one result into the course gradebook (and its autograded notebook to disk)."""
    from nbgrader.api import MissingEntry

    student, stem = result.student, result.stem
    autograded = reply.get("autograded")
    target = course / "autograded" / student / stem / f"{stem}.ipynb"
    if autograded is not None:
        if result.notes:
            autograded["cells"].insert(0, note_cell(result.notes))
        for cell in autograded["cells"]:
            if is_test(cell):
                gid = grade_id(cell)
                for c in result.cells:
                    if c.grade_id == gid and c.note:
                        cell.setdefault("outputs", []).append({
                            "output_type": "stream", "name": "stdout",
                            "text": f"[grader] {c.note}; score set to 0.\n"})
        write_json_atomic(target, autograded)
    else:
        blank = copy.deepcopy(task["canonical"])
        blank["cells"].insert(0, note_cell(result.notes or ["This submission was not graded."]))
        write_json_atomic(target, blank)
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
        snb.late_submission_penalty = result.late_penalty
        gb.db.commit()


def export_csv(course: Path) -> Path:
    from nbgrader.plugins import CsvExportPlugin

    path = course / "grades.csv"
    tmp = course / ".grades.csv.tmp"
    with _no_warnings(), _quiet_gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        CsvExportPlugin(to=str(tmp)).export(gb)
    os.replace(tmp, path)
    return path


def export_by_cell_csv(course: Path, results: list[SubmissionResult]) -> Path:
    """``COURSE/grades_by_cell.csv``: one row per test cell with both verdicts."""
    path, tmp = course / "grades_by_cell.csv", course / ".grades_by_cell.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["student_id", "assignment", "grade_id", "points", "nbgrader",
                         "split_run", "score", "status", "flagged"])
        for r in results:
            for c in r.cells:
                writer.writerow([r.student, r.stem, c.grade_id, f"{c.points:g}",
                                 "" if c.nbgrader is None else f"{c.nbgrader:g}",
                                 "" if c.split is None else ("pass" if c.split else "fail"),
                                 f"{c.score:g}", r.status, int(r.flagged)])
    os.replace(tmp, path)
    return path


def late_rule(course: Path) -> Any:
    """The course's late penalty: ``rule(student, score, seconds_late) -> points off``.

    The plug-in that the course config gives nbgrader (``AssignLatePenalties.plugin_class``,
    see ``late.py``), applied to the final score and kept between 0 and the score.
    """
    from nbgrader.plugins import LateSubmissionPlugin
    from traitlets.config.loader import PyFileConfigLoader
    from traitlets.utils.importstring import import_item

    with _no_warnings():
        cfg = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
        plugin_class = cfg.AssignLatePenalties.get("plugin_class", LateSubmissionPlugin)
        if isinstance(plugin_class, str):
            plugin_class = import_item(plugin_class)
        plugin = plugin_class(config=cfg)

    def rule(student: str, score: float, seconds_late: float) -> float:
        if seconds_late <= 0 or score <= 0:
            return 0.0
        with _no_warnings():
            penalty = plugin.late_submission_penalty(student, score, seconds_late)
        return min(max(float(penalty or 0.0), 0.0), score)

    return rule
