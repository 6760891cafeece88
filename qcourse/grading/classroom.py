"""A real class: the roster, due dates, and grades in the shape an LMS gradebook imports.

``import_roster``
    reads a roster CSV (nbgrader's own ``nbgrader db student import`` columns: ``id``,
    ``first_name``, ``last_name``, ``email``, optional ``lms_user_id``) into the gradebook.
``set_due_date``
    sets an assignment's due date in the gradebook; the late rule (``late.py``) counts from it.
``export_lms``
    writes one row per rostered student with the final score of each assignment (late penalty
    applied; 0 where nothing was handed in), in Canvas's or Moodle's gradebook-import layout
    (``LMS_LAYOUTS``, with the documentation each follows).
"""

from __future__ import annotations

import csv
import datetime
import os
import re
from pathlib import Path

from .course import COURSE_ID, GradingError
from .submissions import STUDENT_ID

ROSTER_COLUMNS = ("id", "first_name", "last_name", "email", "lms_user_id")
_EMAIL = re.compile(r"^[^@\s,]+@[^@\s,]+\.[^@\s,]+$")

# The columns each LMS expects when a grade CSV is imported into its gradebook.
LMS_LAYOUTS = {
    # Canvas, "How do I import grades in the Gradebook?" (Instructure's Canvas Instructor Guide)
    # and the gradebook export it mirrors: the student's name "Last, First", Canvas's user ID,
    # SIS User ID, SIS Login ID and Section identify the row (one of name/ID/SIS User ID is
    # enough, SIS Login ID and Section must be present); then one column per assignment, whose
    # header names the assignment (a new name creates a new assignment on import).
    "canvas": ("Student", "ID", "SIS User ID", "SIS Login ID", "Section"),
    # Moodle, "Import grades" / CSV file import (Moodle docs; grade/import/csv): one column
    # identifies the user (mapped under "Identify user by", here "Email address"), then one
    # column per grade item, mapped to an existing item by its name. The identity columns are
    # those of Moodle's own plain-text grade export.
    "moodle": ("First name", "Last name", "ID number", "Email address"),
}


def _gradebook(course: Path):  # nbgrader's Gradebook (imported when first used)
    from .gradebook import _no_warnings, _quiet_gradebook

    with _no_warnings():
        return _quiet_gradebook(f"sqlite:///{Path(course) / 'gradebook.db'}")


def read_roster(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a roster CSV, checked: a header with ``id``, valid unique ids and emails."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        if "id" not in header:
            raise GradingError(f"{path}: the roster needs an 'id' column (has {header})")
        unknown = sorted(set(header) - set(ROSTER_COLUMNS))
        if unknown:
            raise GradingError(f"{path}: unknown roster columns {unknown}; expected some of "
                               f"{list(ROSTER_COLUMNS)}")
        rows, seen = [], set()
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            sid = row["id"]
            if not STUDENT_ID.match(sid):
                raise GradingError(f"{path}, line {line}: {sid!r} is not a valid student id "
                                   "(letters, digits, _.@-)")
            if sid in seen:
                raise GradingError(f"{path}, line {line}: student {sid!r} appears twice")
            if row.get("email") and not _EMAIL.match(row["email"]):
                raise GradingError(f"{path}, line {line}: {row['email']!r} is not an email")
            seen.add(sid)
            rows.append(row)
    return rows


def import_roster(course_dir: str | os.PathLike, roster: str | os.PathLike) -> int:
    """Add or update every student of ``roster`` in the course gradebook; returns the count."""
    rows = read_roster(roster)
    with _gradebook(Path(course_dir)) as gb:
        for row in rows:
            fields = {k: (row.get(k) or None) for k in ROSTER_COLUMNS if k != "id"}
            gb.update_or_create_student(row["id"], **fields)
    return len(rows)


def set_due_date(course_dir: str | os.PathLike, stem: str, due: str) -> datetime.datetime:
    """Set assignment ``stem``'s due date (ISO 8601; UTC unless it names a zone)."""
    try:
        when = datetime.datetime.fromisoformat(due)
    except ValueError:
        raise GradingError(f"due date {due!r} is not ISO 8601 (e.g. 2026-03-01T23:59:00+00:00)"
                           ) from None
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    with _gradebook(Path(course_dir)) as gb:
        names = [a.name for a in gb.assignments]
        if stem not in names:
            raise GradingError(f"no released assignment {stem!r} (released: {names})")
        gb.update_or_create_assignment(stem, duedate=when)
    return when


def final_scores(course_dir: str | os.PathLike) -> tuple[list, list[str], dict]:
    """(students, assignments, {(student, assignment): final score or None})."""
    from nbgrader.api import MissingEntry

    scores: dict[tuple[str, str], float | None] = {}
    with _gradebook(Path(course_dir)) as gb:
        students = [(s.id, s.first_name or "", s.last_name or "", s.email or "",
                     s.lms_user_id or "") for s in gb.students]
        assignments = [a.name for a in gb.assignments]
        for sid, *_ in students:
            for name in assignments:
                try:
                    sub = gb.find_submission(name, sid)
                except MissingEntry:
                    scores[sid, name] = None
                    continue
                penalty = float(sub.late_submission_penalty or 0.0)
                scores[sid, name] = max(0.0, float(sub.score) - penalty)
    return students, assignments, scores


def export_lms(course_dir: str | os.PathLike, lms: str, out: str | os.PathLike) -> Path:
    """Write the gradebook as ``lms``'s grade-import CSV (``canvas`` or ``moodle``)."""
    if lms not in LMS_LAYOUTS:
        raise GradingError(f"unknown LMS {lms!r}: choose one of {sorted(LMS_LAYOUTS)}")
    students, assignments, scores = final_scores(course_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*LMS_LAYOUTS[lms], *assignments])
        for sid, first, last, email, lms_id in sorted(students):
            if lms == "canvas":
                ident = [f"{last}, {first}".strip(", "), lms_id, sid, sid, COURSE_ID]
            else:
                ident = [first, last, sid, email]
            marks = [f"{scores[sid, a] or 0.0:g}" for a in assignments]
            writer.writerow([*ident, *marks])
    os.replace(tmp, out)
    return out
