"""Argument validation for every qcourse module: one argument order, one message style.

Each check takes ``(value, name, ...)``: the value as the caller received it and the name of
the argument as the caller's signature spells it (``"x"``, ``"qparams.scale"``, ``"bits"``).  It
returns the value in the form the caller computes with (a Python ``int``, a float64 array...)
or raises

* ``TypeError`` when the value is the wrong kind of thing (a string for a number, a float for
  a bit width, a complex, boolean or object array for real numbers, ``None``), and
* ``ValueError`` when it is the right kind but a wrong value (out of its range, NaN or Inf,
  empty, a shape that does not fit),

with a message of one form: ``"{name} must be {what was expected}, got {what was given}"``.
Nothing else leaves a check: no ``OverflowError`` from a huge integer, no ``MemoryError`` from
a size nobody could mean (sizes are bounded, and the bound is stated in the docstring of every
function that takes one), no ``AttributeError`` from a value of the wrong type.

Bounds on size-like integers are deliberately generous for a course (every chapter runs far
below them) and small enough that a mistyped ``2**31`` is refused at once instead of filling
the memory or running for hours.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

#: The int32 range: the accumulator of every integer kernel and the type of biases.
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
#: The largest finite float32, as a Python float (a bound for values stored in float32).
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Most OpenMP threads a kernel call may ask for.
MAX_THREADS = 1024
#: Most histogram bins (calibration); 2**24 bins of int64 counts are 128 MiB.
MAX_BINS = 2**24
#: Most training epochs in one call.
MAX_EPOCHS = 100_000
#: Most optimizer steps in one training call (a language model trains by steps, not epochs).
MAX_STEPS = 10_000_000
#: Most elements of a tensor that a size-like argument may ask the library to allocate (2**28:
#: 2 GiB of float64, far beyond what the course's functions are for).
MAX_ELEMENTS = 2**28

#: Largest magnitude of values that a function squares (or sums squares of) in float64:
#: 1e150 squared is 1e300, and a sum of many such squares still fits below 1.8e308.
MAX_SQUARABLE = 1e150

_REAL_KINDS = "fiu"


def describe(value) -> str:
    """A short description of ``value`` for an error message: its type, and its value or shape."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if value is None or isinstance(value, (bool, numbers.Number, str, bytes, np.generic)):
        text = repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
        return text if value is None else f"{type(value).__name__} {text}"
    kind = type(value).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def is_int(value) -> bool:
    """True for a Python or NumPy integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (Python or NumPy, not bool, not a float) in ``[lo, hi]``, as a Python int."""
    if type(value) is not int and not is_int(value):        # the fast path first: a plain int
        raise TypeError(f"{name} must be {_int_text(lo, hi)}, got {describe(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {_int_text(lo, hi)}, got {value}")
    return value


def _int_text(lo, hi) -> str:
    return " ".join(filter(None, ("an int", _range_text(lo, hi))))


def check_size(value, name: str, hi: int, lo: int = 1) -> int:
    """A size-like integer (a count, a length, a number of bins) in ``[lo, hi]``."""
    return check_int(value, name, lo, hi)


def check_threads(value, name: str = "threads") -> int:
    """A thread count in ``[1, MAX_THREADS]``."""
    return check_int(value, name, 1, MAX_THREADS)


