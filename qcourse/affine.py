"""Affine (uniform) quantization: ``r = scale * (q - zero_point)``.

The affine chapter (``book/affine.md``) explains everything in this module: how a real range
``[rmin, rmax]`` becomes a ``scale`` and an integer ``zero_point``, how a tensor is quantized
(round half to even, then clamp to ``[qmin, qmax]``) and dequantized, where the error comes from
(rounding inside the range, clipping outside it), what per-tensor, per-channel and per-group
parameters cost in storage, how int4 and int2 values are packed into bytes, and how a k-means
codebook compares with the uniform grid at the same number of bits.

Two families of functions live here:

* the course's own model of quantization (:class:`QParams`, :func:`choose_qparams`,
  :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`), which computes in float64 and
  validates everything;
* exact reproductions of the ONNX operators :func:`quantize_linear` and
  :func:`dequantize_linear`, which compute in float32 exactly as ONNX Runtime's CPU kernels do
  (the tests compare them with ONNX Runtime bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ErrorBreakdown",
    "QParams",
    "choose_qparams",
    "clip_sweep",
    "codebook_dequantize",
    "codebook_effective_bits",
    "codebook_quantize",
    "dequantize",
    "dequantize_linear",
    "effective_bits",
    "error_breakdown",
    "error_explorer",
    "explorer_qparams",
    "fake_quantize",
    "grid_occupancy",
    "kmeans_codebook",
    "pack_int",
    "plot_quantization",
    "qparams_from_range",
    "qrange",
    "quantize",
    "quantize_linear",
    "sqnr_db",
    "storage_dtype",
    "unpack_int",
]

MIN_BITS = 2
MAX_BITS = 16


# --- small validators ------------------------------------------------------------------------


def _check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_bits(bits) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__} {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {int(bits)}")
    return int(bits)


def _real_array(x, name: str, *, finite: bool = True, nonempty: bool = False) -> np.ndarray:
    """``x`` as a float64 array; reject non-numbers, NaN/Inf (if ``finite``) and empty input."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must hold real numbers (a float or integer array), got dtype {arr.dtype}"
        )
    arr = arr.astype(np.float64, copy=False)
    if nonempty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr.ravel()))
        raise ValueError(
            f"{name} must be finite: {bad.size} NaN/Inf value(s), the first at flat index "
            f"{bad[0]} ({arr.ravel()[bad[0]]})"
        )
    return arr


def _normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a {ndim}-D tensor "
                         f"(expected {-ndim} <= {name} < {ndim})")
    return axis % ndim


# --- integer ranges ----------------------------------------------------------------------------


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    r"""The integer grid ``(qmin, qmax)`` of a ``bits``-bit integer.

    .. math::

        \text{signed: } [-2^{b-1},\ 2^{b-1}-1], \qquad
        \text{unsigned: } [0,\ 2^{b}-1].

    ``narrow_range=True`` drops the lowest code, leaving :math:`2^b - 1` levels:
    signed :math:`[-2^{b-1}+1, 2^{b-1}-1]` (int8: -127..127, symmetric about 0, as TFLite uses
    for weights) and unsigned :math:`[1, 2^b-1]` (uint8: 1..255, as TensorFlow's ``FakeQuant``
    with ``narrow_range``).  See the affine chapter.

    Parameters
    ----------
    bits : int
        2 to 16.
    signed : bool
    narrow_range : bool, default False

    Returns
    -------
    (int, int)
        ``(qmin, qmax)``.
    """
    bits = _check_bits(bits)
    signed = _check_bool(signed, "signed")
    narrow_range = _check_bool(narrow_range, "narrow_range")
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    if narrow_range:
        qmin += 1
    return qmin, qmax


def storage_dtype(qmin: int, qmax: int) -> np.dtype:
    """The smallest NumPy integer dtype that holds every integer in ``[qmin, qmax]``.

    Unsigned types are used when ``qmin >= 0`` (uint8 for ``[0, 255]`` or ``[0, 15]``), signed
    otherwise (int8 for ``[-128, 127]`` or ``[-8, 7]``).  Sub-byte grids (int4, int2) are held
    one value per byte; :func:`pack_int` stores them densely.  See the affine chapter.
    """
    qmin = _check_int(qmin, "qmin")
    qmax = _check_int(qmax, "qmax")
    candidates = (np.uint8, np.uint16, np.uint32, np.uint64) if qmin >= 0 else (
        np.int8, np.int16, np.int32, np.int64)
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dt)
    raise ValueError(f"no NumPy integer dtype holds [{qmin}, {qmax}]")


