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

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    FLOAT32_MAX,
    MAX_ELEMENTS,
    check_bool,
    check_int,
    check_ndarray,
    check_real,
    describe,
    is_int,
    real_array,
)
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
from qcourse.affine.quantizer import _stored_scale
from qcourse.floats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3FN,
    FP8_E5M2,
    FloatFormat,
    decode,
    encode,
)
from qcourse.kernels import (
    PackedInt4,
    matmul_int8,
    matmul_w4a8,
    matmul_w4a8_reference,
    max_k_s8s8,
    prepack_int4,
    quantize_rows_int8,
    w4a8_epilogue_reference,
    w4a8_group_sums,
)
from qcourse.nn import Linear, Sequential, copy_model

__all__ = [
    "FP8_FORMATS", "MXFormat", "MX_FORMATS", "Int4Weight",
    "fp8_dequantize", "fp8_fake_quantize", "fp8_quantize", "fp8_scale", "format_sqnr",
    "int4_group_accumulators", "int4_group_accumulators_reference", "int4_linear_int8",
    "int4_linear_reference", "int4_packed", "int4_weight_only", "mx_dequantize", "mx_quantize",
    "nvfp4_dequantize", "nvfp4_quantize", "quantize_int4_groupwise",
]

#: The two fp8 formats of Micikevicius et al. (2022), by the names :func:`format_sqnr` uses.
FP8_FORMATS = {"e4m3fn": FP8_E4M3FN, "e5m2": FP8_E5M2}

_INT4_QMIN, _INT4_QMAX = -7, 7          # symmetric narrow int4, as qcourse.ptq stores weights
_SCALE_DTYPES = {np.dtype(np.float16): 16, np.dtype(np.float32): 32}


# --------------------------------------------------------------------------- validation


def _check_fp8_format(fmt) -> FloatFormat:
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


