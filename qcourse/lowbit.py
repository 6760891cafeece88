r"""Low-bit formats in practice: int4 group-wise weight-only quantization, and fp8 against int8.

The lowbit chapter (``book/lowbit.md``) explains everything in this module.  Two questions:

* **int4 weights.** A weight matrix :math:`W` of shape ``(N, K)`` (out, in) is stored as signed
  4-bit codes with one scale per *group* of ``group_size`` consecutive weights along K
  (:func:`quantize_int4_groupwise`, an :class:`Int4Weight`).  The layer is then computed either
  by dequantizing and multiplying in float (:func:`int4_linear_reference`) or with int8
  activations and integer dot products per group, scaled per group (:func:`int4_linear_int8`):
  on the compiled W4A8 kernel of :mod:`qcourse.kernels` when the groups fit it (a multiple of 8
  that divides K), else one int8 GEMM per group; its integer part is checked against
  :func:`int4_group_accumulators_reference`.
* **fp8 or int8.** The same tensor is scaled into fp8 (e4m3fn or e5m2: its abs-max onto the
  format's largest finite value) and back (:func:`fp8_fake_quantize`), and compared with int8
  per-tensor abs-max (:func:`format_sqnr`).

Everything underneath is reused: scales, codes and packing from :mod:`qcourse.affine`, the fp8
bit patterns from :mod:`qcourse.floats`, the GEMM from :mod:`qcourse.kernels`.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import numpy as np

from qcourse.affine import (
    QParams,
    choose_qparams,
    dequantize,
    effective_bits,
    fake_quantize,
    pack_int,
    quantize,
    sqnr_db,
    unpack_int,
)
from qcourse.floats import FP8_E4M3FN, FP8_E5M2, FloatFormat, decode, encode
from qcourse.kernels import (
    PackedInt4,
    matmul_int8,
    matmul_w4a8,
    matmul_w4a8_reference,
    prepack_int4,
    quantize_rows_int8,
    w4a8_epilogue_reference,
    w4a8_group_sums,
)
from qcourse.nn import Linear, Sequential

__all__ = [
    "FP8_FORMATS", "Int4Weight", "fp8_dequantize", "fp8_fake_quantize", "fp8_quantize",
    "fp8_scale", "format_sqnr", "int4_group_accumulators", "int4_group_accumulators_reference",
    "int4_linear_int8", "int4_linear_reference", "int4_packed", "int4_weight_only",
    "quantize_int4_groupwise",
]

#: The two fp8 formats of Micikevicius et al. (2022), by the names :func:`format_sqnr` uses.
FP8_FORMATS = {"e4m3fn": FP8_E4M3FN, "e5m2": FP8_E5M2}

_INT4_QMIN, _INT4_QMAX = -7, 7          # symmetric narrow int4, as qcourse.ptq stores weights
_SCALE_DTYPES = {np.dtype(np.float16): 16, np.dtype(np.float32): 32}


# --------------------------------------------------------------------------- validation


def _float_matrix(w, name: str) -> np.ndarray:
    """``w`` as a finite, non-empty 2-D float array, or a TypeError/ValueError naming ``name``."""
    arr = np.asarray(w)
    checks = (
        (arr.dtype.kind == "f", TypeError, f"must be a float array, got dtype {arr.dtype}"),
        (arr.ndim == 2 and arr.size > 0, ValueError,
         f"must be a non-empty 2-D array, got shape {arr.shape}"),
    )
    for ok, exc, message in checks:
        if not ok:
            raise exc(f"{name} {message}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return arr


def _check_group_size(group_size) -> int:
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__} "
                        f"{group_size!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return int(group_size)


def _check_format(fmt) -> FloatFormat:
    if isinstance(fmt, str):
        if fmt not in FP8_FORMATS:
            raise ValueError(f"fmt must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
        return FP8_FORMATS[fmt]
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"fmt must be a FloatFormat or a name in {sorted(FP8_FORMATS)}, got "
                        f"{type(fmt).__name__}")
    if fmt.total_bits != 8:
        raise ValueError(f"fmt must be an 8-bit format, got {fmt.name} with {fmt.total_bits} "
                         f"bits")
    return fmt


# --------------------------------------------------------------------------- int4 weights


@dataclass(frozen=True)
class Int4Weight:
    r"""A weight matrix in int4 with one scale per group: :math:`\hat W_{nk} = s_{n,\lfloor k/g
    \rfloor}\, q_{nk}`.

    Built by :func:`quantize_int4_groupwise`.  The codes :math:`q \in [-7, 7]` are stored two to
    a byte (:func:`qcourse.affine.pack_int`, C order, the first value in the low nibble); the
    scales in ``scale_dtype`` (float16 by default).  See the lowbit chapter.

    Attributes
    ----------
    packed : numpy.ndarray, uint8, shape ``(ceil(N * K / 2),)``
    scale : numpy.ndarray, float16 or float32, shape ``(N, ceil(K / group_size))``
    shape : (int, int)
        ``(N, K)``: out features, in features.
    group_size : int
        Weights per group along K, at most K; the last group of a row is shorter when
        ``group_size`` does not divide K (the layout of ONNX's blocked quantization).
    """

    packed: np.ndarray
    scale: np.ndarray
    shape: tuple[int, int]
    group_size: int

    @property
    def qparams(self) -> QParams:
        """The per-group :class:`qcourse.affine.QParams` (float64 copy of the stored scales)."""
        return QParams(scale=self.scale.astype(np.float64), zero_point=0, qmin=_INT4_QMIN,
                       qmax=_INT4_QMAX, axis=1, group_size=self.group_size)

    def codes(self) -> np.ndarray:
        """The int4 codes as an int8 array of shape ``(N, K)`` (unpacked)."""
        n, k = self.shape
        return unpack_int(self.packed, 4, n * k, signed=True).reshape(n, k)

    def dequantize(self) -> np.ndarray:
        r""":math:`\hat W = s\,q` as float32, shape ``(N, K)``."""
        return dequantize(self.codes(), self.qparams)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the packed codes plus the scales."""
        return int(self.packed.nbytes + self.scale.nbytes)

    @property
    def bits_per_weight(self) -> float:
        r"""Storage per weight including the scales, :math:`4 + b_s \lceil K/g \rceil / K`.

        :math:`4 + 16/g` for float16 scales when ``g`` divides K
        (:func:`qcourse.affine.effective_bits` with no zero point).
        """
        return effective_bits(4, self.shape, axis=1, group_size=self.group_size,
                              scale_bits=_SCALE_DTYPES[self.scale.dtype], zero_point_bits=0)


def quantize_int4_groupwise(weight, group_size: int, *, scale_dtype=np.float16) -> Int4Weight:
    r"""Symmetric int4 quantization of ``weight`` (N, K) with one scale per group along K.

    For row :math:`n` and group :math:`j` (columns :math:`jg \dots jg + g - 1`):

    .. math::

        s_{nj} = \operatorname{fl}\Big(\frac{\max_{k \in j} |W_{nk}|}{7}\Big), \qquad
        q_{nk} = \operatorname{clamp}\big(\operatorname{round}(W_{nk} / s_{nj}), -7, 7\big),

    where :math:`\operatorname{fl}` rounds the scale to ``scale_dtype`` (float16: what is
    stored) *before* the weights are rounded, so that the codes belong to the stored scale.
    The grid is the narrow symmetric one (-7 … 7, no zero point), the weight grid of
    :func:`qcourse.ptq.quantize_weight`.  An all-zero group gets scale 1 and codes 0.
    ``group_size >= K`` is one group per row, per-channel quantization (stored as
    ``group_size = K``).  Computed with
    :func:`qcourse.affine.choose_qparams` and :func:`qcourse.affine.quantize`, packed with
    :func:`qcourse.affine.pack_int`.  See the lowbit chapter.

    Parameters
    ----------
    weight : float array (N, K), finite
    group_size : int >= 1
        Need not divide K: the last group of each row is then shorter.
    scale_dtype : numpy.float16 or numpy.float32

    Returns
    -------
    Int4Weight

    Raises
    ------
    TypeError, ValueError
        on a non-float, non-2-D, empty or non-finite ``weight``, a bad ``group_size`` or
        ``scale_dtype``, or a scale that under- or overflows ``scale_dtype`` (float16 holds
        scales from about 6e-8 to 65504).
    """
    w = _float_matrix(weight, "weight")
    g = _check_group_size(group_size)
    try:
        sdt = np.dtype(scale_dtype)
    except TypeError:
        sdt = None
    if sdt not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float16 or float32, got {scale_dtype!r}")
    g = min(g, w.shape[1])            # a group of K or more is the whole row
    qp = choose_qparams(w, bits=4, signed=True, symmetric=True, narrow_range=True, axis=1,
                        group_size=g)
    with np.errstate(over="ignore", under="ignore"):
        stored = qp.scale.astype(sdt)
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"weight is too large: max|W|/7 overflows the {sdt} scales")
    if np.any(stored == 0):
        raise ValueError(f"weight has a group whose max|W|/7 underflows to 0 in {sdt}; "
                         f"use scale_dtype=np.float32 or rescale the weights")
    w4 = Int4Weight(packed=np.empty(0, np.uint8), scale=stored, shape=w.shape, group_size=g)
    q = quantize(w, w4.qparams)
    object.__setattr__(w4, "packed", pack_int(q, 4, signed=True))
    return w4


