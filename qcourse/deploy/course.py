r"""The course's networks as :class:`~qcourse.deploy.DeployModel`\ s:
:func:`from_integer_model` converts a qcourse integer CNN or MLP, and
:func:`course_model` is the trained integer CNN that ``python -m qcourse.deploy``
exports.

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import functools

import numpy as np

from qcourse.deploy.layers import (
    _INT8_MAX,
    _INT8_MIN,
    Conv2D,
    Dense,
    DeployModel,
    ExportError,
    Flatten,
    GlobalAvgPool,
)

__all__ = [
    "COURSE_CALIBRATION_IMAGES",
    "course_model",
    "from_integer_model",
]

# --------------------------------------------------------------------------- from qcourse models


def _check_int8_grids(name: str, layer) -> None:
    weights = layer.linear.weight_qparams if hasattr(layer, "linear") else layer.weight_qparams
    if np.any(np.asarray(weights.zero_point) != 0):
        raise ExportError(f"layer {name!r} has asymmetric weights (zero point != 0); LiteRT's "
                          f"int8 kernels and XNNPACK need symmetric weights")
    for what, qp in (("input", layer.input_qparams), ("output", layer.output_qparams)):
        if (qp.qmin, qp.qmax) != (_INT8_MIN, _INT8_MAX):
            raise ExportError(f"layer {name!r}: the {what} grid [{qp.qmin}, {qp.qmax}] is not "
                              f"int8 [-128, 127]")


def _dense(ql) -> Dense:
    return Dense(ql.weight_q, ql.bias_q, ql.weight_qparams.scale,
                 float(ql.output_qparams.scale), int(ql.output_qparams.zero_point),
                 ql.output_range)


def _cnn_layers(integer_model) -> list:
    from qcourse.conv import IntegerGlobalAvgPool, QuantizedConv2d
    from qcourse.int_matmul import QuantizedLinear

    layers = []
    for name, layer in integer_model.layers:
        if isinstance(layer, IntegerGlobalAvgPool):
            layers.append(GlobalAvgPool())
            continue
        if not isinstance(layer, (QuantizedConv2d, QuantizedLinear)):
            raise ExportError(f"layer {name!r} is a {type(layer).__name__}, which the exporter "
                              f"cannot write (QuantizedConv2d, IntegerGlobalAvgPool, "
                              f"QuantizedLinear)")
        _check_int8_grids(name, layer)
        if isinstance(layer, QuantizedLinear):
            if layers and isinstance(layers[-1], Conv2D):
                layers.append(Flatten())
            layers.append(_dense(layer))
            continue
        layers.append(Conv2D(layer.weight_q, layer.bias_q, layer.linear.weight_qparams.scale,
                             float(layer.output_qparams.scale),
                             int(layer.output_qparams.zero_point), layer.output_range,
                             stride=layer.stride, padding=layer.padding, groups=layer.groups))
    return layers


def from_integer_model(integer_model, *, name: str = "qcourse",
                       input_shape: tuple | None = None) -> DeployModel:
    """The :class:`DeployModel` of a qcourse integer network.

    Accepts a :class:`qcourse.conv.IntegerCNN` (the course CNN: one :class:`Conv2D` per
    :class:`qcourse.conv.QuantizedConv2d`, regular or depthwise, a :class:`GlobalAvgPool` for
    its pool, a :class:`Dense` for the classifier; ``input_shape`` (channels, height, width) is
    then required, since a convolutional network takes any image size) or a
    :class:`qcourse.ptq.IntegerModel` (the digits MLP: one :class:`Dense` per
    :class:`qcourse.int_matmul.QuantizedLinear`).  The fused ReLU/ReLU6 is each layer's clamp.
    Weights must be symmetric (zero point 0) and activations int8 on the full grid [-128, 127];
    anything else raises :class:`ExportError` naming the layer.
    """
    from qcourse.conv import IntegerCNN
    from qcourse.ptq import IntegerModel

    if isinstance(integer_model, IntegerCNN):
        if input_shape is None:
            raise ValueError("input_shape (channels, height, width) is required for an "
                             "IntegerCNN")
        layers = _cnn_layers(integer_model)
        shape = tuple(input_shape)
    elif isinstance(integer_model, IntegerModel):
        for lname, ql in zip(integer_model.names, integer_model.layers, strict=True):
            _check_int8_grids(lname, ql)
        layers = [_dense(ql) for ql in integer_model.layers]
        shape = (integer_model.layers[0].in_features,)
    else:
        raise TypeError(f"integer_model must be a qcourse.conv.IntegerCNN or a "
                        f"qcourse.ptq.IntegerModel, got {type(integer_model).__name__}")
    qp = integer_model.input_qparams
    if (qp.qmin, qp.qmax) != (_INT8_MIN, _INT8_MAX):
        raise ExportError(f"the input grid [{qp.qmin}, {qp.qmax}] is not int8 [-128, 127]")
    return DeployModel(shape, float(qp.scale), int(qp.zero_point), tuple(layers), name=name)


#: How the course's integer CNN is made for deployment: the ReLU6 network of
#: :func:`qcourse.cnn.load_course_cnn`, converted by :func:`qcourse.cnn.convert_cnn` with this
#: many training images for calibration (the conv chapter's network).
COURSE_CALIBRATION_IMAGES = 512


@functools.lru_cache(maxsize=1)
def _course_model_cached():
    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn

    X_train, _ = digits_images("train")
    integer = convert_cnn(load_course_cnn("relu6"), X_train[:COURSE_CALIBRATION_IMAGES])
    X_test, y_test = digits_images("test")
    X_test = X_test.astype(np.float32)
    return (from_integer_model(integer, name="digits_cnn", input_shape=X_test.shape[1:]),
            X_test, y_test)


def course_model():
    """The course's trained integer network as a :class:`DeployModel`, with its test images.

    The course CNN of the conv chapter (a small MobileNet for the 8x8 digits: a 3x3
    convolution, three depthwise-separable blocks with ReLU6, global average pooling, a fully
    connected classifier), statically quantized with per-channel int8 weights
    (:func:`qcourse.cnn.convert_cnn`); input (N, 1, 8, 8) float32, NCHW.  Returns
    ``(model, X_test, y_test)``; cached per process.
    """
    model, X, y = _course_model_cached()
    return model, X.copy(), y.copy()
