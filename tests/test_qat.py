"""Quantization-aware training (qcourse.qat): fake quantization, the STE, LSQ and the QAT loop.

The forward is checked against an independent float64 computation and against
``qcourse.affine.fake_quantize``; the STE mask exactly; every smooth gradient by finite
differences (the layer's input and bias gradients, the weight gradient before the STE, LSQ's
step-size gradient on the function it differentiates); PyTorch's ``fake_quantize_*`` operators
and their autograd are the outside oracle for the forward, the mask and LSQ's gradients.  The
orderings the qat chapter claims are checked over several seeds.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import derivative, numeric_gradient

from qcourse.affine import QParams, choose_qparams, fake_quantize, qparams_from_range, qrange
from qcourse.nn import Linear, ReLU, Sequential, capture_activations, make_mlp, predict
from qcourse.qat import (
    FakeQuantLinear,
    PTQQATComparison,
    QATModel,
    compare_ptq_qat,
    fake_quantize_torch,
    lsq_grad_scale,
    lsq_init_scale,
    lsq_step_size_grad,
    lsq_update_ratio,
    prepare_qat,
    qat_finetune,
    set_qat_training,
    ste_backward,
    ste_mask,
)

TORCH_REASON = "PyTorch is not installed; it is the oracle for fake quantization and the STE"


def _qp(scale, zero_point, qmin, qmax, axis=None):
    return QParams(scale=np.asarray(scale, dtype=np.float64),
                   zero_point=np.asarray(zero_point, dtype=np.int64), qmin=qmin, qmax=qmax,
                   axis=axis)


def _case(seed, n=400, *, per_channel=False, dtype=np.float32):
    """Random values, a third of them exact rounding ties, and matching parameters."""
    rng = np.random.default_rng(seed)
    bits = int(rng.integers(2, 9))
    signed = bool(rng.integers(0, 2))
    qmin, qmax = qrange(bits, signed)
    channels = 3 if per_channel else None
    shape = (channels,) if per_channel else ()
    # Power-of-two and arbitrary scales alike; zero points anywhere on the grid.
    pow2 = rng.integers(0, 2, size=shape).astype(bool)
    scale = np.where(pow2, 2.0 ** rng.integers(-8, 2, size=shape),
                     rng.uniform(0.003, 0.7, size=shape)).astype(np.float32).astype(np.float64)
    zp = rng.integers(qmin, qmax + 1, size=shape)
    qp = _qp(scale, zp, qmin, qmax, axis=1 if per_channel else None)
    cols = channels or 1
    s = scale.reshape(1, -1) if per_channel else scale
    z = zp.reshape(1, -1) if per_channel else zp
    k = rng.integers(qmin - 4, qmax + 5, size=(n, cols)) - z
    ties = ((k + 0.5) * s).astype(dtype)
    spread = ((rng.uniform(qmin - 6, qmax + 6, size=(n, cols)) - z) * s).astype(dtype)
    x = np.concatenate([ties, spread, -ties[: n // 2]])
    if not per_channel:
        x = x.ravel()
    return x, qp


def _reference_forward(x, qp):
    """Written out in x's dtype: codes (x times the reciprocal of the scale, both rounded to
    that dtype), clamp, dequantize; and the STE mask."""
    dt = x.dtype.type
    s = qp.scale if qp.axis is None else qp.scale.reshape(1, -1)
    s = s.astype(dt)
    z = qp.zero_point if qp.axis is None else qp.zero_point.reshape(1, -1)
    code = np.rint(x * (dt(1) / s)).astype(np.float64) + z
    q = np.clip(code, qp.qmin, qp.qmax)
    return (q - z).astype(dt) * s, (code >= qp.qmin) & (code <= qp.qmax)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_forward_in_float64_matches_the_formula(seed, per_channel):
    x, qp = _case(seed, per_channel=per_channel, dtype=np.float64)
    out = fake_quantize_torch(x, qp)
    ref, mask = _reference_forward(x, qp)
    assert out.dtype == np.float64 and out.shape == x.shape
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(ste_mask(x, qp), mask)


def test_forward_takes_only_grid_values_and_saturates():
    qp = _qp(0.25, 3, 0, 15)
    x = np.linspace(-3, 6, 1001).astype(np.float32)
    out = fake_quantize_torch(x, qp)
    codes = out.astype(np.float64) / 0.25 + 3
    np.testing.assert_array_equal(codes, np.rint(codes))
    assert codes.min() == 0 and codes.max() == 15
    assert np.all(np.diff(out) >= 0), "the staircase must be non-decreasing"
    assert out[0] == np.float32(-0.75) and out[-1] == np.float32(3.0)


def test_ties_round_half_to_even_and_the_mask_follows_the_rounded_code():
    qp = _qp(1.0, 0, -128, 127)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.4, 127.5, -128.4, -128.5, -128.6],
                 dtype=np.float32)
    out = fake_quantize_torch(x, qp)
    assert out.tolist() == [0, 2, 2, -0, -2, 126, 127, 127, -128, -128, -128]
    # 127.5 rounds (to even) to 128, off the grid: clipped.  -128.5 rounds to -128: kept.
    assert ste_mask(x, qp).tolist() == [True] * 7 + [False, True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_forward_agrees_with_affine_fake_quantize(seed):
    """Power-of-two scales: every product is exact, so both conventions agree to the bit.
    Other scales: they may differ by one step on a handful of near-ties, never more."""
    x, qp = _case(seed)
    mine = fake_quantize_torch(x, qp).astype(np.float64)
    theirs = fake_quantize(x, qp).astype(np.float64)
    step = float(qp.scale)
    ulps = 4 * np.spacing(np.abs(theirs).astype(np.float32)).astype(np.float64)
    differ = np.abs(mine - theirs) > ulps
    assert np.all(np.abs(mine - theirs) <= step + ulps)
    if math.log2(step).is_integer():
        np.testing.assert_array_equal(mine, theirs)
    else:
        # They may differ on the constructed ties (most of x); on the random part, rarely.
        spread = slice(x.size // 5 * 2, x.size // 5 * 4)
        assert np.mean(differ[spread]) < 0.01


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), per_channel=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_forward_properties(seed, per_channel, dtype):
    """On any input: grid values only, idempotent, monotone, error at most half a step where
    the code is on the grid, and the mask is exactly 'the code is on the grid'."""
    x, qp = _case(seed, n=120, per_channel=per_channel, dtype=dtype)
    out = fake_quantize_torch(x, qp)
    assert out.dtype == dtype
    np.testing.assert_array_equal(fake_quantize_torch(out, qp), out)
    s = qp.scale.astype(dtype) if qp.axis is None else qp.scale.astype(dtype).reshape(1, -1)
    z = qp.zero_point if qp.axis is None else qp.zero_point.reshape(1, -1)
    codes = np.rint(out.astype(np.float64) / s) + z
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
    mask = ste_mask(x, qp)
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    half = np.broadcast_to(s.astype(np.float64), x.shape) * 0.5
    tol = 4 * np.spacing(np.abs(x).astype(dtype)).astype(np.float64)
    assert np.all(err[mask] <= half[mask] + tol[mask])
    assert np.all(err[~mask] >= half[~mask] - tol[~mask])
    order = np.argsort(x, axis=0, kind="stable")
    np.testing.assert_array_equal(np.diff(np.take_along_axis(out, order, axis=0), axis=0) >= 0,
                                  True)


def test_forward_per_channel_uses_each_channels_parameters():
    qp = _qp([0.5, 0.1], [0, 2], -8, 7, axis=0)
    x = np.array([[0.74, 10.0, -10.0], [0.44, 10.0, -10.0]], dtype=np.float32)
    out = fake_quantize_torch(x, qp)
    # Row 1: codes round(x / 0.1) + 2 = 6, 102, -98, clamped to [-8, 7]: 0.4, 0.5, -1.0.
    np.testing.assert_allclose(out, [[0.5, 3.5, -4.0], [0.4, 0.5, -1.0]], rtol=1e-6)
    np.testing.assert_array_equal(ste_mask(x, qp), [[True, False, False], [True, False, False]])


# --------------------------------------------------------------------------- STE


@pytest.mark.parametrize("seed", range(4))
def test_ste_backward_plain_and_clipped(seed):
    x, qp = _case(seed)
    grad = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    plain = ste_backward(grad, x, qp, clipped=False)
    clipped = ste_backward(grad, x, qp, clipped=True)
    np.testing.assert_array_equal(plain, grad)
    assert plain is not grad and plain.dtype == grad.dtype
    mask = _reference_forward(x, qp)[1]
    assert 0 < mask.sum() < mask.size, "the case must contain clipped and unclipped values"
    np.testing.assert_array_equal(clipped, np.where(mask, grad, 0))
    assert clipped.dtype == np.float32


def test_ste_is_the_derivative_of_identity_and_clamp_by_finite_differences():
    """Away from the band edges, plain STE = d/dx x and clipped STE = d/dx clamp(x, lo, hi)."""
    qp = _qp(0.125, 0, -8, 7)
    lo, hi = -8.5 * 0.125, 7.5 * 0.125   # the codes -8..7 are reached from (lo, hi)
    rng = np.random.default_rng(3)
    x = rng.uniform(-2.0, 2.0, 2000)
    x = x[(np.abs(x - lo) > 1e-3) & (np.abs(x - hi) > 1e-3)]
    ones = np.ones_like(x)
    d_clamp = derivative(lambda t: np.clip(t, lo, hi), x)
    d_ident = derivative(lambda t: t, x)
    np.testing.assert_allclose(ste_backward(ones, x, qp, clipped=True), d_clamp, atol=1e-6)
    np.testing.assert_allclose(ste_backward(ones, x, qp, clipped=False), d_ident, atol=1e-6)


# --------------------------------------------------------------------------- LSQ


def test_lsq_grad_scale_and_init():
    assert lsq_grad_scale(64, 127) == pytest.approx(1 / math.sqrt(64 * 127))
    assert lsq_grad_scale(1, 1) == 1.0
    w = np.array([[1.0, -3.0], [0.0, 0.0], [2.0, 2.0]])
    assert lsq_init_scale(w, 7) == pytest.approx(2 * (8.0 / 6) / math.sqrt(7))
    per = lsq_init_scale(w, 1, axis=0)
    np.testing.assert_allclose(per, [4.0, 1.0, 4.0])   # the all-zero row gets 1
    assert per.shape == (3,)


def _lsq_reference(grad, x, qp):
    x64 = x.astype(np.float64)
    s, z = float(qp.scale), int(qp.zero_point)
    code = np.rint(x64 / s) + z
    inside = (np.clip(code, qp.qmin, qp.qmax) - z) - x64 / s
    d = np.where(code < qp.qmin, qp.qmin - z, np.where(code > qp.qmax, qp.qmax - z, inside))
    return float(np.sum(grad * d))


def test_lsq_step_grad_matches_the_written_out_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(500)
    grad = rng.standard_normal(500)
    for qmin, qmax, s in [(-7, 7, 0.2), (-1, 1, 0.6), (0, 15, 0.05), (-128, 127, 0.01)]:
        qp = _qp(s, 0, qmin, qmax)
        got = lsq_step_size_grad(grad, x, qp, grad_scale=0.25)
        assert got.shape == ()
        assert float(got) == pytest.approx(0.25 * _lsq_reference(grad, x, qp), rel=1e-12)


def test_lsq_step_grad_is_the_derivative_of_the_surrogate_by_finite_differences():
    """LSQ differentiates s * (x/s + c) for the values inside the range and s * q_edge for the
    clipped ones, with the rounding offset c = round(x/s0) - x/s0 and the partition held fixed:
    a smooth function of s near s0."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(300) * 0.8
    r = rng.standard_normal(300)
    for qmin, qmax, s0 in [(-7, 7, 0.15), (-1, 1, 0.5), (0, 3, 0.4)]:
        code = np.rint(x / s0)
        c = code - x / s0
        inside = (code >= qmin) & (code <= qmax)
        edge = np.clip(code, qmin, qmax)

        def loss(s, c=c, inside=inside, edge=edge):
            return float(np.sum(r * s * np.where(inside, x / s + c, edge)))

        fd = derivative(loss, s0, h=1e-7)
        got = float(lsq_step_size_grad(r, x, _qp(s0, 0, qmin, qmax)))
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-6)