def check_bool(value, name: str) -> bool:
    """``True`` or ``False`` (a NumPy bool too); anything else, even 0 or 1, is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return bool(value)


def check_real(value, name: str, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False, hi_open: bool = False, finite: bool = True) -> float:
    """A real number (int or float, not bool or complex) in the interval given, as a float.

    ``finite=False`` lets ``inf`` through (NaN never); a Python int too large for a float is
    refused with ``ValueError`` instead of raising ``OverflowError``.
    """
    def expected() -> str:
        return " ".join(filter(None, ("a finite real number" if finite else "a real number",
                                      _range_text(lo, hi, lo_open, hi_open))))

    if type(value) is not float and (isinstance(value, (bool, np.bool_))
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be {expected()}, got {describe(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {expected()}, got an int too large for a float") from None
    if (math.isnan(v) or (finite and math.isinf(v))
            or (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and (v >= hi if hi_open else v > hi))):
        raise ValueError(f"{name} must be {expected()}, got {v}")
    return v


def check_choice(value, name: str, choices: Iterable):
    """One of ``choices`` (strings, or None where the caller allows it), returned unchanged."""
    choices = tuple(choices)
    listed = ", ".join(map(repr, choices))
    simple = value is None or isinstance(value, (str, numbers.Number))
    if not simple or value not in choices:
        kind = ValueError if isinstance(value, str) or value is None else TypeError
        raise kind(f"{name} must be one of {listed}, got {describe(value)}")
    return value


def as_array(value, name: str) -> np.ndarray:
    """``np.asarray(value)``, with a ragged or otherwise unconvertible value a TypeError."""
    if isinstance(value, np.ndarray):
        return value
    if value is None:
        raise TypeError(f"{name} must be an array or a number, got None")
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise TypeError(f"{name} must be an array or a number, got {describe(value)} "
                        f"({exc})") from None


def _given(value, arr: np.ndarray) -> str:
    """What was given: the value itself for a scalar, the converted array's dtype for a list."""
    return describe(arr) if isinstance(value, (list, tuple)) else describe(value)


def _dtype_text(kinds: str) -> str:
    return {"f": "floating-point numbers", "iu": "integers"}.get(kinds, "real numbers")


