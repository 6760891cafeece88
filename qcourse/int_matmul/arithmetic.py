r"""The integer arithmetic of a quantized linear layer: the derivation and the requantization.

The zero-point terms of :math:`\sum_k (q_{x,k} - Z_x)(q_{W,k} - Z_W)` one by one
(:func:`zero_point_terms`), folded into an int32 bias (:func:`fold_zero_points`,
:func:`quantize_bias`), and the requantization of the int32 accumulator in the two conventions
used in practice (:func:`requantize_float`, :func:`requantize_fixed_point`), with where they
disagree (:func:`requantization_disagreements`).  The checks shared by the whole package are at
the top.  Re-exported by :mod:`qcourse.int_matmul`; see the int_matmul chapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from qcourse._checks import (
    INT32_MAX,
    INT32_MIN,
    check_ndarray,
    check_real,
    int_array,
    real_array,
)
from qcourse.affine import (
    storage_dtype,
)
from qcourse.fixed_point import multiply_by_quantized_multiplier, quantize_multiplier

__all__ = [
    "float_multiplier",
    "fold_zero_points",
    "quantize_bias",
    "requantization_disagreements",
    "requantize_fixed_point",
    "requantize_float",
    "zero_point_terms",
]

_OVERFLOW = ("raise", "wrap")
_QTYPES = (np.dtype(np.uint8), np.dtype(np.int8))


# --- validation helpers --------------------------------------------------------------------------


def _quant_tensor(x, name: str) -> np.ndarray:
    """An operator input: a non-empty uint8 or int8 ndarray with at least one axis."""
    check_ndarray(x, name, _QTYPES)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (a vector or a matrix), got 0-d")
    return x


def _int32_values(value, name: str) -> np.ndarray:
    """Integers (a Python int, a NumPy integer or an integer array) in int32, as int64."""
    return int_array(value, name, INT32_MIN, INT32_MAX, what="int32")


def _check_zero_point(value, name: str, tensor_name: str, dtype: np.dtype) -> np.ndarray:
    """A zero point for a tensor of ``dtype``: integer values inside that dtype's range."""
    typed = isinstance(value, np.ndarray | np.generic) and value.dtype in _QTYPES
    if typed and value.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but {tensor_name} is {dtype}; ONNX requires a zero "
            f"point of its tensor's type"
        )
    info = np.iinfo(dtype)
    return int_array(value, name, int(info.min), int(info.max), what=f"{dtype} {tensor_name}")


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
    bad = (acc < INT32_MIN) | (acc > INT32_MAX)
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
    A = _quant_tensor(A, na)
    B = _quant_tensor(B, nb)
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
          else _check_zero_point(a_zero_point, "a_zero_point", na, A.dtype))
    zb = (np.asarray(0, np.int64) if b_zero_point is None
          else _check_zero_point(b_zero_point, "b_zero_point", nb, B.dtype))
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


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's ``round`` on float64 values, exactly (``floor(|v| + 0.5)`` would round
    0.49999999999999994 up)."""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)  # v - whole is exact


def _as_int8(x: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 -> int8 by subtracting 128 (exact); returns the array and the shift applied."""
    if x.dtype == np.uint8:
        return (x.astype(np.int16) - 128).astype(np.int8), 128
    return x, 0


# --- the derivation, term by term ---------------------------------------------------------------


def _check_exact_sums(k: int, x, w, zx, zw, what: str, bias=0) -> None:
    """Refuse int32 codes large enough that a K-term int64 sum of their products could wrap."""
    bound = k * (int(np.max(np.abs(x))) + int(np.max(np.abs(zx)))) * (
        int(np.max(np.abs(w))) + int(np.max(np.abs(zw)))) + int(np.max(np.abs(bias)))
    if bound >= 2**63:
        raise ValueError(f"{what} are too large for exact int64 sums over K={k} (a bound of "
                         f"{bound} >= 2**63); use codes of at most 16 bits")


def _per_output(values: np.ndarray, name: str, n: int) -> np.ndarray:
    """A scalar or one value per output row, broadcast to (n,)."""
    if values.ndim > 1 or values.size not in (1, n):
        raise ValueError(f"{name} must be a scalar or have shape ({n},) (one per output), got "
                         f"shape {values.shape}")
    return np.broadcast_to(values.reshape(-1), (n,))


