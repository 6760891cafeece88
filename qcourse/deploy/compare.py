"""Each runtime against qcourse's prediction of it: the exported model run in the
runtime itself (:func:`run_runtime`), the count of matching codes
(:func:`agreement`), and the probes that find where runtimes part ways
(:func:`random_dense_model`, :func:`adversarial_images`).

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse import _checks
from qcourse.affine import QParams
from qcourse.deploy.layers import (
    _INT8_MAX,
    _INT8_MIN,
    Dense,
    DeployModel,
    _check_deploy_model,
    _int,
)
from qcourse.deploy.litert import (
    run_tflite,
    to_tflite,
)
from qcourse.deploy.onnx import (
    run_onnx,
    to_onnx,
)
from qcourse.deploy.predict import (
    RUNTIMES,
    _check_runtime,
    predict_codes,
)
from qcourse.int_matmul import (
    activation_range,
)

__all__ = [
    "adversarial_images",
    "agreement",
    "random_dense_model",
    "run_runtime",
]

def run_runtime(model: DeployModel, X, runtime: str, *, form: str = "qoperator") -> np.ndarray:
    """Export ``model`` and run it in ``runtime`` itself (the outside system, not qcourse)."""
    _check_runtime(runtime)
    X = _check_deploy_model(model).check_images(X)
    if runtime == "onnx":
        return run_onnx(to_onnx(model, form), X)
    return run_tflite(to_tflite(model), X, runtime)


def agreement(model: DeployModel, X, runtimes=RUNTIMES, *, form: str = "qoperator") -> dict:
    """For each runtime: ``(matching codes, codes compared)`` between :func:`predict_codes` and
    the runtime's own output on ``X``."""
    _check_deploy_model(model).check_images(X)
    runtimes = _checks.check_sequence(runtimes, "runtimes", min_len=1)
    for i, rt in enumerate(runtimes):
        _checks.check_choice(rt, f"runtimes[{i}]", RUNTIMES)
    out = {}
    for rt in runtimes:
        got = run_runtime(model, X, rt, form=form)
        pred = predict_codes(model, X, rt)
        out[rt] = (int(np.count_nonzero(got == pred)), int(pred.size))
    return out


# --------------------------------------------------------------------------- test inputs


def _relu_clamps(zero_point: int, scale) -> list[tuple[int, int]]:
    """The clamps of NONE, RELU and RELU6 on an int8 output grid (LiteRT's computation)."""
    qp = QParams(scale=np.float64(np.float32(scale)), zero_point=np.int64(zero_point),
                 qmin=_INT8_MIN, qmax=_INT8_MAX)
    clamps = []
    for act in ("none", "relu", "relu6"):
        try:
            lo, hi = activation_range(act, qp)
        except ValueError:   # ReLU6 on a grid that does not reach 0..6
            continue
        if lo < hi:
            clamps.append((lo, hi))
    return clamps


def random_dense_model(seed: int, *, tie_heavy: bool = False):
    r"""A random one-layer :class:`Dense` model and int8 input codes for it (the deploy chapter's
    and the tests' probe of how a runtime requantizes).

    Random shapes (1..32 outputs, 1..47 inputs, batch 1..8), per-tensor or per-channel weight
    scales, a random output zero point and fused activation (none, ReLU, ReLU6).  With
    ``tie_heavy=True`` the scales are chosen so that many outputs are exact ties: input and
    output scales are powers of two and the weight scales :math:`2^{-k}(1 + j/4)`, so
    :math:`M = (4 + j) / 2^{e+2}`; weights and bias are multiples of :math:`2^p` with
    :math:`p` near :math:`e + 1`, so :math:`v M` has one or two fraction bits and lands on
    :math:`\tfrac12` for a large share of the outputs.  Returns ``(model, x_codes)``.
    """
    rng = np.random.default_rng(_int(seed, "seed", 0))
    tie_heavy = _checks.check_bool(tie_heavy, "tie_heavy")
    out_f, in_f, batch = (int(rng.integers(1, 33)), int(rng.integers(1, 48)),
                          int(rng.integers(1, 9)))
    n = out_f if out_f > 1 and rng.integers(0, 2) else 1
    zx = int(rng.integers(-100, 100))
    if tie_heavy:
        d_max = int(rng.choice([1, 3, 8, 27, 100]))
        x = np.clip(zx + rng.integers(-d_max, d_max + 1, (batch, in_f)), _INT8_MIN, _INT8_MAX)
        e = int(rng.integers(0, 7))
        p = int(rng.integers(max(0, e - 2), min(e + 2, 7)))
        w_max = max(1, 127 >> p)
        w = rng.integers(-w_max, w_max + 1, (out_f, in_f)) << p
        a, c = int(rng.integers(0, 6)), int(rng.integers(0, 4))
        sx, sy = 2.0**-a, 2.0**-c
        sw = 2.0 ** -(e + c - a) * (1 + rng.integers(0, 4, n) / 4)
        bias = rng.integers(-64, 65, out_f) << p
    else:
        sx, sy = rng.uniform(0.002, 0.1), rng.uniform(0.01, 1.0)
        sw = rng.uniform(1e-4, 0.02, n)
        w = rng.integers(-127, 128, (out_f, in_f))
        x = rng.integers(_INT8_MIN, _INT8_MAX + 1, (batch, in_f))
        bias = rng.integers(-20000, 20000, out_f)
    zy = int(rng.integers(-100, 100))
    clamps = _relu_clamps(zy, sy)
    layer = Dense(w, bias, sw, sy, zy, clamps[int(rng.integers(0, len(clamps)))])
    return DeployModel((in_f,), sx, zx, (layer,), name="random_dense"), x.astype(np.int8)


def adversarial_images(model: DeployModel, n: int, seed: int) -> np.ndarray:
    r"""``3 n`` float32 images for ``model``'s input: ``n`` random (uniform on -2..20), ``n``
    exact ties of the input grid (:math:`x / S = k + 1/2` in exact arithmetic, rounded to
    float32), and ``n`` ties mixed with saturating values (:math:`\pm 3 \cdot 10^3`,
    :math:`\pm 10^4`, :math:`\pm 10^9`: far beyond the int8 grid, and beyond int32 after the
    division for the largest).

    Bounds: ``n`` is an int in [1, 2**28 / (3 x the input's size)] (at most 2**28 values)."""
    _check_deploy_model(model)
    n = _int(n, "n", 1, max(1, _checks.MAX_ELEMENTS // (3 * int(np.prod(model.input_shape)))))
    rng = np.random.default_rng(_int(seed, "seed", 0))
    shape = (n,) + model.input_shape
    s = np.float64(model.input_scale)
    ties = ((rng.integers(-140, 140, shape) + 0.5) * s).astype(np.float32)
    rand = rng.uniform(-2, 20, shape).astype(np.float32)
    sat = rng.choice(np.array([-1e4, 1e4, 3e3, -3e3, 1e9, -1e9], np.float32), shape)
    mix = np.where(rng.random(shape) < 0.3, sat, ties).astype(np.float32)
    return np.concatenate([rand, ties, mix])