def _check_int4(w4) -> Int4Weight:
    if not isinstance(w4, Int4Weight):
        raise TypeError(f"w4 must be an Int4Weight (from quantize_int4_groupwise), got "
                        f"{type(w4).__name__}")
    return w4


def _check_input(x, k: int) -> np.ndarray:
    x = _float_matrix(x, "x")
    if x.shape[1] != k:
        raise ValueError(f"x must have K={k} columns to match the weight, got shape {x.shape}")
    return x


def _check_bias(bias, n: int):
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype.kind != "f" or b.shape != (n,):
        raise ValueError(f"bias must be a float array of shape ({n},), got {b.dtype} {b.shape}")
    return b


def int4_linear_reference(x, w4: Int4Weight, bias=None) -> np.ndarray:
    r"""Weight-only int4 layer, the reference: dequantize, then a float product.

    .. math:: y = x \hat W^T + b, \qquad \hat W_{nk} = s_{n,\lfloor k/g \rfloor}\, q_{nk}

    in float32 (``x`` is cast to float32).  See the lowbit chapter.
    """
    w4 = _check_int4(w4)
    x = _check_input(x, w4.shape[1]).astype(np.float32)
    bias = _check_bias(bias, w4.shape[0])
    y = x @ w4.dequantize().T
    return y if bias is None else y + bias.astype(np.float32)