def _zero_point_args(input_zero_point, weight_zero_point, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The input's zero point (one int32 value) and the weights' (a scalar or one per output),
    broadcast to (n,); int64."""
    zx = _int32_values(input_zero_point, "input_zero_point")
    if zx.ndim != 0:
        raise ValueError(f"input_zero_point must be a scalar, got shape {zx.shape}")
    return zx, _per_output(_int32_values(weight_zero_point, "weight_zero_point"),
                           "weight_zero_point", n)


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
    x = _int32_values(x_q, "x_q")
    w = _int32_values(w_q, "w_q")
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(
            f"x_q and w_q must be 2-D (batch, K) and (out, K), got {x.shape} and {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x_q has K={x.shape[1]} but w_q has K={w.shape[1]} (shape {w.shape})")
    zx, zw = _zero_point_args(input_zero_point, weight_zero_point, w.shape[0])
    k = x.shape[1]
    _check_exact_sums(k, x, w, zx, zw, "x_q and w_q")
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
    w = _int32_values(w_q, "w_q")
    if w.ndim != 2:
        raise ValueError(f"w_q must be 2-D (out, K), got shape {w.shape}")
    zx, zw = _zero_point_args(input_zero_point, weight_zero_point, w.shape[0])
    b = np.zeros(w.shape[0], np.int64)
    if bias_q is not None:
        b = _int32_values(bias_q, "bias_q")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias_q must have shape ({w.shape[0]},), got {b.shape}")
    _check_exact_sums(w.shape[1], zx, w, zx, zw, "w_q and the zero points", b)
    return b - zx * w.sum(axis=1) + w.shape[1] * zx * zw


def _positive_scale(value, name: str, dtype) -> np.ndarray:
    """A scale (scalar or array): real, finite, > 0, and still so in ``dtype``."""
    arr = real_array(value, name, dtype=dtype)
    if not np.all(arr > 0):
        raise ValueError(f"{name} must be finite and > 0, got {arr[arr <= 0].flat[0]}")
    return arr


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
    b = real_array(bias, "bias", ndim=1)
    sx = _positive_scale(input_scale, "input_scale", np.float64)
    sw = _positive_scale(weight_scale, "weight_scale", np.float64)
    if sx.ndim != 0:
        raise ValueError(f"input_scale must be a scalar, got shape {sx.shape}")
    if sw.ndim not in (0, 1) or (sw.ndim == 1 and sw.shape != b.shape):
        raise ValueError(f"weight_scale must be a scalar or have shape {b.shape}, got {sw.shape}")
    q = np.rint(b / (sx * sw))
    if np.any((q < INT32_MIN) | (q > INT32_MAX)):
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
    sa, sb, sy = (_positive_scale(s, name, np.float32) for s, name in
                  ((a_scale, "a_scale"), (b_scale, "b_scale"), (y_scale, "y_scale")))
    with np.errstate(over="ignore", under="ignore"):
        m = (sa * sb) / sy
    if not np.all(np.isfinite(m)) or np.any(m == 0):
        raise ValueError(
            "a_scale * b_scale / y_scale overflows or underflows float32; the scales are "
            "inconsistent"
        )
    return m


def _check_range(qmin, qmax) -> tuple[int, int]:
    lo = _int32_values(qmin, "qmin")
    hi = _int32_values(qmax, "qmax")
    if lo.ndim or hi.ndim:
        raise ValueError("qmin and qmax must be scalars")
    lo, hi = int(lo), int(hi)
    if not INT32_MIN <= lo < hi <= INT32_MAX:
        raise ValueError(f"need qmin < qmax within int32, got qmin={lo}, qmax={hi}")
    return lo, hi


def _check_output_zero_point(output_zero_point, qmin, qmax) -> np.ndarray:
    zp = _int32_values(output_zero_point, "output_zero_point")
    if np.any((zp < qmin) | (zp > qmax)):
        raise ValueError(
            f"output_zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got "
            f"{int(zp[(zp < qmin) | (zp > qmax)].flat[0])}"
        )
    return zp


def _check_acc(acc) -> np.ndarray:
    return _int32_values(acc, "acc")


def _check_requantize(acc, output_zero_point, qmin, qmax) -> tuple[np.ndarray, np.ndarray, int,
                                                                    int]:
    """The arguments every requantization shares, checked: ``(acc, zero point, qmin, qmax)``."""
    a = _check_acc(acc)
    lo, hi = _check_range(qmin, qmax)
    return a, _check_output_zero_point(output_zero_point, lo, hi), lo, hi


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
    a, zp, lo, hi = _check_requantize(acc, output_zero_point, qmin, qmax)
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
    m = check_real(multiplier, "multiplier", 0.0, lo_open=True)
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
