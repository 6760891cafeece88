"""Tests for qcourse.weight_only: round-to-nearest, GPTQ and AWQ.

Oracles: qcourse.affine's min-max grid (round-to-nearest with float64 scales is its fake
quantization, exactly); the slow GPTQ written from the optimal brain surgeon's formula with a
fresh inverse at every step (the fast, blocked Cholesky version matches it code for code); the
two-column case of GPTQ worked out by hand; and the layer objective itself, on least-squares
problems with correlated inputs, where GPTQ must beat rounding at 4 and 3 bits.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qcourse import weight_only as wo
from qcourse.affine import choose_qparams, fake_quantize


def _problem(seed, n=1024, k=48, rows=24, outliers=2):
    """Correlated inputs X = Z A (a few channels much larger), Gaussian weights (rows, k)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(n, k)) @ mix
    x[:, rng.choice(k, outliers, replace=False)] *= 8
    w = rng.normal(scale=0.05, size=(rows, k)).astype(np.float32)
    return x, w


# ------------------------------------------------------------------------------------------------
# round to nearest
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [1, 5, 16, 48, None, 1000])
def test_rtn_with_float64_scales_is_affine_fake_quantization(bits, group_size):
    _, w = _problem(1)
    g = w.shape[1] if group_size is None else min(group_size, w.shape[1])
    expect = fake_quantize(w, choose_qparams(w, bits=bits, signed=False, axis=1, group_size=g))
    got = wo.rtn(w, bits=bits, group_size=group_size, scale_dtype=np.float64)
    assert got.dtype == np.float32 and got.shape == w.shape
    assert np.array_equal(got, expect)
    sym = wo.rtn(w, bits=bits, group_size=group_size, symmetric=True, scale_dtype=np.float64)
    qp = choose_qparams(w, bits=bits, symmetric=True, narrow_range=True, axis=1, group_size=g)
    assert np.array_equal(sym, fake_quantize(w, qp))


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_scales_and_storage(symmetric):
    _, w = _problem(2, k=40)
    qw = wo.rtn(w, bits=4, group_size=16, symmetric=symmetric, return_codes=True)
    assert qw.scale.shape == (24, 3) and qw.scale.dtype == np.float16
    assert qw.group_size == 16 and qw.bits == 4
    lo, hi = (-7, 7) if symmetric else (0, 15)
    assert qw.codes.min() >= lo and qw.codes.max() <= hi
    assert qw.codes.dtype == (np.int8 if symmetric else np.uint8)
    assert (qw.zero_point is None) == symmetric
    assert np.array_equal(qw.dequantize(), qw.weight)
    # codes belong to the stored float16 scale: re-rounding the dequantized weight is a no-op
    s = np.repeat(qw.scale.astype(np.float64), 16, axis=1)[:, :40]
    z = 0 if symmetric else np.repeat(qw.zero_point, 16, axis=1)[:, :40]
    assert np.array_equal(np.rint(qw.weight.astype(np.float64) / s) + z, qw.codes)
    zp_bits = 0 if symmetric else 4
    assert qw.bits_per_weight == pytest.approx(4 + 3 * (16 + zp_bits) / 40)
    per_channel = wo.rtn(w, bits=4, group_size=None, return_codes=True)
    assert per_channel.group_size == 40 and per_channel.bits_per_weight == 4 + 20 / 40


def test_rtn_clip_shrinks_the_range_and_all_zero_groups_are_exact():
    w = np.zeros((2, 8), np.float32)
    w[1] = [1.0, -0.5, 0.25, 0.0, -2.0, 0.1, 0.2, 0.3]
    qw = wo.rtn(w, bits=4, group_size=4, scale_dtype=np.float64, return_codes=True)
    assert np.all(qw.weight[0] == 0) and np.all(qw.scale[0] == 1.0)
    clipped = wo.rtn(w, bits=4, group_size=4, clip=0.5, scale_dtype=np.float64,
                     return_codes=True)
    # group [1, -0.5, 0.25, 0]: range [-0.5, 0.5] after clipping at half of max|w| = 1
    assert clipped.scale[1, 0] == pytest.approx(1.0 / 15)
    assert clipped.weight[1, 0] == pytest.approx(0.5, abs=1 / 15)
    per_group = wo.rtn(w, bits=4, group_size=4, clip=np.array([[1.0, 1.0], [0.5, 1.0]]),
                       scale_dtype=np.float64, return_codes=True)
    assert per_group.scale[1, 0] == clipped.scale[1, 0]
    assert per_group.scale[1, 1] == qw.scale[1, 1]


