"""Tests for qcourse.affine: unit tests, Hypothesis properties, and oracles.

Oracles: the ONNX operator specification's own examples (hard-coded below, and read from the
``onnx`` package's backend test cases when it is installed), and ONNX Runtime's CPU
QuantizeLinear / DequantizeLinear kernels, compared bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcourse.affine import (
    QParams,
    choose_qparams,
    clip_sweep,
    codebook_dequantize,
    codebook_effective_bits,
    codebook_quantize,
    dequantize,
    dequantize_linear,
    effective_bits,
    error_breakdown,
    error_explorer,
    explorer_qparams,
    fake_quantize,
    grid_occupancy,
    kmeans_codebook,
    pack_int,
    plot_quantization,
    qparams_from_range,
    qrange,
    quantize,
    quantize_linear,
    quantize_weight,
    sqnr_db,
    storage_dtype,
    unpack_int,
)

# ------------------------------------------------------------------------------------------------
# qrange and storage dtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, signed, narrow, expected",
    [
        (8, True, False, (-128, 127)),
        (8, False, False, (0, 255)),
        (4, True, False, (-8, 7)),
        (4, False, False, (0, 15)),
        (2, True, False, (-2, 1)),
        (16, True, False, (-32768, 32767)),
        (16, False, False, (0, 65535)),
        (8, True, True, (-127, 127)),
        (8, False, True, (1, 255)),
        (4, True, True, (-7, 7)),
    ],
)
def test_qrange(bits, signed, narrow, expected):
    assert qrange(bits, signed, narrow) == expected


@pytest.mark.parametrize("bits", [1, 0, 17, 32, -8])
def test_qrange_rejects_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        qrange(bits, True)


@pytest.mark.parametrize("bits", [8.0, "8", True, None])
def test_qrange_rejects_non_int_bits(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        qrange(bits, True)


def test_qrange_rejects_non_bool_flags():
    with pytest.raises(TypeError, match="signed"):
        qrange(8, 1)
    with pytest.raises(TypeError, match="narrow_range"):
        qrange(8, True, "yes")


@pytest.mark.parametrize(
    "qmin, qmax, dtype",
    [(-128, 127, np.int8), (-8, 7, np.int8), (0, 255, np.uint8), (0, 15, np.uint8),
     (-129, 127, np.int16), (0, 256, np.uint16), (-32768, 32767, np.int16),
     (0, 65535, np.uint16), (-(2**31), 2**31 - 1, np.int32), (1, 255, np.uint8)],
)
def test_storage_dtype(qmin, qmax, dtype):
    assert storage_dtype(qmin, qmax) == np.dtype(dtype)


# ------------------------------------------------------------------------------------------------
# QParams validation
# ------------------------------------------------------------------------------------------------


def test_qparams_coerces_and_freezes():
    qp = QParams(scale=0.5, zero_point=3, qmin=0, qmax=255)
    assert qp.scale.dtype == np.float64 and qp.scale.shape == ()
    assert qp.zero_point.dtype == np.int64 and int(qp.zero_point) == 3
    assert qp.granularity == "per-tensor" and qp.levels == 256
    with pytest.raises(ValueError):
        qp.scale[...] = 2.0  # read-only array
    with pytest.raises(AttributeError):
        qp.qmin = 1  # frozen dataclass


def test_qparams_equality_and_hash():
    a = QParams(scale=[0.5, 0.25], zero_point=[0, 1], qmin=-8, qmax=7, axis=0)
    b = QParams(scale=np.array([0.5, 0.25]), zero_point=np.array([0, 1]), qmin=-8, qmax=7, axis=0)
    c = QParams(scale=[0.5, 0.25], zero_point=[0, 2], qmin=-8, qmax=7, axis=0)
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2


def test_qparams_broadcasts_scalar_zero_point():
    qp = QParams(scale=[0.5, 0.25, 1.0], zero_point=0, qmin=-128, qmax=127, axis=0)
    assert qp.zero_point.shape == (3,) and np.all(qp.zero_point == 0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(scale=0.0, zero_point=0, qmin=0, qmax=255), ValueError,
         "scale must be finite and > 0"),
        (dict(scale=-1.0, zero_point=0, qmin=0, qmax=255), ValueError, "scale must be finite"),
        (dict(scale=np.nan, zero_point=0, qmin=0, qmax=255), ValueError, "scale must be finite"),
        (dict(scale=np.inf, zero_point=0, qmin=0, qmax=255), ValueError, "scale must be finite"),
        (dict(scale=[0.1, 0.0], zero_point=0, qmin=0, qmax=255, axis=0), ValueError,
         "flat index 1"),
        (dict(scale="0.1", zero_point=0, qmin=0, qmax=255), TypeError, "scale must be real"),
        (dict(scale=0.1, zero_point=256, qmin=0, qmax=255), ValueError,
         r"zero_point must lie in \[qmin, qmax\] = \[0, 255\]"),
        (dict(scale=0.1, zero_point=-129, qmin=-128, qmax=127), ValueError, "zero_point must lie"),
        (dict(scale=0.1, zero_point=1.0, qmin=0, qmax=255), TypeError,
         "zero_point must be integers"),
        (dict(scale=0.1, zero_point=0, qmin=5, qmax=5), ValueError, "qmin must be < qmax"),
        (dict(scale=0.1, zero_point=0, qmin=7, qmax=-8), ValueError, "qmin must be < qmax"),
        (dict(scale=0.1, zero_point=0, qmin=0.0, qmax=255), TypeError, "qmin must be an int"),
        (dict(scale=[0.1, 0.2], zero_point=[0, 0, 0], qmin=0, qmax=255, axis=0), ValueError,
         "zero_point must have the shape of scale"),
        (dict(scale=[0.1, 0.2], zero_point=0, qmin=0, qmax=255), ValueError, "need a 0-d scale"),
        (dict(scale=0.1, zero_point=0, qmin=0, qmax=255, axis=0), ValueError, "need a 1-D scale"),
        (dict(scale=0.1, zero_point=0, qmin=0, qmax=255, group_size=4), ValueError,
         "group_size needs an axis"),
        (dict(scale=[[0.1]], zero_point=0, qmin=0, qmax=255, axis=1, group_size=0), ValueError,
         "group_size must be an int >= 1"),
        (dict(scale=np.array([]), zero_point=0, qmin=0, qmax=255, axis=0), ValueError,
         "scale must not be empty"),
        (dict(scale=0.1, zero_point=0, qmin=0, qmax=255, axis=True), TypeError, "axis must be"),
    ],
)
def test_qparams_rejects_bad_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        QParams(**kwargs)


# ------------------------------------------------------------------------------------------------
# qparams_from_range / choose_qparams
# ------------------------------------------------------------------------------------------------


def test_symmetric_int8_example_of_seed_001():
    # [-0.5, -0.2, 0.1, 0.3, 0.5]: scale = 0.5 / 127, codes = round(r / scale).
    x = np.array([-0.5, -0.2, 0.1, 0.3, 0.5])
    qp = choose_qparams(x, symmetric=True)
    assert float(qp.scale) == 0.5 / 127 and int(qp.zero_point) == 0
    np.testing.assert_array_equal(quantize(x, qp), [-127, -51, 25, 76, 127])
    assert quantize(x, qp).dtype == np.int8


def test_asymmetric_range_is_widened_to_include_zero():
    # The 0.1 ... 0.5 range of seed 001 becomes 0 ... 0.5 so that 0.0 is a code.
    qp = qparams_from_range(0.1, 0.5, signed=False)
    assert float(qp.scale) == 0.5 / 255 and int(qp.zero_point) == 0
    np.testing.assert_array_equal(quantize([0.0, 0.1, 0.3, 0.5], qp), [0, 51, 153, 255])
    # A negative-only range is widened on the other side.
    qp = qparams_from_range(-2.0, -1.0, signed=False)
    assert float(qp.scale) == 2.0 / 255 and int(qp.zero_point) == 255


def test_asymmetric_formula():
    rmin, rmax = -1.3, 2.9
    qp = qparams_from_range(rmin, rmax, bits=8, signed=True)
    scale = (rmax - rmin) / 255
    assert float(qp.scale) == scale
    assert int(qp.zero_point) == int(np.rint(-128 - rmin / scale))
    lo, hi = qp.representable_range()
    assert abs(lo - rmin) <= scale / 2 + 1e-12 and abs(hi - rmax) <= scale / 2 + 1e-12


def test_asymmetric_zero_point_rounds_half_to_even():
    # rmin = -2.5 * scale exactly: qmin - rmin/scale = 2.5 -> 2, not 3.
    qp = qparams_from_range(-2.5, 252.5, bits=8, signed=False)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == 2
    qp = qparams_from_range(-3.5, 251.5, bits=8, signed=False)
    assert int(qp.zero_point) == 4


def test_symmetric_unsigned_is_signed_grid_shifted():
    x = np.random.default_rng(1).normal(size=500)
    s = choose_qparams(x, bits=8, signed=True, symmetric=True)
    u = choose_qparams(x, bits=8, signed=False, symmetric=True)
    assert float(u.scale) == float(s.scale) and int(u.zero_point) == 128
    np.testing.assert_array_equal(quantize(x, u).astype(int), quantize(x, s).astype(int) + 128)
    np.testing.assert_array_equal(fake_quantize(x, u), fake_quantize(x, s))


def test_symmetric_scale_ignores_narrow_range_but_grid_changes():
    x = np.array([-1.0, 0.25, 1.0])
    wide = choose_qparams(x, symmetric=True)
    narrow = choose_qparams(x, symmetric=True, narrow_range=True)
    assert float(wide.scale) == float(narrow.scale) == 1 / 127
    assert (narrow.qmin, narrow.qmax) == (-127, 127)
    # -1.5 saturates at -128 on the full grid, at -127 on the narrow one.
    assert quantize(-1.5, wide) == -128 and quantize(-1.5, narrow) == -127


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_all_zero_tensor_is_well_defined(symmetric, signed):
    x = np.zeros((3, 3))
    qp = choose_qparams(x, signed=signed, symmetric=symmetric)
    assert float(qp.scale) == 1.0
    expected_zp = (0 if signed else 128) if symmetric else (-128 if signed else 0)
    assert int(qp.zero_point) == expected_zp
    q = quantize(x, qp)
    assert isinstance(q, np.ndarray) and q.shape == (3, 3) and np.all(q == expected_zp)
    r = dequantize(q, qp)
    assert r.dtype == np.float32 and np.all(r == 0) and not np.any(np.isnan(r))


def test_per_channel_zero_channel_is_well_defined():
    w = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    qp = choose_qparams(w, axis=0, symmetric=True)
    np.testing.assert_array_equal(qp.scale, [1.0, 2.0 / 127])
    np.testing.assert_array_equal(fake_quantize(w, qp)[0], 0.0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rmin=1.0, rmax=0.5), ValueError, "rmin must be <= rmax"),
        (dict(rmin=np.nan, rmax=1.0), ValueError, "rmin must be finite"),
        (dict(rmin=0.0, rmax=np.inf), ValueError, "rmax must be finite"),
        (dict(rmin=[0.0, 1.0], rmax=[1.0, 2.0]), ValueError, "per-tensor ranges"),
        (dict(rmin=0.0, rmax=1.0, axis=0), ValueError, "per-channel ranges"),
        (dict(rmin=[0.0], rmax=[1.0, 2.0], axis=0), ValueError, "same shape"),
        (dict(rmin=0.0, rmax=1.0, bits=1), ValueError, r"bits must be an int in \[2, 16\]"),
        (dict(rmin=0.0, rmax=1.0, bits=17), ValueError, r"bits must be an int in \[2, 16\]"),
        (dict(rmin=-1e308, rmax=1e308), ValueError, "overflows"),
        (dict(rmin="a", rmax=1.0), TypeError, "rmin must hold real numbers"),
        (dict(rmin=0.0, rmax=1.0, symmetric=1), TypeError, "symmetric"),
    ],
)
def test_qparams_from_range_rejects_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        qparams_from_range(**kwargs)


def test_choose_qparams_rejects_bad_input():
    with pytest.raises(ValueError, match="x must not be empty"):
        choose_qparams(np.array([]))
    with pytest.raises(ValueError, match="x must be finite"):
        choose_qparams(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="x must be finite"):
        choose_qparams(np.array([1.0, -np.inf]))
    with pytest.raises(TypeError, match="real numbers"):
        choose_qparams(np.array([1 + 2j]))
    with pytest.raises(TypeError, match="real numbers"):
        choose_qparams(np.array([True, False]))
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 1\] for a 2-D tensor, got 2"):
        choose_qparams(np.ones((2, 2)), axis=2)
    with pytest.raises(ValueError, match="group_size needs an axis"):
        choose_qparams(np.ones((2, 2)), group_size=2)


def test_per_channel_equals_per_tensor_on_each_channel():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 7, 3)) * rng.uniform(0.01, 10, size=(1, 7, 1))
    for axis in (1, -2):
        qp = choose_qparams(w, bits=4, axis=axis)
        assert qp.scale.shape == (7,) and qp.granularity == "per-channel"
        q = quantize(w, qp)
        for c in range(7):
            qc = choose_qparams(w[:, c, :], bits=4)
            assert float(qc.scale) == qp.scale[c] and int(qc.zero_point) == qp.zero_point[c]
            np.testing.assert_array_equal(q[:, c, :], quantize(w[:, c, :], qc))


@pytest.mark.parametrize("group_size", [1, 3, 4, 10, 16])
def test_per_group_equals_per_tensor_on_each_group(group_size):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 10))
    qp = choose_qparams(w, bits=4, symmetric=True, axis=1, group_size=group_size)
    n_groups = math.ceil(10 / group_size)
    assert qp.scale.shape == (4, n_groups) and qp.granularity == "per-group"
    q = quantize(w, qp)
    for r in range(4):
        for g in range(n_groups):
            block = w[r, g * group_size:(g + 1) * group_size]
            qg = choose_qparams(block, bits=4, symmetric=True)
            assert float(qg.scale) == qp.scale[r, g]
            np.testing.assert_array_equal(q[r, g * group_size:(g + 1) * group_size],
                                          quantize(block, qg))


def test_per_group_along_axis_zero():
    w = np.arange(24, dtype=float).reshape(6, 4) - 11
    qp = choose_qparams(w, axis=0, group_size=4)
    assert qp.scale.shape == (2, 4)
    np.testing.assert_array_equal(qp.scale[0], (np.maximum(w[:4].max(0), 0)
                                                - np.minimum(w[:4].min(0), 0)) / 255)


def test_qparams_must_match_tensor_shape():
    qp = QParams(scale=[0.1, 0.2], zero_point=0, qmin=-128, qmax=127, axis=1)
    with pytest.raises(ValueError, match="hold 2 channels but the tensor has 3"):
        quantize(np.zeros((2, 3)), qp)
    with pytest.raises(ValueError, match="at least one axis"):
        quantize(0.5, qp)
    qg = QParams(scale=np.ones((2, 2)), zero_point=0, qmin=-8, qmax=7, axis=1, group_size=4)
    with pytest.raises(ValueError, match=r"need shape \(2, 3\)"):
        quantize(np.zeros((2, 9)), qg)
    with pytest.raises(TypeError, match="qparams must be a QParams"):
        quantize(np.zeros(3), (0.1, 0))


# ------------------------------------------------------------------------------------------------
# quantize / dequantize / fake_quantize
# ------------------------------------------------------------------------------------------------


def test_quantize_rounds_half_to_even():
    qp = QParams(scale=1.0, zero_point=0, qmin=-128, qmax=127)
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999999999999994, 2.5000000000000004])
    np.testing.assert_array_equal(quantize(x, qp), [0, 2, 2, 4, 0, -2, -2, 0, 3])
    qp = QParams(scale=0.5, zero_point=10, qmin=0, qmax=255)
    np.testing.assert_array_equal(quantize([0.25, 0.75, -0.25], qp), [10, 12, 10])


def test_quantize_saturates_instead_of_wrapping():
    qp = QParams(scale=1.0, zero_point=0, qmin=-128, qmax=127)
    q = quantize([127.4, 127.5, 128.0, 1e300, -128.5, -129.0, -1e300], qp)
    np.testing.assert_array_equal(q, [127, 127, 127, 127, -128, -128, -128])
    qp4 = QParams(scale=0.25, zero_point=3, qmin=0, qmax=15)
    np.testing.assert_array_equal(quantize([-10.0, 10.0, 0.0], qp4), [0, 15, 3])


@pytest.mark.parametrize(
    "bits, signed, dtype",
    [(8, True, np.int8), (8, False, np.uint8), (4, True, np.int8), (4, False, np.uint8),
     (2, True, np.int8), (9, True, np.int16), (12, False, np.uint16), (16, True, np.int16),
     (16, False, np.uint16)],
)
def test_quantize_output_dtype(bits, signed, dtype):
    qp = qparams_from_range(-1.0, 1.0, bits=bits, signed=signed)
    q = quantize(np.linspace(-2, 2, 11), qp)
    assert q.dtype == np.dtype(dtype)
    assert q.min() == qp.qmin and q.max() == qp.qmax


def test_quantize_rejects_nan_inf_and_non_numbers():
    qp = QParams(scale=0.1, zero_point=0, qmin=-128, qmax=127)
    with pytest.raises(ValueError, match=r"x must be finite, got 1 NaN/Inf value\(s\), the first "
                                         r"nan at flat index 2"):
        quantize([0.0, 1.0, np.nan], qp)
    with pytest.raises(ValueError, match="x must be finite"):
        quantize([np.inf], qp)
    with pytest.raises(TypeError, match="x must hold real numbers"):
        quantize(["a"], qp)


def test_quantize_keeps_shape_and_accepts_integers_and_empty():
    qp = QParams(scale=0.5, zero_point=1, qmin=0, qmax=255)
    assert quantize(np.zeros((0, 3)), qp).shape == (0, 3)
    assert quantize(2.0, qp).shape == ()
    np.testing.assert_array_equal(quantize(np.array([1, 2, 3], dtype=np.int32), qp), [3, 5, 7])


def test_dequantize():
    qp = QParams(scale=0.5 / 127, zero_point=0, qmin=-128, qmax=127)
    r = dequantize(np.array([-127, -51, 25, 76, 127], dtype=np.int8), qp)
    assert r.dtype == np.float32
    np.testing.assert_array_equal(r, (np.array([-127, -51, 25, 76, 127]) * (0.5 / 127))
                                  .astype(np.float32))
    assert r[-1] == np.float32(0.5)
    qa = QParams(scale=2.0, zero_point=128, qmin=0, qmax=255)
    np.testing.assert_array_equal(dequantize(np.array([0, 3, 128, 255], np.uint8), qa),
                                  [-256, -250, 0, 254])


def test_dequantize_rejects_bad_codes():
    qp = QParams(scale=0.1, zero_point=0, qmin=-8, qmax=7)
    with pytest.raises(ValueError, match=r"q must lie in \[qmin, qmax\] = \[-8, 7\], got 8"):
        dequantize(np.array([0, 8]), qp)
    with pytest.raises(TypeError, match="q must be an integer array"):
        dequantize(np.array([0.0, 1.0]), qp)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fake_quantize_keeps_float_dtype(dtype):
    x = np.linspace(-1, 1, 9).astype(dtype)
    qp = choose_qparams(x, bits=4, symmetric=True)
    y = fake_quantize(x, qp)
    assert y.dtype == dtype
    expected = (float(qp.scale) * quantize(x, qp).astype(np.int64)).astype(dtype)
    np.testing.assert_array_equal(y, expected)


def test_fake_quantize_is_idempotent():
    x = np.random.default_rng(4).normal(size=1000)
    for qp in (choose_qparams(x, bits=3), choose_qparams(x, bits=8, symmetric=True)):
        once = fake_quantize(x, qp)
        np.testing.assert_array_equal(fake_quantize(once, qp), once)


# ------------------------------------------------------------------------------------------------
# Properties (Hypothesis)
# ------------------------------------------------------------------------------------------------

_values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False,
                    allow_subnormal=False).map(lambda v: 0.0 if abs(v) < 1e-6 else v)
_tensors = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=12),
                      elements=_values)
_configs = st.tuples(st.integers(2, 16), st.booleans(), st.booleans(), st.booleans())


def _tolerance(x, scale):
    return 1e-9 * (np.max(np.abs(x)) + scale)


@settings(max_examples=200)
@given(x=_tensors, config=_configs)
def test_error_is_at_most_half_a_step_inside_the_range(x, config):
    bits, signed, symmetric, narrow = config
    qp = choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow)
    err = np.abs(fake_quantize(x, qp) - x)
    assert np.all(err <= float(qp.scale) / 2 + _tolerance(x, float(qp.scale)))


@settings(max_examples=100)
@given(x=_tensors, bits=st.integers(2, 8), symmetric=st.booleans())
def test_error_bound_per_channel_and_per_group(x, bits, symmetric):
    qc = choose_qparams(x, bits=bits, symmetric=symmetric, axis=-1)
    err = np.abs(fake_quantize(x, qc) - x)
    assert np.all(err <= qc.scale / 2 + _tolerance(x, qc.scale.max()))
    qg = choose_qparams(x, bits=bits, symmetric=symmetric, axis=-1, group_size=3)
    step = np.repeat(qg.scale, 3, axis=-1)[..., : x.shape[-1]]
    err = np.abs(fake_quantize(x, qg) - x)
    assert np.all(err <= step / 2 + _tolerance(x, qg.scale.max()))


@settings(max_examples=200)
@given(x=_tensors, config=_configs, factor=st.floats(1.0, 100.0))
def test_values_outside_the_range_saturate(x, config, factor):
    bits, signed, symmetric, narrow = config
    qp = choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow)
    lo, hi = (float(v) for v in qp.representable_range())
    span = hi - lo
    probe = np.concatenate([hi + factor * span * np.linspace(0.01, 1, 5),
                            lo - factor * span * np.linspace(0.01, 1, 5)])
    q = quantize(probe, qp)
    np.testing.assert_array_equal(q[:5], qp.qmax)
    np.testing.assert_array_equal(q[5:], qp.qmin)


@settings(max_examples=200)
@given(x=_tensors, config=_configs)
def test_quantize_is_monotonic(x, config):
    bits, signed, symmetric, narrow = config
    qp = choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow)
    probe = np.sort(np.concatenate([x.ravel(), np.linspace(x.min() * 1.5 - 1, x.max() * 1.5 + 1,
                                                           50)]))
    q = quantize(probe, qp).astype(np.int64)
    assert np.all(np.diff(q) >= 0)


@settings(max_examples=200)
@given(x=_tensors, config=_configs)
def test_zero_is_exactly_representable(x, config):
    bits, signed, symmetric, narrow = config
    qp = choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow)
    assert qp.qmin <= int(qp.zero_point) <= qp.qmax
    assert quantize(0.0, qp) == qp.zero_point
    assert dequantize(quantize(0.0, qp), qp) == 0.0
    assert fake_quantize(np.zeros(3), qp).tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=100)
@given(x=_tensors, bits=st.integers(2, 8))
def test_zero_is_exact_per_channel(x, bits):
    qp = choose_qparams(x, bits=bits, axis=0)
    np.testing.assert_array_equal(fake_quantize(np.zeros_like(x), qp), 0.0)


@settings(max_examples=200)
@given(data=st.data(), bits=st.sampled_from([2, 4]), signed=st.booleans(),
       n=st.integers(0, 40))
def test_packing_round_trips(data, bits, signed, n):
    lo, hi = qrange(bits, signed)
    q = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int64)
    packed = pack_int(q, bits, signed=signed)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    back = unpack_int(packed, bits, n, signed)
    assert back.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(back, q)


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_pack_int4_low_nibble_first():
    assert pack_int(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_int(np.array([-1, 7, 3]), 4).tolist() == [0x7F, 0x03]  # odd count: high nibble 0
    assert pack_int(np.array([[1, 2], [3, 4]]), 4).tolist() == [0x21, 0x43]  # C order
    assert pack_int(np.array([-8, 15]), 4).tolist() == [0xF8]
    assert unpack_int(np.array([0xF8], np.uint8), 4, 2, signed=True).tolist() == [-8, -1]
    assert unpack_int(np.array([0xF8], np.uint8), 4, 2, signed=False).tolist() == [8, 15]


def test_pack_int2_lowest_bits_first():
    assert pack_int(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_int(np.array([-2, -1, 1]), 2).tolist() == [0b011110]
    assert unpack_int(np.array([0b011110], np.uint8), 2, 3, signed=True).tolist() == [-2, -1, 1]


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r"must lie in \[-8, 15\] to be packed in 4 bits, got 16"):
        pack_int(np.array([0, 16]), 4)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int(np.array([8]), 4, signed=True)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int(np.array([-1]), 4, signed=False)
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        pack_int(np.array([1]), 8)
    with pytest.raises(TypeError, match="q must be an integer array"):
        pack_int(np.array([0.5]), 4)


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="3 values of 4 bits take 2 bytes, but packed has 1"):
        unpack_int(np.array([1], np.uint8), 4, 3, True)
    with pytest.raises(TypeError, match="packed must be a uint8"):
        unpack_int(np.array([1], np.int8), 4, 2, True)
    with pytest.raises(TypeError, match="signed"):
        unpack_int(np.array([1], np.uint8), 4, 2, None)
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        unpack_int(np.array([], np.uint8), 4, -1, True)


@pytest.mark.parametrize("name, bits, lo, hi", [("int4", 4, -8, 7), ("uint4", 4, 0, 15),
                                                ("int2", 2, -2, 1), ("uint2", 2, 0, 3)])
def test_packing_matches_onnx_tensor_layout(name, bits, lo, hi):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes provides ONNX's int4 dtypes")
    numpy_helper = pytest.importorskip("onnx.numpy_helper", reason="onnx is the layout oracle")
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 5, 8, 31, 64):
        q = rng.integers(lo, hi + 1, size=n)
        tensor = numpy_helper.from_array(q.astype(getattr(ml_dtypes, name)))
        assert pack_int(q, bits).tobytes() == tensor.raw_data
        back = numpy_helper.to_array(tensor).astype(np.int64)
        np.testing.assert_array_equal(unpack_int(pack_int(q, bits), bits, n, lo < 0), back)


# ------------------------------------------------------------------------------------------------
# Error measures, effective bits, codebooks
# ------------------------------------------------------------------------------------------------


def test_sqnr_db():
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + np.array([0.0, 0.5])) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr_db([1.0, -1.0], [0.9, -1.1]) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="all zeros"):
        sqnr_db([0.0, 0.0], [0.0, 0.1])
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db([1.0, 2.0], [1.0])


def test_sqnr_gains_about_six_db_per_bit():
    x = np.random.default_rng(6).uniform(-1, 1, size=200_000)
    sq = [sqnr_db(x, fake_quantize(x, choose_qparams(x, bits=b))) for b in (6, 7, 8, 9, 10)]
    steps = np.diff(sq)
    assert np.all(np.abs(steps - 20 * math.log10(2)) < 0.15)


def test_error_breakdown_adds_up():
    x = np.random.default_rng(7).standard_t(3, size=20_000)
    qp = qparams_from_range(-2.0, 2.0, bits=4, symmetric=True)
    eb = error_breakdown(x, qp)
    assert eb.clipping_mse > 0 and eb.rounding_mse > 0
    assert eb.rounding_mse + eb.clipping_mse == pytest.approx(eb.total_mse, rel=1e-12)
    assert eb.total_mse == pytest.approx(np.mean((x - fake_quantize(x, qp)) ** 2), rel=1e-12)
    lo, hi = qp.representable_range()
    assert eb.clipped_fraction == np.mean((x < lo) | (x > hi))
    assert eb.sqnr_db == pytest.approx(sqnr_db(x, fake_quantize(x, qp)))
    # Rounding error of a value is at most half a step; its mean square at most step^2 / 4.
    assert eb.rounding_mse <= float(qp.scale) ** 2 / 4
    # Abs-max covers the whole tensor: no clipping error (up to float64 rounding of 7 * scale).
    assert error_breakdown(x, choose_qparams(x, bits=4, symmetric=True)).clipping_mse < 1e-28
    # Min-max with a rounded zero point shifts the grid by up to half a step, so the extreme
    # value can be clipped -- but by no more than scale / 2.
    qp = choose_qparams(x, bits=4)
    eb = error_breakdown(x, qp)
    assert 0 < eb.clipped_fraction <= 2 / x.size
    assert eb.clipping_mse <= (float(qp.scale) / 2) ** 2 * eb.clipped_fraction


def test_clip_sweep_trades_rounding_for_clipping():
    x = np.random.default_rng(8).laplace(size=20_000)
    ratios = np.linspace(1.0, 0.05, 20)
    sweep = clip_sweep(x, ratios, bits=4)
    assert np.all(np.diff(sweep["rounding_mse"]) < 0)  # smaller step, less rounding error
    assert np.all(np.diff(sweep["clipping_mse"]) >= 0)  # narrower range, more clipping error
    best = int(np.argmin(sweep["total_mse"]))
    assert 0 < best < len(ratios) - 1  # the optimum is strictly inside
    np.testing.assert_allclose(sweep["scale"], ratios * np.abs(x).max() / 7)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        clip_sweep(x, [1.5])


def test_grid_occupancy_of_relu_output():
    x = np.maximum(np.random.default_rng(9).normal(size=10_000), 0)
    absmax = choose_qparams(x, bits=8, signed=True, symmetric=True)
    assert grid_occupancy(x, absmax) == 128 / 256  # codes 0..127 only
    minmax = choose_qparams(x, bits=8, signed=False)
    assert grid_occupancy(x, minmax) == 1.0
    per_channel = choose_qparams(x.reshape(100, 100), bits=8, axis=0, symmetric=True)
    occ = grid_occupancy(x.reshape(100, 100), per_channel)
    assert occ.shape == (100,) and np.all(occ == 0.5)


def test_effective_bits():
    assert effective_bits(8, (4096, 4096)) == 8 + 32 / 4096**2
    assert effective_bits(8, (64, 128), axis=0) == 8 + 64 * 32 / (64 * 128)
    for g in (32, 64, 128):
        assert effective_bits(4, (4096, 4096), axis=1, group_size=g) == 4 + 32 / g
        symmetric = effective_bits(4, (4096, 4096), axis=1, group_size=g, zero_point_bits=0)
        assert symmetric == 4 + 16 / g
    # A partial last group still stores a full (scale, zero point) pair.
    assert effective_bits(4, (1, 33), axis=1, group_size=32) == 4 + 2 * 32 / 33
    with pytest.raises(ValueError, match="group_size needs an axis"):
        effective_bits(4, (8,), group_size=2)


def test_codebook_lookup_table_of_seed_003():
    lut = np.array([-0.6, 0.0, 0.4, 1.1], dtype=np.float32)
    x = np.array([-1.0, -0.31, -0.29, 0.1, 0.2, 0.21, 0.8, 0.74, 5.0])
    idx = codebook_quantize(x, lut)
    np.testing.assert_array_equal(idx, [0, 0, 1, 1, 1, 2, 3, 2, 3])
    np.testing.assert_array_equal(codebook_dequantize(idx, lut), lut[idx])
    # Exactly halfway between -0.6 and 0.0 (in float64): the lower entry.
    assert codebook_quantize([-0.3], [-0.6, 0.0, 0.4, 1.1])[0] == 0
    with pytest.raises(ValueError, match="sorted"):
        codebook_quantize(x, lut[::-1])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\]"):
        codebook_dequantize(np.array([4]), lut)


def test_kmeans_codebook_beats_uniform_grid_and_is_seeded():
    w = np.random.default_rng(10).normal(size=20_000)
    for bits in (2, 3, 4):
        cb = kmeans_codebook(w, bits, seed=0)
        assert cb.shape == (2**bits,) and np.all(np.diff(cb) > 0)
        mse_cb = np.mean((codebook_dequantize(codebook_quantize(w, cb), cb) - w) ** 2)
        mse_uniform = np.mean((fake_quantize(w, choose_qparams(w, bits=bits)) - w) ** 2)
        assert mse_cb < mse_uniform
        np.testing.assert_array_equal(cb, kmeans_codebook(w, bits, seed=0))
    # Lloyd-Max quantizers of a unit Gaussian (Max 1960) have mean squared errors 0.1175,
    # 0.03454 and 0.009497 at 2, 3 and 4 bits; k-means on a sample gets within a few percent.
    g = np.random.default_rng(14).normal(size=50_000)
    for bits, mse_lloyd_max in ((2, 0.1175), (3, 0.03454), (4, 0.009497)):
        cb = kmeans_codebook(g, bits, seed=1)
        mse = np.mean((codebook_dequantize(codebook_quantize(g, cb), cb) - g) ** 2)
        assert mse == pytest.approx(mse_lloyd_max, rel=0.04)


def test_kmeans_codebook_with_few_distinct_values():
    cb = kmeans_codebook(np.array([1.0, 1.0, 2.0]), 2, seed=0)
    np.testing.assert_array_equal(cb, [1.0, 2.0, 2.0, 2.0])
    assert codebook_quantize([1.0, 2.0], cb).tolist() == [0, 1]


def test_codebook_effective_bits():
    assert codebook_effective_bits(2, 1024) == 2 + 4 * 32 / 1024
    assert codebook_effective_bits(4, 4096, entry_bits=16, n_codebooks=8) == 4 + 8 * 16 * 16 / 4096


def test_explorer_qparams():
    x = np.linspace(-1.0, 3.0, 101)
    qp = explorer_qparams(x, bits=4, clip=0.5, zero_point=5)
    assert (qp.qmin, qp.qmax) == (0, 15) and int(qp.zero_point) == 5
    assert float(qp.scale) == pytest.approx(0.5 * 4.0 / 15)
    with pytest.raises(ValueError, match="clip"):
        explorer_qparams(x, bits=4, clip=0.0, zero_point=5)
    with pytest.raises(ValueError, match="zero_point must lie"):
        explorer_qparams(x, bits=4, clip=1.0, zero_point=16)


def test_plot_quantization_draws_both_panels():
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib draws the figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.random.default_rng(15).gamma(2.0, size=2000) - 1.0
    qp = explorer_qparams(x, bits=3, clip=0.5, zero_point=2)
    ax_data, ax_err = plot_quantization(x, qp)
    assert "8 levels" in ax_data.get_title() and "zero point 2" in ax_data.get_title()
    assert f"SQNR {error_breakdown(x, qp).sqnr_db:.1f} dB" in ax_err.get_title()
    assert len(ax_data.lines) == 8 + 1  # one line per level, plus the axis at 0
    with pytest.raises(ValueError, match="per-tensor"):
        plot_quantization(x.reshape(2, -1), choose_qparams(x.reshape(2, -1), axis=0))
    plt.close("all")


def test_error_explorer_widget_follows_the_bit_width():
    pytest.importorskip("ipywidgets", reason="the explorer is an ipywidgets widget")
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib draws the figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.random.default_rng(16).normal(size=500)
    box = error_explorer(x, bits=4)
    bits_w, clip_w, zp_w = box.children[0].children
    assert (bits_w.value, zp_w.max) == (4, 15)
    assert zp_w.value == int(choose_qparams(x, bits=4, signed=False).zero_point)
    bits_w.value = 2
    assert zp_w.max == 3 and 0 <= zp_w.value <= 3
    bits_w.value = 8
    assert zp_w.max == 255
    clip_w.value = 0.5
    plt.close("all")


# ------------------------------------------------------------------------------------------------
# The ONNX operators: the specification's own examples (no ONNX Runtime needed)
# ------------------------------------------------------------------------------------------------


def test_onnx_spec_quantizelinear_examples():
    # From the ONNX operator documentation (QuantizeLinear examples).
    x = np.array([0, 2, 3, 1000, -254, -1000], dtype=np.float32)
    y = quantize_linear(x, np.float32(2), np.uint8(128))
    assert y.dtype == np.uint8 and y.tolist() == [128, 129, 130, 255, 1, 0]

    x = np.array([0.0, -128.0, 3.0, -3.0, 2.9, -2.9, 3.1, -3.1, 65536.0, -65534.0, 70000.0,
                  -70000.0], dtype=np.float32)
    y = quantize_linear(x, np.float32(2.0), np.uint16(32767))
    assert y.dtype == np.uint16
    assert y.tolist() == [32767, 32703, 32769, 32765, 32768, 32766, 32769, 32765, 65535, 0,
                          65535, 0]

    x = np.array([0.0, -514.0, 3.0, -3.0, 2.9, -2.9, 3.1, -3.1, 65022.0, -66046.0, 65023.0,
                  -66047.0, 65024.0, -66048.0, 70000.0, -70000.0], dtype=np.float32)
    y = quantize_linear(x, np.float32(2.0), np.int16(256))
    assert y.tolist() == [256, -1, 258, 254, 257, 255, 258, 254, 32767, -32767, 32767, -32768,
                          32767, -32768, 32767, -32768]

    x = np.array([[0.0, 2.5, 4.8, 8.6], [-30, -20, 6, 9], [12, 15, 16, 40]], dtype=np.float32)
    scale = np.array([2.0, 3.0, 4.0], dtype=np.float32)
    y = quantize_linear(x, scale, np.ones(3, np.int8), axis=0, output_dtype="int4")
    assert y.ravel().tolist() == [1, 2, 3, 5, -8, -6, 3, 4, 4, 5, 5, 7]
    y = quantize_linear(x, scale, np.ones(3, np.uint8), axis=0, output_dtype="uint4")
    assert y.ravel().tolist() == [1, 2, 3, 5, 0, 0, 3, 4, 4, 5, 5, 11]

    x = np.array([[[[-162, 10], [-100, 232], [-20, -50]],
                   [[-76, 0], [0, 252], [32, -44]],
                   [[245, -485], [-960, -270], [-375, -470]]]], dtype=np.float32)
    y = quantize_linear(x, np.array([2, 4, 5], np.float32), np.array([84, 24, 196], np.uint8))
    assert y.ravel().tolist() == [3, 89, 34, 200, 74, 59, 5, 24, 24, 87, 32, 13, 245, 99, 4,
                                  142, 121, 102]


def test_onnx_spec_dequantizelinear_examples():
    y = dequantize_linear(np.array([0, 3, 128, 255], np.uint8), np.float32(2), np.uint8(128))
    assert y.dtype == np.float32 and y.tolist() == [-256, -250, 0, 254]
    y = dequantize_linear(np.array([30000, 31000, 32768, 33000], np.uint16), np.float32(2),
                          np.uint16(32767))
    assert y.tolist() == [-5534.0, -3534.0, 2.0, 466.0]
    y = dequantize_linear(np.array([-300, -30, -1025, 1270], np.int16), np.float32(2),
                          np.int16(-1024))
    assert y.tolist() == [1448.0, 1988.0, -2.0, 4588.0]
    y = dequantize_linear(np.array([0, 1, 7, -4, -8], np.int8), np.float32(2), np.int8(1))
    assert y.tolist() == [-2, 0, 12, -10, -18]


def _onnx_spec_cases(monkeypatch, module_name):
    """The (node, inputs, outputs, name) tuples of onnx's own backend test cases for an op."""
    pytest.importorskip("onnx", reason="the onnx package holds the operator's test cases")
    pytest.importorskip("ml_dtypes", reason="onnx's int4 test data needs ml_dtypes")
    import importlib

    from onnx import numpy_helper

    module = importlib.import_module(f"onnx.backend.test.case.node.{module_name}")
    cases = []

    def collect(node, inputs, outputs, name, **_):
        def arr(v):
            return v if isinstance(v, (np.ndarray, np.generic)) else numpy_helper.to_array(v)
        cases.append((node, [arr(v) for v in inputs], [arr(v) for v in outputs], name))

    monkeypatch.setattr(module, "expect", collect)
    cls = next(v for k, v in vars(module).items() if k.lower() == module_name)
    for attr in dir(cls):
        if attr.startswith("export"):
            getattr(cls, attr)()
    return cases


