"""Quantization-aware training of the course CNN: :class:`WeightFakeQuant` and :func:`qat_cnn`.

Private plumbing of :mod:`qcourse.cnn`, which re-exports both (the module keeps to the size
budget of ``tests/test_layout.py``).  The qat chapter trains the CNN at 4 bits with activation
ranges calibrated once, and at 7 bits with ranges tracked by a moving average during training
as Jacob et al. (2018) did, to compare ReLU6 with ReLU.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import (
    MAX_ELEMENTS,
    MAX_EPOCHS,
    check_bool,
    check_choice,
    check_int,
    check_labels,
    check_real,
)
from qcourse.affine import fake_quantize
from qcourse.affine.quantizer import MAX_BITS, MIN_BITS
from qcourse.nn import (
    Adam,
    Conv2d,
    GlobalAvgPool2d,
    Linear,
    Module,
    Sequential,
    capture_activations,
    one_blas_thread,
    train_epoch,
)
from qcourse.nn.core import _check_model_input, _num_outputs

#: How :func:`qat_cnn` sets the activation grids.
ACT_RANGES = ("fixed", "ema")


class WeightFakeQuant(Module):
    r"""A Conv2d or Linear whose forward uses its weight fake-quantized (quantization-aware
    training); the optimizer updates the float *shadow* weight.

    Forward: :math:`y = f(x; \hat W)` with :math:`\hat W = s\,\mathrm{round}(W/s)` on the
    symmetric ``bits``-bit grid of :func:`quantize_conv_weight` (its scale recomputed from the
    current :math:`W` at every step).  Backward: the gradients of :math:`\hat W` are given to
    :math:`W` unchanged (the straight-through estimator; no weight is ever clipped by a
    min-max grid).  ``inner`` is the wrapped layer.
    """

    def __init__(self, inner: Module, bits: int, *, per_channel: bool = True):
        super().__init__()
        if not isinstance(inner, Conv2d | Linear):
            raise TypeError(f"inner must be a Conv2d or Linear, got {type(inner).__name__}")
        self.inner = inner
        self.bits = check_int(bits, "bits", MIN_BITS, MAX_BITS)
        self.per_channel = check_bool(per_channel, "per_channel")
        self._fq = None

    @property
    def weight(self) -> np.ndarray:
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def quantized_weight(self) -> np.ndarray:
        from qcourse import cnn as _cnn  # cnn imports this module: look it up when called

        return _cnn._dequantized_weight(self.inner.weight, self.bits, self.per_channel)

    def _swap(self, w, fn, arg):
        shadow = self.inner.weight
        self.inner.weight = w
        try:
            return fn(arg)
        finally:
            self.inner.weight = shadow

    def forward(self, x):
        self._fq = self.quantized_weight()
        return self._swap(self._fq, self.inner.forward, x)

    def backward(self, grad_out):
        if self._fq is None:
            raise RuntimeError("WeightFakeQuant.backward called before forward")
        return self._swap(self._fq, self.inner.backward, grad_out)

    def parameters(self):
        return self.inner.parameters()

    def named_parameters(self):
        return self.inner.named_parameters()

    def __repr__(self) -> str:
        return f"WeightFakeQuant({self.inner!r}, bits={self.bits})"


class _MovingRange:
    """The forward hook of one stored tensor in :func:`qat_cnn` with ``act_ranges="ema"``.

    Starts from the calibrated min and max; while ``training``, every batch moves each a
    fraction ``c`` of the way to the batch's own extreme (as
    :class:`qcourse.calibration.MovingAverageMinMaxObserver` does); the output is fake-quantized
    on the grid of the current range (:meth:`qparams`).
    """

    def __init__(self, lo: float, hi: float, bits: int, c: float):
        self.lo, self.hi, self.bits, self.c = lo, hi, bits, c
        self.training = False

    def qparams(self):
        from qcourse import cnn as _cnn

        return _cnn._minmax_qparams(np.array([self.lo, self.hi]), self.bits)

    def __call__(self, module, inp, out):
        if self.training:
            self.lo += self.c * (float(out.min()) - self.lo)
            self.hi += self.c * (float(out.max()) - self.hi)
        return fake_quantize(out, self.qparams())


def _moving_ranges(model: Sequential, sim: Sequential, X_calib, bits: int,
                   c: float) -> dict[str, _MovingRange]:
    """Hook a :class:`_MovingRange` on each point of ``sim`` where the integer network stores a
    tensor, started from ``model``'s min and max over ``X_calib``; the pool rounds onto its
    input's current grid."""
    from qcourse import cnn as _cnn

    points = _cnn._quant_points(model)
    seen = capture_activations(model, X_calib, layers=points)
    ranges, prev = {}, None
    for name, layer in sim.named_modules():
        if name in points:
            out = seen[name].output
            ranges[name] = prev = _MovingRange(float(out.min()), float(out.max()), bits, c)
            layer.register_forward_hook(prev)
        elif isinstance(layer, GlobalAvgPool2d):
            layer.register_forward_hook(lambda m, x, out, p=prev: fake_quantize(out, p.qparams()))
    return ranges


