r"""Sensitivity, measured: quantize the weights of one layer (or of every configuration) and see.

:func:`fake_quantize_weight` (the course's weight quantizer, dequantized), the ``with`` block
:func:`temporarily_quantized`, one layer at a time (:func:`layer_sensitivity`) and every
configuration of a small model (:func:`all_configurations`): the ground truth that the
curvature estimates and the allocation try to reach without trying everything.  Re-exported by
:mod:`qcourse.mixed_precision`; see the mixed_precision chapter.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import numpy as np

from qcourse import nn
from qcourse._checks import (
    check_int,
    check_sequence,
)
from qcourse.affine import fake_quantize, qparams_from_range, quantize_weight
from qcourse.mixed_precision.allocation import (
    _MAX_CONFIGS,
    FLOAT_BITS,
    _bits_map,
    _bits_value,
    _check_data,
    model_size_bits,
)
from qcourse.nn import (
    Evaluation,
    Sequential,
    capture_activations,
    evaluate,
    swapped_weights,
)

__all__ = [
    "ConfigSweep",
    "LayerSensitivity",
    "all_configurations",
    "fake_quantize_weight",
    "layer_sensitivity",
    "temporarily_quantized",
]


# --------------------------------------------------------------------------- quantizing weights


def fake_quantize_weight(weight, bits: int, *, per_channel: bool = True) -> np.ndarray:
    r"""Fake-quantize a weight matrix to ``bits`` bits, symmetric and signed.

    .. math::

        s_c = \frac{\max_j |W_{cj}|}{2^{b-1} - 1}, \qquad
        Q(W)_{cj} = s_c \cdot \operatorname{clamp}\big(\operatorname{round}(W_{cj} / s_c),
        -(2^{b-1} - 1), 2^{b-1} - 1\big)

    with one scale per output channel ``c`` (row of the ``(out, in)`` weight) when
    ``per_channel`` is true, one for the whole tensor otherwise, rounded to float32 as a model
    file stores it; ``round`` is round half to even.  The grid is the narrow, symmetric one
    (int8: -127..127, int4: -7..7, int2: -1..1, i.e. ternary weights), the weight quantizer of
    HAWQ-V3 (symmetric, per channel): :func:`qcourse.affine.quantize_weight`, the course's one
    weight quantizer, followed by dequantization.  Weights must be finite; ``bits`` is 2 to 16.
    The result has the dtype of ``weight``.  See the mixed_precision chapter (and the affine
    chapter for the grid).
    """
    _, qp = quantize_weight(weight, bits=bits, per_channel=per_channel)
    return fake_quantize(weight, qp)


@contextmanager
def temporarily_quantized(model, w_bits, a_bits=None, *, X_cal=None,
                          per_channel: bool = True) -> Iterator[Sequential]:
    """Temporarily quantize ``model``: weights of each Linear layer, and optionally its input.

    ``w_bits`` is one bit width for every Linear layer or a mapping ``{layer: bits}``; layers
    missing from the mapping, or given ``None`` or 32, stay float.  Weights are replaced in
    place by :func:`fake_quantize_weight` and restored exactly when the block ends, even on error
    (:func:`qcourse.nn.swapped_weights`).

    ``a_bits`` (same forms; default ``None``: activations stay float) quantizes the *input* of
    each Linear layer, the activation its integer kernel would read: an unsigned asymmetric
    ``a_bits``-bit grid over the min-max range seen on ``X_cal`` by the float model (static
    calibration, as in the calibration chapter), applied by a forward pre-hook.  With
    ``a_bits=w_bits`` each layer runs at W\\ *b*\\ A\\ *b*, the HAWQ convention.  See the
    mixed_precision chapter.
    """
    names = nn.linear_layers(model)
    wmap = _bits_map(w_bits, names, "w_bits")
    amap = None if a_bits is None else _bits_map(a_bits, names, "a_bits")
    act_qparams = {}
    if amap is not None and any(b != FLOAT_BITS for b in amap.values()):
        if X_cal is None:
            raise ValueError("a_bits needs calibration data: pass X_cal (a 2-D float array)")
        if not isinstance(X_cal, np.ndarray) or X_cal.dtype.kind != "f" or X_cal.ndim != 2:
            raise TypeError("X_cal must be a 2-D floating numpy.ndarray of calibration inputs")
        if X_cal.shape[0] == 0 or not np.all(np.isfinite(X_cal)):
            raise ValueError("X_cal must be non-empty and finite")
        wanted = [n for n in names if amap[n] != FLOAT_BITS]
        acts = capture_activations(model, X_cal, layers=wanted)
        for n in wanted:
            x = acts[n].input
            act_qparams[n] = qparams_from_range(float(x.min()), float(x.max()), bits=amap[n],
                                                signed=False, symmetric=False)
    quantized = {n: fake_quantize_weight(model[n].weight, wmap[n], per_channel=per_channel)
                 for n in names if wmap[n] != FLOAT_BITS}
    with swapped_weights(model, quantized), ExitStack() as hooks:
        for n, qp in act_qparams.items():
            hooks.enter_context(model[n].register_forward_pre_hook(_fake_quant_input(qp)))
        yield model


def _fake_quant_input(qp):
    """A forward pre-hook that fake-quantizes a layer's input with the fixed ``qp``."""
    def pre_hook(module, x):
        return fake_quantize(x, qp)
    return pre_hook


