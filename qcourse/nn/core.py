"""The float network's pieces: modules, layers, losses, optimizers and the training loop.

Re-exported by :mod:`qcourse.nn` (see its docstring for the conventions).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "MLP",
    "SGD",
    "Adam",
    "HookHandle",
    "LayerActivations",
    "Linear",
    "Module",
    "ReLU",
    "ReLU6",
    "Sequential",
    "accuracy",
    "capture_activations",
    "make_optimizer",
    "predict",
    "softmax",
    "softmax_cross_entropy",
    "train",
    "train_epoch",
]


# --------------------------------------------------------------------------- checks


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def _check_features(x, name: str = "x", *, finite: bool = True,
                    images: bool = False) -> np.ndarray:
    """A float batch: 2-D (batch, features), or with ``images=True`` also 4-D (NCHW images)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    if x.ndim != 2 and not (images and x.ndim == 4):
        wanted = "2-D (batch, features) or 4-D (batch, channels, height, width)" if images \
            else "2-D (batch, features)"
        raise ValueError(f"{name} must be {wanted}, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    if finite and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return x


def _check_labels(y, n: int, num_classes: int | None = None, name: str = "y") -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of integer labels, got {type(y).__name__}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the inputs, got {y.shape}")
    if y.size and y.min() < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(
            f"{name} holds label {int(y.max())} but the model has only {num_classes} outputs"
        )
    return y


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
    ``numpy.random.Generator``.  The input is cast to the layer's dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, seed=0, dtype=np.float32):
        super().__init__()
        self.in_features = _check_int(in_features, "in_features")
        self.out_features = _check_int(out_features, "out_features")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if isinstance(seed, np.random.Generator):
            rng = seed
        else:
            rng = np.random.default_rng(_check_int(seed, "seed", minimum=0))
        bound = np.sqrt(6.0 / self.in_features)
        w = rng.uniform(-bound, bound, size=(self.out_features, self.in_features))
        self.weight = w.astype(dtype)
        self.bias = np.zeros(self.out_features, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_features(x, "x", finite=False)
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
                raise TypeError(
                    f"layer {i} must be a qcourse.nn.Module, got {type(layer).__name__}"
                )
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


def MLP(sizes=(64, 128, 64, 10), *, activation: str = "relu", seed: int = 0, dtype=np.float32):
    """A multilayer perceptron: ``fc1, act1, fc2, act2, ..., fcN`` (no activation at the end).

    ``sizes`` lists the widths from input to output; ``activation`` is ``"relu"`` or
    ``"relu6"``.  All weights are drawn from one ``np.random.default_rng(seed)``.
    """
    sizes = tuple(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output width, got {sizes}")
    for s in sizes:
        _check_int(s, "each entry of sizes")
    acts = {"relu": ReLU, "relu6": ReLU6}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    rng = np.random.default_rng(_check_int(seed, "seed", minimum=0))
    layers = []
    n = len(sizes) - 1
    for i in range(n):
        layers.append((f"fc{i + 1}", Linear(sizes[i], sizes[i + 1], seed=rng, dtype=dtype)))
        if i < n - 1:
            layers.append((f"act{i + 1}", acts[activation]()))
    return Sequential(*layers)


# --------------------------------------------------------------------------- loss


def softmax(logits: np.ndarray) -> np.ndarray:
    r"""Row-wise :math:`\mathrm{softmax}(z)_k = e^{z_k - \max z} / \sum_j e^{z_j - \max z}`."""
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
    logits = _check_features(logits, "logits")
    y = _check_labels(y, logits.shape[0], logits.shape[1])
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z).sum(axis=1))
    loss = float(np.mean(log_sum - z[np.arange(n), y]))
    grad = softmax(logits)
    grad[np.arange(n), y] -= 1
    grad /= n
    return loss, grad.astype(logits.dtype, copy=False)


# --------------------------------------------------------------------------- optimizers


class SGD:
    r"""Stochastic gradient descent with momentum: :math:`v \leftarrow \mu v + g`,
    :math:`p \leftarrow p - \eta v` (PyTorch's form), plus optional L2 weight decay."""

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lr = _check_positive(lr, "lr")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
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
        self.params = list(params)
        self.lr = _check_positive(lr, "lr")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must both lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.b1, self.b2 = float(b1), float(b2)
        self.eps = _check_positive(eps, "eps")
        self.weight_decay = float(weight_decay)
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
    if optimizer == "adam":
        return Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def train_epoch(model: Module, X: np.ndarray, y: np.ndarray, order: np.ndarray,
                batch_size: int, opt) -> tuple[float, float]:
    """One pass over ``(X, y)`` in the given ``order``, in batches of ``batch_size``.

    For each batch: forward, :func:`softmax_cross_entropy`, ``model.backward``, ``opt.step()``.
    Returns the epoch's mean loss and training accuracy, both measured on the fly (each batch
    before its step).  The loop of :func:`train` and of ``qcourse.qat.qat_finetune``.
    """
    n = len(order)
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        logits = model(X[idx])
        loss, grad = softmax_cross_entropy(logits, y[idx])
        model.backward(grad)
        opt.step()
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
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a qcourse.nn.Module, got {type(model).__name__}")
    X = _check_features(X, "X", images=True)
    y = _check_labels(y, X.shape[0], _num_outputs(model))
    epochs = _check_int(epochs, "epochs")
    batch_size = _check_int(batch_size, "batch_size")
    lr = _check_positive(lr, "lr")
    seed = _check_int(seed, "seed", minimum=0)
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress)
    model.set_training(True)
    try:
        for _ in bar:
            loss, acc = train_epoch(model, X, y, rng.permutation(n), batch_size, opt)
            history["loss"].append(loss)
            history["train_accuracy"].append(acc)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
    finally:
        model.set_training(False)
        bar.close()
    return history


