"""The student's process of the split run, and the tests' side of the conversation with it.

``StudentProcess`` (the tests' side) starts ``python -m qcourse.grading _student``, which runs
``student_main``: the student's cells run there with IPython's semantics (no kernel), and it
answers the tests' requests (run a cell, get values, call a function, read an attribute) over
two pipes, replying through the channel's picklers (``channel.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .channel import (
    MAX_MESSAGE_BYTES,
    ArgsPickler,
    Handles,
    ReplyPickler,
    ReplyUnpickler,
    RequestPickler,
    RequestUnpickler,
    StudentProcessGone,
    StudentTimeout,
    exception_payload,
    raise_student_exception,
    reply_bytes,
)
from .processes import die_with_parent, python_env
from .sandbox import Sandbox, end, interrupt, launch


class StudentProcess:
    """The student's code, run in its own Python process (IPython semantics, no kernel).

    The tests talk to it with ``request``; replies are unpickled by ``ReplyUnpickler``, which
    builds only plain data. Each request has a deadline; past it the process is interrupted
    (SIGINT, as a kernel is) and, if it does not answer, killed.
    """

    def __init__(self, cwd: Path, sandbox: Sandbox | None = None) -> None:
        to_student_r, to_student_w = os.pipe()
        from_student_r, from_student_w = os.pipe()
        env = python_env()
        env["QCOURSE_GRADING_FDS"] = f"{to_student_r},{from_student_w}"
        argv = [sys.executable, "-m", "qcourse.grading", "_student"]
        if sandbox is not None:  # inside bubblewrap (sandbox.py): the pipes cross, env does not
            sandbox = dataclasses.replace(sandbox, env={
                **sandbox.env, "QCOURSE_GRADING_FDS": env["QCOURSE_GRADING_FDS"]})
        self.sandboxed = sandbox is not None
        popen = dict(cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, pass_fds=(to_student_r, from_student_w))
        self.sandbox_init: int | None = None
        if sandbox is not None:
            self.popen, self.sandbox_init = launch(sandbox, argv, **popen)
        else:
            self.popen = subprocess.Popen(argv, **popen)
        os.close(to_student_r)
        os.close(from_student_w)
        self.send = Connection(to_student_w, readable=False)
        self.recv = Connection(from_student_r, writable=False)
        self.seq = 0
        self.gone: str | None = None
        self.deadline = time.monotonic() + 60.0

    def request(self, message: tuple) -> Any:
        if self.gone:
            raise StudentProcessGone(self.gone)
        self.seq += 1
        buf = io.BytesIO()
        try:
            RequestPickler(buf, self).dump((self.seq, message))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"cannot pass this value to the student's code: {exc}") from None
        try:
            self.send.send_bytes(buf.getvalue())
        except OSError:
            self._kill("the student's process has exited")
            raise StudentProcessGone(self.gone) from None
        timed_out = False
        if not self.recv.poll(max(self.deadline - time.monotonic(), 0.0)):
            timed_out = True
            with contextlib.suppress(OSError):
                self._interrupt()
            if not self.recv.poll(3.0):
                self._kill("the student's code did not stop when interrupted")
                raise StudentTimeout("the student's code ran out of time and was stopped")
        try:
            raw = self.recv.recv_bytes(MAX_MESSAGE_BYTES)
            seq, reply = ReplyUnpickler(io.BytesIO(raw), self).load()
        except (EOFError, OSError):
            self._kill("the student's process has exited")
            raise StudentProcessGone(self.gone) from None
        except Exception as exc:  # anything the restricted unpickler refuses
            self._kill(f"the student's process sent something that is not plain data ({exc})")
            raise StudentProcessGone(self.gone) from None
        if seq != self.seq or not isinstance(reply, tuple) or not reply:
            self._kill("the student's process broke the protocol")
            raise StudentProcessGone(self.gone)
        if reply[0] == "raise":
            if timed_out:
                raise StudentTimeout("the student's code ran out of time and was interrupted")
            raise_student_exception(*reply[1:4], proc=self)
        if timed_out:
            raise StudentTimeout("the student's code ran out of time")
        return reply[1] if len(reply) > 1 else None

    def _interrupt(self) -> None:
        if self.sandboxed:
            interrupt(self.popen.pid)  # the student's Python, not bwrap
        else:
            self.popen.send_signal(signal.SIGINT)

    def _kill(self, why: str) -> None:
        self.gone = self.gone or why
        with contextlib.suppress(OSError):
            self.popen.kill()

    def close(self) -> None:
        for conn in (self.send, self.recv):
            with contextlib.suppress(OSError):
                conn.close()
        with contextlib.suppress(OSError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        init, self.sandbox_init = self.sandbox_init, None
        end(init)  # and whatever the student's code left running in the sandbox


class _StudentServer:
    """The student's side: an IPython shell, the handles the tests hold, and the request loop."""

    def __init__(self, conn_in: Connection, conn_out: Connection) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        self.conn_in, self.conn_out = conn_in, conn_out
        self.shell = InteractiveShell.instance()
        self.handles = Handles()
        self.active = False  # student code is running: SIGINT interrupts it
        signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.active:
            raise KeyboardInterrupt

    def _student_code(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``function`` as student code (interruptible by the tests' deadline)."""
        self.active = True
        try:
            return function(*args, **kwargs)
        finally:
            self.active = False

    def _one_call(self, hid: int, argbytes: bytes) -> tuple | None:
        """A batched call: (status, result, changed arguments), or None when interrupted."""
        args, kwargs = RequestUnpickler(io.BytesIO(argbytes), self.handles).load()
        try:
            value = self._student_code(self.handles[hid], *args, **kwargs)
            status, payload = "ok", reply_bytes(value, self.handles)
        except KeyboardInterrupt:
            return None
        except BaseException as exc:
            status, payload = "raise", exception_payload(exc, self.handles)
        buf = io.BytesIO()
        try:
            ArgsPickler(buf, self.handles).dump((args, kwargs))
            after = buf.getvalue()
        except Exception:
            after = argbytes
        return status, payload, None if after == argbytes else after

    def run_batch(self, calls: list) -> list:
        """Call the student's functions in order: (status, result, changed arguments) each."""
        out, size = [], 0
        for hid, argbytes in calls:
            if size > MAX_MESSAGE_BYTES // 2:
                break  # the rest of the calls will be made one by one
            answer = self._one_call(hid, argbytes)
            if answer is None:
                out.append(("raise", ("KeyboardInterrupt", "", b""), None))
                break
            status, payload, changed = answer
            size += len(payload) if status == "ok" else 0
            size += len(changed) if changed is not None else 0
            out.append(answer)
        return out

    def run(self, message: tuple) -> tuple:
        """Answer one request: ("ok", value) or ("raise", name, text, args)."""
        kind = message[0]
        if kind == "run":
            result = self.shell.run_cell(message[1], store_history=False)
            error = result.error_before_exec or result.error_in_exec
            if error is not None:
                return ("raise", *exception_payload(error, self.handles))
            return ("ok", None)
        if kind == "get":
            names = [n for n in message[1] if n in self.shell.user_ns]
            return ("ok", {n: self.shell.user_ns[n] for n in names})
        if kind == "batch":
            return ("ok", self.run_batch(message[1]))
        obj = self.handles[message[1]]
        if kind == "call":
            return ("ok", obj(*message[2], **message[3]))
        if kind == "getattr":
            return ("ok", getattr(obj, message[2]))
        if kind == "len":
            return ("ok", len(obj))
        if kind == "list":
            return ("ok", list(obj))
        if kind == "getitem":
            return ("ok", obj[message[2]])
        return ("raise", "ValueError", f"unknown request {kind!r}", b"")

    def reply(self, seq: int, reply: tuple) -> None:
        buf = io.BytesIO()
        try:
            ReplyPickler(buf, self.handles).dump((seq, reply))
        except Exception as exc:
            buf = io.BytesIO()
            ReplyPickler(buf, self.handles).dump(
                (seq, ("raise", "TypeError", f"the result cannot be sent to the tests: {exc}",
                       b"")))
        self.conn_out.send_bytes(buf.getvalue())

    def serve(self) -> None:
        while True:
            try:
                raw = self.conn_in.recv_bytes()
            except (EOFError, OSError):
                break
            seq, message = RequestUnpickler(io.BytesIO(raw), self.handles).load()
            try:
                reply = self._student_code(self.run, message)
            except BaseException as exc:  # the student's exception, reported to the tests
                reply = ("raise", *exception_payload(exc, self.handles))
            self.reply(seq, reply)


def student_main() -> None:
    """The student's process: run cells and answer requests until the tests hang up."""
    die_with_parent()
    fd_in, fd_out = (int(x) for x in os.environ.pop("QCOURSE_GRADING_FDS").split(","))
    server = _StudentServer(Connection(fd_in, writable=False), Connection(fd_out, readable=False))
    server.serve()
    os._exit(0)