class LayerSensitivity(NamedTuple):
    """One layer quantized, the rest float: the ``loss`` and ``accuracy`` that result and their
    change from the float model (``delta_loss`` > 0 and ``delta_accuracy`` < 0 mean worse)."""

    layer: str
    bits: int
    loss: float
    accuracy: float
    delta_loss: float
    delta_accuracy: float


def layer_sensitivity(model, X, y, bits: int = 4, *, layers=None,
                      per_channel: bool = True) -> dict[str, LayerSensitivity]:
    r"""Quantize one layer at a time and measure what it costs.

    For each Linear layer :math:`l` (or those named in ``layers``): its weights go to ``bits``
    bits with :func:`fake_quantize_weight`, every other layer stays float, and

    .. math::

        \Delta L_l = L(\ldots, Q_b(W_l), \ldots) - L(\ldots, W_l, \ldots), \qquad
        \Delta \mathrm{acc}_l = \mathrm{acc}(\ldots, Q_b(W_l), \ldots) - \mathrm{acc}(\ldots)

    on ``(X, y)``.  The model is restored after each measurement.  This is the direct,
    "quantization sensitivity testing" way of ranking layers; :func:`hawq_omega` predicts the
    same ranking from curvature.  See the mixed_precision chapter.
    """
    names = nn.linear_layers(model)
    X, y = _check_data(X, y, model)
    bits = _bits_value(bits, "bits", allow_float=False, low=2)
    if layers is None:
        layers = names
    else:
        layers = check_sequence(layers, "layers")
        for n in layers:
            if n not in names:
                raise ValueError(f"layers names {n!r}, which is not a Linear layer of the model "
                                 f"{names}")
    base = evaluate(model, X, y)
    out = {}
    for n in layers:
        with temporarily_quantized(model, {n: bits}, per_channel=per_channel):
            ev = evaluate(model, X, y)
        out[n] = LayerSensitivity(n, bits, ev.loss, ev.accuracy, ev.loss - base.loss,
                                  ev.accuracy - base.accuracy)
    return out


class ConfigSweep(NamedTuple):
    """Every bit configuration of a model, evaluated: ``layers`` (names, in order), ``bits``
    (one row per configuration, one column per layer), ``size_bits`` (weight storage), and the
    ``loss`` and ``accuracy`` of the quantized model on the data."""

    layers: list
    bits: np.ndarray
    size_bits: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray

    def index(self, bits: Mapping) -> int:
        """Row of the configuration ``{layer: bits}``."""
        row = np.array([bits[n] for n in self.layers])
        hits = np.flatnonzero(np.all(self.bits == row, axis=1))
        if hits.size == 0:
            raise ValueError(f"configuration {dict(bits)} is not in the sweep")
        return int(hits[0])


