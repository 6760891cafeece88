r"""A tiny decoder-only byte-level language model, forward and backward written out in NumPy.

The model of the transformer, kv_cache and weight_only chapters.  A sequence of bytes
``ids`` (batch B, length T, values 0..255) becomes a residual stream :math:`h` of shape
(B, T, d):

.. math::

    h_0 = E[\text{ids}] + P[0..T-1], \qquad
    h_{\ell+1} = u + \mathrm{MLP}(\mathrm{LN}_2(u)), \quad
    u = h_\ell + \mathrm{Attn}(\mathrm{LN}_1(h_\ell)), \qquad
    \text{logits} = \mathrm{LN}_f(h_L)\, W_{\text{head}}^T + b_{\text{head}}

(pre-norm blocks, as GPT-2).  Every matrix product with a weight is a :class:`qcourse.nn.Linear`
on 2-D input (rows = tokens), so the hooks of :mod:`qcourse.nn` see what each linear layer
computes, and a quantized layer can take a Linear's place (:meth:`TransformerLM.replace_linears`).
Each module has ``forward`` and ``backward``; ``tests/test_nn_lm.py`` checks every backward
against finite differences in float64.

Pieces: :class:`Embedding`, :class:`LayerNorm`, :class:`GELU`, :class:`CausalSelfAttention`,
:class:`FeedForward`, :class:`TransformerBlock`, :class:`TransformerLM` (its shape: an
:class:`LMConfig`); a float :class:`KVCache` for generation (:func:`generate`).  The text, loss,
training, evaluation and the shipped model are in ``qcourse/nn/lm_training.py``.

Sizes are bounded (every chapter runs far below the bounds; a mistyped ``2**31`` is refused at
once instead of filling the memory): a model has at most :data:`MAX_LAYERS` blocks, a context of
at most :data:`MAX_CONTEXT` tokens and at most ``MAX_ELEMENTS`` (2**28) parameters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    check_bool,
    check_dtype,
    check_instance,
    check_int,
    check_real,
    check_size,
    describe,
)
from qcourse.nn.core import Linear, Module

__all__ = [
    "CausalSelfAttention",
    "Embedding",
    "FeedForward",
    "GELU",
    "KVCache",
    "LMConfig",
    "LayerNorm",
    "TransformerBlock",
    "TransformerLM",
    "generate",
    "one_blas_thread",
]

VOCAB = 256  # bytes
#: Most blocks (layers) a model may have.
MAX_LAYERS = 1024
#: Longest context (``max_len``, tokens) a model may have: attention stores T x T scores per head.
MAX_CONTEXT = 8192
#: Largest standard deviation of a weight initialization (a larger one is a typo; float32 weights
#: drawn from it would overflow).
MAX_INIT_STD = 100.0


# --------------------------------------------------------------------------- checks


def _check_ids(ids, name: str = "ids", max_len: int | None = None) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of byte values, got {describe(ids)}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype (byte values 0..255), got {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, tokens), got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= VOCAB:
        raise ValueError(f"{name} must hold byte values in [0, 255], got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name} has {ids.shape[1]} tokens, more than the model's context "
                         f"of {max_len}")
    return ids


def _check_hidden(x, d: int, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating numpy.ndarray, got {describe(x)}")
    if x.ndim != 3 or x.shape[2] != d:
        raise ValueError(f"{name} must have shape (batch, tokens, {d}), got {x.shape}")
    return x


def _float_dtype(dtype) -> np.dtype:
    return check_dtype(dtype, "dtype", (np.float32, np.float64))


def _init_rng(seed) -> np.random.Generator:
    """A generator: ``seed`` itself, or a new one seeded with the int ``seed`` >= 0."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_int(seed, "seed", 0))


def _init_std(std, name: str = "std") -> float:
    return check_real(std, name, 0.0, MAX_INIT_STD)


def _check_width(d, name: str) -> int:
    return check_size(d, name, MAX_ELEMENTS)


def _check_sizes(a, name_a: str, b, name_b: str, what: str) -> tuple[int, int]:
    """Two sizes whose product (the size of ``what``) is at most ``MAX_ELEMENTS``."""
    a, b = _check_width(a, name_a), _check_width(b, name_b)
    if a * b > MAX_ELEMENTS:
        raise ValueError(f"{name_a} * {name_b} must be at most {MAX_ELEMENTS} ({what}), got "
                         f"{a} * {b}")
    return a, b


