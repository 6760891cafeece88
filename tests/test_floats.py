"""qcourse.floats: encode/decode bit-exact with numpy and ml_dtypes, exact single rounding.

Oracles: numpy (float16, float32 casts: hardware or numpy's own single-rounding code) and
ml_dtypes (bfloat16, float8_e4m3fn, float8_e5m2).  Independent of both, an exact reference built
on fractions.Fraction checks every rounding the libraries cannot (float64 inputs, odd formats).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qcourse import floats as F
from qcourse.floats import (
    BF16,
    FP8_E4M3FN,
    FP8_E5M2,
    FP16,
    FP32,
    FP64,
    FloatFormat,
    decode,
    encode,
    encode_via,
)

SMALL = [FP16, BF16, FP8_E4M3FN, FP8_E5M2]
CUSTOM = [
    FloatFormat("e3m2", 3, 2),
    FloatFormat("e2m1fn", 2, 1, convention="fn"),
    FloatFormat("e6m9b20", 6, 9, bias=20),
    FloatFormat("e4m3b11", 4, 3, bias=11),
    FloatFormat("e5m10fn", 5, 10, convention="fn"),
]
ALL_FORMATS = [FP64, FP32, *SMALL, *CUSTOM]
UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def ml_dtype(fmt):
    md = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the oracle for bf16 and fp8")
    return {"bf16": md.bfloat16, "e4m3fn": md.float8_e4m3fn, "e5m2": md.float8_e5m2}[fmt.name]


def oracle_dtype(fmt):
    """The outside system's type for fmt: numpy for fp16/fp32, ml_dtypes for the rest."""
    if fmt is FP16:
        return np.float16
    if fmt is FP32:
        return np.float32
    return ml_dtype(fmt)


def oracle_encode(x, fmt):
    with np.errstate(all="ignore"):
        return np.asarray(x).astype(oracle_dtype(fmt)).view(UINT[fmt.total_bits])


def oracle_decode(bits, fmt):
    arr = np.asarray(bits, dtype=UINT[fmt.total_bits]).view(oracle_dtype(fmt))
    with np.errstate(invalid="ignore"):  # casting a signalling NaN raises the invalid flag
        return arr.astype(np.float64)


def widen(a):
    """float64 copy of a float array; widening a signalling NaN raises numpy's invalid flag."""
    with np.errstate(invalid="ignore"):
        return np.asarray(a).astype(np.float64)


