r"""Mixed precision: how many bits each layer gets, and how to decide.

The mixed_precision chapter (``book/mixed_precision.md``) explains everything in this module.
A network does not have to use one bit width everywhere: a layer whose loss surface is flat
can take 4-bit weights at little cost, a layer sitting in a sharp valley needs 8.  This module
measures that *sensitivity* in two ways and turns it into a bit allocation:

* **one layer at a time** (:func:`layer_sensitivity`): quantize the weights of one layer to
  ``b`` bits, keep every other layer in float, and measure the change in loss and accuracy;
* **second order** (HAWQ, Dong et al. 2019/2020, Yao et al. 2021): the Hessian of the loss with
  respect to a layer's weights, seen through Hessian-vector products (:func:`hvp`, exact or by
  central finite differences of the analytic gradient), its trace estimated by Hutchinson's
  method (:func:`hutchinson_trace`) or computed exactly for this small network
  (:func:`exact_hessian_trace`), and the sensitivity
  :math:`\Omega = \operatorname{tr}(H)/n \cdot \lVert Q(W) - W \rVert^2` (:func:`hawq_omega`).

Bit allocation under a size budget is a small knapsack: :func:`allocate_bits_exhaustive`
searches all :math:`K^L` configurations (exact, for small ``L``), :func:`allocate_bits_greedy`
demotes one layer at a time (for large ``L``).  :func:`model_size_bits` and :func:`bops` do the
accounting of the HAWQ tables (size of the weights; bit operations
:math:`\sum_l b_w^{(l)} b_a^{(l)} \mathrm{MACs}_l`), and :data:`HAWQ_RESNET50` holds the
published ResNet50 table that the chapter reproduces.

The curvature functions work on a :class:`qcourse.nn.Sequential` of ``Linear``, ``ReLU`` and
``ReLU6`` layers and compute in float64 on copies of the weights; the model is never modified.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    check_bool,
    check_int,
    check_int_sequence,
    check_labels,
    check_real,
    check_sequence,
    real_array,
)
from qcourse.affine import choose_qparams, fake_quantize, qparams_from_range
from qcourse.nn import Linear, Module, ReLU, ReLU6, Sequential, softmax, softmax_cross_entropy
from qcourse.nn.core import _check_model_input

__all__ = [
    "FLOAT_BITS",
    "HAWQ_RESNET50",
    "HAWQ_SOURCE",
    "Allocation",
    "ConfigSweep",
    "Evaluation",
    "HawqRow",
    "HutchinsonEstimate",
    "LayerInfo",
    "LayerSensitivity",
    "all_configurations",
    "allocate_bits_exhaustive",
    "allocate_bits_greedy",
    "bops",
    "evaluate_model",
    "exact_hessian_trace",
    "fake_quantize_weight",
    "hawq_omega",
    "hessian_matrix",
    "hutchinson_trace",
    "hvp",
    "layer_gradient",
    "layer_hessian_trace",
    "layer_info",
    "layer_loss_grad",
    "layer_sensitivity",
    "linear_layers",
    "mixed_precision_shares",
    "model_size_bits",
    "pareto_front",
    "temporarily_quantized",
    "scaled_size_bops",
    "spearman",
]

#: Bounds of the size-like arguments: the full Hessian's side (an n x n float64 matrix, 512 MiB
#: at 8192), Hutchinson samples, the configurations scored at once by the exhaustive search,
#: and the weights of one layer (so that sizes in bits stay exact in int64).
_MAX_HESSIAN_SIZE = 8192
_MAX_SAMPLES = 100_000
_MAX_CONFIGS = 2**24
_MAX_WEIGHTS = 2**40

#: Bit width that stands for "left in float" in the accounting (float32).
FLOAT_BITS = 32


# --------------------------------------------------------------------------- checks


def _check_model(model) -> Sequential:
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    return model


def _check_ops(model) -> list[tuple[str, Module]]:
    """The layers of ``model`` for the curvature functions: Linear, ReLU and ReLU6 only."""
    _check_model(model)
    ops = model.named_modules()
    for name, layer in ops:
        if not isinstance(layer, (Linear, ReLU)):
            raise TypeError(
                f"the curvature functions support Linear, ReLU and ReLU6 layers; layer "
                f"{name!r} is a {type(layer).__name__}"
            )
    if not isinstance(ops[-1][1], Linear):
        raise ValueError("the last layer of model must be Linear (it produces the logits)")
    return ops


def _check_layer(model: Sequential, layer) -> int:
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str), got {type(layer).__name__}")
    if layer not in model.names:
        raise ValueError(f"layer {layer!r} is not in the model; its layers are {model.names}")
    if not isinstance(model[layer], Linear):
        raise ValueError(
            f"layer {layer!r} is a {type(model[layer]).__name__}; only Linear layers have "
            f"weights to quantize (Linear layers: {linear_layers(model)})"
        )
    return model.names.index(layer)


def _check_data(X, y, model: Sequential) -> tuple[np.ndarray, np.ndarray]:
    X = _check_model_input(model, X, "X")
    y = check_labels(y, "y", X.shape[0])
    return X, y


def _check_direction(v, shape: tuple[int, ...], name: str = "v") -> np.ndarray:
    arr = np.asarray(v)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have the shape of the layer's weight {shape}, "
                         f"got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return arr


# --------------------------------------------------------------------------- layers and bits


def linear_layers(model) -> list[str]:
    """Names of the :class:`~qcourse.nn.Linear` layers of ``model``, in order: the layers whose
    weights get a bit width.  See the mixed_precision chapter."""
    _check_model(model)
    return [name for name, layer in model.named_modules() if isinstance(layer, Linear)]


class LayerInfo(NamedTuple):
    """What the accounting needs to know about one Linear layer.

    ``weights`` is the number of weights (``in_features * out_features``), ``bias`` the number
    of biases, ``macs`` the multiply-accumulates per example (also ``in_features *
    out_features``: each weight is used once per example).
    """

    name: str
    in_features: int
    out_features: int
    weights: int
    bias: int
    macs: int


def layer_info(model) -> list[LayerInfo]:
    """One :class:`LayerInfo` per Linear layer of ``model``, in order.  See the mixed_precision
    chapter."""
    out = []
    for name in linear_layers(model):
        lin = model[name]
        n = lin.in_features * lin.out_features
        out.append(LayerInfo(name, lin.in_features, lin.out_features, n, lin.out_features, n))
    return out


def _bits_value(value, name: str, *, allow_float: bool, low: int) -> int:
    """A bit width: an int in [low, 16], or FLOAT_BITS / None for float when allowed."""
    if value is None:
        if allow_float:
            return FLOAT_BITS
        raise ValueError(f"{name} must be a bit width, got None")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int bit width, got {type(value).__name__}")
    value = int(value)
    if value == FLOAT_BITS and allow_float:
        return value
    if not low <= value <= 16:
        extra = f" or {FLOAT_BITS}/None for float" if allow_float else ""
        raise ValueError(f"{name} must be between {low} and 16{extra}, got {value}")
    return value


def _bits_map(bits, names: Sequence[str], name: str, *, low: int = 2) -> dict[str, int]:
    """Normalize ``bits`` (one width for all layers, or a mapping layer -> width) to a dict over
    ``names``; layers missing from a mapping stay float (FLOAT_BITS)."""
    if isinstance(bits, Mapping):
        unknown = [k for k in bits if k not in names]
        if unknown:
            raise ValueError(f"{name} names {unknown}, which are not Linear layers of the model "
                             f"{list(names)}")
        return {n: _bits_value(bits.get(n), f"{name}[{n!r}]", allow_float=True, low=low)
                for n in names}
    value = _bits_value(bits, name, allow_float=True, low=low)
    return dict.fromkeys(names, value)


# --------------------------------------------------------------------------- quantizing weights


def fake_quantize_weight(weight, bits: int, *, per_channel: bool = True) -> np.ndarray:
    r"""Fake-quantize a weight matrix to ``bits`` bits, symmetric and signed.

    .. math::

        s_c = \frac{\max_j |W_{cj}|}{2^{b-1} - 1}, \qquad
        Q(W)_{cj} = s_c \cdot \operatorname{clamp}\big(\operatorname{round}(W_{cj} / s_c),
        -(2^{b-1} - 1), 2^{b-1} - 1\big)

    with one scale per output channel ``c`` (row of the ``(out, in)`` weight) when
    ``per_channel`` is true, one for the whole tensor otherwise; ``round`` is round half to
    even.  The grid is the narrow, symmetric one (int8: -127..127, int4: -7..7, int2: -1..1,
    i.e. ternary weights), the weight quantizer of HAWQ-V3 (symmetric, per channel).  Weights
    must be finite.  The result has the dtype of ``weight``.  See the mixed_precision chapter
    (and the affine chapter for the grid).
    """
    w = np.asarray(weight)
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a floating array, got dtype {w.dtype}")
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"weight must be a non-empty 2-D (out, in) array, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or Inf; expected finite values")
    bits = _bits_value(bits, "bits", allow_float=False, low=2)
    if not isinstance(per_channel, (bool, np.bool_)):
        raise TypeError(f"per_channel must be True or False, got {type(per_channel).__name__}")
    qp = choose_qparams(w, bits=bits, signed=True, symmetric=True, narrow_range=True,
                        axis=0 if per_channel else None)
    return fake_quantize(w, qp)


@contextmanager
def temporarily_quantized(model, w_bits, a_bits=None, *, X_cal=None,
                          per_channel: bool = True) -> Iterator[Sequential]:
    """Temporarily quantize ``model``: weights of each Linear layer, and optionally its input.

    ``w_bits`` is one bit width for every Linear layer or a mapping ``{layer: bits}``; layers
    missing from the mapping, or given ``None`` or 32, stay float.  Weights are replaced in
    place by :func:`fake_quantize_weight` and restored exactly when the block ends (even on error).

    ``a_bits`` (same forms; default ``None``: activations stay float) quantizes the *input* of
    each Linear layer, the activation its integer kernel would read: an unsigned asymmetric
    ``a_bits``-bit grid over the min-max range seen on ``X_cal`` by the float model (static
    calibration, as in the calibration chapter), applied by a forward pre-hook.  With
    ``a_bits=w_bits`` each layer runs at W\\ *b*\\ A\\ *b*, the HAWQ convention.  See the
    mixed_precision chapter.
    """
    names = linear_layers(model)
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
        from qcourse.nn import capture_activations

        wanted = [n for n in names if amap[n] != FLOAT_BITS]
        acts = capture_activations(model, X_cal, layers=wanted)
        for n in wanted:
            x = acts[n].input
            act_qparams[n] = qparams_from_range(float(x.min()), float(x.max()), bits=amap[n],
                                                signed=False, symmetric=False)
    saved = {n: model[n].weight.copy() for n in names if wmap[n] != FLOAT_BITS}
    handles = []
    try:
        for n in saved:
            model[n].weight[...] = fake_quantize_weight(saved[n], wmap[n], per_channel=per_channel)
        for n, qp in act_qparams.items():
            def pre_hook(module, x, qp=qp):
                return fake_quantize(x, qp)
            handles.append(model[n].register_forward_pre_hook(pre_hook))
        yield model
    finally:
        for h in handles:
            h.remove()
        for n, w in saved.items():
            model[n].weight[...] = w


class Evaluation(NamedTuple):
    """Mean softmax cross-entropy ``loss`` and ``accuracy`` (fraction correct) on a data set."""

    loss: float
    accuracy: float


def evaluate_model(model, X, y) -> Evaluation:
    """Loss and accuracy of ``model`` on ``(X, y)`` in one forward pass (hooks included).  See
    the mixed_precision chapter."""
    _check_model(model)
    X, y = _check_data(X, y, model)
    logits = model(X)
    loss, _ = softmax_cross_entropy(logits.astype(np.float64), y)
    return Evaluation(loss, float(np.mean(np.argmax(logits, axis=1) == y)))


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
    names = linear_layers(model)
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
    base = evaluate_model(model, X, y)
    out = {}
    for n in layers:
        with temporarily_quantized(model, {n: bits}, per_channel=per_channel):
            ev = evaluate_model(model, X, y)
        out[n] = LayerSensitivity(n, bits, ev.loss, ev.accuracy, ev.loss - base.loss,
                                  ev.accuracy - base.accuracy)
    return out


# --------------------------------------------------------------------------- curvature


class _Cache(NamedTuple):
    logits: np.ndarray
    inputs: list          # the input of every layer
    masks: list           # the ReLU masks (None for Linear layers)
    weights: list         # float64 weights (None for activations)


def _forward64(ops, X: np.ndarray, override: tuple[int, np.ndarray] | None = None) -> _Cache:
    """Float64 forward pass over ``ops``; ``override = (index, W)`` replaces one weight."""
    h = X.astype(np.float64)
    inputs, masks, weights = [], [], []
    for i, (_, layer) in enumerate(ops):
        inputs.append(h)
        if isinstance(layer, Linear):
            w = override[1] if override is not None and override[0] == i else \
                layer.weight.astype(np.float64)
            h = h @ w.T + layer.bias.astype(np.float64)
            masks.append(None)
            weights.append(w)
        elif isinstance(layer, ReLU6):
            m = (h > 0) & (h < 6)
            h = np.clip(h, 0.0, 6.0)
            masks.append(m)
            weights.append(None)
        else:  # ReLU
            m = h > 0
            h = np.where(m, h, 0.0)
            masks.append(m)
            weights.append(None)
    return _Cache(h, inputs, masks, weights)


def _back_to(ops, cache: _Cache, g: np.ndarray, idx: int) -> np.ndarray:
    """Push ``g`` (a gradient w.r.t. the logits) back to the output of layer ``idx``."""
    for i in range(len(ops) - 1, idx, -1):
        if cache.weights[i] is not None:
            g = g @ cache.weights[i]
        else:
            g = g * cache.masks[i]
    return g


def _tangent_from(ops, cache: _Cache, dz: np.ndarray, idx: int) -> np.ndarray:
    """Push a perturbation ``dz`` of layer ``idx``'s output forward to the logits (masks fixed)."""
    for i in range(idx + 1, len(ops)):
        if cache.weights[i] is not None:
            dz = dz @ cache.weights[i].T
        else:
            dz = dz * cache.masks[i]
    return dz


