"""The command line: ``qcourse-course`` (also ``python -m qcourse.grading``).

``release``, ``grade``, ``drill`` and ``self-study`` are the instructor's commands (see
``--help`` and the grading chapter); ``_student``, ``_worker`` and ``_nbgrader-batch`` start the
grading tool's own child processes and are not for people.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .autograde import grade
from .batch import batch_main
from .classroom import LMS_LAYOUTS, export_lms, import_roster, set_due_date
from .course import DEFAULT_COURSE_DIR, GradingError
from .drills import drill
from .processes import fast_nbformat
from .releases import release
from .self_study import write_self_study_pages
from .student import student_main
from .throughput import simulate_class
from .worker import worker_main

_INTERNAL = {"_student": student_main, "_worker": worker_main, "_nbgrader-batch": batch_main}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcourse-course", description="Release and grade the qcourse exercises with nbgrader.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_rel = sub.add_parser("release", help="make the student version of every exercise notebook")
    p_rel.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_rel.add_argument("--notebooks", default=None, help="exercise notebooks (default notebooks/)")
    p_rel.add_argument("--stems", default=None, help="comma-separated chapter stems (default all)")
    p_rel.add_argument("--student-dir", default=None,
                       help="also copy the student notebooks here, flat (e.g. for Binder)")
    p_gr = sub.add_parser("grade", help="autograde a folder of submissions")
    p_gr.add_argument("submissions", help="folder with STUDENT/STEM.ipynb files")
    p_gr.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_gr.add_argument("--jobs", type=int, default=2, help="submissions graded at once")
    p_gr.add_argument("--timeout", type=float, default=30, help="seconds per cell")
    p_gr.add_argument("--no-feedback", action="store_true", help="skip feedback HTML")
    p_dr = sub.add_parser("drill", help="grade submissions with known scores, to test a setup")
    p_dr.add_argument("--course", default="_build/drill", help="scratch course directory")
    p_dr.add_argument("--notebooks", default=None)
    p_dr.add_argument("--stems", default=None)
    p_dr.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    p_dr.add_argument("--jobs", type=int, default=2)
    p_dr.add_argument("--timeout", type=float, default=10)
    p_ss = sub.add_parser("self-study", help="write MyST pages with solutions behind toggles")
    p_ss.add_argument("notebooks", nargs="+", help="exercise notebooks")
    p_ss.add_argument("--out", required=True, help="output directory")
    for p in (p_gr, p_dr):
        p.add_argument("-v", "--verbose", action="store_true", help="report each submission")
        p.add_argument("--no-sandbox", action="store_true",
                       help="run student code without bubblewrap (trusted submissions only)")
    _classroom_parsers(sub)
    return parser


def _classroom_parsers(sub: argparse._SubParsersAction) -> None:
    p_ro = sub.add_parser("roster", help="import a roster CSV (id,first_name,last_name,email)")
    p_ro.add_argument("csv", help="roster file")
    p_ro.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_du = sub.add_parser("due", help="set an assignment's due date (ISO 8601, UTC by default)")
    p_du.add_argument("stem", help="assignment (chapter stem)")
    p_du.add_argument("when", help="e.g. 2026-03-01T23:59:00+00:00")
    p_du.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_ex = sub.add_parser("export", help="grades as an LMS gradebook-import CSV")
    p_ex.add_argument("--lms", choices=sorted(LMS_LAYOUTS), required=True)
    p_ex.add_argument("--out", required=True, help="CSV file to write")
    p_ex.add_argument("--course", default=DEFAULT_COURSE_DIR, help="course directory")
    p_si = sub.add_parser("simulate", help="time the grading of a simulated class")
    p_si.add_argument("--course", default="_build/simulated-class", help="scratch course")
    p_si.add_argument("--students", type=int, default=300)
    p_si.add_argument("--stem", default="fixed_point")
    p_si.add_argument("--jobs", type=int, default=2)
    p_si.add_argument("--timeout", type=float, default=10)
    p_si.add_argument("--out", default=None, help="also write the timings here (JSON)")
    p_si.add_argument("-v", "--verbose", action="store_true", help="report each submission")


def _split(value: str | None) -> list[str] | None:
    return [s for s in value.split(",") if s] if value else None


def _release(args: argparse.Namespace) -> int:
    rep = release(args.course, notebooks_dir=args.notebooks, stems=_split(args.stems),
                  student_dir=args.student_dir)
    print(f"released {len(rep.stems)} assignment(s) into {rep.course_dir}")
    print(rep.table())
    if args.student_dir:
        print(f"student notebooks copied to {args.student_dir}")
    return 0


def _grade(args: argparse.Namespace) -> int:
    rep = grade(args.submissions, args.course, jobs=args.jobs, cell_timeout=args.timeout,
                feedback=not args.no_feedback, progress=args.progress,
                sandbox=not args.no_sandbox)
    print(rep.table())
    print(f"gradebook: {rep.course_dir / 'gradebook.db'}")
    print(f"grades:    {rep.course_dir / 'grades.csv'} and grades_by_cell.csv")
    if not args.no_feedback:
        print(f"feedback:  {rep.course_dir / 'feedback'}")
    return 0


def _drill(args: argparse.Namespace) -> int:
    _, rows = drill(args.course, notebooks_dir=args.notebooks, stems=_split(args.stems),
                    cases=_split(args.cases), jobs=args.jobs, cell_timeout=args.timeout,
                    progress=args.progress, sandbox=not args.no_sandbox)
    print(f"{'case':<18}{'assignment':<14}{'expected':>9}{'nbgrader':>9}{'score':>7}  ok")
    for row in rows:
        print(f"{row['case']:<18}{row['assignment']:<14}{row['expected']:>9g}"
              f"{row['nbgrader']:>9g}{row['score']:>7g}  {'yes' if row['ok'] else 'NO'}")
    return 0 if all(row["ok"] for row in rows) else 1


def _self_study(args: argparse.Namespace) -> int:
    for path in write_self_study_pages(args.notebooks, args.out):
        print(f"wrote {path}")
    return 0


def _roster(args: argparse.Namespace) -> int:
    print(f"{import_roster(args.course, args.csv)} students in the gradebook of {args.course}")
    return 0


def _due(args: argparse.Namespace) -> int:
    print(f"{args.stem} is due {set_due_date(args.course, args.stem, args.when)} UTC")
    return 0


def _export(args: argparse.Namespace) -> int:
    print(f"wrote {export_lms(args.course, args.lms, args.out)} ({args.lms} layout)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    timings = simulate_class(args.course, students=args.students, stem=args.stem,
                             jobs=args.jobs, cell_timeout=args.timeout, progress=args.progress)
    text = json.dumps(timings, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if not timings["wrong_scores"] else 1


_COMMANDS = {"release": _release, "grade": _grade, "drill": _drill, "self-study": _self_study,
             "roster": _roster, "due": _due, "export": _export, "simulate": _simulate}


def main(argv: list[str] | None = None) -> int:
    """``qcourse-course``: release, grade, drill and self-study pages (see ``--help``)."""
    argv = sys.argv[1:] if argv is None else argv
    fast_nbformat()
    if argv and argv[0] in _INTERNAL:
        _INTERNAL[argv[0]]()
        return 0
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)

    def progress(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr, flush=True)

    args.progress = progress
    try:
        return _COMMANDS[args.command](args)
    except GradingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
