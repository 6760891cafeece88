"""Where the error of affine quantization comes from, and what the parameters cost to store.

SQNR, the error split into rounding (inside the range) and clipping (outside it), a sweep of
clipping ratios, how much of the grid a tensor uses, and the effective bits per value once the
scales and zero points are counted.  Re-exported by :mod:`qcourse.affine`; see the affine
chapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcourse._checks import (
    MAX_SQUARABLE,
    check_axis,
    check_int,
    check_int_sequence,
    real_array,
)
from qcourse.affine.quantizer import QParams, _broadcast_params, qparams_from_range, quantize

__all__ = [
    "ErrorBreakdown",
    "clip_sweep",
    "effective_bits",
    "error_breakdown",
    "grid_occupancy",
    "sqnr_db",
]


# --- measuring the error -----------------------------------------------------------------------


def sqnr_db(x, x_hat) -> float:
    r"""Signal-to-quantization-noise ratio in decibels.

    .. math:: \text{SQNR} = 10 \log_{10}
              \frac{\sum_i x_i^2}{\sum_i (x_i - \hat x_i)^2}

    Each extra bit of a uniform grid halves the step and adds about :math:`20\log_{10}2
    \approx 6.02` dB.  Returns ``inf`` when ``x_hat == x`` exactly; an all-zero ``x`` has no
    signal and raises ``ValueError``.  See the affine chapter.

    Bounds: ``|x|`` and ``|x_hat|`` at most 1e150 (their squares are summed in float64).
    """
    x = real_array(x, "x", max_abs=MAX_SQUARABLE)
    x_hat = real_array(x_hat, "x_hat", max_abs=MAX_SQUARABLE)
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {x.shape} and {x_hat.shape}")
    signal = float(np.sum(x * x))
    if signal == 0.0:
        raise ValueError("x is all zeros: the SQNR of a zero signal is undefined")
    noise = float(np.sum((x - x_hat) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class ErrorBreakdown:
    r"""Mean squared quantization error split into its two sources (see :func:`error_breakdown`).

    Attributes
    ----------
    rounding_mse : float
        From values inside the representable range: :math:`\operatorname{clip}(x) - \hat x`.
    clipping_mse : float
        From values outside it: :math:`x - \operatorname{clip}(x)`.
    total_mse : float
        :math:`\operatorname{mean}((x - \hat x)^2)`, the sum of the two.
    sqnr_db : float
    clipped_fraction : float
        Share of the values that lie outside the representable range.
    """

    rounding_mse: float
    clipping_mse: float
    total_mse: float
    sqnr_db: float
    clipped_fraction: float


def error_breakdown(x, qparams: QParams) -> ErrorBreakdown:
    r"""Split the quantization error of ``x`` into rounding error and clipping error.

    With :math:`[\alpha, \beta]` the representable range (:meth:`QParams.representable_range`)
    and :math:`\hat x` the fake-quantized values,

    .. math::

        x - \hat x = \underbrace{\big(x - \operatorname{clip}(x, \alpha, \beta)\big)}_{
        \text{clipping}} + \underbrace{\big(\operatorname{clip}(x, \alpha, \beta) - \hat x\big)}_{
        \text{rounding}}.

    A clipped value lands on the grid's end point, so its rounding term is 0 and the two mean
    squared errors add up to the total.  Rounding error is bounded by ``scale / 2`` per value;
    clipping error is not bounded at all.  Computed in float64; ``|x|`` at most 1e150.  See the
    affine chapter.
    """
    x = real_array(x, "x", max_abs=MAX_SQUARABLE)
    scale, zp = _broadcast_params(qparams, x.shape)
    lo, hi = scale * (qparams.qmin - zp), scale * (qparams.qmax - zp)
    x_hat = scale * (quantize(x, qparams).astype(np.int64) - zp)
    inside = np.clip(x, lo, hi)
    rounding = inside - x_hat
    clipping = x - inside
    total = float(np.mean((x - x_hat) ** 2))
    signal = float(np.mean(x * x))
    if signal == 0.0:
        sqnr = math.nan
    elif total == 0.0:
        sqnr = math.inf
    else:
        sqnr = 10.0 * math.log10(signal / total)
    return ErrorBreakdown(
        rounding_mse=float(np.mean(rounding**2)),
        clipping_mse=float(np.mean(clipping**2)),
        total_mse=total,
        sqnr_db=sqnr,
        clipped_fraction=float(np.mean((x < lo) | (x > hi))),
    )


def clip_sweep(x, clip_ratios, *, bits=8, signed=True, symmetric=True) -> dict[str, np.ndarray]:
    r"""Rounding, clipping and total MSE as the clipping range shrinks.

    For each ratio :math:`c \in (0, 1]` the per-tensor range is :math:`[c\,\min x, c\,\max x]`
    (with ``symmetric=True``, :math:`[-c \max|x|, c \max|x|]`), quantized with
    :func:`qparams_from_range` and measured with :func:`error_breakdown`.  Shrinking the range
    shrinks the step (less rounding error) and clips more values (more clipping error); the
    total is smallest in between.  See the affine chapter.

    Returns
    -------
    dict
        ``"clip_ratio"``, ``"scale"``, ``"rounding_mse"``, ``"clipping_mse"``, ``"total_mse"``,
        ``"sqnr_db"``, ``"clipped_fraction"``: one float64 array entry per ratio.

    Bounds: ``|x|`` at most 1e150; ``bits`` as for :func:`qrange`.
    """
    x = real_array(x, "x", max_abs=MAX_SQUARABLE)
    ratios = real_array(clip_ratios, "clip_ratios")
    if ratios.ndim != 1 or np.any(ratios <= 0) or np.any(ratios > 1):
        raise ValueError("clip_ratios must be a 1-D sequence of numbers in (0, 1]")
    keys = ("scale", "rounding_mse", "clipping_mse", "total_mse", "sqnr_db", "clipped_fraction")
    out = {k: np.empty(ratios.size) for k in keys}
    for i, c in enumerate(ratios):
        qp = qparams_from_range(c * x.min(), c * x.max(), bits=bits, signed=signed,
                                symmetric=symmetric)
        eb = error_breakdown(x, qp)
        out["scale"][i] = float(qp.scale)
        for k in keys[1:]:
            out[k][i] = getattr(eb, k)
    return {"clip_ratio": ratios.copy(), **out}


def grid_occupancy(x, qparams: QParams):
    r"""Fraction of the integer grid that the values of ``x`` can reach.

    .. math:: \frac{q(\max x) - q(\min x) + 1}{q_{\max} - q_{\min} + 1}

    Abs-max (symmetric) quantization of a tensor that is all non-negative, such as a ReLU
    output, reaches only the upper half of a signed grid: the occupancy is about 0.5 and one of
    the bits is wasted.  Per-tensor parameters give a float; per-channel ones an array with one
    entry per channel.  See the affine chapter.
    """
    x = real_array(x, "x")
    q = quantize(x, qparams).astype(np.int64)
    if qparams.group_size is not None:
        raise ValueError("grid_occupancy supports per-tensor and per-channel parameters")
    if qparams.axis is None:
        return float(q.max() - q.min() + 1) / qparams.levels
    ax = check_axis(qparams.axis, "axis", q.ndim)
    others = tuple(i for i in range(q.ndim) if i != ax)
    return (q.max(axis=others) - q.min(axis=others) + 1) / qparams.levels


def effective_bits(bits, shape, *, axis=None, group_size=None, scale_bits=16,
                   zero_point_bits=16) -> float:
    r"""Storage per value once the quantization parameters are counted.

    .. math:: b_{\text{eff}} = b + \frac{n_{\text{params}}\,(b_s + b_z)}{N}

    where :math:`N` is the number of values, :math:`n_{\text{params}}` the number of
    (scale, zero point) pairs -- 1 per tensor, :math:`C` per channel, one per group of
    ``group_size`` -- and :math:`b_s`, :math:`b_z` the bits of each stored scale and zero point
    (16 each by default; pass ``zero_point_bits=0`` for symmetric quantization, which stores no
    zero point).  Per-group int4 with groups of 32 costs :math:`4 + 32/32 = 5` bits per value.
    See the affine chapter.
    """
    bits = check_int(bits, "bits", 1)
    shape = check_int_sequence(shape, "shape", 1, min_len=1)
    scale_bits = check_int(scale_bits, "scale_bits", 0)
    zero_point_bits = check_int(zero_point_bits, "zero_point_bits", 0)
    n = math.prod(shape)
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis: groups are formed along axis")
        n_params = 1
    else:
        ax = check_axis(check_int(axis, "axis"), "axis", len(shape))
        if group_size is None:
            n_params = shape[ax]
        else:
            group_size = check_int(group_size, "group_size", 1)
            n_params = n // shape[ax] * -(-shape[ax] // group_size)
    return bits + n_params * (scale_bits + zero_point_bits) / n