def _ce_hessian_times(p: np.ndarray, dlogits: np.ndarray) -> np.ndarray:
    r"""Per row :math:`(\mathrm{diag}(p) - p p^T)\, d / n`: the Hessian of the mean
    cross-entropy with respect to the logits, applied to ``dlogits``."""
    pd = p * dlogits
    return (pd - p * pd.sum(axis=1, keepdims=True)) / p.shape[0]


def layer_loss_grad(model, layer: str, X, y, *, weight=None) -> tuple[float, np.ndarray]:
    r"""Mean cross-entropy and its gradient with respect to one layer's weights, in float64.

    .. math::

        \frac{\partial L}{\partial W_l} = g_l^T x_l,

    with :math:`x_l` the layer's input and :math:`g_l` the gradient of the loss with respect to
    its output (backpropagated from :math:`\partial L/\partial z = (\mathrm{softmax}(z) -
    \mathrm{onehot}(y))/n` through the ReLU masks and the weights above it), the same formula as
    ``Linear.backward``.  ``weight`` (optional) evaluates at another value of :math:`W_l`; the
    model is not modified.  Hooks on the model are ignored.  See the mixed_precision chapter.
    """
    ops = _check_ops(model)
    idx = _check_layer(model, layer)
    X, y = _check_data(X, y, model)
    override = None
    if weight is not None:
        override = (idx, _check_direction(weight, model[layer].weight.shape, "weight"))
    cache = _forward64(ops, X, override)
    loss, dlogits = softmax_cross_entropy(cache.logits, y)
    g = _back_to(ops, cache, dlogits, idx)
    return loss, g.T @ cache.inputs[idx]


