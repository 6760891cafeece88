"""Tests for qcourse.lowbit: int4 group-wise weights and their layer, fp8 scaling against int8.

Oracles: the int64 NumPy reference of the per-group integer products (exact), the float
dequantize-then-matmul layer (to a stated bound), qcourse.affine for the codes and the storage
accounting, and ml_dtypes for the fp8 round trip (bit for bit, where installed).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcourse import lowbit as lb
from qcourse.affine import choose_qparams, effective_bits, fake_quantize, pack_int, quantize
from qcourse.floats import FP8_E4M3FN, FP16
from qcourse.nn import make_mlp

# ------------------------------------------------------------------------------------------------
# int4 group-wise quantization
# ------------------------------------------------------------------------------------------------


def _weights(seed, n=12, k=40, df=3):
    return np.random.default_rng(seed).standard_t(df, size=(n, k)).astype(np.float32)


@pytest.mark.parametrize("group_size", [1, 3, 7, 8, 16, 40, 41, 1000])
def test_codes_and_scales_follow_the_formula(group_size):
    w = _weights(1)
    w4 = lb.quantize_int4_groupwise(w, group_size)
    n, k = w.shape
    n_groups = -(-k // group_size)
    assert w4.scale.shape == (n, n_groups) and w4.scale.dtype == np.float16
    q = w4.codes()
    assert q.dtype == np.int8 and q.shape == w.shape
    assert q.min() >= -7 and q.max() <= 7
    for j in range(n_groups):
        sl = slice(j * group_size, min((j + 1) * group_size, k))
        expect = (np.abs(w[:, sl]).max(axis=1).astype(np.float64) / 7).astype(np.float16)
        assert np.array_equal(w4.scale[:, j], expect)
        s = w4.scale[:, j].astype(np.float64)[:, None]
        assert np.array_equal(q[:, sl], np.clip(np.rint(w[:, sl] / s), -7, 7))
    # every weight within half a (stored) step, except the clamp at +-7 after float16 rounding
    w_hat = w4.dequantize()
    step = np.repeat(w4.scale.astype(np.float64), group_size, axis=1)[:, :k]
    inside = np.abs(w / step) <= 7
    assert np.all(np.abs(w_hat - w)[inside] <= step[inside] / 2 * (1 + 1e-6))


def test_group_size_at_least_k_is_per_channel():
    w = _weights(2)
    per_channel = choose_qparams(w, bits=4, symmetric=True, narrow_range=True, axis=0)
    for g in (w.shape[1], w.shape[1] + 5, 2**62):       # no padding to a huge group
        w4 = lb.quantize_int4_groupwise(w, g, scale_dtype=np.float32)
        assert w4.scale.shape == (w.shape[0], 1) and w4.group_size == w.shape[1]
        assert np.array_equal(w4.scale[:, 0], per_channel.scale.astype(np.float32))


def test_a_group_size_that_does_not_divide_k_gives_a_short_last_group():
    w = _weights(3, k=10)
    w[:, 8:] = 50.0                                    # outliers only in the short last group
    w4 = lb.quantize_int4_groupwise(w, 4)
    assert w4.scale.shape == (12, 3)
    assert np.allclose(w4.scale[:, 2].astype(np.float64), 50.0 / 7, rtol=1e-3)
    assert np.all(w4.scale[:, :2].astype(np.float64) < 50.0 / 7 / 2)   # unaffected by them
    assert np.array_equal(w4.codes()[:, 8:], np.full((12, 2), 7))


def test_all_zero_groups_and_plus_minus_max():
    w = np.zeros((3, 8), np.float32)
    w[1, 4:] = [1.0, -1.0, 0.5, -0.25]
    w[2, :4] = 65504.0 * 7 / 2                         # large, but its scale fits float16
    w4 = lb.quantize_int4_groupwise(w, 4)
    assert np.array_equal(w4.scale[0], [1.0, 1.0]) and np.all(w4.codes()[0] == 0)
    assert np.all(w4.dequantize()[0] == 0)
    assert w4.codes()[1, 4:].tolist() == [7, -7, 4, -2]   # 3.5 -> 4, -1.75 -> -2 (ties to even)
    assert np.all(w4.codes()[2, :4] == 7)
    s1 = np.float32(np.float16(1.0 / 7))                  # the stored scale is float16(1/7)
    assert np.array_equal(w4.dequantize()[1, 4:6], [7 * s1, -7 * s1])


def test_ties_round_to_even():
    w = np.array([[7.0, 0.5, 1.5, 2.5, -0.5, -2.5]], np.float32)   # scale exactly 1
    assert lb.quantize_int4_groupwise(w, 6).codes().tolist() == [[7, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 3), (7, 9), (2, 64)])
def test_packing_round_trip_including_odd_sizes(shape):
    w = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    w4 = lb.quantize_int4_groupwise(w, 3)
    n, k = shape
    assert w4.packed.dtype == np.uint8 and w4.packed.shape == (-(-n * k // 2),)
    q = quantize(w, w4.qparams)
    assert np.array_equal(w4.packed, pack_int(q, 4, signed=True))
    assert np.array_equal(w4.codes(), q)
    if n * k % 2:
        assert w4.packed[-1] >> 4 == 0                   # the unused high nibble stays 0


@pytest.mark.parametrize("g, scale_dtype, scale_bits", [(32, np.float16, 16), (64, np.float16, 16),
                                                         (128, np.float16, 16),
                                                         (32, np.float32, 32)])
def test_storage_accounting(g, scale_dtype, scale_bits):
    w = np.random.default_rng(5).normal(size=(64, 256)).astype(np.float32)
    w4 = lb.quantize_int4_groupwise(w, g, scale_dtype=scale_dtype)
    assert w4.bits_per_weight == 4 + scale_bits / g
    assert w4.nbytes * 8 / w.size == w4.bits_per_weight     # the bytes really stored
    assert w4.bits_per_weight == effective_bits(4, w.shape, axis=1, group_size=g,
                                                scale_bits=scale_bits, zero_point_bits=0)


def test_storage_accounting_with_a_short_last_group():
    w4 = lb.quantize_int4_groupwise(np.ones((4, 10), np.float32), 4)   # groups of 4, 4, 2
    assert w4.bits_per_weight == 4 + 3 * 16 / 10
    assert w4.nbytes == 4 * 10 // 2 + 4 * 3 * 2


def test_smaller_groups_never_lose_sqnr_on_heavy_tails():
    w = _weights(6, n=64, k=512)
    sq = [float(np.sum(w.astype(np.float64) ** 2)
                / np.sum((w - lb.quantize_int4_groupwise(w, g, scale_dtype=np.float32)
                          .dequantize()).astype(np.float64) ** 2)) for g in (512, 128, 32, 8)]
    assert sq == sorted(sq)


@pytest.mark.parametrize("bad, exc, match", [
    (np.ones((2, 3), np.int32), TypeError, "weight must hold floating-point numbers"),
    (np.ones(3, np.float32), ValueError, "2-D"),
    (np.ones((0, 3), np.float32), ValueError, "weight must not be empty"),
    (np.array([[1.0, np.nan]]), ValueError, "NaN"),
    (np.array([[1e6, 1.0]]), ValueError, "overflows"),
    (np.array([[1e-9, 0.0]]), ValueError, "underflows"),
])
def test_quantize_rejects_bad_weights(bad, exc, match):
    with pytest.raises(exc, match=match):
        lb.quantize_int4_groupwise(bad, 2)


@pytest.mark.parametrize("g, exc", [(0, ValueError), (-4, ValueError), (2.0, TypeError),
                                    (True, TypeError), (None, TypeError)])
def test_quantize_rejects_bad_group_sizes(g, exc):
    with pytest.raises(exc, match="group_size"):
        lb.quantize_int4_groupwise(np.ones((2, 4), np.float32), g)


def test_quantize_rejects_bad_scale_dtype():
    with pytest.raises(TypeError, match="scale_dtype"):
        lb.quantize_int4_groupwise(np.ones((2, 4), np.float32), 2, scale_dtype=np.int8)


def test_float32_scales_accept_what_float16_refuses():
    w = np.array([[1e-9, 0.0, 1e6, 3.0]])
    w4 = lb.quantize_int4_groupwise(w, 2, scale_dtype=np.float32)
    assert w4.codes().tolist() == [[7, 0, 7, 0]]


# ------------------------------------------------------------------------------------------------
# the weight-only layer
# ------------------------------------------------------------------------------------------------


def _layer(seed, m, n, k, g):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w4 = lb.quantize_int4_groupwise(rng.standard_t(4, size=(n, k)).astype(np.float32), g)
    return x, w4


@settings(max_examples=40)
@given(m=st.integers(1, 6), n=st.integers(1, 9), k=st.integers(1, 70), g=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_kernel_accumulators_equal_the_reference_exactly(m, n, k, g, seed):
    rng = np.random.default_rng(seed)
    x_q = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    _, w4 = _layer(seed, 1, n, k, g)
    fast = lb.int4_group_accumulators(x_q, w4)
    ref = lb.int4_group_accumulators_reference(x_q, w4)
    assert fast.dtype == ref.dtype == np.int32 and fast.shape == (m, n, -(-k // g))
    assert np.array_equal(fast, ref)


def test_accumulators_at_the_extremes():
    # -128 activations against +-7 codes in one long group: the largest magnitudes a group sees
    k = 4096
    w = np.full((3, k), -1.0, np.float32)
    w[1] = 1.0
    w[2, ::2] = 1.0
    w4 = lb.quantize_int4_groupwise(w, k)
    x_q = np.full((2, k), -128, np.int8)
    x_q[1] = 127
    acc = lb.int4_group_accumulators(x_q, w4)
    assert np.array_equal(acc, lb.int4_group_accumulators_reference(x_q, w4))
    assert acc[0, 0, 0] == 128 * 7 * k and acc[0, 1, 0] == -128 * 7 * k and acc[0, 2, 0] == 0
    assert acc[1, 0, 0] == -127 * 7 * k


@pytest.mark.parametrize("m, n, k, g", [(1, 1, 1, 1), (5, 7, 64, 16), (3, 33, 130, 32),
                                        (8, 16, 96, 128), (4, 10, 37, 5)])
def test_int8_layer_matches_its_reference_and_the_float_bound(m, n, k, g):
    x, w4 = _layer(7, m, n, k, g)
    bias = np.linspace(-1, 1, n).astype(np.float32)
    fast = lb.int4_linear_int8(x, w4, bias)
    slow = lb.int4_linear_int8(x, w4, bias, reference=True)
    assert fast.dtype == np.float32 and fast.shape == (m, n)
    assert np.array_equal(fast, slow)                   # same integers, same float code
    ref = lb.int4_linear_reference(x, w4, bias)
    s_x = np.abs(x).max(axis=1, keepdims=True) / 127
    bound = s_x / 2 * np.abs(w4.dequantize()).sum(axis=1)[None, :]
    float_slack = 1e-5 * (np.abs(x) @ np.abs(w4.dequantize()).T + np.abs(bias) + 1)
    assert np.all(np.abs(fast - ref) <= bound + float_slack)


def test_int8_layer_is_the_per_row_formula():
    # y = s_x[m] * sum_j s[n, j] * A[m, n, j] with s_x[m] = max|x[m]| / 127, computed by hand
    x, w4 = _layer(12, 4, 6, 24, 8)
    x[2] *= 100                                         # rows of very different sizes
    s_x = np.abs(x.astype(np.float64)).max(axis=1) / 127
    x_q = np.clip(np.rint(x / s_x[:, None]), -127, 127).astype(np.int64)
    q = w4.codes().astype(np.int64)
    acc = np.stack([x_q[:, j:j + 8] @ q[:, j:j + 8].T for j in range(0, 24, 8)], axis=-1)
    expect = s_x[:, None] * np.einsum("mnj,nj->mn", acc, w4.scale.astype(np.float64))
    assert np.allclose(lb.int4_linear_int8(x, w4), expect, rtol=1e-6, atol=0)


def test_reference_layer_is_dequantize_then_matmul():
    x, w4 = _layer(8, 4, 6, 20, 8)
    assert np.array_equal(lb.int4_linear_reference(x, w4), x @ w4.dequantize().T)


def test_layer_with_zero_input_rows_and_zero_weights():
    x, w4 = _layer(9, 3, 5, 16, 4)
    x[1] = 0.0
    y = lb.int4_linear_int8(x, w4)
    assert np.all(y[1] == 0)
    w0 = lb.quantize_int4_groupwise(np.zeros((5, 16), np.float32), 4)
    assert np.all(lb.int4_linear_int8(x, w0) == 0) and np.all(lb.int4_linear_reference(x, w0) == 0)


def test_layer_rejects_bad_input():
    x, w4 = _layer(10, 2, 3, 8, 4)
    with pytest.raises(ValueError, match="K=8"):
        lb.int4_linear_int8(x[:, :7], w4)
    with pytest.raises(TypeError, match="x must hold floating-point numbers"):
        lb.int4_linear_reference(x.astype(np.int32), w4)
    with pytest.raises(ValueError, match="bias"):
        lb.int4_linear_int8(x, w4, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="w4 must be an Int4Weight"):
        lb.int4_linear_int8(x, np.zeros((3, 8), np.float32))
    with pytest.raises(TypeError, match="x_q must be an int8"):
        lb.int4_group_accumulators(x, w4)
    with pytest.raises(ValueError, match="x_q must have shape"):
        lb.int4_group_accumulators_reference(np.zeros((2, 9), np.int8), w4)


@pytest.mark.parametrize("field, value, match", [
    ("scale", lambda s: np.full_like(s, np.nan), "w4.scale must be finite and > 0"),
    ("scale", lambda s: np.zeros_like(s), "w4.scale must be finite and > 0"),
    ("scale", lambda s: -s, "w4.scale must be finite and > 0"),
    ("scale", lambda s: s[:, :1], r"w4.scale must be a float16 or float32 array of shape"),
    ("scale", lambda s: s.astype(np.float64), r"w4.scale must be a float16 or float32"),
    ("packed", lambda p: p[:-1], r"w4.packed must be a uint8 array of 12 bytes"),
    ("packed", lambda p: None, r"w4.packed must be a uint8 array"),
    ("packed", lambda p: p.astype(np.int8), r"w4.packed must be a uint8 array"),
    ("shape", lambda s: (3, 9), r"w4.scale must be .* shape \(3, 3\)|w4.packed"),
    ("shape", lambda s: (3, 2**40), r"w4.shape must be two ints"),
    ("shape", lambda s: (3.0, 8), r"w4.shape must be two ints"),
    ("group_size", lambda g: 9, r"w4.group_size must be an int in \[1, K=8\]"),
    ("group_size", lambda g: 0, r"w4.group_size must be an int in \[1, K=8\]"),
])
def test_an_int4_weight_is_checked_where_it_is_used(field, value, match):
    # An Int4Weight built by hand, or unpickled (which skips the constructor), is checked again
    # by every function that computes with it: a bad scale or buffer never gives a wrong answer.
    x, w4 = _layer(10, 2, 3, 8, 4)
    forged = copy.copy(w4)
    object.__setattr__(forged, field, value(getattr(w4, field)))
    for f in (lb.int4_linear_int8, lb.int4_linear_reference):
        with pytest.raises((TypeError, ValueError), match=match):
            f(x, forged)
    with pytest.raises((TypeError, ValueError), match=match.replace("w4.", "Int4Weight.")):
        lb.Int4Weight(forged.packed, forged.scale, forged.shape, forged.group_size)


def test_weight_only_model_copies_and_quantizes():
    model = make_mlp((64, 32, 10), seed=0)
    before = model["fc1"].weight.copy()
    q_model = lb.int4_weight_only(model, 16)
    assert np.array_equal(model["fc1"].weight, before)           # original untouched
    for name in ("fc1", "fc2"):
        expect = lb.quantize_int4_groupwise(model[name].weight, 16).dequantize()
        assert np.array_equal(q_model[name].weight, expect)
    with pytest.raises(TypeError, match="model"):
        lb.int4_weight_only(model["fc1"], 16)
    with pytest.raises(ValueError, match="group_size"):
        lb.int4_weight_only(model, 0)


def test_int4_weight_is_immutable():
    w4 = lb.quantize_int4_groupwise(np.ones((2, 4), np.float32), 2)
    assert isinstance(w4, lb.Int4Weight)
    with pytest.raises(AttributeError):
        w4.group_size = 4


# ------------------------------------------------------------------------------------------------
# fp8 against int8
# ------------------------------------------------------------------------------------------------


def test_fp8_scale_maps_absmax_to_the_largest_finite_value():
    x = np.array([-3.0, 0.5, 2.0])
    assert lb.fp8_scale(x, "e4m3fn") == 3.0 / 448
    assert lb.fp8_scale(x, "e5m2") == 3.0 / 57344
    assert lb.fp8_scale(np.zeros(3), FP8_E4M3FN) == 1.0
    bits, s = lb.fp8_quantize(x, "e4m3fn")
    assert lb.fp8_dequantize(bits, s, "e4m3fn")[0] == -3.0       # the abs-max is exact


@pytest.mark.parametrize("name", sorted(lb.FP8_FORMATS))
def test_fp8_round_trip_against_ml_dtypes(name):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the fp8 oracle")
    np_type = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[name]
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_t(2, size=20_000), [0.0, -0.0, 1e-30, -1e-30]])
    s = lb.fp8_scale(x, name)
    m = lb.FP8_FORMATS[name].max_finite
    oracle = np.clip(x / s, -m, m).astype(np_type)
    bits, s2 = lb.fp8_quantize(x, name)
    assert s2 == s and np.array_equal(bits, oracle.view(np.uint8))
    assert np.array_equal(lb.fp8_fake_quantize(x, name), oracle.astype(np.float64) * s)


def test_fp8_saturates_instead_of_nan():
    # with a given scale, values beyond the range clamp to +-max (e4m3fn alone would give NaN)
    x = np.array([1000.0, -1000.0, 464.0, 500.0])
    out = lb.fp8_fake_quantize(x, "e4m3fn", scale=1.0)
    assert out.tolist() == [448.0, -448.0, 448.0, 448.0]
    assert lb.fp8_fake_quantize(np.array([1e6]), "e5m2", scale=1.0).tolist() == [57344.0]


def test_fp8_rejects_bad_input():
    with pytest.raises(ValueError, match="fmt must be one of"):
        lb.fp8_scale([1.0], "e3m4")
    with pytest.raises(ValueError, match="8-bit"):
        lb.fp8_scale([1.0], FP16)
    with pytest.raises(TypeError, match="fmt"):
        lb.fp8_scale([1.0], 8)
    with pytest.raises(ValueError, match="NaN"):
        lb.fp8_quantize([1.0, np.inf], "e5m2")
    with pytest.raises(ValueError, match="empty"):
        lb.fp8_scale([], "e5m2")
    with pytest.raises(ValueError, match="scale must be a finite real number > 0"):
        lb.fp8_quantize([1.0], "e5m2", scale=0.0)
    with pytest.raises(TypeError, match="bits must have dtype uint8"):
        lb.fp8_dequantize(np.array([1, 2]), 1.0, "e5m2")
    with pytest.raises(TypeError, match="real numbers"):
        lb.format_sqnr(np.array(["a"]))


def test_format_sqnr_orderings():
    rng = np.random.default_rng(12)
    gauss = lb.format_sqnr(rng.normal(size=50_000))
    heavy = lb.format_sqnr(rng.standard_t(2, size=50_000))
    assert gauss["int8"] > gauss["e4m3fn"] > gauss["e5m2"]
    assert heavy["e4m3fn"] > heavy["e5m2"] > heavy["int8"]
    # fp8's relative error does not grow with the tails; int8's step max|x|/127 does
    assert heavy["e4m3fn"] >= gauss["e4m3fn"] - 0.5 and heavy["int8"] < gauss["int8"] - 10
    # int8's is set by the step max|x|/127
    x = rng.normal(size=10_000)
    expect = fake_quantize(x, choose_qparams(x, bits=8, symmetric=True))
    assert math.isclose(lb.format_sqnr(x)["int8"],
                        10 * math.log10(np.sum(x**2) / np.sum((x - expect) ** 2)))


# ------------------------------------------------------------------------------------------------
# MX (OCP Microscaling v1.0) and NVFP4 blocks, bit for bit against ml_dtypes
# ------------------------------------------------------------------------------------------------

MX_ML_DTYPES = {"mxfp8_e4m3": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2",
                "mxfp6_e3m2": "float6_e3m2fn", "mxfp6_e2m3": "float6_e2m3fn",
                "mxfp4": "float4_e2m1fn"}


def _md():
    return pytest.importorskip("ml_dtypes", reason="ml_dtypes is the oracle for the MX elements")


def _mx_oracle(x, name, block, emax=None):
    """MX v1.0's conversion computed with NumPy's log2 and ml_dtypes' casts (no qcourse code)."""
    md = _md()
    xb = x.astype(np.float64).reshape(x.shape[:-1] + (-1, block))
    with np.errstate(invalid="ignore", divide="ignore"):
        amax = np.max(np.abs(xb), axis=-1)
        e = np.floor(np.log2(amax)) - (lb.MX_FORMATS[name].emax if emax is None else emax)
    nan_block = ~np.isfinite(amax)
    e = np.where(nan_block, 0, np.maximum(np.where(amax == 0, -127, e), -127))
    scale = np.where(nan_block, np.nan, np.exp2(e)).astype(np.float32)
    scales = scale.astype(md.float8_e8m0fnu).view(np.uint8)
    v = np.where(nan_block[..., None], 0.0, xb / np.exp2(e)[..., None])
    if name == "mxint8":
        elements = np.clip(np.rint(v * 64), -127, 127).astype(np.int8).view(np.uint8)
    else:
        t = getattr(md, MX_ML_DTYPES[name])
        m = float(md.finfo(t).max)
        elements = np.clip(v, -m, m).astype(t).view(np.uint8)
    return scales, elements.reshape(x.shape)