# ------------------------------------------------------------------------------------------------
# GPTQ against its slow reference, and against rounding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,block_size", [(None, 128), (None, 7), (8, 16), (8, 3),
                                                   (12, 5), (13, 10), (48, 1), (5, 48)])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (4, True), (2, False)])
def test_gptq_matches_the_slow_reference(act_order, group_size, block_size, bits, symmetric):
    x, w = _problem(3)
    h = wo.hessian(x)
    fast = wo.gptq(w, h, bits=bits, group_size=group_size, act_order=act_order,
                   block_size=block_size, symmetric=symmetric, return_codes=True)
    slow = wo.gptq_reference(w, h, bits=bits, group_size=group_size, act_order=act_order,
                             symmetric=symmetric, return_codes=True)
    assert np.array_equal(fast.codes, slow.codes)
    assert np.array_equal(fast.scale, slow.scale)
    assert (fast.zero_point is None and slow.zero_point is None) or np.array_equal(
        fast.zero_point, slow.zero_point)
    assert np.array_equal(fast.weight, slow.weight)
    assert np.array_equal(fast.dequantize(), fast.weight)
    assert fast.damp == slow.damp == 0.01


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """No correlation between inputs, nothing to compensate: GPTQ rounds each weight."""
    x, w = _problem(4)
    diag = np.diag(np.diag(wo.hessian(x)))
    for g in (None, 8, 11):
        for ao in (False, True):
            got = wo.gptq(w, diag, bits=4, group_size=g, act_order=ao, block_size=8)
            assert np.array_equal(got, wo.rtn(w, bits=4, group_size=g))


