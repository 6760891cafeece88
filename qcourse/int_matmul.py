"""Integer-only matrix multiplication: a quantized linear layer computed with integers.

The int_matmul chapter (``book/int_matmul.md``) derives everything in this module from the affine
map ``r = scale * (q - zero_point)``.  A linear layer ``y = x W^T + b`` whose input, weight and
output are quantized becomes

.. math::

    q_y = Z_y + \\frac{S_x S_W}{S_y}\\Big(\\sum_k (q_{x,k} - Z_x)(q_{W,k} - Z_W) + q_b\\Big),

an integer matrix product, a few integer corrections for the zero points (most of them constant,
folded into an int32 bias once), and one *requantization*: a multiplication of the int32
accumulator by the real number :math:`M = S_x S_W / S_y`, a rounding, the output zero point and
a clamp.  The module has four parts:

* **the derivation, term by term**: :func:`zero_point_terms`, :func:`fold_zero_points`,
  :func:`quantize_bias`;
* **requantization in the two conventions used in practice**: :func:`requantize_float` (a float32
  multiplier and round half to even, as ONNX Runtime and PyTorch do; :func:`float_multiplier`
  computes the multiplier the way ONNX Runtime does) and :func:`requantize_fixed_point` (a 31-bit
  integer multiplier and a shift, as TensorFlow Lite's ``MultiplyByQuantizedMultiplier`` does,
  through :mod:`qcourse.fixed_point`; LiteRT's kernels round in more ways, named at the end of
  this module and compared in the deploy chapter);
* **the ONNX operators** :func:`matmul_integer` (``MatMulInteger``) and :func:`qlinear_matmul`
  (``QLinearMatMul``), bit for bit as ONNX Runtime's CPU kernels compute them, each with a plain
  NumPy twin (:func:`matmul_integer_reference`, :func:`qlinear_matmul_reference`); the fast
  versions run the compiled int8 GEMM of :mod:`qcourse.kernels`;
* **a whole layer**: :class:`QuantizedLinear` (per-tensor or per-channel weights, int32 bias,
  fused ReLU / ReLU6), its float and fake-quant counterparts (:func:`linear_float`,
  :meth:`QuantizedLinear.fake_quant_forward`) and :func:`activation_range`.

Nothing here wraps around silently: an int32 accumulator that would overflow raises
``ValueError`` unless the caller asks for ONNX's wrap-around with ``overflow="wrap"``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from qcourse.affine import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    storage_dtype,
)
from qcourse.fixed_point import (
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_half_up,
    quantize_multiplier,
)
from qcourse.kernels import matmul_int8, matmul_int8_requant, max_k_s8s8

__all__ = [
    "ACTIVATIONS",
    "REQUANTIZATIONS",
    "QuantizedLinear",
    "activation_range",
    "double_multiplier",
    "float_multiplier",
    "fold_zero_points",
    "linear_float",
    "matmul_integer",
    "matmul_integer_reference",
    "qlinear_matmul",
    "qlinear_matmul_reference",
    "quantize_bias",
    "requantize_double_half_away",
    "requantize_fixed_point",
    "requantize_fixed_point_half_up",
    "requantize_float",
    "requantization_disagreements",
    "zero_point_terms",
]

#: The fused activations of :class:`QuantizedLinear` and :func:`activation_range`.
ACTIVATIONS = ("none", "relu", "relu6")

#: The requantization conventions of :class:`QuantizedLinear`:
#: ``"float"`` (float32 multiplier, round half to even: ONNX Runtime, PyTorch),
#: ``"tflite_double"`` and ``"tflite_single"`` (TFLite's fixed-point multiplier in its default
#: double-rounding build and its ``TFLITE_SINGLE_ROUNDING`` build).
REQUANTIZATIONS = ("float", "tflite_double", "tflite_single")

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_OVERFLOW = ("raise", "wrap")
_QTYPES = (np.dtype(np.uint8), np.dtype(np.int8))


# --- validation helpers --------------------------------------------------------------------------


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_quant_tensor(name: str, x) -> np.ndarray:
    """An operator input: a non-empty uint8 or int8 ndarray with at least one axis."""
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of dtype uint8 or int8, got {type(x).__name__}"
        )
    if x.dtype not in _QTYPES:
        raise TypeError(f"{name} must have dtype uint8 or int8, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (a vector or a matrix), got 0-d")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    return x


def _integer_values(name: str, value) -> np.ndarray:
    """Integers (Python int, NumPy integer scalar or integer array) as an int64 array."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got a bool")
    if isinstance(value, numbers.Integral):
        return np.asarray(int(value), dtype=np.int64)
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer or an integer array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr.astype(np.int64)


def _zero_point(name: str, value, tensor_name: str, dtype: np.dtype) -> np.ndarray:
    """A zero point for a tensor of ``dtype``: integer values inside that dtype's range."""
    typed = isinstance(value, np.ndarray | np.generic) and value.dtype in _QTYPES
    if typed and value.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but {tensor_name} is {dtype}; ONNX requires a zero "
            f"point of its tensor's type"
        )
    zp = _integer_values(name, value)
    info = np.iinfo(dtype)
    bad = (zp < info.min) | (zp > info.max)
    if np.any(bad):
        raise ValueError(
            f"{name} must lie in [{info.min}, {info.max}] for {dtype} {tensor_name}, got "
            f"{int(zp[bad].flat[0])}"
        )
    return zp


