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
:class:`FeedForward`, :class:`TransformerBlock`, :class:`TransformerLM`; a float
:class:`KVCache` for generation (:func:`generate`); the text (:func:`lm_windows`,
:func:`random_windows`), loss and training (:func:`lm_loss`, :func:`train_lm`, with a tqdm bar),
evaluation in bits per byte (:func:`evaluate_lm`) and the inputs of every linear layer
(:func:`linear_inputs`, for calibration).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from qcourse.nn.core import Adam, Linear, Module, softmax_cross_entropy

__all__ = [
    "CausalSelfAttention",
    "Embedding",
    "FeedForward",
    "GELU",
    "KVCache",
    "LMConfig",
    "LMEvaluation",
    "LMTraining",
    "LayerNorm",
    "TrainedLM",
    "TransformerBlock",
    "TransformerLM",
    "evaluate_lm",
    "generate",
    "linear_inputs",
    "lm_loss",
    "lm_windows",
    "load_lm",
    "one_blas_thread",
    "random_windows",
    "save_lm",
    "shipped_lm_path",
    "train_lm",
    "train_reference_lm",
]

VOCAB = 256  # bytes


# --------------------------------------------------------------------------- checks


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_ids(ids, name: str = "ids", max_len: int | None = None) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of byte values, got {type(ids).__name__}")
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
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name} must be a floating numpy.ndarray, got {got}")
    if x.ndim != 3 or x.shape[2] != d:
        raise ValueError(f"{name} must have shape (batch, tokens, {d}), got {x.shape}")
    return x


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(_check_int(seed, "seed", minimum=0))


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
        self.num = _check_int(num, "num")
        self.d = _check_int(d, "d")
        dtype = _check_dtype(dtype)
        self.weight = (_rng(seed).normal(0.0, std, size=(self.num, self.d))).astype(dtype)
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
        self.d = _check_int(d, "d")
        dtype = _check_dtype(dtype)
        self.eps = float(eps)
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
        self.d = _check_int(d, "d")
        self.n_heads = _check_int(n_heads, "n_heads")
        if self.d % self.n_heads:
            raise ValueError(f"d={self.d} must be a multiple of n_heads={self.n_heads}")
        self.head_dim = self.d // self.n_heads
        rng = _rng(seed)
        self.qkv = _init_linear(Linear(d, 3 * d, dtype=dtype), rng, std)
        self.proj = _init_linear(Linear(d, d, dtype=dtype), rng, std if proj_std is None
                                 else proj_std)
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
        self.d = _check_int(d, "d")
        self.d_ff = _check_int(d_ff, "d_ff")
        rng = _rng(seed)
        self.fc1 = _init_linear(Linear(d, d_ff, dtype=dtype), rng, std)
        self.act = GELU()
        self.fc2 = _init_linear(Linear(d_ff, d, dtype=dtype), rng,
                                std if proj_std is None else proj_std)
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
        rng = _rng(seed)
        self.d = _check_int(d, "d")
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


class LMConfig(NamedTuple):
    """The shape of a :class:`TransformerLM`: width, heads, layers, MLP width, context length."""

    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    max_len: int = 128


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
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        for name, value in config._asdict().items():
            _check_int(value, f"config.{name}")
        self.config = config
        rng = _rng(seed)
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
    same in fewer bits.  ``nbytes`` counts the stored arrays.
    """

    def __init__(self, n_layers: int):
        self.n_layers = _check_int(n_layers, "n_layers")
        self._k: list[list[np.ndarray]] = [[] for _ in range(self.n_layers)]
        self._v: list[list[np.ndarray]] = [[] for _ in range(self.n_layers)]

    def _check_layer(self, layer) -> int:
        layer = _check_int(layer, "layer", minimum=0)
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
    if not isinstance(model, TransformerLM):
        raise TypeError(f"model must be a TransformerLM, got {type(model).__name__}")
    if not isinstance(prompt, (bytes, bytearray)) or len(prompt) == 0:
        raise TypeError("prompt must be non-empty bytes (encode a str with .encode())")
    n = _check_int(n, "n", minimum=0)
    if len(prompt) + n > model.config.max_len:
        raise ValueError(f"prompt ({len(prompt)} bytes) plus n={n} exceeds the context of "
                         f"{model.config.max_len} bytes")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if cache is not None and not use_cache:
        raise ValueError("cache= needs use_cache=True")
    rng = _rng(seed)
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
            p = _softmax_last(logits.astype(np.float64) / temperature)
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


# --------------------------------------------------------------------------- data, loss, training


def _as_bytes_array(data, name: str = "data") -> np.ndarray:
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return data
    raise TypeError(f"{name} must be bytes or a 1-D uint8 array, got {type(data).__name__}")


def lm_windows(data, length: int) -> np.ndarray:
    r"""Cut text into consecutive windows of ``length + 1`` bytes that overlap by one byte.

    Window :math:`i` is ``data[i*length : i*length + length + 1]``: its first ``length`` bytes are
    the input and its last ``length`` the targets, so every byte after the first is predicted
    exactly once (the last partial window is dropped).  Returns int64 (n_windows, length + 1).
    """
    arr = _as_bytes_array(data)
    length = _check_int(length, "length")
    n = (arr.size - 1) // length
    if n < 1:
        raise ValueError(f"data has {arr.size} bytes; a window needs {length + 1}")
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return arr[idx].astype(np.int64)


def random_windows(data, length: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` windows of ``length + 1`` bytes starting at offsets drawn from ``rng``."""
    arr = _as_bytes_array(data)
    starts = rng.integers(0, arr.size - length, size=batch)
    return arr[starts[:, None] + np.arange(length + 1)[None, :]].astype(np.int64)