def layer_gradient(weight, model, layer: str, X, y) -> np.ndarray:
    r""":math:`\nabla_{W_l} L` at ``W_l = weight``, in the ``f(x, *args)`` convention of optimizers
    and finite-difference routines: the weight first, the rest fixed.

    The same gradient as :func:`layer_loss_grad` (``layer_loss_grad(model, layer, X, y,
    weight=weight)[1]``).  ``functools.partial(layer_gradient, model=model, layer=layer, X=X,
    y=y)`` is then a function of the weight alone, which can be pickled (the exercises pass it
    to a learner's finite-difference code).  See the mixed_precision chapter.
    """
    return layer_loss_grad(model, layer, X, y, weight=weight)[1]


class _Curvature:
    """Forward caches of one (model, layer, data) triple, reused by many Hessian products."""

    def __init__(self, model, layer: str, X, y):
        self.ops = _check_ops(model)
        self.idx = _check_layer(model, layer)
        self.X, self.y = _check_data(X, y, model)
        self.shape = model[layer].weight.shape
        self.cache = _forward64(self.ops, self.X)
        self.p = softmax(self.cache.logits)
        if self.y.size and self.y.max() >= self.p.shape[1]:
            raise ValueError(f"y holds label {int(self.y.max())} but the model has only "
                             f"{self.p.shape[1]} outputs")

    def hvp_exact(self, v: np.ndarray) -> np.ndarray:
        x = self.cache.inputs[self.idx]
        dlogits = _tangent_from(self.ops, self.cache, x @ v.T, self.idx)
        u = _ce_hessian_times(self.p, dlogits)
        return _back_to(self.ops, self.cache, u, self.idx).T @ x

    def grad_at(self, w: np.ndarray) -> np.ndarray:
        cache = _forward64(self.ops, self.X, (self.idx, w))
        _, dlogits = softmax_cross_entropy(cache.logits, self.y)
        return _back_to(self.ops, cache, dlogits, self.idx).T @ cache.inputs[self.idx]

    def hvp_fd(self, v: np.ndarray, step: float) -> np.ndarray:
        w = self.cache.weights[self.idx]
        vnorm = float(np.linalg.norm(v))
        if vnorm == 0:
            return np.zeros_like(v)
        h = step * max(1.0, float(np.linalg.norm(w))) / vnorm
        return (self.grad_at(w + h * v) - self.grad_at(w - h * v)) / (2 * h)