def check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    """Raise ``ValueError`` naming the first NaN/Inf of a float array; return it unchanged."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        flat = arr.ravel()
        bad = np.flatnonzero(~np.isfinite(flat))
        raise ValueError(f"{name} must be finite, got {bad.size} NaN/Inf value(s), the first "
                         f"{flat[bad[0]]} at flat index {bad[0]}")
    return arr


def real_array(value, name: str, *, kinds: str = _REAL_KINDS, dtype=np.float64,
               finite: bool = True, nonempty: bool = True, ndim: int | None = None,
               min_ndim: int = 0, max_abs: float | None = None) -> np.ndarray:
    """Real numbers as an array: a NumPy array, a list or a scalar of the dtype ``kinds``.

    ``kinds`` is ``"fiu"`` (any real dtype), ``"f"`` (floats only) or ``"iu"`` (integers).
    Complex, boolean, object and string data are refused (``TypeError``: converting them would
    drop an imaginary part, or compute on something that is not a number); so are NaN/Inf when
    ``finite`` and an empty array when ``nonempty`` (``ValueError``).  The result is cast to
    ``dtype`` (float64 by default; ``None`` keeps the input's own dtype).  ``max_abs`` refuses
    larger magnitudes (:data:`MAX_SQUARABLE` where the function squares the values).
    """
    arr = as_array(value, name)
    if arr.dtype.kind not in kinds:
        raise TypeError(f"{name} must hold {_dtype_text(kinds)}, got "
                        f"{_given(value, arr)}{_dtype_note(arr)}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape "
                         f"{arr.shape}")
    if nonempty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if finite:
        check_finite(arr, name)
    if max_abs is not None and arr.size and float(np.max(np.abs(arr))) > max_abs:
        raise ValueError(f"{name} must have magnitudes at most {max_abs:g} (this function "
                         f"squares them in float64), got {float(np.max(np.abs(arr))):g}")
    if dtype is not None and arr.dtype != dtype:
        with np.errstate(over="ignore", invalid="ignore"):
            converted = arr.astype(dtype)
        target = np.dtype(dtype)
        if target.kind == "f" and arr.dtype.kind in "iu" and np.any(converted != arr):
            raise ValueError(f"{name} must be integers that {target} holds exactly, got one "
                             f"beyond 2**{np.finfo(target).nmant + 1}")
        if target.kind == "f" and finite and not np.all(np.isfinite(converted)):
            raise ValueError(f"{name} must fit {target} (magnitude at most "
                             f"{float(np.finfo(target).max):.4g}), got a value beyond it")
        arr = converted
    return arr


def _dtype_note(arr: np.ndarray) -> str:
    kind = arr.dtype.kind
    if kind == "c":
        return " (complex: the imaginary part would be dropped)"
    if kind == "b":
        return " (bool: not a number here)"
    if kind == "O":
        return " (object: not numbers)"
    return ""


def int_array(value, name: str, lo: int, hi: int, *, what: str | None = None,
              nonempty: bool = True) -> np.ndarray:
    """Integers in ``[lo, hi]`` as an int64 array (a Python int, a NumPy integer or array).

    Floats (even integral ones: 3.0 might be 3.7 rounded by someone), bools, strings and
    objects are refused with ``TypeError``; values outside the range with ``ValueError`` that
    names ``what`` the range is (e.g. ``"int32"``).  A Python int of any size is compared
    exactly, never wrapped.
    """
    what = f"in [{lo}, {hi}] ({what})" if what else f"in [{lo}, {hi}]"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be integers {what}, got {describe(value)}")
    if is_int(value):
        v = int(value)
        if not lo <= v <= hi:
            raise ValueError(f"{name} must be integers {what}, got {v}")
        return np.asarray(v, dtype=np.int64)
    if isinstance(value, (list, tuple)) and _has_big_int(value):
        raise ValueError(f"{name} must be integers {what}, got a value outside int64")
    arr = as_array(value, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers {what}, got {_given(value, arr)}"
                        f"{_dtype_note(arr)}")
    if nonempty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    bad = (arr < lo) | (arr > hi)
    if np.any(bad):
        raise ValueError(f"{name} must be integers {what}; {int(np.count_nonzero(bad))} "
                         f"value(s) are outside, e.g. {int(arr[bad].flat[0])}")
    return arr.astype(np.int64)


def _has_big_int(seq) -> bool:
    for item in seq:
        if isinstance(item, (list, tuple)):
            if _has_big_int(item):
                return True
        elif is_int(item) and not -(2**63) <= int(item) < 2**63:
            return True
    return False


def check_ndarray(value, name: str, dtypes, *, ndim: int | None = None,
                  nonempty: bool = True) -> np.ndarray:
    """An actual ``numpy.ndarray`` of one of ``dtypes`` (no conversion: the caller's type matters,
    e.g. int8 codes), of ``ndim`` dimensions, not empty."""
    if not isinstance(dtypes, tuple):
        dtypes = tuple(dtypes) if isinstance(dtypes, list) else (dtypes,)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of dtype {_dtype_names(dtypes)}, got "
                        f"{describe(value)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {value.ndim}-D shape {value.shape}")
    if nonempty and value.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {value.shape}")
    return value


def _dtype_names(dtypes) -> str:
    return " or ".join(np.dtype(d).name for d in dtypes)


def check_float_matrix(value, name: str, *, finite: bool = True,
                       images: bool = False) -> np.ndarray:
    """A non-empty 2-D (rows, features) ndarray of a float dtype, kept as it is; with
    ``images=True`` also a 4-D (batch, channels, height, width) batch of images."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of floats, got {describe(value)}")
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must have a float dtype (float32 or float64), got "
                        f"{value.dtype}{_dtype_note(value)}")
    if value.ndim != 2 and not (images and value.ndim == 4):
        wanted = ("2-D (batch, features) or 4-D (batch, channels, height, width)" if images
                  else "2-D (batch, features)")
        raise ValueError(f"{name} must be {wanted}, got shape {value.shape}")
    if 0 in value.shape:
        raise ValueError(f"{name} must not be empty, got shape {value.shape}")
    return check_finite(value, name) if finite else value


