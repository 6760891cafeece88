"""Working with a whole model: copy it, swap its weights, evaluate it, watch its activations.

Re-exported by :mod:`qcourse.nn`.  These are the pieces every quantization chapter needs around
a network, written once:

* :func:`copy_model` -- a copy with parameters of its own and no hooks, what a quantization
  function builds its quantized model from (the float model is never changed);
* :func:`swapped_weights` -- a ``with`` block inside which some layers hold other weights (their
  quantized copies, say), restored bit for bit when the block ends, even on error;
* :func:`predict`, :func:`accuracy`, :func:`evaluate` -- classes, accuracy, and loss with
  accuracy in one pass, for a :class:`~qcourse.nn.Module` or anything that maps a batch to
  logits (:class:`Classifier` gives such a model the two methods);
* :func:`feed_activations` -- one pass over the data that hands what chosen layers see or
  produce, batch by batch, to callbacks; :func:`capture_activations` keeps them,
  :func:`calibrate` feeds them to an observer of :mod:`qcourse.calibration`, and
  :func:`compare_observers` measures several observers on one layer;
* :func:`linear_layers`, :func:`layer_info` -- the Linear layers and what they hold (weights,
  biases, multiply-accumulates), counted once for every size and cost account.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    check_choice,
    check_float_matrix,
    check_instance,
    check_int,
    check_labels,
    check_sequence,
    describe,
    real_array,
)
from qcourse.affine import QParams, error_breakdown
from qcourse.calibration import Observer, fake_quant_hook
from qcourse.nn.core import (
    Linear,
    Module,
    Sequential,
    _check_layer_name,
    _check_model_input,
    softmax_cross_entropy,
)

__all__ = [
    "Classifier",
    "Evaluation",
    "LayerActivations",
    "LayerInfo",
    "ObserverComparison",
    "accuracy",
    "calibrate",
    "capture_activations",
    "compare_observers",
    "copy_model",
    "evaluate",
    "feed_activations",
    "layer_info",
    "linear_layers",
    "predict",
    "swapped_weights",
]


def _check_sequential(model) -> Sequential:
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {describe(model)}")
    return model


def _model_input(model, X, name: str = "X") -> np.ndarray:
    """``X`` for ``model``: checked against a :class:`Module`'s width and dtype, or a finite
    float matrix for any other callable that maps a batch to logits."""
    if isinstance(model, Module):
        return _check_model_input(model, X, name)
    if not callable(model):
        raise TypeError(f"model must be a qcourse.nn.Module or a callable that maps a batch to "
                        f"logits, got {describe(model)}")
    return check_float_matrix(X, name, images=True)


def _check_batch_size(batch_size) -> int | None:
    return None if batch_size is None else check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)


# --------------------------------------------------------------------------- copies and swaps


def _modules(module: Module) -> Iterator[Module]:
    """``module`` and every Module it holds, however deep (in attributes, lists or dicts)."""
    seen: set[int] = set()
    stack: list = [module]
    while stack:
        item = stack.pop()
        if isinstance(item, Module):
            if id(item) in seen:
                continue
            seen.add(id(item))
            yield item
            stack.extend(vars(item).values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def copy_model(model: Module) -> Module:
    """A deep copy of ``model`` (a layer or a whole network) with parameters of its own and no
    forward hooks or pre-hooks: the float model a quantization function starts from, which it
    may change without touching the caller's.  The class of every layer is kept."""
    check_instance(model, "model", Module, "a qcourse.nn.Module (a layer or a network)")
    # deepcopy looks every object up in memo first: each hook table maps to a fresh empty one,
    # so the hooks (and whatever their closures hold) are never copied.
    memo: dict[int, object] = {}
    for m in _modules(model):
        memo[id(m._forward_hooks)] = {}
        memo[id(m._forward_pre_hooks)] = {}
    return copy.deepcopy(model, memo)


