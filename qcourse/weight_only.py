r"""Weight-only quantization at 4 bits and below: round-to-nearest, GPTQ and AWQ.

The weight_only chapter (``book/weight_only.md``) explains everything in this module.  A linear
layer :math:`y = x W^T` with ``W`` of shape ``(N, K)`` (rows = output channels) keeps float
activations and stores ``W`` as ``bits``-bit codes with one scale (and zero point) per *group*
of ``group_size`` consecutive weights along the input dimension K.  What matters is not how far
:math:`\hat W` is from :math:`W`, but how far the layer's *output* moves on the inputs ``X`` it
really sees (rows = tokens):

.. math::

    E(\hat W) = \lVert X W^T - X \hat W^T \rVert_F^2
              = \operatorname{tr}\big((W - \hat W)\, X^T X\, (W - \hat W)^T\big),

a quadratic form in each row's error with the *proxy Hessian* :math:`H = 2 X^T X / n`
(:func:`hessian`; :func:`layer_error` gives :math:`\lVert X (W - \hat W)^T \rVert_F`).

* :func:`rtn` rounds every weight to the nearest level of its group's grid (the baseline).
* :func:`gptq` (Frantar et al., 2023) quantizes one column (input feature) at a time and moves
  the not-yet-quantized columns to compensate for the error just made, using the Cholesky factor
  of :math:`H^{-1}`; with lazy block updates, optional act-order (largest :math:`H_{kk}`
  first) and group-wise grids.  :func:`gptq_reference` is the same algorithm written the slow,
  obvious way (a fresh inverse of the remaining Hessian at every step), which the fast one
  matches to rounding.
* :func:`awq_scales` (Lin et al., 2024) searches a per-input-channel scale
  :math:`s = \bar{|x|}^{\alpha}` that enlarges the weights of salient channels before rounding
  (:math:`\hat W = Q(W \operatorname{diag}(s))\operatorname{diag}(s)^{-1}`);
  :func:`awq_clip` searches a clipping ratio per group; :func:`awq` does both.

Grids come from :func:`qcourse.affine.qparams_from_range` (asymmetric: codes
:math:`0 \dots 2^b - 1` with a zero point, as both papers use; symmetric: the narrow signed grid
:math:`-(2^{b-1}-1) \dots 2^{b-1}-1` of :mod:`qcourse.lowbit`), rounded codes from
:func:`qcourse.affine.quantize`; scales are stored in float16 by default, and rounded to it
*before* the weights are rounded.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_SQUARABLE,
    check_bool,
    check_choice,
    check_dtype,
    check_instance,
    check_int,
    check_real,
    check_sequence,
    describe,
    real_array,
)
from qcourse.affine import QParams, effective_bits, qparams_from_range, quantize
from qcourse.affine.quantizer import _group_minmax, _stored_scale

__all__ = [
    "METHODS",
    "AWQScales",
    "HessianWarning",
    "MethodResult",
    "QuantizedWeight",
    "awq",
    "awq_clip",
    "awq_scales",
    "compare_methods",
    "gptq",
    "gptq_reference",
    "hessian",
    "layer_error",
    "quantize_layer",
    "quantize_layers",
    "rtn",
    "salient_channel_error",
]

MIN_BITS, MAX_BITS = 2, 8
#: Most grid points of AWQ's searches (``n_grid``): each one is a full round-to-nearest.
MAX_GRID = 10_000
_SCALE_BITS = {np.dtype(np.float16): 16, np.dtype(np.float32): 32, np.dtype(np.float64): 64}


class HessianWarning(UserWarning):
    """A Hessian given to :func:`gptq` was not positive definite after the requested dampening,
    and a larger dampening was used (the warning says which)."""


# --------------------------------------------------------------------------- validation


def _float_matrix(a, name: str, max_abs: float | None = None) -> np.ndarray:
    """``a`` as a finite, non-empty 2-D float array (not copied), or a named error."""
    return real_array(a, name, kinds="f", dtype=None, ndim=2, max_abs=max_abs)


def _group(group_size, k: int) -> int:
    """``None`` (one group per row: per channel) or an int >= 1; at most K (a larger one is
    clamped to K: nothing of its size is allocated)."""
    if group_size is None:
        return k
    return min(check_int(group_size, "group_size", 1), k)


def _scale_dtype(scale_dtype) -> np.dtype:
    return check_dtype(scale_dtype, "scale_dtype", _SCALE_BITS)


def _check_inputs(x, k: int) -> np.ndarray:
    """Calibration inputs (n, K): their squares are summed, so magnitudes are at most
    ``MAX_SQUARABLE``."""
    x = _float_matrix(x, "x", MAX_SQUARABLE)
    if x.shape[1] != k:
        raise ValueError(f"x must have K={k} columns (the weight's input features), got shape "
                         f"{x.shape}")
    return x


def _finite(value, what: str):
    """``value`` (a float or an array) if finite, else a ValueError saying ``what`` overflowed."""
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{what} overflows float64: the inputs are too large")
    return value


# --------------------------------------------------------------------------- the objective


def hessian(x) -> np.ndarray:
    r"""The proxy Hessian of the layer objective, :math:`H = \frac{2}{n} X^T X` (float64).

    ``x`` holds the layer's inputs, one row per token, shape ``(n, K)``.  The objective
    :math:`\frac1n \lVert X W^T - X\hat W^T \rVert_F^2` is, for each row :math:`w` of the
    weight, :math:`\tfrac12 (w - \hat w)^T H (w - \hat w)`: a quadratic form with this Hessian,
    the same for every row.  See the weight_only chapter.
    """
    x = _float_matrix(x, "x", MAX_SQUARABLE).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return _finite(2.0 * (x.T @ x) / x.shape[0], "x's Hessian 2 X^T X / n")


def layer_error(x, weight, w_hat) -> float:
    r""":math:`\lVert X (W - \hat W)^T \rVert_F`: how far the layer's outputs move on the inputs
    ``x`` (rows = tokens) when ``weight`` (N, K) is replaced by ``w_hat``.  Float64.  See the
    weight_only chapter."""
    w = _float_matrix(weight, "weight")
    w_hat = _float_matrix(w_hat, "w_hat")
    if w_hat.shape != w.shape:
        raise ValueError(f"w_hat must have the weight's shape {w.shape}, got {w_hat.shape}")
    x = _check_inputs(x, w.shape[1]).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = x @ (w.astype(np.float64) - w_hat.astype(np.float64)).T
        return _finite(float(np.linalg.norm(out)), "the error of x, weight and w_hat")


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class QuantizedWeight:
    r"""A weight matrix in ``bits``-bit codes with one grid per group along K.

    .. math::

        \hat W_{nk} = s_{n,\lfloor k/g \rfloor}\,\big(q_{nk} - z_{n,\lfloor k/g \rfloor}\big)
        \,/\, a_k

    with :math:`a` the AWQ input scale (1 when ``input_scale`` is None).  Returned by
    :func:`rtn`, :func:`gptq`, :func:`gptq_reference` and :func:`awq` with
    ``return_codes=True``.

    Attributes
    ----------
    weight : numpy.ndarray, (N, K)
        The dequantized weight, in the input weight's dtype: what the layer multiplies by.
    codes : numpy.ndarray, (N, K)
        uint8 codes :math:`0 \dots 2^b-1` (asymmetric) or int8 codes
        :math:`-(2^{b-1}-1) \dots 2^{b-1}-1` (symmetric).
    scale : numpy.ndarray, (N, G)
        One scale per row and group, in the stored dtype (float16 by default).
    zero_point : numpy.ndarray (N, G) of int64, or None (symmetric grids have none)
    bits, group_size : int
        ``group_size`` is at most K (K: one group per row, per channel); the last group of a row
        is shorter when it does not divide K.
    input_scale : numpy.ndarray (K,) or None
        AWQ's per-input-channel scale :math:`a` (the codes quantize :math:`W
        \operatorname{diag}(a)`); it is folded into the operation before the layer.
    damp : float or None
        GPTQ only: the dampening actually used (relative to the mean of :math:`H`'s diagonal).
    """

    weight: np.ndarray
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    group_size: int
    input_scale: np.ndarray | None = None
    damp: float | None = None

    def dequantize(self) -> np.ndarray:
        """:math:`\\hat W` recomputed from the codes, scales and zero points (equal to
        ``weight``)."""
        return _dequantize(self.codes, self.scale, self.zero_point, self.group_size,
                           self.input_scale).astype(self.weight.dtype)

    @property
    def bits_per_weight(self) -> float:
        r"""Storage per weight including the grid: :math:`b + (b_s + b_z) \lceil K/g \rceil / K`.

        :math:`b_s` is the scale dtype's width, :math:`b_z = b` for an asymmetric grid (the zero
        point is a code) and 0 for a symmetric one: 4-bit codes with float16 scales and 4-bit
        zero points in groups of 128 cost 4.156 bits.  AWQ's ``input_scale`` is not counted: it
        folds into the operation that feeds the layer (see the chapter for when it cannot).
        Computed with :func:`qcourse.affine.effective_bits`.
        """
        zp_bits = 0 if self.zero_point is None else self.bits
        return effective_bits(self.bits, self.codes.shape, axis=1, group_size=self.group_size,
                              scale_bits=_SCALE_BITS[self.scale.dtype], zero_point_bits=zp_bits)


def _dequantize(codes, scale, zero_point, g: int, input_scale=None) -> np.ndarray:
    """Float64 :math:`s (q - z) / a`, the one formula every function here dequantizes with."""
    k = codes.shape[1]
    s = np.repeat(scale.astype(np.float64), g, axis=1)[:, :k]
    q = codes.astype(np.float64)
    if zero_point is not None:
        q = q - np.repeat(zero_point, g, axis=1)[:, :k]
    w = s * q
    return w if input_scale is None else w / input_scale


def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _group_params(lo, hi, *, bits: int, symmetric: bool, scale_dtype: np.dtype, group_size):
    r"""Scale and zero point of the ranges ``[lo, hi]`` ((N,) or (N, G)), the scale rounded to
    ``scale_dtype`` first and the zero point computed from the stored scale.

    The unrounded parameters are :func:`qcourse.affine.qparams_from_range`'s (the range
    widened to contain 0; an all-zero group gets scale 1).  Returns (stored scale, float64 copy
    of it, zero point or None).
    """
    grouped = np.ndim(lo) == 2
    qp = qparams_from_range(lo, hi, bits=bits, signed=symmetric, symmetric=symmetric,
                            narrow_range=symmetric, axis=1 if grouped else 0,
                            group_size=group_size if grouped else None)
    stored = _stored_scale(qp.scale, scale_dtype)
    s64 = stored.astype(np.float64)
    if symmetric:
        return stored, s64, None
    qmin, qmax = _grid(bits, False)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    zp = np.clip(np.rint(qmin - lo / s64), qmin, qmax).astype(np.int64)
    return stored, s64, zp


def _clip_ratios(clip, shape) -> np.ndarray | None:
    if clip is None:
        return None
    c = real_array(clip, "clip")
    c = np.broadcast_to(c, shape) if c.ndim == 0 else c
    if c.shape != shape:
        raise ValueError(f"clip must be a scalar or have the group layout {shape}, got {c.shape}")
    if not np.all((c > 0) & (c <= 1)):
        raise ValueError("clip ratios must lie in (0, 1]")
    return c


def _group_ranges(w: np.ndarray, g: int, clip) -> tuple[np.ndarray, np.ndarray]:
    r"""Per-row, per-group min and max of ``w`` (N, K), each shrunk by its clip ratio ``c``:
    :math:`[\max(\min w, -c \max|w|),\ \min(\max w, c \max|w|)]` (AWQ's clipping)."""
    lo, hi = _group_minmax(w, 1, g)
    c = _clip_ratios(clip, lo.shape)
    if c is not None:
        amax = np.maximum(-lo, hi)
        lo, hi = np.maximum(lo, -c * amax), np.minimum(hi, c * amax)
    return lo, hi


def _check_common(weight, bits, symmetric, scale_dtype, return_codes):
    w = _float_matrix(weight, "weight")
    return (w, check_int(bits, "bits", MIN_BITS, MAX_BITS), check_bool(symmetric, "symmetric"),
            _scale_dtype(scale_dtype), check_bool(return_codes, "return_codes"))


def rtn(weight, *, bits: int, group_size, symmetric: bool = False, clip=None,
        scale_dtype=np.float16, return_codes: bool = False):
    r"""Round to nearest: every weight to the nearest level of its group's min-max grid.

    For row :math:`n` and group :math:`j` (columns :math:`jg \dots jg+g-1`), with the group's
    range :math:`[\min(0, \min w), \max(0, \max w)]`,

    .. math::

        s_{nj} = \frac{\max - \min}{2^b - 1}, \qquad
        z_{nj} = \operatorname{round}(-\min / s_{nj}), \qquad
        q_{nk} = \operatorname{clamp}\big(\operatorname{round}(W_{nk}/s_{nj}) + z_{nj},
                 0, 2^b - 1\big)

    (``symmetric=True``: :math:`s = \max|w| / (2^{b-1}-1)`, :math:`z = 0`, codes
    :math:`\pm(2^{b-1}-1)`).  ``clip`` (a ratio :math:`c \in (0, 1]`, scalar or one per row and
    group) first shrinks the range to :math:`[\max(\min w, -c\max|w|), \min(\max w, c\max|w|)]`,
    as AWQ's clipping search does.  The scale is rounded to ``scale_dtype`` before the weights
    are rounded; the codes come from :func:`qcourse.affine.quantize`.  See the weight_only
    chapter.

    Parameters
    ----------
    weight : float array (N, K), finite
        Rows are output channels; groups run along the input dimension K.
    bits : int, 2 to 8
    group_size : int >= 1 or None
        None, or any value >= K, is one group per row (per channel).
    symmetric : bool, default False
    clip : None, float or array (N, G)
    scale_dtype : float16 (default), float32 or float64
    return_codes : bool, default False

    Returns
    -------
    numpy.ndarray or QuantizedWeight
        The dequantized weight (``weight``'s dtype and shape), or with ``return_codes=True`` a
        :class:`QuantizedWeight` holding it with its codes, scales and zero points.
    """
    w, bits, symmetric, sdt, return_codes = _check_common(weight, bits, symmetric, scale_dtype,
                                                          return_codes)
    g = _group(group_size, w.shape[1])
    w64 = w.astype(np.float64)
    lo, hi = _group_ranges(w64, g, clip)
    stored, s64, zp = _group_params(lo, hi, bits=bits, symmetric=symmetric, scale_dtype=sdt,
                                    group_size=g)
    qmin, qmax = _grid(bits, symmetric)
    qp = QParams(scale=s64, zero_point=0 if zp is None else zp, qmin=qmin, qmax=qmax, axis=1,
                 group_size=g)
    codes = quantize(w64, qp)
    w_hat = _dequantize(codes, stored, zp, g).astype(w.dtype)
    if not return_codes:
        return w_hat
    return QuantizedWeight(w_hat, codes, stored, zp, bits, g)


# --------------------------------------------------------------------------- GPTQ


def _check_hessian(h, k: int) -> np.ndarray:
    h = _float_matrix(h, "hessian").astype(np.float64)
    if h.shape != (k, k):
        raise ValueError(f"hessian must have shape (K, K) = ({k}, {k}) to match the weight, got "
                         f"{h.shape}")
    tol = 1e-8 * max(float(np.abs(h).max()), 1e-300)
    if np.abs(h - h.T).max() > tol:
        raise ValueError("hessian must be symmetric (it is 2 X^T X / n)")
    if np.any(np.diag(h) < 0):
        raise ValueError("hessian must have a non-negative diagonal (it is 2 X^T X / n); got "
                         f"{float(np.diag(h).min())}")
    return h


def _damped_hessian(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, float]:
    r""":math:`H + \lambda \bar d I` with :math:`\bar d` the mean of H's diagonal (1 if it is 0),
    its lower Cholesky factor and the relative dampening :math:`\lambda` used.

    :math:`\lambda` starts at ``damp``; while the Cholesky factorization fails (H is not
    positive definite), it is raised tenfold (from 1e-4 when ``damp`` is 0) and a
    :class:`HessianWarning` says what was used; past :math:`\lambda = 10^4` a ValueError.
    """
    mean_diag = float(np.mean(np.diag(h)))
    unit = mean_diag if mean_diag > 0 else 1.0
    eye = np.eye(h.shape[0])
    lam = damp
    while True:
        try:
            damped = h + lam * unit * eye
            chol = np.linalg.cholesky(damped)
            break
        except np.linalg.LinAlgError:
            lam = 10 * lam if lam > 0 else 1e-4
            if lam > 1e4:
                raise ValueError("hessian is far from positive definite: still not after "
                                 "dampening by 1e4 times its mean diagonal") from None
    if lam != damp:
        warnings.warn(f"hessian is not positive definite with damp={damp:g}; dampened with "
                      f"damp={lam:g} (H + {lam:g} * mean(diag H) * I)", HessianWarning,
                      stacklevel=3)
    return damped, chol, lam


def _check_gptq(weight, hessian_, bits, group_size, damp, act_order, symmetric, scale_dtype,
                return_codes):
    w, bits, symmetric, sdt, return_codes = _check_common(weight, bits, symmetric, scale_dtype,
                                                          return_codes)
    k = w.shape[1]
    h = _check_hessian(hessian_, k)
    g = _group(group_size, k)
    damp = check_real(damp, "damp", 0.0, 1e4)
    act_order = check_bool(act_order, "act_order")
    return w, h, bits, g, damp, act_order, symmetric, sdt, return_codes


class _GroupGrids:
    """Per-group grids, fixed the first time a column of the group is quantized."""

    def __init__(self, n: int, k: int, g: int, perm: np.ndarray, *, bits: int, symmetric: bool,
                 scale_dtype: np.dtype):
        self.g, self.bits, self.symmetric, self.sdt = g, bits, symmetric, scale_dtype
        n_groups = -(-k // g)
        inv = np.empty(k, dtype=np.int64)
        inv[perm] = np.arange(k)
        self.group_of = perm // g                           # group of each processing position
        self.positions = [np.sort(inv[j * g:(j + 1) * g]) for j in range(n_groups)]
        self.stored = np.empty((n, n_groups), dtype=scale_dtype)
        self.scale = np.empty((n, n_groups))
        self.zero = np.zeros((n, n_groups), dtype=np.int64)
        self.seen = np.zeros(n_groups, dtype=bool)
        self.qmin, self.qmax = _grid(bits, symmetric)

    def opens(self, p: int) -> bool:
        return not self.seen[self.group_of[p]]

    def fix(self, p: int, values: np.ndarray) -> None:
        """Fix the grid of position ``p``'s group from its columns' current ``values`` (N, m)."""
        j = self.group_of[p]
        stored, s64, zp = _group_params(values.min(axis=1), values.max(axis=1), bits=self.bits,
                                        symmetric=self.symmetric, scale_dtype=self.sdt,
                                        group_size=None)
        self.stored[:, j], self.scale[:, j] = stored, s64
        if zp is not None:
            self.zero[:, j] = zp
        self.seen[j] = True

    def round(self, p: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and dequantized values of column ``w`` (N,) at position ``p``."""
        j = self.group_of[p]
        s, z = self.scale[:, j], self.zero[:, j]
        q = np.clip(np.rint(w / s) + z, self.qmin, self.qmax)
        return q, s * (q - z)

    def result(self, w: np.ndarray, codes_p: np.ndarray, perm: np.ndarray, lam: float,
               return_codes: bool):
        codes = np.empty_like(codes_p)
        codes[:, perm] = codes_p
        codes = codes.astype(np.int8 if self.symmetric else np.uint8)
        zp = None if self.symmetric else self.zero
        w_hat = _dequantize(codes, self.stored, zp, self.g).astype(w.dtype)
        if not return_codes:
            return w_hat
        return QuantizedWeight(w_hat, codes, self.stored, zp, self.bits, self.g, damp=lam)


def _order(h: np.ndarray, act_order: bool) -> np.ndarray:
    """Processing order: 0..K-1, or by decreasing :math:`H_{kk}` (stable) with act-order."""
    k = h.shape[0]
    return np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)


def _block_end(start: int, k: int, block_size: int, grids: _GroupGrids) -> int:
    """End of the lazy block that starts at ``start``.

    A group whose grid is fixed inside the block (after its first column) must have all its
    columns inside the block, where they are kept up to date; otherwise the block ends before
    that column, so that every grid is fixed from fully updated weights, as in the reference.
    """
    end = min(start + block_size, k)
    changed = True
    while changed:
        changed = False
        opened: set[int] = set()
        for p in range(start + 1, end):
            j = grids.group_of[p]
            if grids.seen[j] or j in opened or j == grids.group_of[start]:
                continue
            opened.add(j)
            if grids.positions[j][-1] >= end:
                end, changed = p, True
                break
    return end


def gptq(weight, hessian, *, bits: int, group_size, damp: float = 0.01,
         act_order: bool = False, block_size: int = 128, symmetric: bool = False,
         scale_dtype=np.float16, return_codes: bool = False):
    r"""GPTQ (Frantar et al., 2023): quantize column by column, compensating each column's
    rounding error on the columns not yet quantized.

    With :math:`F` the set of columns not yet quantized and :math:`H_F` the Hessian restricted
    to it, quantizing column :math:`q` to :math:`\hat w_q` and moving the rest by the optimal
    brain surgeon's update

    .. math::

        \delta_F = -\frac{w_q - \hat w_q}{[H_F^{-1}]_{qq}}\,(H_F^{-1})_{:,q}

    minimises the layer objective for every row at once (every row shares :math:`H`).  The rows
    :math:`(H_F^{-1})_{q,F} / \sqrt{[H_F^{-1}]_{qq}}` for :math:`q = 1, 2, \dots` in order are the
    rows of the upper Cholesky factor :math:`U` of :math:`H^{-1} = U^T U`, so one factorization
    serves every step: :math:`e = (w_q - \hat w_q)/U_{qq}`, :math:`W_{:,F} \mathrel{-}= e\,
    U_{q,F}`.  The update of the columns beyond the current block of ``block_size`` columns is
    *lazy*: accumulated and applied once per block as a matrix product (same result, fewer passes
    over W).

    * **dampening**: :math:`H + \lambda \bar d I`, :math:`\lambda` = ``damp``,
      :math:`\bar d` the mean diagonal; if H is still not positive definite, :math:`\lambda`
      grows tenfold until it is and a :class:`HessianWarning` says so;
    * **act-order**: columns in order of decreasing :math:`H_{kk}` (the most active inputs
      first, while many columns are left to absorb their error);
    * **groups**: each group's min-max grid is fixed when its first column is reached (in the
      processing order), from the group's current, already compensated weights.  Groups are
      contiguous along K in the *original* order, act-order or not, so no index table is stored.
      A lazy block ends early where a grid would otherwise be fixed from weights that miss a
      pending update, so the result equals :func:`gptq_reference`'s to rounding.

    See the weight_only chapter.

    Parameters
    ----------
    weight : float array (N, K)
    hessian : float array (K, K), symmetric, non-negative diagonal
        :func:`hessian` of the layer's calibration inputs.
    bits, group_size, symmetric, scale_dtype, return_codes :
        As in :func:`rtn`.
    damp : float in [0, 1e4], default 0.01
    act_order : bool, default False
    block_size : int from 1 to 2**28, default 128

    Returns
    -------
    numpy.ndarray or QuantizedWeight
    """
    (w, h, bits, g, damp, act_order, symmetric, sdt,
     return_codes) = _check_gptq(weight, hessian, bits, group_size, damp, act_order, symmetric,
                                 scale_dtype, return_codes)
    block_size = check_int(block_size, "block_size", 1, MAX_ELEMENTS)
    n, k = w.shape
    perm = _order(h, act_order)
    _, chol, lam = _damped_hessian(h[np.ix_(perm, perm)], damp)
    # H^{-1} = U^T U: invert through the Cholesky factor of H, then factor the inverse.
    chol_inv = np.linalg.solve(chol, np.eye(k))
    u = np.linalg.cholesky(chol_inv.T @ chol_inv).T
    ww = w.astype(np.float64)[:, perm]
    codes = np.empty((n, k))
    grids = _GroupGrids(n, k, g, perm, bits=bits, symmetric=symmetric, scale_dtype=sdt)
    start = 0
    while start < k:
        end = _block_end(start, k, block_size, grids)
        block = ww[:, start:end].copy()
        err = np.empty_like(block)
        for t in range(end - start):
            p = start + t
            if grids.opens(p):
                pos = grids.positions[grids.group_of[p]]
                grids.fix(p, ww[:, pos] if t == 0 else block[:, pos - start])
            q, w_hat = grids.round(p, block[:, t])
            codes[:, p] = q
            err[:, t] = (block[:, t] - w_hat) / u[p, p]
            block[:, t:] -= np.outer(err[:, t], u[p, p:end])
        ww[:, start:end] = block
        ww[:, end:] -= err @ u[start:end, end:]             # the lazy update of the rest
        start = end
    return grids.result(w, codes, perm, lam, return_codes)


def gptq_reference(weight, hessian, *, bits: int, group_size, damp: float = 0.01,
                   act_order: bool = False, symmetric: bool = False, scale_dtype=np.float16,
                   return_codes: bool = False):
    r"""GPTQ the slow, obvious way: the optimal brain surgeon's update with a fresh inverse.

    At step :math:`p` (columns in the processing order) the columns :math:`F = \{p, \dots,
    K-1\}` are not yet quantized; the inverse of the (dampened) Hessian restricted to them,
    :math:`(H_F)^{-1}`, is computed anew with ``numpy.linalg.inv``, column :math:`p` is rounded
    on its group's grid, and

    .. math:: W_{:,F} \mathrel{-}= \frac{w_p - \hat w_p}{[H_F^{-1}]_{pp}}\,(H_F^{-1})_{p,:}.

    No Cholesky factor, no blocks: :math:`O(K^4)` work, for checking :func:`gptq` (same
    arguments but ``block_size``, same dampening, order and group rule).  See the weight_only
    chapter.
    """
    (w, h, bits, g, damp, act_order, symmetric, sdt,
     return_codes) = _check_gptq(weight, hessian, bits, group_size, damp, act_order, symmetric,
                                 scale_dtype, return_codes)
    n, k = w.shape
    perm = _order(h, act_order)
    damped, _, lam = _damped_hessian(h[np.ix_(perm, perm)], damp)
    ww = w.astype(np.float64)[:, perm]
    codes = np.empty((n, k))
    grids = _GroupGrids(n, k, g, perm, bits=bits, symmetric=symmetric, scale_dtype=sdt)
    for p in range(k):
        h_inv = np.linalg.inv(damped[p:, p:])
        if grids.opens(p):
            grids.fix(p, ww[:, grids.positions[grids.group_of[p]]])
        q, w_hat = grids.round(p, ww[:, p])
        codes[:, p] = q
        ww[:, p:] -= np.outer((ww[:, p] - w_hat) / h_inv[0, 0], h_inv[0, :])
    return grids.result(w, codes, perm, lam, return_codes)


# --------------------------------------------------------------------------- AWQ


class AWQScales(NamedTuple):
    r"""The result of :func:`awq_scales`: the scale :math:`s` (K,), the exponent
    :math:`\alpha` chosen, and the grid of exponents searched with each one's output error
    (mean square of :math:`X W^T - X \hat W^T`)."""

    scales: np.ndarray
    alpha: float
    alphas: np.ndarray
    losses: np.ndarray


def _check_grid(n_grid) -> int:
    return check_int(n_grid, "n_grid", 1, MAX_GRID)


def _output_mse(gram: np.ndarray, d: np.ndarray) -> float:
    r""":math:`\frac{1}{nN}\lVert X D^T \rVert_F^2 = \operatorname{tr}(D G D^T)/N` with
    :math:`G = X^T X / n`."""
    return float(np.sum((d @ gram) * d) / d.shape[0])


def awq_scales(weight, x, *, bits: int, group_size, n_grid: int = 20, symmetric: bool = False,
               scale_dtype=np.float16) -> AWQScales:
    r"""AWQ's per-input-channel scale (Lin et al., 2024), searched on the calibration inputs.

    A weight in a channel whose activations are large matters more: its rounding error is
    multiplied by those activations.  Scaling column :math:`k` of :math:`W` up by :math:`s_k`
    before rounding (and the input down by :math:`s_k`, folded into the operation before the
    layer) shrinks that column's *relative* rounding error, at the price of coarser steps for
    the others where :math:`s_k` stretches a group's range.  With :math:`\bar x_k` the mean of
    :math:`|x_{\cdot k}|` over the calibration tokens,

    .. math::

        s = \bar x^{\alpha}\, / \sqrt{\max \bar x^{\alpha} \cdot \min \bar x^{\alpha}}, \qquad
        \alpha^* = \arg\min_{\alpha \in \{0, \frac1n, \dots, \frac{n-1}{n}\}}
        \big\lVert X W^T - X\, \big(Q(W \operatorname{diag}(s))
        \operatorname{diag}(s)^{-1}\big)^T \big\rVert^2

    with :math:`Q` = :func:`rtn` (``bits``, ``group_size``, ``symmetric``, ``scale_dtype``) and
    :math:`n` = ``n_grid`` (:math:`\bar x^\alpha` is floored at 1e-4, as the authors' code
    does).  :math:`\alpha = 0` is plain round-to-nearest, so the chosen scale is never worse than
    it on the calibration data.  See the weight_only chapter.

    Parameters
    ----------
    weight : float array (N, K)
    x : float array (n, K)
        The layer's calibration inputs, one row per token.
    bits, group_size, symmetric, scale_dtype :
        As in :func:`rtn`.
    n_grid : int from 1 to :data:`MAX_GRID`, default 20

    Returns
    -------
    AWQScales
    """
    w = _float_matrix(weight, "weight", MAX_SQUARABLE).astype(np.float64)
    x = _check_inputs(x, w.shape[1]).astype(np.float64)
    n_grid = _check_grid(n_grid)
    check_int(bits, "bits", MIN_BITS, MAX_BITS)
    _group(group_size, w.shape[1])
    check_bool(symmetric, "symmetric")
    _scale_dtype(scale_dtype)
    mean_abs = np.abs(x).mean(axis=0)
    alphas = np.arange(n_grid) / n_grid
    losses = np.empty(n_grid)
    candidates = []
    with np.errstate(over="ignore", invalid="ignore"):
        gram = x.T @ x / x.shape[0]
        for i, a in enumerate(alphas):
            s = np.maximum(mean_abs**a, 1e-4)
            s = s / math.sqrt(s.max() * s.min())
            ws = _finite(w * s, "weight scaled by AWQ's s")
            w_hat = rtn(ws, bits=bits, group_size=group_size, symmetric=symmetric,
                        scale_dtype=scale_dtype) / s
            losses[i] = _output_mse(gram, w - w_hat)
            candidates.append(s)
    _finite(losses, "AWQ's output error of weight on x")
    best = int(np.argmin(losses))
    return AWQScales(candidates[best], float(alphas[best]), alphas, losses)


def awq_clip(weight, x, *, bits: int, group_size, n_grid: int = 20, max_shrink: float = 0.5,
             symmetric: bool = False, scale_dtype=np.float16) -> np.ndarray:
    r"""AWQ's clipping search: one ratio :math:`c \in (0, 1]` per row and group.

    For :math:`c = 1, 1 - \frac1n, \dots` down to :math:`1 - \text{max\_shrink}` (:math:`n` =
    ``n_grid``), each group's range is shrunk to :math:`[\max(\min w, -c\max|w|),
    \min(\max w, c\max|w|)]` and rounded (:func:`rtn` with ``clip``); each group keeps the
    :math:`c` that minimises the error of its *partial* output,
    :math:`\lVert X_{:,j} (w_j - \hat w_j)^T \rVert^2 = (w_j - \hat w_j)\, G_{jj}
    (w_j - \hat w_j)^T` with :math:`G_{jj}` the group's block of :math:`X^T X`.  Clipping trades
    a larger error on the few largest weights for finer steps on all the others.  Returns the
    ratios, shape (N, G).  See the weight_only chapter.
    """
    w = _float_matrix(weight, "weight", MAX_SQUARABLE).astype(np.float64)
    x = _check_inputs(x, w.shape[1]).astype(np.float64)
    n_grid = _check_grid(n_grid)
    max_shrink = check_real(max_shrink, "max_shrink", 0.0, 1.0, hi_open=True)
    n, k = w.shape
    g = _group(group_size, k)
    n_groups = -(-k // g)
    pad = n_groups * g - k
    xp = np.pad(x, [(0, 0), (0, pad)]).reshape(x.shape[0], n_groups, g)
    blocks = np.einsum("tja,tjb->jab", xp, xp) / x.shape[0]          # G_jj, (groups, g, g)
    best_err = np.full((n, n_groups), np.inf)
    best = np.ones((n, n_groups))
    steps = max(1, int(round(max_shrink * n_grid)))
    for i in range(steps):
        c = 1.0 - i / n_grid
        d = w - rtn(w, bits=bits, group_size=g, symmetric=symmetric, clip=c,
                    scale_dtype=scale_dtype)
        dp = np.ascontiguousarray(
            np.pad(d, [(0, 0), (0, pad)]).reshape(n, n_groups, g).transpose(1, 0, 2))
        with np.errstate(over="ignore", invalid="ignore"):
            err = np.sum(np.matmul(dp, blocks) * dp, axis=-1).T   # d_j G_jj d_j^T, per group
        better = _finite(err, "the clipping error of weight on x") < best_err
        best_err[better], best[better] = err[better], c
    return best


def awq(weight, x, *, bits: int, group_size, n_grid: int = 20, clip: bool = True,
        symmetric: bool = False, scale_dtype=np.float16, return_codes: bool = False):
    r"""AWQ whole: the scale search (:func:`awq_scales`), then the clipping search
    (:func:`awq_clip`) on the scaled weight, then round to nearest.

    .. math:: \hat W = Q_c\big(W \operatorname{diag}(s)\big)\operatorname{diag}(s)^{-1}

    Returns the *effective* weight :math:`\hat W` (what multiplies the unscaled input), or with
    ``return_codes=True`` a :class:`QuantizedWeight` of the scaled weight whose
    ``input_scale`` is :math:`s`.  See the weight_only chapter.
    """
    w, bits, symmetric, sdt, return_codes = _check_common(weight, bits, symmetric, scale_dtype,
                                                          return_codes)
    clip = check_bool(clip, "clip")
    x = _check_inputs(x, w.shape[1])
    s = awq_scales(w, x, bits=bits, group_size=group_size, n_grid=n_grid, symmetric=symmetric,
                   scale_dtype=sdt).scales
    ws = w.astype(np.float64) * s
    ratios = (awq_clip(ws, x.astype(np.float64) / s, bits=bits, group_size=group_size,
                       n_grid=n_grid, symmetric=symmetric, scale_dtype=sdt) if clip else None)
    qw = rtn(ws, bits=bits, group_size=group_size, symmetric=symmetric, clip=ratios,
             scale_dtype=sdt, return_codes=True)
    w_hat = _dequantize(qw.codes, qw.scale, qw.zero_point, qw.group_size, s).astype(w.dtype)
    if not return_codes:
        return w_hat
    return QuantizedWeight(w_hat, qw.codes, qw.scale, qw.zero_point, bits, qw.group_size,
                           input_scale=s)


# --------------------------------------------------------------------------- a whole model

#: The methods :func:`quantize_layer` knows: round to nearest, GPTQ (act-order), AWQ (scale and
#: clip search), and GPTQ on the AWQ-scaled weight.
METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def quantize_layer(weight, x, *, method: str, bits: int, group_size, damp: float = 0.01,
                   act_order: bool = True, n_grid: int = 20) -> QuantizedWeight:
    r"""Quantize one linear layer's weight (N, K) by ``method``, calibrated on its inputs ``x``
    (n, K), and return the :class:`QuantizedWeight` (its ``weight`` is :math:`\hat W`).

    * ``"rtn"``: :func:`rtn` (``x`` is not used);
    * ``"gptq"``: :func:`gptq` with :math:`H` = :func:`hessian` ``(x)``, act-order by default;
    * ``"awq"``: :func:`awq` (scale search, then clip search);
    * ``"awq+gptq"``: AWQ's scale :math:`s` (:func:`awq_scales`), then GPTQ on
      :math:`W \operatorname{diag}(s)` with the Hessian of the scaled inputs :math:`X
      \operatorname{diag}(s)^{-1}`; :math:`\hat W = \mathrm{GPTQ}(W \operatorname{diag}(s))
      \operatorname{diag}(s)^{-1}`.

    Asymmetric grids with float16 scales, as both papers use.  See the weight_only chapter.
    """
    method = check_choice(method, "method", METHODS)
    w = _float_matrix(weight, "weight")
    x = _check_inputs(x, w.shape[1])
    damp = check_real(damp, "damp", 0.0, 1e4)          # checked whether the method uses them
    act_order = check_bool(act_order, "act_order")
    n_grid = _check_grid(n_grid)
    if method == "rtn":
        return rtn(w, bits=bits, group_size=group_size, return_codes=True)
    if method == "gptq":
        return gptq(w, hessian(x), bits=bits, group_size=group_size, damp=damp,
                    act_order=act_order, return_codes=True)
    if method == "awq":
        return awq(w, x, bits=bits, group_size=group_size, n_grid=n_grid, return_codes=True)
    s = awq_scales(w, x, bits=bits, group_size=group_size, n_grid=n_grid).scales
    qw = gptq(w.astype(np.float64) * s, hessian(x.astype(np.float64) / s), bits=bits,
              group_size=group_size, damp=damp, act_order=act_order, return_codes=True)
    w_hat = (qw.weight / s).astype(w.dtype)
    return QuantizedWeight(w_hat, qw.codes, qw.scale, qw.zero_point, qw.bits, qw.group_size,
                           input_scale=s, damp=qw.damp)


def quantize_layers(weights, inputs, *, method: str, bits: int, group_size,
                    **kwargs) -> dict[str, QuantizedWeight]:
    r""":func:`quantize_layer` on every layer of a model, each on its own calibration inputs.

    ``weights`` maps a layer name to its weight (N, K); ``inputs`` maps the same names to what
    that layer saw on the calibration data, one row per token (n, K).  Every layer is quantized
    from the *float* model's inputs (not sequentially from the already quantized layers', as
    the GPTQ paper does for large models): simpler, and what the chapter's table uses for every
    method alike.  Returns ``{name: QuantizedWeight}`` in the order of ``weights``.  See the
    weight_only chapter.
    """
    weights, inputs = _check_layers(weights, inputs)
    return {name: quantize_layer(w, inputs[name], method=method, bits=bits,
                                 group_size=group_size, **kwargs)
            for name, w in weights.items()}


def _check_layers(weights, inputs) -> tuple[dict, dict]:
    """``weights`` {name: (N, K)} and ``inputs`` {name: (n, K)}, every weight with its inputs."""
    check_instance(weights, "weights", Mapping, "a mapping {layer name: weight (N, K)}")
    check_instance(inputs, "inputs", Mapping, "a mapping {layer name: inputs (n, K)}")
    if not weights:
        raise ValueError("weights must name at least one layer, got an empty mapping")
    missing = [name for name in weights if name not in inputs]
    if missing:
        raise ValueError(f"weights names layer(s) {missing} that inputs has no calibration "
                         f"inputs for")
    checked_w = {name: _float_matrix(w, f"weights[{name!r}]") for name, w in weights.items()}
    checked_x = {name: _float_matrix(inputs[name], f"inputs[{name!r}]", MAX_SQUARABLE)
                 for name in weights}
    for name, w in checked_w.items():
        if checked_x[name].shape[1] != w.shape[1]:
            raise ValueError(f"inputs[{name!r}] must have the K={w.shape[1]} columns of "
                             f"weights[{name!r}], got shape {checked_x[name].shape}")
    return checked_w, checked_x


def salient_channel_error(weight, x, *, bits: int, group_size, fraction: float = 0.01,
                          by: str = "activation", seed: int = 0) -> float:
    r"""AWQ's motivating experiment: keep a ``fraction`` of the input channels in float and
    round the rest to nearest; return the mean square output error
    :math:`\frac{1}{nN}\lVert X W^T - X \hat W^T \rVert_F^2`.

    The kept channels are the ones with the largest mean :math:`|x_k|` (``by="activation"``),
    the largest weight norm :math:`\lVert W_{:,k} \rVert` (``"weight"``), or a random choice
    (``"random"``, with ``seed``).  Lin et al. (2024, table 1) find that keeping 1 % of the
    channels chosen by *activation* recovers most of the loss, and that choosing by weight is no
    better than at random.  See the weight_only chapter.
    """
    w = _float_matrix(weight, "weight", MAX_SQUARABLE).astype(np.float64)
    x = _check_inputs(x, w.shape[1]).astype(np.float64)
    by = check_choice(by, "by", ("activation", "weight", "random"))
    fraction = check_real(fraction, "fraction", 0.0, 1.0)
    seed = check_int(seed, "seed", 0)
    k = w.shape[1]
    n_keep = int(round(fraction * k))
    score = {"activation": lambda: np.abs(x).mean(axis=0),
             "weight": lambda: np.linalg.norm(w, axis=0),
             "random": lambda: np.random.default_rng(seed).random(k)}[by]()
    keep = np.argsort(-score, kind="stable")[:n_keep]
    w_hat = rtn(w, bits=bits, group_size=group_size)
    w_hat[:, keep] = w[:, keep]
    with np.errstate(over="ignore", invalid="ignore"):
        return _finite(_output_mse(x.T @ x / x.shape[0], w - w_hat),
                       "the output error of weight on x")


class MethodResult(NamedTuple):
    """One row of :func:`compare_methods`: a method at a width and group size, the model's
    loss with its weights, the storage per weight, each layer's output error
    (:func:`layer_error` on the calibration inputs), the time the quantization took, and the
    quantized layers themselves (``{name: QuantizedWeight}``) when asked for."""

    method: str
    bits: int
    group_size: int | None
    loss: float
    bits_per_weight: float
    layer_errors: dict
    seconds: float
    layers: dict | None = None


def compare_methods(weights, inputs, evaluate, *, methods=METHODS, bits=(4, 3),
                    group_sizes=(32, 64, 128, None), keep_layers: bool = False,
                    **kwargs) -> list[MethodResult]:
    r"""Quantize a model's layers with every method, width and group size, and evaluate each.

    ``weights`` and ``inputs`` are as in :func:`quantize_layers`; ``evaluate`` is a function
    that takes ``{name: weight}`` (the dequantized weights, same names and shapes) and returns
    the model's loss with them (e.g. held-out cross-entropy or bits per byte).  ``group_size``
    None is one group per row (per channel).  Storage per weight is the mean of the layers'
    :attr:`QuantizedWeight.bits_per_weight`, weighted by their sizes.  Returns one
    :class:`MethodResult` per (width, group size, method), in that nesting order, holding the
    quantized layers too if ``keep_layers``.  Other keywords go to :func:`quantize_layer`.  See
    the weight_only chapter.
    """
    weights, inputs = _check_layers(weights, inputs)
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {describe(evaluate)}")
    methods = [check_choice(m, f"methods[{i}]", METHODS)
               for i, m in enumerate(check_sequence(methods, "methods", min_len=1))]
    bits = [check_int(b, f"bits[{i}]", MIN_BITS, MAX_BITS)
            for i, b in enumerate(check_sequence(bits, "bits", min_len=1))]
    group_sizes = check_sequence(group_sizes, "group_sizes", min_len=1)
    for i, g in enumerate(group_sizes):
        if g is not None:
            check_int(g, f"group_sizes[{i}]", 1)
    keep_layers = check_bool(keep_layers, "keep_layers")
    rows = []
    for b in bits:
        for g in group_sizes:
            for method in methods:
                start = time.perf_counter()
                q = quantize_layers(weights, inputs, method=method, bits=b, group_size=g,
                                    **kwargs)
                seconds = time.perf_counter() - start
                sizes = np.array([qw.codes.size for qw in q.values()], dtype=np.float64)
                bpw = float(np.dot(sizes, [qw.bits_per_weight for qw in q.values()])
                            / sizes.sum())
                errors = {name: layer_error(inputs[name], weights[name], qw.weight)
                          for name, qw in q.items()}
                loss = check_real(evaluate({name: qw.weight for name, qw in q.items()}),
                                  "evaluate(weights)'s result")
                rows.append(MethodResult(method, b, g, loss, bpw, errors, seconds,
                                         q if keep_layers else None))
    return rows
