r"""Post-training quantization (PTQ) of a trained network, down to integer-only inference.

The ptq chapter (``book/ptq.md``) explains everything in this module.  A float network that has
already been trained is quantized *after* training, without any more gradient steps, in one of
three ways:

* **weight-only** (:func:`weight_only_ptq`): the weights are stored as ``bits``-bit integers and
  dequantized before use; activations and arithmetic stay in float;
* **dynamic** (:func:`dynamic_ptq`): weights as above, and the input of every linear layer is
  quantized at run time with a range measured on that very batch; the integer product is
  dequantized back to float, where the bias and the activation are applied;
* **static** (:func:`static_ptq`): weights as above, and every activation gets a *fixed* range,
  chosen before deployment by running the float network on calibration data through an observer
  of :mod:`qcourse.calibration`.

Each returns a :class:`PTQModel`, a float network whose forward pass *simulates* the
quantization (fake quantization through forward hooks of :mod:`qcourse.nn`).  A static model is
then converted by :func:`convert_to_integer` into an :class:`IntegerModel` whose layers run only
on the compiled int8 kernels of :mod:`qcourse.kernels`: the input is quantized once, every layer
is an int8 GEMM with an int32 bias and a requantization into the next layer's int8 grid (a ReLU
fused as the clamp of that requantization, through
:class:`qcourse.int_matmul.QuantizedLinear`), and the logits are dequantized once at the end.  A
dynamic model converts into a :class:`DynamicIntegerModel` (int8 GEMMs, float in between).

:func:`train_reference_model` trains, once per process and deterministically, the network the
ptq, qat and mixed_precision chapters quantize; :func:`model_size` counts the bytes each variant
needs; :func:`compare_fake_quant_integer` counts where the simulated and the integer model
disagree, and why; :func:`fold_batch_norm` folds a batch normalization into the linear layer
before it, as every converter does before quantizing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qcourse import affine
from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_EPOCHS,
    check_bool,
    check_choice,
    check_float_matrix,
    check_instance,
    check_int,
    check_int_sequence,
    check_labels,
    check_real,
    check_sequence,
    real_array,
)
from qcourse._deprecated import moved_names
from qcourse.affine import QParams, dequantize, fake_quantize, quantize
from qcourse.calibration import MinMaxObserver, Observer, dynamic_qparams, fake_quant_hook
from qcourse.datasets import load_digits
from qcourse.int_matmul import (
    REQUANTIZATIONS,
    QuantizedLinear,
    quantize_bias,
    requantize_fixed_point,
)
from qcourse.kernels import matmul_int8, prepack
from qcourse.nn import (
    Classifier,
    Linear,
    ReLU,
    ReLU6,
    Sequential,
    accuracy,
    capture_activations,
    copy_model,
    feed_activations,
    make_mlp,
    train,
)
from qcourse.nn.core import _check_model_input

__all__ = [
    "INCEPTION_V3_RELU6_TABLE",
    "DynamicIntegerModel",
    "FakeQuantIntegerComparison",
    "IntegerModel",
    "PTQModel",
    "ReferenceModel",
    "ModelSize",
    "compare_fake_quant_integer",
    "convert_to_integer",
    "dynamic_ptq",
    "fold_batch_norm",
    "model_size",
    "static_ptq",
    "train_reference_model",
    "weight_only_ptq",
]

#: Jacob et al. (2018), "Quantization and Training of Neural Networks for Efficient
#: Integer-Arithmetic-Only Inference", Table 4.3 (reproduced in the EE-508 slides): Inception v3
#: on ImageNet, top-1 accuracy (%, mean over runs) of the float model and of the 8-bit and 7-bit
#: integer-only models, with ReLU6 and with ReLU activations.
INCEPTION_V3_RELU6_TABLE = {
    "relu6": {"float": 78.4, 8: 75.4, 7: 75.0},
    "relu": {"float": 78.3, 8: 74.2, 7: 73.7},
}


# --------------------------------------------------------------------------- the network


class _Unit(NamedTuple):
    """A linear layer and the activation fused into it (the unit a quantized kernel runs)."""

    linear: str
    activation: str | None
    kind: str  # "none", "relu" or "relu6"

    @property
    def output(self) -> str:
        """The layer whose output is the unit's output (and gets an activation range)."""
        return self.activation if self.activation is not None else self.linear


def _units(model) -> list[_Unit]:
    """Split a Sequential of Linear / ReLU / ReLU6 layers into fused units."""
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    units: list[_Unit] = []
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            units.append(_Unit(name, None, "none"))
        elif isinstance(layer, ReLU):
            if not units or units[-1].activation is not None:
                raise ValueError(f"layer {name!r} ({layer!r}) must follow a Linear layer: PTQ "
                                 f"fuses each activation into the linear layer before it")
            kind = "relu6" if isinstance(layer, ReLU6) else "relu"
            units[-1] = _Unit(units[-1].linear, name, kind)
        else:
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; PTQ handles "
                             f"Linear, ReLU and ReLU6 layers only")
    if not units:
        raise ValueError("model has no Linear layer to quantize")
    return units


class ReferenceModel(NamedTuple):
    """The trained float network and its data (see :func:`train_reference_model`)."""

    model: Sequential
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    X_calib: np.ndarray
    float_accuracy: float
    history: dict


