"""int8 depthwise convolution (NHWC) with requantization fused, and its NumPy
reference.

Re-exported by :mod:`qcourse.kernels`; see the conv chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse import _checks, _kernels
from qcourse.kernels.matmul import (
    _INT8,
    PackedB,
    _path_code,
    _requant_args,
)

__all__ = [
    "depthwise_conv_int8",
    "depthwise_conv_int8_reference",
]

# --- Depthwise convolution -----------------------------------------------------------------------

def _depthwise_args(x, w, multiplier, output_zero_point, bias, x_zero_point, w_zero_point,
                    stride, padding, out_dtype, qmin, qmax):
    """Validate the depthwise arguments; return what the loop takes (see depthwise_conv_int8)."""
    _checks.check_ndarray(x, "x (NHWC: n, h, w, c)", _INT8, ndim=4)
    _checks.check_ndarray(w, "w (kh, kw, c)", _INT8, ndim=3)
    c = x.shape[3]
    if w.shape[2] != c:
        raise ValueError(f"w has {w.shape[2]} channels (axis 2) but x has {c} (axis 3, NHWC): a "
                         f"depthwise convolution has one filter per channel")
    stride = _checks.check_int(stride, "stride", 1, 2**20)
    padding = _checks.check_int(padding, "padding", 0, 2**20)
    (kh, kw), (h, wd) = w.shape[:2], x.shape[1:3]
    if h + 2 * padding < kh or wd + 2 * padding < kw:
        raise ValueError(f"the {kh}x{kw} filter does not fit the {h}x{wd} input with padding "
                         f"{padding}")
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    shape_only = PackedB._from_packing(kh * kw, c, np.zeros(0, np.uint8), np.zeros(0, np.int32))
    out_dtype, qmin, qmax, zp, mult, bias, za, zb = _requant_args(
        shape_only, multiplier, output_zero_point, bias, x_zero_point, w_zero_point, out_dtype,
        qmin, qmax)
    mult = np.ascontiguousarray(np.broadcast_to(mult, (c,)))
    zw = zb if zb.size else np.zeros(c, np.int32)
    wz = (w.astype(np.int16) - zw.astype(np.int16)).astype(np.int16)
    return (np.ascontiguousarray(x), np.ascontiguousarray(wz), bias, mult, za, zp, qmin, qmax,
            stride, padding, oh, ow, out_dtype)


def depthwise_conv_int8_reference(x, w, multiplier, output_zero_point: int = 0, *, bias=None,
                                  x_zero_point: int = 0, w_zero_point=None, stride: int = 1,
                                  padding: int = 0, out_dtype=np.int8, qmin: int | None = None,
                                  qmax: int | None = None) -> np.ndarray:
    r"""NumPy reference of :func:`depthwise_conv_int8` (same arguments, same bytes): the taps
    gathered by slicing the zero-point-padded input, :math:`(x - z_x)(w - z_w)` summed in int64,
    requantized as :func:`matmul_int8_requant_reference` does."""
    (x, wz, bias, mult, za, zp, qmin, qmax, stride, padding, oh, ow,
     out_dtype) = _depthwise_args(x, w, multiplier, output_zero_point, bias, x_zero_point,
                                  w_zero_point, stride, padding, out_dtype, qmin, qmax)
    n, h, wd, c = x.shape
    xp = np.pad(x.astype(np.int64) - za, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    acc = np.zeros((n, oh, ow, c), np.int64)
    for u in range(wz.shape[0]):
        for v in range(wz.shape[1]):
            tap = xp[:, u:u + stride * oh:stride, v:v + stride * ow:stride, :]
            acc += tap * wz[u, v].astype(np.int64)
    if bias.size:
        acc += bias.astype(np.int64)
    f = ((acc & 0xFFFFFFFF).astype(np.uint32).view(np.int32)).astype(np.float32) * mult
    q = np.rint(np.clip(f, np.float32(qmin - zp), np.float32(qmax - zp))) + zp
    return q.astype(np.int32).astype(out_dtype)


def depthwise_conv_int8(x, w, multiplier, output_zero_point: int = 0, *, bias=None,
                        x_zero_point: int = 0, w_zero_point=None, stride: int = 1,
                        padding: int = 0, out_dtype=np.int8, qmin: int | None = None,
                        qmax: int | None = None, path: str | None = None) -> np.ndarray:
    r"""int8 depthwise convolution (NHWC) with requantization fused, compiled.

    .. math::

        v_{n,i,j,c} = b_c + \sum_{u,v} (x_{n,\,s i + u - p,\,s j + v - p,\,c} - z_x)
                      (w_{u,v,c} - z_{w,c}), \qquad
        y = \mathrm{clamp}\big(\mathrm{rhe}(\mathrm{f32}(v) \cdot m_c) + z_y,
            q_{\min}, q_{\max}\big)

    with the input padded by its zero point (padded taps add nothing); ``x`` (n, h, w, c) and
    ``w`` (kh, kw, c) int8, ``multiplier`` one float or one per channel (float32), ``bias``
    int32 (c,); requantized as :func:`matmul_int8_requant` (ONNX Runtime's QLinearConv).  No
    GEMM serves this layer: the loop runs across channels, vectorized per instruction set
    (``path``; every path gives the same bytes).  Single-threaded.  See the conv chapter."""
    (x, wz, bias, mult, za, zp, qmin, qmax, stride, padding, oh, ow,
     out_dtype) = _depthwise_args(x, w, multiplier, output_zero_point, bias, x_zero_point,
                                  w_zero_point, stride, padding, out_dtype, qmin, qmax)
    code = _path_code(path)
    y = np.empty((x.shape[0], oh, ow, x.shape[3]), dtype=np.uint8)
    _kernels.depthwise_requant(code, x, wz, bias, mult, za, zp, qmin, qmax, stride, padding, y)
    return y.view(out_dtype)