def _onnx_scale(name: str, value) -> np.ndarray:
    """An operator scale: float32 or float16 (the operator's tensor types), finite and > 0."""
    if not isinstance(value, np.ndarray | np.generic):
        raise TypeError(
            f"{name} must be a float32 (or float16) NumPy array or scalar, the operator's tensor "
            f"type, got {type(value).__name__}; use np.float32(...)"
        )
    arr = np.asarray(value)
    if arr.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise TypeError(f"{name} must have dtype float32 or float16, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    arr = arr.astype(np.float32)  # float16 -> float32 is exact
    bad = ~(np.isfinite(arr) & (arr > 0))
    if np.any(bad):
        raise ValueError(f"{name} must be finite and > 0, got {arr[bad].flat[0]}")
    return arr


def _row_param(name: str, arr: np.ndarray, a2_shape: tuple) -> np.ndarray:
    """Shape a parameter of A for broadcasting against A (..., M, K): per-tensor or per-row."""
    if arr.size == 1 and arr.ndim <= 1:
        return arr.reshape(())
    m = a2_shape[-2]
    if len(a2_shape) == 2 and arr.ndim == 1 and arr.size == m:
        return arr.reshape(m, 1)
    if arr.shape == tuple(a2_shape[:-1]) + (1,):
        return arr
    raise ValueError(
        f"{name} must be a scalar or a 1-element vector (per tensor), or per row of A: shape "
        f"({m},) for a 2-D A or {tuple(a2_shape[:-1]) + (1,)}; got shape {arr.shape}"
    )


def _col_param(name: str, arr: np.ndarray, b2_shape: tuple) -> np.ndarray:
    """Shape a parameter of B for broadcasting against B (..., K, N): per-tensor or per-column."""
    if arr.size == 1 and arr.ndim <= 1:
        return arr.reshape(())
    n = b2_shape[-1]
    if len(b2_shape) == 2 and arr.ndim == 1 and arr.size == n:
        return arr
    if arr.shape == tuple(b2_shape[:-2]) + (1, n):
        return arr
    raise ValueError(
        f"{name} must be a scalar or a 1-element vector (per tensor), or per column of B: shape "
        f"({n},) for a 2-D B or {tuple(b2_shape[:-2]) + (1, n)}; got shape {arr.shape}"
    )


def _same_granularity(scale_name, scale, zp_name, zp) -> None:
    if scale.shape != zp.shape:
        raise ValueError(
            f"{scale_name} and {zp_name} must have the same shape (ONNX), got {scale.shape} "
            f"and {zp.shape}"
        )


def _wrap32(v: np.ndarray) -> np.ndarray:
    """Values modulo 2**32, as int32 two's complement (the int32 accumulator's wrap-around)."""
    return (v.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _to_int32(acc: np.ndarray, overflow: str, what: str) -> np.ndarray:
    """Exact int64 accumulators to int32: raise on overflow, or wrap (ONNX's allowance)."""
    bad = (acc < _INT32_MIN) | (acc > _INT32_MAX)
    if np.any(bad):
        if overflow == "raise":
            raise ValueError(
                f"{what} overflows the int32 accumulator in {int(np.count_nonzero(bad))} "
                f"place(s) (e.g. {int(acc[bad].flat[0])}); ONNX allows the sum to wrap around "
                f"modulo 2**32 and ONNX Runtime does: pass overflow='wrap' to reproduce that"
            )
        return _wrap32(acc)
    return acc.astype(np.int32)


@dataclass(frozen=True)
class _MatmulOperands:
    a2: np.ndarray  # A with a 1-D input promoted to (1, K)
    b2: np.ndarray  # B with a 1-D input promoted to (K, 1)
    za: np.ndarray  # int64, shape () or broadcastable per row
    zb: np.ndarray  # int64, shape () or broadcastable per column
    drop: tuple[int, ...]  # axes of the result to remove (the promoted ones)


def _matmul_operands(A, B, a_zero_point, b_zero_point, names=("A", "B")) -> _MatmulOperands:
    na, nb = names
    A = _check_quant_tensor(na, A)
    B = _check_quant_tensor(nb, B)
    a2 = A[None, :] if A.ndim == 1 else A
    b2 = B[:, None] if B.ndim == 1 else B
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(
            f"inner dimensions differ: {na} has shape {A.shape} (K={a2.shape[-1]}) but {nb} has "
            f"shape {B.shape} (K={b2.shape[-2]})"
        )
    try:
        np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(
            f"the batch dimensions of {na} {A.shape} and {nb} {B.shape} do not broadcast "
            f"(numpy.matmul rules)"
        ) from None
    za = (np.asarray(0, np.int64) if a_zero_point is None
          else _zero_point("a_zero_point", a_zero_point, na, A.dtype))
    zb = (np.asarray(0, np.int64) if b_zero_point is None
          else _zero_point("b_zero_point", b_zero_point, nb, B.dtype))
    za = _row_param("a_zero_point", za, a2.shape)
    zb = _col_param("b_zero_point", zb, b2.shape)
    drop = []
    if B.ndim == 1:
        drop.append(-1)
    if A.ndim == 1:
        drop.append(-2)
    return _MatmulOperands(a2, b2, za, zb, tuple(drop))


def _squeeze(y: np.ndarray, drop: tuple[int, ...]) -> np.ndarray:
    for ax in drop:  # -1 first, then -2
        y = np.squeeze(y, axis=ax)
    return y


def _as_int8(x: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 -> int8 by subtracting 128 (exact); returns the array and the shift applied."""
    if x.dtype == np.uint8:
        return (x.astype(np.int16) - 128).astype(np.int8), 128
    return x, 0


# --- the derivation, term by term ---------------------------------------------------------------


def zero_point_terms(x_q, w_q, input_zero_point, weight_zero_point) -> dict[str, np.ndarray]:
    r"""The four integer terms of :math:`\sum_k (x_{ik} - Z_x)(W_{jk} - Z_{W,j})`, separately.

    For an input ``x_q`` of shape (batch, K) and a weight ``w_q`` of shape (out, K) (the layout of
    ``y = x W^T``), multiplying out the product gives

    .. math::

        \sum_k (x_{ik} - Z_x)(W_{jk} - Z_{W,j})
        = \underbrace{\sum_k x_{ik} W_{jk}}_{\texttt{"xw"}}
          \underbrace{- Z_{W,j} \sum_k x_{ik}}_{\texttt{"x_rowsum"}}
          \underbrace{- Z_x \sum_k W_{jk}}_{\texttt{"w_colsum"}}
          + \underbrace{K Z_x Z_{W,j}}_{\texttt{"constant"}}

    ``"xw"`` is the integer matrix product (the work); ``"w_colsum"`` and ``"constant"`` depend
    on the weights and the zero points only, so they are computed once, offline, and folded into
    the bias (:func:`fold_zero_points`); ``"x_rowsum"`` needs the sums of each input row at run
    time and vanishes when the weights are symmetric (:math:`Z_W = 0`).  Returned as int64 arrays
    (exact) that broadcast to (batch, out): ``"xw"`` and ``"x_rowsum"`` have shape (batch, out),
    ``"w_colsum"`` and ``"constant"`` shape (out,).  See the int_matmul chapter.

    Parameters
    ----------
    x_q : integer array, shape (batch, K)
    w_q : integer array, shape (out, K)
    input_zero_point : int
    weight_zero_point : int or integer array of shape (out,)
    """
    x = _integer_values("x_q", x_q)
    w = _integer_values("w_q", w_q)
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(
            f"x_q and w_q must be 2-D (batch, K) and (out, K), got {x.shape} and {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x_q has K={x.shape[1]} but w_q has K={w.shape[1]} (shape {w.shape})")
    zx = _integer_values("input_zero_point", input_zero_point)
    if zx.ndim != 0:
        raise ValueError(f"input_zero_point must be a scalar, got shape {zx.shape}")
    zw = np.broadcast_to(_integer_values("weight_zero_point", weight_zero_point), (w.shape[0],))
    k = x.shape[1]
    return {
        "xw": x @ w.T,
        "x_rowsum": -np.outer(x.sum(axis=1), zw),
        "w_colsum": -zx * w.sum(axis=1),
        "constant": k * zx * zw,
    }


def fold_zero_points(w_q, input_zero_point, weight_zero_point, bias_q=None) -> np.ndarray:
    r"""The constant part of the accumulator, folded into one bias per output (offline).

    .. math:: \tilde b_j = q_{b,j} - Z_x \sum_k W_{jk} + K Z_x Z_{W,j}

    so that :math:`\sum_k (x_{ik} - Z_x)(W_{jk} - Z_{W,j}) + q_{b,j} = \sum_k x_{ik} W_{jk}
    - Z_{W,j} \sum_k x_{ik} + \tilde b_j`: at run time only the integer product and, for
    asymmetric weights, the row sums of the input remain (:func:`zero_point_terms`).  Exact, in
    int64 (a kernel keeps it modulo :math:`2^{32}`, which gives the same int32 sum whenever the
    true sum fits).  See the int_matmul chapter.

    Parameters
    ----------
    w_q : integer array, shape (out, K)
    input_zero_point : int
    weight_zero_point : int or integer array of shape (out,)
    bias_q : integer array of shape (out,), optional
        The int32 bias (scale :math:`S_x S_W`, zero point 0); zeros when omitted.

    Returns
    -------
    numpy.ndarray, int64, shape (out,)
    """
    w = _integer_values("w_q", w_q)
    if w.ndim != 2:
        raise ValueError(f"w_q must be 2-D (out, K), got shape {w.shape}")
    zx = _integer_values("input_zero_point", input_zero_point)
    if zx.ndim != 0:
        raise ValueError(f"input_zero_point must be a scalar, got shape {zx.shape}")
    try:
        zw = np.broadcast_to(_integer_values("weight_zero_point", weight_zero_point),
                             (w.shape[0],))
    except ValueError:
        raise ValueError(
            f"weight_zero_point must be a scalar or have shape ({w.shape[0]},)"
        ) from None
    b = np.zeros(w.shape[0], np.int64)
    if bias_q is not None:
        b = _integer_values("bias_q", bias_q)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias_q must have shape ({w.shape[0]},), got {b.shape}")
    return b - zx * w.sum(axis=1) + w.shape[1] * zx * zw


def quantize_bias(bias, input_scale, weight_scale) -> np.ndarray:
    r"""Quantize a float bias to int32 with scale :math:`S_x S_W` and zero point 0.

    .. math:: q_b = \operatorname{round}\big(b / (S_x S_W)\big)

    The bias is added to the accumulator :math:`\sum_k (x - Z_x)(W - Z_W)`, whose unit is
    :math:`S_x S_W`; giving the bias the same scale lets it be added as an integer, and its
    step is so fine (the product of two small scales) that 32 bits are needed.  Round half to
    even, computed in float64; a per-channel ``weight_scale`` gives one bias scale per output.
    A value outside int32 raises ``ValueError`` (never a wrap).  See the int_matmul chapter.

    Parameters
    ----------
    bias : array_like, shape (out,)
        Finite reals.
    input_scale : float
    weight_scale : float or array of shape (out,)

    Returns
    -------
    numpy.ndarray, int32, shape (out,)
    """
    b = np.asarray(bias)
    if b.dtype.kind not in "fiu" or b.dtype == np.bool_:
        raise TypeError(f"bias must hold real numbers, got dtype {b.dtype}")
    b = b.astype(np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"bias must be a non-empty 1-D array (one per output), got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("bias must be finite (no NaN or Inf)")
    sx = np.asarray(input_scale, dtype=np.float64)
    sw = np.asarray(weight_scale, dtype=np.float64)
    if sx.ndim != 0:
        raise ValueError(f"input_scale must be a scalar, got shape {sx.shape}")
    if sw.ndim not in (0, 1) or (sw.ndim == 1 and sw.shape != b.shape):
        raise ValueError(f"weight_scale must be a scalar or have shape {b.shape}, got {sw.shape}")
    for name, s in (("input_scale", sx), ("weight_scale", sw)):
        if not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(f"{name} must be finite and > 0")
    q = np.rint(b / (sx * sw))
    if np.any((q < _INT32_MIN) | (q > _INT32_MAX)):
        raise ValueError(
            "bias / (input_scale * weight_scale) does not fit int32; the scales are too small "
            "for this bias"
        )
    return q.astype(np.int32)


# --- requantization ---------------------------------------------------------------------------


def float_multiplier(a_scale, b_scale, y_scale) -> np.ndarray:
    r"""The float32 requantization multiplier, computed as ONNX Runtime computes it.

    .. math:: m = \mathrm{fl}\big(\mathrm{fl}(S_a \cdot S_b) / S_y\big)

    in float32 arithmetic, in this order: the product of the two input scales rounded to
    float32, then divided by the output scale and rounded again (ONNX Runtime's
    ``QLinearMatMul`` and ``QLinearConv`` CPU kernels evaluate ``a_scale * b_scale[i] /
    y_scale`` on floats).  Computing :math:`S_a S_b / S_y` in float64 and rounding once, or
    :math:`S_a (S_b / S_y)`, gives a multiplier one float32 step away for some scales, and that
    changes the rounding of some outputs (the tests find such scales and show ONNX Runtime takes
    this order).  Inputs are rounded to float32 first; ``b_scale`` may be per column (an array);
    the result broadcasts like ``a_scale * b_scale``.  See the int_matmul chapter.

    Returns
    -------
    numpy.ndarray, float32
    """
    sa, sb, sy = (np.asarray(s, dtype=np.float64).astype(np.float32)
                  for s in (a_scale, b_scale, y_scale))
    for name, s in (("a_scale", sa), ("b_scale", sb), ("y_scale", sy)):
        if s.size == 0 or not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(f"{name} must be finite and > 0 (and non-empty)")
    with np.errstate(over="ignore", under="ignore"):
        m = (sa * sb) / sy
    if not np.all(np.isfinite(m)) or np.any(m == 0):
        raise ValueError(
            "a_scale * b_scale / y_scale overflows or underflows float32; the scales are "
            "inconsistent"
        )
    return m


def _check_range(qmin, qmax) -> tuple[int, int]:
    lo = _integer_values("qmin", qmin)
    hi = _integer_values("qmax", qmax)
    if lo.ndim or hi.ndim:
        raise ValueError("qmin and qmax must be scalars")
    lo, hi = int(lo), int(hi)
    if not _INT32_MIN <= lo < hi <= _INT32_MAX:
        raise ValueError(f"need qmin < qmax within int32, got qmin={lo}, qmax={hi}")
    return lo, hi


def _check_output_zero_point(output_zero_point, qmin, qmax) -> np.ndarray:
    zp = _integer_values("output_zero_point", output_zero_point)
    if np.any((zp < qmin) | (zp > qmax)):
        raise ValueError(
            f"output_zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got "
            f"{int(zp[(zp < qmin) | (zp > qmax)].flat[0])}"
        )
    return zp


def _check_acc(acc) -> np.ndarray:
    a = _integer_values("acc", acc)
    if np.any((a < _INT32_MIN) | (a > _INT32_MAX)):
        raise ValueError("acc must hold int32 accumulators (values in [-2**31, 2**31 - 1])")
    return a


def requantize_float(acc, multiplier, output_zero_point, qmin, qmax) -> np.ndarray:
    r"""Requantize int32 accumulators with a float32 multiplier (ONNX Runtime, PyTorch).

    .. math::
        q_y = \operatorname{clamp}\Big(\operatorname{rne}\big(\mathrm{fl}(\mathrm{fl}(v)
              \cdot m)\big) + Z_y,\ q_{\min},\ q_{\max}\Big)

    step by step as ONNX Runtime's MLAS (``MlasRequantizeOutput``) and PyTorch's FBGEMM
    (``ReQuantizeOutput``) do with SIMD instructions: the int32 accumulator :math:`v` is
    converted to float32 (``cvtdq2ps``: exact up to :math:`2^{24}`, rounded to nearest even
    beyond), multiplied by the float32 multiplier :math:`m` (one float32 rounding), rounded to
    the nearest integer with ties to even (``cvtps2dq``, rne), shifted by the output zero point
    and clamped.  ``multiplier`` is rounded to float32 first (compute it with
    :func:`float_multiplier` to match ONNX Runtime); a per-column multiplier is an array that
    broadcasts against ``acc`` (shape (N,) for accumulators (M, N)).  A fused ReLU is
    ``qmin = output_zero_point`` (:func:`activation_range`).  See the int_matmul chapter.

    Parameters
    ----------
    acc : integer array
        int32 accumulators.
    multiplier : float or array of float, > 0 and finite
    output_zero_point : int, in [qmin, qmax]
    qmin, qmax : int

    Returns
    -------
    numpy.ndarray
        Shape of ``acc`` broadcast with ``multiplier``; dtype
        :func:`qcourse.affine.storage_dtype` ``(qmin, qmax)`` (int8 for [-128, 127]).
    """
    a = _check_acc(acc)
    m = np.asarray(multiplier)
    if m.dtype.kind != "f":
        raise TypeError(f"multiplier must be a float (float32 is used), got dtype {m.dtype}")
    with np.errstate(over="ignore"):
        m = m.astype(np.float32)
    if m.size == 0 or not np.all(np.isfinite(m) & (m > 0)):
        raise ValueError("multiplier must be finite and > 0 in float32")
    lo, hi = _check_range(qmin, qmax)
    zp = _check_output_zero_point(output_zero_point, lo, hi)
    with np.errstate(over="ignore"):
        scaled = a.astype(np.float32) * m          # float32 x float32: one rounding
    r = np.rint(np.clip(scaled, np.float32(-(2.0**40)), np.float32(2.0**40))).astype(np.int64)
    return np.clip(r + zp, lo, hi).astype(storage_dtype(lo, hi))


def requantize_fixed_point(acc, multiplier, shift, output_zero_point, qmin, qmax, *,
                           rounding="double") -> np.ndarray:
    r"""Requantize int32 accumulators with integers only, as TFLite's source does (gemmlowp).

    .. math::
        q_y = \operatorname{clamp}\big(\operatorname{MBQM}(v, M_0, s) + Z_y,\ q_{\min},
              \ q_{\max}\big)

    where :math:`\operatorname{MBQM}` is TFLite's ``MultiplyByQuantizedMultiplier``
    (:func:`qcourse.fixed_point.multiply_by_quantized_multiplier`): it multiplies by
    :math:`M_0 \cdot 2^{s - 31}` with a 64-bit integer product and a rounding shift, with two
    roundings (``rounding="double"``, TFLite's default build: SRDHM then a rounding divide by a
    power of two) or one (``"single"``, the ``TFLITE_SINGLE_ROUNDING`` build).  The offset, the
    clamp and their order are those of TFLite's reference integer kernels (e.g.
    ``tensorflow/lite/kernels/internal/reference/integer_ops/conv.h``: ``acc =
    MultiplyByQuantizedMultiplier(acc, output_multiplier, output_shift); acc += output_offset;
    acc = max(acc, output_activation_min); acc = min(acc, output_activation_max)``); LiteRT's
    reference fully-connected kernel rounds in double instead
    (:func:`requantize_double_half_away`), its built-in kernels on ruy half up twice
    (:func:`requantize_fixed_point_half_up`).
    ``multiplier`` and ``shift`` come from :func:`qcourse.fixed_point.quantize_multiplier`;
    per-channel arrays broadcast against ``acc``.  See the int_matmul chapter.

    Returns
    -------
    numpy.ndarray
        dtype :func:`qcourse.affine.storage_dtype` ``(qmin, qmax)``.
    """
    a = _check_acc(acc)
    lo, hi = _check_range(qmin, qmax)
    zp = _check_output_zero_point(output_zero_point, lo, hi)
    scaled = multiply_by_quantized_multiplier(a, multiplier, shift, rounding=rounding)
    out = np.clip(np.asarray(scaled, dtype=np.int64) + zp, lo, hi)
    return out.astype(storage_dtype(lo, hi))


def requantization_disagreements(multiplier, acc) -> dict[tuple[str, str], list[tuple]]:
    r"""Where the float and the fixed-point conventions requantize the same :math:`v` differently.

    Requantizes every accumulator in ``acc`` by the real ``multiplier`` :math:`M` three ways
    (:func:`requantize_float`; :func:`requantize_fixed_point` in TFLite's ``"double"`` and
    ``"single"`` builds, with :func:`qcourse.fixed_point.quantize_multiplier`), with zero point 0
    on the int8 grid, and sorts each disagreement with the float result by its cause, from the
    exact product :math:`M v` (a :class:`fractions.Fraction`) and its distance :math:`d` to the
    nearest tie :math:`n + \tfrac12`:

    * ``"exact tie"``: :math:`d = 0`; round half to even and TFLite's ties-up / ties-away rules
      pick different neighbours;
    * ``"multiplier rounding"``: :math:`0 < d \le |M v|\,2^{-22}`, within the error of a float32
      multiplier and a float32 product (24 bits) against TFLite's 31-bit one;
    * ``"double rounding"``: farther from the tie, which only the double-rounding build's first
      rounding (SRDHM, before the shift) can reach.

    Every disagreement is one step (asserted).  See the int_matmul chapter.

    Returns
    -------
    dict
        ``{(build, cause): [(v, float(M v), float result, TFLite result), ...]}``, ``build`` in
        ``("double", "single")``; only causes that occur are present.
    """
    acc = _check_acc(acc).ravel()
    m = float(np.asarray(multiplier, dtype=np.float64))
    y_float = requantize_float(acc, m, 0, -128, 127).astype(np.int64)
    exact_m = Fraction(m)
    found: dict[tuple[str, str], list[tuple]] = {}
    for build in ("double", "single"):
        mult, shift = quantize_multiplier(m, rounding=build)
        y_fixed = requantize_fixed_point(acc, mult, shift, 0, -128, 127,
                                         rounding=build).astype(np.int64)
        if np.any(np.abs(y_float - y_fixed) > 1):
            raise AssertionError("the conventions differ by more than one step")
        for i in np.flatnonzero(y_float != y_fixed):
            mv = int(acc[i]) * exact_m
            to_tie = abs(mv - (mv.numerator // mv.denominator) - Fraction(1, 2))
            if to_tie == 0:
                cause = "exact tie"
            elif to_tie <= abs(mv) / 2**22:
                cause = "multiplier rounding"
            else:
                cause = "double rounding"
            found.setdefault((build, cause), []).append(
                (int(acc[i]), float(mv), int(y_float[i]), int(y_fixed[i])))
    return found


# --- the ONNX operators --------------------------------------------------------------------------


def matmul_integer_reference(A, B, a_zero_point=None, b_zero_point=None, *,
                             overflow="raise") -> np.ndarray:
    r"""ONNX ``MatMulInteger`` in plain NumPy: :math:`Y = (A - Z_A)(B - Z_B)` exactly, as int32.

    The NumPy twin of :func:`matmul_integer` (same signature, same result).  Computed in int64,
    then checked to fit int32 (``overflow="raise"``) or wrapped modulo :math:`2^{32}`
    (``overflow="wrap"``, what ONNX allows and ONNX Runtime does).  See :func:`matmul_integer`
    for the shapes and types accepted, and the int_matmul chapter.
    """
    _check_choice("overflow", overflow, _OVERFLOW)
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
    _check_choice("overflow", overflow, _OVERFLOW)
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
    sa = _row_param("a_scale", _onnx_scale("a_scale", a_scale), ops.a2.shape)
    sb = _col_param("b_scale", _onnx_scale("b_scale", b_scale), ops.b2.shape)
    sy = _onnx_scale("y_scale", y_scale)
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
    _check_choice("overflow", overflow, _OVERFLOW)
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
    _check_choice("overflow", overflow, _OVERFLOW)
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
        if k * span_a * span_b > _INT32_MAX:  # an overflow is possible: check exactly
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


# --- a whole layer -------------------------------------------------------------------------------


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's ``round`` on float64 values, exactly (``floor(|v| + 0.5)`` would round
    0.49999999999999994 up)."""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)  # v - whole is exact


def activation_range(activation: str, output_qparams: QParams) -> tuple[int, int]:
    r"""The output clamp ``(lo, hi)`` that fuses an activation into requantization.

    A ReLU keeps the reals :math:`\ge 0`, i.e. the codes :math:`\ge Z_y`; a ReLU6 also those
    :math:`\le 6`, i.e. :math:`\le Z_y + \operatorname{round}(6 / S_y)`.  Intersected with the
    grid :math:`[q_{\min}, q_{\max}]`:

    ========  ==============================  ==================================================
    "none"    :math:`q_{\min}`                  :math:`q_{\max}`
    "relu"    :math:`\max(q_{\min}, Z_y)`       :math:`q_{\max}`
    "relu6"   :math:`\max(q_{\min}, Z_y)`       :math:`\min(q_{\max}, Z_y + \mathrm{round}(6/S_y))`
    ========  ==============================  ==================================================

    as TFLite's ``CalculateActivationRangeQuantized`` computes it
    (``tensorflow/lite/kernels/kernel_util.cc``: ``6.0f / scale`` in float32, ``TfLiteRound``
    = round half away from zero).  The activation then costs nothing: it is the clamp that
    requantization does anyway.  See the int_matmul chapter.
    """
    _check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(output_qparams, QParams) or output_qparams.axis is not None:
        raise TypeError("output_qparams must be a per-tensor QParams")
    qmin, qmax = output_qparams.qmin, output_qparams.qmax
    zp = int(output_qparams.zero_point)
    if activation == "none":
        return qmin, qmax
    lo = max(qmin, zp)
    if activation == "relu":
        return lo, qmax
    six = np.float32(6.0) / np.float32(output_qparams.scale)
    hi = min(qmax, zp + int(_round_half_away(np.float64(six))))
    if hi < lo:
        raise ValueError("relu6 leaves no output code: the output grid does not reach 0..6")
    return lo, hi


def linear_float(x, weight, bias=None, activation="none") -> np.ndarray:
    r"""The float layer the quantized one approximates: :math:`y = \operatorname{act}(x W^T + b)`.

    In float64.  ``x`` (batch, in), ``weight`` (out, in), ``bias`` (out,); ``activation`` one of
    :data:`ACTIVATIONS` (ReLU6 is :math:`\min(\max(y, 0), 6)`).  See the int_matmul chapter.
    """
    _check_choice("activation", activation, ACTIVATIONS)
    xs = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if xs.ndim != 2 or w.ndim != 2 or xs.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (batch, in) and weight (out, in) with the same 'in', got "
                         f"{xs.shape} and {w.shape}")
    y = xs @ w.T
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
        y = y + b
    if activation != "none":
        y = np.maximum(y, 0.0)
    if activation == "relu6":
        y = np.minimum(y, 6.0)
    return y