_INT_NAMES = {"uint8", "int8", "uint16", "int16", "uint4", "int4", "uint2", "int2"}


def _container(a):
    """ml_dtypes int4/uint4/int2/uint2 arrays -> (int8/uint8 array, ONNX type name)."""
    name = np.dtype(a.dtype).name
    if name in ("int4", "int2"):
        return a.astype(np.int8), name
    if name in ("uint4", "uint2"):
        return a.astype(np.uint8), name
    return np.asarray(a), name


def test_onnx_backend_cases_quantizelinear(monkeypatch):
    cases = _onnx_spec_cases(monkeypatch, "quantizelinear")
    checked = []
    for node, inputs, outputs, name in cases:
        expected, out_name = _container(outputs[0])
        if out_name not in _INT_NAMES:
            continue  # float8 / float4 outputs are outside this module
        attrs = {a.name: a.i for a in node.attribute}
        args = [inputs[0], inputs[1]] + ([_container(inputs[2])[0]] if len(inputs) > 2 else [])
        y = quantize_linear(*args, axis=attrs.get("axis", 1),
                            block_size=attrs.get("block_size", 0), output_dtype=out_name)
        assert y.dtype == expected.dtype, name
        np.testing.assert_array_equal(y, expected, err_msg=name)
        checked.append(name)
    assert len(checked) >= 10, checked