@functools.lru_cache(maxsize=32)
def _trained_state(seed, activation, sizes, epochs, lr, batch_size, split_seed):
    X, y = load_digits("train", seed=split_seed)
    model = make_mlp(sizes, activation=activation, seed=seed)
    history = train(model, X, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                    progress=False)
    return model.state_dict(), {k: tuple(v) for k, v in history.items()}


def train_reference_model(seed: int = 0, *, activation: str = "relu",
                          sizes: Sequence[int] = (64, 128, 64, 10), epochs: int = 30,
                          lr: float = 1e-2, batch_size: int = 32, split_seed: int = 0,
                          calib_size: int = 256) -> ReferenceModel:
    r"""Train the float network the quantization chapters start from (cached, deterministic).

    A :func:`qcourse.nn.make_mlp` of widths ``sizes`` (default 64-128-64-10) with ``activation``
    (``"relu"`` or ``"relu6"``) is trained with Adam for ``epochs`` epochs on the training split
    of the 8x8 digits (:func:`qcourse.datasets.load_digits` with ``split_seed``); ``seed`` sets
    both the initial weights and the order of the mini-batches, so the same arguments give
    bit-identical weights.  Training takes about half a second; the weights are cached per
    process (keyed by every argument) and each call returns a *fresh* model built from them, so
    callers may modify it.

    ``X_calib`` is the first ``calib_size`` training images: the unlabelled, representative
    sample static PTQ calibrates on.  ``float_accuracy`` is the accuracy on the test split.
    See the ptq chapter.

    Returns
    -------
    ReferenceModel
        ``(model, X_train, y_train, X_test, y_test, X_calib, float_accuracy, history)``.

    Bounds: ``epochs`` in [1, 100000], ``batch_size`` and each width in ``sizes`` in [1,
    2**28], ``calib_size`` in [1, the training set's size].
    """
    seed = check_int(seed, "seed", 0)
    split_seed = check_int(split_seed, "split_seed", 0)
    epochs = check_int(epochs, "epochs", 1, MAX_EPOCHS)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    check_choice(activation, "activation", ("relu", "relu6"))
    sizes = check_int_sequence(sizes, "sizes", 1, MAX_ELEMENTS, min_len=2)
    if len(sizes) < 2 or sizes[0] != 64 or sizes[-1] != 10:
        raise ValueError(f"sizes must start with 64 (pixels) and end with 10 (classes), got "
                         f"{sizes}")
    lr = check_real(lr, "lr", 0.0, lo_open=True)
    X_train, y_train = load_digits("train", seed=split_seed)
    X_test, y_test = load_digits("test", seed=split_seed)
    calib_size = check_int(calib_size, "calib_size", 1, X_train.shape[0])
    state, history = _trained_state(seed, activation, sizes, epochs, float(lr), batch_size,
                                    split_seed)
    model = make_mlp(sizes, activation=activation, seed=seed)
    model.load_state_dict(state)
    acc = accuracy(model, X_test, y_test)
    return ReferenceModel(model, X_train, y_train, X_test, y_test, X_train[:calib_size].copy(),
                          acc, {k: list(v) for k, v in history.items()})


# --------------------------------------------------------------------------- PTQ models


@dataclass(frozen=True)
class _Config:
    mode: str
    weight_bits: int | dict
    activation_bits: int | None
    per_channel: bool
    weight_symmetric: bool
    per_row: bool = False
    observer: str | None = None
    int32_bias: bool = False


class PTQModel(Classifier):
    """A float network with post-training quantization simulated (fake quantization).

    Built by :func:`weight_only_ptq`, :func:`dynamic_ptq` or :func:`static_ptq`; not meant to be
    constructed directly.  ``model`` is a :class:`qcourse.nn.Sequential` (a copy of the float
    network) whose weights are the dequantized integer weights and whose forward hooks
    fake-quantize the activations, so every tool of :mod:`qcourse.nn` works on it.

    Attributes
    ----------
    mode : {"weight_only", "dynamic", "static"}
    model : qcourse.nn.Sequential
    weights : dict
        ``{linear layer name: (integer codes, QParams)}``.
    activations : dict
        Static mode: ``{"input": QParams, <unit output layer>: QParams, ...}``, the fixed
        per-tensor ranges of the network input and of each fused unit's output; else empty.
    biases : dict
        ``{linear layer name: float bias}`` (the float bias; :func:`convert_to_integer`
        quantizes it to int32).
    config : the settings the model was built with.

    See the ptq chapter.
    """

    def __init__(self, mode, model, units, weights, activations, biases, config):
        self.mode = mode
        self.model = model
        self.units = units
        self.weights = weights
        self.activations = activations
        self.biases = biases
        self.config = config

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Logits of the simulated quantized network (float)."""
        return self.model(_check_model_input(self.model, X, "X"))

    def __repr__(self) -> str:
        c = self.config
        acts = "float" if c.activation_bits is None else f"{c.activation_bits}-bit"
        gran = "per-channel" if c.per_channel else "per-tensor"
        wb = (f"{c.weight_bits}-bit" if isinstance(c.weight_bits, int)
              else "mixed " + "/".join(str(b) for b in c.weight_bits.values()) + "-bit")
        return (f"PTQModel({c.mode}: {wb} {gran} weights, {acts} activations"
                + (f", {c.observer}" if c.observer else "") + ")")


def _bits_per_layer(weight_bits, units: list[_Unit], name: str) -> dict[str, int]:
    """``weight_bits`` (one int, or a mapping linear layer name -> int) as a dict per layer;
    ``name`` is the argument's name in the caller (``bits`` or ``weight_bits``)."""
    names = [u.linear for u in units]
    if isinstance(weight_bits, Mapping):
        if set(weight_bits) != set(names):
            raise ValueError(f"{name} must give the bits of exactly the linear layers "
                             f"{names}, got keys {sorted(map(str, weight_bits))}")
        return {n: check_int(weight_bits[n], f"{name}[{n!r}]", 2, 8) for n in names}
    bits = check_int(weight_bits, name, 2, 8)
    return dict.fromkeys(names, bits)