def _float32_qparams(name: str, qp) -> QParams:
    """The same parameters with the scale rounded to float32, as a model file stores it."""
    if not isinstance(qp, QParams):
        raise TypeError(f"{name} must be a QParams, got {type(qp).__name__}")
    if qp.group_size is not None:
        raise ValueError(f"{name} must be per tensor or per channel, not per group")
    scale32 = qp.scale.astype(np.float32).astype(np.float64)
    return QParams(scale=scale32, zero_point=qp.zero_point, qmin=qp.qmin, qmax=qp.qmax,
                   axis=qp.axis)


def _tflite_real_multiplier(sx: float, sw: np.ndarray, sy: float, per_channel: bool) -> np.ndarray:
    """TFLite's real multiplier: per tensor ``double(f32(sx * sw)) / sy``, per channel in double.

    ``GetQuantizedConvolutionMultipler`` multiplies the two float scales as floats (one float32
    rounding) and divides in double; ``PopulateConvolutionQuantizationParams`` (per channel)
    works in double throughout (``tensorflow/lite/kernels/kernel_util.cc``).
    """
    f32 = np.float32
    if per_channel:
        return np.float64(f32(sx)) * sw.astype(f32).astype(np.float64) / np.float64(f32(sy))
    prod = (f32(sx) * sw.astype(f32)).astype(np.float64)
    return prod / np.float64(f32(sy))


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    r"""A quantized linear layer computed with integers only: ``y = act(x W^T + b)``.

    .. math::

        q_{y,ij} = \operatorname{clamp}\Big(Z_y + \operatorname{round}\big(M_j\, v_{ij}\big),
                   \ \mathrm{lo},\ \mathrm{hi}\Big), \qquad
        v_{ij} = \sum_k (q_{x,ik} - Z_x)(q_{W,jk} - Z_{W,j}) + q_{b,j}, \qquad
        M_j = \frac{S_x S_{W,j}}{S_y}

    * ``weight_q`` (out, in): integer codes on ``weight_qparams``' grid, which must fit int8;
      per tensor or per output channel (``axis=0``), symmetric or not;
    * ``bias_q`` (out,): int32 with scale :math:`S_x S_{W,j}` and zero point 0
      (:func:`quantize_bias`), or None for no bias;
    * ``input_qparams`` and ``output_qparams``: per tensor, int8 or uint8 grids;
    * ``activation``: fused as the clamp ``[lo, hi]`` of :func:`activation_range`.

    Scales are rounded to float32 on construction, as a model file (ONNX, TFLite) stores them.
    The zero-point terms that do not depend on the input are folded into :attr:`folded_bias`
    once (:func:`fold_zero_points`); :meth:`accumulate` adds the input's row sums only when the
    weights have a zero point.  Three requantizations (:data:`REQUANTIZATIONS`):

    * ``"float"``: :func:`requantize_float` with the multiplier of :func:`float_multiplier` (ONNX
      Runtime's ``QLinearConv`` / ``QLinearMatMul``, PyTorch's FBGEMM); :meth:`__call__` runs it
      on the compiled GEMM with fused requantization
      (:func:`qcourse.kernels.matmul_int8_requant`), :meth:`reference` in NumPy;
    * ``"tflite_double"`` / ``"tflite_single"``: :func:`requantize_fixed_point` with the
      multipliers of :attr:`fixed_point_params`: gemmlowp's ``MultiplyByQuantizedMultiplier``
      in TFLite's two builds (what LiteRT's own kernels compute: the deploy chapter).

    Build one from float weights with :meth:`from_float`.  See the int_matmul chapter.
    """

    weight_q: np.ndarray
    bias_q: np.ndarray | None
    input_qparams: QParams
    weight_qparams: QParams
    output_qparams: QParams
    activation: str = "none"

    def __post_init__(self):
        _check_choice("activation", self.activation, ACTIVATIONS)
        xq = _float32_qparams("input_qparams", self.input_qparams)
        wq = _float32_qparams("weight_qparams", self.weight_qparams)
        yq = _float32_qparams("output_qparams", self.output_qparams)
        for name, qp in (("input_qparams", xq), ("output_qparams", yq)):
            if qp.axis is not None:
                raise ValueError(f"{name} must be per tensor")
            if storage_dtype(qp.qmin, qp.qmax) not in _QTYPES:
                raise ValueError(f"{name} must describe an int8 or uint8 grid, got "
                                 f"[{qp.qmin}, {qp.qmax}]")
        if wq.qmin < -128 or wq.qmax > 127:
            raise ValueError(f"weight_qparams must describe a grid inside int8 [-128, 127], got "
                             f"[{wq.qmin}, {wq.qmax}]")
        w = np.asarray(self.weight_q)
        if w.dtype.kind not in "iu":
            raise TypeError(f"weight_q must be integer codes, got dtype {w.dtype}")
        if w.ndim != 2 or w.size == 0:
            raise ValueError(f"weight_q must be a non-empty 2-D (out, in) array, got {w.shape}")
        if np.any((w < wq.qmin) | (w > wq.qmax)):
            raise ValueError(f"weight_q has codes outside the weight grid [{wq.qmin}, {wq.qmax}]")
        out_f, in_f = w.shape
        if wq.axis is not None:
            if wq.axis not in (0, -2):
                raise ValueError("per-channel weight_qparams must be along axis 0 (the outputs)")
            if wq.scale.shape != (out_f,):
                raise ValueError(f"per-channel weight_qparams need {out_f} channels, got "
                                 f"{wq.scale.shape}")
        if in_f > max_k_s8s8():
            raise ValueError(f"in_features={in_f} exceeds the kernel bound {max_k_s8s8()}")
        if self.bias_q is None:
            b = np.zeros(out_f, np.int32)
        else:
            b = np.asarray(self.bias_q)
            if b.dtype != np.int32:
                raise TypeError(f"bias_q must be int32 (use quantize_bias), got {b.dtype}")
            if b.shape != (out_f,):
                raise ValueError(f"bias_q must have shape ({out_f},), got {b.shape}")
        w = w.astype(np.int8)
        w.flags.writeable = False
        b = b.copy()
        b.flags.writeable = False
        zw = np.broadcast_to(wq.zero_point, (out_f,)).astype(np.int64)
        zx = int(xq.zero_point)
        x_span = max(xq.qmax - zx, zx - xq.qmin)
        worst = np.abs(w.astype(np.int64) - zw[:, None]).sum(axis=1) * x_span + np.abs(b)
        object.__setattr__(self, "weight_q", w)
        object.__setattr__(self, "bias_q", b)
        object.__setattr__(self, "input_qparams", xq)
        object.__setattr__(self, "weight_qparams", wq)
        object.__setattr__(self, "output_qparams", yq)
        object.__setattr__(self, "_zw", zw)
        object.__setattr__(self, "_may_overflow", bool(np.any(worst > _INT32_MAX)))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight, bias, input_qparams: QParams, output_qparams: QParams, *,
                   per_channel: bool = True, symmetric: bool = True,
                   activation: str = "none") -> QuantizedLinear:
        r"""Quantize a float layer: weights to int8 (min-max), bias to int32 at :math:`S_x S_W`.

        Weights get :func:`qcourse.affine.choose_qparams` parameters, per output channel
        (``per_channel=True``) or per tensor, symmetric on the narrow grid [-127, 127]
        (``symmetric=True``, zero point 0, as TFLite and ONNX Runtime's quantizer do) or
        asymmetric on [-128, 127].  The bias is quantized by :func:`quantize_bias`.
        """
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {w.shape}")
        xq = _float32_qparams("input_qparams", input_qparams)
        wqp = choose_qparams(w, bits=8, signed=True, symmetric=bool(symmetric),
                             narrow_range=bool(symmetric), axis=0 if per_channel else None)
        wqp = _float32_qparams("weight_qparams", wqp)
        w_q = quantize(w, wqp)
        b_q = None if bias is None else quantize_bias(bias, float(xq.scale), wqp.scale)
        return cls(w_q, b_q, xq, wqp, output_qparams, activation)

    # -- derived constants ---------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_q.shape[0]

    @property
    def weight_zero_point(self) -> np.ndarray:
        """:math:`Z_{W,j}` per output (int64, shape (out,))."""
        return self._zw

    @property
    def folded_bias(self) -> np.ndarray:
        """The offline constant :func:`fold_zero_points` (int64, shape (out,))."""
        return fold_zero_points(self.weight_q, int(self.input_qparams.zero_point), self._zw,
                                self.bias_q)

    @property
    def output_range(self) -> tuple[int, int]:
        """The clamp ``(lo, hi)``: the output grid narrowed by the fused activation."""
        return activation_range(self.activation, self.output_qparams)

    @property
    def float_multiplier(self) -> np.ndarray:
        """:math:`m_j` in float32 as ONNX Runtime computes it (:func:`float_multiplier`)."""
        return np.broadcast_to(
            float_multiplier(self.input_qparams.scale, self.weight_qparams.scale,
                             self.output_qparams.scale), (self.out_features,))

    def fixed_point_params(self, rounding: str = "double") -> tuple[np.ndarray, np.ndarray]:
        """TFLite's per-output ``(multiplier, shift)`` (int32 arrays of shape (out,)).

        The real multiplier as TFLite's kernel preparation computes it (per tensor: the float32
        product of the input and weight scales, divided by the output scale in double; per
        channel: all in double), then :func:`qcourse.fixed_point.quantize_multiplier`.
        """
        sw = np.broadcast_to(self.weight_qparams.scale, (self.out_features,))
        real = _tflite_real_multiplier(float(self.input_qparams.scale), sw,
                                       float(self.output_qparams.scale),
                                       self.weight_qparams.axis is not None)
        return quantize_multiplier(real, rounding=rounding)

    # -- integer inference ---------------------------------------------------------------------

    def _check_input(self, x_q) -> np.ndarray:
        qp = self.input_qparams
        if not isinstance(x_q, np.ndarray):
            raise TypeError(f"x_q must be a numpy.ndarray of integer codes, got "
                            f"{type(x_q).__name__}")
        if x_q.dtype != storage_dtype(qp.qmin, qp.qmax):
            raise TypeError(f"x_q must have dtype {storage_dtype(qp.qmin, qp.qmax)} (the input "
                            f"grid [{qp.qmin}, {qp.qmax}]), got {x_q.dtype}")
        if x_q.ndim != 2 or x_q.shape[1] != self.in_features or x_q.shape[0] == 0:
            raise ValueError(f"x_q must have shape (batch, {self.in_features}), got {x_q.shape}")
        if np.any((x_q < qp.qmin) | (x_q > qp.qmax)):
            raise ValueError(f"x_q has codes outside the input grid [{qp.qmin}, {qp.qmax}]")
        return x_q

    def accumulate(self, x_q) -> np.ndarray:
        r"""The int32 accumulators :math:`v = \sum_k (x - Z_x)(W - Z_W) + q_b`, shape (batch, out).

        Computed the way a kernel does: the integer product :math:`x W^T`, plus the folded bias,
        minus :math:`Z_{W,j} \sum_k x_{ik}` when the weights have a zero point.  Exact (int64
        inside); a sum outside int32 raises ``ValueError``.
        """
        x = self._check_input(x_q).astype(np.int64)
        acc = x @ self.weight_q.astype(np.int64).T + self.folded_bias
        if np.any(self._zw != 0):
            acc -= np.outer(x.sum(axis=1), self._zw)
        return _to_int32(acc, "raise", "the layer's accumulator")

    def reference(self, x_q, requantization: str = "float") -> np.ndarray:
        """Integer inference in NumPy: :meth:`accumulate`, then the named requantization."""
        _check_choice("requantization", requantization, REQUANTIZATIONS)
        acc = self.accumulate(x_q)
        lo, hi = self.output_range
        zy = int(self.output_qparams.zero_point)
        out_dtype = storage_dtype(self.output_qparams.qmin, self.output_qparams.qmax)
        if requantization == "float":
            y = requantize_float(acc, self.float_multiplier, zy, lo, hi)
        else:
            rounding = requantization.removeprefix("tflite_")
            mult, shift = self.fixed_point_params(rounding)
            y = requantize_fixed_point(acc, mult, shift, zy, lo, hi, rounding=rounding)
        return y.astype(out_dtype)

    def __call__(self, x_q, requantization: str = "float") -> np.ndarray:
        """Integer inference; ``"float"`` runs on the compiled GEMM with fused requantization.

        Same result as :meth:`reference`, bit for bit (the tests check it).  The fixed-point
        requantizations have no compiled kernel and run :meth:`reference`.
        """
        _check_choice("requantization", requantization, REQUANTIZATIONS)
        if requantization != "float":
            return self.reference(x_q, requantization)
        x = self._check_input(x_q)
        if self._may_overflow:
            self.accumulate(x)  # raises if this input overflows int32
        x8, shift = _as_int8(x)
        lo, hi = self.output_range
        out_dtype = storage_dtype(self.output_qparams.qmin, self.output_qparams.qmax)
        zw = self._zw
        return matmul_int8_requant(
            x8, np.ascontiguousarray(self.weight_q.T), self.float_multiplier.astype(np.float64),
            int(self.output_qparams.zero_point), bias=self.bias_q,
            a_zero_point=int(self.input_qparams.zero_point) - shift,
            b_zero_point=zw if np.any(zw != 0) else None, out_dtype=out_dtype, qmin=lo, qmax=hi)

    # -- what the integers approximate ----------------------------------------------------------

    def dequantize_output(self, y_q) -> np.ndarray:
        """Real values of output codes, :math:`S_y (q_y - Z_y)` (float32)."""
        return dequantize(y_q, self.output_qparams)

    def fake_quant_forward(self, x) -> np.ndarray:
        r"""The layer simulated in floating point with fake quantization (float64).

        .. math:: \hat y = \operatorname{fq}_y\big(\operatorname{act}(\operatorname{fq}_x(x)\,
                  \operatorname{dq}(q_W)^T + S_x S_W q_b)\big)

        The input is fake-quantized, the weights and bias are the dequantized integer ones, the
        matrix product is done in float64 and the output fake-quantized: what a "Q/DQ" graph or
        quantization-aware training computes.  Mathematically
        :math:`\hat y = S_y (q_y - Z_y)` with the *exact* real multiplier; the integer layer
        rounds the multiplier (float32 or 31 bits), so the two can differ by one output step
        where :math:`M v` lies within that rounding of a tie.
        """
        xs = np.asarray(x, dtype=np.float64)
        if xs.ndim != 2 or xs.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {xs.shape}")
        x_hat = fake_quantize(xs, self.input_qparams)
        w_hat = np.broadcast_to(self.weight_qparams.scale, (self.out_features,))[:, None] * (
            self.weight_q.astype(np.float64) - self._zw[:, None])
        b_hat = float(self.input_qparams.scale) * np.broadcast_to(
            self.weight_qparams.scale, (self.out_features,)) * self.bias_q
        y = x_hat @ w_hat.T + b_hat
        if self.activation != "none":
            y = np.maximum(y, 0.0)
        if self.activation == "relu6":
            y = np.minimum(y, 6.0)
        return fake_quantize(y, self.output_qparams)


