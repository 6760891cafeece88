"""``grade``: autograde a folder of submissions into the course's gradebook.

The steps: find the submissions and rebuild each from the release (``_prepare_tasks``); grade
them in worker processes, several at once, checking the course's own files after each one and
re-grading suspects of tampering one at a time (``_Scheduler``); merge each result into the
gradebook as it arrives; then feedback and the exports.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from .course import COURSE_ID, DEFAULT_COURSE_DIR, STATE_DIR, GradingError, load_course
from .feedback import generate_feedback
from .gradebook import (
    GradingReport,
    SubmissionResult,
    combine,
    export_by_cell_csv,
    export_csv,
    late_rule,
    make_template,
    merge,
)
from .notebook import cell_source, exercises, grade_id, is_solution, read_json, write_json_atomic
from .processes import ProtectedFiles, lock_course
from .sandbox import BASE_UID, SANDBOX_ADVICE
from .sandbox import probe as probe_sandbox
from .submissions import Submission, canonical_submission, find_submissions
from .worker import WorkerSlot

# What the parent keeps of a task and does not send to the worker.
_PARENT_ONLY = ("notes", "file", "readable", "unanswered")


def _hard_timeout(source: dict, cell_timeout: float) -> float:
    n_code = sum(c.get("cell_type") == "code" for c in source["cells"])
    n_test = len(exercises(source))
    return 120 + cell_timeout * (2 * n_code + 4 * n_test)


def _protect_course(course: Path) -> ProtectedFiles:
    """The course's own files, to be found unchanged after every submission."""
    protected = ProtectedFiles()
    protected.add(course / "nbgrader_config.py")
    protected.add(course / "release.json")
    for kind in ("source", "release"):
        protected.add_tree(course / kind)
    return protected


def _prepare_tasks(course: Path, manifest: dict, subs: list[Submission], template: Path,
                   cell_timeout: float, protected: ProtectedFiles) -> list[dict]:
    """One task per submission: its canonical notebook and what a worker needs to grade it.

    Each submitted file is also kept as handed in, in ``COURSE/submitted/STUDENT/STEM/``.
    """
    stems = sorted(manifest["assignments"])
    config_text = (course / "nbgrader_config.py").read_text()
    sources = {s: read_json(course / "source" / s / f"{s}.ipynb") for s in stems}
    releases = {s: read_json(course / "release" / s / f"{s}.ipynb") for s in stems}
    tasks = []
    for sub in subs:
        canonical, notes, readable = canonical_submission(releases[sub.stem], sub.data)
        copy_to = course / "submitted" / sub.student / sub.stem / f"{sub.stem}.ipynb"
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        copy_to.write_bytes(sub.data)
        protected.add(copy_to)
        release_src = {grade_id(c): cell_source(c) for c in releases[sub.stem]["cells"]}
        unanswered = [grade_id(c) for c in canonical["cells"] if is_solution(c)
                      and cell_source(c) == release_src.get(grade_id(c))]
        tasks.append({
            "student": sub.student, "stem": sub.stem, "file": str(sub.path),
            "course_id": manifest.get("course_id", COURSE_ID), "config": config_text,
            "source": sources[sub.stem], "canonical": canonical, "notes": notes,
            "readable": readable, "timestamp": sub.timestamp, "template": str(template),
            "points": manifest["assignments"][sub.stem]["points"],
            "cell_timeout": cell_timeout, "unanswered": unanswered,
        })
    return tasks