def check_labels(value, name: str, n: int, num_classes: int | None = None) -> np.ndarray:
    """Integer class labels: an ndarray of shape ``(n,)``, each in ``[0, num_classes)``."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of integer labels, got "
                        f"{describe(value)}")
    if value.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the inputs, got {value.shape}")
    if value.size and value.min() < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(value.min())}")
    if num_classes is not None and value.size and value.max() >= num_classes:
        raise ValueError(f"{name} must hold labels < {num_classes} (the model's outputs), got "
                         f"{int(value.max())}")
    return value


def onnx_scale(value, name: str, dtypes=(np.float32,)) -> np.ndarray:
    """An ONNX operator's scale: a NumPy array or scalar of one of ``dtypes`` (the operator's
    tensor types; a Python float is refused so that its rounding to float32 is explicit), not
    empty, finite and > 0."""
    dtypes = tuple(np.dtype(d) for d in dtypes)
    names = " or ".join(d.name for d in dtypes)
    if not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(f"{name} must be a {names} NumPy array or scalar (the operator's tensor "
                        f"type), got {describe(value)}; use np.float32(...)")
    arr = np.asarray(value)
    if arr.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {names}, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    bad = ~(np.isfinite(arr) & (arr > 0))
    if np.any(bad):
        i = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(f"{name} must be finite and > 0, got {arr.ravel()[i]} at flat index {i}")
    return arr.astype(np.float32)


def check_axis(axis, name: str, ndim: int) -> int:
    """An axis of a ``ndim``-D tensor (negative counts from the end), normalized to >= 0."""
    axis = check_int(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim - 1}] for a {ndim}-D tensor, got "
                         f"{axis}")
    return axis % ndim


def check_instance(value, name: str, cls, what: str | None = None):
    """``value`` if it is an instance of ``cls``, else a TypeError saying what was expected."""
    if not isinstance(value, cls):
        if what is None:
            classes = cls if isinstance(cls, tuple) else (cls,)
            what = " or ".join(f"a {c.__module__}.{c.__qualname__}" for c in classes)
        raise TypeError(f"{name} must be {what}, got {describe(value)}")
    return value


def check_dtype(value, name: str, allowed) -> np.dtype:
    """A NumPy dtype (or anything ``np.dtype`` accepts) that is one of ``allowed``."""
    allowed = tuple(np.dtype(a) for a in allowed)
    names = ", ".join(a.name for a in allowed)
    try:
        dtype = np.dtype(value) if value is not None else None
    except (TypeError, ValueError):
        dtype = None
    if dtype not in allowed:
        raise TypeError(f"{name} must be one of the dtypes {names}, got {describe(value)}")
    return dtype


def check_sequence(value, name: str, *, min_len: int = 0, max_len: int | None = None) -> list:
    """A list, tuple, range or 1-D array (not a string, not a mapping), as a list of items."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list or tuple, got {describe(value)}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        expected = (f"{min_len} to {max_len}" if max_len is not None and max_len != min_len
                    else str(min_len) if max_len == min_len else f"at least {min_len}")
        raise ValueError(f"{name} must have {expected} entries, got {len(value)}")
    return list(value)


def check_int_sequence(value, name: str, lo: int | None = None, hi: int | None = None, *,
                       min_len: int = 1, max_len: int | None = None) -> tuple[int, ...]:
    """A list or tuple of ints, each in ``[lo, hi]`` (a shape, the widths of a network...)."""
    items = check_sequence(value, name, min_len=min_len, max_len=max_len)
    return tuple(check_int(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(items))


_FLOAT32_64 = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(value, name: str, *, finite: bool = True, ndim: int | None = None) -> np.ndarray:
    """A float32 or float64 array (its own dtype kept: the caller computes in it), not empty,
    finite unless ``finite=False``."""
    arr = as_array(value, name)
    if arr.dtype not in _FLOAT32_64:
        raise TypeError(f"{name} must be a float32 or float64 array, got {_given(value, arr)}"
                        f"{_dtype_note(arr)}")
    return real_array(arr, name, kinds="f", dtype=None, finite=finite, ndim=ndim)