# --- the requantizations of LiteRT's other kernels ---------------------------------------------


def double_multiplier(input_scale, weight_scale, output_scale) -> np.ndarray:
    r"""The real multiplier in double precision, as LiteRT's int8 reference kernels compute it.

    .. math:: M = \mathrm{fl}_{64}\big(\mathrm{fl}_{64}(S_x S_W) / S_y\big)

    with the three float32 scales widened to double first (the product of two float32 values is
    exact in double; the division rounds once).  LiteRT's reference ``FULLY_CONNECTED``
    (``reference_integer_ops/fully_connected.h``, the variant that receives the float scales) and
    the per-channel preparation of ``QuantizeMultiplier``'s input (``kernel_util.cc``) use this
    value; ``weight_scale`` may be per channel.  See the deploy chapter.

    Returns
    -------
    numpy.ndarray, float64
    """
    sx, sw, sy = (np.asarray(s, dtype=np.float64).astype(np.float32).astype(np.float64)
                  for s in (input_scale, weight_scale, output_scale))
    for name, s in (("input_scale", sx), ("weight_scale", sw), ("output_scale", sy)):
        if s.size == 0 or not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(f"{name} must be finite and > 0 (and non-empty)")
    return sx * sw / sy


def requantize_double_half_away(acc, multiplier, output_zero_point, qmin, qmax) -> np.ndarray:
    r"""Requantize with one rounding of :math:`v \cdot M` in double, ties away from zero.

    .. math:: q_y = \operatorname{clamp}\big(\operatorname{round}(\mathrm{fl}_{64}(v \cdot M))
              + Z_y,\ q_{\min},\ q_{\max}\big)

    with C's ``round`` (half away from zero).  This is LiteRT's int8 reference
    ``FULLY_CONNECTED`` (``BUILTIN_REF`` op resolver): instead of
    ``MultiplyByQuantizedMultiplier`` it computes ``static_cast<int32_t>(round(double(acc) *
    effective_output_scale))`` with the double multiplier of :func:`double_multiplier`.
    ``multiplier`` is that float64 value (per output column: an array broadcasting against
    ``acc``).  A product outside int32 raises ``ValueError`` (C's cast would be undefined).
    See the deploy chapter.

    Returns
    -------
    numpy.ndarray
        dtype :func:`qcourse.affine.storage_dtype` ``(qmin, qmax)``.
    """
    a = _check_acc(acc)
    m = np.asarray(multiplier)
    if m.dtype != np.float64:
        raise TypeError(f"multiplier must be float64 (use double_multiplier), got {m.dtype}")
    if m.size == 0 or not np.all(np.isfinite(m) & (m > 0)):
        raise ValueError("multiplier must be finite and > 0")
    lo, hi = _check_range(qmin, qmax)
    zp = _check_output_zero_point(output_zero_point, lo, hi)
    r = _round_half_away(a.astype(np.float64) * m)
    if np.any((r < _INT32_MIN) | (r > _INT32_MAX)):
        raise ValueError("acc * multiplier does not fit int32 (the C cast would be undefined)")
    return np.clip(r.astype(np.int64) + zp, lo, hi).astype(storage_dtype(lo, hi))


