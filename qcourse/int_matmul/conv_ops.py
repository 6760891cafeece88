"""The ONNX convolution operators ``ConvInteger`` and ``QLinearConv``.

The whole operator definitions (any spatial rank, asymmetric pads, dilations, groups,
``auto_pad``) as an im2col gather and one exact integer product per group, requantized as
:func:`qcourse.int_matmul.qlinear_matmul` is (ONNX Runtime's float multiplier, round half to
even): :func:`conv_integer` and :func:`qlinear_conv_reference`, in plain NumPy.
:func:`qlinear_conv` checks its arguments by the same rules (``_qlinear_conv_operands``) and
runs the 2-D cases on the conv chapter's compiled kernels (:func:`qcourse.conv.conv2d_int8`),
as :func:`qcourse.int_matmul.qlinear_matmul` runs on the GEMM.  Every ONNX backend test case of
both operators that ships in the ``onnx`` wheel runs through them in
``tests/test_onnx_operators.py``.  Re-exported by :mod:`qcourse.int_matmul`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from qcourse._checks import (
    INT32_MAX,
    MAX_ELEMENTS,
    check_choice,
    check_int,
    check_sequence,
    is_int,
    onnx_scale,
)
from qcourse.int_matmul.arithmetic import (
    _OVERFLOW,
    _QTYPES,
    _check_zero_point,
    _quant_tensor,
    _to_int32,
    float_multiplier,
    requantize_float,
)
from qcourse.int_matmul.onnx import _OP_SCALES

__all__ = ["conv_integer", "qlinear_conv", "qlinear_conv_reference"]

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


#: Largest stride, dilation, kernel side and pad of a convolution attribute (as
#: :data:`qcourse.conv.MAX_SIDE`); the padded input may hold at most 2**28 elements.
_MAX_ATTRIBUTE = 2**20


def _int_list(name: str, value, d: int, default: int, minimum: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * d
    items = [value] if is_int(value) else check_sequence(value, name)
    items = [check_int(v, f"{name}[{i}]", minimum, _MAX_ATTRIBUTE) for i, v in enumerate(items)]
    if len(items) != d:
        raise ValueError(f"{name} must be {d} ints >= {minimum} (one per spatial axis), got "
                         f"{value!r}")
    return tuple(items)


@dataclass(frozen=True)
class _ConvGeometry:
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    out: tuple[int, ...]


def _conv_geometry(x_shape, w_shape, auto_pad, dilations, group, kernel_shape, pads,
                   strides) -> _ConvGeometry:
    """The ONNX ``Conv`` attribute rules: shapes, defaults, auto_pad, output size."""
    if len(x_shape) < 3 or len(w_shape) != len(x_shape):
        raise ValueError(f"x must be (N, C, D1, ...) with at least one spatial axis and w "
                         f"(M, C/group, k1, ...) of the same rank; got x {x_shape}, w {w_shape}")
    d = len(x_shape) - 2
    if isinstance(group, bool) or not isinstance(group, numbers.Integral) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    group = int(group)
    if x_shape[1] != w_shape[1] * group or w_shape[0] % group:
        raise ValueError(f"x has {x_shape[1]} channels and w {w_shape[1]} per group with "
                         f"group={group} and {w_shape[0]} outputs: need C = group * w.shape[1] "
                         f"and M divisible by group")
    k = tuple(int(v) for v in w_shape[2:])
    if kernel_shape is not None and _int_list("kernel_shape", kernel_shape, d, 1, 1) != k:
        raise ValueError(f"kernel_shape {kernel_shape!r} does not match w's spatial shape {k}")
    strides = _int_list("strides", strides, d, 1, 1)
    dilations = _int_list("dilations", dilations, d, 1, 1)
    check_choice(auto_pad, "auto_pad", _AUTO_PADS)
    span = [(kk - 1) * dl + 1 for kk, dl in zip(k, dilations, strict=True)]
    if auto_pad == "NOTSET":
        p = _int_list("pads", pads, 2 * d, 0, 0)
        begin, end = p[:d], p[d:]
    else:
        if pads is not None:
            raise ValueError(f"pads must be absent when auto_pad={auto_pad!r} (ONNX)")
        size = x_shape[2:]
        if auto_pad == "VALID":
            begin = end = (0,) * d
        else:
            total = [max(0, (-(-n // st) - 1) * st + sp - n)
                     for n, st, sp in zip(size, strides, span, strict=True)]
            lo = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
            begin, end = tuple(lo), tuple(t - b for t, b in zip(total, lo, strict=True))
    padded = x_shape[0] * x_shape[1] * int(np.prod([n + b + e for n, b, e in zip(
        x_shape[2:], begin, end, strict=True)], dtype=object))
    if padded > MAX_ELEMENTS:
        raise ValueError(f"pads {begin + end} would make the padded input hold {padded} "
                         f"elements, more than MAX_ELEMENTS ({MAX_ELEMENTS})")
    out = tuple((n + b + e - sp) // st + 1 for n, b, e, sp, st
                in zip(x_shape[2:], begin, end, span, strides, strict=True))
    if min(out) < 1:
        raise ValueError(f"the kernel (dilated extent {tuple(span)}) does not fit the padded "
                         f"input {x_shape[2:]} with pads {begin + end}")
    return _ConvGeometry(group, strides, dilations, begin, end, out)


def _conv_int64(xc: np.ndarray, wc: np.ndarray, g: _ConvGeometry) -> np.ndarray:
    """Exact int64 convolution of zero-point-free operands (padding with 0), by im2col."""
    n, c = xc.shape[:2]
    m, cg = wc.shape[:2]
    k = wc.shape[2:]
    xp = np.pad(xc, [(0, 0), (0, 0)] + list(zip(g.begin, g.end, strict=True)))
    cols = []
    for offs in np.ndindex(*k):
        window = tuple(slice(o * dl, o * dl + (size - 1) * st + 1, st)
                       for o, dl, st, size in zip(offs, g.dilations, g.strides, g.out,
                                                  strict=True))
        cols.append(xp[(slice(None), slice(None)) + window])
    patches = np.stack(cols, axis=2).reshape(n, c, len(cols), -1)   # (N, C, K, P)
    mg = m // g.group
    outs = []
    for i in range(g.group):
        a = patches[:, i * cg:(i + 1) * cg].reshape(n, cg * len(cols), -1)
        outs.append(np.matmul(wc[i * mg:(i + 1) * mg].reshape(mg, -1), a))
    return np.concatenate(outs, axis=1).reshape((n, m) + g.out)


def _conv_inputs(x, w, x_zero_point, w_zero_point, attrs):
    """The checked tensors, geometry and zero points (``zx`` 0-d, ``zw`` shaped to broadcast
    against ``w``) of ``ConvInteger`` and ``QLinearConv``: one set of argument rules."""
    x = _quant_tensor(x, "x")
    w = _quant_tensor(w, "w")
    g = _conv_geometry(x.shape, w.shape, **attrs)
    zx = (np.asarray(0, np.int64) if x_zero_point is None
          else _check_zero_point(x_zero_point, "x_zero_point", "x", x.dtype))
    if zx.size != 1:
        raise ValueError(f"x_zero_point must be a scalar (per tensor), got shape {zx.shape}")
    zw = (np.asarray(0, np.int64) if w_zero_point is None
          else _check_zero_point(w_zero_point, "w_zero_point", "w", w.dtype))
    if zw.size not in (1, w.shape[0]) or zw.ndim > 1:
        raise ValueError(f"w_zero_point must be a scalar or one per output channel "
                         f"({w.shape[0]},), got shape {zw.shape}")
    return x, w, g, zx.reshape(()), zw.reshape((-1,) + (1,) * (w.ndim - 1))


def _conv_operands(x, w, x_zero_point, w_zero_point, attrs):
    x, w, g, zx, zw = _conv_inputs(x, w, x_zero_point, w_zero_point, attrs)
    acc = _conv_int64(x.astype(np.int64) - zx, w.astype(np.int64) - zw, g)
    return x, w, acc


def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET",
                 dilations=None, group=1, kernel_shape=None, pads=None, strides=None,
                 overflow="raise") -> np.ndarray:
    r"""The ONNX ``ConvInteger`` operator: the exact int32 convolution of zero-point-shifted
    integers.

    .. math::
        y_{n,m,\mathbf{o}} = \sum_{c,\mathbf{k}} \big(x_{n,c,\mathbf{o}\mathbf{s}
        + \mathbf{k}\mathbf{d} - \mathbf{p}} - Z_x\big)\big(w_{m,c,\mathbf{k}} - Z_{w,m}\big)

    with the input padded by :math:`Z_x` (so a padded position contributes 0), channels split
    into ``group`` groups, any number of spatial axes (NCHW for 2-D).  Arguments in the
    operator's order and with its attribute names: ``x`` (N, C, D1, ...) and ``w``
    (M, C/group, k1, ...) uint8 or int8; ``x_zero_point`` per tensor; ``w_zero_point`` per
    tensor or per output channel; ``pads`` [b1, ..., e1, ...]; ``auto_pad`` ``"NOTSET"``,
    ``"SAME_UPPER"``, ``"SAME_LOWER"`` or ``"VALID"``.  The sum is exact (int64) and must fit
    int32 unless ``overflow="wrap"`` (ONNX leaves overflow to the implementation).  The
    computation is an im2col gather followed by one integer matrix product per group -- the
    conv chapter's construction, in plain NumPy; see the int_matmul chapter for the
    zero-point algebra.

    Returns
    -------
    numpy.ndarray, int32, shape (N, M, O1, ...)
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group,
                 kernel_shape=kernel_shape, pads=pads, strides=strides)
    _, _, acc = _conv_operands(x, w, x_zero_point, w_zero_point, attrs)
    return _to_int32(acc, overflow, "ConvInteger's sum")


