"""The ONNX operators ``MatMulInteger`` and ``QLinearMatMul``, bit for bit as ONNX Runtime.

:func:`matmul_integer` and :func:`qlinear_matmul` run the compiled int8 GEMM of
:mod:`qcourse.kernels`; each has a plain NumPy twin (:func:`matmul_integer_reference`,
:func:`qlinear_matmul_reference`) that the tests hold it to.  Re-exported by
:mod:`qcourse.int_matmul`; see the int_matmul chapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcourse._checks import INT32_MAX, check_choice, onnx_scale
from qcourse.int_matmul.arithmetic import (
    _OVERFLOW,
    _QTYPES,
    _as_int8,
    _col_param,
    _matmul_operands,
    _MatmulOperands,
    _row_param,
    _same_granularity,
    _squeeze,
    _to_int32,
    float_multiplier,
    requantize_float,
)
from qcourse.kernels import matmul_int8, matmul_int8_requant, max_k_s8s8

__all__ = [
    "matmul_integer",
    "matmul_integer_reference",
    "qlinear_matmul",
    "qlinear_matmul_reference",
]

_OP_SCALES = (np.float32, np.float16)   # the operators' scale tensor types


# --- the ONNX operators --------------------------------------------------------------------------


def matmul_integer_reference(A, B, a_zero_point=None, b_zero_point=None, *,
                             overflow="raise") -> np.ndarray:
    r"""ONNX ``MatMulInteger`` in plain NumPy: :math:`Y = (A - Z_A)(B - Z_B)` exactly, as int32.

    The NumPy twin of :func:`matmul_integer` (same signature, same result).  Computed in int64,
    then checked to fit int32 (``overflow="raise"``) or wrapped modulo :math:`2^{32}`
    (``overflow="wrap"``, what ONNX allows and ONNX Runtime does).  See :func:`matmul_integer`
    for the shapes and types accepted, and the int_matmul chapter.
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    ops = _matmul_operands(A, B, a_zero_point, b_zero_point)
    acc = np.matmul(ops.a2.astype(np.int64) - ops.za, ops.b2.astype(np.int64) - ops.zb)
    return _squeeze(_to_int32(acc, overflow, "MatMulInteger's sum"), ops.drop)


def _integer_product(ops: _MatmulOperands) -> np.ndarray | None:
    """Exact int64 sum of (A - za)(B - zb) through the compiled int8 kernel, or None.

    Used when B is a matrix (the weights) and K is within the kernel's bound: A's leading
    dimensions are flattened into rows, uint8 operands are shifted by 128 to int8, and the
    zero-point terms are added back in int64 -- exactly the folding of the int_matmul chapter.
    """
    a2, b2 = ops.a2, ops.b2
    k = a2.shape[-1]
    if b2.ndim != 2 or k > max_k_s8s8():
        return None
    a8, sa = _as_int8(a2)
    b8, sb = _as_int8(b2)
    rows = a8.reshape(-1, k)
    za = np.broadcast_to(ops.za - sa, a2.shape[:-1] + (1,)).reshape(-1, 1)
    zb = np.broadcast_to(ops.zb - sb, (b2.shape[1],))[None, :]
    acc = matmul_int8(rows, b8).astype(np.int64)
    acc -= za * b8.sum(axis=0, dtype=np.int64)[None, :]
    acc -= rows.sum(axis=1, dtype=np.int64)[:, None] * zb
    acc += k * za * zb
    return acc.reshape(a2.shape[:-1] + (b2.shape[1],))