def test_gptq_two_columns_by_hand():
    r"""K = 2, one grid per row fixed from the original row: quantize column 0, then column 1
    moved by :math:`-H_{10}(\hat w_0 - w_0)/H_{11}` (the least-squares optimum) is rounded."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 2)) @ np.array([[1.0, 0.8], [0.0, 0.6]])
    h = wo.hessian(x)
    w = rng.normal(size=(6, 2))
    grid = wo.rtn(w, bits=3, group_size=None, scale_dtype=np.float64, return_codes=True)
    s, z = grid.scale[:, 0], grid.zero_point[:, 0]

    def round_(col):
        return s * (np.clip(np.rint(col / s) + z, 0, 7) - z)

    w0 = round_(w[:, 0])
    w1 = round_(w[:, 1] - h[1, 0] * (w0 - w[:, 0]) / h[1, 1])
    got = wo.gptq(w, h, bits=3, group_size=None, damp=0.0, scale_dtype=np.float64)
    assert np.allclose(got, np.stack([w0, w1], axis=1), rtol=0, atol=1e-12)
    # the update is the least-squares optimum: no other value of column 1 does better
    best = np.linalg.lstsq(x[:, 1:], -x[:, :1] @ (w0 - w[:, 0])[None], rcond=None)[0][0]
    assert np.allclose(w[:, 1] + best, w[:, 1] - h[1, 0] * (w0 - w[:, 0]) / h[1, 1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_beats_round_to_nearest_on_correlated_least_squares(seed, bits, group_size):
    x, w = _problem(10 + seed, k=64, rows=32)
    h = wo.hessian(x)
    e_rtn = wo.layer_error(x, w, wo.rtn(w, bits=bits, group_size=group_size))
    for act_order, margin in ((False, 0.95), (True, 0.75)):   # measured: <= 0.94 and <= 0.67
        e_gptq = wo.layer_error(x, w, wo.gptq(w, h, bits=bits, group_size=group_size,
                                               act_order=act_order))
        assert e_gptq < margin * e_rtn, (act_order, e_gptq, e_rtn)
    # the comparison can fail: GPTQ without the compensation (a diagonal H) is rounding
    e_diag = wo.layer_error(x, w, wo.gptq(w, np.diag(np.diag(h)), bits=bits,
                                          group_size=group_size))
    assert e_diag == e_rtn


def test_hessian_and_layer_error_agree():
    x, w = _problem(6, n=300)
    h = wo.hessian(x)
    assert np.allclose(h, 2 * x.T @ x / 300)
    w_hat = wo.rtn(w, bits=3, group_size=8).astype(np.float64)
    d = w.astype(np.float64) - w_hat
    assert wo.layer_error(x, w, w_hat) ** 2 == pytest.approx(300 / 2 * np.trace(d @ h @ d.T))


# ------------------------------------------------------------------------------------------------
# dampening and bad Hessians
# ------------------------------------------------------------------------------------------------


def test_dead_inputs_need_no_extra_dampening():
    x, w = _problem(7)
    x[:, 5] = 0.0                                       # an input that is always zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qw = wo.gptq(w, wo.hessian(x), bits=4, group_size=16, return_codes=True)
    assert qw.damp == 0.01 and np.all(np.isfinite(qw.weight))


def test_a_hessian_that_is_not_positive_definite_is_dampened_and_said_so():
    x, w = _problem(8)
    h = wo.hessian(x)
    v = np.linalg.eigh(h)[1][:, 0]
    bad = h - 3 * np.linalg.eigvalsh(h).max() * np.outer(v, v) * 0.01   # one negative eigenvalue
    assert np.linalg.eigvalsh(bad).min() < 0 and np.all(np.diag(bad) >= 0)
    with pytest.warns(wo.HessianWarning, match="not positive definite with damp=0.01"):
        qw = wo.gptq(w, bad, bits=4, group_size=None, return_codes=True)
    assert qw.damp > 0.01 and np.all(np.isfinite(qw.weight))
    with pytest.warns(wo.HessianWarning, match=f"damp={qw.damp:g}"):
        ref = wo.gptq_reference(w, bad, bits=4, group_size=None, return_codes=True)
    assert np.array_equal(ref.codes, qw.codes)
    # singular without dampening: warned, then dampened from 1e-4
    x[:, 2] = 0.0
    with pytest.warns(wo.HessianWarning, match="damp=0;"):
        qw0 = wo.gptq(w, wo.hessian(x), bits=4, group_size=None, damp=0, return_codes=True)
    assert qw0.damp >= 1e-4
    hopeless = np.eye(48) + 1e6 * (np.eye(48, k=1) + np.eye(48, k=-1))   # eigenvalues ~ -2e6
    with pytest.raises(ValueError, match="far from positive definite"):
        wo.gptq(w, hopeless, bits=4, group_size=None)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=np.ones((4, 8), np.int32)), TypeError, "weight must hold floating-point numbers"),
    (dict(weight=np.ones(8)), ValueError, "weight must be 2-D"),
    (dict(weight=np.full((4, 8), np.nan)), ValueError, "weight must be finite"),
    (dict(hessian=np.eye(7)), ValueError, r"hessian must have shape \(K, K\) = \(8, 8\)"),
    (dict(hessian=np.eye(8) + np.triu(np.ones((8, 8)), 1)), ValueError, "symmetric"),
    (dict(hessian=-np.eye(8)), ValueError, "non-negative diagonal"),
    (dict(hessian=np.full((8, 8), np.inf)), ValueError, "hessian must be finite"),
    (dict(bits=1), ValueError, r"bits must be an int in \[2, 8\]"),
    (dict(bits=4.0), TypeError, "bits must be an int"),
    (dict(group_size=0), ValueError, "group_size must be an int >= 1"),
    (dict(group_size=True), TypeError, "group_size must be an int"),
    (dict(damp=-0.1), ValueError, r"damp must be a finite real number in \[0.0, 10000.0\]"),
    (dict(damp="x"), TypeError, "damp must be a finite real number"),
    (dict(act_order=1), TypeError, "act_order must be True or False"),
    (dict(block_size=0), ValueError, "block_size must be an int in"),
    (dict(scale_dtype=np.int8), TypeError, "scale_dtype must be one of the dtypes float16"),
    (dict(symmetric="no"), TypeError, "symmetric must be True or False"),
])
def test_gptq_bad_inputs_are_named(kwargs, exc, match):
    args = dict(weight=np.ones((4, 8), np.float32), hessian=np.eye(8), bits=4, group_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        wo.gptq(args.pop("weight"), args.pop("hessian"), **args)


def test_scales_that_do_not_fit_float16_are_named():
    w = np.full((2, 4), 1e-9, np.float32)
    with pytest.raises(ValueError, match="underflows to 0 in float16"):
        wo.rtn(w, bits=4, group_size=4)
    assert np.allclose(wo.rtn(w, bits=4, group_size=4, scale_dtype=np.float32), w)
    with pytest.raises(ValueError, match="overflows float16"):
        wo.rtn(np.full((2, 4), 1e7, np.float32), bits=4, group_size=4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda w, x: wo.rtn(w, bits=4, group_size=4, clip=1.5), ValueError, r"clip ratios"),
    (lambda w, x: wo.rtn(w, bits=4, group_size=4, clip=np.ones((3, 3))), ValueError,
     "group layout"),
    (lambda w, x: wo.awq_scales(w, x[:, :5], bits=4, group_size=4), ValueError,
     "x must have K=8 columns"),
    (lambda w, x: wo.awq_scales(w, x, bits=4, group_size=4, n_grid=0), ValueError,
     "n_grid must be an int in"),
    (lambda w, x: wo.awq_clip(w, x, bits=4, group_size=4, max_shrink=1.0), ValueError,
     "max_shrink"),
    (lambda w, x: wo.awq(w, x.astype(np.int64), bits=4, group_size=4), TypeError,
     "x must hold floating-point numbers"),
    (lambda w, x: wo.awq(w, x, bits=4, group_size=4, clip=None), TypeError, "clip must be"),
    (lambda w, x: wo.layer_error(x, w, w[:, :4]), ValueError, "w_hat must have"),
])
def test_rtn_and_awq_bad_inputs_are_named(call, exc, match):
    rng = np.random.default_rng(0)
    with pytest.raises(exc, match=match):
        call(rng.normal(size=(4, 8)), rng.normal(size=(32, 8)))


# ------------------------------------------------------------------------------------------------
# AWQ
# ------------------------------------------------------------------------------------------------


def _salient_problem(seed, k=64, rows=32, n=2048):
    """Inputs whose few channels are large (as in language models), weights independent."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) * np.exp(rng.normal(scale=1.0, size=k))
    w = rng.normal(scale=0.05, size=(rows, k))
    return x, w