def test_lsq_step_grad_per_channel_sums_each_channel():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 6))
    g = rng.standard_normal((4, 6))
    qp = _qp([0.3, 0.5, 0.2, 1.0], 0, -7, 7, axis=0)
    got = lsq_step_size_grad(g, w, qp)
    assert got.shape == (4,)
    for c in range(4):
        ref = _lsq_reference(g[c], w[c], _qp(qp.scale[c], 0, -7, 7))
        assert got[c] == pytest.approx(ref, rel=1e-12)


# --------------------------------------------------------------------------- the layer


def _layer_and_data(seed=0, **kw):
    rng = np.random.default_rng(seed)
    layer = FakeQuantLinear(6, 4, seed=seed, dtype=np.float64, **kw)
    layer.bias[...] = rng.standard_normal(4)
    x = np.abs(rng.standard_normal((5, 6)))
    r = rng.standard_normal((5, 4))
    return layer, x, r


def test_layer_input_and_bias_gradients_by_finite_differences():
    for per_channel in (True, False):
        layer, x, r = _layer_and_data(bits=3, per_channel=per_channel)
        layer(x)
        gx = layer.backward(r)
        fd_x = numeric_gradient(lambda f=layer, x=x, r=r: np.sum(r * f(x)), x)
        np.testing.assert_allclose(gx, fd_x, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(layer.grad_bias, r.sum(axis=0), rtol=1e-12)


def test_layer_weight_gradient_is_the_ste_of_the_quantized_weights_gradient():
    """dL/dW_hat by finite differences on a plain Linear holding W_hat; the layer's weight
    gradient must be exactly that where the code is on the grid, and 0 where it is clipped."""
    layer, x, r = _layer_and_data(1, bits=2, lsq=True)
    layer.weight_scale[...] = 0.15     # small enough that some weights clip
    layer(x)
    layer.backward(r)
    w_hat = fake_quantize_torch(layer.weight, layer.weight_qparams())
    plain = Linear(6, 4, dtype=np.float64)
    plain.weight[...] = w_hat
    plain.bias[...] = layer.bias
    fd = numeric_gradient(lambda: np.sum(r * plain(x)), plain.weight)
    mask = ste_mask(layer.weight, layer.weight_qparams())
    assert 0 < mask.sum() < mask.size
    np.testing.assert_allclose(layer.grad_weight, np.where(mask, fd, 0), rtol=1e-6, atol=1e-9)
    assert np.all(layer.grad_weight[~mask] == 0), "clipped weights must get exactly 0"
    plain_layer = FakeQuantLinear.from_linear(plain, bits=2, lsq=True, ste="plain")
    plain_layer.weight[...] = layer.weight
    plain_layer.weight_scale[...] = 0.15
    plain_layer(x)
    plain_layer.backward(r)
    np.testing.assert_allclose(plain_layer.grad_weight, fd, rtol=1e-6, atol=1e-9)


def test_layer_lsq_scale_gradients_by_finite_differences_on_the_surrogate():
    layer, x, r = _layer_and_data(2, bits=3, act_bits=2, lsq=True, per_channel=False)
    layer(x)                                  # training: initializes the input step
    layer.training = False
    layer.weight_scale[...] = 0.2
    layer.act_scale[...] = 0.6
    layer(x)
    layer.backward(r)
    s_w, s_a = 0.2, 0.6
    w, b = layer.weight, layer.bias
    def frozen(v, s0, qmin, qmax):
        code = np.rint(v / s0)
        inside = (code >= qmin) & (code <= qmax)
        return code - v / s0, inside, np.clip(code, qmin, qmax)

    cw, in_w, edge_w = frozen(w, s_w, -3, 3)
    ca, in_a, edge_a = frozen(x, s_a, 0, 3)
    assert not in_w.all() or not in_a.all(), "the case should clip somewhere"

    def loss(sw, sa):
        w_hat = sw * np.where(in_w, w / sw + cw, edge_w)
        x_hat = sa * np.where(in_a, x / sa + ca, edge_a)
        return np.sum(r * (x_hat @ w_hat.T + b))

    fd_w = derivative(lambda s: loss(s, s_a), s_w, h=1e-7)
    fd_a = derivative(lambda s: loss(s_w, s), s_a, h=1e-7)
    g_w = lsq_grad_scale(w.size, 3)
    g_a = lsq_grad_scale(6, 3)
    assert float(layer.grad_weight_scale) == pytest.approx(g_w * fd_w, rel=1e-6)
    assert float(layer.grad_act_scale) == pytest.approx(g_a * fd_a, rel=1e-6)


def test_layer_per_channel_lsq_scale_gradient_uses_each_rows_count():
    layer, x, r = _layer_and_data(5, bits=2, lsq=True, per_channel=True)
    layer(x)
    layer.backward(r)
    qp = layer.weight_qparams()
    grad_w_hat = r.T @ x
    expected = lsq_step_size_grad(grad_w_hat, layer.weight, qp, grad_scale=lsq_grad_scale(6, 1))
    assert layer.grad_weight_scale.shape == (4,)
    np.testing.assert_allclose(layer.grad_weight_scale, expected, rtol=1e-12)


def test_layer_input_ste_masks_clipped_inputs_exactly():
    layer, x, r = _layer_and_data(3, bits=8, act_bits=2, lsq=True)
    layer(x)
    layer.act_scale[...] = 0.3          # range [0, 0.9]: the larger inputs clip
    layer(x)
    gx = layer.backward(r)
    qp = layer.input_qparams()
    mask = ste_mask(x, qp)
    assert 0 < mask.sum() < mask.size
    w_hat = fake_quantize_torch(layer.weight, layer.weight_qparams())
    np.testing.assert_allclose(gx, np.where(mask, r @ w_hat, 0), rtol=1e-12)
    assert np.all(gx[~mask] == 0)


def test_network_input_gradient_by_finite_differences():
    """Weights fake-quantized, inputs in float: the network is smooth in its input."""
    model = make_mlp((5, 7, 3), seed=4, dtype=np.float64)
    qmodel = prepare_qat(model, bits=3, act_bits=None)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5))
    r = rng.standard_normal((3, 3))
    qmodel(x)
    gx = qmodel.backward(r)
    fd = numeric_gradient(lambda: np.sum(r * qmodel(x)), x)
    np.testing.assert_allclose(gx, fd, rtol=1e-5, atol=1e-8)