def lm_loss(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean next-byte cross-entropy (nats) of logits (B, T, 256) and its gradient (B, T, 256).

    :func:`qcourse.nn.softmax_cross_entropy` on the (B*T) rows."""
    b, t, v = logits.shape
    loss, grad = softmax_cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t))
    return loss, grad.reshape(b, t, v)


class LMEvaluation(NamedTuple):
    """Held-out loss: nats per byte, bits per byte (nats / ln 2), perplexity (e^nats), bytes."""

    nats_per_byte: float
    bits_per_byte: float
    perplexity: float
    n_bytes: int


def evaluate_lm(model: Module, windows: np.ndarray, batch_size: int = 64) -> LMEvaluation:
    r"""Mean cross-entropy of ``model`` on ``windows`` (from :func:`lm_windows`), no training.

    ``model`` is a :class:`TransformerLM` (or anything mapping ids (B, T) to logits (B, T, 256),
    such as a copy with quantized layers).  Bits per byte :math:`= \bar\ell / \ln 2`, perplexity
    :math:`= e^{\bar\ell}` with :math:`\bar\ell` the mean loss in nats over every predicted byte.
    """
    windows = _check_ids(windows, "windows")
    if windows.shape[1] < 2:
        raise ValueError("windows must hold at least two bytes each (input and target)")
    batch_size = _check_int(batch_size, "batch_size")
    total = 0.0
    for s in range(0, windows.shape[0], batch_size):
        w = windows[s:s + batch_size]
        logits = np.asarray(model(w[:, :-1]), dtype=np.float64)
        z = logits - logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=-1))
        tgt = np.take_along_axis(z, w[:, 1:, None], axis=-1)[..., 0]
        total += float(np.sum(lse - tgt))
    n = windows.shape[0] * (windows.shape[1] - 1)
    nats = total / n
    return LMEvaluation(nats, nats / math.log(2), math.exp(nats), n)


def linear_inputs(model: TransformerLM, ids: np.ndarray, layers=None,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """What each linear layer receives on ``ids`` (B, T): ``{name: (B*T, in_features)}``.

    ``layers`` picks names from :meth:`TransformerLM.named_linears` (default: all of the blocks).
    Temporary forward pre-hooks record the inputs (the calibration data of SmoothQuant, GPTQ,
    AWQ); they are removed afterwards, even on error.
    """
    if not isinstance(model, TransformerLM):
        raise TypeError(f"model must be a TransformerLM, got {type(model).__name__}")
    ids = _check_ids(ids, max_len=model.config.max_len)
    batch_size = _check_int(batch_size, "batch_size")
    available = dict(model.named_linears(include_head=True))
    names = [n for n, _ in model.named_linears()] if layers is None else list(layers)
    for name in names:
        if name not in available:
            raise ValueError(f"layers names {name!r}; the model's linear layers are "
                             f"{sorted(available)}")
    record: dict[str, list[np.ndarray]] = {name: [] for name in names}
    handles = []

    def make_hook(name):
        def hook(module, inp):
            record[name].append(np.array(inp, copy=True))
        return hook

    try:
        for name in names:
            handles.append(available[name].register_forward_pre_hook(make_hook(name)))
        for s in range(0, ids.shape[0], batch_size):
            model(ids[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: np.concatenate(parts) for name, parts in record.items()}


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _clip_gradients(params, max_norm: float) -> float:
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for _, g in params))
    if norm > max_norm:
        f = max_norm / norm
        for _, g in params:
            g *= g.dtype.type(f)
    return norm


def train_lm(model: TransformerLM, data, *, steps: int, batch_size: int = 32, lr: float = 3e-3,
             warmup: int = 100, clip: float = 1.0, seed: int = 0, progress: bool = True,
             callback: Callable[[int, TransformerLM], None] | None = None) -> dict[str, list]:
    r"""Train ``model`` on the bytes ``data`` with Adam, next-byte cross-entropy.

    Each step draws ``batch_size`` windows of ``max_len + 1`` bytes at offsets from
    ``np.random.default_rng(seed)`` (:func:`random_windows`), runs forward, :func:`lm_loss`,
    backward, clips the gradient's global norm to ``clip``, and takes one Adam step with the
    learning rate warmed up linearly over ``warmup`` steps, then decayed along a cosine to a
    tenth of ``lr``.  Deterministic: the same arguments give bit-identical weights.
    ``callback(step, model)`` runs after steps ``0 .. steps-1`` (e.g. to record statistics).
    Returns ``{"loss": [...], "grad_norm": [...]}``, one entry per step; ``progress=True`` shows a
    tqdm bar.
    """
    if not isinstance(model, TransformerLM):
        raise TypeError(f"model must be a TransformerLM, got {type(model).__name__}")
    arr = _as_bytes_array(data)
    steps = _check_int(steps, "steps")
    batch_size = _check_int(batch_size, "batch_size")
    warmup = _check_int(warmup, "warmup", minimum=0)
    seed = _check_int(seed, "seed", minimum=0)
    t = model.config.max_len
    if arr.size <= t + 1:
        raise ValueError(f"data has {arr.size} bytes; training windows need {t + 2}")
    params = model.parameters()
    opt = Adam(params, lr=lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    history: dict[str, list] = {"loss": [], "grad_norm": []}
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        w = random_windows(arr, t, batch_size, rng)
        logits = model(w[:, :-1])
        loss, grad = lm_loss(logits, w[:, 1:])
        model.backward(grad)
        norm = _clip_gradients(params, clip)
        opt.lr = _lr_at(step, steps, lr, warmup)
        opt.step()
        history["loss"].append(loss)
        history["grad_norm"].append(norm)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{loss / math.log(2):.3f}")
        if callback is not None:
            callback(step, model)
    bar.close()
    return history


# --------------------------------------------------------------------------- the shipped model


class LMTraining(NamedTuple):
    """How the shipped model (``qcourse/data/lm.npz``) is trained: :func:`train_reference_lm`.

    ``probe_every`` steps, the held-out loss on the first ``probe_bytes`` held-out bytes and the
    per-channel abs-max of every linear layer's input are recorded (the transformer chapter
    plots how outlier channels appear).
    """

    config: LMConfig = LMConfig()
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    clip: float = 1.0
    probe_every: int = 100
    probe_bytes: int = 4096


class TrainedLM(NamedTuple):
    """A trained model and its training record (what :func:`load_lm` returns).

    ``history`` holds arrays: ``train_loss`` (one per step, nats), ``probe_steps``,
    ``probe_heldout_bpb``, ``heldout_bpb`` (one entry: the whole held-out text, stored weights)
    and, per linear layer name, ``absmax/<name>`` of shape (n_probes, in_features).  ``meta``
    holds the Python and NumPy versions and the SHA-256 of the text the model was trained on
    (:func:`qcourse.datasets.pydoc_text_digest`).
    """

    model: TransformerLM
    training: LMTraining
    history: dict[str, np.ndarray]
    meta: dict[str, str]


def _round_weights(model: TransformerLM) -> None:
    """Round every parameter to float16 and back: the weights ship as float16."""
    for _, p in model.named_parameters():
        p[...] = p.astype(np.float16).astype(p.dtype)


def train_reference_lm(training: LMTraining | None = None, *,
                       progress: bool = True) -> TrainedLM:
    """Train the course's language model on the training text, as the shipped file was made.

    Builds ``TransformerLM(training.config, seed=training.seed)``, runs :func:`train_lm` on
    ``qcourse.datasets.load_pydoc_text("train")`` with the settings in ``training``, records the
    probes described in :class:`LMTraining`, and finally rounds the weights to float16 (the
    stored precision; the model computes in float32).  Deterministic: ``python -m
    qcourse.data.make_lm`` reproduces ``qcourse/data/lm.npz`` byte for byte on the machine that
    made it.
    """
    from qcourse.datasets import load_pydoc_text, pydoc_text_digest

    training = LMTraining() if training is None else training
    if not isinstance(training, LMTraining):
        raise TypeError(f"training must be an LMTraining, got {type(training).__name__}")
    model = TransformerLM(training.config, seed=training.seed)
    probe = lm_windows(load_pydoc_text("heldout")[:training.probe_bytes + 1],
                       training.config.max_len)
    names = [n for n, _ in model.named_linears()]
    steps_seen: list[int] = []
    bpb: list[float] = []
    absmax: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def probe_now(step: int, m: TransformerLM) -> None:
        inputs = linear_inputs(m, probe[:, :-1])
        for n in names:
            absmax[n].append(np.abs(inputs[n]).max(axis=0))
        steps_seen.append(step)
        bpb.append(evaluate_lm(m, probe).bits_per_byte)

    def record(step: int, m: TransformerLM) -> None:
        if (step + 1) % training.probe_every == 0 and step + 1 < training.steps:
            probe_now(step + 1, m)

    probe_now(0, model)
    hist = train_lm(model, load_pydoc_text("train"), steps=training.steps,
                    batch_size=training.batch_size, lr=training.lr, warmup=training.warmup,
                    clip=training.clip, seed=training.seed, progress=progress, callback=record)
    _round_weights(model)
    probe_now(training.steps, model)  # the last probe sees the stored weights
    heldout = evaluate_lm(model, lm_windows(load_pydoc_text("heldout"), training.config.max_len))
    history = {"train_loss": np.array(hist["loss"], dtype=np.float64),
               "probe_steps": np.array(steps_seen, dtype=np.int64),
               "probe_heldout_bpb": np.array(bpb, dtype=np.float64),
               "heldout_bpb": np.array([heldout.bits_per_byte])}
    for n in names:
        history[f"absmax/{n}"] = np.stack(absmax[n]).astype(np.float32)
    meta = {"python": ".".join(str(v) for v in __import__("sys").version_info[:3]),
            "text_sha256": pydoc_text_digest(), "numpy": np.__version__}
    return TrainedLM(model, training, history, meta)


def save_lm(path, trained: TrainedLM) -> None:
    """Write ``trained`` as an ``.npz`` whose bytes depend only on its contents.

    ``numpy.savez_compressed`` stamps each member with the current time; this writer fixes the
    timestamps (1980-01-01), so the same model gives the same file.  Parameters are stored as
    float16 under ``param/<name>``; settings and meta as JSON.
    """
    import io
    import json
    import zipfile

    if not isinstance(trained, TrainedLM):
        raise TypeError(f"trained must be a TrainedLM, got {type(trained).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for name, p in trained.model.named_parameters():
        arrays[f"param/{name}"] = p.astype(np.float16)
    for name, a in trained.history.items():
        arrays[f"history/{name}"] = np.asarray(a)
    settings = trained.training._asdict()
    settings["config"] = trained.training.config._asdict()
    arrays["settings"] = np.array(json.dumps(settings, sort_keys=True))
    arrays["meta"] = np.array(json.dumps(trained.meta, sort_keys=True))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def shipped_lm_path():
    """Where the trained model ships: ``qcourse/data/lm.npz`` (a path-like resource)."""
    from importlib import resources

    return resources.files("qcourse").joinpath("data").joinpath("lm.npz")


def load_lm(path=None) -> TrainedLM:
    """Read a model written by :func:`save_lm` (default: the shipped ``qcourse/data/lm.npz``).

    The float16 weights are loaded into a float32 :class:`TransformerLM`.  Each call returns a
    fresh model, so callers may modify it.
    """
    import json

    src = shipped_lm_path() if path is None else path
    if hasattr(src, "open") and not isinstance(src, str):
        opener = src.open("rb")
    else:
        opener = open(src, "rb")
    with opener as fh, np.load(fh, allow_pickle=False) as data:
        settings = json.loads(str(data["settings"]))
        meta = json.loads(str(data["meta"]))
        config = LMConfig(**settings.pop("config"))
        training = LMTraining(config=config, **settings)
        model = TransformerLM(config, seed=0)
        model.load_state_dict({k.removeprefix("param/"): data[k].astype(np.float32)
                               for k in data.files if k.startswith("param/")})
        history = {k.removeprefix("history/"): np.array(data[k]) for k in data.files
                   if k.startswith("history/")}
    return TrainedLM(model, training, history, meta)
