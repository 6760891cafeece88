"""Integer convolution (qcourse.conv) and the depthwise kernel (qcourse.kernels).

Every fast path is compared with its NumPy reference exactly, on random and tie-heavy inputs,
on every instruction-set path this CPU has; QLinearConv is compared with ONNX Runtime itself;
the TFLite requantizations with the fixed-point transcription of gemmlowp's
MultiplyByQuantizedMultiplier (qcourse.fixed_point); bad inputs raise errors that name them.
"""

import numpy as np
import pytest

from qcourse import kernels
from qcourse.affine import QParams, qparams_from_range
from qcourse.conv import (
    IntegerGlobalAvgPool,
    QuantizedConv2d,
    conv2d_accumulate,
    conv2d_int8,
    conv2d_int8_reference,
    im2col,
)
from qcourse.fixed_point import multiply_by_quantized_multiplier
from qcourse.int_matmul import qlinear_conv, qlinear_conv_reference
from qcourse.kernels import depthwise_conv_int8, depthwise_conv_int8_reference

PATHS = kernels.available_paths()


def _float_conv_nhwc(x, w, stride, padding, groups):
    """Float64 convolution of real values (NHWC input, (out, in/groups, kh, kw) weight)."""
    n, h, wd, c = x.shape
    out, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, oh, ow, out))
    og = out // groups
    for o in range(out):
        g = o // og
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw,
                           g * cg:(g + 1) * cg]
                y[:, i, j, o] = np.einsum("nuvc,cuv->n", patch, w[o])
    return y


