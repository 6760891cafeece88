"""W4A8: int4 weights in groups, int8 activations -- packing (:func:`prepack_int4`), the
compiled group sums and epilogue (:func:`matmul_w4a8`) and their references.

Re-exported by :mod:`qcourse.kernels`; see the lowbit chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse import _checks, _kernels
from qcourse.kernels.matmul import (
    _check_matrix,
    _default_threads,
    _path_code,
    _weight_buffer,
)

__all__ = [
    "PackedInt4",
    "matmul_w4a8",
    "matmul_w4a8_reference",
    "max_group_w4a8",
    "prepack_int4",
    "quantize_rows_int8",
    "w4a8_epilogue_reference",
    "w4a8_group_sums",
    "w4a8_group_sums_reference",
]

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
    data = _weight_buffer(_kernels.w4_packed_size(k, n, g, zp is not None))
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
