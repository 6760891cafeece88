"""The ``.tflite`` export (:func:`to_tflite`, with the schema module and ``flatbuffers``
that the ``ai-edge-litert`` wheel brings) and runs in LiteRT's interpreter under
each op resolver (:func:`run_tflite`).

Re-exported by :mod:`qcourse.deploy`; see the deploy chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse import _checks
from qcourse.deploy.layers import (
    Dense,
    DeployModel,
    Flatten,
    GlobalAvgPool,
    MaxPool2D,
)
from qcourse.deploy.predict import (
    LITERT_RESOLVERS,
    _check_runtime,
    _check_runtime_input,
    _from_nhwc,
    _to_nhwc,
    tflite_fused_activation,
)

__all__ = [
    "ops_outside_delegates",
    "run_tflite",
    "to_tflite",
]

# --------------------------------------------------------------------------- .tflite export


def _litert():
    """The ai-edge-litert modules (schema, interpreter) and flatbuffers, or a clear ImportError."""
    try:
        import flatbuffers
        from ai_edge_litert import interpreter, schema_py_generated
    except ImportError as exc:  # pragma: no cover - the test and book environments have it
        raise ImportError("the .tflite export and LiteRT runs need the ai-edge-litert package "
                          "(pip install ai-edge-litert==2.3.0)") from exc
    return schema_py_generated, interpreter, flatbuffers


def _same_padding(in_size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) for one spatial axis."""
    out = -(-in_size // stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    return total // 2, total - total // 2


class _TFLiteGraph:
    """Tensors, buffers and operators of one subgraph, built with the schema's object API."""

    def __init__(self, schema):
        self.S = schema
        self.tensors, self.buffers, self.operators, self.opcodes = [], [schema.BufferT()], [], {}

    def tensor(self, name, shape, ttype, scale=None, zero_point=None, data=None, dim=0,
               dynamic_batch=True):
        S = self.S
        t = S.TensorT()
        t.name = name
        t.shape = [1, *shape[1:]] if dynamic_batch else list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.type = ttype
        t.buffer = 0
        if data is not None:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8).tolist()
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = S.QuantizationParametersT()
            q.scale = [float(v) for v in np.atleast_1d(np.asarray(scale, np.float32))]
            q.zeroPoint = [int(v) for v in np.broadcast_to(zero_point, (len(q.scale),))]
            q.quantizedDimension = dim
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code, inputs, outputs, options_type=0, options=None):
        S = self.S
        if code not in self.opcodes:
            oc = S.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            self.opcodes[code] = (len(self.opcodes), oc)
        o = S.OperatorT()
        o.opcodeIndex = self.opcodes[code][0]
        o.inputs, o.outputs = list(inputs), list(outputs)
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    def finish(self, inputs, outputs, description) -> bytes:
        S = self.S
        _, _, flatbuffers = _litert()
        sg = S.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators = self.tensors, inputs, outputs, \
            self.operators
        sg.name = "main"
        m = S.ModelT()
        m.version = 3
        m.operatorCodes = [oc for _, oc in sorted(self.opcodes.values(), key=lambda t: t[0])]
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.description = description
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