def test_awq_scale_search_is_a_grid_search_that_starts_at_round_to_nearest():
    x, w = _salient_problem(20)
    res = wo.awq_scales(w, x, bits=3, group_size=32)
    assert res.alphas.tolist() == [i / 20 for i in range(20)]
    d0 = w - wo.rtn(w, bits=3, group_size=32)
    assert res.losses[0] == pytest.approx(wo.layer_error(x, w, w - d0) ** 2 / x.shape[0] / 32)
    assert res.alpha == res.alphas[np.argmin(res.losses)] and res.alpha > 0
    mean_abs = np.abs(x).mean(axis=0)
    s = mean_abs**res.alpha
    assert np.allclose(res.scales, s / np.sqrt(s.max() * s.min()))
    # salient channels (large mean |x|) are scaled up, the others down
    assert np.corrcoef(np.log(res.scales), np.log(mean_abs))[0, 1] > 0.999


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_round_to_nearest_when_a_few_channels_are_salient(seed, bits):
    x, w = _salient_problem(30 + seed)
    e_rtn = wo.layer_error(x, w, wo.rtn(w, bits=bits, group_size=32))
    e_scale = wo.layer_error(x, w, wo.awq(w, x, bits=bits, group_size=32, clip=False))
    e_awq = wo.layer_error(x, w, wo.awq(w, x, bits=bits, group_size=32))
    assert e_awq <= e_scale < 0.9 * e_rtn


