r"""Binary floating-point formats, bit by bit: fp32, fp16, bf16, fp8 e4m3fn / e5m2 and any other.

The floats chapter (``book/floats.md``) explains everything in this module.  A binary float with
``exp_bits`` exponent bits, ``man_bits`` mantissa bits and a bias :math:`B` stores three unsigned
integer fields, sign :math:`s`, exponent :math:`E` and mantissa :math:`M`, and means

.. math::

    x = (-1)^s \cdot 1.M_2 \cdot 2^{E - B}                     \quad (0 < E < E_{\text{special}}),
    \qquad
    x = (-1)^s \cdot 0.M_2 \cdot 2^{1 - B}                     \quad (E = 0,\ \text{subnormal}),

where :math:`1.M_2 = 1 + M / 2^{p}` with :math:`p` = ``man_bits``.  The exponent field that is
all ones holds the special values; what it holds depends on the convention (see
:class:`FloatFormat`).

Everything here is exact.  :func:`encode` rounds a float64, float32 or integer input *once*,
to nearest with ties to even, using integer arithmetic on the input's own bits (never through
another float type); :func:`decode` turns bit patterns back into float64 by the same machinery.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from qcourse._checks import check_bool, describe
from qcourse._deprecated import moved_names

__all__ = [
    "BF16",
    "ENERGY_45NM_PJ",
    "ENERGY_SOURCE",
    "FORMATS",
    "FP4_E2M1",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP8_E4M3FN",
    "FP8_E4M3FNUZ",
    "FP8_E5M2",
    "FP8_E5M2FNUZ",
    "FP16",
    "FP32",
    "FP64",
    "FloatFormat",
    "FloatParts",
    "bit_string",
    "float_parts",
    "decode",
    "double_rounding_inputs",
    "encode",
    "encode_via",
    "enumerate_format",
    "fields",
    "ulp",
]

_U64 = np.uint64
_CONVENTIONS = ("ieee", "fn", "fnuz", "finite")


# --- The format --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    r"""A binary floating-point format: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits``
    mantissa bits.

    A bit pattern is the unsigned integer :math:`s \cdot 2^{e+p} + E \cdot 2^{p} + M` with
    :math:`e` = ``exp_bits`` and :math:`p` = ``man_bits``; its value is
    :math:`(-1)^s (1 + M/2^p)\, 2^{E-B}` for a normal number and
    :math:`(-1)^s (M/2^p)\, 2^{1-B}` for :math:`E = 0` (zero and the subnormals).  See the floats
    chapter.

    Parameters
    ----------
    name : str
        A short label, e.g. ``"fp16"``.
    exp_bits : int
        Exponent field width, at least 1 (at least 2 for ``"ieee"``).
    man_bits : int
        Mantissa (fraction) field width :math:`p`, at least 0 (at least 1 for ``"ieee"``, which
        needs a nonzero mantissa to spell NaN).  ``1 + exp_bits + man_bits`` must be at most 64.
    bias : int, optional
        :math:`B`; defaults to :math:`2^{e-1} - 1` (127 for fp32, 15 for fp16, 7 for e4m3fn).
    convention : {"ieee", "fn", "fnuz", "finite"}
        What the all-ones exponent field means.  ``"ieee"``: it holds :math:`\pm\infty`
        (mantissa 0) and NaN (any other mantissa), as in fp32, fp16, bf16 and float8_e5m2.
        ``"fn"`` (finite, NaN-only, as float8_e4m3fn): there is no infinity, the single NaN is
        the pattern S.11…1.11…1, and the other all-ones-exponent patterns are ordinary normal
        numbers.  ``"fnuz"`` (finite, NaN-only, unsigned zero, as float8_e4m3fnuz and
        float8_e5m2fnuz, usually with bias :math:`2^{e-1}`): every pattern is a number except
        the "negative zero" 1.00…0.00…0, which is the one NaN.  ``"finite"`` (as the OCP
        Microscaling elements float4_e2m1fn, float6_e2m3fn and float6_e3m2fn): no infinity and
        no NaN, every pattern is a number.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int | None = None
    convention: str = "ieee"
    _derived: dict = field(init=False, repr=False, compare=False, hash=False, default=None)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        for arg in ("exp_bits", "man_bits"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if self.exp_bits < 1:
            raise ValueError(f"exp_bits must be >= 1, got {self.exp_bits}")
        if self.man_bits < 0:
            raise ValueError(f"man_bits must be >= 0, got {self.man_bits}")
        total = 1 + self.exp_bits + self.man_bits
        if total > 64:
            raise ValueError(
                f"1 + exp_bits + man_bits must be <= 64 (one sign bit plus the fields fit a "
                f"uint64), got 1 + {self.exp_bits} + {self.man_bits} = {total}"
            )
        if self.convention not in _CONVENTIONS:
            raise ValueError(
                f"convention must be one of {_CONVENTIONS}, got {self.convention!r}"
            )
        if self.convention == "ieee" and self.exp_bits < 2:
            raise ValueError(
                "exp_bits must be >= 2 for convention 'ieee': with one exponent bit the all-ones "
                "field is the only nonzero one, so there would be no normal numbers"
            )
        if self.convention == "ieee" and self.man_bits < 1:
            raise ValueError(
                "man_bits must be >= 1 for convention 'ieee': NaN needs a nonzero mantissa "
                "under an all-ones exponent (use convention 'fn' for a 0-bit mantissa)"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        elif isinstance(self.bias, bool) or not isinstance(self.bias, numbers.Integral):
            raise TypeError(f"bias must be an int or None, got {type(self.bias).__name__}")
        object.__setattr__(self, "bias", int(self.bias))
        object.__setattr__(self, "_derived", {})

    # --- integer facts about the encoding ----------------------------------------------------

    @property
    def total_bits(self) -> int:
        """Width of one bit pattern: ``1 + exp_bits + man_bits``."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned NumPy integer dtype that holds one bit pattern."""
        for width, dt in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
            if self.total_bits <= width:
                return np.dtype(dt)
        return np.dtype(np.uint64)

    @property
    def has_inf(self) -> bool:
        """True for the ``"ieee"`` convention, False for the others (no infinities)."""
        return self.convention == "ieee"

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number, :math:`1 - B` (also the subnormals')."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        r"""Unbiased exponent of the largest finite number: :math:`2^e - 2 - B` for ``"ieee"``
        (the all-ones field is reserved), :math:`2^e - 1 - B` for the others."""
        top = 2**self.exp_bits - (2 if self.convention == "ieee" else 1)
        return top - self.bias

    @property
    def sign_mask(self) -> int:
        """The sign bit as an integer, :math:`2^{e+p}`."""
        return 1 << (self.exp_bits + self.man_bits)

    @property
    def nan_bits(self) -> int:
        """The canonical (positive, quiet) NaN pattern that :func:`encode` produces.

        ``"ieee"``: all-ones exponent with only the top mantissa bit set (0x7FC00000 for fp32,
        0x7E00 for fp16, 0x7FC0 for bf16, 0x7E for e5m2).  ``"fn"``: all ones (0x7F for e4m3fn).
        ``"fnuz"``: the sign bit alone (0x80).  ``"finite"``: None (there is no NaN).
        """
        if self.convention == "fn":
            return self.sign_mask - 1
        if self.convention == "fnuz":
            return self.sign_mask
        if self.convention == "finite":
            return None
        return self.inf_bits | (1 << (self.man_bits - 1))

    @property
    def inf_bits(self) -> int | None:
        """The +infinity pattern (all-ones exponent, zero mantissa), or None (no infinity)."""
        if self.convention != "ieee":
            return None
        return (2**self.exp_bits - 1) << self.man_bits

    @property
    def max_bits(self) -> int:
        """The pattern of the largest finite value (just below +inf, or just below NaN for fn;
        all ones but the sign for fnuz and finite)."""
        if self.convention in ("fnuz", "finite"):
            return self.sign_mask - 1
        overflow = self.nan_bits if self.convention == "fn" else self.inf_bits
        return overflow - 1

    @property
    def num_finite(self) -> int:
        r"""Number of finite bit patterns, counting +0 and -0 separately.

        ``"ieee"``: :math:`2 (2^e - 1) 2^p`; ``"fn"``: :math:`2^{1+e+p} - 2`; ``"finite"``:
        :math:`2^{1+e+p}`.  Distinct finite *values* are one fewer (the two zeros compare equal).
        ``"fnuz"`` has a single zero: :math:`2^{1+e+p} - 1` patterns, as many values.
        """
        if self.convention == "fnuz":
            return 2 * self.sign_mask - 1
        return 2 * (self.max_bits + 1)

    # --- values (Python floats; exact for formats that fit in float64) ------------------------

    def _value(self, key: str, bits: int) -> float:
        cache = self._derived
        if key not in cache:
            cache[key] = float(decode(bits, self))
        return cache[key]

    @property
    def max_finite(self) -> float:
        r"""Largest finite value, :math:`(2 - 2^{-p})\, 2^{e_{\max}}` (448 for e4m3fn, which
        gives up one mantissa pattern to NaN: :math:`1.75 \cdot 2^8`)."""
        return self._value("max", self.max_bits)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, :math:`2^{1-B}`."""
        return self._value("min_normal", 1 << self.man_bits)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value, :math:`2^{1-B-p}` (the subnormal with mantissa 1)."""
        return self._value("min_subnormal", 1)

    @property
    def epsilon(self) -> float:
        """Machine epsilon :math:`2^{-p}`: the gap between 1 and the next larger value."""
        return 2.0**-self.man_bits

    def ulp(self, x):
        """Unit in the last place of ``x`` in this format; see :func:`ulp`."""
        return ulp(x, self)

    def __str__(self) -> str:
        return (
            f"{self.name} (1 sign + {self.exp_bits} exponent + {self.man_bits} mantissa bits, "
            f"bias {self.bias}, {self.convention})"
        )


FP64 = FloatFormat("fp64", 11, 52)
FP32 = FloatFormat("fp32", 8, 23)
FP16 = FloatFormat("fp16", 5, 10)
BF16 = FloatFormat("bf16", 8, 7)
FP8_E4M3FN = FloatFormat("e4m3fn", 4, 3, convention="fn")
FP8_E5M2 = FloatFormat("e5m2", 5, 2)
#: The fnuz float8 variants (one NaN at 0x80, no -0, bias 2^(e-1)) and the OCP Microscaling
#: element formats (no infinity, no NaN), as ml_dtypes and ONNX define them.
FP8_E4M3FNUZ = FloatFormat("e4m3fnuz", 4, 3, bias=8, convention="fnuz")
FP8_E5M2FNUZ = FloatFormat("e5m2fnuz", 5, 2, bias=16, convention="fnuz")
FP6_E3M2 = FloatFormat("e3m2fn", 3, 2, convention="finite")
FP6_E2M3 = FloatFormat("e2m3fn", 2, 3, convention="finite")
FP4_E2M1 = FloatFormat("e2m1fn", 2, 1, convention="finite")

#: The named formats, by name; a ``fmt`` argument may also be one of these names.
FORMATS = {f.name: f for f in (FP64, FP32, FP16, BF16, FP8_E4M3FN, FP8_E5M2)}


def _check_format(fmt, name: str = "fmt") -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, str):
        if fmt in FORMATS:
            return FORMATS[fmt]
        raise ValueError(f"{name} must be a FloatFormat or one of {sorted(FORMATS)}, got {fmt!r}")
    raise TypeError(
        f"{name} must be a FloatFormat (e.g. qcourse.floats.FP16) or a format name, "
        f"got {type(fmt).__name__}"
    )


# --- Exact integer rounding: the one routine everything goes through ----------------------------


def _bit_length(m: np.ndarray) -> np.ndarray:
    """Bit length of each uint64 (0 for 0), exactly."""
    _, ex = np.frexp(m.astype(np.float64))
    ex = ex.astype(np.int64)
    # float64(m) can round up to the next power of two (up to 2**64); then bit ex - 1 is clear.
    shift = np.clip(ex - 1, 0, 63).astype(_U64)
    rounded_up = (ex > 64) | ((ex > 0) & ((m >> shift) == 0))
    return ex - rounded_up


def _round_pack(m: np.ndarray, e: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    r"""Magnitude bit pattern of :math:`m \cdot 2^{e}` rounded to nearest, ties to even.

    ``m`` is uint64 (any value, 0 allowed), ``e`` int64.  With :math:`k = \max(\lfloor
    \log_2 v \rfloor, e_{\min})` the value is a multiple :math:`N` of the quantum
    :math:`2^{k-p}` after rounding, and the pattern is simply :math:`(k - e_{\min}) 2^p + N`:
    a carry out of the mantissa, a subnormal rounding up to the smallest normal and a rounding
    up past the largest finite value all fall out of the addition.  Patterns at or past the
    overflow pattern become +inf (``"ieee"``), NaN (``"fn"``, ``"fnuz"``) or the largest
    finite pattern (``"finite"``: saturation).
    """
    p = fmt.man_bits
    emin, emax = fmt.emin, fmt.emax
    nonzero = m != 0
    lg = e + _bit_length(m) - 1  # floor(log2 v) for v > 0
    over = nonzero & (lg > emax + 1)
    # Far past the top: any value in the binade just above overflows too, so use its 1.0.
    m = np.where(over, _U64(1) << _U64(min(p, 63)), m)
    e = np.where(over, emax + 1 - p, e)
    lg = np.where(over, emax + 1, lg)
    k = np.where(nonzero, np.maximum(lg, emin), emin)
    s = k - p - e  # v / 2**(k - p) = m / 2**s
    # Right shift by s with round-half-to-even (s in 1..64; beyond 64 the value is < 1/2 quantum).
    sr = np.clip(s, 0, 64)
    sr63 = np.minimum(sr, 63).astype(_U64)
    q = np.where(sr == 64, _U64(0), m >> sr63)
    rem = np.where(sr == 64, m, m & ((_U64(1) << sr63) - _U64(1)))
    half = np.where(sr == 64, _U64(1) << _U64(63), (_U64(1) << sr63) >> _U64(1))
    up = (sr > 0) & ((rem > half) | ((rem == half) & ((q & _U64(1)) == 1)))
    n = q + up.astype(_U64)
    n = np.where(s > 64, _U64(0), n)
    # Left shift (the format has more precision than the input needs): exact.
    sl = np.clip(-s, 0, 63).astype(_U64)
    n = np.where(s < 0, m << sl, n)
    code = ((k - emin).astype(_U64) << _U64(p)) + n
    if fmt.convention == "finite":
        return np.minimum(code, _U64(fmt.max_bits))
    limit = _U64(fmt.inf_bits if fmt.convention == "ieee" else fmt.nan_bits)
    return np.where(code >= limit, limit, code)


# --- Input checking ----------------------------------------------------------------------------


def _decompose(x, arg: str = "x"):
    r"""Split real input into sign, integer significand and exponent: :math:`|x| = m \cdot 2^e`.

    Returns ``(sign, m, e, nan, inf, scalar)``; float16/32/64 and integer inputs are taken
    exactly from their own bits.
    """
    if isinstance(x, bool | np.bool_):
        raise TypeError(f"{arg} must be a real number or array of them, got bool")
    if isinstance(x, int) and not isinstance(x, np.integer):
        if not -(2**63) <= x < 2**64:
            raise ValueError(f"{arg}={x} is out of range: integers must fit in 64 bits")
        x = np.uint64(x) if x >= 2**63 else np.int64(x)
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:  # ragged lists and the like
        raise TypeError(f"{arg} must be a real number or array of them: {exc}") from None
    scalar = arr.ndim == 0
    kind = arr.dtype.kind
    if kind in "iu":
        neg = arr < 0
        mag = arr.astype(np.int64).view(_U64) if kind == "i" else arr.astype(_U64)
        if kind == "i":
            mag = np.where(neg, _U64(0) - mag, mag)  # two's complement magnitude, -2**63 too
        sign = neg.astype(_U64)
        zeros = np.zeros(arr.shape, bool)
        return sign, mag, np.zeros(arr.shape, np.int64), zeros, zeros, scalar
    if kind != "f" or arr.dtype.itemsize > 8:
        what = "object/str/complex" if kind in "OUSc" else str(arr.dtype)
        raise TypeError(
            f"{arg} must be float16/float32/float64 or integer numbers, got dtype {what} "
            f"(convert ml_dtypes arrays with .astype(np.float32), which is exact)"
        )
    with np.errstate(invalid="ignore"):  # widening a signalling NaN quiets it; NaN stays NaN
        u = arr.astype(np.float64).view(_U64)
    sign = u >> _U64(63)
    e64 = ((u >> _U64(52)) & _U64(0x7FF)).astype(np.int64)
    f64 = u & _U64((1 << 52) - 1)
    special = e64 == 0x7FF
    normal = (e64 > 0) & ~special
    m = np.where(normal, f64 | _U64(1 << 52), np.where(special, _U64(0), f64))
    e = np.where(normal, e64 - 1075, -1074)
    return sign, m, e, special & (f64 != 0), special & (f64 == 0), scalar


def _bit_patterns(bits, name: str, fmt: FloatFormat):
    """Validate bit patterns for ``fmt``; return them as a uint64 array and a scalar flag."""
    if isinstance(bits, bool | np.bool_):
        raise TypeError(f"{name} must be integer bit patterns, got bool")
    if isinstance(bits, int) and not isinstance(bits, np.integer):
        if not 0 <= bits < 2**fmt.total_bits:
            raise ValueError(
                f"{name}={bits} is out of range for {fmt.name}: bit patterns are integers in "
                f"[0, 2**{fmt.total_bits})"
            )
        return np.asarray(bits, dtype=_U64), True
    arr = np.asarray(bits)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be integer bit patterns (e.g. x.view(np.uint16)), got dtype {arr.dtype}"
        )
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= 2**fmt.total_bits:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} holds {bad}, out of range for {fmt.name}: bit patterns are integers in "
                f"[0, 2**{fmt.total_bits}) (use an unsigned view such as np.uint16)"
            )
    return arr.astype(_U64), arr.ndim == 0


def _out(code: np.ndarray, scalar: bool, dtype):
    code = code.astype(dtype)
    return code[()] if scalar else code


# --- Public API --------------------------------------------------------------------------------


def fields(bits, fmt):
    r"""Sign, exponent and mantissa fields of bit patterns.

    .. math:: \text{bits} = s \cdot 2^{e+p} + E \cdot 2^{p} + M

    Parameters
    ----------
    bits : int or array_like of integers
        Bit patterns of ``fmt``, each in :math:`[0, 2^{1+e+p})`.
    fmt : FloatFormat or str

    Returns
    -------
    (sign, exponent, mantissa)
        Python ints for a scalar input, int64 arrays of the input's shape otherwise.
        See the floats chapter.
    """
    fmt = _check_format(fmt)
    b, scalar = _bit_patterns(bits, "bits", fmt)
    p = _U64(fmt.man_bits)
    sign = b >> _U64(fmt.exp_bits + fmt.man_bits)
    expo = (b >> p) & _U64(2**fmt.exp_bits - 1)
    man = b & _U64(2**fmt.man_bits - 1)
    if scalar:
        return int(sign), int(expo), int(man)
    return tuple(a.astype(np.int64) for a in (sign, expo, man))


def encode(x, fmt):
    r"""Round real numbers to ``fmt`` and return their bit patterns.

    Round to nearest, ties to even, done once from the exact input value: the input's
    significand :math:`m` and exponent :math:`e` (:math:`|x| = m \cdot 2^e`, read from the
    float64/float32/float16 bits or the integer itself) are shifted and rounded with integer
    arithmetic.  Subnormals are produced where the exponent is below :math:`1 - B`.

    Overflow follows each convention.  ``"ieee"``: a magnitude that rounds past the largest
    finite value, i.e. :math:`|x| \ge \text{max} + \tfrac12 \text{ulp}`, becomes :math:`\pm\infty`
    (as numpy and ml_dtypes do).  ``"fn"``: there is no infinity, and like ml_dtypes'
    float8_e4m3fn conversion (which does *not* saturate) the value becomes NaN with the sign
    kept; for e4m3fn that is every :math:`|x| > 464`, while 464 itself, the tie between 448 and
    the NaN pattern, rounds to even, 448.  Infinite inputs become :math:`\pm\infty`
    (``"ieee"``) or the signed NaN (``"fn"``).  ``"fnuz"``: overflow, infinities and NaN all
    become the one NaN (0x80), and a zero, or a negative value that rounds to zero, is +0 (there
    is no -0).  ``"finite"``: overflow and infinities *saturate* to the largest finite value,
    sign kept, as ml_dtypes' float4_e2m1fn and float6 conversions do; NaN, which such a format
    cannot hold, becomes a zero whose sign is the *opposite* of the NaN's sign bit -- an
    arbitrary choice that this function copies from ml_dtypes (and that ONNX's reference shares)
    so that the two agree bit for bit.

    NaN becomes the format's canonical quiet NaN, sign kept, payload dropped (:attr:`FloatFormat.
    nan_bits`, or'ed with the sign bit).  This is what ml_dtypes does for every NaN and what
    numpy does for the default NaN; numpy's float16 cast also carries payload bits across,
    which this function deliberately does not.  Signed zeros keep their sign (but see
    ``"fnuz"``).

    Parameters
    ----------
    x : float, int or array_like
        float16, float32, float64 or integer values (Python numbers, NumPy scalars or arrays).
    fmt : FloatFormat or str

    Returns
    -------
    numpy.ndarray or numpy scalar of ``fmt.dtype`` (uint8/uint16/uint32/uint64)

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    sign, m, e, nan, inf, scalar = _decompose(x)
    code = _round_pack(m, e, fmt)
    if fmt.convention == "finite":
        code = np.where(inf, _U64(fmt.max_bits), code)
        code = np.where(nan, _U64(0), code)
        sign = np.where(nan, _U64(1) - sign, sign)
    else:
        inf_code = fmt.inf_bits if fmt.convention == "ieee" else fmt.nan_bits
        code = np.where(inf, _U64(inf_code), code)
        code = np.where(nan, _U64(fmt.nan_bits), code)
    if fmt.convention == "fnuz":            # no -0; NaN is the sign bit alone
        sign = np.where(code == 0, _U64(0), sign)
    code = code | (sign << _U64(fmt.exp_bits + fmt.man_bits))
    return _out(code, scalar, fmt.dtype)


def decode(bits, fmt):
    r"""Values of bit patterns as float64.

    .. math::

        x = (-1)^s \left(1 + \frac{M}{2^p}\right) 2^{E - B}\ (E > 0), \qquad
        x = (-1)^s\, \frac{M}{2^p}\, 2^{1 - B}\ (E = 0),

    with the all-ones exponent field read per the convention (inf/NaN for ``"ieee"``, NaN only
    at all-ones for ``"fn"``, numbers for ``"fnuz"`` and ``"finite"``; ``"fnuz"``'s one NaN is
    the sign bit alone).  Exact whenever the format's values are float64 values (every
    format with ``man_bits <= 52`` and its exponent range inside float64's, which includes all
    the named ones); otherwise rounded once to nearest float64.

    Parameters
    ----------
    bits : int or array_like of integers
    fmt : FloatFormat or str

    Returns
    -------
    numpy.float64 or numpy.ndarray of float64

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    b, scalar = _bit_patterns(bits, "bits", fmt)
    p = fmt.man_bits
    sign = b >> _U64(fmt.exp_bits + p)
    ef = ((b >> _U64(p)) & _U64(2**fmt.exp_bits - 1)).astype(np.int64)
    mf = b & _U64(2**p - 1)
    normal = ef > 0
    m = np.where(normal, mf | _U64(1 << p), mf)
    e = np.where(normal, ef - fmt.bias - p, fmt.emin - p)
    top = ef == 2**fmt.exp_bits - 1
    if fmt.convention == "ieee":
        m = np.where(top, _U64(0), m)
        inf, nan = top & (mf == 0), top & (mf != 0)
    elif fmt.convention in ("fnuz", "finite"):
        nan = (b == _U64(fmt.sign_mask)) if fmt.convention == "fnuz" else np.zeros(b.shape, bool)
        inf = np.zeros_like(nan)
        m = np.where(nan, _U64(0), m)
    else:
        nan = top & (mf == 2**p - 1)
        inf = np.zeros_like(nan)
        m = np.where(nan, _U64(0), m)
    code = _round_pack(m, e, FP64)
    code = np.where(inf, _U64(FP64.inf_bits), code)
    code = np.where(nan, _U64(FP64.nan_bits), code)
    code = code | (sign << _U64(63))
    out = code.view(np.float64)
    return out[()] if scalar else out


def encode_via(x, fmt, via):
    """Round ``x`` to ``via`` first and then to ``fmt``: the double rounding of a two-step cast.

    ``decode(encode_via(x, BF16, FP32), BF16)`` is what a library returns if it converts float64
    to bfloat16 by way of float32.  It can differ from :func:`encode` (one rounding) when the
    first rounding lands exactly on a midpoint of ``fmt``; see :func:`double_rounding_inputs`
    and the floats chapter.
    """
    fmt = _check_format(fmt)
    via = _check_format(via, "via")
    return encode(decode(encode(x, via), via), fmt)


def double_rounding_inputs(fmt, via=FP32):
    r"""Every positive float64 input whose two-step rounding (to ``via``, then to ``fmt``) is wrong.

    For each tie point :math:`t` of ``fmt`` (the midpoint of two neighbouring values, including
    the one above the largest finite value and the one between 0 and the smallest subnormal),
    the float64 numbers just above and just below :math:`t` round to :math:`t` itself in
    ``via`` when ``via`` is finer; the second rounding then breaks the tie to even, which is the
    wrong side for one of the two.  Returns the float64 inputs (sorted, positive; negate for the
    mirror cases) for which :func:`encode_via` differs from :func:`encode`.

    Parameters
    ----------
    fmt : FloatFormat or str
        At most 16 bits wide.
    via : FloatFormat or str
        The intermediate format, default :data:`FP32`.

    Returns
    -------
    numpy.ndarray of float64

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    via = _check_format(via, "via")
    bits, values = enumerate_format(fmt)
    values = values[values >= 0]
    top = float(decode(fmt.max_bits, fmt)) + 0.5 * float(ulp(fmt.max_finite, fmt))
    ties = np.concatenate([[0.5 * fmt.min_subnormal], 0.5 * (values[1:] + values[:-1]), [top]])
    ties = np.unique(ties[ties > 0])
    x = np.concatenate([np.nextafter(ties, np.inf), np.nextafter(ties, 0.0)])
    bad = encode(x, fmt) != encode_via(x, fmt, via)
    return np.sort(x[bad])


def enumerate_format(fmt, finite_only: bool = True):
    """Every bit pattern of a small format with its value.

    Parameters
    ----------
    fmt : FloatFormat or str
        At most 16 bits wide (65536 patterns).
    finite_only : bool
        True (default): only the finite patterns, sorted by value, -0 before +0.
        False: all patterns in bit order, infinities and NaNs included.

    Returns
    -------
    (bits, values) : (numpy.ndarray of fmt.dtype, numpy.ndarray of float64)

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    if fmt.total_bits > 16:
        raise ValueError(
            f"fmt must be at most 16 bits wide to enumerate, got {fmt.name} with "
            f"{fmt.total_bits} bits ({2**fmt.total_bits} patterns)"
        )
    finite_only = check_bool(finite_only, "finite_only")
    bits = np.arange(2**fmt.total_bits, dtype=np.uint64).astype(fmt.dtype)
    values = decode(bits, fmt)
    if not finite_only:
        return bits, values
    keep = np.isfinite(values)
    bits, values = bits[keep], values[keep]
    negative = (bits.astype(np.uint64) >> _U64(fmt.total_bits - 1)).astype(np.int8)
    order = np.lexsort((1 - negative, values))
    return bits[order], values[order]


def ulp(x, fmt):
    r"""Unit in the last place: the spacing of ``fmt``'s values in the binade of ``x``.

    .. math:: \operatorname{ulp}(x) = 2^{\max(\lfloor \log_2 |x| \rfloor,\ 1 - B) - p}

    so every normal number in :math:`[2^k, 2^{k+1})` has ulp :math:`2^{k-p}`, all subnormals
    (and zero) share the smallest one, :math:`2^{1-B-p}`, and magnitudes beyond the largest
    finite value get the ulp of the top binade.  At a power of two this is the gap *above*
    :math:`x` (the gap below is half of it).  NaN and infinite inputs give NaN.

    Parameters
    ----------
    x : float, int or array_like
    fmt : FloatFormat or str

    Returns
    -------
    numpy.float64 or numpy.ndarray of float64

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    _, m, e, nan, inf, scalar = _decompose(x)
    lg = e + _bit_length(m) - 1
    k = np.where(m == 0, fmt.emin, np.clip(lg, fmt.emin, fmt.emax))
    out = np.ldexp(1.0, (k - fmt.man_bits).astype(np.int64))
    out = np.where(nan | inf, np.nan, out)
    return out[()] if scalar else out


def bit_string(bits, fmt, sep: str = " ") -> str:
    """The bits of one pattern as text, fields separated: ``"0 10000000 10010000000000000000000"``.

    Parameters
    ----------
    bits : int
        One bit pattern of ``fmt`` (use ``encode(x, fmt)`` for a value).
    fmt : FloatFormat or str
    sep : str
        Put between sign, exponent and mantissa.

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    b, scalar = _bit_patterns(bits, "bits", fmt)
    if not isinstance(sep, str):
        raise TypeError(f"sep must be a str, got {describe(sep)}")
    if not scalar and b.size != 1:
        raise ValueError(f"bits must be a single bit pattern, got an array of shape {b.shape}")
    s, ex, man = fields(int(b.reshape(-1)[0]), fmt)
    parts = [str(s), format(ex, f"0{fmt.exp_bits}b")]
    if fmt.man_bits:
        parts.append(format(man, f"0{fmt.man_bits}b"))
    return sep.join(parts)


@dataclass(frozen=True)
class FloatParts:
    """One bit pattern taken apart; made by :func:`float_parts`.

    ``kind`` is one of ``"zero"``, ``"subnormal"``, ``"normal"``, ``"inf"``, ``"nan"``;
    ``unbiased_exponent`` is :math:`E - B` for normal numbers, :math:`1 - B` for zero and
    subnormals, None for inf and NaN; ``significand`` is :math:`1 + M/2^p` (normal) or
    :math:`M/2^p` (zero, subnormal), None for inf and NaN.
    """

    fmt: FloatFormat
    bits: int
    sign: int
    exponent: int
    mantissa: int
    kind: str
    unbiased_exponent: int | None
    significand: float | None
    value: float
    bit_string: str

    @property
    def formula(self) -> str:
        """The value written out, e.g. ``"+1.1001b x 2^(128-127) = 3.125"``."""
        sign = "-" if self.sign else "+"
        if self.kind in ("inf", "nan"):
            return f"{sign}{self.kind}" if self.kind == "inf" else "nan"
        if self.kind == "zero":
            return f"{sign}0"
        p = self.fmt.man_bits
        lead = "1" if self.kind == "normal" else "0"
        frac = format(self.mantissa, f"0{p}b").rstrip("0") if p else ""
        sig = lead + ("." + frac if frac else "")
        power = (
            f"2^({self.exponent}-{self.fmt.bias})"
            if self.kind == "normal"
            else f"2^(1-{self.fmt.bias})"
        )
        return f"{sign}{sig}b x {power} = {self.value!r}"

    def __str__(self) -> str:
        width = (self.fmt.total_bits + 3) // 4
        return (
            f"{self.fmt.name} 0x{self.bits:0{width}X} = {self.bit_string}  "
            f"[sign {self.sign}, exponent {self.exponent}, mantissa {self.mantissa}]  "
            f"{self.kind}: {self.formula}"
        )


def float_parts(bits, fmt) -> FloatParts:
    """Take one bit pattern apart: fields, kind (zero/subnormal/normal/inf/nan) and value.

    This is what the chapter's bit explorer shows.  For a number rather than a pattern, pass
    ``encode(x, fmt)``.

    Parameters
    ----------
    bits : int
    fmt : FloatFormat or str

    Returns
    -------
    FloatParts

    See the floats chapter.
    """
    fmt = _check_format(fmt)
    b, scalar = _bit_patterns(bits, "bits", fmt)
    if not scalar and b.size != 1:
        raise ValueError(f"bits must be a single bit pattern, got an array of shape {b.shape}")
    b = int(b.reshape(-1)[0])
    s, ex, man = fields(b, fmt)
    value = float(decode(b, fmt))
    p = fmt.man_bits
    if np.isnan(value):
        kind, unb, sig = "nan", None, None
    elif np.isinf(value):
        kind, unb, sig = "inf", None, None
    elif ex == 0:
        kind = "zero" if man == 0 else "subnormal"
        unb, sig = fmt.emin, man / 2.0**p
    else:
        kind, unb, sig = "normal", ex - fmt.bias, 1.0 + man / 2.0**p
    return FloatParts(fmt, b, s, ex, man, kind, unb, sig, value, bit_string(b, fmt))


# --- Energy per operation ----------------------------------------------------------------------

#: Where :data:`ENERGY_45NM_PJ` comes from.
ENERGY_SOURCE = (
    "M. Horowitz, \"1.1 Computing's energy problem (and what we can do about it)\", "
    "IEEE ISSCC 2014, pp. 10-14; energy per operation in a 45 nm CMOS process at 0.9 V"
)

#: Energy per operation in picojoules, 45 nm, from :data:`ENERGY_SOURCE`.  Memory rows are one
#: 64-bit read; the DRAM figure is given there as a range, 1.3-2.6 nJ, kept as two rows.
ENERGY_45NM_PJ = {
    "int8 add": 0.03,
    "int32 add": 0.1,
    "fp16 add": 0.4,
    "fp32 add": 0.9,
    "int8 mult": 0.2,
    "int32 mult": 3.1,
    "fp16 mult": 1.1,
    "fp32 mult": 3.7,
    "SRAM read 8 KB": 10.0,
    "SRAM read 32 KB": 20.0,
    "SRAM read 1 MB": 100.0,
    "DRAM read (low)": 1300.0,
    "DRAM read (high)": 2600.0,
}


__getattr__ = moved_names(__name__, {"breakdown": "qcourse.floats.float_parts"})