def swapped_weights(model: Sequential,
                    weights: Mapping[str, np.ndarray]) -> AbstractContextManager[Sequential]:
    """Inside the block, ``model[name].weight`` holds ``weights[name]`` for every name given.

    The new values are written into the weight arrays in place (every reference to them sees
    the change, and the dtype stays the layer's); when the block ends -- normally or by an
    exception -- the original values are written back, bit for bit.  Yields ``model``.  The
    arguments are checked when the function is called, before any weight changes: a layer
    name, a finite float matrix of the weight's shape that its dtype holds.
    """
    _check_sequential(model)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping {{layer name: array}}, got "
                        f"{describe(weights)}")
    new = {}
    for name, value in weights.items():
        layer = model[_check_layer_name(model, name, "each key of weights")]
        if not isinstance(getattr(layer, "weight", None), np.ndarray):
            raise ValueError(f"weights names layer {name!r} ({type(layer).__name__}), which has "
                             f"no weight")
        value = real_array(value, f"weights[{name!r}]", kinds="f", dtype=layer.weight.dtype)
        if value.shape != layer.weight.shape:
            raise ValueError(f"weights[{name!r}] has shape {value.shape}, the layer's "
                             f"weight {layer.weight.shape}")
        new[name] = value
    return _swapped(model, new)


@contextmanager
def _swapped(model: Sequential, weights: dict[str, np.ndarray]) -> Iterator[Sequential]:
    saved: dict[str, np.ndarray] = {}
    try:
        for name, value in weights.items():
            saved[name] = model[name].weight.copy()
            model[name].weight[...] = value
        yield model
    finally:
        for name, value in saved.items():
            model[name].weight[...] = value


# --------------------------------------------------------------------------- evaluation


def _batches(n: int, batch_size: int | None) -> Iterator[slice]:
    step = n if batch_size is None else batch_size
    return (slice(s, s + step) for s in range(0, n, step))


def predict(model: Callable[[np.ndarray], np.ndarray], X: np.ndarray,
            batch_size: int | None = 4096) -> np.ndarray:
    """Predicted class (argmax of the logits, the first on ties) for each row of ``X``, int64.

    ``model`` is a :class:`Module` or any callable that maps a batch to logits.  The rows go
    through in batches of ``batch_size`` (``None``: all at once, for a model whose result
    depends on the batch, such as one with dynamically quantized activations).

    Bounds: ``batch_size`` in [1, 2**28] or None.
    """
    X = _model_input(model, X)
    batch_size = _check_batch_size(batch_size)
    out = [np.argmax(model(X[rows]), axis=1) for rows in _batches(X.shape[0], batch_size)]
    return np.concatenate(out).astype(np.int64)


def accuracy(model: Callable[[np.ndarray], np.ndarray], X: np.ndarray, y: np.ndarray,
             batch_size: int | None = 4096) -> float:
    """Fraction of rows of ``X`` whose predicted class (:func:`predict`) equals ``y``.

    Bounds: ``batch_size`` in [1, 2**28] or None.
    """
    X = _model_input(model, X)
    y = check_labels(y, "y", X.shape[0])
    return float(np.mean(predict(model, X, batch_size) == y))


class Evaluation(NamedTuple):
    """Mean softmax cross-entropy ``loss`` and ``accuracy`` (fraction correct) on a data set."""

    loss: float
    accuracy: float

    @classmethod
    def from_logits(cls, logits: np.ndarray, y: np.ndarray) -> Evaluation:
        """The loss (computed in float64) and accuracy of ``logits`` for the labels ``y``."""
        loss, _ = softmax_cross_entropy(logits.astype(np.float64), y)
        return cls(loss, float(np.mean(np.argmax(logits, axis=1) == y)))


def evaluate(model: Callable[[np.ndarray], np.ndarray], X: np.ndarray,
             y: np.ndarray) -> Evaluation:
    """Loss and accuracy of ``model`` on ``(X, y)`` from one forward pass over all of ``X``
    (hooks included); the loss is computed in float64."""
    X = _model_input(model, X)
    y = check_labels(y, "y", X.shape[0])
    return Evaluation.from_logits(model(X), y)


