"""The trusted-process channel: what may cross from the student's process to the tests.

The split run (``split.py``) runs the tests in a process that never executes student code;
they reach the student's functions and values through this channel. Replies carry plain data
only (numbers, strings, tuples, lists, dicts, sets, NumPy arrays and scalars, objects of
qcourse's own classes) by value; any other object stays in the student's process and crosses as
a handle, a ``RemoteObject`` that can be called and read but compares equal only to itself.
Exceptions cross by name: a built-in one is raised again as itself, anything else as
``StudentCodeError``.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import pickle
import sys
import types
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .student import StudentProcess

MAX_MESSAGE_BYTES = 64 * 2**20
_GRADING_PACKAGE = __name__.rpartition(".")[0]  # "qcourse.grading": never trusted


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict,
                set, frozenset, range, slice, type(Ellipsis), pickle.PickleBuffer)
_SAFE_GLOBALS = {
    ("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "range"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
}


def _trusted_class(module: str, name: str) -> type | None:
    """A class the tests may receive from the student's process, or None."""
    in_grading = module == _GRADING_PACKAGE or module.startswith(_GRADING_PACKAGE + ".")
    if module.split(".")[0] != "qcourse" or in_grading or module not in sys.modules:
        return None
    obj = getattr(sys.modules[module], name, None)
    if isinstance(obj, type) and obj.__module__ == module and not issubclass(obj, BaseException):
        return obj
    return None


def is_plain(obj: Any) -> bool:
    """Data the student's process sends by value; anything else stays there (a handle)."""
    kind = type(obj)
    if kind in _PLAIN_TYPES or kind is np.ndarray:
        return True
    if isinstance(obj, (np.generic, np.dtype)) and kind.__module__.split(".")[0] == "numpy":
        return True
    if isinstance(obj, type):  # classes named in a pickle stream (numpy's reconstructors)
        try:
            module, name = obj.__module__, obj.__qualname__
            return (module, name) in _SAFE_GLOBALS or _trusted_class(module, name) is obj
        except Exception:
            return False
    if kind in (types.BuiltinFunctionType, types.FunctionType):
        module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
        return type(module) is str and type(name) is str and (module, name) in _SAFE_GLOBALS
    return _trusted_class(kind.__module__, kind.__qualname__) is kind


class Handles:
    """Student side: the objects the tests hold handles to (one handle per object)."""

    def __init__(self) -> None:
        self.objects: list = []
        self.index: dict[int, int] = {}

    def add(self, obj: Any) -> int:
        k = self.index.get(id(obj))
        if k is None or self.objects[k] is not obj:
            k = len(self.objects)
            self.objects.append(obj)
            self.index[id(obj)] = k
        return k

    def find(self, obj: Any) -> int | None:
        k = self.index.get(id(obj))
        return k if k is not None and self.objects[k] is obj else None

    def __getitem__(self, k: int) -> Any:
        return self.objects[k]


class ReplyPickler(pickle.Pickler):
    """Student side: plain data by value, every other object as a handle into ``handles``."""

    def __init__(self, file: io.BytesIO, handles: Handles) -> None:
        super().__init__(file, protocol=5)
        self.handles = handles

    def persistent_id(self, obj: Any) -> Any:
        if is_plain(obj):
            return None
        return ("handle", self.handles.add(obj))


class ArgsPickler(pickle.Pickler):
    """Student side: arguments pickled back exactly as the tests pickled them (to spot changes)."""

    def __init__(self, file: io.BytesIO, handles: Handles) -> None:
        super().__init__(file, protocol=5)
        self.handles = handles

    def persistent_id(self, obj: Any) -> Any:
        k = self.handles.find(obj)
        return None if k is None else ("handle", k)


class _NotComparable(Exception):
    pass


class _ComparePickler(pickle.Pickler):
    """Test side: pickle plain data exactly as ``ReplyPickler`` does, or give up."""

    def persistent_id(self, obj: Any) -> Any:
        if is_plain(obj):
            return None
        raise _NotComparable


def plain_bytes(obj: Any) -> bytes | None:
    buf = io.BytesIO()
    try:
        _ComparePickler(buf, protocol=5).dump(obj)
    except Exception:
        return None
    return buf.getvalue()


