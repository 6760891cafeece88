r"""The course CNN and the post-training tools that quantize it.

The network (:func:`course_cnn`) is a small MobileNet (Howard et al. 2017; Sandler et al. 2018):
a 3x3 convolution, then three *depthwise-separable* blocks (a 3x3 depthwise convolution and a
1x1 pointwise one, each followed by batch normalization and ReLU6), global average pooling and
a linear classifier, for the 8x8 UCI digits as 1x8x8 images (:func:`digits_images`).  Its
trained weights ship in ``qcourse/data/cnn_digits.npz``, made by ``python -m
qcourse.data.make_cnn`` (:func:`load_course_cnn`), in a ReLU6 and a ReLU twin.

What a converter does before quantizing, and the data-free fixes of Nagel et al. (2019), live
here as functions on :class:`qcourse.nn.Sequential` models:

* :func:`fold_conv_batch_norm` / :func:`fold_batch_norms`: batch norm folded into the
  convolution before it (weights rescaled per output channel, a bias added);
* :func:`quantize_conv_weight`: symmetric int weights per tensor or per output channel;
* :func:`simulate_quantized`: the folded network with fake-quantized weights and activations
  (ranges calibrated min-max), the float model of what the integer network computes;
* :func:`cross_layer_equalization` and :func:`bias_correction` (Nagel et al. 2019), and
  :func:`adaround` (Nagel et al. 2020).

The conv chapter turns the folded, calibrated network into integers
(:func:`convert_cnn`, :class:`qcourse.conv.IntegerCNN`); the ptq chapter measures per tensor
against per channel, CLE, bias correction and AdaRound on it, the qat chapter trains it at 4 bits
and, without batch norms, compares ReLU6 with ReLU at 7 bits (:func:`qat_cnn`, which lives with
:class:`WeightFakeQuant` in ``qcourse/_cnn_qat.py``), the mixed_precision chapter ranks its
layers by curvature.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_EPOCHS,
    MAX_SQUARABLE,
    check_bool,
    check_choice,
    check_int,
    check_int_sequence,
    check_labels,
    check_real,
    check_sequence,
    describe,
    real_array,
)
from qcourse._cnn_qat import WeightFakeQuant, qat_cnn  # QAT, in its own file
from qcourse.affine import QParams, choose_qparams, fake_quantize, qparams_from_range, quantize
from qcourse.affine.quantizer import MAX_BITS, MIN_BITS
from qcourse.datasets import load_digits
from qcourse.int_matmul import REQUANTIZATIONS
from qcourse.kernels.matmul import _FLT_MAX as _F32_MAX
from qcourse.nn import (
    Adam,
    BatchNorm2d,
    Classifier,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    Module,
    ReLU,
    ReLU6,
    Sequential,
    one_blas_thread,
)
from qcourse.nn.core import _check_model_input, _fit_epochs, _num_outputs
from qcourse.nn.tools import _check_sequential

__all__ = [
    "CNN_STRIDES",
    "CNN_WIDTHS",
    "AdaRoundResult",
    "QuantSim",
    "adaround",
    "adaround_weight",
    "bias_correction",
    "convert_cnn",
    "course_cnn",
    "cross_layer_equalization",
    "digits_images",
    "equalization_pairs",
    "fold_batch_norms",
    "fold_conv_batch_norm",
    "load_course_cnn",
    "quantize_conv_weight",
    "simulate_quantized",
    "train_cnn",
    "qat_cnn",
    "WeightFakeQuant",
]

#: Channels of the course CNN: the stem convolution, then the pointwise output of each block.
CNN_WIDTHS = (16, 32, 64, 64)
#: Stride of each depthwise-separable block's depthwise convolution.
CNN_STRIDES = (1, 2, 1)
_ACTS = {"relu6": ReLU6, "relu": ReLU}
#: Most channels :func:`course_cnn` builds a layer with (MobileNets stop at 1280).
MAX_CNN_WIDTH = 4096
#: Most optimization steps of :func:`adaround_weight` and sweeps of
#: :func:`cross_layer_equalization` in one call.
MAX_ITERATIONS = 100_000


def _float32_range(value, name: str, **kwargs) -> np.ndarray:
    """Finite real numbers (float64) of magnitude at most float32's maximum."""
    arr = real_array(value, name, **kwargs)
    if arr.size and float(np.max(np.abs(arr))) > _F32_MAX:
        raise ValueError(f"{name} must have magnitudes at most {_F32_MAX:.4g} (float32: its "
                         f"scales and the layers are float32), got {float(np.max(np.abs(arr))):g}")
    return arr


def _check_unfolded(model, name: str = "model") -> Sequential:
    """A Sequential without batch norm layers (folded by :func:`fold_batch_norms`)."""
    _check_sequential(model)
    if any(isinstance(m, BatchNorm2d) for m in model):
        raise ValueError(f"{name} has batch norm layers: fold them first (fold_batch_norms)")
    return model


def _bits_arg(bits, name: str, model: Sequential | None = None, *, allow_none: bool = False,
                complete: bool = False):
    """Bits in [MIN_BITS, MAX_BITS] (2 to 16): one int, or (with ``model``) a dict from weighted
    layer names to bits (None where ``allow_none``); ``complete`` wants every weighted layer."""
    if bits is None and allow_none:
        return None
    if isinstance(bits, dict) and model is not None:
        names = [n for n, _ in _weighted_layers(model)]
        unknown = [k for k in bits if k not in names]
        if unknown:
            raise ValueError(f"{name} must map weighted layers {names} to bits, got unknown "
                             f"key(s) {unknown}")
        missing = [n for n in names if n not in bits]
        if complete and missing:
            raise ValueError(f"{name} must give the bits of every weighted layer, missing "
                             f"{missing}")
        return {k: _bits_arg(v, f"{name}[{k!r}]", allow_none=allow_none)
                for k, v in bits.items()}
    return check_int(bits, name, MIN_BITS, MAX_BITS)


