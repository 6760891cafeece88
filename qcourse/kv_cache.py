r"""The KV cache: its size, and storing it in 8, 4 or 2 bits (or fp8) with per-token or
per-channel scales.

The kv_cache chapter (``book/kv_cache.md``) explains everything in this module.  A decoder keeps
the keys and values of every past token of every layer, so that each new token costs one
attention row instead of a pass over the whole prefix; that cache grows by
:math:`2 \cdot L \cdot H \cdot d_h` numbers per token (:func:`kv_bytes_per_token`).

* :func:`quantize_kv_group` stores a group of ``G`` consecutive tokens of keys or values with
  one scale and one offset (KIVI's asymmetric min-max grid, Liu et al., 2024) per token
  (``axis="token"``: a vector of :math:`d_h` channels) or per channel (``axis="channel"``: the
  ``G`` values of one channel), in ``"int8"``, ``"int4"``, ``"int2"`` (codes packed) or
  ``"e4m3"`` (fp8, symmetric); :func:`dequantize_kv_group` reads it back.
* :class:`QuantizedKVCache` is a drop-in for :class:`qcourse.nn.KVCache`: the newest tokens wait
  in float16 until a group of ``group_size`` is complete, then the group is quantized.  The model
  attends over the dequantized cache (:func:`qcourse.nn.generate` accepts it).
* :func:`evaluate_kv_cache` measures held-out loss with a quantized cache for a whole batch of
  windows at once: it computes, for every query position, exactly the keys and values the
  incremental cache would hold at that moment (complete groups quantized, the rest float16);
  ``tests/test_kv_cache.py`` checks it against token-by-token decoding through
  :class:`QuantizedKVCache`.
* :func:`kv_cache_bytes` counts what a cache of T tokens stores, scales and float residue
  included.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from qcourse._checks import (
    check_choice,
    check_instance,
    check_int,
    check_real,
    check_size,
    real_array,
)
from qcourse.affine import pack_int, unpack_int
from qcourse.floats import FP8_E4M3FN, decode
from qcourse.nn import KVCache, LMEvaluation, TransformerLM
from qcourse.nn.lm import MAX_CONTEXT, _check_ids, one_blas_thread
from qcourse.nn.lm_training import _batch_size

__all__ = [
    "KV_DTYPES",
    "KVGroup",
    "QuantizedKVCache",
    "dequantize_kv_group",
    "e4m3_round",
    "evaluate_kv_cache",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "quantize_kv_group",
]

#: Storage formats of :class:`QuantizedKVCache` and their bits per stored number.
KV_DTYPES = {"fp16": 16, "int8": 8, "e4m3": 8, "int4": 4, "int2": 2}
KV_AXES = ("token", "channel")
_SCALE_BYTES = 2  # scales and offsets are stored as float16
#: Bound on the sizes the counting functions (:func:`kv_bytes_per_token`, :func:`kv_cache_bytes`)
#: take: layers, heads, channels and batch of a model that might exist, not only of ours.
MAX_COUNT = 2**20
#: Most tokens :func:`kv_cache_bytes` counts a cache of (a trillion: far past any context).
MAX_TOKENS = 2**40


# --------------------------------------------------------------------------- checks


def _kv_format(dtype, name: str = "dtype") -> str:
    return check_choice(dtype, name, KV_DTYPES)


def _check_kv_axis(axis, name: str = "axis") -> str:
    return check_choice(axis, name, KV_AXES)


def _check_group_size(group_size) -> int:
    return check_size(group_size, "group_size", MAX_CONTEXT)


def _check_block(x, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a floating numpy.ndarray, got {type(x).__name__}")
    return real_array(x, name, kinds="f", dtype=None, min_ndim=2)


# --------------------------------------------------------------------------- fp8 e4m3


@functools.lru_cache(maxsize=1)
def _e4m3_table() -> np.ndarray:
    """The values of the 127 non-negative e4m3fn codes 0x00..0x7E, increasing."""
    return decode(np.arange(127, dtype=np.uint8), FP8_E4M3FN)


def e4m3_round(x: np.ndarray) -> np.ndarray:
    r"""Round to the nearest float8 e4m3fn value (ties to even), saturating at :math:`\pm 448`.

    The fast form of ``decode(encode(clip(x, -448, 448), FP8_E4M3FN))`` from
    :mod:`qcourse.floats` (the reference; ``tests/test_kv_cache.py`` also checks ml_dtypes): a
    normal number :math:`|x| \in [2^e, 2^{e+1})` keeps 3 mantissa bits, so it is rounded to a
    multiple of :math:`2^{e-3}`; below :math:`2^{-6}` the subnormal step :math:`2^{-9}` applies.
    Both are powers of two, so ``np.rint(x / step) * step`` is exact in float64.  Float64 out.
    ``x``: real numbers, finite (NaN has no nearest value; use :mod:`qcourse.floats` for the
    NaN and Inf rules of the format).
    """
    x = np.clip(real_array(x, "x", nonempty=False), -448.0, 448.0)
    _, e = np.frexp(x)                       # |x| = m 2^e, m in [0.5, 1)
    step = np.ldexp(1.0, np.maximum(e - 4, -9))
    return np.rint(x / step) * step


def _e4m3_encode(x: np.ndarray) -> np.ndarray:
    """uint8 e4m3fn bit patterns of values already on the grid (the output of e4m3_round)."""
    mag = np.searchsorted(_e4m3_table(), np.abs(x)).astype(np.uint8)
    return mag | (np.signbit(x).astype(np.uint8) << 7)


def _e4m3_decode(codes: np.ndarray) -> np.ndarray:
    mag = _e4m3_table()[codes & 0x7F]
    return np.where(codes & 0x80, -mag, mag)


# --------------------------------------------------------------------------- one group


@dataclass(frozen=True)
class KVGroup:
    r"""A block of keys or values stored in low precision (from :func:`quantize_kv_group`).

    ``codes``: uint8 (packed two or four to a byte for int4/int2, in C order of ``shape``);
    ``scale`` and ``offset``: float16, one per token (shape ``(..., G, 1)``) or per channel
    (``(..., 1, d_h)``); the value of code :math:`q` is :math:`s\,q + m` (int formats, ``offset``
    :math:`m` = the group's minimum) or :math:`s \cdot \mathrm{e4m3}(q)` (``offset`` unused, 0).
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    shape: tuple
    dtype: str
    axis: str

    @property
    def nbytes(self) -> int:
        """Bytes stored: the codes, plus two float16 numbers per scale (scale and offset) for the
        int formats or one (scale) for e4m3."""
        per_scale = 2 if self.dtype.startswith("int") else 1
        return int(self.codes.nbytes + per_scale * _SCALE_BYTES * self.scale.size)


def _reduce_axis(axis: str) -> int:
    return -1 if axis == "token" else -2


def quantize_kv_group(x: np.ndarray, dtype: str = "int4", axis: str = "token") -> KVGroup:
    r"""Quantize a block of keys or values ``x`` of shape (..., G tokens, d_h channels).

    ``axis="token"``: one scale per token, over its :math:`d_h` channels; ``axis="channel"``:
    one per channel, over the G tokens.  For ``"int8"``/``"int4"``/``"int2"`` (b bits) with
    :math:`m` and :math:`M` the minimum and maximum over that set (KIVI's asymmetric grid; 0 need
    not be on it):

    .. math::

        s = \frac{M - m}{2^b - 1}, \qquad q = \operatorname{clamp}\big(\operatorname{round}
        ((x - m)/s),\ 0,\ 2^b - 1\big), \qquad \hat x = s\,q + m,

    with :math:`s` and :math:`m` rounded to float16 first (a constant set, :math:`M = m`, gets
    :math:`s = 1`).  For ``"e4m3"``: :math:`s = \max|x| / 448`, :math:`\hat x = s\,
    \mathrm{e4m3}(x/s)` (:func:`e4m3_round`).  See the kv_cache chapter.
    """
    x = _check_block(x)
    dtype = _kv_format(dtype)
    if dtype == "fp16":
        raise ValueError("dtype='fp16' is stored as it is, not in groups; pick int8, int4, int2 "
                         "or e4m3")
    axis = _check_kv_axis(axis)
    ax = _reduce_axis(axis)
    x64 = x.astype(np.float64)
    if np.abs(x64).max() > 60000.0:
        raise ValueError("x holds magnitudes above 60000, beyond what float16 scales and "
                         "offsets can hold")
    if dtype == "e4m3":
        amax = np.abs(x64).max(axis=ax, keepdims=True)
        scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(2.0**-24))
        codes = _e4m3_encode(e4m3_round(x64 / scale.astype(np.float64)))
        return KVGroup(codes, scale, np.zeros_like(scale), x.shape, dtype, axis)
    levels = 2 ** KV_DTYPES[dtype] - 1
    lo = x64.min(axis=ax, keepdims=True).astype(np.float16)
    hi = x64.max(axis=ax, keepdims=True)
    scale = ((hi - lo.astype(np.float64)) / levels).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0))
    q = np.clip(np.rint((x64 - lo.astype(np.float64)) / scale.astype(np.float64)), 0, levels)
    q = q.astype(np.uint8)
    codes = q if dtype == "int8" else pack_int(q, KV_DTYPES[dtype], signed=False)
    return KVGroup(codes, scale, lo, x.shape, dtype, axis)


