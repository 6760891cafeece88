r"""Ship an integer model: export it to ONNX and to a .tflite flatbuffer, and predict every code.

The deploy chapter (``book/deploy.md``) explains this module.  An integer network is described by
a small list of layers (:class:`Dense`, :class:`Conv2D` -- regular or depthwise --,
:class:`MaxPool2D`, :class:`GlobalAvgPool`, :class:`Flatten`) inside a :class:`DeployModel`;
every weighted layer holds int8
weights, an int32 bias, float32 scales, the output zero point and the clamp of its fused
activation.  From that one description:

* :func:`to_onnx` writes an ONNX model in the **QOperator** form (``QuantizeLinear``,
  ``QLinearConv``, ``QLinearMatMul``, ``QLinearGlobalAveragePool``, integer ``Clip``,
  ``MaxPool``, ``Flatten``) or in the
  **QDQ** form that quantization tools emit (float ``Conv``/``Gemm`` between
  ``DequantizeLinear`` and ``QuantizeLinear`` nodes, which ONNX Runtime fuses back into integer
  kernels);
* :func:`to_tflite` writes a ``.tflite`` flatbuffer (``QUANTIZE``, ``PAD``, ``CONV_2D``,
  ``DEPTHWISE_CONV_2D``, ``MAX_POOL_2D``, ``AVERAGE_POOL_2D``, ``RESHAPE``,
  ``FULLY_CONNECTED``) with the schema
  module and ``flatbuffers`` that the ``ai-edge-litert`` wheel brings -- no TensorFlow;
* :func:`predict_codes` computes, with qcourse's own integer arithmetic, the int8 codes that each
  runtime (:data:`RUNTIMES`) returns for float32 images: ONNX Runtime, and LiteRT's interpreter
  under its three op resolvers, which do *not* agree with one another.  Each runtime's arithmetic
  is a named function of :mod:`qcourse.fixed_point`, :mod:`qcourse.int_matmul` or this module
  (:data:`RUNTIME_ARITHMETIC` lists them);
* :func:`run_onnx` and :func:`run_tflite` run the exported files in the real runtimes, so the two
  can be compared code by code.

``python -m qcourse.deploy export --out DIR`` writes ``DIR/model.onnx`` and ``DIR/model.tflite``
for the course's trained integer network; ``python -m qcourse.deploy run --runtime RUNTIME
--inputs X.npy --out Y.npy`` writes qcourse's prediction of that runtime's output codes.
"""

from __future__ import annotations

import argparse
import functools
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcourse import _checks
from qcourse.affine import QParams, quantize_linear
from qcourse.fixed_point import (
    quantize_multiplier,
)
from qcourse.int_matmul import (
    activation_range,
    double_multiplier,
    float_multiplier,
    requantize_double_half_away,
    requantize_fixed_point,
    requantize_fixed_point_half_up,
    requantize_float,
)
from qcourse.int_matmul.arithmetic import (
    _round_half_away,  # C's round, exactly: one helper for int_matmul and deploy
)

__all__ = [
    "LITERT_RESOLVERS",
    "RUNTIMES",
    "RUNTIME_ARITHMETIC",
    "CONVENTIONS",
    "Conv2D",
    "Dense",
    "DeployModel",
    "ExportError",
    "Flatten",
    "GlobalAvgPool",
    "MaxPool2D",
    "adversarial_images",
    "agreement",
    "course_model",
    "COURSE_CALIBRATION_IMAGES",
    "from_integer_model",
    "main",
    "ops_outside_delegates",
    "predict_codes",
    "quantize_input",
    "quantize_reciprocal_rne",
    "quantize_divide_half_away",
    "quantize_litert_builtin",
    "random_dense_model",
    "requantize_layer",
    "run_onnx",
    "run_runtime",
    "run_tflite",
    "tflite_fused_activation",
    "to_onnx",
    "to_tflite",
    "xnnpack_clamp",
]

#: The runtimes whose output codes :func:`predict_codes` predicts: ONNX Runtime (CPU), and
#: LiteRT's interpreter with its default XNNPACK delegate, with its built-in optimized kernels
#: (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``) and with its reference kernels (``BUILTIN_REF``).
RUNTIMES = ("onnx", "tflite-xnnpack", "tflite-builtin", "tflite-reference")

#: LiteRT op resolver (``ai_edge_litert.interpreter.OpResolverType`` member name) per runtime.
LITERT_RESOLVERS = {
    "tflite-xnnpack": "AUTO",
    "tflite-builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "tflite-reference": "BUILTIN_REF",
}

#: What each runtime computes, by step: the input quantization (float32 -> int8) and the
#: requantization of a fully-connected layer, a convolution and a depthwise convolution.  Each
#: entry names the qcourse function that reproduces it bit for bit (measured in the tests against
#: the runtime itself; read off LiteRT's, ruy's, XNNPACK's and ONNX Runtime's sources).
RUNTIME_ARITHMETIC = {
    "onnx": {
        "input": "qcourse.affine.quantize_linear: x / s in float32, round half to even",
        "dense": "qcourse.int_matmul.requantize_float: float32 multiplier (S_x S_W) / S_y, "
                 "round half to even",
        "conv": "qcourse.int_matmul.requantize_float (as dense)",
        "depthwise": "qcourse.int_matmul.requantize_float (as dense)",
        "pool": "qcourse.conv.IntegerGlobalAvgPool, 'float': QLinearGlobalAveragePool, the "
                "zero point out in int32, a float32 multiplier, round half to even",
    },
    "tflite-xnnpack": {
        "input": "qcourse.deploy.quantize_reciprocal_rne: x * (1/s) in float32, round half to "
                 "even",
        "dense": "qcourse.int_matmul.requantize_float: float32 multiplier (S_x S_W) / S_y, "
                 "round half to even (XNNPACK's fp32 requantization)",
        "conv": "qcourse.int_matmul.requantize_float (as dense)",
        "depthwise": "qcourse.int_matmul.requantize_float (as dense)",
        "pool": "qcourse.conv.IntegerGlobalAvgPool, 'tflite_double': AVERAGE_POOL_2D stays in "
                "LiteRT's built-in kernel (XNNPACK does not take it), codes summed, divided "
                "with ties away from zero",
    },
    "tflite-builtin": {
        "input": "qcourse.deploy.quantize_litert_builtin: blocks of 8 as "
                 "quantize_reciprocal_rne, the rest as x / s in double, round half away",
        "dense": "qcourse.int_matmul.requantize_fixed_point_half_up: SRDHM then a rounding "
                 "shift, both ties up (ruy)",
        "conv": "qcourse.int_matmul.requantize_fixed_point_half_up (ruy, after im2col)",
        "depthwise": "qcourse.fixed_point.multiply_by_quantized_multiplier_half_up for the "
                     "channels in whole blocks of 8, multiply_by_quantized_multiplier "
                     "(gemmlowp's double rounding) for the rest",
        "pool": "qcourse.conv.IntegerGlobalAvgPool, 'tflite_double': AVERAGE_POOL_2D, codes "
                "summed, divided with ties away from zero",
    },
    "tflite-reference": {
        "input": "qcourse.deploy.quantize_divide_half_away: x / s in float32, round half away "
                 "from zero",
        "dense": "qcourse.int_matmul.requantize_double_half_away: acc * M in double, round "
                 "half away from zero",
        "conv": "qcourse.int_matmul.requantize_fixed_point: gemmlowp's SRDHM + RDBPOT",
        "depthwise": "qcourse.int_matmul.requantize_fixed_point (as conv)",
        "pool": "qcourse.conv.IntegerGlobalAvgPool, 'tflite_double' (as tflite-builtin)",
    },
}