def matmul_integer(A, B, a_zero_point=None, b_zero_point=None, *, overflow="raise") -> np.ndarray:
    r"""The ONNX ``MatMulInteger`` operator: an integer matrix product with zero points, to int32.

    .. math:: Y_{\dots ij} = \sum_k (A_{\dots ik} - Z_{A})(B_{\dots kj} - Z_{B})

    with ONNX's semantics (opset 10, the current version):

    * ``A`` and ``B`` are uint8 or int8 ndarrays (any of the four combinations), multiplied like
      ``numpy.matmul``: 1-D operands are promoted to a row / a column and the axis removed again;
      leading (batch) dimensions broadcast;
    * ``a_zero_point`` is per tensor (a scalar or a 1-element vector) or per row of ``A`` (shape
      ``(M,)`` for a 2-D ``A``, ``A.shape[:-1] + (1,)`` in general); ``b_zero_point`` per tensor
      or per column of ``B`` (``(N,)`` for a 2-D ``B``, ``B.shape[:-2] + (1, N)`` in general);
      absent zero points are 0.  They must hold values of their tensor's type (a NumPy zero point
      of the other 8-bit type is a ``TypeError``; a Python or wider integer is checked for
      range);
    * the products are exact; only the int32 sum may overflow, which ONNX allows to wrap around.
      Here it raises ``ValueError`` unless ``overflow="wrap"``, which reproduces ONNX Runtime.

    ONNX Runtime 1.32 supports a per-row ``a_zero_point`` for neither ``MatMulInteger`` nor
    ``QLinearMatMul`` (only per-tensor); the per-row form follows the specification.  When
    ``B`` is a matrix and K is at most :func:`qcourse.kernels.max_k_s8s8`, the product runs on
    the compiled int8 GEMM (:func:`qcourse.kernels.matmul_int8`), with uint8 operands shifted
    by 128 and the zero-point terms added back in int64; otherwise, the NumPy path of
    :func:`matmul_integer_reference`.  Both give the same result.  See the int_matmul chapter.

    Parameters
    ----------
    A, B : numpy.ndarray, uint8 or int8
    a_zero_point, b_zero_point : int or integer array, optional
    overflow : {"raise", "wrap"}

    Returns
    -------
    numpy.ndarray, int32
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    ops = _matmul_operands(A, B, a_zero_point, b_zero_point)
    acc = _integer_product(ops)
    if acc is None:
        return matmul_integer_reference(A, B, a_zero_point, b_zero_point, overflow=overflow)
    return _squeeze(_to_int32(acc, overflow, "MatMulInteger's sum"), ops.drop)


@dataclass(frozen=True)
class _QLinearOperands:
    ops: _MatmulOperands
    multiplier: np.ndarray  # float32, broadcasts against the (unsqueezed) output
    a_per_tensor: bool
    y_zero_point: int
    y_dtype: np.dtype


def _qlinear_operands(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
                      y_zero_point) -> _QLinearOperands:
    ops = _matmul_operands(a, b, a_zero_point, b_zero_point, names=("a", "b"))
    sa = _row_param("a_scale", onnx_scale(a_scale, "a_scale", _OP_SCALES), ops.a2.shape)
    sb = _col_param("b_scale", onnx_scale(b_scale, "b_scale", _OP_SCALES), ops.b2.shape)
    sy = onnx_scale(y_scale, "y_scale", _OP_SCALES)
    _same_granularity("a_scale", sa, "a_zero_point", ops.za)
    _same_granularity("b_scale", sb, "b_zero_point", ops.zb)
    if sy.size != 1 or sy.ndim > 1:
        raise ValueError(f"y_scale must be a scalar or a 1-element vector, got shape {sy.shape}")
    if not isinstance(y_zero_point, np.ndarray | np.generic) or \
            np.asarray(y_zero_point).dtype not in _QTYPES:
        raise TypeError(
            "y_zero_point must be a uint8 or int8 NumPy scalar or array: its dtype is the "
            f"output's type (ONNX's T3), got {type(y_zero_point).__name__}"
        )
    zy = np.asarray(y_zero_point)
    if zy.size != 1 or zy.ndim > 1:
        raise ValueError(
            f"y_zero_point must be a scalar or a 1-element vector, got shape {zy.shape}"
        )
    m = float_multiplier(sa, sb, sy.reshape(()))
    return _QLinearOperands(ops, m, sa.ndim == 0, int(zy.reshape(())), zy.dtype)


def qlinear_matmul_reference(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
                             y_zero_point, *, overflow="raise") -> np.ndarray:
    r"""ONNX ``QLinearMatMul`` in plain NumPy: the twin of :func:`qlinear_matmul`.

    The int32 accumulators of :func:`matmul_integer_reference`, the multiplier of
    :func:`float_multiplier` and the requantization of :func:`requantize_float`, composed.  Same
    signature and result as :func:`qlinear_matmul`; see it for the semantics, and the
    int_matmul chapter.
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    q = _qlinear_operands(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
                          y_zero_point)
    ops = q.ops
    acc = np.matmul(ops.a2.astype(np.int64) - ops.za, ops.b2.astype(np.int64) - ops.zb)
    acc = _to_int32(acc, overflow, "QLinearMatMul's integer sum")
    info = np.iinfo(q.y_dtype)
    y = requantize_float(acc, q.multiplier, q.y_zero_point, int(info.min), int(info.max))
    return _squeeze(y.astype(q.y_dtype), ops.drop)