def test_layer_weights_lie_on_the_grid_and_export_consistently():
    for bits, per_channel in [(8, True), (4, False), (2, True)]:
        layer = FakeQuantLinear(16, 8, bits=bits, per_channel=per_channel, seed=bits)
        q, qp = layer.quantized_weight()
        lim = 2 ** (bits - 1) - 1
        assert q.dtype == np.int8 and q.min() >= -lim and q.max() <= lim
        assert q.max() == lim or q.min() == -lim, "abs-max reaches the end of the grid"
        assert qp.granularity == ("per-channel" if per_channel else "per-tensor")
        lin = layer.to_linear()
        np.testing.assert_array_equal(lin.weight,
                                      fake_quantize_torch(layer.weight, qp))
        x = np.random.default_rng(bits).random((4, 16)).astype(np.float32)
        np.testing.assert_array_equal(layer(x), lin(x))
        s = qp.scale.astype(np.float32)
        s = s.reshape(-1, 1) if per_channel else s
        np.testing.assert_array_equal(lin.weight, (q.astype(np.float32) * s))


def test_abs_max_weight_scale_matches_choose_qparams():
    layer = FakeQuantLinear(10, 3, bits=4, seed=1)
    assert layer.weight_qparams() == choose_qparams(layer.weight, bits=4, symmetric=True,
                                                    narrow_range=True, axis=0)