def _quantized_copy(model, weight_bits, per_channel, symmetric, name="weight_bits"):
    """Clone ``model`` and replace each Linear's weights by their dequantized integer copy."""
    units = _units(model)
    bits = _bits_per_layer(weight_bits, units, name)
    sim = copy_model(model)
    weights, biases = {}, {}
    for unit in units:
        layer = sim[unit.linear]
        q, qp = affine.quantize_weight(layer.weight, bits=bits[unit.linear],
                                       per_channel=per_channel, symmetric=symmetric)
        weights[unit.linear] = (q, qp)
        biases[unit.linear] = layer.bias.copy()
        layer.weight[...] = dequantize(q, qp)
    return units, sim, weights, biases


def _bits_label(weight_bits):
    if isinstance(weight_bits, Mapping):
        return dict(weight_bits)
    return int(weight_bits)


def weight_only_ptq(model, *, bits: int = 8, per_channel: bool = True,
                    symmetric: bool = True) -> PTQModel:
    r"""Weight-only PTQ: :math:`W \to \hat W = s_W (q_W - z_W)`, everything else in float.

    Each linear layer's weight is quantized by :func:`qcourse.affine.quantize_weight`
    (``bits``: one width, or a mapping from linear layer name to width) and stored as integers;
    at run time it is dequantized and the layer computes :math:`x \hat W^T + b` in float.  It
    saves memory (and memory bandwidth), not arithmetic.  See the ptq chapter.
    """
    units, sim, weights, biases = _quantized_copy(model, bits, per_channel, symmetric, "bits")
    cfg = _Config("weight_only", _bits_label(bits), None, bool(per_channel), bool(symmetric))
    return PTQModel("weight_only", sim, units, weights, {}, biases, cfg)


def dynamic_ptq(model, *, weight_bits: int = 8, activation_bits: int = 8,
                per_channel: bool = True, symmetric: bool = True,
                per_row: bool = False) -> PTQModel:
    r"""Dynamic PTQ: weights quantized ahead of time, each layer's input at run time.

    Before every linear layer, the batch that arrives is quantized with a min-max range
    measured on that batch (:func:`qcourse.calibration.dynamic_qparams`: asymmetric, signed,
    ``activation_bits`` bits; per row with ``per_row=True``), then multiplied by the integer
    weights (``weight_bits``: one width, or a mapping from linear layer name to width, as for
    :func:`static_ptq`); the layer's output is real again,
    :math:`y = s_x s_W \sum (q_x - z_x)(q_W - z_W) + b`, and the bias and activation are
    applied in float.  No calibration data is needed; the price is a min and a max over every
    activation at run time.  Note that a per-tensor dynamic range depends on *which examples
    share the batch*.  See the ptq chapter.
    """
    activation_bits = check_int(activation_bits, "activation_bits", 2, 8)
    per_row = check_bool(per_row, "per_row")
    units, sim, weights, biases = _quantized_copy(model, weight_bits, per_channel, symmetric)

    def hook(module, x):
        qp = dynamic_qparams(x, bits=activation_bits, signed=True,
                             per_row=per_row).with_float32_scale()
        return fake_quantize(x, qp)

    for unit in units:
        sim[unit.linear].register_forward_pre_hook(hook)
    cfg = _Config("dynamic", _bits_label(weight_bits), activation_bits, bool(per_channel),
                  bool(symmetric), per_row=per_row)
    return PTQModel("dynamic", sim, units, weights, {}, biases, cfg)


def _observer_factory(observer) -> tuple[Callable[..., Observer], str]:
    if isinstance(observer, type) and issubclass(observer, Observer):
        return observer, observer.__name__
    if isinstance(observer, functools.partial) and isinstance(observer.func, type) and \
            issubclass(observer.func, Observer):
        return observer, observer.func.__name__
    raise TypeError(f"observer must be an Observer class of qcourse.calibration (or a "
                    f"functools.partial of one), got {observer!r}")


def _calibrate_points(model: Sequential, units: list[_Unit], X: np.ndarray, make_observer,
                      batch_size: int) -> dict[str, QParams]:
    """One float pass over ``X``: each quantization point's activations feed its own observer.

    The points are the input of the first linear layer (``"input"``) and each unit's output.
    This is :func:`qcourse.nn.calibrate` for all points at once (one pass of
    :func:`qcourse.nn.feed_activations` instead of one per point).
    """
    observers = {"input": make_observer()}
    observers.update({u.output: make_observer() for u in units})
    sinks = {(units[0].linear, "input"): observers["input"].update}
    sinks.update({(u.output, "output"): observers[u.output].update for u in units})
    feed_activations(model, X, sinks, batch_size=batch_size)
    return {name: obs.qparams().with_float32_scale() for name, obs in observers.items()}


