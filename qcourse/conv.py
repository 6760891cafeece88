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

The module has four parts:

* **gathering**: :func:`conv_output_size`, :func:`im2col`;
* **integer convolution** on int8 codes in NHWC (channels last, the layout in which a pointwise
  convolution is a plain GEMM and a depthwise one is contiguous): :func:`conv2d_int32_reference`
  (exact accumulators, NumPy), :func:`conv2d_int8` (im2col onto the compiled GEMM with fused
  requantization, or the depthwise kernel), :func:`conv2d_int8_reference`;
* **the ONNX operator** :func:`qlinear_conv` (``QLinearConv``, NCHW, bit for bit as ONNX
  Runtime computes it) and its twin :func:`qlinear_conv_reference`;
* **a whole network**: :class:`QuantizedConv2d` (per-channel int8 weights, int32 bias,
  requantization, fused ReLU / ReLU6 clamp) and :class:`IntegerCNN`, a plain list of such layers
  (plus pooling and a final linear layer) that runs a trained CNN in integers end to end, with a
  per-layer time breakdown.  :func:`qcourse.cnn.convert_cnn` builds one from a float model.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["conv_output_size", "im2col"]

_LAYOUTS = ("NCHW", "NHWC")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                     name: str = "size") -> int:
    r"""Output length of a convolution along one axis: :math:`\lfloor (n + 2p - k)/s \rfloor + 1`.

    Raises ``ValueError`` naming ``name`` when the kernel does not fit in the padded input.
    """
    size = _check_int(size, name, 1)
    kernel = _check_int(kernel, "kernel", 1)
    stride = _check_int(stride, "stride", 1)
    padding = _check_int(padding, "padding", 0)
    if size + 2 * padding < kernel:
        raise ValueError(f"the {kernel}-wide kernel does not fit the input's {name} {size} "
                         f"with padding {padding}")
    return (size + 2 * padding - kernel) // stride + 1


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
    pad_value : scalar of ``x``'s dtype

    Returns
    -------
    numpy.ndarray, dtype of ``x``, C-contiguous
        ``(n, oh, ow, c, kh, kw)`` for NCHW, ``(n, oh, ow, kh, kw, c)`` for NHWC: reshaped to
        ``(n * oh * ow, -1)`` it is the patch matrix, rows in output order.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D ({', '.join(layout)}), got shape {x.shape}")
    kh, kw = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
    kh, kw = _check_int(kh, "kernel_size", 1), _check_int(kw, "kernel_size", 1)
    stride = _check_int(stride, "stride", 1)
    padding = _check_int(padding, "padding", 0)
    h_ax, w_ax = (2, 3) if layout == "NCHW" else (1, 2)
    oh = conv_output_size(x.shape[h_ax], kh, stride, padding, "height")
    ow = conv_output_size(x.shape[w_ax], kw, stride, padding, "width")
    if padding:
        widths = [(0, 0)] * 4
        widths[h_ax] = widths[w_ax] = (padding, padding)
        x = np.pad(x, widths, constant_values=np.asarray(pad_value).astype(x.dtype))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(h_ax, w_ax))
    if layout == "NCHW":          # (n, c, H', W', kh, kw)
        win = win[:, :, :stride * oh:stride, :stride * ow:stride]
        return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5))
    win = win[:, :stride * oh:stride, :stride * ow:stride]   # (n, H', W', c, kh, kw)
    return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3))
