"""The ONNX export, in the QOperator and the QDQ form (:func:`to_onnx`), and runs in
ONNX Runtime's CPU provider (:func:`run_onnx`).

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse import _checks
from qcourse.deploy.layers import (
    _INT8_MAX,
    _INT8_MIN,
    Dense,
    DeployModel,
    Flatten,
    GlobalAvgPool,
    MaxPool2D,
)
from qcourse.deploy.predict import (
    _check_runtime_input,
)

__all__ = [
    "run_onnx",
    "to_onnx",
]

# --------------------------------------------------------------------------- ONNX export

_ONNX_OPSET = 21


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - the test and book environments have it
        raise ImportError("the ONNX export needs the onnx package (pip install onnx)") from exc
    return onnx, TensorProto, helper, numpy_helper


# One pass over the layers writes each kind's nodes in both forms (QOperator and QDQ) side by
# side, so that the two forms can be read against each other.
# long because: each layer kind's nodes are written in place, both forms together
def to_onnx(model: DeployModel, form: str = "qoperator", *, float_input: bool = True):
    r"""The model as an ONNX ``ModelProto`` (opset 21): float32 images in, int8 codes out.

    ``form="qoperator"``: integer operators throughout -- ``QuantizeLinear`` for the input,
    ``QLinearConv`` for convolutions (``group`` = channels for depthwise, ``pads`` as given: ONNX
    pads a ``QLinearConv`` input with its zero point) and for a Dense with a bias (ONNX's
    ``QLinearMatMul`` has no bias input; a 1x1 ``QLinearConv`` on an (N, K, 1, 1) view has one),
    ``QLinearMatMul`` for a Dense without bias, an int8 ``Clip`` where the fused activation
    narrows the output grid, ``MaxPool`` / ``Flatten`` on int8 codes, and ONNX Runtime's
    ``QLinearGlobalAveragePool`` (domain ``com.microsoft``; ONNX has no integer global pool)
    followed by ``Flatten``.

    ``form="qdq"``: the graph a quantization tool emits -- float ``Conv`` / ``Gemm`` / ``MaxPool``
    between ``DequantizeLinear`` (int8 weights per output channel, int32 bias at
    :math:`S_x S_W`) and ``QuantizeLinear`` nodes; ONNX Runtime's graph optimizer fuses each
    group back into an integer kernel (the tests check that no float ``Conv``/``Gemm`` survives).
    An activation narrower than the output grid becomes an int8 ``Clip`` after the
    ``QuantizeLinear``.  A global average pool stays ``QLinearGlobalAveragePool`` in this form
    too: ONNX Runtime does not fuse a Q/DQ pool and would average in float.  Input (N, C, H, W)
    or (N, features), batch dynamic; int8 codes instead of float32 with ``float_input=False``.
    See the deploy chapter.
    """
    if not isinstance(model, DeployModel):
        raise TypeError(f"model must be a DeployModel, got {type(model).__name__}")
    if form not in ("qoperator", "qdq"):
        raise ValueError(f"form must be 'qoperator' or 'qdq', got {form!r}")
    float_input = _checks.check_bool(float_input, "float_input")
    onnx, TP, helper, nph = _onnx()
    nodes, inits = [], []

    def const(name, value):
        inits.append(nph.from_array(np.asarray(value), name))
        return name

    def qparams(prefix, scale, zp):
        return (const(f"{prefix}_scale", np.float32(scale)),
                const(f"{prefix}_zero_point", np.int8(zp)))

    x_s, x_z = qparams("images", model.input_scale, model.input_zero_point)
    if float_input:
        nodes.append(helper.make_node("QuantizeLinear", ["images", x_s, x_z], ["x0"]))
    else:
        nodes.append(helper.make_node("Identity", ["images"], ["x0"]))
    x = "x0"
    for i, layer in enumerate(model.layers):
        s_in, z_in = model.input_qparams(i)
        in_s, in_z = f"q{i}_in_scale", f"q{i}_in_zero_point"
        const(in_s, np.float32(s_in))
        const(in_z, np.int8(z_in))
        y = f"x{i + 1}"
        if isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [x], [y], axis=1))
            x = y
            continue
        if isinstance(layer, GlobalAvgPool):
            # ONNX Runtime's contrib operator (com.microsoft), in both forms: its graph
            # optimizer does not fuse DequantizeLinear -> GlobalAveragePool (or AveragePool) ->
            # QuantizeLinear, and the float mean it runs instead is not the integer one
            # (measured with onnxruntime 1.32: codes differ on ties)
            nodes.append(helper.make_node(
                "QLinearGlobalAveragePool", [x, in_s, in_z, in_s, in_z], [f"{y}_4d"],
                domain="com.microsoft", channels_last=0))
            nodes.append(helper.make_node("Flatten", [f"{y}_4d"], [y], axis=1))
            x = y
            continue
        if isinstance(layer, MaxPool2D):
            if form == "qoperator":
                nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=layer.kernel,
                                              strides=layer.stride))
            else:
                nodes += [helper.make_node("DequantizeLinear", [x, in_s, in_z], [f"{y}_f"]),
                          helper.make_node("MaxPool", [f"{y}_f"], [f"{y}_pf"],
                                           kernel_shape=layer.kernel, strides=layer.stride),
                          helper.make_node("QuantizeLinear", [f"{y}_pf", in_s, in_z], [y])]
            x = y
            continue
        out_s, out_z = qparams(f"layer{i}_out", layer.output_scale, layer.output_zero_point)
        c_out = layer.out_channels
        w_s = const(f"layer{i}_w_scale", np.broadcast_to(layer.weight_scale, (c_out,))
                    .astype(np.float32).copy())
        w_z = const(f"layer{i}_w_zero_point", np.zeros(c_out, np.int8))
        bias = const(f"layer{i}_bias", layer.bias)
        dense = isinstance(layer, Dense)
        w4 = layer.weight[:, :, None, None] if dense else layer.weight
        conv_attrs = {} if dense else {
            "strides": list(layer.stride), "group": layer.groups,
            "pads": [layer.padding[0], layer.padding[1], layer.padding[2], layer.padding[3]],
            "kernel_shape": list(layer.weight.shape[2:])}
        lo, hi = layer.clamp
        clip = (lo, hi) != (_INT8_MIN, _INT8_MAX)
        raw = f"{y}_raw" if clip else y
        if form == "qoperator":
            if dense and not np.any(layer.bias):
                wt = const(f"layer{i}_weight_t", np.ascontiguousarray(layer.weight.T))
                nodes.append(helper.make_node("QLinearMatMul", [x, in_s, in_z, wt, w_s, w_z,
                                                                out_s, out_z], [raw]))
            else:
                w = const(f"layer{i}_weight", np.ascontiguousarray(w4))
                src = x
                if dense:
                    axes = const(f"layer{i}_axes", np.array([2, 3], np.int64))
                    nodes.append(helper.make_node("Unsqueeze", [x, axes], [f"{y}_in4d"]))
                    src = f"{y}_in4d"
                nodes.append(helper.make_node(
                    "QLinearConv", [src, in_s, in_z, w, w_s, w_z, out_s, out_z, bias],
                    [f"{raw}_4d" if dense else raw], **conv_attrs))
                if dense:
                    nodes.append(helper.make_node("Flatten", [f"{raw}_4d"], [raw], axis=1))
        else:
            w = const(f"layer{i}_weight", np.ascontiguousarray(layer.weight if dense else w4))
            b_s = const(f"layer{i}_b_scale", (np.float32(s_in) * np.broadcast_to(
                layer.weight_scale, (c_out,))).astype(np.float32))
            b_z = const(f"layer{i}_b_zero_point", np.zeros(c_out, np.int32))
            nodes += [helper.make_node("DequantizeLinear", [x, in_s, in_z], [f"{y}_xf"]),
                      helper.make_node("DequantizeLinear", [w, w_s, w_z], [f"{y}_wf"], axis=0),
                      helper.make_node("DequantizeLinear", [bias, b_s, b_z], [f"{y}_bf"],
                                       axis=0)]
            if dense:
                nodes.append(helper.make_node("Gemm", [f"{y}_xf", f"{y}_wf", f"{y}_bf"],
                                              [f"{y}_f"], transB=1))
            else:
                nodes.append(helper.make_node("Conv", [f"{y}_xf", f"{y}_wf", f"{y}_bf"],
                                              [f"{y}_f"], **conv_attrs))
            nodes.append(helper.make_node("QuantizeLinear", [f"{y}_f", out_s, out_z], [raw]))
        if clip:
            nodes.append(helper.make_node("Clip", [raw, const(f"layer{i}_lo", np.int8(lo)),
                                                   const(f"layer{i}_hi", np.int8(hi))], [y]))
        x = y
    in_shape = ["N", *model.input_shape]
    out_shape = ["N", *model.output_shape]
    graph = helper.make_graph(
        nodes, f"{model.name}_{form}",
        [helper.make_tensor_value_info("images", TP.FLOAT if float_input else TP.INT8,
                                       in_shape)],
        [helper.make_tensor_value_info(x, TP.INT8, out_shape)], initializer=inits)
    opsets = [helper.make_opsetid("", _ONNX_OPSET)]
    if any(n.domain == "com.microsoft" for n in nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets,
                          producer_name="qcourse.deploy")
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def run_onnx(onnx_model, X, *, optimized_model_path=None) -> np.ndarray:
    """Run an ONNX model (a ``ModelProto`` or the bytes of one) in ONNX Runtime's CPU provider,
    one thread, all graph optimizations on (which fuse QDQ groups into integer kernels).

    ``X`` float32 in the course's layout; returns the int8 output codes.  With
    ``optimized_model_path`` ONNX Runtime also saves the graph it actually ran.
    """
    import onnxruntime as ort

    if isinstance(onnx_model, (bytes, bytearray)):
        data = onnx_model
    elif type(onnx_model).__name__ == "ModelProto" and hasattr(onnx_model, "SerializeToString"):
        data = onnx_model.SerializeToString()
    else:
        raise TypeError(f"onnx_model must be an onnx.ModelProto or the bytes of one, got "
                        f"{_checks.describe(onnx_model)}")
    _check_runtime_input(X)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    try:
        sess = ort.InferenceSession(bytes(data), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise ValueError(f"onnx_model is not a model ONNX Runtime can load: {exc}") from None
    inp = sess.get_inputs()[0]
    if len(inp.shape) != X.ndim or any(isinstance(d, int) and d != x for d, x in
                                       zip(inp.shape, X.shape, strict=True)):
        raise ValueError(f"X has shape {X.shape} but the model takes {tuple(inp.shape)}")
    return sess.run(None, {inp.name: X})[0]