@dataclass(frozen=True)
class _QLinearConvOperands:
    """The checked operands of one ``QLinearConv``: what any implementation of it computes with."""

    x: np.ndarray              # (N, C, D1, ...) uint8 or int8
    w: np.ndarray              # (M, C/group, k1, ...) uint8 or int8
    geometry: _ConvGeometry
    x_zero_point: int
    w_zero_point: np.ndarray   # int64 (M,)
    bias: np.ndarray | None    # int32 (M,)
    multiplier: np.ndarray     # float32 (M,): fl(fl(S_x S_w,m) / S_y)
    y_zero_point: np.ndarray   # 0-d, of the output dtype


def _qlinear_conv_operands(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
                           y_zero_point, B=None, *, auto_pad="NOTSET", dilations=None, group=1,
                           kernel_shape=None, pads=None, strides=None) -> _QLinearConvOperands:
    """Check the inputs and attributes of ``QLinearConv`` and return them ready to compute
    with: the geometry, integer zero points, the int32 bias and ONNX Runtime's float32
    multiplier per output channel.  :func:`qlinear_conv` and :func:`qlinear_conv_reference` both
    start here, so the operator has one set of argument rules."""
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group,
                 kernel_shape=kernel_shape, pads=pads, strides=strides)
    x, w, g, zx, zw = _conv_inputs(x, w, x_zero_point, w_zero_point, attrs)
    m = w.shape[0]
    sx = onnx_scale(x_scale, "x_scale", _OP_SCALES)
    sw = onnx_scale(w_scale, "w_scale", _OP_SCALES)
    sy = onnx_scale(y_scale, "y_scale", _OP_SCALES)
    for name, arr, sizes in (("x_scale", sx, (1,)), ("w_scale", sw, (1, m)),
                             ("y_scale", sy, (1,))):
        if arr.size not in sizes or arr.ndim > 1:
            what = "a scalar or one per output channel" if len(sizes) > 1 else "a scalar"
            raise ValueError(f"{name} must be {what}, got shape {arr.shape}")
    if not isinstance(y_zero_point, np.ndarray | np.generic) or \
            np.asarray(y_zero_point).dtype not in _QTYPES or np.asarray(y_zero_point).size != 1:
        raise TypeError("y_zero_point must be a uint8 or int8 NumPy scalar (its dtype is the "
                        f"output type), got {type(y_zero_point).__name__}")
    bias = None
    if B is not None:
        bias = np.asarray(B)
        if bias.dtype != np.int32 or bias.shape != (m,):
            raise TypeError(f"B must be an int32 array of shape ({m},), got {bias.dtype} "
                            f"{bias.shape}")
    mult = np.broadcast_to(float_multiplier(sx.reshape(()), sw.reshape(-1), sy.reshape(())),
                           (m,))
    return _QLinearConvOperands(x, w, g, int(zx),
                                np.broadcast_to(zw.astype(np.int64).reshape(-1), (m,)), bias,
                                mult, np.asarray(y_zero_point).reshape(()))