def test_input_range_follows_the_moving_average_only_while_training():
    layer = FakeQuantLinear(3, 2, act_bits=8)
    a = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0, 12.0]], dtype=np.float32)
    layer(a)
    assert layer.input_qparams().representable_range()[1] == pytest.approx(2.0)
    layer(b)
    assert layer.act_observer.range()[1] == pytest.approx(2.0 + 0.01 * (12.0 - 2.0))
    layer.training = False
    before = layer.input_qparams()
    layer(b * 10)
    assert layer.input_qparams() == before


def test_lsq_scales_never_go_below_the_floor():
    layer = FakeQuantLinear(3, 2, bits=4, act_bits=4, lsq=True)
    x = np.ones((2, 3), dtype=np.float32)
    layer(x)
    layer.weight_scale[...] = -1.0
    layer.act_scale[...] = 0.0
    layer(x)
    assert np.all(layer.weight_scale > 0) and layer.act_scale > 0
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "weight_scale",
                                                       "act_scale"]
    assert len(layer.parameters()) == 4


def test_layer_works_inside_sequential_with_hooks():
    model = Sequential(("fc1", FakeQuantLinear(4, 5, bits=4)), ("act1", ReLU()),
                       ("fc2", FakeQuantLinear(5, 2, bits=4, act_bits=4)))
    x = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    acts = capture_activations(model, x)
    assert acts["fc2"].output.shape == (6, 2)
    inp = acts["fc2"].input
    np.testing.assert_array_equal(model["fc2"]._x, fake_quantize_torch(
        inp, model["fc2"].input_qparams()))
    grad = model.backward(np.ones((6, 2), dtype=np.float32))
    assert grad.shape == (6, 4)
    assert "bits=4 per-channel" in repr(model["fc1"])