_INT8_MIN, _INT8_MAX = -128, 127
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


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
class Dense:
    r"""A fully-connected int8 layer: :math:`q_y = \operatorname{clamp}(Z_y + \operatorname{round}
    (M_j (\sum_k (q_{x,k} - Z_x) W_{jk} + b_j)))`.

    ``weight`` int8 (out, in), symmetric (zero point 0, as LiteRT's int8 specification and
    XNNPACK require); ``bias`` int32 (out,) at scale :math:`S_x S_{W,j}`; ``weight_scale`` one
    float32 scale or one per output; the output's ``output_scale`` and ``output_zero_point``; the
    fused activation as the ``clamp`` (lo, hi) of the output codes.  The input's scale and zero
    point are the previous layer's output (or the model's input).
    """

    weight: np.ndarray
    bias: np.ndarray
    weight_scale: np.ndarray
    output_scale: float
    output_zero_point: int
    clamp: tuple = (_INT8_MIN, _INT8_MAX)

    def __post_init__(self):
        w = _int_codes(self.weight, "weight", np.int8, 2)
        out_f = w.shape[0]
        b = (np.zeros(out_f, np.int32) if self.bias is None
             else _int_codes(self.bias, "bias", np.int32, 1))
        if b.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {b.shape}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "weight_scale", _weight_scales(self.weight_scale,
                                                                "weight_scale", out_f))
        object.__setattr__(self, "output_scale", _scale(self.output_scale, "output_scale"))
        zp = _int(self.output_zero_point, "output_zero_point", _INT8_MIN, _INT8_MAX)
        object.__setattr__(self, "output_zero_point", zp)
        object.__setattr__(self, "clamp", _clamp(self.clamp, zp))

    kind = "dense"

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

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
class Conv2D:
    r"""A 2-D int8 convolution (NCHW), regular (``groups=1``) or depthwise (``groups`` = input
    channels = output channels).

    ``weight`` int8 (out, in / groups, kh, kw), symmetric; ``bias`` int32 (out,) at scale
    :math:`S_x S_{W,j}`; ``weight_scale`` one float32 or one per output channel; ``stride``;
    ``padding`` (top, left, bottom, right), filled with the input's zero point (the code of the
    real value 0); output quantization and ``clamp`` as for :class:`Dense`.
    """

    weight: np.ndarray
    bias: np.ndarray
    weight_scale: np.ndarray
    output_scale: float
    output_zero_point: int
    clamp: tuple = (_INT8_MIN, _INT8_MAX)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    groups: int = 1

    def __post_init__(self):
        w = _int_codes(self.weight, "weight", np.int8, 4)
        out_c = w.shape[0]
        b = (np.zeros(out_c, np.int32) if self.bias is None
             else _int_codes(self.bias, "bias", np.int32, 1))
        if b.shape != (out_c,):
            raise ValueError(f"bias must have shape ({out_c},), got {b.shape}")
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
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "weight_scale", _weight_scales(self.weight_scale,
                                                                "weight_scale", out_c))
        object.__setattr__(self, "output_scale", _scale(self.output_scale, "output_scale"))
        zp = _int(self.output_zero_point, "output_zero_point", _INT8_MIN, _INT8_MAX)
        object.__setattr__(self, "output_zero_point", zp)
        object.__setattr__(self, "clamp", _clamp(self.clamp, zp))
        object.__setattr__(self, "stride", _pair(self.stride, "stride", 1))
        object.__setattr__(self, "padding", pad)
        object.__setattr__(self, "groups", groups)

    @property
    def kind(self) -> str:
        return "depthwise" if self.groups > 1 else "conv"

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

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


# --------------------------------------------------------------------------- input quantization


def _x86_int32(v: np.ndarray) -> np.ndarray:
    """float -> int32 as x86's conversions do: out-of-range and NaN give INT32_MIN."""
    bad = ~(np.abs(v) < 2.0**31)
    return np.where(bad, _INT32_MIN, np.where(bad, 0, v)).astype(np.int64)


def _add_zero_point_wrap_clamp(q: np.ndarray, zero_point: int) -> np.ndarray:
    """``q + zero_point`` in int32 arithmetic (wrapping, as the C/SIMD code does), clamped."""
    s = q + zero_point
    s = (s + 2**31) % 2**32 - 2**31
    return np.clip(s, _INT8_MIN, _INT8_MAX).astype(np.int8)


def _check_quantize_args(x, name: str, scale, zero_point):
    """Finite float values (as float32), a float32 scale > 0 and an int8 zero point."""
    x = _checks.real_array(x, name, kinds="f", dtype=np.float32)
    return x, _scale(scale, "scale"), _int(zero_point, "zero_point", _INT8_MIN, _INT8_MAX)


def quantize_reciprocal_rne(x, scale, zero_point) -> np.ndarray:
    r"""int8 codes by multiplying with the float32 reciprocal: :math:`\operatorname{rne}(x
    \cdot \mathrm{fl}_{32}(1/s)) + Z`, saturated.

    XNNPACK's float32 -> qs8 conversion (``xnn_init_f32_qs8_cvt_scalar_params``: ``scale =
    1.0f / output_scale``), which LiteRT's default delegate runs for ``QUANTIZE``: one float32
    multiplication, round half to even, the zero point, a clamp to [-128, 127].  A multiplication
    by a rounded reciprocal is not a division: for some ``x`` the product and the quotient
    :math:`x / s` round to different codes.  See the deploy chapter.
    """
    x, scale, zero_point = _check_quantize_args(x, "x", scale, zero_point)
    r = np.float32(1) / scale
    with np.errstate(over="ignore", invalid="ignore"):
        v = x * r
    q = np.clip(v, np.float32(_INT8_MIN - zero_point), np.float32(_INT8_MAX - zero_point))
    return (np.rint(q).astype(np.int64) + zero_point).astype(np.int8)


def quantize_divide_half_away(x, scale, zero_point) -> np.ndarray:
    r"""int8 codes by float32 division, ties away from zero: :math:`\operatorname{round}(x/s) + Z`.

    LiteRT's reference ``QUANTIZE`` (``reference_ops::AffineQuantize``: ``TfLiteRound(val /
    static_cast<float>(scale))``, C's ``round``), with the zero point added in int32 and the
    clamp; a quotient beyond int32 converts to INT32_MIN, as on x86.  ONNX Runtime rounds the
    same quotient half to even (:func:`qcourse.affine.quantize_linear`).  See the deploy
    chapter.
    """
    x, scale, zero_point = _check_quantize_args(x, "x", scale, zero_point)
    with np.errstate(over="ignore", invalid="ignore"):
        v = x / scale
    return _add_zero_point_wrap_clamp(_x86_int32(_round_half_away(v.astype(np.float64))),
                                      zero_point)