def all_configurations(model, X, y, choices=(4, 8), *, a_bits=None, X_cal=None,
                       per_channel: bool = True, max_configs: int = 4096) -> ConfigSweep:
    """Quantize ``model`` in every one of the :math:`|\\mathcal{B}|^L` configurations of
    ``choices`` and evaluate each on ``(X, y)``: the ground truth that a bit-allocation method
    tries to find without trying everything.  Possible only for a small model (at most
    ``max_configs`` configurations).  ``a_bits="same"`` quantizes each layer's input at its
    weight width (W\\ *b*\\ A\\ *b*, calibrated on ``X_cal``); ``None`` keeps activations float.
    See the mixed_precision chapter.

    Bounds: ``max_configs`` in [1, 2**24]; bit widths in [2, 16].
    """
    names = nn.linear_layers(model)
    X, y = _check_data(X, y, model)
    choices = tuple(sorted(set(_bits_value(b, "each entry of choices", allow_float=True, low=2)
                               for b in check_sequence(choices, "choices"))))
    max_configs = check_int(max_configs, "max_configs", 1, _MAX_CONFIGS)
    if len(choices) ** len(names) > max_configs:
        raise ValueError(f"{len(choices)}^{len(names)} configurations exceed "
                         f"max_configs={max_configs}")
    if a_bits not in (None, "same"):
        raise ValueError(f"a_bits must be None or 'same', got {a_bits!r}")
    infos = nn.layer_info(model)
    configs = np.array(list(itertools.product(choices, repeat=len(names))), dtype=np.int64)
    # Quantize each (layer, bits) once; every configuration is then a choice among copies.
    qweights = {(n, b): (model[n].weight.copy() if b == FLOAT_BITS
                         else fake_quantize_weight(model[n].weight, b, per_channel=per_channel))
                for n in names for b in choices}
    act_qp = {}
    if a_bits == "same":
        if not isinstance(X_cal, np.ndarray) or X_cal.dtype.kind != "f" or X_cal.ndim != 2:
            raise TypeError("a_bits='same' needs X_cal, a 2-D floating numpy.ndarray")
        acts = capture_activations(model, X_cal, layers=names)
        for n in names:
            lo, hi = float(acts[n].input.min()), float(acts[n].input.max())
            for b in choices:
                if b != FLOAT_BITS:
                    act_qp[n, b] = qparams_from_range(lo, hi, bits=b, signed=False)
    current = dict.fromkeys(names, FLOAT_BITS)
    sizes, losses, accs = [], [], []

    def at_bits(n, b):
        """A with block in which layer n holds its b-bit weights (and quantizes its input)."""
        current[n] = b
        return swapped_weights(model, {n: qweights[n, b]})

    def input_hook(n):
        def pre_hook(module, x):
            b = current[n]
            return None if (n, b) not in act_qp else fake_quantize(x, act_qp[n, b])
        return pre_hook

    def record(logits):
        ev = Evaluation.from_logits(logits, y)
        sizes.append(model_size_bits(infos, dict(current)))
        losses.append(ev.loss)
        accs.append(ev.accuracy)

    with ExitStack() as hooks:
        for n in names:
            hooks.enter_context(model[n].register_forward_pre_hook(input_hook(n)))
        if model._forward_hooks or model._forward_pre_hooks:
            # hooks on the model itself: run it whole, configuration by configuration
            for row in configs:
                with ExitStack() as swaps:
                    for n, b in zip(names, row, strict=True):
                        swaps.enter_context(at_bits(n, int(b)))
                    record(model(X))
        else:
            # Depth first over the layers, in the order of itertools.product: the activations
            # entering layer k are computed once per choice of the layers before it and shared
            # by every configuration of the layers after it (3 + 9 + ... instead of 5 * 3^5
            # layer evaluations for five layers and three choices).  Each layer is called as
            # Sequential.forward calls it, hooks included, so the numbers are identical.
            starts = [model.names.index(n) for n in names] + [len(model.layers)]

            def run(first, last, x):
                for layer in model.layers[first:last]:
                    x = layer(x)
                return x

            def descend(k, x):
                if k == len(names):
                    record(x)
                    return
                for b in choices:
                    with at_bits(names[k], b):
                        descend(k + 1, run(starts[k], starts[k + 1], x))

            descend(0, run(0, starts[0], X))
    return ConfigSweep(names, configs, np.array(sizes, dtype=np.int64), np.array(losses),
                       np.array(accs))
