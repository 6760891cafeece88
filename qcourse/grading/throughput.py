"""How long a class takes to grade: a simulated class of N submissions, timed.

``simulate_class`` releases one chapter into a scratch course, hands in ``students``
submissions built from the drill (``drills.py``): solved, partly solved, blank and hostile ones
in fixed proportions, grades them with ``jobs`` workers, and reports the wall time, the time per
notebook (nbgrader's autograde plus the split run, as each worker measured it) and whether
every submission got its expected score (``qcourse-course simulate``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .autograde import grade
from .course import course_config_path
from .drills import drill_submissions
from .notebook import read_json
from .releases import release

# A recorded run of ``qcourse-course simulate --out``, kept next to the course config.
RECORDING = "simulated-class.json"


def recorded_class_timing() -> dict[str, Any]:
    """The recorded simulated class (``nbgrader/simulated-class.json``) the grading chapter
    shows: what ``simulate_class`` returned when it was run with ``--out`` on that file."""
    return read_json(course_config_path().parent / RECORDING)


# Out of every 20 students: 8 hand in the solution, 5 a partial one, 4 the blank release and 3
# an attack (cycling through the drill's hostile cases).
MIX = ["solution"] * 8 + ["partial"] * 5 + ["blank"] * 4 + ["hostile"] * 3
HOSTILE = ["silenced-tests", "anything-objects", "infinite-loop", "writes-outside",
           "reads-others", "fork-bomb", "fills-disk", "kills-kernel"]


def _hand_in(course: Path, stem: str, students: int,
             sandbox: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """Write ``students`` submissions into ``course/simulated``; return their expected scores
    and which drill case each student handed in."""
    source = read_json(course / "source" / stem / f"{stem}.ipynb")
    released = read_json(course / "release" / stem / f"{stem}.ipynb")
    cases = {c.name: c for c in drill_submissions(source, released, sandboxed=sandbox)}
    hostile = [name for name in HOSTILE if name in cases]
    folder = course / "simulated"
    shutil.rmtree(folder, ignore_errors=True)
    expected, handed_in = {}, {}
    attacks = 0
    for k in range(students):
        kind = MIX[k % len(MIX)]
        name = kind
        if kind == "hostile":  # each attack in turn
            name, attacks = hostile[attacks % len(hostile)], attacks + 1
        student = f"s{k:04d}"
        (folder / student).mkdir(parents=True)
        (folder / student / f"{stem}.ipynb").write_text(cases[name].content)
        expected[student] = cases[name].expected
        handed_in[student] = name
    return expected, handed_in


def _machine() -> dict[str, Any]:
    """Where the measurement ran: host name, CPU model, cores, Python and kernel."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"host": platform.node(), "cpu": model or platform.processor(),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


def _children_cpu_seconds() -> float:
    """CPU time of the child processes waited for so far (grading workers and, through them,
    the kernels and student processes they reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def simulate_class(course_dir: str | os.PathLike, *, students: int = 300,
                   stem: str = "fixed_point", jobs: int = 2, cell_timeout: float = 10,
                   sandbox: bool = True, progress: Any = None) -> dict[str, Any]:
    """Grade a simulated class of ``students`` submissions of ``stem``; return the timings.

    Besides the wall time, the record says when and where it was measured, the load average
    before and after (the machine may be shared), and the CPU time grading used per submission
    (this process and the processes it waited for), which depends much less on the load: a
    class of N on C idle cores takes about N times that, divided by C.
    """
    course = release(course_dir, stems=[stem]).course_dir
    expected, handed_in = _hand_in(course, stem, students, sandbox)
    load_before = os.getloadavg()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    cpu_before = time.process_time() + _children_cpu_seconds()
    started = time.monotonic()
    report = grade(course / "simulated", course, jobs=jobs, cell_timeout=cell_timeout,
                   feedback=False, progress=progress, sandbox=sandbox)
    wall = time.monotonic() - started
    cpu = time.process_time() + _children_cpu_seconds() - cpu_before
    per_notebook = sorted(r.seconds_nbgrader + r.seconds_split for r in report.results)
    wrong = sorted(r.student for r in report.results
                   if {c.grade_id: c.score for c in r.cells} != expected[r.student])
    cases = list(handed_in.values())
    return {
        "measured_at": started_at.replace(microsecond=0).isoformat(),
        "machine": _machine(),
        "command": (f"qcourse-course simulate --students {students} --stem {stem} "
                    f"--jobs {jobs} --timeout {cell_timeout:g}"),
        "students": students, "mix": {c: cases.count(c) for c in dict.fromkeys(cases)},
        "stem": stem, "jobs": jobs, "cores": os.cpu_count(), "sandbox": sandbox,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(wall, 1),
        "seconds_per_submission": round(wall / students, 2),
        "cpu_seconds": round(cpu, 1),
        "cpu_seconds_per_submission": round(cpu / students, 2),
        "notebook_seconds_median": round(statistics.median(per_notebook), 2),
        "notebook_seconds_p95": round(per_notebook[int(0.95 * (len(per_notebook) - 1))], 2),
        "notebook_seconds_max": round(per_notebook[-1], 2),
        "wrong_scores": wrong,
    }
