"""The affine quantizer: ``r = scale * (q - zero_point)``, its parameters, and packed storage.

How a real range ``[rmin, rmax]`` becomes a ``scale`` and an integer ``zero_point``
(:class:`QParams`, :func:`qparams_from_range`, :func:`choose_qparams`), how a tensor is quantized
(round half to even, then clamp to ``[qmin, qmax]``) and dequantized, the course's one weight
quantizer (:func:`quantize_weight`), and how int4 and int2 values are packed into bytes.  All of
it computes in float64 and validates its input.  Re-exported by :mod:`qcourse.affine`; see the
affine chapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcourse._checks import (
    check_axis,
    check_bool,
    check_int,
    real_array,
)

__all__ = [
    "QParams",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "pack_int",
    "qparams_from_range",
    "qrange",
    "quantize",
    "quantize_weight",
    "storage_dtype",
    "unpack_int",
]

MIN_BITS = 2
MAX_BITS = 16


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

    Bounds: ``bits`` is an int in [2, 16] (:data:`MIN_BITS`, :data:`MAX_BITS`).
    """
    bits = check_int(bits, "bits", MIN_BITS, MAX_BITS)
    signed = check_bool(signed, "signed")
    narrow_range = check_bool(narrow_range, "narrow_range")
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
    qmin = check_int(qmin, "qmin")
    qmax = check_int(qmax, "qmax")
    candidates = (np.uint8, np.uint16, np.uint32, np.uint64) if qmin >= 0 else (
        np.int8, np.int16, np.int32, np.int64)
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dt)
    raise ValueError(f"qmin and qmax must fit a NumPy integer dtype (64 bits at most), got "
                     f"[{qmin}, {qmax}]")


# --- quantization parameters -------------------------------------------------------------------


def _check_layout(shape: tuple[int, ...], axis, group_size, kind: str, holder: str) -> None:
    """``holder`` (e.g. "scale") has the shape its granularity needs: 0-d per tensor
    (``axis=None``), 1-D per channel, at least 1-D per group; groups need an axis.  ``kind``
    names what is being laid out ("parameters", "ranges") in the message."""
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis: groups are formed along axis")
        if len(shape) != 0:
            raise ValueError(f"per-tensor {kind} (axis=None) need a 0-d {holder}, got shape "
                             f"{shape}; pass axis= for per-channel {kind}")
    elif group_size is None:
        if len(shape) != 1:
            raise ValueError(f"per-channel {kind} (axis={axis}) need a 1-D {holder}, got shape "
                             f"{shape}")
    elif len(shape) == 0:
        raise ValueError(f"per-group {kind} need a {holder} with at least one dimension")


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
        qmin = check_int(self.qmin, "qmin", -(2**31))
        qmax = check_int(self.qmax, "qmax", hi=2**32 - 1)
        if qmin >= qmax:
            raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
        axis = self.axis if self.axis is None else check_int(self.axis, "axis")
        group_size = (self.group_size if self.group_size is None
                      else check_int(self.group_size, "group_size", 1))

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

        _check_layout(scale.shape, axis, group_size, "parameters", "scale")

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

    def with_float32_scale(self) -> QParams:
        """The same parameters with the scale rounded to float32, as a model file stores it
        (so that a simulation and the integer model it predicts share bit-identical scales)."""
        scale32 = self.scale.astype(np.float32).astype(np.float64)
        return QParams(scale=scale32, zero_point=self.zero_point, qmin=self.qmin,
                       qmax=self.qmax, axis=self.axis, group_size=self.group_size)

    def representable_range(self) -> tuple[np.ndarray, np.ndarray]:
        r"""The real interval the grid spans: :math:`[s(q_{\min} - z),\ s(q_{\max} - z)]`.

        Returns two float64 arrays of the shape of ``scale``.
        """
        return (self.scale * (self.qmin - self.zero_point),
                self.scale * (self.qmax - self.zero_point))