def static_ptq(model, X_calib, *, weight_bits: int = 8, activation_bits: int = 8,
               per_channel: bool = True, symmetric: bool = True, observer=MinMaxObserver,
               batch_size: int = 256, int32_bias: bool = False) -> PTQModel:
    r"""Static PTQ: weights and every activation get fixed quantization parameters.

    Calibration runs the *float* network on ``X_calib`` (unlabelled, representative inputs) in
    batches of ``batch_size`` and feeds each quantization point to a fresh observer,
    ``observer(bits=activation_bits, signed=True, symmetric=False)`` (a class of
    :mod:`qcourse.calibration`, or a ``functools.partial`` of one with its own settings, e.g.
    ``partial(PercentileObserver, 99.9)``).  The points are those an integer network needs:
    the network input, and the output of every *fused unit* -- a linear layer together with the
    ReLU or ReLU6 after it, whose range is the activation's output range (so the activation
    becomes a clamp), or the linear layer alone where no activation follows (the logits).
    Every range is per tensor, asymmetric and signed (int8: [-128, 127]; a ReLU output gets
    zero point -128), with the scale rounded to float32.

    ``weight_bits`` is one width for every layer or a mapping ``{linear layer name: bits}``
    (mixed precision: the integer model runs any mix of 2..8-bit weights on the same int8
    kernels).  The simulated model fake-quantizes the input before the first layer and each
    unit's output with these fixed parameters (forward hooks), with dequantized weights and
    float biases -- or, with ``int32_bias=True``, with each bias rounded to the int32 grid of step
    :math:`S_x S_W` the integer model adds it on (:func:`qcourse.int_matmul.quantize_bias`,
    then dequantized), so that the simulation rounds the bias as the integer model does.
    Convert it to an integer network with :func:`convert_to_integer`.  See the ptq chapter.
    """
    activation_bits = check_int(activation_bits, "activation_bits", 2, 8)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    int32_bias = check_bool(int32_bias, "int32_bias")
    factory, obs_name = _observer_factory(observer)
    units = _units(model)
    X_calib = _check_model_input(model, X_calib, "X_calib")
    units, sim, weights, biases = _quantized_copy(model, weight_bits, per_channel, symmetric)
    activations = _calibrate_points(
        model, units, X_calib,
        lambda: factory(bits=activation_bits, signed=True, symmetric=False), batch_size)
    input_qp = activations["input"]
    if int32_bias:
        x_qp = input_qp
        for unit in units:
            sw = weights[unit.linear][1].scale
            b_q = quantize_bias(biases[unit.linear], float(x_qp.scale), sw)
            sim[unit.linear].bias[...] = float(x_qp.scale) * sw * b_q
            x_qp = activations[unit.output]
    sim[units[0].linear].register_forward_pre_hook(
        lambda module, x: fake_quantize(x, input_qp))
    for unit in units:
        sim[unit.output].register_forward_hook(fake_quant_hook(activations[unit.output]))
    cfg = _Config("static", _bits_label(weight_bits), activation_bits, bool(per_channel),
                  bool(symmetric), observer=obs_name, int32_bias=int32_bias)
    return PTQModel("static", sim, units, weights, activations, biases, cfg)


# --------------------------------------------------------------------------- integer models


