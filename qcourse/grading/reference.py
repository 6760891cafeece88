"""The reference run: the source notebook run on the tests' side, recording each test's calls.

The split run (``split.py``) is fast because the source notebook, with its own solutions,
is first run here once per notebook: every call a test cell makes to an exercise's function is
recorded with its arguments (pickled), its result and what it did to its arguments. A student
whose answers to those same calls are byte-for-byte the reference's gets the reference's
verdict; ``Replay`` then feeds the student's recorded answers back to a test cell run for real.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import functools
import io
import json
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from .channel import (
    BUILTIN_EXCEPTIONS,
    RemoteObject,
    ReplyUnpickler,
    RequestPickler,
    plain_bytes,
    raise_student_exception,
)
from .notebook import cell_source, grade_id, is_solution, is_test, nbgrader_meta, sha256

if TYPE_CHECKING:
    from .student import StudentProcess


def bound_names(source: str) -> tuple[set[str], list[ast.stmt]]:
    """Names a cell binds at top level, and its top-level import statements."""
    try:
        tree = ast.parse(transform_cell(source))
    except SyntaxError:
        return set(), []
    names: set[str] = set()
    imports: list[ast.stmt] = []

    def targets(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                targets(node.target)
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
                visit(node.body)
            elif isinstance(node, (ast.If, ast.While)):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(node)

    visit(tree.body)
    return names, imports


def transform_cell(source: str) -> str:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


def pickle_args(proc: StudentProcess, args: tuple, kwargs: dict) -> bytes | None:
    buf = io.BytesIO()
    try:
        RequestPickler(buf, proc).dump((args, kwargs))
    except Exception:
        return None
    return buf.getvalue()


def _apply_mutation(live: tuple, changed: tuple) -> None:
    """Copy into the tests' arguments what the student's function did to its copies."""
    live_args, live_kwargs = live
    new_args, new_kwargs = changed
    pairs = list(zip(live_args, new_args, strict=False))
    pairs += [(live_kwargs[k], new_kwargs[k]) for k in live_kwargs if k in new_kwargs]
    for old, new in pairs:
        if type(old) is np.ndarray and type(new) is np.ndarray and old.shape == new.shape \
                and old.flags.writeable:
            with contextlib.suppress(Exception):
                np.copyto(old, new, casting="unsafe")
        elif type(old) is list and type(new) is list:
            old[:] = new
        elif type(old) is dict and type(new) is dict:
            old.clear()
            old.update(new)
        elif type(old) is set and type(new) is set:
            old.clear()
            old.update(new)


_MISSING, _CALLABLE = "missing", "callable"


class _Recording:
    """Which test cell's calls are being recorded, during the reference run.

    Each reference function an exercise defines is wrapped once, right after its solution cell
    runs, so that every way of reaching it (aliases, helpers) goes through the wrapper. A call
    from a locked cell, or an exercise whose answer is callable but not a function (a class,
    say), makes the shortcut unavailable.
    """

    def __init__(self) -> None:
        self.active: Replay | None = None
        self.in_locked_cell = False
        self.unrecorded = False
        self.opaque: set[str] = set()

    def wrap(self, name: str, function: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.active is not None:
                return self.active.record(name, function, args, kwargs)
            if self.in_locked_cell:
                self.unrecorded = True
            return function(*args, **kwargs)

        return functools.wraps(function)(recorded)


class Replay:
    """The calls of one test cell: recorded with the reference, answered by the student.

    ``record`` (reference run): every call to an exercise's function, its arguments (pickled),
    the result and what it did to its arguments. ``player`` (student run): while the test cell
    makes the recorded calls with the same arguments, each returns the student's answer, fetched
    in advance in one round trip; from the first difference on, calls go to the student's
    process one by one.
    """

    def __init__(self, proc: StudentProcess | None = None) -> None:
        self.proc = proc
        self.calls: list[tuple[str, bytes | None]] = []
        self.expected: list[tuple] = []
        self.answers: list = []
        self.position = 0
        self.live = False

    def record(self, name: str, function: Any, args: tuple, kwargs: dict) -> Any:
        before = pickle_args(None, args, kwargs)
        self.calls.append((name, before))
        try:
            value = function(*args, **kwargs)
        except Exception as exc:
            # comparable only if the tests' side would raise exactly this again: a built-in
            # exception with plain arguments
            args_bytes = plain_bytes(tuple(exc.args))
            same = type(exc) is BUILTIN_EXCEPTIONS.get(type(exc).__name__) and (
                args_bytes is not None)
            self.expected.append(("raise", (type(exc).__name__, str(exc)[:2000], args_bytes)
                                  if same else None, None))
            raise
        after = pickle_args(None, args, kwargs)
        self.expected.append(("ok", plain_bytes(value), None if after == before else after))
        return value

    def player(self, name: str, remote: RemoteObject) -> Any:
        def play(*args: Any, **kwargs: Any) -> Any:
            k = self.position
            if not self.live and k < len(self.answers) and self.calls[k][0] == name:
                argbytes = pickle_args(self.proc, args, kwargs)
                if argbytes is not None and argbytes == self.calls[k][1]:
                    self.position += 1
                    status, payload, changed = self.answers[k]
                    if changed is not None:
                        new = ReplyUnpickler(io.BytesIO(changed), self.proc).load()
                        _apply_mutation((args, kwargs), new)
                    if status == "raise":
                        raise_student_exception(*payload, proc=self.proc)
                    return ReplyUnpickler(io.BytesIO(payload), self.proc).load()
            self.live = True
            return remote(*args, **kwargs)

        return play


@dataclasses.dataclass
class ReferenceCell:
    """The reference run of one test cell: what it asked of the exercises and how it ended."""

    gid: str
    code: str
    wanted: list[str]
    values: dict[str, tuple]
    calls: list[tuple[str, bytes | None]]
    expected: list[tuple]
    error: str | None
    comparable: bool


@dataclasses.dataclass
class ReferenceRun:
    """The source notebook run on the tests' side, step by step (see ``split_run``)."""

    steps: list[tuple]
    shortcut: bool


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}".strip().rstrip(":")


