"""int8 matrix multiplication: the checked entry points over the compiled loops.

The kernels chapter (``book/kernels.md``) explains the multiply-accumulate (MAC) unit these
functions model: 8-bit operands, 16-bit products, a 32-bit accumulator.  The loops themselves
live in the Cython extension ``qcourse._kernels``; this module validates the inputs, allocates
the output and is the only place a learner calls.
"""

from __future__ import annotations

import os

import numpy as np

from qcourse import _checks, _kernels
from qcourse._deprecated import moved_names
from qcourse.fixed_point import max_k

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "LADDER",
    "PackedB",
    "PackedInt4",
    "available_paths",
    "best_path",
    "depthwise_conv_int8",
    "depthwise_conv_int8_reference",
    "get_num_threads",
    "matmul_int8",
    "matmul_int8_bt",
    "matmul_int8_ikj",
    "matmul_int8_naive",
    "matmul_int8_reference",
    "matmul_int8_requant",
    "matmul_int8_requant_reference",
    "matmul_int8_u8s8",
    "matmul_w4a8",
    "matmul_w4a8_reference",
    "max_group_w4a8",
    "max_k_s8s8",
    "prepack",
    "prepack_int4",
    "quantize_rows_int8",
    "set_num_threads",
    "w4a8_epilogue_reference",
    "w4a8_group_sums",
    "w4a8_group_sums_reference",
]

INT32_MAX = _checks.INT32_MAX
INT32_MIN = _checks.INT32_MIN


def max_k_s8s8() -> int:
    r"""Largest inner dimension K for which an int8 x int8 dot product cannot overflow int32.

    One product lies in :math:`[-128 \cdot 127, (-128)^2] = [-16256, 16384]`.  A sum of K
    products is therefore at most :math:`16384 K` and at least :math:`-16256 K`; the positive
    side binds first, so K must satisfy :math:`2^{14} K \le 2^{31} - 1`, i.e.
    :math:`K \le 2^{17} - 1 = 131071`.  At K = 131072 an all-(-128) row times an all-(-128)
    column gives exactly :math:`2^{31}`, one more than int32 can hold.
    """
    return max_k(32, 8, 8)


_MAX_K = max_k_s8s8()


_INT8 = (np.dtype(np.int8),)


def _check_matrix(x, name: str) -> None:
    _checks.check_ndarray(x, name, _INT8, ndim=2)

def _check_k(k: int, name: str) -> None:
    if k > _MAX_K:
        raise ValueError(
            f"K={k} is too large ({name} has {k} {'columns' if name == 'a' else 'rows'}): an "
            f"int8 x int8 sum of more than {_MAX_K} products can overflow the int32 accumulator "
            f"((-128)*(-128)*K > 2**31 - 1); split K into chunks and add the int32 partial sums "
            f"in int64"
        )


def _check_inner(a_shape: tuple, b_shape: tuple) -> None:
    if a_shape[1] != b_shape[0]:
        raise ValueError(
            f"inner dimensions differ: a has shape {a_shape} (K={a_shape[1]}) but b has shape "
            f"{b_shape} (K={b_shape[0]}); a.shape[1] must equal b.shape[0]"
        )
    _check_k(a_shape[1], "a")


def _check_operands(a, b) -> tuple[np.ndarray, np.ndarray]:
    _check_matrix(a, "a")
    _check_matrix(b, "b")
    _check_inner(a.shape, b.shape)
    return a, b


def matmul_int8_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Exact int8 x int8 -> int32 matrix product in plain NumPy (the reference).

    .. math:: C_{ij} = \sum_{k=0}^{K-1} A_{ik} B_{kj}

    computed in int64 and returned as int32 (exact: K is at most :func:`max_k_s8s8`).
    Same signature and checks as :func:`matmul_int8`; see the kernels chapter.

    Parameters
    ----------
    a : numpy.ndarray, int8, shape (M, K)
    b : numpy.ndarray, int8, shape (K, N)

    Returns
    -------
    numpy.ndarray, int32, shape (M, N)
    """
    a, b = _check_operands(a, b)
    return (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)


def _new_output(a: np.ndarray, n: int) -> np.ndarray:
    return np.zeros((a.shape[0], n), dtype=np.int32)


# --- Instruction-set paths ------------------------------------------------------------------------

_PATHS = {
    "portable": _kernels.PATH_PORTABLE,
    "avx2": _kernels.PATH_AVX2,
    "vnni512": _kernels.PATH_VNNI512,
}
_PATH_NAMES = {v: k for k, v in _PATHS.items()}


def _max_path() -> str | None:
    """``QCOURSE_MAX_PATH``: pretend the CPU has no path above this one (e.g. ``avx2``: no VNNI)."""
    value = os.environ.get("QCOURSE_MAX_PATH")
    if value and value not in _PATHS:
        raise ValueError(f"QCOURSE_MAX_PATH must be one of {list(_PATHS)}, got {value!r}")
    return value or None


_MAX_PATH = _max_path()


def available_paths() -> list[str]:
    """The instruction-set paths this CPU can run, slowest first (``"portable"`` is always there).

    ``"avx2"`` uses 256-bit ``vpmaddwd``; ``"vnni512"`` uses AVX-512 VNNI ``vpdpbusd``.  Detected
    at run time from CPUID: the package is compiled without ``-march`` and runs on any CPU.  The
    environment variable ``QCOURSE_MAX_PATH`` (read at import) hides the paths above the one it
    names, which simulates an older CPU: ``QCOURSE_MAX_PATH=avx2`` runs everything as on a CPU
    without AVX-512 VNNI.
    """
    names = list(_PATHS)
    allowed = names[: names.index(_MAX_PATH) + 1] if _MAX_PATH else names
    return [name for name in allowed if _kernels.path_supported(_PATHS[name])]


def best_path() -> str:
    """The fastest path in :func:`available_paths`; what :func:`matmul_int8` uses by default."""
    return available_paths()[-1]


def _path_code(path: str | None) -> int:
    if path is None:
        return _PATHS[best_path()]
    _checks.check_choice(path, "path", sorted(_PATHS))
    if path not in available_paths():
        hidden = (f" (QCOURSE_MAX_PATH={_MAX_PATH} hides the paths above it)" if _MAX_PATH
                  else "")
        raise ValueError(
            f"path={path!r} needs instructions this CPU lacks; available: {available_paths()}"
            f"{hidden}"
        )
    return _PATHS[path]


# --- The ladder ----------------------------------------------------------------------------------

def matmul_int8_naive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Rung 1 of the kernels chapter: the textbook triple loop, in i-j-k order.

    :math:`C_{ij} = \sum_k A_{ik} B_{kj}` with the innermost loop walking down a column of B,
    one cache line per element.  Exact; same checks as :func:`matmul_int8_reference`.
    """
    a, b = _check_operands(a, b)
    out = _new_output(a, b.shape[1])
    _kernels.matmul_s8s8_naive(np.ascontiguousarray(a), np.ascontiguousarray(b), out)
    return out