def test_onnx_backend_cases_dequantizelinear(monkeypatch):
    cases = _onnx_spec_cases(monkeypatch, "dequantizelinear")
    checked = []
    for node, inputs, outputs, name in cases:
        x, x_name = _container(inputs[0])
        if x_name not in _INT_NAMES or inputs[1].dtype != np.float32:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        args = [x, inputs[1]] + ([_container(inputs[2])[0]] if len(inputs) > 2 else [])
        y = dequantize_linear(*args, axis=attrs.get("axis", 1),
                              block_size=attrs.get("block_size", 0))
        assert y.dtype == np.float32, name
        np.testing.assert_array_equal(y, outputs[0], err_msg=name)
        checked.append(name)
    assert len(checked) >= 9, checked


# ------------------------------------------------------------------------------------------------
# The ONNX operators: semantics and bad input
# ------------------------------------------------------------------------------------------------


def _near_ties(rng, n_scales=400):
    """(x, scale) pairs, one per scale, where x / scale (float32 division) and x * (1 / scale)
    (multiplication by the float32 reciprocal) round to different integers."""
    xs, ss = [], []
    while len(xs) < n_scales:
        s = np.float32(rng.uniform(1e-3, 10.0))
        k = np.arange(-300, 300, dtype=np.float32)
        x = ((k + np.float32(0.5)) * s).astype(np.float32)
        div = np.rint(x / s)
        mul = np.rint(x * (np.float32(1) / s))
        hit = np.flatnonzero(div != mul)
        if hit.size:
            xs.append(x[hit[0]])
            ss.append(s)
    return np.array(xs, np.float32), np.array(ss, np.float32)


