"""The grading flow end to end with nbgrader: release, autograde, feedback, gradebook, export.

One release of every exercise notebook and one grading run serve most tests (module fixtures):
for every notebook a solved, a blank and a partly solved submission, plus hostile and broken
submissions of the floats notebook, each with the score every test cell must get. A second,
small course is graded twice and once with a crash in the middle. The grading runs through the
real command line (``python -m qcourse.grading``), as an instructor would run it.
"""

from __future__ import annotations

import ast
import csv
import html
import io
import json
import os
import pickle
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sandbox_support import Listener

from qcourse import grading as G
from qcourse.grading import channel
from qcourse.grading.notebook import sha256

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STEMS = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
# The generic hostile submissions attack a notebook with quick tests; the hand-made ones attack
# the floats notebook (its hidden tests compare against qcourse.floats.decode).
HOSTILE_STEM = "fixed_point" if "fixed_point" in STEMS else STEMS[0]
SMALL_STEM = HOSTILE_STEM
CELL_TIMEOUT = 10
BASIC = ("solution", "blank", "partial")


def cli(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qcourse.grading", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    out = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, out
    return proc


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------
# Fixtures: one release of everything, one grading run of many submissions.


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("course")
    proc = check(cli("release", "--course", str(root / "course"), "--student-dir",
                     str(root / "students")))
    assert f"released {len(STEMS)} assignment(s)" in proc.stdout
    return root / "course"


def floats_submissions(course: Path) -> dict[str, tuple[str, dict[str, float], dict]]:
    """Hand-made attacks on the floats notebook: name -> (notebook text, expected, facts)."""
    src = load(course / "source" / "floats" / "floats.ipynb")
    rel = load(course / "release" / "floats" / "floats.ipynb")
    points = {e.test_id: e.points for e in G.exercises(src)}
    solved = json.loads(next(c for c in G.drill_submissions(src, rel) if c.name == "solution")
                        .content)
    ex1 = next(c for c in solved["cells"] if G.grade_id(c) == "floats_ex1_solution")
    head = "def decode_fp16(bits):\n"
    assert G.cell_source(ex1).startswith(head), "the floats notebook changed: update this test"
    # Wrong for the binade just below infinity (except the largest finite value, which the
    # public checks test): public checks and the explicit hidden asserts pass, the comparison
    # against qcourse.floats.decode on all 65536 patterns does not.
    wrong = head + ("    if (bits >> 10) & 0x1F == 30 and bits & 0x3FF != 0x3FF:\n"
                    "        return 0.0\n") + G.cell_source(ex1)[len(head):]
    patch_qcourse = textwrap.dedent("""\


        import qcourse.floats as _qf

        _real_decode = _qf.decode


        def _agreeing_decode(bits, fmt):
            if fmt is _qf.FP16:
                got = [decode_fp16(int(b)) for b in np.ravel(bits)]
                return np.array(got, dtype=np.float64).reshape(np.shape(bits))
            return _real_decode(bits, fmt)


        _qf.decode = _agreeing_decode
        """)
    patch_numpy = "\n\nnp.array_equal = lambda *args, **kwargs: True\n"
    write_course = textwrap.dedent(f"""\
        from pathlib import Path

        Path({str(course / "source" / "floats" / "floats.ipynb")!r}).write_text("gone")
        """)

    def variant(ex1_source: str, extra_cell: str | None = None) -> str:
        nb = json.loads(json.dumps(solved))
        for cell in nb["cells"]:
            if G.grade_id(cell) == "floats_ex1_solution":
                cell["source"] = ex1_source
        if extra_cell is not None:
            nb["cells"].insert(2, {"cell_type": "code", "execution_count": None,
                                   "metadata": {}, "outputs": [], "source": extra_cell})
        return json.dumps(nb)

    all_but_ex1 = dict(points, floats_ex1_tests=0.0)
    return {
        "wrong-hidden": (variant(wrong), all_but_ex1, {"nbgrader": 11}),
        "patched-qcourse": (variant(wrong + patch_qcourse), all_but_ex1,
                            {"nbgrader": 14, "flagged": True}),
        "patched-numpy": (variant(wrong + patch_numpy), all_but_ex1,
                          {"nbgrader": 14, "flagged": True}),
        # prevented by the sandbox (the course is not in its file system): the answers count
        "writes-course": (variant(G.cell_source(ex1), write_course), dict(points), {}),
    }


@pytest.fixture(scope="module")
def graded(course, tmp_path_factory):
    """Grade every notebook's basic submissions and every hostile one, in one run.

    A listener on 127.0.0.1 waits for the opens-socket submission, which must never reach it.
    """
    subs = tmp_path_factory.mktemp("submissions")
    expected: dict[tuple[str, str], G.DrillCase] = {}
    listener = Listener()
    for stem in STEMS:
        src = load(course / "source" / stem / f"{stem}.ipynb")
        rel = load(course / "release" / stem / f"{stem}.ipynb")
        for case in G.drill_submissions(src, rel, ports=(listener.port,)):
            if case.name in BASIC or stem == HOSTILE_STEM:
                path = subs / case.name / f"{stem}.ipynb"
                path.parent.mkdir(exist_ok=True)
                path.write_text(case.content)
                expected[case.name, stem] = case
    facts = {}
    for name, (content, want, fact) in floats_submissions(course).items():
        path = subs / name / "floats" / "floats.ipynb"  # nbgrader's own layout, with a timestamp
        path.parent.mkdir(parents=True)
        path.write_text(content)
        (path.parent / "timestamp.txt").write_text("2026-03-01 12:00:00.000000 UTC")
        expected[name, "floats"] = G.DrillCase(name, name, content, want)
        facts[name] = fact
    # files that are not submissions, each to be listed with a reason
    (subs / "notes.txt").write_text("not a student folder")
    (subs / "solution" / "README.md").write_text("not a notebook")
    (subs / "blank" / "no_such_chapter.ipynb").write_text("{}")
    (subs / "bad id!").mkdir()
    (subs / "bad id!" / "floats.ipynb").write_text("{}")
    source_before = (course / "source" / "floats" / "floats.ipynb").read_bytes()
    handed_in = {p: p.read_bytes() for p in sorted(subs.rglob("*")) if p.is_file()}
    started = time.monotonic()
    try:
        proc = check(cli("grade", str(subs), "--course", str(course), "--jobs", "2",
                         "--timeout", str(CELL_TIMEOUT), "-v"))
    finally:
        connections = listener.close()
    report = load(course / "grading-report.json")
    by_key = {(s["student"], s["stem"]): s for s in report["submissions"]}
    return {"course": course, "subs": subs, "expected": expected, "facts": facts,
            "report": report, "by_key": by_key, "stdout": proc.stdout, "stderr": proc.stderr,
            "seconds": time.monotonic() - started, "source_before": source_before,
            "connections": connections, "handed_in": handed_in,
            "left": {p: p.read_bytes() for p in sorted(subs.rglob("*")) if p.is_file()}}


def scores(result: dict) -> dict[str, float]:
    return {c["grade_id"]: c["score"] for c in result["cells"]}


def raw_nbgrader(result: dict) -> float:
    return sum(c["nbgrader"] or 0.0 for c in result["cells"])


# ------------------------------------------------------------------------------------------
# 1. Solutions score full marks, blanks zero, partial submissions exactly what they solve.


@pytest.mark.parametrize("stem", STEMS)
def test_source_notebook_scores_full_marks(graded, stem):
    r = graded["by_key"]["solution", stem]
    assert r["status"] == "graded" and not r["flagged"], r["notes"]
    assert r["score"] == r["max_score"] > 0, scores(r)
    assert raw_nbgrader(r) == r["max_score"], "nbgrader autograde itself must give full marks"
    assert all(c["split"] is True for c in r["cells"]), "the split run must pass every cell"


@pytest.mark.parametrize("stem", STEMS)
def test_blank_release_scores_zero_on_every_graded_cell(graded, stem):
    r = graded["by_key"]["blank", stem]
    assert r["status"] == "graded", r["notes"]
    assert [c["score"] for c in r["cells"]] == [0.0] * len(r["cells"])
    assert all(c["nbgrader"] == 0 for c in r["cells"]), "nbgrader must fail every blank cell"


@pytest.mark.parametrize("stem", STEMS)
def test_partly_solved_submission_scores_exactly_its_cells(graded, stem):
    r = graded["by_key"]["partial", stem]
    want = graded["expected"]["partial", stem].expected
    assert 0 < sum(want.values()) < r["max_score"], "partial must solve some, not all"
    assert scores(r) == want
    assert not r["flagged"], r["notes"]


# ------------------------------------------------------------------------------------------
# 3. Hostile and broken submissions: each gets exactly its expected score.

GENERIC = ["raises", "infinite-loop", "huge-output", "deleted-cells", "duplicated-cells",
           "edited-tests", "retagged-cells", "redefined-assert", "silenced-tests",
           "anything-objects",
           "writes-outside", "reads-solutions", "not-json", "kills-kernel", "kills-grader",
           "reads-others", "opens-socket", "fork-bomb", "fills-disk"]
HOSTILE = [(case, HOSTILE_STEM) for case in GENERIC] + [
    (case, "floats") for case in ("wrong-hidden", "patched-qcourse", "patched-numpy",
                                  "writes-course")]
STATUS = {"not-json": "unreadable", "kills-kernel": "failed"}


@pytest.mark.parametrize("case, stem", HOSTILE, ids=[f"{c}-{s}" for c, s in HOSTILE])
def test_hostile_submission_gets_its_expected_score(graded, case, stem):
    r = graded["by_key"][case, stem]
    want = graded["expected"][case, stem].expected
    assert scores(r) == want, r["notes"]
    assert r["status"] == STATUS.get(case, "graded"), r["notes"]
    if r["status"] != "graded":
        assert r["flagged"] and r["notes"], "a failed or tampered submission is flagged, noted"
    fact = graded["facts"].get(case, {})
    if "nbgrader" in fact:
        assert raw_nbgrader(r) == fact["nbgrader"], [c["nbgrader"] for c in r["cells"]]
    if fact.get("flagged"):
        assert r["flagged"]


def test_nbgrader_alone_is_fooled_where_the_split_run_is_not(graded):
    """The defences matter: these cases get more points from nbgrader than they deserve."""
    fooled = {}
    for key in [("silenced-tests", HOSTILE_STEM), ("anything-objects", HOSTILE_STEM),
                ("patched-qcourse", "floats"), ("patched-numpy", "floats")]:
        r = graded["by_key"][key]
        fooled[key] = raw_nbgrader(r) - r["score"]
        failing = [c for c in r["cells"] if c["nbgrader"] and not c["split"]]
        assert failing and all(c["score"] == 0 for c in failing)
        assert r["flagged"]
    assert all(v > 0 for v in fooled.values()), fooled


def test_other_students_scores_are_intact(graded):
    """The hostile submissions were graded next to solved ones, which kept full marks."""
    for stem in (HOSTILE_STEM, "floats"):
        r = graded["by_key"]["solution", stem]
        assert r["score"] == r["max_score"] and not r["flagged"]
    tampered = sorted(s["student"] for s in graded["report"]["submissions"]
                      if s["status"] == "tampered")
    assert tampered == [], "in the sandbox the writes fail: there is nothing to detect"


def outputs_of(course: Path, student: str, stem: str) -> str:
    """Everything a graded notebook printed (its cells' outputs, as JSON text)."""
    nb = load(course / "autograded" / student / stem / f"{stem}.ipynb")
    return json.dumps([c.get("outputs", []) for c in nb["cells"]])


def test_hostile_code_is_prevented_not_repaired(graded):
    """Done-when 2 of issue 18, end to end: each attack failed inside the sandbox."""
    course = graded["course"]
    assert graded["connections"] == 0, "a submission reached a listener on 127.0.0.1"
    assert "Connection refused" in outputs_of(course, "opens-socket", HOSTILE_STEM) or (
        "Network is unreachable" in outputs_of(course, "opens-socket", HOSTILE_STEM))
    secrets = set()
    for stem in STEMS:
        found = G.secret_lines(load(course / "source" / stem / f"{stem}.ipynb"))
        secrets |= found["solution"] | found["hidden"]
    for student in ("reads-others", "reads-solutions"):
        text = outputs_of(course, student, HOSTILE_STEM)
        page = (course / "feedback" / student / HOSTILE_STEM / f"{HOSTILE_STEM}.html").read_text()
        leaked = sorted(line for line in secrets if line in text or html.escape(line) in page)
        assert not leaked, f"{student} shows other content: {leaked[:2]}"
        assert "gradebook.db" not in text and "submitted/" not in text
    bomb = outputs_of(course, "fork-bomb", HOSTILE_STEM)
    children = int(re.search(r"fork refused after (\d+) children", bomb).group(1))
    assert 0 < children < 64
    written = int(re.search(r"bytes written: (\d+)", outputs_of(course, "fills-disk",
                                                                 HOSTILE_STEM)).group(1))
    assert written <= 2 * 64 * 2**20
    kill = outputs_of(course, "kills-grader", HOSTILE_STEM)
    assert "PermissionError" in kill or "ProcessLookupError" in kill


def test_every_submission_is_accounted_for(graded):
    report, course = graded["report"], graded["course"]
    graded_keys = {(s["student"], s["stem"]) for s in report["submissions"]}
    assert graded_keys == set(graded["expected"])
    ignored = {item["path"]: item["reason"] for item in report["ignored"]}
    assert set(ignored) == {"notes.txt", "solution/README.md", "blank/no_such_chapter.ipynb",
                            "bad id!"}, ignored
    assert "no released assignment" in ignored["blank/no_such_chapter.ipynb"]
    with sqlite3.connect(course / "gradebook.db") as db:
        rows = set(db.execute("SELECT student.id, assignment.name FROM submitted_assignment "
                              "JOIN student ON student.id = submitted_assignment.student_id "
                              "JOIN assignment ON assignment.id = "
                              "submitted_assignment.assignment_id"))
    assert rows == graded_keys
    for student, stem in graded_keys:
        assert (course / "autograded" / student / stem / f"{stem}.ipynb").is_file()
        assert (course / "feedback" / student / stem / f"{stem}.html").is_file()
        assert (course / "submitted" / student / stem / f"{stem}.ipynb").is_file()
    for student, stem in graded_keys:  # the table printed at the end lists every submission
        assert re.search(rf"^{re.escape(student)}\s+{stem}\s", graded["stdout"], re.M)


def test_huge_output_is_truncated_in_autograded_notebook_and_feedback(graded):
    course = graded["course"]
    nb = course / "autograded" / "huge-output" / HOSTILE_STEM / f"{HOSTILE_STEM}.ipynb"
    page = course / "feedback" / "huge-output" / HOSTILE_STEM / f"{HOSTILE_STEM}.html"
    assert nb.stat().st_size < 1_000_000 and page.stat().st_size < 2_000_000
    assert "output truncated" in nb.read_text()


def test_writes_never_reach_the_course_directory(graded):
    course = graded["course"]
    manifest = load(course / "release.json")
    for stem, entry in manifest["assignments"].items():
        for kind in ("source", "release"):
            data = (course / kind / stem / f"{stem}.ipynb").read_bytes()
            assert sha256(data) == entry[f"{kind}_sha256"], f"{kind}/{stem} was changed"
    assert (course / "source" / "floats" / "floats.ipynb").read_bytes() == graded[
        "source_before"]
    assert not (course / "autograded" / "someone_else").exists()
    assert "get_config" in (course / "nbgrader_config.py").read_text()
    attempt = outputs_of(course, "writes-course", "floats")
    assert "FileNotFoundError" in attempt or "PermissionError" in attempt, "the write failed"
    assert graded["left"] == graded["handed_in"], "the submissions folder is left as handed in"


# ------------------------------------------------------------------------------------------
# 2. The release holds no solution and no hidden test; feedback shows no hidden test.


def released_secrets(source: dict, solutions_public: bool = False) -> tuple[set[str], set[str]]:
    """Independent scan: stripped lines of solution and hidden regions not found elsewhere.

    With ``solutions_public`` (the self-study edition), lines of solutions count as visible.
    """
    public, solution, hidden = set(), set(), set()
    for cell in source["cells"]:
        region = None
        for line in G.cell_source(cell).splitlines():
            if "### BEGIN SOLUTION" in line or "### BEGIN HIDDEN TESTS" in line:
                region = solution if "SOLUTION" in line else hidden
            elif "### END SOLUTION" in line or "### END HIDDEN TESTS" in line:
                region = None
            else:
                (region if region is not None else public).add(line.strip())
    if solutions_public:
        public |= solution
    keep = {line for line in (solution | hidden) - public if len(line) >= 8}
    return keep & solution, keep & hidden


@pytest.mark.parametrize("stem", STEMS)
def test_release_contains_no_solution_and_no_hidden_test(course, stem):
    src = load(course / "source" / stem / f"{stem}.ipynb")
    rel_path = course / "release" / stem / f"{stem}.ipynb"
    text = rel_path.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    solution, hidden = released_secrets(src)
    assert solution and hidden, "the scan must find secrets to look for"
    rel = load(rel_path)
    released = {line.strip() for c in rel["cells"] for line in G.cell_source(c).splitlines()}
    assert not solution & released, sorted(solution & released)[:3]
    assert not hidden & released, sorted(hidden & released)[:3]
    assert G.verify_release(src, rel) == []
    assert [e.points for e in G.exercises(rel)] == [e.points for e in G.exercises(src)]
    for cell in rel["cells"]:
        if G.is_solution(cell):
            assert "raise NotImplementedError()" in G.cell_source(cell)
    student_copy = course.parent / "students" / f"{stem}.ipynb"
    assert student_copy.read_bytes() == rel_path.read_bytes()


def test_verify_release_catches_a_leaked_solution_and_hidden_test(course):
    src = load(course / "source" / "floats" / "floats.ipynb")
    rel = load(course / "release" / "floats" / "floats.ipynb")
    solution, hidden = released_secrets(src)
    leaky = json.loads(json.dumps(rel))
    leaky["cells"][-1]["source"] += "\n" + sorted(solution)[0]
    assert any("solution line" in p for p in G.verify_release(src, leaky))
    leaky = json.loads(json.dumps(rel))
    leaky["cells"][-1]["source"] += "\n" + sorted(hidden)[0]
    assert any("hidden line" in p for p in G.verify_release(src, leaky))


def test_hidden_tests_never_reach_a_learners_traceback(graded):
    """wrong-hidden passes the public checks and fails a hidden test in exercise 1."""
    course = graded["course"]
    hidden = {stem: released_secrets(load(course / "source" / stem / f"{stem}.ipynb"),
                                     solutions_public=True)[1] for stem in STEMS}
    autograded = load(course / "autograded" / "wrong-hidden" / "floats" / "floats.ipynb")
    cell = next(c for c in autograded["cells"] if G.grade_id(c) == "floats_ex1_tests")
    errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
    assert errors, "the hidden test must fail"
    raw_traceback = "\n".join(errors[0]["traceback"])
    assert any(line in raw_traceback for line in hidden["floats"]), "nbgrader's traceback quotes it"
    for student, stem in graded["expected"]:
        page = (course / "feedback" / student / stem / f"{stem}.html").read_text()
        lines = {line.strip() for line in html.unescape(re.sub(r"<[^>]+>", "", page))
                 .splitlines()}
        leaked = hidden[stem] & lines
        assert not leaked, f"{student}'s {stem} feedback shows hidden tests: {sorted(leaked)[:2]}"
    page = (course / "feedback" / "wrong-hidden" / "floats" / "floats.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "AssertionError" in text and "hidden tests ran here" in text
    assert G.PUBLIC_PASS_MESSAGE in text


@pytest.mark.parametrize("stem", STEMS)
def test_public_checks_speak_to_learners(stem):
    """Scan: public checks carry messages, then say that hidden tests run at grading time."""
    nb = load(NOTEBOOKS / f"{stem}.ipynb")
    tests = [c for c in nb["cells"] if G.is_test(c)]
    assert len(tests) >= 4, "at least four graded exercises"
    for cell in tests:
        gid = G.grade_id(cell)
        public = G.public_part(G.cell_source(cell))
        tree = ast.parse(public)
        asserts = [n for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert asserts, f"{gid}: no public check"
        bare = [ast.unparse(a) for a in asserts if a.msg is None]
        assert not bare, f"{gid}: public asserts without a message: {bare[:2]}"
        last = tree.body[-1]
        assert isinstance(last, ast.Expr) and ast.unparse(last.value) == (
            f"print({G.PUBLIC_PASS_MESSAGE!r})"), f"{gid}: must end by saying hidden tests run"
        assert G.hidden_part(G.cell_source(cell)).strip(), f"{gid}: no hidden tests"


# ------------------------------------------------------------------------------------------
# 4. The gradebook: real sqlite, deterministic, survives a crash.


def gradebook_snapshot(course: Path) -> dict:
    with sqlite3.connect(course / "gradebook.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        grades = sorted(db.execute(
            "SELECT student.id, assignment.name, base_cell.name, grade.auto_score, "
            "grade.manual_score, grade.needs_manual_grade FROM grade "
            "JOIN submitted_notebook ON submitted_notebook.id = grade.notebook_id "
            "JOIN submitted_assignment ON submitted_assignment.id = "
            "submitted_notebook.assignment_id "
            "JOIN student ON student.id = submitted_assignment.student_id "
            "JOIN assignment ON assignment.id = submitted_assignment.assignment_id "
            "JOIN base_cell ON base_cell.id = grade.cell_id"))
        flags = sorted(db.execute(
            "SELECT student.id, submitted_notebook.flagged FROM submitted_notebook "
            "JOIN submitted_assignment ON submitted_assignment.id = "
            "submitted_notebook.assignment_id "
            "JOIN student ON student.id = submitted_assignment.student_id"))
        comments = sorted(db.execute(
            "SELECT student.id, base_cell.name, comment.auto_comment, comment.manual_comment "
            "FROM comment JOIN base_cell ON base_cell.id = comment.cell_id "
            "JOIN submitted_notebook ON submitted_notebook.id = comment.notebook_id "
            "JOIN submitted_assignment ON submitted_assignment.id = "
            "submitted_notebook.assignment_id "
            "JOIN student ON student.id = submitted_assignment.student_id"), key=repr)
        counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        late = sorted(db.execute(
            "SELECT student.id, assignment.name, submitted_notebook.late_submission_penalty "
            "FROM submitted_notebook JOIN submitted_assignment ON submitted_assignment.id = "
            "submitted_notebook.assignment_id "
            "JOIN student ON student.id = submitted_assignment.student_id "
            "JOIN assignment ON assignment.id = submitted_assignment.assignment_id"), key=repr)
        students = sorted(db.execute("SELECT id, first_name, last_name, email FROM student"),
                          key=repr)
    return {"grades": grades, "flags": flags, "comments": comments, "counts": counts,
            "late": late, "students": students}


def test_gradebook_is_a_real_sqlite_file_exported_as_csv(graded):
    course = graded["course"]
    assert (course / "gradebook.db").read_bytes()[:16] == b"SQLite format 3\x00"
    snapshot = gradebook_snapshot(course)
    assert snapshot["counts"]["submitted_assignment"] == len(graded["by_key"])
    lines = (course / "grades.csv").read_text().splitlines()
    assert lines[0].startswith("assignment,duedate,timestamp,student_id")
    rows = {(r.split(",")[0], r.split(",")[3]): float(r.split(",")[9]) for r in lines[1:]}
    for (student, stem), r in graded["by_key"].items():
        assert rows[stem, student] == r["score"]
    by_cell = (course / "grades_by_cell.csv").read_text().splitlines()
    assert by_cell[0].startswith("student_id,assignment,grade_id,points,nbgrader,split_run")
    assert len(by_cell) - 1 == sum(len(r["cells"]) for r in graded["by_key"].values())
    stamp = [r for r in lines if r.startswith("floats,") and ",patched-numpy," in r][0]
    assert "2026-03-01 12:00:00" in stamp, "the submission's timestamp.txt is kept"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A one-notebook course, its basic submissions, and their expected scores."""
    root = tmp_path_factory.mktemp("small")
    check(cli("release", "--course", str(root / "pristine"), "--stems", SMALL_STEM))
    src = load(root / "pristine" / "source" / SMALL_STEM / f"{SMALL_STEM}.ipynb")
    rel = load(root / "pristine" / "release" / SMALL_STEM / f"{SMALL_STEM}.ipynb")
    subs, expected = root / "subs", {}
    for case in G.drill_submissions(src, rel):
        if case.name in BASIC:
            (subs / case.name).mkdir(parents=True)
            (subs / case.name / f"{SMALL_STEM}.ipynb").write_text(case.content)
            expected[case.name] = case.expected
    return {"root": root, "subs": subs, "expected": expected}


@pytest.fixture(scope="module")
def recovered(small):
    """Grading killed right after its first submission was written, then run again."""
    course = small["root"] / "crashed"
    shutil.copytree(small["root"] / "pristine", course)
    cmd = [sys.executable, "-m", "qcourse.grading", "grade", str(small["subs"]), "--course",
           str(course), "--timeout", str(CELL_TIMEOUT), "--jobs", "1", "--no-feedback", "-v"]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        for line in proc.stderr:
            if line.startswith("graded "):
                break
        proc.send_signal(signal.SIGKILL)  # a crash, right after one submission was committed
        proc.wait(30)
    after_crash = gradebook_snapshot(course)
    check(cli("grade", str(small["subs"]), "--course", str(course), "--timeout",
              str(CELL_TIMEOUT), "--no-feedback"))
    return {"course": course, "after_crash": after_crash, "final": gradebook_snapshot(course)}


def test_a_crash_mid_grading_loses_nothing_and_doubles_nothing(small, recovered):
    assert recovered["after_crash"]["counts"]["submitted_assignment"] == 1
    assert len({g[0] for g in recovered["after_crash"]["grades"]}) == 1
    final = recovered["final"]
    assert final["counts"]["submitted_assignment"] == len(BASIC)
    n_cells = len(next(iter(small["expected"].values())))
    assert final["counts"]["grade"] == len(BASIC) * n_cells
    got = {(student, gid): score for student, _, gid, score, _, _ in final["grades"]}
    want = {(case, gid): p for case, exp in small["expected"].items() for gid, p in exp.items()}
    assert got == want


def test_unsandboxed_grading_still_detects_and_repairs(small):
    """--no-sandbox (trusted submissions only): writes are detected, undone and score zero."""
    course = small["root"] / "unsandboxed"
    shutil.copytree(small["root"] / "pristine", course)
    src = load(course / "source" / SMALL_STEM / f"{SMALL_STEM}.ipynb")
    rel = load(course / "release" / SMALL_STEM / f"{SMALL_STEM}.ipynb")
    subs = small["root"] / "unsandboxed-subs"
    cases = {c.name: c for c in G.drill_submissions(src, rel, sandboxed=False)}
    assert "fork-bomb" not in cases, "never generated for unsandboxed grading"
    for name in ("solution", "writes-outside", "kills-grader"):
        (subs / name).mkdir(parents=True)
        (subs / name / f"{SMALL_STEM}.ipynb").write_text(cases[name].content)
    before = (course / "source" / SMALL_STEM / f"{SMALL_STEM}.ipynb").read_bytes()
    check(cli("grade", str(subs), "--course", str(course), "--timeout", str(CELL_TIMEOUT),
              "--no-feedback", "--no-sandbox"))
    by = {s["student"]: s for s in load(course / "grading-report.json")["submissions"]}
    assert by["writes-outside"]["status"] == "tampered" and by["writes-outside"]["score"] == 0
    assert by["kills-grader"]["status"] == "failed" and by["kills-grader"]["score"] == 0
    assert by["solution"]["score"] == by["solution"]["max_score"]
    assert (course / "source" / SMALL_STEM / f"{SMALL_STEM}.ipynb").read_bytes() == before


def test_grading_twice_gives_the_same_gradebook(small, recovered):
    check(cli("grade", str(small["subs"]), "--course", str(recovered["course"]), "--timeout",
              str(CELL_TIMEOUT), "--no-feedback"))
    assert gradebook_snapshot(recovered["course"]) == recovered["final"]


# ------------------------------------------------------------------------------------------
# Units of the defences (no nbgrader needed).


def rebuild(rel: dict, cells: list[dict]) -> tuple[dict, list[str], bool]:
    return G.canonical_submission(rel, json.dumps(rel | {"cells": cells}))


def test_canonical_submission_restores_the_release_around_the_students_answers(course):
    rel = load(course / "release" / "floats" / "floats.ipynb")
    ids = [G.grade_id(c) for c in rel["cells"]]
    cells = json.loads(json.dumps(rel["cells"]))
    sol = next(c for c in cells if G.grade_id(c) == "floats_ex1_solution")
    sol["source"] = "def decode_fp16(bits):\n    return 1.0\n"
    test = next(c for c in cells if G.grade_id(c) == "floats_ex1_tests")
    test["source"] = "pass"
    test["metadata"]["nbgrader"]["points"] = 99
    del cells[ids.index("floats_ex2_tests")]
    cells.insert(3, {"cell_type": "code", "metadata": {"nbgrader": {"grade": True}},
                     "source": "helper = 1", "outputs": [], "execution_count": 3})
    nb, notes, readable = rebuild(rel, cells)
    assert readable
    got = [G.grade_id(c) for c in nb["cells"] if G.grade_id(c)]
    assert got == [i for i in ids if i], "every release cell, in release order"
    by_id = {G.grade_id(c): c for c in nb["cells"] if G.grade_id(c)}
    assert G.cell_source(by_id["floats_ex1_solution"]) == sol["source"]
    assert by_id["floats_ex1_tests"] == rel["cells"][ids.index("floats_ex1_tests")]
    extra = [c for c in nb["cells"] if not G.grade_id(c)]
    assert [G.cell_source(c) for c in extra] == ["helper = 1"] and extra[0]["metadata"] == {}
    text = " ".join(notes)
    assert "floats_ex2_tests" in text and "Edits to locked cells" in text
    assert "metadata" in text


@pytest.mark.parametrize("content", ["", "{", "[]", '{"cells": 3}', '{"nbformat": 3, "cells": []}',
                                     "\xff\xfe"], ids=["empty", "truncated", "list", "cells",
                                                     "old", "binary"])
def test_unreadable_submission_becomes_the_blank_release(course, content):
    rel = load(course / "release" / "floats" / "floats.ipynb")
    nb, notes, readable = G.canonical_submission(rel, content.encode("latin-1"))
    assert not readable and nb["cells"] == rel["cells"] and "not a readable notebook" in notes[0]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class Sub(int):
    """An int that is not an int: the tests must not receive one."""


def test_the_channel_from_the_students_process_carries_only_plain_data():
    def decode(obj):
        return channel.ReplyUnpickler(io.BytesIO(pickle.dumps(obj, protocol=5)), None).load()

    import qcourse.floats as F

    for value in [1, -0.0, float("nan"), "x", b"y", (1, [2, {3: 4}]), {1, 2}, 1 + 2j,
                  np.arange(6, dtype=np.int8).reshape(2, 3), np.float32(1.5), np.dtype("i4"),
                  F.FP16, slice(1, 2), range(3)]:
        back = decode(value)
        assert type(back) is type(value)
        assert repr(back) == repr(value) or np.array_equal(back, value)
    for bad in [Evil(), os.system, print, channel.RemoteObject, Sub(3), [1, Sub(2)]]:
        with pytest.raises(pickle.UnpicklingError):
            decode(bad)
    assert not channel.is_plain(Sub(3))
    assert channel.is_plain(np.zeros(3)) and channel.is_plain(F.FP16)


def test_student_objects_do_not_compare_equal_to_anything():
    remote = channel.RemoteObject(None, 0)  # no process: comparisons must not need one
    assert remote != 1.0 and not remote == (1, 2) and remote == remote and bool(remote)
    with pytest.raises(AttributeError):
        remote.__eq__ = None
    with pytest.raises(channel.StudentCodeError):
        channel.raise_student_exception("SecretError", "x")
    with pytest.raises(ValueError, match="bad input"):
        channel.raise_student_exception("ValueError", "bad input")
    with pytest.raises(KeyError) as info:
        channel.raise_student_exception("KeyError", "'k'", pickle.dumps(("k",), protocol=5))
    assert info.value.args == ("k",)
    with pytest.raises(channel.StudentTimeout):
        channel.raise_student_exception("KeyboardInterrupt", "")


def notebook(*cells: tuple) -> dict:
    """A small nbgrader notebook of ("locked", src), ("solution", id, src), ("test", id, src)."""
    out = []
    for kind, *rest in cells:
        gid, src = rest if len(rest) == 2 else (f"locked{len(out)}", rest[0])
        meta = {"grade": kind == "test", "grade_id": gid, "locked": kind != "solution",
                "schema_version": 3, "solution": kind == "solution", "task": False}
        if kind == "test":
            meta["points"] = 1
        out.append({"cell_type": "code", "execution_count": None, "outputs": [],
                    "metadata": {"nbgrader": meta}, "source": textwrap.dedent(src)})
    return {"cells": out, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def with_answers(source: dict, **answers: str) -> dict:
    nb = json.loads(json.dumps(source))
    for cell in nb["cells"]:
        if G.grade_id(cell) in answers:
            cell["source"] = textwrap.dedent(answers[G.grade_id(cell)])
    return nb


def split(source: dict, student: dict, tmp_path: Path) -> dict[str, bool]:
    passed = {e.test_id: True for e in G.exercises(source)}
    verdicts = G.split_run(source, student, tmp_path, 10, passed)
    return {gid: v.passed for gid, v in verdicts.items()}


SPLIT_CASES = {
    # an exercise whose answer is a class: its calls cannot be recorded, so no shortcut
    "class": notebook(
        ("solution", "s1", """\
            class Acc:
                def __init__(self):
                    self.total = 0

                def add(self, x):
                    self.total += x
                    return self.total
            """),
        ("test", "t1", "a = Acc()\nassert a.add(2) == 2, 'first'\nassert a.add(3) == 5, 'sum'")),
    # a function kept under another name by one test cell and used by the next
    "alias": notebook(
        ("solution", "s1", "def double(x):\n    return 2 * x\n"),
        ("test", "t1", "f = double\nassert f(2) == 4, 'two'"),
        ("test", "t2", "assert f(3) == 6, 'three'")),
    # a locked cell after the solution that calls it
    "helper": notebook(
        ("solution", "s1", "def double(x):\n    return 2 * x\n"),
        ("locked", "CHECK = double(10)"),
        ("test", "t1", "assert CHECK == 20, 'ten'")),
    # a function that must not change its argument, and one that must raise ValueError
    "mutation": notebook(
        ("solution", "s1", "def total(xs):\n    return sum(xs)\n"),
        ("test", "t1", "xs = [1, 2]\nassert total(xs) == 3, 'sum'\nassert xs == [1, 2], 'kept'")),
    "raises": notebook(
        ("solution", "s1", "def positive(x):\n    if x < 0:\n        raise ValueError('neg')\n"
                           "    return x\n"),
        ("test", "t1", "try:\n    positive(-1)\nexcept ValueError:\n    pass\nelse:\n"
                       "    raise AssertionError('must raise')\nassert positive(2) == 2, 'id'")),
    # an exception whose arguments the test reads
    "arguments": notebook(
        ("solution", "s1", "def check(x):\n    raise ValueError('bad', x)\n"),
        ("test", "t1", "try:\n    check(3)\nexcept ValueError as e:\n"
                       "    assert e.args == ('bad', 3), 'arguments'")),
}
WRONG = {
    "class": {"s1": "class Acc:\n    def add(self, x):\n        return 2 if x == 2 else 0\n"},
    "alias": {"s1": "def double(x):\n    return 4 if x == 2 else 0\n"},
    "helper": {"s1": "def double(x):\n    return 2 * x if x != 10 else 0\n"},
    "mutation": {"s1": "def total(xs):\n    xs.append(0)\n    return 3\n"},
    "raises": {"s1": "def positive(x):\n    if x < 0:\n        raise TypeError('neg')\n"
                     "    return x\n"},
    "arguments": {"s1": "def check(x):\n    raise ValueError(str(('bad', x)))\n"},
}
WRONG_VERDICT = {"class": {"t1": False}, "alias": {"t1": True, "t2": False},
                 "helper": {"t1": False}, "mutation": {"t1": False}, "raises": {"t1": False},
                 "arguments": {"t1": False}}


# Right, but not byte-for-byte the reference's answers: the split run must run the tests for real,
# in a namespace holding what the earlier test cells defined (here `f`, from the first one).
OTHER_RIGHT = {"alias": {"s1": "def double(x):\n    return 4 if x == 2 else float(2 * x)\n"},
               "mutation": {"s1": "def total(xs):\n    return float(xs[0] + xs[1])\n"}}


@pytest.mark.parametrize("name", sorted(OTHER_RIGHT))
def test_split_run_passes_right_answers_that_differ_from_the_reference(name, tmp_path):
    source = SPLIT_CASES[name]
    assert set(split(source, with_answers(source, **OTHER_RIGHT[name]), tmp_path).values()) == {
        True}


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_split_run_is_exact_for_right_and_wrong_answers(name, tmp_path):
    """The split run's shortcut (answers identical to the reference) is never taken wrongly."""
    source = SPLIT_CASES[name]
    assert set(split(source, source, tmp_path).values()) == {True}
    assert split(source, with_answers(source, **WRONG[name]), tmp_path) == WRONG_VERDICT[name]


def test_course_directory_cannot_be_inside_the_notebooks(tmp_path):
    with pytest.raises(G.GradingError, match="must not be inside"):
        G.release(NOTEBOOKS / "course", notebooks_dir=NOTEBOOKS)
    proc = cli("release", "--course", str(NOTEBOOKS))
    assert proc.returncode == 2 and "must not be inside" in proc.stderr
    assert not (NOTEBOOKS / "source").exists() and not (NOTEBOOKS / "nbgrader_config.py").exists()


def test_grading_refuses_a_course_without_release(tmp_path):
    (tmp_path / "subs").mkdir()
    proc = cli("grade", str(tmp_path / "subs"), "--course", str(tmp_path / "none"))
    assert proc.returncode == 2 and "no release" in proc.stderr


# ------------------------------------------------------------------------------------------
# Self-study edition and the instructor's chapter.


@pytest.mark.parametrize("stem", STEMS)
def test_self_study_page_folds_solutions_and_hides_hidden_tests(stem, tmp_path):
    page = G.write_self_study_pages([NOTEBOOKS / f"{stem}.ipynb"], tmp_path)[0].read_text()
    src = load(NOTEBOOKS / f"{stem}.ipynb")
    assert page.startswith("---\njupytext:") and f"(self-study-{stem})=" in page
    assert "BEGIN SOLUTION" not in page and "BEGIN HIDDEN TESTS" not in page
    blocks = re.findall(r"```+\{code-cell\} ipython3\n(?::tags: \[([^\]]*)\]\n\n|---\n"
                        r"tags: \[([^\]]*)\]\n(?:.*?\n)?---\n)?(.*?)\n```+", page, re.S)
    tags = [t1 or t2 for t1, t2, _ in blocks]
    blocks = [(t, code) for t, (_, _, code) in zip(tags, blocks, strict=True)]
    n_solution = sum(G.is_solution(c) for c in src["cells"])
    assert tags.count("hide-input") == n_solution
    # the toggle over each solution says "Solution", not MyST-NB's "Show code cell source"
    assert page.count("  code_prompt_show: Solution\n") == n_solution
    assert tags.count("remove-cell") == len(G.exercises(src))
    visible = {line.strip() for t, code in blocks if t != "remove-cell"
               for line in code.splitlines()}
    _, hidden = released_secrets(src, solutions_public=True)
    assert not hidden & visible, sorted(hidden & visible)[:3]
    assert page.count(G.PUBLIC_PASS_MESSAGE) == len(G.exercises(src))
    committed = ROOT / "book" / "exercises" / f"{stem}.md"
    if committed.is_file():
        assert committed.read_text() == page, f"{committed} is stale: regenerate it"


# ------------------------------------------------------------------------------------------
# The package's shape: small files that name their parts, short functions.

GRADING_DIR = ROOT / "qcourse" / "grading"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 60


def grading_budget_offenders(package: Path) -> list[str]:
    """Files over MAX_FILE_LINES; functions over MAX_FUNCTION_LINES without a reason.

    A long function states why on a ``# long because:`` line inside it or just above it.
    """
    offenders = []
    for path in sorted(package.glob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            offenders.append(f"{path.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            reason = any("# long because:" in line
                         for line in lines[max(first - 3, 0):node.end_lineno])
            if length > MAX_FUNCTION_LINES and not reason:
                offenders.append(f"{path.name}: {node.name} has {length} lines")
    return offenders


def test_grading_package_files_and_functions_stay_small(tmp_path):
    assert grading_budget_offenders(GRADING_DIR) == []
    # the check itself: a 501-line file and a 61-line function are reported by name
    (tmp_path / "big.py").write_text("x = 1\n" * 501)
    body = "".join(f"    y{k} = {k}\n" for k in range(60))
    (tmp_path / "long.py").write_text(f"def stretched():\n{body}")
    (tmp_path / "reasoned.py").write_text(f"def stretched():\n    # long because: a test\n{body}")
    assert grading_budget_offenders(tmp_path) == ["big.py: 501 lines",
                                                  "long.py: stretched has 61 lines"]


# ------------------------------------------------------------------------------------------
# How long a class takes: the recorded simulated class the chapter shows (throughput.py).


def test_the_recorded_class_is_what_simulate_writes(tmp_path):
    """nbgrader/simulated-class.json is a record of `qcourse-course simulate --out`: the same
    fields as a run made now (a class of 3), consistent, and every score as expected."""
    import datetime

    from qcourse.grading.throughput import recorded_class_timing

    out = tmp_path / "simulated.json"
    check(cli("simulate", "--course", str(tmp_path / "course"), "--students", "3", "--jobs", "1",
              "--out", str(out)))
    live, rec = load(out), recorded_class_timing()
    assert live["wrong_scores"] == [] and live["mix"] == {"solution": 3}
    assert set(rec) == set(live) and set(rec["machine"]) == set(live["machine"])
    assert rec["wrong_scores"] == [] and rec["sandbox"] is True
    assert rec["students"] >= 20 and sum(rec["mix"].values()) == rec["students"]
    assert {"solution", "partial", "blank", "fork-bomb", "writes-outside"} <= set(rec["mix"])
    assert rec["seconds_per_submission"] == pytest.approx(rec["wall_seconds"] / rec["students"],
                                                          abs=0.01)
    assert rec["cpu_seconds_per_submission"] == pytest.approx(
        rec["cpu_seconds"] / rec["students"], abs=0.01)
    assert f"--students {rec['students']} " in rec["command"]
    assert datetime.datetime.fromisoformat(rec["measured_at"]).year >= 2026


# ------------------------------------------------------------------------------------------
# A class: roster, due date and late penalty, LMS exports (qcourse/grading/classroom.py).

ROSTER = """\
id,first_name,last_name,email
solution,Ada,Lovelace,ada@example.org
partial,Ben,Okri,ben@example.org
blank,Cy,Young,cy@example.org
absent,Dee,Jones,dee@example.org
"""
DUE = "2026-03-01T12:00:00+00:00"
HANDED_IN = {"solution": "2026-03-01 11:00:00.000000 UTC",   # on time
             "partial": "2026-03-02 23:30:00.000000 UTC",    # 35.5 h late: 2 started days
             "blank": "2026-03-01 12:10:00.000000 UTC"}      # within the 15 min grace


@pytest.fixture(scope="module")
def classroom(small):
    course = small["root"] / "class"
    shutil.copytree(small["root"] / "pristine", course)
    (small["root"] / "roster.csv").write_text(ROSTER)
    check(cli("roster", str(small["root"] / "roster.csv"), "--course", str(course)))
    check(cli("due", SMALL_STEM, DUE, "--course", str(course)))
    subs = small["root"] / "class-subs"
    for student, stamp in HANDED_IN.items():
        folder = subs / student / SMALL_STEM
        folder.mkdir(parents=True)
        shutil.copy(small["subs"] / student / f"{SMALL_STEM}.ipynb", folder)
        (folder / "timestamp.txt").write_text(stamp)
    exports, gradebooks = [], []
    for _ in range(2):  # grading the class twice gives the same gradebook and grades
        check(cli("grade", str(subs), "--course", str(course), "--timeout", str(CELL_TIMEOUT),
                  "--no-feedback"))
        gradebooks.append(gradebook_snapshot(course))
        for lms in ("canvas", "moodle"):
            check(cli("export", "--lms", lms, "--out", str(course / f"{lms}.csv"), "--course",
                      str(course)))
        exports.append({lms: (course / f"{lms}.csv").read_text() for lms in ("canvas", "moodle")})
    report = {s["student"]: s for s in load(course / "grading-report.json")["submissions"]}
    return {"course": course, "exports": exports, "report": report, "gradebooks": gradebooks}


def test_the_roster_is_imported_into_the_gradebook(classroom):
    """Every roster line becomes nbgrader's student row, names and email as written."""
    rows = list(csv.reader(io.StringIO(ROSTER)))
    want = sorted((tuple(r) for r in rows[1:]), key=repr)
    assert rows[0] == ["id", "first_name", "last_name", "email"]
    assert classroom["gradebooks"][0]["students"] == want


def test_grading_a_class_twice_gives_the_same_gradebook(classroom):
    first, second = classroom["gradebooks"]
    assert first["late"] and any(penalty for *_, penalty in first["late"]), first["late"]
    assert first == second


def test_late_work_loses_ten_percent_per_started_day(classroom, small):
    report = classroom["report"]
    partial = sum(small["expected"]["partial"].values())
    assert report["partial"]["score"] == partial > 0
    assert report["partial"]["seconds_late"] == 35.5 * 3600
    assert report["partial"]["late_penalty"] == pytest.approx(0.2 * partial)
    assert report["solution"]["late_penalty"] == 0 and report["blank"]["late_penalty"] == 0
    from qcourse.grading.late import late_penalty

    assert late_penalty(10, 15 * 60, 10, grace_minutes=15) == 0
    assert late_penalty(10, 15 * 60 + 1, 10, grace_minutes=15) == 1
    assert late_penalty(10, 86_400 + 15 * 60 + 1, 10, grace_minutes=15) == 2
    assert late_penalty(10, 30 * 86_400, 10) == 10 and late_penalty(0, 10**6, 10) == 0


# The identity columns each LMS documents for a grade import, written out here (not read from
# the code under test): Canvas, Instructure's "How do I import grades in the Gradebook?" (the
# columns of its gradebook export); Moodle, "Import grades" (CSV) with the identity columns of
# its plain-text grade export. Each further column is one assignment, named by its header.
DOCUMENTED_LAYOUTS = {
    "canvas": ("Student", "ID", "SIS User ID", "SIS Login ID", "Section"),
    "moodle": ("First name", "Last name", "ID number", "Email address"),
}


def test_lms_exports_follow_the_documented_layouts(classroom, small):
    partial = 0.8 * sum(small["expected"]["partial"].values())
    full = sum(small["expected"]["solution"].values())
    first, second = classroom["exports"]
    assert first == second, "grading the class twice changed the export"
    want = {"solution": full, "partial": partial, "blank": 0.0, "absent": 0.0}
    for lms, layout in DOCUMENTED_LAYOUTS.items():
        rows = list(csv.DictReader(io.StringIO(first[lms])))
        assert list(rows[0]) == [*layout, SMALL_STEM], lms
        key = "SIS User ID" if lms == "canvas" else "ID number"
        assert {r[key]: float(r[SMALL_STEM]) for r in rows} == pytest.approx(want), lms
    canvas = {r["SIS User ID"]: r for r in csv.DictReader(io.StringIO(first["canvas"]))}
    assert canvas["partial"]["Student"] == "Okri, Ben"
    moodle = {r["ID number"]: r for r in csv.DictReader(io.StringIO(first["moodle"]))}
    assert moodle["absent"]["Email address"] == "dee@example.org"


@pytest.mark.parametrize("text, problem", [
    ("name,email\nx,x@example.org\n", "needs an 'id' column"),
    ("id,email,phone\nx,x@example.org,1\n", "unknown roster columns"),
    ("id,email\nbad id,x@example.org\n", "line 2: 'bad id' is not a valid student id"),
    ("id\nx\nx\n", "line 3: student 'x' appears twice"),
    ("id,email\nx,not-an-email\n", "line 2: 'not-an-email' is not an email"),
])
def test_a_bad_roster_is_refused_with_the_line(tmp_path, text, problem):
    from qcourse.grading.classroom import read_roster

    (tmp_path / "roster.csv").write_text(text)
    with pytest.raises(G.GradingError, match=re.escape(problem)):
        read_roster(tmp_path / "roster.csv")