def matmul_int8_ikj(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Rung 2: the same sum in i-k-j order, so the inner loop walks along a row of B and of C.

    :math:`C_{i,:} \mathrel{+}= A_{ik} B_{k,:}`: contiguous access, which the compiler vectorizes.
    """
    a, b = _check_operands(a, b)
    out = _new_output(a, b.shape[1])
    _kernels.matmul_s8s8_ikj(np.ascontiguousarray(a), np.ascontiguousarray(b), out)
    return out


def matmul_int8_bt(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Rung 3: B transposed once, then every output is a dot product of two contiguous rows.

    :math:`C_{ij} = A_{i,:} \cdot (B^T)_{j,:}`.
    """
    a, b = _check_operands(a, b)
    out = _new_output(a, b.shape[1])
    _kernels.matmul_s8s8_bt(np.ascontiguousarray(a), np.ascontiguousarray(b.T), out)
    return out


def matmul_int8_u8s8(a: np.ndarray, b: np.ndarray, *, path: str | None = None) -> np.ndarray:
    r"""Rung 4: the unsigned x signed form that dot-product instructions want.

    .. math:: C_{ij} = \sum_k (A_{ik} + 128) B_{kj} \; - \; 128 \sum_k B_{kj}

    The shifted activations :math:`A + 128` lie in [0, 255] and fit uint8; x86's ``vpdpbusd``
    multiplies exactly uint8 by int8.  The column sums of B are computed once.  The same C loop is
    compiled for each instruction set (``path``) and left to the compiler's vectorizer.
    """
    a, b = _check_operands(a, b)
    code = _path_code(path)
    au = np.ascontiguousarray((a.astype(np.int16) + 128).astype(np.uint8))
    colsum = b.sum(axis=0, dtype=np.int32)
    out = _new_output(a, b.shape[1])
    _kernels.matmul_u8s8(code, au, np.ascontiguousarray(b.T), colsum, out)
    return out


class PackedB:
    r"""B packed once for :func:`matmul_int8`: keep it and reuse it for every call.

    ``data`` holds :math:`B + 128` as uint8 in groups of 64 columns; inside a group, for each run
    of four consecutive k values, four 64-byte blocks (one AVX-512 register each: 16 columns x 4
    k); padding is 0.  ``vpdpbusd`` multiplies unsigned by signed bytes, and the unsigned operand
    is the one held in a register, so B (loaded once per tile) is the one shifted to uint8.
    ``colsum`` is :math:`\sum_k B_{kj}` (padded with zeros to a multiple of 64), used to fold
    the input zero point into the requantization.

    A checked, immutable value: built only by :func:`prepack` (calling ``PackedB(...)`` raises
    ``TypeError``), its arrays read-only and ``data`` starting on a 64-byte boundary, which the
    kernel's aligned loads need.  ``copy.copy``, ``copy.deepcopy`` and pickling store B itself
    (:meth:`unpack`) and pack it again, so a copy, a model sent to another process or loaded
    from a file is aligned like the original and gives the identical result.
    """

    __slots__ = ("k", "n", "data", "colsum")
    k: int
    n: int
    data: np.ndarray
    colsum: np.ndarray

    def __init__(self, *args, **kwargs):
        raise TypeError("PackedB is built by qcourse.kernels.prepack(b), not by calling PackedB")

    @classmethod
    def _from_packing(cls, k: int, n: int, data: np.ndarray, colsum: np.ndarray) -> PackedB:
        data.flags.writeable = False
        colsum.flags.writeable = False
        obj = object.__new__(cls)
        for name, value in (("k", k), ("n", n), ("data", data), ("colsum", colsum)):
            object.__setattr__(obj, name, value)
        return obj

    def __setattr__(self, name, value):
        raise AttributeError(f"PackedB is immutable: cannot set {name!r}; pack a new B with "
                             f"prepack")

    __delattr__ = __setattr__

    def unpack(self) -> np.ndarray:
        """B itself, int8 of shape (K, N), read back from the packed bytes."""
        groups = self.data.size // (self.k + 3 & ~3) // 64
        blocks = self.data.reshape(groups, -1, 4, 16, 4)       # group, quad, panel, column, t
        b = blocks.transpose(1, 4, 0, 2, 3).reshape(-1, groups * 64)
        return (b[:self.k, :self.n].astype(np.int16) - 128).astype(np.int8)

    def __reduce__(self):
        return prepack, (self.unpack(),)

    def __eq__(self, other):
        if not isinstance(other, PackedB):
            return NotImplemented
        return (self.k, self.n) == (other.k, other.n) and np.array_equal(self.data, other.data)

    __hash__ = None

    def __repr__(self) -> str:
        return f"PackedB(k={self.k}, n={self.n}, {self.data.size} bytes)"


def _aligned_empty(size: int, dtype, alignment: int = 64) -> np.ndarray:
    """A 1-D array whose data starts on a cache-line boundary (one 64-byte load, not two)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size * itemsize + alignment, dtype=np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + size * itemsize].view(dtype)


def _scratch(m: int, n: int) -> np.ndarray:
    """Per-call scratch of the packed kernel: rowsum(A), the k % 4 tail of A, per-column terms."""
    return np.empty(_kernels.scratch_size(m, n), dtype=np.int32)


def prepack(b: np.ndarray) -> PackedB:
    """Pack an int8 (K, N) matrix for :func:`matmul_int8` (the weights of a layer, once).

    The only way to build a :class:`PackedB`.  Same checks on ``b`` as :func:`matmul_int8`:
    an int8 ndarray, 2-D, not empty, K at most :func:`max_k_s8s8`.
    """
    _check_matrix(b, "b")
    _check_k(b.shape[0], "b")
    k, n = b.shape
    data = _aligned_empty(_kernels.packed_b_size(k, n), np.uint8)
    colsum = np.empty(_kernels.padded_columns(n), dtype=np.int32)
    _kernels.pack_b(np.ascontiguousarray(b), data, colsum)
    return PackedB._from_packing(k, n, data, colsum)


def _packed_operand(b) -> PackedB:
    """``b`` as the kernel receives it: a PackedB from :func:`prepack`, or an int8 matrix packed
    now.  The compiled function checks the packed sizes against K and N and the alignment."""
    if isinstance(b, PackedB):
        return b
    return prepack(b)


_threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def get_num_threads() -> int:
    """Most threads :func:`matmul_int8` uses by default (initially: the CPUs this process may use).

    A product smaller than ``MIN_OPS_PER_THREAD`` operations per thread uses fewer.
    """
    return _threads


def set_num_threads(threads: int) -> None:
    """Set the default thread count of the packed kernel (OpenMP, over groups of 64 columns).

    Bounds: ``threads`` is an int in [1, 1024].
    """
    global _threads
    _threads = _checks.check_threads(threads)


# Work per extra thread before the default thread count uses it: 2**24 operations, about 40 us of
# the VNNI kernel.  On an idle two-core Zen 4, two threads were slower than one at 128^3, even at
# 192^3, 1.6 times as fast at 256^3, and 2.7 times at a 1 x 4096 x 4096 matrix-vector product
# (each core streams half of the weights through its own L2).  An OpenMP loop ends in a barrier
# that waits for every thread, and on a machine whose other cores are busy a thread can wait a
# whole scheduler time slice (milliseconds) to run at all, so much smaller products stay on one
# thread.  An explicit ``threads=`` argument is always obeyed.
MIN_OPS_PER_THREAD = 2**24


def _default_threads(m: int, n: int, k: int) -> int:
    return max(1, min(_threads, (2 * m * n * k) // MIN_OPS_PER_THREAD))


def matmul_int8(a: np.ndarray, b: np.ndarray | PackedB, *, path: str | None = None,
                threads: int | None = None) -> np.ndarray:
    r"""Exact int8 x int8 -> int32 matrix product, run by the compiled extension without the GIL.

    .. math:: C_{ij} = \sum_{k=0}^{K-1} A_{ik} B_{kj}

    Each product of two int8 values fits in 16 bits and the sum is accumulated in int32, as a
    hardware MAC unit does.  K is limited to :func:`max_k_s8s8` (131071) so that the int32
    accumulator can never overflow; a larger K raises ``ValueError`` rather than wrapping.
    Non-contiguous inputs are copied to C order first.  This is rung 5 of the kernels chapter's
    ladder, the one the other chapters call: B packed into register-sized blocks, the output
    computed in register tiles.  Each micro-tile of C (6 rows x 64 columns on the VNNI path, 24
    registers) stays in registers for the whole k loop; per group of four k values it reads 256
    bytes of packed B and issues 24 ``vpdpbusd``, each of which broadcasts four bytes of a row
    of A straight from A's memory (A is not copied).  See the kernels chapter.

    Parameters
    ----------
    a : numpy.ndarray, int8, shape (M, K)
    b : numpy.ndarray, int8, shape (K, N), or PackedB
        A :class:`PackedB` from :func:`prepack` is packed once and multiplied many times.
    path : {"portable", "avx2", "vnni512"}, optional
        Force an instruction set (see :func:`available_paths`); default: the best this CPU
        supports (:func:`best_path`).  Every path gives the identical exact result.
    threads : int, optional
        OpenMP threads over the columns, 1 to 1024; default :func:`get_num_threads`.

    Returns
    -------
    numpy.ndarray, int32, shape (M, N)

    Raises
    ------
    TypeError
        if ``a`` or ``b`` is not an int8 ndarray.
    ValueError
        if either is not 2-D or is empty, the inner dimensions differ, K exceeds the bound, or
        ``path`` is unknown or not supported by this CPU, or ``threads`` is not in [1, 1024].
    """
    _check_matrix(a, "a")
    packed = _packed_operand(b)
    _check_inner(a.shape, (packed.k, packed.n))
    code = _path_code(path)
    threads = (_default_threads(a.shape[0], packed.n, packed.k) if threads is None
               else _checks.check_threads(threads))
    a = np.ascontiguousarray(a)
    # every entry is written; a C of 2 MiB or more 64-byte aligned, so that the kernel can store
    # it non-temporally (the alignment costs microseconds, which only a large product hides)
    m = a.shape[0]
    out = (_aligned_empty(m * packed.n, np.int32).reshape(m, packed.n) if m * packed.n >= 2**19
           else np.empty((m, packed.n), dtype=np.int32))
    _kernels.gemm_packed(code, a, _scratch(a.shape[0], packed.n), packed.data, packed.colsum, out,
                         threads)
    return out


_NO_INT32 = np.zeros(0, np.int32)
_OUT_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))
_FLT_MAX = float(np.finfo(np.float32).max)


def _per_column(values: np.ndarray, name: str, n: int) -> np.ndarray:
    """A scalar or one value per column of B, broadcast to (n,)."""
    if values.ndim > 1 or values.size not in (1, n):
        raise ValueError(f"{name} must be a scalar or have shape ({n},) (one per column of b), "
                         f"got shape {values.shape}")
    return np.broadcast_to(values.reshape(-1), (n,))


def _requant_args(packed: PackedB, multiplier, output_zero_point, bias, a_zero_point,
                  b_zero_point, out_dtype, qmin, qmax):
    """Validate the requantization arguments; return them as the compiled kernel takes them.

    Scalars (the common case) are checked without building arrays: this runs on every call.
    Returns ``(out_dtype, qmin, qmax, zp, mult, bias, za, zb)`` with ``mult`` float32 of 1 or N
    entries and ``bias``/``zb`` int32 of N entries or empty (none / zero).
    """
    n = packed.n
    try:
        out_dtype = np.dtype(out_dtype)
    except TypeError:
        out_dtype = None
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be int8 or uint8, got {_checks.describe(out_dtype)}")
    lo, hi = (-128, 127) if out_dtype == _OUT_DTYPES[0] else (0, 255)
    qmin = lo if qmin is None else _checks.check_int(qmin, "qmin", lo, hi)
    qmax = hi if qmax is None else _checks.check_int(qmax, "qmax", lo, hi)
    if qmin > qmax:
        raise ValueError(f"qmin must be <= qmax, got qmin={qmin}, qmax={qmax}")
    zp = _checks.check_int(output_zero_point, "output_zero_point", lo, hi)
    if not isinstance(multiplier, (list, tuple, np.ndarray)):
        m = _checks.check_real(multiplier, "multiplier", 0, lo_open=True)
        mult = np.array([min(m, _FLT_MAX)], dtype=np.float32)   # no overflow warning
        if not mult[0] > 0 or m > _FLT_MAX:
            raise ValueError(f"multiplier must be a positive float32 (it is rounded to "
                             f"float32 once), got {m}, which rounds to "
                             f"{'inf' if m > _FLT_MAX else mult[0]}")
    elif (isinstance(multiplier, np.ndarray) and multiplier.dtype == np.float64
          and multiplier.shape == (n,) and np.all((multiplier > 0) & (multiplier <= _FLT_MAX))
          and np.all((mult := multiplier.astype(np.float32)) > 0)):
        pass                  # one per column, float64, in range (NaN fails > 0): the fast path
    else:
        m64 = _per_column(_checks.real_array(multiplier, "multiplier"), "multiplier", n)
        if not np.all(m64 > 0):
            raise ValueError("multiplier must be > 0 (a scalar or one per column)")
        with np.errstate(over="ignore"):
            mult = np.ascontiguousarray(m64, dtype=np.float32)
        if not (np.all(mult > 0) and np.all(np.isfinite(mult))):
            raise ValueError("multiplier must be a positive float32 (it is rounded to float32 "
                             "once): a value underflows to 0 or overflows")
    za = _checks.check_int(a_zero_point, "a_zero_point", -128, 127)
    if b_zero_point is None or (_checks.is_int(b_zero_point) and b_zero_point == 0):
        zb = _NO_INT32
    else:
        zb = _per_column(_checks.int_array(b_zero_point, "b_zero_point", -128, 127),
                         "b_zero_point", n)
        zb = np.ascontiguousarray(zb, dtype=np.int32) if np.any(zb != 0) else _NO_INT32
    if bias is None:
        bias = _NO_INT32
    else:
        bias = _checks.check_ndarray(bias, "bias", (np.dtype(np.int32),), ndim=1)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},) (one per column of b), got "
                             f"{bias.shape}")
        bias = np.ascontiguousarray(bias)
    return out_dtype, qmin, qmax, zp, mult, bias, za, zb


def matmul_int8_requant(a: np.ndarray, b: np.ndarray | PackedB, multiplier,
                        output_zero_point: int = 0, *, bias=None, a_zero_point: int = 0,
                        b_zero_point=None, out_dtype=np.int8, qmin: int | None = None,
                        qmax: int | None = None, path: str | None = None,
                        threads: int | None = None) -> np.ndarray:
    r"""Rung 6: the int8 GEMM with requantization to 8 bits fused into its write-out.

    .. math::

        v_{ij} = \sum_k (A_{ik} - z_A)(B_{kj} - z_{B,j}) + \text{bias}_j, \qquad
        y_{ij} = \mathrm{clamp}\big(\mathrm{rhe}(\mathrm{f32}(v_{ij}) \cdot m_j) + z_y,\,
                 q_{\min}, q_{\max}\big)

    with a float32 multiplier :math:`m_j`, rhe = round half to even, and the int32 sum taken
    modulo :math:`2^{32}`: the requantization of ONNX Runtime's QLinearMatMul and QLinearConv
    (``qcourse.int_matmul.qlinear_matmul`` reproduces them on top of this kernel).  ``multiplier``
    is rounded to float32 once; to match ONNX Runtime bit for bit pass its value
    :math:`\mathrm{fl}(\mathrm{fl}(S_A S_{B,j}) / S_y)` computed in float32
    (``qcourse.int_matmul.float_multiplier``), which is not always the correctly rounded
    :math:`S_A S_{B,j} / S_y`.  PyTorch's FBGEMM, x86 and oneDNN engines add a float bias before
    rounding instead of an int32 one, so they can differ by one step (the int_matmul chapter).
    The zero-point terms are folded into per-column constants (and, when B has a zero point, one
    per-row sum of A).  ``qmin``/``qmax`` narrow the output range: a fused ReLU
    is ``qmin=output_zero_point``.  Each 64-column group is computed into a small int32 tile and
    converted from there; the int32 result matrix is never written.

    Parameters
    ----------
    a : int8 (M, K);  b : int8 (K, N) or PackedB
    multiplier : float or float array (N,), > 0
    output_zero_point : int, within ``out_dtype``'s range
    bias : int32 (N,), optional
    a_zero_point : int in [-128, 127];  b_zero_point : int or int array (N,) in [-128, 127]
    out_dtype : numpy.int8 or numpy.uint8

    Bounds: ``threads`` is an int in [1, 1024]; K at most :func:`max_k_s8s8` (131071);
    ``multiplier`` finite, > 0 and representable in float32.
    """
    _check_matrix(a, "a")
    packed = _packed_operand(b)
    _check_inner(a.shape, (packed.k, packed.n))
    a = np.ascontiguousarray(a)
    code = _path_code(path)
    threads = (_default_threads(a.shape[0], packed.n, packed.k) if threads is None
               else _checks.check_threads(threads))
    out_dtype, qmin, qmax, zp, mult, bias, za, zb = _requant_args(
        packed, multiplier, output_zero_point, bias, a_zero_point, b_zero_point, out_dtype,
        qmin, qmax)
    y = np.empty((a.shape[0], packed.n), dtype=np.uint8)
    _kernels.gemm_packed_requant(code, a, _scratch(a.shape[0], packed.n), packed.data,
                                 packed.colsum, bias, za, zb, mult, zp, qmin, qmax, y, threads)
    return y.view(out_dtype)


def matmul_int8_requant_reference(a: np.ndarray, b: np.ndarray, multiplier,
                                  output_zero_point: int = 0, *, bias=None,
                                  a_zero_point: int = 0, b_zero_point=None, out_dtype=np.int8,
                                  qmin: int | None = None, qmax: int | None = None) -> np.ndarray:
    """NumPy reference of :func:`matmul_int8_requant`: same arguments, same result, bit for bit."""
    a, b = _check_operands(a, b)
    out_dtype, qmin, qmax, zp, mult, bias, za, zb = _requant_args(
        prepack(b), multiplier, output_zero_point, bias, a_zero_point, b_zero_point, out_dtype,
        qmin, qmax)
    n = b.shape[1]
    zb = zb.astype(np.int64) if zb.size else np.zeros(n, np.int64)
    acc = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)
    if bias.size:
        acc = acc + bias.astype(np.int64)
    v = ((acc & 0xFFFFFFFF).astype(np.uint32).view(np.int32)).astype(np.float32)
    f = v * np.broadcast_to(mult, (n,))                # float32 x float32, one rounding
    q = np.rint(np.clip(f, np.float32(qmin - zp), np.float32(qmax - zp))) + zp
    return q.astype(np.int32).astype(out_dtype)


LADDER = {
    "naive (i-j-k)": matmul_int8_naive,
    "loop order (i-k-j)": matmul_int8_ikj,
    "transposed B": matmul_int8_bt,
    "u8 x s8": matmul_int8_u8s8,
    "packed, register-tiled": matmul_int8,
}
# Rung 6, matmul_int8_requant, returns int8 rather than int32 and takes requantization
# parameters, so it is benchmarked and tested beside the ladder rather than in it.
"""The kernels chapter's ladder, slowest first; every rung has the signature ``f(a, b)``."""


# --- Depthwise convolution -----------------------------------------------------------------------

def _depthwise_args(x, w, multiplier, output_zero_point, bias, x_zero_point, w_zero_point,
                    stride, padding, out_dtype, qmin, qmax):
    """Validate the depthwise arguments; return what the loop takes (see depthwise_conv_int8)."""
    _checks.check_ndarray(x, "x (NHWC: n, h, w, c)", _INT8, ndim=4)
    _checks.check_ndarray(w, "w (kh, kw, c)", _INT8, ndim=3)
    c = x.shape[3]
    if w.shape[2] != c:
        raise ValueError(f"w has {w.shape[2]} channels (axis 2) but x has {c} (axis 3, NHWC): a "
                         f"depthwise convolution has one filter per channel")
    stride = _checks.check_int(stride, "stride", 1, 2**20)
    padding = _checks.check_int(padding, "padding", 0, 2**20)
    (kh, kw), (h, wd) = w.shape[:2], x.shape[1:3]
    if h + 2 * padding < kh or wd + 2 * padding < kw:
        raise ValueError(f"the {kh}x{kw} filter does not fit the {h}x{wd} input with padding "
                         f"{padding}")
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    shape_only = PackedB._from_packing(kh * kw, c, np.zeros(0, np.uint8), np.zeros(0, np.int32))
    out_dtype, qmin, qmax, zp, mult, bias, za, zb = _requant_args(
        shape_only, multiplier, output_zero_point, bias, x_zero_point, w_zero_point, out_dtype,
        qmin, qmax)
    mult = np.ascontiguousarray(np.broadcast_to(mult, (c,)))
    zw = zb if zb.size else np.zeros(c, np.int32)
    wz = (w.astype(np.int16) - zw.astype(np.int16)).astype(np.int16)
    return (np.ascontiguousarray(x), np.ascontiguousarray(wz), bias, mult, za, zp, qmin, qmax,
            stride, padding, oh, ow, out_dtype)


def depthwise_conv_int8_reference(x, w, multiplier, output_zero_point: int = 0, *, bias=None,
                                  x_zero_point: int = 0, w_zero_point=None, stride: int = 1,
                                  padding: int = 0, out_dtype=np.int8, qmin: int | None = None,
                                  qmax: int | None = None) -> np.ndarray:
    r"""NumPy reference of :func:`depthwise_conv_int8` (same arguments, same bytes): the taps
    gathered by slicing the zero-point-padded input, :math:`(x - z_x)(w - z_w)` summed in int64,
    requantized as :func:`matmul_int8_requant_reference` does."""
    (x, wz, bias, mult, za, zp, qmin, qmax, stride, padding, oh, ow,
     out_dtype) = _depthwise_args(x, w, multiplier, output_zero_point, bias, x_zero_point,
                                  w_zero_point, stride, padding, out_dtype, qmin, qmax)
    n, h, wd, c = x.shape
    xp = np.pad(x.astype(np.int64) - za, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    acc = np.zeros((n, oh, ow, c), np.int64)
    for u in range(wz.shape[0]):
        for v in range(wz.shape[1]):
            tap = xp[:, u:u + stride * oh:stride, v:v + stride * ow:stride, :]
            acc += tap * wz[u, v].astype(np.int64)
    if bias.size:
        acc += bias.astype(np.int64)
    f = ((acc & 0xFFFFFFFF).astype(np.uint32).view(np.int32)).astype(np.float32) * mult
    q = np.rint(np.clip(f, np.float32(qmin - zp), np.float32(qmax - zp))) + zp
    return q.astype(np.int32).astype(out_dtype)


def depthwise_conv_int8(x, w, multiplier, output_zero_point: int = 0, *, bias=None,
                        x_zero_point: int = 0, w_zero_point=None, stride: int = 1,
                        padding: int = 0, out_dtype=np.int8, qmin: int | None = None,
                        qmax: int | None = None, path: str | None = None) -> np.ndarray:
    r"""int8 depthwise convolution (NHWC) with requantization fused, compiled.

    .. math::

        v_{n,i,j,c} = b_c + \sum_{u,v} (x_{n,\,s i + u - p,\,s j + v - p,\,c} - z_x)
                      (w_{u,v,c} - z_{w,c}), \qquad
        y = \mathrm{clamp}\big(\mathrm{rhe}(\mathrm{f32}(v) \cdot m_c) + z_y,
            q_{\min}, q_{\max}\big)

    with the input padded by its zero point (padded taps add nothing); ``x`` (n, h, w, c) and
    ``w`` (kh, kw, c) int8, ``multiplier`` one float or one per channel (float32), ``bias``
    int32 (c,); requantized as :func:`matmul_int8_requant` (ONNX Runtime's QLinearConv).  No
    GEMM serves this layer: the loop runs across channels, vectorized per instruction set
    (``path``; every path gives the same bytes).  Single-threaded.  See the conv chapter."""
    (x, wz, bias, mult, za, zp, qmin, qmax, stride, padding, oh, ow,
     out_dtype) = _depthwise_args(x, w, multiplier, output_zero_point, bias, x_zero_point,
                                  w_zero_point, stride, padding, out_dtype, qmin, qmax)
    code = _path_code(path)
    y = np.empty((x.shape[0], oh, ow, x.shape[3]), dtype=np.uint8)
    _kernels.depthwise_requant(code, x, wz, bias, mult, za, zp, qmin, qmax, stride, padding, y)
    return y.view(out_dtype)


# --- W4A8: int4 weights in groups, int8 activations -----------------------------------------------

class PackedInt4:
    r"""An int4 weight matrix packed once for :func:`matmul_w4a8` (from :func:`prepack_int4`).

    ``data`` holds, for each group of 64 output columns and each group of ``group_size`` values
    of K, the codes :math:`q + 8` two to a byte in the order the kernel reads them, then the 64
    float32 scales (and the 64 zero points, if any); ``qcourse/csrc/w4a8.h`` gives the layout.
    ``n`` (output channels, rows of the codes), ``k`` (inputs), ``group_size``.

    A checked, immutable value like :class:`PackedB`: built only by :func:`prepack_int4`
    (calling ``PackedInt4(...)`` raises ``TypeError``), ``data`` read-only and starting on a
    64-byte boundary (the kernel's aligned loads need it).  ``copy.copy``, ``copy.deepcopy`` and
    pickling store the codes, scales and zero points (:meth:`unpack`) and pack them again, so a
    copy is aligned like the original and gives the identical result.
    """

    __slots__ = ("n", "k", "group_size", "has_zero_points", "data")
    n: int
    k: int
    group_size: int
    has_zero_points: bool
    data: np.ndarray

    def __init__(self, *args, **kwargs):
        raise TypeError("PackedInt4 is built by qcourse.kernels.prepack_int4(codes, scales, "
                        "group_size=...), not by calling PackedInt4")

    @classmethod
    def _from_packing(cls, n: int, k: int, group_size: int, has_zero_points: bool,
                      data: np.ndarray) -> PackedInt4:
        data.flags.writeable = False
        obj = object.__new__(cls)
        for name, value in (("n", n), ("k", k), ("group_size", group_size),
                            ("has_zero_points", has_zero_points), ("data", data)):
            object.__setattr__(obj, name, value)
        return obj

    def __setattr__(self, name, value):
        raise AttributeError(f"PackedInt4 is immutable: cannot set {name!r}; pack new weights "
                             f"with prepack_int4")

    __delattr__ = __setattr__

    def unpack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(codes, scales, zero_points)`` as given to :func:`prepack_int4`, read back from
        ``data`` (int8 (N, K), float32 (N, K/g), int8 (N, K/g) or None)."""
        n, k, g = self.n, self.k, self.group_size
        groups, octs, col_groups = k // g, g // 8, -(-n // 64)
        block = self.data.reshape(col_groups, groups, -1)
        cb = block[:, :, :octs * 256].reshape(col_groups, groups, octs, 4, 16, 4)
        nibbles = np.stack([cb & 15, cb >> 4], axis=-2).astype(np.int8) - 8  # cg j o p c h t
        codes = nibbles.transpose(0, 3, 4, 1, 2, 5, 6).reshape(col_groups * 64, k)[:n]
        scales = np.ascontiguousarray(block[:, :, octs * 256:octs * 256 + 256]).view(np.float32)
        scales = scales.transpose(0, 2, 1).reshape(col_groups * 64, groups)[:n]
        zero_points = None
        if self.has_zero_points:
            zp = block[:, :, octs * 256 + 256:].astype(np.int16) - 8
            zero_points = zp.transpose(0, 2, 1).reshape(col_groups * 64, groups)[:n].astype(np.int8)
        return np.ascontiguousarray(codes), np.ascontiguousarray(scales), zero_points

    def __reduce__(self):
        codes, scales, zero_points = self.unpack()
        return _repack_int4, (codes, scales, self.group_size, zero_points)

    def __eq__(self, other):
        if not isinstance(other, PackedInt4):
            return NotImplemented
        return ((self.n, self.k, self.group_size, self.has_zero_points)
                == (other.n, other.k, other.group_size, other.has_zero_points)
                and np.array_equal(self.data, other.data))

    __hash__ = None

    def __repr__(self) -> str:
        return (f"PackedInt4(n={self.n}, k={self.k}, group_size={self.group_size}, "
                f"has_zero_points={self.has_zero_points}, {self.data.size} bytes)")


def _repack_int4(codes, scales, group_size, zero_points) -> PackedInt4:
    """Unpickling and copying of a :class:`PackedInt4`: pack the stored values again."""
    return prepack_int4(codes, scales, group_size=group_size, zero_points=zero_points)


def max_group_w4a8() -> int:
    r"""Largest group size for which :func:`matmul_w4a8`'s integer sums cannot overflow int32.

    A product :math:`x_q (q - z)` has :math:`|x_q| \le 128` and :math:`|q - z| \le 15` (codes
    and zero points in [-8, 7]), so a group of g sums to at most :math:`1920 g`, and the kernel's
    corrections :math:`(8 + z) \sum x_q` stay within the same bound: :math:`1920 g \le 2^{31} -
    1` gives :math:`g \le 1118481`.
    """
    return (2**31 - 1) // (128 * 15)


def _check_group_size_w4(group_size, k: int) -> int:
    g = _checks.check_int(group_size, "group_size", 8, max_group_w4a8())
    if g % 8:
        raise ValueError(f"group_size must be a positive multiple of 8 (the kernel reads codes "
                         f"eight k at a time), got {g}")
    if k % g:
        raise ValueError(f"group_size={g} does not divide K={k}: every group must be whole")
    return g


def _check_int4_grid(values, name: str, shape: tuple) -> np.ndarray:
    arr = _checks.int_array(values, name, -8, 7, what="signed 4-bit")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int8)


def prepack_int4(codes: np.ndarray, scales, *, group_size: int,
                 zero_points=None) -> PackedInt4:
    r"""Pack int4 weights with one scale per group for :func:`matmul_w4a8` (once per layer).

    The weight is :math:`W_{nk} = s_{n,\lfloor k/g \rfloor}\,(q_{nk} - z_{n,\lfloor k/g
    \rfloor})` with codes :math:`q \in [-8, 7]`, float32 scales :math:`s > 0` and optional zero
    points :math:`z \in [-8, 7]` (0 when None).  See the kernels chapter.

    Parameters
    ----------
    codes : numpy.ndarray, int8, shape (N, K)
        N output channels (rows), K inputs; K even (two codes per byte).
    scales : float array, shape (N, K / group_size)
        Finite and > 0; stored as float32.
    group_size : int
        Consecutive values of K sharing a scale: a multiple of 8 that divides K (32, 64, 128 ...).
    zero_points : int array (N, K / group_size) in [-8, 7], optional

    Raises
    ------
    TypeError, ValueError
        naming the argument: a non-int8 or non-2-D ``codes``, codes outside [-8, 7], odd K, a
        group size that is not a multiple of 8 or does not divide K, scales of the wrong shape,
        NaN, infinite or <= 0, zero points of the wrong shape or outside [-8, 7].
    """
    _check_matrix(codes, "codes")
    n, k = codes.shape
    if k % 2:
        raise ValueError(f"codes must have an even number of columns K (two 4-bit codes per "
                         f"byte), got K={k}")
    g = _check_group_size_w4(group_size, k)
    if codes.min() < -8 or codes.max() > 7:
        raise ValueError(f"codes must lie in [-8, 7] (signed 4-bit), got values in "
                         f"[{codes.min()}, {codes.max()}]")
    s = _checks.as_array(scales, "scales")
    if s.dtype.kind != "f":
        raise TypeError(f"scales must be a float array, got {_checks.describe(s)}")
    if s.shape != (n, k // g):
        raise ValueError(f"scales must have shape (N, K / group_size) = {(n, k // g)}, got "
                         f"{s.shape}")
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError("scales must be finite and > 0 (one per row and group)")
    with np.errstate(over="ignore", under="ignore"):
        s32 = np.ascontiguousarray(s, dtype=np.float32)
    if not np.all(s32 > 0) or not np.all(np.isfinite(s32)):
        raise ValueError("scales must be finite and > 0 in float32 (a value under- or "
                         "overflowed)")
    zp = None if zero_points is None else _check_int4_grid(zero_points, "zero_points",
                                                           (n, k // g))
    data = _aligned_empty(_kernels.w4_packed_size(k, n, g, zp is not None), np.uint8)
    _kernels.w4_pack(np.ascontiguousarray(codes), s32, zp, g, data)
    return PackedInt4._from_packing(n, k, g, zp is not None, data)


def _check_packed_int4(packed, name: str = "packed") -> PackedInt4:
    return _checks.check_instance(packed, name, PackedInt4, "a PackedInt4 (from prepack_int4)")


def _check_w4a8_input(x, k: int) -> np.ndarray:
    """``x`` as the W4A8 kernel reads it: a finite float (M, K) array, as C-contiguous float32."""
    _checks.check_float_matrix(x, "x", finite=False)
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} columns but the weights have K={k}")
    if x.dtype == np.float32 and x.flags.c_contiguous:
        x32 = x
    else:
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: refused below
            x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x32)):                     # one pass when all is well
        _checks.check_finite(x, "x")
        raise ValueError("x must fit float32 (magnitude at most 3.4e38), got a value beyond it")
    return x32


def _check_w4a8_operands(x, packed) -> np.ndarray:
    return _check_w4a8_input(x, _check_packed_int4(packed).k)


def _finite_w4a8_output(y: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(y)):
        raise ValueError("x is too large for these weights: the product overflows float32 "
                         "(scale x or the weights' scales down)")
    return y


def matmul_w4a8(x: np.ndarray, packed: PackedInt4, *, path: str | None = None,
                threads: int | None = None) -> np.ndarray:
    r"""y = x Wᵀ with int4 weights in groups and int8 activations, float32 out (compiled).

    Each row of ``x`` is quantized to int8 on the fly, :math:`x_q = \mathrm{rhe}(x \cdot 127 /
    \max|x_{i,:}|)`; each group's integer dot product :math:`P_{inj} = \sum_{k \in j} x_{q,ik}
    (q_{nk} - z_{nj})` is exact in int32; the group scales are applied in float32,
    :math:`y_{in} = s_{x,i} \sum_j \mathrm{f32}(P_{inj})\, s_{nj}` (groups in order, one rounding
    per operation), :math:`s_{x,i} = \max|x_{i,:}| / 127`.  The same on every path
    (``path``), and bit for bit :func:`matmul_w4a8_reference`.  ``threads`` splits the output
    columns (default: as :func:`matmul_int8`).  See the kernels chapter.

    Parameters
    ----------
    x : float array (M, K), finite (used as float32)
    packed : PackedInt4 from :func:`prepack_int4`

    Returns
    -------
    numpy.ndarray, float32, shape (M, N)
    """
    x32 = _check_w4a8_operands(x, packed)
    code = _path_code(path)
    m, k, g = x32.shape[0], packed.k, packed.group_size
    threads = (_default_threads(m, packed.n, k) if threads is None
               else _checks.check_threads(threads))
    xq = np.empty((m, k), np.int8)
    gsum = np.empty((m, k // g), np.int32)
    sx = np.empty(m, np.float32)
    y = np.empty((m, packed.n), np.float32)
    _kernels.w4a8(code, x32, packed.data, packed.n, g, packed.has_zero_points, xq, gsum, sx, y,
                  threads)
    return _finite_w4a8_output(y)


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""The activations of :func:`matmul_w4a8`, in NumPy: ``(x_q, s_x)``, int8 (M, K) and
    float32 (M,).

    :math:`s_{x,i} = \max_k|x_{ik}| / 127` and :math:`x_q = \mathrm{rhe}(x \cdot (127 /
    \max_k|x_{ik}|))` in float32 (both 0 for a row of zeros; the factor is capped at
    :math:`2^{100}`, and then :math:`s_x = 2^{-100}`, for rows so small that it would overflow).
    """
    _checks.check_float_matrix(x, "x")
    with np.errstate(over="ignore"):
        x32 = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x32)):
        raise ValueError("x must fit float32 (magnitude at most 3.4e38), got a value beyond it")
    amax = np.abs(x32).max(axis=1)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        sx = np.where(amax > 0, amax / np.float32(127), np.float32(0)).astype(np.float32)
    capped = inv > np.float32(2.0**100)
    inv[capped], sx[capped] = np.float32(2.0**100), np.float32(2.0**-100)
    return np.rint(x32 * inv[:, None]).astype(np.int8), sx


def _check_codes_w4(x_q, packed: PackedInt4) -> np.ndarray:
    _check_matrix(x_q, "x_q")
    if x_q.shape[1] != packed.k:
        raise ValueError(f"x_q has K={x_q.shape[1]} columns but the weights have K={packed.k}")
    return x_q


def w4a8_group_sums_reference(x_q: np.ndarray, packed: PackedInt4) -> np.ndarray:
    r"""The exact integer partial sums :math:`P_{inj} = \sum_{k \in j} x_{q,ik}(q_{nk} -
    z_{nj})`, int32 (M, N, K/g), from the codes read back out of ``packed`` (NumPy, int64)."""
    x_q = _check_codes_w4(x_q, _check_packed_int4(packed))
    codes, _, zp = packed.unpack()
    g, groups = packed.group_size, packed.k // packed.group_size
    w = codes.astype(np.int64).reshape(packed.n, groups, g)
    if zp is not None:
        w = w - zp.astype(np.int64)[:, :, None]
    xg = np.asarray(x_q, dtype=np.int64).reshape(x_q.shape[0], groups, g)
    return np.einsum("mjg,njg->mnj", xg, w).astype(np.int32)


def w4a8_group_sums(x_q: np.ndarray, packed: PackedInt4, *, path: str | None = None,
                    threads: int | None = None) -> np.ndarray:
    """The compiled kernel's integer partial sums for int8 activations ``x_q`` (M, K): int32
    (M, N, K/g), what :func:`matmul_w4a8` scales; equal to :func:`w4a8_group_sums_reference`."""
    x_q = _check_codes_w4(x_q, _check_packed_int4(packed))
    code = _path_code(path)
    threads = 1 if threads is None else _checks.check_threads(threads)
    g = packed.group_size
    xq = np.ascontiguousarray(x_q)
    gsum = xq.reshape(xq.shape[0], -1, g).sum(axis=2, dtype=np.int32)
    sums = np.empty((xq.shape[0], packed.n, packed.k // g), np.int32)
    _kernels.w4a8_group_sums(code, xq, gsum, packed.data, packed.n, g, packed.has_zero_points,
                             sums, threads)
    return sums


def matmul_w4a8_reference(x: np.ndarray, packed: PackedInt4) -> np.ndarray:
    r"""NumPy reference of :func:`matmul_w4a8`, same signature, same float32 operations in the
    same order: equal bit for bit.

    :func:`quantize_rows_int8`, then :func:`w4a8_group_sums_reference`, then
    ``acc = acc + f32(P[:, :, j]) * s[:, j]`` for each group ``j`` in order, ``y = acc * s_x``.
    """
    x32 = _check_w4a8_operands(x, packed)
    xq, sx = quantize_rows_int8(x32)
    _, scales, _ = packed.unpack()
    return _finite_w4a8_output(_w4a8_epilogue(w4a8_group_sums_reference(xq, packed), scales, sx))


def w4a8_epilogue_reference(sums: np.ndarray, scales: np.ndarray, sx: np.ndarray) -> np.ndarray:
    r"""The float steps of :func:`matmul_w4a8`, in NumPy: ``acc = acc + f32(P[:, :, j]) *
    s[:, j]`` for each group ``j`` in order (float32, from 0), then ``y = acc * s_x``.

    ``sums`` int32 (M, N, G), ``scales`` float32 (N, G), ``sx`` float32 (M,), the scales finite
    and >= 0.  The result overflowing float32 is refused (``ValueError``), not returned as Inf.
    """
    _checks.check_ndarray(sums, "sums", (np.dtype(np.int32),), ndim=3)
    m, n, groups = sums.shape
    _checks.check_ndarray(scales, "scales", (np.dtype(np.float32),), ndim=2)
    if scales.shape != (n, groups):
        raise ValueError(f"scales must have shape (N, G) = {(n, groups)} to match sums, got "
                         f"{scales.shape}")
    _checks.check_ndarray(sx, "sx", (np.dtype(np.float32),), ndim=1)
    if sx.shape != (m,):
        raise ValueError(f"sx must have shape (M,) = ({m},) to match sums, got {sx.shape}")
    for arr, name in ((scales, "scales"), (sx, "sx")):
        _checks.check_finite(arr, name)
        if np.any(arr < 0):
            raise ValueError(f"{name} must be >= 0, got {float(arr.min())}")
    y = _w4a8_epilogue(sums, scales, sx)
    if not np.all(np.isfinite(y)):
        raise ValueError("sums, scales and sx are too large: the result overflows float32")
    return y


def _w4a8_epilogue(sums: np.ndarray, scales: np.ndarray, sx: np.ndarray) -> np.ndarray:
    acc = np.zeros(sums.shape[:2], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(sums.shape[2]):
            acc = acc + sums[:, :, j].astype(np.float32) * scales[:, j]
        return acc * sx[:, None]


__getattr__ = moved_names(__name__, {"matmul_int8_packed": "qcourse.kernels.matmul_int8"})