def qlinear_conv_reference(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
                           y_zero_point, B=None, *, auto_pad="NOTSET", dilations=None, group=1,
                           kernel_shape=None, pads=None, strides=None,
                           overflow="raise") -> np.ndarray:
    r"""ONNX ``QLinearConv`` in plain NumPy: the twin of :func:`qlinear_conv`.

    :func:`conv_integer`'s exact accumulators (an im2col gather and one integer product per
    group) plus the int32 bias, the multiplier of :func:`float_multiplier` and the
    requantization of :func:`requantize_float`, composed, for the whole operator definition (any
    spatial rank, asymmetric pads, dilations, groups, auto_pad).  Same signature and result as
    :func:`qlinear_conv`; see it for the semantics.
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    ops = _qlinear_conv_operands(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
                                 y_zero_point, B, auto_pad=auto_pad, dilations=dilations,
                                 group=group, kernel_shape=kernel_shape, pads=pads,
                                 strides=strides)
    zw = ops.w_zero_point.reshape((-1,) + (1,) * (ops.w.ndim - 1))
    acc = _conv_int64(ops.x.astype(np.int64) - ops.x_zero_point, ops.w.astype(np.int64) - zw,
                      ops.geometry)
    if ops.bias is not None:
        acc = acc + ops.bias.astype(np.int64).reshape((1, -1) + (1,) * (acc.ndim - 2))
    acc = _to_int32(acc, overflow, "QLinearConv's integer sum")
    mult = ops.multiplier.reshape((1, -1) + (1,) * (acc.ndim - 2))
    info = np.iinfo(ops.y_zero_point.dtype)
    y = requantize_float(acc, mult, int(ops.y_zero_point), int(info.min), int(info.max))
    return y.astype(ops.y_zero_point.dtype)


def _fits_the_kernels(ops: _QLinearConvOperands) -> bool:
    """2-D, equal strides, the same padding on every side, no dilation, and a sum that cannot
    leave int32: what :func:`qcourse.conv.conv2d_int8` computes."""
    g = ops.geometry
    if ops.x.ndim != 4 or ops.x.size == 0 or ops.w.size == 0 or set(g.dilations) != {1} or \
            len(set(g.strides)) != 1 or len(set(g.begin + g.end)) != 1:
        return False
    k = int(np.prod(ops.w.shape[1:]))
    span_x = int(np.max(np.abs(ops.x.astype(np.int64) - ops.x_zero_point)))
    span_w = int(np.max(np.abs(ops.w.astype(np.int64)
                               - ops.w_zero_point.reshape((-1,) + (1,) * (ops.w.ndim - 1)))))
    span_b = 0 if ops.bias is None else int(np.max(np.abs(ops.bias.astype(np.int64))))
    return k * span_x * span_w + span_b <= INT32_MAX


def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
                 B=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                 pads=None, strides=None, overflow="raise") -> np.ndarray:
    r"""The ONNX ``QLinearConv`` operator, bit for bit as ONNX Runtime computes it.

    .. math::
        y = \operatorname{saturate}\Big(\operatorname{rne}\big(\mathrm{fl}(\mathrm{fl}(v)
            \cdot m_m)\big) + Z_y\Big),\quad v = B_m + \operatorname{ConvInteger}(x, w),\quad
        m_m = \mathrm{fl}\big(\mathrm{fl}(S_x S_{w,m}) / S_y\big)

    :func:`conv_integer`'s exact accumulators plus the int32 bias ``B`` (scale
    :math:`S_x S_w`, one per output channel), requantized by :func:`requantize_float` with the
    multiplier of :func:`float_multiplier` (per output channel when ``w_scale`` is) -- the
    arithmetic of :func:`qlinear_matmul`, over im2col patches.  Arguments in the operator's
    order and with its attribute names: ``x`` (N, C, D1, ...) and ``w`` (M, C/group, k1, ...)
    uint8 or int8; scales float32 (or float16, widened exactly), ``w_scale`` and
    ``w_zero_point`` per tensor or per output channel; ``B`` int32 (M,); ``y_zero_point``'s
    dtype (uint8 or int8) is the output type; ``pads`` [b1, ..., e1, ...]; ``auto_pad``
    ``"NOTSET"``, ``"SAME_UPPER"``, ``"SAME_LOWER"`` or ``"VALID"``.  The sum must fit int32
    unless ``overflow="wrap"``.

    A 2-D convolution with equal strides, the same padding on every side, no dilation and a sum
    that cannot leave int32 runs on the conv chapter's compiled NHWC kernels
    (:func:`qcourse.conv.conv2d_int8`: im2col onto the int8 GEMM with fused requantization, or
    the depthwise kernel; the input is transposed once, the output back; uint8 operands shifted
    by 128, which leaves every difference to a zero point unchanged); everything else on its
    NumPy twin :func:`qlinear_conv_reference`, which is the whole operator definition.  Both
    check their arguments with the same rules (``_qlinear_conv_operands``).

    Returns
    -------
    numpy.ndarray of ``y_zero_point``'s dtype, shape (N, M, O1, ...)
    """
    check_choice(overflow, "overflow", _OVERFLOW)
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group,
                 kernel_shape=kernel_shape, pads=pads, strides=strides)
    ops = _qlinear_conv_operands(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
                                 y_zero_point, B, **attrs)
    if not _fits_the_kernels(ops):
        return qlinear_conv_reference(x, x_scale, x_zero_point, w, w_scale, w_zero_point,
                                      y_scale, y_zero_point, B, overflow=overflow, **attrs)
    from qcourse.conv import conv2d_int8  # the same layer; imported here (it imports us)

    w8, zw = ops.w, ops.w_zero_point
    if w8.dtype == np.uint8:
        w8, zw = (w8.astype(np.int16) - 128).astype(np.int8), zw - 128
    y = conv2d_int8(np.ascontiguousarray(ops.x.transpose(0, 2, 3, 1)), w8,
                    ops.multiplier.astype(np.float64), int(ops.y_zero_point), bias=ops.bias,
                    x_zero_point=ops.x_zero_point, w_zero_point=zw if np.any(zw) else None,
                    stride=ops.geometry.strides[0], padding=ops.geometry.begin[0],
                    groups=ops.geometry.group, out_dtype=ops.y_zero_point.dtype)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