def _check_weights(weights, model: Sequential, name: str = "weights"):
    """None, or a dict from weighted layer names to finite weights of each layer's shape."""
    if weights is None:
        return None
    if not isinstance(weights, dict):
        raise TypeError(f"{name} must be None or a dict from layer names to weights, got "
                        f"{describe(weights)}")
    layers = dict(_weighted_layers(model))
    for key, w in weights.items():
        if key not in layers:
            raise ValueError(f"{name} must map weighted layers {list(layers)} to weights, got "
                             f"unknown key {key!r}")
        arr = _float32_range(w, f"{name}[{key!r}]")
        if arr.shape != layers[key].weight.shape:
            raise ValueError(f"{name}[{key!r}] must have the layer's shape "
                             f"{layers[key].weight.shape}, got {arr.shape}")
    return weights


def digits_images(split: str = "train", seed: int = 0):
    """The 8x8 digits as NCHW images ``(n, 1, 8, 8)`` in [0, 1] (float32) and int64 labels.

    The same examples and split as :func:`qcourse.datasets.load_digits`, reshaped.
    """
    X, y = load_digits(split, seed=seed)
    return X.reshape(-1, 1, 8, 8), y


def course_cnn(activation: str = "relu6", *, seed: int = 0, widths=CNN_WIDTHS,
               dtype=np.float32, batch_norm: bool = True) -> Sequential:
    """The course's MobileNet-style CNN for 1x8x8 images, freshly initialized.

    ``conv0 (3x3, 1 -> w0) bn0 act0``, then for each block ``i`` = 1, 2, 3:
    ``dw{i} (3x3 depthwise, stride 1, 2, 1) bn_dw{i} act_dw{i} pw{i} (1x1) bn_pw{i} act_pw{i}``,
    then ``pool`` (global average), ``flat`` and ``fc`` (to 10 classes).  Convolutions before
    a batch norm have no bias (the norm's beta is one).  ``activation`` is ``"relu6"`` or
    ``"relu"`` (the twin); all weights come from ``np.random.default_rng(seed)`` (``seed`` an
    int >= 0); ``widths`` are 4 channel counts, each in [1, :data:`MAX_CNN_WIDTH`].  With
    ``batch_norm=False`` there are no norms and every convolution has a bias (the qat chapter's
    network whose ReLU activations have long tails).
    """
    check_choice(activation, "activation", tuple(_ACTS))
    widths = check_int_sequence(widths, "widths", 1, MAX_CNN_WIDTH, min_len=4, max_len=4)
    seed = check_int(seed, "seed", 0)
    bn = check_bool(batch_norm, "batch_norm")
    act = _ACTS[activation]
    rng = np.random.default_rng(seed)
    c = widths[0]

    def norm(name, ch):    # a batch norm, or (without) nothing: the convolution has a bias
        return [(name, BatchNorm2d(ch, dtype=dtype))] if bn else []

    layers = [("conv0", Conv2d(1, c, 3, padding=1, bias=not bn, seed=rng, dtype=dtype)),
              *norm("bn0", c), ("act0", act())]
    for i, (cout, stride) in enumerate(zip(widths[1:], CNN_STRIDES, strict=True), start=1):
        layers += [
            (f"dw{i}", Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=not bn,
                              seed=rng, dtype=dtype)),
            *norm(f"bn_dw{i}", c), (f"act_dw{i}", act()),
            (f"pw{i}", Conv2d(c, cout, 1, bias=not bn, seed=rng, dtype=dtype)),
            *norm(f"bn_pw{i}", cout), (f"act_pw{i}", act()),
        ]
        c = cout
    layers += [("pool", GlobalAvgPool2d()), ("flat", Flatten()),
               ("fc", Linear(c, 10, seed=rng, dtype=dtype))]
    return Sequential(*layers)


@functools.lru_cache(maxsize=1)
def _weights_file() -> dict[str, dict[str, np.ndarray]]:
    ref = resources.files("qcourse").joinpath("data").joinpath("cnn_digits.npz")
    with ref.open("rb") as fh, np.load(fh) as data:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            act, _, name = key.partition("/")
            out.setdefault(act, {})[name] = np.array(data[key])
    return out


def load_course_cnn(activation: str = "relu6") -> Sequential:
    """The trained course CNN (``"relu6"`` or its ``"relu"`` twin), in inference mode.

    Weights and batch-norm statistics from ``qcourse/data/cnn_digits.npz`` (made by ``python -m
    qcourse.data.make_cnn``; each call returns a fresh model).
    """
    check_choice(activation, "activation", tuple(_ACTS))
    model = course_cnn(activation)
    model.load_state_dict(_weights_file()[activation])
    return model


class _Optimizers:
    """Several optimizers stepped together (parameter groups with different weight decay)."""

    def __init__(self, *opts):
        self.opts = opts

    @property
    def params(self) -> list:
        """Every ``(param, grad)`` pair of the group (what train_epoch checks after a step)."""
        return [pair for o in self.opts for pair in o.params]

    @property
    def lr(self) -> float:
        return self.opts[0].lr

    @lr.setter
    def lr(self, value: float) -> None:
        for o in self.opts:
            o.lr = value

    def step(self) -> None:
        for o in self.opts:
            o.step()


