r"""Integer-only convolution: a quantized CNN layer computed with integers.

The conv chapter (``book/conv.md``) derives everything here the way the int_matmul chapter
derives the linear layer.  A convolution is a matrix product in disguise: gather every
``kh x kw x C`` patch of the input into a row (*im2col*), and the layer is

.. math::

    q_{y} = Z_y + M \Big(\sum_k (P_{k} - Z_x)(W_{k} - Z_W) + q_b\Big),

the same accumulator, zero-point terms, int32 bias and requantization as
:class:`qcourse.int_matmul.QuantizedLinear`, with two differences that matter:

* the border: padding must add the *real* value 0, whose code is the zero point :math:`Z_x`,
  not the integer 0 (:func:`im2col` takes ``pad_value``);
* the depthwise convolution (one filter per channel) has K = kh * kw = 9: a GEMM with nine
  terms per output wastes its tiles, so it gets its own loop (:func:`depthwise_conv_int8`).

The module has three parts:

* **gathering**: :func:`conv_output_size`, :func:`im2col`;
* **integer convolution** on int8 codes in NHWC (channels last, the layout in which a pointwise
  convolution is a plain GEMM and a depthwise one is contiguous): :func:`conv2d_accumulate`
  (exact accumulators, NumPy), :func:`conv2d_int8` (im2col onto the compiled GEMM with fused
  requantization, or the depthwise kernel), :func:`conv2d_int8_reference`;
* the ONNX operator ``QLinearConv`` (NCHW) is :func:`qcourse.int_matmul.qlinear_conv`, with the
  operator's argument rules; its 2-D cases run on :func:`conv2d_int8`;
* **a whole network**: :class:`QuantizedConv2d` (per-channel int8 weights, int32 bias,
  requantization, fused ReLU / ReLU6 clamp) and :class:`IntegerCNN`, a plain list of such layers
  (plus pooling and a final linear layer) that runs a trained CNN in integers end to end, with a
  per-layer time breakdown.  :func:`qcourse.cnn.convert_cnn` builds one from a float model.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from qcourse._checks import (
    INT32_MAX,
    INT32_MIN,
    MAX_ELEMENTS,
    check_choice,
    check_dtype,
    check_instance,
    check_int,
    check_int_sequence,
    check_sequence,
    describe,
    int_array,
    real_array,
)
from qcourse.affine import QParams, dequantize, quantize, storage_dtype
from qcourse.int_matmul import (
    ACTIVATIONS,
    REQUANTIZATIONS,
    QuantizedLinear,
    requantize_fixed_point,
    requantize_float,
)
from qcourse.kernels import _PATH_NAMES, _path_code, depthwise_conv_int8

__all__ = [
    "IntegerCNN",
    "IntegerGlobalAvgPool",
    "QuantizedConv2d",
    "conv2d_accumulate",
    "conv2d_int8",
    "conv2d_int8_reference",
    "conv_output_size",
    "im2col",
]

_LAYOUTS = ("NCHW", "NHWC")


#: Largest image side, kernel side, stride and padding a convolution here takes (2**20, as
#: :func:`qcourse.kernels.depthwise_conv_int8`); besides, the padded input, the patch matrix and
#: the output may hold at most :data:`qcourse._checks.MAX_ELEMENTS` (2**28) elements each.
MAX_SIDE = 2**20


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                     name: str = "size") -> int:
    r"""Output length of a convolution along one axis: :math:`\lfloor (n + 2p - k)/s \rfloor + 1`.

    ``size``, ``kernel`` and ``stride`` are ints in [1, :data:`MAX_SIDE`], ``padding`` in [0,
    :data:`MAX_SIDE`].  Raises ``ValueError`` naming ``name`` when the kernel does not fit in the
    padded input.
    """
    return _out_size(size, kernel, stride, padding, name if name == "size" else f"size ({name})",
                     "kernel")


def _out_size(size, kernel, stride, padding, name: str, kernel_name: str) -> int:
    size = check_int(size, name, 1, MAX_SIDE)
    kernel = check_int(kernel, kernel_name, 1, MAX_SIDE)
    stride = check_int(stride, "stride", 1, MAX_SIDE)
    padding = check_int(padding, "padding", 0, MAX_SIDE)
    if size + 2 * padding < kernel:
        raise ValueError(f"the {kernel}-wide kernel ({kernel_name}) does not fit the input's "
                         f"{name} {size} with padding {padding}")
    return (size + 2 * padding - kernel) // stride + 1


def _check_elements(count: int, what: str) -> None:
    if count > MAX_ELEMENTS:
        raise ValueError(f"{what} would hold {count} elements, more than MAX_ELEMENTS "
                         f"({MAX_ELEMENTS})")


def _kernel_pair(kernel_size, name: str = "kernel_size") -> tuple[int, int]:
    if isinstance(kernel_size, (tuple, list)):
        return check_int_sequence(kernel_size, name, 1, MAX_SIDE, min_len=2, max_len=2)
    k = check_int(kernel_size, name, 1, MAX_SIDE)
    return k, k


def im2col(x, kernel_size, stride: int = 1, padding: int = 0, *, layout: str = "NCHW",
           pad_value=0) -> np.ndarray:
    r"""Gather every convolution patch of ``x`` into its own row (im2col).

    For an output position :math:`(i, j)` the patch holds
    :math:`x_{c,\, s i + u - p,\, s j + v - p}` for every channel :math:`c` and kernel offset
    :math:`(u, v)`, with ``pad_value`` outside the image.  A convolution is then one matrix
    product of the patches with the flattened filters.  For a float layer the padding is 0; for
    quantized codes it must be the input's zero point, the code of the real value 0 (the conv
    chapter shows what padding with the integer 0 costs).

    Parameters
    ----------
    x : numpy.ndarray, 4-D
        ``(n, c, h, w)`` for ``layout="NCHW"``, ``(n, h, w, c)`` for ``"NHWC"``.
    kernel_size : int or (kh, kw)
    stride, padding : int
        ``kernel_size`` and ``stride`` in [1, :data:`MAX_SIDE`], ``padding`` in [0,
        :data:`MAX_SIDE`]; the padded input and the result may hold at most 2**28 elements.
    pad_value : scalar of ``x``'s dtype
        A real number (an integer in the dtype's range for integer codes; NaN refused).

    Returns
    -------
    numpy.ndarray, dtype of ``x``, C-contiguous
        ``(n, oh, ow, c, kh, kw)`` for NCHW, ``(n, oh, ow, kh, kw, c)`` for NHWC: reshaped to
        ``(n * oh * ow, -1)`` it is the patch matrix, rows in output order.
    """
    check_instance(x, "x", np.ndarray, "a numpy.ndarray")
    layout = check_choice(layout, "layout", _LAYOUTS)
    x = real_array(x, "x", dtype=None, finite=False, nonempty=False, ndim=4)
    kh, kw = _kernel_pair(kernel_size)
    stride = check_int(stride, "stride", 1, MAX_SIDE)
    padding = check_int(padding, "padding", 0, MAX_SIDE)
    h_ax, w_ax = (2, 3) if layout == "NCHW" else (1, 2)
    oh = _out_size(x.shape[h_ax], kh, stride, padding, "x's height", "kernel_size")
    ow = _out_size(x.shape[w_ax], kw, stride, padding, "x's width", "kernel_size")
    n, c = x.shape[0], x.shape[1 if layout == "NCHW" else 3]
    _check_elements(n * c * (x.shape[h_ax] + 2 * padding) * (x.shape[w_ax] + 2 * padding),
                    f"x of shape {x.shape} with padding={padding}")
    _check_elements(n * oh * ow * c * kh * kw,
                    f"the patches of x (shape {x.shape}, kernel_size={(kh, kw)}, "
                    f"padding={padding})")
    if padding:
        pad_value = _pad_value(pad_value, x.dtype)
    if padding:
        widths = [(0, 0)] * 4
        widths[h_ax] = widths[w_ax] = (padding, padding)
        x = np.pad(x, widths, constant_values=pad_value)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(h_ax, w_ax))
    if layout == "NCHW":          # (n, c, H', W', kh, kw)
        win = win[:, :, :stride * oh:stride, :stride * ow:stride]
        return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5))
    win = win[:, :stride * oh:stride, :stride * ow:stride]   # (n, H', W', c, kh, kw)
    return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3))


def _pad_value(pad_value, dtype: np.dtype):
    """``pad_value`` as a scalar of ``dtype``: a real number, an integer in range for codes."""
    v = real_array(pad_value, "pad_value", dtype=None, ndim=0)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if v.dtype.kind == "f" and v != np.rint(v) or not info.min <= v <= info.max:
            raise ValueError(f"pad_value must be an integer in [{info.min}, {info.max}] (the "
                             f"range of x's dtype {dtype}), got {v}")
    return v.astype(dtype)


# --- integer convolution, NHWC ---------------------------------------------------------------


def _check_conv_codes(name: str, x, ndim: int, layout: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of int8 or uint8 codes, got "
                        f"{type(x).__name__}")
    if x.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise TypeError(f"{name} must have dtype int8 or uint8, got {x.dtype}")
    if x.ndim != ndim or x.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array ({layout}), got shape "
                         f"{x.shape}")
    return x


def _nhwc_geometry(x_shape, w_shape, stride, padding, groups, layout="NHWC"):
    """Check that a weight (out, in/groups, kh, kw) fits an input; return (oh, ow, groups)."""
    c = x_shape[3] if layout == "NHWC" else x_shape[1]
    h, wd = (x_shape[1], x_shape[2]) if layout == "NHWC" else (x_shape[2], x_shape[3])
    groups = check_int(groups, "groups", 1)
    out, cg, kh, kw = w_shape
    if c % groups or out % groups:
        raise ValueError(f"groups={groups} must divide the input channels ({c}) and the output "
                         f"channels ({out})")
    if cg * groups != c:
        axis = 3 if layout == "NHWC" else 1
        raise ValueError(f"the weight expects {cg * groups} input channels ({cg} per group x "
                         f"{groups} groups) but x has {c} (axis {axis}, {layout})")
    oh = _out_size(h, kh, stride, padding, "x_q's height", "w_q's kernel height")
    ow = _out_size(wd, kw, stride, padding, "x_q's width", "w_q's kernel width")
    _check_elements(x_shape[0] * oh * ow * out, f"the output (padding={padding})")
    return oh, ow, groups


def _weight_zero_points(w_zero_point, out: int, lo: int, hi: int) -> np.ndarray:
    """``w_zero_point`` (None, one integer or one per output channel) as int64 ``(out,)``."""
    if w_zero_point is None:
        return np.zeros(out, np.int64)
    zw = int_array(w_zero_point, "w_zero_point", lo, hi)
    if zw.ndim and zw.shape not in ((1,), (out,)):
        raise ValueError(f"w_zero_point must be one integer or one per output channel "
                         f"({out},), got shape {zw.shape}")
    return np.broadcast_to(zw, (out,))


def _conv_args(x_q, w_q, x_zero_point, w_zero_point, bias, stride, padding, groups, *,
               int8_weight: bool):
    """The arguments an integer convolution shares, checked with the caller's names: ``x``,
    ``w``, ``(oh, ow, groups)``, ``Z_x``, ``Z_W`` int64 (out,) and ``bias`` int64 (out,) or
    None."""
    x = _check_conv_codes("x_q", x_q, 4, "n, h, w, c")
    if int8_weight:
        w = _check_conv_codes("w_q", w_q, 4, "out, in/groups, kh, kw")
        if w.dtype != np.int8:
            raise TypeError(f"w_q must be int8, got {w.dtype}")
        zw_range = (-128, 127)
    else:
        w = int_array(w_q, "w_q", -128, 255, what="int8 or uint8 codes")
        if w.ndim != 4:
            raise ValueError(f"w_q must be a 4-D integer array (out, in/groups, kh, kw), got "
                             f"shape {w.shape}")
        zw_range = (-128, 255)
    oh, ow, groups = _nhwc_geometry(x.shape, w.shape, stride, padding, groups)
    info = np.iinfo(x.dtype)
    zx = check_int(x_zero_point, "x_zero_point", int(info.min), int(info.max))
    out = w.shape[0]
    zw = _weight_zero_points(w_zero_point, out, *zw_range)
    if bias is not None:
        bias = int_array(bias, "bias", INT32_MIN, INT32_MAX, what="int32")
        if bias.shape != (out,):
            raise ValueError(f"bias must have shape ({out},) (one per output channel), got "
                             f"{bias.shape}")
    return x, w, (oh, ow, groups), zx, zw, bias


def conv2d_accumulate(x_q, w_q, *, x_zero_point: int = 0, w_zero_point=None, bias=None,
                      stride: int = 1, padding: int = 0, groups: int = 1) -> np.ndarray:
    r"""The exact int32 accumulators of an integer convolution (NumPy reference, NHWC).

    .. math::

        v_{n,i,j,o} = b_o + \sum_{c \in g(o)} \sum_{u,v}
            (x_{n,\,s i + u - p,\,s j + v - p,\,c} - Z_x)\,(W_{o,c,u,v} - Z_{W,o})

    with the input padded by :math:`Z_x` (so the padding contributes nothing, exactly as a float
    convolution padded with 0).  ``x_q`` is (n, h, w, c) int8 or uint8; ``w_q`` is (out,
    in/groups, kh, kw), integer codes (int8 or uint8 values); ``x_zero_point`` in ``x_q``'s
    dtype range; ``w_zero_point`` None, one integer or one per output channel; ``bias`` None
    or int32 values (out,); ``stride``, ``padding`` and the image sides at most
    :data:`MAX_SIDE`, the output at most 2**28 elements.  Computed in int64 by im2col and a
    matrix product per group; a sum outside int32 raises ``ValueError``.

    Returns
    -------
    numpy.ndarray, int32, (n, oh, ow, out)
    """
    x, w, (oh, ow, groups), zx, zw, bias = _conv_args(
        x_q, w_q, x_zero_point, w_zero_point, bias, stride, padding, groups, int8_weight=False)
    out, cg, kh, kw = w.shape
    cols = im2col(x, (kh, kw), stride, padding, layout="NHWC", pad_value=zx)
    n = x.shape[0]
    cols = cols.reshape(n * oh * ow, kh * kw, groups, cg).astype(np.int64) - zx
    wz = w.astype(np.int64) - zw[:, None, None, None]
    og = out // groups
    acc = np.empty((n * oh * ow, out), np.int64)
    for g in range(groups):
        wg = wz[g * og:(g + 1) * og].transpose(0, 2, 3, 1).reshape(og, -1)   # (og, kh*kw*cg)
        acc[:, g * og:(g + 1) * og] = cols[:, :, g, :].reshape(n * oh * ow, -1) @ wg.T
    if bias is not None:
        acc += bias
    if np.any((acc < -(2**31)) | (acc > 2**31 - 1)):
        raise ValueError("the convolution's int32 accumulator overflows for this input")
    return acc.astype(np.int32).reshape(n, oh, ow, out)


def _requant_float(acc, multiplier, zp, qmin, qmax, out_dtype):
    with np.errstate(over="ignore"):        # an overflow to inf is clamped like any large value
        f = acc.astype(np.float32) * np.asarray(multiplier, np.float32)
    q = np.rint(np.clip(f, np.float32(qmin - zp), np.float32(qmax - zp))) + zp
    return q.astype(np.int32).astype(out_dtype)


def _conv_requant_args(multiplier, output_zero_point, out_dtype, qmin, qmax, out: int):
    """The requantization arguments: ``(out_dtype, qmin, qmax, zp, m)`` with ``m`` float64
    (out,), each a positive float32."""
    out_dtype = check_dtype(out_dtype, "out_dtype", (np.int8, np.uint8))
    info = np.iinfo(out_dtype)
    lo = int(info.min) if qmin is None else check_int(qmin, "qmin", int(info.min), int(info.max))
    hi = int(info.max) if qmax is None else check_int(qmax, "qmax", int(info.min), int(info.max))
    if lo > hi:
        raise ValueError(f"qmin must be <= qmax, got qmin={lo}, qmax={hi}")
    zp = check_int(output_zero_point, "output_zero_point", int(info.min), int(info.max))
    m = real_array(multiplier, "multiplier")
    if m.ndim and m.shape not in ((1,), (out,)):
        raise ValueError(f"multiplier must be one number or one per output channel ({out},), "
                         f"got shape {m.shape}")
    f32 = np.float32(np.finfo(np.float32).max)
    if not np.all((m > 0) & (m <= f32)) or not np.all(m.astype(np.float32) > 0):
        raise ValueError(f"multiplier must be a positive float32 (it is rounded to float32), got "
                         f"values from {m.min():g} to {m.max():g}")
    return out_dtype, lo, hi, zp, np.broadcast_to(m, (out,))


def conv2d_int8_reference(x_q, w_q, multiplier, output_zero_point: int = 0, *, bias=None,
                          x_zero_point: int = 0, w_zero_point=None, stride: int = 1,
                          padding: int = 0, groups: int = 1, out_dtype=np.int8,
                          qmin: int | None = None, qmax: int | None = None) -> np.ndarray:
    r"""NumPy twin of :func:`conv2d_int8`: :func:`conv2d_accumulate`, then the float
    requantization :math:`\mathrm{clamp}(\mathrm{rhe}(\mathrm{f32}(v)\, m_o) + Z_y, q_{\min},
    q_{\max})` of :func:`qcourse.int_matmul.requantize_float`.  Arguments as in
    :func:`conv2d_int8` (``w_q`` may also hold uint8 values here)."""
    _, w, _, _, _, _ = _conv_args(x_q, w_q, x_zero_point, w_zero_point, bias, stride, padding,
                                  groups, int8_weight=False)
    out_dtype, lo, hi, zp, m = _conv_requant_args(multiplier, output_zero_point, out_dtype, qmin,
                                             qmax, w.shape[0])
    acc = conv2d_accumulate(x_q, w_q, x_zero_point=x_zero_point, w_zero_point=w_zero_point,
                            bias=bias, stride=stride, padding=padding, groups=groups)
    return _requant_float(acc, m, zp, lo, hi, out_dtype)


def _shift_to_int8(x: np.ndarray, zp: int) -> tuple[np.ndarray, int]:
    """uint8 codes -> int8 by subtracting 128 (x - zp unchanged when zp moves too)."""
    if x.dtype == np.uint8:
        return x.view(np.int8) ^ np.int8(-128), zp - 128   # flipping the top bit: x - 128
    return x, zp


def conv2d_int8(x_q, w_q, multiplier, output_zero_point: int = 0, *, bias=None,
                x_zero_point: int = 0, w_zero_point=None, stride: int = 1, padding: int = 0,
                groups: int = 1, out_dtype=np.int8, qmin: int | None = None,
                qmax: int | None = None, path: str | None = None) -> np.ndarray:
    r"""Integer convolution with fused requantization, NHWC, on the compiled kernels.

    The same result as :func:`conv2d_int8_reference`, bit for bit:

    * a **regular** convolution (``groups=1``) is im2col (padding with :math:`Z_x`) onto the
      int8 GEMM with fused requantization, :func:`qcourse.kernels.matmul_int8_requant`: rows
      are output pixels, columns output channels, K = kh * kw * in; a 1x1 convolution with
      stride 1 needs no im2col at all (the NHWC input *is* the patch matrix);
    * a **depthwise** convolution (``groups == in == out``) runs
      :func:`qcourse.kernels.depthwise_conv_int8`, vectorized across channels;
    * other grouped convolutions run one GEMM per group.

    ``x_q`` (n, h, w, c) int8 or uint8; ``w_q`` (out, in/groups, kh, kw) int8;
    ``multiplier`` a positive float32 value, one or one per output channel; ``bias`` None or
    int32 values (out,); ``x_zero_point`` in ``x_q``'s dtype range, ``w_zero_point`` int8 (one
    or per output channel), ``output_zero_point``, ``qmin`` and ``qmax`` in ``out_dtype``'s
    range (int8 or uint8); ``stride``, ``padding`` and the image sides at most
    :data:`MAX_SIDE`, the output at most 2**28 elements; ``path`` as in
    :func:`qcourse.kernels.matmul_int8_packed`.  See the conv chapter.
    """
    from qcourse.kernels import matmul_int8_requant

    x, w, (oh, ow, groups), zx, _, checked_bias = _conv_args(
        x_q, w_q, x_zero_point, w_zero_point, bias, stride, padding, groups, int8_weight=True)
    _conv_requant_args(multiplier, output_zero_point, out_dtype, qmin, qmax, w.shape[0])
    if bias is not None:
        bias = checked_bias.astype(np.int32)
    out, cg, kh, kw = w.shape
    n, c = x.shape[0], x.shape[3]
    x8, zx = _shift_to_int8(x, zx)
    common = dict(bias=bias, x_zero_point=zx, w_zero_point=w_zero_point, out_dtype=out_dtype,
                  qmin=qmin, qmax=qmax, path=path)
    if groups == c == out and cg == 1:
        return depthwise_conv_int8(x8, np.ascontiguousarray(w[:, 0].transpose(1, 2, 0)),
                                   multiplier, output_zero_point, stride=stride,
                                   padding=padding, **common)
    common.pop("x_zero_point")
    zw = common.pop("w_zero_point")
    zw_all = None if zw is None else np.broadcast_to(np.asarray(zw), (out,))
    m_all = np.broadcast_to(np.asarray(multiplier, np.float64), (out,))
    b_all = None if bias is None else np.asarray(bias)
    common.pop("bias")
    if kh == kw == 1 and stride == 1 and padding == 0:
        cols = x8.reshape(n * oh * ow, 1, groups, cg)      # a 1x1 convolution: no im2col
    else:
        cols = im2col(x8, (kh, kw), stride, padding, layout="NHWC", pad_value=zx)
        cols = cols.reshape(n * oh * ow, kh * kw, groups, cg)
    og = out // groups
    parts = []
    for g in range(groups):
        sl = slice(g * og, (g + 1) * og)
        a = np.ascontiguousarray(cols[:, :, g, :]).reshape(n * oh * ow, -1)
        b = np.ascontiguousarray(w[sl].transpose(0, 2, 3, 1).reshape(og, -1).T)
        parts.append(matmul_int8_requant(
            a, b, m_all[sl], output_zero_point, a_zero_point=zx,
            b_zero_point=None if zw_all is None else zw_all[sl],
            bias=None if b_all is None else np.ascontiguousarray(b_all[sl]), **common))
    y = parts[0] if groups == 1 else np.concatenate(parts, axis=1)
    return y.reshape(n, oh, ow, out)


# --- a whole network ---------------------------------------------------------------------------

_KINDS = ("conv", "depthwise", "pointwise")


@dataclass(frozen=True, eq=False)
class QuantizedConv2d:
    r"""A quantized convolution computed with integers only: ``y = act(conv(x, W) + b)``, NHWC.

    .. math::

        q_{y} = \mathrm{clamp}\big(Z_y + \mathrm{round}(M_o\, v),\ \mathrm{lo},\ \mathrm{hi}\big),
        \qquad v = q_{b,o} + \sum (q_x - Z_x)(q_{W,o} - Z_{W,o}),
        \qquad M_o = \frac{S_x S_{W,o}}{S_y}

    Attributes (a plain record an exporter reads directly):

    * ``weight_q`` int8 (out, in/groups, kh, kw), the ONNX/PyTorch layout; ``weight_qparams``
      per tensor or per output channel (``axis=0``);
    * ``bias_q`` int32 (out,), scale :math:`S_x S_{W,o}`, zero point 0 (the folded batch norm
      lives here);
    * ``input_qparams``, ``output_qparams``: per tensor, int8 or uint8 grids;
    * ``stride``, ``padding`` (the same on all four sides; padding holds :math:`Z_x`),
      ``groups`` (1, or the channel count for a depthwise layer);
    * ``activation`` fused as the clamp ``output_range`` (ReLU6: ``[Z_y, Z_y + round(6/S_y)]``).

    Derived: :attr:`kind`, :attr:`float_multiplier` (ONNX Runtime's :math:`m_o`),
    :meth:`fixed_point_params` (TFLite's :math:`(M_0, \text{shift})` per channel),
    :attr:`output_range`.  The arithmetic is that of
    :class:`qcourse.int_matmul.QuantizedLinear` over im2col patches -- which this class holds as
    :attr:`linear` (weight reshaped to (out, kh * kw * in/groups)) and reuses for its checks,
    multipliers and requantizations.  :meth:`__call__` runs the compiled kernels
    (:func:`conv2d_int8`, float requantization); :meth:`reference` runs NumPy in any of
    :data:`qcourse.int_matmul.REQUANTIZATIONS`.  See the conv chapter.
    """

    weight_q: np.ndarray
    bias_q: np.ndarray | None
    input_qparams: QParams
    weight_qparams: QParams
    output_qparams: QParams
    stride: int = 1
    padding: int = 0
    groups: int = 1
    activation: str = "none"
    linear: QuantizedLinear = field(init=False, repr=False)

    def __post_init__(self):
        int_array(self.weight_q, "weight_q", -128, 127, what="int8 codes")
        w = np.asarray(self.weight_q)
        if w.ndim != 4:
            raise ValueError(f"weight_q must be a non-empty 4-D array (out, in/groups, kh, kw), "
                             f"got shape {w.shape}")
        out, cg, kh, kw = w.shape
        if max(kh, kw) > MAX_SIDE:
            raise ValueError(f"weight_q's kernel must be at most {MAX_SIDE} wide, got {kh}x{kw}")
        groups = check_int(self.groups, "groups", 1)
        if out % groups:
            raise ValueError(f"groups={groups} must divide the output channels ({out})")
        if groups > 1 and not (cg == 1 and groups == out):
            raise ValueError("only regular (groups=1) and depthwise (groups == in == out) "
                             "convolutions are supported")
        object.__setattr__(self, "stride", check_int(self.stride, "stride", 1, MAX_SIDE))
        object.__setattr__(self, "padding", check_int(self.padding, "padding", 0, MAX_SIDE))
        check_choice(self.activation, "activation", ACTIVATIONS)
        # (out, kh, kw, in/groups): the order of an NHWC patch
        flat = w.transpose(0, 2, 3, 1).reshape(out, -1)
        linear = QuantizedLinear(flat, self.bias_q, self.input_qparams, self.weight_qparams,
                                 self.output_qparams, self.activation)
        w8 = w.astype(np.int8)
        w8.flags.writeable = False
        object.__setattr__(self, "weight_q", w8)
        object.__setattr__(self, "bias_q", linear.bias_q)
        for name in ("input_qparams", "weight_qparams", "output_qparams"):
            object.__setattr__(self, name, getattr(linear, name))
        object.__setattr__(self, "linear", linear)
        object.__setattr__(self, "_fast", _FastConv(self))

    @classmethod
    def from_float(cls, weight, bias, input_qparams: QParams, output_qparams: QParams, *,
                   stride: int = 1, padding: int = 0, groups: int = 1,
                   activation: str = "none", per_channel: bool = True) -> QuantizedConv2d:
        """Quantize a float (folded) convolution: int8 symmetric weights, int32 bias.

        Weights: min-max, symmetric on [-127, 127], per output channel (or per tensor).  The bias
        is quantized at :math:`S_x S_{W,o}` (:func:`qcourse.int_matmul.quantize_bias`); where a
        channel's weights are so small that its bias would not fit int32 (a dead channel after
        batch-norm folding), that channel's weight scale is widened until it does.
        """
        from qcourse.affine import choose_qparams
        from qcourse.int_matmul import quantize_bias

        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 4:
            raise ValueError(f"weight must be 4-D (out, in/groups, kh, kw), got {w.shape}")
        out = w.shape[0]
        xs = float(np.float32(input_qparams.scale))
        wqp = choose_qparams(w, bits=8, signed=True, symmetric=True, narrow_range=True,
                             axis=0 if per_channel else None)
        scale = np.broadcast_to(wqp.scale, (out,)).astype(np.float64)
        b = None if bias is None else np.asarray(bias, dtype=np.float64)
        if b is not None:
            need = np.abs(b) / (xs * 2.0**30)
            scale = np.maximum(scale, need if per_channel else need.max())
        scale = scale.astype(np.float32).astype(np.float64)
        wqp = QParams(scale=scale if per_channel else scale[:1].reshape(()),
                      zero_point=np.zeros(out if per_channel else (), np.int64),
                      qmin=-127, qmax=127, axis=0 if per_channel else None)
        w_q = quantize(w, wqp)
        b_q = None if b is None else quantize_bias(b, xs, wqp.scale)
        return cls(w_q, b_q, input_qparams, wqp, output_qparams, stride, padding, groups,
                   activation)

    @property
    def kind(self) -> str:
        """``"depthwise"``, ``"pointwise"`` (1x1, groups 1) or ``"conv"``."""
        if self.groups > 1:
            return "depthwise"
        return "pointwise" if self.weight_q.shape[2:] == (1, 1) else "conv"

    @property
    def in_channels(self) -> int:
        return self.weight_q.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight_q.shape[0]

    @property
    def float_multiplier(self) -> np.ndarray:
        """:math:`m_o` per output channel, float32, as ONNX Runtime computes it."""
        return self.linear.float_multiplier

    def fixed_point_params(self, rounding: str = "double"):
        """TFLite's per-channel ``(multiplier, shift)`` (see QuantizedLinear)."""
        return self.linear.fixed_point_params(rounding)

    @property
    def output_range(self) -> tuple[int, int]:
        return self.linear.output_range

    def _check_input(self, x_q) -> np.ndarray:
        qp = self.input_qparams
        x = _check_conv_codes("x_q", x_q, 4, "n, h, w, c")
        if x.dtype != storage_dtype(qp.qmin, qp.qmax):
            raise TypeError(f"x_q must have dtype {storage_dtype(qp.qmin, qp.qmax)}, got "
                            f"{x.dtype}")
        if x.shape[3] != self.in_channels:
            raise ValueError(f"x_q must have {self.in_channels} channels on its last axis "
                             f"(NHWC), got shape {x.shape}")
        return x

    def accumulate(self, x_q) -> np.ndarray:
        """int32 accumulators (n, oh, ow, out): :func:`conv2d_accumulate` with this layer."""
        x = self._check_input(x_q)
        return conv2d_accumulate(x, self.weight_q, x_zero_point=int(self.input_qparams.zero_point),
                                 w_zero_point=self.linear.weight_zero_point, bias=self.bias_q,
                                 stride=self.stride, padding=self.padding, groups=self.groups)

    def reference(self, x_q, requantization: str = "float") -> np.ndarray:
        """Integer inference in NumPy with the named requantization (float or TFLite's)."""
        if requantization not in REQUANTIZATIONS:
            raise ValueError(f"requantization must be one of {REQUANTIZATIONS}, got "
                             f"{requantization!r}")
        acc = self.accumulate(x_q)
        lo, hi = self.output_range
        zy = int(self.output_qparams.zero_point)
        dt = storage_dtype(self.output_qparams.qmin, self.output_qparams.qmax)
        if requantization == "float":
            return requantize_float(acc, self.float_multiplier, zy, lo, hi).astype(dt)
        rounding = requantization.removeprefix("tflite_")
        mult, shift = self.fixed_point_params(rounding)
        return requantize_fixed_point(acc, mult, shift, zy, lo, hi,
                                      rounding=rounding).astype(dt)

    def __call__(self, x_q, requantization: str = "float", *, path: str | None = None):
        """Integer inference; ``"float"`` on the compiled kernels, bit for bit
        :meth:`reference`.  The fixed-point requantizations run :meth:`reference`.

        The weights are packed (or, for a depthwise layer, widened) once, when the layer is
        built, and the multipliers computed once: a call checks its input and runs the loop.
        """
        if requantization != "float":
            return self.reference(x_q, requantization)
        x = self._check_input(x_q)
        if self.linear._may_overflow:
            self.accumulate(x)  # raises if this input overflows int32
        return self._fast(x, _path_code(path))


class _FastGemm:
    """A weighted layer's GEMM with the requantization fused, prepared once from its
    :class:`qcourse.int_matmul.QuantizedLinear`: packed weights, float32 multipliers, int32
    bias, the clamp.  A call takes the (m, K) int8 rows (shifted to int8 if the codes were
    uint8, with the shifted zero point) and a path code; nothing is checked or re-derived."""

    def __init__(self, linear: QuantizedLinear):
        from qcourse.kernels import prepack

        self.zp = int(linear.output_qparams.zero_point)
        self.lo, self.hi = linear.output_range
        self.out_dtype = storage_dtype(linear.output_qparams.qmin, linear.output_qparams.qmax)
        self.mult = np.ascontiguousarray(linear.float_multiplier, dtype=np.float32)
        self.bias = np.ascontiguousarray(linear.bias_q, dtype=np.int32)
        zw = linear.weight_zero_point
        self.zw = np.ascontiguousarray(zw, dtype=np.int32) if np.any(zw != 0) else None
        self.packed = prepack(np.ascontiguousarray(linear.weight_q.T))

    def __call__(self, a: np.ndarray, zx: int, code: int) -> np.ndarray:
        from qcourse import _kernels
        from qcourse.kernels import _NO_INT32, _default_threads, _scratch

        p = self.packed
        y = np.empty((a.shape[0], p.n), dtype=np.uint8)
        _kernels.gemm_packed_requant(code, a, _scratch(a.shape[0], p.n), p.data, p.colsum,
                                     self.bias, zx, _NO_INT32 if self.zw is None else self.zw,
                                     self.mult, self.zp, self.lo, self.hi, y,
                                     _default_threads(a.shape[0], p.n, p.k))
        return y.view(self.out_dtype)


class _FastConv:
    """What :meth:`QuantizedConv2d.__call__` needs, prepared once: packed weights (a
    :class:`_FastGemm`) or widened depthwise filters, float32 multipliers, the clamp, and the
    output size for each input size seen.  Runs :func:`conv2d_int8`'s arithmetic without
    re-deriving any of it per call; the caller has checked the input."""

    def __init__(self, layer: QuantizedConv2d):
        out, cg, kh, kw = layer.weight_q.shape
        self.kh, self.kw, self.stride, self.pad = kh, kw, layer.stride, layer.padding
        self.depthwise = layer.groups > 1
        self.pointwise = kh == kw == 1 and self.stride == 1 and self.pad == 0
        self.zx = int(layer.input_qparams.zero_point)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._gather: dict[tuple[int, int, int], np.ndarray] = {}
        if self.depthwise:
            self.zp = int(layer.output_qparams.zero_point)
            self.lo, self.hi = layer.output_range
            self.out_dtype = storage_dtype(layer.output_qparams.qmin,
                                           layer.output_qparams.qmax)
            self.mult = np.ascontiguousarray(layer.float_multiplier, dtype=np.float32)
            self.bias = np.ascontiguousarray(layer.bias_q, dtype=np.int32)
            zw = layer.linear.weight_zero_point
            self.wz = np.ascontiguousarray((layer.weight_q[:, 0].astype(np.int16)
                                            - zw[:, None, None]).transpose(1, 2, 0),
                                           dtype=np.int16)
        else:
            self.gemm = _FastGemm(layer.linear)

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        size = self._sizes.get((h, w))
        if size is None:
            size = self._sizes[h, w] = (
                conv_output_size(h, self.kh, self.stride, self.pad, "height"),
                conv_output_size(w, self.kw, self.stride, self.pad, "width"))
        return size

    def _patches(self, x: np.ndarray, zx: int, oh: int, ow: int) -> np.ndarray:
        """:func:`im2col`'s (n * oh * ow, kh * kw * c) rows, by one gather from the input
        padded with ``zx``; the gather's indices are computed once per input size."""
        n, h, w, c = x.shape
        p, s = self.pad, self.stride
        idx = self._gather.get((h, w, c))
        if idx is None:
            wp = w + 2 * p
            i = (np.arange(oh)[:, None, None, None, None] * s + np.arange(self.kh)[:, None, None])
            j = (np.arange(ow)[None, :, None, None, None] * s + np.arange(self.kw)[:, None])
            idx = ((i * wp + j) * c + np.arange(c)).reshape(oh * ow, -1).astype(np.intp)
            self._gather[h, w, c] = idx
        padded = np.full((n, h + 2 * p, w + 2 * p, c), zx, dtype=np.int8)
        padded[:, p:p + h, p:p + w] = x
        return padded.reshape(n, -1)[:, idx].reshape(n * oh * ow, -1)

    def __call__(self, x: np.ndarray, code: int) -> np.ndarray:
        from qcourse import _kernels

        x, zx = _shift_to_int8(x, self.zx)
        n, h, w, c = x.shape
        oh, ow = self._out_size(h, w)
        if self.depthwise:
            y = np.empty((n, oh, ow, c), dtype=np.uint8)
            _kernels.depthwise_requant(code, np.ascontiguousarray(x), self.wz, self.bias,
                                       self.mult, zx, self.zp, self.lo, self.hi, self.stride,
                                       self.pad, y)
            return y.view(self.out_dtype)
        if self.pointwise:
            a = np.ascontiguousarray(x).reshape(n * oh * ow, c)
        else:
            a = self._patches(x, zx, oh, ow)
        y = self.gemm(a, zx, code)
        return y.reshape(n, oh, ow, y.shape[1])


@dataclass(frozen=True)
class IntegerGlobalAvgPool:
    r"""Global average pooling on 8-bit codes, output on the input's grid (same scale and zero
    point, as TFLite's ``AVERAGE_POOL_2D`` requires).  NHWC in, (n, c) out.

    The mean of codes is the code of the mean (the affine map commutes with averaging); what
    differs between runtimes is where the zero point goes and how the quotient is rounded,
    which decides every exact tie (with :math:`hw = 16`, a sum that is 8 modulo 16):

    * ``"float"``, ONNX Runtime's ``QLinearGlobalAveragePool`` (com.microsoft; MLAS): the zero
      point is taken out in int32, the rest multiplied by the float32 scale
      :math:`m = S_x / (S_y \cdot hw)` and rounded half to even, the zero point added back:

      .. math:: q_{y,c} = Z + \mathrm{rhe}\Big(\mathrm{f32}\big(\textstyle\sum_{i,j} q_{x,i,j,c}
                - hw\, Z\big) \cdot m\Big)

      On a tie this is *not* ``rhe(sum / hw)`` when :math:`Z` is odd (the parity of the nearest
      even integer moves with :math:`Z`);
    * the TFLite requantizations: ``AVERAGE_POOL_2D``'s integer kernels (the reference, the
      built-in optimized and XNNPACK's all measured to agree): the raw codes summed and divided
      with ties away from zero, ``(sum + hw/2) / hw`` for a positive sum, ``(sum - hw/2) / hw``
      (truncating) for a negative one.

    ``tests/test_conv.py`` compares the first with ONNX Runtime and the second with LiteRT's
    three op resolvers, on random and tie-heavy codes with odd and even zero points.
    """

    qparams: QParams

    kind = "pool"

    def __post_init__(self):
        _per_tensor_qparams(self.qparams, "qparams")

    def __call__(self, x_q, requantization: str = "float", *, path: str | None = None):
        if requantization not in REQUANTIZATIONS:
            raise ValueError(f"requantization must be one of {REQUANTIZATIONS}, got "
                             f"{requantization!r}")
        x = _check_conv_codes("x_q", x_q, 4, "n, h, w, c")
        count = x.shape[1] * x.shape[2]
        if count >= 1 << 24:
            raise ValueError(f"x_q has {count} pixels per channel; at most 2**24 - 1 can be "
                             f"averaged exactly (shape {x.shape})")
        total = x.astype(np.int64).sum(axis=(1, 2))
        qp = self.qparams
        if requantization == "float":
            zp, scale = int(qp.zero_point), np.float32(qp.scale)
            m = scale / (scale * np.float32(count))          # float32 steps, as MLAS
            v = (total - count * zp).astype(np.float32) * m
            q = np.clip(np.rint(v), qp.qmin - zp, qp.qmax - zp) + zp
        else:
            q = np.sign(total) * ((np.abs(total) + count // 2) // count)
        return q.astype(x.dtype)

    reference = __call__


def _per_tensor_qparams(qparams, name: str) -> QParams:
    check_instance(qparams, name, QParams, "a qcourse.affine.QParams")
    if np.size(qparams.scale) != 1:
        raise ValueError(f"{name} must be per tensor (one scale), got {np.size(qparams.scale)} "
                         f"scales")
    return qparams


def _linear_step(gemm: _FastGemm, zx: int, q: np.ndarray, code: int) -> np.ndarray:
    a, zx = _shift_to_int8(np.ascontiguousarray(q.reshape(q.shape[0], -1)), zx)
    return gemm(a, zx, code)


def _checked_step(layer, q: np.ndarray, code: int) -> np.ndarray:
    if isinstance(layer, QuantizedLinear):
        return layer(q.reshape(q.shape[0], -1))
    return layer(q, path=_PATH_NAMES[code])


@dataclass(eq=False)
class IntegerCNN:
    """A CNN that runs on integers end to end: float images in, int8 logits out.

    ``input_qparams`` quantizes the float NCHW images once (to NHWC codes); ``layers`` is a list
    of ``(name, layer)`` with each layer a :class:`QuantizedConv2d`, an
    :class:`IntegerGlobalAvgPool` or a :class:`qcourse.int_matmul.QuantizedLinear` (the
    classifier, on the pooled (n, c) codes): each layer's output codes are the next one's input
    codes.  Built from a trained float model by :func:`qcourse.cnn.convert_cnn`; read by an
    exporter as it is.  ``requantization`` is one of
    :data:`qcourse.int_matmul.REQUANTIZATIONS`.
    """

    input_qparams: QParams
    layers: list
    requantization: str = "float"

    def __post_init__(self):
        _per_tensor_qparams(self.input_qparams, "input_qparams")
        layers = check_sequence(self.layers, "layers", min_len=1)
        for i, item in enumerate(layers):     # what each layer is, its user finds out
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"layers[{i}] must be a (name, layer) pair, got "
                                f"{describe(item)}")
        check_choice(self.requantization, "requantization", REQUANTIZATIONS)

    def quantize_input(self, X) -> np.ndarray:
        """Float NCHW images -> int8 NHWC codes (round half to even, saturate)."""
        X = np.asarray(X)
        if X.ndim != 4:
            raise ValueError(f"X must be 4-D float images (n, c, h, w), got shape {X.shape}")
        first = self.layers[0][1]
        if hasattr(first, "in_channels") and X.shape[1] != first.in_channels:
            raise ValueError(f"X must be NCHW with {first.in_channels} channel(s) on axis 1, got "
                             f"shape {X.shape} (an NHWC array must be transposed first)")
        q = quantize(X.transpose(0, 2, 3, 1), self.input_qparams)
        return np.ascontiguousarray(q.astype(storage_dtype(self.input_qparams.qmin,
                                                           self.input_qparams.qmax)))

    def _steps(self) -> list:
        """One prepared callable ``(codes, path code) -> codes`` per layer, for the compiled
        float-requantization path.  Made once (again if :attr:`layers` changes): each layer's
        output is the next one's input by construction, so only the network's input is
        checked; a layer whose int32 accumulator could overflow keeps its checked call."""
        key = tuple(id(layer) for _, layer in self.layers)
        if getattr(self, "_steps_key", None) != key:
            steps = []
            for name, layer in self.layers:
                if isinstance(layer, QuantizedConv2d) and not layer.linear._may_overflow:
                    step = layer._fast
                elif isinstance(layer, QuantizedLinear) and not layer._may_overflow:
                    step = functools.partial(_linear_step, _FastGemm(layer),
                                             int(layer.input_qparams.zero_point))
                else:
                    step = functools.partial(_checked_step, layer)
                steps.append((name, step))
            self._steps_cache, self._steps_key = steps, key
        return self._steps_cache

    def _run(self, X, reference: bool, times: dict | None, path: str | None = None):
        q = self.quantize_input(X)
        if not reference and self.requantization == "float" and times is None:
            code = _path_code(path)
            for _, step in self._steps():
                q = step(q, code)
            return q
        for name, layer in self.layers:
            t0 = time.perf_counter()
            if isinstance(layer, QuantizedLinear):
                q = q.reshape(q.shape[0], -1)
                q = (layer.reference(q, self.requantization) if reference
                     else layer(q, self.requantization))
            elif reference:
                q = layer.reference(q, self.requantization)
            else:
                q = layer(q, self.requantization, path=path)
            if times is not None:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return q

    def logits_codes(self, X, *, path: str | None = None) -> np.ndarray:
        """The int8 output codes of the last layer, through the compiled kernels."""
        return self._run(X, False, None, path)

    def logits_codes_reference(self, X) -> np.ndarray:
        """The same codes computed by every layer's NumPy reference."""
        return self._run(X, True, None)

    def logits(self, X) -> np.ndarray:
        """Dequantized logits (float32)."""
        last = self.layers[-1][1]
        return dequantize(self.logits_codes(X), last.output_qparams)

    def __call__(self, X) -> np.ndarray:
        """The int8 logits codes (:meth:`logits_codes`): the model is a callable that maps a batch
        to logits, so :func:`qcourse.nn.predict` and :func:`qcourse.nn.accuracy` apply to it
        (the argmax of the codes is the argmax of the dequantized logits: one scale)."""
        return self.logits_codes(X)

    def summary(self) -> list[dict]:
        """One dict per layer: what an exporter needs, in plain Python values.

        Keys: ``name``, ``kind`` (conv, depthwise, pointwise, pool, linear), ``weight_shape``,
        ``stride``, ``padding``, ``groups``, ``input_scale``, ``input_zero_point``,
        ``output_scale``, ``output_zero_point``, ``multiplier_min``/``max`` (ONNX Runtime's
        float32 :math:`m_o`), ``clamp`` (the output range after the fused activation),
        ``activation``.
        """
        rows = []
        qp = self.input_qparams
        for name, layer in self.layers:
            row = {"name": name, "input_scale": float(qp.scale),
                   "input_zero_point": int(qp.zero_point)}
            if isinstance(layer, IntegerGlobalAvgPool):
                row.update(kind="pool", weight_shape=None, stride=None, padding=None,
                           groups=None, output_scale=float(qp.scale),
                           output_zero_point=int(qp.zero_point), multiplier_min=None,
                           multiplier_max=None, clamp=(qp.qmin, qp.qmax), activation="none")
            else:
                conv = isinstance(layer, QuantizedConv2d)
                m = layer.float_multiplier
                row.update(kind=layer.kind if conv else "linear",
                           weight_shape=tuple(layer.weight_q.shape),
                           stride=layer.stride if conv else None,
                           padding=layer.padding if conv else None,
                           groups=layer.groups if conv else None,
                           output_scale=float(layer.output_qparams.scale),
                           output_zero_point=int(layer.output_qparams.zero_point),
                           multiplier_min=float(m.min()), multiplier_max=float(m.max()),
                           clamp=layer.output_range, activation=layer.activation)
                qp = layer.output_qparams
            rows.append(row)
        return rows

    def macs(self, image_shape) -> dict[str, int]:
        """Multiply-accumulates per image of each weighted layer, for images of ``image_shape``
        (c, h, w): output pixels times the weights each output reads."""
        c, h, w = (int(v) for v in image_shape)
        out = {}
        for name, layer in self.layers:
            if isinstance(layer, QuantizedConv2d):
                kh, kw = layer.weight_q.shape[2:]
                h = conv_output_size(h, kh, layer.stride, layer.padding, "height")
                w = conv_output_size(w, kw, layer.stride, layer.padding, "width")
                out[name] = h * w * layer.weight_q.size
            elif isinstance(layer, QuantizedLinear):
                out[name] = layer.weight_q.size
        return out

    def layer_times(self, X, repeat: int = 3) -> dict[str, float]:
        """Seconds per layer (the fastest of ``repeat`` runs) for one pass over ``X``."""
        best: dict[str, float] = {}
        for _ in range(check_int(repeat, "repeat", 1, 10**6)):
            times: dict[str, float] = {}
            self._run(X, False, times)
            best = {k: min(v, best.get(k, np.inf)) for k, v in times.items()}
        return best