def dequantize_kv_group(group: KVGroup) -> np.ndarray:
    r"""Back to float32: :math:`\hat x = s\,q + m` (int) or :math:`s\,\mathrm{e4m3}(q)`."""
    check_instance(group, "group", KVGroup, "a qcourse.kv_cache.KVGroup (from quantize_kv_group)")
    s = group.scale.astype(np.float64)
    if group.dtype == "e4m3":
        return (_e4m3_decode(group.codes) * s).astype(np.float32)
    if group.dtype == "int8":
        q = group.codes
    else:
        n = int(np.prod(group.shape))
        q = unpack_int(group.codes, KV_DTYPES[group.dtype], n, signed=False).reshape(group.shape)
    return (q * s + group.offset.astype(np.float64)).astype(np.float32)


def _fake_quantize(x: np.ndarray, dtype: str, axis: str) -> np.ndarray:
    """quantize_kv_group then dequantize_kv_group (float16 for ``"fp16"``)."""
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    return dequantize_kv_group(quantize_kv_group(x, dtype, axis))


# --------------------------------------------------------------------------- the cache


class QuantizedKVCache(KVCache):
    r"""A KV cache that stores keys and values in ``dtype``, a group of tokens at a time.

    New keys and values wait in float16 (the *residual*) until ``group_size`` tokens have
    arrived; the group is then quantized with :func:`quantize_kv_group` (keys along
    ``key_axis``, values along ``value_axis``) and its float16 copy dropped.  Reading
    (``keys(layer)``, ``values(layer)``) dequantizes every stored group and appends the residual:
    the attention of the model then runs on exactly what a quantized cache can give back.
    ``dtype="fp16"`` stores everything in float16, the usual 16-bit baseline.  ``nbytes`` counts
    what is stored (codes, float16 scales and offsets, float16 residual); see
    :func:`kv_cache_bytes`.  Same interface as :class:`qcourse.nn.KVCache`, so
    :func:`qcourse.nn.generate` takes it as ``cache=``.
    """

    def __init__(self, n_layers: int, dtype: str = "int4", *, key_axis: str = "channel",
                 value_axis: str = "token", group_size: int = 32):
        super().__init__(n_layers)
        self.dtype = _kv_format(dtype)
        self.key_axis = _check_kv_axis(key_axis, "key_axis")
        self.value_axis = _check_kv_axis(value_axis, "value_axis")
        self.group_size = _check_group_size(group_size)
        self._groups: list[list[tuple[KVGroup, KVGroup]]] = [[] for _ in range(self.n_layers)]
        self._rk: list[np.ndarray | None] = [None] * self.n_layers
        self._rv: list[np.ndarray | None] = [None] * self.n_layers

    def length(self, layer: int = 0) -> int:
        layer = self._check_layer(layer)
        res = 0 if self._rk[layer] is None else self._rk[layer].shape[2]
        return len(self._groups[layer]) * self.group_size + res

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        layer = self._check_layer(layer)
        k, v = _check_block(k, "k"), _check_block(v, "v")
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(f"k and v must have the same shape (B, H, n, d_h), got {k.shape} "
                             f"and {v.shape}")
        rk, rv = self._rk[layer], self._rv[layer]
        if rk is not None and rk.shape[:2] + rk.shape[3:] != k.shape[:2] + k.shape[3:]:
            raise ValueError(f"k has shape {k.shape}, but the cache holds {rk.shape}")
        k16, v16 = k.astype(np.float16), v.astype(np.float16)
        rk = k16 if rk is None else np.concatenate([rk, k16], axis=2)
        rv = v16 if rv is None else np.concatenate([rv, v16], axis=2)
        g = self.group_size
        while self.dtype != "fp16" and rk.shape[2] >= g:
            self._groups[layer].append((
                quantize_kv_group(rk[:, :, :g].astype(np.float32), self.dtype, self.key_axis),
                quantize_kv_group(rv[:, :, :g].astype(np.float32), self.dtype, self.value_axis)))
            rk, rv = rk[:, :, g:], rv[:, :, g:]
        self._rk[layer], self._rv[layer] = rk, rv

    def _read(self, layer: int, which: int) -> np.ndarray:
        layer = self._check_layer(layer)
        parts = [dequantize_kv_group(pair[which]) for pair in self._groups[layer]]
        res = (self._rk if which == 0 else self._rv)[layer]
        if res is not None and res.shape[2]:
            parts.append(res.astype(np.float32))
        if not parts:
            raise ValueError(f"layer {layer} of the cache is empty")
        return np.concatenate(parts, axis=2)

    def keys(self, layer: int) -> np.ndarray:
        return self._read(layer, 0)

    def values(self, layer: int) -> np.ndarray:
        return self._read(layer, 1)

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in range(self.n_layers):
            total += sum(k.nbytes + v.nbytes for k, v in self._groups[layer])
            for res in (self._rk[layer], self._rv[layer]):
                total += 0 if res is None else res.nbytes
        return int(total)

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(dtype={self.dtype!r}, key_axis={self.key_axis!r}, "
                f"value_axis={self.value_axis!r}, group_size={self.group_size})")