def train_cnn(model: Sequential, X, y, *, epochs: int = 30, lr: float = 1e-2,
              weight_decay: float = 3e-3, batch_size: int = 32, seed: int = 0,
              progress: bool = True, stop_after: int | None = None) -> dict[str, list[float]]:
    r"""Train a CNN the MobileNet way: Adam with L2 weight decay on every parameter except the
    depthwise filters, and a cosine learning-rate schedule.

    Howard et al. (2017) put "very little or no weight decay" on depthwise filters, which have
    few parameters.  The consequence that matters for quantization: the decay on the batch
    norms' :math:`\gamma` and :math:`\beta` switches off channels the task does not need (their
    ReLU6 output becomes 0 on every image); such a dead channel feeds its depthwise filter
    nothing but zeros, the filter gets no gradient (and no decay) and keeps its initial weights,
    while the batch norm after it sees a variance of 0 and its running variance decays towards
    0.  Folding the norm divides the filter by :math:`\sqrt{\sigma^2 + \epsilon} \approx
    \sqrt{\epsilon}`, and that harmless filter becomes the largest weight of the layer (Sheng et
    al. 2018 found exactly this in MobileNetV1; measured here: with no decay on the batch norms
    no channel died and the folded depthwise ranges stayed within a factor of 8).  Epoch
    :math:`e` (from 0) uses :math:`\eta_e = \eta \cdot \tfrac12 (1 + \cos(\pi e / E))`;
    batches are drawn as in :func:`qcourse.nn.train` (one ``np.random.default_rng(seed)``),
    through the same :func:`qcourse.nn.train_epoch`.  ``stop_after`` ends the run after that
    many epochs of the same schedule (the first epochs of a full run, bit for bit).  Returns the
    per-epoch history.  Bounds: ``epochs`` in [1, 100000], ``batch_size`` in [1, 2**28],
    ``stop_after`` None or in [0, 100000].
    """
    _check_sequential(model)
    X = _check_model_input(model, X, "X")
    y = check_labels(y, "y", X.shape[0], _num_outputs(model))
    epochs = check_int(epochs, "epochs", 1, MAX_EPOCHS)
    lr = check_real(lr, "lr", 0.0, lo_open=True)
    weight_decay = check_real(weight_decay, "weight_decay", 0.0)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    if stop_after is not None:
        stop_after = check_int(stop_after, "stop_after", 0, MAX_EPOCHS)
    decay, no_decay = [], []
    for _, layer in model.named_modules():
        target = no_decay if isinstance(layer, Conv2d) and layer.groups > 1 else decay
        target.extend(layer.parameters())
    opt = _Optimizers(Adam(decay, lr=lr, weight_decay=weight_decay), Adam(no_decay, lr=lr))
    return _fit_epochs(model, X, y, opt, epochs=epochs, batch_size=batch_size, seed=seed,
                      progress=progress, stop_after=stop_after,
                      lr_schedule=lambda e: lr * 0.5 * (1 + np.cos(np.pi * e / epochs)))


# --------------------------------------------------------------------------- folding