class _Scheduler:
    """Hands tasks to the workers and merges each reply into the gradebook as it arrives.

    After every reply the course's protected files are checked: if one changed, it is restored,
    and every submission that was running at the time is graded again, alone, so that the one
    that wrote there is the one that scores zero. The gradebook itself must change only through
    ``merge``.
    """

    def __init__(self, course: Path, tasks: list[dict], protected: ProtectedFiles,
                 jobs: int, cell_timeout: float, log: Any, sandboxed: bool = True) -> None:
        self.course, self.tasks, self.protected, self.log = course, tasks, protected, log
        self.cell_timeout = cell_timeout
        self.sandboxed = sandboxed
        kernel = tasks[0]["source"].get("metadata", {}).get("kernelspec", {}).get(
            "name", "python3")
        self.answers: queue.Queue = queue.Queue()
        self.slots = [WorkerSlot(i, self.answers, kernel)
                      for i in range(max(1, min(jobs, len(tasks))))]
        self.pending = deque(range(len(tasks)))
        self.solo: deque[int] = deque()  # suspects of tampering, re-graded one at a time
        self.running: dict[int, int] = {}
        self.suspects: set[int] = set()
        self.alone: int | None = None  # the task running by itself, if any
        self.idle = list(range(len(self.slots)))
        self.db_path = course / "gradebook.db"
        self.db_state = ProtectedFiles.stat_of(self.db_path)
        self.results: dict[tuple[str, str], SubmissionResult] = {}
        self.late = late_rule(course)

    def dispatch(self, i: int) -> None:
        slot = self.idle.pop()
        self.running[i] = slot
        sent = {k: v for k, v in self.tasks[i].items() if k not in _PARENT_ONLY}
        # each worker's student code runs as a user id of its own (a fork bomb's limit is its own)
        sent["sandbox_uid"] = BASE_UID + 1 + slot if self.sandboxed else None
        timeout = _hard_timeout(self.tasks[i]["source"], self.cell_timeout)
        self.slots[slot].tasks.put((sent | {"id": i}, timeout))

    def fill(self) -> None:
        if self.solo:
            if not self.running:
                self.alone = self.solo.popleft()
                self.dispatch(self.alone)
        else:
            while self.pending and self.idle:
                self.dispatch(self.pending.popleft())

    def check_course(self, i: int, reply: dict) -> dict | None:
        """The reply to keep, or None when task ``i`` must be graded again, alone."""
        if ProtectedFiles.stat_of(self.db_path) != self.db_state:
            raise GradingError(f"{self.db_path} was modified by another process during "
                               "grading; restore it from a backup and grade again")
        changed = self.protected.changed()
        if changed:
            self.protected.restore(changed)
            if i != self.alone:
                self.suspects.update([i, *self.running])
                self.solo.append(i)
                return None
            # it ran by itself: it is the one that wrote there
            written = (str(p.relative_to(self.course)) for p in changed)
            return dict(reply, tampered=sorted([*(reply.get("tampered") or []), *written]))
        if i in self.suspects and i != self.alone:
            self.solo.append(i)
            return None
        return reply

    def record(self, i: int, reply: dict) -> None:
        task = self.tasks[i]
        result = combine(task, reply, task["notes"])
        result.seconds_late = float(reply.get("seconds_late") or 0.0)
        result.late_penalty = self.late(task["student"], result.score, result.seconds_late)
        result.seconds_nbgrader = float(reply.get("seconds_nbgrader") or 0.0)
        result.seconds_split = float(reply.get("seconds_split") or 0.0)
        merge(self.course, result, task, reply)
        self.db_state = ProtectedFiles.stat_of(self.db_path)
        self.protected.add(self.course / "autograded" / task["student"] / task["stem"]
                           / f"{task['stem']}.ipynb")
        self.results[task["student"], task["stem"]] = result
        self.log(f"graded {task['student']}/{task['stem']}: {result.score:g}/"
                 f"{result.max_score:g} ({result.status}; nbgrader "
                 f"{reply.get('seconds_nbgrader', 0):.1f} s, split run "
                 f"{reply.get('seconds_split', 0):.1f} s)")

    def run(self) -> dict[tuple[str, str], SubmissionResult]:
        while self.pending or self.solo or self.running:
            self.fill()
            slot, sent, reply = self.answers.get()
            i = sent["id"]
            self.idle.append(slot)
            self.running.pop(i, None)
            if "fatal" in reply:
                raise GradingError(reply["fatal"])
            kept = self.check_course(i, reply)
            if kept is None:
                continue
            if i == self.alone:
                self.alone = None
            self.record(i, kept)
        return self.results

    def stop(self) -> None:
        for slot in self.slots:
            slot.tasks.put(None)
            slot.kill()


def grade(submissions_dir: str | os.PathLike, course_dir: str | os.PathLike = DEFAULT_COURSE_DIR,
          *, jobs: int = 2, cell_timeout: float = 30, feedback: bool = True,
          progress: Any = None, sandbox: bool = True) -> GradingReport:
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
    every file that was not graded. Student code runs inside bubblewrap (``sandbox.py``); with
    ``sandbox=False`` it runs as this user, and only the detection and repair of the course's
    files protects the course (for trusted submissions only). See the grading chapter.
    """
    if sandbox:
        problem = probe_sandbox()
        if problem:
            raise GradingError(f"{problem}. {SANDBOX_ADVICE}")
    course = Path(course_dir).resolve()
    manifest = load_course(course)
    subs, ignored = find_submissions(submissions_dir, sorted(manifest["assignments"]))
    (course / STATE_DIR).mkdir(exist_ok=True)
    lock = lock_course(course)
    work = Path(tempfile.mkdtemp(prefix="qcourse-template-"))
    scheduler = None
    try:
        template = work / "template.db"
        make_template(course, template)
        protected = _protect_course(course)
        tasks = _prepare_tasks(course, manifest, subs, template, cell_timeout, protected)
        results: dict[tuple[str, str], SubmissionResult] = {}
        if tasks:
            scheduler = _Scheduler(course, tasks, protected, jobs, cell_timeout,
                                   progress or (lambda message: None), sandbox)
            results = scheduler.run()
            scheduler.stop()
        ordered = [results[s.student, s.stem] for s in subs]
        if feedback:
            generate_feedback(course, sorted({r.stem for r in ordered}), jobs)
        report = GradingReport(course, ordered, ignored)
        export_csv(course)
        export_by_cell_csv(course, ordered)
        write_json_atomic(course / "grading-report.json", report.to_json())
        return report
    finally:
        if scheduler is not None:
            scheduler.stop()
        shutil.rmtree(work, ignore_errors=True)
        lock.close()