def test_quantize_linear_divides_not_multiplies_by_reciprocal():
    x, s = _near_ties(np.random.default_rng(11), 50)
    y = quantize_linear(x, s, np.zeros(s.size, np.int16), axis=0)
    np.testing.assert_array_equal(y, np.rint(x / s))
    assert np.all(y != np.rint(x * (np.float32(1) / s)))


def test_quantize_linear_defaults_and_dtypes():
    x = np.array([-1.0, 0.4, 0.6, 300.0], np.float32)
    y = quantize_linear(x, np.float32(1.0))
    assert y.dtype == np.uint8 and y.tolist() == [0, 0, 1, 255]  # no zero point: uint8, z = 0
    y = quantize_linear(x, np.float32(1.0), output_dtype=np.int8)
    assert y.dtype == np.int8 and y.tolist() == [-1, 0, 1, 127]
    y = quantize_linear(x, np.float32(1.0), output_dtype=3)  # TensorProto.INT8
    assert y.dtype == np.int8
    y = quantize_linear(x, np.array([1.0], np.float32), np.array([0], np.int8))
    assert y.dtype == np.int8  # a 1-element 1-D scale is per-tensor
    y = quantize_linear(np.array([np.nan, np.inf, -np.inf, -0.0], np.float32), np.float32(0.5),
                        np.int8(3))
    assert y.tolist() == [-128, 127, -128, 3]