class IntegerModel(Classifier):
    r"""A statically quantized network that computes with integers only, on the int8 kernels.

    .. math::

        q^{(0)} = \operatorname{quantize}(x), \qquad
        q^{(l)} = \operatorname{clamp}\Big(Z_l + \operatorname{round}\big(M_l \odot
            (\textstyle\sum_k (q^{(l-1)}_k - Z_{l-1}) (q_{W_l,k} - Z_{W_l}) + q_{b_l})\big),
            \mathrm{lo}_l, \mathrm{hi}_l\Big), \qquad
        \hat y = S_L (q^{(L)} - Z_L)

    Every layer is a :class:`qcourse.int_matmul.QuantizedLinear`: int8 weights, an int32 bias
    (scale :math:`S_{l-1} S_{W_l}`), and a requantization by :math:`M_l = S_{l-1} S_{W_l} /
    S_l` into the next layer's int8 grid, with a ReLU or ReLU6 fused as the clamp
    ``[lo, hi]``.  Between layers there are only int8 codes; the input is quantized once and
    the logits dequantized once.  Two requantizations:

    * ``"float"`` (default): the compiled GEMM with the requantization fused into its write-out,
      a float32 multiplier rounded half to even (:func:`qcourse.kernels.matmul_int8_requant`;
      the convention of ONNX Runtime and PyTorch);
    * ``"tflite_double"`` / ``"tflite_single"``: the compiled int8 GEMM
      (:func:`qcourse.kernels.matmul_int8`, int32 out), then the zero-point-folded bias and
      TFLite's fixed-point multiplier and shift
      (:func:`qcourse.int_matmul.requantize_fixed_point`): no floating-point operation at all
      between the input and the logits.

    Build one with :func:`convert_to_integer`.  See the ptq chapter.
    """

    def __init__(self, layers: Sequence[QuantizedLinear], names: Sequence[str],
                 requantization: str = "float"):
        layers = check_sequence(layers, "layers")
        names = check_sequence(names, "names")
        if not layers or len(layers) != len(names):
            raise ValueError("layers and names must be non-empty lists of the same length")
        for i, layer in enumerate(layers):
            if not isinstance(layer, QuantizedLinear):
                raise TypeError(f"layers[{i}] must be a QuantizedLinear, got "
                                f"{type(layer).__name__}")
            for side, qp in (("take", layer.input_qparams), ("produce", layer.output_qparams)):
                if qp.qmin < -128 or qp.qmax > 127:
                    raise ValueError(f"layers[{i}] must {side} int8 codes (a grid inside "
                                     f"[-128, 127]), got [{qp.qmin}, {qp.qmax}]")
            if i and layer.input_qparams != layers[i - 1].output_qparams:
                raise ValueError(f"layers[{i}]'s input parameters must be layers[{i - 1}]'s "
                                 f"output parameters: the codes pass from one to the next")
        if requantization not in REQUANTIZATIONS:
            raise ValueError(f"requantization must be one of {REQUANTIZATIONS}, got "
                             f"{requantization!r}")
        self.layers = layers
        self.names = names
        self.requantization = requantization
        if requantization != "float":
            rounding = requantization.removeprefix("tflite_")
            self._packed = [prepack(np.ascontiguousarray(layer.weight_q.T)) for layer in layers]
            self._fixed = [layer.fixed_point_params(rounding) for layer in layers]
            self._rounding = rounding

    @property
    def input_qparams(self) -> QParams:
        return self.layers[0].input_qparams

    @property
    def output_qparams(self) -> QParams:
        return self.layers[-1].output_qparams

    def quantize_input(self, X: np.ndarray) -> np.ndarray:
        """The network input as int8 codes: :math:`q = \\operatorname{clamp}(\\operatorname{round}
        (x / S_0) + Z_0)` (the one float operation before the integers take over)."""
        X = check_float_matrix(X, "X")
        if X.shape[1] != self.layers[0].in_features:
            raise ValueError(f"X must have {self.layers[0].in_features} features, got shape "
                             f"{X.shape}")
        return quantize(X, self.input_qparams).astype(np.int8)

    def _layer(self, i: int, x_q: np.ndarray) -> np.ndarray:
        layer = self.layers[i]
        if self.requantization == "float":
            return layer(x_q)                   # compiled GEMM with fused requantization
        acc = matmul_int8(x_q, self._packed[i]).astype(np.int64)   # compiled int8 GEMM
        acc += layer.folded_bias
        zw = layer.weight_zero_point
        if np.any(zw != 0):
            acc -= np.outer(x_q.sum(axis=1, dtype=np.int64), zw)
        if np.any((acc < -(2**31)) | (acc > 2**31 - 1)):
            raise ValueError(f"layer {self.names[i]!r}: the int32 accumulator overflows")
        mult, shift = self._fixed[i]
        lo, hi = layer.output_range
        return requantize_fixed_point(acc, mult, shift, int(layer.output_qparams.zero_point),
                                      lo, hi, rounding=self._rounding).astype(np.int8)

    def forward_codes(self, X: np.ndarray) -> list[np.ndarray]:
        """The int8 codes after every layer (the last are the quantized logits)."""
        q = self.quantize_input(X)
        codes = []
        for i in range(len(self.layers)):
            q = self._layer(i, q)
            codes.append(q)
        return codes

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Dequantized logits, :math:`S_L (q^{(L)} - Z_L)`, float32."""
        return dequantize(self.forward_codes(X)[-1], self.output_qparams)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {ly.out_features}x{ly.in_features} {ly.activation}"
                          for n, ly in zip(self.names, self.layers, strict=True))
        return f"IntegerModel([{inner}], requantization={self.requantization!r})"


class DynamicIntegerModel(Classifier):
    r"""A dynamically quantized network: int8 GEMMs on the kernels, float between layers.

    For each linear layer, on every batch :math:`x`:

    .. math::

        (S_x, Z_x) = \text{min-max of } x, \qquad q_x = \operatorname{quantize}(x), \qquad
        y = S_x S_W \Big(\underbrace{\textstyle\sum_k q_{x,k} q_{W,k}}_{\text{int8 GEMM}}
            - Z_x \textstyle\sum_k q_{W,k} - Z_W \sum_k q_{x,k} + K Z_x Z_W\Big) + b

    then the activation in float: the int32 result of
    :func:`qcourse.kernels.matmul_int8` is dequantized with the product of the two scales, as in
    PyTorch's dynamically quantized ``Linear``.  Build one with :func:`convert_to_integer` from a
    :func:`dynamic_ptq` model.  See the ptq chapter.
    """

    def __init__(self, ptq_model: PTQModel):
        check_instance(ptq_model, "ptq_model", PTQModel, "a PTQModel built by dynamic_ptq")
        if ptq_model.mode != "dynamic":
            raise ValueError(f"ptq_model must be built by dynamic_ptq, got a {ptq_model.mode} "
                             f"PTQModel")
        self.config = ptq_model.config
        self.units = ptq_model.units
        self._layers = []
        for unit in self.units:
            q, qp = ptq_model.weights[unit.linear]
            q8 = q.astype(np.int8)
            out_f = q8.shape[0]
            sw = np.broadcast_to(qp.scale, (out_f,)).astype(np.float64)
            zw = np.broadcast_to(qp.zero_point, (out_f,)).astype(np.int64)
            self._layers.append((prepack(np.ascontiguousarray(q8.T)), sw, zw,
                                 q8.sum(axis=1, dtype=np.int64), q8.shape[1],
                                 ptq_model.biases[unit.linear].astype(np.float64), unit.kind))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Logits (float32)."""
        x = real_array(X, "X", kinds="f", ndim=2, dtype=np.float32)
        for packed, sw, zw, colsum, k, bias, kind in self._layers:
            qp = dynamic_qparams(x, bits=self.config.activation_bits, signed=True,
                                 per_row=self.config.per_row).with_float32_scale()
            xq = quantize(x, qp).astype(np.int8)
            acc = matmul_int8(xq, packed).astype(np.int64)           # compiled int8 GEMM
            sx = np.broadcast_to(qp.scale, (x.shape[0],))[:, None]
            zx = np.broadcast_to(qp.zero_point, (x.shape[0],))[:, None]
            acc = acc - zx * colsum - np.outer(xq.sum(axis=1, dtype=np.int64), zw) + k * zx * zw
            y = sx * sw * acc + bias
            if kind != "none":
                y = np.maximum(y, 0.0)
            if kind == "relu6":
                y = np.minimum(y, 6.0)
            x = y.astype(np.float32)
        return x



