"""The grading sandbox prevents what a hostile submission tries (qcourse/grading/sandbox.py).

Each attack runs twice where that is safe: inside the sandbox, where it must fail, and as plain
Python, where the same check must see it succeed (so the check can fail). The fork bomb runs
only inside the sandbox, with two process limits, to show that the limit is what stops it.
The end-to-end cases (the same attacks in submissions graded by nbgrader and the split run)
are in tests/test_grading.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sandbox_support import Listener

from qcourse.grading import sandbox as S

pytestmark = pytest.mark.skipif(S.probe() is not None, reason=f"no sandbox here: {S.probe()}")

UID = S.BASE_UID + 90  # not a grading worker's


def run(code: str, workdir: Path, sandboxed: bool = True, limits: S.Limits | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` with this Python in ``workdir``: inside a Sandbox, or as plain Python."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    if sandboxed:  # returns when every process of the sandbox has ended
        box = S.Sandbox(workdir, uid=UID, limits=limits or S.Limits())
        return box.run(argv, cwd=workdir, timeout=timeout)
    return subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def course(tmp_path):
    """A course's private files next to the submission's folder, with a canary in each."""
    course = tmp_path / "course"
    for rel in ("gradebook.db", "source/floats/floats.ipynb", "submitted/bob/floats/floats.ipynb",
                "release/floats/floats.ipynb"):
        (course / rel).parent.mkdir(parents=True, exist_ok=True)
        (course / rel).write_text(f"CANARY {rel}\n")
    return course


WRITE_EVERYWHERE = """\
    import os, sys
    import qcourse
    targets = [{course!r} + "/gradebook.db", {course!r} + "/submitted/bob/floats/floats.ipynb",
               {course!r} + "/new.txt", "../outside.txt"]
    if {installation}:  # only ever inside the sandbox
        targets += [os.path.dirname(qcourse.__file__) + "/x.py", sys.prefix + "/x.txt"]
    for path in targets:
        try:
            with open(path, "w") as f:
                f.write("written by a submission")
            print("WROTE", path)
        except OSError as error:
            print("refused", path, type(error).__name__)
    open("mine.txt", "w").write("my own scratch file")
    open("/tmp/mine.txt", "w").write("my own scratch file")
    print("own files ok")
    """


def test_writes_outside_the_scratch_folder_are_prevented(course, tmp_path):
    before = fingerprint(tmp_path)
    proc = run(WRITE_EVERYWHERE.format(course=str(course), installation=True), tmp_path / "work")
    assert "own files ok" in proc.stdout, proc.stderr
    assert "WROTE" not in proc.stdout, proc.stdout
    assert fingerprint(tmp_path) == before, "no byte may change outside the sandbox's scratch"
    assert not list((tmp_path / "work").iterdir()), "the scratch folder was a tmpfs: it is gone"
    # the check can fail: as plain Python the same code writes into the course
    plain = run(WRITE_EVERYWHERE.format(course=str(course), installation=False),
                tmp_path / "plain", sandboxed=False)
    assert "WROTE" in plain.stdout
    assert fingerprint(course) != {k[len("course/"):]: v for k, v in before.items()
                                   if k.startswith("course/")}


SEARCH = """\
    import os
    hits = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "usr")]
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, errors="replace") as f:
                    if "CANARY" in f.read(200):
                        hits.append(path)
            except OSError:
                pass
    for path in ({course!r} + "/source/floats/floats.ipynb",):
        try:
            hits.append(open(path).read())
        except OSError as error:
            print("cannot read", path, type(error).__name__)
    print("FOUND", hits)
    """


def test_other_students_and_the_hidden_tests_are_not_there(course, tmp_path):
    proc = run(SEARCH.format(course=str(course)), tmp_path / "work", timeout=300)
    assert "FOUND []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    search_here = SEARCH.replace('os.walk("/")', f"os.walk({str(tmp_path)!r})")
    plain = run(search_here.format(course=str(course)), tmp_path / "plain", sandboxed=False)
    assert "submitted/bob/floats/floats.ipynb" in plain.stdout and "CANARY source" in plain.stdout


CONNECT = """\
    import socket
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=3).sendall(b"hello")
        print("CONNECTED")
    except OSError as error:
        print("no network:", error)
    """


def test_no_connection_reaches_a_listener_on_the_host(tmp_path):
    listener = Listener()
    try:
        proc = run(CONNECT.format(port=listener.port), tmp_path / "work")
        inside = listener.accepted
        plain = run(CONNECT.format(port=listener.port), tmp_path / "plain", sandboxed=False)
    finally:
        accepted = listener.close()
    assert "no network" in proc.stdout and inside == 0, proc.stdout + proc.stderr
    assert "CONNECTED" in plain.stdout and accepted == 1, "the listener does count connections"


FORK_BOMB = """\
    import os, time
    children = 0
    for _ in range(10_000):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    print("CHILDREN", children)
    """


def sandbox_processes() -> list[int]:
    """Processes running as a sandbox user id."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:"))
                      .split()[1])
            if uid == UID:
                found.append(int(entry))
    return found