def test_quantize_linear_negative_axis_matches_positive():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32) * 10
    s = rng.uniform(0.05, 1.0, size=3).astype(np.float32)
    z = rng.integers(-20, 20, size=3).astype(np.int8)
    np.testing.assert_array_equal(quantize_linear(x, s, z, axis=-2),
                                  quantize_linear(x, s, z, axis=1))
    expected = np.clip(np.rint(x / s[None, :, None]) + z[None, :, None], -128, 127)
    np.testing.assert_array_equal(quantize_linear(x, s, z, axis=1), expected)


def test_quantize_linear_agrees_with_quantize_on_float32_grids():
    # For a power-of-two scale both divisions are exact, so the two models agree.
    x = np.random.default_rng(13).normal(size=1000).astype(np.float32) * 3
    qp = QParams(scale=2.0**-5, zero_point=-3, qmin=-128, qmax=127)
    np.testing.assert_array_equal(quantize_linear(x, np.float32(2.0**-5), np.int8(-3)),
                                  quantize(x, qp))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: quantize_linear([1.0], np.float32(1)), TypeError, "x must be a float32"),
        (lambda: quantize_linear(np.ones(2), np.float32(1)), TypeError, "x must be a float32"),
        (lambda: quantize_linear(np.ones(2, np.float32), 1.0), TypeError, "y_scale must be"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float64(1)), TypeError, "float32"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(0)), ValueError,
         "y_scale must be finite and > 0"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(np.nan)), ValueError,
         "y_scale must be finite"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(1), np.int32(0)), TypeError,
         "y_zero_point must be uint8, int8, uint16 or int16"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(1), np.uint8(0),
                                 output_dtype=np.int8), ValueError, "does not match"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(1), output_dtype="int32"),
         ValueError, "output_dtype must be one of"),
        (lambda: quantize_linear(np.ones((2, 3), np.float32), np.ones(2, np.float32)),
         ValueError, "per-axis y_scale has 2 entries but x has 3 along axis 1"),
        (lambda: quantize_linear(np.ones((2, 3), np.float32), np.ones(2, np.float32), axis=2),
         ValueError, r"axis must be in \[-2, 1\] for a 2-D tensor, got 2"),
        (lambda: quantize_linear(np.ones((2, 3), np.float32), np.ones(2, np.float32), axis=-3),
         ValueError, r"axis must be in \[-2, 1\] for a 2-D tensor, got -3"),
        (lambda: quantize_linear(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)),
         ValueError, "scalar .per-tensor. or 1-D"),
        (lambda: quantize_linear(np.ones((2, 4), np.float32), np.ones((2, 3), np.float32),
                                 block_size=2), ValueError, r"must have shape \(2, 2\)"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(1), np.int8(9),
                                 output_dtype="int4"), ValueError, r"int4 range \[-8, 7\]"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.float32(1), np.int16(9),
                                 output_dtype="int4"), TypeError, "must be int8 holding int4"),
        (lambda: quantize_linear(np.ones(2, np.float32), np.ones(2, np.float32),
                                 np.zeros(3, np.uint8), axis=0), ValueError, "shape of y_scale"),
    ],
)
def test_quantize_linear_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: dequantize_linear(np.ones(2, np.float32), np.float32(1)), TypeError,
         "x must be a numpy.ndarray of dtype"),
        (lambda: dequantize_linear(np.ones(2, np.uint8), np.float32(-1)), ValueError,
         "x_scale must be finite and > 0"),
        (lambda: dequantize_linear(np.ones(2, np.uint8), np.float32(1), np.int8(0)), TypeError,
         "x_zero_point must have x's dtype uint8"),
        (lambda: dequantize_linear(np.ones(2, np.int32), np.float32(1), np.int32(1)), ValueError,
         "int32 x_zero_point must be 0"),
        (lambda: dequantize_linear(np.ones((2, 2), np.uint8), np.ones(3, np.float32)), ValueError,
         "per-axis x_scale has 3 entries"),
    ],
)
def test_dequantize_linear_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------------
# ONNX Runtime oracle
# ------------------------------------------------------------------------------------------------