def _group_slices(k: int, g: int) -> list[slice]:
    return [slice(j, min(j + g, k)) for j in range(0, k, g)]


def int4_group_accumulators_reference(x_q, w4: Int4Weight) -> np.ndarray:
    r"""Per-group integer dot products, the reference: :math:`A_{mnj} = \sum_{k \in j}
    x_{q,mk}\, q_{nk}`, in int64 NumPy, returned as int32 of shape ``(M, N, G)``.

    ``x_q`` is an int8 (M, K) array.  Exact: a group of :math:`g` products of magnitude at most
    :math:`127 \cdot 7` cannot overflow int32 for any K the kernels accept.  See the lowbit
    chapter.
    """
    w4 = _check_int4(w4)
    xq = _check_codes(x_q, w4.shape[1])
    q = w4.codes().astype(np.int64)
    x64 = xq.astype(np.int64)
    out = [x64[:, s] @ q[:, s].T for s in _group_slices(w4.shape[1], w4.group_size)]
    return np.stack(out, axis=-1).astype(np.int32)


def _check_codes(x_q, k: int) -> np.ndarray:
    if not isinstance(x_q, np.ndarray) or x_q.dtype != np.int8:
        got = x_q.dtype if isinstance(x_q, np.ndarray) else type(x_q).__name__
        raise TypeError(f"x_q must be an int8 numpy.ndarray, got {got}")
    if x_q.ndim != 2 or x_q.shape[0] == 0 or x_q.shape[1] != k:
        raise ValueError(f"x_q must have shape (M, {k}) with M >= 1, got {x_q.shape}")
    return x_q


def int4_packed(w4: Int4Weight) -> PackedInt4 | None:
    """``w4`` packed for the compiled W4A8 kernel (:func:`qcourse.kernels.prepack_int4`), or None
    when its groups do not fit the kernel (``group_size`` must be a multiple of 8 dividing K).

    Pack once and pass the result to :func:`int4_linear_int8` to skip packing on every call."""
    w4 = _check_int4(w4)
    g, k = w4.group_size, w4.shape[1]
    if g % 8 or k % g:
        return None
    return prepack_int4(w4.codes(), w4.scale.astype(np.float32), group_size=g)