def test_awq_clip_never_loses_on_a_group_and_awq_codes_round_trip():
    x, w = _salient_problem(40)
    ratios = wo.awq_clip(w, x, bits=3, group_size=16)
    assert ratios.shape == (32, 4) and ratios.min() >= 0.5 and ratios.max() == 1.0
    assert np.any(ratios < 1)
    d_clip = w - wo.rtn(w, bits=3, group_size=16, clip=ratios)
    d_none = w - wo.rtn(w, bits=3, group_size=16)
    for j in range(4):
        cols = slice(16 * j, 16 * j + 16)
        e_clip = np.sum((x[:, cols] @ d_clip[:, cols].T) ** 2, axis=0)
        e_none = np.sum((x[:, cols] @ d_none[:, cols].T) ** 2, axis=0)
        assert np.all(e_clip <= e_none * (1 + 1e-9))
    qw = wo.awq(w, x, bits=3, group_size=16, return_codes=True)
    assert qw.input_scale.shape == (64,)
    assert np.array_equal(qw.dequantize(), qw.weight)
    assert np.array_equal(qw.weight, wo.awq(w, x, bits=3, group_size=16))
    assert qw.bits_per_weight == 3 + (16 + 3) / 16


# ------------------------------------------------------------------------------------------------
# a whole model: every method by name, and AWQ's salient-channel experiment
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 3])
def test_every_method_beats_round_to_nearest_on_the_layer_objective(bits):
    x, w = _problem(11, n=768, k=64, rows=16, outliers=3)
    errors = {}
    for method in wo.METHODS:
        qw = wo.quantize_layer(w, x, method=method, bits=bits, group_size=32)
        assert qw.weight.shape == w.shape and qw.weight.dtype == w.dtype
        np.testing.assert_allclose(qw.dequantize(), qw.weight, rtol=1e-6, atol=1e-7)
        assert qw.codes.max() <= 2**bits - 1
        errors[method] = wo.layer_error(x, w, qw.weight)
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"]
    assert errors["awq+gptq"] < errors["rtn"]
    # rtn by name is rtn itself
    assert np.array_equal(wo.quantize_layer(w, x, method="rtn", bits=bits, group_size=32).weight,
                          wo.rtn(w, bits=bits, group_size=32))


def test_quantize_layers_uses_each_layers_own_inputs():
    x1, w1 = _problem(12, n=256, k=32, rows=8)
    x2, w2 = _problem(13, n=256, k=48, rows=8)
    out = wo.quantize_layers({"a": w1, "b": w2}, {"b": x2, "a": x1}, method="gptq", bits=4,
                             group_size=16)
    assert list(out) == ["a", "b"]
    expect = wo.gptq(w2, wo.hessian(x2), bits=4, group_size=16, act_order=True)
    assert np.array_equal(out["b"].weight, expect)
    with pytest.raises(ValueError, match=r"weights names layer\(s\) \['b'\] that inputs has no"):
        wo.quantize_layers({"a": w1, "b": w2}, {"a": x1}, method="rtn", bits=4, group_size=16)
    with pytest.raises(ValueError, match="method must be one of"):
        wo.quantize_layer(w1, x1, method="hqq", bits=4, group_size=16)
    with pytest.raises(ValueError, match="x must have 32 columns|x must have shape|columns"):
        wo.quantize_layer(w1, x2, method="awq", bits=4, group_size=16)


def test_keeping_salient_channels_by_activation_beats_by_weight_and_at_random():
    x, w = _problem(14, n=1024, k=128, rows=32, outliers=4)
    err = {by: wo.salient_channel_error(w, x, bits=3, group_size=None, fraction=0.03, by=by)
           for by in ("activation", "weight", "random")}
    none = wo.salient_channel_error(w, x, bits=3, group_size=None, fraction=0.0)
    assert err["activation"] < 0.5 * none
    assert err["activation"] < err["weight"] and err["activation"] < err["random"]
    rtn_mse = np.sum((x @ (w - wo.rtn(w, bits=3, group_size=None)).T.astype(np.float64)) ** 2)
    assert np.isclose(none, rtn_mse / (x.shape[0] * w.shape[0]))
    assert wo.salient_channel_error(w, x, bits=3, group_size=None, fraction=1.0) == 0.0
    with pytest.raises(ValueError, match="by must be"):
        wo.salient_channel_error(w, x, bits=3, group_size=None, by="gradient")
    with pytest.raises(ValueError, match="fraction must be"):
        wo.salient_channel_error(w, x, bits=3, group_size=None, fraction=1.5)