_NP_TO_ONNX = {"uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "float32": 1}


def _session(op, feeds, y_type, attrs, *, zp_initializer=None, cast_to=None):
    """An ONNX Runtime CPU session for one QuantizeLinear/DequantizeLinear node (opset 21).

    ``feeds`` maps the graph inputs ("x", "s" and optionally "z") to the arrays that will be fed;
    a sub-byte zero point goes in as ``zp_initializer`` and the output is then Cast to a byte
    type (NumPy has no int4 for ONNX Runtime to return).
    """
    onnx = pytest.importorskip("onnx", reason="onnx builds the oracle models")
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the oracle")
    from onnx import helper

    inputs = [helper.make_tensor_value_info(name, _NP_TO_ONNX[np.asarray(a).dtype.name],
                                            list(np.shape(a)))
              for name, a in feeds.items()]
    names = list(feeds)
    initializers = []
    if zp_initializer is not None:
        initializers.append(zp_initializer)
        names.append(zp_initializer.name)
    nodes = [helper.make_node(op, names, ["y"], **attrs)]
    out_name, out_type = "y", y_type
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", ["y"], ["y_cast"], to=cast_to))
        out_name, out_type = "y_cast", cast_to
    x_shape = list(np.shape(feeds["x"]))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(out_name, out_type, x_shape)],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_run(op, x, s, z, y_type, attrs):
    feeds = {"x": x, "s": np.asarray(s)}
    if z is not None:
        feeds["z"] = np.asarray(z)
    return _session(op, feeds, y_type, attrs).run(None, feeds)[0]


