"""The float network's pieces: modules, layers, losses, optimizers and the training loop.

Re-exported by :mod:`qcourse.nn` (see its docstring for the conventions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_EPOCHS,
    check_bool,
    check_choice,
    check_dtype,
    check_float_matrix,
    check_int,
    check_int_sequence,
    check_labels,
    check_real,
    check_sequence,
    describe,
    int_array,
)

__all__ = [
    "SGD",
    "Adam",
    "HookHandle",
    "Linear",
    "Module",
    "ReLU",
    "ReLU6",
    "Sequential",
    "make_mlp",
    "make_optimizer",
    "softmax",
    "softmax_cross_entropy",
    "train",
    "train_epoch",
]


# --------------------------------------------------------------------------- checks


# --------------------------------------------------------------------------- modules


class HookHandle:
    """Returned by ``register_forward_hook``; ``remove()`` it, or use it in a ``with`` block."""

    def __init__(self, hooks: dict, key: int):
        self._hooks = hooks
        self._key = key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Module:
    """Base class: ``module(x)`` runs pre-hooks, :meth:`forward`, then forward hooks.

    A forward hook is ``hook(module, input, output)``; if it returns an array, that array
    replaces the output.  A pre-hook is ``hook(module, input)``; if it returns an array, that
    array replaces the input.  :meth:`backward` ignores hooks (straight-through).
    """

    _next_key = 0

    def __init__(self) -> None:
        self._forward_hooks: dict[int, Callable] = {}
        self._forward_pre_hooks: dict[int, Callable] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for hook in list(self._forward_pre_hooks.values()):
            replaced = hook(self, x)
            if replaced is not None:
                x = replaced
        out = self.forward(x)
        for hook in list(self._forward_hooks.values()):
            replaced = hook(self, x, out)
            if replaced is not None:
                out = replaced
        return out

    def _register(self, hooks: dict, hook) -> HookHandle:
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        Module._next_key += 1
        hooks[Module._next_key] = hook
        return HookHandle(hooks, Module._next_key)

    def register_forward_hook(self, hook: Callable) -> HookHandle:
        """Call ``hook(module, input, output)`` after every forward; a returned array replaces
        the output."""
        return self._register(self._forward_hooks, hook)

    def register_forward_pre_hook(self, hook: Callable) -> HookHandle:
        """Call ``hook(module, input)`` before every forward; a returned array replaces the
        input."""
        return self._register(self._forward_pre_hooks, hook)

    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(param, grad)`` pairs; optimizers update ``param`` in place from ``grad``."""
        return []

    def set_training(self, training: bool) -> None:
        """Training or inference behaviour (batch norm's statistics); no-op for most layers.

        :func:`train` switches the model to training for its epochs and back to inference at
        the end; a :class:`Sequential` passes the switch on to its layers.
        """

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        return []


class Linear(Module):
    r"""Fully connected layer :math:`y = x W^T + b`, ``weight`` (out, in), ``bias`` (out,).

    Backward, for :math:`g = \partial L / \partial y` of shape (batch, out):

    .. math::

        \frac{\partial L}{\partial W} = g^T x, \qquad
        \frac{\partial L}{\partial b} = \textstyle\sum_{\text{batch}} g, \qquad
        \frac{\partial L}{\partial x} = g W.

    The weights start He-uniform, :math:`W_{ij} \sim U(-\sqrt{6/\text{in}}, \sqrt{6/\text{in}})`
    (suited to ReLU), and the bias at zero.  ``seed`` is an integer or a
    ``numpy.random.Generator``.  The input is cast to the layer's dtype.  ``in_features`` and
    ``out_features`` are ints >= 1 with at most 2**28 weights in all.
    """

    def __init__(self, in_features: int, out_features: int, *, seed=0, dtype=np.float32):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1, MAX_ELEMENTS)
        self.out_features = check_int(out_features, "out_features", 1, MAX_ELEMENTS)
        dtype = check_dtype(dtype, "dtype", (np.float32, np.float64))
        if self.in_features * self.out_features > MAX_ELEMENTS:
            raise ValueError(f"in_features * out_features must be at most {MAX_ELEMENTS} "
                             f"weights, got {self.in_features} * {self.out_features}")
        if isinstance(seed, np.random.Generator):
            rng = seed
        else:
            rng = np.random.default_rng(check_int(seed, "seed", 0))
        bound = np.sqrt(6.0 / self.in_features)
        w = rng.uniform(-bound, bound, size=(self.out_features, self.in_features))
        self.weight = w.astype(dtype)
        self.bias = np.zeros(self.out_features, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_float_matrix(x, "x", finite=False)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"x must have {self.in_features} features (columns) for this Linear layer, "
                f"got shape {x.shape}"
            )
        x = x.astype(self.weight.dtype, copy=False)
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        if grad_out.shape != (self._x.shape[0], self.out_features):
            raise ValueError(
                f"grad_out must have shape {(self._x.shape[0], self.out_features)}, "
                f"got {grad_out.shape}"
            )
        grad_out = grad_out.astype(self.weight.dtype, copy=False)
        self.grad_weight[...] = grad_out.T @ self._x
        self.grad_bias[...] = grad_out.sum(axis=0)
        return grad_out @ self.weight

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        return [("weight", self.weight), ("bias", self.bias)]

    def __repr__(self) -> str:
        return f"Linear(in_features={self.in_features}, out_features={self.out_features})"