@dataclass(frozen=True, eq=False)
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

    def __post_init__(self):
        _check_int4(self, "Int4Weight")

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
    :func:`qcourse.affine.quantize_weight`.  An all-zero group gets scale 1 and codes 0.
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

    Bounds: ``group_size`` is an int >= 1 (any larger than K means one group per row:
    nothing is allocated for it).
    """
    w = real_array(weight, "weight", kinds="f", dtype=None, ndim=2)
    g = check_int(group_size, "group_size", 1)
    try:
        sdt = np.dtype(scale_dtype)
    except TypeError:
        sdt = None
    if sdt not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float16 or float32, got {scale_dtype!r}")
    g = min(g, w.shape[1])            # a group of K or more is the whole row
    qp = choose_qparams(w, bits=4, signed=True, symmetric=True, narrow_range=True, axis=1,
                        group_size=g)
    stored = _stored_scale(qp.scale, sdt)    # max|W|/7 per group, as the file stores it
    q = quantize(w, QParams(scale=stored.astype(np.float64), zero_point=0, qmin=_INT4_QMIN,
                            qmax=_INT4_QMAX, axis=1, group_size=g))
    return Int4Weight(packed=pack_int(q, 4, signed=True), scale=stored, shape=w.shape,
                      group_size=g)


def _check_int4(w4, name: str = "w4") -> Int4Weight:
    """``w4`` as the int4 kernels may trust it, or a TypeError/ValueError naming ``name``.

    The one check of an :class:`Int4Weight`, run when one is built and again by every function
    that computes with one (an unpickled or hand-built object does not pass through the
    constructor): ``shape`` two positive ints with K at most the int8 GEMM's bound,
    ``group_size`` in [1, K], ``packed`` uint8 holding exactly ceil(N K / 2) bytes, ``scale``
    float16 or float32 of shape (N, ceil(K / group_size)), finite and > 0.
    """
    if not isinstance(w4, Int4Weight):
        raise TypeError(f"{name} must be an Int4Weight (from quantize_int4_groupwise), got "
                        f"{type(w4).__name__}")
    shape = w4.shape
    if (not isinstance(shape, tuple) or len(shape) != 2
            or not all(is_int(d) and 1 <= d for d in shape)
            or shape[0] * shape[1] > MAX_ELEMENTS):
        raise ValueError(f"{name}.shape must be two ints (N, K) >= 1 with N K <= "
                         f"{MAX_ELEMENTS}, got {describe(shape)}")
    n, k = (int(d) for d in shape)
    if k > max_k_s8s8():
        raise ValueError(f"{name}.shape has K={k}, more than the int8 GEMM's bound "
                         f"{max_k_s8s8()}")
    g = w4.group_size
    if not (is_int(g) and 1 <= g <= k):
        raise ValueError(f"{name}.group_size must be an int in [1, K={k}], got {g!r}")
    packed = w4.packed
    if (not isinstance(packed, np.ndarray) or packed.dtype != np.uint8
            or packed.shape != ((n * k + 1) // 2,)):
        raise ValueError(f"{name}.packed must be a uint8 array of {(n * k + 1) // 2} bytes (two "
                         f"int4 codes a byte), got {describe(packed)}")
    scale = w4.scale
    groups = -(-k // int(g))
    if not isinstance(scale, np.ndarray) or scale.dtype not in _SCALE_DTYPES or (
            scale.shape != (n, groups)):
        raise ValueError(f"{name}.scale must be a float16 or float32 array of shape "
                         f"({n}, {groups}), got {describe(scale)}")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ValueError(f"{name}.scale must be finite and > 0")
    return w4


def _check_input(x, k: int) -> np.ndarray:
    x = real_array(x, "x", kinds="f", dtype=None, ndim=2)
    if x.dtype != np.float32:
        real_array(x, "x", dtype=np.float32)            # refuses values beyond float32
    if x.shape[1] != k:
        raise ValueError(f"x must have K={k} columns to match the weight, got shape {x.shape}")
    return x


def _check_bias(bias, n: int):
    if bias is None:
        return None
    b = real_array(bias, "bias", kinds="f", dtype=np.float32, ndim=1)
    if b.shape != (n,):
        raise ValueError(f"bias must be a float array of shape ({n},), got shape {b.shape}")
    return b


def _finite_output(y: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(y)):
        raise ValueError("x is too large for this weight: the layer's output overflows float32")
    return y


def int4_linear_reference(x, w4: Int4Weight, bias=None) -> np.ndarray:
    r"""Weight-only int4 layer, the reference: dequantize, then a float product.

    .. math:: y = x \hat W^T + b, \qquad \hat W_{nk} = s_{n,\lfloor k/g \rfloor}\, q_{nk}

    in float32 (``x`` is cast to float32).  See the lowbit chapter.
    """
    w4 = _check_int4(w4)
    x = _check_input(x, w4.shape[1]).astype(np.float32)
    bias = _check_bias(bias, w4.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):
        y = x @ w4.dequantize().T
        return _finite_output(y if bias is None else y + bias)


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


def _check_packed_for(packed, w4: Int4Weight) -> None:
    """``packed`` must be :func:`int4_packed` of ``w4``: a PackedInt4 of the same shape and groups,
    without zero points (what is checked; the codes themselves are not compared)."""
    if not isinstance(packed, PackedInt4):
        raise TypeError(f"packed must be a PackedInt4 from int4_packed(w4), got "
                        f"{type(packed).__name__}")
    if ((packed.n, packed.k) != w4.shape or packed.group_size != w4.group_size
            or packed.has_zero_points):
        raise ValueError(f"packed must be int4_packed(w4) for this weight of shape {w4.shape} "
                         f"and group_size {w4.group_size}, got {packed!r}")


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
    reference = check_bool(reference, "reference")
    if packed is None:
        packed = int4_packed(w4)
    else:
        _check_packed_for(packed, w4)
    with np.errstate(over="ignore", invalid="ignore"):
        if packed is not None:
            y = (matmul_w4a8_reference if reference else matmul_w4a8)(x, packed)
        else:
            xq, sx = quantize_rows_int8(x)
            acc = (int4_group_accumulators_reference if reference else int4_group_accumulators)(
                xq, w4)
            try:
                y = w4a8_epilogue_reference(acc, w4.scale.astype(np.float32), sx)
            except ValueError:      # its operands are ours: only an overflow can be refused
                y = np.full_like(acc[:, :, 0], np.inf, dtype=np.float32)
        return _finite_output(y if bias is None else y + bias)


def int4_weight_only(model, group_size: int, *, scale_dtype=np.float16) -> Sequential:
    r"""A copy of ``model`` whose Linear weights are replaced by their int4 group-wise values.

    Every :class:`qcourse.nn.Linear` weight :math:`W` becomes :math:`\hat W` of
    :func:`quantize_int4_groupwise` (groups of ``group_size`` along the input features);
    biases, activations and arithmetic stay float (weight-only quantization, simulated).  The
    original model is not changed.  See the lowbit chapter.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    g = check_int(group_size, "group_size", 1)
    out = copy_model(model)
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
    fmt = _check_fp8_format(fmt)
    arr = real_array(x, "x")
    amax = float(np.max(np.abs(arr)))
    if amax == 0.0:
        return 1.0
    scale = amax / fmt.max_finite
    if scale == 0.0:
        raise ValueError("max|x| is too small: its fp8 scale underflows to 0 in float64")
    return scale


