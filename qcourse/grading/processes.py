"""Process isolation and clean-up around student code.

The grading processes run student code (nbgrader's kernels, the split run's student process).
What keeps that code from outliving or outwitting them: children die with their parent, a
grading worker adopts and kills whatever a submission leaves running, a scratch tree is
fingerprinted before and after, the course's own files are checked and restored
(``ProtectedFiles``), and one grading run holds the course at a time (``lock_course``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .course import STATE_DIR, GradingError
from .notebook import sha256


def fast_nbformat() -> None:
    """Skip building jsonschema's IRI grammar (~1 s per process); nbformat never uses it.

    Only for processes this tool owns (its workers and the ``qcourse-course`` command): a None
    entry in ``sys.modules`` makes ``import rfc3987_syntax`` fail, so jsonschema leaves out the
    two IRI formats, which no notebook schema uses.
    """
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    # nbgrader runs the `alembic` script (next to this interpreter) when it creates a gradebook
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("QCOURSE_GRADING_FDS", None)
    return env


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def kill_descendants() -> int:
    """Kill every process this one adopted or started (background processes a submission left)."""
    if not Path("/proc").is_dir():
        return 0
    me, killed = os.getpid(), 0
    for _ in range(5):
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 1 and int(fields[1]) == me and fields[0] != "Z":
                children.append(int(entry))
        if not children:
            break
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
    return killed


def tree_state(root: Path, skip: Path) -> dict[str, str]:
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and skip not in path.parents:
            try:
                state[str(path.relative_to(root))] = sha256(path.read_bytes())
            except OSError:
                state[str(path.relative_to(root))] = "unreadable"
    return state


class ProtectedFiles:
    """Files the grading run must find unchanged; restored (and reported) when they are not."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[bytes, tuple]] = {}

    @staticmethod
    def stat_of(path: Path) -> tuple:
        try:
            st = path.stat()
        except OSError:
            return ()
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def add(self, path: Path) -> None:
        path = Path(path)
        if path.is_file():
            self.files[path] = (path.read_bytes(), self.stat_of(path))

    def add_tree(self, root: Path, patterns: Iterable[str] = ("*",)) -> None:
        for pattern in patterns:
            for path in sorted(Path(root).rglob(pattern)):
                if path.is_file() and "__pycache__" not in path.parts:
                    self.add(path)

    def changed(self) -> list[Path]:
        return [p for p, (_, stat) in self.files.items() if self.stat_of(p) != stat]

    def restore(self, paths: Iterable[Path]) -> None:
        for path in paths:
            data = self.files[path][0]
            if path.is_file() and path.read_bytes() == data:
                self.files[path] = (data, self.stat_of(path))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.restore")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.files[path] = (data, self.stat_of(path))


def lock_course(course: Path) -> Any:
    handle = open(course / STATE_DIR / "lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        handle.close()
        raise GradingError(f"another grading run is using {course}") from None
    return handle