class Classifier:
    """Gives a model whose call maps a batch to logits the methods ``predict`` and
    ``accuracy``, computed on all of ``X`` at once (:func:`predict`, :func:`accuracy`)."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted classes (int64): the argmax of the logits, the first on ties."""
        return predict(self, X, batch_size=None)

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        """Fraction of rows of ``X`` classified as ``y``."""
        return accuracy(self, X, y, batch_size=None)


# --------------------------------------------------------------------------- activations


def feed_activations(model: Sequential, X: np.ndarray,
                     sinks: Mapping[tuple[str, str], Callable[[np.ndarray], object]], *,
                     batch_size: int = 4096) -> None:
    """Run ``X`` through ``model`` in batches and hand chosen activations to callbacks.

    ``sinks`` maps a point ``(layer name, "input" or "output")`` to a function called with what
    that layer saw or produced on every batch, in order.  The hooks that do it are removed
    afterwards, even on error.  Other hooks already on the model still run, so each sink gets
    what the layer really saw.  This is the one calibration pass of the course: observers,
    recorders and statistics all read activations through it.

    Bounds: ``batch_size`` in [1, 2**28].
    """
    _check_sequential(model)
    X = _check_model_input(model, X, "X")
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    check_instance(sinks, "sinks", Mapping, "a mapping {(layer, 'input' or 'output'): function}")
    by_layer: dict[str, list[tuple[str, Callable]]] = {}
    for point, sink in sinks.items():
        if not (isinstance(point, tuple) and len(point) == 2):
            raise TypeError(f"each point of sinks must be a (layer name, 'input' or 'output') "
                            f"pair, got {point!r}")
        name, where = point
        _check_layer_name(model, name, "a point's layer")
        check_choice(where, "a point's where", ("input", "output"))
        if not callable(sink):
            raise TypeError(f"the sink of {point!r} must be callable, got {type(sink).__name__}")
        by_layer.setdefault(name, []).append((where, sink))

    def make_hook(pairs):
        def hook(module, inp, out):
            for where, sink in pairs:
                sink(inp if where == "input" else out)
        return hook

    handles = []
    try:
        for name, pairs in by_layer.items():
            handles.append(model[name].register_forward_hook(make_hook(pairs)))
        for rows in _batches(X.shape[0], batch_size):
            model(X[rows])
    finally:
        for h in handles:
            h.remove()


class LayerActivations(NamedTuple):
    """What one layer saw (``input``) and produced (``output``) over the captured data."""

    input: np.ndarray
    output: np.ndarray


def capture_activations(model: Sequential, X: np.ndarray, layers=None,
                        batch_size: int = 4096) -> dict[str, LayerActivations]:
    """Run ``X`` through ``model`` and record each named layer's input and output.

    Returns ``{name: LayerActivations(input, output)}`` for the layers named in ``layers``
    (default: all), with the batches concatenated in order (:func:`feed_activations`).

    Bounds: ``batch_size`` in [1, 2**28].
    """
    _check_sequential(model)
    names = list(model.names) if layers is None else check_sequence(layers, "layers")
    for name in names:
        if name not in model.names:
            raise ValueError(f"layers names {name!r}, which is not in the model {model.names}")
    record: dict[tuple[str, str], list[np.ndarray]] = {
        (name, where): [] for name in names for where in ("input", "output")}
    feed_activations(model, X, {point: lambda a, kept=kept: kept.append(np.array(a, copy=True))
                                for point, kept in record.items()}, batch_size=batch_size)
    return {name: LayerActivations(np.concatenate(record[name, "input"]),
                                   np.concatenate(record[name, "output"])) for name in names}


def calibrate(model: Sequential, layer: str, X, observer: Observer, *, batch_size: int = 128,
              where: str = "output") -> Observer:
    """Feed the ``where`` (``"input"`` or ``"output"``) activations of ``model[layer]`` to
    ``observer``, one batch of ``batch_size`` rows of ``X`` at a time; returns the observer.

    This is static calibration: the model runs in float on representative data and each
    batch's activations update the observer (:func:`feed_activations`).  See the calibration
    chapter.

    Bounds: ``batch_size`` in [1, 2**28].
    """
    layer = _check_layer_name(model, layer)
    check_instance(observer, "observer", Observer)
    check_choice(where, "where", ("input", "output"))
    X = _check_model_input(model, X, "X").astype(np.float32)
    feed_activations(model, X, {(layer, where): observer.update}, batch_size=batch_size)
    return observer


