r"""LiteRT's other int8 requantizations, beside TFLite's ``MultiplyByQuantizedMultiplier``.

LiteRT's reference fully-connected kernel multiplies in double and rounds once, ties away from
zero (:func:`double_multiplier`, :func:`requantize_double_half_away`); its built-in kernels on ruy
round both fixed-point steps half up (:func:`requantize_fixed_point_half_up`).  Re-exported by
:mod:`qcourse.int_matmul`; the deploy chapter compares them with what LiteRT computes.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import INT32_MAX, INT32_MIN, real_array
from qcourse.affine import storage_dtype
from qcourse.fixed_point import multiply_by_quantized_multiplier_half_up
from qcourse.int_matmul.arithmetic import (
    _check_acc,
    _check_output_zero_point,
    _check_range,
    _check_requantize,
    _round_half_away,
)

__all__ = [
    "double_multiplier",
    "requantize_double_half_away",
    "requantize_fixed_point_half_up",
]


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
    scales = []
    for name, value in (("input_scale", input_scale), ("weight_scale", weight_scale),
                        ("output_scale", output_scale)):
        s = real_array(value, name)
        with np.errstate(over="ignore", under="ignore"):
            s = s.astype(np.float32).astype(np.float64)
        if not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(f"{name} must be finite and > 0 in float32")
        scales.append(s)
    sx, sw, sy = scales
    try:
        np.broadcast_shapes(sx.shape, sw.shape, sy.shape)
    except ValueError:
        raise ValueError(f"input_scale, weight_scale and output_scale must broadcast together, "
                         f"got shapes {sx.shape}, {sw.shape}, {sy.shape}") from None
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
    if np.any((r < INT32_MIN) | (r > INT32_MAX)):
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
    a, zp, lo, hi = _check_requantize(acc, output_zero_point, qmin, qmax)
    scaled = multiply_by_quantized_multiplier_half_up(a, multiplier, shift)
    out = np.clip(np.asarray(scaled, dtype=np.int64) + zp, lo, hi)
    return out.astype(storage_dtype(lo, hi))