def _random_case(rng, *, depthwise=None, tie=False):
    n = int(rng.integers(1, 3))
    depthwise = rng.random() < 0.4 if depthwise is None else depthwise
    groups = 1 if not depthwise else None
    c = int(rng.integers(1, 12))
    out = c if depthwise else int(rng.integers(1, 12))
    groups = c if depthwise else 1
    k = int(rng.choice([1, 3]))
    stride = int(rng.integers(1, 3))
    padding = int(rng.integers(0, 2)) if k == 3 else 0
    h, w = (int(v) for v in rng.integers(max(1, k - 2 * padding), 9, 2))
    lo, hi = (-8, 8) if tie else (-128, 128)
    x = rng.integers(lo, hi, (n, h, w, c)).astype(np.int8)
    wt = rng.integers(-127 if not tie else -8, 128 if not tie else 8,
                      (out, c // groups, k, k)).astype(np.int8)
    if tie:  # power-of-two multipliers: many accumulators land exactly on .5
        mult = np.float64(2.0) ** -rng.integers(1, 5, out).astype(np.float64)
    else:
        mult = rng.uniform(1e-4, 5e-3, out)
    bias = rng.integers(-3000, 3000, out).astype(np.int32)
    zx = int(rng.integers(-10, 10)) if tie else int(rng.integers(-128, 128))
    return dict(x=x, w=wt, mult=mult, bias=bias, zx=zx, stride=stride, padding=padding,
                groups=groups)


def _ties(case):
    acc = conv2d_accumulate(case["x"], case["w"], x_zero_point=case["zx"], bias=case["bias"],
                            stride=case["stride"], padding=case["padding"],
                            groups=case["groups"]).astype(np.float64)
    frac = np.abs(acc * case["mult"]) % 1
    return int(np.count_nonzero(frac == 0.5))


# --------------------------------------------------------------------------- im2col / accumulate


def test_accumulators_equal_the_float_convolution_of_the_real_values():
    """Padding with the zero point is padding the real value 0."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        case = _random_case(rng)
        acc = conv2d_accumulate(case["x"], case["w"], x_zero_point=case["zx"],
                                stride=case["stride"], padding=case["padding"],
                                groups=case["groups"])
        real = _float_conv_nhwc(case["x"].astype(np.float64) - case["zx"],
                                case["w"].astype(np.float64), case["stride"], case["padding"],
                                case["groups"])
        np.testing.assert_array_equal(acc, real)


def test_padding_with_integer_zero_is_wrong_when_the_zero_point_is_not_zero():
    x = np.full((1, 3, 3, 1), 5, np.int8)
    w = np.ones((1, 1, 3, 3), np.int8)
    acc = conv2d_accumulate(x, w, x_zero_point=5, padding=1)
    np.testing.assert_array_equal(acc, 0)   # every real input is 0, so is every output
    wrong = im2col(x, 3, 1, 1, layout="NHWC", pad_value=0).astype(np.int64) - 5
    assert wrong.reshape(9, 9).sum(axis=1)[0] == -25   # the corner sees 5 fake "-5" values


# --------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tie", [False, True])
def test_conv2d_int8_equals_its_reference_on_every_path(path, tie):
    rng = np.random.default_rng(1 + tie)
    ties = 0
    for _ in range(40):
        case = _random_case(rng, tie=tie)
        args = (case["x"], case["w"], case["mult"], 3)
        kw = dict(bias=case["bias"], x_zero_point=case["zx"], stride=case["stride"],
                  padding=case["padding"], groups=case["groups"])
        fast = conv2d_int8(*args, path=path, **kw)
        ref = conv2d_int8_reference(*args, **kw)
        np.testing.assert_array_equal(fast, ref)
        ties += _ties(case) if tie else 0
    if tie:
        assert ties > 100   # the tie cases really exercise round half to even


@pytest.mark.parametrize("path", PATHS)
def test_depthwise_kernel_equals_its_reference_on_every_path(path):
    rng = np.random.default_rng(3)
    for trial in range(60):
        n, h, w = (int(v) for v in rng.integers(1, 8, 3))
        c = int(rng.integers(1, 80))         # crosses the 16/32/64-lane widths
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        s, p = int(rng.integers(1, 3)), int(rng.integers(0, 2))
        if h + 2 * p < kh or w + 2 * p < kw:
            continue
        x = rng.integers(-128, 128, (n, h, w, c)).astype(np.int8)
        wt = rng.integers(-128, 128, (kh, kw, c)).astype(np.int8)
        mult = (np.float64(2.0) ** -rng.integers(1, 8, c) if trial % 2
                else rng.uniform(1e-5, 1e-2, c))
        kw_ = dict(bias=rng.integers(-9000, 9000, c).astype(np.int32),
                   x_zero_point=int(rng.integers(-128, 128)),
                   w_zero_point=rng.integers(-3, 4, c), stride=s, padding=p,
                   qmin=-100, qmax=120)
        np.testing.assert_array_equal(depthwise_conv_int8(x, wt, mult, 7, path=path, **kw_),
                                      depthwise_conv_int8_reference(x, wt, mult, 7, **kw_))


def test_depthwise_extremes():
    """-128 everywhere with -128 weights: the largest products, no overflow, saturation."""
    x = np.full((1, 4, 4, 5), -128, np.int8)
    w = np.full((3, 3, 5), -128, np.int8)
    y = depthwise_conv_int8(x, w, 1.0, 0, padding=1)
    assert (y == 127).all()
    y = depthwise_conv_int8(x, w, 1.0, 0, x_zero_point=-128, padding=1)
    assert (y == 0).all()


def test_a_wrong_reference_would_be_caught():
    """Rounding half away from zero instead of to even changes tie outputs: the tests see it."""
    rng = np.random.default_rng(4)
    case = _random_case(rng, depthwise=False, tie=True)
    while _ties(case) == 0:
        case = _random_case(rng, depthwise=False, tie=True)
    acc = conv2d_accumulate(case["x"], case["w"], x_zero_point=case["zx"], bias=case["bias"],
                            stride=case["stride"], padding=case["padding"]).astype(np.float64)
    away = np.clip(np.sign(acc * case["mult"]) * np.floor(np.abs(acc * case["mult"]) + 0.5)
                   + 3, -128, 127)
    fast = conv2d_int8(case["x"], case["w"], case["mult"], 3, bias=case["bias"],
                       x_zero_point=case["zx"], stride=case["stride"], padding=case["padding"])
    assert np.any(fast != away)


# --------------------------------------------------------------------------- ONNX Runtime


def _ort_qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, bias, stride, pad, group):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed")
    pytest.importorskip("onnx", reason="onnx is not installed")
    from onnx import TensorProto, helper, numpy_helper

    values = [("x_scale", np.float32(sx)), ("x_zero_point", zx), ("w", w), ("w_scale", sw),
              ("w_zero_point", zw), ("y_scale", np.float32(sy)), ("y_zero_point", zy)]
    inits = [numpy_helper.from_array(np.asarray(v), name=n) for n, v in values]
    names = ["x"] + [n for n, _ in values]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, name="B"))
        names.append("B")
    node = helper.make_node("QLinearConv", names, ["y"], strides=[stride, stride],
                            pads=[pad] * 4, group=group, kernel_shape=list(w.shape[2:]))
    et = TensorProto.INT8 if x.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph([node], "qlinearconv",
                              [helper.make_tensor_value_info("x", et, list(x.shape))],
                              [helper.make_tensor_value_info("y", et, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_qlinear_conv_is_bit_exact_with_onnx_runtime(tie, dtype):
    rng = np.random.default_rng(5 + tie + 2 * (dtype == np.uint8))
    compared = ties = 0
    for _ in range(30):
        case = _random_case(rng, tie=tie)
        shift = 128 if dtype == np.uint8 else 0
        x = (case["x"].astype(np.int16) + shift).astype(dtype).transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        out = case["w"].shape[0]
        if tie:   # scales whose float32 multiplier is exactly the power of two
            sx, sy = np.float32(0.5), np.float32(1.0)
            sw = (2 * case["mult"]).astype(np.float32)
        else:
            sx = np.float32(rng.uniform(0.005, 0.05))
            sw = rng.uniform(0.001, 0.02, out).astype(np.float32)
            sy = np.float32(rng.uniform(0.02, 0.5))
        zx = dtype(case["zx"] + shift)
        zy = dtype(int(rng.integers(-5, 5)) + shift)
        zw = np.zeros(out, np.int8)
        args = (x, sx, zx, case["w"], sw, zw, sy, zy, case["bias"])
        kw = dict(strides=[case["stride"]] * 2, pads=[case["padding"]] * 4,
                  group=case["groups"])
        want = _ort_qlinear_conv(*args, case["stride"], case["padding"], case["groups"])
        got = qlinear_conv(*args, **kw)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(qlinear_conv_reference(*args, **kw), want)
        compared += want.size
        ties += _ties(case) if tie else 0
    assert compared > 1000
    if tie:
        assert ties > 50


def test_qlinear_conv_per_tensor_weights_and_no_bias_match_onnx_runtime():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (2, 4, 6, 6)).astype(np.uint8)
    w = rng.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8)
    args = (x, np.float32(0.02), np.uint8(130), w, np.float32(0.01), np.int8(0),
            np.float32(0.3), np.uint8(120), None)
    want = _ort_qlinear_conv(*args, 2, 1, 1)
    np.testing.assert_array_equal(qlinear_conv(*args, strides=[2, 2], pads=[1] * 4), want)


# --------------------------------------------------------------------------- TFLite arithmetic


def _layer(rng, depthwise, activation="relu6"):
    c = 8
    out = c if depthwise else 6
    w = rng.normal(0, 0.3, (out, 1 if depthwise else c, 3, 3))
    xq = qparams_from_range(-1.0, 3.0, bits=8, signed=True)
    yq = qparams_from_range(0.0, 6.0, bits=8, signed=True)
    return QuantizedConv2d.from_float(w, rng.normal(0, 0.1, out), xq, yq, stride=1, padding=1,
                                      groups=c if depthwise else 1, activation=activation)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("rounding", ["double", "single"])
def test_tflite_requantization_is_gemmlowps_multiply_by_quantized_multiplier(depthwise,
                                                                            rounding):
    """TFLite's reference ConvPerChannel / DepthwiseConvPerChannel: acc ->
    MultiplyByQuantizedMultiplier(acc, M0_c, shift_c) + Z_y -> clamp to the activation range."""
    rng = np.random.default_rng(10)
    layer = _layer(rng, depthwise)
    x = rng.integers(-128, 128, (2, 5, 5, 8)).astype(np.int8)
    acc = layer.accumulate(x).astype(np.int64)
    mult, shift = layer.fixed_point_params(rounding)
    lo, hi = layer.output_range
    want = np.clip(multiply_by_quantized_multiplier(acc, mult, shift, rounding=rounding)
                   + int(layer.output_qparams.zero_point), lo, hi)
    np.testing.assert_array_equal(layer.reference(x, f"tflite_{rounding}"), want)


def test_layer_fast_path_equals_reference_and_float_result():
    rng = np.random.default_rng(11)
    for depthwise in (False, True):
        layer = _layer(rng, depthwise)
        x = rng.integers(-128, 128, (3, 6, 6, 8)).astype(np.int8)
        np.testing.assert_array_equal(layer(x), layer.reference(x))
        # close to the float layer: within one output step plus input rounding
        assert layer.kind == ("depthwise" if depthwise else "conv")
        lo, hi = layer.output_range
        assert layer(x).min() >= lo and layer(x).max() <= hi


def test_a_layer_that_can_overflow_int32_checks_each_input():
    # K = 70,000 taps of 255 * 127: the worst case overflows int32, so the compiled call first
    # computes the accumulators exactly and refuses an input that overflows (never a wrap);
    # an input that fits runs, and the IntegerCNN keeps the checked call for such a layer
    from qcourse.conv import IntegerCNN

    k = 70_000
    xq = QParams(scale=np.float64(0.01), zero_point=np.int64(127), qmin=-128, qmax=127)
    wq = QParams(scale=np.float64(0.01), zero_point=np.int64(0), qmin=-127, qmax=127)
    yq = QParams(scale=np.float64(1e4), zero_point=np.int64(0), qmin=-128, qmax=127)
    layer = QuantizedConv2d(np.full((1, k, 1, 1), 127, np.int8), None, xq, wq, yq)
    assert layer.linear._may_overflow
    with pytest.raises(ValueError, match="overflows"):
        layer(np.full((1, 1, 1, k), -128, np.int8))
    fits = np.full((1, 1, 1, k), 127, np.int8)
    fits[0, 0, 0, :100] = -128
    np.testing.assert_array_equal(layer(fits), layer.reference(fits))
    net = IntegerCNN(xq, [("big", layer)])
    with pytest.raises(ValueError, match="overflows"):
        net._steps()[0][1](np.full((1, 1, 1, k), -128, np.int8), 0)


@pytest.mark.parametrize("path", PATHS)
def test_layer_fast_path_equals_reference_on_every_geometry(path):
    # the prepared path (packed weights, gathered patches cached per input size, uint8 codes
    # shifted to int8) against the NumPy reference: kernel sizes, strides, paddings, both
    # storage types, several input sizes through the same layer
    rng = np.random.default_rng(12)
    checked = 0
    for kh, kw, stride, padding in [(3, 3, 1, 1), (3, 3, 2, 1), (3, 2, 2, 0), (5, 5, 1, 2),
                                    (1, 1, 2, 0), (1, 1, 1, 1), (2, 3, 3, 2)]:
        for signed in (True, False):
            cin, out = int(rng.integers(1, 6)), int(rng.integers(1, 40))
            xq = qparams_from_range(-1.0, 3.0, bits=8, signed=signed)
            yq = qparams_from_range(-2.0, 6.0, bits=8, signed=signed)
            layer = QuantizedConv2d.from_float(rng.normal(0, 0.3, (out, cin, kh, kw)),
                                               rng.normal(0, 0.1, out), xq, yq, stride=stride,
                                               padding=padding)
            lo, hi = (-128, 128) if signed else (0, 256)
            for h, w in [(7, 6), (5, 9), (7, 6)]:
                x = rng.integers(lo, hi, (2, h, w, cin)).astype(np.int8 if signed else np.uint8)
                got = layer(x, path=path)
                np.testing.assert_array_equal(got, layer.reference(x))
                checked += got.size
    assert checked > 5000


def test_integer_pool_roundings():
    qp = QParams(scale=np.float64(0.1), zero_point=np.int64(-3), qmin=-128, qmax=127)
    pool = IntegerGlobalAvgPool(qp)
    x = np.zeros((1, 2, 2, 2), np.int8)
    x[0, :, :, 0] = [[1, 2], [1, 2]]       # mean of the codes 1.5; of the offsets 4.5
    x[0, :, :, 1] = [[-1, -2], [-1, -2]]   # -1.5; 1.5
    # ONNX Runtime: Z + rhe(mean - Z): -3 + rhe(4.5) = 1 and -3 + rhe(1.5) = -1
    assert pool(x, "float").tolist() == [[1, -1]]
    assert pool(x, "tflite_double").tolist() == [[2, -2]]  # codes, half away from zero
    even = IntegerGlobalAvgPool(QParams(scale=np.float64(0.1), zero_point=np.int64(-4),
                                        qmin=-128, qmax=127))
    assert even(x, "float").tolist() == [[2, -2]]          # an even Z: rhe(1.5), rhe(-1.5)
    with pytest.raises(ValueError, match="requantization"):
        pool(x, "nearest")


def _pool_cases(rng, dtype, tie):
    """(codes NHWC, zero point) pairs: random, or with every sum an exact tie (hw even)."""
    lo, hi = (-128, 127) if dtype == np.int8 else (0, 255)
    for h, w in [(4, 4), (2, 3), (3, 3), (7, 7), (1, 1)]:
        for zp in (lo, lo + 1, lo + 125, lo + 126, hi - 1, hi):  # odd and even zero points
            x = rng.integers(lo, hi + 1, (5, h, w, 19))
            if tie and (h * w) % 2 == 0:     # move one pixel so that sum % hw == hw / 2
                need = (h * w // 2 - x.sum(axis=(1, 2))) % (h * w)
                first = x[:, 0, 0, :] + need
                x[:, 0, 0, :] = np.where(first > hi, first - h * w, first)
                assert np.all(x.sum(axis=(1, 2)) % (h * w) == h * w // 2)
            yield x.astype(dtype), zp


def _ort_global_pool(x, scale, zp):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed")
    pytest.importorskip("onnx", reason="onnx is not installed")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.float32(scale), name="s"),
             numpy_helper.from_array(np.array(zp, dtype=x.dtype), name="z")]
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "s", "z", "s", "z"], ["y"],
                            domain="com.microsoft", channels_last=1)
    et = TensorProto.INT8 if x.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", et, x.shape)],
                              [helper.make_tensor_value_info("y", et, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].reshape(x.shape[0], x.shape[3])


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_integer_pool_is_bit_exact_with_onnx_runtime(tie, dtype):
    rng = np.random.default_rng(11 + tie)
    compared = ties = 0
    for x, zp in _pool_cases(rng, dtype, tie):
        lo, hi = (-128, 127) if dtype == np.int8 else (0, 255)
        pool = IntegerGlobalAvgPool(QParams(scale=np.float64(0.0625), zero_point=np.int64(zp),
                                            qmin=lo, qmax=hi))
        want = _ort_global_pool(x, 0.0625, zp)
        np.testing.assert_array_equal(pool(x, "float"), want, err_msg=f"{x.shape} zp={zp}")
        n = x.shape[1] * x.shape[2]
        compared += want.size
        ties += int(np.sum(x.astype(np.int64).sum(axis=(1, 2)) % n == n / 2))
    assert compared == 5 * 6 * 5 * 19 and (ties >= 1140 if tie else 0 < ties < 300), ties


def _litert_average_pool(x, scale, zp, resolver):
    """One AVERAGE_POOL_2D (the whole image, VALID) as a .tflite flatbuffer, run in LiteRT."""
    litert = pytest.importorskip("ai_edge_litert", reason="LiteRT (ai-edge-litert) is not "
                                 "installed")
    import flatbuffers
    from ai_edge_litert import interpreter as tfl
    from ai_edge_litert import schema_py_generated as fb

    def tensor(name, shape):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), fb.TensorType.INT8, 0
        t.quantization = fb.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [float(scale)], [int(zp)]
        return t

    n, h, w, c = x.shape
    opts = fb.Pool2DOptionsT()
    opts.padding, opts.strideH, opts.strideW = fb.Padding.VALID, 1, 1
    opts.filterHeight, opts.filterWidth = h, w
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.Pool2DOptions, opts
    sub = fb.SubGraphT()
    sub.tensors = [tensor("x", x.shape), tensor("y", (n, 1, 1, c))]
    sub.inputs, sub.outputs = [0], [1]
    sub.operators = [op]
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.AVERAGE_POOL_2D
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [sub]
    model.buffers = [fb.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    it = tfl.Interpreter(model_content=bytes(builder.Output()),
                         experimental_op_resolver_type=getattr(tfl.OpResolverType, resolver))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    assert litert is not None
    return it.get_tensor(it.get_output_details()[0]["index"]).reshape(n, c)


@pytest.mark.parametrize("resolver", ["AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "BUILTIN_REF"])
def test_integer_pool_tflite_rounding_is_litert_average_pool(resolver):
    # AUTO runs XNNPACK, the second LiteRT's optimized kernels, the third its reference kernels
    rng = np.random.default_rng(13)
    compared = 0
    for tie in (False, True):
        for x, zp in _pool_cases(rng, np.int8, tie):
            pool = IntegerGlobalAvgPool(QParams(scale=np.float64(0.0625),
                                                zero_point=np.int64(zp), qmin=-128, qmax=127))
            want = _litert_average_pool(x, 0.0625, zp, resolver)
            for rq in ("tflite_double", "tflite_single"):
                np.testing.assert_array_equal(pool(x, rq), want, err_msg=f"{x.shape} zp={zp}")
            compared += want.size
    assert compared == 2 * 5 * 6 * 5 * 19


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=np.zeros((1, 4, 4, 3), np.int16)), TypeError, "x_q must have dtype int8 or uint8"),
    (dict(x=np.zeros((4, 4, 3), np.int8)), ValueError, "4-D"),
    (dict(x=np.zeros((1, 4, 4, 5), np.int8)), ValueError, "expects 3 input channels"),
    (dict(x=np.zeros((1, 2, 2, 3), np.int8), padding=0), ValueError, "does not fit"),
    (dict(stride=0), ValueError, "stride"),
    (dict(groups=2), ValueError, "groups=2 must divide"),
])
def test_conv2d_bad_inputs(kwargs, exc, match):
    args = dict(x=np.zeros((1, 4, 4, 3), np.int8), padding=1, stride=1, groups=1)
    args.update(kwargs)
    w = np.zeros((4, 3, 3, 3), np.int8)
    with pytest.raises(exc, match=match):
        conv2d_int8(args["x"], w, 0.1, 0, stride=args["stride"], padding=args["padding"],
                    groups=args["groups"])


def test_wrong_layout_is_named():
    x = np.zeros((1, 3, 8, 8), np.int8)    # NCHW given where NHWC is expected
    w = np.zeros((4, 3, 3, 3), np.int8)
    with pytest.raises(ValueError, match="NHWC"):
        conv2d_int8(x, w, 0.1, 0, padding=1)
    with pytest.raises(ValueError, match="depthwise convolution has one filter per channel"):
        depthwise_conv_int8(np.zeros((1, 4, 4, 3), np.int8), np.zeros((3, 3, 4), np.int8), 0.1)


def test_qlinear_conv_bad_attributes():
    x = np.zeros((1, 3, 5, 5), np.uint8)
    w = np.zeros((2, 3, 3, 3), np.int8)
    args = (x, np.float32(0.1), np.uint8(0), w, np.float32(0.1), np.int8(0), np.float32(0.1),
            np.uint8(0))
    with pytest.raises(ValueError, match="dilations"):
        qlinear_conv(*args, dilations=[0, 1])
    with pytest.raises(ValueError, match="pads"):
        qlinear_conv(*args, pads=[1, 1])
    with pytest.raises(TypeError, match="y_zero_point"):
        qlinear_conv(*args[:7], 0)


def test_qlinear_conv_runs_the_kernels_where_it_can_and_the_reference_elsewhere(monkeypatch):
    # one home for the operator: the 2-D cases on conv2d_int8, the rest on the NumPy twin, the
    # same codes either way (a kernel that is not called, or called wrongly, is caught)
    import qcourse.conv as conv_module

    calls = []
    real = conv_module.conv2d_int8

    def counting(*a, **k):
        calls.append(k["stride"])
        return real(*a, **k)

    monkeypatch.setattr(conv_module, "conv2d_int8", counting)
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (2, 4, 7, 7)).astype(np.uint8)
    w = rng.integers(0, 256, (6, 2, 3, 3)).astype(np.uint8)
    args = (x, np.float32(0.02), np.uint8(131), w, np.float32(0.004), np.uint8(127),
            np.float32(0.5), np.int8(3), rng.integers(-900, 900, 6).astype(np.int32))
    for attrs, fast in [({"strides": [2, 2], "pads": [1] * 4, "group": 2}, True),
                        ({"pads": [0, 1, 0, 1], "group": 2}, False),
                        ({"dilations": [2, 2], "group": 2}, False),
                        ({"strides": [1, 2], "group": 2}, False),
                        ({"auto_pad": "SAME_UPPER", "group": 2}, True)]:
        calls.clear()
        got = qlinear_conv(*args, **attrs)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, qlinear_conv_reference(*args, **attrs))
        assert calls == ([2 if attrs.get("strides") == [2, 2] else 1] if fast else []), attrs
        assert len(np.unique(got)) > 10
    monkeypatch.setattr(conv_module, "conv2d_int8", lambda *a, **k: real(*a, **k) + 1)
    assert not np.array_equal(qlinear_conv(*args, pads=[1] * 4, group=2),
                              qlinear_conv_reference(*args, pads=[1] * 4, group=2))


def test_integer_cnn_names_a_wrong_image_layout():
    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn
    X, _ = digits_images("test")
    model = convert_cnn(load_course_cnn(), X[:64])
    with pytest.raises(ValueError, match="NCHW with 1 channel"):
        model.logits_codes(X[:2].transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="4-D"):
        model.logits_codes(X[:2].reshape(2, 64))