class ReLU(Module):
    r""":math:`\max(0, x)`; backward passes the gradient where :math:`x > 0`."""

    def __init__(self) -> None:
        super().__init__()
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return np.where(self._mask, x, np.zeros((), dtype=x.dtype))

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._mask is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return np.where(self._mask, grad_out, np.zeros((), dtype=grad_out.dtype))

    def __repr__(self) -> str:
        return "ReLU()"


class ReLU6(ReLU):
    r""":math:`\min(\max(0, x), 6)`; backward passes the gradient where :math:`0 < x < 6`.

    Its output range is known before any data is seen, [0, 6]: the calibration chapter shows
    why that makes it easy to quantize.
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = (x > 0) & (x < 6)
        return np.clip(x, 0, 6).astype(x.dtype, copy=False)

    def __repr__(self) -> str:
        return "ReLU6()"


class Sequential(Module):
    """Layers applied in order.  Each item is a :class:`Module` or a ``(name, module)`` pair;
    unnamed layers are named by their index.  ``model["fc1"]`` and ``model[0]`` both work."""

    def __init__(self, *layers):
        super().__init__()
        self.names: list[str] = []
        self.layers: list[Module] = []
        for i, item in enumerate(layers):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, layer = item
            else:
                name, layer = str(i), item
            if not isinstance(layer, Module):
                raise TypeError(f"layers[{i}] must be a qcourse.nn.Module (or a (name, module) "
                                f"pair), got {describe(layer)}")
            if name in self.names:
                raise ValueError(f"layer names must be unique, {name!r} appears twice")
            self.names.append(name)
            self.layers.append(layer)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")

    def __getitem__(self, key) -> Module:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"no layer named {key!r}; layers are {self.names}")
            return self.layers[self.names.index(key)]
        return self.layers[key]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def named_modules(self) -> list[tuple[str, Module]]:
        return list(zip(self.names, self.layers, strict=True))

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x

    def set_training(self, training: bool) -> None:
        for layer in self.layers:
            layer.set_training(training)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            grad_out = layer.backward(grad_out)
        return grad_out

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [pair for layer in self.layers for pair in layer.parameters()]

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        return [
            (f"{name}.{pname}", p)
            for name, layer in self.named_modules()
            for pname, p in layer.named_parameters()
        ]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, keyed ``"<layer>.<weight|bias>"``."""
        return {name: p.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays from ``state`` into the parameters (in place, same shapes required)."""
        params = dict(self.named_parameters())
        if set(state) != set(params):
            raise ValueError(f"state has keys {sorted(state)}, expected {sorted(params)}")
        for name, p in params.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"state[{name!r}] has shape {value.shape}, expected {p.shape}")
            p[...] = value

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({n}): {layer!r}" for n, layer in self.named_modules())
        return f"Sequential(\n{inner}\n)"


def make_mlp(sizes=(64, 128, 64, 10), *, activation: str = "relu", seed: int = 0,
             dtype=np.float32) -> Sequential:
    """A multilayer perceptron: ``fc1, act1, fc2, act2, ..., fcN`` (no activation at the end).

    ``sizes`` lists the widths from input to output; ``activation`` is ``"relu"`` or
    ``"relu6"``.  All weights are drawn from one ``np.random.default_rng(seed)``.

    Bounds: every width in ``sizes`` in [1, 2**28], and at most 2**28 weights per layer.
    """
    sizes = check_int_sequence(sizes, "sizes", 1, MAX_ELEMENTS, min_len=2)
    for i in range(len(sizes) - 1):
        if sizes[i] * sizes[i + 1] > MAX_ELEMENTS:
            raise ValueError(f"sizes[{i}] * sizes[{i + 1}] must be at most {MAX_ELEMENTS} "
                             f"weights, got {sizes[i]} * {sizes[i + 1]}")
    acts = {"relu": ReLU, "relu6": ReLU6}
    check_choice(activation, "activation", sorted(acts))
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    layers = []
    n = len(sizes) - 1
    for i in range(n):
        layers.append((f"fc{i + 1}", Linear(sizes[i], sizes[i + 1], seed=rng, dtype=dtype)))
        if i < n - 1:
            layers.append((f"act{i + 1}", acts[activation]()))
    return Sequential(*layers)


# --------------------------------------------------------------------------- loss


def softmax(logits: np.ndarray) -> np.ndarray:
    r"""Row-wise :math:`\mathrm{softmax}(z)_k = e^{z_k - \max z} / \sum_j e^{z_j - \max z}`.

    ``logits`` is a finite float array of shape (batch, classes)."""
    logits = check_float_matrix(logits, "logits")
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    r"""Mean cross-entropy of softmax probabilities and its gradient with respect to the logits.

    .. math::

        L = \frac{1}{n} \sum_i \Big( \log \sum_k e^{z_{ik}} - z_{i, y_i} \Big), \qquad
        \frac{\partial L}{\partial z_{ik}} = \frac{\mathrm{softmax}(z_i)_k - [k = y_i]}{n}.

    The log-sum-exp is computed after subtracting each row's maximum, so large logits do not
    overflow.  Returns ``(loss, grad)`` with ``grad`` in the dtype of ``logits``.
    """
    logits = check_float_matrix(logits, "logits")
    y = check_labels(y, "y", logits.shape[0], logits.shape[1])
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z).sum(axis=1))
    loss = float(np.mean(log_sum - z[np.arange(n), y]))
    grad = softmax(logits)
    grad[np.arange(n), y] -= 1
    grad /= n
    return loss, grad.astype(logits.dtype, copy=False)


# --------------------------------------------------------------------------- optimizers


def _check_params(params) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(param, grad)`` pairs of float arrays of one shape, as ``Module.parameters()`` gives."""
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(f"params must be (param, grad) pairs such as model.parameters(), got "
                        f"{describe(params)}")
    pairs = list(params)
    for i, pair in enumerate(pairs):
        ok = (isinstance(pair, tuple) and len(pair) == 2
              and all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in pair)
              and pair[0].shape == pair[1].shape)
        if not ok:
            raise TypeError(f"params[{i}] must be a (param, grad) pair of float arrays of one "
                            f"shape, got {describe(pair)}")
    return pairs


