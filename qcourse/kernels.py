"""int8 matrix multiplication: the checked entry points over the compiled loops.

The kernels chapter (``book/kernels.md``) explains the multiply-accumulate (MAC) unit these
functions model: 8-bit operands, 16-bit products, a 32-bit accumulator.  The loops themselves
live in the Cython extension ``qcourse._kernels``; this module validates the inputs, allocates
the output and is the only place a learner calls.
"""

from __future__ import annotations

import numpy as np

from qcourse import _kernels

__all__ = [
    "INT32_MAX",
    "max_k_s8s8",
    "matmul_int8",
    "matmul_int8_reference",
]

INT32_MAX = np.iinfo(np.int32).max
INT32_MIN = np.iinfo(np.int32).min


def max_k_s8s8() -> int:
    r"""Largest inner dimension K for which an int8 x int8 dot product cannot overflow int32.

    One product lies in :math:`[-128 \cdot 127, (-128)^2] = [-16256, 16384]`.  A sum of K
    products is therefore at most :math:`16384 K` and at least :math:`-16256 K`; the positive
    side binds first, so K must satisfy :math:`2^{14} K \le 2^{31} - 1`, i.e.
    :math:`K \le 2^{17} - 1 = 131071`.  At K = 131072 an all-(-128) row times an all-(-128)
    column gives exactly :math:`2^{31}`, one more than int32 can hold.
    """
    return INT32_MAX // (128 * 128)


def _check_operands(a, b) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of dtype int8, got {type(x).__name__}")
        if x.dtype != np.int8:
            raise TypeError(f"{name} must have dtype int8, got {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, columns), got {x.ndim}-D shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"{name} must not be empty, got shape {x.shape}")
        arrays.append(x)
    a, b = arrays
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"inner dimensions differ: a has shape {a.shape} (K={a.shape[1]}) but b has shape "
            f"{b.shape} (K={b.shape[0]}); a.shape[1] must equal b.shape[0]"
        )
    k = a.shape[1]
    if k > max_k_s8s8():
        raise ValueError(
            f"K={k} is too large: an int8 x int8 sum of more than {max_k_s8s8()} products can "
            f"overflow the int32 accumulator ((-128)*(-128)*K > 2**31 - 1); split K into chunks "
            f"and add the int32 partial sums in int64"
        )
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


def matmul_int8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Exact int8 x int8 -> int32 matrix product, run by the compiled extension without the GIL.

    .. math:: C_{ij} = \sum_{k=0}^{K-1} A_{ik} B_{kj}

    Each product of two int8 values fits in 16 bits and the sum is accumulated in int32, as a
    hardware MAC unit does.  K is limited to :func:`max_k_s8s8` (131071) so that the int32
    accumulator can never overflow; a larger K raises ``ValueError`` rather than wrapping.
    Non-contiguous inputs are copied to C order first.  See the kernels chapter.

    Parameters
    ----------
    a : numpy.ndarray, int8, shape (M, K)
    b : numpy.ndarray, int8, shape (K, N)

    Returns
    -------
    numpy.ndarray, int32, shape (M, N)

    Raises
    ------
    TypeError
        if ``a`` or ``b`` is not an int8 ndarray.
    ValueError
        if either is not 2-D or is empty, the inner dimensions differ, or K exceeds the bound.
    """
    a, b = _check_operands(a, b)
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.int32)
    _kernels.matmul_s8s8_ikj(a, b, out)
    return out
