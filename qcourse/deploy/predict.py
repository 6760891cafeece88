"""What each runtime computes, predicted with qcourse's arithmetic: the input
quantization (float32 -> int8) and the requantization of every layer under each
runtime's convention (:data:`RUNTIME_ARITHMETIC`), and :func:`predict_codes`.

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse import _checks
from qcourse.affine import QParams, quantize_linear
from qcourse.deploy.layers import (
    _INT8_MAX,
    _INT8_MIN,
    Dense,
    DeployModel,
    ExportError,
    Flatten,
    GlobalAvgPool,
    MaxPool2D,
    _check_deploy_layer,
    _check_deploy_model,
    _int,
    _scale,
)
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
    "CONVENTIONS",
    "LITERT_RESOLVERS",
    "RUNTIMES",
    "RUNTIME_ARITHMETIC",
    "predict_codes",
    "quantize_divide_half_away",
    "quantize_input",
    "quantize_litert_builtin",
    "quantize_reciprocal_rne",
    "requantize_layer",
    "tflite_fused_activation",
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


# --------------------------------------------------------------------------- input quantization


def _x86_int32(v: np.ndarray) -> np.ndarray:
    """float -> int32 as x86's conversions do: out-of-range and NaN give INT32_MIN."""
    bad = ~(np.abs(v) < 2.0**31)
    return np.where(bad, _checks.INT32_MIN, np.where(bad, 0, v)).astype(np.int64)


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
            if np.any((acc < _checks.INT32_MIN) | (acc > _checks.INT32_MAX)):
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


def _check_runtime_input(X) -> np.ndarray:
    """Images for a runtime: float32 (finite) or int8 codes, with a batch axis."""
    _checks.check_ndarray(X, "X", (np.dtype(np.float32), np.dtype(np.int8)))
    if X.ndim < 2:
        raise ValueError(f"X must have a batch axis and the model's input shape, got shape "
                         f"{X.shape}")
    return _checks.check_finite(X, "X")