def fresh_namespace() -> dict[str, Any]:
    return {"__name__": "__main__", "__builtins__": builtins}


_SINK = _Discard()


def run_here(code: str, ns: dict[str, Any], label: str) -> None:
    with contextlib.redirect_stdout(_SINK), contextlib.redirect_stderr(_SINK):
        exec(compile(transform_cell(code), label, "exec"), ns)


def _mentions(code: str, names: set[str]) -> bool:
    try:
        tree = ast.parse(transform_cell(code))
    except SyntaxError:
        return True
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(tree))


class _ReferenceRecorder:
    """Runs the source notebook here, cell by cell, recording what each test cell asks."""

    def __init__(self) -> None:
        self.ns = fresh_namespace()
        self.recording = _Recording()
        self.trusted_names: set[str] = set()  # bound by locked cells (imports, helpers)
        self.exercise_names: set[str] = set()  # bound by solution cells
        self.steps: list[tuple] = []
        self.shortcut = True

    def wanted(self) -> list[str]:
        """The exercises' names a test cell may use: what the solutions bound, less the rest."""
        return sorted(self.exercise_names - self.trusted_names)

    def locked(self, code: str) -> None:
        before = set(self.ns)
        self.recording.in_locked_cell = True
        with contextlib.suppress(Exception):
            run_here(code, self.ns, "<locked cell>")
        self.recording.in_locked_cell = False
        self.trusted_names.update(set(self.ns) - before)

    def test_cell(self, gid: str, code: str) -> None:
        wanted = self.wanted()
        values = {}
        for name in wanted:
            if name not in self.ns:
                values[name] = (_MISSING,)
            elif callable(self.ns[name]):
                values[name] = (_CALLABLE,)
            else:
                values[name] = ("data", plain_bytes(self.ns[name]))
        replay = Replay()
        self.recording.active = replay
        error = None
        try:
            run_here(code, self.ns, f"<{gid}>")
        except Exception as exc:
            error = describe(exc)
        finally:
            self.recording.active = None
        comparable = (not self.recording.opaque & set(wanted) and not self.recording.unrecorded
                      and all(argbytes is not None for _, argbytes in replay.calls))
        self.steps.append(("test", ReferenceCell(gid, code, wanted, values, replay.calls,
                                                 replay.expected, error, comparable)))

    def solution_cell(self, gid: str, code: str) -> None:
        names, imports = bound_names(code)
        self.exercise_names.update(names)
        import_code = [ast.unparse(node) for node in imports]
        for line in import_code:
            self.locked(line)
        with contextlib.suppress(Exception):
            run_here(code, self.ns, "<reference solution>")
        for name in names:
            obj = self.ns.get(name)
            if isinstance(obj, types.FunctionType):
                self.ns[name] = self.recording.wrap(name, obj)
            elif callable(obj):
                self.recording.opaque.add(name)
        self.steps.append(("solution", gid, import_code))

    def locked_cell(self, gid: str, code: str) -> None:
        wanted = self.wanted()
        if _mentions(code, set(wanted)):
            self.shortcut = False  # a locked cell that uses the answers: run everything for real
        self.locked(code)
        self.steps.append(("locked", gid, code, wanted))

    def run(self, source: dict) -> ReferenceRun:
        for cell in source["cells"]:
            if cell.get("cell_type") != "code":
                continue
            code, gid = cell_source(cell), grade_id(cell)
            if gid is not None and is_test(cell):
                self.test_cell(gid, code)
            elif gid is not None and is_solution(cell):
                self.solution_cell(gid, code)
            elif gid is not None and nbgrader_meta(cell).get("locked"):
                self.locked_cell(gid, code)
            else:  # a cell students may edit, outside nbgrader's marks: student code
                with contextlib.suppress(Exception):
                    run_here(code, self.ns, "<unmarked cell>")
        return ReferenceRun(self.steps, self.shortcut and not self.recording.unrecorded)


_REFERENCE_RUNS: dict[str, ReferenceRun] = {}


def cached_reference_run(source: dict) -> ReferenceRun:
    """The reference run of ``source`` (run once per notebook and process)."""
    key = sha256(json.dumps(source, sort_keys=True).encode())
    if key not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[key] = _ReferenceRecorder().run(source)
    return _REFERENCE_RUNS[key]


def same_as_reference(ref: ReferenceCell, values: dict[str, Any], answers: list) -> bool:
    """Whether the student's values and answers are byte-for-byte the reference's."""
    if not ref.comparable or len(answers) != len(ref.calls):
        return False
    for name in ref.wanted:
        kind = ref.values[name]
        if kind[0] == _MISSING:
            if name in values:
                return False
        elif name not in values:
            return False
        elif kind[0] == _CALLABLE:
            if type(values[name]) is not RemoteObject:
                return False
        elif kind[1] is None or type(values[name]) is RemoteObject or plain_bytes(
                values[name]) != kind[1]:
            return False
    for got, want in zip(answers, ref.expected, strict=True):
        if type(got) is not tuple or len(got) != 3 or want[1] is None or got != want:
            return False
    return True
