"""Submissions: found on disk, then rebuilt from the release around the student's answers."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .course import GradingError
from .notebook import cell_source, grade_id, is_solution, nbgrader_meta

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
_MAX_SUBMISSION_BYTES = 50 * 2**20


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
        if not STUDENT_ID.match(student):
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
    data = _read_notebook(submitted)
    if isinstance(data, str):
        note = (f"The submission is not a readable notebook ({data}); it was graded as the "
                "blank release, so every graded cell scores 0.")
        return copy.deepcopy(release_notebook), [note], False
    rebuilt = _Rebuilt(release_notebook["cells"], [c for c in data["cells"] if isinstance(c, dict)])
    nb = {key: copy.deepcopy(value) for key, value in release_notebook.items() if key != "cells"}
    nb["cells"] = rebuilt.cells()
    return nb, rebuilt.notes(), True


def _read_notebook(submitted: bytes | str) -> dict | str:
    """The submitted notebook as JSON, or why it is not a readable one."""
    try:
        data = json.loads(submitted)
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise ValueError("the file is JSON but not a notebook")
        if int(data.get("nbformat", 0)) < 4:
            raise ValueError(f"nbformat {data.get('nbformat')} is too old (save it with Jupyter)")
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return data


_LOCKED_KEYS = ("grade", "solution", "locked", "points", "task")


class _Rebuilt:
    """The student's cells sorted onto the release: answers, added cells, and what was undone."""

    def __init__(self, release_cells: list[dict], cells: list[dict]) -> None:
        self.release_cells = release_cells
        index = {grade_id(c): k for k, c in enumerate(release_cells) if grade_id(c)}
        last = {grade_id(cell): i for i, cell in enumerate(cells) if grade_id(cell) in index}
        self.solutions: dict[str, str] = {}
        # cells the student added, after the release cell that preceded them (-1: before all)
        self.extras: dict[int, list[dict]] = {k: [] for k in range(-1, len(release_cells))}
        self.duplicated: set[str] = set()
        self.edited: set[str] = set()
        self.retagged: set[str] = set()
        self.missing = [gid for gid in index if gid not in last]
        anchor = -1
        for i, cell in enumerate(cells):
            gid = grade_id(cell)
            if gid in index and last[gid] == i:
                anchor = index[gid]
                self._graded(gid, cell, release_cells[anchor])
                continue
            if gid in index:
                self.duplicated.add(gid)
            self._added(anchor, cell)

    def _graded(self, gid: str, cell: dict, original: dict) -> None:
        if is_solution(original):
            self.solutions[gid] = cell_source(cell)
        elif cell_source(cell) != cell_source(original) or cell.get("cell_type") != original[
                "cell_type"]:
            self.edited.add(gid)
        if any(nbgrader_meta(cell).get(k) != nbgrader_meta(original).get(k)
               for k in _LOCKED_KEYS):
            self.retagged.add(gid)

    def _added(self, anchor: int, cell: dict) -> None:
        kind = cell.get("cell_type")
        if kind == "code":
            self.extras[anchor].append({"cell_type": "code", "execution_count": None,
                                        "metadata": {}, "outputs": [],
                                        "source": cell_source(cell)})
        elif kind == "markdown":
            self.extras[anchor].append({"cell_type": "markdown", "metadata": {},
                                        "source": cell_source(cell)})

    def cells(self) -> list[dict]:
        out = list(self.extras[-1])
        for k, original in enumerate(self.release_cells):
            cell = copy.deepcopy(original)
            gid = grade_id(original)
            if gid in self.solutions:
                cell["source"] = self.solutions[gid]
            out.append(cell)
            out.extend(self.extras[k])
        return out

    def notes(self) -> list[str]:
        notes = []
        if self.missing:
            notes.append("Cells missing from the submission were restored from the release: "
                         + ", ".join(self.missing) + ".")
        if self.duplicated:
            notes.append("Cells that appear more than once: " + ", ".join(sorted(self.duplicated))
                         + " (the last copy was graded; earlier copies ran as ordinary cells).")
        if self.edited:
            notes.append("Edits to locked cells were discarded: "
                         + ", ".join(sorted(self.edited)) + ".")
        if self.retagged:
            notes.append("Changed nbgrader metadata was replaced by the release's: "
                         + ", ".join(sorted(self.retagged)) + ".")
        return notes


def note_cell(lines: list[str]) -> dict:
    body = "\n".join(f"- {line}" for line in lines)
    return {"cell_type": "markdown", "metadata": {},
            "source": f"**Notes from the grader**\n\n{body}\n"}
