"""The grading worker: one submission at a time, in a scratch course outside the course dir.

``grade`` starts ``--jobs`` workers (``python -m qcourse.grading _worker``), each fed by a
``WorkerSlot`` thread. A worker first checks that nbgrader's kernel can import this qcourse
(``preflight``), then for each task: writes the canonical submission into a scratch course
whose gradebook is a copy without students, runs ``nbgrader autograde`` there, reads the scores
back, runs the split run on the cells nbgrader passed, and reports what changed in the scratch
course outside the submission's own folder. Whatever the submission started is killed after
each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .feedback import truncate_outputs
from .notebook import grade_id, is_test
from .processes import become_subreaper, die_with_parent, kill_descendants, python_env, tree_state
from .sandbox import (
    Sandbox,
    kernel_manager_class,
    prepare_workdir,
    share_with,
)
from .split import split_run


def _scratch_course(task: dict, scratch: Path, private: Path) -> tuple[Path, Path]:
    """Lay out the scratch course for ``task``: returns (its gradebook, the submission's folder).

    nbgrader restores the tests from its gradebook; the source notebook (solutions and hidden
    tests) stays out of reach of the submission's code, which runs two levels below.
    """
    student, stem = task["student"], task["stem"]
    (scratch / "nbgrader_config.py").write_text(task["config"])
    (scratch / "source" / stem).mkdir(parents=True)
    sub_dir = scratch / "submitted" / student / stem
    sub_dir.mkdir(parents=True)
    (sub_dir / f"{stem}.ipynb").write_text(json.dumps(task["canonical"]))
    if task.get("timestamp"):
        (sub_dir / "timestamp.txt").write_text(task["timestamp"])
    db = private / "gradebook.db"
    shutil.copyfile(task["template"], db)
    return db, scratch / "autograded" / student / stem


def _sandbox(task: dict, own: Path, private: Path) -> Sandbox | None:
    """The sandbox for this task's student code (None when grading unsandboxed).

    The kernel's ZeroMQ sockets live in a folder of the worker's private directory, shared
    with the sandbox; the code's working folder is a tmpfs over ``own``.
    """
    uid = task.get("sandbox_uid")
    if uid is None:
        return None
    sockets = private / "sockets"
    sockets.mkdir()
    share_with(sockets, uid)
    prepare_workdir(own)
    return Sandbox(own, uid=uid, shared=(sockets,))


def _autograde(task: dict, scratch: Path, db: Path, sandbox: Sandbox | None) -> dict:
    """``nbgrader autograde`` of the task's submission in the scratch course."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(scratch)).load_config()
    cfg.CourseDirectory.root = str(scratch)
    cfg.CourseDirectory.course_id = task["course_id"]
    cfg.CourseDirectory.db_url = f"sqlite:///{db}"
    cfg.Execute.timeout = int(task["cell_timeout"])
    if sandbox is not None:
        manager = kernel_manager_class()
        manager.sandbox = sandbox
        cfg.Execute.kernel_manager_class = manager
    api = NbGraderAPI(coursedir=CourseDirectory(config=cfg), config=cfg)
    return api.autograde(task["stem"], task["student"], force=True, create=True)


def _nbgrader_scores(task: dict, db: Path, graded_path: Path) -> dict[str, Any]:
    """The scores nbgrader gave: in the autograded notebook, in its gradebook, the penalty."""
    from nbformat import from_dict
    from nbgrader.api import Gradebook, MissingEntry
    from nbgrader.utils import determine_grade

    student, stem = task["student"], task["stem"]
    autograded = json.loads(graded_path.read_text())
    notebook_scores: dict[str, float | None] = {}
    gradebook_scores: dict[str, float | None] = {}
    penalty = 0.0
    for cell in autograded["cells"]:
        gid = grade_id(cell)
        if gid in task["points"] and is_test(cell):
            notebook_scores[gid] = determine_grade(from_dict(cell))[0]
    with Gradebook(f"sqlite:///{db}", task["course_id"]) as gb:
        for gid in task["points"]:
            try:
                gradebook_scores[gid] = gb.find_grade(gid, stem, stem, student).auto_score
            except MissingEntry:
                gradebook_scores[gid] = None
        seconds_late = 0.0
        with contextlib.suppress(MissingEntry):
            snb = gb.find_submission_notebook(stem, stem, student)
            penalty = float(snb.late_submission_penalty or 0.0)
            seconds_late = float(gb.find_submission(stem, student).total_seconds_late or 0.0)
    return {"autograded": autograded, "nbgrader": notebook_scores,
            "nbgrader_gradebook": gradebook_scores, "late_penalty": penalty,
            "seconds_late": seconds_late}


def _split_verdicts(task: dict, own: Path, passed: dict[str, bool], result: dict,
                    sandbox: Sandbox | None) -> None:
    """Run the split run on the submission (in its own folder) into ``result``."""
    own.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        verdicts = split_run(task["source"], task["canonical"], own,
                             float(task["cell_timeout"]), passed, sandbox)
        result["split"] = {g: dataclasses.asdict(v) for g, v in verdicts.items()}
    except Exception:
        result["split_error"] = traceback.format_exc()[-3000:]
    result["seconds_split"] = round(time.monotonic() - started, 2)
    kill_descendants()


def grade_one(task: dict) -> dict:
    """Autograde one canonical submission in a scratch course, then run the split run."""
    scratch = Path(tempfile.mkdtemp(prefix="qcourse-grade-"))
    private = Path(tempfile.mkdtemp(prefix="qcourse-gradebook-"))
    result: dict[str, Any] = {"student": task["student"], "stem": task["stem"]}
    try:
        db, own = _scratch_course(task, scratch, private)
        before = tree_state(scratch, own)
        started = time.monotonic()
        sandbox = _sandbox(task, own, private)
        outcome = _autograde(task, scratch, db, sandbox)
        result["seconds_nbgrader"] = round(time.monotonic() - started, 2)
        kill_descendants()
        result["autograde_success"] = bool(outcome["success"])
        result["autograde_error"] = (outcome.get("error") or "")[-3000:]
        result["log_tail"] = (outcome.get("log") or "")[-3000:]
        graded_path = own / f"{task['stem']}.ipynb"
        scores: dict[str, Any] = {"autograded": None, "nbgrader": {}, "nbgrader_gradebook": {},
                                  "late_penalty": 0.0, "seconds_late": 0.0}
        if outcome["success"] and graded_path.is_file():
            scores = _nbgrader_scores(task, db, graded_path)
        autograded = scores.pop("autograded")
        result.update(scores)
        passed = {gid: bool(scores["nbgrader"].get(gid)) for gid in task["points"]}
        if any(passed.values()):
            _split_verdicts(task, own, passed, result, sandbox)
        after = tree_state(scratch, own)
        result["tampered"] = sorted(
            path for path in set(before) | set(after) if before.get(path) != after.get(path))
        if autograded is not None:
            truncate_outputs(autograded)
        result["autograded"] = autograded
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def preflight(kernel_name: str) -> str | None:
    """Check that the kernel nbgrader will start imports this qcourse (None when it does).

    If every student silently scored 0 because the kernel's environment lacks qcourse or numpy,
    nobody would notice; so grading stops first. A kernelspec that runs plain ``python`` runs
    this interpreter (jupyter_client substitutes it); any other gets the import tried with its
    own interpreter, or, failing that, a kernel started and asked. (``grade`` has already
    checked that the sandbox starts this Python and imports this qcourse.)
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    import qcourse

    try:
        argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
    except NoSuchKernel:
        return f"there is no Jupyter kernel named {kernel_name!r}"
    pythons = {"python", f"python{sys.version_info[0]}",
               "python{}.{}".format(*sys.version_info[:2]), sys.executable}
    if argv and argv[0] in pythons:
        return None
    probe = "import numpy, qcourse; print(qcourse.__file__)"
    if argv and "ipykernel_launcher" in argv:
        proc = subprocess.run([argv[0], "-c", probe], capture_output=True, text=True,
                              timeout=120, env=python_env())
        text = proc.stdout.strip() or proc.stderr.strip()[-300:]
    else:
        text = _probe_kernel(kernel_name, probe)
    if text != qcourse.__file__:
        return (f"the kernel {kernel_name!r} cannot import this qcourse ({text!r}); every "
                "student would score 0. Install qcourse into the kernel's environment.")
    return None


def _probe_kernel(kernel_name: str, code: str) -> str:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    lines: list[str] = []
    try:
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)

        def hook(msg: dict) -> None:
            content = msg.get("content", {})
            if msg.get("msg_type") == "stream":
                lines.append(content.get("text", ""))
            elif msg.get("msg_type") == "error":
                lines.append(f"{content.get('ename')}: {content.get('evalue')}")

        kc.execute_interactive(code, timeout=120, output_hook=hook)
        kc.stop_channels()
    except Exception as exc:
        lines.append(f"the kernel did not start: {exc}")
    finally:
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=True)
    return "".join(lines).strip()


def worker_main() -> None:
    """A grading worker: reads tasks (JSON lines) on stdin, answers on its original stdout."""
    import warnings

    warnings.simplefilter("ignore")
    die_with_parent()
    become_subreaper()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    import nbgrader.apps  # noqa: F401 - load nbgrader before any student code runs

    import qcourse  # noqa: F401 - the tests' copy of the library, loaded before student code

    while True:
        line = sys.stdin.readline()
        if not line:
            break
        task = json.loads(line)
        if task.get("op") == "preflight":
            reply = {"problem": preflight(task["kernel"])}
        else:
            try:
                reply = grade_one(task)
            except Exception:
                reply = {"worker_error": traceback.format_exc()[-3000:]}
            kill_descendants()
        out.write(json.dumps(reply) + "\n")


class WorkerSlot:
    """One grading worker process and the thread that feeds it tasks."""

    def __init__(self, index: int, results: queue.Queue, kernel: str) -> None:
        self.index = index
        self.results = results
        self.kernel = kernel
        self.tasks: queue.Queue = queue.Queue()
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _start(self) -> str | None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qcourse.grading", "_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=python_env(),
            start_new_session=True, cwd=tempfile.gettempdir())
        reply = self._ask({"op": "preflight", "kernel": self.kernel}, 300)
        if reply is None:
            return "a grading worker died while starting"
        return reply.get("problem")

    def _ask(self, task: dict, timeout: float) -> dict | None:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        timer = threading.Timer(timeout, self.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (OSError, ValueError):
            line = ""
        finally:
            timer.cancel()
        if not line:
            self.kill()
            return None
        return json.loads(line)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def _loop(self) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                self.kill()
                return
            task, hard_timeout = item
            if self.proc is None or self.proc.poll() is not None:
                problem = self._start()
                if problem:
                    self.results.put((self.index, task, {"fatal": problem}))
                    continue
            started = time.monotonic()
            reply = self._ask(task, hard_timeout)
            if reply is None:
                elapsed = time.monotonic() - started
                why = ("grading took longer than the hard limit of "
                       f"{hard_timeout:.0f} s and was stopped" if elapsed >= hard_timeout - 1
                       else "the grading process died while running this submission (the "
                       "submission may have killed it)")
                reply = {"student": task["student"], "stem": task["stem"], "grader_died": why}
            self.results.put((self.index, task, reply))