class SGD:
    r"""Stochastic gradient descent with momentum: :math:`v \leftarrow \mu v + g`,
    :math:`p \leftarrow p - \eta v` (PyTorch's form), plus optional L2 weight decay."""

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        self.params = _check_params(params)
        self.lr = check_real(lr, "lr", 0, lo_open=True)
        self.momentum = check_real(momentum, "momentum", 0.0, 1.0, hi_open=True)
        self.weight_decay = check_real(weight_decay, "weight_decay", 0.0)
        self._velocity = [np.zeros_like(p) for p, _ in self.params]

    def step(self) -> None:
        for (p, g), v in zip(self.params, self._velocity, strict=True):
            d = g + self.weight_decay * p if self.weight_decay else g
            v *= self.momentum
            v += d
            p -= (self.lr * v).astype(p.dtype, copy=False)


class Adam:
    r"""Adam (Kingma and Ba, 2015): with :math:`t` the step count,

    .. math::

        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        p \leftarrow p - \eta \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = _check_params(params)
        self.lr = check_real(lr, "lr", 0, lo_open=True)
        b1, b2 = check_sequence(betas, "betas", min_len=2, max_len=2)
        self.b1 = check_real(b1, "betas[0]", 0.0, 1.0, hi_open=True)
        self.b2 = check_real(b2, "betas[1]", 0.0, 1.0, hi_open=True)
        self.eps = check_real(eps, "eps", 0, lo_open=True)
        self.weight_decay = check_real(weight_decay, "weight_decay", 0.0)
        self.t = 0
        self._m = [np.zeros_like(p) for p, _ in self.params]
        self._v = [np.zeros_like(p) for p, _ in self.params]

    def step(self) -> None:
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        for (p, g), m, v in zip(self.params, self._m, self._v, strict=True):
            d = g + self.weight_decay * p if self.weight_decay else g
            m *= self.b1
            m += (1.0 - self.b1) * d
            v *= self.b2
            v += (1.0 - self.b2) * d * d
            update = self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
            p -= update.astype(p.dtype, copy=False)


# --------------------------------------------------------------------------- training


def _num_outputs(model: Module) -> int | None:
    layers = model.layers if isinstance(model, Sequential) else [model]
    for layer in reversed(layers):
        if isinstance(layer, Linear):
            return layer.out_features
    return None


def make_optimizer(params, optimizer: str, lr: float, weight_decay: float = 0.0):
    """``Adam`` (``optimizer="adam"``) or ``SGD`` with momentum (``"sgd"``) over ``params``."""
    check_choice(optimizer, "optimizer", ("adam", "sgd"))
    if optimizer == "adam":
        return Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


_DIVERGED = ("training diverged: a weight or a logit became NaN or Inf; lower lr (or "
             "weight_decay)")


def _check_model_input(model, X, name: str) -> np.ndarray:
    """``X`` for ``model``: a finite float matrix that fits the model's dtype and width."""
    if not isinstance(model, Module):
        raise TypeError(f"model must be a qcourse.nn.Module, got {describe(model)}")
    X = check_float_matrix(X, name, images=True)
    first = model.layers[0] if isinstance(model, Sequential) else model
    if isinstance(first, Linear):
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (batch, features) for a model that starts "
                             f"with a Linear layer, got shape {X.shape}")
        if X.shape[1] != first.in_features:
            raise ValueError(f"{name} must have {first.in_features} features (the model's "
                             f"input width), got shape {X.shape}")
    elif hasattr(first, "in_channels") and hasattr(first, "kernel_size"):      # a Conv2d
        if X.ndim != 4 or X.shape[1] != first.in_channels:
            raise ValueError(f"{name} must be 4-D images (batch, {first.in_channels} "
                             f"channel(s), height, width) for a model that starts with "
                             f"{first!r}, got shape {X.shape}")
    else:
        return X
    limit = np.finfo(first.weight.dtype).max
    if X.dtype.itemsize > first.weight.dtype.itemsize and np.abs(X).max() > limit:
        raise ValueError(f"{name} must fit the model's {first.weight.dtype} (magnitude at "
                         f"most {float(limit):.4g}), got a value beyond it")
    return X


