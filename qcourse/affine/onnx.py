"""The ONNX operators ``QuantizeLinear`` and ``DequantizeLinear``, reproduced bit for bit.

They compute in float32 exactly as ONNX Runtime's CPU kernels do (the tests compare them with
ONNX Runtime on random and tie-heavy inputs), where the course's own quantizer
(:mod:`qcourse.affine.quantizer`) computes in float64.  Re-exported by :mod:`qcourse.affine`;
see the affine chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import (
    check_axis,
    check_bool,
    check_int,
    onnx_scale,
)
from qcourse.floats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3FN,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    FP8_E5M2FNUZ,
    decode,
    encode,
)

__all__ = [
    "dequantize_linear",
    "dynamic_quantize_linear",
    "quantize_linear",
]


# --- the ONNX operators ------------------------------------------------------------------------

# ONNX TensorProto element types of the integer outputs we reproduce, with their ranges and the
# NumPy dtype that holds them (sub-byte types are held one value per byte).
_ONNX_INT_TYPES = {
    # name: (TensorProto id, qmin, qmax, numpy container)
    "uint8": (2, 0, 255, np.uint8),
    "int8": (3, -128, 127, np.int8),
    "uint16": (4, 0, 65535, np.uint16),
    "int16": (5, -32768, 32767, np.int16),
    "uint4": (21, 0, 15, np.uint8),
    "int4": (22, -8, 7, np.int8),
    "uint2": (25, 0, 3, np.uint8),
    "int2": (26, -2, 1, np.int8),
}
_ONNX_BY_ID = {v[0]: k for k, v in _ONNX_INT_TYPES.items()}

# The float element types (ONNX name: TensorProto id, bit format, ml_dtypes type name).  qcourse
# computes their bit patterns itself (qcourse.floats); ml_dtypes only gives the array its dtype.
_ONNX_FLOAT_TYPES = {
    "float8e4m3fn": (17, FP8_E4M3FN, "float8_e4m3fn"),
    "float8e4m3fnuz": (18, FP8_E4M3FNUZ, "float8_e4m3fnuz"),
    "float8e5m2": (19, FP8_E5M2, "float8_e5m2"),
    "float8e5m2fnuz": (20, FP8_E5M2FNUZ, "float8_e5m2fnuz"),
    "float4e2m1": (23, FP4_E2M1, "float4_e2m1fn"),
    "float6e2m3": (27, FP6_E2M3, "float6_e2m3fn"),
    "float6e3m2": (28, FP6_E3M2, "float6_e3m2fn"),
}
_ONNX_BY_ID.update({v[0]: k for k, v in _ONNX_FLOAT_TYPES.items()})
_ONNX_BY_ML_DTYPES = {v[2]: k for k, v in _ONNX_FLOAT_TYPES.items()}


def _ml_dtype(name: str) -> np.dtype:
    """The ml_dtypes dtype that holds an ONNX float type's bit patterns."""
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - ml_dtypes is a dependency
        raise ImportError(f"{name} arrays need the ml_dtypes package (pip install ml_dtypes)"
                          ) from exc
    return np.dtype(getattr(ml_dtypes, _ONNX_FLOAT_TYPES[name][2]))


def _onnx_type_name(output_dtype) -> str | None:
    """Normalize ``output_dtype`` (None/0, an ONNX TensorProto id, a name or a NumPy dtype)."""
    if output_dtype is None:
        return None
    if isinstance(output_dtype, (int, np.integer)) and not isinstance(output_dtype, bool):
        if int(output_dtype) == 0:
            return None
        if int(output_dtype) not in _ONNX_BY_ID:
            raise ValueError(
                f"output_dtype={int(output_dtype)} is not a supported ONNX quantized type; "
                f"supported: {sorted(_ONNX_BY_ID)} "
                f"({', '.join([*_ONNX_INT_TYPES, *_ONNX_FLOAT_TYPES])})"
            )
        return _ONNX_BY_ID[int(output_dtype)]
    if isinstance(output_dtype, str) and output_dtype in {**_ONNX_INT_TYPES, **_ONNX_FLOAT_TYPES}:
        return output_dtype
    if isinstance(output_dtype, str) and output_dtype in _ONNX_BY_ML_DTYPES:
        return _ONNX_BY_ML_DTYPES[output_dtype]
    try:
        name = np.dtype(output_dtype).name
    except TypeError:
        name = None
    if name in ("uint8", "int8", "uint16", "int16"):
        return name
    if name in _ONNX_BY_ML_DTYPES:
        return _ONNX_BY_ML_DTYPES[name]
    raise ValueError(
        f"output_dtype must be one of {', '.join([*_ONNX_INT_TYPES, *_ONNX_FLOAT_TYPES])} (or "
        f"the ONNX TensorProto id, or the ml_dtypes dtype), got {output_dtype!r}"
    )