def test_compare_methods_evaluates_every_combination_with_its_own_weights():
    x1, w1 = _problem(15, n=256, k=32, rows=8)
    x2, w2 = _problem(16, n=256, k=64, rows=8)
    weights, inputs = {"a": w1, "b": w2}, {"a": x1, "b": x2}
    seen = []

    def evaluate(ws):           # the loss: total output error, so it must follow the weights
        seen.append(ws)
        return sum(wo.layer_error(inputs[n], weights[n], ws[n]) ** 2 for n in ws)

    rows = wo.compare_methods(weights, inputs, evaluate, methods=("rtn", "gptq"), bits=(4, 3),
                              group_sizes=(16, None), keep_layers=True)
    assert [(r.bits, r.group_size, r.method) for r in rows] == [
        (b, g, m) for b in (4, 3) for g in (16, None) for m in ("rtn", "gptq")]
    for r, ws in zip(rows, seen, strict=True):
        assert np.isclose(r.loss, sum(e**2 for e in r.layer_errors.values()))
        assert all(np.array_equal(r.layers[n].weight, ws[n]) for n in ws)
        direct = wo.quantize_layer(w2, x2, method=r.method, bits=r.bits, group_size=r.group_size)
        assert np.array_equal(direct.weight, r.layers["b"].weight)
        want_bpw = (w1.size * r.layers["a"].bits_per_weight
                    + w2.size * r.layers["b"].bits_per_weight) / (w1.size + w2.size)
        assert np.isclose(r.bits_per_weight, want_bpw)
    by = {(r.method, r.bits, r.group_size): r.loss for r in rows}
    assert all(by["gptq", b, g] < by["rtn", b, g] for b in (4, 3) for g in (16, None))
    assert wo.compare_methods(weights, inputs, evaluate, methods=("rtn",), bits=(4,),
                              group_sizes=(16,))[0].layers is None
    with pytest.raises(TypeError, match="evaluate must be callable"):
        wo.compare_methods(weights, inputs, 3.0)


# ------------------------------------------------------------------------------------------------
# the course's language model (the weight_only chapter's table runs on it)
# ------------------------------------------------------------------------------------------------


def test_gptq_beats_round_to_nearest_on_every_linear_layer_of_the_language_model():
    from qcourse.datasets import load_pydoc_text
    from qcourse.nn import linear_inputs, lm_windows, load_lm, one_blas_thread

    lm = load_lm().model
    training = lm_windows(load_pydoc_text("train"), 128)
    calib = training[np.linspace(0, len(training) - 1, 8).astype(int)]
    checked = 0
    with one_blas_thread():
        inputs = linear_inputs(lm, calib[:, :-1])
        for name, layer in lm.named_linears():
            x, w = inputs[name], layer.weight
            h = wo.hessian(x)
            for bits in (4, 3):
                for g in (128, None):
                    e_rtn = wo.layer_error(x, w, wo.rtn(w, bits=bits, group_size=g))
                    e_gptq = wo.layer_error(x, w, wo.gptq(w, h, bits=bits, group_size=g,
                                                          act_order=True))
                    assert e_gptq < e_rtn, (name, bits, g, e_gptq, e_rtn)
                    checked += 1
    assert checked == 4 * len(lm.named_linears()) == 32


def test_quantized_weights_survive_copy_and_pickle():
    # A QuantizedWeight holds codes, scales and zero points (no compiled buffer): every way a
    # model is copied or saved gives the same fields, the same dequantized weight and storage.
    import copy
    import io
    import pickle

    x, w = _problem(4, n=256, k=24, rows=6)
    made = [wo.rtn(w, bits=3, group_size=8, return_codes=True),
            wo.gptq(w, wo.hessian(x), bits=4, group_size=None, symmetric=True, act_order=True,
                    return_codes=True),
            wo.awq(w, x, bits=4, group_size=8, n_grid=5, return_codes=True)]
    for qw in made:
        f = io.BytesIO()
        np.save(f, np.array([qw], dtype=object), allow_pickle=True)
        f.seek(0)
        copies = [copy.deepcopy(qw), np.load(f, allow_pickle=True)[0]]
        copies += [pickle.loads(pickle.dumps(qw, p))
                   for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
        for c in copies:
            for field in ("weight", "codes", "scale", "zero_point", "input_scale"):
                a, b = getattr(qw, field), getattr(c, field)
                assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
            assert np.array_equal(c.dequantize(), qw.dequantize())
            assert c.bits_per_weight == qw.bits_per_weight and c.damp == qw.damp