def qat_cnn(model: Sequential, X, y, X_calib, *, weight_bits: int = 4, act_bits: int = 8,
            per_channel: bool = True, epochs: int = 5, lr: float = 1e-3,
            batch_size: int = 32, seed: int = 0, progress: bool = False,
            act_ranges: str = "fixed", averaging_constant: float = 0.01):
    r"""Quantization-aware fine-tuning of a folded CNN; returns the fine-tuned
    :class:`qcourse.cnn.QuantSim`.

    Starts from :func:`qcourse.cnn.simulate_quantized` (the input's and every stored tensor's
    range calibrated min-max on ``X_calib``; fake quantization in the forward pass, identity in
    the backward pass), with every weighted layer wrapped in :class:`WeightFakeQuant`
    (``weight_bits``), and trains for ``epochs`` with Adam (``lr``) through
    :func:`qcourse.nn.train_epoch`.  The network learns weights that survive their grid.  With
    ``act_ranges="fixed"`` the activation ranges stay as calibrated; with ``"ema"`` each moves
    during training by an exponential moving average of the batches' min and max (constant
    ``averaging_constant``, in (0, 1]), the simulated quantization of Jacob et al. (2018); the
    returned record holds the final grids.  ``model`` is not changed.  Bits are ints in [2, 16],
    ``epochs`` in [1, 100000], ``batch_size`` in [1, 2**28].
    """
    from qcourse import cnn as _cnn

    _cnn._check_unfolded(model)
    X = _check_model_input(model, X, "X")
    y = check_labels(y, "y", X.shape[0], _num_outputs(model))
    X_calib = _check_model_input(model, X_calib, "X_calib")
    weight_bits = _cnn._bits_arg(weight_bits, "weight_bits")
    act_bits = _cnn._bits_arg(act_bits, "act_bits")
    per_channel = check_bool(per_channel, "per_channel")
    epochs = check_int(epochs, "epochs", 1, MAX_EPOCHS)
    lr = check_real(lr, "lr", 0.0, lo_open=True)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    check_choice(act_ranges, "act_ranges", ACT_RANGES)
    c = check_real(averaging_constant, "averaging_constant", 0.0, 1.0, lo_open=True)
    from tqdm.auto import tqdm

    ema = act_ranges == "ema"
    base = _cnn.simulate_quantized(model, X_calib, weight_bits=None, act_bits=act_bits,
                                   per_channel=per_channel)
    sim = base.model
    moving = {}
    if ema:      # the same grids to start from, on hooks that move them
        for _, layer in sim.named_modules():
            layer._forward_hooks.clear()
        moving = _moving_ranges(model, sim, X_calib, act_bits, c)
    for i, layer in enumerate(sim.layers):
        if isinstance(layer, Conv2d | Linear):
            wrapped = WeightFakeQuant(layer, weight_bits, per_channel=per_channel)
            wrapped._forward_hooks.update(layer._forward_hooks)
            wrapped._forward_pre_hooks.update(layer._forward_pre_hooks)
            layer._forward_hooks.clear()
            layer._forward_pre_hooks.clear()
            sim.layers[i] = wrapped
    opt = Adam([p for p in sim.parameters()], lr=lr)
    rng = np.random.default_rng(seed)
    for r in moving.values():
        r.training = True
    try:
        with one_blas_thread():       # small products: a second BLAS thread only waits
            for _ in tqdm(range(epochs), desc=f"QAT ({weight_bits}-bit)", unit="epoch",
                          disable=not progress):
                train_epoch(sim, X, y, rng.permutation(len(y)), batch_size, opt)
    finally:
        for r in moving.values():
            r.training = False
    weight_qparams = {n: _cnn.quantize_conv_weight(m.weight, weight_bits,
                                                   per_channel=per_channel)[1]
                      for n, m in sim.named_modules() if isinstance(m, WeightFakeQuant)}
    act_qparams = ({n: r.qparams() for n, r in moving.items()} if ema
                   else base.activation_qparams)
    return _cnn.QuantSim(sim, base.input_qparams, act_qparams, weight_qparams)
