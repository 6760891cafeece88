"""Fixed-point arithmetic: Qm.n numbers, rounding modes, MAC bit widths and TFLite's rescaling.

The fixed-point chapter (``book/fixed_point.md``) explains every function here.  The module has
three parts:

* **Qm.n numbers.**  A signed Qm.n number is an integer ``q`` with ``1 + m + n`` bits (one sign
  bit, ``m`` integer bits, ``n`` fraction bits) standing for the real value ``r = q * 2**-n``.
  :func:`to_fixed`, :func:`from_fixed`, :func:`fixed_add` and :func:`fixed_mul` work on the raw
  integers, with the rounding modes of :data:`ROUNDING_MODES` and an explicit overflow policy.
* **The multiply-accumulate (MAC) unit's bit widths.**  :func:`product_range`,
  :func:`accumulator_bits`, :func:`min_accumulator_bits` and :func:`max_k` say how wide a
  product and a sum of ``K`` products are, and how long a dot product fits an accumulator.
* **TFLite's integer rescaling.**  A real multiplier ``M`` (in quantized inference
  ``M = S_w * S_x / S_y``) is stored as a 31-bit integer ``multiplier`` and a power-of-two
  ``shift`` with ``M ~ multiplier * 2**(shift - 31)`` (:func:`quantize_multiplier`), and applied
  to int32 accumulators with integers only (:func:`srdhm`, :func:`rounding_divide_by_pot`,
  :func:`multiply_by_quantized_multiplier`), bit for bit as gemmlowp's routines compute it as
  TensorFlow Lite's source transcribes them (``tensorflow/lite/kernels/internal/
  quantization_util.cc`` and ``common.cc``, and gemmlowp's ``fixedpoint/fixedpoint.h``), in both
  of TFLite's builds: the default double rounding and the ``TFLITE_SINGLE_ROUNDING`` single
  rounding.  LiteRT's kernels do not all use it: :func:`rounding_divide_by_pot_half_up` and
  :func:`multiply_by_quantized_multiplier_half_up` are the rounding of its built-in kernels on
  ruy (see the deploy chapter).

Everything is vectorized over NumPy arrays and also accepts Python scalars: array in, array out;
scalars in, a Python ``int`` (or ``float``) out.  Nothing ever wraps around silently: overflow
saturates or raises, except where the caller asks for ``overflow="wrap"`` to see the damage.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import (
    INT32_MAX,
    INT32_MIN,
    check_bool,
    check_choice,
    check_int,
    int_array,
    real_array,
)

__all__ = [
    "ROUNDING_MODES",
    "accumulator_bits",
    "fixed_add",
    "fixed_mul",
    "fixed_range",
    "from_fixed",
    "max_k",
    "min_accumulator_bits",
    "multiplier_to_real",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_half_up",
    "power_of_two_exponent",
    "product_range",
    "quantize_multiplier",
    "round_shift",
    "rounding_divide_by_pot",
    "rounding_divide_by_pot_half_up",
    "srdhm",
    "to_fixed",
]

#: The rounding modes of :func:`round_shift`, :func:`to_fixed` and :func:`fixed_mul`.
#: Each rounds a real value ``v`` that lies between two integers; they differ on the ties
#: (``v`` exactly halfway) and, for the last three, everywhere else too.
#:
#: ``"nearest_even"``         nearest integer, ties to the even one (IEEE 754's default,
#:                            NumPy's ``np.rint``, ONNX Runtime's requantization)
#: ``"half_away_from_zero"``  nearest integer, ties away from zero (C's ``std::round``)
#: ``"half_up"``              nearest integer, ties toward +infinity (``floor(v + 1/2)``)
#: ``"floor"``                the integer below (an arithmetic right shift ``>>``)
#: ``"toward_zero"``          drop the fraction (C's integer ``/``, ``static_cast<int>``)
#: ``"stochastic"``           up with probability ``v - floor(v)``, else down (needs a seed)
ROUNDING_MODES = (
    "nearest_even",
    "half_away_from_zero",
    "half_up",
    "floor",
    "toward_zero",
    "stochastic",
)

_OVERFLOW_POLICIES = ("saturate", "raise", "wrap")
_TFLITE_ROUNDINGS = ("double", "single")

#: Largest operand or accumulator width the accumulator-sizing functions accept (exact Python
#: integers; far beyond any hardware, small enough to answer at once).
MAX_OPERAND_BITS = 1024
#: Largest number of products ``k`` they accept.
MAX_K_TERMS = 2**64
# round_shift keeps |x| below 2**62 so that x plus a rounding offset (< 2**61) fits int64.
_ROUND_SHIFT_LIMIT = 2**62


# --- Validation helpers -------------------------------------------------------------------------


def _is_scalar(value) -> bool:
    try:
        return np.ndim(value) == 0
    except ValueError:  # a ragged nested list: not a scalar; the validators say what is wrong
        return False


def _result(array: np.ndarray, scalar: bool):
    """Return a Python scalar when every input was a scalar, else the array."""
    if scalar:
        return array.item()
    return array


def _check_q_format(int_bits, frac_bits) -> tuple[int, int]:
    m = check_int(int_bits, "int_bits", 0, 31)
    n = check_int(frac_bits, "frac_bits", 0, 31)
    if 1 + m + n > 32:
        raise ValueError(
            f"int_bits + frac_bits must be at most 31: a Q{m}.{n} number needs 1 + {m} + {n} = "
            f"{1 + m + n} bits, and at most 32 are supported (so that a product of two of them "
            f"is exact in int64)"
        )
    return m, n


def _rng(seed, mode: str):
    if mode != "stochastic":
        return None
    if seed is None:
        raise ValueError(
            "seed is required for rounding='stochastic' (an int or a numpy.random.Generator), "
            "so that the result is reproducible"
        )
    return np.random.default_rng(seed)


# --- Rounding -----------------------------------------------------------------------------------


def round_shift(x, shift, mode="nearest_even", *, seed=None):
    r"""Divide integers by :math:`2^{\text{shift}}` and round with a named mode, exactly.

    .. math:: \operatorname{round\_shift}(x, s) = \operatorname{round}_{\text{mode}}(x / 2^s)

    Integer arithmetic only: with :math:`f = \lfloor x / 2^s \rfloor` (the arithmetic right
    shift ``x >> s``) and the remainder :math:`\rho = x - 2^s f \in [0, 2^s)`, the result is
    :math:`f` or :math:`f + 1` depending on :math:`\rho` compared with the half
    :math:`h = 2^{s-1}`:

    ================== ===========================================================
    mode               rounds up (to :math:`f + 1`) when
    ================== ===========================================================
    nearest_even       :math:`\rho > h`, or :math:`\rho = h` and :math:`f` is odd
    half_away_from_zero :math:`\rho > h`, or :math:`\rho = h` and :math:`x > 0`
    half_up            :math:`\rho \ge h` (ties toward :math:`+\infty`)
    floor              never
    toward_zero        :math:`\rho > 0` and :math:`x < 0`
    stochastic         :math:`u < \rho` for :math:`u` uniform in :math:`[0, 2^s)`
    ================== ===========================================================

    so stochastic rounding goes up with probability exactly :math:`\rho / 2^s` and is unbiased
    on average.  See the fixed-point chapter.

    Parameters
    ----------
    x : int or array of integer dtype
        Values with :math:`|x| < 2^{62}`.
    shift : int
        The power of two to divide by, 0 to 62 (0 returns ``x`` unchanged).
    mode : str
        One of :data:`ROUNDING_MODES`.
    seed : int or numpy.random.Generator, optional
        Required for ``mode="stochastic"``; ignored otherwise.

    Returns
    -------
    int or numpy.ndarray of int64
    """
    check_choice(mode, "mode", ROUNDING_MODES)
    s = check_int(shift, "shift", 0, 62)
    scalar = _is_scalar(x)
    x = int_array(x, "x", -_ROUND_SHIFT_LIMIT + 1, _ROUND_SHIFT_LIMIT - 1,
                  what="below 2**62 in size")
    rng = _rng(seed, mode)
    return _result(_round_shift(x, s, mode, rng), scalar)


def _round_shift(x: np.ndarray, s: int, mode: str, rng) -> np.ndarray:
    if s == 0:
        return x.copy()
    f = x >> s
    rho = x - (f << s)
    half = np.int64(1) << (s - 1)
    if mode == "nearest_even":
        up = (rho > half) | ((rho == half) & ((f & 1) == 1))
    elif mode == "half_away_from_zero":
        up = (rho > half) | ((rho == half) & (x > 0))
    elif mode == "half_up":
        up = rho >= half
    elif mode == "floor":
        up = np.zeros(x.shape, dtype=bool)
    elif mode == "toward_zero":
        up = (rho > 0) & (x < 0)
    else:  # stochastic
        u = rng.integers(0, np.int64(1) << s, size=x.shape, dtype=np.int64)
        up = u < rho
    return f + up.astype(np.int64)


def _round_real(v: np.ndarray, mode: str, rng) -> np.ndarray:
    """Round float64 values to integral float64 values with a named mode (exact)."""
    f = np.floor(v)
    d = v - f  # exact: the fraction of a float is a float
    if mode == "nearest_even":
        return np.rint(v)
    if mode == "half_away_from_zero":
        return f + ((d > 0.5) | ((d == 0.5) & (v > 0)))
    if mode == "half_up":
        return f + (d >= 0.5)
    if mode == "floor":
        return f
    if mode == "toward_zero":
        return np.trunc(v)
    u = rng.random(size=v.shape)  # stochastic
    return f + (u < d)


# --- Qm.n numbers -------------------------------------------------------------------------------


def fixed_range(int_bits: int, frac_bits: int) -> tuple[int, int]:
    r"""The raw integer range of a signed Qm.n number.

    A Qm.n number has one sign bit, :math:`m` integer bits and :math:`n` fraction bits, so its
    raw integer :math:`q` is a :math:`(1 + m + n)`-bit two's complement integer and its value is
    :math:`r = q \cdot 2^{-n}`:

    .. math::
        q \in [-2^{m+n},\ 2^{m+n} - 1], \qquad r \in [-2^{m},\ 2^{m} - 2^{-n}]

    with a step (resolution) of :math:`2^{-n}`.  This is the convention of ARM and of gemmlowp
    (the sign bit is not counted in :math:`m`).  See the fixed-point chapter.

    Returns
    -------
    (qmin, qmax) : tuple of int
    """
    m, n = _check_q_format(int_bits, frac_bits)
    return -(2 ** (m + n)), 2 ** (m + n) - 1


def _apply_overflow(q: np.ndarray, qmin: int, qmax: int, overflow: str, what: str) -> np.ndarray:
    if overflow == "saturate":
        return np.clip(q, qmin, qmax)
    if overflow == "wrap":
        width = qmax - qmin + 1
        return (q - qmin) % width + qmin
    bad = (q < qmin) | (q > qmax)
    if np.any(bad):
        raise ValueError(
            f"{what} overflows the format's range [{qmin}, {qmax}] in "
            f"{int(np.count_nonzero(bad))} place(s) (e.g. {int(q[bad].flat[0])}); "
            f"use overflow='saturate' to clamp"
        )
    return q


def to_fixed(x, int_bits: int, frac_bits: int, *, rounding="nearest_even",
             overflow="saturate", seed=None):
    r"""Quantize real numbers to raw Qm.n integers.

    .. math::
        q = \operatorname{overflow}\bigl(\operatorname{round}_{\text{mode}}(x \cdot 2^{n})\bigr),
        \qquad q \in [-2^{m+n}, 2^{m+n} - 1]

    :math:`x \cdot 2^n` is exact in float64, so the only error is the rounding (at most half a
    step :math:`2^{-n-1}` for the round-to-nearest modes, under a step for the others) and, out
    of range, the overflow policy:

    * ``"saturate"`` clamps to the nearest end of the range (what DSPs and NN kernels do);
    * ``"raise"`` raises ``ValueError``;
    * ``"wrap"`` keeps the low :math:`1 + m + n` bits (two's complement wrap-around), which is what
      plain integer hardware does and what this function never does unless asked: a value just
      above the top of the range comes back near the bottom.

    See the fixed-point chapter.

    Parameters
    ----------
    x : float or array_like of real numbers
        Finite values (NaN and infinities are rejected).
    int_bits, frac_bits : int
        :math:`m \ge 0` and :math:`n \ge 0` with :math:`1 + m + n \le 32`.
    rounding : str
        One of :data:`ROUNDING_MODES`.
    overflow : {"saturate", "raise", "wrap"}
    seed : int or numpy.random.Generator, optional
        Required for ``rounding="stochastic"``.

    Returns
    -------
    int or numpy.ndarray of int64
        The raw integers :math:`q`; :func:`from_fixed` turns them back into reals.
    """
    m, n = _check_q_format(int_bits, frac_bits)
    check_choice(rounding, "rounding", ROUNDING_MODES)
    check_choice(overflow, "overflow", _OVERFLOW_POLICIES)
    scalar = _is_scalar(x)
    xv = real_array(x, "x")
    rng = _rng(seed, rounding)
    qmin, qmax = fixed_range(m, n)
    r = _round_real(xv * 2.0**n, rounding, rng)  # integral float64 values, possibly huge
    if overflow == "raise":
        bad = (r < qmin) | (r > qmax)
        if np.any(bad):
            raise ValueError(
                f"x overflows the Q{m}.{n} range [{-(2.0**m)}, {2.0**m - 2.0**-n}] in "
                f"{int(np.count_nonzero(bad))} place(s) (e.g. x = {xv[bad].flat[0]}); "
                "use overflow='saturate' to clamp"
            )
    if overflow == "wrap" and np.any(np.abs(r) >= 2.0**62):
        raise ValueError(
            "x is too large in magnitude to wrap exactly (|x * 2**frac_bits| >= 2**62)"
        )
    # Saturation first clamps in float64 (exact: the ends are small integers), so that values
    # far out of range never reach the int64 conversion.
    q = np.clip(r, qmin, qmax) if overflow == "saturate" else r
    q = _apply_overflow(q.astype(np.int64), qmin, qmax, overflow, "x")
    return _result(q, scalar)


def from_fixed(q, int_bits: int, frac_bits: int):
    r"""The real value of raw Qm.n integers: :math:`r = q \cdot 2^{-n}` (exact in float64).

    ``q`` must lie in the format's range :func:`fixed_range`.  See the fixed-point chapter.

    Returns
    -------
    float or numpy.ndarray of float64
    """
    m, n = _check_q_format(int_bits, frac_bits)
    qmin, qmax = fixed_range(m, n)
    scalar = _is_scalar(q)
    q = int_array(q, "q", qmin, qmax, what=f"a raw Q{m}.{n} integer: int_bits={m}, frac_bits={n}")
    return _result(np.ldexp(q.astype(np.float64), -n), scalar)


def _raw_operands(a, b, m: int, n: int) -> tuple[bool, np.ndarray, np.ndarray]:
    """(both scalars?, ``a``, ``b``): two raw Qm.n integers (int64), each inside the format."""
    qmin, qmax = fixed_range(m, n)
    fmt = f"a raw Q{m}.{n} integer: int_bits={m}, frac_bits={n}"
    return (_is_scalar(a) and _is_scalar(b), int_array(a, "a", qmin, qmax, what=fmt),
            int_array(b, "b", qmin, qmax, what=fmt))


def fixed_add(a, b, int_bits: int, frac_bits: int, *, overflow="saturate"):
    r"""Add two Qm.n numbers (raw integers) in the same format.

    .. math:: q_{a+b} = \operatorname{overflow}(q_a + q_b)

    The sum of two raw integers is exact (the binary points line up), but it needs one more bit:
    it can leave the range, and then the overflow policy decides (``"saturate"``, ``"raise"``
    or ``"wrap"``; see :func:`to_fixed`).  See the fixed-point chapter.

    Returns
    -------
    int or numpy.ndarray of int64
    """
    m, n = _check_q_format(int_bits, frac_bits)
    check_choice(overflow, "overflow", _OVERFLOW_POLICIES)
    qmin, qmax = fixed_range(m, n)
    scalar, qa, qb = _raw_operands(a, b, m, n)
    return _result(_apply_overflow(qa + qb, qmin, qmax, overflow, "a + b"), scalar)


def fixed_mul(a, b, int_bits: int, frac_bits: int, *, rounding="nearest_even",
              overflow="saturate", seed=None):
    r"""Multiply two Qm.n numbers (raw integers) and return a Qm.n number.

    .. math::
        q_{ab} = \operatorname{overflow}\Bigl(
                 \operatorname{round}_{\text{rounding}}\bigl(q_a q_b / 2^{n}\bigr)\Bigr)

    The integer product :math:`q_a q_b` is exact and has :math:`2n` fraction bits (a
    Q(2m+1).(2n) number); rescaling it back to :math:`n` fraction bits is a division by
    :math:`2^n` that must round (:func:`round_shift`), and the result can overflow
    (:math:`(-2^m)^2 = 2^{2m}` is outside Qm.n for every :math:`m`).  See the fixed-point chapter.

    Returns
    -------
    int or numpy.ndarray of int64
    """
    m, n = _check_q_format(int_bits, frac_bits)
    check_choice(rounding, "rounding", ROUNDING_MODES)
    check_choice(overflow, "overflow", _OVERFLOW_POLICIES)
    qmin, qmax = fixed_range(m, n)
    scalar, qa, qb = _raw_operands(a, b, m, n)
    rng = _rng(seed, rounding)
    q = _round_shift(qa * qb, n, rounding, rng)
    return _result(_apply_overflow(q, qmin, qmax, overflow, "a * b"), scalar)


# --- The MAC unit's bit widths ------------------------------------------------------------------


def _operand_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def product_range(a_bits: int, b_bits: int, *, a_signed=True, b_signed=True) -> tuple[int, int]:
    r"""The smallest and largest product of an ``a_bits``-bit and a ``b_bits``-bit integer.

    Signed N-bit operands lie in :math:`[-2^{N-1}, 2^{N-1} - 1]`, unsigned ones in
    :math:`[0, 2^N - 1]`; the extremes of the product are among the four corner products.
    For int8 × int8: :math:`[-128 \cdot 127, (-128)^2] = [-16256, 16384]`; for
    uint8 × int8: :math:`[255 \cdot (-128), 255 \cdot 127] = [-32640, 32385]`.  Either way the
    product needs 16 bits: :math:`8 + 8`.  ``a_bits`` and ``b_bits`` lie in [1, 1024]
    (:data:`MAX_OPERAND_BITS`).  See the fixed-point chapter.

    Returns
    -------
    (lo, hi) : tuple of int
    """
    a_bits = check_int(a_bits, "a_bits", 1, MAX_OPERAND_BITS)
    b_bits = check_int(b_bits, "b_bits", 1, MAX_OPERAND_BITS)
    a_lo, a_hi = _operand_range(a_bits, check_bool(a_signed, "a_signed"))
    b_lo, b_hi = _operand_range(b_bits, check_bool(b_signed, "b_signed"))
    corners = [a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi]
    return min(corners), max(corners)


def accumulator_bits(a_bits: int, b_bits: int, k: int) -> int:
    r"""The textbook accumulator width for ``k`` products: :math:`N_a + N_b + \lceil\log_2 K\rceil`.

    A product of an :math:`N_a`-bit and an :math:`N_b`-bit integer needs :math:`N_a + N_b` bits
    (2N for N-bit operands), and adding :math:`K` of them can grow the magnitude :math:`K`-fold,
    i.e. by :math:`\lceil\log_2 K\rceil` bits.  Into a signed accumulator the bound suffices
    whenever at least one operand is signed, and is then exact or one bit generous (for int8 ×
    int8 the largest product is :math:`2^{14}`, not :math:`2^{15}`); for unsigned × unsigned it
    can be one bit short, because the sum also needs a sign bit.  :func:`min_accumulator_bits`
    gives the exact count.  Bounds: bit widths in [1, 1024], ``k`` in [1, 2**64].  See the
    fixed-point chapter.
    """
    a_bits = check_int(a_bits, "a_bits", 1, MAX_OPERAND_BITS)
    b_bits = check_int(b_bits, "b_bits", 1, MAX_OPERAND_BITS)
    k = check_int(k, "k", 1, MAX_K_TERMS)
    return a_bits + b_bits + (k - 1).bit_length()


def min_accumulator_bits(a_bits: int, b_bits: int, k: int, *, a_signed=True,
                         b_signed=True) -> int:
    r"""The exact smallest signed accumulator that holds any sum of ``k`` products.

    With products in :math:`[p_{lo}, p_{hi}]` (:func:`product_range`), any sum of :math:`K` of
    them lies in :math:`[K p_{lo}, K p_{hi}]`, and both ends are reached (all operands at the
    same corner).  A :math:`B`-bit two's complement accumulator holds
    :math:`[-2^{B-1}, 2^{B-1} - 1]`, so :math:`B` is the smallest integer with
    :math:`2^{B-1} \ge \max(K p_{hi} + 1, -K p_{lo})`.  Bounds: bit widths in [1, 1024],
    ``k`` in [1, 2**64].  See the fixed-point chapter.
    """
    lo, hi = product_range(a_bits, b_bits, a_signed=a_signed, b_signed=b_signed)
    k = check_int(k, "k", 1, MAX_K_TERMS)
    need = max(k * hi + 1, -k * lo, 1)
    return 1 + (need - 1).bit_length()


def max_k(acc_bits: int, a_bits: int, b_bits: int, *, a_signed=True, b_signed=True) -> int:
    r"""The largest K for which no sum of K products can overflow a signed ``acc_bits`` accumulator.

    .. math::
        K_{\max} = \min\Bigl(\Bigl\lfloor \frac{2^{B-1} - 1}{p_{hi}} \Bigr\rfloor,\
                             \Bigl\lfloor \frac{2^{B-1}}{-p_{lo}} \Bigr\rfloor\Bigr)

    with the product range :math:`[p_{lo}, p_{hi}]` of :func:`product_range` (a side whose
    bound is 0 imposes no limit).  For int8 × int8 into int32 the positive side binds
    (:math:`(-128)^2 = 2^{14}`): :math:`K_{\max} = 2^{17} - 1 = 131071`; for uint8 × int8 the
    negative side binds: :math:`\lfloor 2^{31} / 32640 \rfloor = 65793`.  Returns 0 when even
    one product does not fit.  Bit widths lie in [1, 1024].  See the fixed-point chapter.
    """
    acc_bits = check_int(acc_bits, "acc_bits", 1, MAX_OPERAND_BITS)
    lo, hi = product_range(a_bits, b_bits, a_signed=a_signed, b_signed=b_signed)
    limits = []
    if hi > 0:
        limits.append((2 ** (acc_bits - 1) - 1) // hi)
    if lo < 0:
        limits.append(2 ** (acc_bits - 1) // -lo)
    return min(limits)


# --- TFLite's integer rescaling -----------------------------------------------------------------


def power_of_two_exponent(real_multiplier):
    r"""Method 1: the exponent :math:`e` of the power of two nearest to a positive multiplier.

    .. math:: e = \operatorname*{arg\,min}_{e \in \mathbb{Z}} \lvert M - 2^{e} \rvert

    With :math:`M = q \cdot 2^{k}`, :math:`q \in [0.5, 1)` (``frexp``), :math:`M` lies between
    :math:`2^{k-1}` and :math:`2^k`, and the midpoint is :math:`0.75 \cdot 2^k`: :math:`e = k - 1`
    when :math:`q < 0.75`, else :math:`e = k` (a tie goes to the larger power).  Multiplying by
    :math:`2^e` is then a shift alone (:func:`rounding_divide_by_pot` for :math:`e < 0`), at the
    price of a relative error :math:`2^e / M - 1` of up to 33 %.  See the fixed-point chapter.

    Returns
    -------
    int or numpy.ndarray of int64
    """
    scalar = _is_scalar(real_multiplier)
    r = real_array(real_multiplier, "real_multiplier")
    if np.any(r <= 0):
        raise ValueError("real_multiplier must be > 0 to have a nearest power of two")
    q, k = np.frexp(r)
    e = np.where(q < 0.75, k - 1, k).astype(np.int64)
    return _result(e, scalar)


def quantize_multiplier(real_multiplier, *, rounding="double"):
    r"""Split a real multiplier into a Q0.31 integer and a power of two, exactly as TFLite does.

    .. math::
        M = M_0 \cdot 2^{\text{shift}},\ M_0 \in [\tfrac12, 1), \qquad
        \text{multiplier} = \operatorname{round}(M_0 \cdot 2^{31}) \in [2^{30}, 2^{31}), \qquad
        M \approx \text{multiplier} \cdot 2^{\text{shift} - 31}

    This is TFLite's ``QuantizeMultiplier`` (``tensorflow/lite/kernels/internal/
    quantization_util.cc``), step by step:

    1. :math:`M = 0` gives ``(0, 0)``.
    2. ``frexp`` splits :math:`M = M_0 \cdot 2^{\text{shift}}` with :math:`M_0 \in [0.5, 1)`.
    3. ``multiplier = std::round(M_0 * 2**31)``: :math:`M_0 \cdot 2^{31}` is exact in double, and
       ``std::round`` breaks ties away from zero (here: up, :math:`M_0 > 0`).  The relative error
       of the stored multiplier is at most :math:`2^{-32} / M_0 \le 2^{-31}`.
    4. If the rounding reached :math:`2^{31}` (only for :math:`M_0 \ge 1 - 2^{-32}`), it does not
       fit int32: ``multiplier = 2**30`` and ``shift += 1``.
    5. If ``shift < -31`` (roughly :math:`M < 2^{-32}`), every result would be shifted out: the
       multiplier is flushed to ``(0, 0)``.  (Steps 4 and 5 come in this order, so a value just
       below :math:`2^{-32}` that rounds up to :math:`2^{-32}` survives as ``(2**30, -31)``.)
    6. ``rounding="single"`` only (the ``TFLITE_SINGLE_ROUNDING`` build): a ``shift > 30``
       (:math:`M \ge 2^{30}`) saturates to ``(2**31 - 1, 30)``.  The default double-rounding
       build returns the shift unchanged, even though its
       :func:`multiply_by_quantized_multiplier` cannot apply a shift above 30.

    TFLite's double-rounding build also accepts negative multipliers (the single-rounding one does
    not); here :math:`M` must be :math:`\ge 0`, as every ratio of scales
    :math:`S_w S_x / S_y` is.  Vectorized: an array of multipliers (e.g. per channel) gives
    arrays of ``multiplier`` and ``shift``.  See the fixed-point chapter.

    Parameters
    ----------
    real_multiplier : float or array_like of float
        :math:`M \ge 0`, finite.  float32 values are widened to double first (exact), as C++
        does when a ``float`` is passed to ``QuantizeMultiplier(double, ...)``.
    rounding : {"double", "single"}
        Which TFLite build to reproduce (they differ only in step 6).

    Returns
    -------
    (multiplier, shift) : tuple of int, or of numpy.ndarray of int32
    """
    check_choice(rounding, "rounding", _TFLITE_ROUNDINGS)
    scalar = _is_scalar(real_multiplier)
    r = real_array(real_multiplier, "real_multiplier")
    if np.any(r < 0):
        raise ValueError(
            "real_multiplier must be >= 0 (a ratio of scales S_w*S_x/S_y is positive; "
            f"TFLite's single-rounding path rejects negative multipliers), got {r[r < 0].flat[0]}"
        )
    m0, shift = np.frexp(r)  # r == 0 gives (0.0, 0): step 1 for free
    shift = shift.astype(np.int64)
    scaled = m0 * 2.0**31  # exact
    whole = np.floor(scaled)
    multiplier = whole.astype(np.int64) + (scaled - whole >= 0.5)  # ties up = away from zero
    carry = multiplier == 2**31
    multiplier = np.where(carry, 2**30, multiplier)
    shift = np.where(carry, shift + 1, shift)
    flush = shift < -31
    multiplier = np.where(flush, 0, multiplier)
    shift = np.where(flush, 0, shift)
    if rounding == "single":
        clamp = shift > 30
        multiplier = np.where(clamp, INT32_MAX, multiplier)
        shift = np.where(clamp, 30, shift)
    multiplier = multiplier.astype(np.int32)
    shift = shift.astype(np.int32)
    if scalar:
        return int(multiplier), int(shift)
    return multiplier, shift


def multiplier_to_real(multiplier, shift):
    r"""The real value of a quantized multiplier, :math:`\text{multiplier} \cdot 2^{s - 31}`.

    Exact in float64 (a 31-bit integer times a power of two).  Compare it with the multiplier
    you started from to see the error :func:`quantize_multiplier` made.  See the fixed-point
    chapter.

    Returns
    -------
    float or numpy.ndarray of float64
    """
    scalar = _is_scalar(multiplier) and _is_scalar(shift)
    m = int_array(multiplier, "multiplier", 0, INT32_MAX, what="a non-negative int32")
    s = int_array(shift, "shift", -1100, 1100, what="a power-of-two exponent")
    return _result(np.ldexp(m.astype(np.float64), (s - 31).astype(np.int32)), scalar)


def _as_int32(value, name: str) -> np.ndarray:
    return int_array(value, name, INT32_MIN, INT32_MAX, what="int32-representable")


def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # a, b: int64 arrays holding int32 values.  |a*b| <= 2**62, so a*b + 2**30 fits int64.
    out = (a * b + (1 << 30)) >> 31
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, out)


def srdhm(a, b):
    r"""SaturatingRoundingDoublingHighMul: the product of two Q0.31 numbers, rounded to Q0.31.

    Reading int32 values as fractions :math:`a / 2^{31} \in [-1, 1)`, the product of two of them
    is :math:`ab / 2^{62}`, whose Q0.31 representation is :math:`ab / 2^{31}`: "doubling high
    mul" because it keeps bits 31 to 62 of the 64-bit product, twice the high half.  gemmlowp
    (``fixedpoint/fixedpoint.h``, ``SaturatingRoundingDoublingHighMul``; ARM's ``VQRDMULH``)
    computes it as

    .. math::
        \text{nudge} = \begin{cases} 2^{30} & ab \ge 0 \\ 1 - 2^{30} & ab < 0 \end{cases},\qquad
        \operatorname{srdhm}(a, b) = \operatorname{trunc}\bigl((ab + \text{nudge}) / 2^{31}\bigr)

    with C++'s truncating division, and saturates the one case that overflows,
    :math:`a = b = -2^{31}` (:math:`(-1)(-1) = 1` is not in :math:`[-1, 1)`), to
    :math:`2^{31} - 1`.  The sign-dependent nudge and the truncation cancel out into a single
    rule, which is what this function computes (in int64, exact for all int32 inputs):

    .. math:: \operatorname{srdhm}(a, b) = \Bigl\lfloor \frac{ab + 2^{30}}{2^{31}} \Bigr\rfloor
              = \Bigl\lfloor \frac{ab}{2^{31}} + \frac12 \Bigr\rfloor

    i.e. round to nearest with **ties toward** :math:`+\infty`: a positive tie goes away from
    zero (:math:`2.5 \to 3`), a negative tie toward zero (:math:`-2.5 \to -2`).  See the
    fixed-point chapter.

    Parameters
    ----------
    a, b : int or array of integer dtype
        int32-representable values (broadcast together).

    Returns
    -------
    int or numpy.ndarray of int32
    """
    scalar = _is_scalar(a) and _is_scalar(b)
    out = _srdhm(_as_int32(a, "a"), _as_int32(b, "b"))
    return _result(out.astype(np.int32), scalar)


def _half_step(e: np.ndarray) -> np.ndarray:
    """Half of the step :math:`2^e`: :math:`2^{e-1}` for each exponent ``e > 0``, 0 for ``e = 0``
    (int64), the nudge both rounding right shifts add before shifting."""
    return np.where(e > 0, np.int64(1) << np.maximum(e - 1, 0), 0)


def _rdbpot(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    # x: int64 holding int32 values, e: int64 exponents in [0, 31].
    # Round half away from zero: x >= 0 -> floor((x + h) / 2^e); x < 0 -> floor((x + h - 1) / 2^e)
    # with h = 2^(e-1) (_half_step); exponent 0 adds nothing.
    return (x + _half_step(e) - ((x < 0) & (e > 0))) >> e


def _rdbpot_half_up(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    # The same shift with every tie toward +inf: floor((x + h) / 2^e), h = 2^(e-1).
    return (x + _half_step(e)) >> e


def _pot_args(x, exponent) -> tuple[bool, np.ndarray, np.ndarray]:
    """(all scalars?, ``x`` as int32 values, ``exponent`` in [0, 31]), both int64."""
    scalar = _is_scalar(x) and _is_scalar(exponent)
    xv = _as_int32(x, "x")
    return scalar, xv, int_array(exponent, "exponent", 0, 31, what="an exponent from 0 to 31")


def _multiplier_args(x, multiplier, shift) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """(all scalars?, ``x``, ``multiplier``, ``shift``) of a fixed-point rescaling, as int64:
    int32 values, a non-negative int32 multiplier, a shift in [-31, 30]."""
    scalar = _is_scalar(x) and _is_scalar(multiplier) and _is_scalar(shift)
    xv = _as_int32(x, "x")
    m = int_array(multiplier, "multiplier", 0, INT32_MAX, what="a non-negative int32")
    s = int_array(shift, "shift", -31, 30, what="an exponent from -31 to 30")
    return scalar, xv, m, s


def _fits_int32(values: np.ndarray, message: str) -> np.ndarray:
    """``values`` (int64), or ValueError(``message``) where one leaves int32; ``{n}`` in the
    message becomes the number of such places."""
    over = (values < INT32_MIN) | (values > INT32_MAX)
    if np.any(over):
        raise ValueError(message.format(n=int(np.count_nonzero(over))))
    return values


def _shift_left_in_int32(x: np.ndarray, shift: np.ndarray, why: str) -> np.ndarray:
    """``x * 2**max(shift, 0)``, or ValueError where that leaves int32 (``why`` says where the
    kernel would wrap)."""
    return _fits_int32(x << np.maximum(shift, 0), "x * 2**shift overflows int32 in {n} "
                       f"place(s) ({why}); use a smaller x or shift")


def rounding_divide_by_pot(x, exponent):
    r"""RoundingDivideByPOT: divide by :math:`2^e`, round to nearest, ties away from zero.

    .. math:: \operatorname{rdbpot}(x, e) = \operatorname{sign}(x)\,
              \Bigl\lfloor \frac{|x|}{2^{e}} + \frac12 \Bigr\rfloor, \qquad 0 \le e \le 31

    gemmlowp (``fixedpoint/fixedpoint.h``, ``RoundingDivideByPOT``) computes it with masks:
    ``mask = 2**e - 1``, ``remainder = x & mask``, ``threshold = (mask >> 1) + (x < 0)``, and
    the result is ``(x >> e) + (remainder > threshold)``.  The arithmetic shift rounds down; the
    remainder says how far down, and the threshold is half a step, plus one for negative ``x`` so
    that a negative tie stays down (away from zero).  This function computes the same value from
    the closed form (``(x + 2**(e-1) - (x < 0)) >> e``, in int64), so it is exact for every int32
    ``x``.  A plain ``x >> e`` would round toward :math:`-\infty` and bias every result down
    by half a step on average.  See the fixed-point chapter.

    Parameters
    ----------
    x : int or array of integer dtype
        int32-representable values.
    exponent : int or array of integer dtype
        0 to 31, broadcast against ``x``.

    Returns
    -------
    int or numpy.ndarray of int32
    """
    scalar, xv, e = _pot_args(x, exponent)
    return _result(_rdbpot(xv, e).astype(np.int32), scalar)


def multiply_by_quantized_multiplier(x, multiplier, shift, *, rounding="double"):
    r"""Rescale int32 values by :math:`\text{multiplier} \cdot 2^{s-31}` as TFLite's source does.

    This is TFLite's ``MultiplyByQuantizedMultiplier(int32 x, int32 multiplier, int shift)``
    (``tensorflow/lite/kernels/internal/common.cc``) in its two builds.

    ``rounding="double"`` (the default build): two roundings,

    .. math:: \operatorname{rdbpot}\bigl(\operatorname{srdhm}(x \cdot 2^{\max(s, 0)},
              \text{multiplier}),\ \max(-s, 0)\bigr)

    first :func:`srdhm` rounds :math:`x \cdot 2^{\max(s,0)} \cdot \text{multiplier} / 2^{31}` to
    the nearest integer with ties toward :math:`+\infty`, then :func:`rounding_divide_by_pot`
    rounds the division by :math:`2^{\max(-s,0)}` to nearest with ties away from zero.  The
    intermediate rounding can push a value that was just below a tie onto it, so the result can
    differ by 1 from the correctly rounded one (double rounding).  The left shift is done in
    int32 in C++; if it overflows (undefined behaviour there), this function raises.

    ``rounding="single"`` (the ``TFLITE_SINGLE_ROUNDING`` build): one rounding in int64,

    .. math:: \Bigl\lfloor \frac{x \cdot \text{multiplier} + 2^{30 - s}}{2^{31 - s}} \Bigr\rfloor
              = \Bigl\lfloor x \cdot \text{multiplier} \cdot 2^{s - 31} + \frac12 \Bigr\rfloor

    i.e. round to nearest with **ties toward** :math:`+\infty` (``-2.5 -> -2``); TFLite checks
    ``-31 <= shift <= 30`` and that the result fits int32 (a ``TFLITE_DCHECK``), and so does this
    function (``ValueError`` where TFLite's debug build would abort).

    Both builds need ``multiplier`` in :math:`\{0\} \cup [2^{30}, 2^{31})`, the values
    :func:`quantize_multiplier` produces, and ``shift`` in :math:`[-31, 30]`.  All three inputs
    broadcast (a per-channel ``multiplier`` and ``shift`` against a matrix of accumulators).
    See the fixed-point chapter.

    Parameters
    ----------
    x : int or array of integer dtype
        int32-representable accumulators.
    multiplier : int or array of integer dtype
        Q0.31 significands from :func:`quantize_multiplier`.
    shift : int or array of integer dtype
        Power-of-two exponents from :func:`quantize_multiplier`, in [-31, 30].
    rounding : {"double", "single"}

    Returns
    -------
    int or numpy.ndarray of int32
    """
    check_choice(rounding, "rounding", _TFLITE_ROUNDINGS)
    scalar, xv, m, s = _multiplier_args(x, multiplier, shift)
    bad = (m != 0) & (m < 2**30)
    if np.any(bad):
        raise ValueError(
            "multiplier must be 0 or in [2**30, 2**31 - 1] (a Q0.31 significand in [0.5, 1) "
            f"from quantize_multiplier), got {int(m[bad].flat[0])}"
        )
    if rounding == "double":
        shifted = _shift_left_in_int32(xv, s, "TFLite's double-rounding path shifts x left in "
                                              "int32 before multiplying, which would wrap")
        out = _rdbpot(_srdhm(shifted, m), np.maximum(-s, 0))
    else:
        total = 31 - s
        out = _fits_int32((xv * m + (np.int64(1) << (total - 1))) >> total,
                          "the result x * multiplier * 2**(shift - 31) does not fit int32 in "
                          "{n} place(s) (TFLite's single-rounding path checks this with "
                          "TFLITE_DCHECK)")
    return _result(out.astype(np.int32), scalar)


# --- The other fixed-point rescalings that ship in LiteRT ---------------------------------------


def rounding_divide_by_pot_half_up(x, exponent):
    r"""Divide by :math:`2^e` and round to nearest, **ties toward** :math:`+\infty`.

    .. math:: \Bigl\lfloor \frac{x + 2^{e-1}}{2^{e}} \Bigr\rfloor
              = \Bigl\lfloor \frac{x}{2^{e}} + \frac12 \Bigr\rfloor, \qquad 0 \le e \le 31

    (:math:`e = 0` returns :math:`x`).  This is ARM's ``VRSHL`` by a negative amount, and the
    "rounding right shift" of ruy's x86 kernels (``kernel_avx2_fma.cc``, ``kernel_avx512.cc``:
    add the nudge :math:`2^{e-1}`, shift arithmetically).  It differs from gemmlowp's
    :func:`rounding_divide_by_pot` only on negative ties: :math:`-2.5 \to -2` here, :math:`-3`
    there.  Exact for every int32 ``x`` (computed in int64; ruy's overflow guard, which returns
    :math:`2^{31-e}` when :math:`x + 2^{e-1}` would pass :math:`2^{31} - 1`, gives the same
    value).  See the fixed-point chapter and the deploy chapter.

    Returns
    -------
    int or numpy.ndarray of int32
    """
    scalar, xv, e = _pot_args(x, exponent)
    return _result(_rdbpot_half_up(xv, e).astype(np.int32), scalar)


def multiply_by_quantized_multiplier_half_up(x, multiplier, shift):
    r"""Rescale by :math:`\text{multiplier} \cdot 2^{s-31}` in two roundings, both ties up.

    .. math:: \Bigl\lfloor \frac{\operatorname{srdhm}(x \cdot 2^{\max(s,0)},\ \text{multiplier})
              + 2^{r-1}}{2^{r}} \Bigr\rfloor, \qquad r = \max(-s, 0)

    :func:`srdhm` (round half up) followed by :func:`rounding_divide_by_pot_half_up` (round half
    up again), where gemmlowp's version (:func:`multiply_by_quantized_multiplier`,
    ``rounding="double"``) rounds the second step half away from zero.  This is what LiteRT's
    built-in optimized int8 kernels compute when they run on ruy -- ``FULLY_CONNECTED`` and
    ``CONV_2D`` on x86 (ruy's AVX2/AVX-512 kernels, ``ruy/kernel_avx2_fma.cc``: a 64-bit
    product plus :math:`2^{30}`, shifted right by 31, then the nudged rounding right shift) --
    and what ARM's ``VQRDMULH`` + ``VRSHL`` compute (TFLite's NEON ``CustomGemv``).  It is
    neither of TFLite's two ``MultiplyByQuantizedMultiplier`` builds: on a negative tie the
    double-rounding build goes down, this one up.  The left shift wraps in int32 in the SIMD
    code; here it raises ``ValueError`` instead.  ``multiplier`` and ``shift`` as for
    :func:`multiply_by_quantized_multiplier`; broadcast together.  See the deploy chapter.

    Returns
    -------
    int or numpy.ndarray of int32
    """
    scalar, xv, m, s = _multiplier_args(x, multiplier, shift)
    shifted = _shift_left_in_int32(xv, s, "the kernels shift x left in int32 first, which "
                                          "would wrap")
    return _result(_rdbpot_half_up(_srdhm(shifted, m), np.maximum(-s, 0)).astype(np.int32),
                   scalar)