def _hard_mx_inputs(name, rng):
    """Blocks of 32: random heavy-tailed at many magnitudes, exact ties between element values,
    element subnormals, block maxima that round past the element range (saturation), float32
    subnormal inputs, scales below E8M0's range, zero blocks (signed), NaN and Inf blocks."""
    md = _md()
    spec = lb.MX_FORMATS[name]
    if name == "mxint8":
        grid = np.arange(-127, 128) / 64.0
    else:
        t = getattr(md, MX_ML_DTYPES[name])
        grid = np.arange(2**spec.bits, dtype=np.uint8).view(t).astype(np.float64)
        grid = np.unique(grid[np.isfinite(grid)])
    top = 2.0**spec.emax                        # a block max in [top, 2 top) keeps X = 1
    blocks = []
    for _ in range(300):                        # random, each block at its own magnitude
        blocks.append(rng.standard_t(3, 32) * 2.0 ** rng.integers(-140, 120))
    mids = (grid[1:] + grid[:-1]) / 2           # ties between neighbouring element values
    for i in range(0, mids.size, 31):
        blk = np.zeros(32)
        chunk = mids[i:i + 31]
        blk[:chunk.size] = chunk
        blk[31] = top                           # pins X = 1 so the ties stay ties
        for k in (-3, 0, 5):
            blocks.append(blk * 2.0**k)
            blocks.append(np.nextafter(blk, np.inf) * 2.0**k)
            blocks.append(np.nextafter(blk, -np.inf) * 2.0**k)
    sub = np.zeros(32)
    sub[:31] = rng.uniform(-1, 1, 31) * grid[grid > 0].min() * 4
    sub[31] = top
    blocks.append(sub)
    sat = rng.uniform(-1, 1, 32) * top
    sat[:4] = [1.999 * top, -1.9 * top, 1.75 * top, np.nextafter(2 * top, 0)]
    blocks.append(sat)
    blocks.append(rng.uniform(-1, 1, 32) * 2.0**-140)          # float32 subnormals
    blocks.append(rng.uniform(-1, 1, 32) * 2.0**-135)          # X clamped at 2^-127
    blocks.append(np.zeros(32))
    blocks.append(-np.zeros(32))
    for special in (np.nan, np.inf, -np.inf):
        blk = rng.standard_normal(32)
        blk[7] = special
        blocks.append(blk)
    blocks.append(np.full(32, 3.0e38))                          # near float32's maximum
    return np.array(blocks).astype(np.float32)