def int4_group_accumulators(x_q, w4: Int4Weight) -> np.ndarray:
    r"""Per-group integer dot products, compiled:

    .. math:: A_{mnj} = \sum_{k \in \text{group } j} x_{q,mk}\, q_{nk}

    on the W4A8 kernel's integer part (:func:`qcourse.kernels.w4a8_group_sums`) when the groups
    fit it, else with one :func:`qcourse.kernels.matmul_int8` per group of K (the int4 codes
    unpacked to int8, the kernel's operand type).  The result, int32 of shape ``(M, N, G)``,
    equals :func:`int4_group_accumulators_reference` bit for bit.  See the lowbit chapter.
    """
    w4 = _check_int4(w4)
    xq = _check_codes(x_q, w4.shape[1])
    packed = int4_packed(w4)
    if packed is not None:
        return w4a8_group_sums(xq, packed)
    q = w4.codes()
    slices = _group_slices(w4.shape[1], w4.group_size)
    out = np.empty((xq.shape[0], w4.shape[0], len(slices)), dtype=np.int32)
    for j, s in enumerate(slices):
        out[:, :, j] = matmul_int8(np.ascontiguousarray(xq[:, s]), np.ascontiguousarray(q[:, s].T))
    return out


def int4_linear_int8(x, w4: Int4Weight, bias=None, *, reference: bool = False,
                     packed: PackedInt4 | None = None) -> np.ndarray:
    r"""Weight-only int4 layer with int8 activations: integer products, scaled per group.

    Each row of ``x`` is quantized to int8 with its own symmetric scale
    :math:`s_{x,m} = \max_k |x_{mk}| / 127` (dynamic, per row;
    :func:`qcourse.kernels.quantize_rows_int8`), and

    .. math::

        y_{mn} = s_{x,m} \sum_{j} s_{nj}\, A_{mnj} + b_n, \qquad
        A_{mnj} = \sum_{k \in \text{group } j} x_{q,mk}\, q_{nk},

    in float32, the groups added in order: the arithmetic of the compiled W4A8 kernel
    (:func:`qcourse.kernels.matmul_w4a8`), which computes it when the groups fit it (``packed``,
    from :func:`int4_packed`, saves packing ``w4`` on every call); other group sizes take the
    integer :math:`A` from :func:`int4_group_accumulators` and the same float steps
    (:func:`qcourse.kernels.w4a8_epilogue_reference`).  With ``reference=True`` everything is
    NumPy (:func:`qcourse.kernels.matmul_w4a8_reference`, or
    :func:`int4_group_accumulators_reference`), and the result is identical.  Against
    :func:`int4_linear_reference` the only difference is the rounding of the activations,
    :math:`|x_{mk} - s_{x,m} x_{q,mk}| \le s_{x,m}/2`, so :math:`|y - y_{\text{ref}}|_{mn} \le
    \tfrac{s_{x,m}}{2} \sum_k |\hat W_{nk}|` plus float rounding.  See the lowbit chapter.
    """
    w4 = _check_int4(w4)
    x = _check_input(x, w4.shape[1])
    bias = _check_bias(bias, w4.shape[0])
    if packed is None:
        packed = int4_packed(w4)
    elif not isinstance(packed, PackedInt4) or (packed.n, packed.k) != w4.shape:
        raise ValueError(f"packed must be int4_packed(w4) for this weight of shape {w4.shape}")
    if packed is not None:
        y = (matmul_w4a8_reference if reference else matmul_w4a8)(x, packed)
    else:
        xq, sx = quantize_rows_int8(x)
        acc = (int4_group_accumulators_reference if reference else int4_group_accumulators)(
            xq, w4)
        y = w4a8_epilogue_reference(acc, w4.scale.astype(np.float32), sx)
    return y if bias is None else y + bias.astype(np.float32)