# One pass over the layers writes each kind's LiteRT operators in turn, sharing the graph's
# running state (the current tensor, its shape, a pending NCHW flatten).
# long because: each layer kind's operators are written in place, in the order they run
def to_tflite(model: DeployModel, *, float_input: bool = True) -> bytes:
    """The model as a ``.tflite`` flatbuffer (bytes): float32 in (NHWC or (N, features)), the
    last layer's int8 codes out.

    Operators: ``QUANTIZE`` (float32 -> int8 input), ``PAD`` (with the input zero point, where a
    convolution's padding is not TensorFlow's SAME), ``CONV_2D``, ``DEPTHWISE_CONV_2D``,
    ``MAX_POOL_2D``, ``AVERAGE_POOL_2D`` (global, then ``RESHAPE``), ``RESHAPE`` (flatten) and
    ``FULLY_CONNECTED``, each with its fused activation
    (:func:`tflite_fused_activation`); weights int8 per output channel (``quantized_dimension``
    0 for convolutions and fully-connected layers, 3 for depthwise filters, which LiteRT stores
    as (1, kh, kw, C)), biases int32 at scale :math:`S_x S_W`.  A Dense after a Flatten of a
    (C, H, W) tensor gets its input columns permuted from NCHW to LiteRT's NHWC order.  The batch
    dimension is dynamic (``shape_signature`` -1).  With ``float_input=False`` the model takes the
    int8 input codes directly (no ``QUANTIZE``).  See the deploy chapter.
    """
    if not isinstance(model, DeployModel):
        raise TypeError(f"model must be a DeployModel, got {type(model).__name__}")
    float_input = _checks.check_bool(float_input, "float_input")
    S, _, _ = _litert()
    g = _TFLiteGraph(S)
    BO, TT = S.BuiltinOperator, S.TensorType
    act_codes = {"NONE": S.ActivationFunctionType.NONE, "RELU": S.ActivationFunctionType.RELU,
                 "RELU6": S.ActivationFunctionType.RELU6}

    def nhwc(shape):
        return (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape

    x = g.tensor("images_int8", (1, *nhwc(model.input_shape)), TT.INT8, model.input_scale,
                 model.input_zero_point)
    x_f = x
    if float_input:
        x_f = g.tensor("images", (1, *nhwc(model.input_shape)), TT.FLOAT32)
        g.op(BO.QUANTIZE, [x_f], [x])
    shape = model.input_shape
    flattened_from = None
    for i, layer in enumerate(model.layers):
        s_in, z_in = model.input_qparams(i)
        out_shape = model.shapes[i]
        if isinstance(layer, Flatten):
            new = g.tensor(f"shape_{i}", (2,), TT.INT32, data=np.array([-1, out_shape[0]],
                                                                      np.int32),
                           dynamic_batch=False)
            y = g.tensor(f"layer{i}_flatten", (1, out_shape[0]), TT.INT8, s_in, z_in)
            opts = S.ReshapeOptionsT()
            opts.newShape = [-1, out_shape[0]]
            g.op(BO.RESHAPE, [x, new], [y], S.BuiltinOptions.ReshapeOptions, opts)
            flattened_from = shape
        elif isinstance(layer, MaxPool2D):
            y = g.tensor(f"layer{i}_maxpool", (1, *nhwc(out_shape)), TT.INT8, s_in, z_in)
            opts = S.Pool2DOptionsT()
            opts.padding = S.Padding.VALID
            opts.strideH, opts.strideW = layer.stride
            opts.filterHeight, opts.filterWidth = layer.kernel
            g.op(BO.MAX_POOL_2D, [x], [y], S.BuiltinOptions.Pool2DOptions, opts)
        elif isinstance(layer, GlobalAvgPool):
            c, h, wd = shape
            pooled = g.tensor(f"layer{i}_avgpool", (1, 1, 1, c), TT.INT8, s_in, z_in)
            opts = S.Pool2DOptionsT()
            opts.padding = S.Padding.VALID
            opts.strideH = opts.strideW = 1
            opts.filterHeight, opts.filterWidth = h, wd
            g.op(BO.AVERAGE_POOL_2D, [x], [pooled], S.BuiltinOptions.Pool2DOptions, opts)
            new = g.tensor(f"shape_{i}", (2,), TT.INT32, data=np.array([-1, c], np.int32),
                           dynamic_batch=False)
            y = g.tensor(f"layer{i}_pooled", (1, c), TT.INT8, s_in, z_in)
            opts = S.ReshapeOptionsT()
            opts.newShape = [-1, c]
            g.op(BO.RESHAPE, [pooled, new], [y], S.BuiltinOptions.ReshapeOptions, opts)
            flattened_from = None      # (C,) in channel order: no column permutation
        elif isinstance(layer, Dense):
            w = layer.weight
            if flattened_from is not None and len(flattened_from) == 3:
                c, h, wd = flattened_from   # NCHW column order -> NHWC column order
                w = w.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
            act = tflite_fused_activation(layer)
            wt = g.tensor(f"layer{i}_weight", w.shape, TT.INT8, layer.weight_scale, 0, data=w,
                          dynamic_batch=False)
            bscale = (np.float32(s_in) * layer.weight_scale).astype(np.float32)
            bt = g.tensor(f"layer{i}_bias", (layer.out_channels,), TT.INT32, bscale, 0,
                          data=layer.bias, dynamic_batch=False)
            y = g.tensor(f"layer{i}_dense", (1, layer.out_channels), TT.INT8,
                         layer.output_scale, layer.output_zero_point)
            opts = S.FullyConnectedOptionsT()
            opts.fusedActivationFunction = act_codes[act]
            g.op(BO.FULLY_CONNECTED, [x, wt, bt], [y], S.BuiltinOptions.FullyConnectedOptions,
                 opts)
        else:
            act = tflite_fused_activation(layer)
            c, h, wd = shape
            kh, kw = layer.weight.shape[2:]
            sh, sw = layer.stride
            top, left, bottom, right = layer.padding
            same = (_same_padding(h, kh, sh) == (top, bottom)
                    and _same_padding(wd, kw, sw) == (left, right))
            if not same and any(layer.padding):
                padded = (c, h + top + bottom, wd + left + right)
                pads = g.tensor(f"layer{i}_pads", (4, 2), TT.INT32,
                                data=np.array([[0, 0], [top, bottom], [left, right], [0, 0]],
                                              np.int32), dynamic_batch=False)
                xp = g.tensor(f"layer{i}_padded", (1, *nhwc(padded)), TT.INT8, s_in, z_in)
                g.op(BO.PAD, [x, pads], [xp], S.BuiltinOptions.PadOptions, S.PadOptionsT())
                x = xp
            padding = S.Padding.SAME if same and any(layer.padding) else S.Padding.VALID
            bscale = (np.float32(s_in) * layer.weight_scale).astype(np.float32)
            bt = g.tensor(f"layer{i}_bias", (layer.out_channels,), TT.INT32, bscale, 0,
                          data=layer.bias, dynamic_batch=False)
            y = g.tensor(f"layer{i}_{layer.kind}", (1, *nhwc(out_shape)), TT.INT8,
                         layer.output_scale, layer.output_zero_point)
            if layer.groups == 1:
                w = layer.weight.transpose(0, 2, 3, 1)            # OHWI
                wt = g.tensor(f"layer{i}_weight", w.shape, TT.INT8, layer.weight_scale, 0,
                              data=w, dim=0, dynamic_batch=False)
                opts = S.Conv2DOptionsT()
                code, otype = BO.CONV_2D, S.BuiltinOptions.Conv2DOptions
            else:
                w = layer.weight.transpose(1, 2, 3, 0)            # (1, kh, kw, C)
                wt = g.tensor(f"layer{i}_weight", w.shape, TT.INT8, layer.weight_scale, 0,
                              data=w, dim=3, dynamic_batch=False)
                opts = S.DepthwiseConv2DOptionsT()
                opts.depthMultiplier = 1
                code, otype = BO.DEPTHWISE_CONV_2D, S.BuiltinOptions.DepthwiseConv2DOptions
            opts.padding = padding
            opts.strideH, opts.strideW = sh, sw
            opts.dilationHFactor = opts.dilationWFactor = 1
            opts.fusedActivationFunction = act_codes[act]
            g.op(code, [x, wt, bt], [y], otype, opts)
        x = y
        shape = out_shape
    return g.finish([x_f], [x], f"{model.name} (qcourse.deploy)")


def _interpreter(model_bytes: bytes, runtime: str, batch_shape: tuple):
    _, interp, _ = _litert()
    resolver = getattr(interp.OpResolverType, LITERT_RESOLVERS[runtime])
    it = interp.Interpreter(model_content=model_bytes, experimental_op_resolver_type=resolver,
                            num_threads=1)
    inp = it.get_input_details()[0]
    if tuple(inp["shape"]) != batch_shape:
        it.resize_tensor_input(inp["index"], list(batch_shape))
    it.allocate_tensors()
    return it


#: Operators that LiteRT's XNNPACK delegate leaves to the built-in kernels in the course's
#: models: ``AVERAGE_POOL_2D`` on int8 (measured with ai-edge-litert 2.3.0), whose integer
#: rounding every resolver shares (the ``pool`` entries of :data:`RUNTIME_ARITHMETIC`).
_BUILTIN_UNDER_XNNPACK = frozenset({"AVERAGE_POOL_2D"})


def ops_outside_delegates(it) -> list[str]:
    """The operators a LiteRT interpreter ``it`` runs itself, not inside a ``DELEGATE`` node
    (names, from the outputs back): walk back from the outputs through the delegate nodes and
    the original operators that produce their inputs."""
    _checks.check_instance(it, "it", _litert()[1].Interpreter,
                           "a LiteRT interpreter (ai_edge_litert.interpreter.Interpreter)")
    ops = it._get_ops_details()
    producer = {}
    for o in ops:                       # a DELEGATE comes after the operators it replaces
        for t in o["outputs"]:
            producer[int(t)] = o
    need = [int(d["index"]) for d in it.get_output_details()]
    seen, outside = set(), []
    while need:
        t = need.pop()
        o = producer.get(t)
        if o is None or o["index"] in seen:
            continue
        seen.add(o["index"])
        if o["op_name"] != "DELEGATE":
            outside.append(o["op_name"])
        need += [int(i) for i in o["inputs"] if int(i) >= 0]
    return outside


def run_tflite(model_bytes: bytes, X, runtime: str = "tflite-xnnpack", *,
               check_delegated: bool = True) -> np.ndarray:
    """Run a ``.tflite`` model in LiteRT's interpreter with the runtime's op resolver.

    ``X`` is float32 in the course's layout (NCHW images or (N, features)); it is transposed to
    NHWC for LiteRT and the output transposed back, so the codes compare directly with
    :func:`predict_codes`.  With ``runtime="tflite-xnnpack"`` and ``check_delegated`` (default),
    a model of which XNNPACK did not take every operator but an ``AVERAGE_POOL_2D`` raises
    ``RuntimeError`` (the prediction assumes XNNPACK's arithmetic for the rest).
    """
    _check_runtime(runtime)
    if runtime == "onnx":
        raise ValueError("run_tflite runs LiteRT runtimes; use run_onnx for 'onnx'")
    if not isinstance(model_bytes, (bytes, bytearray)):
        raise TypeError(f"model_bytes must be bytes (a .tflite file's content), got "
                        f"{type(model_bytes).__name__}")
    check_delegated = _checks.check_bool(check_delegated, "check_delegated")
    _check_runtime_input(X)
    xin = np.ascontiguousarray(_to_nhwc(X))
    it = _interpreter(bytes(model_bytes), runtime, xin.shape)
    inp = it.get_input_details()[0]
    if tuple(inp["shape"]) != xin.shape:
        raise ValueError(f"X has shape {X.shape} but the model takes {tuple(inp['shape'])} "
                         f"(NHWC in the file)")
    if runtime == "tflite-xnnpack" and check_delegated:
        outside = ops_outside_delegates(it)
        if set(outside) - _BUILTIN_UNDER_XNNPACK:
            raise RuntimeError("XNNPACK did not take the model's operators "
                               + ", ".join(outside) + " (the prediction assumes that only "
                               + ", ".join(sorted(_BUILTIN_UNDER_XNNPACK)) + " run outside it)")
    it.set_tensor(inp["index"], xin)
    it.invoke()
    out = it.get_tensor(it.get_output_details()[0]["index"]).copy()
    return _from_nhwc(out)