def convert_to_integer(ptq_model: PTQModel, *, requantization: str = "float"):
    r"""Turn a simulated quantized network into one that runs on the int8 kernels.

    * a **static** :class:`PTQModel` becomes an :class:`IntegerModel`: for each fused unit
      :math:`l`, a :class:`qcourse.int_matmul.QuantizedLinear` with the integer weights, the
      bias quantized to int32 at scale :math:`S_{l-1} S_{W_l}`
      (:func:`qcourse.int_matmul.quantize_bias`), input parameters :math:`(S_{l-1}, Z_{l-1})`
      (the previous unit's output, or the network input), output parameters
      :math:`(S_l, Z_l)`, and the unit's activation fused;
    * a **dynamic** one becomes a :class:`DynamicIntegerModel`;
    * a **weight-only** one has no integer arithmetic to run (its activations are float) and
      raises ``ValueError``.

    ``requantization`` (static only) is ``"float"``, ``"tflite_double"`` or
    ``"tflite_single"`` (see :class:`IntegerModel`).  Activation grids must fit int8
    (``activation_bits`` <= 8).  See the ptq chapter.
    """
    if not isinstance(ptq_model, PTQModel):
        raise TypeError(f"ptq_model must be a PTQModel, got {type(ptq_model).__name__}")
    if ptq_model.mode == "weight_only":
        raise ValueError("a weight-only PTQ model keeps float activations: there is no integer "
                         "product to run; use static_ptq (or dynamic_ptq) to convert")
    if ptq_model.mode == "dynamic":
        if requantization != "float":
            raise ValueError("a dynamic model dequantizes its accumulators in float; "
                             "requantization applies to static models only")
        return DynamicIntegerModel(ptq_model)
    layers, names = [], []
    x_qp = ptq_model.activations["input"]
    for unit in ptq_model.units:
        q, w_qp = ptq_model.weights[unit.linear]
        y_qp = ptq_model.activations[unit.output]
        b_q = quantize_bias(ptq_model.biases[unit.linear], float(x_qp.scale), w_qp.scale)
        layers.append(QuantizedLinear(q.astype(np.int8), b_q, x_qp, w_qp, y_qp, unit.kind))
        names.append(unit.linear if unit.activation is None
                     else f"{unit.linear}+{unit.activation}")
        x_qp = y_qp
    return IntegerModel(layers, names, requantization)


# --------------------------------------------------------------------------- what differs


@dataclass(frozen=True)
class FakeQuantIntegerComparison:
    """Where the simulated (fake-quant) and the integer model part ways (see
    :func:`compare_fake_quant_integer`).

    Per layer (keyed by the integer model's layer names): ``codes_compared``;
    ``code_mismatches`` (all codes that differ), split into ``direct_mismatches`` (the layer's
    input codes were identical in both models, so the layer itself rounded differently) and the
    rest, inherited from a mismatch upstream; ``max_code_difference``; ``max_tie_distance``,
    the largest distance, in output steps, between the exact real value and a rounding tie
    (a half-integer) over the direct mismatches (0 when there are none); and ``half_bias_step``,
    the largest :math:`M_j / 2` -- how far the int32 rounding of the bias can move a value, in
    output steps.  Per model: the rows whose predicted class differs, and for each the gap
    between the fake-quant model's two largest logit codes (``fake_quant_margin_steps``).
    """

    n_examples: int
    fake_quant_accuracy: float | None
    integer_accuracy: float | None
    prediction_disagreements: int
    disagreeing_rows: np.ndarray
    fake_quant_margin_steps: np.ndarray
    codes_compared: dict
    code_mismatches: dict
    direct_mismatches: dict
    max_code_difference: dict
    max_tie_distance: dict
    half_bias_step: dict