@pytest.mark.parametrize("name", sorted(lb.MX_FORMATS))
def test_mx_quantize_matches_ml_dtypes_on_hard_inputs(name):
    x = _hard_mx_inputs(name, np.random.default_rng(5))
    scales, elements = lb.mx_quantize(x, name)
    want_scales, want_elements = _mx_oracle(x, name, 32)
    assert scales.dtype == np.uint8 and elements.dtype == np.uint8
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(elements, want_elements)
    # 3-D input, blocks along the last axis only
    x3 = x[:40].reshape(5, 8, 32 * 1)
    s3, e3 = lb.mx_quantize(x3, name)
    assert s3.shape == (5, 8, 1) and e3.shape == x3.shape
    np.testing.assert_array_equal(e3, elements[:40].reshape(x3.shape))


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8_e4m3", "mxint8"])
def test_the_oracle_comparison_catches_a_wrong_shared_exponent(name):
    """A check proves itself: an off-by-one e_max (ceil instead of floor, in effect) fails."""
    x = _hard_mx_inputs(name, np.random.default_rng(6))
    broken = lb.MX_FORMATS[name]._replace(emax=lb.MX_FORMATS[name].emax - 1)
    scales, elements = lb.mx_quantize(x, broken)
    want_scales, want_elements = _mx_oracle(x, name, 32)
    assert np.mean(scales != want_scales) > 0.5
    assert np.any(elements != want_elements)


