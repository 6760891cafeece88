"""The split run: the student's cells in one process, the tests in another.

nbgrader runs a test cell in the student's own kernel, after the student's code, which can
change what the test sees. The split run runs the same tests in this process, which never
executes student code, against the student's cells running in a ``StudentProcess``; a test cell
scores only when both pass (see ``grade``). The recorded reference run (``reference.py``) makes
it fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from .channel import RemoteObject, StudentProcessGone
from .notebook import cell_source, exercises, grade_id
from .reference import (
    ReferenceCell,
    Replay,
    cached_reference_run,
    describe,
    fresh_namespace,
    run_here,
    same_as_reference,
)
from .sandbox import Sandbox
from .student import StudentProcess


@dataclasses.dataclass
class SplitVerdict:
    """The split run's verdict on one test cell."""

    passed: bool
    message: str = ""


def _bind(ns: dict[str, Any], wanted: list[str], values: dict[str, Any],
          replay: Replay | None = None) -> None:
    """Put the student's values into the tests' namespace (functions through ``replay``)."""
    for name in wanted:
        if name not in values:
            ns.pop(name, None)
        elif replay is not None and type(values[name]) is RemoteObject:
            ns[name] = replay.player(name, values[name])
        else:
            ns[name] = values[name]


class _SplitRun:
    """One submission's split run: the walk over its cells, and the tests' namespace.

    The tests' namespace exists from the start when the reference run's shortcut cannot hold,
    else from the first test cell whose answers differ from the reference's; ``history`` is what
    rebuilding it must replay.
    """

    def __init__(self, source: dict, cwd: Path, cell_timeout: float,
                 nbgrader_passed: dict[str, bool], sandbox: Sandbox | None = None) -> None:
        self.ref = cached_reference_run(source)
        self.steps = {step[1] if step[0] != "test" else step[1].gid: step
                      for step in self.ref.steps}
        self.test_of = {sid: e.test_id for e in exercises(source) for sid in e.solution_ids}
        self.cell_timeout = cell_timeout
        self.nbgrader_passed = nbgrader_passed
        self.verdicts: dict[str, SplitVerdict] = {}
        self.history: list[tuple] = []
        self.namespace: dict[str, Any] | None = None if self.ref.shortcut else fresh_namespace()
        self.proc = StudentProcess(cwd, sandbox)

    def fetch(self, wanted: list[str]) -> dict[str, Any]:
        values = self.proc.request(("get", wanted)) if wanted else {}
        if type(values) is not dict:
            raise StudentProcessGone("the student's process broke the protocol")
        return values

    def answer(self, cell: ReferenceCell, values: dict[str, Any]) -> Replay:
        """The student's answers to the calls the reference run recorded, in one round trip."""
        replay = Replay(self.proc)
        replay.calls = cell.calls
        batch = []
        for name, argbytes in cell.calls:
            if type(values.get(name)) is not RemoteObject or argbytes is None:
                break
            batch.append((values[name]._hid, argbytes))
        if batch:
            replay.answers = self.proc.request(("batch", batch))
            if type(replay.answers) is not list:
                raise StudentProcessGone("the student's process broke the protocol")
        return replay

    def rebuild(self) -> dict[str, Any]:
        """The tests' namespace, as running every earlier cell for real would have made it."""
        ns = fresh_namespace()
        for item in self.history:
            with contextlib.suppress(Exception):
                if item[0] == "locked":
                    run_here(item[1], ns, "<locked cell>")
                else:
                    _, cell, values, replay = item
                    replay.position, replay.live = 0, False
                    _bind(ns, cell.wanted, values, replay)
                    run_here(cell.code, ns, f"<{cell.gid}>")
        return ns

    def test_cell(self, gid: str, ref_cell: ReferenceCell) -> None:
        budget = 3 * self.cell_timeout + 10 if self.nbgrader_passed.get(gid) else min(
            self.cell_timeout, 5.0)
        self.proc.deadline = time.monotonic() + budget
        try:
            values = self.fetch(ref_cell.wanted)
            replay = self.answer(ref_cell, values)
            if self.namespace is None and self.ref.shortcut and same_as_reference(
                    ref_cell, values, replay.answers):
                self.history.append(("test", ref_cell, values, replay))
                if ref_cell.error is not None:
                    self.verdicts[gid] = SplitVerdict(False, ref_cell.error)
                else:
                    self.verdicts[gid] = SplitVerdict(True)
                return
            if self.namespace is None:
                self.namespace = self.rebuild()
            _bind(self.namespace, ref_cell.wanted, values, replay)
            run_here(ref_cell.code, self.namespace, f"<{gid}>")
            self.verdicts[gid] = SplitVerdict(True)
        except Exception as exc:
            self.verdicts[gid] = SplitVerdict(False, describe(exc))
            if self.namespace is None:
                self.namespace = self.rebuild()

    def locked_cell(self, code: str, wanted: list[str]) -> None:
        """A locked cell runs on both sides (the student's first)."""
        with contextlib.suppress(Exception):
            self.proc.request(("run", code))
        if self.namespace is None:
            self.history.append(("locked", code))
            return
        with contextlib.suppress(Exception):
            _bind(self.namespace, wanted, self.fetch(wanted))
        with contextlib.suppress(Exception):
            run_here(code, self.namespace, "<locked cell>")

    def student_cell(self, cell: dict, step: tuple | None) -> None:
        """A solution cell or a cell the student added: runs in the student's process only."""
        if step is not None and step[0] == "solution":
            for line in step[2]:  # the source's own imports, on the tests' side too
                self.history.append(("locked", line))
                if self.namespace is not None:
                    with contextlib.suppress(Exception):
                        run_here(line, self.namespace, "<import>")
        with contextlib.suppress(Exception):
            self.proc.request(("run", cell_source(cell)))

    def run(self, canonical: dict) -> dict[str, SplitVerdict]:
        try:
            # the student's process starts (Python, NumPy, IPython) within the 60 s it is given
            # at launch, so that a busy machine does not eat the first cell's time budget
            with contextlib.suppress(Exception):
                self.proc.request(("get", []))
            for cell in canonical["cells"]:
                if cell.get("cell_type") != "code":
                    continue
                gid = grade_id(cell)
                step = self.steps.get(gid) if gid else None
                if step is not None and step[0] == "test":
                    self.test_cell(gid, step[1])
                    continue
                budget = self.cell_timeout + 2
                if gid in self.test_of and not self.nbgrader_passed.get(self.test_of[gid]):
                    budget = min(self.cell_timeout, 2.0)  # its exercise scores 0 anyway
                self.proc.deadline = time.monotonic() + budget
                if step is not None and step[0] == "locked":
                    self.locked_cell(step[2], step[3])
                else:
                    self.student_cell(cell, step)
        finally:
            self.proc.close()
        return self.verdicts


