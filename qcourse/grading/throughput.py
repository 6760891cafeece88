"""How long a class takes to grade: a simulated class of N submissions, timed.

``simulate_class`` releases one chapter into a scratch course, hands in ``students``
submissions built from the drill (``drills.py``): solved, partly solved, blank and hostile ones
in fixed proportions, grades them with ``jobs`` workers, and reports the wall time, the time per
notebook (nbgrader's autograde plus the split run, as each worker measured it) and whether
every submission got its expected score (``qcourse-course simulate``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .autograde import grade
from .drills import drill_submissions
from .notebook import read_json
from .releases import release

# Out of every 20 students: 8 hand in the solution, 5 a partial one, 4 the blank release and 3
# an attack (cycling through the drill's hostile cases).
MIX = ["solution"] * 8 + ["partial"] * 5 + ["blank"] * 4 + ["hostile"] * 3
HOSTILE = ["silenced-tests", "anything-objects", "infinite-loop", "writes-outside",
           "reads-others", "fork-bomb", "fills-disk", "kills-kernel"]


def _hand_in(course: Path, stem: str, students: int, sandbox: bool) -> dict[str, dict]:
    """Write ``students`` submissions into ``course/simulated``; return their expected scores."""
    source = read_json(course / "source" / stem / f"{stem}.ipynb")
    released = read_json(course / "release" / stem / f"{stem}.ipynb")
    cases = {c.name: c for c in drill_submissions(source, released, sandboxed=sandbox)}
    hostile = [name for name in HOSTILE if name in cases]
    folder = course / "simulated"
    shutil.rmtree(folder, ignore_errors=True)
    expected = {}
    for k in range(students):
        kind = MIX[k % len(MIX)]
        name = hostile[(k // len(MIX)) % len(hostile)] if kind == "hostile" else kind
        student = f"s{k:04d}"
        (folder / student).mkdir(parents=True)
        (folder / student / f"{stem}.ipynb").write_text(cases[name].content)
        expected[student] = cases[name].expected
    return expected


def simulate_class(course_dir: str | os.PathLike, *, students: int = 300,
                   stem: str = "fixed_point", jobs: int = 2, cell_timeout: float = 10,
                   sandbox: bool = True, progress: Any = None) -> dict[str, Any]:
    """Grade a simulated class of ``students`` submissions of ``stem``; return the timings."""
    course = release(course_dir, stems=[stem]).course_dir
    expected = _hand_in(course, stem, students, sandbox)
    started = time.monotonic()
    report = grade(course / "simulated", course, jobs=jobs, cell_timeout=cell_timeout,
                   feedback=False, progress=progress, sandbox=sandbox)
    wall = time.monotonic() - started
    per_notebook = sorted(r.seconds_nbgrader + r.seconds_split for r in report.results)
    wrong = sorted(r.student for r in report.results
                   if {c.grade_id: c.score for c in r.cells} != expected[r.student])
    return {
        "students": students, "stem": stem, "jobs": jobs, "cores": os.cpu_count(),
        "sandbox": sandbox, "wall_seconds": round(wall, 1),
        "seconds_per_submission": round(wall / students, 2),
        "notebook_seconds_median": round(statistics.median(per_notebook), 2),
        "notebook_seconds_p95": round(per_notebook[int(0.95 * (len(per_notebook) - 1))], 2),
        "notebook_seconds_max": round(per_notebook[-1], 2),
        "load_average_after": round(os.getloadavg()[0], 1),
        "wrong_scores": wrong,
    }