def same_float(a, b):
    """Equal as floats, with -0 != +0 and NaN == NaN (of either sign)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    return both_nan | ((a == b) & (np.signbit(a) == np.signbit(b)))


# --- An exact reference, independent of the implementation ---------------------------------------


def ref_max_finite(fmt) -> Fraction:
    top_mantissa = 2**fmt.man_bits - (2 if fmt.convention == "fn" else 1)
    return Fraction(2**fmt.man_bits + top_mantissa, 2**fmt.man_bits) * Fraction(2) ** fmt.emax


def ref_round(x, fmt):
    """Round a Python float or int exactly: returns (negative, Fraction | "inf" | "nan").

    Nearest multiple of the binade's quantum 2**(k - p) on an unbounded exponent grid, ties to
    the even multiple; a result above the largest finite value overflows (to inf for "ieee",
    NaN for "fn").  Needs man_bits >= 1 (then the multiple's parity is the mantissa's).
    """
    assert fmt.man_bits >= 1
    if isinstance(x, float) and math.isnan(x):
        return math.copysign(1, x) < 0, "nan"
    negative = (math.copysign(1, x) < 0) if isinstance(x, float) else x < 0
    if isinstance(x, float) and math.isinf(x):
        return negative, "inf" if fmt.has_inf else "nan"
    v = abs(Fraction(x))
    if v == 0:
        return negative, Fraction(0)
    k = floor_log2(v)
    assert Fraction(2) ** k <= v < Fraction(2) ** (k + 1)
    k = max(k, fmt.emin)
    quantum = Fraction(2) ** (k - fmt.man_bits)
    n = math.floor(v / quantum)
    rest = v / quantum - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = n * quantum
    if r > ref_max_finite(fmt):
        return negative, "inf" if fmt.has_inf else "nan"
    return negative, r


def floor_log2(v: Fraction) -> int:
    k = v.numerator.bit_length() - v.denominator.bit_length()
    return k - 1 if Fraction(2) ** k > v else k


def ref_bits(negative, r, fmt) -> int:
    """The bit pattern of a rounded result from ref_round, built from the definition."""
    sign = fmt.sign_mask if negative else 0
    if r == "nan":
        return sign | fmt.nan_bits
    if r == "inf":
        return sign | fmt.inf_bits
    if r == 0:
        return sign
    p = fmt.man_bits
    k = floor_log2(r)
    if k < fmt.emin:  # subnormal: r = n * 2**(emin - p), exponent field 0
        n = r / Fraction(2) ** (fmt.emin - p)
        assert n.denominator == 1 and 0 < n < 2**p
        return sign | int(n)
    n = r / Fraction(2) ** (k - p)
    assert n.denominator == 1 and 2**p <= n < 2 ** (p + 1)
    return sign | ((k + fmt.bias) << p) | (int(n) - 2**p)


def assert_matches_reference(x, fmt):
    want = ref_bits(*ref_round(x, fmt), fmt)
    got = int(encode(x, fmt))
    assert got == want, (x, fmt.name, hex(got), hex(want))


# --- The formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, npdt", [(FP16, np.float16), (FP32, np.float32), (FP64, np.float64)], ids=str
)
def test_format_constants_match_numpy_finfo(fmt, npdt):
    fi = np.finfo(npdt)
    assert fmt.max_finite == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.epsilon == float(fi.eps)
    assert fmt.total_bits == fi.bits


@pytest.mark.parametrize("fmt", [BF16, FP8_E4M3FN, FP8_E5M2], ids=lambda f: f.name)
def test_format_constants_match_ml_dtypes_finfo(fmt):
    md = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the oracle for bf16 and fp8")
    fi = md.finfo(ml_dtype(fmt))
    assert fmt.max_finite == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.epsilon == float(fi.eps)
    assert fmt.total_bits == fi.bits


def test_named_format_facts():
    biases = (FP32.bias, FP16.bias, BF16.bias, FP8_E4M3FN.bias, FP8_E5M2.bias)
    assert biases == (127, 15, 127, 7, 15)
    assert (FP32.emin, FP32.emax) == (-126, 127)
    assert FP32.max_finite == (2 - 2**-23) * 2.0**127
    assert FP16.max_finite == 65504.0 and FP16.min_normal == 2.0**-14
    assert FP8_E4M3FN.max_finite == 448.0 and FP8_E4M3FN.emax == 8
    assert FP8_E5M2.max_finite == 57344.0
    assert BF16.min_normal == FP32.min_normal  # same exponent field, same range
    assert FP8_E4M3FN.inf_bits is None and not FP8_E4M3FN.has_inf
    assert (FP8_E4M3FN.nan_bits, FP8_E5M2.nan_bits, FP16.nan_bits) == (0x7F, 0x7E, 0x7E00)
    assert (FP16.inf_bits, BF16.inf_bits, FP8_E5M2.inf_bits) == (0x7C00, 0x7F80, 0x7C)
    assert [f.dtype for f in (FP64, FP32, FP16, FP8_E5M2)] == [
        np.uint64, np.uint32, np.uint16, np.uint8]
    assert F.FORMATS["bf16"] is BF16
    assert FloatFormat("e3m2", 3, 2).bias == 3
    assert FloatFormat("x", 3, 2) == FloatFormat("x", 3, 2, bias=3)
    assert len({FloatFormat("x", 3, 2), FloatFormat("x", 3, 2, bias=3)}) == 1
    assert "bias 15" in str(FP16)


@pytest.mark.parametrize("fmt", SMALL + CUSTOM, ids=lambda f: f.name)
def test_enumerate_format_counts_and_order(fmt):
    bits, values = F.enumerate_format(fmt)
    assert len(bits) == fmt.num_finite
    assert np.isfinite(values).all()
    assert values[0] == -fmt.max_finite and values[-1] == fmt.max_finite
    # strictly increasing except the two zeros, -0 first
    steps = np.diff(values)
    assert (steps > 0).sum() == len(values) - 2
    zeros = np.flatnonzero(values == 0)
    assert len(zeros) == 2 and np.signbit(values[zeros[0]]) and not np.signbit(values[zeros[1]])
    all_bits, all_values = F.enumerate_format(fmt, finite_only=False)
    assert len(all_bits) == 2**fmt.total_bits
    assert np.array_equal(all_bits, np.arange(2**fmt.total_bits))
    assert np.isnan(all_values).sum() == 2**fmt.total_bits - fmt.num_finite - 2 * fmt.has_inf


def test_fp8_value_counts():
    _, e4 = F.enumerate_format(FP8_E4M3FN)
    _, e5 = F.enumerate_format(FP8_E5M2)
    assert (len(np.unique(e4)), len(np.unique(e5))) == (253, 247)


# --- decode: every pattern of every small format against the outside systems --------------------


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
def test_decode_every_pattern_matches_oracle(fmt):
    bits = np.arange(2**fmt.total_bits, dtype=np.uint64).astype(fmt.dtype)
    got = decode(bits, fmt)
    want = oracle_decode(bits, fmt)
    assert got.dtype == np.float64
    assert same_float(got, want).all()
    assert np.array_equal(np.isnan(got), np.isnan(want))


def test_decode_bf16_is_the_top_half_of_fp32():
    # an oracle that needs no ml_dtypes: bf16 bits b are the fp32 bits b << 16
    bits = np.arange(2**16, dtype=np.uint32)
    want = widen((bits << 16).view(np.float32))
    assert same_float(decode(bits.astype(np.uint16), BF16), want).all()


def test_decode_fp32_random_and_special_patterns():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 1, 2, 0x007FFFFF, 0x00800000, 0x3F800000, 0x40480000, 0x7F7FFFFF,
                      0x7F800000, 0x7F800001, 0x7FC00000, 0x80000000, 0x80000001, 0xFF800000,
                      0xFFFFFFFF], dtype=np.uint32)
    bits = np.concatenate([bits, edges])
    assert same_float(decode(bits, FP32), widen(bits.view(np.float32))).all()


def test_decode_fp64_is_the_identity():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**64, size=100_000, dtype=np.uint64)
    assert same_float(decode(bits, FP64), bits.view(np.float64)).all()


@pytest.mark.parametrize("fmt", SMALL + CUSTOM, ids=lambda f: f.name)
def test_nonnegative_patterns_are_ordered_like_their_values(fmt):
    # the point of the biased exponent: as unsigned integers, patterns sort like their values
    bits = np.arange(fmt.sign_mask, dtype=np.uint64).astype(fmt.dtype)
    values = decode(bits, fmt)
    not_nan = ~np.isnan(values)
    assert not_nan.sum() >= fmt.num_finite // 2
    assert (np.diff(values[not_nan]) > 0).all()


@pytest.mark.parametrize("fmt", SMALL + CUSTOM + [FP32], ids=lambda f: f.name)
def test_decode_matches_the_field_formula(fmt):
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**fmt.total_bits, size=3000, dtype=np.uint64)
    sign, expo, man = F.fields(bits, fmt)
    got = decode(bits, fmt)
    p, top = fmt.man_bits, 2**fmt.exp_bits - 1
    for b, s, e, m, g in zip(bits, sign, expo, man, got, strict=True):
        assert int(b) == (int(s) << (fmt.exp_bits + p)) | (int(e) << p) | int(m)
        if e == top and (fmt.has_inf or m == 2**p - 1):
            assert math.isnan(g) if (m or not fmt.has_inf) else g == (-1) ** s * math.inf
            continue
        if e == 0:
            want = Fraction(int(m), 2**p) * Fraction(2) ** (1 - fmt.bias)
        else:
            want = (1 + Fraction(int(m), 2**p)) * Fraction(2) ** (int(e) - fmt.bias)
        assert Fraction(g) == (-1) ** int(s) * want
        assert bool(np.signbit(g)) == bool(s)


# --- encode: bit-exact with the outside systems for float32 input --------------------------------


def float32_probe(fmt, seed=0):
    """float32 inputs that exercise every rounding decision of fmt."""
    rng = np.random.default_rng(seed)
    _, values = F.enumerate_format(fmt)
    with np.errstate(over="ignore"):
        values32 = values.astype(np.float32)
    assert (values32.astype(np.float64) == values).all()  # representable in float32
    pos = values[values > 0]
    top = fmt.max_finite + 0.5 * float(F.ulp(fmt.max_finite, fmt))
    mids = np.concatenate([[0.5 * fmt.min_subnormal], 0.5 * (pos[1:] + pos[:-1]), [top]])
    mids32 = mids.astype(np.float32)
    assert (mids32.astype(np.float64) == mids).all()  # the ties are float32 values too
    near = np.concatenate([np.nextafter(mids32, np.float32(np.inf)),
                           np.nextafter(mids32, np.float32(0))])
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    log_uniform = np.exp2(rng.uniform(np.log2(fmt.min_subnormal) - 3,
                                      np.log2(fmt.max_finite) + 2, size=100_000))
    with np.errstate(over="ignore"):  # bf16's range reaches past float32's max: those are inf
        log_uniform = log_uniform.astype(np.float32)
    subnormal32 = rng.integers(1, 2**23, size=20_000, dtype=np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
                         np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal,
                         np.finfo(np.float32).smallest_normal, 1.0, -1.0], dtype=np.float32)
    parts = [values32, mids32, near, random_bits.view(np.float32), log_uniform, subnormal32,
             specials]
    out = np.concatenate(parts)
    return np.concatenate([out, -out])


@pytest.mark.parametrize("fmt", [FP16, BF16, FP8_E4M3FN, FP8_E5M2], ids=lambda f: f.name)
def test_encode_float32_matches_oracle_bit_exactly(fmt):
    x = float32_probe(fmt)
    got = encode(x, fmt)
    want = oracle_encode(x, fmt)
    assert got.dtype == fmt.dtype and got.shape == x.shape
    u = x.view(np.uint32)
    is_default_nan = (u & 0x7FFFFFFF) == 0x7FC00000
    payload_nan = np.isnan(x) & ~is_default_nan
    if fmt is FP16:
        # numpy's float16 cast carries NaN payload bits; we emit the canonical NaN (documented)
        check = ~payload_nan
        got_nan = decode(got[payload_nan], fmt)
        assert np.isnan(got_nan).all()
        assert (np.signbit(got_nan) == np.signbit(x[payload_nan])).all()
    else:
        check = np.ones(x.shape, bool)  # ml_dtypes canonicalizes every NaN, as we do
    mismatch = np.flatnonzero(check & (got != want))
    assert mismatch.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in mismatch[:5]]


def test_encode_fp32_from_float32_is_the_identity_except_nan_payloads():
    rng = np.random.default_rng(3)
    u = rng.integers(0, 2**32, size=300_000, dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    got = encode(x, FP32)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], u[~nan])
    assert np.array_equal(got[nan], (u[nan] & 0x80000000) | 0x7FC00000)


def test_encode_fp8_overflow_rules_match_ml_dtypes():
    md = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the oracle for fp8")
    x = np.array([447, 448, 449, 463.99, 464, 464.01, 479, 480, 500, 1e6, np.inf,
                  -464, -464.01, -500, -np.inf], dtype=np.float32)
    got = encode(x, FP8_E4M3FN)
    assert np.array_equal(got, x.astype(md.float8_e4m3fn).view(np.uint8))
    # e4m3fn does not saturate: past the 464 tie it is NaN, sign kept; 464 itself rounds to 448
    assert [int(b) for b in got] == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7F, 0x7F, 0x7F, 0x7F,
                                     0x7F, 0x7F, 0xFE, 0xFF, 0xFF, 0xFF]
    y = np.array([57343, 57344, 61439, 61440, 1e6, np.inf], dtype=np.float32)
    with np.errstate(over="ignore"):
        want = y.astype(md.float8_e5m2).view(np.uint8)
    assert np.array_equal(encode(y, FP8_E5M2), want)
    assert [int(b) for b in want] == [0x7B, 0x7B, 0x7B, 0x7C, 0x7C, 0x7C]  # IEEE: to inf


def test_encode_accepts_scalars_and_keeps_shape():
    assert encode(3.125, FP32) == 0x40480000 and isinstance(encode(3.125, FP32), np.uint32)
    assert encode(np.float32(1.0), FP16) == 0x3C00
    assert encode(-2, BF16) == 0xC000  # integers too, exactly
    assert encode(2**64 - 1, FP32) == 0x5F800000  # 2**64 after rounding
    assert encode(-(2**63), FP16) == 0xFC00  # overflows to -inf
    out = encode(np.zeros((2, 3), np.float32), FP8_E5M2)
    assert out.shape == (2, 3) and out.dtype == np.uint8
    assert encode([], FP16).shape == (0,)
    assert encode(1.0, "e5m2") == 0x3C


def test_encode_signed_zeros_and_specials():
    for fmt in ALL_FORMATS:
        sign = fmt.sign_mask
        assert encode(0.0, fmt) == 0 and encode(-0.0, fmt) == sign
        assert encode(np.nan, fmt) == fmt.nan_bits and encode(-np.nan, fmt) == sign | fmt.nan_bits
        inf = fmt.inf_bits if fmt.has_inf else fmt.nan_bits
        assert encode(np.inf, fmt) == inf and encode(-np.inf, fmt) == sign | inf


# --- float64 input: one rounding, where libraries round twice ------------------------------------


def test_encode_float64_matches_numpy_for_fp32_and_fp16():
    # numpy's float64 -> float32 (hardware) and float64 -> float16 (npy_double_to_half) round once
    rng = np.random.default_rng(4)
    u = rng.integers(0, 2**64, size=200_000, dtype=np.uint64)
    x = u.view(np.float64)
    x = x[~np.isnan(x)]
    scaled = rng.standard_normal(100_000) * np.exp2(rng.integers(-30, 20, size=100_000))
    for fmt, npdt in ((FP32, np.float32), (FP16, np.float16)):
        ties = F.double_rounding_inputs(fmt) if fmt is FP16 else np.array([])
        xs = np.concatenate([x, scaled, ties, -ties])
        with np.errstate(all="ignore"):
            want = xs.astype(npdt).view(UINT[fmt.total_bits])
        assert np.array_equal(encode(xs, fmt), want), fmt.name


@pytest.mark.parametrize("fmt", [FP16, BF16, FP8_E4M3FN, FP8_E5M2], ids=lambda f: f.name)
def test_double_rounding_inputs_are_real_and_we_round_them_once(fmt):
    xs = F.double_rounding_inputs(fmt)
    assert xs.dtype == np.float64 and len(xs) > 0 and (xs > 0).all()
    assert np.all(np.diff(xs) > 0)
    once, twice = encode(xs, fmt), encode_via(xs, fmt, FP32)
    assert (once != twice).all()
    # via float32 they land exactly on a tie of fmt
    via = decode(encode(xs, FP32), FP32)
    assert (via != xs).all()
    rng = np.random.default_rng(5)
    sample = xs if len(xs) <= 400 else np.concatenate(
        [xs[:50], xs[-50:], rng.choice(xs, 300, replace=False)])
    for x in sample:
        assert_matches_reference(float(x), fmt)
        assert_matches_reference(-float(x), fmt)
        twice_value = float(decode(encode_via(float(x), fmt, FP32), fmt))
        assert not same_float(twice_value, float(decode(encode(float(x), fmt), fmt)))


@pytest.mark.parametrize("fmt", [BF16, FP8_E4M3FN, FP8_E5M2], ids=lambda f: f.name)
def test_ml_dtypes_converts_float64_through_float32(fmt):
    """ml_dtypes 0.6 rounds float64 -> bf16/fp8 via float32: it matches encode_via, not encode."""
    xs = F.double_rounding_inputs(fmt)
    xs = np.concatenate([xs, -xs])
    lib = oracle_encode(xs, fmt)
    assert np.array_equal(lib, encode_via(xs, fmt, FP32))
    assert (lib != encode(xs, fmt)).all()


# The concrete cases the chapter shows: (fmt, float64 input, one rounding, two roundings).
CONCRETE = [
    (BF16, np.nextafter(1 + 2.0**-8, 2.0), 0x3F81, 0x3F80),  # just above the 1 | 1+2^-7 tie
    (BF16, np.nextafter((2 - 2.0**-8) * 2.0**127, 0.0), 0x7F7F, 0x7F80),  # max, not inf
    (BF16, np.nextafter(2.0**-134, 1.0), 0x0001, 0x0000),  # smallest subnormal, not 0
    (FP8_E4M3FN, np.nextafter(464.0, 1e3), 0x7F, 0x7E),  # past the tie: NaN, not 448
    (FP8_E4M3FN, np.nextafter(1.0625, 2.0), 0x39, 0x38),
    (FP8_E5M2, np.nextafter(61440.0, 0.0), 0x7B, 0x7C),  # 57344, not inf
    (FP16, np.nextafter(65520.0, 0.0), 0x7BFF, 0x7C00),  # numpy gets this one right
]


@pytest.mark.parametrize("fmt, x, once, twice", CONCRETE, ids=lambda v: getattr(v, "name", ""))
def test_concrete_double_rounding_cases(fmt, x, once, twice):
    assert encode(x, fmt) == once
    assert encode_via(x, fmt, FP32) == twice
    assert x in F.double_rounding_inputs(fmt)
    assert_matches_reference(float(x), fmt)


@pytest.mark.parametrize("fmt, x, once, twice", CONCRETE, ids=lambda v: getattr(v, "name", ""))
def test_concrete_double_rounding_cases_in_the_libraries(fmt, x, once, twice):
    if fmt is FP16:
        assert oracle_encode(x, fmt) == once  # numpy: float64 -> float16 in one rounding
    else:
        assert oracle_encode(x, fmt) == twice  # ml_dtypes: float64 -> float32 -> fmt


def test_float32_and_float16_inputs_equal_their_float64_values():
    rng = np.random.default_rng(6)
    x32 = rng.integers(0, 2**32, size=50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x16 = np.arange(2**16, dtype=np.uint16).view(np.float16)
    for fmt in (FP16, BF16, FP8_E4M3FN, FloatFormat("e3m2", 3, 2)):
        assert np.array_equal(encode(x32, fmt), encode(widen(x32), fmt))
        assert np.array_equal(encode(x16, fmt), encode(widen(x16), fmt))


# --- Hypothesis properties -----------------------------------------------------------------------

finite64 = st.floats(allow_nan=False, allow_infinity=False)
fmt_strategy = st.sampled_from([f for f in ALL_FORMATS if f.man_bits >= 1])


@st.composite
def float64_formats(draw):
    """Random formats whose every value is a float64 (so decode is exact)."""
    e = draw(st.integers(2, 11))
    p = draw(st.integers(1, 52))
    conv = draw(st.sampled_from(["ieee", "fn"]))
    default = 2 ** (e - 1) - 1
    bias = draw(st.integers(default - 8, default + 8))
    fmt = FloatFormat(f"e{e}m{p}", e, p, bias=bias, convention=conv)
    assume(fmt.emax <= 1023 and fmt.emin - p >= -1074)
    return fmt


@settings(max_examples=400)
@given(x=finite64, fmt=fmt_strategy)
def test_encode_is_the_exactly_nearest_value(x, fmt):
    assert_matches_reference(x, fmt)


@settings(max_examples=300)
@given(x=finite64, fmt=float64_formats())
def test_encode_random_formats_is_the_exactly_nearest_value(x, fmt):
    assert_matches_reference(x, fmt)


@settings(max_examples=200)
@given(x=st.integers(-(2**63), 2**64 - 1), fmt=fmt_strategy)
def test_encode_integers_rounds_once(x, fmt):
    assert_matches_reference(x, fmt)


# Formats whose values float64 cannot hold (more precision, or an exponent range far away):
# encode must still round exactly, which only integer arithmetic on the input's bits can do.
WIDE = [
    FloatFormat("e8m55", 8, 55),
    FloatFormat("e3m60", 3, 60),
    FloatFormat("e8m3_bias-100", 8, 3, bias=-100),  # smallest subnormal 2**98
    FloatFormat("e6m5_bias200", 6, 5, bias=200),  # largest finite about 2**-137
    FloatFormat("e15m48fn", 15, 48, convention="fn"),
]


def near_powers_of_two():
    out = [2**64 - d for d in (1, 2, 3, 511, 512, 513, 767, 768, 769, 1000, 1024, 1025)]
    out += [2**k + d for k in range(50, 64) for d in (-3, -1, 1, 3)]
    return out + [-v for v in out if v <= 2**63]


@pytest.mark.parametrize("fmt", WIDE + [FP64, FP32], ids=lambda f: f.name)
def test_encode_integers_near_powers_of_two_exactly(fmt):
    for x in near_powers_of_two():
        assert_matches_reference(x, fmt)
    xs = np.array([v for v in near_powers_of_two() if v < 2**63], dtype=np.int64)
    assert np.array_equal(encode(xs, fmt), [encode(int(v), fmt) for v in xs])


def test_encode_a_56_bit_integer_that_float64_cannot_hold():
    # 2**64 - 768 is (2**56 - 3) * 2**8: exact in e8m55, but float64 rounds it to 2**64
    fmt = WIDE[0]
    assert int(encode(2**64 - 768, fmt)) == ((63 + 127) << 55) | (2**55 - 3)


@settings(max_examples=200)
@given(x=st.one_of(finite64, st.integers(-(2**63), 2**64 - 1)), fmt=st.sampled_from(WIDE))
def test_encode_wide_formats_is_the_exactly_nearest_value(x, fmt):
    assert_matches_reference(x, fmt)


@settings(max_examples=300)
@given(data=st.data(), fmt=float64_formats())
def test_decode_then_encode_gives_the_pattern_back(data, fmt):
    b = data.draw(st.integers(0, 2**fmt.total_bits - 1))
    v = decode(b, fmt)
    assume(not np.isnan(v))
    assert encode(v, fmt) == b
    assert encode(np.float64(v), fmt) == b


@settings(max_examples=300)
@given(x=finite64, y=finite64, fmt=fmt_strategy)
def test_rounding_is_monotonic(x, y, fmt):
    x, y = min(x, y), max(x, y)
    if fmt.convention == "fn":  # past the top the result is NaN, which has no order
        assume(abs(x) <= fmt.max_finite and abs(y) <= fmt.max_finite)
    assert decode(encode(x, fmt), fmt) <= decode(encode(y, fmt), fmt)


@settings(max_examples=300)
@given(x=st.floats(), fmt=st.sampled_from(ALL_FORMATS))
def test_negation_flips_only_the_sign_bit(x, fmt):
    assert int(encode(-x, fmt)) == int(encode(x, fmt)) ^ fmt.sign_mask


@settings(max_examples=300)
@given(x=finite64, fmt=st.sampled_from(ALL_FORMATS))
def test_error_is_at_most_half_an_ulp(x, fmt):
    r = decode(encode(x, fmt), fmt)
    assume(np.isfinite(r))
    assert abs(Fraction(float(r)) - Fraction(x)) <= Fraction(float(F.ulp(x, fmt))) / 2


@settings(max_examples=200)
@given(data=st.data(), fmt=float64_formats())
def test_pattern_order_is_value_order(data, fmt):
    a = data.draw(st.integers(0, fmt.sign_mask - 1))
    b = data.draw(st.integers(0, fmt.sign_mask - 1))
    va, vb = decode(a, fmt), decode(b, fmt)
    assume(not (np.isnan(va) or np.isnan(vb)))
    assert (a < b) == (va < vb)


# --- ulp, fields, bit strings, breakdown ---------------------------------------------------------


@pytest.mark.parametrize("fmt", SMALL + CUSTOM, ids=lambda f: f.name)
def test_ulp_is_the_gap_to_the_next_value(fmt):
    _, values = F.enumerate_format(fmt)
    pos = values[values >= 0][1:]  # +0 onwards, skipping -0
    gaps = np.diff(pos)
    assert np.array_equal(F.ulp(pos[:-1], fmt), gaps)
    assert F.ulp(fmt.max_finite, fmt) == 2.0 ** (fmt.emax - fmt.man_bits)  # the top binade's
    assert F.ulp(np.inf, fmt) != F.ulp(np.inf, fmt)  # NaN
    if fmt.bias == 2 ** (fmt.exp_bits - 1) - 1:  # 1.0 is a normal number: ulp(1) = epsilon
        assert fmt.ulp(1.0) == fmt.epsilon


def test_ulp_matches_numpy_spacing():
    rng = np.random.default_rng(7)
    for fmt, npdt in ((FP16, np.float16), (FP32, np.float32)):
        x = np.abs(rng.standard_normal(10_000) * np.exp2(rng.integers(-40, 15, 10_000)))
        x = x.astype(npdt)
        x = x[x < np.finfo(npdt).max]
        assert np.array_equal(F.ulp(x, fmt), np.spacing(x).astype(np.float64))


def test_fields_and_bit_string_of_the_worked_example():
    bits = encode(3.125, FP32)  # 11.001b = 1.1001b x 2^1
    assert F.fields(bits, FP32) == (0, 128, 0b1001 << 19)
    assert F.bit_string(bits, FP32) == "0 10000000 10010000000000000000000"
    assert F.bit_string(bits, FP32, sep="") == np.binary_repr(0x40480000, 32)
    assert F.bit_string(0xFF, FP8_E4M3FN, sep="|") == "1|1111|111"
    assert F.bit_string(0b10, FloatFormat("e2m0", 2, 0, convention="fn")) == "0 10"
    s, e, m = F.fields(np.array([0x3C00, 0x8001, 0x7C00], np.uint16), FP16)
    assert s.tolist() == [0, 1, 0] and e.tolist() == [15, 0, 31] and m.tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "fmt, bits, kind, value",
    [
        (FP32, 0x40480000, "normal", 3.125),
        (FP16, 0x0001, "subnormal", 2.0**-24),
        (FP16, 0x8000, "zero", -0.0),
        (FP16, 0xFC00, "inf", -np.inf),
        (FP16, 0x7E00, "nan", np.nan),
        (FP8_E4M3FN, 0x7E, "normal", 448.0),
        (FP8_E4M3FN, 0x7F, "nan", np.nan),
        (FP8_E5M2, 0x7B, "normal", 57344.0),
        (BF16, 0x0080, "normal", 2.0**-126),
    ],
)
def test_float_parts(fmt, bits, kind, value):
    parts = F.float_parts(bits, fmt)
    assert parts.kind == kind and parts.bits == bits
    assert same_float(parts.value, value)
    assert (parts.sign, parts.exponent, parts.mantissa) == F.fields(bits, fmt)
    assert parts.bit_string == F.bit_string(bits, fmt)
    if kind in ("normal", "subnormal", "zero"):
        assert parts.significand * 2.0**parts.unbiased_exponent == abs(value)
    else:
        assert parts.unbiased_exponent is None and parts.significand is None
    text = str(parts)
    assert kind in text and parts.bit_string in text and fmt.name in text


def test_breakdown_formula_of_the_worked_example():
    parts = F.float_parts(encode(3.125, FP32), FP32)
    assert parts.unbiased_exponent == 1 and parts.significand == 1.5625  # 1.1001b
    assert parts.formula == "+1.1001b x 2^(128-127) = 3.125"


# --- Energy table --------------------------------------------------------------------------------


def test_energy_table_reproduces_the_seed_ratios():
    e = F.ENERGY_45NM_PJ
    assert round(e["fp32 add"] / e["int8 add"]) == 30  # "int8 add ... 30x less than fp32 add"
    assert int(e["fp32 mult"] / e["int8 mult"]) == 18  # "int8 mul ... 18x less than fp32 mul"
    assert all(v > 0 for v in e.values())
    assert "Horowitz" in F.ENERGY_SOURCE and "45 nm" in F.ENERGY_SOURCE


# --- Bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(exp_bits=0, man_bits=3), ValueError, "exp_bits"),
        (dict(exp_bits=4, man_bits=-1), ValueError, "man_bits"),
        (dict(exp_bits=11, man_bits=53), ValueError, "<= 64"),
        (dict(exp_bits=4, man_bits=3, convention="saturate"), ValueError, "convention"),
        (dict(exp_bits=1, man_bits=3), ValueError, "exp_bits"),
        (dict(exp_bits=4, man_bits=0), ValueError, "man_bits"),
        (dict(exp_bits=4.0, man_bits=3), TypeError, "exp_bits"),
        (dict(exp_bits=True, man_bits=3), TypeError, "exp_bits"),
        (dict(exp_bits=4, man_bits="3"), TypeError, "man_bits"),
        (dict(exp_bits=4, man_bits=3, bias=7.0), TypeError, "bias"),
    ],
)
def test_bad_format_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FloatFormat("bad", **kwargs)


def test_bad_name():
    with pytest.raises(TypeError, match="name"):
        FloatFormat("", 4, 3)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: decode(2**16, FP16), ValueError, "bits=65536 is out of range for fp16"),
        (lambda: decode(-1, FP16), ValueError, "bits=-1"),
        (lambda: decode(np.array([0, 256]), FP8_E5M2), ValueError, "bits holds 256"),
        (lambda: decode(np.array([-1], np.int8), FP8_E5M2), ValueError, "unsigned view"),
        (lambda: decode(np.array([1.0]), FP16), TypeError, "bits must be integer"),
        (lambda: decode(True, FP16), TypeError, "bool"),
        (lambda: F.fields(2**32, FP32), ValueError, "out of range"),
        (lambda: encode("1.5", FP16), TypeError, "x must be"),
        (lambda: encode(1 + 2j, FP16), TypeError, "x must be"),
        (lambda: encode(None, FP16), TypeError, "x must be"),
        (lambda: encode(True, FP16), TypeError, "bool"),
        (lambda: encode(np.array([1], dtype=np.longdouble), FP16), TypeError, "x must be"),
        (lambda: encode([[1.0], [1.0, 2.0]], FP16), TypeError, "x must be"),
        (lambda: encode(2**64, FP16), ValueError, "64 bits"),
        (lambda: encode(1.0, "fp128"), ValueError, "fmt must be"),
        (lambda: encode(1.0, 16), TypeError, "fmt must be a FloatFormat"),
        (lambda: encode_via(1.0, FP16, "nope"), ValueError, "via must be"),
        (lambda: F.ulp("x", FP16), TypeError, "x must be"),
        (lambda: F.enumerate_format(FP32), ValueError, "at most 16 bits"),
        (lambda: F.double_rounding_inputs(FP32), ValueError, "at most 16 bits"),
        (lambda: F.bit_string(np.array([1, 2]), FP16), ValueError, "single bit pattern"),
        (lambda: F.float_parts(np.array([1, 2]), FP16), ValueError, "single bit pattern"),
        (lambda: F.float_parts(0x1FF, FP8_E4M3FN), ValueError, "out of range for e4m3fn"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# The conventions without infinities: "fnuz" (float8 e4m3fnuz / e5m2fnuz) and "finite" (the OCP
# Microscaling elements fp4 e2m1, fp6 e2m3 / e3m2), against ml_dtypes on every pattern and on
# random, tie, subnormal, overflowing and special inputs.
# ------------------------------------------------------------------------------------------------

NO_INF_FORMATS = {
    "float4_e2m1fn": F.FP4_E2M1,
    "float6_e2m3fn": F.FP6_E2M3,
    "float6_e3m2fn": F.FP6_E3M2,
    "float8_e4m3fnuz": F.FP8_E4M3FNUZ,
    "float8_e5m2fnuz": F.FP8_E5M2FNUZ,
}


@pytest.mark.parametrize("name", sorted(NO_INF_FORMATS))
def test_no_inf_conventions_match_ml_dtypes_on_every_pattern_and_on_hard_inputs(name):
    md = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the oracle for fp4/fp6/fnuz")
    fmt, t = NO_INF_FORMATS[name], getattr(md, name)
    codes = np.arange(2**fmt.total_bits, dtype=np.uint8)
    ref = codes.view(t).astype(np.float64)
    got = decode(codes, fmt)
    assert np.array_equal(got, ref, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(ref))
    assert fmt.max_finite == float(md.finfo(t).max)
    assert fmt.min_subnormal == float(md.finfo(t).smallest_subnormal)
    assert fmt.num_finite == int(np.isfinite(ref).sum())
    finite = np.unique(got[np.isfinite(got)])
    ties = (finite[1:] + finite[:-1]) / 2                     # every midpoint between values
    rng = np.random.default_rng(7)
    x = np.concatenate([
        rng.standard_t(2, 50_000) * fmt.max_finite / 4,       # random, heavy-tailed
        finite, ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf),
        rng.uniform(-2, 2, 5000) * fmt.min_normal,             # subnormal range
        fmt.max_finite * np.array([1.01, 1.2, 2.0, 1e6, -1.01, -1e6]),   # overflow
        [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, -1e-30, 1e-30],
    ]).astype(np.float32)
    with np.errstate(invalid="ignore"):
        oracle = x.astype(t).view(np.uint8)
    assert np.array_equal(encode(x, fmt), oracle)
    print(f"{name}: {2**fmt.total_bits} patterns and {x.size} inputs match ml_dtypes "
          f"{md.__version__}")


def test_finite_saturates_and_fnuz_has_one_nan_and_no_negative_zero():
    e2m1 = NO_INF_FORMATS["float4_e2m1fn"]
    assert encode(np.array([7.0, 1e9, np.inf, -np.inf]), e2m1).tolist() == [7, 7, 7, 15]
    # NaN has no pattern: a zero of the opposite sign (ml_dtypes' and ONNX's arbitrary choice)
    nan = np.array([0x7FC00000, 0xFFC00000], np.uint32).view(np.float32)
    assert encode(nan, e2m1).tolist() == [8, 0]
    assert e2m1.nan_bits is None and e2m1.inf_bits is None and e2m1.max_bits == 7
    fnuz = NO_INF_FORMATS["float8_e4m3fnuz"]
    assert encode(np.array([-0.0, -1e-9, np.nan, -np.inf, 1e9]), fnuz).tolist() == [0, 0, 128,
                                                                                 128, 128]
    assert np.isnan(decode(0x80, fnuz)) and fnuz.max_finite == 240 and fnuz.num_finite == 255
    assert F.enumerate_format(fnuz)[1].size == 255
