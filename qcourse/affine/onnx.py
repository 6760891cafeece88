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

__all__ = [
    "dequantize_linear",
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


def _onnx_type_name(output_dtype) -> str | None:
    """Normalize ``output_dtype`` (None/0, an ONNX TensorProto id, a name or a NumPy dtype)."""
    if output_dtype is None:
        return None
    if isinstance(output_dtype, (int, np.integer)) and not isinstance(output_dtype, bool):
        if int(output_dtype) == 0:
            return None
        if int(output_dtype) not in _ONNX_BY_ID:
            raise ValueError(
                f"output_dtype={int(output_dtype)} is not a supported ONNX integer type; "
                f"supported: {sorted(_ONNX_BY_ID)} ({', '.join(_ONNX_INT_TYPES)})"
            )
        return _ONNX_BY_ID[int(output_dtype)]
    if isinstance(output_dtype, str) and output_dtype in _ONNX_INT_TYPES:
        return output_dtype
    try:
        name = np.dtype(output_dtype).name
    except TypeError:
        name = None
    if name in ("uint8", "int8", "uint16", "int16"):
        return name
    raise ValueError(
        f"output_dtype must be one of {', '.join(_ONNX_INT_TYPES)} (or the ONNX TensorProto "
        f"id), got {output_dtype!r}"
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
    r"""The ONNX ``QuantizeLinear`` operator (opset 21+, integer outputs), bit for bit.

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
    :func:`pack_int`.  ``saturate`` only concerns float8 outputs in ONNX; integer outputs always
    saturate, so it is accepted and ignored.  See the affine chapter.

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


def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0) -> np.ndarray:
    r"""The ONNX ``DequantizeLinear`` operator (opset 21+), bit for bit.

    .. math:: y = \operatorname{float32}(x - z) \otimes s

    The integer difference is exact (for 8- and 16-bit inputs it is exactly representable in
    float32); the product with the float32 scale is one IEEE float32 multiplication, as in ONNX
    Runtime.  Layouts (per-tensor, per-axis, blocked) and ``axis`` as in
    :func:`quantize_linear`.  ``x`` may be uint8, int8, uint16, int16 or int32; the zero point,
    if given, must have ``x``'s dtype (as the specification requires), and for int32 it must be
    0.  Sub-byte values held in int8/uint8 dequantize with the same formula.  See the affine
    chapter.

    Returns
    -------
    numpy.ndarray, float32, shape of ``x``
    """
    allowed = ("uint8", "int8", "uint16", "int16", "int32")
    if not isinstance(x, np.ndarray) or x.dtype.name not in allowed:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a numpy.ndarray of dtype {', '.join(allowed)}, got {got}")
    scale = onnx_scale(x_scale, "x_scale")
    expand = _onnx_layout(x.shape, scale, axis, block_size, "x_scale")
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
    return np.multiply(diff, expand(scale), dtype=np.float32)