# --------------------------------------------------------------------------- prepare / finetune


@pytest.fixture(scope="module")
def digits_model(digits, trained_mlp):
    (X, y), (Xt, yt) = digits
    model, _ = trained_mlp((64, 32, 10), epochs=15)
    return model, X, y, Xt, yt


def test_prepare_qat_copies_and_calibrates(digits_model):
    model, X, y, Xt, yt = digits_model
    before = model.state_dict()
    q = prepare_qat(model, bits={"fc1": 8, "fc2": 2}, act_bits=8, calib_X=X[:256])
    assert isinstance(q, QATModel) and isinstance(q, Sequential)
    assert [type(m).__name__ for m in q] == ["FakeQuantLinear", "ReLU", "FakeQuantLinear"]
    assert q["fc1"].bits == 8 and q["fc2"].bits == 2
    assert not q["fc1"].training and not q["fc2"].training
    np.testing.assert_array_equal(q["fc1"].weight, model["fc1"].weight)
    assert q["fc1"].weight is not model["fc1"].weight
    acts = capture_activations(model, X[:256])
    lo, hi = q["fc2"].input_qparams().representable_range()
    assert float(hi) == pytest.approx(float(acts["fc2"].input.max()), rel=0.02)
    q(X)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_zero_epochs_is_weight_only_ptq(digits_model):
    """With float inputs, the untrained QAT model is weight-only PTQ: the same predictions as
    the ptq chapter's weight_only_ptq (symmetric, narrow, per-channel weights)."""
    ptq = pytest.importorskip("qcourse.ptq", reason="qcourse.ptq is the PTQ reference")
    model, X, y, Xt, yt = digits_model
    for bits in (8, 4, 2):
        q = qat_finetune(model, X, y, bits=bits, epochs=0, act_bits=None, progress=False)
        assert q.history["loss"] == []
        theirs = ptq.weight_only_ptq(model, bits=bits, per_channel=True)
        agree = np.mean(predict(q, Xt) == theirs.predict(Xt))
        assert agree >= 0.995, f"{bits} bits: only {agree:.3f} of predictions agree"


def test_qat_finetune_is_deterministic_and_leaves_the_float_model_alone(digits_model):
    model, X, y, Xt, yt = digits_model
    before = model.state_dict()
    kw = dict(bits=4, act_bits=4, epochs=2, seed=3, progress=False, lsq=True)
    a = qat_finetune(model, X, y, **kw)
    b = qat_finetune(model, X, y, **kw)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a["fc1"].weight, model["fc1"].weight)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert len(a.history["loss"]) == 2 and a.config["bits"] == {"fc1": 4, "fc2": 4}
    assert not a["fc1"].training


def test_qat_recovers_two_bit_accuracy_and_validation_history(digits_model):
    model, X, y, Xt, yt = digits_model
    q = qat_finetune(model, X, y, bits=2, act_bits=2, epochs=4, lsq=True, progress=False,
                     X_val=Xt, y_val=yt)
    hist = q.history["val_accuracy"]
    assert len(hist) == 5
    assert hist[-1] > hist[0] + 0.05, hist


def test_compare_ptq_qat_rows(digits_model):
    model, X, y, Xt, yt = digits_model
    rows = compare_ptq_qat(model, X, y, Xt, yt, bits=(8, 2), epochs=2, progress=False)
    assert [r.bits for r in rows] == [8, 2]
    assert all(isinstance(r, PTQQATComparison) and len(r.val_history) == 3 for r in rows)
    assert rows[0].ptq_drop < 2 and rows[1].ptq_accuracy == rows[1].val_history[0]
    assert rows[1].qat_drop == pytest.approx(100 * (rows[1].float_accuracy
                                                    - rows[1].qat_accuracy))