def predict(model: Module, X: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Predicted class (argmax of the logits) for each row (or image) of ``X``, as int64."""
    X = _check_features(X, "X", images=True)
    batch_size = _check_int(batch_size, "batch_size")
    out = [np.argmax(model(X[s:s + batch_size]), axis=1) for s in range(0, X.shape[0], batch_size)]
    return np.concatenate(out).astype(np.int64)


def accuracy(model: Module, X: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> float:
    """Fraction of rows (or images) of ``X`` whose predicted class equals ``y``."""
    X = _check_features(X, "X", images=True)
    y = _check_labels(y, X.shape[0])
    return float(np.mean(predict(model, X, batch_size) == y))


class LayerActivations(NamedTuple):
    """What one layer saw (``input``) and produced (``output``) over the captured data."""

    input: np.ndarray
    output: np.ndarray


def capture_activations(model: Sequential, X: np.ndarray, layers=None,
                        batch_size: int = 4096) -> dict[str, LayerActivations]:
    """Run ``X`` through ``model`` and record each named layer's input and output.

    Uses temporary forward hooks (removed afterwards, even on error) and returns
    ``{name: LayerActivations(input, output)}`` for the layers named in ``layers`` (default:
    all), with the batches concatenated in order.  Other hooks already on the model still run,
    so what is recorded is what the layer really saw.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    X = _check_features(X, "X", images=True)
    batch_size = _check_int(batch_size, "batch_size")
    names = list(model.names) if layers is None else list(layers)
    for name in names:
        if name not in model.names:
            raise ValueError(f"layers names {name!r}, which is not in the model {model.names}")
    record: dict[str, tuple[list, list]] = {name: ([], []) for name in names}
    handles = []

    def make_hook(name):
        def hook(module, inp, out):
            record[name][0].append(np.array(inp, copy=True))
            record[name][1].append(np.array(out, copy=True))
        return hook

    try:
        for name in names:
            handles.append(model[name].register_forward_hook(make_hook(name)))
        for s in range(0, X.shape[0], batch_size):
            model(X[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {
        name: LayerActivations(np.concatenate(ins), np.concatenate(outs))
        for name, (ins, outs) in record.items()
    }