def _check_layer_name(model, layer, name: str = "layer") -> str:
    """The name of one of ``model``'s layers (a Sequential), or a TypeError/ValueError."""
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {describe(model)}")
    if not isinstance(layer, str):
        raise TypeError(f"{name} must be a layer name (a str), got {describe(layer)}")
    if layer not in model.names:
        raise ValueError(f"{name} must be one of the model's layers {model.names}, got "
                         f"{layer!r}")
    return layer


def train_epoch(model: Module, X: np.ndarray, y: np.ndarray, order: np.ndarray,
                batch_size: int, opt) -> tuple[float, float]:
    """One pass over ``(X, y)`` in the given ``order``, in batches of ``batch_size``.

    For each batch: forward, :func:`softmax_cross_entropy`, ``model.backward``, ``opt.step()``.
    Returns the epoch's mean loss and training accuracy, both measured on the fly (each batch
    before its step).  The loop of :func:`train` and of ``qcourse.qat.qat_finetune``.

    Bounds: ``batch_size`` in [1, 2**28]; ``order`` holds row indices of ``X``.
    """
    X = _check_model_input(model, X, "X")
    y = check_labels(y, "y", X.shape[0], _num_outputs(model))
    order = int_array(order, "order", 0, X.shape[0] - 1, what="row indices of X")
    if order.ndim != 1:
        raise ValueError(f"order must be 1-D (row indices of X), got shape {order.shape}")
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    if not callable(getattr(opt, "step", None)):    # SGD, Adam or a group of them
        raise TypeError(f"opt must be an optimizer with a step() method (qcourse.nn.SGD or Adam, "
                        f"see make_optimizer), got {describe(opt)}")
    n = len(order)
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        with np.errstate(over="ignore", invalid="ignore"):
            logits = model(X[idx])
            if not np.all(np.isfinite(logits)):
                raise ValueError(_DIVERGED)
            loss, grad = softmax_cross_entropy(logits, y[idx])
            model.backward(grad)
            opt.step()
        if not all(np.all(np.isfinite(p)) for p, _ in opt.params):
            raise ValueError(_DIVERGED)
        total_loss += loss * idx.size
        correct += int(np.sum(np.argmax(logits, axis=1) == y[idx]))
    return total_loss / n, correct / n