@pytest.mark.parametrize("name", sorted(lb.MX_FORMATS))
def test_mx_dequantize_matches_ml_dtypes_on_every_element_and_scale_code(name):
    md = _md()
    spec = lb.MX_FORMATS[name]
    n = 2**spec.bits
    elements = np.tile(np.arange(n, dtype=np.uint8), (256, 1))   # every code ...
    scales = np.arange(256, dtype=np.uint8)[:, None]             # ... under every scale byte
    got = lb.mx_dequantize(scales, elements, name, block=n)
    scale = scales[:, 0].view(md.float8_e8m0fnu).astype(np.float32)
    if name == "mxint8":
        values = elements.view(np.int8).astype(np.float64) / 64
        with np.errstate(over="ignore"):
            want = (values * scale.astype(np.float64)[:, None]).astype(np.float32)
    else:
        values = elements.view(getattr(md, MX_ML_DTYPES[name])).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            want = values * scale[:, None]
    assert got.dtype == np.float32 and got.shape == elements.shape
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), np.argwhere(~same)[:5]
    assert np.all(np.isnan(got[255]))                             # the NaN scale byte
    print(f"{name}: {got.size} (scale, element) pairs decode as ml_dtypes {md.__version__}")


@pytest.mark.parametrize("name", sorted(lb.MX_FORMATS))
def test_mx_round_trip_and_the_special_blocks(name):
    x = np.zeros((5, 32), np.float32)
    x[1] = -0.0
    x[2] = np.linspace(-3, 3, 32)
    x[3] = np.linspace(-3, 3, 32)
    x[3, 4] = np.nan
    x[4] = np.linspace(-3, 3, 32)
    x[4, 9] = -np.inf
    scales, elements = lb.mx_quantize(x, name)
    assert scales[0, 0] == 0 and scales[1, 0] == 0                # zero blocks: X = 2^-127
    assert np.all(elements[0] == 0)
    sign = 0x80 if name in ("mxfp8_e4m3", "mxfp8_e5m2", "mxint8") else 1 << (
        lb.MX_FORMATS[name].bits - 1)
    assert np.all(elements[1] == (0 if name == "mxint8" else sign))   # -0 kept (no int -0)
    assert scales[3, 0] == 255 and scales[4, 0] == 255            # NaN / Inf: NaN scale
    y = lb.mx_dequantize(scales, elements, name)
    assert np.all(np.isnan(y[3])) and np.all(np.isnan(y[4]))      # the whole block
    assert np.all(y[:2] == 0)
    again = lb.mx_quantize(y[:3], name)                           # decoded values re-encode
    np.testing.assert_array_equal(again[1], elements[:3])