def quantize_litert_builtin(x_flat, scale, zero_point) -> np.ndarray:
    r"""LiteRT's built-in optimized int8 ``QUANTIZE``, on a tensor's flat buffer.

    ``optimized_ops::AffineQuantize`` handles the buffer in blocks of 8 with (emulated) NEON:
    :math:`\operatorname{rne}(x \cdot \mathrm{fl}_{32}(1 / s))` with the reciprocal computed in
    double and rounded to float32 (``vcvtnq_s32_f32``; out of range gives INT32_MIN), the zero
    point added in wrapping int32 and the clamp; the last ``size % 8`` values go through the
    scalar loop, :math:`\operatorname{round}(x / s)` with the quotient in **double** and ties
    away from zero.  ``x_flat`` is the buffer in the tensor's memory order (NHWC for an image),
    as a 1-D float32 array.  See the deploy chapter.
    """
    x, scale, zero_point = _check_quantize_args(x_flat, "x_flat", scale, zero_point)
    x = x.ravel()
    n_blocks = (x.size // 8) * 8
    s = np.float64(np.float32(scale))
    r = np.float32(1.0 / s)
    with np.errstate(over="ignore", invalid="ignore"):
        head = _x86_int32(np.rint((x[:n_blocks] * r).astype(np.float64)))
        tail = _x86_int32(_round_half_away(x[n_blocks:].astype(np.float64) / s))
    return _add_zero_point_wrap_clamp(np.concatenate([head, tail]), zero_point)


def quantize_input(model: DeployModel, X, runtime: str) -> np.ndarray:
    """The int8 input codes each runtime computes for float32 images ``X`` (NCHW or flat)."""
    _check_runtime(runtime)
    X = _check_deploy_model(model).check_images(X)
    s, z = model.input_scale, model.input_zero_point
    if runtime == "onnx":
        return quantize_linear(X, np.float32(s), np.int8(z))
    if runtime == "tflite-xnnpack":
        return quantize_reciprocal_rne(X, s, z)
    if runtime == "tflite-reference":
        return quantize_divide_half_away(X, s, z)
    nhwc = _to_nhwc(X)
    return _from_nhwc(quantize_litert_builtin(nhwc.ravel(), s, z).reshape(nhwc.shape))


def _to_nhwc(X: np.ndarray) -> np.ndarray:
    return X.transpose(0, 2, 3, 1) if X.ndim == 4 else X


def _from_nhwc(X: np.ndarray) -> np.ndarray:
    return X.transpose(0, 3, 1, 2) if X.ndim == 4 else X


def _check_runtime(runtime) -> str:
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    return runtime


# --------------------------------------------------------------------------- requantization


def tflite_fused_activation(layer) -> str:
    """The fused activation ("NONE", "RELU", "RELU6") whose clamp LiteRT computes as
    ``layer.clamp`` (``CalculateActivationRangeQuantized``, which
    :func:`qcourse.int_matmul.activation_range` reproduces), or ExportError if none does."""
    _check_deploy_layer(layer)
    qp = QParams(scale=np.float64(layer.output_scale),
                 zero_point=np.int64(layer.output_zero_point), qmin=_INT8_MIN, qmax=_INT8_MAX)
    for act, name in (("none", "NONE"), ("relu", "RELU"), ("relu6", "RELU6")):
        try:
            if activation_range(act, qp) == tuple(layer.clamp):
                return name
        except ValueError:   # ReLU6 on a grid that does not reach 0..6
            continue
    raise ExportError(f"the clamp {layer.clamp} is no fused activation LiteRT can express for "
                      f"output scale {layer.output_scale} and zero point "
                      f"{layer.output_zero_point} (NONE, RELU or RELU6)")


def xnnpack_clamp(layer) -> tuple[int, int]:
    """The clamp XNNPACK derives from the fused activation: ``lrintf(v / scale + zero_point)``
    in float32 for the activation's real bounds (0 and 6), saturated to int8
    (``xnn_qs8_quantize``)."""
    act = tflite_fused_activation(_check_deploy_layer(layer))
    if act == "NONE":
        return _INT8_MIN, _INT8_MAX

    def q(v):
        t = np.float32(np.float32(v) / layer.output_scale) + np.float32(layer.output_zero_point)
        return int(np.rint(np.clip(t, np.float32(_INT8_MIN), np.float32(_INT8_MAX))))

    return q(0.0), (q(6.0) if act == "RELU6" else _INT8_MAX)


def _tflite_multiplier(layer, input_scale) -> np.ndarray:
    """The real multiplier LiteRT's kernel preparation hands to QuantizeMultiplier."""
    sw = np.broadcast_to(layer.weight_scale, (layer.out_channels,))
    if isinstance(layer, Dense) and layer.weight_scale.size == 1:
        # GetQuantizedConvolutionMultipler: the float32 product, then a double division.
        prod = np.float64(np.float32(input_scale) * layer.weight_scale[0])
        return np.full(layer.out_channels, prod / np.float64(layer.output_scale))
    return double_multiplier(input_scale, sw, layer.output_scale)


#: The requantization conventions found in the runtimes, by what they compute (see
#: :func:`requantize_layer`).
CONVENTIONS = ("float32_rne", "gemmlowp_double", "single_half_up", "half_up_twice",
               "double_half_away")


def requantize_layer(layer, acc, input_scale, convention: str, clamp=None) -> np.ndarray:
    r"""Requantize a layer's channel-last int32 accumulators ``acc`` (..., out) by ``convention``.

    * ``"float32_rne"``: :func:`qcourse.int_matmul.requantize_float` with the float32 multiplier
      :math:`\mathrm{fl}(\mathrm{fl}(S_x S_W) / S_y)` (ONNX Runtime, XNNPACK);
    * ``"gemmlowp_double"``: :func:`qcourse.int_matmul.requantize_fixed_point` (SRDHM, then
      RDBPOT: ties up, then away from zero; LiteRT's reference convolutions);
    * ``"single_half_up"``: the same with ``rounding="single"`` (the ``TFLITE_SINGLE_ROUNDING``
      build, ruy's portable C++ path);
    * ``"half_up_twice"``: :func:`qcourse.int_matmul.requantize_fixed_point_half_up` (ruy's x86
      kernels: LiteRT's built-in fully-connected and convolution);
    * ``"double_half_away"``: :func:`qcourse.int_matmul.requantize_double_half_away` (LiteRT's
      reference fully-connected).

    The fixed-point ones use the ``(multiplier, shift)`` LiteRT's kernel preparation computes
    (:func:`qcourse.fixed_point.quantize_multiplier` of the real multiplier: per tensor for a
    fully-connected layer the float32 product :math:`S_x S_W` divided in double, otherwise all
    in double).  ``clamp`` overrides ``layer.clamp``.  Returns int8 codes.
    """
    _check_deploy_layer(layer)
    _checks.check_choice(convention, "convention", CONVENTIONS)
    input_scale = _scale(input_scale, "input_scale")
    zy = layer.output_zero_point
    lo, hi = layer.clamp if clamp is None else _checks.check_int_sequence(
        clamp, "clamp", _INT8_MIN, _INT8_MAX, min_len=2, max_len=2)
    if lo > hi:
        raise ValueError(f"clamp must be (lo, hi) with lo <= hi, got {clamp!r}")
    sw = np.broadcast_to(layer.weight_scale, (layer.out_channels,))
    if convention == "float32_rne":
        m = float_multiplier(np.float32(input_scale), sw, layer.output_scale)
        return requantize_float(acc, m, zy, lo, hi)
    if convention == "double_half_away":
        return requantize_double_half_away(
            acc, double_multiplier(input_scale, sw, layer.output_scale), zy, lo, hi)
    mult, shift = quantize_multiplier(_tflite_multiplier(layer, input_scale))
    if convention == "half_up_twice":
        return requantize_fixed_point_half_up(acc, mult, shift, zy, lo, hi)
    return requantize_fixed_point(acc, mult, shift, zy, lo, hi,
                                  rounding="double" if convention == "gemmlowp_double"
                                  else "single")


def _requantize(layer, acc: np.ndarray, input_scale, runtime: str) -> np.ndarray:
    """Requantize channel-last accumulators (..., out) as ``runtime`` does for this layer."""
    kind = layer.kind
    if runtime == "onnx":
        return requantize_layer(layer, acc, input_scale, "float32_rne")
    if runtime == "tflite-xnnpack":
        return requantize_layer(layer, acc, input_scale, "float32_rne", xnnpack_clamp(layer))
    if runtime == "tflite-reference":
        return requantize_layer(layer, acc, input_scale,
                                "double_half_away" if kind == "dense" else "gemmlowp_double")
    if kind in ("dense", "conv"):
        return requantize_layer(layer, acc, input_scale, "half_up_twice")
    # Depthwise: optimized_ops::Quantize -- a (NEON_2_SSE-emulated) SIMD loop over whole blocks
    # of 8 channels, which measures as SRDHM + rounding shift, both ties up; the remaining
    # channels go through the scalar MultiplyByQuantizedMultiplier (gemmlowp's rounding).
    in_blocks = np.arange(layer.out_channels) < (layer.out_channels // 8) * 8
    return np.where(in_blocks, requantize_layer(layer, acc, input_scale, "half_up_twice"),
                    requantize_layer(layer, acc, input_scale, "gemmlowp_double"))


def _forward(model: DeployModel, x_q: np.ndarray, runtime: str) -> list[np.ndarray]:
    codes = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, (MaxPool2D, Flatten)):
            x_q = layer.apply(x_q)
        elif isinstance(layer, GlobalAvgPool):
            x_q = layer.apply(x_q, *model.input_qparams(i), runtime)
        else:
            s_in, z_in = model.input_qparams(i)
            acc = layer.accumulate(x_q, z_in)
            if np.any((acc < _INT32_MIN) | (acc > _INT32_MAX)):
                raise ValueError(f"layers[{i}]: the int32 accumulator overflows")
            if acc.ndim == 4:
                y = _requantize(layer, acc.transpose(0, 2, 3, 1), s_in, runtime)
                x_q = y.transpose(0, 3, 1, 2)
            else:
                x_q = _requantize(layer, acc, s_in, runtime)
        codes.append(np.ascontiguousarray(x_q, dtype=np.int8))
    return codes


def predict_codes(model: DeployModel, X, runtime: str, *, all_layers: bool = False):
    """qcourse's prediction of the int8 codes ``runtime`` outputs for float32 images ``X``.

    ``X`` has shape (N,) + ``model.input_shape`` (NCHW for images), float32 -- or int8 codes, which
    skip the input quantization (for models exported with ``float_input=False``); the result is
    the last
    layer's codes, shape (N,) + ``model.output_shape`` (NCHW for a convolution), int8 -- or, with
    ``all_layers=True``, the list of every layer's codes.  Every step is integer arithmetic or
    one of the named float steps of :data:`RUNTIME_ARITHMETIC`.  See the deploy chapter.
    """
    _check_runtime(runtime)
    _check_deploy_model(model)
    all_layers = _checks.check_bool(all_layers, "all_layers")
    if isinstance(X, np.ndarray) and X.dtype == np.int8:
        x_q = _check_input_codes(model, X)
    else:
        x_q = quantize_input(model, X, runtime)
    codes = _forward(model, x_q, runtime)
    return codes if all_layers else codes[-1]


def _check_input_codes(model: DeployModel, X: np.ndarray) -> np.ndarray:
    if X.ndim != 1 + len(model.input_shape) or X.shape[1:] != model.input_shape \
            or X.shape[0] == 0:
        raise ValueError(f"X (int8 codes) must have shape {('N',) + model.input_shape}, got "
                         f"{X.shape}")
    return X


# --------------------------------------------------------------------------- .tflite export


def _litert():
    """The ai-edge-litert modules (schema, interpreter) and flatbuffers, or a clear ImportError."""
    try:
        import flatbuffers
        from ai_edge_litert import interpreter, schema_py_generated
    except ImportError as exc:  # pragma: no cover - the test and book environments have it
        raise ImportError("the .tflite export and LiteRT runs need the ai-edge-litert package "
                          "(pip install ai-edge-litert==2.3.0)") from exc
    return schema_py_generated, interpreter, flatbuffers


def _same_padding(in_size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) for one spatial axis."""
    out = -(-in_size // stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    return total // 2, total - total // 2


class _TFLiteGraph:
    """Tensors, buffers and operators of one subgraph, built with the schema's object API."""

    def __init__(self, schema):
        self.S = schema
        self.tensors, self.buffers, self.operators, self.opcodes = [], [schema.BufferT()], [], {}

    def tensor(self, name, shape, ttype, scale=None, zero_point=None, data=None, dim=0,
               dynamic_batch=True):
        S = self.S
        t = S.TensorT()
        t.name = name
        t.shape = [1, *shape[1:]] if dynamic_batch else list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.type = ttype
        t.buffer = 0
        if data is not None:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8).tolist()
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = S.QuantizationParametersT()
            q.scale = [float(v) for v in np.atleast_1d(np.asarray(scale, np.float32))]
            q.zeroPoint = [int(v) for v in np.broadcast_to(zero_point, (len(q.scale),))]
            q.quantizedDimension = dim
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code, inputs, outputs, options_type=0, options=None):
        S = self.S
        if code not in self.opcodes:
            oc = S.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            self.opcodes[code] = (len(self.opcodes), oc)
        o = S.OperatorT()
        o.opcodeIndex = self.opcodes[code][0]
        o.inputs, o.outputs = list(inputs), list(outputs)
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    def finish(self, inputs, outputs, description) -> bytes:
        S = self.S
        _, _, flatbuffers = _litert()
        sg = S.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators = self.tensors, inputs, outputs, \
            self.operators
        sg.name = "main"
        m = S.ModelT()
        m.version = 3
        m.operatorCodes = [oc for _, oc in sorted(self.opcodes.values(), key=lambda t: t[0])]
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.description = description
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def to_tflite(model: DeployModel, *, float_input: bool = True) -> bytes:
    """The model as a ``.tflite`` flatbuffer (bytes): float32 in (NHWC or (N, features)), the
    last layer's int8 codes out.

    Operators: ``QUANTIZE`` (float32 -> int8 input), ``PAD`` (with the input zero point, where a
    convolution's padding is not TensorFlow's SAME), ``CONV_2D``, ``DEPTHWISE_CONV_2D``,
    ``MAX_POOL_2D``, ``AVERAGE_POOL_2D`` (global, then ``RESHAPE``), ``RESHAPE`` (flatten) and
    ``FULLY_CONNECTED``, each with its fused activation
    (:func:`tflite_fused_activation`); weights int8 per output channel (``quantized_dimension``
    0 for convolutions and fully-connected layers, 3 for depthwise filters, which LiteRT stores
    as (1, kh, kw, C)), biases int32 at scale :math:`S_x S_W`.  A Dense after a Flatten of a
    (C, H, W) tensor gets its input columns permuted from NCHW to LiteRT's NHWC order.  The batch
    dimension is dynamic (``shape_signature`` -1).  With ``float_input=False`` the model takes the
    int8 input codes directly (no ``QUANTIZE``).  See the deploy chapter.
    """
    if not isinstance(model, DeployModel):
        raise TypeError(f"model must be a DeployModel, got {type(model).__name__}")
    float_input = _checks.check_bool(float_input, "float_input")
    S, _, _ = _litert()
    g = _TFLiteGraph(S)
    BO, TT = S.BuiltinOperator, S.TensorType
    act_codes = {"NONE": S.ActivationFunctionType.NONE, "RELU": S.ActivationFunctionType.RELU,
                 "RELU6": S.ActivationFunctionType.RELU6}

    def nhwc(shape):
        return (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape

    x = g.tensor("images_int8", (1, *nhwc(model.input_shape)), TT.INT8, model.input_scale,
                 model.input_zero_point)
    x_f = x
    if float_input:
        x_f = g.tensor("images", (1, *nhwc(model.input_shape)), TT.FLOAT32)
        g.op(BO.QUANTIZE, [x_f], [x])
    shape = model.input_shape
    flattened_from = None
    for i, layer in enumerate(model.layers):
        s_in, z_in = model.input_qparams(i)
        out_shape = model.shapes[i]
        if isinstance(layer, Flatten):
            new = g.tensor(f"shape_{i}", (2,), TT.INT32, data=np.array([-1, out_shape[0]],
                                                                      np.int32),
                           dynamic_batch=False)
            y = g.tensor(f"layer{i}_flatten", (1, out_shape[0]), TT.INT8, s_in, z_in)
            opts = S.ReshapeOptionsT()
            opts.newShape = [-1, out_shape[0]]
            g.op(BO.RESHAPE, [x, new], [y], S.BuiltinOptions.ReshapeOptions, opts)
            flattened_from = shape
        elif isinstance(layer, MaxPool2D):
            y = g.tensor(f"layer{i}_maxpool", (1, *nhwc(out_shape)), TT.INT8, s_in, z_in)
            opts = S.Pool2DOptionsT()
            opts.padding = S.Padding.VALID
            opts.strideH, opts.strideW = layer.stride
            opts.filterHeight, opts.filterWidth = layer.kernel
            g.op(BO.MAX_POOL_2D, [x], [y], S.BuiltinOptions.Pool2DOptions, opts)
        elif isinstance(layer, GlobalAvgPool):
            c, h, wd = shape
            pooled = g.tensor(f"layer{i}_avgpool", (1, 1, 1, c), TT.INT8, s_in, z_in)
            opts = S.Pool2DOptionsT()
            opts.padding = S.Padding.VALID
            opts.strideH = opts.strideW = 1
            opts.filterHeight, opts.filterWidth = h, wd
            g.op(BO.AVERAGE_POOL_2D, [x], [pooled], S.BuiltinOptions.Pool2DOptions, opts)
            new = g.tensor(f"shape_{i}", (2,), TT.INT32, data=np.array([-1, c], np.int32),
                           dynamic_batch=False)
            y = g.tensor(f"layer{i}_pooled", (1, c), TT.INT8, s_in, z_in)
            opts = S.ReshapeOptionsT()
            opts.newShape = [-1, c]
            g.op(BO.RESHAPE, [pooled, new], [y], S.BuiltinOptions.ReshapeOptions, opts)
            flattened_from = None      # (C,) in channel order: no column permutation
        elif isinstance(layer, Dense):
            w = layer.weight
            if flattened_from is not None and len(flattened_from) == 3:
                c, h, wd = flattened_from   # NCHW column order -> NHWC column order
                w = w.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
            act = tflite_fused_activation(layer)
            wt = g.tensor(f"layer{i}_weight", w.shape, TT.INT8, layer.weight_scale, 0, data=w,
                          dynamic_batch=False)
            bscale = (np.float32(s_in) * layer.weight_scale).astype(np.float32)
            bt = g.tensor(f"layer{i}_bias", (layer.out_channels,), TT.INT32, bscale, 0,
                          data=layer.bias, dynamic_batch=False)
            y = g.tensor(f"layer{i}_dense", (1, layer.out_channels), TT.INT8,
                         layer.output_scale, layer.output_zero_point)
            opts = S.FullyConnectedOptionsT()
            opts.fusedActivationFunction = act_codes[act]
            g.op(BO.FULLY_CONNECTED, [x, wt, bt], [y], S.BuiltinOptions.FullyConnectedOptions,
                 opts)
        else:
            act = tflite_fused_activation(layer)
            c, h, wd = shape
            kh, kw = layer.weight.shape[2:]
            sh, sw = layer.stride
            top, left, bottom, right = layer.padding
            same = (_same_padding(h, kh, sh) == (top, bottom)
                    and _same_padding(wd, kw, sw) == (left, right))
            if not same and any(layer.padding):
                padded = (c, h + top + bottom, wd + left + right)
                pads = g.tensor(f"layer{i}_pads", (4, 2), TT.INT32,
                                data=np.array([[0, 0], [top, bottom], [left, right], [0, 0]],
                                              np.int32), dynamic_batch=False)
                xp = g.tensor(f"layer{i}_padded", (1, *nhwc(padded)), TT.INT8, s_in, z_in)
                g.op(BO.PAD, [x, pads], [xp], S.BuiltinOptions.PadOptions, S.PadOptionsT())
                x = xp
            padding = S.Padding.SAME if same and any(layer.padding) else S.Padding.VALID
            bscale = (np.float32(s_in) * layer.weight_scale).astype(np.float32)
            bt = g.tensor(f"layer{i}_bias", (layer.out_channels,), TT.INT32, bscale, 0,
                          data=layer.bias, dynamic_batch=False)
            y = g.tensor(f"layer{i}_{layer.kind}", (1, *nhwc(out_shape)), TT.INT8,
                         layer.output_scale, layer.output_zero_point)
            if layer.groups == 1:
                w = layer.weight.transpose(0, 2, 3, 1)            # OHWI
                wt = g.tensor(f"layer{i}_weight", w.shape, TT.INT8, layer.weight_scale, 0,
                              data=w, dim=0, dynamic_batch=False)
                opts = S.Conv2DOptionsT()
                code, otype = BO.CONV_2D, S.BuiltinOptions.Conv2DOptions
            else:
                w = layer.weight.transpose(1, 2, 3, 0)            # (1, kh, kw, C)
                wt = g.tensor(f"layer{i}_weight", w.shape, TT.INT8, layer.weight_scale, 0,
                              data=w, dim=3, dynamic_batch=False)
                opts = S.DepthwiseConv2DOptionsT()
                opts.depthMultiplier = 1
                code, otype = BO.DEPTHWISE_CONV_2D, S.BuiltinOptions.DepthwiseConv2DOptions
            opts.padding = padding
            opts.strideH, opts.strideW = sh, sw
            opts.dilationHFactor = opts.dilationWFactor = 1
            opts.fusedActivationFunction = act_codes[act]
            g.op(code, [x, wt, bt], [y], otype, opts)
        x = y
        shape = out_shape
    return g.finish([x_f], [x], f"{model.name} (qcourse.deploy)")


def _interpreter(model_bytes: bytes, runtime: str, batch_shape: tuple):
    _, interp, _ = _litert()
    resolver = getattr(interp.OpResolverType, LITERT_RESOLVERS[runtime])
    it = interp.Interpreter(model_content=model_bytes, experimental_op_resolver_type=resolver,
                            num_threads=1)
    inp = it.get_input_details()[0]
    if tuple(inp["shape"]) != batch_shape:
        it.resize_tensor_input(inp["index"], list(batch_shape))
    it.allocate_tensors()
    return it


#: Operators that LiteRT's XNNPACK delegate leaves to the built-in kernels in the course's
#: models: ``AVERAGE_POOL_2D`` on int8 (measured with ai-edge-litert 2.3.0), whose integer
#: rounding every resolver shares (the ``pool`` entries of :data:`RUNTIME_ARITHMETIC`).
_BUILTIN_UNDER_XNNPACK = frozenset({"AVERAGE_POOL_2D"})


def ops_outside_delegates(it) -> list[str]:
    """The operators a LiteRT interpreter ``it`` runs itself, not inside a ``DELEGATE`` node
    (names, from the outputs back): walk back from the outputs through the delegate nodes and
    the original operators that produce their inputs."""
    ops = it._get_ops_details()
    producer = {}
    for o in ops:                       # a DELEGATE comes after the operators it replaces
        for t in o["outputs"]:
            producer[int(t)] = o
    need = [int(d["index"]) for d in it.get_output_details()]
    seen, outside = set(), []
    while need:
        t = need.pop()
        o = producer.get(t)
        if o is None or o["index"] in seen:
            continue
        seen.add(o["index"])
        if o["op_name"] != "DELEGATE":
            outside.append(o["op_name"])
        need += [int(i) for i in o["inputs"] if int(i) >= 0]
    return outside


def _check_runtime_input(X) -> np.ndarray:
    """Images for a runtime: float32 (finite) or int8 codes, with a batch axis."""
    _checks.check_ndarray(X, "X", (np.dtype(np.float32), np.dtype(np.int8)))
    if X.ndim < 2:
        raise ValueError(f"X must have a batch axis and the model's input shape, got shape "
                         f"{X.shape}")
    return _checks.check_finite(X, "X")


def run_tflite(model_bytes: bytes, X, runtime: str = "tflite-xnnpack", *,
               check_delegated: bool = True) -> np.ndarray:
    """Run a ``.tflite`` model in LiteRT's interpreter with the runtime's op resolver.

    ``X`` is float32 in the course's layout (NCHW images or (N, features)); it is transposed to
    NHWC for LiteRT and the output transposed back, so the codes compare directly with
    :func:`predict_codes`.  With ``runtime="tflite-xnnpack"`` and ``check_delegated`` (default),
    a model of which XNNPACK did not take every operator but an ``AVERAGE_POOL_2D`` raises
    ``RuntimeError`` (the prediction assumes XNNPACK's arithmetic for the rest).
    """
    _check_runtime(runtime)
    if runtime == "onnx":
        raise ValueError("run_tflite runs LiteRT runtimes; use run_onnx for 'onnx'")
    if not isinstance(model_bytes, (bytes, bytearray)):
        raise TypeError(f"model_bytes must be bytes (a .tflite file's content), got "
                        f"{type(model_bytes).__name__}")
    check_delegated = _checks.check_bool(check_delegated, "check_delegated")
    _check_runtime_input(X)
    xin = np.ascontiguousarray(_to_nhwc(X))
    it = _interpreter(bytes(model_bytes), runtime, xin.shape)
    inp = it.get_input_details()[0]
    if tuple(inp["shape"]) != xin.shape:
        raise ValueError(f"X has shape {X.shape} but the model takes {tuple(inp['shape'])} "
                         f"(NHWC in the file)")
    if runtime == "tflite-xnnpack" and check_delegated:
        outside = ops_outside_delegates(it)
        if set(outside) - _BUILTIN_UNDER_XNNPACK:
            raise RuntimeError("XNNPACK did not take the model's operators "
                               + ", ".join(outside) + " (the prediction assumes that only "
                               + ", ".join(sorted(_BUILTIN_UNDER_XNNPACK)) + " run outside it)")
    it.set_tensor(inp["index"], xin)
    it.invoke()
    out = it.get_tensor(it.get_output_details()[0]["index"]).copy()
    return _from_nhwc(out)


# --------------------------------------------------------------------------- ONNX export

_ONNX_OPSET = 21


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - the test and book environments have it
        raise ImportError("the ONNX export needs the onnx package (pip install onnx)") from exc
    return onnx, TensorProto, helper, numpy_helper


def to_onnx(model: DeployModel, form: str = "qoperator", *, float_input: bool = True):
    r"""The model as an ONNX ``ModelProto`` (opset 21): float32 images in, int8 codes out.

    ``form="qoperator"``: integer operators throughout -- ``QuantizeLinear`` for the input,
    ``QLinearConv`` for convolutions (``group`` = channels for depthwise, ``pads`` as given: ONNX
    pads a ``QLinearConv`` input with its zero point) and for a Dense with a bias (ONNX's
    ``QLinearMatMul`` has no bias input; a 1x1 ``QLinearConv`` on an (N, K, 1, 1) view has one),
    ``QLinearMatMul`` for a Dense without bias, an int8 ``Clip`` where the fused activation
    narrows the output grid, ``MaxPool`` / ``Flatten`` on int8 codes, and ONNX Runtime's
    ``QLinearGlobalAveragePool`` (domain ``com.microsoft``; ONNX has no integer global pool)
    followed by ``Flatten``.

    ``form="qdq"``: the graph a quantization tool emits -- float ``Conv`` / ``Gemm`` / ``MaxPool``
    between ``DequantizeLinear`` (int8 weights per output channel, int32 bias at
    :math:`S_x S_W`) and ``QuantizeLinear`` nodes; ONNX Runtime's graph optimizer fuses each
    group back into an integer kernel (the tests check that no float ``Conv``/``Gemm`` survives).
    An activation narrower than the output grid becomes an int8 ``Clip`` after the
    ``QuantizeLinear``.  A global average pool stays ``QLinearGlobalAveragePool`` in this form
    too: ONNX Runtime does not fuse a Q/DQ pool and would average in float.  Input (N, C, H, W)
    or (N, features), batch dynamic; int8 codes instead of float32 with ``float_input=False``.
    See the deploy chapter.
    """
    if not isinstance(model, DeployModel):
        raise TypeError(f"model must be a DeployModel, got {type(model).__name__}")
    if form not in ("qoperator", "qdq"):
        raise ValueError(f"form must be 'qoperator' or 'qdq', got {form!r}")
    float_input = _checks.check_bool(float_input, "float_input")
    onnx, TP, helper, nph = _onnx()
    nodes, inits = [], []

    def const(name, value):
        inits.append(nph.from_array(np.asarray(value), name))
        return name

    def qparams(prefix, scale, zp):
        return (const(f"{prefix}_scale", np.float32(scale)),
                const(f"{prefix}_zero_point", np.int8(zp)))

    x_s, x_z = qparams("images", model.input_scale, model.input_zero_point)
    if float_input:
        nodes.append(helper.make_node("QuantizeLinear", ["images", x_s, x_z], ["x0"]))
    else:
        nodes.append(helper.make_node("Identity", ["images"], ["x0"]))
    x = "x0"
    for i, layer in enumerate(model.layers):
        s_in, z_in = model.input_qparams(i)
        in_s, in_z = f"q{i}_in_scale", f"q{i}_in_zero_point"
        const(in_s, np.float32(s_in))
        const(in_z, np.int8(z_in))
        y = f"x{i + 1}"
        if isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [x], [y], axis=1))
            x = y
            continue
        if isinstance(layer, GlobalAvgPool):
            # ONNX Runtime's contrib operator (com.microsoft), in both forms: its graph
            # optimizer does not fuse DequantizeLinear -> GlobalAveragePool (or AveragePool) ->
            # QuantizeLinear, and the float mean it runs instead is not the integer one
            # (measured with onnxruntime 1.32: codes differ on ties)
            nodes.append(helper.make_node(
                "QLinearGlobalAveragePool", [x, in_s, in_z, in_s, in_z], [f"{y}_4d"],
                domain="com.microsoft", channels_last=0))
            nodes.append(helper.make_node("Flatten", [f"{y}_4d"], [y], axis=1))
            x = y
            continue
        if isinstance(layer, MaxPool2D):
            if form == "qoperator":
                nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=layer.kernel,
                                              strides=layer.stride))
            else:
                nodes += [helper.make_node("DequantizeLinear", [x, in_s, in_z], [f"{y}_f"]),
                          helper.make_node("MaxPool", [f"{y}_f"], [f"{y}_pf"],
                                           kernel_shape=layer.kernel, strides=layer.stride),
                          helper.make_node("QuantizeLinear", [f"{y}_pf", in_s, in_z], [y])]
            x = y
            continue
        out_s, out_z = qparams(f"layer{i}_out", layer.output_scale, layer.output_zero_point)
        c_out = layer.out_channels
        w_s = const(f"layer{i}_w_scale", np.broadcast_to(layer.weight_scale, (c_out,))
                    .astype(np.float32).copy())
        w_z = const(f"layer{i}_w_zero_point", np.zeros(c_out, np.int8))
        bias = const(f"layer{i}_bias", layer.bias)
        dense = isinstance(layer, Dense)
        w4 = layer.weight[:, :, None, None] if dense else layer.weight
        conv_attrs = {} if dense else {
            "strides": list(layer.stride), "group": layer.groups,
            "pads": [layer.padding[0], layer.padding[1], layer.padding[2], layer.padding[3]],
            "kernel_shape": list(layer.weight.shape[2:])}
        lo, hi = layer.clamp
        clip = (lo, hi) != (_INT8_MIN, _INT8_MAX)
        raw = f"{y}_raw" if clip else y
        if form == "qoperator":
            if dense and not np.any(layer.bias):
                wt = const(f"layer{i}_weight_t", np.ascontiguousarray(layer.weight.T))
                nodes.append(helper.make_node("QLinearMatMul", [x, in_s, in_z, wt, w_s, w_z,
                                                                out_s, out_z], [raw]))
            else:
                w = const(f"layer{i}_weight", np.ascontiguousarray(w4))
                src = x
                if dense:
                    axes = const(f"layer{i}_axes", np.array([2, 3], np.int64))
                    nodes.append(helper.make_node("Unsqueeze", [x, axes], [f"{y}_in4d"]))
                    src = f"{y}_in4d"
                nodes.append(helper.make_node(
                    "QLinearConv", [src, in_s, in_z, w, w_s, w_z, out_s, out_z, bias],
                    [f"{raw}_4d" if dense else raw], **conv_attrs))
                if dense:
                    nodes.append(helper.make_node("Flatten", [f"{raw}_4d"], [raw], axis=1))
        else:
            w = const(f"layer{i}_weight", np.ascontiguousarray(layer.weight if dense else w4))
            b_s = const(f"layer{i}_b_scale", (np.float32(s_in) * np.broadcast_to(
                layer.weight_scale, (c_out,))).astype(np.float32))
            b_z = const(f"layer{i}_b_zero_point", np.zeros(c_out, np.int32))
            nodes += [helper.make_node("DequantizeLinear", [x, in_s, in_z], [f"{y}_xf"]),
                      helper.make_node("DequantizeLinear", [w, w_s, w_z], [f"{y}_wf"], axis=0),
                      helper.make_node("DequantizeLinear", [bias, b_s, b_z], [f"{y}_bf"],
                                       axis=0)]
            if dense:
                nodes.append(helper.make_node("Gemm", [f"{y}_xf", f"{y}_wf", f"{y}_bf"],
                                              [f"{y}_f"], transB=1))
            else:
                nodes.append(helper.make_node("Conv", [f"{y}_xf", f"{y}_wf", f"{y}_bf"],
                                              [f"{y}_f"], **conv_attrs))
            nodes.append(helper.make_node("QuantizeLinear", [f"{y}_f", out_s, out_z], [raw]))
        if clip:
            nodes.append(helper.make_node("Clip", [raw, const(f"layer{i}_lo", np.int8(lo)),
                                                   const(f"layer{i}_hi", np.int8(hi))], [y]))
        x = y
    in_shape = ["N", *model.input_shape]
    out_shape = ["N", *model.output_shape]
    graph = helper.make_graph(
        nodes, f"{model.name}_{form}",
        [helper.make_tensor_value_info("images", TP.FLOAT if float_input else TP.INT8,
                                       in_shape)],
        [helper.make_tensor_value_info(x, TP.INT8, out_shape)], initializer=inits)
    opsets = [helper.make_opsetid("", _ONNX_OPSET)]
    if any(n.domain == "com.microsoft" for n in nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets,
                          producer_name="qcourse.deploy")
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def run_onnx(onnx_model, X, *, optimized_model_path=None) -> np.ndarray:
    """Run an ONNX model (a ``ModelProto`` or the bytes of one) in ONNX Runtime's CPU provider,
    one thread, all graph optimizations on (which fuse QDQ groups into integer kernels).

    ``X`` float32 in the course's layout; returns the int8 output codes.  With
    ``optimized_model_path`` ONNX Runtime also saves the graph it actually ran.
    """
    import onnxruntime as ort

    if isinstance(onnx_model, (bytes, bytearray)):
        data = onnx_model
    elif type(onnx_model).__name__ == "ModelProto" and hasattr(onnx_model, "SerializeToString"):
        data = onnx_model.SerializeToString()
    else:
        raise TypeError(f"onnx_model must be an onnx.ModelProto or the bytes of one, got "
                        f"{_checks.describe(onnx_model)}")
    _check_runtime_input(X)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    try:
        sess = ort.InferenceSession(bytes(data), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise ValueError(f"onnx_model is not a model ONNX Runtime can load: {exc}") from None
    inp = sess.get_inputs()[0]
    if len(inp.shape) != X.ndim or any(isinstance(d, int) and d != x for d, x in
                                       zip(inp.shape, X.shape, strict=True)):
        raise ValueError(f"X has shape {X.shape} but the model takes {tuple(inp.shape)}")
    return sess.run(None, {inp.name: X})[0]


def run_runtime(model: DeployModel, X, runtime: str, *, form: str = "qoperator") -> np.ndarray:
    """Export ``model`` and run it in ``runtime`` itself (the outside system, not qcourse)."""
    _check_runtime(runtime)
    X = _check_deploy_model(model).check_images(X)
    if runtime == "onnx":
        return run_onnx(to_onnx(model, form), X)
    return run_tflite(to_tflite(model), X, runtime)


def agreement(model: DeployModel, X, runtimes=RUNTIMES, *, form: str = "qoperator") -> dict:
    """For each runtime: ``(matching codes, codes compared)`` between :func:`predict_codes` and
    the runtime's own output on ``X``."""
    _check_deploy_model(model).check_images(X)
    runtimes = _checks.check_sequence(runtimes, "runtimes", min_len=1)
    for i, rt in enumerate(runtimes):
        _checks.check_choice(rt, f"runtimes[{i}]", RUNTIMES)
    out = {}
    for rt in runtimes:
        got = run_runtime(model, X, rt, form=form)
        pred = predict_codes(model, X, rt)
        out[rt] = (int(np.count_nonzero(got == pred)), int(pred.size))
    return out


# --------------------------------------------------------------------------- from qcourse models


def _check_int8_grids(name: str, layer) -> None:
    weights = layer.linear.weight_qparams if hasattr(layer, "linear") else layer.weight_qparams
    if np.any(np.asarray(weights.zero_point) != 0):
        raise ExportError(f"layer {name!r} has asymmetric weights (zero point != 0); LiteRT's "
                          f"int8 kernels and XNNPACK need symmetric weights")
    for what, qp in (("input", layer.input_qparams), ("output", layer.output_qparams)):
        if (qp.qmin, qp.qmax) != (_INT8_MIN, _INT8_MAX):
            raise ExportError(f"layer {name!r}: the {what} grid [{qp.qmin}, {qp.qmax}] is not "
                              f"int8 [-128, 127]")


def _dense(ql) -> Dense:
    return Dense(ql.weight_q, ql.bias_q, ql.weight_qparams.scale,
                 float(ql.output_qparams.scale), int(ql.output_qparams.zero_point),
                 ql.output_range)


def _cnn_layers(integer_model) -> list:
    from qcourse.conv import IntegerGlobalAvgPool, QuantizedConv2d
    from qcourse.int_matmul import QuantizedLinear

    layers = []
    for name, layer in integer_model.layers:
        if isinstance(layer, IntegerGlobalAvgPool):
            layers.append(GlobalAvgPool())
            continue
        if not isinstance(layer, (QuantizedConv2d, QuantizedLinear)):
            raise ExportError(f"layer {name!r} is a {type(layer).__name__}, which the exporter "
                              f"cannot write (QuantizedConv2d, IntegerGlobalAvgPool, "
                              f"QuantizedLinear)")
        _check_int8_grids(name, layer)
        if isinstance(layer, QuantizedLinear):
            if layers and isinstance(layers[-1], Conv2D):
                layers.append(Flatten())
            layers.append(_dense(layer))
            continue
        layers.append(Conv2D(layer.weight_q, layer.bias_q, layer.linear.weight_qparams.scale,
                             float(layer.output_qparams.scale),
                             int(layer.output_qparams.zero_point), layer.output_range,
                             stride=layer.stride, padding=layer.padding, groups=layer.groups))
    return layers


def from_integer_model(integer_model, *, name: str = "qcourse",
                       input_shape: tuple | None = None) -> DeployModel:
    """The :class:`DeployModel` of a qcourse integer network.

    Accepts a :class:`qcourse.conv.IntegerCNN` (the course CNN: one :class:`Conv2D` per
    :class:`qcourse.conv.QuantizedConv2d`, regular or depthwise, a :class:`GlobalAvgPool` for
    its pool, a :class:`Dense` for the classifier; ``input_shape`` (channels, height, width) is
    then required, since a convolutional network takes any image size) or a
    :class:`qcourse.ptq.IntegerModel` (the digits MLP: one :class:`Dense` per
    :class:`qcourse.int_matmul.QuantizedLinear`).  The fused ReLU/ReLU6 is each layer's clamp.
    Weights must be symmetric (zero point 0) and activations int8 on the full grid [-128, 127];
    anything else raises :class:`ExportError` naming the layer.
    """
    from qcourse.conv import IntegerCNN
    from qcourse.ptq import IntegerModel

    if isinstance(integer_model, IntegerCNN):
        if input_shape is None:
            raise ValueError("input_shape (channels, height, width) is required for an "
                             "IntegerCNN")
        layers = _cnn_layers(integer_model)
        shape = tuple(input_shape)
    elif isinstance(integer_model, IntegerModel):
        for lname, ql in zip(integer_model.names, integer_model.layers, strict=True):
            _check_int8_grids(lname, ql)
        layers = [_dense(ql) for ql in integer_model.layers]
        shape = (integer_model.layers[0].in_features,)
    else:
        raise TypeError(f"integer_model must be a qcourse.conv.IntegerCNN or a "
                        f"qcourse.ptq.IntegerModel, got {type(integer_model).__name__}")
    qp = integer_model.input_qparams
    if (qp.qmin, qp.qmax) != (_INT8_MIN, _INT8_MAX):
        raise ExportError(f"the input grid [{qp.qmin}, {qp.qmax}] is not int8 [-128, 127]")
    return DeployModel(shape, float(qp.scale), int(qp.zero_point), tuple(layers), name=name)


#: How the course's integer CNN is made for deployment: the ReLU6 network of
#: :func:`qcourse.cnn.load_course_cnn`, converted by :func:`qcourse.cnn.convert_cnn` with this
#: many training images for calibration (the conv chapter's network).
COURSE_CALIBRATION_IMAGES = 512


@functools.lru_cache(maxsize=1)
def _course_model_cached():
    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn

    X_train, _ = digits_images("train")
    integer = convert_cnn(load_course_cnn("relu6"), X_train[:COURSE_CALIBRATION_IMAGES])
    X_test, y_test = digits_images("test")
    X_test = X_test.astype(np.float32)
    return (from_integer_model(integer, name="digits_cnn", input_shape=X_test.shape[1:]),
            X_test, y_test)


def course_model():
    """The course's trained integer network as a :class:`DeployModel`, with its test images.

    The course CNN of the conv chapter (a small MobileNet for the 8x8 digits: a 3x3
    convolution, three depthwise-separable blocks with ReLU6, global average pooling, a fully
    connected classifier), statically quantized with per-channel int8 weights
    (:func:`qcourse.cnn.convert_cnn`); input (N, 1, 8, 8) float32, NCHW.  Returns
    ``(model, X_test, y_test)``; cached per process.
    """
    model, X, y = _course_model_cached()
    return model, X.copy(), y.copy()


# --------------------------------------------------------------------------- test inputs


def _relu_clamps(zero_point: int, scale) -> list[tuple[int, int]]:
    """The clamps of NONE, RELU and RELU6 on an int8 output grid (LiteRT's computation)."""
    qp = QParams(scale=np.float64(np.float32(scale)), zero_point=np.int64(zero_point),
                 qmin=_INT8_MIN, qmax=_INT8_MAX)
    clamps = []
    for act in ("none", "relu", "relu6"):
        try:
            lo, hi = activation_range(act, qp)
        except ValueError:   # ReLU6 on a grid that does not reach 0..6
            continue
        if lo < hi:
            clamps.append((lo, hi))
    return clamps


def random_dense_model(seed: int, *, tie_heavy: bool = False):
    r"""A random one-layer :class:`Dense` model and int8 input codes for it (the deploy chapter's
    and the tests' probe of how a runtime requantizes).

    Random shapes (1..32 outputs, 1..47 inputs, batch 1..8), per-tensor or per-channel weight
    scales, a random output zero point and fused activation (none, ReLU, ReLU6).  With
    ``tie_heavy=True`` the scales are chosen so that many outputs are exact ties: input and
    output scales are powers of two and the weight scales :math:`2^{-k}(1 + j/4)`, so
    :math:`M = (4 + j) / 2^{e+2}`; weights and bias are multiples of :math:`2^p` with
    :math:`p` near :math:`e + 1`, so :math:`v M` has one or two fraction bits and lands on
    :math:`\tfrac12` for a large share of the outputs.  Returns ``(model, x_codes)``.
    """
    rng = np.random.default_rng(_int(seed, "seed", 0))
    tie_heavy = _checks.check_bool(tie_heavy, "tie_heavy")
    out_f, in_f, batch = (int(rng.integers(1, 33)), int(rng.integers(1, 48)),
                          int(rng.integers(1, 9)))
    n = out_f if out_f > 1 and rng.integers(0, 2) else 1
    zx = int(rng.integers(-100, 100))
    if tie_heavy:
        d_max = int(rng.choice([1, 3, 8, 27, 100]))
        x = np.clip(zx + rng.integers(-d_max, d_max + 1, (batch, in_f)), _INT8_MIN, _INT8_MAX)
        e = int(rng.integers(0, 7))
        p = int(rng.integers(max(0, e - 2), min(e + 2, 7)))
        w_max = max(1, 127 >> p)
        w = rng.integers(-w_max, w_max + 1, (out_f, in_f)) << p
        a, c = int(rng.integers(0, 6)), int(rng.integers(0, 4))
        sx, sy = 2.0**-a, 2.0**-c
        sw = 2.0 ** -(e + c - a) * (1 + rng.integers(0, 4, n) / 4)
        bias = rng.integers(-64, 65, out_f) << p
    else:
        sx, sy = rng.uniform(0.002, 0.1), rng.uniform(0.01, 1.0)
        sw = rng.uniform(1e-4, 0.02, n)
        w = rng.integers(-127, 128, (out_f, in_f))
        x = rng.integers(_INT8_MIN, _INT8_MAX + 1, (batch, in_f))
        bias = rng.integers(-20000, 20000, out_f)
    zy = int(rng.integers(-100, 100))
    clamps = _relu_clamps(zy, sy)
    layer = Dense(w, bias, sw, sy, zy, clamps[int(rng.integers(0, len(clamps)))])
    return DeployModel((in_f,), sx, zx, (layer,), name="random_dense"), x.astype(np.int8)


def adversarial_images(model: DeployModel, n: int, seed: int) -> np.ndarray:
    r"""``3 n`` float32 images for ``model``'s input: ``n`` random (uniform on -2..20), ``n``
    exact ties of the input grid (:math:`x / S = k + 1/2` in exact arithmetic, rounded to
    float32), and ``n`` ties mixed with saturating values (:math:`\pm 3 \cdot 10^3`,
    :math:`\pm 10^4`, :math:`\pm 10^9`: far beyond the int8 grid, and beyond int32 after the
    division for the largest).

    Bounds: ``n`` is an int in [1, 2**28 / (3 x the input's size)] (at most 2**28 values)."""
    _check_deploy_model(model)
    n = _int(n, "n", 1, max(1, _checks.MAX_ELEMENTS // (3 * int(np.prod(model.input_shape)))))
    rng = np.random.default_rng(_int(seed, "seed", 0))
    shape = (n,) + model.input_shape
    s = np.float64(model.input_scale)
    ties = ((rng.integers(-140, 140, shape) + 0.5) * s).astype(np.float32)
    rand = rng.uniform(-2, 20, shape).astype(np.float32)
    sat = rng.choice(np.array([-1e4, 1e4, 3e3, -3e3, 1e9, -1e9], np.float32), shape)
    mix = np.where(rng.random(shape) < 0.3, sat, ties).astype(np.float32)
    return np.concatenate([rand, ties, mix])


# --------------------------------------------------------------------------- command line


def _layout_text(model: DeployModel) -> str:
    if len(model.input_shape) == 1:
        f = model.input_shape[0]
        return (f"model.onnx and model.tflite both take float32 of shape (N, {f}) (one row of "
                f"{f} pixel values per image, each the 0..16 intensity divided by 16, row-major "
                f"8x8) and return int8 codes of "
                f"shape (N, {model.output_shape[0]}).")
    c, h, w = model.input_shape
    return (f"model.onnx takes float32 NCHW images of shape (N, {c}, {h}, {w}); model.tflite "
            f"takes float32 NHWC images of shape (N, {h}, {w}, {c}). Both return the last "
            f"layer's int8 codes.")


def _help_epilog() -> str:
    shape = "(N, 64)"
    try:
        model, _, _ = course_model()
        layout = _layout_text(model)
        shape = str(("N", *model.input_shape)).replace("'", "")
    except Exception as exc:  # noqa: BLE001 - help must print even if training fails
        layout = f"(the course model could not be built: {exc})"
    return (f"Input layouts: {layout}\n\n`run` reads X.npy: float32 images of shape {shape} in "
            f"the course's layout (for images NCHW, whichever runtime is named) and writes "
            f"Y.npy: int8 codes, qcourse's prediction of that runtime's output.\n\nRuntimes: "
            + "; ".join(f"{rt} (convolutions: {_function_name(rt, 'conv')}, fully connected: "
                        f"{_function_name(rt, 'dense')})" for rt in RUNTIMES))


def _function_name(runtime: str, step: str) -> str:
    return RUNTIME_ARITHMETIC[runtime][step].split(":")[0].split(" (")[0]


def main(argv=None) -> int:
    """``python -m qcourse.deploy {export,run}``; see ``--help``.

    ``argv``: the arguments (a list of strings; None reads ``sys.argv``).  Arguments argparse
    refuses end the program with its message and status 2 (``SystemExit``)."""
    if argv is not None:
        for i, arg in enumerate(_checks.check_sequence(argv, "argv")):
            _checks.check_instance(arg, f"argv[{i}]", str, "a string")
    parser = argparse.ArgumentParser(
        prog="python -m qcourse.deploy",
        description="Export the course's trained integer network to ONNX and LiteRT, and "
                    "predict the int8 codes each runtime returns, with qcourse's arithmetic.",
        epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write DIR/model.onnx and DIR/model.tflite",
                        epilog=_help_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ex.add_argument("--form", choices=("qoperator", "qdq"), default="qoperator",
                    help="ONNX form (default: qoperator)")
    rn = sub.add_parser("run", help="predict a runtime's output codes for X.npy",
                        epilog=_help_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rn.add_argument("--runtime", required=True, choices=RUNTIMES)
    rn.add_argument("--inputs", required=True, type=Path, help="X.npy, float32 images")
    rn.add_argument("--out", required=True, type=Path, help="Y.npy to write (int8 codes)")
    args = parser.parse_args(argv)
    model, _, _ = course_model()
    if args.command == "export":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "model.onnx").write_bytes(to_onnx(model, args.form).SerializeToString())
        (args.out / "model.tflite").write_bytes(to_tflite(model))
        print(f"wrote {args.out / 'model.onnx'} and {args.out / 'model.tflite'}")
        print(_layout_text(model))
        return 0
    try:
        X = np.load(args.inputs, allow_pickle=False)
    except (OSError, ValueError) as exc:
        parser.error(f"--inputs {args.inputs}: cannot read a .npy array ({exc})")
    try:
        Y = predict_codes(model, X, args.runtime)
    except (TypeError, ValueError) as exc:
        parser.error(f"--inputs {args.inputs}: {exc}")
    np.save(args.out, Y)
    print(f"wrote {args.out}: int8 codes of shape {Y.shape} predicted for {args.runtime}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