def reply_bytes(obj: Any, handles: Handles) -> bytes:
    buf = io.BytesIO()
    ReplyPickler(buf, handles).dump(obj)
    return buf.getvalue()


class RequestUnpickler(pickle.Unpickler):
    """Student side: requests from the tests, with handles resolved."""

    def __init__(self, file: io.BytesIO, handles: Handles) -> None:
        super().__init__(file)
        self.handles = handles

    def persistent_load(self, pid: Any) -> Any:
        return self.handles[pid[1]]


class StudentCodeError(Exception):
    """The student's code raised an exception that is not a built-in one (its name and text)."""


class StudentTimeout(Exception):
    """The student's code ran past its time budget."""


class StudentProcessGone(Exception):
    """The student's process died or broke the protocol; nothing more can be asked of it."""


class RemoteObject:
    """A student object that is not plain data: it can be called and its attributes read.

    Comparisons, hashing and truth value are *not* forwarded, so an object that claims to equal
    anything equals only itself here.
    """

    __slots__ = ("_proc", "_hid")

    def __init__(self, proc: StudentProcess, hid: int) -> None:
        self._proc = proc
        self._hid = hid

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proc.request(("call", self._hid, args, kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._proc.request(("getattr", self._hid, name))

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        n = self._proc.request(("len", self._hid))
        if type(n) is not int:
            raise TypeError("len() of a student object did not return an int")
        return n

    def __iter__(self) -> Any:
        items = self._proc.request(("list", self._hid))
        if type(items) is not list:
            raise TypeError("a student object could not be iterated")
        return iter(items)

    def __getitem__(self, key: Any) -> Any:
        return self._proc.request(("getitem", self._hid, key))

    def __repr__(self) -> str:
        return f"<student object #{self._hid}>"


class RequestPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, proc: StudentProcess) -> None:
        super().__init__(file, protocol=5)
        self.proc = proc

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is RemoteObject:
            if obj._proc is not self.proc:
                raise pickle.PicklingError("a handle from another student process")
            return ("handle", obj._hid)
        return None


class ReplyUnpickler(pickle.Unpickler):
    """Test side: only plain data and trusted classes; student objects become RemoteObjects."""

    def __init__(self, file: io.BytesIO, proc: StudentProcess) -> None:
        super().__init__(file)
        self.proc = proc

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        trusted = _trusted_class(module, name)
        if trusted is not None:
            return trusted
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    def persistent_load(self, pid: Any) -> Any:
        if (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "handle"
                and type(pid[1]) is int):
            return RemoteObject(self.proc, pid[1])
        raise pickle.UnpicklingError("bad handle")


BUILTIN_EXCEPTIONS = {name: obj for name, obj in vars(builtins).items()
                       if isinstance(obj, type) and issubclass(obj, Exception)}


def raise_student_exception(name: Any, text: Any, args: Any = b"", proc: Any = None) -> None:
    """Raise, on the tests' side, the exception the student's code raised.

    A built-in exception is raised as itself, with the same arguments when they are plain data
    (tests may expect a ValueError and read its message); anything else as ``StudentCodeError``,
    and an interrupt as ``StudentTimeout`` (never a BaseException).
    """
    name, text = str(name), str(text)
    if name == "KeyboardInterrupt":
        raise StudentTimeout("the student's code ran out of time and was interrupted")
    exc_type = BUILTIN_EXCEPTIONS.get(name)
    exc: Exception = StudentCodeError(f"{name}: {text}")
    if exc_type is not None:
        with contextlib.suppress(Exception):
            exc = exc_type(text)
        if type(args) is bytes and args:
            with contextlib.suppress(Exception):
                values = ReplyUnpickler(io.BytesIO(args), proc).load()
                if type(values) is tuple:
                    exc = exc_type(*values)
    raise exc


def exception_payload(exc: BaseException, handles: Handles) -> tuple[str, str, bytes]:
    """Student side: an exception as (type name, text, pickled args)."""
    try:
        args = reply_bytes(tuple(exc.args), handles)
    except Exception:
        args = b""
    return type(exc).__name__, str(exc)[:2000], args