def int4_weight_only(model, group_size: int, *, scale_dtype=np.float16) -> Sequential:
    r"""A copy of ``model`` whose Linear weights are replaced by their int4 group-wise values.

    Every :class:`qcourse.nn.Linear` weight :math:`W` becomes :math:`\hat W` of
    :func:`quantize_int4_groupwise` (groups of ``group_size`` along the input features);
    biases, activations and arithmetic stay float (weight-only quantization, simulated).  The
    original model is not changed.  See the lowbit chapter.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    g = _check_group_size(group_size)
    out = copy.deepcopy(model)
    found = False
    for _, layer in out.named_modules():
        if isinstance(layer, Linear):
            found = True
            w4 = quantize_int4_groupwise(layer.weight, g, scale_dtype=scale_dtype)
            layer.weight[...] = w4.dequantize()
    if not found:
        raise ValueError("model has no Linear layer to quantize")
    return out


# --------------------------------------------------------------------------- fp8 against int8


def fp8_scale(x, fmt) -> float:
    r"""The per-tensor scale that maps the abs-max of ``x`` onto the largest finite fp8 value.

    .. math:: s = \frac{\max_i |x_i|}{m_{\text{fmt}}}, \qquad m_{\text{e4m3fn}} = 448,\quad
              m_{\text{e5m2}} = 57344

    (1.0 for an all-zero tensor).  ``fmt`` is ``"e4m3fn"``, ``"e5m2"`` or an 8-bit
    :class:`qcourse.floats.FloatFormat`.  See the lowbit chapter.
    """
    fmt = _check_format(fmt)
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"x must hold real numbers, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError("x must not be empty")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("x contains NaN or Inf; expected finite values")
    amax = float(np.max(np.abs(arr)))
    if amax == 0.0:
        return 1.0
    scale = amax / fmt.max_finite
    if scale == 0.0:
        raise ValueError("max|x| is too small: its fp8 scale underflows to 0 in float64")
    return scale


def _check_scale(scale) -> float:
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return scale


def fp8_quantize(x, fmt, scale=None) -> tuple[np.ndarray, float]:
    r"""Scale ``x`` into an fp8 format and round: the uint8 bit patterns and the scale.

    .. math:: b = \operatorname{encode}\big(\operatorname{clamp}(x / s, -m, m)\big)

    with :math:`s` from :func:`fp8_scale` unless given, :math:`m` the format's largest finite
    value, and :func:`qcourse.floats.encode` rounding to nearest, ties to even.  The clamp makes
    the cast *saturating*: without it e4m3fn would turn anything above 464 into NaN.  See the
    lowbit chapter.
    """
    fmt = _check_format(fmt)
    s = fp8_scale(x, fmt) if scale is None else _check_scale(scale)
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"x must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("x contains NaN or Inf; expected finite values")
    m = fmt.max_finite
    return encode(np.clip(arr / s, -m, m), fmt), s


def fp8_dequantize(bits, scale, fmt) -> np.ndarray:
    r"""Back from fp8: :math:`\hat x = s \cdot \operatorname{decode}(b)`, float64.  See the lowbit
    chapter."""
    fmt = _check_format(fmt)
    b = np.asarray(bits)
    if b.dtype != np.uint8:
        raise TypeError(f"bits must be uint8 fp8 bit patterns, got dtype {b.dtype}")
    return decode(b, fmt) * _check_scale(scale)


def fp8_fake_quantize(x, fmt, scale=None) -> np.ndarray:
    r"""Scale into fp8, round, and scale back: :math:`\hat x = s\,
    \operatorname{fp8}(\operatorname{clamp}(x/s, -m, m))`.

    Float64 out.  The fp8 counterpart of :func:`qcourse.affine.fake_quantize` with per-tensor
    abs-max parameters.  See the lowbit chapter.
    """
    bits, s = fp8_quantize(x, fmt, scale)
    return fp8_dequantize(bits, s, fmt)


def format_sqnr(x) -> dict[str, float]:
    r"""SQNR (dB) of ``x`` after int8 per-tensor abs-max, fp8 e4m3fn and fp8 e5m2.

    int8 is :func:`qcourse.affine.choose_qparams` symmetric (:math:`s = \max|x|/127`) and
    :func:`qcourse.affine.fake_quantize`; the fp8 formats are :func:`fp8_fake_quantize` with
    the abs-max scale.  All three spend 8 bits per value and one scale per tensor.  Returns
    ``{"int8": ..., "e4m3fn": ..., "e5m2": ...}``.  See the lowbit chapter.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"x must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    int8 = fake_quantize(arr, choose_qparams(arr, bits=8, signed=True, symmetric=True))
    out = {"int8": sqnr_db(arr, int8)}
    for name, fmt in FP8_FORMATS.items():
        out[name] = sqnr_db(arr, fp8_fake_quantize(arr, fmt))
    return out