def hvp(model, layer: str, X, y, v, *, method: str = "exact", step: float = 1e-5) -> np.ndarray:
    r"""Hessian-vector product :math:`H v` of the mean cross-entropy with respect to one layer's
    weights :math:`W_l` (``v`` has the weight's shape; so does the result).

    ``method="exact"`` (an R-operator, Pearlmutter 1994): with the ReLU masks of the current
    point fixed, the logits are *linear* in :math:`W_l`, so the Hessian is exactly
    :math:`J^T H_z J`, with :math:`J` the Jacobian of the logits and
    :math:`H_z = (\mathrm{diag}(p) - p p^T)/n` per example.  One forward pass of the tangent
    :math:`J v` (input :math:`x_l v^T`, then through the masks and weights above), one
    multiplication by :math:`H_z`, one backward pass: no approximation.

    ``method="fd"``: central finite differences of the analytic gradient
    (:func:`layer_loss_grad`),

    .. math::

        H v \approx \frac{\nabla L(W_l + h v) - \nabla L(W_l - h v)}{2 h}, \qquad
        h = \mathtt{step} \cdot \frac{\max(1, \lVert W_l \rVert_F)}{\lVert v \rVert_F},

    so the weights move by ``step`` (default :math:`10^{-5}`) relative to their norm: near the
    cube root of float64's epsilon, which balances the :math:`O(h^2)` truncation error against
    the :math:`O(\epsilon / h)` rounding error; a step that makes a ReLU change sign adds an
    error of its own, which a small step makes rare.  The Hessian is with respect to the
    weights only (not the bias), at the model's current parameters, on ``(X, y)``.  See the
    mixed_precision chapter.
    """
    if method not in ("exact", "fd"):
        raise ValueError(f"method must be 'exact' or 'fd', got {method!r}")
    step = check_real(step, "step", 0, lo_open=True)
    curv = _Curvature(model, layer, X, y)
    v = _check_direction(v, curv.shape)
    return curv.hvp_exact(v) if method == "exact" else curv.hvp_fd(v, step)


def hessian_matrix(model, layer: str, X, y, *, method: str = "exact", step: float = 1e-5,
                   max_size: int = 4096) -> np.ndarray:
    """The full Hessian of the loss with respect to one layer's weights, column by column.

    Column ``i`` is :func:`hvp` of the ``i``-th unit vector, with the weight flattened in
    row-major (C) order, so the result is ``(n, n)`` for ``n = out * in`` weights.  Meant for
    tiny layers (checks and exercises): ``n`` above ``max_size`` raises ``ValueError``.  See the
    mixed_precision chapter.

    Bounds: ``max_size`` in [1, 8192] (the Hessian is ``max_size`` squared float64 values).
    """
    if method not in ("exact", "fd"):
        raise ValueError(f"method must be 'exact' or 'fd', got {method!r}")
    step = check_real(step, "step", 0, lo_open=True)
    max_size = check_int(max_size, "max_size", 1, _MAX_HESSIAN_SIZE)
    curv = _Curvature(model, layer, X, y)
    n = int(np.prod(curv.shape))
    if n > max_size:
        raise ValueError(f"layer {layer!r} has {n} weights, more than max_size={max_size}; "
                         f"use hvp or hutchinson_trace instead of the full Hessian")
    H = np.empty((n, n))
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        e = e.reshape(curv.shape)
        col = curv.hvp_exact(e) if method == "exact" else curv.hvp_fd(e, step)
        H[:, i] = col.ravel()
    return H


class HutchinsonEstimate(NamedTuple):
    """A Hutchinson trace estimate: the mean ``trace`` of the ``samples``
    :math:`v_i^T H v_i`, and its standard error (sample standard deviation over
    :math:`\\sqrt{m}`)."""

    trace: float
    std_error: float
    samples: np.ndarray


def hutchinson_trace(matvec: Callable[[np.ndarray], np.ndarray], shape, n_samples: int = 64,
                     seed: int = 0) -> HutchinsonEstimate:
    r"""Hutchinson's estimator of :math:`\operatorname{tr}(H)` from products :math:`H v` only.

    .. math::

        \operatorname{tr}(H) = \mathbb{E}_v\!\left[v^T H v\right]
        \approx \frac{1}{m} \sum_{i=1}^{m} v_i^T H v_i ,

    with :math:`v_i` of the given ``shape`` and independent Rademacher entries (:math:`\pm 1`
    with probability 1/2 each, drawn as ``2 * rng.integers(0, 2, shape) - 1`` from
    ``np.random.default_rng(seed)``, one vector after another).  Unbiased because
    :math:`\mathbb{E}[v_j v_k] = [j = k]`; for a symmetric :math:`H` each sample has variance
    :math:`2 \sum_{j \ne k} H_{jk}^2` (the diagonal contributes none: :math:`v_j^2 = 1`), so the
    standard error falls as :math:`1/\sqrt{m}`.  Hutchinson (1989).  See the mixed_precision
    chapter.

    Bounds: ``n_samples`` in [1, 100000]; ``shape`` at most 2**28 elements.
    """
    if not callable(matvec):
        raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    shape = check_int_sequence(shape, "shape", 1, MAX_ELEMENTS)
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"shape must have at most {MAX_ELEMENTS} elements, got {shape}")
    n_samples = check_int(n_samples, "n_samples", 1, _MAX_SAMPLES)
    seed = check_int(seed, "seed", 0)
    rng = np.random.default_rng(seed)
    samples = np.empty(n_samples)
    for i in range(n_samples):
        v = (2 * rng.integers(0, 2, size=shape) - 1).astype(np.float64)
        hv = np.asarray(matvec(v), dtype=np.float64)
        if hv.shape != shape:
            raise ValueError(f"matvec returned shape {hv.shape}, expected {shape}")
        samples[i] = float(np.sum(v * hv))
    err = float(np.std(samples, ddof=1) / np.sqrt(n_samples)) if n_samples > 1 else float("nan")
    return HutchinsonEstimate(float(samples.mean()), err, samples)


