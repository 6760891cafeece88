"""Exercise notebooks as plain JSON: cells, nbgrader's metadata, exercises and secret regions.

The parent grading process never needs nbformat: a notebook is the dict ``json.loads`` gives. An
exercise notebook marks its solutions (``### BEGIN SOLUTION`` ... ``### END SOLUTION``) and its
hidden tests (``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS``) as nbgrader expects; see
the grading chapter (``book/grading.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

SOLUTION_BEGIN, SOLUTION_END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
PUBLIC_PASS_MESSAGE = "Public checks passed. More (hidden) tests run when your work is graded."


def cell_source(cell: dict) -> str:
    """The source of a notebook cell (a JSON dict) as one string; "" when it is malformed."""
    src = cell.get("source", "")
    if isinstance(src, list):
        return "".join(s for s in src if isinstance(s, str))
    return src if isinstance(src, str) else ""


def nbgrader_meta(cell: dict) -> dict:
    """The cell's ``metadata.nbgrader`` dict ({} when absent or malformed)."""
    metadata = cell.get("metadata")
    nbg = metadata.get("nbgrader") if isinstance(metadata, dict) else None
    return nbg if isinstance(nbg, dict) else {}


def grade_id(cell: dict) -> str | None:
    """The cell's nbgrader ``grade_id``, or None."""
    gid = nbgrader_meta(cell).get("grade_id")
    return gid if isinstance(gid, str) else None


def is_solution(cell: dict) -> bool:
    """Whether nbgrader treats the cell as a solution cell (the student's answer)."""
    return bool(nbgrader_meta(cell).get("solution"))


def is_test(cell: dict) -> bool:
    """Whether the cell is a graded test cell (``grade: true``, a code cell, not a solution)."""
    meta = nbgrader_meta(cell)
    return bool(meta.get("grade")) and not meta.get("solution") and cell.get("cell_type") == "code"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sha256(data: bytes) -> str:
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
        gid = grade_id(cell)
        if gid is None:
            continue
        if is_solution(cell):
            pending.append(gid)
        elif is_test(cell):
            points = float(nbgrader_meta(cell).get("points", 0))
            found.append(Exercise(len(found) + 1, gid, points, tuple(pending)))
            pending = []
    return found


def split_region(source: str, begin: str, end: str) -> tuple[list[str], list[str]]:
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
    return "\n".join(split_region(test_source, HIDDEN_BEGIN, HIDDEN_END)[0])


def hidden_part(test_source: str) -> str:
    """Only the hidden tests of a test cell."""
    return "\n".join(split_region(test_source, HIDDEN_BEGIN, HIDDEN_END)[1])


def secret_lines(source_notebook: dict, min_length: int = 12) -> dict[str, set[str]]:
    """Lines of solutions and hidden tests that occur nowhere else in the source notebook.

    Returns ``{"solution": {...}, "hidden": {...}}`` of stripped lines at least ``min_length``
    characters long. A released notebook must contain none of them (``verify_release``).
    """
    public: set[str] = set()
    solution: set[str] = set()
    hidden: set[str] = set()
    for cell in source_notebook.get("cells", []):
        src = cell_source(cell)
        out_s, in_s = split_region(src, SOLUTION_BEGIN, SOLUTION_END)
        out_h, in_h = split_region("\n".join(out_s), HIDDEN_BEGIN, HIDDEN_END)
        public.update(line.strip() for line in out_h)
        solution.update(line.strip() for line in in_s)
        hidden.update(line.strip() for line in in_h)

    def keep(lines: set[str]) -> set[str]:
        return {s for s in lines - public if len(s) >= min_length and re.search(r"\w", s)}

    return {"solution": keep(solution), "hidden": keep(hidden)}
