r"""Quantizing a language model: per-token activations, outliers, LLM.int8(), SmoothQuant, and a
transformer block whose matrix products are int8 GEMMs.

The transformer chapter (``book/transformer.md``) explains everything in this module; the model
is :class:`qcourse.nn.TransformerLM` (the byte-level model trained on the Python reference).

* **Per-token activations.** :func:`quantize_per_token` gives each row (token) of an activation
  matrix its own symmetric scale, :func:`quantize_per_tensor` one scale for all.  A
  :class:`W8A8Linear` quantizes its weight once (int8, one scale per output channel), packs it
  for the kernel, and at every call quantizes its input, runs
  :func:`qcourse.kernels.matmul_int8` and applies both scales to the int32 accumulators
  (:func:`dequantize_accumulators`, the epilogue).  :func:`w8a8_lm` swaps every linear layer of a
  model's blocks for one.
* **Outliers.** :func:`outlier_channels` finds the input channels whose magnitude exceeds a
  threshold; :func:`llm_int8_matmul` (Dettmers et al., 2022) computes those columns in float and
  the rest with int8 (:class:`LLMInt8Linear`, :func:`llm_int8_lm`).
* **SmoothQuant** (Xiao et al., 2023). :func:`smoothquant_scales` computes
  :math:`s_j = \max|X_j|^\alpha / \max|W_j|^{1-\alpha}` and :func:`smooth_lm` folds
  :math:`1/s` into the LayerNorm before a layer and :math:`s` into its weight columns.
* **An integer block.** :class:`IntegerBlock` runs one transformer block with every matrix
  product (the four linear layers, :math:`QK^T` and :math:`PV`) as an int8 GEMM on the compiled
  kernel; LayerNorm, softmax, GELU, the residual additions and the epilogues stay in float32.
  With ``reference=True`` the same block uses :func:`qcourse.kernels.matmul_int8_reference`; the
  two agree bit for bit.  :func:`integer_lm` puts one in place of every block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from qcourse._checks import (
    check_bool,
    check_choice,
    check_float_matrix,
    check_instance,
    check_int,
    check_int_sequence,
    check_ndarray,
    check_real,
    describe,
    real_array,
)
from qcourse.affine import QParams, choose_qparams, quantize
from qcourse.kernels import PackedB, matmul_int8, matmul_int8_reference, prepack
from qcourse.nn import GELU, LayerNorm, Linear, Module, TransformerBlock, TransformerLM
from qcourse.nn.lm import LMConfig, one_blas_thread
from qcourse.nn.lm_training import linear_inputs

__all__ = [
    "IntegerBlock",
    "LLMInt8Linear",
    "W8A8Linear",
    "activation_absmax",
    "block_op_counts",
    "dequantize_accumulators",
    "integer_lm",
    "llm_int8_lm",
    "llm_int8_matmul",
    "outlier_channels",
    "quantize_per_tensor",
    "quantize_per_token",
    "smooth_lm",
    "smoothquant_scales",
    "w8a8_lm",
]

ACTIVATION_GRANULARITIES = ("per_token", "per_tensor")


# --------------------------------------------------------------------------- checks


_F32_MAX = float(np.finfo(np.float32).max)


def _activations(x, name: str = "x") -> np.ndarray:
    """A finite 2-D float matrix whose magnitudes float32 holds (its scales are float32)."""
    x = check_float_matrix(x, name)
    peak = float(np.max(np.abs(x)))
    if peak > _F32_MAX:
        raise ValueError(f"{name} must have magnitudes that float32 holds (at most "
                         f"{_F32_MAX:.4g}: the scales are float32), got {peak:g}")
    return x


def _quant_bits(bits, name: str = "bits") -> int:
    return check_int(bits, name, 2, 8)


def _granularity(activation) -> str:
    return check_choice(activation, "activation", ACTIVATION_GRANULARITIES)


def _lm(model) -> TransformerLM:
    return check_instance(model, "model", TransformerLM, "a qcourse.nn.TransformerLM")


def _threshold(value) -> float:
    return check_real(value, "threshold", 0.0, lo_open=True)


# --------------------------------------------------------------------------- per-token codes


def _symmetric_codes(x: np.ndarray, bits: int, axis) -> tuple[np.ndarray, np.ndarray]:
    """Abs-max symmetric narrow-range codes; the float32 scale is rounded before the codes."""
    qp = choose_qparams(x, bits=bits, symmetric=True, narrow_range=True, axis=axis)
    scale = qp.scale.astype(np.float32)
    codes = quantize(x, QParams(scale=scale, zero_point=0, qmin=qp.qmin, qmax=qp.qmax,
                                axis=axis))
    return codes.astype(np.int8, copy=False), scale


def quantize_per_token(x, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    r"""Symmetric quantization with one scale per row (token) of ``x``.

    .. math::

        s_m = \frac{\max_k |x_{mk}|}{2^{b-1} - 1}, \qquad
        q_{mk} = \operatorname{clamp}\big(\operatorname{round}(x_{mk} / s_m),
        -(2^{b-1}-1),\ 2^{b-1}-1\big)

    (int8: :math:`s_m = \max|x_m|/127`, codes in -127..127; round half to even).  A row of zeros
    gets :math:`s_m = 1`.  The scale is rounded to float32 *before* the codes are computed, so the
    codes belong to the scale that is returned.  This is :func:`qcourse.affine.choose_qparams`
    with ``axis=0`` and :func:`qcourse.affine.quantize`.  See the transformer chapter.

    Parameters
    ----------
    x : numpy.ndarray, float, shape (M, K), finite
    bits : int, 2..8

    Returns
    -------
    codes : numpy.ndarray, int8, shape (M, K)
    scales : numpy.ndarray, float32, shape (M,)
    """
    x = _activations(x)
    return _symmetric_codes(x, _quant_bits(bits), axis=0)


def quantize_per_tensor(x, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    r"""Symmetric quantization with one scale for the whole matrix: :math:`s = \max|x| /
    (2^{b-1}-1)`.  Returns ``(codes, scales)`` with ``scales`` float32 of shape (M,), every entry
    the same :math:`s` (so that it can stand where :func:`quantize_per_token`'s scales do)."""
    x = _activations(x)
    codes, scale = _symmetric_codes(x, _quant_bits(bits), axis=None)
    return codes, np.full(x.shape[0], scale, dtype=np.float32)


_QUANTIZERS = {"per_token": quantize_per_token, "per_tensor": quantize_per_tensor}


def dequantize_accumulators(acc: np.ndarray, x_scales: np.ndarray, w_scales: np.ndarray,
                            bias: np.ndarray | None = None) -> np.ndarray:
    r"""The epilogue of a W8A8 product: int32 accumulators back to float32.

    .. math:: y_{mn} = \mathrm{f32}(A_{mn})\, s_{x,m}\, s_{w,n} + b_n

    with :math:`A = q_x q_w^T` the exact integer products, :math:`s_x` one scale per row of the
    activation (per token) and :math:`s_w` one per output channel.  The scales multiply *after*
    the integer sum because each is constant along the sum's index k.  Float32 throughout, in
    this order, in both the kernel path and the reference path.  ``acc``: int32 (M, N);
    ``x_scales`` (M,), ``w_scales`` (N,) and ``bias`` (N,): finite real numbers that float32
    holds; a product that overflows float32 is refused.
    """
    acc = check_ndarray(acc, "acc", np.int32, ndim=2)
    x_scales = real_array(x_scales, "x_scales", dtype=np.float32)
    w_scales = real_array(w_scales, "w_scales", dtype=np.float32)
    if x_scales.shape != (acc.shape[0],) or w_scales.shape != (acc.shape[1],):
        raise ValueError(f"x_scales must have shape ({acc.shape[0]},) and w_scales "
                         f"({acc.shape[1]},), got {x_scales.shape} and {w_scales.shape}")
    if bias is not None:
        bias = real_array(bias, "bias", dtype=np.float32)
        if bias.shape != (acc.shape[1],):
            raise ValueError(f"bias must have shape ({acc.shape[1]},), got {bias.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        y = acc.astype(np.float32) * x_scales[:, None]
        y *= w_scales[None, :]
        if bias is not None:
            y += bias
    if not np.all(np.isfinite(y)):
        raise ValueError("x_scales and w_scales are too large for acc: the product overflows "
                         "float32")
    return y


def _int_matmul(a_q: np.ndarray, b: np.ndarray | PackedB, reference: bool,
                b_codes: np.ndarray | None = None) -> np.ndarray:
    """``a_q @ b`` exactly in int32: the compiled kernel, or the NumPy reference."""
    if reference:
        return matmul_int8_reference(a_q, b if b_codes is None else b_codes)
    return matmul_int8(a_q, b)


# --------------------------------------------------------------------------- W8A8 linear layers


class W8A8Linear(Module):
    r"""A linear layer with int8 weights and int8 activations, computed on the int8 kernel.

    Built from a float :class:`qcourse.nn.Linear` (:math:`y = x W^T + b`, ``weight`` (N, K)): the
    weight is quantized once, symmetric with one scale per output channel (row of W), and packed
    for :func:`qcourse.kernels.matmul_int8` (:func:`qcourse.kernels.prepack` of :math:`q_W^T`).
    Each call quantizes the input ``x`` (M, K) with one scale per token (``activation=
    "per_token"``) or one for the whole batch (``"per_tensor"``), computes the int32 products
    :math:`q_x q_W^T` on the kernel, and applies :func:`dequantize_accumulators`.  The float weight
    is not kept.  ``reference=True`` computes the same integers with
    :func:`qcourse.kernels.matmul_int8_reference`; the outputs are identical.  ``bits`` and
    ``weight_bits`` (2..8) narrow the grids for experiments; the codes stay int8.
    Forward only (no backward).
    """

    def __init__(self, linear: Linear, *, activation: str = "per_token", bits: int = 8,
                 weight_bits: int = 8, reference: bool = False):
        super().__init__()
        check_instance(linear, "linear", Linear, "a qcourse.nn.Linear")
        self.activation = _granularity(activation)
        self.bits = _quant_bits(bits)
        self.weight_bits = _quant_bits(weight_bits, "weight_bits")
        self.reference = check_bool(reference, "reference")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = _activations(linear.weight, "linear.weight").astype(np.float64)
        real_array(linear.bias, "linear.bias", dtype=np.float32)
        self.weight_codes, self.weight_scale = _symmetric_codes(w, self.weight_bits, axis=0)
        self._codes_t = np.ascontiguousarray(self.weight_codes.T)
        self.packed = prepack(self._codes_t)
        self.bias = linear.bias.astype(np.float32).copy()

    def quantize_input(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _QUANTIZERS[self.activation](x, self.bits)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _activations(x)
        if x.shape[1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} columns, got shape {x.shape}")
        x_q, x_s = self.quantize_input(x)
        acc = _int_matmul(x_q, self.packed, self.reference, self._codes_t)
        return dequantize_accumulators(acc, x_s, self.weight_scale, self.bias)

    def backward(self, grad_out):
        raise NotImplementedError("W8A8Linear is for inference only")

    def __repr__(self) -> str:
        return (f"W8A8Linear({self.in_features} -> {self.out_features}, activation="
                f"{self.activation}, bits={self.bits}, weight_bits={self.weight_bits})")


def w8a8_lm(model: TransformerLM, *, activation: str = "per_token", bits: int = 8,
            weight_bits: int = 8, reference: bool = False) -> TransformerLM:
    """A copy of ``model`` whose block linear layers (qkv, proj, fc1, fc2) are :class:`W8A8Linear`.

    Embeddings, LayerNorms, attention (:math:`QK^T`, softmax, :math:`PV`), GELU and the output
    head stay in float.  The original model is not changed.  See the transformer chapter.
    """
    _lm(model)
    _granularity(activation)
    _quant_bits(bits)
    _quant_bits(weight_bits, "weight_bits")
    check_bool(reference, "reference")
    return model.copy().replace_linears(
        lambda _, lin: W8A8Linear(lin, activation=activation, bits=bits,
                                  weight_bits=weight_bits, reference=reference))


# --------------------------------------------------------------------------- outliers, LLM.int8()


def outlier_channels(x, threshold: float = 6.0) -> np.ndarray:
    r"""Indices of the columns (feature channels) of ``x`` with some :math:`|x_{mk}| > \tau`.

    LLM.int8()'s criterion with :math:`\tau` = ``threshold`` (6.0 in the paper).  Sorted int64.
    """
    x = check_float_matrix(x, "x")
    threshold = _threshold(threshold)
    peaks = np.max(np.abs(x), axis=0).astype(np.float64)     # threshold may exceed float32
    return np.flatnonzero(peaks > threshold).astype(np.int64)


def llm_int8_matmul(x, w, threshold: float = 6.0, *, reference: bool = False) -> np.ndarray:
    r"""LLM.int8()'s mixed-precision decomposition of :math:`x w` (Dettmers et al., 2022).

    With :math:`O` = :func:`outlier_channels` of ``x`` (columns holding a magnitude above
    ``threshold``):

    .. math::

        x w \approx x_{:,O}\, w_{O,:} \;+\;
        \mathrm{diag}(s_x)\, \big(q_x\, q_w\big)\, \mathrm{diag}(s_w)

    The outlier columns are multiplied in float32 (the paper uses fp16); the remaining columns
    of ``x`` are quantized per row (:func:`quantize_per_token`, the paper's "vector-wise"
    quantization), the remaining rows of ``w`` per output column, and multiplied exactly on
    :func:`qcourse.kernels.matmul_int8` (``reference=True``: on
    :func:`qcourse.kernels.matmul_int8_reference`, with identical results).

    Parameters
    ----------
    x : numpy.ndarray, float, (M, K), finite
    w : numpy.ndarray, float, (K, N), finite
    threshold : float > 0

    Returns
    -------
    numpy.ndarray, float32, (M, N)
    """
    x = _activations(x)
    w = _activations(w, "w")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[1]} columns but w has {w.shape[0]} rows; x @ w needs "
                         f"them equal")
    threshold = _threshold(threshold)
    reference = check_bool(reference, "reference")
    bound = float(np.max(np.abs(x))) * float(np.max(np.abs(w))) * x.shape[1]
    if bound > _F32_MAX:
        raise ValueError(f"x and w are too large: max|x| * max|w| * K = {bound:.3g} overflows "
                         f"float32, in which the product is computed")
    cols = outlier_channels(x, threshold)
    rest = np.setdiff1d(np.arange(x.shape[1]), cols)
    y = np.zeros((x.shape[0], w.shape[1]), dtype=np.float32)
    if rest.size:
        x_q, x_s = quantize_per_token(x[:, rest])
        w_q, w_s = quantize_per_token(np.ascontiguousarray(w[rest].T))
        acc = _int_matmul(x_q, np.ascontiguousarray(w_q.T), reference)
        y += dequantize_accumulators(acc, x_s, w_s)
    if cols.size:
        with one_blas_thread():
            y += x[:, cols].astype(np.float32) @ w[cols].astype(np.float32)
    return y


class LLMInt8Linear(Module):
    r""":math:`y = \mathrm{llm\_int8\_matmul}(x, W^T, \tau) + b` for a float Linear's ``weight``
    and ``bias``.  ``outlier_counts`` lists how many columns went to float at each call."""

    def __init__(self, linear: Linear, threshold: float = 6.0, *, reference: bool = False):
        super().__init__()
        check_instance(linear, "linear", Linear, "a qcourse.nn.Linear")
        self.threshold = _threshold(threshold)
        self.reference = check_bool(reference, "reference")
        _activations(linear.weight, "linear.weight")
        real_array(linear.bias, "linear.bias", dtype=np.float32)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = np.ascontiguousarray(linear.weight.T.astype(np.float32))
        self.bias = linear.bias.astype(np.float32).copy()
        self.outlier_counts: list[int] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _activations(x)
        self.outlier_counts.append(int(outlier_channels(x, self.threshold).size))
        return llm_int8_matmul(x, self.weight_t, self.threshold,
                               reference=self.reference) + self.bias

    def backward(self, grad_out):
        raise NotImplementedError("LLMInt8Linear is for inference only")

    def __repr__(self) -> str:
        return (f"LLMInt8Linear({self.in_features} -> {self.out_features}, "
                f"threshold={self.threshold})")


def llm_int8_lm(model: TransformerLM, threshold: float = 6.0) -> TransformerLM:
    """A copy of ``model`` whose block linear layers are :class:`LLMInt8Linear`."""
    _lm(model)
    threshold = _threshold(threshold)
    return model.copy().replace_linears(lambda _, lin: LLMInt8Linear(lin, threshold))


# --------------------------------------------------------------------------- SmoothQuant


def _absmax(a, name: str) -> np.ndarray:
    arr = real_array(a, name, ndim=1)
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0 (maxima of magnitudes), got {arr.min()}")
    return arr


def smoothquant_scales(act_absmax, weight_absmax, alpha: float = 0.5) -> np.ndarray:
    r"""SmoothQuant's per-channel smoothing factors (Xiao et al., 2023).

    .. math:: s_j = \frac{\max |X_j|^{\alpha}}{\max |W_j|^{1-\alpha}}

    for input channel j, with :math:`\max|X_j|` over calibration tokens and :math:`\max|W_j|`
    over the output channels of the weight that reads channel j.  Dividing the activation's
    channel j by :math:`s_j` and multiplying the weight's column j by it leaves :math:`XW^T`
    unchanged and moves quantization difficulty from activations to weights.  With
    :math:`\alpha = 1`, :math:`s_j = \max|X_j|`: every smoothed activation channel peaks at 1 and
    the weights take all the spread; with :math:`\alpha = 0` the weight columns peak at 1 instead;
    with :math:`\alpha = 0.5` both peak at :math:`\sqrt{\max|X_j| \max|W_j|}`.  A channel with a
    zero maximum on either side gets
    :math:`s_j = 1` (left alone).  See the transformer chapter.

    Parameters
    ----------
    act_absmax, weight_absmax : array_like, 1-D, same length, finite, >= 0
    alpha : float in [0, 1]

    Returns
    -------
    numpy.ndarray, float64, 1-D
    """
    a = _absmax(act_absmax, "act_absmax")
    w = _absmax(weight_absmax, "weight_absmax")
    if a.shape != w.shape:
        raise ValueError(f"act_absmax and weight_absmax must have the same length, got "
                         f"{a.size} and {w.size}")
    alpha = check_real(alpha, "alpha", 0.0, 1.0)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    with np.errstate(over="ignore", under="ignore"):
        s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError("act_absmax and weight_absmax are too far apart: a factor s_j "
                         "overflows or underflows float64")
    return s


def activation_absmax(model: TransformerLM, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel :math:`\\max|x|` of every block linear layer's input over the tokens ``ids``
    (calibration data), ``{name: (in_features,)}`` float64, via
    :func:`qcourse.nn.linear_inputs`."""
    _lm(model)
    return {name: np.abs(x).max(axis=0).astype(np.float64)
            for name, x in linear_inputs(model, ids).items()}


def smooth_lm(model: TransformerLM, act_absmax: Mapping[str, np.ndarray],
              alpha: float = 0.5) -> TransformerLM:
    r"""A copy of ``model`` with SmoothQuant's factors folded in; the float function is unchanged.

    For each block, the inputs of ``attn.qkv`` and ``mlp.fc1`` are LayerNorm outputs
    :math:`\gamma \odot \hat x + \beta`.  With :math:`s` = :func:`smoothquant_scales` of the
    calibration maxima ``act_absmax[name]`` and the weight's column maxima, the LayerNorm's
    :math:`\gamma` and :math:`\beta` are divided by :math:`s` and the weight's columns multiplied
    by it: :math:`(X / s)(W \operatorname{diag}(s))^T = X W^T`.  ``attn.proj`` and ``mlp.fc2`` have
    no preceding operation to fold into and are left alone (as in the paper).  ``act_absmax``
    maps each of those layers' names to its maxima (as :func:`activation_absmax` returns).
    """
    _lm(model)
    check_instance(act_absmax, "act_absmax", Mapping, "a mapping {layer name: maxima}")
    alpha = check_real(alpha, "alpha", 0.0, 1.0)
    out = model.copy()
    for i, block in enumerate(out.blocks):
        for ln, lin, name in ((block.ln1, block.attn.qkv, f"blocks.{i}.attn.qkv"),
                              (block.ln2, block.mlp.fc1, f"blocks.{i}.mlp.fc1")):
            if name not in act_absmax:
                raise ValueError(f"act_absmax has no entry {name!r}")
            if not isinstance(ln, LayerNorm) or not isinstance(lin, Linear):
                raise TypeError("model must be a float model (LayerNorm and Linear layers), got "
                                f"{type(ln).__name__} and {type(lin).__name__} in block {i}")
            s = smoothquant_scales(act_absmax[name], np.abs(lin.weight).max(axis=0), alpha)
            with np.errstate(over="ignore", under="ignore"):
                new = (ln.weight / s, ln.bias / s, lin.weight * s[None, :])
            new = tuple(a.astype(lin.weight.dtype) for a in new)
            if not all(np.all(np.isfinite(a)) for a in new):
                raise ValueError(f"act_absmax[{name!r}] is too large for the weights: the "
                                 f"smoothed weights overflow {lin.weight.dtype}")
            ln.weight[...], ln.bias[...], lin.weight[...] = new
    return out


# --------------------------------------------------------------------------- the integer block


class IntegerBlock(Module):
    r"""A transformer block whose six matrix products are int8 GEMMs on the compiled kernel.

    From a float :class:`qcourse.nn.TransformerBlock`:

    * ``qkv``, ``proj``, ``fc1``, ``fc2`` become :class:`W8A8Linear` (per-token activations,
      per-channel weights);
    * per head, :math:`S = QK^T/\sqrt{d_h}` is ``matmul_int8`` of the per-token codes of Q and of
      K (one scale per query, one per key), and :math:`O = PV` is ``matmul_int8`` of the per-query
      codes of the probabilities P (each row's maximum onto 127) and the per-channel codes of V
      (one scale per channel of :math:`d_h`);
    * LayerNorm, softmax, GELU, the residual additions and every epilogue
      (:func:`dequantize_accumulators`) stay in float32.

    ``reference=True`` does every product with :func:`qcourse.kernels.matmul_int8_reference`
    instead: same integers, same floats, bit for bit.  If ``accumulators`` is a list, every int32
    result is appended to it as ``(label, array)`` (for checking).  Forward only.
    """

    def __init__(self, block: TransformerBlock, *, reference: bool = False):
        super().__init__()
        check_instance(block, "block", TransformerBlock, "a qcourse.nn.TransformerBlock")
        self.reference = check_bool(reference, "reference")
        self.d = block.d
        self.n_heads = block.attn.n_heads
        self.head_dim = block.attn.head_dim
        self.ln1, self.ln2 = _copy_layernorm(block.ln1), _copy_layernorm(block.ln2)
        self.qkv = W8A8Linear(block.attn.qkv, reference=self.reference)
        self.proj = W8A8Linear(block.attn.proj, reference=self.reference)
        self.fc1 = W8A8Linear(block.mlp.fc1, reference=self.reference)
        self.fc2 = W8A8Linear(block.mlp.fc2, reference=self.reference)
        self.act = GELU()
        self.accumulators: list | None = None

    def _record(self, label: str, acc: np.ndarray) -> np.ndarray:
        if self.accumulators is not None:
            self.accumulators.append((label, acc.copy()))
        return acc

    def _linear(self, layer: W8A8Linear, x: np.ndarray, label: str) -> np.ndarray:
        x_q, x_s = layer.quantize_input(x)
        acc = self._record(label, _int_matmul(x_q, layer.packed, self.reference,
                                              layer._codes_t))
        return dequantize_accumulators(acc, x_s, layer.weight_scale, layer.bias)

    def _head_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        offset: int) -> np.ndarray:
        """One head: q (n, d_h), k and v (t, d_h) -> (n, d_h), all products in int8."""
        n, t = q.shape[0], k.shape[0]
        q_q, q_s = quantize_per_token(q)
        k_q, k_s = quantize_per_token(k)
        k_t = np.ascontiguousarray(k_q.T)
        scores = self._record("scores", _int_matmul(q_q, k_t, self.reference))
        s = dequantize_accumulators(scores, q_s * np.float32(1 / math.sqrt(self.head_dim)), k_s)
        future = np.arange(t)[None, :] > (offset + np.arange(n))[:, None]
        s[future] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        p_q, p_s = quantize_per_token(p)
        v_qt, v_s = quantize_per_token(np.ascontiguousarray(v.T))   # one scale per channel
        out = self._record("pv", _int_matmul(p_q, np.ascontiguousarray(v_qt.T), self.reference))
        return dequantize_accumulators(out, p_s, v_s)

    def _attention(self, h: np.ndarray, cache=None, layer: int = 0) -> np.ndarray:
        b, n, _ = h.shape
        qkv = self._linear(self.qkv, h.reshape(b * n, self.d), "qkv")
        qkv = qkv.reshape(b, n, 3, self.n_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        offset = 0
        if cache is not None:
            offset = cache.length(layer)
            cache.append(layer, k, v)
            k, v = cache.keys(layer), cache.values(layer)
        o = np.empty((b, self.n_heads, n, self.head_dim), dtype=np.float32)
        for i in range(b):
            for j in range(self.n_heads):
                o[i, j] = self._head_attention(q[i, j], k[i, j].astype(np.float32),
                                               v[i, j].astype(np.float32), offset)
        o = o.transpose(0, 2, 1, 3).reshape(b * n, self.d)
        return self._linear(self.proj, o, "proj").reshape(b, n, self.d)

    def _mlp(self, h: np.ndarray) -> np.ndarray:
        b, n, _ = h.shape
        a = self.act(self._linear(self.fc1, h.reshape(b * n, self.d), "fc1"))
        return self._linear(self.fc2, a, "fc2").reshape(b, n, self.d)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        u = x + self._attention(self.ln1(x))
        return u + self._mlp(self.ln2(u))

    def forward_cached(self, x: np.ndarray, cache, layer: int) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        u = x + self._attention(self.ln1(x), cache, layer)
        return u + self._mlp(self.ln2(u))

    def backward(self, grad_out):
        raise NotImplementedError("IntegerBlock is for inference only")

    def __repr__(self) -> str:
        return f"IntegerBlock(d={self.d}, n_heads={self.n_heads}, reference={self.reference})"


def _copy_layernorm(ln: LayerNorm) -> LayerNorm:
    new = LayerNorm(ln.d, eps=ln.eps, dtype=np.float32)
    new.weight[...] = ln.weight
    new.bias[...] = ln.bias
    return new


def integer_lm(model: TransformerLM, *, blocks=None, reference: bool = False) -> TransformerLM:
    """A copy of ``model`` with :class:`IntegerBlock` in place of the blocks numbered in
    ``blocks`` (default: all; a list of block numbers, each once).  Embeddings, the final
    LayerNorm and the head stay float."""
    _lm(model)
    n = len(model.blocks)
    chosen = range(n) if blocks is None else check_int_sequence(blocks, "blocks", 0, n - 1)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"blocks must name each block once, got {describe(blocks)}")
    reference = check_bool(reference, "reference")
    out = model.copy()
    for i in chosen:
        out.blocks[i] = IntegerBlock(out.blocks[i], reference=reference)
    return out


def block_op_counts(config: LMConfig, tokens: int) -> dict[str, int]:
    r"""Operations in one block's forward over ``tokens`` positions, by where they run.

    ``"int8 MACs"``: the multiply-accumulates of the six GEMMs (qkv :math:`3d^2`, proj
    :math:`d^2`, fc1 and fc2 :math:`d\,d_{ff}` each per token; :math:`QK^T` and :math:`PV`
    :math:`T^2 d` each, all T x T entries computed, the masked ones included).  The float
    operations are counted as elementwise work: ``"float LayerNorm"`` (about 8 per element, two
    norms), ``"float softmax"`` (about 5 per score), ``"float GELU"`` (about 10 per element),
    ``"float residual"`` (one add per element, twice), ``"float epilogues"`` (2 per output of
    each GEMM), ``"float quantize"`` (about 3 per GEMM input element: abs, max, divide-round).
    ``tokens``: an int from 1 to 2**40 (counts only: nothing of that size is allocated).
    """
    check_instance(config, "config", LMConfig, "a qcourse.nn.LMConfig")
    t = check_int(tokens, "tokens", 1, 2**40)
    d, f, h = config.d_model, config.d_ff, config.n_heads
    macs = t * (3 * d * d + d * d + 2 * d * f) + 2 * t * t * d
    outputs = t * (3 * d + d + f + d) + t * t * h + t * d
    inputs = t * (d + d + d + f) + 2 * t * d + t * t * h + t * d
    return {
        "int8 MACs": macs,
        "float LayerNorm": 2 * 8 * t * d,
        "float softmax": 5 * t * t * h,
        "float GELU": 10 * t * f,
        "float residual": 2 * t * d,
        "float epilogues": 2 * outputs,
        "float quantize": 3 * inputs,
    }