def _stored_scale(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Weight scales rounded to the dtype a model file stores them in (float16, float32), or a
    ValueError naming ``weight`` where a scale overflows to inf or underflows to 0 there."""
    with np.errstate(over="ignore", under="ignore"):
        stored = np.asarray(scale).astype(dtype)
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"weight is too large: a group's scale overflows {dtype}")
    if np.any(stored == 0):
        raise ValueError(f"weight has a group whose scale underflows to 0 in {dtype}; "
                         f"pass scale_dtype=np.float32 or rescale the weights")
    return stored


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
    ax = check_axis(qparams.axis, "axis", ndim)
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
    symmetric = check_bool(symmetric, "symmetric")
    lo = real_array(rmin, "rmin", nonempty=False)
    hi = real_array(rmax, "rmax", nonempty=False)
    if lo.shape != hi.shape:
        raise ValueError(f"rmin and rmax must have the same shape, got {lo.shape} and {hi.shape}")
    if axis is not None:
        check_int(axis, "axis")
    _check_layout(lo.shape, axis, group_size, "ranges", "rmin and rmax")
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
    if np.any(scale <= 0):  # before the zero point divides by it
        raise ValueError("the range is too narrow: its scale underflows to 0 in float64")
    if not symmetric:
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)
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
    x = real_array(x, "x")
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis: groups are formed along axis")
        rmin, rmax = x.min(), x.max()
    else:
        check_int(axis, "axis")
        if x.ndim == 0:
            raise ValueError("per-channel or per-group parameters need x with at least one axis")
        ax = check_axis(axis, "axis", x.ndim)
        if group_size is None:
            others = tuple(i for i in range(x.ndim) if i != ax)
            rmin, rmax = x.min(axis=others), x.max(axis=others)
        else:
            group_size = check_int(group_size, "group_size", 1)
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
    x = real_array(x, "x", nonempty=False)
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


# --- weights ----------------------------------------------------------------------------------


def quantize_weight(weight, *, bits: int = 8, per_channel: bool = True,
                    symmetric: bool = True) -> tuple[np.ndarray, QParams]:
    r"""Min-max quantization of a weight matrix (out, in) to signed ``bits``-bit integers.

    Symmetric (the default, as TFLite and ONNX Runtime quantize weights): zero point 0 on the
    narrow grid :math:`[-(2^{b-1}-1), 2^{b-1}-1]` (int8: -127..127; int4: -7..7; int2: -1..1,
    a ternary weight), scale :math:`s = \max|W| / (2^{b-1} - 1)`.  Asymmetric: the full grid
    :math:`[-2^{b-1}, 2^{b-1}-1]` over :math:`[\min W, \max W]` with a zero point.
    ``per_channel=True`` takes one range per output row (``axis=0``): a row of small weights is
    no longer rounded on the grid of the row with the largest weight.  The scale is rounded to
    float32, as a model file stores it, before the weights are rounded: what this function
    returns is what a deployed model holds.  The course's one weight quantizer (the ptq,
    mixed_precision and later chapters use it).  See the ptq chapter.

    Returns
    -------
    (numpy.ndarray, QParams)
        The integer codes (int8 storage for ``bits`` <= 8, int16 above) and their parameters.

    Bounds: ``bits`` in [2, 16]; ``weight`` finite and within float32 (its scales are
    float32).
    """
    bits = check_int(bits, "bits", 2, MAX_BITS)
    per_channel = check_bool(per_channel, "per_channel")
    symmetric = check_bool(symmetric, "symmetric")
    w = real_array(weight, "weight", kinds="f", dtype=None, ndim=2)
    real_array(w, "weight", dtype=np.float32)          # its scales are stored in float32
    qp = choose_qparams(w, bits=bits, signed=True, symmetric=symmetric, narrow_range=symmetric,
                        axis=0 if per_channel else None).with_float32_scale()
    return quantize(w, qp), qp


# --- packing sub-byte integers -----------------------------------------------------------------


def _check_pack_bits(bits) -> int:
    bits = check_int(bits, "bits")
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
        lo, hi = qrange(bits, check_bool(signed, "signed"))
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
    signed = check_bool(signed, "signed")
    count = check_int(count, "count", 0)
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        got = packed.dtype if isinstance(packed, np.ndarray) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 numpy.ndarray, got {got}")
    if packed.ndim != 1:
        raise ValueError(f"packed must be 1-D, got shape {packed.shape}")
    per_byte = 8 // bits
    need = -(-count // per_byte)
    if packed.size != need:
        raise ValueError(
            f"count={count} values of {bits} bits take {need} bytes, but packed has "
            f"{packed.size}"
        )
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    codes = ((packed[:, None] >> shifts) & np.uint8(2**bits - 1)).ravel()[:count]
    if not signed:
        return codes.astype(np.uint8)
    values = codes.astype(np.int16)
    values -= (values >= 2 ** (bits - 1)).astype(np.int16) * 2**bits
    return values.astype(np.int8)