def compare_fake_quant_integer(ptq_model: PTQModel, integer_model: IntegerModel,
                               X: np.ndarray, y: np.ndarray | None = None
                               ) -> FakeQuantIntegerComparison:
    r"""Compare a static :class:`PTQModel` with its :class:`IntegerModel`, code by code.

    The fake-quant output of every unit is :math:`S_l (q_l - Z_l)` for an integer :math:`q_l`;
    it is turned back into that code and compared with the integer model's code.  Both round
    the same real number,

    .. math:: u = \frac{S_x S_{W,j} \sum_k (q_{x,k} - Z_x)(q_{W,jk} - Z_{W,j}) + b_j}{S_y},

    but each computes it with its own small errors: the integer model adds the bias rounded to
    the int32 grid (an error of up to :math:`M_j / 2` output steps, :math:`M_j = S_x S_{W,j} /
    S_y`) and multiplies by a float32 :math:`M_j`; the float model accumulates in float32.  So
    a code can differ only where :math:`u` lies within these errors of a half-integer.  For
    every *direct* mismatch (a layer whose input codes were the same in both models) the
    distance of :math:`u` from the nearest half-integer is measured (from the exact integer
    accumulator, :meth:`qcourse.int_matmul.QuantizedLinear.accumulate`, in float64, with the
    bias the simulation uses); other mismatches are inherited from an earlier layer.  A changed
    code moves the next layer's input by one step, and a *prediction* changes only where the
    two largest logits are within a step or two of each other.  With labels ``y`` both
    accuracies are included.  See the ptq chapter.
    """
    if not isinstance(ptq_model, PTQModel) or ptq_model.mode != "static":
        raise TypeError("ptq_model must be a static PTQModel (from static_ptq)")
    if not isinstance(integer_model, IntegerModel):
        raise TypeError(f"integer_model must be an IntegerModel, got "
                        f"{type(integer_model).__name__}")
    if len(integer_model.layers) != len(ptq_model.units):
        raise ValueError("integer_model does not have one layer per unit of ptq_model")
    X = check_float_matrix(X, "X")
    acts = capture_activations(ptq_model.model, X, layers=[u.output for u in ptq_model.units])
    int_in = fq_in = integer_model.quantize_input(X).astype(np.int64)
    int_codes = integer_model.forward_codes(X)
    report = {k: {} for k in ("compared", "mismatches", "direct", "max_diff", "tie", "half")}
    fq_out = None
    for unit, name, layer, ic in zip(ptq_model.units, integer_model.names, integer_model.layers,
                                     int_codes, strict=True):
        qp = ptq_model.activations[unit.output]
        fq_out = quantize(acts[unit.output].output, qp).astype(np.int64)
        int_out = ic.astype(np.int64)
        diff = fq_out != int_out
        same_input = np.all(int_in == fq_in, axis=1)
        direct = diff & same_input[:, None]
        rows, cols = np.nonzero(direct)
        sw = np.broadcast_to(layer.weight_qparams.scale, (layer.out_features,))
        mult = float(layer.input_qparams.scale) * sw / float(layer.output_qparams.scale)
        tie = 0.0
        if rows.size:
            acc = layer.accumulate(int_in[rows].astype(np.int8)).astype(np.float64)
            acc = acc[np.arange(rows.size), cols] - layer.bias_q[cols]
            u = (float(layer.input_qparams.scale) * sw[cols] * acc
                 + ptq_model.model[unit.linear].bias[cols].astype(np.float64)) \
                / float(layer.output_qparams.scale)
            tie = float(np.max(np.abs(np.abs(u - np.floor(u)) - 0.5)))
        report["compared"][name] = int(diff.size)
        report["mismatches"][name] = int(np.count_nonzero(diff))
        report["direct"][name] = int(rows.size)
        report["max_diff"][name] = int(np.max(np.abs(fq_out - int_out)))
        report["tie"][name] = tie
        report["half"][name] = float(np.max(mult) / 2)
        int_in, fq_in = int_out, fq_out
    fq_pred = np.argmax(fq_out, axis=1)
    int_pred = np.argmax(int_codes[-1], axis=1)
    rows = np.flatnonzero(fq_pred != int_pred)
    top2 = np.sort(fq_out[rows], axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0]).astype(np.int64)
    fq_acc = int_acc = None
    if y is not None:
        y = check_labels(y, "y", X.shape[0])
        fq_acc = float(np.mean(fq_pred == y))
        int_acc = float(np.mean(int_pred == y))
    return FakeQuantIntegerComparison(
        n_examples=X.shape[0], fake_quant_accuracy=fq_acc, integer_accuracy=int_acc,
        prediction_disagreements=int(rows.size), disagreeing_rows=rows,
        fake_quant_margin_steps=margins, codes_compared=report["compared"],
        code_mismatches=report["mismatches"], direct_mismatches=report["direct"],
        max_code_difference=report["max_diff"], max_tie_distance=report["tie"],
        half_bias_step=report["half"])


# --------------------------------------------------------------------------- size


@dataclass(frozen=True)
class ModelSize:
    """Bytes a deployed model needs, by kind (see :func:`model_size`)."""

    weights: int
    biases: int
    scales: int
    zero_points: int

    @property
    def total(self) -> int:
        return self.weights + self.biases + self.scales + self.zero_points


def _grid_bits(qp: QParams) -> int:
    """Bits needed to store one code of the grid ``[qmin, qmax]``."""
    return max(1, math.ceil(math.log2(qp.qmax - qp.qmin + 1)))