def requantize_fixed_point_half_up(acc, multiplier, shift, output_zero_point, qmin,
                                   qmax) -> np.ndarray:
    r"""Requantize with the fixed-point multiplier, both roundings half up (ruy's x86 kernels).

    .. math:: q_y = \operatorname{clamp}\big(\operatorname{MBQM}_{\uparrow\uparrow}(v, M_0, s)
              + Z_y,\ q_{\min},\ q_{\max}\big)

    :func:`qcourse.fixed_point.multiply_by_quantized_multiplier_half_up` (SRDHM, then a rounding
    shift with ties up), the output zero point and the clamp: LiteRT's built-in optimized int8
    ``FULLY_CONNECTED`` and ``CONV_2D`` (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), which run their
    GEMM on ruy.  ``multiplier`` and ``shift`` from :func:`qcourse.fixed_point.quantize_multiplier`
    (per channel: arrays that broadcast against ``acc``).  See the deploy chapter.

    Returns
    -------
    numpy.ndarray
        dtype :func:`qcourse.affine.storage_dtype` ``(qmin, qmax)``.
    """
    a = _check_acc(acc)
    lo, hi = _check_range(qmin, qmax)
    zp = _check_output_zero_point(output_zero_point, lo, hi)
    scaled = multiply_by_quantized_multiplier_half_up(a, multiplier, shift)
    out = np.clip(np.asarray(scaled, dtype=np.int64) + zp, lo, hi)
    return out.astype(storage_dtype(lo, hi))