def test_nvfp4_matches_ml_dtypes_float32_recipe():
    md = _md()
    rng = np.random.default_rng(8)
    x = (rng.standard_t(3, (64, 128)) * 2.0 ** rng.integers(-20, 20, (64, 1))).astype(np.float32)
    x[0, :16] = 0.0                                               # a zero block
    x[1, :16] = 1e-30                                             # far below the tensor max
    x[2, :16] = np.linspace(-6, 6, 16) * 2.0**-3                  # ties and grid points
    ts, scales, elements = lb.nvfp4_quantize(x)
    amax = np.max(np.abs(x))
    want_ts = np.float32(amax) / np.float32(2688)
    per = (np.max(np.abs(x.reshape(64, 8, 16)), axis=-1) / np.float32(6)) / want_ts
    per = np.clip(per, np.float32(2.0**-9), np.float32(448))
    want_scales = per.astype(md.float8_e4m3fn)
    total = want_scales.astype(np.float32) * want_ts
    want_el = (x.reshape(64, 8, 16) / total[..., None]).astype(md.float4_e2m1fn)
    assert ts == want_ts and ts.dtype == np.float32
    np.testing.assert_array_equal(scales, want_scales.view(np.uint8))
    np.testing.assert_array_equal(elements, want_el.view(np.uint8).reshape(x.shape))
    y = lb.nvfp4_dequantize(ts, scales, elements)
    want_y = (want_el.astype(np.float32) * want_scales.astype(np.float32)[..., None]) * want_ts
    np.testing.assert_array_equal(y, want_y.reshape(x.shape))
    assert np.all(y[0, :16] == 0)
    # every (scale byte, element code) pair decodes as ml_dtypes does
    codes = np.tile(np.arange(16, dtype=np.uint8), (256, 1))
    got = lb.nvfp4_dequantize(1.0, np.arange(256, dtype=np.uint8)[:, None], codes)
    want = (codes.view(md.float4_e2m1fn).astype(np.float32)
            * np.arange(256, dtype=np.uint8).view(md.float8_e4m3fn).astype(np.float32)[:, None])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: lb.mx_quantize(np.ones((2, 32), np.float32), "mxfp5"), ValueError, "fmt must be"),
    (lambda: lb.mx_quantize(np.ones((2, 32), np.float32), 4), TypeError, "fmt must be"),
    (lambda: lb.mx_quantize(np.ones((2, 30), np.float32), "mxfp4"), ValueError,
     "block=32 must divide"),
    (lambda: lb.mx_quantize(np.ones((2, 32), np.int8), "mxfp4"), TypeError, "x must be a float"),
    (lambda: lb.mx_quantize(np.ones((2, 32), np.float32), "mxfp4", block=0), ValueError,
     "block must be an int >= 1"),
    (lambda: lb.mx_quantize(np.ones((2, 32), np.float32), "mxfp4", block=2.0), TypeError,
     "block must be an int"),
    (lambda: lb.mx_dequantize(np.zeros(3, np.uint8), np.zeros(64, np.uint8), "mxfp4"),
     ValueError, "scales must have shape"),
    (lambda: lb.mx_dequantize(np.zeros(2, np.uint8), np.full(64, 16, np.uint8), "mxfp4"),
     ValueError, "wider than 4 bits"),
    (lambda: lb.mx_dequantize(np.zeros(2, np.int8), np.zeros(64, np.uint8), "mxfp4"),
     TypeError, "scales must be uint8"),
    (lambda: lb.nvfp4_quantize(np.array([[np.nan] + [0.0] * 15], np.float32)), ValueError,
     "NaN or Inf"),
    (lambda: lb.nvfp4_quantize(np.ones((1, 24), np.float32)), ValueError, "block=16"),
    (lambda: lb.nvfp4_quantize(np.ones((1, 16), np.float32), tensor_scale=0.0), ValueError,
     r"tensor_scale must be a finite real number in \(0, "),
    (lambda: lb.nvfp4_dequantize(1.0, np.zeros(1, np.uint8), np.full(16, 17, np.uint8)),
     ValueError, "wider than 4 bits"),
    # found by the full fuzz profile: an empty x, a value beyond float32, a scale beyond float32
    (lambda: lb.nvfp4_quantize(np.zeros((0, 16))), ValueError, "x is empty"),
    (lambda: lb.nvfp4_quantize(np.full(16, 1e300)), ValueError, "x contains NaN or Inf"),
    (lambda: lb.nvfp4_dequantize(1e300, np.zeros(1, np.uint8), np.zeros(16, np.uint8)),
     ValueError, r"tensor_scale must be a finite real number in \(0, "),
])
def test_mx_and_nvfp4_reject_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