# --- quantization parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class QParams:
    r"""Parameters of the affine map :math:`r = \text{scale}\,(q - \text{zero\_point})`.

    Three granularities share this one class (see the affine chapter):

    * **per-tensor** (``axis=None``): ``scale`` and ``zero_point`` are 0-d arrays;
    * **per-channel** (``axis`` set, ``group_size=None``): 1-D arrays of length ``C``, one entry
      per index along ``axis`` of the tensor (e.g. ``axis=0`` for the output channels of a
      weight of shape ``(out, in)``);
    * **per-group** (``axis`` and ``group_size`` set): groups of ``group_size`` *consecutive*
      elements *along* ``axis``.  ``scale`` has the tensor's shape with ``shape[axis]`` replaced
      by ``ceil(shape[axis] / group_size)`` -- the layout of ONNX's blocked quantization
      (``block_size``).  For a weight of shape ``(out, in)`` and ``axis=1`` it is
      ``(out, in // group_size)``: one scale per output row and per group of inputs, the
      usual int4 weight-only layout.  The last group may be shorter.

    Attributes
    ----------
    scale : numpy.ndarray, float64
        Step between neighbouring levels; finite and > 0.
    zero_point : numpy.ndarray, int64, same shape as ``scale``
        The integer that represents real 0 exactly; within ``[qmin, qmax]``.  A scalar zero point
        is broadcast to the shape of ``scale``.
    qmin, qmax : int
        The integer grid, ``qmin < qmax`` (see :func:`qrange`).
    axis : int or None
    group_size : int or None

    Raises
    ------
    TypeError, ValueError
        On a scale that is not finite and positive, a non-integer zero point or one outside
        ``[qmin, qmax]``, ``qmin >= qmax``, or shapes that do not match the granularity.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self):
        qmin = _check_int(self.qmin, "qmin", minimum=-(2**31))
        qmax = _check_int(self.qmax, "qmax", maximum=2**32 - 1)
        if qmin >= qmax:
            raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
        axis = self.axis if self.axis is None else _check_int(self.axis, "axis")
        group_size = (self.group_size if self.group_size is None
                      else _check_int(self.group_size, "group_size", minimum=1))

        raw_scale = np.asarray(self.scale)
        if raw_scale.dtype.kind not in "fiu":
            raise TypeError(f"scale must be real numbers, got dtype {raw_scale.dtype}")
        scale = raw_scale.astype(np.float64)
        if scale.size == 0:
            raise ValueError(f"scale must not be empty, got shape {scale.shape}")
        bad = ~(np.isfinite(scale) & (scale > 0))
        if np.any(bad):
            i = int(np.flatnonzero(bad.ravel())[0])
            raise ValueError(
                f"scale must be finite and > 0, got {scale.ravel()[i]} at flat index {i}"
            )

        raw_zp = np.asarray(self.zero_point)
        if raw_zp.dtype.kind not in "iu":
            raise TypeError(
                f"zero_point must be integers, got dtype {raw_zp.dtype}; round it first "
                f"(e.g. np.rint(z).astype(np.int64))"
            )
        zero_point = raw_zp.astype(np.int64)
        if zero_point.ndim == 0 and scale.ndim > 0:
            zero_point = np.full(scale.shape, zero_point, dtype=np.int64)
        if zero_point.shape != scale.shape:
            raise ValueError(
                f"zero_point must have the shape of scale {scale.shape}, got {zero_point.shape}"
            )
        outside = (zero_point < qmin) | (zero_point > qmax)
        if np.any(outside):
            i = int(np.flatnonzero(outside.ravel())[0])
            raise ValueError(
                f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got "
                f"{zero_point.ravel()[i]} at flat index {i}"
            )

        if axis is None:
            if group_size is not None:
                raise ValueError("group_size needs an axis: groups are formed along axis")
            if scale.ndim != 0:
                raise ValueError(
                    f"per-tensor parameters (axis=None) need a 0-d scale, got shape "
                    f"{scale.shape}; pass axis= for per-channel parameters"
                )
        elif group_size is None:
            if scale.ndim != 1:
                raise ValueError(
                    f"per-channel parameters (axis={axis}) need a 1-D scale, got shape "
                    f"{scale.shape}"
                )
        elif scale.ndim == 0:
            raise ValueError("per-group parameters need a scale with at least one dimension")

        scale.flags.writeable = False
        zero_point.flags.writeable = False
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)
        object.__setattr__(self, "qmin", qmin)
        object.__setattr__(self, "qmax", qmax)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "group_size", group_size)

    def __eq__(self, other):
        if not isinstance(other, QParams):
            return NotImplemented
        return (
            self.qmin == other.qmin and self.qmax == other.qmax and self.axis == other.axis
            and self.group_size == other.group_size
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __hash__(self):
        return hash((self.scale.shape, self.scale.tobytes(), self.zero_point.tobytes(),
                     self.qmin, self.qmax, self.axis, self.group_size))

    @property
    def granularity(self) -> str:
        """``"per-tensor"``, ``"per-channel"`` or ``"per-group"``."""
        if self.axis is None:
            return "per-tensor"
        return "per-channel" if self.group_size is None else "per-group"

    @property
    def levels(self) -> int:
        """Number of integer levels, ``qmax - qmin + 1``."""
        return self.qmax - self.qmin + 1

    def representable_range(self) -> tuple[np.ndarray, np.ndarray]:
        r"""The real interval the grid spans: :math:`[s(q_{\min} - z),\ s(q_{\max} - z)]`.

        Returns two float64 arrays of the shape of ``scale``.
        """
        return (self.scale * (self.qmin - self.zero_point),
                self.scale * (self.qmax - self.zero_point))


def _broadcast_params(qparams: QParams, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` and ``zero_point`` expanded to broadcast against a tensor of ``shape``."""
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    scale, zp = qparams.scale, qparams.zero_point
    if qparams.axis is None:
        return scale, zp
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"{qparams.granularity} parameters need a tensor with at least one axis")
    ax = _normalize_axis(qparams.axis, ndim)
    if qparams.group_size is None:
        if shape[ax] != scale.size:
            raise ValueError(
                f"per-channel parameters hold {scale.size} channels but the tensor has "
                f"{shape[ax]} along axis {qparams.axis} (shape {shape})"
            )
        dims = [1] * ndim
        dims[ax] = scale.size
        return scale.reshape(dims), zp.reshape(dims)
    g = qparams.group_size
    expected = list(shape)
    expected[ax] = -(-shape[ax] // g)
    if scale.shape != tuple(expected):
        raise ValueError(
            f"per-group parameters for a tensor of shape {shape} with group_size={g} along "
            f"axis {qparams.axis} need shape {tuple(expected)}, got {scale.shape}"
        )
    scale = np.repeat(scale, g, axis=ax).take(np.arange(shape[ax]), axis=ax)
    zp = np.repeat(zp, g, axis=ax).take(np.arange(shape[ax]), axis=ax)
    return scale, zp


def qparams_from_range(rmin, rmax, *, bits=8, signed=True, symmetric=False, narrow_range=False,
                       axis=None, group_size=None) -> QParams:
    r"""Scale and zero point that map the real range ``[rmin, rmax]`` onto a ``bits``-bit grid.

    The range is first widened to contain 0, :math:`r_{\min} \leftarrow \min(r_{\min}, 0)`,
    :math:`r_{\max} \leftarrow \max(r_{\max}, 0)`, so that real 0 (padding, ReLU zeros) is
    represented exactly by the integer ``zero_point``.  Then

    * **asymmetric** (``symmetric=False``):

      .. math::

          s = \frac{r_{\max} - r_{\min}}{q_{\max} - q_{\min}}, \qquad
          z = \operatorname{clamp}\!\big(\operatorname{round}(q_{\min} - r_{\min}/s),
              q_{\min}, q_{\max}\big);

    * **symmetric** (``symmetric=True``):

      .. math::

          s = \frac{\max(|r_{\min}|, |r_{\max}|)}{2^{b-1} - 1}, \qquad
          z = \begin{cases} 0 & \text{signed} \\ 2^{b-1} & \text{unsigned} \end{cases}

      (int8: ``s = max|r| / 127``).  *Symmetric unsigned* means the signed grid shifted by
      :math:`2^{b-1}`: uint8 with ``z = 128`` covers ``[-128 s, 127 s]`` and its codes are the
      int8 codes plus 128 (the "+128" trick of u8 x s8 kernels).

    ``round`` is round half to even.  **Degenerate range**: when ``rmin == rmax == 0`` (an
    all-zero tensor) there is nothing to scale; the result is ``scale = 1.0`` with the zero point
    the formulas give for a range starting at 0 (asymmetric: ``qmin``; symmetric: ``0`` or
    :math:`2^{b-1}`), so every value quantizes to ``zero_point`` and dequantizes to exactly 0.
    No division by zero, no NaN.  See the affine chapter.

    Parameters
    ----------
    rmin, rmax : float or array_like
        Scalars for per-tensor parameters; 1-D arrays (one entry per channel along ``axis``) for
        per-channel ones; for per-group ones (``group_size`` set), arrays already in the group
        layout described in :class:`QParams`.  Finite, with ``rmin <= rmax``.
    bits : int, default 8
        2 to 16.
    signed : bool, default True
    symmetric : bool, default False
    narrow_range : bool, default False
        Use :func:`qrange`'s narrow grid (int8: -127..127).
    axis : int or None
    group_size : int or None

    Returns
    -------
    QParams
    """
    qmin, qmax = qrange(bits, signed, narrow_range)
    symmetric = _check_bool(symmetric, "symmetric")
    lo = _real_array(rmin, "rmin")
    hi = _real_array(rmax, "rmax")
    if lo.shape != hi.shape:
        raise ValueError(f"rmin and rmax must have the same shape, got {lo.shape} and {hi.shape}")
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis: groups are formed along axis")
        if lo.ndim != 0:
            raise ValueError(
                f"per-tensor ranges (axis=None) must be scalars, got shape {lo.shape}; pass "
                f"axis= for per-channel ranges"
            )
    else:
        _check_int(axis, "axis")
        if group_size is None and lo.ndim != 1:
            raise ValueError(f"per-channel ranges (axis={axis}) must be 1-D, got shape {lo.shape}")
        if lo.size == 0:
            raise ValueError("rmin and rmax must not be empty")
    if np.any(lo > hi):
        i = int(np.flatnonzero((lo > hi).ravel())[0])
        raise ValueError(
            f"rmin must be <= rmax, got rmin={lo.ravel()[i]} > rmax={hi.ravel()[i]} "
            f"at flat index {i}"
        )
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    degenerate = hi == lo  # both zero after widening
    if symmetric:
        half = 2 ** (bits - 1) - 1
        amax = np.maximum(-lo, hi)
        scale = np.where(degenerate, 1.0, amax / half)
        zp = np.full(lo.shape, 0 if signed else 2 ** (bits - 1), dtype=np.int64)
    else:
        with np.errstate(over="ignore"):
            span = hi - lo
        if not np.all(np.isfinite(span)):
            raise ValueError("rmax - rmin overflows float64; the range is too wide to quantize")
        scale = np.where(degenerate, 1.0, span / (qmax - qmin))
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)
    if np.any(scale <= 0):
        raise ValueError("the range is too narrow: its scale underflows to 0 in float64")
    return QParams(scale=scale, zero_point=zp, qmin=qmin, qmax=qmax, axis=axis,
                   group_size=group_size)