@pytest.mark.parametrize("limit", [24, 48])
def test_a_fork_bomb_stops_at_the_process_limit(tmp_path, limit):
    proc = run(FORK_BOMB, tmp_path / "work", limits=S.Limits(processes=limit))
    children = int(proc.stdout.split("CHILDREN")[1])
    assert limit // 2 < children < limit, (children, proc.stderr[-500:])
    assert sandbox_processes() == [], "every process of the sandbox ends with it"


HIDE_AND_WAIT = """\
    import os, sys, time
    for _ in range(8):
        if os.fork() == 0:
            os.setsid()  # a new session and process group: what a kill by group would miss
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
    print("READY", flush=True)
    time.sleep(120)
    """


def test_ending_a_sandbox_ends_and_waits_for_every_process_in_it(tmp_path):
    box = S.Sandbox(tmp_path / "work", uid=UID)
    S.prepare_workdir(box.workdir)
    proc, init = S.launch(box, [sys.executable, "-c", textwrap.dedent(HIDE_AND_WAIT)],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert init is not None and proc.stdout.readline().strip() == "READY"
        assert len(sandbox_processes()) >= 9, "the grandchildren, orphaned, run on"
    finally:
        S.end(init)
    assert sandbox_processes() == [], "end returns once none is left"
    assert proc.wait(30) != 0  # bwrap saw its sandbox killed
    proc.stdout.close()


SIGNALS = """\
    import os, signal
    for pid in ({grader}, {sentinel}, 1, -1):
        try:
            os.kill(pid, signal.SIGKILL)
            print("KILLED", pid)
        except OSError as error:
            print("refused", pid, type(error).__name__)
    """


def test_the_grader_and_other_processes_cannot_be_signalled(tmp_path):
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        proc = run(SIGNALS.format(grader=os.getpid(), sentinel=sentinel.pid), tmp_path / "work")
        assert sentinel.poll() is None, "the sandbox killed a process outside it"
        assert f"KILLED {os.getpid()}" not in proc.stdout
        # the check can fail: as plain Python (root here) the same kill reaches the sentinel
        plain = run(f"import os, signal\nos.kill({sentinel.pid}, signal.SIGKILL)",
                    tmp_path / "plain", sandboxed=False)
        assert plain.returncode == 0 and sentinel.wait(10) == -signal.SIGKILL
    finally:
        sentinel.kill()
        sentinel.wait()


FILL = """\
    import os
    written = 0
    for folder in (".", "/tmp"):
        for k in range(1024):
            try:
                with open(os.path.join(folder, f"fill{k}"), "wb") as f:
                    f.write(b"x" * 2**20)
                written += 2**20
            except OSError:
                break
    print("WRITTEN", written)
    """


def test_filling_the_disk_stops_at_the_scratch_size(tmp_path):
    limits = S.Limits(scratch_bytes=16 * 2**20)
    proc = run(FILL, tmp_path / "work", limits=limits)
    written = int(proc.stdout.split("WRITTEN")[1])
    assert 2 * 2**20 < written <= 2 * limits.scratch_bytes, (written, proc.stderr[-500:])
    assert shutil.disk_usage(tmp_path).free > 0 and not list((tmp_path / "work").iterdir())


def test_cpu_and_memory_are_limited(tmp_path):
    spin = run("while True:\n    pass", tmp_path / "cpu", limits=S.Limits(cpu_seconds=2),
               timeout=60)
    assert spin.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU,
                               128 + signal.SIGKILL), spin.returncode
    hog = run("b = bytearray(3 * 2**30)\nprint('ALLOCATED')", tmp_path / "mem",
              limits=S.Limits(memory_bytes=2**30))
    assert "MemoryError" in hog.stderr and "ALLOCATED" not in hog.stdout


def test_grading_refuses_to_run_unsandboxed_without_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no bwrap on it
    assert "bubblewrap" in S.probe()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "qcourse.grading", "grade", str(tmp_path), "--course",
           str(tmp_path / "course")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "--no-sandbox" in proc.stderr, proc.stderr
    assert "bubblewrap" in proc.stderr
    # with the flag it goes on (and stops at the next problem: there is no release here)
    proc = subprocess.run([*cmd, "--no-sandbox"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2 and "no release" in proc.stderr, proc.stderr