def test_set_qat_training_toggles_every_layer(digits_model):
    model, X, *_ = digits_model
    q = prepare_qat(model, bits=4, act_bits=4, calib_X=X[:64])
    set_qat_training(q, True)
    assert all(m.training for _, m in q.fake_quant_layers())
    set_qat_training(q, False)
    assert not any(m.training for _, m in q.fake_quant_layers())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_chapter_orderings_hold_over_seeds(seed):
    """What the qat chapter asserts on its network (seed 0), checked for other seeds too, so
    that the claims do not hang on one lucky run: 8-bit QAT within a point of float, 4-bit QAT
    within 2; at 2 bits per-tensor PTQ <= per-channel PTQ < QAT - 10 points < QAT with LSQ,
    LSQ within 5 points of float; one epoch recovers part of the way; a learning rate 30x too
    high ends lower."""
    ptq = pytest.importorskip("qcourse.ptq", reason="qcourse.ptq trains the reference model")
    ref = ptq.train_reference_model(seed)
    common = dict(calib_X=ref.X_calib, X_val=ref.X_test, y_val=ref.y_test, progress=False,
                  seed=seed, epochs=6)
    args = (ref.model, ref.X_train, ref.y_train)
    mm = qat_finetune(*args, bits=2, act_bits=2, **common).history["val_accuracy"]
    lsq = qat_finetune(*args, bits=2, act_bits=2, lsq=True, **common).history["val_accuracy"]
    pt = prepare_qat(ref.model, bits=2, act_bits=2, per_channel=False, calib_X=ref.X_calib)
    hot = qat_finetune(*args, bits=2, act_bits=2, lr=3e-2, **common).history["val_accuracy"]
    q4 = qat_finetune(*args, bits=4, act_bits=4, **common).history["val_accuracy"]
    q8 = qat_finetune(*args, bits=8, act_bits=8, **common).history["val_accuracy"]
    acc_pt = float(np.mean(predict(pt, ref.X_test) == ref.y_test))
    assert q8[-1] >= ref.float_accuracy - 0.01 and q8[0] >= ref.float_accuracy - 0.01
    assert q4[-1] >= ref.float_accuracy - 0.02
    assert acc_pt <= mm[0] < mm[-1] - 0.1
    assert mm[-1] < lsq[-1] and lsq[-1] >= ref.float_accuracy - 0.05
    assert mm[0] < mm[1] < mm[-1]
    assert 0.3 < (mm[1] - mm[0]) / (mm[-1] - mm[0]) < 0.95
    assert np.mean(hot[-3:]) < np.mean(mm[-3:]) - 0.05


def test_lsq_update_ratio():
    layer, x, r = _layer_and_data(6, bits=4, lsq=True)
    layer(x)
    layer.backward(r)
    rw = (np.linalg.norm(layer.grad_weight_scale) / np.linalg.norm(layer.weight_scale)) / (
        np.linalg.norm(layer.grad_weight) / np.linalg.norm(layer.weight))
    assert lsq_update_ratio(layer) == pytest.approx(rw, rel=1e-12)
    assert lsq_update_ratio(layer, with_grad_scale=False) == pytest.approx(
        rw * math.sqrt(6 * 7), rel=1e-12)
    with pytest.raises(TypeError, match="lsq=True"):
        lsq_update_ratio(FakeQuantLinear(2, 2))
    with pytest.raises(RuntimeError, match="forward and a backward"):
        lsq_update_ratio(FakeQuantLinear(2, 2, lsq=True))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_grad_scale_balances_the_step_size_over_seeds(seed):
    """The chapter's LSQ claim: without g the typical ratio R of a configuration (geometric mean
    over layers) spreads over more than a factor 20 across bit widths and granularities, and
    grows with the bits; with g it stays within a factor 8."""
    ptq = pytest.importorskip("qcourse.ptq", reason="qcourse.ptq trains the reference model")
    from qcourse.nn import softmax_cross_entropy

    ref = ptq.train_reference_model(seed)
    with_g, without_g = {}, {}
    for per_channel in (True, False):
        for bits in (2, 4, 8):
            q = prepare_qat(ref.model, bits=bits, act_bits=None, lsq=True,
                            per_channel=per_channel)
            q.backward(softmax_cross_entropy(q(ref.X_train), ref.y_train)[1])
            layers = [layer for _, layer in q.fake_quant_layers()]
            key = (per_channel, bits)
            with_g[key] = np.exp(np.mean([np.log(lsq_update_ratio(m)) for m in layers]))
            without_g[key] = np.exp(np.mean(
                [np.log(lsq_update_ratio(m, with_grad_scale=False)) for m in layers]))
    assert max(without_g.values()) / min(without_g.values()) > 20
    assert max(with_g.values()) / min(with_g.values()) < 8
    assert without_g[True, 2] < without_g[True, 4] < without_g[True, 8]


# --------------------------------------------------------------------------- PyTorch oracle


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), per_channel=st.booleans())
def test_forward_and_mask_match_pytorch(seed, per_channel):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    x, qp = _case(seed, n=200, per_channel=per_channel)
    xt = torch.tensor(x, requires_grad=True)
    if per_channel:
        yt = torch.fake_quantize_per_channel_affine(
            xt, torch.tensor(qp.scale, dtype=torch.float32),
            torch.tensor(qp.zero_point, dtype=torch.int32), 1, qp.qmin, qp.qmax)
    else:
        yt = torch.fake_quantize_per_tensor_affine(xt, float(qp.scale), int(qp.zero_point),
                                                   qp.qmin, qp.qmax)
    grad = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(grad))
    np.testing.assert_array_equal(fake_quantize_torch(x, qp), yt.detach().numpy())
    np.testing.assert_array_equal(ste_backward(grad, x, qp, clipped=True), xt.grad.numpy())
    assert np.all(grad != 0)
    np.testing.assert_array_equal(ste_mask(x, qp), xt.grad.numpy() != 0)


