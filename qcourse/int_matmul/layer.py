"""A whole quantized linear layer: :class:`QuantizedLinear`, its float twin and its clamp.

Per-tensor or per-channel int8 weights, an int32 bias, the requantization of
:mod:`qcourse.int_matmul.arithmetic` in either convention with a ReLU or ReLU6 fused as the clamp
(:func:`activation_range`), on the compiled kernels; :func:`linear_float` and
:meth:`QuantizedLinear.fake_quant_forward` are what it is compared with.  Re-exported by
:mod:`qcourse.int_matmul`; see the int_matmul chapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcourse._checks import INT32_MAX, check_choice, real_array
from qcourse.affine import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    storage_dtype,
)
from qcourse.fixed_point import quantize_multiplier
from qcourse.int_matmul.arithmetic import (
    _QTYPES,
    _as_int8,
    _round_half_away,
    _to_int32,
    float_multiplier,
    fold_zero_points,
    quantize_bias,
    requantize_fixed_point,
    requantize_float,
)
from qcourse.kernels import matmul_int8_requant, max_k_s8s8

__all__ = [
    "ACTIVATIONS",
    "REQUANTIZATIONS",
    "QuantizedLinear",
    "activation_range",
    "linear_float",
]

#: The fused activations of :class:`QuantizedLinear` and :func:`activation_range`.
ACTIVATIONS = ("none", "relu", "relu6")

#: The requantization conventions of :class:`QuantizedLinear`:
#: ``"float"`` (float32 multiplier, round half to even: ONNX Runtime, PyTorch),
#: ``"tflite_double"`` and ``"tflite_single"`` (TFLite's fixed-point multiplier in its default
#: double-rounding build and its ``TFLITE_SINGLE_ROUNDING`` build).
REQUANTIZATIONS = ("float", "tflite_double", "tflite_single")


# --- a whole layer -------------------------------------------------------------------------------


def activation_range(activation: str, output_qparams: QParams) -> tuple[int, int]:
    r"""The output clamp ``(lo, hi)`` that fuses an activation into requantization.

    A ReLU keeps the reals :math:`\ge 0`, i.e. the codes :math:`\ge Z_y`; a ReLU6 also those
    :math:`\le 6`, i.e. :math:`\le Z_y + \operatorname{round}(6 / S_y)`.  Intersected with the
    grid :math:`[q_{\min}, q_{\max}]`:

    ========  ==============================  ==================================================
    "none"    :math:`q_{\min}`                  :math:`q_{\max}`
    "relu"    :math:`\max(q_{\min}, Z_y)`       :math:`q_{\max}`
    "relu6"   :math:`\max(q_{\min}, Z_y)`       :math:`\min(q_{\max}, Z_y + \mathrm{round}(6/S_y))`
    ========  ==============================  ==================================================

    as TFLite's ``CalculateActivationRangeQuantized`` computes it
    (``tensorflow/lite/kernels/kernel_util.cc``: ``6.0f / scale`` in float32, ``TfLiteRound``
    = round half away from zero).  The activation then costs nothing: it is the clamp that
    requantization does anyway.  See the int_matmul chapter.
    """
    check_choice(activation, "activation", ACTIVATIONS)
    if not isinstance(output_qparams, QParams) or output_qparams.axis is not None:
        raise TypeError("output_qparams must be a per-tensor QParams")
    qmin, qmax = output_qparams.qmin, output_qparams.qmax
    zp = int(output_qparams.zero_point)
    if activation == "none":
        return qmin, qmax
    lo = max(qmin, zp)
    if activation == "relu":
        return lo, qmax
    six = np.float32(6.0) / np.float32(output_qparams.scale)
    hi = min(qmax, zp + int(_round_half_away(np.float64(six))))
    if hi < lo:
        raise ValueError("relu6 leaves no output code: the output grid does not reach 0..6")
    return lo, hi


#: Largest magnitude of an operand of the float reference layer (products and sums of up to
#: 2**28 of them stay finite in float64).
_MAX_FLOAT_OPERAND = 1e120


def linear_float(x, weight, bias=None, activation="none") -> np.ndarray:
    r"""The float layer the quantized one approximates: :math:`y = \operatorname{act}(x W^T + b)`.

    In float64.  ``x`` (batch, in), ``weight`` (out, in), ``bias`` (out,), finite reals of
    magnitude at most 1e120; ``activation`` one of :data:`ACTIVATIONS` (ReLU6 is
    :math:`\min(\max(y, 0), 6)`).  See the int_matmul chapter.
    """
    check_choice(activation, "activation", ACTIVATIONS)
    xs = real_array(x, "x", ndim=2, max_abs=_MAX_FLOAT_OPERAND)
    w = real_array(weight, "weight", ndim=2, max_abs=_MAX_FLOAT_OPERAND)
    if xs.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (batch, in) and weight (out, in) with the same 'in', got "
                         f"{xs.shape} and {w.shape}")
    y = xs @ w.T
    if bias is not None:
        b = real_array(bias, "bias", ndim=1, max_abs=_MAX_FLOAT_OPERAND)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
        y = y + b
    if activation != "none":
        y = np.maximum(y, 0.0)
    if activation == "relu6":
        y = np.minimum(y, 6.0)
    return y


def _layer_qparams(name: str, qp) -> QParams:
    """``qp`` checked for a layer (per tensor or per channel) with the scale rounded to float32,
    as a model file stores it."""
    if not isinstance(qp, QParams):
        raise TypeError(f"{name} must be a QParams, got {type(qp).__name__}")
    if qp.group_size is not None:
        raise ValueError(f"{name} must be per tensor or per channel, not per group")
    return qp.with_float32_scale()


def _tflite_real_multiplier(sx: float, sw: np.ndarray, sy: float, per_channel: bool) -> np.ndarray:
    """TFLite's real multiplier: per tensor ``double(f32(sx * sw)) / sy``, per channel in double.

    ``GetQuantizedConvolutionMultipler`` multiplies the two float scales as floats (one float32
    rounding) and divides in double; ``PopulateConvolutionQuantizationParams`` (per channel)
    works in double throughout (``tensorflow/lite/kernels/kernel_util.cc``).
    """
    f32 = np.float32
    if per_channel:
        return np.float64(f32(sx)) * sw.astype(f32).astype(np.float64) / np.float64(f32(sy))
    prod = (f32(sx) * sw.astype(f32)).astype(np.float64)
    return prod / np.float64(f32(sy))


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    r"""A quantized linear layer computed with integers only: ``y = act(x W^T + b)``.

    .. math::

        q_{y,ij} = \operatorname{clamp}\Big(Z_y + \operatorname{round}\big(M_j\, v_{ij}\big),
                   \ \mathrm{lo},\ \mathrm{hi}\Big), \qquad
        v_{ij} = \sum_k (q_{x,ik} - Z_x)(q_{W,jk} - Z_{W,j}) + q_{b,j}, \qquad
        M_j = \frac{S_x S_{W,j}}{S_y}

    * ``weight_q`` (out, in): integer codes on ``weight_qparams``' grid, which must fit int8;
      per tensor or per output channel (``axis=0``), symmetric or not;
    * ``bias_q`` (out,): int32 with scale :math:`S_x S_{W,j}` and zero point 0
      (:func:`quantize_bias`), or None for no bias;
    * ``input_qparams`` and ``output_qparams``: per tensor, int8 or uint8 grids;
    * ``activation``: fused as the clamp ``[lo, hi]`` of :func:`activation_range`.

    Scales are rounded to float32 on construction, as a model file (ONNX, TFLite) stores them.
    The zero-point terms that do not depend on the input are folded into :attr:`folded_bias`
    once (:func:`fold_zero_points`); :meth:`accumulate` adds the input's row sums only when the
    weights have a zero point.  Three requantizations (:data:`REQUANTIZATIONS`):

    * ``"float"``: :func:`requantize_float` with the multiplier of :func:`float_multiplier` (ONNX
      Runtime's ``QLinearConv`` / ``QLinearMatMul``, PyTorch's FBGEMM); :meth:`__call__` runs it
      on the compiled GEMM with fused requantization
      (:func:`qcourse.kernels.matmul_int8_requant`), :meth:`reference` in NumPy;
    * ``"tflite_double"`` / ``"tflite_single"``: :func:`requantize_fixed_point` with the
      multipliers of :attr:`fixed_point_params`: gemmlowp's ``MultiplyByQuantizedMultiplier``
      in TFLite's two builds (what LiteRT's own kernels compute: the deploy chapter).

    Build one from float weights with :meth:`from_float`.  See the int_matmul chapter.
    """

    weight_q: np.ndarray
    bias_q: np.ndarray | None
    input_qparams: QParams
    weight_qparams: QParams
    output_qparams: QParams
    activation: str = "none"

    def __post_init__(self):
        check_choice(self.activation, "activation", ACTIVATIONS)
        xq = _layer_qparams("input_qparams", self.input_qparams)
        wq = _layer_qparams("weight_qparams", self.weight_qparams)
        yq = _layer_qparams("output_qparams", self.output_qparams)
        for name, qp in (("input_qparams", xq), ("output_qparams", yq)):
            if qp.axis is not None:
                raise ValueError(f"{name} must be per tensor")
            if storage_dtype(qp.qmin, qp.qmax) not in _QTYPES:
                raise ValueError(f"{name} must describe an int8 or uint8 grid, got "
                                 f"[{qp.qmin}, {qp.qmax}]")
        if wq.qmin < -128 or wq.qmax > 127:
            raise ValueError(f"weight_qparams must describe a grid inside int8 [-128, 127], got "
                             f"[{wq.qmin}, {wq.qmax}]")
        w = np.asarray(self.weight_q)
        if w.dtype.kind not in "iu":
            raise TypeError(f"weight_q must be integer codes, got dtype {w.dtype}")
        if w.ndim != 2 or w.size == 0:
            raise ValueError(f"weight_q must be a non-empty 2-D (out, in) array, got {w.shape}")
        if np.any((w < wq.qmin) | (w > wq.qmax)):
            raise ValueError(f"weight_q has codes outside the weight grid [{wq.qmin}, {wq.qmax}]")
        out_f, in_f = w.shape
        if wq.axis is not None:
            if wq.axis not in (0, -2):
                raise ValueError("per-channel weight_qparams must be along axis 0 (the outputs)")
            if wq.scale.shape != (out_f,):
                raise ValueError(f"per-channel weight_qparams need {out_f} channels, got "
                                 f"{wq.scale.shape}")
        if in_f > max_k_s8s8():
            raise ValueError(f"in_features={in_f} exceeds the kernel bound {max_k_s8s8()}")
        if self.bias_q is None:
            b = np.zeros(out_f, np.int32)
        else:
            b = np.asarray(self.bias_q)
            if b.dtype != np.int32:
                raise TypeError(f"bias_q must be int32 (use quantize_bias), got {b.dtype}")
            if b.shape != (out_f,):
                raise ValueError(f"bias_q must have shape ({out_f},), got {b.shape}")
        w = w.astype(np.int8)
        w.flags.writeable = False
        b = b.copy()
        b.flags.writeable = False
        zw = np.broadcast_to(wq.zero_point, (out_f,)).astype(np.int64)
        zx = int(xq.zero_point)
        x_span = max(xq.qmax - zx, zx - xq.qmin)
        worst = np.abs(w.astype(np.int64) - zw[:, None]).sum(axis=1) * x_span + np.abs(b)
        object.__setattr__(self, "weight_q", w)
        object.__setattr__(self, "bias_q", b)
        object.__setattr__(self, "input_qparams", xq)
        object.__setattr__(self, "weight_qparams", wq)
        object.__setattr__(self, "output_qparams", yq)
        object.__setattr__(self, "_zw", zw)
        object.__setattr__(self, "_may_overflow", bool(np.any(worst > INT32_MAX)))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight, bias, input_qparams: QParams, output_qparams: QParams, *,
                   per_channel: bool = True, symmetric: bool = True,
                   activation: str = "none") -> QuantizedLinear:
        r"""Quantize a float layer: weights to int8 (min-max), bias to int32 at :math:`S_x S_W`.

        Weights get :func:`qcourse.affine.choose_qparams` parameters, per output channel
        (``per_channel=True``) or per tensor, symmetric on the narrow grid [-127, 127]
        (``symmetric=True``, zero point 0, as TFLite and ONNX Runtime's quantizer do) or
        asymmetric on [-128, 127].  The bias is quantized by :func:`quantize_bias`.
        """
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {w.shape}")
        xq = _layer_qparams("input_qparams", input_qparams)
        wqp = choose_qparams(w, bits=8, signed=True, symmetric=bool(symmetric),
                             narrow_range=bool(symmetric), axis=0 if per_channel else None)
        wqp = _layer_qparams("weight_qparams", wqp)
        w_q = quantize(w, wqp)
        b_q = None if bias is None else quantize_bias(bias, float(xq.scale), wqp.scale)
        return cls(w_q, b_q, xq, wqp, output_qparams, activation)

    # -- derived constants ---------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_q.shape[0]

    @property
    def weight_zero_point(self) -> np.ndarray:
        """:math:`Z_{W,j}` per output (int64, shape (out,))."""
        return self._zw

    @property
    def folded_bias(self) -> np.ndarray:
        """The offline constant :func:`fold_zero_points` (int64, shape (out,))."""
        return fold_zero_points(self.weight_q, int(self.input_qparams.zero_point), self._zw,
                                self.bias_q)

    @property
    def output_range(self) -> tuple[int, int]:
        """The clamp ``(lo, hi)``: the output grid narrowed by the fused activation."""
        return activation_range(self.activation, self.output_qparams)

    @property
    def float_multiplier(self) -> np.ndarray:
        """:math:`m_j` in float32 as ONNX Runtime computes it (:func:`float_multiplier`)."""
        return np.broadcast_to(
            float_multiplier(self.input_qparams.scale, self.weight_qparams.scale,
                             self.output_qparams.scale), (self.out_features,))

    def fixed_point_params(self, rounding: str = "double") -> tuple[np.ndarray, np.ndarray]:
        """TFLite's per-output ``(multiplier, shift)`` (int32 arrays of shape (out,)).

        The real multiplier as TFLite's kernel preparation computes it (per tensor: the float32
        product of the input and weight scales, divided by the output scale in double; per
        channel: all in double), then :func:`qcourse.fixed_point.quantize_multiplier`.
        """
        sw = np.broadcast_to(self.weight_qparams.scale, (self.out_features,))
        real = _tflite_real_multiplier(float(self.input_qparams.scale), sw,
                                       float(self.output_qparams.scale),
                                       self.weight_qparams.axis is not None)
        return quantize_multiplier(real, rounding=rounding)

    # -- integer inference ---------------------------------------------------------------------

    def _check_input(self, x_q) -> np.ndarray:
        qp = self.input_qparams
        if not isinstance(x_q, np.ndarray):
            raise TypeError(f"x_q must be a numpy.ndarray of integer codes, got "
                            f"{type(x_q).__name__}")
        if x_q.dtype != storage_dtype(qp.qmin, qp.qmax):
            raise TypeError(f"x_q must have dtype {storage_dtype(qp.qmin, qp.qmax)} (the input "
                            f"grid [{qp.qmin}, {qp.qmax}]), got {x_q.dtype}")
        if x_q.ndim != 2 or x_q.shape[1] != self.in_features or x_q.shape[0] == 0:
            raise ValueError(f"x_q must have shape (batch, {self.in_features}), got {x_q.shape}")
        if np.any((x_q < qp.qmin) | (x_q > qp.qmax)):
            raise ValueError(f"x_q has codes outside the input grid [{qp.qmin}, {qp.qmax}]")
        return x_q

    def accumulate(self, x_q) -> np.ndarray:
        r"""The int32 accumulators :math:`v = \sum_k (x - Z_x)(W - Z_W) + q_b`, shape (batch, out).

        Computed the way a kernel does: the integer product :math:`x W^T`, plus the folded bias,
        minus :math:`Z_{W,j} \sum_k x_{ik}` when the weights have a zero point.  Exact (int64
        inside); a sum outside int32 raises ``ValueError``.
        """
        x = self._check_input(x_q).astype(np.int64)
        acc = x @ self.weight_q.astype(np.int64).T + self.folded_bias
        if np.any(self._zw != 0):
            acc -= np.outer(x.sum(axis=1), self._zw)
        return _to_int32(acc, "raise", "the layer's accumulator")

    def reference(self, x_q, requantization: str = "float") -> np.ndarray:
        """Integer inference in NumPy: :meth:`accumulate`, then the named requantization."""
        check_choice(requantization, "requantization", REQUANTIZATIONS)
        acc = self.accumulate(x_q)
        lo, hi = self.output_range
        zy = int(self.output_qparams.zero_point)
        out_dtype = storage_dtype(self.output_qparams.qmin, self.output_qparams.qmax)
        if requantization == "float":
            y = requantize_float(acc, self.float_multiplier, zy, lo, hi)
        else:
            rounding = requantization.removeprefix("tflite_")
            mult, shift = self.fixed_point_params(rounding)
            y = requantize_fixed_point(acc, mult, shift, zy, lo, hi, rounding=rounding)
        return y.astype(out_dtype)

    def __call__(self, x_q, requantization: str = "float") -> np.ndarray:
        """Integer inference; ``"float"`` runs on the compiled GEMM with fused requantization.

        Same result as :meth:`reference`, bit for bit (the tests check it).  The fixed-point
        requantizations have no compiled kernel and run :meth:`reference`.
        """
        check_choice(requantization, "requantization", REQUANTIZATIONS)
        if requantization != "float":
            return self.reference(x_q, requantization)
        x = self._check_input(x_q)
        if self._may_overflow:
            self.accumulate(x)  # raises if this input overflows int32
        x8, shift = _as_int8(x)
        lo, hi = self.output_range
        out_dtype = storage_dtype(self.output_qparams.qmin, self.output_qparams.qmax)
        zw = self._zw
        return matmul_int8_requant(
            x8, np.ascontiguousarray(self.weight_q.T), self.float_multiplier.astype(np.float64),
            int(self.output_qparams.zero_point), bias=self.bias_q,
            a_zero_point=int(self.input_qparams.zero_point) - shift,
            b_zero_point=zw if np.any(zw != 0) else None, out_dtype=out_dtype, qmin=lo, qmax=hi)

    # -- what the integers approximate ----------------------------------------------------------

    def dequantize_output(self, y_q) -> np.ndarray:
        """Real values of output codes, :math:`S_y (q_y - Z_y)` (float32)."""
        return dequantize(y_q, self.output_qparams)

    def fake_quant_forward(self, x) -> np.ndarray:
        r"""The layer simulated in floating point with fake quantization (float64).

        .. math:: \hat y = \operatorname{fq}_y\big(\operatorname{act}(\operatorname{fq}_x(x)\,
                  \operatorname{dq}(q_W)^T + S_x S_W q_b)\big)

        The input is fake-quantized, the weights and bias are the dequantized integer ones, the
        matrix product is done in float64 and the output fake-quantized: what a "Q/DQ" graph or
        quantization-aware training computes.  Mathematically
        :math:`\hat y = S_y (q_y - Z_y)` with the *exact* real multiplier; the integer layer
        rounds the multiplier (float32 or 31 bits), so the two can differ by one output step
        where :math:`M v` lies within that rounding of a tie.
        """
        xs = np.asarray(x, dtype=np.float64)
        if xs.ndim != 2 or xs.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {xs.shape}")
        x_hat = fake_quantize(xs, self.input_qparams)
        w_hat = np.broadcast_to(self.weight_qparams.scale, (self.out_features,))[:, None] * (
            self.weight_q.astype(np.float64) - self._zw[:, None])
        b_hat = float(self.input_qparams.scale) * np.broadcast_to(
            self.weight_qparams.scale, (self.out_features,)) * self.bias_q
        y = x_hat @ w_hat.T + b_hat
        if self.activation != "none":
            y = np.maximum(y, 0.0)
        if self.activation == "relu6":
            y = np.minimum(y, 6.0)
        return fake_quantize(y, self.output_qparams)
