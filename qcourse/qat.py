r"""Quantization-aware training: fake quantization forward, straight-through estimator backward.

The qat chapter (``book/qat.md``) explains everything in this module.  A network is trained
(fine-tuned from its float weights) with the rounding of the deployed integer model *inside* its
forward pass, so that the weights learn to live on the integer grid:

* forward, every quantized tensor goes through a quantize-dequantize pair,

  .. math::

      \hat x = s\,\big(\operatorname{clamp}(\lfloor x/s \rceil + z,\ q_{\min},\ q_{\max}) - z\big),

  a staircase whose derivative is zero almost everywhere (:func:`fake_quantize_torch`);
* backward, the *straight-through estimator* (STE) pretends the staircase is the identity,
  either everywhere (*plain*) or only where the value was not clipped (*clipped*, the rule of
  PyTorch's ``fake_quantize_per_tensor_affine``): :func:`ste_mask`, :func:`ste_backward`;
* with *learned step size quantization* (LSQ, Esser et al. 2020) the scale :math:`s` is a
  trained parameter too, with the gradient :func:`lsq_step_size_grad` damped by the factor
  :func:`lsq_grad_scale`, starting from :func:`lsq_init_scale`; :func:`lsq_update_ratio`
  measures whether the step learns at the weights' pace.

:class:`FakeQuantLinear` is a :class:`qcourse.nn.Linear` whose weights (per tensor or per
output channel, 2 to 8 bits) and, optionally, inputs are fake-quantized; it works inside
:class:`qcourse.nn.Sequential` with forward and backward.  :func:`prepare_qat` swaps the
``Linear`` layers of a float model for fake-quantized copies and calibrates their activation
ranges (with zero epochs of training this *is* post-training quantization);
:func:`qat_finetune` then fine-tunes it; :func:`compare_ptq_qat` tabulates both across bit
widths.

Numerics follow PyTorch so that the tests can compare bit for bit: the fake quantization is
computed in the dtype of ``x`` (float32 in training), as :math:`x \cdot (1/s)` with the
reciprocal rounded to that dtype, ``rint`` (round half to even), and the STE mask is taken on
the *rounded* code: a value passes the gradient iff :math:`q_{\min} \le \lfloor x/s \rceil + z
\le q_{\max}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_EPOCHS,
    check_bool,
    check_int,
    check_labels,
    check_real,
    check_sequence,
    describe,
    float_array,
)
from qcourse._deprecated import moved_names
from qcourse.affine import QParams, choose_qparams, qrange
from qcourse.calibration import MovingAverageMinMaxObserver
from qcourse.nn import (
    Linear,
    Sequential,
    accuracy,
    copy_model,
    linear_layers,
    make_optimizer,
    train_epoch,
)
from qcourse.nn.core import _check_model_input

__all__ = [
    "FakeQuantLinear",
    "PTQQATComparison",
    "QATModel",
    "compare_ptq_qat",
    "fake_quantize_torch",
    "lsq_grad_scale",
    "lsq_init_scale",
    "lsq_step_size_grad",
    "lsq_update_ratio",
    "prepare_qat",
    "qat_finetune",
    "set_qat_training",
    "ste_backward",
    "ste_mask",
]

#: Bit widths a :class:`FakeQuantLinear` accepts (the int8 kernels run everything up to 8 bits).
MIN_BITS, MAX_BITS = 2, 8
#: Smallest value a learned (LSQ) scale is allowed to take; an optimizer step below it is undone.
SCALE_FLOOR = 1e-8


# --------------------------------------------------------------------------- validation


def _check_qparams(qparams, ndim: int) -> QParams:
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a qcourse.affine.QParams, got {type(qparams).__name__}")
    if qparams.group_size is not None:
        raise ValueError("qparams must be per-tensor or per-channel; per-group parameters are "
                         "not supported by the fake-quant STE functions")
    if qparams.axis is not None and not -ndim <= qparams.axis < ndim:
        raise ValueError(f"qparams.axis={qparams.axis} is out of range for a {ndim}-D x")
    return qparams


def _broadcast(x: np.ndarray, qparams: QParams) -> tuple[np.ndarray, np.ndarray]:
    """Scale (in ``x``'s dtype) and zero point (int64), shaped to broadcast against ``x``."""
    scale = qparams.scale.astype(x.dtype)
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError(f"qparams.scale must stay finite and > 0 in {x.dtype}, got "
                         f"{qparams.scale.min()}..{qparams.scale.max()}")
    zp = qparams.zero_point
    if qparams.axis is None:
        return scale, zp
    ax = qparams.axis % x.ndim
    if x.shape[ax] != scale.size:
        raise ValueError(f"qparams hold {scale.size} channels but x has {x.shape[ax]} along "
                         f"axis {qparams.axis} (x shape {x.shape})")
    dims = [1] * x.ndim
    dims[ax] = scale.size
    return scale.reshape(dims), zp.reshape(dims)


def _fake_quant(x: np.ndarray, qparams: QParams):
    """Core of the forward: ``(x_hat, code)`` with ``code`` the rounded, *unclamped* integer.

    Computed as PyTorch does, in ``x``'s dtype: ``inv = 1 / s``; ``code = rint(x * inv) + z``;
    ``x_hat = (clamp(code, qmin, qmax) - z) * s``.
    """
    scale, zp = _broadcast(x, qparams)
    inv = np.ones((), dtype=x.dtype) / scale
    with np.errstate(over="ignore"):
        t = np.rint(x * inv)
    code = t.astype(np.float64) + zp
    q = np.clip(code, qparams.qmin, qparams.qmax).astype(np.int64)
    x_hat = (q - zp).astype(x.dtype) * scale
    return x_hat.astype(x.dtype, copy=False), code


# --------------------------------------------------------------------------- STE functions


def fake_quantize_torch(x, qparams: QParams) -> np.ndarray:
    r"""Fake quantization, the forward pass of QAT:
    :math:`\hat x = s\,(\operatorname{clamp}(\lfloor x/s \rceil + z, q_{\min}, q_{\max}) - z)`.

    The values stay real but take only the :math:`q_{\max} - q_{\min} + 1` levels of the grid.
    Computed in the dtype of ``x`` exactly as PyTorch's ``fake_quantize_per_tensor_affine`` and
    ``fake_quantize_per_channel_affine`` compute it: the scale is rounded to that dtype, the
    division is a multiplication by the reciprocal :math:`1/s` (also rounded to that dtype), and
    :math:`\lfloor\cdot\rceil` rounds half to even.  On a few values a hair away from a rounding
    tie this can differ by one step from :func:`qcourse.affine.fake_quantize`, which divides in
    float64.  See the qat chapter.

    Parameters
    ----------
    x : array_like, float32 or float64
        Finite values, not empty.
    qparams : QParams
        Per-tensor or per-channel (``axis`` indexes ``x``).

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``.
    """
    x = float_array(x, "x")
    qparams = _check_qparams(qparams, x.ndim)
    return _fake_quant(x, qparams)[0]


def ste_mask(x, qparams: QParams) -> np.ndarray:
    r"""Where the clipped straight-through estimator lets the gradient through:
    :math:`q_{\min} \le \lfloor x/s \rceil + z \le q_{\max}`.

    The test is on the *rounded* code, as in PyTorch: a value up to half a step beyond the
    representable range still rounds onto the grid and keeps its gradient; a value that rounds
    off the grid (a tie at :math:`q_{\max} + \tfrac12` rounds to the even neighbour) is clipped
    and gets none.  Esser et al. (2020) write the condition on the unrounded
    :math:`x/s`; the two differ only in that half-step band.  See the qat chapter.

    Returns
    -------
    numpy.ndarray of bool, shape of ``x``
    """
    x = float_array(x, "x")
    qparams = _check_qparams(qparams, x.ndim)
    code = _fake_quant(x, qparams)[1]
    return (code >= qparams.qmin) & (code <= qparams.qmax)


def ste_backward(grad, x, qparams: QParams, clipped: bool = True) -> np.ndarray:
    r"""The straight-through estimator: the gradient of the loss with respect to ``x``, given
    ``grad`` :math:`= \partial L / \partial \hat x` for :math:`\hat x` =
    :func:`fake_quantize_torch` ``(x, qparams)``.

    The true derivative of the staircase is zero almost everywhere (and undefined on the
    steps), which would stop all learning.  The STE replaces it:

    .. math::

        \text{plain:}\quad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial \hat x},
        \qquad
        \text{clipped:}\quad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial \hat x}
        \cdot \mathbb{1}\big[q_{\min} \le \lfloor x/s \rceil + z \le q_{\max}\big].

    The plain STE treats the whole fake quantizer as the identity; the clipped one as the
    identity inside the range and a constant outside it (the derivative of the clamp), so a
    value pushed beyond the range stops receiving a gradient that cannot change its output.
    The mask is :func:`ste_mask`.  See the qat chapter.

    Parameters
    ----------
    grad : array_like, float32 or float64
        :math:`\partial L / \partial \hat x`, same shape as ``x``, finite.
    x : array_like, float32 or float64
        The input of the forward pass.
    qparams : QParams
    clipped : bool, default True

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``grad`` (a new array).
    """
    grad = float_array(grad, "grad")
    x = float_array(x, "x")
    clipped = check_bool(clipped, "clipped")
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {x.shape}, got {grad.shape}")
    qparams = _check_qparams(qparams, x.ndim)
    if not clipped:
        return grad.copy()
    return np.where(ste_mask(x, qparams), grad, np.zeros((), dtype=grad.dtype))


# --------------------------------------------------------------------------- LSQ


def lsq_grad_scale(num_elements: int, qmax: int) -> float:
    r"""LSQ's gradient scale factor :math:`g = 1 / \sqrt{N\,Q_P}`.

    :math:`N` is the number of values that share the step size (the weights of a layer, or of
    one output channel per-channel; the features of one example for an activation) and
    :math:`Q_P` the largest positive code.  Esser et al. (2020) multiply the step size's
    gradient by :math:`g` so that its update is, relative to :math:`s`, about as large as the
    weights' updates relative to the weights: without it the step size receives the summed
    gradient of :math:`N` values and moves far too fast (with SGD; Adam normalizes gradients
    and is nearly indifferent to a constant factor).  See the qat chapter.

    Bounds: ``num_elements`` in [1, 2**63], ``qmax`` in [1, 2**31].
    """
    n = check_int(num_elements, "num_elements", 1, 2**63)
    qmax = check_int(qmax, "qmax", 1, 2**31)
    return 1.0 / math.sqrt(n * qmax)


def lsq_init_scale(x, qmax: int, axis: int | None = None):
    r"""LSQ's initial step size :math:`s_0 = 2\,\langle |x| \rangle / \sqrt{Q_P}`.

    :math:`\langle |x| \rangle` is the mean absolute value of ``x`` (per index along ``axis``
    when ``axis`` is given: one step per channel), :math:`Q_P` = ``qmax`` the largest positive
    code (Esser et al. 2020).  A tensor (or channel) of zeros gets :math:`s_0 = 1`, as
    :func:`qcourse.affine.qparams_from_range` does for an all-zero range.  See the qat chapter.

    Returns
    -------
    float, or a 1-D float64 array (one step per channel) when ``axis`` is given.
    """
    x = float_array(x, "x").astype(np.float64)
    qmax = check_int(qmax, "qmax", 1, 2**31)
    if axis is None:
        mean_abs = np.mean(np.abs(x))
    else:
        axis = check_int(axis, "axis")
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis={axis} is out of range for a {x.ndim}-D x")
        others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        mean_abs = np.mean(np.abs(x), axis=others)
    s0 = np.where(mean_abs > 0, 2.0 * mean_abs / math.sqrt(qmax), 1.0)
    return float(s0) if axis is None else s0


def lsq_step_size_grad(grad, x, qparams: QParams, grad_scale: float = 1.0) -> np.ndarray:
    r"""LSQ's gradient of the loss with respect to the step size :math:`s` (Esser et al. 2020).

    With :math:`\hat x = s\,(\operatorname{clamp}(\lfloor x/s \rceil + z, q_{\min}, q_{\max})
    - z)` and the rounding passed straight through,

    .. math::

        \frac{\partial \hat x}{\partial s} =
        \begin{cases}
            (\hat x - x)/s = \lfloor x/s \rceil - x/s & \text{inside the range,} \\
            q_{\min} - z & \text{clipped below,} \\
            q_{\max} - z & \text{clipped above,}
        \end{cases}

    and :math:`\partial L/\partial s = g \sum_i (\partial L/\partial \hat x_i)\,
    \partial \hat x_i/\partial s` over the values sharing the step (all of ``x`` per tensor,
    every index but ``axis`` per channel), :math:`g` = ``grad_scale`` (see
    :func:`lsq_grad_scale`).  Inside the range the term is the rounding error in units of
    the step, in :math:`[-\tfrac12, \tfrac12]`: it pulls :math:`s` to shrink or grow so the
    grid meets the values; outside it is a full code count, pushing the range outward.
    "Inside" is decided on the rounded code as in :func:`ste_mask`.  Each term is computed in
    the dtype of ``x`` as PyTorch's ``_fake_quantize_learnable_per_tensor_affine`` does; the
    sum is taken in float64.  See the qat chapter.

    Returns
    -------
    numpy.ndarray, float64
        Shape of ``qparams.scale`` (0-d per tensor, ``(C,)`` per channel).
    """
    grad = float_array(grad, "grad")
    x = float_array(x, "x")
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {x.shape}, got {grad.shape}")
    qparams = _check_qparams(qparams, x.ndim)
    g = check_real(grad_scale, "grad_scale", 0, lo_open=True)
    x_hat, code = _fake_quant(x, qparams)
    return _lsq_step_size_grad(grad, x, x_hat, code, qparams, g)


def _lsq_step_size_grad(grad, x, x_hat, code, qparams: QParams, g: float) -> np.ndarray:
    """:func:`lsq_step_size_grad` from the forward's ``x_hat`` and unclamped ``code``."""
    scale, zp = _broadcast(x, qparams)
    inv = np.ones((), dtype=x.dtype) / scale
    inside = (x_hat - x) * inv
    low = (qparams.qmin - zp).astype(x.dtype)
    high = (qparams.qmax - zp).astype(x.dtype)
    dxhat_ds = np.where(code < qparams.qmin, low, np.where(code > qparams.qmax, high, inside))
    terms = grad.astype(np.float64) * dxhat_ds.astype(np.float64)
    if qparams.axis is None:
        return np.asarray(g * terms.sum())
    ax = qparams.axis % x.ndim
    others = tuple(i for i in range(x.ndim) if i != ax)
    return g * terms.sum(axis=others)


def lsq_update_ratio(layer: FakeQuantLinear, *, with_grad_scale: bool = True) -> float:
    r"""Esser et al.'s (2020) balance between the step size's and the weights' updates:

    .. math::

        R = \frac{\lVert \nabla_s L \rVert / \lVert s \rVert}
                 {\lVert \nabla_W L \rVert / \lVert W \rVert},

    read from the gradients the last ``layer.backward`` left in an LSQ :class:`FakeQuantLinear`
    (norms over the channels for per-channel steps).  A plain gradient step changes each
    parameter by a fraction proportional to its ratio, so :math:`R \approx 1` means the step
    size learns at the weights' pace.  ``with_grad_scale=False`` divides out the factor
    :func:`lsq_grad_scale`: the ratio the unscaled gradient would have.  See the qat chapter.
    """
    if not isinstance(layer, FakeQuantLinear) or not layer.lsq:
        raise TypeError("layer must be a FakeQuantLinear with lsq=True")
    with_grad_scale = check_bool(with_grad_scale, "with_grad_scale")
    if layer._cache is None:
        raise RuntimeError("lsq_update_ratio needs a forward and a backward of the layer first")
    grad_w = float(np.linalg.norm(layer.grad_weight))
    if grad_w == 0:
        raise ValueError("the weight gradient is zero: R is undefined")
    ratio = (float(np.linalg.norm(layer.grad_weight_scale)) / float(np.linalg.norm(
        layer.weight_scale))) / (grad_w / float(np.linalg.norm(layer.weight)))
    return ratio if with_grad_scale else ratio / layer.weight_grad_scale


# --------------------------------------------------------------------------- the layer


class FakeQuantLinear(Linear):
    r"""A :class:`qcourse.nn.Linear` trained through fake quantization:
    :math:`y = \hat x\,\hat W^T + b`.

    Forward, the weight is fake-quantized on a signed, symmetric, narrow grid of ``bits`` bits,
    :math:`q \in [-(2^{b-1}-1),\ 2^{b-1}-1]` (int8: -127..127, int4: -7..7, int2: the ternary
    -1..1), per output channel (``per_channel=True``, one scale per row of ``weight``) or per
    tensor.  Its scale is either read from the current weights (abs-max, recomputed at every
    forward, with no gradient; PyTorch's default QAT weight observer keeps a moving average of
    the same extremes) or learned (``lsq=True``, :func:`lsq_step_size_grad`).  With ``act_bits``
    set, the *input* is fake-quantized too, on an unsigned ``act_bits``-bit grid: its range
    follows a moving average of the batches' min and max while ``training`` is True (PyTorch's
    QAT activation observer, averaging constant 0.01) and is frozen otherwise; with
    ``lsq=True`` its scale is learned instead (zero point 0, for non-negative inputs such as
    pixels and ReLU outputs).  The bias stays float (it becomes an int32 at conversion).  The
    attribute ``training`` (True on construction; see :func:`set_qat_training`) decides whether
    a forward moves the input range.

    Backward: :math:`\partial L/\partial b = \sum g`, :math:`\partial L/\partial \hat W = g^T
    \hat x`, :math:`\partial L/\partial \hat x = g \hat W`, then the straight-through estimator
    (:func:`ste_backward`, ``ste="clipped"`` or ``"plain"``) carries :math:`\partial L/\partial
    \hat W` to the float weight and :math:`\partial L/\partial \hat x` to the input; with LSQ
    the scales get :func:`lsq_step_size_grad` times :func:`lsq_grad_scale`.  The float weights are
    the "shadow" weights the optimizer updates; only their fake-quantized copy is ever used.
    See the qat chapter.

    Parameters
    ----------
    in_features, out_features : int
    bits : int, default 8
        Weight bits, 2 to 8.
    act_bits : int or None, default None
        Input (activation) bits, 2 to 8, or None to leave the input in float.
    per_channel : bool, default True
    ste : {"clipped", "plain"}, default "clipped"
    lsq : bool, default False
        Learn the weight scale (and the input scale, with ``act_bits``) by LSQ.
    seed, dtype :
        As for :class:`qcourse.nn.Linear`.
    averaging_constant : float, default 0.01
        Of the input range's moving average (without LSQ).

    Bounds: ``bits`` and ``act_bits`` in [2, 8]; ``in_features`` and ``out_features`` as for
    :class:`qcourse.nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int = 8,
                 act_bits: int | None = None, per_channel: bool = True, ste: str = "clipped",
                 lsq: bool = False, seed=0, dtype=np.float32, averaging_constant: float = 0.01):
        super().__init__(in_features, out_features, seed=seed, dtype=dtype)
        self.bits = check_int(bits, "bits", MIN_BITS, MAX_BITS)
        self.act_bits = (None if act_bits is None
                         else check_int(act_bits, "act_bits", MIN_BITS, MAX_BITS))
        self.per_channel = check_bool(per_channel, "per_channel")
        if ste not in ("clipped", "plain"):
            raise ValueError(f"ste must be 'clipped' or 'plain', got {ste!r}")
        self.ste = ste
        self.lsq = check_bool(lsq, "lsq")
        self.training = True
        self.wmin, self.wmax = qrange(self.bits, True, narrow_range=True)
        dt = self.weight.dtype
        self.weight_scale = np.ones(out_features if self.per_channel else (), dtype=dt)
        self.grad_weight_scale = np.zeros_like(self.weight_scale)
        self.act_scale = np.ones((), dtype=dt)
        self.grad_act_scale = np.zeros_like(self.act_scale)
        self._act_scale_ready = False
        self.act_observer = None
        if self.act_bits is not None and not self.lsq:
            self.act_observer = MovingAverageMinMaxObserver(
                averaging_constant, bits=self.act_bits, signed=False)
        if self.lsq:
            self.reset_weight_scale()
        self._cache = None

    @classmethod
    def from_linear(cls, linear: Linear, **kwargs) -> FakeQuantLinear:
        """A fake-quantized copy of ``linear`` (weights and bias copied; ``linear`` untouched).
        ``kwargs`` are the keyword arguments of the constructor."""
        if not isinstance(linear, Linear) or isinstance(linear, FakeQuantLinear):
            raise TypeError(f"linear must be a plain qcourse.nn.Linear, got "
                            f"{type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, dtype=linear.weight.dtype, **kwargs)
        layer.weight[...] = linear.weight
        layer.bias[...] = linear.bias
        if layer.lsq:
            layer.reset_weight_scale()
        return layer

    # ---- quantization parameters

    def reset_weight_scale(self) -> None:
        """Set the learned weight scale to LSQ's :func:`lsq_init_scale` of the current weights."""
        s0 = lsq_init_scale(self.weight, self.wmax, axis=0 if self.per_channel else None)
        self.weight_scale[...] = s0

    @property
    def weight_grad_scale(self) -> float:
        """LSQ's :func:`lsq_grad_scale` for the weight step: :math:`N` is the number of weights
        sharing one step (``in_features`` per channel, all of them per tensor)."""
        n = self.in_features if self.per_channel else self.weight.size
        return lsq_grad_scale(n, self.wmax)

    def weight_qparams(self) -> QParams:
        """The weight's :class:`~qcourse.affine.QParams` as the next forward will use them."""
        axis = 0 if self.per_channel else None
        if self.lsq:
            np.maximum(self.weight_scale, SCALE_FLOOR, out=self.weight_scale)
            return QParams(scale=self.weight_scale.astype(np.float64), zero_point=np.int64(0),
                           qmin=self.wmin, qmax=self.wmax, axis=axis)
        return choose_qparams(self.weight, bits=self.bits, signed=True, symmetric=True,
                              narrow_range=True, axis=axis)

    def input_qparams(self) -> QParams | None:
        """The input's (activation's) QParams, or None when the input is not quantized."""
        if self.act_bits is None:
            return None
        amin, amax = qrange(self.act_bits, False)
        if self.lsq:
            if not self._act_scale_ready:
                raise RuntimeError(self._no_range_message())
            np.maximum(self.act_scale, SCALE_FLOOR, out=self.act_scale)
            return QParams(scale=self.act_scale.astype(np.float64), zero_point=np.int64(0),
                           qmin=amin, qmax=amax)
        if self.act_observer.num_batches == 0:
            raise RuntimeError(self._no_range_message())
        return self.act_observer.qparams()

    def _no_range_message(self) -> str:
        return ("FakeQuantLinear has no input range yet: run a forward with training=True "
                "(prepare_qat does this with calibration data) before a frozen forward")

    def quantized_weight(self) -> tuple[np.ndarray, QParams]:
        """The integer weight ``q`` (int8, within ``[-(2^{b-1}-1), 2^{b-1}-1]``) and its
        QParams: the weight as an integer-only model would store it."""
        qp = self.weight_qparams()
        _, code = _fake_quant(self.weight, qp)
        return np.clip(code, qp.qmin, qp.qmax).astype(np.int8), qp

    def to_linear(self) -> Linear:
        """A plain :class:`~qcourse.nn.Linear` holding the fake-quantized weight (and bias)."""
        lin = Linear(self.in_features, self.out_features, dtype=self.weight.dtype)
        lin.weight[...] = _fake_quant(self.weight, self.weight_qparams())[0]
        lin.bias[...] = self.bias
        return lin

    # ---- forward and backward

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch >= 1, {self.in_features}) for this "
                             f"layer, got {x.shape}")
        x = float_array(x, "x").astype(self.weight.dtype, copy=False)
        act_qp, x_hat, act_code = None, x, None
        if self.act_bits is not None:
            if self.training:
                if self.lsq and not self._act_scale_ready:
                    amax = qrange(self.act_bits, False)[1]
                    self.act_scale[...] = lsq_init_scale(x, amax)
                    self._act_scale_ready = True
                elif not self.lsq:
                    self.act_observer.update(x)
            act_qp = self.input_qparams()
            x_hat, act_code = _fake_quant(x, act_qp)
        w_qp = self.weight_qparams()
        w_hat, w_code = _fake_quant(self.weight, w_qp)
        self._cache = (x, x_hat, act_qp, act_code, w_hat, w_qp, w_code)
        self._x = x_hat
        return x_hat @ w_hat.T + self.bias

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("FakeQuantLinear.backward called before forward")
        x, x_hat, act_qp, act_code, w_hat, w_qp, w_code = self._cache
        if not isinstance(grad_out, np.ndarray) or grad_out.shape != (x.shape[0],
                                                                      self.out_features):
            got = grad_out.shape if isinstance(grad_out, np.ndarray) else type(grad_out).__name__
            raise ValueError(f"grad_out must have shape {(x.shape[0], self.out_features)}, "
                             f"got {got}")
        g = grad_out.astype(self.weight.dtype, copy=False)
        self.grad_bias[...] = g.sum(axis=0)
        grad_w_hat = g.T @ x_hat
        w_mask = (w_code >= w_qp.qmin) & (w_code <= w_qp.qmax)
        if self.ste == "clipped":
            self.grad_weight[...] = np.where(w_mask, grad_w_hat, 0)
        else:
            self.grad_weight[...] = grad_w_hat
        if self.lsq:
            gs = self.weight_grad_scale
            self.grad_weight_scale[...] = _lsq_step_size_grad(grad_w_hat, self.weight, w_hat,
                                                          w_code, w_qp, gs)
        grad_x_hat = g @ w_hat
        if act_qp is None:
            return grad_x_hat
        if self.lsq:
            gs = lsq_grad_scale(self.in_features, act_qp.qmax)
            self.grad_act_scale[...] = _lsq_step_size_grad(grad_x_hat, x, x_hat, act_code, act_qp,
                                                       gs)
        if self.ste == "plain":
            return grad_x_hat
        a_mask = (act_code >= act_qp.qmin) & (act_code <= act_qp.qmax)
        return np.where(a_mask, grad_x_hat, np.zeros((), dtype=grad_x_hat.dtype))

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        params = super().parameters()
        if self.lsq:
            params.append((self.weight_scale, self.grad_weight_scale))
            if self.act_bits is not None:
                params.append((self.act_scale, self.grad_act_scale))
        return params

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        params = super().named_parameters()
        if self.lsq:
            params.append(("weight_scale", self.weight_scale))
            if self.act_bits is not None:
                params.append(("act_scale", self.act_scale))
        return params

    def __repr__(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        act = "float" if self.act_bits is None else f"{self.act_bits}-bit"
        lsq = ", lsq" if self.lsq else ""
        return (f"FakeQuantLinear(in_features={self.in_features}, "
                f"out_features={self.out_features}, bits={self.bits} {gran}, input {act}, "
                f"ste={self.ste}{lsq})")


# --------------------------------------------------------------------------- models


class QATModel(Sequential):
    """A :class:`qcourse.nn.Sequential` made by :func:`prepare_qat` (and trained by
    :func:`qat_finetune`), with the settings it was built with in ``config`` and, after
    fine-tuning, the per-epoch ``history``."""

    def __init__(self, *layers, config: dict | None = None):
        super().__init__(*layers)
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or None, got {describe(config)}")
        self.config = dict(config or {})
        self.history: dict[str, list[float]] = {}

    def fake_quant_layers(self) -> list[tuple[str, FakeQuantLinear]]:
        """``(name, layer)`` for every :class:`FakeQuantLinear`, in order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, FakeQuantLinear)]


def set_qat_training(model: Sequential, training: bool) -> None:
    """Switch every :class:`FakeQuantLinear` of ``model`` to training (input ranges follow the
    data) or frozen (ranges fixed, as at deployment).  See the qat chapter."""
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    training = check_bool(training, "training")
    for layer in model:
        if isinstance(layer, FakeQuantLinear):
            layer.training = training


def _per_layer(value, names: list[str], name: str, allow_none: bool) -> dict[str, int | None]:
    """``value`` (one setting, or a mapping layer name -> setting) as a dict over ``names``."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"{name} names layers {sorted(unknown)} that are not Linear "
                             f"layers of the model ({names})")
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{name} must give a value for every Linear layer; missing "
                             f"{missing}")
        out = dict(value)
    else:
        out = {n: value for n in names}
    for n, v in out.items():
        if v is None and allow_none:
            continue
        check_int(v, f"{name}[{n!r}]" if isinstance(value, Mapping) else name, MIN_BITS, MAX_BITS)
    return out