def layer_hessian_trace(model, layer: str, X, y, *, n_samples: int = 64,
                        seed: int = 0) -> HutchinsonEstimate:
    """Hutchinson estimate of the trace of the Hessian of the loss with respect to one layer's
    weights, with exact Hessian-vector products (:func:`hvp`, ``method="exact"``).  The forward
    pass is done once and shared by all ``n_samples`` products.  See the mixed_precision
    chapter.

    Bounds: ``n_samples`` in [1, 100000].
    """
    curv = _Curvature(model, layer, X, y)
    return hutchinson_trace(curv.hvp_exact, curv.shape, n_samples, seed)


def exact_hessian_trace(model, layer: str, X, y) -> float:
    r"""The exact trace of the Hessian with respect to one layer's weights.

    With the ReLU masks fixed, the logits of example :math:`i` depend on :math:`W_l` through
    :math:`z_i = B_i W_l x_i` (:math:`B_i` = the Jacobian of the logits with respect to the
    layer's output), so the Hessian is :math:`\frac{1}{n}\sum_i (B_i^T S_i B_i) \otimes
    (x_i x_i^T)` with :math:`S_i = \mathrm{diag}(p_i) - p_i p_i^T`, and

    .. math::

        \operatorname{tr}(H) = \frac{1}{n} \sum_i \lVert x_i \rVert^2 \,
        \operatorname{tr}(B_i^T S_i B_i).

    :math:`B_i` is found with one backward pass per class.  This is what a small network
    allows and a large one does not (the rows of :math:`B` are as many as the classes, the
    Kronecker structure holds for one layer of a network like this); it checks
    :func:`layer_hessian_trace`.  See the mixed_precision chapter.
    """
    curv = _Curvature(model, layer, X, y)
    n, k = curv.p.shape
    x = curv.cache.inputs[curv.idx]
    # B[:, c, :] = d logit_c / d (layer output), for every example
    B = np.stack([_back_to(curv.ops, curv.cache, np.tile(np.eye(k)[c], (n, 1)), curv.idx)
                  for c in range(k)], axis=1)
    # tr(B^T S B) = sum_c p_c |B_c|^2 - |p^T B|^2
    pb = np.einsum("nc,nco->no", curv.p, B)
    tr_bsb = np.einsum("nc,nco->n", curv.p, B * B) - np.sum(pb * pb, axis=1)
    return float(np.sum(np.sum(x * x, axis=1) * tr_bsb) / n)


def hawq_omega(trace, weight, bits: int, *, per_channel: bool = True) -> float:
    r"""HAWQ's sensitivity of one layer at ``bits`` bits:

    .. math::

        \Omega_l(b) = \frac{\operatorname{tr}(H_l)}{n_l} \,
        \lVert Q_b(W_l) - W_l \rVert_2^2 ,

    the average curvature of the loss along the layer's :math:`n_l` weights times the squared
    size of the perturbation that quantization makes (Dong et al. 2020, HAWQ-V2; Yao et al.
    2021, HAWQ-V3).  It is the second-order term :math:`\tfrac12 \delta^T H \delta` of the loss
    change (up to the factor 1/2) with :math:`H` replaced by its average eigenvalue, which is
    exact in expectation when the direction of :math:`\delta` is random.  ``trace`` is
    :math:`\operatorname{tr}(H_l)` (from :func:`layer_hessian_trace` or
    :func:`exact_hessian_trace`), ``weight`` the float weights, quantized with
    :func:`fake_quantize_weight`.  See the mixed_precision chapter.
    """
    trace = check_real(trace, "trace")
    w = np.asarray(weight)
    if w.dtype.kind != "f" or not np.all(np.isfinite(w)):
        raise TypeError("weight must be a finite floating array")
    w = w.astype(np.float64)
    err = fake_quantize_weight(w, bits, per_channel=per_channel) - w
    return trace / w.size * float(np.sum(err * err))


# --------------------------------------------------------------------------- accounting


def _check_infos(infos) -> list[LayerInfo]:
    infos = check_sequence(infos, "infos")
    if not infos or not all(isinstance(i, LayerInfo) for i in infos):
        raise TypeError("infos must be a non-empty list of LayerInfo (from layer_info(model))")
    return infos


def model_size_bits(infos, w_bits, *, overhead: bool = False, per_channel: bool = True) -> int:
    r"""Storage of the weights, in bits: :math:`\sum_l n_l\, b_w^{(l)}`.

    ``infos`` comes from :func:`layer_info`; ``w_bits`` is one width for all layers or a
    mapping ``{layer: bits}`` (missing layers, ``None`` and 32 mean float32; widths 1 to 16).
    This is the "Size" column of the HAWQ tables (weights only).  With ``overhead=True`` the
    count adds what an integer model also stores: a 32-bit bias per output, and a 32-bit scale
    per output channel (``per_channel``) or per tensor for every quantized layer.  See the
    mixed_precision chapter.
    """
    infos = _check_infos(infos)
    bmap = _bits_map(w_bits, [i.name for i in infos], "w_bits", low=1)
    overhead = check_bool(overhead, "overhead")
    per_channel = check_bool(per_channel, "per_channel")
    total = sum(i.weights * bmap[i.name] for i in infos)
    if overhead:
        for i in infos:
            total += 32 * i.bias
            if bmap[i.name] != FLOAT_BITS:
                total += 32 * (i.out_features if per_channel else 1)
    return int(total)