def _onnx_layout(x_shape, scale: np.ndarray, axis, block_size, name: str):
    """Return a function that expands a scale-shaped array to broadcast against ``x``."""
    axis = check_int(axis, "axis")
    block_size = check_int(block_size, "block_size", 0)
    ndim = len(x_shape)
    if block_size == 0:
        if scale.ndim == 0 or (scale.ndim == 1 and scale.size == 1):
            return lambda a: a.reshape(())
        if scale.ndim != 1:
            raise ValueError(
                f"{name} must be a scalar (per-tensor) or 1-D (per-axis) when block_size=0, "
                f"got shape {scale.shape}"
            )
        if ndim == 0:
            raise ValueError(f"a 1-D {name} (per-axis) needs x with at least one axis")
        ax = check_axis(axis, "axis", ndim)
        if scale.size != x_shape[ax]:
            raise ValueError(
                f"per-axis {name} has {scale.size} entries but x has {x_shape[ax]} along "
                f"axis {axis} (x shape {tuple(x_shape)})"
            )
        dims = [1] * ndim
        dims[ax] = scale.size
        return lambda a: a.reshape(dims)
    if scale.ndim != ndim or ndim == 0:
        raise ValueError(
            f"blocked quantization (block_size={block_size}) needs {name} with the rank of x "
            f"({ndim}), got shape {scale.shape}"
        )
    ax = check_axis(axis, "axis", ndim)
    expected = list(x_shape)
    expected[ax] = -(-x_shape[ax] // block_size)
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(
            f"blocked {name} for x of shape {tuple(x_shape)}, axis={axis}, "
            f"block_size={block_size} must have shape {tuple(expected)}, got {scale.shape}"
        )
    idx = np.arange(x_shape[ax])
    return lambda a: np.repeat(a, block_size, axis=ax).take(idx, axis=ax)


def quantize_linear(x, y_scale, y_zero_point=None, *, axis=1, saturate=True, block_size=0,
                    output_dtype=None) -> np.ndarray:
    r"""The ONNX ``QuantizeLinear`` operator (opset 21 to 25), bit for bit.

    .. math:: y = \operatorname{saturate}\big(\operatorname{round}(x \oslash s) + z\big)

    exactly as ONNX Runtime's CPU kernel computes it:

    * :math:`x \oslash s` is an IEEE **float32 division** (not a multiplication by a
      precomputed reciprocal ``1/s``, which rounds differently on some ties -- the tests show
      ONNX Runtime divides);
    * ``round`` is round half to even; the result saturates to the output type's range;
    * the output type is the zero point's dtype; without a zero point it is ``output_dtype``,
      and uint8 when that is absent too (``z = 0``);
    * ``y_scale`` and ``y_zero_point`` are scalars (per-tensor), 1-D along ``axis``
      (per-axis; negative ``axis`` counts from the end), or, with ``block_size > 0``, blocked:
      x's shape with ``shape[axis]`` replaced by ``ceil(shape[axis] / block_size)``;
    * NaN, which the specification leaves undefined, gives ``qmin``, as ONNX Runtime's CPU
      kernel and the ONNX reference implementation both do; +-Inf saturate.

    Sub-byte outputs (``output_dtype`` ``"int4"``, ``"uint4"``, ``"int2"``, ``"uint2"`` or their
    TensorProto ids) are returned one value per int8/uint8 element (NumPy has no 4-bit dtype);
    a zero point for them is an int8/uint8 array with values in range.  Store them densely with
    :func:`pack_int`.  Float outputs (``output_dtype`` ``"float8e4m3fn"``, ``"float8e5m2"``,
    ``"float8e4m3fnuz"``, ``"float8e5m2fnuz"``, ``"float4e2m1"``, ``"float6e2m3"``,
    ``"float6e3m2"``, their TensorProto ids or ml_dtypes dtypes, or a zero point of such an
    ml_dtypes dtype, which must be 0) are :math:`\operatorname{cast}(x \oslash s)`, rounded to
    nearest even by :func:`qcourse.floats.encode` and returned as an ml_dtypes array; there
    ``saturate`` decides whether float8 overflow (and infinity) clamps to the largest finite
    value (True, the default) or becomes the type's NaN/infinity.  Integer outputs always
    saturate, so for them it is accepted and ignored.  See the affine chapter (and the lowbit
    chapter for the float formats).

    Parameters
    ----------
    x : numpy.ndarray, float32
    y_scale : numpy.ndarray or np.float32, float32, finite and > 0
    y_zero_point : numpy.ndarray or NumPy integer scalar, optional
        uint8, int8, uint16 or int16 (its dtype is the output dtype), same shape as ``y_scale``.
    axis : int, default 1
    saturate : bool, default True
    block_size : int, default 0
    output_dtype : None, str, NumPy dtype or ONNX TensorProto id

    Returns
    -------
    numpy.ndarray
        Shape of ``x``; uint8/int8/uint16/int16 (or the byte container of a sub-byte type).
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a float32 numpy.ndarray (the operator's input), got {got}")
    check_bool(saturate, "saturate")
    scale = onnx_scale(y_scale, "y_scale")
    name = _onnx_type_name(output_dtype)
    zp_float = None if y_zero_point is None else _ONNX_BY_ML_DTYPES.get(
        np.asarray(y_zero_point).dtype.name)
    if zp_float is not None and name not in (None, zp_float):
        raise ValueError(f"output_dtype={name!r} does not match the zero point's dtype "
                         f"{np.asarray(y_zero_point).dtype}")
    if (zp_float or name) in _ONNX_FLOAT_TYPES:
        return _quantize_linear_float(x, scale, y_zero_point, zp_float or name,
                                      axis, block_size, saturate)
    if y_zero_point is not None:
        zp = np.asarray(y_zero_point)
        if name in ("uint4", "int4", "uint2", "int2"):
            container = _ONNX_INT_TYPES[name][3]
            if zp.dtype != container:
                raise TypeError(
                    f"for output_dtype={name!r} y_zero_point must be {np.dtype(container)} "
                    f"holding {name} values, got {zp.dtype}"
                )
        else:
            if zp.dtype.name not in ("uint8", "int8", "uint16", "int16"):
                raise TypeError(
                    f"y_zero_point must be uint8, int8, uint16 or int16 (its dtype decides the "
                    f"output type), got {zp.dtype}"
                )
            if name is not None and name != zp.dtype.name:
                raise ValueError(
                    f"output_dtype={name!r} does not match the zero point's dtype {zp.dtype}"
                )
            name = zp.dtype.name
        if zp.shape != scale.shape and not (zp.size == 1 and scale.size == 1):
            raise ValueError(
                f"y_zero_point must have the shape of y_scale {scale.shape}, got {zp.shape}"
            )
    else:
        zp = None
        name = name or "uint8"
    _, qmin, qmax, container = _ONNX_INT_TYPES[name]
    expand = _onnx_layout(x.shape, scale, axis, block_size, "y_scale")
    z = np.int64(0) if zp is None else expand(zp.astype(np.int64))
    if zp is not None and (np.any(zp < qmin) or np.any(zp > qmax)):
        raise ValueError(f"y_zero_point values must lie in the {name} range [{qmin}, {qmax}]")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        t = np.rint(np.divide(x, expand(scale), dtype=np.float32))  # float32, as the kernel
    y = np.clip(t.astype(np.float64) + z, qmin, qmax)
    y = np.where(np.isnan(y), qmin, y)
    return y.astype(container)


def _float_zero_point(zp, name: str, scale: np.ndarray, arg: str):
    """An ONNX float-type zero point: an array of that ml_dtypes type, shaped like the scale,
    all zeros (the specification allows no other value for float8; float4 follows)."""
    if zp is None:
        return
    arr = np.asarray(zp)
    if arr.dtype != _ml_dtype(name):
        raise TypeError(f"{arg} must have the ml_dtypes dtype {_ml_dtype(name)} for {name}, got "
                        f"{arr.dtype}")
    if arr.shape != scale.shape and not (arr.size == 1 and scale.size == 1):
        raise ValueError(f"{arg} must have the shape of the scale {scale.shape}, got {arr.shape}")
    if np.any(decode(arr.view(np.uint8), _ONNX_FLOAT_TYPES[name][1]) != 0):
        raise ValueError(f"{arg} must be 0 for the float type {name} (the operator defines no "
                         f"other float zero point)")


def _quantize_linear_float(x, scale, zp, name, axis, block_size, saturate) -> np.ndarray:
    r"""QuantizeLinear to a float type: :math:`y = \operatorname{cast}(x \oslash s)`.

    The float32 division is the integer path's; the cast rounds to nearest even.  With
    ``saturate`` (the default) float8 values beyond the largest finite value, and the
    infinities, become that value with their sign (the ONNX reference's ``saturate_cast``);
    without it they become what the type's own conversion gives (NaN for e4m3fn and the fnuz
    types, :math:`\pm\infty` for e5m2).  float4/float6 have neither infinity nor NaN and always
    saturate (NaN becomes a zero, as in ml_dtypes).  NaN stays NaN where the type has one.  For
    float4/float6 the (zero) zero point, when given, is added before the cast as the formula
    says, so :math:`-0` comes out as :math:`+0`; float8 ignores it (the ONNX reference's
    behaviour, which its test cases record).
    """
    _float_zero_point(zp, name, scale, "y_zero_point")
    fmt = _ONNX_FLOAT_TYPES[name][1]
    expand = _onnx_layout(x.shape, scale, axis, block_size, "y_scale")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        t = np.divide(x, expand(scale), dtype=np.float32)
    if saturate and name.startswith("float8"):
        t = np.clip(t, np.float32(-fmt.max_finite), np.float32(fmt.max_finite))
    if zp is not None and not name.startswith("float8"):
        t = t + np.float32(0)      # "+ zero point" (which is 0): turns -0 into +0, as ONNX does
    return encode(t, fmt).astype(np.uint8).view(_ml_dtype(name))


def _dequantize_linear_float(x, scale, zp, name, expand) -> np.ndarray:
    _float_zero_point(zp, name, scale, "x_zero_point")
    values = decode(x.view(np.uint8), _ONNX_FLOAT_TYPES[name][1]).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.multiply(values, expand(scale).astype(np.float32), dtype=np.float32)


def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0,
                      output_dtype=None) -> np.ndarray:
    r"""The ONNX ``DequantizeLinear`` operator (opset 21+), bit for bit.

    .. math:: y = \operatorname{float32}(x - z) \otimes s

    The integer difference is exact (for 8- and 16-bit inputs it is exactly representable in
    float32); the product with the float32 scale is one IEEE float32 multiplication, as in ONNX
    Runtime.  Layouts (per-tensor, per-axis, blocked) and ``axis`` as in
    :func:`quantize_linear`.  ``x`` may be uint8, int8, uint16, int16 or int32; the zero point,
    if given, must have ``x``'s dtype (as the specification requires), and for int32 it must be
    0.  Sub-byte values held in int8/uint8 dequantize with the same formula.  ``x`` may also be
    an ml_dtypes float array (float8 e4m3fn/e5m2 and their fnuz variants, float4 e2m1, float6):
    its values (decoded by :func:`qcourse.floats.decode`) times the scale, one float32
    rounding; a zero point for them must be 0.  ``x_scale`` may be float16: the product is
    formed in float32 and rounded to float16 (the output type follows the scale unless
    ``output_dtype``, float32 or float16, says otherwise), as the ONNX reference does.  See the
    affine chapter.

    Returns
    -------
    numpy.ndarray, float32 (or the scale's / ``output_dtype``'s float16), shape of ``x``
    """
    allowed = ("uint8", "int8", "uint16", "int16", "int32", *_ONNX_BY_ML_DTYPES)
    if not isinstance(x, np.ndarray) or x.dtype.name not in allowed:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a numpy.ndarray of dtype {', '.join(allowed)}, got {got}")
    scale = onnx_scale(x_scale, "x_scale", (np.float32, np.float16))
    out_dtype = np.asarray(x_scale).dtype
    if output_dtype is not None:
        try:
            out_dtype = np.dtype({1: "float32", 10: "float16"}.get(output_dtype, output_dtype)
                                 if isinstance(output_dtype, int) else output_dtype)
        except TypeError:
            out_dtype = None
        if out_dtype is None or out_dtype.name not in ("float32", "float16"):
            raise ValueError(f"output_dtype must be float32 or float16 (1 or 10), got "
                             f"{output_dtype!r}")
    expand = _onnx_layout(x.shape, scale, axis, block_size, "x_scale")
    if x.dtype.name in _ONNX_BY_ML_DTYPES:
        y = _dequantize_linear_float(x, scale, x_zero_point, _ONNX_BY_ML_DTYPES[x.dtype.name],
                                     expand)
        return y.astype(out_dtype)
    if x_zero_point is None:
        z = np.int64(0)
    else:
        zp = np.asarray(x_zero_point)
        if zp.dtype != x.dtype:
            raise TypeError(f"x_zero_point must have x's dtype {x.dtype}, got {zp.dtype}")
        if zp.shape != scale.shape and not (zp.size == 1 and scale.size == 1):
            raise ValueError(
                f"x_zero_point must have the shape of x_scale {scale.shape}, got {zp.shape}"
            )
        if x.dtype == np.int32 and np.any(zp != 0):
            raise ValueError("an int32 x_zero_point must be 0 (int32 dequantizes without offset)")
        z = expand(zp.astype(np.int64))
    diff = (x.astype(np.int64) - z).astype(np.float32)
    return np.multiply(diff, expand(scale).astype(np.float32), dtype=np.float32).astype(out_dtype)


def dynamic_quantize_linear(x) -> tuple[np.ndarray, np.float32, np.uint8]:
    r"""The ONNX ``DynamicQuantizeLinear`` operator: uint8 codes with a range from ``x`` itself.

    .. math::

        s = \frac{\max(0, \max x) - \min(0, \min x)}{255}, \quad
        z = \operatorname{rne}\big(\operatorname{clamp}(0 - \min(0, \min x) / s,\ 0,\ 255)\big),
        \quad y = \operatorname{clamp}\big(\operatorname{rne}(x \oslash s) + z,\ 0,\ 255\big)

    in float32 throughout, as the operator's definition and ONNX Runtime compute it (the range
    always contains 0, so 0 is exact).  An all-zero ``x``, where the definition would divide by
    zero, gets :math:`s = 1` as in ONNX Runtime (the ONNX reference implementation's code gives
    :math:`1/255`, against its own comment; no specification test case has such an input).  Returns
    ``(y, y_scale, y_zero_point)``: uint8 of ``x``'s shape, a float32 scalar, a uint8 scalar.
    NaN and Inf in ``x`` raise ``ValueError`` (the range would be meaningless).  See the affine
    chapter.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a float32 numpy.ndarray (the operator's input), got {got}")
    if x.size == 0:
        raise ValueError("x must not be empty (its range defines the scale)")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or Inf; DynamicQuantizeLinear needs a finite range")
    hi = np.maximum(np.float32(0), np.max(x))
    lo = np.minimum(np.float32(0), np.min(x))
    scale = np.float32(1) if hi == lo else np.float32(np.float32(hi - lo) / np.float32(255))
    zp = np.rint(np.clip(np.float32(0) - lo / scale, np.float32(0), np.float32(255)))
    with np.errstate(over="ignore"):
        y = np.clip(np.rint(np.divide(x, scale, dtype=np.float32)) + zp, 0, 255)
    return y.astype(np.uint8), np.float32(scale), np.uint8(zp)