def fp8_quantize(x, fmt, scale=None) -> tuple[np.ndarray, float]:
    r"""Scale ``x`` into an fp8 format and round: the uint8 bit patterns and the scale.

    .. math:: b = \operatorname{encode}\big(\operatorname{clamp}(x / s, -m, m)\big)

    with :math:`s` from :func:`fp8_scale` unless given, :math:`m` the format's largest finite
    value, and :func:`qcourse.floats.encode` rounding to nearest, ties to even.  The clamp makes
    the cast *saturating*: without it e4m3fn would turn anything above 464 into NaN.  See the
    lowbit chapter.
    """
    fmt = _check_fp8_format(fmt)
    s = fp8_scale(x, fmt) if scale is None else check_real(scale, "scale", 0, lo_open=True)
    arr = real_array(x, "x")
    m = fmt.max_finite
    return encode(np.clip(arr / s, -m, m), fmt), s


def fp8_dequantize(bits, scale, fmt) -> np.ndarray:
    r"""Back from fp8: :math:`\hat x = s \cdot \operatorname{decode}(b)`, float64.  See the lowbit
    chapter."""
    fmt = _check_fp8_format(fmt)
    b = check_ndarray(np.asarray(bits) if isinstance(bits, np.generic) else bits, "bits",
                      np.uint8, nonempty=False)
    return decode(b, fmt) * check_real(scale, "scale", 0, lo_open=True)


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


# --------------------------------------------------------------------------- MX and NVFP4 blocks


class MXFormat(NamedTuple):
    r"""One concrete MX format: the element type and what the shared-exponent rule needs.

    ``element`` is the element's :class:`qcourse.floats.FloatFormat` (None for MXINT8, whose
    elements are 8-bit two's complement with an implicit scale :math:`2^{-6}`); ``emax`` is
    :math:`e_{\max}^{\text{elem}}`, the exponent of the element type's largest normal number;
    ``bits`` the width of one element.
    """

    name: str
    element: FloatFormat | None
    emax: int
    bits: int


#: The six concrete MX formats of the OCP MX v1.0 specification, by the names
#: :func:`mx_quantize` takes: fp8 e4m3/e5m2 elements as in OFP8, and the fp6/fp4 elements that
#: have neither infinity nor NaN (:data:`qcourse.floats.FP4_E2M1` ...).
MX_FORMATS = {
    "mxfp8_e4m3": MXFormat("mxfp8_e4m3", FP8_E4M3FN, FP8_E4M3FN.emax, 8),
    "mxfp8_e5m2": MXFormat("mxfp8_e5m2", FP8_E5M2, FP8_E5M2.emax, 8),
    "mxfp6_e3m2": MXFormat("mxfp6_e3m2", FP6_E3M2, FP6_E3M2.emax, 6),
    "mxfp6_e2m3": MXFormat("mxfp6_e2m3", FP6_E2M3, FP6_E2M3.emax, 6),
    "mxfp4": MXFormat("mxfp4", FP4_E2M1, FP4_E2M1.emax, 4),
    "mxint8": MXFormat("mxint8", None, 0, 8),
}