# --------------------------------------------------------------------------- sizes


def kv_bytes_per_token(n_layers: int, n_heads: int, head_dim: int, bits: float = 16) -> float:
    r"""Bytes the cache grows by per token: :math:`2 \cdot L \cdot H \cdot d_h \cdot b / 8`
    (keys and values, every layer and head; scales not included).  The sizes are ints from 1 to
    :data:`MAX_COUNT`, ``bits`` a real number in (0, 64]."""
    n_layers, n_heads, head_dim = (check_size(v, name, MAX_COUNT) for name, v in (
        ("n_layers", n_layers), ("n_heads", n_heads), ("head_dim", head_dim)))
    bits = check_real(bits, "bits", 0.0, 64.0, lo_open=True)
    return 2 * n_layers * n_heads * head_dim * bits / 8


def kv_cache_bytes(tokens: int, n_layers: int, n_heads: int, head_dim: int,
                   dtype: str = "int4", *, key_axis: str = "channel",
                   value_axis: str = "token", group_size: int = 32, batch: int = 1) -> int:
    r"""What a :class:`QuantizedKVCache` holding ``tokens`` tokens stores, in bytes.

    With :math:`n_g = \lfloor T/G \rfloor` complete groups and :math:`r = T - G n_g` residual
    tokens, per layer, head and sequence, for keys and for values: the codes of :math:`G n_g
    d_h` numbers (packed), float16 scales and offsets (one pair per token, :math:`G` per group,
    or per channel, :math:`d_h` per group; one scale and no offset for e4m3), and :math:`r d_h`
    float16 residual numbers.  ``"fp16"``: :math:`2 T d_h` bytes.  ``tokens`` is 0 to
    :data:`MAX_TOKENS`, the other sizes 1 to :data:`MAX_COUNT` (``group_size`` to
    ``MAX_CONTEXT``, as in :class:`QuantizedKVCache`).
    """
    tokens = check_int(tokens, "tokens", 0, MAX_TOKENS)
    n_layers, n_heads, head_dim, batch = (check_size(v, name, MAX_COUNT) for name, v in (
        ("n_layers", n_layers), ("n_heads", n_heads), ("head_dim", head_dim), ("batch", batch)))
    group_size = _check_group_size(group_size)
    dtype = _kv_format(dtype)
    key_axis = _check_kv_axis(key_axis, "key_axis")
    value_axis = _check_kv_axis(value_axis, "value_axis")
    if dtype == "fp16":
        return 2 * batch * n_layers * n_heads * tokens * head_dim * 2
    n_groups, res = divmod(tokens, group_size)
    per_scale = (2 if dtype.startswith("int") else 1) * _SCALE_BYTES
    total = 0
    for axis in (key_axis, value_axis):
        codes = math.ceil(group_size * head_dim * KV_DTYPES[dtype] / 8)
        scales = group_size if axis == "token" else head_dim
        per_group = codes + per_scale * scales
        total += n_groups * per_group + 2 * res * head_dim
    return batch * n_layers * n_heads * total