def fold_conv_batch_norm(weight, bias, gamma, beta, running_mean, running_var, *,
                         eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    r"""Fold an inference-mode batch norm into the convolution before it.

    For output channel :math:`o`, with :math:`f_o = \gamma_o / \sqrt{\sigma_o^2 + \epsilon}`:

    .. math:: W'_{o,:,:,:} = f_o W_{o,:,:,:}, \qquad b'_o = f_o (b_o - \mu_o) + \beta_o.

    The folded layer computes exactly what conv then batch norm computed (up to float
    rounding), and it is this :math:`W'` that gets quantized: each filter is rescaled by its
    own :math:`f_o`, so filters whose channel had a small variance grow large -- the spread of
    per-channel ranges that makes per-tensor quantization of MobileNets fail (Nagel et al. 2019,
    Fig. 2).  ``weight`` is (out, in/groups, kh, kw) floats; ``bias`` may be None; every input
    finite, ``eps`` > 0.  float64 inside, returned in ``weight``'s dtype (a folded value beyond
    that dtype's range raises ``ValueError``).
    """
    w = real_array(weight, "weight", kinds="f", dtype=None, ndim=4)
    eps = check_real(eps, "eps", 0.0, lo_open=True)
    out_c = w.shape[0]
    named = {"bias": np.zeros(out_c) if bias is None else bias, "gamma": gamma, "beta": beta,
             "running_mean": running_mean, "running_var": running_var}
    vals = {}
    for name, v in named.items():
        arr = real_array(v, name)
        if arr.shape != (out_c,):
            raise ValueError(f"{name} must have shape ({out_c},) (one per output channel), got "
                             f"{arr.shape}")
        vals[name] = arr
    if np.any(vals["running_var"] < 0):
        raise ValueError("running_var must be >= 0")
    with np.errstate(over="ignore", invalid="ignore"):
        f = vals["gamma"] / np.sqrt(vals["running_var"] + float(eps))
        w_f = w.astype(np.float64) * f[:, None, None, None]
        b_f = f * (vals["bias"] - vals["running_mean"]) + vals["beta"]
        folded = w_f.astype(w.dtype), b_f.astype(w.dtype)
    if not (np.all(np.isfinite(folded[0])) and np.all(np.isfinite(folded[1]))):
        raise ValueError(f"the folded weight or bias overflows {w.dtype}: weight * gamma / "
                         f"sqrt(running_var + eps) and gamma * (bias - running_mean) / "
                         f"sqrt(running_var + eps) + beta must stay finite")
    return folded


def _copy_layer(layer: Module) -> Module:
    layer = copy.deepcopy(layer)
    layer._forward_hooks.clear()
    layer._forward_pre_hooks.clear()
    return layer


def fold_batch_norms(model: Sequential) -> Sequential:
    """A copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair folded into one ``Conv2d``.

    The batch norm layers disappear; each convolution gets the folded weights and a bias
    (:func:`fold_conv_batch_norm`).  Other layers are copied (without hooks).  The result
    computes the same function as ``model`` in inference mode.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    named = model.named_modules()
    layers = []
    i = 0
    while i < len(named):
        name, layer = named[i]
        nxt = named[i + 1][1] if i + 1 < len(named) else None
        if isinstance(layer, Conv2d) and isinstance(nxt, BatchNorm2d):
            conv = _copy_layer(layer)
            w, b = fold_conv_batch_norm(layer.weight, layer.bias, nxt.weight, nxt.bias,
                                        nxt.running_mean, nxt.running_var, eps=nxt.eps)
            conv.weight = w
            conv.bias = b
            conv.grad_weight = np.zeros_like(w)
            conv.grad_bias = np.zeros_like(b)
            layers.append((name, conv))
            i += 2
            continue
        if isinstance(layer, BatchNorm2d):
            raise ValueError(f"batch norm {name!r} does not follow a Conv2d: cannot fold it")
        layers.append((name, _copy_layer(layer)))
        i += 1
    return Sequential(*layers)


# --------------------------------------------------------------------------- quantization


def quantize_conv_weight(weight, bits: int = 8, *, per_channel: bool = True):
    r"""Symmetric signed quantization of a weight tensor, per output channel or per tensor.

    .. math:: s_o = \frac{\max |W_{o,\dots}|}{2^{b-1} - 1}, \qquad
              q = \operatorname{clamp}(\operatorname{round}(W / s_o), -(2^{b-1}-1), 2^{b-1}-1)

    (narrow range, zero point 0, as TFLite and ONNX Runtime quantize weights); per tensor takes
    one :math:`s` for the whole tensor.  The scale is rounded to float32, as a model file stores
    it.  Works for conv weights (out, in/groups, kh, kw) and linear ones (out, in).

    Returns
    -------
    (codes, QParams)
        ``codes`` int8 (for ``bits <= 8``) of ``weight``'s shape; ``QParams`` with ``axis=0``
        per channel.

    ``weight`` holds finite real numbers of magnitude at most float32's maximum (the scale is
    stored as float32); ``bits`` is an int in [2, 16].
    """
    w = _float32_range(weight, "weight")
    if w.ndim < 2:
        raise ValueError(f"weight must have an output axis and at least one more, got {w.shape}")
    bits = check_int(bits, "bits", MIN_BITS, MAX_BITS)
    per_channel = check_bool(per_channel, "per_channel")
    qp = choose_qparams(w, bits=bits, signed=True, symmetric=True, narrow_range=True,
                        axis=0 if per_channel else None)
    qp = QParams(scale=qp.scale.astype(np.float32).astype(np.float64),
                 zero_point=qp.zero_point, qmin=qp.qmin, qmax=qp.qmax, axis=qp.axis)
    return quantize(w, qp), qp


def _dequantized_weight(weight, bits, per_channel) -> np.ndarray:
    q, qp = quantize_conv_weight(weight, bits, per_channel=per_channel)
    scale = qp.scale.reshape((-1,) + (1,) * (np.ndim(weight) - 1)) if per_channel else qp.scale
    return (scale * q).astype(np.asarray(weight).dtype)


def _weighted_layers(model: Sequential) -> list[tuple[str, Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Conv2d | Linear)]


def _quant_points(model: Sequential) -> list[str]:
    """Names of the layers whose output is an integer tensor in the converted network.

    The output of each activation, and of each weighted layer not followed by one: where a
    requantization writes int8 codes.  (The pool writes codes too, on its input's grid.)
    """
    named = model.named_modules()
    points = []
    for i, (name, layer) in enumerate(named):
        nxt = named[i + 1][1] if i + 1 < len(named) else None
        if isinstance(layer, ReLU):          # ReLU6 too
            points.append(name)
        elif isinstance(layer, Conv2d | Linear) and not isinstance(nxt, ReLU):
            points.append(name)
    return points


@dataclass(frozen=True)
class QuantSim(Classifier):
    """A fake-quantized copy of a folded network and how it was made (:func:`simulate_quantized`).

    ``model`` runs in float with quantized weights and fake-quantized activations (hooks);
    ``input_qparams`` and ``activation_qparams`` (by layer name) are the calibrated grids;
    ``weight_qparams`` (by layer name) the weight grids.
    """

    model: Sequential
    input_qparams: QParams | None
    activation_qparams: dict[str, QParams]
    weight_qparams: dict[str, QParams]

    def __call__(self, X) -> np.ndarray:
        """The simulated network's float logits (``predict`` and ``accuracy`` come from
        :class:`qcourse.nn.Classifier`)."""
        return self.model(X)


def _minmax_qparams(x: np.ndarray, bits: int) -> QParams:
    qp = qparams_from_range(float(x.min()), float(x.max()), bits=bits, signed=True)
    return QParams(scale=qp.scale.astype(np.float32).astype(np.float64),
                   zero_point=qp.zero_point, qmin=qp.qmin, qmax=qp.qmax)


def _fq_hook(qp: QParams):
    def hook(module, inp, out):
        return fake_quantize(out, qp)
    return hook


def simulate_quantized(model: Sequential, X_calib, *, weight_bits=8, act_bits=8,
                       per_channel: bool = True, weights: dict | None = None) -> QuantSim:
    r"""The folded network with quantized weights and calibrated, fake-quantized activations.

    ``model`` must already be folded (no batch norm; :func:`fold_batch_norms`).  Each weighted
    layer's weight is replaced by its dequantized ``weight_bits`` codes
    (:func:`quantize_conv_weight`, per channel or per tensor; biases stay float, as an int32
    bias is exact enough); ``weight_bits`` is one int or ``{layer: bits}``, and ``weights``
    optionally gives ``{layer: dequantized weight}`` to use instead (AdaRound's rounding).  With
    ``act_bits`` (an int, or None for float activations) the input and every tensor the integer
    network stores (:func:`_quant_points`) are fake-quantized on a per-tensor asymmetric int
    grid whose range is the min-max over ``X_calib`` in the float network.  Bits are ints in
    [2, 16].
    """
    _check_unfolded(model)
    X_calib = _check_model_input(model, X_calib, "X_calib")
    weight_bits = _bits_arg(weight_bits, "weight_bits", model, allow_none=True)
    act_bits = _bits_arg(act_bits, "act_bits", allow_none=True)
    per_channel = check_bool(per_channel, "per_channel")
    weights = _check_weights(weights, model)
    sim = Sequential(*[(n, _copy_layer(m)) for n, m in model.named_modules()])
    weighted = _weighted_layers(sim)
    w_bits = weight_bits if isinstance(weight_bits, dict) else {
        n: weight_bits for n, _ in weighted}  # None: float weights
    weight_qparams = {}
    for name, layer in weighted:
        if weights is not None and name in weights:
            layer.weight = np.asarray(weights[name], dtype=layer.weight.dtype).copy()
            continue
        if w_bits.get(name) is None:
            continue
        _, weight_qparams[name] = quantize_conv_weight(layer.weight, w_bits[name],
                                                       per_channel=per_channel)
        layer.weight = _dequantized_weight(layer.weight, w_bits[name], per_channel)
    input_qp, act_qps = None, {}
    if act_bits is not None:
        from qcourse.nn import capture_activations
        points = _quant_points(model)
        seen = capture_activations(model, X_calib, layers=points)
        input_qp = _minmax_qparams(np.asarray(X_calib), act_bits)
        prev = input_qp
        for name, layer in sim.named_modules():
            if name in points:
                act_qps[name] = prev = _minmax_qparams(seen[name].output, act_bits)
                layer.register_forward_hook(_fq_hook(prev))
            elif isinstance(layer, GlobalAvgPool2d):   # the mean rounded onto its input's grid
                layer.register_forward_hook(_fq_hook(prev))
        sim.layers[0].register_forward_pre_hook(lambda m, x: fake_quantize(x, input_qp))
    return QuantSim(sim, input_qp, act_qps, weight_qparams)


# --------------------------------------------------------------------------- Nagel et al. 2019


def _out_ranges(layer) -> np.ndarray:
    """max |W| per output channel."""
    w = layer.weight
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1).astype(np.float64)


def _in_ranges(layer) -> np.ndarray:
    """max |W| per input channel (for a depthwise layer: per channel, its own filter)."""
    w = layer.weight
    if isinstance(layer, Conv2d) and layer.groups > 1:
        return np.abs(w).reshape(w.shape[0], -1).max(axis=1).astype(np.float64)
    return np.abs(np.moveaxis(w, 1, 0)).reshape(w.shape[1], -1).max(axis=1).astype(np.float64)


def _scale_pair(first, second, s: np.ndarray) -> None:
    """W1 row i / s_i, b1_i / s_i; W2 input channel i * s_i (in place)."""
    dt = first.weight.dtype
    first.weight[...] = (first.weight / s.reshape((-1,) + (1,) * (first.weight.ndim - 1))
                         ).astype(dt)
    if first.bias is not None:
        first.bias[...] = (first.bias / s).astype(dt)
    w2 = second.weight
    if isinstance(second, Conv2d) and second.groups > 1:
        w2[...] = (w2 * s.reshape(-1, 1, 1, 1)).astype(dt)
    elif w2.ndim == 4:
        w2[...] = (w2 * s.reshape(1, -1, 1, 1)).astype(dt)
    else:
        w2[...] = (w2 * s.reshape(1, -1)).astype(dt)


def equalization_pairs(model: Sequential) -> list[tuple[str, str]]:
    """Consecutive weighted layers with only a ReLU/ReLU6, pool or flatten between them.

    Through these, scaling channel :math:`i` of the first layer's output by :math:`1/s_i`
    scales the second layer's input channel :math:`i` by the same factor (ReLU is positively
    homogeneous, :math:`\\max(0, x/s) = \\max(0, x)/s`; averaging and flattening are linear).
    """
    named = _check_sequential(model).named_modules()
    pairs = []
    prev = None
    for name, layer in named:
        if isinstance(layer, Conv2d | Linear):
            if prev is not None:
                pairs.append((prev, name))
            prev = name
        elif not isinstance(layer, ReLU | GlobalAvgPool2d | Flatten):
            prev = None
    return pairs


def cross_layer_equalization(model: Sequential, *, iterations: int = 20) -> Sequential:
    r"""Cross-layer equalization (Nagel et al. 2019, Sec. 4.1) of a folded network; a copy.

    For each pair of consecutive layers (:func:`equalization_pairs`) with per-channel weight
    ranges :math:`r^{(1)}_i` (output channel :math:`i` of the first) and :math:`r^{(2)}_i`
    (input channel :math:`i` of the second), the first layer's channel is divided and the
    second's multiplied by

    .. math:: s_i = \frac{1}{r^{(2)}_i}\sqrt{r^{(1)}_i r^{(2)}_i},

    which leaves both with the range :math:`\sqrt{r^{(1)}_i r^{(2)}_i}`: the precision per
    channel is shared fairly between the two layers, and a per-tensor grid fits every channel.
    The float function is unchanged only through positively homogeneous activations, so every
    ReLU6 between equalized layers is replaced by a ReLU, as Nagel et al. do for MobileNetV2
    (the clip at 6 would no longer be at 6 after scaling).  Sweeps over all pairs
    ``iterations`` times (the ranges converge), an int in [0, :data:`MAX_ITERATIONS`].
    """
    _check_unfolded(model)
    iterations = check_int(iterations, "iterations", 0, MAX_ITERATIONS)
    layers = []
    for name, m in model.named_modules():
        layers.append((name, ReLU() if isinstance(m, ReLU6) else _copy_layer(m)))
    out = Sequential(*layers)
    pairs = equalization_pairs(out)
    for _ in range(iterations):
        for a, b in pairs:
            r1, r2 = _out_ranges(out[a]), _in_ranges(out[b])
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            _scale_pair(out[a], out[b], s)
    return out


def _layer_inputs(model: Sequential, X, names) -> dict[str, np.ndarray]:
    from qcourse.nn import capture_activations
    seen = capture_activations(model, X, layers=list(names))
    return {n: seen[n].input for n in names}


def _conv_delta_mean(layer, x: np.ndarray, delta_w: np.ndarray) -> np.ndarray:
    """Mean over batch and positions of the output of ``layer`` with weight ``delta_w``, no bias."""
    probe = _copy_layer(layer)
    probe.weight = delta_w.astype(layer.weight.dtype)
    if probe.bias is not None:
        probe.bias = np.zeros_like(probe.bias)
    y = probe.forward(x.astype(layer.weight.dtype))
    return y.mean(axis=(0, 2, 3)) if y.ndim == 4 else y.mean(axis=0)


def bias_correction(model: Sequential, X_calib, *, weight_bits=8,
                    per_channel: bool = False) -> Sequential:
    r"""Bias correction (Nagel et al. 2019, Sec. 4.2): undo the mean shift of weight rounding.

    Quantizing :math:`W` to :math:`\tilde W = W + \epsilon` shifts each output's mean by
    :math:`\mathbb E[\epsilon x] = \epsilon\, \mathbb E[x]`, a bias the network never saw.  For
    every weighted layer, this measures the shift on the calibration images ``X_calib`` (the
    mean over images and positions of the layer's output with weight :math:`\epsilon`, on the
    float network's inputs to that layer; Nagel et al.'s data-free variant predicts
    :math:`\mathbb E[x]` from the batch-norm statistics instead) and subtracts it from the bias.
    Returns a copy whose biases are corrected for the quantization that
    :func:`simulate_quantized` will apply with the same ``weight_bits`` and ``per_channel``
    (one int in [2, 16], or a dict giving every weighted layer its bits or None).
    """
    _check_sequential(model)
    X_calib = _check_model_input(model, X_calib, "X_calib")
    weight_bits = _bits_arg(weight_bits, "weight_bits", model, allow_none=True, complete=True)
    per_channel = check_bool(per_channel, "per_channel")
    out = Sequential(*[(n, _copy_layer(m)) for n, m in model.named_modules()])
    weighted = _weighted_layers(out)
    inputs = _layer_inputs(model, X_calib, [n for n, _ in weighted])
    for name, layer in weighted:
        bits = weight_bits[name] if isinstance(weight_bits, dict) else weight_bits
        if bits is None:
            continue
        eps = _dequantized_weight(layer.weight, bits, per_channel).astype(np.float64) - \
            layer.weight.astype(np.float64)
        shift = _conv_delta_mean(layer, inputs[name], eps)
        if layer.bias is None:
            layer.bias = np.zeros(layer.weight.shape[0], layer.weight.dtype)
            layer.grad_bias = np.zeros_like(layer.bias)
        layer.bias[...] = (layer.bias - shift).astype(layer.bias.dtype)
    return out


# --------------------------------------------------------------------------- Nagel et al. 2020


def _input_gram(layer, x: np.ndarray) -> np.ndarray:
    r""":math:`H = \frac{1}{M} P^T P` of the layer's input patches: (K, K), or (out, K, K) for a
    depthwise convolution (each channel sees its own patches)."""
    from qcourse.conv import im2col
    x = x.astype(np.float64)
    if isinstance(layer, Linear):
        return x.T @ x / x.shape[0]
    cols = im2col(x, layer.kernel_size, layer.stride, layer.padding, layout="NCHW")
    n, oh, ow, c = cols.shape[:4]
    if layer.groups > 1:
        p = cols.reshape(n * oh * ow, c, -1).transpose(1, 0, 2)        # (c, M, kh*kw)
        return np.matmul(p.transpose(0, 2, 1), p) / p.shape[1]
    p = cols.reshape(n * oh * ow, -1)
    return p.T @ p / p.shape[0]


def _rectified_sigmoid(v: np.ndarray, zeta: float = 1.1, gamma: float = -0.1):
    with np.errstate(over="ignore"):        # exp(-v) = inf for v < -709: the sigmoid is 0
        sig = 1.0 / (1.0 + np.exp(-v))
    h = sig * (zeta - gamma) + gamma
    dh = (zeta - gamma) * sig * (1 - sig) * ((h > 0) & (h < 1))
    return np.clip(h, 0.0, 1.0), dh


class AdaRoundResult(NamedTuple):
    """One layer rounded by :func:`adaround_weight`: the dequantized weight and the
    reconstruction errors :math:`\\mathrm{tr}(\\Delta H \\Delta^T)` of nearest and learned
    rounding."""

    weight: np.ndarray
    up_fraction_changed: float
    error_nearest: float
    error_adaround: float


def adaround_weight(weight, gram, bits: int, *, per_channel: bool = True,
                    iterations: int = 1000, lr: float = 1e-2, reg: float = 10.0,
                    warmup: float = 0.2, beta=(20.0, 2.0), seed: int = 0) -> AdaRoundResult:
    r"""Learn whether each weight rounds up or down (AdaRound, Nagel et al. 2020).

    With the grid :math:`s` of :func:`quantize_conv_weight`, each weight becomes
    :math:`\tilde W = s\,\mathrm{clamp}(\lfloor W/s \rfloor + h(V), q_{\min}, q_{\max})` with
    :math:`h(V) = \mathrm{clip}(\sigma(V)(\zeta - \gamma) + \gamma, 0, 1)` (the rectified
    sigmoid, :math:`\zeta = 1.1, \gamma = -0.1`), and :math:`V` minimizes the layer's output
    error plus a term that pushes every :math:`h` to 0 or 1:

    .. math::

        \frac{\mathrm{tr}(\Delta H \Delta^T)}{\mathrm{tr}(\Delta_0 H \Delta_0^T)}
        + \frac{\lambda}{N} \sum_{ij} \big(1 - |2 h(V_{ij}) - 1|^{\beta}\big), \qquad
        \Delta = \tilde W - W,

    where :math:`H = \mathbb E[x x^T]` is the Gram matrix of the layer's inputs (patches for a
    convolution; one per channel for a depthwise layer), so that :math:`\mathrm{tr}(\Delta H
    \Delta^T) = \mathbb E \|\Delta x\|^2` is the output error, normalized by that of nearest
    rounding :math:`\Delta_0`.  :math:`\beta` anneals from ``beta[0]`` to ``beta[1]`` after a
    ``warmup`` share of the ``iterations`` without the regularizer; Adam with ``lr`` on
    :math:`V`, initialized so that :math:`h(V)` is the fractional part (the start is nearest
    rounding's soft version).  Finally each :math:`h` is rounded to 0 or 1.  Nearest rounding
    minimizes each weight's error; AdaRound minimizes the *layer's*, letting errors cancel.

    Arguments: ``weight`` (out, ...) finite, within float32; ``gram`` (K, K) or (out, K, K) for
    K weights per output, finite, magnitudes at most 1e150 (its products are squared);
    ``bits`` in [2, 16]; ``iterations`` in [0, :data:`MAX_ITERATIONS`]; ``lr`` in (0, 1000],
    ``reg`` in [0, 1e6], ``warmup`` in [0, 1), ``beta`` two numbers in [1, 1000]; ``seed`` an
    int >= 0 (the optimization is deterministic and draws nothing).
    """
    w = _float32_range(weight, "weight")
    if w.ndim < 2:
        raise ValueError(f"weight must have an output axis and at least one more, got {w.shape}")
    out, k = w.shape[0], w.size // w.shape[0]
    H = real_array(gram, "gram", max_abs=MAX_SQUARABLE)
    if H.shape not in ((k, k), (out, k, k)):
        raise ValueError(f"gram must have shape ({k}, {k}) or ({out}, {k}, {k}) for a weight of "
                         f"shape {w.shape}, got {H.shape}")
    bits = check_int(bits, "bits", MIN_BITS, MAX_BITS)
    iterations = check_int(iterations, "iterations", 0, MAX_ITERATIONS)
    lr = check_real(lr, "lr", 0.0, 1e3, lo_open=True)
    reg = check_real(reg, "reg", 0.0, 1e6)
    warmup = check_real(warmup, "warmup", 0.0, 1.0, hi_open=True)
    beta = tuple(check_real(b, f"beta[{i}]", 1.0, 1e3) for i, b in
                 enumerate(check_sequence(beta, "beta", min_len=2, max_len=2)))
    check_int(seed, "seed", 0)
    _, qp = quantize_conv_weight(w, bits, per_channel=per_channel)
    s = np.broadcast_to(qp.scale, (out,)).reshape(-1, 1)
    flat = w.reshape(out, -1)
    floor = np.floor(flat / s)
    rest = flat / s - floor
    zeta, gamma = 1.1, -0.1
    p = np.clip((rest - gamma) / (zeta - gamma), 1e-4, 1 - 1e-4)
    v = np.log(p / (1 - p))

    def err(wt):
        d = wt - flat
        return float(np.einsum("ok,kl,ol->", d, H, d) if H.ndim == 2
                     else np.einsum("ok,okl,ol->", d, H, d))

    def dequant(h):
        return s * np.clip(floor + h, qp.qmin, qp.qmax)

    nearest = dequant(np.rint(rest))
    e0 = max(err(nearest), 1e-30)
    m = np.zeros_like(v)
    u = np.zeros_like(v)
    b1, b2 = 0.9, 0.999
    n_w = v.size
    for t in range(1, iterations + 1):
        h, dh = _rectified_sigmoid(v, zeta, gamma)
        q = floor + h
        inside = (q >= qp.qmin) & (q <= qp.qmax)
        d = dequant(h) - flat
        g = 2 * (d @ H if H.ndim == 2 else np.einsum("ok,okl->ol", d, H)) / e0
        grad = g * s * inside * dh
        frac = (t / iterations - warmup) / (1 - warmup)
        if frac > 0:
            bt = beta[1] + (beta[0] - beta[1]) * max(0.0, 1 - frac)
            a = 2 * h - 1
            grad += reg / n_w * (-bt * np.abs(a) ** (bt - 1) * np.sign(a) * 2) * dh
        m = b1 * m + (1 - b1) * grad
        u = b2 * u + (1 - b2) * grad * grad
        v -= lr * (m / (1 - b1**t)) / (np.sqrt(u / (1 - b2**t)) + 1e-8)
    h_final = (_rectified_sigmoid(v, zeta, gamma)[0] >= 0.5).astype(np.float64)
    learned = dequant(h_final)
    changed = float(np.mean(h_final != np.rint(rest)))
    return AdaRoundResult(learned.reshape(w.shape).astype(np.asarray(weight).dtype), changed,
                          float(e0), err(learned))


def adaround(model: Sequential, X_calib, *, weight_bits=4, per_channel: bool = True,
             iterations: int = 1000, seed: int = 0, layers=None) -> dict[str, AdaRoundResult]:
    """:func:`adaround_weight` for every weighted layer of a folded network (or ``layers``).

    The Gram matrices come from the float network's inputs to each layer on ``X_calib``.
    Returns ``{layer: AdaRoundResult}``; pass ``{name: r.weight}`` as ``weights`` to
    :func:`simulate_quantized` to evaluate the learned rounding.  ``weight_bits`` is one int in
    [2, 16] or a dict with the bits of every chosen layer; ``layers`` None or weighted layer
    names; the rest as in :func:`adaround_weight`.
    """
    _check_sequential(model)
    X_calib = _check_model_input(model, X_calib, "X_calib")
    if layers is not None:
        names = [n for n, _ in _weighted_layers(model)]
        for i, name in enumerate(check_sequence(layers, "layers", min_len=1)):
            if not isinstance(name, str) or name not in names:
                raise ValueError(f"layers[{i}] must be one of the weighted layers {names}, got "
                                 f"{describe(name)}")
    weight_bits = _bits_arg(weight_bits, "weight_bits", model)
    if isinstance(weight_bits, dict):
        missing = [n for n, _ in _weighted_layers(model)
                   if (layers is None or n in layers) and n not in weight_bits]
        if missing:
            raise ValueError(f"weight_bits must give the bits of every layer rounded, missing "
                             f"{missing}")
    per_channel = check_bool(per_channel, "per_channel")
    iterations = check_int(iterations, "iterations", 0, MAX_ITERATIONS)
    seed = check_int(seed, "seed", 0)
    weighted = [(n, m) for n, m in _weighted_layers(model) if layers is None or n in layers]
    inputs = _layer_inputs(model, X_calib, [n for n, _ in weighted])
    results = {}
    with one_blas_thread():       # small products: a second BLAS thread only waits
        for name, layer in weighted:
            bits = weight_bits[name] if isinstance(weight_bits, dict) else weight_bits
            results[name] = adaround_weight(layer.weight, _input_gram(layer, inputs[name]),
                                            bits, per_channel=per_channel,
                                            iterations=iterations, seed=seed)
    return results


# --------------------------------------------------------------------------- to integers


def convert_cnn(model: Sequential, X_calib, *, per_channel: bool = True,
                requantization: str = "float", weights: dict | None = None):
    r"""The trained CNN as an :class:`qcourse.conv.IntegerCNN` (int8 weights and activations).

    Batch norms are folded (:func:`fold_batch_norms`), activation grids are calibrated min-max
    on ``X_calib`` exactly as in :func:`simulate_quantized` (per tensor, int8, asymmetric; the
    input's too), and each layer becomes its integer twin: a ``Conv2d`` followed by a ReLU6 or
    ReLU becomes a :class:`qcourse.conv.QuantizedConv2d` with that activation fused as its
    clamp, the pool an :class:`qcourse.conv.IntegerGlobalAvgPool` on its input's grid, the
    classifier a :class:`qcourse.int_matmul.QuantizedLinear`.  Weights are int8, symmetric, per
    output channel (or per tensor); biases int32 at :math:`S_x S_{W,o}`.  ``weights`` replaces
    float weights before quantization (e.g. AdaRound's dequantized choice, which lies on the
    grid and therefore quantizes to itself).  See the conv chapter.
    """
    _check_sequential(model)
    X_calib = _check_model_input(model, X_calib, "X_calib")
    per_channel = check_bool(per_channel, "per_channel")
    check_choice(requantization, "requantization", REQUANTIZATIONS)
    weights = _check_weights(weights, model)
    from qcourse.conv import IntegerCNN, IntegerGlobalAvgPool, QuantizedConv2d
    from qcourse.int_matmul import QuantizedLinear

    folded = fold_batch_norms(model) if any(isinstance(m, BatchNorm2d) for m in model) \
        else model
    sim = simulate_quantized(folded, X_calib, weight_bits=None, act_bits=8)
    named = folded.named_modules()
    layers = []
    prev = sim.input_qparams
    for i, (name, layer) in enumerate(named):
        if isinstance(layer, Conv2d | Linear):
            w = np.asarray(weights[name]) if weights and name in weights else layer.weight
            nxt = named[i + 1] if i + 1 < len(named) else (None, None)
            act = ("relu6" if isinstance(nxt[1], ReLU6) else
                   "relu" if isinstance(nxt[1], ReLU) else "none")
            out_qp = sim.activation_qparams[nxt[0] if act != "none" else name]
            b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias
            if isinstance(layer, Conv2d):
                q = QuantizedConv2d.from_float(w, b, prev, out_qp, stride=layer.stride,
                                               padding=layer.padding, groups=layer.groups,
                                               activation=act, per_channel=per_channel)
            else:
                q = QuantizedLinear.from_float(w, b, prev, out_qp, per_channel=per_channel,
                                               activation=act)
            layers.append((name, q))
            prev = out_qp
        elif isinstance(layer, GlobalAvgPool2d):
            layers.append((name, IntegerGlobalAvgPool(prev)))
        elif not isinstance(layer, ReLU | Flatten):
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) has no integer twin")
    return IntegerCNN(sim.input_qparams, layers, requantization)
