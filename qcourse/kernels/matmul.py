"""int8 matrix multiplication: the kernels chapter's ladder of loops, the packed
register-tiled GEMM and its requantizing variant, the instruction-set paths and
the thread count.

Re-exported by :mod:`qcourse.kernels`; see the kernels chapter.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from qcourse import _checks, _kernels
from qcourse.fixed_point import max_k

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "LADDER",
    "PackedB",
    "available_paths",
    "best_path",
    "get_num_threads",
    "matmul_int8",
    "matmul_int8_bt",
    "matmul_int8_ikj",
    "matmul_int8_naive",
    "matmul_int8_reference",
    "matmul_int8_requant",
    "matmul_int8_requant_reference",
    "matmul_int8_u8s8",
    "max_k_s8s8",
    "prepack",
    "set_num_threads",
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


#: Packed weights of at least this many bytes get memory of their own, backed by 2 MiB pages.
HUGE_PAGE_MIN_BYTES = 4 * 2**20
_HUGE_PAGE = 2 * 2**20


def _weight_buffer(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` for packed weights, starting on a 64-byte boundary.

    Large ones (``HUGE_PAGE_MIN_BYTES`` or more) are a fresh anonymous mapping starting on a 2 MiB
    boundary, marked for transparent huge pages before anything touches it (Linux; elsewhere
    the mark is skipped).  A kernel that streams its weights from memory (M = 1) is limited by
    how far ahead the hardware fetches, and in 4 KiB pages that stops at every page boundary
    and costs a TLB miss every 64 lines.  ``np.empty`` cannot promise 2 MiB pages: a large
    array may reuse heap memory already faulted in as 4 KiB pages (in ``python -m qcourse.bench``
    one 27 MiB layer of four got 6 MiB of huge pages).  The mapping is freed with the array.
    """
    if nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows)
        return _aligned_empty(nbytes, np.uint8)
    # private: a shared anonymous mapping is shmem, which huge pages do not back by default
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:          # a kernel without transparent huge pages: 4 KiB pages it is
            pass
    start = np.frombuffer(region, np.uint8, count=1)
    offset = -start.ctypes.data % _HUGE_PAGE
    return np.frombuffer(region, np.uint8, count=nbytes, offset=offset)


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
    data = _weight_buffer(_kernels.packed_b_size(k, n))
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