def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, *,
                   overflow="raise") -> np.ndarray:
    r"""The ONNX ``QLinearMatMul`` operator, bit for bit as ONNX Runtime 1.32 computes it.

    .. math::
        y = \operatorname{saturate}\Big(\operatorname{rne}\big(\mathrm{fl}(\mathrm{fl}(v)
            \cdot m)\big) + Z_y\Big), \qquad
        v = \sum_k (a - Z_a)(b - Z_b), \qquad
        m = \mathrm{fl}\big(\mathrm{fl}(S_a S_b) / S_y\big)

    The specification says only "quantize the real product with round half to even"; ONNX
    Runtime's CPU kernel (``QLinearMatMul`` with MLAS's ``MlasRequantizeOutput``) pins down every
    rounding, and this function reproduces it (established on inputs built to land on ties, in
    ``tests/test_int_matmul.py``):

    1. the exact integer sum :math:`v` (int32, wrapping modulo :math:`2^{32}` only with
       ``overflow="wrap"``; the default raises rather than wrap);
    2. the multiplier :math:`m` in float32, ``a_scale * b_scale`` first, then ``/ y_scale``
       (:func:`float_multiplier`), one per column of ``b`` when ``b_scale`` is per column;
    3. :math:`v` converted to float32, times :math:`m` rounded to float32, rounded to the
       nearest integer with ties to even, plus :math:`Z_y`, saturated to the output type.

    Inputs are taken in the operator's order with its types: ``a``/``b`` uint8 or int8 ndarrays
    (``numpy.matmul`` shapes and broadcasting), scales float32 or float16 (float16 is widened to
    float32, as ONNX Runtime does), zero points as in :func:`matmul_integer`, and ``y_zero_point``
    a uint8 or int8 NumPy scalar or array whose dtype is the output type.  ``a_scale`` /
    ``a_zero_point`` may be per row and ``b_scale`` / ``b_zero_point`` per column (scale and zero
    point with the same shape).  ONNX Runtime 1.32 implements the type combinations (uint8,
    uint8, uint8), (uint8, int8, uint8) and (int8, int8, int8) for (a, b, y), and per-tensor
    ``a`` parameters only; the others follow the specification with the same arithmetic.

    When ``a``'s parameters are per tensor, ``b`` is a matrix and K is at most
    :func:`qcourse.kernels.max_k_s8s8`, the computation runs on the compiled GEMM with fused
    requantization, :func:`qcourse.kernels.matmul_int8_requant` (uint8 operands shifted by 128,
    which leaves every :math:`a - Z_a` unchanged), whose arithmetic is exactly steps 1-3;
    otherwise on :func:`qlinear_matmul_reference`.  See the int_matmul chapter.

    Returns
    -------
    numpy.ndarray
        dtype of ``y_zero_point``; shape of ``numpy.matmul(a, b)``.
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    q = _qlinear_operands(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
                          y_zero_point)
    ops = q.ops
    a2, b2 = ops.a2, ops.b2
    k = a2.shape[-1]
    if not (q.a_per_tensor and b2.ndim == 2 and k <= max_k_s8s8()):
        return qlinear_matmul_reference(a, a_scale, a_zero_point, b, b_scale, b_zero_point,
                                        y_scale, y_zero_point, overflow=overflow)
    if overflow == "raise":
        span_a = int(np.max(np.abs(a2.astype(np.int64) - ops.za)))
        span_b = int(np.max(np.abs(b2.astype(np.int64) - ops.zb)))
        if k * span_a * span_b > INT32_MAX:  # an overflow is possible: check exactly
            _to_int32(_integer_product(ops), "raise", "QLinearMatMul's integer sum")
    a8, sa = _as_int8(a2)
    b8, sb = _as_int8(b2)
    n = b2.shape[1]
    zb = ops.zb - sb
    y = matmul_int8_requant(
        a8.reshape(-1, k), b8, np.broadcast_to(q.multiplier, (n,)).astype(np.float64),
        q.y_zero_point, a_zero_point=int(ops.za) - sa,
        b_zero_point=int(zb) if zb.ndim == 0 else zb, out_dtype=q.y_dtype)
    return _squeeze(y.reshape(a2.shape[:-1] + (n,)), ops.drop)