_E8M0_BIAS, _E8M0_NAN = 127, 255
_NVFP4_SCALE_MIN = 2.0**-9          # the smallest positive e4m3fn value (a subnormal)


def _mx_format(fmt) -> MXFormat:
    if isinstance(fmt, MXFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format name (one of {sorted(MX_FORMATS)}), got "
                        f"{type(fmt).__name__}")
    if fmt not in MX_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(MX_FORMATS)}, got {fmt!r}")
    return MX_FORMATS[fmt]


def _blocks(x, block, name: str = "x") -> tuple[np.ndarray, int]:
    """``x`` (a float array) reshaped to (..., n_blocks, block), checked."""
    block = check_int(block, "block", 1)
    arr = np.asarray(x)
    if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
        raise TypeError(f"{name} must be a float16/float32/float64 array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis, got shape {arr.shape}")
    if arr.shape[-1] % block:
        raise ValueError(f"block={block} must divide the last axis of {name} (length "
                         f"{arr.shape[-1]}): the formats have no partial blocks; pad {name}")
    return arr.reshape(arr.shape[:-1] + (arr.shape[-1] // block, block)), block


def _check_codes_shape(scales, elements, block, scale_name: str):
    s, e = np.asarray(scales), np.asarray(elements)
    for arr, what in ((s, scale_name), (e, "elements")):
        if arr.dtype != np.uint8:
            raise TypeError(f"{what} must be uint8 codes, got dtype {arr.dtype}")
    block = check_int(block, "block", 1)
    if e.ndim == 0 or e.shape[-1] % block or s.shape != e.shape[:-1] + (e.shape[-1] // block,):
        raise ValueError(f"{scale_name} must have shape elements.shape[:-1] + "
                         f"(elements.shape[-1] // block,) = one per block of {block}; got "
                         f"{scale_name} {s.shape}, elements {e.shape}")
    return s, e.reshape(s.shape + (int(block),))


def mx_quantize(x, fmt, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    r"""Encode ``x`` in an OCP Microscaling (MX) format: one E8M0 scale per block of ``block``
    values along the last axis, and one element code per value.

    The shared-exponent rule of the MX v1.0 specification (its conversion algorithm):

    .. math::

        e = \lfloor \log_2 \max_i |v_i| \rfloor - e_{\max}^{\text{elem}}, \qquad
        X = 2^{e}, \qquad P_i = \operatorname{quantize}(v_i / X)

    where :math:`e_{\max}^{\text{elem}}` is the exponent of the element type's largest normal
    number (8 for e4m3, 15 for e5m2, 4 for e3m2, 2 for e2m3 and e2m1, 0 for int8), the element
    quantization rounds to nearest, ties to even, and *clamps* normal numbers that overflow to
    the largest finite element (so the block maximum, which can exceed the element range by
    up to a factor of two, saturates).  :math:`X` is stored as the E8M0 byte :math:`e + 127`.
    Edge cases, as the specification and its reference implementation (microsoft/microxcaling)
    treat them:

    * :math:`e` below the E8M0 range (:math:`< -127`, which includes a block of zeros, whose
      :math:`\log_2 0 = -\infty`) is raised to :math:`-127`: scale byte 0, and the elements are
      quantized against that scale (zeros stay zeros, with their signs);
    * a block holding NaN or :math:`\pm\infty` (or, from float64 input, a maximum whose
      :math:`e` exceeds 127) gets the NaN scale byte 0xFF; the specification makes every value
      of a block with a NaN scale NaN whatever its elements, which are stored as 0.

    MXINT8 elements are 8-bit two's complement integers with an implicit scale :math:`2^{-6}`
    (values :math:`q/64`), rounded to nearest even and clamped to :math:`\pm 127` (the code
    0x80 = -2 is valid on decode but never produced).  See the lowbit chapter.

    Parameters
    ----------
    x : numpy.ndarray of float16, float32 or float64
        Its last axis is cut into blocks; ``block`` must divide it.
    fmt : str
        ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``, ``"mxfp4"`` or
        ``"mxint8"``.
    block : int, default 32
        The specification's :math:`k` (32 for all six concrete formats).

    Returns
    -------
    (scales, elements) : (numpy.ndarray of uint8, numpy.ndarray of uint8)
        ``scales`` has shape ``x.shape[:-1] + (x.shape[-1] // block,)`` (E8M0 bytes);
        ``elements`` has ``x``'s shape (the element bit patterns in the low bits; two's
        complement bytes for MXINT8).
    """
    spec = _mx_format(fmt)
    xb, block = _blocks(x, block)
    v = xb.astype(np.float64)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(v), axis=-1)
    _, e2 = np.frexp(np.where(np.isfinite(amax), amax, 0.0))   # amax = m 2^e2, m in [0.5, 1)
    shared = np.where(amax > 0, e2.astype(np.int64) - 1, -(2**20)) - spec.emax
    shared = np.maximum(shared, -_E8M0_BIAS)
    nan_block = ~np.isfinite(amax) | (shared > _E8M0_BIAS)
    shared = np.where(nan_block, 0, shared)
    scales = np.where(nan_block, _E8M0_NAN, shared + _E8M0_BIAS).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        scaled = np.ldexp(np.where(nan_block[..., None], 0.0, v), -shared[..., None])
    if spec.element is None:
        codes = np.clip(np.rint(scaled * 64.0), -127, 127).astype(np.int8).view(np.uint8)
    else:
        m = spec.element.max_finite
        codes = encode(np.clip(scaled, -m, m), spec.element).astype(np.uint8)
    return scales, codes.reshape(np.shape(x))


def mx_dequantize(scales, elements, fmt, block: int = 32) -> np.ndarray:
    r"""Decode an MX tensor: :math:`v_i = X \cdot P_i` with :math:`X = 2^{s - 127}` from the
    E8M0 byte :math:`s` (NaN for 0xFF, which makes the whole block NaN), as float32.

    The product of an element and a power of two is exact before the one rounding to float32
    (which matters only where it leaves float32's range: subnormals round to nearest even,
    overflow gives :math:`\pm\infty`).  Element NaNs (e4m3 0x7F/0xFF, e5m2's NaN patterns) and
    e5m2 infinities decode as such.  The inverse of :func:`mx_quantize`; see the lowbit chapter.

    Returns
    -------
    numpy.ndarray of float32, the shape of ``elements``
    """
    spec = _mx_format(fmt)
    s, e = _check_codes_shape(scales, elements, block, "scales")
    if spec.element is None:
        values = e.view(np.int8).astype(np.float64) / 64.0
    else:
        if np.any(e >> np.uint8(spec.bits)):
            raise ValueError(f"elements hold codes wider than {spec.bits} bits for {spec.name}")
        values = decode(e, spec.element)
    exp = s.astype(np.int64) - _E8M0_BIAS
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ldexp(values, exp[..., None])
        out = np.where((s == _E8M0_NAN)[..., None], np.nan, out).astype(np.float32)
    return out.reshape(np.shape(elements))


def nvfp4_quantize(x, block: int = 16, *, tensor_scale=None):
    r"""Encode ``x`` in NVFP4: fp4 e2m1 elements, one fp8 e4m3 scale per block of 16 along the
    last axis, and one float32 scale for the whole tensor.

    All arithmetic is float32, in this order (the recipe of NVIDIA's TensorRT Model Optimizer
    and torchao):

    .. math::

        s_T = \frac{\max|x|}{448 \cdot 6}, \quad
        s_b = \operatorname{e4m3}\Big(\operatorname{clamp}\big(\tfrac{\max_{i \in b}|x_i| / 6}
        {s_T},\ 2^{-9},\ 448\big)\Big), \quad
        P_i = \operatorname{e2m1}\big(x_i / (s_b\, s_T)\big)

    with both casts rounding to nearest even and the e2m1 cast saturating at :math:`\pm 6`
    (a block maximum can round its scale *down*, pushing elements past 6).  The clamp from
    below keeps a block of zeros (or one far below the tensor's maximum) on the smallest
    positive e4m3 scale instead of dividing by zero.  An all-zero tensor gets :math:`s_T = 1`.
    Unlike MX, the block scale is not a power of two: e4m3 keeps three mantissa bits of the
    block maximum.  NaN and Inf have no representation in e2m1 and raise ``ValueError``.  See
    the lowbit chapter.

    Parameters
    ----------
    x : numpy.ndarray of float16/float32/float64 (computed in float32)
    block : int, default 16
    tensor_scale : float, optional
        :math:`s_T`; computed from ``x`` when absent (pass one to share it between tensors).

    Returns
    -------
    (tensor_scale, scales, elements) : (numpy.float32, uint8 array, uint8 array)
        e4m3fn bytes of shape ``x.shape[:-1] + (x.shape[-1] // block,)`` and e2m1 codes
        (0..15) of ``x``'s shape.
    """
    xb, block = _blocks(x, block)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes Inf, refused just below
        v = xb.astype(np.float32)
    if not np.all(np.isfinite(v)):
        raise ValueError("x contains NaN or Inf (in float32), which NVFP4 cannot represent")
    if tensor_scale is None:
        if v.size == 0:
            raise ValueError("x is empty: its tensor scale comes from its largest magnitude "
                             "(pass tensor_scale to encode an empty tensor)")
        amax = np.max(np.abs(v))
        ts = np.float32(amax) / np.float32(448 * 6) if amax > 0 else np.float32(1)
    else:
        ts = np.float32(check_real(tensor_scale, "tensor_scale", 0, FLOAT32_MAX, lo_open=True))
    if not (np.isfinite(ts) and ts > 0):
        raise ValueError(f"tensor_scale is {ts} in float32; expected finite and > 0")
    with np.errstate(over="ignore", under="ignore"):
        per_block = (np.max(np.abs(v), axis=-1) / np.float32(6)) / ts
        per_block = np.clip(per_block, np.float32(_NVFP4_SCALE_MIN), np.float32(448))
        scales = encode(per_block, FP8_E4M3FN).astype(np.uint8)
        total = decode(scales, FP8_E4M3FN).astype(np.float32) * ts
        scaled = v / total[..., None]
    codes = encode(scaled, FP4_E2M1).astype(np.uint8)
    return np.float32(ts), scales, codes.reshape(np.shape(x))


def nvfp4_dequantize(tensor_scale, scales, elements, block: int = 16) -> np.ndarray:
    r"""Decode NVFP4: :math:`x_i = \operatorname{fl}_{32}\big(P_i\, s_b\, s_T\big)`, float32.

    :math:`P_i s_b` (an e2m1 value times an e4m3 value) is exact in float32; the product with
    the tensor scale rounds once.  An e4m3 NaN scale byte (0x7F/0xFF) makes its block NaN.
    The inverse of :func:`nvfp4_quantize`; see the lowbit chapter.
    """
    ts = np.float32(check_real(tensor_scale, "tensor_scale", 0, FLOAT32_MAX, lo_open=True))
    s, e = _check_codes_shape(scales, elements, block, "scales")
    if np.any(e > 15):
        raise ValueError("elements hold codes wider than 4 bits (e2m1 codes are 0..15)")
    p = decode(e, FP4_E2M1).astype(np.float32)
    sb = decode(s, FP8_E4M3FN).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        out = (p * sb[..., None]) * ts
    return out.reshape(np.shape(elements))