def _packed_bytes(n_values: int, bits: int) -> int:
    """Bytes of ``n_values`` codes of ``bits`` bits packed densely (a bit stream)."""
    return -(-n_values * bits // 8)


def _quantized_size(codes: list[int], weight_qparams: list[QParams], biases: int,
                    activation_ranges: int) -> ModelSize:
    """Bytes of a quantized model: the weight codes packed at their grid's width, a float32
    scale per weight scale and per activation range, a byte per zero point (weights: only when
    they are not all 0), and 4 bytes per bias (float32 or int32)."""
    weights = sum(_packed_bytes(n, _grid_bits(qp)) for n, qp in zip(codes, weight_qparams,
                                                                      strict=True))
    scales = sum(4 * qp.scale.size for qp in weight_qparams) + 4 * activation_ranges
    zps = sum(qp.zero_point.size for qp in weight_qparams if np.any(qp.zero_point != 0))
    return ModelSize(int(weights), int(4 * biases), int(scales), int(zps + activation_ranges))


def model_size(model) -> ModelSize:
    r"""Bytes needed to store a float, PTQ or integer model, counted by kind.

    * float (:class:`qcourse.nn.Sequential`): every weight and bias at its dtype's size (4
      bytes in float32);
    * quantized weights: :math:`\lceil N b / 8 \rceil` bytes for :math:`N` codes of :math:`b`
      bits packed densely (:math:`b` = the bits the weight grid needs: 8 for -127..127, 4 for
      -7..7, 2 for -1..1; :func:`qcourse.affine.pack_int` gives this size for 4 and 2 bits), one
      float32 scale per tensor or per output channel, and one byte per zero point when the
      zero points are not all 0 (symmetric weights store none);
    * biases: float32 for weight-only and dynamic models, int32 for static and integer ones --
      4 bytes either way;
    * static and integer models also store a float32 scale and a one-byte zero point per
      activation range (the input and each unit's output).

    Activations themselves are not stored (they live in working memory).  See the ptq chapter.
    """
    if isinstance(model, Sequential):
        units = _units(model)
        w = sum(model[u.linear].weight.nbytes for u in units)
        b = sum(model[u.linear].bias.nbytes for u in units)
        return ModelSize(int(w), int(b), 0, 0)
    if isinstance(model, PTQModel):
        weights = [model.weights[u.linear][1] for u in model.units]
        codes = [model.weights[u.linear][0].size for u in model.units]
        biases = sum(model.biases[u.linear].size for u in model.units)
        return _quantized_size(codes, weights, biases, len(model.activations))
    if isinstance(model, IntegerModel):
        layers = model.layers
        return _quantized_size([ly.weight_q.size for ly in layers],
                               [ly.weight_qparams for ly in layers],
                               sum(ly.bias_q.size for ly in layers), len(layers) + 1)
    raise TypeError(f"model must be a qcourse.nn.Sequential, PTQModel or IntegerModel, got "
                    f"{type(model).__name__}")


# --------------------------------------------------------------------------- folding


def fold_batch_norm(weight, bias, gamma, beta, running_mean, running_var, *,
                    eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    r"""Fold an inference-mode batch normalization into the linear layer before it.

    A linear layer followed by batch normalization computes, per output channel :math:`j`,

    .. math::

        \gamma_j \frac{(W x + b)_j - \mu_j}{\sqrt{\sigma_j^2 + \epsilon}} + \beta_j
        = (W' x + b')_j, \qquad
        W'_{j,:} = \frac{\gamma_j}{\sqrt{\sigma_j^2 + \epsilon}} W_{j,:}, \qquad
        b'_j = \frac{\gamma_j (b_j - \mu_j)}{\sqrt{\sigma_j^2 + \epsilon}} + \beta_j,

    one linear layer with the same output: the normalization costs nothing at inference, and it
    is the *folded* weights that get quantized.  Each row is rescaled by its own factor
    :math:`\gamma_j / \sigma_j`, which spreads the rows' ranges apart -- one more reason for
    per-channel weight scales.  ``bias`` may be None (zeros).  Computed in float64, returned in
    the dtype of ``weight``.  See the ptq chapter.
    """
    w = real_array(weight, "weight", kinds="f", dtype=None, ndim=2)
    out_f = w.shape[0]
    named = {"bias": np.zeros(out_f) if bias is None else bias, "gamma": gamma, "beta": beta,
             "running_mean": running_mean, "running_var": running_var}
    vals = {}
    for name, v in named.items():
        arr = real_array(v, name, nonempty=False)
        if arr.shape != (out_f,):
            raise ValueError(f"{name} must have shape ({out_f},) (one per output channel), got "
                             f"{arr.shape}")
        vals[name] = arr
    if np.any(vals["running_var"] < 0):
        raise ValueError("running_var must be >= 0")
    eps = check_real(eps, "eps", 0.0, lo_open=True)
    with np.errstate(over="ignore", invalid="ignore"):
        factor = vals["gamma"] / np.sqrt(vals["running_var"] + eps)
        w_f = (w.astype(np.float64) * factor[:, None]).astype(w.dtype)
        b_f = (factor * (vals["bias"] - vals["running_mean"]) + vals["beta"]).astype(w.dtype)
    if not np.all(np.isfinite(w_f)):
        raise ValueError(f"the folded weight, weight * gamma / sqrt(running_var + eps), "
                         f"overflows {w.dtype}")
    if not np.all(np.isfinite(b_f)):
        raise ValueError(f"the folded bias, gamma * (bias - running_mean) / sqrt(running_var + "
                         f"eps) + beta, overflows {w.dtype}")
    return w_f, b_f


__getattr__ = moved_names(__name__, {"quantize_weight": "qcourse.affine.quantize_weight"})
