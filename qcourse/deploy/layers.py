"""The integer network to export: its layers (:class:`Dense`, :class:`Conv2D`,
:class:`MaxPool2D`, :class:`GlobalAvgPool`, :class:`Flatten`) and the
:class:`DeployModel` that chains them, each checked when it is built.

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from qcourse import _checks
from qcourse.affine import QParams

__all__ = [
    "Conv2D",
    "Dense",
    "DeployModel",
    "ExportError",
    "Flatten",
    "GlobalAvgPool",
    "MaxPool2D",
]

_INT8_MIN, _INT8_MAX = -128, 127


class ExportError(ValueError):
    """A model (or a layer) that this exporter cannot write to the requested format."""


# --------------------------------------------------------------------------- validation


def _int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _pair(value, name: str, lo: int) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (_int(value[0], f"{name}[0]", lo), _int(value[1], f"{name}[1]", lo))


def _scale(value, name: str) -> np.float32:
    _checks.check_real(value, name, 0.0, lo_open=True)
    with np.errstate(over="ignore", under="ignore"):
        s = np.float32(value)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"{name} must be finite and > 0 in float32, got {value!r}")
    return s


def _int_codes(value, name: str, dtype, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer codes, got dtype {arr.dtype}")
    if arr.ndim != ndim or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {arr.shape}")
    info = np.iinfo(dtype)
    if arr.min() < info.min or arr.max() > info.max:
        raise ValueError(f"{name} has values outside {np.dtype(dtype).name} "
                         f"[{info.min}, {info.max}]")
    out = arr.astype(dtype)
    out.flags.writeable = False
    return out


def _weight_scales(value, name: str, channels: int) -> np.ndarray:
    arr = np.atleast_1d(_checks.real_array(value, name))
    if arr.ndim != 1 or arr.size not in (1, channels):
        raise ValueError(f"{name} must be one scale (per tensor) or {channels} (per output "
                         f"channel), got shape {arr.shape}")
    with np.errstate(over="ignore", under="ignore"):
        arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} must be finite and > 0 in float32")
    arr.flags.writeable = False
    return arr


def _clamp(value, zero_point: int) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"clamp must be a pair (lo, hi) of int8 codes, got {value!r}")
    lo = _int(value[0], "clamp[0]", _INT8_MIN, _INT8_MAX)
    hi = _int(value[1], "clamp[1]", _INT8_MIN, _INT8_MAX)
    if lo >= hi:
        raise ValueError(f"clamp must have lo < hi, got {value!r}")
    if lo > zero_point:
        raise ValueError(f"clamp's lo={lo} lies above the output zero point {zero_point}: the "
                         f"fused activation would remove the real value 0")
    return lo, hi


def _check_deploy_model(model, name: str = "model") -> DeployModel:
    return _checks.check_instance(model, name, DeployModel, "a qcourse.deploy.DeployModel")


def _check_deploy_layer(layer, name: str = "layer"):
    return _checks.check_instance(layer, name, (Dense, Conv2D),
                                  "a qcourse.deploy.Dense or Conv2D layer")


# --------------------------------------------------------------------------- the layers


@dataclass(frozen=True, eq=False)
class _Weighted:
    """What :class:`Dense` and :class:`Conv2D` share: int8 ``weight`` with ``_weight_ndim`` axes
    (outputs first), int32 ``bias`` (zeros if None), the weight scales, the output scale and
    zero point, and the clamp, each checked when the layer is built."""

    weight: np.ndarray
    bias: np.ndarray
    weight_scale: np.ndarray
    output_scale: float
    output_zero_point: int
    clamp: tuple = (_INT8_MIN, _INT8_MAX)

    _weight_ndim = 2

    def __post_init__(self):
        w = _int_codes(self.weight, "weight", np.int8, self._weight_ndim)
        out = w.shape[0]
        b = (np.zeros(out, np.int32) if self.bias is None
             else _int_codes(self.bias, "bias", np.int32, 1))
        if b.shape != (out,):
            raise ValueError(f"bias must have shape ({out},), got {b.shape}")
        zp = _int(self.output_zero_point, "output_zero_point", _INT8_MIN, _INT8_MAX)
        for name, value in (("weight", w), ("bias", b),
                            ("weight_scale", _weight_scales(self.weight_scale, "weight_scale",
                                                            out)),
                            ("output_scale", _scale(self.output_scale, "output_scale")),
                            ("output_zero_point", zp), ("clamp", _clamp(self.clamp, zp))):
            object.__setattr__(self, name, value)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]



@dataclass(frozen=True, eq=False)
class Dense(_Weighted):
    r"""A fully-connected int8 layer: :math:`q_y = \operatorname{clamp}(Z_y + \operatorname{round}
    (M_j (\sum_k (q_{x,k} - Z_x) W_{jk} + b_j)))`.

    ``weight`` int8 (out, in), symmetric (zero point 0, as LiteRT's int8 specification and
    XNNPACK require); ``bias`` int32 (out,) at scale :math:`S_x S_{W,j}`; ``weight_scale`` one
    float32 scale or one per output; the output's ``output_scale`` and ``output_zero_point``; the
    fused activation as the ``clamp`` (lo, hi) of the output codes.  The input's scale and zero
    point are the previous layer's output (or the model's input).
    """

    kind = "dense"

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) != 1:
            raise ExportError(f"a Dense layer needs a flat input (features,), got {shape}: put a "
                              f"Flatten before it")
        if shape[0] != self.weight.shape[1]:
            raise ValueError(f"Dense has {self.weight.shape[1]} inputs but receives {shape[0]} "
                             f"features")
        return (self.out_channels,)

    def accumulate(self, x_q: np.ndarray, input_zero_point: int) -> np.ndarray:
        """Exact int64 accumulators :math:`\\sum_k (q_x - Z_x) W + b`, shape (N, out)."""
        x = x_q.astype(np.int64) - input_zero_point
        return x @ self.weight.T.astype(np.int64) + self.bias


@dataclass(frozen=True, eq=False)
class Conv2D(_Weighted):
    r"""A 2-D int8 convolution (NCHW), regular (``groups=1``) or depthwise (``groups`` = input
    channels = output channels).

    ``weight`` int8 (out, in / groups, kh, kw), symmetric; ``bias`` int32 (out,) at scale
    :math:`S_x S_{W,j}`; ``weight_scale`` one float32 or one per output channel; ``stride``;
    ``padding`` (top, left, bottom, right), filled with the input's zero point (the code of the
    real value 0); output quantization and ``clamp`` as for :class:`Dense`.
    """

    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    groups: int = 1
    _weight_ndim = 4

    def __post_init__(self):
        super().__post_init__()
        w = self.weight
        out_c = w.shape[0]
        groups = _int(self.groups, "groups", 1)
        if groups > 1 and not (out_c == groups and w.shape[1] == 1):
            raise ExportError(f"groups={groups}: only regular (groups=1) and depthwise "
                              f"convolutions (groups = in = out channels, weight shape "
                              f"(C, 1, kh, kw)) are supported, got weight shape {w.shape}")
        pad = self.padding
        if isinstance(pad, numbers.Integral) and not isinstance(pad, bool):
            pad = (pad,) * 4
        if not isinstance(pad, (tuple, list)) or len(pad) != 4:
            raise TypeError(f"padding must be an int or (top, left, bottom, right), got {pad!r}")
        pad = tuple(_int(p, f"padding[{i}]", 0) for i, p in enumerate(pad))
        object.__setattr__(self, "stride", _pair(self.stride, "stride", 1))
        object.__setattr__(self, "padding", pad)
        object.__setattr__(self, "groups", groups)

    @property
    def kind(self) -> str:
        return "depthwise" if self.groups > 1 else "conv"

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) != 3:
            raise ValueError(f"a Conv2D layer needs a (channels, height, width) input, got "
                             f"{shape}")
        c, h, w = shape
        in_c = self.weight.shape[1] * self.groups
        if c != in_c:
            raise ValueError(f"Conv2D expects {in_c} input channels, receives {c}")
        kh, kw = self.weight.shape[2:]
        top, left, bottom, right = self.padding
        hp, wp = h + top + bottom, w + left + right
        if hp < kh or wp < kw:
            raise ValueError(f"the {kh}x{kw} kernel does not fit the padded {hp}x{wp} input")
        sh, sw = self.stride
        return (self.out_channels, (hp - kh) // sh + 1, (wp - kw) // sw + 1)

    def accumulate(self, x_q: np.ndarray, input_zero_point: int) -> np.ndarray:
        """Exact int64 accumulators, shape (N, out, oh, ow); padding holds the zero point."""
        x = x_q.astype(np.int64) - input_zero_point          # padding then adds exact zeros
        top, left, bottom, right = self.padding
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        kh, kw = self.weight.shape[2:]
        sh, sw = self.stride
        n, c, hp, wp = x.shape
        oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
        win = win[:, :, ::sh, ::sw][:, :, :oh, :ow]             # (N, C, oh, ow, kh, kw)
        w = self.weight.astype(np.int64)
        if self.groups == 1:
            acc = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
        else:
            acc = np.einsum("nchwij,cij->nchw", win, w[:, 0], optimize=True)
        return acc + self.bias[None, :, None, None]


@dataclass(frozen=True)
class MaxPool2D:
    """Max pooling over ``kernel`` windows with ``stride`` (no padding): exact on int8 codes,
    which keep their scale and zero point."""

    kernel: tuple = (2, 2)
    stride: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "kernel", _pair(self.kernel, "kernel", 1))
        object.__setattr__(self, "stride", self.kernel if self.stride is None
                           else _pair(self.stride, "stride", 1))

    kind = "maxpool"

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) != 3:
            raise ValueError(f"MaxPool2D needs a (channels, height, width) input, got {shape}")
        c, h, w = shape
        (kh, kw), (sh, sw) = self.kernel, self.stride
        if h < kh or w < kw:
            raise ValueError(f"the {kh}x{kw} pooling window does not fit the {h}x{w} input")
        return (c, (h - kh) // sh + 1, (w - kw) // sw + 1)

    def apply(self, x_q: np.ndarray) -> np.ndarray:
        (kh, kw), (sh, sw) = self.kernel, self.stride
        oh, ow = self.output_shape(x_q.shape[1:])[1:]
        win = np.lib.stride_tricks.sliding_window_view(x_q, (kh, kw), axis=(2, 3))
        return win[:, :, ::sh, ::sw][:, :, :oh, :ow].max(axis=(4, 5))


@dataclass(frozen=True)
class GlobalAvgPool:
    """Global average pooling on int8 codes, (C, H, W) -> (C,): the output keeps the input's
    scale and zero point (as LiteRT's ``AVERAGE_POOL_2D`` requires), so only the rounding of the
    mean is the runtime's (:class:`qcourse.conv.IntegerGlobalAvgPool` names both roundings).
    Exported as ``QLinearGlobalAveragePool`` and ``Flatten`` (ONNX) or ``AVERAGE_POOL_2D`` over
    the whole image and ``RESHAPE`` (LiteRT)."""

    kind = "pool"

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) != 3:
            raise ValueError(f"GlobalAvgPool needs a (channels, height, width) input, got "
                             f"{shape}")
        return (shape[0],)

    def apply(self, x_q: np.ndarray, scale, zero_point: int, runtime: str) -> np.ndarray:
        """The (N, C) codes ``runtime`` computes from NCHW int8 codes ``x_q``."""
        from qcourse.conv import IntegerGlobalAvgPool

        pool = IntegerGlobalAvgPool(QParams(scale=np.float64(scale),
                                            zero_point=np.int64(zero_point), qmin=_INT8_MIN,
                                            qmax=_INT8_MAX))
        return pool(np.ascontiguousarray(x_q.transpose(0, 2, 3, 1)),
                    "float" if runtime == "onnx" else "tflite_double")


@dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> (C * H * W,) in NCHW order (the order of NumPy's and ONNX's flatten)."""

    kind = "flatten"

    def output_shape(self, shape: tuple) -> tuple:
        return (int(np.prod(shape)),)

    def apply(self, x_q: np.ndarray) -> np.ndarray:
        return x_q.reshape(x_q.shape[0], -1)


_LAYER_TYPES = (Dense, Conv2D, MaxPool2D, GlobalAvgPool, Flatten)


@dataclass(frozen=True, eq=False)
class DeployModel:
    """An integer network to export: input quantization, then ``layers`` in order.

    ``input_shape`` is one example's shape in the course's layout: ``(features,)`` or
    ``(channels, height, width)`` (NCHW without the batch); ``input_scale`` and
    ``input_zero_point`` quantize the float32 input to int8.  The last layer must be a
    :class:`Dense` or :class:`Conv2D` (the model outputs its int8 codes).
    """

    input_shape: tuple
    input_scale: float
    input_zero_point: int
    layers: tuple
    name: str = "qcourse"
    shapes: tuple = field(init=False, repr=False)

    def __post_init__(self):
        shape = _checks.check_int_sequence(self.input_shape, "input_shape", 1,
                                           _checks.MAX_ELEMENTS)
        if int(np.prod(shape, dtype=np.int64)) > _checks.MAX_ELEMENTS:
            raise ValueError(f"input_shape must describe at most {_checks.MAX_ELEMENTS} values "
                             f"per example, got {shape}")
        if len(shape) not in (1, 3):
            raise ValueError(f"input_shape must be (features,) or (channels, height, width), "
                             f"got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "input_scale", _scale(self.input_scale, "input_scale"))
        object.__setattr__(self, "input_zero_point",
                           _int(self.input_zero_point, "input_zero_point", _INT8_MIN, _INT8_MAX))
        layers = tuple(_checks.check_sequence(self.layers, "layers", min_len=1))
        shapes = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, _LAYER_TYPES):
                raise ExportError(f"layers[{i}] is a {type(layer).__name__}; the exporter "
                                  f"supports {', '.join(t.__name__ for t in _LAYER_TYPES)}")
            try:
                shape = layer.output_shape(shape)
            except ValueError as exc:
                raise type(exc)(f"layers[{i}] ({type(layer).__name__}): {exc}") from None
            shapes.append(shape)
        if not isinstance(layers[-1], (Dense, Conv2D)):
            raise ValueError("the last layer must be a Dense or Conv2D (the model's output is "
                             "its int8 codes)")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "shapes", tuple(shapes))

    @property
    def output_shape(self) -> tuple:
        return self.shapes[-1]

    def input_qparams(self, i: int) -> tuple[np.float32, int]:
        """(scale, zero point) of the codes that enter ``layers[i]``."""
        scale, zp = self.input_scale, self.input_zero_point
        for layer in self.layers[:i]:
            if isinstance(layer, (Dense, Conv2D)):
                scale, zp = layer.output_scale, layer.output_zero_point
        return scale, zp

    def check_images(self, X, name: str = "X") -> np.ndarray:
        """Float32 images in the course's layout, shape (N,) + ``input_shape``."""
        if not isinstance(X, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(X).__name__}")
        if X.dtype != np.float32:
            raise TypeError(f"{name} must have dtype float32 (the models' input type), got "
                            f"{X.dtype}")
        if X.ndim != 1 + len(self.input_shape) or X.shape[1:] != self.input_shape \
                or X.shape[0] == 0:
            layout = "(N, features)" if len(self.input_shape) == 1 else "(N, C, H, W) = NCHW"
            raise ValueError(f"{name} must have shape {('N',) + self.input_shape} {layout}, "
                             f"got {X.shape}" + (
                                 "; it looks like NHWC: transpose with X.transpose(0, 3, 1, 2)"
                                 if X.ndim == 4 and X.shape[1:] == (self.input_shape[1],
                                                                    self.input_shape[2],
                                                                    self.input_shape[0])
                                 else ""))
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{name} contains NaN or Inf; images must be finite")
        return X