def _check_xy(model, X, y, name_x: str = "X", name_y: str = "y"):
    """Inputs of ``model`` (finite floats of its width and dtype) and their integer labels."""
    X = _check_model_input(model, X, name_x)
    return X, check_labels(y, name_y, X.shape[0])


def prepare_qat(model: Sequential, bits=8, *, act_bits=8, per_channel: bool = True,
                ste: str = "clipped", lsq: bool = False, calib_X=None,
                averaging_constant: float = 0.01) -> QATModel:
    r"""A copy of the float ``model`` ready for quantization-aware training.

    Every :class:`~qcourse.nn.Linear` becomes a :class:`FakeQuantLinear` with the same weights;
    other layers are copied.  ``bits`` and ``act_bits`` are one value for all layers or a
    mapping ``{layer name: bits}`` (mixed precision).  When inputs are quantized, ``calib_X``
    (representative, unlabelled inputs) is run through the model once to set each input range
    (min-max over the calibration data; LSQ: :func:`lsq_init_scale`), and the model is
    returned *frozen* (see :func:`set_qat_training`).  Evaluated as it is, this model is
    post-training quantization with the same quantizers QAT uses; the original ``model`` is not
    changed.  See the qat chapter.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    named = model.named_modules()
    if any(isinstance(m, FakeQuantLinear) for _, m in named):
        raise ValueError("model already contains FakeQuantLinear layers; prepare_qat takes the "
                         "float model")
    linear_names = linear_layers(model)
    if not linear_names:
        raise ValueError("model has no Linear layer to quantize")
    w_bits = _per_layer(bits, linear_names, "bits", allow_none=False)
    a_bits = _per_layer(act_bits, linear_names, "act_bits", allow_none=True)
    if any(b is not None for b in a_bits.values()):
        if calib_X is None:
            raise ValueError("calib_X is required when inputs are quantized (act_bits is not "
                             "None): it sets the activation ranges")
        calib_X = _check_model_input(model, calib_X, "calib_X")
    layers = []
    for name, module in named:
        if isinstance(module, Linear):
            module = FakeQuantLinear.from_linear(
                module, bits=w_bits[name], act_bits=a_bits[name], per_channel=per_channel,
                ste=ste, lsq=lsq, averaging_constant=averaging_constant)
        else:
            module = copy_model(module)
        layers.append((name, module))
    config = {"bits": w_bits, "act_bits": a_bits, "per_channel": per_channel, "ste": ste,
              "lsq": lsq}
    qmodel = QATModel(*layers, config=config)
    if calib_X is not None and any(b is not None for b in a_bits.values()):
        set_qat_training(qmodel, True)
        qmodel(calib_X)
    set_qat_training(qmodel, False)
    return qmodel


def qat_finetune(model: Sequential, X, y, bits=4, epochs: int = 5, seed: int = 0,
                 progress: bool = True, *, act_bits=8, per_channel: bool = True,
                 ste: str = "clipped", lsq: bool = False, lr: float = 1e-3,
                 batch_size: int = 32, optimizer: str = "adam", weight_decay: float = 0.0,
                 calib_X=None, X_val=None, y_val=None) -> QATModel:
    r"""Quantization-aware fine-tuning of the float ``model``; returns a new, frozen
    :class:`QATModel` (``model`` is not changed).

    :func:`prepare_qat` builds the fake-quantized copy (``calib_X`` defaults to the first 512
    rows of ``X``); then, for ``epochs`` passes over ``(X, y)`` in an order drawn from
    ``np.random.default_rng(seed)``, in batches of ``batch_size``: forward through the fake
    quantizers, softmax cross-entropy, backward through the straight-through estimator, one
    optimizer step on the float (shadow) weights, and, with LSQ, the scales.  The input ranges
    follow the batches during training and are frozen at the end.  ``epochs=0`` returns the
    post-training-quantized model.

    The result's ``history`` holds per-epoch ``loss`` and ``train_accuracy`` (measured on the
    fly), and, with ``X_val``/``y_val``, ``val_accuracy`` of the frozen model *before* training
    and after each epoch (``epochs + 1`` entries).  ``progress=True`` shows a tqdm bar.  The
    same arguments give bit-identical weights.  See the qat chapter.

    Bounds: ``epochs`` in [0, 100000], ``batch_size`` in [1, 2**28], bit widths in [2, 8]; a
    step that makes a weight NaN or Inf (too large an ``lr``) raises ``ValueError``.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    X, y = _check_xy(model, X, y)
    epochs = check_int(epochs, "epochs", 0, MAX_EPOCHS)
    seed = check_int(seed, "seed", 0)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    lr = check_real(lr, "lr", 0, lo_open=True)
    check_bool(progress, "progress")
    if X_val is not None or y_val is not None:
        if X_val is None or y_val is None:
            raise ValueError("X_val and y_val must be given together")
        X_val, y_val = _check_xy(model, X_val, y_val, "X_val", "y_val")
    if calib_X is None:
        calib_X = X[:512]
    qmodel = prepare_qat(model, bits, act_bits=act_bits, per_channel=per_channel, ste=ste,
                         lsq=lsq, calib_X=calib_X)
    n_out = [m for m in qmodel if isinstance(m, Linear)][-1].out_features
    if y.size and (y.min() < 0 or y.max() >= n_out):
        raise ValueError(f"y must hold labels in [0, {n_out}), got {int(y.min())}..{int(y.max())}")
    opt = make_optimizer(qmodel.parameters(), optimizer, lr, weight_decay)
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    if X_val is not None:
        history["val_accuracy"] = [accuracy(qmodel, X_val, y_val)]
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    bar = tqdm(range(epochs), desc=f"QAT ({_bits_text(qmodel.config['bits'])})", unit="epoch",
               disable=not progress)
    for _ in bar:
        set_qat_training(qmodel, True)
        loss, acc = train_epoch(qmodel, X, y, rng.permutation(n), batch_size, opt)
        set_qat_training(qmodel, False)
        history["loss"].append(loss)
        history["train_accuracy"].append(acc)
        postfix = {"loss": f"{history['loss'][-1]:.4f}"}
        if X_val is not None:
            history["val_accuracy"].append(accuracy(qmodel, X_val, y_val))
            postfix["val_acc"] = f"{history['val_accuracy'][-1]:.3f}"
        bar.set_postfix(postfix)
    bar.close()
    qmodel.history = history
    qmodel.config.update({"epochs": epochs, "lr": lr, "seed": seed, "batch_size": batch_size,
                          "optimizer": optimizer})
    return qmodel