def test_tie_inputs_match_pytorch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    for scale, zp, qmin, qmax in [(1.0, 0, -128, 127), (0.25, 3, 0, 15), (0.5, 0, -2, 1),
                                  (2.0 ** -6, -5, -8, 7)]:
        k = np.arange(qmin - 3, qmax + 4) - zp
        x = np.concatenate([(k + 0.5) * scale, (k - 0.5) * scale, k * scale]).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.fake_quantize_per_tensor_affine(xt, scale, zp, qmin, qmax)
        yt.sum().backward()
        qp = _qp(scale, zp, qmin, qmax)
        np.testing.assert_array_equal(fake_quantize_torch(x, qp), yt.detach().numpy())
        np.testing.assert_array_equal(ste_mask(x, qp), xt.grad.numpy() == 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_lsq_gradients_match_pytorch_learnable_fake_quant(bits):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(bits)
    qmin, qmax = qrange(bits, True, narrow_range=True)
    x = (rng.standard_normal((32, 24)) * rng.uniform(0.1, 2)).astype(np.float32)
    grad = rng.standard_normal(x.shape).astype(np.float32)
    s = np.float32(lsq_init_scale(x, qmax) * rng.uniform(0.3, 0.8))
    g = lsq_grad_scale(x.size, qmax)
    xt = torch.tensor(x, requires_grad=True)
    st_ = torch.tensor([s], requires_grad=True)
    yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st_, torch.tensor([0.0]), qmin,
                                                          qmax, g)
    yt.backward(torch.tensor(grad))
    qp = _qp(float(s), 0, qmin, qmax)
    if bits <= 4:
        assert not ste_mask(x, qp).all(), "low bits: the case must clip"
    np.testing.assert_array_equal(fake_quantize_torch(x, qp), yt.detach().numpy())
    np.testing.assert_array_equal(ste_backward(grad, x, qp), xt.grad.numpy())
    ours = float(lsq_step_size_grad(grad, x, qp, grad_scale=g))
    assert ours == pytest.approx(float(st_.grad), rel=1e-4, abs=1e-6)


def test_lsq_per_channel_gradients_match_pytorch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((6, 20)) * 0.3).astype(np.float32)
    grad = rng.standard_normal(w.shape).astype(np.float32)
    s = (lsq_init_scale(w, 7, axis=0) * rng.uniform(0.4, 1.4, 6)).astype(np.float32)
    g = lsq_grad_scale(20, 7)
    wt = torch.tensor(w, requires_grad=True)
    st_ = torch.tensor(s, requires_grad=True)
    yt = torch._fake_quantize_learnable_per_channel_affine(wt, st_, torch.zeros(6), 0, -7, 7, g)
    yt.backward(torch.tensor(grad))
    qp = _qp(s.astype(np.float64), 0, -7, 7, axis=0)
    np.testing.assert_array_equal(fake_quantize_torch(w, qp), yt.detach().numpy())
    np.testing.assert_array_equal(ste_backward(grad, w, qp), wt.grad.numpy())
    np.testing.assert_allclose(lsq_step_size_grad(grad, w, qp, grad_scale=g), st_.grad.numpy(),
                               rtol=1e-4, atol=1e-6)


