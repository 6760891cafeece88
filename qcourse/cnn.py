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
(:func:`convert_cnn`, :class:`qcourse.conv.IntegerCNN`).
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import NamedTuple

import numpy as np

from qcourse.affine import QParams, choose_qparams, fake_quantize, qparams_from_range, quantize
from qcourse.datasets import load_digits
from qcourse.nn import (
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    Module,
    ReLU,
    ReLU6,
    Sequential,
    accuracy,
)

__all__ = [
    "CNN_WIDTHS",
    "QuantSim",
    "course_cnn",
    "digits_images",
    "fold_batch_norms",
    "fold_conv_batch_norm",
    "load_course_cnn",
    "quantize_conv_weight",
    "simulate_quantized",
]

#: Channels of the course CNN: the stem convolution, then the pointwise output of each block.
CNN_WIDTHS = (16, 32, 64, 64)
#: Stride of each depthwise-separable block's depthwise convolution.
CNN_STRIDES = (1, 2, 1)
_ACTS = {"relu6": ReLU6, "relu": ReLU}


def digits_images(split: str = "train", seed: int = 0):
    """The 8x8 digits as NCHW images ``(n, 1, 8, 8)`` in [0, 1] (float32) and int64 labels.

    The same examples and split as :func:`qcourse.datasets.load_digits`, reshaped.
    """
    X, y = load_digits(split, seed=seed)
    return X.reshape(-1, 1, 8, 8), y


def course_cnn(activation: str = "relu6", *, seed: int = 0, widths=CNN_WIDTHS,
               dtype=np.float32) -> Sequential:
    """The course's MobileNet-style CNN for 1x8x8 images, freshly initialized.

    ``conv0 (3x3, 1 -> w0) bn0 act0``, then for each block ``i`` = 1, 2, 3:
    ``dw{i} (3x3 depthwise, stride 1, 2, 1) bn_dw{i} act_dw{i} pw{i} (1x1) bn_pw{i} act_pw{i}``,
    then ``pool`` (global average), ``flat`` and ``fc`` (to 10 classes).  Convolutions before
    a batch norm have no bias (the norm's beta is one).  ``activation`` is ``"relu6"`` or
    ``"relu"`` (the twin); all weights come from ``np.random.default_rng(seed)``.
    """
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
    widths = tuple(widths)
    if len(widths) != 4:
        raise ValueError(f"widths must give 4 channel counts, got {widths}")
    act = _ACTS[activation]
    rng = np.random.default_rng(seed)
    c = widths[0]
    layers = [("conv0", Conv2d(1, c, 3, padding=1, bias=False, seed=rng, dtype=dtype)),
              ("bn0", BatchNorm2d(c, dtype=dtype)), ("act0", act())]
    for i, (cout, stride) in enumerate(zip(widths[1:], CNN_STRIDES, strict=True), start=1):
        layers += [
            (f"dw{i}", Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False, seed=rng,
                              dtype=dtype)),
            (f"bn_dw{i}", BatchNorm2d(c, dtype=dtype)), (f"act_dw{i}", act()),
            (f"pw{i}", Conv2d(c, cout, 1, bias=False, seed=rng, dtype=dtype)),
            (f"bn_pw{i}", BatchNorm2d(cout, dtype=dtype)), (f"act_pw{i}", act()),
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
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
    model = course_cnn(activation)
    model.load_state_dict(_weights_file()[activation])
    return model


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
    Fig. 2).  ``weight`` is (out, in/groups, kh, kw); ``bias`` may be None.  float64 inside,
    returned in ``weight``'s dtype.
    """
    w = np.asarray(weight)
    if w.dtype.kind != "f" or w.ndim != 4 or w.size == 0:
        raise ValueError(f"weight must be a non-empty 4-D float array (out, in/groups, kh, kw), "
                         f"got {w.dtype} {w.shape}")
    out_c = w.shape[0]
    named = {"bias": np.zeros(out_c) if bias is None else bias, "gamma": gamma, "beta": beta,
             "running_mean": running_mean, "running_var": running_var}
    vals = {}
    for name, v in named.items():
        arr = np.asarray(v, dtype=np.float64)
        if arr.shape != (out_c,):
            raise ValueError(f"{name} must have shape ({out_c},) (one per output channel), got "
                             f"{arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite")
        vals[name] = arr
    if np.any(vals["running_var"] < 0):
        raise ValueError("running_var must be >= 0")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    f = vals["gamma"] / np.sqrt(vals["running_var"] + float(eps))
    w_f = w.astype(np.float64) * f[:, None, None, None]
    b_f = f * (vals["bias"] - vals["running_mean"]) + vals["beta"]
    return w_f.astype(w.dtype), b_f.astype(w.dtype)


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
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"weight must have an output axis and at least one more, got {w.shape}")
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

    The output of each activation (or of a weighted layer not followed by one), of the pool, and
    of the last layer: where a requantization (or the pool's rounding) writes int8 codes.
    """
    named = model.named_modules()
    points = []
    for i, (name, layer) in enumerate(named):
        nxt = named[i + 1][1] if i + 1 < len(named) else None
        if isinstance(layer, ReLU):          # ReLU6 too
            points.append(name)
        elif isinstance(layer, Conv2d | Linear) and not isinstance(nxt, ReLU):
            points.append(name)
        elif isinstance(layer, GlobalAvgPool2d):
            points.append(name)
    return points


class QuantSim(NamedTuple):
    """A fake-quantized copy of a folded network and how it was made (:func:`simulate_quantized`).

    ``model`` runs in float with quantized weights and fake-quantized activations (hooks);
    ``input_qparams`` and ``activation_qparams`` (by layer name) are the calibrated grids;
    ``weight_qparams`` (by layer name) the weight grids.
    """

    model: Sequential
    input_qparams: QParams | None
    activation_qparams: dict[str, QParams]
    weight_qparams: dict[str, QParams]

    def accuracy(self, X, y) -> float:
        """Accuracy of the simulated quantized network on ``(X, y)``."""
        return accuracy(self.model, X, y)


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
    grid whose range is the min-max over ``X_calib`` in the float network.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    if any(isinstance(m, BatchNorm2d) for m in model):
        raise ValueError("model has batch norm layers: fold them first (fold_batch_norms)")
    sim = Sequential(*[(n, _copy_layer(m)) for n, m in model.named_modules()])
    weighted = _weighted_layers(sim)
    w_bits = weight_bits if isinstance(weight_bits, dict) else {
        n: weight_bits for n, _ in weighted}
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
        for name in points:
            act_qps[name] = _minmax_qparams(seen[name].output, act_bits)
            sim[name].register_forward_hook(_fq_hook(act_qps[name]))
        sim.layers[0].register_forward_pre_hook(lambda m, x: fake_quantize(x, input_qp))
    return QuantSim(sim, input_qp, act_qps, weight_qparams)
