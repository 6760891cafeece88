"""A class on the course's JupyterHub (nbgrader/hub/): the whole nbgrader exchange, as lived.

JupyterHub from PyPI with configurable-http-proxy from npm (``make hub``) on 127.0.0.1, three
real local accounts (an instructor and two students, made with ``useradd`` and removed after),
each logging in through the Hub and working in their own JupyterLab server:

- the instructor, in a terminal, makes the course (``qcourse-course release``), imports the
  roster, and from the formgrader releases the assignment to the exchange;
- each student fetches it from the assignment list (ada in headless Chromium: she logs in on
  the Hub's page, opens Nbgrader > Assignment List in JupyterLab and clicks Fetch; ben through
  the list's API), writes answers, and submits: ben twice (the blank notebook, then his
  answers: the later one counts), ada after the due date;
- the instructor collects from the formgrader, grades in a terminal (``qcourse-course grade``:
  every kernel in the sandbox, as the instructor's account, not root), and releases feedback
  from the formgrader; the students fetch it;
- the scores, the late penalty and the Canvas export are checked against what the submissions
  must score, and every process the test started is stopped by PID, none of the accounts' left.

It needs root (``useradd``; the Hub starts servers as the accounts) and ``make hub``; it takes
a few minutes, so it runs only when ``QCOURSE_HUB_TEST=1``: ``make hub-test``, which ``.ci/run``
runs as its own step after ``make test`` (outside the suite's time budget).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from browser_support import chromium_browser, chromium_executable, guarded_page, screenshot_path
from hub_support import USER_PYTHON, Hub, HubUser, LocalAccounts, alive, hub_missing

from qcourse.grading.classroom import LMS_LAYOUTS
from qcourse.grading.drills import drill_submissions
from qcourse.grading.late import late_penalty

STEM = "fixed_point"
COURSE_ID = "qcourse"
HUB_DIR = Path(__file__).resolve().parent.parent / "nbgrader" / "hub"

pytestmark = [
    pytest.mark.skipif(os.environ.get("QCOURSE_HUB_TEST") != "1",
                       reason="QCOURSE_HUB_TEST is unset: `make hub-test` runs it (.ci/run)"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd (the Hub starts servers as local users)"),
    pytest.mark.skipif(hub_missing() is not None, reason=str(hub_missing())),
    pytest.mark.skipif(chromium_executable() is None or find_spec("playwright") is None,
                       reason="needs Chromium and Playwright (a student uses the assignment list)"),
]


@pytest.fixture
def scratch():
    """A folder every account can reach (pytest's own tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="qcourse-hub-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def accounts(scratch):
    people = LocalAccounts(scratch, ["teach", "ada", "ben"])
    yield people
    people.remove()


def terminal(accounts: LocalAccounts, role: str, *args: str) -> str:
    """``python -m qcourse.grading ARGS`` as the account of ``role``, as in its terminal."""
    proc = accounts.run(role, [str(USER_PYTHON), "-m", "qcourse.grading", *args], env={
        "JUPYTER_CONFIG_PATH": f"{HUB_DIR / 'instructor'}:{HUB_DIR / 'common'}"})
    assert proc.returncode == 0, f"qcourse-course {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def formgrader(user: HubUser, action: str) -> dict:
    reply = user.post(f"formgrader/api/assignment/{STEM}/{action}").json()
    assert reply.get("success"), f"formgrader {action}: {reply}"
    return reply


def assignment(user: HubUser, action: str | None = None) -> dict:
    """The assignment as the student's assignment list shows it (after ``action``, if any)."""
    if action is None:
        listing = user.get("assignments", params={"course_id": COURSE_ID}).json()
    else:
        listing = user.post(f"assignments/{action}",
                            data={"course_id": COURSE_ID, "assignment_id": STEM}).json()
    assert listing.get("success"), f"{action}: {listing}"
    found = [a for a in listing["value"] if a["assignment_id"] == STEM]
    assert found, listing
    return {a["status"]: a for a in found}


def hand_in(user: HubUser, content: str) -> None:
    """Write ``content`` over the fetched notebook (as the student saving it), then submit."""
    user.put(f"api/contents/{STEM}/{STEM}.ipynb",
             json={"type": "notebook", "format": "json", "content": json.loads(content)})
    assert "submitted" in assignment(user, "submit")


def fetch_in_the_browser(student: HubUser) -> None:
    """Log in on the Hub's page, open Nbgrader > Assignment List, click the release's Fetch.

    Headless Chromium (Debian's, through Playwright) may reach 127.0.0.1 only; the page must
    make no failed request and log no error (``Guard``).
    """
    with chromium_browser() as browser, guarded_page(browser, 1400, 900, 120_000) as page:
        page.goto(f"{student.hub.url}/hub/login")
        page.fill("input[name=username]", student.name)
        page.fill("input[name=password]", student.password)
        page.click("input[type=submit], button[type=submit]")
        page.wait_for_url(re.compile(rf"/user/{student.name}/lab"), timeout=300_000)
        page.get_by_role("menuitem", name="Nbgrader", exact=True).click()
        page.get_by_role("menuitem", name="Assignment List", exact=True).click()
        released = page.locator("#released_assignments_list")
        row = released.locator(".list_item:not(.nested_list_item)", has_text=STEM)
        row.wait_for(timeout=120_000)
        assert COURSE_ID in row.inner_text()
        row.get_by_role("button", name="Fetch").click()
        fetched = page.locator("#fetched_assignments_list .list_item:not(.nested_list_item)",
                               has_text=STEM)
        fetched.wait_for(timeout=120_000)
        page.screenshot(path=str(screenshot_path("hub-assignment-list")))
        assert not page.guard.problems(), page.guard.problems()


def test_a_class_on_the_hub(scratch, accounts):
    teach, ada, ben = (accounts.names[r] for r in ("teach", "ada", "ben"))
    exchange = scratch / "exchange"
    exchange.mkdir()
    exchange.chmod(0o777)  # nbgrader's exchange: every account writes its own part
    roster = scratch / "roster.csv"
    roster.write_text("id,first_name,last_name,email\n"
                      f"{ada},Ada,Lovelace,ada@example.org\n{ben},Ben,Okri,ben@example.org\n")
    roster.chmod(0o644)
    course = accounts.home("teach") / "course"  # not ~/qcourse: it would shadow the package

    # the instructor's terminal: the course, the roster, a class with no grace period
    started = time.monotonic()
    terminal(accounts, "teach", "release", "--course", str(course), "--stems", STEM)
    terminal(accounts, "teach", "roster", str(roster), "--course", str(course))
    with open(course / "nbgrader_config.py", "a") as config:
        config.write("\nc.PercentPerDayPenalty.grace_minutes = 0.0  # this class: no grace\n")

    print(f"release: {time.monotonic() - started:.0f} s")
    state = scratch / "hub-state"
    state.mkdir(mode=0o700)
    hub = Hub(state, {"QCOURSE_INSTRUCTORS": teach, "QCOURSE_ROSTER": str(roster),
                      "QCOURSE_EXCHANGE": str(exchange)},
              ["--JupyterHub.authenticator_class=dummy", "--DummyAuthenticator.password=pw"])
    try:
        started = time.monotonic()
        hub.wait_ready()
        users = {name: HubUser(hub, name, "pw") for name in (teach, ada, ben)}
        for user in users.values():  # all three start at once, as a class would
            user.start_server()
        for user in users.values():
            user.wait_server()
        print(f"servers ready: {time.monotonic() - started:.0f} s")
        _live_the_exchange(accounts, users[teach], users[ada], users[ben], course)
    finally:
        left = hub.stop()
    assert left == [], f"still running after the Hub stopped: {left}"
    assert not alive(hub.proc.pid) and not (hub.proxy_pid and alive(hub.proxy_pid))
    assert accounts.leftovers() == [], "every user's server stops with the Hub"


def _live_the_exchange(accounts: LocalAccounts, teach: HubUser, ada: HubUser, ben: HubUser,
                       course: Path) -> None:
    source = json.loads((course / "source" / STEM / f"{STEM}.ipynb").read_text())
    released = json.loads((course / "release" / STEM / f"{STEM}.ipynb").read_text())
    cases = {c.name: c for c in drill_submissions(source, released)}

    formgrader(teach, "release")
    # ada logs in with Chromium and fetches from JupyterLab's assignment list, as she would;
    # ben's server is driven through the same list's API
    started = time.monotonic()
    fetch_in_the_browser(ada)
    print(f"ada in Chromium: {time.monotonic() - started:.0f} s")
    assert "fetched" in assignment(ada)
    assert "released" in assignment(ben)
    assert "fetched" in assignment(ben, "fetch")
    # ben hands in the blank notebook, then his partial answers: the later one counts
    hand_in(ben, cases["blank"].content)
    time.sleep(1.1)  # nbgrader's submissions are told apart by their timestamps
    hand_in(ben, cases["partial"].content)
    time.sleep(1.1)
    due = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    terminal(accounts, "teach", "due", STEM, due.isoformat(), "--course", str(course))
    time.sleep(1.1)
    hand_in(ada, cases["solution"].content)  # after the due date

    formgrader(teach, "collect")
    started = time.monotonic()
    report = terminal(accounts, "teach", "grade", str(course / "submitted"), "--course",
                      str(course), "--jobs", "2")
    print(f"grading: {time.monotonic() - started:.0f} s")
    formgrader(teach, "release_feedback")

    rows = {s["student"]: s for s in
            json.loads((course / "grading-report.json").read_text())["submissions"]}
    assert sorted(rows) == sorted([ada.name, ben.name]), report
    stamp = (course / "submitted" / ada.name / STEM / "timestamp.txt").read_text().strip()
    handed_in = datetime.datetime.fromisoformat(stamp.replace(" UTC", "+00:00"))
    late_seconds = (handed_in - due).total_seconds()
    assert late_seconds > 0
    full = sum(cases["solution"].expected.values())
    want = {ada.name: full - late_penalty(full, late_seconds, 10.0),
            ben.name: sum(cases["partial"].expected.values())}
    assert 0 < want[ben.name] < full and want[ada.name] == pytest.approx(0.9 * full)
    assert rows[ada.name]["score"] == full and rows[ada.name]["seconds_late"] > 0
    assert rows[ben.name]["late_penalty"] == 0, rows[ben.name]
    for name, score in want.items():
        assert rows[name]["final_score"] == pytest.approx(score), (name, rows[name], report)

    # the grade CSV for Canvas: one row per rostered student, the final score in STEM's column
    out = accounts.home("teach") / "canvas.csv"
    terminal(accounts, "teach", "export", "--lms", "canvas", "--out", str(out), "--course",
             str(course))
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[:len(LMS_LAYOUTS["canvas"])] == list(LMS_LAYOUTS["canvas"])
    exported = {r["SIS User ID"] or r["ID"]: r for r in table}
    for name, score in want.items():
        assert float(exported[name][STEM]) == pytest.approx(score, abs=0.01), exported

    # each student fetches feedback that shows their own score and no hidden test
    hidden = "BEGIN HIDDEN TESTS"
    for student in (ada, ben):
        assert "submitted" in assignment(student, "fetch_feedback")
        folder = student.get(f"api/contents/{STEM}/feedback").json()["content"]
        assert len(folder) == 1, folder  # one timestamp: the submission that was graded
        html = student.get(f"api/contents/{folder[0]['path']}/{STEM}.html",
                           params={"type": "file", "format": "text"}).json()["content"]
        shown = re.findall(r"Score:\s*([\d.]+)\s*/\s*([\d.]+)", html)
        assert shown and float(shown[0][1]) == full, (student.name, shown)
        assert float(shown[0][0]) == pytest.approx(want[student.name]), shown  # penalty off
        assert hidden not in html

