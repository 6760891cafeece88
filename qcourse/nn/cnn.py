r"""Convolutional layers with the forward and backward passes written out.

Re-exported by :mod:`qcourse.nn`.  Images are ``(batch, channels, height, width)`` (NCHW, the
layout of PyTorch and ONNX); a :class:`Conv2d` weight is ``(out, in / groups, kh, kw)``.

* :class:`Conv2d`: 2-D cross-correlation with stride, zero padding and groups (``groups`` equal
  to the channel count is a *depthwise* convolution, the heart of MobileNet);
* :class:`BatchNorm2d`: per-channel normalization with batch statistics while training and
  running statistics at inference (switched by :meth:`~qcourse.nn.Module.set_training`, which
  :func:`qcourse.nn.train` calls);
* :class:`AvgPool2d`, :class:`GlobalAvgPool2d` and :class:`Flatten`.

Every layer computes in the dtype of its parameters (float32 by default; ``dtype=np.float64``
for gradient checks).  The convolution is computed by *im2col*, one matrix product per group
over patches gathered by :func:`qcourse.conv.im2col` -- the same gathering the conv chapter
runs on int8 codes.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import MAX_ELEMENTS, check_bool, check_dtype, check_int, check_real
from qcourse.conv import MAX_SIDE, _kernel_pair, conv_output_size, im2col
from qcourse.nn.core import Module

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "Flatten", "GlobalAvgPool2d"]

#: Most channels a layer here takes (in or out); its weight may hold at most
#: :data:`qcourse._checks.MAX_ELEMENTS` (2**28) numbers.
MAX_CHANNELS = 2**16


def _seeded_rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_int(seed, "seed", 0))


def _check_images(x, name: str, channels: int | None, layer: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (batch, channels, height, width) for {layer}, "
                         f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (axis 1, NCHW) for {layer}, "
                         f"got shape {x.shape}")
    return x


class Conv2d(Module):
    r"""2-D convolution (cross-correlation), NCHW, with stride, zero padding and groups.

    .. math::

        y_{n,o,i,j} = b_o + \sum_{c \in \text{group}(o)} \sum_{u,v}
                      W_{o,c,u,v}\; x_{n,c,\,s i + u - p,\,s j + v - p}

    with :math:`x = 0` outside the image (zero padding ``p``) and stride ``s``.  The ``in``
    channels are split into ``groups`` equal groups, each seen by ``out / groups`` outputs;
    ``groups == in == out`` is a depthwise convolution (one 2-D filter per channel).

    Forward, per group :math:`g`: the patches of its channels become the columns of a matrix
    :math:`P_g` (:func:`qcourse.conv.im2col`), and :math:`Y_g = W_g P_g + b`.  Backward, for
    :math:`G = \partial L / \partial Y`:

    .. math::

        \frac{\partial L}{\partial W_g} = G_g P_g^T, \qquad
        \frac{\partial L}{\partial b} = \textstyle\sum_{n,i,j} G, \qquad
        \frac{\partial L}{\partial P_g} = W_g^T G_g,

    and :math:`\partial L / \partial P` is scattered back onto the input, each patch entry
    added where it was read from (col2im).  Weights start He-uniform with fan-in
    ``in / groups * kh * kw``; the bias at zero.  ``in_channels`` and ``out_channels`` are ints
    in [1, :data:`MAX_CHANNELS`] (the weight at most 2**28 numbers), ``kernel_size`` (one int or
    ``(kh, kw)``) and ``stride`` in [1, 2**20], ``padding`` in [0, 2**20]; ``seed`` an int >= 0 or
    a ``numpy.random.Generator``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, seed=0,
                 dtype=np.float32):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1, MAX_CHANNELS)
        self.out_channels = check_int(out_channels, "out_channels", 1, MAX_CHANNELS)
        self.kernel_size = _kernel_pair(kernel_size)
        self.stride = check_int(stride, "stride", 1, MAX_SIDE)
        self.padding = check_int(padding, "padding", 0, MAX_SIDE)
        self.groups = check_int(groups, "groups", 1, MAX_CHANNELS)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels={self.in_channels} "
                             f"and out_channels={self.out_channels}")
        size = (self.out_channels * (self.in_channels // self.groups) * self.kernel_size[0]
                * self.kernel_size[1])
        if size > MAX_ELEMENTS:
            raise ValueError(f"the weight of in_channels={self.in_channels}, out_channels="
                             f"{self.out_channels}, kernel_size={self.kernel_size} would hold "
                             f"{size} numbers, more than MAX_ELEMENTS ({MAX_ELEMENTS})")
        bias = check_bool(bias, "bias")
        dtype = check_dtype(dtype, "dtype", (np.float32, np.float64))
        rng = _seeded_rng(seed)
        cg = self.in_channels // self.groups
        fan_in = cg * self.kernel_size[0] * self.kernel_size[1]
        bound = np.sqrt(6.0 / fan_in)
        shape = (self.out_channels, cg) + self.kernel_size
        self.weight = rng.uniform(-bound, bound, size=shape).astype(dtype)
        self.bias = np.zeros(self.out_channels, dtype=dtype) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)
        self._cols: np.ndarray | None = None
        self._x_shape: tuple | None = None

    @property
    def depthwise(self) -> bool:
        """True when every channel has its own filter (``groups == in == out``)."""
        return self.groups == self.in_channels == self.out_channels

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(out_height, out_width)`` for an input of ``height x width``."""
        kh, kw = self.kernel_size
        return (conv_output_size(height, kh, self.stride, self.padding, "height"),
                conv_output_size(width, kw, self.stride, self.padding, "width"))

    def _grouped_cols(self, x: np.ndarray) -> np.ndarray:
        """Patches as (groups, channels/group * kh * kw, batch * oh * ow)."""
        n = x.shape[0]
        oh, ow = self.output_shape(x.shape[2], x.shape[3])
        # im2col gives (n, oh, ow, C, kh, kw) for NCHW input
        cols = im2col(x, self.kernel_size, self.stride, self.padding, layout="NCHW")
        cols = cols.reshape(n * oh * ow, self.groups, -1)
        return np.ascontiguousarray(cols.transpose(1, 2, 0))

    def _shifted(self, xp: np.ndarray, u: int, v: int, oh: int, ow: int) -> np.ndarray:
        """The input values that kernel offset (u, v) multiplies, for every output position."""
        s = self.stride
        return xp[:, :, u:u + s * oh:s, v:v + s * ow:s]

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_images(x, "x", self.in_channels, repr(self))
        x = x.astype(self.weight.dtype, copy=False)
        n = x.shape[0]
        oh, ow = self.output_shape(x.shape[2], x.shape[3])
        self._x_shape = x.shape
        if self.in_channels == self.groups:
            # one input channel per group (depthwise): a sum of kh * kw shifted copies of the
            # input, each scaled per channel; the same arithmetic as im2col, without the copy
            p = self.padding
            xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
            m = self.out_channels // self.groups
            xr = np.repeat(xp, m, axis=1) if m > 1 else xp
            y = np.zeros((n, self.out_channels, oh, ow), dtype=self.weight.dtype)
            for u in range(self.kernel_size[0]):
                for v in range(self.kernel_size[1]):
                    y += self.weight[None, :, 0, u, v, None, None] * self._shifted(xr, u, v, oh,
                                                                                   ow)
            self._cols = xr
        else:
            cols = self._grouped_cols(x)
            w = self.weight.reshape(self.groups, self.out_channels // self.groups, -1)
            y = np.matmul(w, cols)                   # (groups, out/groups, n*oh*ow)
            y = y.reshape(self.out_channels, n, oh, ow).transpose(1, 0, 2, 3)
            self._cols = cols
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return np.ascontiguousarray(y)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._cols is None:
            raise RuntimeError("Conv2d.backward called before forward")
        n, c, h, wd = self._x_shape
        oh, ow = self.output_shape(h, wd)
        if grad_out.shape != (n, self.out_channels, oh, ow):
            raise ValueError(f"grad_out must have shape {(n, self.out_channels, oh, ow)}, got "
                             f"{grad_out.shape}")
        g = grad_out.astype(self.weight.dtype, copy=False)
        if self.bias is not None:
            self.grad_bias[...] = g.sum(axis=(0, 2, 3))
        kh, kw = self.kernel_size
        p = self.padding
        dx = np.zeros((n, self.out_channels if self.in_channels == self.groups else c,
                       h + 2 * p, wd + 2 * p), dtype=self.weight.dtype)
        if self.in_channels == self.groups:
            xr = self._cols
            for u in range(kh):
                for v in range(kw):
                    self.grad_weight[:, 0, u, v] = np.einsum(
                        "nchw,nchw->c", g, self._shifted(xr, u, v, oh, ow))
                    self._shifted(dx, u, v, oh, ow)[...] += (
                        g * self.weight[None, :, 0, u, v, None, None])
            m = self.out_channels // self.groups
            if m > 1:
                dx = dx.reshape(n, c, m, h + 2 * p, wd + 2 * p).sum(axis=2)
            return dx[:, :, p:p + h, p:p + wd]
        gg = g.transpose(1, 0, 2, 3).reshape(self.groups, self.out_channels // self.groups, -1)
        self.grad_weight[...] = np.matmul(gg, self._cols.transpose(0, 2, 1)).reshape(
            self.weight.shape)
        w = self.weight.reshape(self.groups, self.out_channels // self.groups, -1)
        dcols = np.matmul(w.transpose(0, 2, 1), gg)  # (groups, cg*kh*kw, n*oh*ow)
        dcols = dcols.reshape(c, kh, kw, n, oh, ow)
        for u in range(kh):
            for v in range(kw):
                self._shifted(dx, u, v, oh, ow)[...] += dcols[:, u, v].transpose(1, 0, 2, 3)
        return dx[:, :, p:p + h, p:p + wd]

    def parameters(self):
        pairs = [(self.weight, self.grad_weight)]
        if self.bias is not None:
            pairs.append((self.bias, self.grad_bias))
        return pairs

    def named_parameters(self):
        pairs = [("weight", self.weight)]
        if self.bias is not None:
            pairs.append(("bias", self.bias))
        return pairs

    def __repr__(self) -> str:
        extra = f", groups={self.groups}" if self.groups > 1 else ""
        bias = "" if self.bias is not None else ", bias=False"
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{extra}{bias})")


class BatchNorm2d(Module):
    r"""Batch normalization over (batch, height, width), one mean and variance per channel.

    .. math::

        y_{n,c,i,j} = \gamma_c \frac{x_{n,c,i,j} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}}
                      + \beta_c

    While training (:meth:`set_training` ``(True)``), :math:`\mu, \sigma^2` are the batch's mean
    and (biased) variance, and the running statistics move towards them:
    :math:`\bar\mu \leftarrow (1 - m)\bar\mu + m \mu` and the same for :math:`\bar\sigma^2` with
    the unbiased variance (PyTorch's convention, ``momentum`` :math:`m = 0.1`).  At inference
    (the default) the running statistics are used, and the layer is an affine map per channel
    that a converter folds into the convolution before it
    (:func:`qcourse.cnn.fold_conv_batch_norm`).

    Backward while training, with :math:`\hat x = (x - \mu)/\sqrt{\sigma^2+\epsilon}`,
    :math:`g = \partial L/\partial y` and :math:`m` values per channel:

    .. math::

        \frac{\partial L}{\partial x} = \frac{\gamma}{m\sqrt{\sigma^2+\epsilon}}
            \Big(m g - \textstyle\sum g - \hat x \sum g \hat x\Big),\qquad
        \frac{\partial L}{\partial \gamma} = \textstyle\sum g \hat x,\qquad
        \frac{\partial L}{\partial \beta} = \textstyle\sum g;

    at inference simply :math:`\partial L/\partial x = g\,\gamma/\sqrt{\bar\sigma^2+\epsilon}`.
    ``channels`` is an int in [1, :data:`MAX_CHANNELS`], ``eps`` a finite number > 0,
    ``momentum`` in (0, 1].
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype=np.float32):
        super().__init__()
        self.channels = check_int(channels, "channels", 1, MAX_CHANNELS)
        self.eps = check_real(eps, "eps", 0.0, lo_open=True)
        self.momentum = check_real(momentum, "momentum", 0.0, 1.0, lo_open=True)
        dtype = check_dtype(dtype, "dtype", (np.float32, np.float64))
        self.weight = np.ones(channels, dtype=dtype)       # gamma
        self.bias = np.zeros(channels, dtype=dtype)        # beta
        self.running_mean = np.zeros(channels, dtype=dtype)
        self.running_var = np.ones(channels, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self.training = False
        self._cache = None

    def set_training(self, training: bool) -> None:
        self.training = bool(training)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_images(x, "x", self.channels, repr(self))
        x = x.astype(self.weight.dtype, copy=False)
        if self.training:
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            m = x.size // self.channels
            unbiased = var * (m / max(m - 1, 1))
            self.running_mean *= 1 - self.momentum
            self.running_mean += (self.momentum * mean).astype(self.weight.dtype)
            self.running_var *= 1 - self.momentum
            self.running_var += (self.momentum * unbiased).astype(self.weight.dtype)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(self.weight.dtype)
        x_hat = (x - mean[None, :, None, None]) * inv_std[None, :, None, None]
        self._cache = (x_hat, inv_std, self.training)
        return x_hat * self.weight[None, :, None, None] + self.bias[None, :, None, None]

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("BatchNorm2d.backward called before forward")
        x_hat, inv_std, training = self._cache
        if grad_out.shape != x_hat.shape:
            raise ValueError(f"grad_out must have shape {x_hat.shape}, got {grad_out.shape}")
        g = grad_out.astype(self.weight.dtype, copy=False)
        sum_g = g.sum(axis=(0, 2, 3))
        sum_gx = (g * x_hat).sum(axis=(0, 2, 3))
        self.grad_weight[...] = sum_gx
        self.grad_bias[...] = sum_g
        scale = (self.weight * inv_std)[None, :, None, None]
        if not training:
            return g * scale
        m = x_hat.size // self.channels
        return scale / m * (m * g - sum_g[None, :, None, None]
                            - x_hat * sum_gx[None, :, None, None])

    def parameters(self):
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]

    def named_parameters(self):
        return [("weight", self.weight), ("bias", self.bias),
                ("running_mean", self.running_mean), ("running_var", self.running_var)]

    def __repr__(self) -> str:
        return f"BatchNorm2d({self.channels}, eps={self.eps:g})"


