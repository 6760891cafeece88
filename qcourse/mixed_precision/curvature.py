r"""Sensitivity, predicted from curvature: HAWQ's Hessian trace and the Omega it gives.

The Hessian of the loss with respect to one layer's weights, seen through Hessian-vector
products (:func:`hvp`, exact or by central finite differences of the analytic gradient
:func:`layer_loss_grad`), its trace estimated by Hutchinson's method (:func:`hutchinson_trace`,
:func:`layer_hessian_trace`) or computed exactly for this small network
(:func:`exact_hessian_trace`), and :math:`\Omega = \operatorname{tr}(H)/n \cdot \lVert Q(W) - W
\rVert^2` (:func:`hawq_omega`).  Computed in float64 on copies of the weights; the model is
never modified.  Re-exported by :mod:`qcourse.mixed_precision`; see the mixed_precision chapter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    check_int,
    check_int_sequence,
    check_real,
    check_sequence,
)
from qcourse.mixed_precision.allocation import (
    _check_data,
    _check_direction,
    _check_layer,
    _check_ops,
)
from qcourse.mixed_precision.sensitivity import fake_quantize_weight
from qcourse.nn import (
    Linear,
    ReLU6,
    one_blas_thread,
    softmax,
    softmax_cross_entropy,
)

__all__ = [
    "HutchinsonEstimate",
    "exact_hessian_trace",
    "hawq_omega",
    "hessian_matrix",
    "hutchinson_trace",
    "hvp",
    "layer_gradient",
    "layer_hessian_trace",
    "layer_loss_grad",
    "network_hessian_traces",
]

#: Bounds of the size-like arguments: the full Hessian's side (an n x n float64 matrix, 512 MiB
#: at 8192) and Hutchinson's samples.
_MAX_HESSIAN_SIZE = 8192
_MAX_SAMPLES = 100_000


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


def _float64_copy(model):
    """A float64 copy of a network (hooks dropped, inference mode), for finite differences."""
    import copy

    net = copy.deepcopy(model)
    for _, layer in net.named_modules():
        layer._forward_hooks.clear()
        layer._forward_pre_hooks.clear()
        for attr in ("weight", "bias", "grad_weight", "grad_bias"):
            value = getattr(layer, attr, None)
            if isinstance(value, np.ndarray):
                setattr(layer, attr, value.astype(np.float64))
    net.set_training(False)
    return net


def network_hessian_traces(model, X, y, *, layers=None, n_samples: int = 16, seed: int = 0,
                           step: float = 1e-4) -> dict[str, HutchinsonEstimate]:
    r"""Hutchinson estimates of :math:`\operatorname{tr}(H_l)` for the weights of each layer of
    any network that backpropagates (convolutions included).

    For each of ``n_samples`` rounds and each layer :math:`l` of ``layers`` (default: every
    layer with a ``weight``), a Rademacher vector :math:`v` of the layer's shape (drawn from
    ``np.random.default_rng(seed)``, one layer after another) gives the sample :math:`v^T H_l v`,
    with the Hessian-vector product of the mean cross-entropy taken by central differences of
    the gradient that the network's own ``backward`` computes, in float64 on a copy (the model
    is not changed):

    .. math::

        H_l v \approx \frac{\nabla_{W_l} L(W_l + h v) - \nabla_{W_l} L(W_l - h v)}{2h}, \qquad
        h = \frac{\text{step} \cdot \max(1, \lVert W_l \rVert)}{\lVert v \rVert}.

    A change of :math:`W_l` leaves the layers below it alone, so their output on ``X`` is
    computed once, and each product runs forward and backward through layer :math:`l` and the
    layers above it only.  :func:`layer_hessian_trace` computes exact products for Linear and
    ReLU networks; this works for any :class:`qcourse.nn.Sequential` whose layers have
    ``backward`` (batch norms folded first), at the price of the finite difference: a ReLU whose
    input lies within :math:`h` of its kink adds an error of order one to that one sample, which
    a small ``step`` makes rare.  See the mixed_precision chapter.

    Bounds: ``n_samples`` in [2, 100000]; ``step`` in (0, 1).
    """
    from qcourse.nn import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    n_samples = check_int(n_samples, "n_samples", 2, _MAX_SAMPLES)
    seed = check_int(seed, "seed", 0)
    step = check_real(step, "step", 0.0, 1.0, lo_open=True, hi_open=True)
    with_weight = [n for n, m in model.named_modules()
                   if isinstance(getattr(m, "weight", None), np.ndarray)]
    if layers is None:
        layers = with_weight
    else:
        layers = check_sequence(layers, "layers")
        if not all(isinstance(n, str) for n in layers):
            raise TypeError(f"layers must be a list of layer names, got {layers!r}")
        if not layers or any(n not in with_weight for n in layers):
            raise ValueError(f"layers must name layers of the model that have weights "
                             f"({with_weight}), got {layers!r}")
    if not layers:
        raise ValueError("model has no layer with weights")
    X, y = _check_data(X, y, model)
    named = _float64_copy(model).named_modules()
    index = {n: i for i, (n, _) in enumerate(named)}
    inputs = {}
    h_in = X.astype(np.float64)
    for name, layer in named:                      # the input of every layer, once
        inputs[name] = h_in
        h_in = layer(h_in)
    rng = np.random.default_rng(seed)
    samples = {n: np.empty(n_samples) for n in layers}
    with one_blas_thread():          # small products: a second BLAS thread only waits
        for i in range(n_samples):
            for n in layers:
                samples[n][i] = _fd_sample(Sequential(*named[index[n]:]), n, inputs[n], y, rng,
                                           step)
    return {n: HutchinsonEstimate(float(s.mean()), float(np.std(s, ddof=1) / np.sqrt(n_samples)),
                                  s) for n, s in samples.items()}


def _fd_sample(tail, name: str, x: np.ndarray, y: np.ndarray, rng, step: float) -> float:
    """One Hutchinson sample v^T H v of layer ``name``, the first layer of ``tail`` (its input
    ``x``), by central differences of the gradient: see :func:`network_hessian_traces`."""
    layer = tail[name]
    w0 = layer.weight.copy()
    v = (2 * rng.integers(0, 2, size=w0.shape) - 1).astype(np.float64)
    h = step * max(1.0, float(np.linalg.norm(w0))) / np.sqrt(v.size)
    grads = []
    for sign in (1.0, -1.0):
        layer.weight[...] = w0 + sign * h * v
        _, dlogits = softmax_cross_entropy(tail(x), y)
        tail.backward(dlogits)
        grads.append(layer.grad_weight.copy())
    layer.weight[...] = w0
    return float(np.sum(v * (grads[0] - grads[1]))) / (2 * h)


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