def bops(infos, w_bits, a_bits=None) -> int:
    r"""Bit operations per example: :math:`\sum_l b_w^{(l)}\, b_a^{(l)}\, \mathrm{MACs}_l`.

    A multiply-accumulate of a :math:`b_w`-bit weight by a :math:`b_a`-bit activation counts as
    :math:`b_w b_a` bit operations (the area of a multiplier grows with the product of its
    operand widths), the measure of the BOPS column of the HAWQ tables.  ``a_bits=None``
    gives each layer's activation the bit width of its weights (W\ *b*\ A\ *b*, the HAWQ
    convention); otherwise the same forms as ``w_bits`` (float = 32).  See the mixed_precision
    chapter.
    """
    infos = _check_infos(infos)
    names = [i.name for i in infos]
    wmap = _bits_map(w_bits, names, "w_bits", low=1)
    amap = wmap if a_bits is None else _bits_map(a_bits, names, "a_bits", low=1)
    return int(sum(i.macs * wmap[i.name] * amap[i.name] for i in infos))


# --------------------------------------------------------------------------- allocation


class Allocation(NamedTuple):
    """A bit width per layer (``bits``), its total ``cost`` (sum of the per-layer costs), its
    weight storage ``size_bits``, and how many configurations the search ``evaluated``."""

    bits: dict
    cost: float
    size_bits: int
    evaluated: int


def _allocation_problem(costs, n_weights, budget_bits, choices):
    if not isinstance(costs, Mapping) or not costs:
        raise TypeError("costs must be a non-empty mapping {layer: {bits: cost}}")
    if not isinstance(n_weights, Mapping):
        raise TypeError("n_weights must be a mapping {layer: number of weights}")
    names = list(costs)
    if set(n_weights) != set(names):
        raise ValueError(f"n_weights must have the layers of costs {names}, got {list(n_weights)}")
    choices = tuple(sorted(set(_bits_value(b, "each entry of choices", allow_float=True, low=1)
                               for b in check_sequence(choices, "choices"))))
    if not choices:
        raise ValueError("choices must list at least one bit width")
    C = np.empty((len(names), len(choices)))
    S = np.empty((len(names), len(choices)), dtype=np.int64)
    for i, n in enumerate(names):
        row = costs[n]
        if not isinstance(row, Mapping):
            raise TypeError(f"costs[{n!r}] must be a mapping {{bits: cost}}")
        missing = [b for b in choices if b not in row]
        if missing:
            raise ValueError(f"costs[{n!r}] has no cost for bits {missing} (choices {choices})")
        for j, b in enumerate(choices):
            C[i, j] = check_real(row[b], f"costs[{n!r}][{b}]")
        S[i] = check_int(n_weights[n], f"n_weights[{n!r}]", 1, _MAX_WEIGHTS) * np.array(choices)
    budget_bits = check_int(budget_bits, "budget_bits", 0, 2**62)
    smallest = int(S[:, 0].sum())
    if budget_bits < smallest:
        raise ValueError(
            f"budget_bits={budget_bits} is below the smallest possible size {smallest} "
            f"(every layer at {choices[0]} bits)"
        )
    return names, choices, C, S, budget_bits


def allocate_bits_exhaustive(costs, n_weights, budget_bits: int, choices=(4, 8),
                             max_configs: int = 2**20) -> Allocation:
    r"""The exact optimum of the bit-allocation problem, by trying every configuration.

    .. math::

        \min_{b_1, \ldots, b_L \in \mathcal{B}} \sum_l c_l(b_l)
        \quad \text{subject to} \quad \sum_l n_l b_l \le \text{budget}

    ``costs[layer][bits]`` is :math:`c_l(b)` (e.g. :func:`hawq_omega`, or a measured loss
    increase), ``n_weights[layer]`` is :math:`n_l`, ``choices`` is :math:`\mathcal{B}`.  All
    :math:`|\mathcal{B}|^L` configurations are scored at once with NumPy (at most
    ``max_configs`` of them); among the feasible ones the lowest cost wins, ties going to the
    smaller size, then to the first in enumeration order.  For large ``L`` use
    :func:`allocate_bits_greedy` (or an integer linear program, as HAWQ-V3 does).  See the
    mixed_precision chapter.

    Bounds: ``max_configs`` in [1, 2**24], each ``n_weights`` in [1, 2**40], ``budget_bits``
    in [0, 2**62].
    """
    names, choices, C, S, budget = _allocation_problem(costs, n_weights, budget_bits, choices)
    L, K = C.shape
    max_configs = check_int(max_configs, "max_configs", 1, _MAX_CONFIGS)
    if K**L > max_configs:
        raise ValueError(f"{K}^{L} = {K**L} configurations exceed max_configs={max_configs}; "
                         f"use allocate_bits_greedy for this many layers")
    idx = np.array(list(itertools.product(range(K), repeat=L)), dtype=np.int64).reshape(-1, L)
    rows = np.arange(L)
    total_cost = C[rows, idx].sum(axis=1)
    total_size = S[rows, idx].sum(axis=1)
    feasible = np.flatnonzero(total_size <= budget)
    order = np.lexsort((feasible, total_size[feasible], total_cost[feasible]))
    best = feasible[order[0]]
    bits = {n: choices[k] for n, k in zip(names, idx[best], strict=True)}
    return Allocation(bits, float(total_cost[best]), int(total_size[best]), int(idx.shape[0]))