def _group_minmax(x: np.ndarray, ax: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of groups of ``group_size`` consecutive elements along ``ax``."""
    moved = np.moveaxis(x, ax, -1)
    n = moved.shape[-1]
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    if pad:
        # Repeating the last element does not change any group's min or max.
        moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)], mode="edge")
    grouped = moved.reshape(*moved.shape[:-1], n_groups, group_size)
    return (np.moveaxis(grouped.min(axis=-1), -1, ax), np.moveaxis(grouped.max(axis=-1), -1, ax))


def choose_qparams(x, *, bits=8, signed=True, symmetric=False, narrow_range=False, axis=None,
                   group_size=None) -> QParams:
    r"""Min-max quantization parameters for the tensor ``x`` (no clipping of its range).

    Takes :math:`r_{\min} = \min x` and :math:`r_{\max} = \max x` over the whole tensor
    (``axis=None``), over every axis but ``axis`` (per-channel), or over each group of
    ``group_size`` consecutive elements along ``axis`` (per-group), then applies
    :func:`qparams_from_range`.  With ``symmetric=True`` this is *abs-max* quantization.
    Ranges that clip outliers (percentile, MSE, KL) belong to the calibration chapter; this
    function is the no-clipping baseline.  See the affine chapter.

    Parameters
    ----------
    x : array_like
        Finite real values, not empty.
    bits, signed, symmetric, narrow_range :
        As in :func:`qparams_from_range`.
    axis : int or None
        Channel axis (per-channel) or grouping axis (per-group); negative values count from the
        end.
    group_size : int or None
        Per-group: the number of consecutive elements along ``axis`` sharing one scale.

    Returns
    -------
    QParams
    """
    x = _real_array(x, "x", nonempty=True)
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis: groups are formed along axis")
        rmin, rmax = x.min(), x.max()
    else:
        _check_int(axis, "axis")
        if x.ndim == 0:
            raise ValueError("per-channel or per-group parameters need x with at least one axis")
        ax = _normalize_axis(axis, x.ndim)
        if group_size is None:
            others = tuple(i for i in range(x.ndim) if i != ax)
            rmin, rmax = x.min(axis=others), x.max(axis=others)
        else:
            group_size = _check_int(group_size, "group_size", minimum=1)
            rmin, rmax = _group_minmax(x, ax, group_size)
    return qparams_from_range(rmin, rmax, bits=bits, signed=signed, symmetric=symmetric,
                              narrow_range=narrow_range, axis=axis, group_size=group_size)


# --- quantize / dequantize ---------------------------------------------------------------------


def quantize(x, qparams: QParams) -> np.ndarray:
    r"""Map real values to integers: :math:`q = \operatorname{clamp}(\operatorname{round}(x/s) + z,
    q_{\min}, q_{\max})`.

    ``round`` is round half to even (``np.rint``: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2), the IEEE
    default and what ONNX's QuantizeLinear and PyTorch use; it has no bias on ties.
    The division is done in float64 (``x`` is converted to float64 exactly; ``scale`` is
    float64).  Values outside the representable range saturate at ``qmin``/``qmax`` -- never a
    wrap-around.  See the affine chapter.

    Parameters
    ----------
    x : array_like
        Finite real values (NaN or Inf raise ``ValueError``).
    qparams : QParams
        Per-tensor, per-channel or per-group parameters matching ``x``'s shape.

    Returns
    -------
    numpy.ndarray
        Same shape as ``x``; dtype :func:`storage_dtype` ``(qmin, qmax)`` (int8 for int8 and
        int4 grids, uint8 for uint8 and uint4, int16/uint16 for up to 16 bits).
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    x = _real_array(x, "x")
    scale, zp = _broadcast_params(qparams, x.shape)
    with np.errstate(over="ignore"):
        t = np.rint(x / scale)
    q = np.clip(t, qparams.qmin - zp, qparams.qmax - zp) + zp
    return q.astype(storage_dtype(qparams.qmin, qparams.qmax))


def _dequantize64(q, qparams: QParams) -> np.ndarray:
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    arr = np.asarray(q)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"q must be an integer array, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    outside = (arr < qparams.qmin) | (arr > qparams.qmax)
    if np.any(outside):
        i = int(np.flatnonzero(outside.ravel())[0])
        raise ValueError(
            f"q must lie in [qmin, qmax] = [{qparams.qmin}, {qparams.qmax}], got "
            f"{arr.ravel()[i]} at flat index {i}"
        )
    scale, zp = _broadcast_params(qparams, arr.shape)
    return scale * (arr - zp)


def dequantize(q, qparams: QParams) -> np.ndarray:
    r"""Map integers back to reals: :math:`r = s\,(q - z)`.

    The integer difference :math:`q - z` is exact; the product with the float64 ``scale`` is
    computed in float64 and the result rounded once to **float32**, the dtype real tensors have
    in inference.  See the affine chapter.

    Parameters
    ----------
    q : array_like of int
        Values in ``[qmin, qmax]`` (others raise ``ValueError``).
    qparams : QParams

    Returns
    -------
    numpy.ndarray, float32, shape of ``q``
    """
    return _dequantize64(q, qparams).astype(np.float32)


def fake_quantize(x, qparams: QParams) -> np.ndarray:
    r"""Quantize then dequantize: :math:`\hat x = s\,(\operatorname{clamp}(\operatorname{round}(x/s)
    + z, q_{\min}, q_{\max}) - z)`.

    The values stay real but are restricted to the :math:`q_{\max} - q_{\min} + 1` levels of
    the grid -- the "Q/DQ pair" that simulates quantization in a float model.  The result has the
    float dtype of ``x`` (float64 for integer input); it is computed in float64 and rounded once
    to that dtype.  See the affine chapter.
    """
    arr = np.asarray(x)
    out_dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
    q = quantize(arr, qparams)
    return _dequantize64(q, qparams).astype(out_dtype)


# --- the ONNX operators ------------------------------------------------------------------------

# ONNX TensorProto element types of the integer outputs we reproduce, with their ranges and the
# NumPy dtype that holds them (sub-byte types are held one value per byte).
_ONNX_INT_TYPES = {
    # name: (TensorProto id, qmin, qmax, numpy container)
    "uint8": (2, 0, 255, np.uint8),
    "int8": (3, -128, 127, np.int8),
    "uint16": (4, 0, 65535, np.uint16),
    "int16": (5, -32768, 32767, np.int16),
    "uint4": (21, 0, 15, np.uint8),
    "int4": (22, -8, 7, np.int8),
    "uint2": (25, 0, 3, np.uint8),
    "int2": (26, -2, 1, np.int8),
}
_ONNX_BY_ID = {v[0]: k for k, v in _ONNX_INT_TYPES.items()}


def _onnx_type_name(output_dtype) -> str | None:
    """Normalize ``output_dtype`` (None/0, an ONNX TensorProto id, a name or a NumPy dtype)."""
    if output_dtype is None:
        return None
    if isinstance(output_dtype, (int, np.integer)) and not isinstance(output_dtype, bool):
        if int(output_dtype) == 0:
            return None
        if int(output_dtype) not in _ONNX_BY_ID:
            raise ValueError(
                f"output_dtype={int(output_dtype)} is not a supported ONNX integer type; "
                f"supported: {sorted(_ONNX_BY_ID)} ({', '.join(_ONNX_INT_TYPES)})"
            )
        return _ONNX_BY_ID[int(output_dtype)]
    if isinstance(output_dtype, str) and output_dtype in _ONNX_INT_TYPES:
        return output_dtype
    try:
        name = np.dtype(output_dtype).name
    except TypeError:
        name = None
    if name in ("uint8", "int8", "uint16", "int16"):
        return name
    raise ValueError(
        f"output_dtype must be one of {', '.join(_ONNX_INT_TYPES)} (or the ONNX TensorProto "
        f"id), got {output_dtype!r}"
    )


def _onnx_scale(scale, name: str) -> np.ndarray:
    if isinstance(scale, (float, int)) or not hasattr(scale, "dtype"):
        raise TypeError(
            f"{name} must be a float32 NumPy array or np.float32 scalar (the operator's tensor "
            f"type), got {type(scale).__name__}; use np.float32(...)"
        )
    arr = np.asarray(scale)
    if arr.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    bad = ~(np.isfinite(arr) & (arr > 0))
    if np.any(bad):
        i = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(
            f"{name} must be finite and > 0, got {arr.ravel()[i]} at flat index {i} "
            f"(the operator leaves other scales undefined)"
        )
    return arr


def _onnx_layout(x_shape, scale: np.ndarray, axis, block_size, name: str):
    """Return a function that expands a scale-shaped array to broadcast against ``x``."""
    axis = _check_int(axis, "axis")
    block_size = _check_int(block_size, "block_size", minimum=0)
    ndim = len(x_shape)
    if block_size == 0:
        if scale.ndim == 0 or (scale.ndim == 1 and scale.size == 1):
            return lambda a: a.reshape(())
        if scale.ndim != 1:
            raise ValueError(
                f"{name} must be a scalar (per-tensor) or 1-D (per-axis) when block_size=0, "
                f"got shape {scale.shape}"
            )
        if ndim == 0:
            raise ValueError(f"a 1-D {name} (per-axis) needs x with at least one axis")
        ax = _normalize_axis(axis, ndim)
        if scale.size != x_shape[ax]:
            raise ValueError(
                f"per-axis {name} has {scale.size} entries but x has {x_shape[ax]} along "
                f"axis {axis} (x shape {tuple(x_shape)})"
            )
        dims = [1] * ndim
        dims[ax] = scale.size
        return lambda a: a.reshape(dims)
    if scale.ndim != ndim or ndim == 0:
        raise ValueError(
            f"blocked quantization (block_size={block_size}) needs {name} with the rank of x "
            f"({ndim}), got shape {scale.shape}"
        )
    ax = _normalize_axis(axis, ndim)
    expected = list(x_shape)
    expected[ax] = -(-x_shape[ax] // block_size)
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(
            f"blocked {name} for x of shape {tuple(x_shape)}, axis={axis}, "
            f"block_size={block_size} must have shape {tuple(expected)}, got {scale.shape}"
        )
    idx = np.arange(x_shape[ax])
    return lambda a: np.repeat(a, block_size, axis=ax).take(idx, axis=ax)


def quantize_linear(x, y_scale, y_zero_point=None, *, axis=1, saturate=True, block_size=0,
                    output_dtype=None) -> np.ndarray:
    r"""The ONNX ``QuantizeLinear`` operator (opset 21+, integer outputs), bit for bit.

    .. math:: y = \operatorname{saturate}\big(\operatorname{round}(x \oslash s) + z\big)

    exactly as ONNX Runtime's CPU kernel computes it:

    * :math:`x \oslash s` is an IEEE **float32 division** (not a multiplication by a
      precomputed reciprocal ``1/s``, which rounds differently on some ties -- the tests show
      ONNX Runtime divides);
    * ``round`` is round half to even; the result saturates to the output type's range;
    * the output type is the zero point's dtype; without a zero point it is ``output_dtype``,
      and uint8 when that is absent too (``z = 0``);
    * ``y_scale`` and ``y_zero_point`` are scalars (per-tensor), 1-D along ``axis``
      (per-axis; negative ``axis`` counts from the end), or, with ``block_size > 0``, blocked:
      x's shape with ``shape[axis]`` replaced by ``ceil(shape[axis] / block_size)``;
    * NaN, which the specification leaves undefined, gives ``qmin``, as ONNX Runtime's CPU
      kernel and the ONNX reference implementation both do; +-Inf saturate.

    Sub-byte outputs (``output_dtype`` ``"int4"``, ``"uint4"``, ``"int2"``, ``"uint2"`` or their
    TensorProto ids) are returned one value per int8/uint8 element (NumPy has no 4-bit dtype);
    a zero point for them is an int8/uint8 array with values in range.  Store them densely with
    :func:`pack_int`.  ``saturate`` only concerns float8 outputs in ONNX; integer outputs always
    saturate, so it is accepted and ignored.  See the affine chapter.

    Parameters
    ----------
    x : numpy.ndarray, float32
    y_scale : numpy.ndarray or np.float32, float32, finite and > 0
    y_zero_point : numpy.ndarray or NumPy integer scalar, optional
        uint8, int8, uint16 or int16 (its dtype is the output dtype), same shape as ``y_scale``.
    axis : int, default 1
    saturate : bool, default True
    block_size : int, default 0
    output_dtype : None, str, NumPy dtype or ONNX TensorProto id

    Returns
    -------
    numpy.ndarray
        Shape of ``x``; uint8/int8/uint16/int16 (or the byte container of a sub-byte type).
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a float32 numpy.ndarray (the operator's input), got {got}")
    _check_bool(saturate, "saturate")
    scale = _onnx_scale(y_scale, "y_scale")
    name = _onnx_type_name(output_dtype)
    if y_zero_point is not None:
        zp = np.asarray(y_zero_point)
        if name in ("uint4", "int4", "uint2", "int2"):
            container = _ONNX_INT_TYPES[name][3]
            if zp.dtype != container:
                raise TypeError(
                    f"for output_dtype={name!r} y_zero_point must be {np.dtype(container)} "
                    f"holding {name} values, got {zp.dtype}"
                )
        else:
            if zp.dtype.name not in ("uint8", "int8", "uint16", "int16"):
                raise TypeError(
                    f"y_zero_point must be uint8, int8, uint16 or int16 (its dtype decides the "
                    f"output type), got {zp.dtype}"
                )
            if name is not None and name != zp.dtype.name:
                raise ValueError(
                    f"output_dtype={name!r} does not match the zero point's dtype {zp.dtype}"
                )
            name = zp.dtype.name
        if zp.shape != scale.shape and not (zp.size == 1 and scale.size == 1):
            raise ValueError(
                f"y_zero_point must have the shape of y_scale {scale.shape}, got {zp.shape}"
            )
    else:
        zp = None
        name = name or "uint8"
    _, qmin, qmax, container = _ONNX_INT_TYPES[name]
    expand = _onnx_layout(x.shape, scale, axis, block_size, "y_scale")
    z = np.int64(0) if zp is None else expand(zp.astype(np.int64))
    if zp is not None and (np.any(zp < qmin) or np.any(zp > qmax)):
        raise ValueError(f"y_zero_point values must lie in the {name} range [{qmin}, {qmax}]")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        t = np.rint(np.divide(x, expand(scale), dtype=np.float32))  # float32, as the kernel
    y = np.clip(t.astype(np.float64) + z, qmin, qmax)
    y = np.where(np.isnan(y), qmin, y)
    return y.astype(container)


def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0) -> np.ndarray:
    r"""The ONNX ``DequantizeLinear`` operator (opset 21+), bit for bit.

    .. math:: y = \operatorname{float32}(x - z) \otimes s

    The integer difference is exact (for 8- and 16-bit inputs it is exactly representable in
    float32); the product with the float32 scale is one IEEE float32 multiplication, as in ONNX
    Runtime.  Layouts (per-tensor, per-axis, blocked) and ``axis`` as in
    :func:`quantize_linear`.  ``x`` may be uint8, int8, uint16, int16 or int32; the zero point,
    if given, must have ``x``'s dtype (as the specification requires), and for int32 it must be
    0.  Sub-byte values held in int8/uint8 dequantize with the same formula.  See the affine
    chapter.

    Returns
    -------
    numpy.ndarray, float32, shape of ``x``
    """
    allowed = ("uint8", "int8", "uint16", "int16", "int32")
    if not isinstance(x, np.ndarray) or x.dtype.name not in allowed:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a numpy.ndarray of dtype {', '.join(allowed)}, got {got}")
    scale = _onnx_scale(x_scale, "x_scale")
    expand = _onnx_layout(x.shape, scale, axis, block_size, "x_scale")
    if x_zero_point is None:
        z = np.int64(0)
    else:
        zp = np.asarray(x_zero_point)
        if zp.dtype != x.dtype:
            raise TypeError(f"x_zero_point must have x's dtype {x.dtype}, got {zp.dtype}")
        if zp.shape != scale.shape and not (zp.size == 1 and scale.size == 1):
            raise ValueError(
                f"x_zero_point must have the shape of x_scale {scale.shape}, got {zp.shape}"
            )
        if x.dtype == np.int32 and np.any(zp != 0):
            raise ValueError("an int32 x_zero_point must be 0 (int32 dequantizes without offset)")
        z = expand(zp.astype(np.int64))
    diff = (x.astype(np.int64) - z).astype(np.float32)
    return np.multiply(diff, expand(scale), dtype=np.float32)


# --- packing sub-byte integers -----------------------------------------------------------------


def _check_pack_bits(bits) -> int:
    bits = _check_int(bits, "bits")
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4 (values packed per byte: 4 or 2), got {bits}")
    return bits


def pack_int(q, bits: int, *, signed: bool | None = None) -> np.ndarray:
    r"""Pack ``bits``-bit integers (``bits`` = 4 or 2) densely into bytes, low bits first.

    The values are taken in C order (``q.ravel()``); value :math:`i` occupies bits
    :math:`b\,(i \bmod k)` to :math:`b\,(i \bmod k) + b - 1` of byte :math:`\lfloor i/k \rfloor`,
    :math:`k = 8/b`.  For int4 that is ONNX's layout: the first value in the **low nibble**, the
    second in the high nibble; int2 puts the first value in bits 0-1.  Each value is stored as
    its low ``bits`` bits in two's complement (int4 -1 -> ``0b1111``); unused bits of the last
    byte are 0.  See the affine chapter.

    Parameters
    ----------
    q : array_like of int
        Values in the signed range :math:`[-2^{b-1}, 2^{b-1}-1]` (``signed=True``), the unsigned
        range :math:`[0, 2^b - 1]` (``signed=False``), or either (``signed=None``).  Anything
        else raises ``ValueError`` -- nothing is silently truncated.
    bits : int
        4 or 2.
    signed : bool or None

    Returns
    -------
    numpy.ndarray, uint8, shape ``(ceil(q.size * bits / 8),)``
    """
    bits = _check_pack_bits(bits)
    arr = np.asarray(q)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"q must be an integer array, got dtype {arr.dtype}")
    if signed is None:
        lo, hi = -(2 ** (bits - 1)), 2**bits - 1
    else:
        lo, hi = qrange(bits, _check_bool(signed, "signed"))
    flat = arr.ravel().astype(np.int64)
    outside = (flat < lo) | (flat > hi)
    if np.any(outside):
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"q values must lie in [{lo}, {hi}] to be packed in {bits} bits, got {flat[i]} at "
            f"flat index {i}"
        )
    per_byte = 8 // bits
    n_bytes = -(-flat.size // per_byte)
    codes = np.zeros(n_bytes * per_byte, dtype=np.uint8)
    codes[: flat.size] = (flat & (2**bits - 1)).astype(np.uint8)
    codes = codes.reshape(n_bytes, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint8)


def unpack_int(packed, bits: int, count: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_int`: the first ``count`` ``bits``-bit values in ``packed``.

    Reads the low bits of each byte first (the layout of :func:`pack_int` and ONNX's int4).
    ``signed=True`` sign-extends (``0b1111`` -> -1 for int4); ``signed=False`` does not
    (``0b1111`` -> 15).  See the affine chapter.

    Parameters
    ----------
    packed : numpy.ndarray, uint8, 1-D
        Exactly ``ceil(count * bits / 8)`` bytes.
    bits : int
        4 or 2.
    count : int
        Number of values to read.
    signed : bool

    Returns
    -------
    numpy.ndarray, shape ``(count,)``, int8 (signed) or uint8 (unsigned)
    """
    bits = _check_pack_bits(bits)
    signed = _check_bool(signed, "signed")
    count = _check_int(count, "count", minimum=0)
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        got = packed.dtype if isinstance(packed, np.ndarray) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 numpy.ndarray, got {got}")
    if packed.ndim != 1:
        raise ValueError(f"packed must be 1-D, got shape {packed.shape}")
    per_byte = 8 // bits
    need = -(-count // per_byte)
    if packed.size != need:
        raise ValueError(
            f"{count} values of {bits} bits take {need} bytes, but packed has {packed.size}"
        )
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    codes = ((packed[:, None] >> shifts) & np.uint8(2**bits - 1)).ravel()[:count]
    if not signed:
        return codes.astype(np.uint8)
    values = codes.astype(np.int16)
    values -= (values >= 2 ** (bits - 1)).astype(np.int16) * 2**bits
    return values.astype(np.int8)


# --- measuring the error -----------------------------------------------------------------------


def sqnr_db(x, x_hat) -> float:
    r"""Signal-to-quantization-noise ratio in decibels.

    .. math:: \text{SQNR} = 10 \log_{10}
              \frac{\sum_i x_i^2}{\sum_i (x_i - \hat x_i)^2}

    Each extra bit of a uniform grid halves the step and adds about :math:`20\log_{10}2
    \approx 6.02` dB.  Returns ``inf`` when ``x_hat == x`` exactly; an all-zero ``x`` has no
    signal and raises ``ValueError``.  See the affine chapter.
    """
    x = _real_array(x, "x", nonempty=True)
    x_hat = _real_array(x_hat, "x_hat", nonempty=True)
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
    clipping error is not bounded at all.  Computed in float64.  See the affine chapter.
    """
    x = _real_array(x, "x", nonempty=True)
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
    """
    x = _real_array(x, "x", nonempty=True)
    ratios = _real_array(clip_ratios, "clip_ratios", nonempty=True)
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
    x = _real_array(x, "x", nonempty=True)
    q = quantize(x, qparams).astype(np.int64)
    if qparams.group_size is not None:
        raise ValueError("grid_occupancy supports per-tensor and per-channel parameters")
    if qparams.axis is None:
        return float(q.max() - q.min() + 1) / qparams.levels
    ax = _normalize_axis(qparams.axis, q.ndim)
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
    bits = _check_int(bits, "bits", minimum=1)
    shape = tuple(_check_int(s, "shape entries", minimum=1) for s in shape)
    scale_bits = _check_int(scale_bits, "scale_bits", minimum=0)
    zero_point_bits = _check_int(zero_point_bits, "zero_point_bits", minimum=0)
    n = math.prod(shape)
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis: groups are formed along axis")
        n_params = 1
    else:
        ax = _normalize_axis(_check_int(axis, "axis"), len(shape))
        if group_size is None:
            n_params = shape[ax]
        else:
            group_size = _check_int(group_size, "group_size", minimum=1)
            n_params = n // shape[ax] * -(-shape[ax] // group_size)
    return bits + n_params * (scale_bits + zero_point_bits) / n


# --- non-uniform quantization: a codebook ------------------------------------------------------


def _check_codebook(codebook) -> np.ndarray:
    cb = _real_array(codebook, "codebook", nonempty=True)
    if cb.ndim != 1:
        raise ValueError(f"codebook must be 1-D, got shape {cb.shape}")
    if np.any(np.diff(cb) < 0):
        raise ValueError("codebook must be sorted in increasing order")
    return cb


def codebook_quantize(x, codebook) -> np.ndarray:
    r"""Index of the nearest codebook entry for every value: :math:`q_i = \arg\min_k |x_i - c_k|`.

    The codebook (the lookup table) must be sorted; a value exactly halfway between two entries
    takes the lower index.  Indices are uint8 for up to 256 entries, uint16 beyond.  See the
    affine chapter.
    """
    cb = _check_codebook(codebook)
    x = _real_array(x, "x")
    mids = (cb[:-1] + cb[1:]) / 2
    idx = np.searchsorted(mids, x, side="left")
    return idx.astype(np.uint8 if cb.size <= 256 else np.uint16)


def codebook_dequantize(indices, codebook) -> np.ndarray:
    """Look the indices up in the table: ``codebook[indices]`` (dtype of the codebook).

    See the affine chapter.
    """
    cb = np.asarray(codebook)
    _check_codebook(cb)
    idx = np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= cb.size):
        raise ValueError(f"indices must lie in [0, {cb.size - 1}] for a codebook of {cb.size}")
    return cb[idx]


def kmeans_codebook(x, bits: int, *, seed: int, max_iter: int = 300) -> np.ndarray:
    r"""A :math:`2^b`-entry codebook fitted to ``x`` by k-means (Lloyd's algorithm).

    Minimizes :math:`\sum_i \min_k (x_i - c_k)^2`: starting from k-means++ seeding drawn with
    ``np.random.default_rng(seed)``, it alternates assigning each value to its nearest entry and
    moving each entry to the mean of its values, until the assignment stops changing (or
    ``max_iter``).  An entry left with no values keeps its place.  If ``x`` has fewer distinct
    values than :math:`2^b` entries, the codebook is those values, padded with the largest.
    Entries are returned sorted (float64).  Unlike a uniform grid, the entries crowd where the
    values are dense.  See the affine chapter.
    """
    bits = _check_int(bits, "bits", minimum=1, maximum=MAX_BITS)
    seed = _check_int(seed, "seed", minimum=0)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    x = _real_array(x, "x", nonempty=True).ravel()
    k = 2**bits
    uniq = np.unique(x)
    if uniq.size <= k:
        return np.concatenate([uniq, np.full(k - uniq.size, uniq[-1])])
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(x.size)]]
    d2 = (x - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        nxt = x[rng.integers(x.size)] if total == 0 else x[rng.choice(x.size, p=d2 / total)]
        centers.append(nxt)
        d2 = np.minimum(d2, (x - nxt) ** 2)
    cb = np.sort(np.array(centers))
    assign = None
    for _ in range(max_iter):
        new_assign = codebook_quantize(x, cb).astype(np.int64)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        counts = np.bincount(assign, minlength=k)
        sums = np.bincount(assign, weights=x, minlength=k)
        filled = counts > 0
        cb = cb.copy()
        cb[filled] = sums[filled] / counts[filled]
        cb = np.sort(cb)
    return cb


def codebook_effective_bits(bits, n_values, *, entry_bits=32, n_codebooks=1) -> float:
    r"""Storage per value of codebook quantization: :math:`b + n_{cb} 2^b b_e / N`.

    ``bits``-bit indices plus ``n_codebooks`` tables of :math:`2^b` entries of ``entry_bits``
    bits each (32: the float32 lookup table), spread over ``n_values`` values.  See the affine
    chapter.
    """
    bits = _check_int(bits, "bits", minimum=1, maximum=MAX_BITS)
    n_values = _check_int(n_values, "n_values", minimum=1)
    entry_bits = _check_int(entry_bits, "entry_bits", minimum=0)
    n_codebooks = _check_int(n_codebooks, "n_codebooks", minimum=1)
    return bits + n_codebooks * 2**bits * entry_bits / n_values


# --- pictures and the interactive explorer -----------------------------------------------------


def explorer_qparams(x, *, bits: int, clip: float, zero_point: int) -> QParams:
    r"""Unsigned ``bits``-bit parameters for the explorer: a grid of width ``clip`` x the range.

    :math:`s = c\,(\max(x, 0) - \min(x, 0)) / (2^b - 1)` with the given ``zero_point``, so the
    grid covers :math:`[-s z,\ s (2^b - 1 - z)]`: ``clip`` sets its width, ``zero_point``
    slides it along the real line.  See the affine chapter.
    """
    x = _real_array(x, "x", nonempty=True)
    clip = float(clip)
    if not 0 < clip <= 1:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    qmin, qmax = qrange(bits, signed=False)
    span = max(float(x.max()), 0.0) - min(float(x.min()), 0.0)
    scale = clip * span / (qmax - qmin) if span > 0 else 1.0
    return QParams(scale=scale, zero_point=_check_int(zero_point, "zero_point"), qmin=qmin,
                   qmax=qmax)


def plot_quantization(x, qparams: QParams, axes=None):
    """Two panels: the values with the representable range, and the error split by source.

    Left: a histogram of ``x`` with the grid's range shaded (and its levels drawn when there
    are at most 64).  Right: histograms of the rounding error and of the clipping error (see
    :func:`error_breakdown`), titled with the SQNR.  Returns the two matplotlib axes.  Per-tensor
    parameters only.  See the affine chapter.
    """
    import matplotlib.pyplot as plt

    if not isinstance(qparams, QParams) or qparams.axis is not None:
        raise ValueError("plot_quantization draws per-tensor QParams")
    x = _real_array(x, "x", nonempty=True).ravel()
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    ax_data, ax_err = axes
    lo, hi = (float(v) for v in qparams.representable_range())
    eb = error_breakdown(x, qparams)
    x_hat = fake_quantize(x, qparams)
    inside = np.clip(x, lo, hi)
    ax_data.hist(x, bins=80, color="0.55")
    ax_data.axvspan(lo, hi, color="tab:green", alpha=0.15, label="representable range")
    if qparams.levels <= 64:
        for level in qparams.scale * (np.arange(qparams.qmin, qparams.qmax + 1)
                                      - qparams.zero_point):
            ax_data.axvline(level, color="tab:green", lw=0.5, alpha=0.6)
    ax_data.axvline(0.0, color="k", lw=0.8)
    ax_data.set_title(f"{qparams.levels} levels, scale {float(qparams.scale):.3g}, "
                      f"zero point {int(qparams.zero_point)}", fontsize=9)
    ax_data.set_xlabel("x")
    ax_data.set_ylabel("values")
    ax_data.set_ylim(0, 1.45 * ax_data.get_ylim()[1])  # headroom: the legend sits above the bars
    ax_data.legend(fontsize=8, loc="upper right")
    clipped = (x < lo) | (x > hi)
    rounding = (inside - x_hat)[~clipped]
    clipping = (x - inside)[clipped]
    ax_err.hist(rounding, bins=60, color="tab:blue", alpha=0.7, label="rounding")
    if clipping.size:
        ax_err.hist(clipping, bins=60, color="tab:red", alpha=0.7, label="clipping")
    ax_err.set_title(f"SQNR {eb.sqnr_db:.1f} dB; MSE rounding {eb.rounding_mse:.2e}, "
                     f"clipping {eb.clipping_mse:.2e}", fontsize=9)
    ax_err.set_xlabel("error x - fake_quantize(x)")
    ax_err.set_ylabel("values")
    ax_err.set_ylim(0, 1.45 * ax_err.get_ylim()[1])
    ax_err.legend(fontsize=8, loc="upper right")
    return axes


def error_explorer(x, *, bits: int = 4):
    """An ipywidgets explorer: bits, clip and zero point against the error histograms.

    Three sliders drive :func:`explorer_qparams` and redraw :func:`plot_quantization`; the zero
    point slider's range follows the bit width.  Returns the widget (display it in a notebook).
    Needs ipywidgets and a live kernel; the book shows a static figure beside it.  See the
    affine chapter.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    x = _real_array(x, "x", nonempty=True)
    qp0 = choose_qparams(x, bits=bits, signed=False)
    bits_w = widgets.IntSlider(value=bits, min=2, max=8, description="bits")
    clip_w = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="clip")
    zp_w = widgets.IntSlider(value=int(qp0.zero_point), min=0, max=2**bits - 1,
                             description="zero point")
    out = widgets.Output()

    def on_bits(change):
        old_max = zp_w.max
        zp_w.max = 2 ** change["new"] - 1
        zp_w.value = min(zp_w.max, round(zp_w.value * zp_w.max / old_max))

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            qp = explorer_qparams(x, bits=bits_w.value, clip=clip_w.value,
                                  zero_point=zp_w.value)
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
            plot_quantization(x, qp, axes=axes)
            fig.tight_layout()
            display(fig)
            plt.close(fig)

    bits_w.observe(on_bits, names="value")
    for w in (bits_w, clip_w, zp_w):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([bits_w, clip_w, zp_w]), out])