def split_run(source: dict, canonical: dict, cwd: Path, cell_timeout: float,
              nbgrader_passed: dict[str, bool], sandbox: Sandbox | None = None
              ) -> dict[str, SplitVerdict]:
    """Run the tests of ``source`` against the student's cells of ``canonical``, split in two.

    The student's cells (solution cells and cells they added) run in a ``StudentProcess``
    started in ``cwd``; every test cell, with its hidden tests, runs here, in a process that
    never executes student code; locked cells (imports, helpers) run on both sides. The tests
    reach the names the source's solution cells define through the student's process: plain
    data by value, functions and other objects as ``RemoteObject``s.

    To keep this fast, the source notebook is first run here by itself (``reference.py``,
    once per notebook), recording the calls each test cell makes to the exercises' functions.
    For each test cell the student's process then answers those calls in one round trip. While
    the student's values and answers are byte-for-byte the reference's, running the test cell
    again would repeat the reference run exactly, so its verdict is the reference run's. At the
    first difference, the tests' namespace is rebuilt by replaying the earlier cells with the
    student's (identical) answers, and from then on every test cell runs here for real, its
    calls answered from the student's answers while they match and live after. A test cell
    passes when it raises nothing within its time budget (generous for cells nbgrader passed).
    With ``sandbox``, the student's process runs inside it (``sandbox.py``).
    """
    return _SplitRun(source, cwd, cell_timeout, nbgrader_passed, sandbox).run(canonical)