def _bits_text(bits: dict) -> str:
    values = sorted(set(bits.values()))
    return f"{values[0]}-bit" if len(values) == 1 else "mixed"


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class PTQQATComparison:
    """One row of :func:`compare_ptq_qat`: accuracies (fractions) at ``bits``."""

    bits: int
    float_accuracy: float
    ptq_accuracy: float
    qat_accuracy: float
    val_history: tuple[float, ...] = field(default=())

    @property
    def ptq_drop(self) -> float:
        """Float minus PTQ accuracy, in points (percent)."""
        return 100.0 * (self.float_accuracy - self.ptq_accuracy)

    @property
    def qat_drop(self) -> float:
        """Float minus QAT accuracy, in points (percent)."""
        return 100.0 * (self.float_accuracy - self.qat_accuracy)


def compare_ptq_qat(model: Sequential, X, y, X_test, y_test, bits=(8, 4, 2), *,
                    epochs: int = 5, seed: int = 0, act_bits="same",
                    **kwargs) -> list[PTQQATComparison]:
    """Float, post-training-quantized and quantization-aware-trained accuracy on
    ``(X_test, y_test)`` for each weight bit width in ``bits``.

    PTQ is :func:`prepare_qat` evaluated as it is (the same fake quantizers, ranges from the
    first 512 rows of ``X``, no training); QAT is :func:`qat_finetune` for ``epochs`` epochs
    from the float model.  ``act_bits="same"`` quantizes the inputs of every layer with the
    weights' bit width; an int or None is used as is.  ``kwargs`` go to :func:`qat_finetune`
    (``lsq``, ``lr``, ``per_channel``, ...).  ``val_history`` holds the QAT model's test
    accuracy before training and after each epoch.  See the qat chapter.

    Bounds: ``epochs`` in [0, 100000]; each entry of ``bits`` in [2, 8].
    """
    X, y = _check_xy(model, X, y)
    X_test, y_test = _check_xy(model, X_test, y_test, "X_test", "y_test")
    bits = check_sequence(bits, "bits", min_len=1)
    float_acc = accuracy(model, X_test, y_test)
    rows = []
    for b in bits:
        b = check_int(b, "each entry of bits", MIN_BITS, MAX_BITS)
        a = b if act_bits == "same" else act_bits
        qat = qat_finetune(model, X, y, bits=b, epochs=epochs, seed=seed, act_bits=a,
                           X_val=X_test, y_val=y_test, **kwargs)
        hist = tuple(qat.history["val_accuracy"])
        rows.append(PTQQATComparison(bits=b, float_accuracy=float_acc, ptq_accuracy=hist[0],
                             qat_accuracy=hist[-1], val_history=hist))
    return rows


__getattr__ = moved_names(__name__, {
    "fake_quant_ste_forward": "qcourse.qat.fake_quantize_torch",
    "lsq_scale_grad": "qcourse.qat.lsq_step_size_grad",
})