def allocate_bits_greedy(costs, n_weights, budget_bits: int, choices=(4, 8)) -> Allocation:
    r"""A greedy bit allocation: start with every layer at the widest choice, then, while the
    model is over budget, lower one layer by one step, choosing the move with the smallest
    cost increase per bit saved,

    .. math::

        \arg\min_l \frac{c_l(b_l^-) - c_l(b_l)}{n_l (b_l - b_l^-)} .

    It needs :math:`O(L^2 |\mathcal{B}|)` evaluations instead of :math:`|\mathcal{B}|^L`, and
    is not always optimal: the last layer it lowers may save far more than needed, where a
    smaller layer would have done (a knapsack is not solved by ratios).  Ties go to the earlier
    layer.  Same arguments as :func:`allocate_bits_exhaustive`.  See the mixed_precision
    chapter.

    Bounds: each ``n_weights`` in [1, 2**40], ``budget_bits`` in [0, 2**62].
    """
    names, choices, C, S, budget = _allocation_problem(costs, n_weights, budget_bits, choices)
    L, K = C.shape
    level = np.full(L, K - 1)
    evaluated = 1
    while S[np.arange(L), level].sum() > budget:
        best, best_ratio = -1, np.inf
        for i in range(L):
            if level[i] == 0:
                continue
            evaluated += 1
            ratio = (C[i, level[i] - 1] - C[i, level[i]]) / (S[i, level[i]] - S[i, level[i] - 1])
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        level[best] -= 1
    rows = np.arange(L)
    bits = {n: choices[k] for n, k in zip(names, level, strict=True)}
    return Allocation(bits, float(C[rows, level].sum()), int(S[rows, level].sum()), evaluated)


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
    names = linear_layers(model)
    X, y = _check_data(X, y, model)
    choices = tuple(sorted(set(_bits_value(b, "each entry of choices", allow_float=True, low=2)
                               for b in check_sequence(choices, "choices"))))
    max_configs = check_int(max_configs, "max_configs", 1, _MAX_CONFIGS)
    if len(choices) ** len(names) > max_configs:
        raise ValueError(f"{len(choices)}^{len(names)} configurations exceed "
                         f"max_configs={max_configs}")
    if a_bits not in (None, "same"):
        raise ValueError(f"a_bits must be None or 'same', got {a_bits!r}")
    infos = layer_info(model)
    configs = np.array(list(itertools.product(choices, repeat=len(names))), dtype=np.int64)
    # Quantize each (layer, bits) once; every configuration is then a choice among copies.
    qweights = {(n, b): (model[n].weight if b == FLOAT_BITS
                         else fake_quantize_weight(model[n].weight, b, per_channel=per_channel))
                for n in names for b in choices}
    act_qp = {}
    if a_bits == "same":
        if not isinstance(X_cal, np.ndarray) or X_cal.dtype.kind != "f" or X_cal.ndim != 2:
            raise TypeError("a_bits='same' needs X_cal, a 2-D floating numpy.ndarray")
        from qcourse.nn import capture_activations

        acts = capture_activations(model, X_cal, layers=names)
        for n in names:
            lo, hi = float(acts[n].input.min()), float(acts[n].input.max())
            for b in choices:
                if b != FLOAT_BITS:
                    act_qp[n, b] = qparams_from_range(lo, hi, bits=b, signed=False)
    saved = {n: model[n].weight.copy() for n in names}
    current = dict.fromkeys(names, FLOAT_BITS)
    handles = []
    sizes, losses, accs = [], [], []
    try:
        for n in names:
            def pre_hook(module, x, n=n):
                b = current[n]
                return None if (n, b) not in act_qp else fake_quantize(x, act_qp[n, b])
            handles.append(model[n].register_forward_pre_hook(pre_hook))

        def use(n, b):
            current[n] = b
            model[n].weight[...] = qweights[n, b] if b != FLOAT_BITS else saved[n]

        def record(logits):
            loss, _ = softmax_cross_entropy(logits.astype(np.float64), y)
            sizes.append(model_size_bits(infos, dict(current)))
            losses.append(loss)
            accs.append(float(np.mean(np.argmax(logits, axis=1) == y)))

        if model._forward_hooks or model._forward_pre_hooks:
            # hooks on the model itself: run it whole, configuration by configuration
            for row in configs:
                for n, b in zip(names, row, strict=True):
                    use(n, int(b))
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
                    use(names[k], b)
                    descend(k + 1, run(starts[k], starts[k + 1], x))

            descend(0, run(0, starts[0], X))
    finally:
        for h in handles:
            h.remove()
        for n, w in saved.items():
            model[n].weight[...] = w
    return ConfigSweep(names, configs, np.array(sizes, dtype=np.int64), np.array(losses),
                       np.array(accs))


# --------------------------------------------------------------------------- curves and ranks