def _ort_quantize(x, s, z=None, *, axis=1, block_size=0, out="uint8"):
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    if z is None:
        attrs["output_dtype"] = _NP_TO_ONNX[out]
    y_type = _NP_TO_ONNX[out if z is None else np.asarray(z).dtype.name]
    return _ort_run("QuantizeLinear", x, s, z, y_type, attrs)


def _ort_dequantize(x, s, z=None, *, axis=1, block_size=0):
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    return _ort_run("DequantizeLinear", x, s, z, _NP_TO_ONNX["float32"], attrs)


def _random_inputs(rng, n, scale):
    """Values spread over and beyond the grid, plus exact ties and NaN/Inf."""
    x = rng.normal(size=n).astype(np.float32) * np.float32(scale * 200)
    ties = ((rng.integers(-300, 300, size=n // 4) + np.float32(0.5)) * scale).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, scale / 2, -scale / 2],
                       np.float32)
    return np.concatenate([x, ties, special]).astype(np.float32)


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8, np.uint16, np.int16])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_quantize_linear_matches_onnxruntime_per_tensor(zp_dtype, n):
    rng = np.random.default_rng(20 + n)
    info = np.iinfo(zp_dtype)
    for _ in range(3):
        s = np.float32(rng.uniform(1e-3, 5.0))
        z = np.array(rng.integers(max(info.min, -1000), min(info.max, 1000) + 1), zp_dtype)
        x = _random_inputs(rng, n, s)
        ours = quantize_linear(x, s, z)
        theirs = _ort_quantize(x, np.array(s), z)
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_quantize_linear_matches_onnxruntime_on_reciprocal_traps():
    x, s = _near_ties(np.random.default_rng(21))
    for zp_dtype in (np.uint8, np.int8):
        z = np.full(s.size, 100 if zp_dtype == np.uint8 else 0, zp_dtype)
        xs = x.reshape(-1, 1).repeat(5, axis=1)  # several columns: the vector kernel path too
        np.testing.assert_array_equal(quantize_linear(xs, s, z, axis=0),
                                      _ort_quantize(xs, s, z, axis=0))
    # Per-tensor: one scale, many near-ties.
    s0 = s[0]
    k = np.arange(-20000, 20000, dtype=np.float32)
    xt = ((k + np.float32(0.5)) * s0).astype(np.float32)
    traps = xt[np.rint(xt / s0) != np.rint(xt * (np.float32(1) / s0))]
    assert traps.size > 0
    np.testing.assert_array_equal(quantize_linear(traps, np.array(s0), np.int16(0)),
                                  _ort_quantize(traps, np.array(s0), np.int16(0)))


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8, np.int16])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_quantize_linear_matches_onnxruntime_per_axis(zp_dtype, axis):
    rng = np.random.default_rng(30 + axis)
    x = rng.normal(size=(3, 4, 33)).astype(np.float32) * 40
    x.ravel()[::17] = np.nan
    c = x.shape[axis]
    s = rng.uniform(0.05, 2.0, size=c).astype(np.float32)
    info = np.iinfo(zp_dtype)
    z = rng.integers(max(info.min, -50), min(info.max, 50) + 1, size=c).astype(zp_dtype)
    np.testing.assert_array_equal(quantize_linear(x, s, z, axis=axis),
                                  _ort_quantize(x, s, z, axis=axis))


@pytest.mark.parametrize("out", ["uint8", "int8"])
def test_quantize_linear_matches_onnxruntime_without_zero_point(out):
    rng = np.random.default_rng(40)
    x = _random_inputs(rng, 300, 0.25)
    np.testing.assert_array_equal(quantize_linear(x, np.float32(0.25), output_dtype=out),
                                  _ort_quantize(x, np.array(np.float32(0.25)), out=out))


def test_quantize_linear_matches_onnxruntime_blocked():
    rng = np.random.default_rng(41)
    x = rng.normal(size=(4, 10)).astype(np.float32) * 30
    s = rng.uniform(0.1, 1.0, size=(4, 3)).astype(np.float32)
    z = rng.integers(0, 256, size=(4, 3)).astype(np.uint8)
    np.testing.assert_array_equal(quantize_linear(x, s, z, axis=1, block_size=4),
                                  _ort_quantize(x, s, z, axis=1, block_size=4))


@pytest.mark.parametrize("name, onnx_type, cast_to, lo, hi", [("int4", 22, 3, -8, 7),
                                                              ("uint4", 21, 2, 0, 15)])
