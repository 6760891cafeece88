"""Tests for qcourse.fixed_point: Qm.n arithmetic, MAC widths and TFLite's integer rescaling.

No TFLite package is installable here, so the outside system is represented by an oracle written
in this file: a scalar, pure-Python transcription of the C++ functions TFLite runs, with exact
Python ints standing in for C's int32_t/int64_t.  The library's implementation is vectorized
NumPy and deliberately built differently (closed-form roundings in int64 instead of nudges,
truncating divisions and masks), so agreement between the two is evidence, not a tautology.
The oracle is itself pinned to TFLite's own unit-test vectors (quantization_util_test.cc).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcourse.fixed_point import (
    ROUNDING_MODES,
    accumulator_bits,
    fixed_add,
    fixed_mul,
    fixed_range,
    from_fixed,
    max_k,
    min_accumulator_bits,
    multiplier_to_real,
    multiply_by_quantized_multiplier,
    power_of_two_exponent,
    product_range,
    quantize_multiplier,
    round_shift,
    rounding_divide_by_pot,
    srdhm,
    to_fixed,
)

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
BUILDS = ("double", "single")

# ================================================================================================
# The oracle.  A line-by-line transcription of:
#   * tensorflow/lite/kernels/internal/quantization_util.cc :: QuantizeMultiplier
#     (the std::frexp path, i.e. without TFLITE_EMULATE_FLOAT), whose TfLiteRound is std::round
#     (tensorflow/lite/kernels/internal/cppmath.h);
#   * gemmlowp fixedpoint/fixedpoint.h :: SaturatingRoundingDoublingHighMul<std::int32_t> and
#     RoundingDivideByPOT<std::int32_t> (with the scalar BitAnd, ShiftRight, MaskIfLessThan,
#     MaskIfGreaterThan and Add of fixedpoint.h);
#   * tensorflow/lite/kernels/internal/common.cc ::
#     MultiplyByQuantizedMultiplier(int32_t x, int32_t quantized_multiplier, int shift),
#     both the `#if TFLITE_SINGLE_ROUNDING` branch and the `#else` (double-rounding) branch.
# C semantics are emulated explicitly: `/` on integers truncates toward zero, `>>` on a signed
# value is an arithmetic shift (Python's >> on ints), `static_cast<int32_t>` of an int64 keeps
# the low 32 bits, and signed overflow (undefined behaviour) or a failed TFLITE_CHECK/DCHECK
# raises CFailure instead of producing a number.
# ================================================================================================


class CFailure(Exception):
    """Undefined behaviour (signed overflow) or a failed TFLITE_CHECK / TFLITE_DCHECK in C++."""


def c_check(condition: bool, what: str) -> None:
    if not condition:
        raise CFailure(what)


def c_int32(value: int) -> int:
    """An int32_t expression: overflow is undefined behaviour."""
    c_check(INT32_MIN <= value <= INT32_MAX, f"int32 overflow: {value}")
    return value


def c_int64(value: int) -> int:
    c_check(INT64_MIN <= value <= INT64_MAX, f"int64 overflow: {value}")
    return value


def c_static_cast_int32(value: int) -> int:
    """static_cast<int32_t>(int64_t): keep the low 32 bits (two's complement)."""
    return (value + 2**31) % 2**32 - 2**31


def c_div(a: int, b: int) -> int:
    """C++ integer division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def std_round(v: float) -> float:
    """std::round: to nearest, halfway cases away from zero (exact, via Fraction)."""
    f = Fraction(v)
    n = math.floor(abs(f) + Fraction(1, 2))
    return float(n if f >= 0 else -n)


def oracle_quantize_multiplier(double_multiplier: float, single_rounding: bool) -> tuple[int, int]:
    if double_multiplier == 0.0:
        return 0, 0
    q, shift = math.frexp(double_multiplier)  # std::frexp
    # static_cast<int64_t>(TfLiteRound(q * (1LL << 31)))
    q_fixed = int(std_round(q * float(1 << 31)))
    c_check(q_fixed <= (1 << 31), "TFLITE_CHECK(q_fixed <= (1LL << 31))")
    if q_fixed == (1 << 31):
        q_fixed = c_div(q_fixed, 2)
        shift += 1
    c_check(q_fixed <= INT32_MAX, "TFLITE_CHECK_LE(q_fixed, int32 max)")
    if shift < -31:
        shift = 0
        q_fixed = 0
    if single_rounding and shift > 30:
        shift = 30
        q_fixed = (1 << 31) - 1
    return q_fixed, shift


def oracle_srdhm(a: int, b: int) -> int:
    overflow = a == b and a == INT32_MIN
    a_64 = a
    b_64 = b
    ab_64 = c_int64(a_64 * b_64)
    nudge = (1 << 30) if ab_64 >= 0 else (1 - (1 << 30))
    ab_x2_high32 = c_static_cast_int32(c_div(c_int64(ab_64 + nudge), 1 << 31))
    return INT32_MAX if overflow else ab_x2_high32


def _mask_if_less_than(a: int, b: int) -> int:
    return -1 if a < b else 0  # all bits set, or none


def _mask_if_greater_than(a: int, b: int) -> int:
    return -1 if a > b else 0


def oracle_rdbpot(x: int, exponent: int) -> int:
    c_check(0 <= exponent <= 31, "assert(0 <= exponent <= 31)")
    mask = c_static_cast_int32((1 << exponent) - 1)  # Dup<int32_t>((1ll << exponent) - 1)
    zero = 0
    one = 1
    remainder = x & mask  # BitAnd
    threshold = c_int32((mask >> 1) + (_mask_if_less_than(x, zero) & one))
    return c_int32((x >> exponent) + (_mask_if_greater_than(remainder, threshold) & one))


def oracle_mbqm_double(x: int, quantized_multiplier: int, shift: int) -> int:
    left_shift = shift if shift > 0 else 0
    right_shift = 0 if shift > 0 else -shift
    c_check(left_shift <= 30, "1 << left_shift overflows int")
    return oracle_rdbpot(
        oracle_srdhm(c_int32(x * c_int32(1 << left_shift)), quantized_multiplier), right_shift
    )


def oracle_mbqm_single(x: int, quantized_multiplier: int, shift: int) -> int:
    c_check(quantized_multiplier >= 0, "TFLITE_DCHECK(quantized_multiplier >= 0)")
    c_check(-31 <= shift <= 30, "TFLITE_DCHECK(shift >= -31 && shift <= 30)")
    total_shift = 31 - shift
    round_ = c_int64(1 << (total_shift - 1))
    result = c_int64(c_int64(x * quantized_multiplier) + round_)
    result = result >> total_shift
    c_check(INT32_MIN <= result <= INT32_MAX, "TFLITE_DCHECK(result fits int32_t)")
    return result


def oracle_mbqm(x: int, quantized_multiplier: int, shift: int, build: str) -> int:
    if build == "double":
        return oracle_mbqm_double(x, quantized_multiplier, shift)
    return oracle_mbqm_single(x, quantized_multiplier, shift)


def oracle_map(func, *arrays) -> np.ndarray:
    """Apply a scalar oracle elementwise: Python ints in, an object array out (None on CFailure)."""

    def safe(*args):
        try:
            return func(*(int(a) for a in args))
        except CFailure:
            return None

    lists = np.broadcast_arrays(*[np.asarray(a) for a in arrays])
    out = [safe(*args) for args in zip(*(a.ravel().tolist() for a in lists), strict=True)]
    result = np.empty(len(out), dtype=object)
    result[:] = out
    return result.reshape(lists[0].shape)


def as_int64(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# --- the oracle against hand-worked values and against TFLite's own unit tests -------------------


def test_oracle_matches_hand_worked_values():
    # srdhm: (a * b) / 2**31 rounded; 0.5 * 0.5 = 0.25 in Q0.31
    assert oracle_srdhm(1 << 30, 1 << 30) == 1 << 29
    assert oracle_srdhm(INT32_MIN, INT32_MIN) == INT32_MAX
    assert oracle_srdhm(3, 1 << 30) == 2  # 1.5 -> 2
    assert oracle_srdhm(-3, 1 << 30) == -1  # -1.5 -> -1 (the nudge and truncation: ties up)
    assert oracle_srdhm(-5, 1 << 30) == -2  # -2.5 -> -2
    # rdbpot: ties away from zero
    assert [oracle_rdbpot(v, 1) for v in (-5, -4, -3, 3, 4, 5)] == [-3, -2, -2, 2, 2, 3]
    assert oracle_rdbpot(INT32_MIN, 31) == -1
    assert oracle_rdbpot(INT32_MAX, 31) == 1
    assert oracle_rdbpot(7, 0) == 7
    assert oracle_mbqm_single(-2, 1 << 30, -1) == 0  # -0.5 -> 0
    assert oracle_mbqm_double(-2, 1 << 30, -1) == -1  # -0.5 -> -1
    with pytest.raises(CFailure):
        oracle_mbqm_double(1 << 20, 1 << 30, 12)  # x << 12 overflows int32
    with pytest.raises(CFailure):
        oracle_mbqm_single(INT32_MAX, INT32_MAX, 30)


# TFLite's own expectations, from tensorflow/lite/kernels/internal/quantization_util_test.cc
# (tests QuantizeMultiplierSmallerThanOneExp, QuantizeMultiplierGreaterThanOne,
# QuantizeMultiplierUnderflow; both builds agree on them).
TFLITE_QUANTIZE_MULTIPLIER_VECTORS = [
    (0.25, 1073741824, -1),
    (0.50 - 5e-9, 2147483627, -1),
    (0.50 - 1e-10, 1073741824, 0),
    (0.50, 1073741824, 0),
    (0.75, 1610612736, 0),
    (1 - 1e-9, 2147483646, 0),
    (1 + 1e-11, 1073741824, 1),
    (1.25, 1342177280, 1),
    (1.50, 1610612736, 1),
    (1.75, 1879048192, 1),
    (2 - 1e-9, 2147483647, 1),
    (2 - 1e-11, 1073741824, 2),
    (2.0, 1073741824, 2),
    (math.ldexp(1.0, -31), 1073741824, -30),
    (math.ldexp(1.0, -32), 1073741824, -31),
    (math.ldexp(float(np.float32(0.99)), -32), 0, 0),
    (math.ldexp(1.0, -33), 0, 0),
]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("real, multiplier, shift", TFLITE_QUANTIZE_MULTIPLIER_VECTORS)
def test_quantize_multiplier_reproduces_tflite_unit_tests(real, multiplier, shift, build):
    assert oracle_quantize_multiplier(real, build == "single") == (multiplier, shift)
    assert quantize_multiplier(real, rounding=build) == (multiplier, shift)


def test_quantize_multiplier_above_two_to_the_thirty_per_build():
    # PreprocessSoftmaxScaling in quantization_util_test.cc: the single-rounding build expects
    # (2147483646, 30) for 2**30 - 1 and (1073741824, 30) for 2**29; the double-rounding build
    # expects (2147483647, 31) for 2**31 - 1 and (1073741824, 31) for 2**30.
    assert quantize_multiplier(2.0**30 - 1, rounding="single") == (2147483646, 30)
    assert quantize_multiplier(2.0**29, rounding="single") == (1073741824, 30)
    assert quantize_multiplier(2.0**31 - 1, rounding="double") == (2147483647, 31)
    assert quantize_multiplier(2.0**30, rounding="double") == (1073741824, 31)
    # and the single build's saturation of shift > 30 (quantization_util.cc)
    assert quantize_multiplier(2.0**30, rounding="single") == (INT32_MAX, 30)
    assert quantize_multiplier(1e12, rounding="single") == (INT32_MAX, 30)
    for real in (2.0**30 - 1, 2.0**29, 2.0**31 - 1, 2.0**30, 1e12):
        for build in BUILDS:
            assert quantize_multiplier(real, rounding=build) == oracle_quantize_multiplier(
                real, build == "single"
            )


# MultiplyByQuantizedMultiplierInt32 in quantization_util_test.cc (run in both builds there).
TFLITE_MBQM_VECTORS = [
    (0, 0.1, 0),
    (1, 0.0, 0),
    (10000, 0.00097656, 10),
    (-10000, 0.00097656, -10),
    (INT32_MIN, 0.00001, -21475),
    (INT32_MAX, 0.00001, 21475),
]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("x, real, expected", TFLITE_MBQM_VECTORS)
def test_multiply_by_quantized_multiplier_reproduces_tflite_unit_tests(x, real, expected, build):
    m, s = quantize_multiplier(real, rounding=build)
    assert multiply_by_quantized_multiplier(x, m, s, rounding=build) == expected
    assert oracle_mbqm(x, *oracle_quantize_multiplier(real, build == "single"), build) == expected


@pytest.mark.parametrize("build", BUILDS)
def test_maximum_x_and_multiplier_as_tflite_tests_them(build):
    # "Test with maximum possible x and quantized_multiplier": shift -3, expected is
    # TfLiteRound(x * multiplier / 2**34) computed in double.
    expected = int(std_round(INT32_MAX * INT32_MAX / float(1 << 34)))
    assert multiply_by_quantized_multiplier(INT32_MAX, INT32_MAX, -3, rounding=build) == expected
    assert multiply_by_quantized_multiplier(-INT32_MAX, INT32_MAX, -3, rounding=build) == -expected


# --- bit-exactness against the oracle on random inputs -------------------------------------------


def random_int32(rng, n: int) -> np.ndarray:
    """int32 values with magnitudes spread over all 32 bit lengths, plus the extremes."""
    raw = rng.integers(INT32_MIN, INT32_MAX, size=n, endpoint=True, dtype=np.int64)
    x = raw >> rng.integers(0, 32, size=n)
    x[:8] = [INT32_MIN, INT32_MAX, INT32_MIN + 1, -1, 0, 1, 1 << 30, -(1 << 30)]
    return x


def test_srdhm_matches_oracle_on_a_million_random_pairs():
    rng = np.random.default_rng(20240501)
    a = random_int32(rng, 1_000_000)
    b = rng.permutation(random_int32(rng, 1_000_000))
    got = srdhm(a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, as_int64(oracle_map(oracle_srdhm, a, b)))


def test_srdhm_edge_values_and_ties():
    edges = [INT32_MIN, INT32_MIN + 1, -(1 << 30) - 1, -(1 << 30), -3, -2, -1, 0, 1, 2, 3,
             (1 << 30) - 1, 1 << 30, (1 << 30) + 1, INT32_MAX - 1, INT32_MAX]
    a, b = np.meshgrid(edges, edges)
    np.testing.assert_array_equal(srdhm(a, b), as_int64(oracle_map(oracle_srdhm, a, b)))
    # exact ties: a * b = (2k + 1) * 2**30, both signs
    rng = np.random.default_rng(7)
    odd = 2 * rng.integers(-(2**29), 2**29, size=2000) + 1
    a = np.concatenate([odd, -odd, odd])
    b = np.concatenate([np.full(2000, 1 << 30), np.full(2000, 1 << 30), np.full(2000, -(1 << 30))])
    assert all((int(p) * int(q)) % (1 << 31) == 1 << 30 for p, q in zip(a, b, strict=True))
    np.testing.assert_array_equal(srdhm(a, b), as_int64(oracle_map(oracle_srdhm, a, b)))
    assert srdhm(INT32_MIN, INT32_MIN) == INT32_MAX
    assert srdhm(-5, 1 << 30) == -2 and srdhm(5, 1 << 30) == 3  # ties toward +infinity


def test_rounding_divide_by_pot_matches_oracle_on_a_million_random_inputs():
    rng = np.random.default_rng(99)
    x = random_int32(rng, 1_000_000)
    e = rng.integers(0, 32, size=x.size)
    got = rounding_divide_by_pot(x, e)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, as_int64(oracle_map(oracle_rdbpot, x, e)))


def test_rounding_divide_by_pot_every_exponent_on_edges_and_ties():
    exps = np.arange(32)
    edges = np.array([INT32_MIN, INT32_MIN + 1, -3, -2, -1, 0, 1, 2, 3, INT32_MAX - 1, INT32_MAX])
    x, e = np.meshgrid(edges, exps)
    np.testing.assert_array_equal(rounding_divide_by_pot(x, e),
                                  as_int64(oracle_map(oracle_rdbpot, x, e)))
    # ties: x = (2k + 1) * 2**(e - 1), positive and negative, for every exponent >= 1
    rng = np.random.default_rng(3)
    xs, es = [], []
    for exponent in range(1, 32):
        top = max(1, 2 ** (31 - exponent))
        odd = 2 * rng.integers(0, top, size=50) + 1
        tie = odd * 2 ** (exponent - 1)
        tie = tie[tie <= INT32_MAX]
        xs += [tie, -tie]
        es += [np.full(2 * tie.size, exponent)]
    x = np.concatenate(xs)
    e = np.concatenate(es)
    assert np.all((x % (2 * (1 << (e - 1)))) == (1 << (e - 1)))
    np.testing.assert_array_equal(rounding_divide_by_pot(x, e),
                                  as_int64(oracle_map(oracle_rdbpot, x, e)))
    # ties go away from zero
    assert rounding_divide_by_pot(-3, 1) == -2 and rounding_divide_by_pot(3, 1) == 2


def random_rescale_inputs(rng, n: int):
    x = random_int32(rng, n)
    multiplier = rng.integers(1 << 30, INT32_MAX, size=n, endpoint=True)
    multiplier[:3] = [1 << 30, INT32_MAX, 0]
    shift = rng.integers(-31, 31, size=n)
    return x, multiplier, shift


@pytest.mark.parametrize("build", BUILDS)
def test_multiply_by_quantized_multiplier_matches_oracle_on_a_million_random_inputs(build):
    rng = np.random.default_rng(2024 if build == "double" else 2025)
    x, multiplier, shift = random_rescale_inputs(rng, 1_000_000)
    expected = oracle_map(lambda *a: oracle_mbqm(*a, build), x, multiplier, shift)
    valid = np.array([v is not None for v in expected])
    # enough of both kinds for the comparison to mean something
    assert 0.3 < valid.mean() < 0.99, valid.mean()
    got = multiply_by_quantized_multiplier(x[valid], multiplier[valid], shift[valid],
                                           rounding=build)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, as_int64([v for v in expected if v is not None]))
    # where TFLite would hit undefined behaviour or a failed DCHECK, the library refuses
    for i in np.flatnonzero(~valid)[:200]:
        with pytest.raises(ValueError, match="int32"):
            multiply_by_quantized_multiplier(int(x[i]), int(multiplier[i]), int(shift[i]),
                                             rounding=build)


def tie_cases(rng):
    """(x, multiplier, shift) with x * multiplier * 2**(shift - 31) exactly halfway, every shift.

    With multiplier = 2**v * u (u odd) and t = 31 - shift, the product is a tie exactly when
    x = (2j + 1) * 2**(t - 1 - v); v is chosen so that such an x fits int32.
    """
    xs, ms, ss = [], [], []
    for shift in range(-31, 31):
        t = 31 - shift
        for v in sorted({max(0, t - 32), min(30, t - 1), (max(0, t - 32) + min(30, t - 1)) // 2}):
            if v > 30 or v > t - 1:
                continue
            for i in range(20):
                if v == 30:
                    m = 1 << 30
                else:
                    u = 2 * int(rng.integers(2 ** (29 - v), 2 ** (30 - v))) + 1
                    m = u << v
                p = t - 1 - v
                j_max = max(0, (2 ** (31 - p) - 1) // 2 - 1)
                # the smallest x, then small ones, then any: large x overflow at large shifts
                j_top = 0 if i < 5 else min(j_max, 100) if i < 10 else j_max
                j = int(rng.integers(0, j_top + 1))
                x = (2 * j + 1) << p
                for sign in (1, -1):
                    if INT32_MIN <= sign * x <= INT32_MAX:
                        xs.append(sign * x)
                        ms.append(m)
                        ss.append(shift)
    return np.array(xs), np.array(ms), np.array(ss)


@pytest.mark.parametrize("build", BUILDS)
def test_exact_ties_for_every_shift_from_minus_31_to_30(build):
    x, m, s = tie_cases(np.random.default_rng(11))
    exact = [Fraction(int(a) * int(b), 1) * Fraction(2) ** (int(c) - 31)
             for a, b, c in zip(x, m, s, strict=True)]
    assert all(v.denominator == 2 for v in exact), "every case must be exactly halfway"
    assert set(s.tolist()) == set(range(-31, 31))
    assert (x < 0).sum() > 500 and (x > 0).sum() > 500
    expected = oracle_map(lambda *a: oracle_mbqm(*a, build), x, m, s)
    valid = np.array([v is not None for v in expected])
    assert set(s[valid].tolist()) == set(range(-31, 31)), "a usable tie at every shift"
    got = multiply_by_quantized_multiplier(x[valid], m[valid], s[valid], rounding=build)
    np.testing.assert_array_equal(got, as_int64([v for v in expected if v is not None]))
    # the rule each build follows at a tie
    for value, e, shift in zip(got.tolist(), np.array(exact, dtype=object)[valid],
                               s[valid].tolist(), strict=True):
        up = math.floor(e) + 1
        away = up if e > 0 else math.floor(e)
        if build == "single" or shift >= 0:
            assert value == up  # ties toward +infinity
        else:
            assert value == away  # srdhm is exact, the final rounding is RDBPOT's


@pytest.mark.parametrize("build", BUILDS)
def test_quantize_then_multiply_matches_oracle_for_multipliers_from_2_to_the_minus_31_to_30(build):
    rng = np.random.default_rng(5)
    exps = rng.uniform(-31, 30, size=20_000)
    reals = np.ldexp(rng.uniform(0.5, 1.0, size=exps.size), np.floor(exps).astype(int) + 1)
    reals = np.concatenate([reals, np.ldexp(1.0, np.arange(-31, 31)),
                            np.nextafter(np.ldexp(1.0, np.arange(-31, 31)), 0)])
    single = build == "single"
    oracle_pairs = [oracle_quantize_multiplier(float(r), single) for r in reals]
    m, s = quantize_multiplier(reals, rounding=build)
    assert m.dtype == np.int32 and s.dtype == np.int32
    np.testing.assert_array_equal(np.stack([m, s], axis=1), as_int64(oracle_pairs))
    usable = s <= 30
    x = random_int32(rng, int(usable.sum()))
    expected = oracle_map(lambda *a: oracle_mbqm(*a, build), x, m[usable], s[usable])
    valid = np.array([v is not None for v in expected])
    got = multiply_by_quantized_multiplier(x[valid], m[usable][valid], s[usable][valid],
                                           rounding=build)
    np.testing.assert_array_equal(got, as_int64([v for v in expected if v is not None]))


@pytest.mark.parametrize("build", BUILDS)
def test_quantize_multiplier_matches_oracle_at_every_boundary(build):
    reals = []
    for e in range(-40, 40):
        p = math.ldexp(1.0, e)
        reals += [p, math.nextafter(p, 0), math.nextafter(p, math.inf),
                  p * (1 - 2.0**-33), p * (1 - 2.0**-32), p * (1 - 2.0**-31), p * 0.75]
        # M0 * 2**31 exactly halfway between two integers: ties away from zero
        reals += [math.ldexp((2**30 + k + 0.5) / 2**31, e) for k in (0, 1, 12345, 2**30 - 1)]
    reals += [0.0, 5e-324, 1e-300, 1e300, np.finfo(np.float64).max]
    single = build == "single"
    m, s = quantize_multiplier(np.array(reals), rounding=build)
    np.testing.assert_array_equal(np.stack([m, s], axis=1),
                                  as_int64([oracle_quantize_multiplier(r, single) for r in reals]))
    # the flush happens after the carry: just below 2**-32 rounds up to 2**-32 and survives
    assert quantize_multiplier(math.nextafter(2.0**-32, 0), rounding=build) == (1 << 30, -31)
    assert quantize_multiplier(2.0**-33, rounding=build) == (0, 0)
    # ties in M0 * 2**31 round away from zero (up)
    assert quantize_multiplier((2**30 + 0.5) / 2**31, rounding=build) == (2**30 + 1, 0)


def test_builds_agree_except_at_ties_and_double_rounding_and_differ_by_at_most_one():
    rng = np.random.default_rng(8)
    x, m, s = random_rescale_inputs(rng, 400_000)
    s = np.minimum(s, 0)  # keep the double build's left shift out of the picture
    d = multiply_by_quantized_multiplier(x, m, s, rounding="double")
    one = multiply_by_quantized_multiplier(x, m, s, rounding="single")
    diff = d.astype(np.int64) - one
    assert set(np.unique(diff).tolist()) <= {-1, 0, 1}
    assert np.count_nonzero(diff) > 0  # they do disagree, sometimes


# --- properties (Hypothesis) --------------------------------------------------------------------

int32s = st.integers(INT32_MIN, INT32_MAX)
multipliers = st.one_of(st.just(0), st.integers(1 << 30, INT32_MAX))


def nearest_ties_up(v: Fraction) -> int:
    return math.floor(v + Fraction(1, 2))


def nearest_ties_away(v: Fraction) -> int:
    n = math.floor(abs(v) + Fraction(1, 2))
    return n if v >= 0 else -n


@settings(max_examples=400)
@given(int32s, int32s)
def test_srdhm_is_the_product_rounded_with_ties_up(a, b):
    expected = INT32_MAX if a == b == INT32_MIN else nearest_ties_up(Fraction(a * b, 2**31))
    assert srdhm(a, b) == expected
    assert srdhm(b, a) == srdhm(a, b)


@settings(max_examples=400)
@given(int32s, st.integers(0, 31))
def test_rdbpot_is_division_rounded_with_ties_away_from_zero(x, e):
    assert rounding_divide_by_pot(x, e) == nearest_ties_away(Fraction(x, 2**e))
    if x != INT32_MIN:
        assert rounding_divide_by_pot(-x, e) == -rounding_divide_by_pot(x, e)


@settings(max_examples=400)
@given(int32s, multipliers, st.integers(-31, 30))
def test_single_rounding_is_correct_rounding_with_ties_up(x, m, s):
    exact = Fraction(x * m) * Fraction(2) ** (s - 31)
    expected = nearest_ties_up(exact)
    if not INT32_MIN <= expected <= INT32_MAX:
        with pytest.raises(ValueError, match="does not fit int32"):
            multiply_by_quantized_multiplier(x, m, s, rounding="single")
        return
    assert multiply_by_quantized_multiplier(x, m, s, rounding="single") == expected


@settings(max_examples=400)
@given(int32s, multipliers, st.integers(-31, 30))
def test_double_rounding_is_within_one_of_exact_and_of_single(x, m, s):
    if x * 2 ** max(s, 0) > INT32_MAX or x * 2 ** max(s, 0) < INT32_MIN:
        with pytest.raises(ValueError, match="overflows int32"):
            multiply_by_quantized_multiplier(x, m, s, rounding="double")
        return
    d = multiply_by_quantized_multiplier(x, m, s, rounding="double")
    exact = Fraction(x * m) * Fraction(2) ** (s - 31)
    # srdhm errs by at most 1/2 before the division by 2**right_shift, rdbpot by 1/2 after it
    assert abs(d - exact) <= Fraction(1, 2) + Fraction(1, 2 ** (max(-s, 0) + 1))
    single = nearest_ties_up(exact)
    if INT32_MIN <= single <= INT32_MAX:
        assert abs(d - single) <= 1


@settings(max_examples=300)
@given(st.floats(min_value=2.0**-31, max_value=2.0**30 * 0.999, allow_nan=False))
def test_quantize_multiplier_error_is_at_most_2_to_the_minus_31(real):
    m, s = quantize_multiplier(real)
    assert (1 << 30) <= m <= INT32_MAX and -31 <= s <= 30
    assert abs(Fraction(multiplier_to_real(m, s)) - Fraction(real)) <= Fraction(real) * 2**-31
    assert multiplier_to_real(m, s) == m * 2.0 ** (s - 31)


# --- Qm.n arithmetic and rounding modes ---------------------------------------------------------


def reference_round(v: Fraction, mode: str) -> int:
    """A direct, case-by-case statement of each rounding mode on an exact rational."""
    lo = math.floor(v)
    frac = v - lo
    half = Fraction(1, 2)
    if mode == "floor":
        return lo
    if mode == "toward_zero":
        return math.trunc(v)
    if frac != half:
        return lo + (frac > half)
    return {"nearest_even": lo + (lo % 2), "half_away_from_zero": lo + (v > 0),
            "half_up": lo + 1}[mode]


DETERMINISTIC_MODES = [m for m in ROUNDING_MODES if m != "stochastic"]


def test_rounding_modes_on_the_named_ties():
    values = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -1.25, 1.75]
    table = {
        "nearest_even": [-2, -2, 0, 0, 2, 2, -1, 2],
        "half_away_from_zero": [-3, -2, -1, 1, 2, 3, -1, 2],
        "half_up": [-2, -1, 0, 1, 2, 3, -1, 2],
        "floor": [-3, -2, -1, 0, 1, 2, -2, 1],
        "toward_zero": [-2, -1, 0, 0, 1, 2, -1, 1],
    }
    assert set(table) == set(DETERMINISTIC_MODES)
    for mode, expected in table.items():
        assert to_fixed(values, 7, 0, rounding=mode).tolist() == expected, mode
        # the same values as integers divided by 4 (two fraction bits), via round_shift
        quarters = (np.array(values) * 4).astype(np.int64)
        assert round_shift(quarters, 2, mode).tolist() == expected, mode


@settings(max_examples=300)
@given(st.integers(-(2**62) + 1, 2**62 - 1), st.integers(0, 62),
       st.sampled_from(DETERMINISTIC_MODES))
def test_round_shift_matches_the_reference_rounding(x, shift, mode):
    assert round_shift(x, shift, mode) == reference_round(Fraction(x, 2**shift), mode)


@settings(max_examples=300)
@given(st.floats(-300, 300, allow_nan=False), st.integers(0, 8), st.integers(0, 16),
       st.sampled_from(DETERMINISTIC_MODES))
def test_to_fixed_rounds_then_saturates(x, m, n, mode):
    qmin, qmax = fixed_range(m, n)
    expected = min(max(reference_round(Fraction(x) * 2**n, mode), qmin), qmax)
    q = to_fixed(x, m, n, rounding=mode)
    assert q == expected
    r = from_fixed(q, m, n)
    if qmin < q < qmax and mode in ("nearest_even", "half_away_from_zero", "half_up"):
        assert abs(r - x) <= 2.0 ** (-n - 1)


@settings(max_examples=200)
@given(st.integers(0, 6), st.integers(0, 6), st.data())
def test_fixed_add_saturates_raises_or_wraps(m, n, data):
    qmin, qmax = fixed_range(m, n)
    a = data.draw(st.integers(qmin, qmax))
    b = data.draw(st.integers(qmin, qmax))
    exact = a + b
    assert fixed_add(a, b, m, n) == min(max(exact, qmin), qmax)
    width = 2 ** (1 + m + n)
    wrapped = (exact - qmin) % width + qmin
    assert fixed_add(a, b, m, n, overflow="wrap") == wrapped
    if qmin <= exact <= qmax:
        assert fixed_add(a, b, m, n, overflow="raise") == exact
    else:
        assert wrapped != exact
        with pytest.raises(ValueError, match="overflows"):
            fixed_add(a, b, m, n, overflow="raise")


@settings(max_examples=200)
@given(st.integers(0, 6), st.integers(0, 12), st.sampled_from(DETERMINISTIC_MODES), st.data())
def test_fixed_mul_rounds_the_exact_product(m, n, mode, data):
    qmin, qmax = fixed_range(m, n)
    a = data.draw(st.integers(qmin, qmax))
    b = data.draw(st.integers(qmin, qmax))
    expected = min(max(reference_round(Fraction(a * b, 2**n), mode), qmin), qmax)
    assert fixed_mul(a, b, m, n, rounding=mode) == expected


def test_qmn_range_grid_and_overflow_examples():
    assert fixed_range(3, 4) == (-128, 127)
    assert fixed_range(0, 31) == (INT32_MIN, INT32_MAX)
    grid = from_fixed(np.arange(-8, 8), 1, 2)
    np.testing.assert_array_equal(grid, np.arange(-8, 8) / 4)
    # Q3.4: 7.5 + 1.0 does not fit; saturation clamps, wrapping flips the sign
    a, b = to_fixed(7.5, 3, 4), to_fixed(1.0, 3, 4)
    assert from_fixed(fixed_add(a, b, 3, 4), 3, 4) == 7.9375
    assert from_fixed(fixed_add(a, b, 3, 4, overflow="wrap"), 3, 4) == -7.5
    assert to_fixed(8.5, 3, 4, overflow="wrap") == -120
    assert to_fixed([1e300, -1e300, 1e30], 3, 4).tolist() == [127, -128, 127]
    # (-1) * (-1) in Q0.7 is the classic product that does not fit
    minus_one = to_fixed(-1.0, 0, 7)
    assert fixed_mul(minus_one, minus_one, 0, 7) == 127
    with pytest.raises(ValueError, match="overflows"):
        fixed_mul(minus_one, minus_one, 0, 7, overflow="raise")


def test_stochastic_rounding_is_seeded_and_unbiased():
    x = np.full(200_000, 5)  # 5 / 4 = 1.25
    first = round_shift(x, 2, "stochastic", seed=1)
    again = round_shift(x, 2, "stochastic", seed=1)
    other = round_shift(x, 2, "stochastic", seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert set(np.unique(first).tolist()) == {1, 2}
    assert abs(first.mean() - 1.25) < 0.005  # binomial std is 0.001
    assert round_shift(x, 2, "nearest_even").mean() == 1  # deterministic modes are biased here
    reals = np.full(200_000, 0.3)
    q = to_fixed(reals, 3, 0, rounding="stochastic", seed=np.random.default_rng(4))
    assert abs(q.mean() - 0.3) < 0.005 and set(np.unique(q).tolist()) == {0, 1}
    prod = fixed_mul(np.full(100_000, 3), np.full(100_000, 1), 3, 2, rounding="stochastic", seed=0)
    assert abs(prod.mean() - 0.75) < 0.01  # 3 * 1 / 4 = 0.75


# --- MAC bit widths -----------------------------------------------------------------------------


@pytest.mark.parametrize("a_signed", [True, False])
@pytest.mark.parametrize("b_signed", [True, False])
def test_product_range_and_max_k_by_brute_force(a_signed, b_signed):
    for a_bits in range(1, 5):
        for b_bits in range(1, 5):
            a = np.arange(*((-(2 ** (a_bits - 1)), 2 ** (a_bits - 1)) if a_signed
                            else (0, 2**a_bits)))
            b = np.arange(*((-(2 ** (b_bits - 1)), 2 ** (b_bits - 1)) if b_signed
                            else (0, 2**b_bits)))
            products = np.outer(a, b)
            lo, hi = product_range(a_bits, b_bits, a_signed=a_signed, b_signed=b_signed)
            assert (lo, hi) == (products.min(), products.max())
            for acc in range(a_bits + b_bits, a_bits + b_bits + 6):
                k = max_k(acc, a_bits, b_bits, a_signed=a_signed, b_signed=b_signed)
                top, bottom = 2 ** (acc - 1) - 1, -(2 ** (acc - 1))
                assert bottom <= k * lo and k * hi <= top  # K fits
                assert (k + 1) * lo < bottom or (k + 1) * hi > top  # K + 1 does not
                # and the exact accumulator width agrees: K fits acc bits, K + 1 needs more
                need_next = min_accumulator_bits(a_bits, b_bits, k + 1, a_signed=a_signed,
                                                 b_signed=b_signed)
                assert need_next > acc
                if k >= 1:
                    assert min_accumulator_bits(a_bits, b_bits, k, a_signed=a_signed,
                                                b_signed=b_signed) <= acc
                    assert need_next == acc + 1


def test_mac_widths_for_int8():
    from qcourse.kernels import max_k_s8s8

    assert product_range(8, 8) == (-16256, 16384)
    assert product_range(8, 8, a_signed=False) == (-32640, 32385)
    assert max_k(32, 8, 8) == max_k_s8s8() == 2**17 - 1
    assert max_k(32, 8, 8, a_signed=False) == 65793
    assert max_k(16, 8, 8) == 1  # a 16-bit product register holds exactly one product
    assert max_k(15, 8, 8) == 0  # and 15 bits cannot hold (-128)**2
    assert min_accumulator_bits(8, 8, 1) == 16
    assert min_accumulator_bits(8, 8, 2**17 - 1) == 32
    assert min_accumulator_bits(8, 8, 2**17) == 33
    assert accumulator_bits(8, 8, 1) == 16 and accumulator_bits(8, 8, 2**17 - 1) == 33


@settings(max_examples=200)
@given(st.integers(1, 16), st.integers(1, 16), st.integers(1, 2**20), st.booleans(),
       st.booleans())
def test_the_textbook_bound_always_suffices_and_is_at_most_one_bit_loose(a, b, k, sa, sb):
    exact = min_accumulator_bits(a, b, k, a_signed=sa, b_signed=sb)
    rule = accumulator_bits(a, b, k)
    if sa and sb:
        assert exact <= rule <= exact + 1
    elif sa or sb:
        assert exact <= rule
    else:
        assert exact <= rule + 1
    assert max_k(exact, a, b, a_signed=sa, b_signed=sb) >= k


# --- Method 1 and Method 2, and the course's worked example ------------------------------------


def test_power_of_two_exponent():
    assert power_of_two_exponent(0.01) == -7  # 1/128 is nearer than 1/64
    assert power_of_two_exponent(0.75) == 0  # the tie between 0.5 and 1 goes up
    assert power_of_two_exponent(np.array([1.0, 0.74, 3.0, 2.9])).tolist() == [0, -1, 2, 1]
    rng = np.random.default_rng(0)
    r = np.exp(rng.uniform(-20, 20, size=10_000))
    e = power_of_two_exponent(r)
    err = np.abs(np.ldexp(1.0, e) - r)
    assert np.all(err <= np.abs(np.ldexp(1.0, e - 1) - r))
    assert np.all(err <= np.abs(np.ldexp(1.0, e + 1) - r))


def test_m_equals_0_01_worked_example():
    m, s = quantize_multiplier(0.01)
    # std::round(0.64 * 2**31); the slide's 1374389534 is floor(0.64 * 2**31), truncated
    assert (m, s) == (1374389535, -6)
    y = multiply_by_quantized_multiplier(1234, m, s)
    assert y == 12 == multiply_by_quantized_multiplier(1234, m, s, rounding="single")
    assert rounding_divide_by_pot(1234, 7) == 10  # Method 1: 0.01 ~ 2**-7


# --- bad input ----------------------------------------------------------------------------------

I32 = r"{} must be integers in \[-2147483648, 2147483647\]"  # the int32 range


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: srdhm(1.5, 2), TypeError, I32.format("a")),
        (lambda: srdhm(1, np.array([1.0])), TypeError, I32.format("b")),
        (lambda: srdhm(2**31, 1), ValueError, I32.format("a") + r" \(int32"),
        (lambda: srdhm(np.array([0, -(2**31) - 1]), 1), ValueError, I32.format("a") + r" \(int32"),
        (lambda: srdhm(True, 1), TypeError, "a must be integers"),
        (lambda: srdhm(np.array([], dtype=np.int32), 1), ValueError, "a must not be empty"),
        (lambda: srdhm("7", 1), TypeError, I32.format("a")),
        (lambda: rounding_divide_by_pot(5, 32), ValueError, "exponent must be"),
        (lambda: rounding_divide_by_pot(5, -1), ValueError, "exponent must be"),
        (lambda: rounding_divide_by_pot(np.uint64(2**63), 1), ValueError,
         I32.format("x") + r" \(int32"),
        (lambda: multiply_by_quantized_multiplier(1, 2**30 - 1, 0), ValueError,
         "multiplier must be 0 or in"),
        (lambda: multiply_by_quantized_multiplier(1, -5, 0), ValueError, "multiplier must be"),
        (lambda: multiply_by_quantized_multiplier(1, 2**31, 0), ValueError, "multiplier must be"),
        (lambda: multiply_by_quantized_multiplier(1, 2**30, 31), ValueError, "shift must be"),
        (lambda: multiply_by_quantized_multiplier(1, 2**30, -32), ValueError, "shift must be"),
        (lambda: multiply_by_quantized_multiplier(1, 2**30, 0, rounding="triple"), ValueError,
         "rounding must be one of"),
        (lambda: multiply_by_quantized_multiplier(2**31, 2**30, 0), ValueError,
         I32.format("x") + r" \(int32"),
        (lambda: multiply_by_quantized_multiplier(1.0, 2**30, 0), TypeError, "x must be"),
        (lambda: multiply_by_quantized_multiplier(2**20, 2**30, 12), ValueError,
         "x \\* 2\\*\\*shift overflows int32"),
        (lambda: multiply_by_quantized_multiplier(INT32_MAX, INT32_MAX, 30, rounding="single"),
         ValueError, "does not fit int32"),
        (lambda: quantize_multiplier(float("nan")), ValueError,
         "real_multiplier must be finite, got 1 NaN"),
        (lambda: quantize_multiplier(float("inf")), ValueError, "real_multiplier must be finite"),
        (lambda: quantize_multiplier(-0.5), ValueError, "real_multiplier must be >= 0"),
        (lambda: quantize_multiplier(np.array([0.5, -1e-9])), ValueError, "real_multiplier"),
        (lambda: quantize_multiplier("0.5"), TypeError,
         "real_multiplier must hold real numbers, got str"),
        (lambda: quantize_multiplier(np.array([])), ValueError, "real_multiplier must not be"),
        (lambda: quantize_multiplier(0.5, rounding="nearest"), ValueError, "rounding must be"),
        (lambda: power_of_two_exponent(0.0), ValueError, "real_multiplier must be > 0"),
        (lambda: to_fixed(float("nan"), 3, 4), ValueError, "x must be finite, got 1 NaN"),
        (lambda: to_fixed(float("-inf"), 3, 4), ValueError, "x must be finite"),
        (lambda: to_fixed(1.0, -1, 4), ValueError, r"int_bits must be an int in \[0, 31\], got -1"),
        (lambda: to_fixed(1.0, 3, 2.0), TypeError,
         r"frac_bits must be an int in \[0, 31\], got float 2.0"),
        (lambda: to_fixed(1.0, 20, 20), ValueError, "at most 32"),
        (lambda: to_fixed(1.0, 3, 4, rounding="banker"), ValueError, "rounding must be one of"),
        (lambda: to_fixed(1.0, 3, 4, overflow="clip"), ValueError, "overflow must be one of"),
        (lambda: to_fixed(9.0, 3, 4, overflow="raise"), ValueError, "x overflows"),
        (lambda: to_fixed([1.0, 1e30], 3, 4, overflow="raise"), ValueError,
         "x overflows the Q3.4 range .* x = 1e\\+30"),
        (lambda: to_fixed(1e30, 3, 4, overflow="wrap"), ValueError, "too large .* to wrap"),
        (lambda: srdhm([[1, 2], [3]], 1), TypeError, "a must be an array or a number, got a list"),
        (lambda: to_fixed(1.0, 3, 4, rounding="stochastic"), ValueError, "seed is required"),
        (lambda: from_fixed(128, 3, 4), ValueError,
         r"q must be integers in \[-128, 127\] \(a raw Q3.4 integer: int_bits=3, "
         r"frac_bits=4\), got 128"),
        (lambda: from_fixed(1.5, 3, 4), TypeError, "q must be"),
        (lambda: fixed_add(127, 1, 3, 4, overflow="raise"), ValueError, "a \\+ b overflows"),
        (lambda: fixed_add(200, 1, 3, 4), ValueError,
         r"a must be integers in \[-128, 127\] \(a raw Q3.4 integer: int_bits=3, "
         r"frac_bits=4\), got 200"),
        (lambda: fixed_mul(1, -129, 3, 4), ValueError,
         r"b must be integers in \[-128, 127\] \(a raw Q3.4 integer: int_bits=3, "
         r"frac_bits=4\), got -129"),
        (lambda: round_shift(5, 63), ValueError, r"shift must be an int in \[0, 62\], got 63"),
        (lambda: round_shift(2**62, 1), ValueError,
         r"x must be integers in .* \(below 2\*\*62 in size\)"),
        (lambda: round_shift(5, 1, "sideways"), ValueError, "mode must be one of"),
        (lambda: round_shift(5, 1, "stochastic"), ValueError, "seed is required"),
        (lambda: max_k(0, 8, 8), ValueError, r"acc_bits must be an int in \[1, 1024\], got 0"),
        (lambda: product_range(8, 0), ValueError, r"b_bits must be an int in \[1, 1024\], got 0"),
        (lambda: accumulator_bits(8, 8, 0), ValueError,
         r"k must be an int in \[1, 18446744073709551616\], got 0"),
        (lambda: min_accumulator_bits(8, 8, 1.5), TypeError,
         r"k must be an int in \[1, 18446744073709551616\], got float 1.5"),
        (lambda: multiplier_to_real(-1, 0), ValueError, "multiplier must be"),
    ],
)
def test_bad_input_is_rejected_with_a_message_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_scalars_in_give_python_scalars_out_and_arrays_broadcast():
    assert type(srdhm(3, 4)) is int
    assert type(quantize_multiplier(0.3)[0]) is int
    assert type(from_fixed(3, 3, 4)) is float
    out = multiply_by_quantized_multiplier(np.arange(6).reshape(2, 3) * 1000,
                                           np.array([1 << 30, 1 << 30, INT32_MAX]),
                                           np.array([0, -1, -2]))
    assert out.shape == (2, 3) and out.dtype == np.int32
    np.testing.assert_array_equal(out[1], [1500, 1000, 1250])