def _check_heads(n_heads, d: int, name: str = "n_heads") -> int:
    n_heads = check_size(n_heads, name, d)
    if d % n_heads:
        raise ValueError(f"d={d} must be a multiple of {name}={n_heads}")
    return n_heads


def _rows_bound(per_row: int) -> int:
    """Most rows of ``per_row`` numbers one batch may hold (``MAX_ELEMENTS`` numbers in all)."""
    return max(1, MAX_ELEMENTS // max(1, per_row))


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread():
    """A context in which NumPy's BLAS runs on one thread (``threadpoolctl``).

    The model's matrices are small (a few hundred rows and columns, and attention's batched
    T x d_h products): a second BLAS thread gains little on them, and on a machine whose other
    cores are busy the threads wait for each other at every call, which was measured to make a
    batched product a hundred times slower.  One thread also keeps every sum in a fixed order.
    """
    try:
        return _blas_controller().limit(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- layers


class Embedding(Module):
    r"""Lookup table: ``weight`` (num, d); :math:`y_{bt} = W_{\text{ids}_{bt}}`.

    Backward adds each row of the gradient into the row of ``grad_weight`` it was read from
    (``np.add.at``: a byte that occurs twice gets both contributions).  There is no gradient with
    respect to the integer ids.
    """

    def __init__(self, num: int, d: int, *, seed=0, std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.num, self.d = _check_sizes(num, "num", d, "d", "the table's size")
        dtype = _float_dtype(dtype)
        std = _init_std(std)
        self.weight = (_init_rng(seed).normal(0.0, std, size=(self.num, self.d))).astype(dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self._ids: np.ndarray | None = None

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if ids.min() < 0 or ids.max() >= self.num:
            raise ValueError(f"ids must lie in [0, {self.num - 1}], got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        self._ids = ids
        return self.weight[ids]

    def backward(self, grad_out: np.ndarray) -> None:
        if self._ids is None:
            raise RuntimeError("Embedding.backward called before forward")
        self.grad_weight[...] = 0
        np.add.at(self.grad_weight, self._ids.reshape(-1),
                  grad_out.reshape(-1, self.d).astype(self.weight.dtype, copy=False))

    def parameters(self):
        return [(self.weight, self.grad_weight)]

    def named_parameters(self):
        return [("weight", self.weight)]

    def __repr__(self) -> str:
        return f"Embedding({self.num}, {self.d})"


class LayerNorm(Module):
    r"""Layer normalization over the last axis (Ba, Kiros and Hinton, 2016).

    .. math::

        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \odot \hat x + \beta

    with :math:`\mu, \sigma^2` the mean and (biased) variance of each row.  Backward, with
    :math:`g = \partial L/\partial y` and :math:`\hat g = g \odot \gamma`:

    .. math::

        \frac{\partial L}{\partial x} = \frac{1}{\sqrt{\sigma^2+\epsilon}}
        \Big(\hat g - \overline{\hat g} - \hat x\, \overline{\hat g \odot \hat x}\Big), \qquad
        \frac{\partial L}{\partial \gamma} = \sum g \odot \hat x, \qquad
        \frac{\partial L}{\partial \beta} = \sum g

    (bars: means over the row).  The SmoothQuant chapter divides :math:`\gamma` and
    :math:`\beta` by per-channel factors: that is why the gain is a parameter of its own.
    """

    def __init__(self, d: int, *, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        self.d = _check_width(d, "d")
        dtype = _float_dtype(dtype)
        self.eps = check_real(eps, "eps", 0.0, lo_open=True)
        self.weight = np.ones(self.d, dtype=dtype)
        self.bias = np.zeros(self.d, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self._saved: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(self.weight.dtype, copy=False)
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = np.mean(xc * xc, axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(var + self.eps)
        xhat = xc * rstd
        self._saved = (xhat, rstd)
        return xhat * self.weight + self.bias

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._saved is None:
            raise RuntimeError("LayerNorm.backward called before forward")
        xhat, rstd = self._saved
        g = grad_out.astype(self.weight.dtype, copy=False)
        lead = tuple(range(g.ndim - 1))
        self.grad_weight[...] = np.sum(g * xhat, axis=lead)
        self.grad_bias[...] = np.sum(g, axis=lead)
        gh = g * self.weight
        return rstd * (gh - gh.mean(axis=-1, keepdims=True)
                       - xhat * np.mean(gh * xhat, axis=-1, keepdims=True))

    def parameters(self):
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]

    def named_parameters(self):
        return [("weight", self.weight), ("bias", self.bias)]

    def __repr__(self) -> str:
        return f"LayerNorm({self.d})"


_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Module):
    r"""GELU in the tanh form of GPT-2 (Hendrycks and Gimpel, 2016).

    .. math::

        y = \tfrac12 x\,(1 + \tanh u), \quad u = c\,(x + 0.044715\,x^3), \quad c = \sqrt{2/\pi};
        \qquad \frac{dy}{dx} = \tfrac12 (1 + \tanh u) + \tfrac12 x\,(1 - \tanh^2 u)\,
        c\,(1 + 3 \cdot 0.044715\,x^2).
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        t = np.tanh(x.dtype.type(_GELU_C) * (x + x.dtype.type(0.044715) * x * x * x))
        self._saved = (x, t)
        return x.dtype.type(0.5) * x * (1 + t)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._saved is None:
            raise RuntimeError("GELU.backward called before forward")
        x, t = self._saved
        c = x.dtype.type(_GELU_C)
        dy = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        return (grad_out * dy).astype(x.dtype, copy=False)

    def __repr__(self) -> str:
        return "GELU()"


def _softmax_last(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _init_linear(layer: Linear, rng: np.random.Generator, std: float) -> Linear:
    """GPT-2's initialization: weights N(0, std), bias 0 (Linear's own is He-uniform)."""
    layer.weight[...] = rng.normal(0.0, std, size=layer.weight.shape)
    layer.bias[...] = 0
    return layer


class CausalSelfAttention(Module):
    r"""Multi-head causal self-attention with one fused ``qkv`` projection and an output ``proj``.

    For input :math:`x` (B, T, d), ``qkv`` (a :class:`Linear` d -> 3d) gives queries, keys and
    values, split into H heads of :math:`d_h = d/H`; per head

    .. math::

        S = \frac{Q K^T}{\sqrt{d_h}} + M, \qquad P = \mathrm{softmax}(S), \qquad O = P V

    with :math:`M_{ij} = -\infty` for :math:`j > i` (a token sees only itself and the past); the
    heads are concatenated and ``proj`` (d -> d) maps them back.  After a forward, ``q``, ``k``,
    ``v`` (B, H, T, d_h) and ``probs`` (B, H, T, T) hold what was computed (the transformer
    chapter measures them).  :meth:`forward_cached` attends over a :class:`KVCache` instead.
    """

    def __init__(self, d: int, n_heads: int, *, seed=0, std: float = 0.02,
                 proj_std: float | None = None, dtype=np.float32):
        super().__init__()
        self.d = _check_width(d, "d")
        self.n_heads = _check_heads(n_heads, self.d)
        self.head_dim = self.d // self.n_heads
        std = _init_std(std)
        proj_std = std if proj_std is None else _init_std(proj_std, "proj_std")
        dtype = _float_dtype(dtype)
        if 3 * self.d * self.d > MAX_ELEMENTS:
            raise ValueError(f"d must be at most {math.isqrt(MAX_ELEMENTS // 3)} (the qkv weight "
                             f"has 3 d^2 entries, at most {MAX_ELEMENTS}), got {self.d}")
        rng = _init_rng(seed)
        self.qkv = _init_linear(Linear(self.d, 3 * self.d, dtype=dtype), rng, std)
        self.proj = _init_linear(Linear(self.d, self.d, dtype=dtype), rng, proj_std)
        self.q = self.k = self.v = self.probs = None
        self._shape: tuple[int, int] | None = None

    def _split(self, h: np.ndarray, b: int, t: int):
        h = h.reshape(b, t, 3, self.n_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        return h[0], h[1], h[2]

    def _merge(self, o: np.ndarray) -> np.ndarray:
        b, _, t, _ = o.shape
        return o.transpose(0, 2, 1, 3).reshape(b * t, self.d)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, offset: int = 0):
        r"""Scores, softmax and weighted values for queries at positions ``offset + i``.

        ``q`` (B, H, n, d_h), ``k`` and ``v`` (B, H, t, d_h) with :math:`t = \text{offset} + n`;
        query i sees keys 0 .. offset + i.  Returns ``(out, probs)``.
        """
        n, t = q.shape[2], k.shape[2]
        scale = q.dtype.type(1.0 / math.sqrt(self.head_dim))
        s = (q @ k.transpose(0, 1, 3, 2)) * scale
        future = np.arange(t)[None, :] > (offset + np.arange(n))[:, None]
        s = np.where(future, q.dtype.type(-np.inf), s)
        p = _softmax_last(s)
        return p @ v, p

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_hidden(x, self.d)
        b, t, _ = x.shape
        q, k, v = self._split(self.qkv(x.reshape(b * t, self.d)), b, t)
        o, p = self.attend(q, k, v)
        self.q, self.k, self.v, self.probs = q, k, v, p
        self._shape = (b, t)
        return self.proj(self._merge(o)).reshape(b, t, self.d)

    def forward_cached(self, x: np.ndarray, cache, layer: int) -> np.ndarray:
        """Attention for new tokens ``x`` (B, n, d): their keys and values are appended to
        ``cache`` (layer ``layer``) and the queries attend over everything the cache holds."""
        x = _check_hidden(x, self.d)
        b, n, _ = x.shape
        offset = cache.length(layer)
        q, k, v = self._split(self.qkv(x.reshape(b * n, self.d)), b, n)
        cache.append(layer, k, v)
        keys, values = cache.keys(layer), cache.values(layer)
        o, p = self.attend(q, keys.astype(q.dtype, copy=False),
                           values.astype(q.dtype, copy=False), offset)
        self.q, self.k, self.v, self.probs = q, keys, values, p
        return self.proj(self._merge(o)).reshape(b, n, self.d)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        r"""With :math:`G = \partial L/\partial O`: :math:`\partial V = P^T G`,
        :math:`\partial P = G V^T`, :math:`\partial S = P \odot (\partial P - \mathrm{rowsum}
        (\partial P \odot P))`, :math:`\partial Q = \partial S\, K / \sqrt{d_h}`,
        :math:`\partial K = \partial S^T Q / \sqrt{d_h}`."""
        if self._shape is None or self.probs is None:
            raise RuntimeError("CausalSelfAttention.backward called before forward")
        b, t = self._shape
        go = self.proj.backward(grad_out.reshape(b * t, self.d))
        go = go.reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        p, q, k, v = self.probs, self.q, self.k, self.v
        scale = q.dtype.type(1.0 / math.sqrt(self.head_dim))
        dv = p.transpose(0, 1, 3, 2) @ go
        dp = go @ v.transpose(0, 1, 3, 2)
        ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q
        dh = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b * t, 3 * self.d)
        return self.qkv.backward(dh).reshape(b, t, self.d)

    def linears(self) -> list[tuple[str, Linear]]:
        return [("qkv", self.qkv), ("proj", self.proj)]


class FeedForward(Module):
    r"""The MLP of a block: :math:`\mathrm{fc2}(\mathrm{GELU}(\mathrm{fc1}(x)))`, d -> f -> d."""

    def __init__(self, d: int, d_ff: int, *, seed=0, std: float = 0.02,
                 proj_std: float | None = None, dtype=np.float32):
        super().__init__()
        self.d, self.d_ff = _check_sizes(d, "d", d_ff, "d_ff", "the weights' size")
        std = _init_std(std)
        proj_std = std if proj_std is None else _init_std(proj_std, "proj_std")
        dtype = _float_dtype(dtype)
        rng = _init_rng(seed)
        self.fc1 = _init_linear(Linear(self.d, self.d_ff, dtype=dtype), rng, std)
        self.act = GELU()
        self.fc2 = _init_linear(Linear(self.d_ff, self.d, dtype=dtype), rng, proj_std)
        self._shape: tuple[int, int] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_hidden(x, self.d)
        b, t, _ = x.shape
        self._shape = (b, t)
        return self.fc2(self.act(self.fc1(x.reshape(b * t, self.d)))).reshape(b, t, self.d)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise RuntimeError("FeedForward.backward called before forward")
        b, t = self._shape
        g = self.fc2.backward(grad_out.reshape(b * t, self.d))
        return self.fc1.backward(self.act.backward(g)).reshape(b, t, self.d)

    def linears(self) -> list[tuple[str, Linear]]:
        return [("fc1", self.fc1), ("fc2", self.fc2)]


class TransformerBlock(Module):
    r"""Pre-norm block: :math:`u = h + \mathrm{attn}(\mathrm{ln1}(h))`,
    :math:`y = u + \mathrm{mlp}(\mathrm{ln2}(u))`.  Backward adds the residual paths."""

    def __init__(self, d: int, n_heads: int, d_ff: int, *, seed=0, proj_std: float | None = None,
                 dtype=np.float32):
        super().__init__()
        self.d = _check_width(d, "d")
        _check_heads(n_heads, self.d)
        _check_width(d_ff, "d_ff")
        if proj_std is not None:
            _init_std(proj_std, "proj_std")
        _float_dtype(dtype)
        rng = _init_rng(seed)
        self.ln1 = LayerNorm(d, dtype=dtype)
        self.attn = CausalSelfAttention(d, n_heads, seed=rng, proj_std=proj_std, dtype=dtype)
        self.ln2 = LayerNorm(d, dtype=dtype)
        self.mlp = FeedForward(d, d_ff, seed=rng, proj_std=proj_std, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _check_hidden(x, self.d)
        u = x + self.attn(self.ln1(x))
        return u + self.mlp(self.ln2(u))

    def forward_cached(self, x: np.ndarray, cache, layer: int) -> np.ndarray:
        u = x + self.attn.forward_cached(self.ln1(x), cache, layer)
        return u + self.mlp(self.ln2(u))

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        gu = grad_out + self.ln2.backward(self.mlp.backward(grad_out))
        return gu + self.ln1.backward(self.attn.backward(gu))

    def modules(self) -> list[tuple[str, Module]]:
        return [("ln1", self.ln1), ("attn", self.attn), ("ln2", self.ln2), ("mlp", self.mlp)]

    def parameters(self):
        return [pair for _, m in self._param_modules() for pair in m.parameters()]

    def named_parameters(self):
        return [(f"{n}.{pn}", p) for n, m in self._param_modules() for pn, p in
                m.named_parameters()]

    def _param_modules(self) -> list[tuple[str, Module]]:
        return [("ln1", self.ln1), ("attn.qkv", self.attn.qkv), ("attn.proj", self.attn.proj),
                ("ln2", self.ln2), ("mlp.fc1", self.mlp.fc1), ("mlp.fc2", self.mlp.fc2)]


class _LMShape(NamedTuple):
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    max_len: int


def _parameter_count(d_model: int, n_layers: int, d_ff: int, max_len: int) -> int:
    """Parameters of a :class:`TransformerLM` of this shape (embeddings, blocks, head)."""
    d, f = d_model, d_ff
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return VOCAB * d + max_len * d + n_layers * block + 2 * d + VOCAB * d + VOCAB


class LMConfig(_LMShape):
    """The shape of a :class:`TransformerLM`: width, heads, layers, MLP width, context length.

    Checked when made: every field an int >= 1, ``d_model`` a multiple of ``n_heads``,
    ``n_layers`` at most :data:`MAX_LAYERS`, ``max_len`` at most :data:`MAX_CONTEXT`, and at most
    ``MAX_ELEMENTS`` (2**28) parameters in all (as :meth:`TransformerLM.num_parameters` counts).
    """

    __slots__ = ()

    def __new__(cls, d_model: int = 128, n_heads: int = 4, n_layers: int = 2, d_ff: int = 512,
                max_len: int = 128):
        d_model = _check_width(d_model, "d_model")
        n_heads = check_size(n_heads, "n_heads", d_model)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        n_layers = check_size(n_layers, "n_layers", MAX_LAYERS)
        d_ff = _check_width(d_ff, "d_ff")
        max_len = check_size(max_len, "max_len", MAX_CONTEXT)
        count = _parameter_count(d_model, n_layers, d_ff, max_len)
        if count > MAX_ELEMENTS:
            raise ValueError(f"d_model={d_model}, n_layers={n_layers}, d_ff={d_ff} and "
                             f"max_len={max_len} give {count} parameters, more than "
                             f"{MAX_ELEMENTS}")
        return super().__new__(cls, d_model, n_heads, n_layers, d_ff, max_len)

    def _replace(self, **changes) -> LMConfig:
        return type(self)(**{**self._asdict(), **changes})


class TransformerLM(Module):
    r"""Decoder-only byte-level language model; ``model(ids)`` gives logits (B, T, 256).

    Parameters are named ``tok_emb.weight``, ``pos_emb.weight``, ``blocks.{i}.ln1.weight``,
    ``blocks.{i}.attn.qkv.weight``, ..., ``ln_f.bias``, ``head.weight`` (see
    :meth:`named_parameters`); :meth:`state_dict` / :meth:`load_state_dict` copy them.  The linear
    layers by name: :meth:`named_linears`; swap them for quantized versions with
    :meth:`replace_linears` (on a copy, :meth:`copy`).  ``seed`` fixes the initialization
    (GPT-2's: N(0, 0.02), the residual projections ``proj`` and ``fc2`` scaled by
    :math:`1/\sqrt{2L}`).
    """

    def __init__(self, config: LMConfig | None = None, *, seed=0, dtype=np.float32):
        super().__init__()
        config = LMConfig() if config is None else config
        check_instance(config, "config", LMConfig, "a qcourse.nn.LMConfig")
        self.config = config = LMConfig(*config)     # checked again: _make skips the checks
        dtype = _float_dtype(dtype)
        rng = _init_rng(seed)
        d = config.d_model
        self.tok_emb = Embedding(VOCAB, d, seed=rng, dtype=dtype)
        self.pos_emb = Embedding(config.max_len, d, seed=rng, std=0.01, dtype=dtype)
        proj_std = 0.02 / math.sqrt(2 * config.n_layers)
        self.blocks = [TransformerBlock(d, config.n_heads, config.d_ff, seed=rng,
                                        proj_std=proj_std, dtype=dtype)
                       for _ in range(config.n_layers)]
        self.ln_f = LayerNorm(d, dtype=dtype)
        self.head = _init_linear(Linear(d, VOCAB, dtype=dtype), rng, 0.02)
        self._shape: tuple[int, int] | None = None

    # -- forward / backward ---------------------------------------------------------------------

    def embed(self, ids: np.ndarray, offset: int = 0) -> np.ndarray:
        """:math:`h_0`: token plus position embeddings, positions ``offset .. offset + T - 1``."""
        t = ids.shape[1]
        if offset + t > self.config.max_len:
            raise ValueError(f"positions up to {offset + t} exceed the context of "
                             f"{self.config.max_len} tokens")
        return self.tok_emb(ids) + self.pos_emb(np.arange(offset, offset + t)[None, :])

    def logits_from_hidden(self, h: np.ndarray) -> np.ndarray:
        b, t, d = h.shape
        return self.head(self.ln_f(h).reshape(b * t, d)).reshape(b, t, VOCAB)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_ids(ids, max_len=self.config.max_len)
        self._shape = ids.shape
        with one_blas_thread():
            h = self.embed(ids)
            for block in self.blocks:
                h = block(h)
            return self.logits_from_hidden(h)

    def forward_cached(self, ids: np.ndarray, cache) -> np.ndarray:
        """Logits (B, n, 256) for ``n`` new tokens, attending over (and extending) ``cache``."""
        ids = _check_ids(ids)
        offset = cache.length(0)
        with one_blas_thread():
            h = self.embed(ids, offset)
            for i, block in enumerate(self.blocks):
                h = block.forward_cached(h, cache, i)
            return self.logits_from_hidden(h)

    def backward(self, grad_out: np.ndarray) -> None:
        """``grad_out`` (B, T, 256) or (B*T, 256): gradient of the loss with respect to logits."""
        if self._shape is None:
            raise RuntimeError("TransformerLM.backward called before forward")
        b, t = self._shape
        with one_blas_thread():
            g = self.head.backward(grad_out.reshape(b * t, VOCAB))
            g = self.ln_f.backward(g.reshape(b, t, self.config.d_model))
            for block in reversed(self.blocks):
                g = block.backward(g)
            self.tok_emb.backward(g)
            self.pos_emb.backward(np.sum(g, axis=0, keepdims=True))

    # -- parameters and layers ------------------------------------------------------------------

    def _param_modules(self) -> list[tuple[str, Module]]:
        out: list[tuple[str, Module]] = [("tok_emb", self.tok_emb), ("pos_emb", self.pos_emb)]
        for i, block in enumerate(self.blocks):
            out += [(f"blocks.{i}.{n}", m) for n, m in block._param_modules()]
        return out + [("ln_f", self.ln_f), ("head", self.head)]

    def parameters(self):
        return [pair for _, m in self._param_modules() for pair in m.parameters()]

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        return [(f"{n}.{pn}", p) for n, m in self._param_modules() for pn, p in
                m.named_parameters()]

    def num_parameters(self) -> int:
        return int(sum(p.size for _, p in self.named_parameters()))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, by name."""
        return {name: p.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays from ``state`` into the parameters (same names and shapes required)."""
        params = dict(self.named_parameters())
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"state does not match the model: missing {missing}, "
                             f"unexpected {extra}")
        for name, p in params.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"state[{name!r}] has shape {value.shape}, expected {p.shape}")
            p[...] = value

    def named_linears(self, include_head: bool = False) -> list[tuple[str, Module]]:
        """The linear layers of the blocks, in the order they run: ``blocks.{i}.attn.qkv``,
        ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``; plus ``head`` if ``include_head``.  (After
        :meth:`replace_linears` the entries are the replacements.)"""
        out: list[tuple[str, Module]] = []
        for i, block in enumerate(self.blocks):
            out += [(f"blocks.{i}.attn.{n}", m) for n, m in block.attn.linears()]
            out += [(f"blocks.{i}.mlp.{n}", m) for n, m in block.mlp.linears()]
        if include_head:
            out.append(("head", self.head))
        return out

    def replace_linears(self, make: Callable[[str, Module], Module],
                        include_head: bool = False) -> TransformerLM:
        """Replace every linear layer ``m`` named ``name`` by ``make(name, m)`` (in place; call
        it on :meth:`copy` to keep the original).  Returns ``self``."""
        for name, layer in self.named_linears(include_head):
            new = make(name, layer)
            if not isinstance(new, Module):
                raise TypeError(f"make({name!r}, ...) must return a qcourse.nn.Module, got "
                                f"{type(new).__name__}")
            if name == "head":
                self.head = new
                continue
            _, i, part, attr = name.split(".")
            setattr(getattr(self.blocks[int(i)], part), attr, new)
        return self

    def copy(self) -> TransformerLM:
        """A deep copy (parameters and any replaced layers); hooks are not copied."""
        new = copy.deepcopy(self)
        for m in [new, *(m for _, m in new._all_modules())]:
            m._forward_hooks = {}
            m._forward_pre_hooks = {}
        return new

    def _all_modules(self) -> list[tuple[str, Module]]:
        out: list[tuple[str, Module]] = [("tok_emb", self.tok_emb), ("pos_emb", self.pos_emb)]
        for i, block in enumerate(self.blocks):
            out.append((f"blocks.{i}", block))
            for n, m in block.modules():
                out.append((f"blocks.{i}.{n}", m))
            out += [(f"blocks.{i}.attn.{n}", m) for n, m in block.attn.linears()]
            out += [(f"blocks.{i}.mlp.{n}", m) for n, m in block.mlp.linears()]
            out.append((f"blocks.{i}.mlp.act", block.mlp.act))
        return out + [("ln_f", self.ln_f), ("head", self.head)]

    def __repr__(self) -> str:
        c = self.config
        return (f"TransformerLM(d_model={c.d_model}, n_heads={c.n_heads}, n_layers={c.n_layers}, "
                f"d_ff={c.d_ff}, max_len={c.max_len}; {self.num_parameters()} parameters)")


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """The keys and values of every token seen so far, per layer, in float (B, H, t, d_h).

    The interface the model's cached forward uses: ``length(layer)``, ``append(layer, k, v)``,
    ``keys(layer)``, ``values(layer)``.  :class:`qcourse.kv_cache.QuantizedKVCache` stores the
    same in fewer bits.  ``nbytes`` counts the stored arrays.  ``n_layers``: 1 to
    :data:`MAX_LAYERS`.
    """

    def __init__(self, n_layers: int):
        self.n_layers = check_size(n_layers, "n_layers", MAX_LAYERS)
        self._k: list[list[np.ndarray]] = [[] for _ in range(self.n_layers)]
        self._v: list[list[np.ndarray]] = [[] for _ in range(self.n_layers)]

    def _check_layer(self, layer) -> int:
        layer = check_int(layer, "layer", 0)
        if layer >= self.n_layers:
            raise ValueError(f"layer must be < {self.n_layers}, got {layer}")
        return layer

    def length(self, layer: int = 0) -> int:
        return int(sum(k.shape[2] for k in self._k[self._check_layer(layer)]))

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        layer = self._check_layer(layer)
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(f"k and v must have the same shape (B, H, n, d_h), got {k.shape} "
                             f"and {v.shape}")
        self._k[layer].append(np.array(k, copy=True))
        self._v[layer].append(np.array(v, copy=True))

    def keys(self, layer: int) -> np.ndarray:
        return np.concatenate(self._k[self._check_layer(layer)], axis=2)

    def values(self, layer: int) -> np.ndarray:
        return np.concatenate(self._v[self._check_layer(layer)], axis=2)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for lst in (*self._k, *self._v) for a in lst))


def generate(model: TransformerLM, prompt: bytes, n: int, *, temperature: float = 0.0,
             seed: int = 0, cache=None, use_cache: bool = True) -> bytes:
    """Continue ``prompt`` by ``n`` bytes, one at a time through a KV cache.

    ``temperature=0`` picks the most likely byte (greedy); otherwise bytes are drawn from
    :math:`\\mathrm{softmax}(z/\\tau)` with ``np.random.default_rng(seed)``.  ``cache`` (default: a
    new float :class:`KVCache`) may be a quantized cache.  ``use_cache=False`` instead runs the
    whole sequence through the model again for every new byte (what the cache saves; the result
    is the same up to float rounding).  Prompt plus continuation must fit in the context
    (``model.config.max_len``).  Returns the continuation only.
    """
    check_instance(model, "model", TransformerLM, "a qcourse.nn.TransformerLM")
    if not isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"prompt must be bytes (encode a str with .encode()), got "
                        f"{describe(prompt)}")
    if len(prompt) == 0:
        raise ValueError("prompt must not be empty")
    n = check_int(n, "n", 0)
    if len(prompt) + n > model.config.max_len:
        raise ValueError(f"prompt ({len(prompt)} bytes) plus n={n} exceeds the context of "
                         f"{model.config.max_len} bytes")
    temperature = check_real(temperature, "temperature", 0.0)
    use_cache = check_bool(use_cache, "use_cache")
    if cache is not None:
        check_instance(cache, "cache", KVCache, "a qcourse.nn.KVCache (or a quantized one)")
        if not use_cache:
            raise ValueError("cache= needs use_cache=True")
        if cache.n_layers != model.config.n_layers:
            raise ValueError(f"cache must have the model's {model.config.n_layers} layers, got "
                             f"{cache.n_layers}")
    rng = _init_rng(seed)
    ids = np.frombuffer(bytes(prompt), np.uint8)[None, :].astype(np.int64)
    if use_cache:
        cache = KVCache(model.config.n_layers) if cache is None else cache
        if cache.length(0) != 0:
            raise ValueError("cache must be empty")
        logits = model.forward_cached(ids, cache)[0, -1]
    else:
        logits = model(ids)[0, -1]
    out = bytearray()
    for i in range(n):
        if temperature == 0:
            nxt = int(np.argmax(logits))
        else:
            z = logits.astype(np.float64)
            with np.errstate(over="ignore"):         # a tiny temperature: -inf, probability 0
                p = _softmax_last((z - z.max()) / temperature)
            nxt = int(rng.choice(VOCAB, p=p))
        out.append(nxt)
        if i + 1 == n:
            break
        if use_cache:
            logits = model.forward_cached(np.array([[nxt]], dtype=np.int64), cache)[0, -1]
        else:
            ids = np.concatenate([ids, [[nxt]]], axis=1)
            logits = model(ids)[0, -1]
    return bytes(out)