def test_quantize_linear_matches_onnxruntime_int4(name, onnx_type, cast_to, lo, hi):
    pytest.importorskip("onnx", reason="onnx builds the oracle models")
    from onnx import helper

    rng = np.random.default_rng(42)
    x = rng.normal(size=(3, 50)).astype(np.float32) * 10
    s = rng.uniform(0.3, 2.0, size=3).astype(np.float32)
    z = rng.integers(lo, hi + 1, size=3)
    zt = helper.make_tensor("z", onnx_type, [3], z.tolist())
    sess = _session("QuantizeLinear", {"x": x, "s": s}, onnx_type, {"axis": 0},
                    zp_initializer=zt, cast_to=cast_to)
    theirs = sess.run(None, {"x": x, "s": s})[0]
    ours = quantize_linear(x, s, z.astype(np.int8 if lo < 0 else np.uint8), axis=0,
                           output_dtype=name)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_dequantize_linear_matches_onnxruntime(dtype):
    rng = np.random.default_rng(50)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, size=(3, 5, 7)).astype(dtype)
    s = np.float32(rng.uniform(1e-4, 3.0))
    z = np.array(rng.integers(info.min, info.max + 1), dtype)
    np.testing.assert_array_equal(dequantize_linear(x, s, z), _ort_dequantize(x, np.array(s), z))
    np.testing.assert_array_equal(dequantize_linear(x, s), _ort_dequantize(x, np.array(s)))
    for axis in (0, 2, -1):
        c = x.shape[axis]
        sc = rng.uniform(1e-3, 2.0, size=c).astype(np.float32)
        zc = rng.integers(info.min, info.max + 1, size=c).astype(dtype)
        np.testing.assert_array_equal(dequantize_linear(x, sc, zc, axis=axis),
                                      _ort_dequantize(x, sc, zc, axis=axis))
    sb = rng.uniform(1e-3, 2.0, size=(3, 2, 7)).astype(np.float32)
    zb = rng.integers(info.min, info.max + 1, size=(3, 2, 7)).astype(dtype)
    np.testing.assert_array_equal(dequantize_linear(x, sb, zb, axis=1, block_size=3),
                                  _ort_dequantize(x, sb, zb, axis=1, block_size=3))


def test_dequantize_linear_int32_matches_onnxruntime():
    rng = np.random.default_rng(51)
    x = np.concatenate([rng.integers(-(2**31), 2**31, size=500),
                        [2**24 + 1, -(2**24) - 1, 2**31 - 1, -(2**31)]]).astype(np.int32)
    s = np.array(np.float32(rng.uniform(1e-6, 1e-3)))
    np.testing.assert_array_equal(dequantize_linear(x, s), _ort_dequantize(x, s))


def test_round_trip_through_onnxruntime_and_qcourse():
    """quantize_linear -> ORT DequantizeLinear == ORT QuantizeLinear -> dequantize_linear."""
    rng = np.random.default_rng(52)
    x = rng.normal(size=400).astype(np.float32)
    s, z = np.float32(0.02), np.int8(-5)
    a = _ort_dequantize(quantize_linear(x, s, z), np.array(s), np.array(z))
    b = dequantize_linear(_ort_quantize(x, np.array(s), np.array(z)), s, z)
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - x)[np.abs(x) < 2.4]) <= s / 2 * (1 + 1e-6)


def test_onnx_reference_implementation_agrees():
    """The ONNX reference evaluator (pure NumPy, in the onnx package) as a second oracle."""
    pytest.importorskip("onnx", reason="onnx provides the reference evaluator")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(53)
    x = rng.normal(size=(4, 6)).astype(np.float32) * 20
    s = rng.uniform(0.1, 1.0, size=6).astype(np.float32)
    z = rng.integers(-10, 10, size=6).astype(np.int8)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=-1)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.INT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ref = ReferenceEvaluator(model).run(None, {"x": x, "s": s, "z": z})[0]
    np.testing.assert_array_equal(quantize_linear(x, s, z, axis=-1), ref)


# --- the weight quantizer (ptq, mixed_precision) ----------------------------------------------


@settings(max_examples=60)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), bits=st.integers(2, 8),
       per_channel=st.booleans(), symmetric=st.booleans(), seed=st.integers(0, 2**32 - 1),
       spread=st.floats(-4, 4))
def test_quantize_weight_error_is_half_a_step(rows, cols, bits, per_channel, symmetric, seed,
                                              spread):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-1, 1, (rows, 1)) * spread))
    w = w.astype(np.float32)
    q, qp = quantize_weight(w, bits=bits, per_channel=per_channel, symmetric=symmetric)
    assert q.dtype == np.int8
    assert qp.granularity == ("per-channel" if per_channel else "per-tensor")
    half = 2 ** (bits - 1)
    if symmetric:
        assert (qp.qmin, qp.qmax) == (-(half - 1), half - 1)
        assert np.all(qp.zero_point == 0)
    else:
        assert (qp.qmin, qp.qmax) == (-half, half - 1)
    assert np.all((q >= qp.qmin) & (q <= qp.qmax))
    # the scale is a float32 number
    np.testing.assert_array_equal(qp.scale, qp.scale.astype(np.float32).astype(np.float64))
    scale = np.broadcast_to(qp.scale, (rows,))[:, None]
    zp = np.broadcast_to(qp.zero_point, (rows,))[:, None]
    err = np.abs(scale * (q.astype(np.float64) - zp) - w.astype(np.float64))
    assert np.all(err <= scale * (0.5 + 1e-5))


def test_quantize_weight_uses_the_whole_grid_per_row():
    w = np.array([[0.01, -0.02, 0.005], [3.0, -1.0, 2.0]], np.float32)
    q_pc, qp_pc = quantize_weight(w, bits=4, per_channel=True)
    q_pt, _ = quantize_weight(w, bits=4, per_channel=False)
    assert np.abs(q_pc).max(axis=1).tolist() == [7, 7]     # each row reaches its top code
    assert np.all(q_pt[0] == 0)                            # per tensor, the small row vanishes
    np.testing.assert_allclose(qp_pc.scale, np.abs(w).max(axis=1) / 7, rtol=1e-7)


@pytest.mark.parametrize("weight, kwargs, error", [
    (np.ones((2, 3), np.int32), {}, TypeError),
    (np.ones(3, np.float32), {}, ValueError),
    (np.zeros((0, 3), np.float32), {}, ValueError),
    (np.array([[1.0, np.nan]], np.float32), {}, ValueError),
    (np.ones((2, 2), np.float32), {"bits": 1}, ValueError),
    (np.ones((2, 2), np.float32), {"bits": 17}, ValueError),   # up to 16 bits (int16 codes)
    (np.ones((2, 2), np.float32), {"bits": 4.0}, TypeError),
    (np.ones((2, 2), np.float32), {"per_channel": 1}, TypeError),
    (np.ones((2, 2), np.float32), {"symmetric": "yes"}, TypeError),
])
def test_quantize_weight_bad_input(weight, kwargs, error):
    with pytest.raises(error):
        quantize_weight(weight, **kwargs)


def test_quantize_weight_takes_up_to_16_bits_and_with_float32_scale_keeps_the_rest():
    w = np.random.default_rng(3).standard_normal((4, 5))
    q, qp = quantize_weight(w, bits=12)
    assert q.dtype == np.int16 and (qp.qmin, qp.qmax) == (-2047, 2047)
    raw = choose_qparams(w, bits=12, symmetric=True, narrow_range=True, axis=0)
    assert qp == raw.with_float32_scale() and qp != raw
    grouped = choose_qparams(w, bits=4, axis=1, group_size=2)
    g32 = grouped.with_float32_scale()
    assert (g32.axis, g32.group_size, g32.qmin, g32.qmax) == (1, 2, -8, 7)
    np.testing.assert_array_equal(g32.zero_point, grouped.zero_point)
    np.testing.assert_array_equal(g32.scale, grouped.scale.astype(np.float32))