def train(model: Module, X: np.ndarray, y: np.ndarray, epochs: int = 20, batch_size: int = 32,
          lr: float = 1e-2, seed: int = 0, progress: bool = True, *,
          optimizer: str = "adam", weight_decay: float = 0.0) -> dict[str, list[float]]:
    """Fit ``model`` to ``(X, y)`` with mini-batch softmax cross-entropy.

    Each epoch visits the examples in an order drawn from ``np.random.default_rng(seed)``, in
    batches of ``batch_size`` (the last batch may be smaller).  For each batch: forward,
    :func:`softmax_cross_entropy`, ``model.backward``, one optimizer step (``"adam"`` or
    ``"sgd"`` with momentum 0.9).  The same seed and data give bit-identical weights.

    Returns a history ``{"loss": [...], "train_accuracy": [...]}`` with one entry per epoch
    (batch-averaged, measured on the fly).  ``progress=True`` shows a tqdm bar over epochs.
    ``epochs`` lies in [1, 100000], ``batch_size`` in [1, 2**28]; a step that turns a weight
    into NaN or Inf (too large an ``lr``) stops the training with ``ValueError``.
    """
    X = _check_model_input(model, X, "X")
    y = check_labels(y, "y", X.shape[0], _num_outputs(model))
    epochs = check_int(epochs, "epochs", 1, MAX_EPOCHS)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    lr = check_real(lr, "lr", 0, lo_open=True)
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    return _fit_epochs(model, X, y, opt, epochs=epochs, batch_size=batch_size, seed=seed,
                      progress=progress)


def _fit_epochs(model: Module, X: np.ndarray, y: np.ndarray, opt, *, epochs: int,
               batch_size: int, seed: int, progress: bool, lr_schedule=None,
               stop_after: int | None = None) -> dict[str, list[float]]:
    """The epoch loop that :func:`train` and :func:`qcourse.cnn.train_cnn` share (arguments
    already checked by the caller): each epoch sets ``opt.lr = lr_schedule(epoch)`` if a
    schedule is given, then runs :func:`train_epoch` on an order drawn from one
    ``np.random.default_rng(seed)``; ``stop_after`` ends the run after that many epochs of the
    same schedule.  The model is in training mode during the loop and in evaluation mode after
    it, also when a step fails.  Returns the per-epoch history."""
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress)
    model.set_training(True)
    try:
        for e in bar:
            if stop_after is not None and e >= stop_after:
                break
            if lr_schedule is not None:
                opt.lr = lr_schedule(e)
            loss, acc = train_epoch(model, X, y, rng.permutation(n), batch_size, opt)
            history["loss"].append(loss)
            history["train_accuracy"].append(acc)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
    finally:
        model.set_training(False)
        bar.close()
    return history