# --------------------------------------------------------------------------- evaluation


def _simulated_cache(x: np.ndarray, dtype: str, axis: str, group_size: int) -> np.ndarray:
    """What the cache gives back for a whole sequence x (B, H, T, d_h) once every complete group
    of ``group_size`` tokens has been quantized (the residual tokens are float16)."""
    x16 = x.astype(np.float16).astype(np.float32)   # the residual is float16
    if dtype == "fp16":
        return x16
    out = x16.copy()
    full = (x.shape[2] // group_size) * group_size
    for s in range(0, full, group_size):
        out[:, :, s:s + group_size] = _fake_quantize(x16[:, :, s:s + group_size], dtype, axis)
    return out


def _attention_with_cache(attn, q, k, v, dtype, key_axis, value_axis, group_size):
    """Causal attention in which query i sees keys and values as the cache holds them at step i.

    Key j is read from its quantized group if that group is complete by step i,
    :math:`G(\\lfloor j/G \\rfloor + 1) \\le i + 1`, and from the float16 residual otherwise.
    """
    t = q.shape[2]
    k_q = _simulated_cache(k, dtype, key_axis, group_size)
    v_q = _simulated_cache(v, dtype, value_axis, group_size)
    k_r = _simulated_cache(k, "fp16", key_axis, group_size)
    v_r = _simulated_cache(v, "fp16", value_axis, group_size)
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    quantized = (j // group_size + 1) * group_size <= i + 1
    scale = np.float32(1.0 / math.sqrt(attn.head_dim))
    s = np.where(quantized, q @ k_q.transpose(0, 1, 3, 2), q @ k_r.transpose(0, 1, 3, 2)) * scale
    s = np.where(j > i, np.float32(-np.inf), s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    pq = np.where(quantized, p, np.float32(0))
    return pq @ v_q + (p - pq) @ v_r


def evaluate_kv_cache(model: TransformerLM, windows: np.ndarray, dtype: str = "int4", *,
                      key_axis: str = "channel", value_axis: str = "token",
                      group_size: int = 32, batch_size: int = 64) -> LMEvaluation:
    r"""Held-out loss of ``model`` when its attention reads keys and values from a
    :class:`QuantizedKVCache` (``dtype``, axes and ``group_size`` as there).

    Equivalent to decoding each window token by token through the cache (the test checks it),
    but computed for all positions at once: each query position sees the complete groups
    quantized and the newer tokens in float16, as the cache would hold them at that step.  The
    rest of the model runs in float32.  Returns the same :class:`qcourse.nn.LMEvaluation` as
    :func:`qcourse.nn.evaluate_lm`.
    """
    check_instance(model, "model", TransformerLM, "a qcourse.nn.TransformerLM")
    windows = _check_ids(windows, "windows", max_len=model.config.max_len + 1)
    if windows.shape[1] < 2:
        raise ValueError("windows must hold at least two bytes each (input and target)")
    dtype = _kv_format(dtype)
    key_axis = _check_kv_axis(key_axis, "key_axis")
    value_axis = _check_kv_axis(value_axis, "value_axis")
    group_size = _check_group_size(group_size)
    batch_size = _batch_size(batch_size, windows.shape[1] - 1, model.config)
    total = 0.0
    with one_blas_thread():
        for start in range(0, windows.shape[0], batch_size):
            w = windows[start:start + batch_size]
            ids = w[:, :-1]
            b, t = ids.shape
            h = model.embed(ids)
            for block in model.blocks:
                attn = block.attn
                x = block.ln1(h).reshape(b * t, attn.d)
                q, k, v = attn._split(attn.qkv(x), b, t)
                o = _attention_with_cache(attn, q, k, v, dtype, key_axis, value_axis,
                                          group_size)
                u = h + attn.proj(attn._merge(o)).reshape(b, t, attn.d)
                h = u + block.mlp(block.ln2(u))
            logits = model.logits_from_hidden(h).astype(np.float64)
            z = logits - logits.max(axis=-1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=-1))
            total += float(np.sum(lse - np.take_along_axis(z, w[:, 1:, None], axis=-1)[..., 0]))
    n = windows.shape[0] * (windows.shape[1] - 1)
    nats = total / n
    return LMEvaluation(nats, nats / math.log(2), math.exp(nats), n)