def pareto_front(sizes, scores) -> np.ndarray:
    """Indices of the points on the size-score Pareto front, by increasing size.

    A point is on the front when no other point is at most as large *and* scores at least as
    high with one of the two strictly better.  Of identical points the first is kept.  See the
    mixed_precision chapter.
    """
    s = real_array(sizes, "sizes", ndim=1)
    a = real_array(scores, "scores", ndim=1)
    if s.shape != a.shape:
        raise ValueError(f"sizes and scores must be non-empty 1-D arrays of one length, got "
                         f"shapes {s.shape} and {a.shape}")
    keep = []
    for i in range(s.size):
        dominated = np.any((s <= s[i]) & (a >= a[i]) & ((s < s[i]) | (a > a[i])))
        duplicate = np.any((s[:i] == s[i]) & (a[:i] == a[i]))
        if not dominated and not duplicate:
            keep.append(i)
    keep = np.array(keep, dtype=np.int64)
    return keep[np.argsort(s[keep], kind="stable")]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    r"""Spearman's rank correlation: the Pearson correlation of the ranks (ties get the average
    of the ranks they span), :math:`+1` when ``b`` orders the items exactly as ``a`` does,
    :math:`-1` when exactly reversed.  Used to compare Hessian and one-at-a-time rankings of
    layers.  See the mixed_precision chapter."""
    a = real_array(a, "a", ndim=1)
    b = real_array(b, "b", ndim=1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must be 1-D of one length >= 2, got shapes {a.shape} and "
                         f"{b.shape}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    if denom == 0:
        raise ValueError(f"{'a' if np.all(ra == 0) else 'b'} must not have all values equal: "
                         f"Spearman's correlation is undefined then")
    return float(np.sum(ra * rb) / denom)


# --------------------------------------------------------------------------- the HAWQ table


class HawqRow(NamedTuple):
    """One row of the HAWQ-V3 ResNet50 table: ``method``; integer-only (``int_only``) and
    uniform (``uniform``) quantization; the method's own float baseline top-1
    (``baseline_top1``, %); ``precision`` (W\\ *b*\\ A\\ *b*); ``size_mb`` (weights, MB);
    ``gbops`` (G bit operations per image); quantized ``top1`` (%)."""

    method: str
    int_only: bool
    uniform: bool
    baseline_top1: float
    precision: str
    size_mb: float
    gbops: float
    top1: float


#: Where :data:`HAWQ_RESNET50` comes from.
HAWQ_SOURCE = ("Yao et al., 2021, 'HAWQ-V3: Dyadic Neural Network Quantization', ICML, the "
               "ResNet50 results on ImageNet, as reproduced in the EE-508 course slides "
               "('Hessian Aware trace-Weighted Quantization, Results: ResNet50')")

#: The published ResNet50 table (ImageNet top-1), rows in the order of the source.
HAWQ_RESNET50 = (
    HawqRow("Baseline", True, True, 77.72, "W32A32", 97.8, 3951, 77.72),
    HawqRow("Integer Only (Jacob et al., 2018)", True, True, 76.40, "W8A8", 24.5, 247, 74.90),
    HawqRow("RVQuant (Park et al., 2018)", False, False, 75.92, "W8A8", 24.5, 247, 75.67),
    HawqRow("HAWQ-V3", True, True, 77.72, "W8A8", 24.5, 247, 77.58),
    HawqRow("PACT (Choi et al., 2018)", False, True, 76.90, "W5A5", 16.0, 101, 76.70),
    HawqRow("LQ-Nets (Zhang et al., 2018)", False, False, 76.50, "W4A32", 13.1, 486, 76.40),
    HawqRow("RVQuant (Park et al., 2018)", False, False, 75.92, "W5A5", 16.0, 101, 75.60),
    HawqRow("HAQ (Wang et al., 2019)", False, False, 76.15, "WMPA32", 9.62, 520, 75.48),
    HawqRow("OneBitwidth (Chin et al., 2020)", False, True, 76.70, "W1*A8", 12.3, 494, 76.70),
    HawqRow("HAWQ-V3", True, True, 77.72, "W4/8A4/8", 18.7, 154, 75.39),
    HawqRow("HAWQ-V3 + DIST", True, True, 77.72, "W4/8A4/8", 18.7, 154, 76.73),
)


def scaled_size_bops(base_size: float, base_bops: float, w_bits: int, a_bits: int
                     ) -> tuple[float, float]:
    r"""Size and BOPs of a uniformly quantized model from those of its float32 baseline:

    .. math::

        \text{size} = \text{size}_{32} \cdot \frac{b_w}{32}, \qquad
        \text{BOPs} = \text{BOPs}_{32 \times 32} \cdot \frac{b_w\, b_a}{32 \cdot 32},

    exact when every layer uses the same widths (the size counts weights only).  See the
    mixed_precision chapter.
    """
    base_size = check_real(base_size, "base_size", 0, lo_open=True)
    base_bops = check_real(base_bops, "base_bops", 0, lo_open=True)
    w = _bits_value(w_bits, "w_bits", allow_float=True, low=1)
    a = _bits_value(a_bits, "a_bits", allow_float=True, low=1)
    return base_size * w / FLOAT_BITS, base_bops * w * a / FLOAT_BITS**2


def mixed_precision_shares(size: float, bops_: float, base_size: float, base_bops: float,
                           low: int = 4, high: int = 8) -> tuple[float, float]:
    r"""Invert the accounting of a W\ *low*/*high* A\ *low*/*high* model: the share of the weights
    kept at ``high`` bits and the share of the MACs run at W\ *high* A\ *high*.

    If a fraction :math:`f` of the weights is at ``high`` bits and the rest at ``low``,
    :math:`\text{size}/\text{size}_{32} = (\text{low} + (\text{high} - \text{low}) f)/32`; if
    a fraction :math:`g` of the MACs runs at W\ *high* A\ *high* and the rest at W\ *low*
    A\ *low*, :math:`\text{BOPs}/\text{BOPs}_{32} = (\text{low}^2 + (\text{high}^2 -
    \text{low}^2) g)/32^2`.  Returns ``(f, g)``; values outside [0, 1] mean the numbers do not
    fit that model (``ValueError`` is not raised: the caller decides).  See the mixed_precision
    chapter.
    """
    size = check_real(size, "size", 0, lo_open=True)
    bops_ = check_real(bops_, "bops_", 0, lo_open=True)
    base_size = check_real(base_size, "base_size", 0, lo_open=True)
    base_bops = check_real(base_bops, "base_bops", 0, lo_open=True)
    low = _bits_value(low, "low", allow_float=False, low=1)
    high = _bits_value(high, "high", allow_float=False, low=1)
    if high <= low:
        raise ValueError(f"high must be > low, got low={low}, high={high}")
    f = (FLOAT_BITS * size / base_size - low) / (high - low)
    g = (FLOAT_BITS**2 * bops_ / base_bops - low**2) / (high**2 - low**2)
    return float(f), float(g)