def test_layer_backward_matches_pytorch_autograd():
    """A whole FakeQuantLinear (per-channel int4 weights, uint4 input, clipped STE) against the
    same computation in PyTorch: output, input gradient and weight gradient."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    layer = FakeQuantLinear(12, 5, bits=4, act_bits=4, seed=3)
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_normal((8, 12))).astype(np.float32)
    r = rng.standard_normal((8, 5)).astype(np.float32)
    out = layer(x)
    gx = layer.backward(r)
    wq, aq = layer.weight_qparams(), layer.input_qparams()
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.weight, requires_grad=True)
    x_hat = torch.fake_quantize_per_tensor_affine(xt, float(aq.scale), int(aq.zero_point),
                                                  aq.qmin, aq.qmax)
    w_hat = torch.fake_quantize_per_channel_affine(
        wt, torch.tensor(wq.scale, dtype=torch.float32), torch.zeros(5, dtype=torch.int32), 0,
        wq.qmin, wq.qmax)
    yt = x_hat @ w_hat.T + torch.tensor(layer.bias)
    yt.backward(torch.tensor(r))
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.grad_weight, wt.grad.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_to_the_ste_functions():
    qp = _qp(0.1, 0, -8, 7)
    x = np.zeros(4, dtype=np.float32)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        fake_quantize_torch(np.arange(4), qp)
    with pytest.raises(ValueError, match="x must be finite, got 1 NaN/Inf"):
        fake_quantize_torch(np.array([0.0, np.nan]), qp)
    with pytest.raises(ValueError, match="x must not be empty"):
        fake_quantize_torch(np.zeros(0), qp)
    with pytest.raises(TypeError, match="qparams must be a qcourse.affine.QParams"):
        fake_quantize_torch(x, (0.1, 0))
    group = qparams_from_range(np.zeros((2, 1)), np.ones((2, 1)), axis=1, group_size=4)
    with pytest.raises(ValueError, match="per-group"):
        ste_mask(np.zeros((2, 4)), group)
    with pytest.raises(ValueError, match="3 channels but x has 4"):
        fake_quantize_torch(np.zeros((2, 4)), _qp([1, 1, 1], 0, -8, 7, axis=1))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        fake_quantize_torch(np.zeros((2, 4)), _qp([1, 1], 0, -8, 7, axis=2))
    with pytest.raises(ValueError, match="grad must have the shape of x"):
        ste_backward(np.zeros(3, dtype=np.float32), x, qp)
    with pytest.raises(TypeError, match="clipped must be True or False"):
        ste_backward(x, x, qp, clipped=1)
    with pytest.raises(ValueError, match="grad must be finite"):
        ste_backward(np.full(4, np.inf), x, qp)
    with pytest.raises(ValueError, match="must stay finite and > 0 in float32"):
        fake_quantize_torch(x, _qp(1e-60, 0, -8, 7))
    with pytest.raises(ValueError, match="grad_scale must be a finite real number > 0"):
        lsq_step_size_grad(x, x, qp, grad_scale=0.0)
    with pytest.raises(ValueError, match=r"num_elements must be an int in \[1, "):
        lsq_grad_scale(0, 7)
    with pytest.raises(TypeError, match="qmax must be an int"):
        lsq_grad_scale(4, 7.0)
    with pytest.raises(ValueError, match="axis=3 is out of range"):
        lsq_init_scale(np.ones((2, 2)), 7, axis=3)


def test_bad_inputs_to_the_layer():
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 8\]"):
        FakeQuantLinear(2, 2, bits=1)
    with pytest.raises(ValueError, match=r"act_bits must be an int in \[2, 8\]"):
        FakeQuantLinear(2, 2, act_bits=9)
    with pytest.raises(TypeError, match="bits must be an int"):
        FakeQuantLinear(2, 2, bits=4.0)
    with pytest.raises(ValueError, match="ste must be 'clipped' or 'plain'"):
        FakeQuantLinear(2, 2, ste="identity")
    with pytest.raises(TypeError, match="per_channel must be True or False"):
        FakeQuantLinear(2, 2, per_channel="yes")
    with pytest.raises(TypeError, match="plain qcourse.nn.Linear"):
        FakeQuantLinear.from_linear(FakeQuantLinear(2, 2))
    layer = FakeQuantLinear(3, 2, act_bits=8)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(batch >= 1, 3\)"):
        layer(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        layer([[0.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        layer(np.zeros((2, 3), dtype=np.int64))
    layer.training = False
    with pytest.raises(RuntimeError, match="no input range yet"):
        layer(np.zeros((2, 3), dtype=np.float32))
    layer.training = True
    layer(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 2\)"):
        layer.backward(np.zeros((2, 3), dtype=np.float32))


def test_bad_inputs_to_prepare_and_finetune():
    model = make_mlp((4, 3, 2), seed=0)
    X = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    y = np.arange(10) % 2
    with pytest.raises(TypeError, match="model must be a qcourse.nn.Sequential"):
        prepare_qat(Linear(4, 2), bits=4, act_bits=None)
    with pytest.raises(ValueError, match="calib_X is required"):
        prepare_qat(model, bits=4, act_bits=4)
    with pytest.raises(ValueError, match="missing"):
        prepare_qat(model, bits={"fc1": 4}, act_bits=None)
    with pytest.raises(ValueError, match="not Linear layers"):
        prepare_qat(model, bits={"fc1": 4, "fc2": 4, "act1": 4}, act_bits=None)
    with pytest.raises(ValueError, match=r"bits\['fc2'\] must be an int in \[2, 8\]"):
        prepare_qat(model, bits={"fc1": 4, "fc2": 16}, act_bits=None)
    with pytest.raises(ValueError, match="no Linear layer"):
        prepare_qat(Sequential(ReLU()), bits=4, act_bits=None)
    q = prepare_qat(model, bits=4, act_bits=None)
    with pytest.raises(ValueError, match="already contains FakeQuantLinear"):
        prepare_qat(q, bits=4, act_bits=None)
    with pytest.raises(ValueError, match=r"epochs must be an int in \[0, 100000\]"):
        qat_finetune(model, X, y, epochs=-1, progress=False)
    with pytest.raises(TypeError, match="y must have an integer dtype"):
        qat_finetune(model, X, y.astype(float), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"y must have shape \(10,\)"):
        qat_finetune(model, X, y[:5], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
        qat_finetune(model, X, y + 1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="X must be finite"):
        qat_finetune(model, np.full((10, 4), np.nan, dtype=np.float32), y, progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of 'adam', 'sgd'"):
        qat_finetune(model, X, y, epochs=1, optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="X_val and y_val must be given together"):
        qat_finetune(model, X, y, epochs=1, X_val=X, progress=False)
    with pytest.raises(ValueError, match="lr must be a finite real number > 0"):
        qat_finetune(model, X, y, epochs=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match=r"each entry of bits must be an int in \[2, 8\]"):
        compare_ptq_qat(model, X, y, X, y, bits=(8, 1), epochs=1, progress=False)