@dataclass(frozen=True)
class ObserverComparison:
    """One row of :func:`compare_observers`: an observer's range and what it costs."""

    name: str
    rmin: float
    rmax: float
    qparams: QParams
    mse: float
    sqnr_db: float
    clipped_fraction: float
    accuracy: float


def compare_observers(model: Sequential, layer: str,
                      observers: Mapping[str, Observer] | Iterable, X_calib, X_eval, y_eval, *,
                      batch_size: int = 128) -> list[ObserverComparison]:
    """Calibrate each observer on ``model[layer]``'s output over ``X_calib``, then measure it.

    For each ``(name, observer)`` (fresh observers; they are updated here): the range and
    qparams from the layer's output on ``X_calib``, fed in batches of ``batch_size`` rows
    exactly as :func:`calibrate` does (the float model runs once and every observer sees the
    same batches); the MSE, SQNR and clipped fraction of the layer's output on ``X_eval`` when
    fake-quantized with them (:func:`qcourse.affine.error_breakdown`); and the model's
    accuracy on ``(X_eval, y_eval)`` with that layer's output fake-quantized
    (:func:`qcourse.calibration.fake_quant_hook`) and every other layer in float.  See the
    calibration chapter.

    Bounds: ``batch_size`` in [1, 2**28].
    """
    layer = _check_layer_name(model, layer)
    if isinstance(observers, Mapping):
        items = list(observers.items())
    else:
        items = check_sequence(observers, "observers")
        if not all(isinstance(item, tuple) and len(item) == 2 for item in items):
            raise TypeError("observers must be a mapping {name: observer} or a list of "
                            "(name, observer) pairs")
    if not items:
        raise ValueError("observers must not be empty")
    for name, obs in items:
        check_instance(obs, f"observers[{name!r}]", Observer)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    X_calib = _check_model_input(model, X_calib, "X_calib").astype(np.float32)
    X_eval = _check_model_input(model, X_eval, "X_eval").astype(np.float32)
    y_eval = check_labels(y_eval, "y_eval", X_eval.shape[0])
    sinks = {(layer, "output"): lambda a: [obs.update(a) for _, obs in items]}
    feed_activations(model, X_calib, sinks, batch_size=batch_size)
    acts = capture_activations(model, X_eval, layers=[layer])[layer].output
    rows = []
    for name, obs in items:
        qp = obs.qparams()
        rmin, rmax = obs.range()
        eb = error_breakdown(acts, qp)
        with model[layer].register_forward_hook(fake_quant_hook(qp)):
            acc = accuracy(model, X_eval, y_eval)
        rows.append(ObserverComparison(name=str(name), rmin=float(rmin), rmax=float(rmax),
                                       qparams=qp, mse=eb.total_mse, sqnr_db=eb.sqnr_db,
                                       clipped_fraction=eb.clipped_fraction, accuracy=acc))
    return rows


# --------------------------------------------------------------------------- counting


def linear_layers(model: Sequential) -> list[str]:
    """Names of the :class:`~qcourse.nn.Linear` layers of ``model``, in order: the layers whose
    weights get quantized."""
    _check_sequential(model)
    return [name for name, layer in model.named_modules() if isinstance(layer, Linear)]


class LayerInfo(NamedTuple):
    """What the size and cost accounts need to know about one Linear layer.

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


def layer_info(model: Sequential) -> list[LayerInfo]:
    """One :class:`LayerInfo` per Linear layer of ``model``, in order."""
    out = []
    for name in linear_layers(model):
        lin = model[name]
        n = lin.in_features * lin.out_features
        out.append(LayerInfo(name, lin.in_features, lin.out_features, n, lin.out_features, n))
    return out