class AvgPool2d(Module):
    r"""Average over non-overlapping ``k x k`` windows (stride ``k``, no padding).

    :math:`y_{n,c,i,j} = \frac{1}{k^2}\sum_{u,v<k} x_{n,c,ki+u,kj+v}`; the height and width
    must be multiples of ``k`` (an int in [1, 2**20]).  Backward spreads each gradient evenly
    over its window.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        self.kernel_size = check_int(kernel_size, "kernel_size", 1, MAX_SIDE)
        self._shape = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_images(x, "x", None, repr(self))
        k = self.kernel_size
        n, c, h, w = x.shape
        if h % k or w % k:
            raise ValueError(f"x's height and width must be multiples of kernel_size={k}, got "
                             f"shape {x.shape}")
        self._shape = x.shape
        return x.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise RuntimeError("AvgPool2d.backward called before forward")
        k = self.kernel_size
        g = np.repeat(np.repeat(grad_out, k, axis=2), k, axis=3)
        return g / np.asarray(k * k, dtype=grad_out.dtype)

    def __repr__(self) -> str:
        return f"AvgPool2d({self.kernel_size})"


class GlobalAvgPool2d(Module):
    r"""Average over the whole image: (n, c, h, w) -> (n, c, 1, 1), as MobileNet's last pool.

    Backward: each position receives :math:`g / (h w)`.
    """

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_images(x, "x", None, repr(self))
        self._shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise RuntimeError("GlobalAvgPool2d.backward called before forward")
        n, c, h, w = self._shape
        return np.broadcast_to(grad_out / np.asarray(h * w, grad_out.dtype), self._shape).copy()

    def __repr__(self) -> str:
        return "GlobalAvgPool2d()"


class Flatten(Module):
    """(n, c, h, w) -> (n, c * h * w), row-major; backward reshapes back."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.ndim < 2:
            raise ValueError("Flatten needs an array with a batch axis and at least one more")
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        return grad_out.reshape(self._shape)

    def __repr__(self) -> str:
        return "Flatten()"
