"""Post-training quantization and the integer-only network (qcourse.ptq).

What is checked, and against what:

* the integer network's codes against an integer reference written here, independently of
  ``qcourse.int_matmul`` and ``qcourse.kernels`` (NumPy int64 accumulators, the ONNX Runtime
  float32 multiplier, round half to even), on the trained network and on random networks
  (Hypothesis);
* the integer network against ONNX Runtime: the same network as a chain of ``QLinearConv``
  nodes (a 1 x 1 convolution is a linear layer with an int32 bias), bit for bit;
* that the integer network's predictions come from the compiled kernels alone: the float path
  and every NumPy reference are swapped out, the kernel's calls are counted, and corrupting the
  kernel's output changes the predictions;
* the simulated (fake-quant) models against direct computations of what they claim;
* the orderings the chapter asserts, on *other* seeds than the chapter uses, so that they are
  not an accident of one seed;
* sizes against the bytes :func:`qcourse.affine.pack_int` really produces; bad inputs.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcourse.affine as affine
import qcourse.int_matmul as int_matmul
import qcourse.nn as nn
from qcourse import _kernels
from qcourse.affine import pack_int, sqnr_db
from qcourse.calibration import MinMaxObserver, PercentileObserver
from qcourse.ptq import (
    INCEPTION_V3_RELU6_TABLE,
    DynamicIntegerModel,
    IntegerModel,
    PTQModel,
    compare_fake_quant_integer,
    convert_to_integer,
    dynamic_ptq,
    fold_batch_norm,
    model_size,
    static_ptq,
    train_reference_model,
    weight_only_ptq,
)

F32 = np.float32


@pytest.fixture(scope="module")
def ref():
    return train_reference_model(0)


@pytest.fixture(scope="module")
def static8(ref):
    return static_ptq(ref.model, ref.X_calib)


# --------------------------------------------------------------------------- an independent
# integer reference: int64 accumulators, ONNX Runtime's float32 multiplier, round half to even


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def integer_reference(model: PTQModel, X) -> list[np.ndarray]:
    """The codes every layer of the integer network must produce, computed from scratch."""
    x_qp = model.activations["input"]
    q = np.clip(np.rint(X.astype(np.float64) / x_qp.scale) + int(x_qp.zero_point),
                x_qp.qmin, x_qp.qmax).astype(np.int64)
    out = []
    for unit in model.units:
        w, w_qp = model.weights[unit.linear]
        y_qp = model.activations[unit.output]
        n_out = w.shape[0]
        sx = F32(x_qp.scale)
        sw = np.broadcast_to(w_qp.scale, (n_out,)).astype(F32)
        sy = F32(y_qp.scale)
        zw = np.broadcast_to(w_qp.zero_point, (n_out,)).astype(np.int64)
        acc = (q - int(x_qp.zero_point)) @ (w.astype(np.int64) - zw[:, None]).T
        b_q = np.rint(model.biases[unit.linear].astype(np.float64)
                      / (np.float64(sx) * sw.astype(np.float64)))
        acc = acc + b_q.astype(np.int64)
        m = (sx * sw) / sy                                    # float32, ONNX Runtime's order
        zy = int(y_qp.zero_point)
        v = np.rint(acc.astype(F32) * m).astype(np.int64) + zy
        lo, hi = y_qp.qmin, y_qp.qmax
        if unit.kind in ("relu", "relu6"):
            lo = max(lo, zy)
        if unit.kind == "relu6":
            hi = min(hi, zy + int(_round_half_away(np.float64(F32(6.0) / sy))))
        q = np.clip(v, lo, hi)
        out.append(q)
        x_qp = y_qp
    return out


# --------------------------------------------------------------------------- the reference model


def test_reference_model_is_deterministic_cached_and_fresh():
    a = train_reference_model(0)
    b = train_reference_model(0)
    assert a.model is not b.model
    for (pa, _), (pb, _) in zip(a.model.parameters(), b.model.parameters(), strict=True):
        np.testing.assert_array_equal(pa, pb)
    a.model["fc1"].weight[...] = 0.0            # callers may modify their copy ...
    c = train_reference_model(0)
    assert np.any(c.model["fc1"].weight != 0)   # ... without touching the cache
    assert c.float_accuracy == b.float_accuracy > 0.95
    assert c.X_train.shape == (1347, 64) and c.X_test.shape == (450, 64)
    np.testing.assert_array_equal(c.X_calib, c.X_train[:256])
    assert len(c.history["loss"]) == 30
    d = train_reference_model(1)
    assert np.any(d.model["fc1"].weight != c.model["fc1"].weight)


def test_reference_model_relu6():
    r = train_reference_model(0, activation="relu6")
    assert isinstance(r.model["act1"], nn.ReLU6)
    assert r.float_accuracy > 0.95


@pytest.mark.parametrize("kwargs, error", [
    ({"seed": -1}, ValueError), ({"seed": 1.5}, TypeError), ({"activation": "tanh"}, ValueError),
    ({"sizes": (64, 10, 9)}, ValueError), ({"sizes": (32, 10)}, ValueError),
    ({"epochs": 0}, ValueError), ({"lr": 0.0}, ValueError), ({"calib_size": 0}, ValueError),
    ({"calib_size": 5000}, ValueError),
])
def test_reference_model_bad_arguments(kwargs, error):
    with pytest.raises(error):
        train_reference_model(**kwargs)


# --------------------------------------------------------------------------- the three PTQ modes


def _params(model):
    return [p.copy() for p, _ in model.parameters()]


def test_weight_only_replaces_weights_and_leaves_the_float_model_alone(ref):
    before = _params(ref.model)
    m = weight_only_ptq(ref.model, bits=4, per_channel=True)
    for (p, _), b in zip(ref.model.parameters(), before, strict=True):
        np.testing.assert_array_equal(p, b)
    for name in ("fc1", "fc2", "fc3"):
        q, qp = m.weights[name]
        np.testing.assert_array_equal(m.model[name].weight, affine.dequantize(q, qp))
        np.testing.assert_array_equal(m.model[name].bias, ref.model[name].bias)
    # activations are float: the simulated network is the float network with these weights
    x = ref.X_test[:50]
    h = np.maximum(x @ m.model["fc1"].weight.T + m.model["fc1"].bias, 0)
    h = np.maximum(h @ m.model["fc2"].weight.T + m.model["fc2"].bias, 0)
    np.testing.assert_allclose(m(x), h @ m.model["fc3"].weight.T + m.model["fc3"].bias,
                               rtol=1e-5, atol=1e-5)
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in ref.model)
    assert m.mode == "weight_only" and "4-bit per-channel" in repr(m)


def test_dynamic_quantizes_each_layer_input_per_batch(ref):
    m = dynamic_ptq(ref.model, weight_bits=8, activation_bits=4)
    x = ref.X_test[:40]
    seen = []
    with m.model["fc2"].register_forward_hook(lambda mod, inp, out: seen.append(inp)):
        m(x)
    inp = seen[0]
    # the input of fc2 lies on a 4-bit grid spanning exactly this batch's range
    levels = np.unique(inp)
    assert 2 <= levels.size <= 16
    steps = np.diff(levels) / np.diff(levels).min()
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)
    # per batch: a different batch gives a different grid
    seen.clear()
    with m.model["fc2"].register_forward_hook(lambda mod, inp, out: seen.append(inp)):
        m(x[:3])
    assert not np.isin(np.unique(seen[0]), levels).all()


def _counting(monkeypatch, name):
    """Replace ``qcourse._kernels.<name>`` by a wrapper that records each call."""
    calls = []
    real = getattr(_kernels, name)

    def wrapper(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(_kernels, name, wrapper)
    return calls


@pytest.mark.parametrize("per_row", [False, True])
def test_dynamic_integer_model_matches_the_simulation(ref, monkeypatch, per_row):
    m = dynamic_ptq(ref.model, weight_bits=8, activation_bits=8, per_row=per_row)
    integer = convert_to_integer(m)
    assert isinstance(integer, DynamicIntegerModel)
    calls = _counting(monkeypatch, "gemm_packed")
    logits = integer(ref.X_test)
    assert len(calls) == 3
    sim = m(ref.X_test)
    np.testing.assert_allclose(logits, sim, rtol=1e-4, atol=1e-4 * np.abs(sim).max())
    np.testing.assert_array_equal(integer.predict(ref.X_test), m.predict(ref.X_test))
    assert integer.accuracy(ref.X_test, ref.y_test) == m.accuracy(ref.X_test, ref.y_test)


def test_static_calibration_ranges(ref, static8):
    m = static8
    assert set(m.activations) == {"input", "act1", "act2", "fc3"}
    obs = MinMaxObserver().update(ref.X_calib)
    want = obs.qparams()
    got = m.activations["input"]
    assert got.zero_point == want.zero_point
    assert float(got.scale) == float(F32(want.scale))
    # ReLU outputs start at 0: zero point at the bottom of the int8 grid
    for name in ("act1", "act2"):
        assert int(m.activations[name].zero_point) == -128
    logits = ref.model(ref.X_calib)
    qp = m.activations["fc3"]
    lo, hi = qp.representable_range()       # min-max: covers the logits up to rounding of Z
    tol = float(qp.scale) * (0.5 + 1e-4)
    assert lo <= logits.min() + tol and hi >= logits.max() - tol
    assert hi - lo >= (logits.max() - logits.min()) * (1 - 1e-6)
    # calibration left no hook behind on the float model, and did not change it
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in ref.model)
    np.testing.assert_array_equal(ref.model(ref.X_test[:5]),
                                  train_reference_model(0).model(ref.X_test[:5]))


def test_static_simulation_puts_every_unit_output_on_its_grid(ref, static8):
    acts = nn.capture_activations(static8.model, ref.X_test, layers=["act1", "act2", "fc3"])
    for name, a in acts.items():
        qp = static8.activations[name]
        codes = (a.output.astype(np.float64) / qp.scale) + int(qp.zero_point)
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)


def test_static_with_a_percentile_observer_clips(ref):
    pct = static_ptq(ref.model, ref.X_calib, observer=functools.partial(PercentileObserver, 99.0))
    mm = static_ptq(ref.model, ref.X_calib)
    for name in ("act1", "act2"):
        assert pct.activations[name].scale < mm.activations[name].scale
    assert "PercentileObserver" in repr(pct)


def test_static_mixed_weight_bits(ref):
    bits = {"fc1": 8, "fc2": 4, "fc3": 2}
    m = static_ptq(ref.model, ref.X_calib, weight_bits=bits)
    for name, b in bits.items():
        _, qp = m.weights[name]
        assert qp.qmax == 2 ** (b - 1) - 1
    np.testing.assert_array_equal(convert_to_integer(m).forward_codes(ref.X_test)[-1],
                                  integer_reference(m, ref.X_test)[-1])
    assert "mixed 8/4/2-bit" in repr(m)


@pytest.mark.parametrize("call, error", [
    (lambda r: static_ptq(r.model, r.X_calib, observer=MinMaxObserver()), TypeError),
    (lambda r: static_ptq(r.model, r.X_calib, observer=lambda **k: None), TypeError),
    (lambda r: static_ptq(r.model, r.X_calib.astype(np.int64)), TypeError),
    (lambda r: static_ptq(r.model, np.full((4, 64), np.nan, F32)), ValueError),
    (lambda r: static_ptq(r.model, r.X_calib[:0]), ValueError),
    (lambda r: static_ptq(r.model, r.X_calib, activation_bits=9), ValueError),
    (lambda r: static_ptq(r.model, r.X_calib, weight_bits=1), ValueError),
    (lambda r: static_ptq(r.model, r.X_calib, weight_bits=9), ValueError),   # int8 kernels
    (lambda r: static_ptq(r.model, r.X_calib, weight_bits={"fc1": 8}), ValueError),
    (lambda r: static_ptq(r.model, r.X_calib, batch_size=0), ValueError),
    (lambda r: static_ptq(r.model, r.X_calib, int32_bias=1), TypeError),
    (lambda r: dynamic_ptq(r.model, per_row="no"), TypeError),
    (lambda r: dynamic_ptq(r.model, activation_bits=1), ValueError),
    (lambda r: weight_only_ptq(r.model["fc1"]), TypeError),
    (lambda r: weight_only_ptq(nn.Sequential(nn.ReLU(), nn.Linear(2, 2))), ValueError),
    (lambda r: weight_only_ptq(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.ReLU())),
     ValueError),
    (lambda r: weight_only_ptq(nn.Sequential(("a", nn.Linear(2, 2)), ("h", _Tanh()))),
     ValueError),
])
def test_ptq_bad_input(ref, call, error):
    with pytest.raises(error):
        call(ref)


class _Tanh(nn.Module):
    def forward(self, x):
        return np.tanh(x)


# --------------------------------------------------------------------------- the integer network


def test_integer_model_matches_the_independent_reference(ref, static8):
    integer = convert_to_integer(static8)
    codes = integer.forward_codes(ref.X_test)
    want = integer_reference(static8, ref.X_test)
    assert [c.dtype for c in codes] == [np.dtype(np.int8)] * 3
    for c, w in zip(codes, want, strict=True):
        np.testing.assert_array_equal(c, w)
    logits = integer(ref.X_test)
    assert logits.dtype == F32
    np.testing.assert_array_equal(logits, affine.dequantize(codes[-1], integer.output_qparams))
    np.testing.assert_array_equal(integer.predict(ref.X_test), np.argmax(codes[-1], axis=1))


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), hidden=st.integers(1, 40), bits=st.integers(2, 8),
       act_bits=st.integers(2, 8), per_channel=st.booleans(), symmetric=st.booleans(),
       activation=st.sampled_from(["relu", "relu6"]), depth=st.integers(1, 3))
def test_integer_model_matches_reference_on_random_networks(seed, hidden, bits, act_bits,
                                                            per_channel, symmetric, activation,
                                                            depth):
    rng = np.random.default_rng(seed)
    sizes = (int(rng.integers(1, 30)),) + (hidden,) * (depth - 1) + (int(rng.integers(1, 12)),)
    model = nn.make_mlp(sizes, activation=activation, seed=int(rng.integers(2**31)))
    for p, _ in model.parameters():
        if p.ndim == 1:
            p[...] = rng.normal(0, 0.3, p.shape)
    X = (rng.normal(0, 1, (37, sizes[0])) * rng.uniform(0.1, 5)).astype(F32)
    m = static_ptq(model, X[:20], weight_bits=bits, activation_bits=act_bits,
                   per_channel=per_channel, symmetric=symmetric)
    integer = convert_to_integer(m)
    for c, w in zip(integer.forward_codes(X), integer_reference(m, X), strict=True):
        np.testing.assert_array_equal(c, w)


def test_integer_model_against_onnxruntime(ref):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (oracle)")
    pytest.importorskip("onnx", reason="onnx is not installed (oracle)")
    from onnx import TensorProto, helper, numpy_helper

    for per_channel, symmetric in ((True, True), (False, True), (True, False)):
        m = static_ptq(ref.model, ref.X_calib, per_channel=per_channel, symmetric=symmetric)
        integer = convert_to_integer(m)
        nodes, inits, prev = [], [], "x"
        for i, layer in enumerate(integer.layers):
            wq = layer.weight_qparams
            w_scale = (wq.scale.astype(F32) if wq.axis is not None else F32(wq.scale))
            w_zp = (wq.zero_point.astype(np.int8) if wq.axis is not None
                    else np.int8(wq.zero_point))
            consts = {
                f"xs{i}": F32(layer.input_qparams.scale),
                f"xz{i}": np.int8(layer.input_qparams.zero_point),
                f"w{i}": layer.weight_q.reshape(*layer.weight_q.shape, 1, 1),
                f"ws{i}": np.asarray(w_scale), f"wz{i}": np.asarray(w_zp),
                f"ys{i}": F32(layer.output_qparams.scale),
                f"yz{i}": np.int8(layer.output_qparams.zero_point),
                f"b{i}": layer.bias_q,
            }
            inits += [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
            names = list(consts)
            nodes.append(helper.make_node("QLinearConv", [prev] + names[:7] + [names[7]],
                                          [f"y{i}"]))
            prev = f"y{i}"
        x_info = helper.make_tensor_value_info("x", TensorProto.INT8, [None, 64, 1, 1])
        outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.INT8, None)
                for i in range(len(integer.layers))]
        graph = helper.make_graph(nodes, "mlp", [x_info], outs, initializer=inits)
        onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        onnx_model.ir_version = 10
        session = ort.InferenceSession(onnx_model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        x_q = integer.quantize_input(ref.X_test)
        got = session.run(None, {"x": x_q.reshape(*x_q.shape, 1, 1)})
        for mine, theirs in zip(integer.forward_codes(ref.X_test), got, strict=True):
            np.testing.assert_array_equal(mine, theirs.reshape(mine.shape))


def test_integer_predictions_come_from_the_compiled_kernels_alone(ref, monkeypatch):
    m = static_ptq(ref.model, ref.X_calib)
    integer = convert_to_integer(m)
    expected_codes = integer.forward_codes(ref.X_test)
    expected = integer.predict(ref.X_test)

    def gone(*args, **kwargs):
        raise AssertionError("a float or NumPy-reference path was used")

    # swap out every float path and every NumPy reference of the integer arithmetic
    monkeypatch.setattr(nn.Linear, "forward", gone)
    monkeypatch.setattr(nn.ReLU, "forward", gone)
    monkeypatch.setattr(nn.ReLU6, "forward", gone)
    monkeypatch.setattr(int_matmul.QuantizedLinear, "reference", gone)
    monkeypatch.setattr(int_matmul.QuantizedLinear, "accumulate", gone)
    monkeypatch.setattr(int_matmul.QuantizedLinear, "fake_quant_forward", gone)
    # a function is looked up in the namespace of the module that calls it: replace each in
    # every qcourse module that holds it (the packages' files included)
    for name in ("fake_quantize", "requantize_float", "matmul_int8_requant_reference",
                 "matmul_int8_reference"):
        for module in [m for n, m in sys.modules.items() if n.startswith("qcourse")]:
            if callable(vars(module).get(name)):
                monkeypatch.setattr(module, name, gone)
    assert affine.quantizer.fake_quantize is gone and int_matmul.layer.requantize_float is gone
    for p, _ in m.model.parameters():            # nor are the simulated float weights
        p[...] = np.nan

    real = _kernels.gemm_packed_requant
    calls = _counting(monkeypatch, "gemm_packed_requant")
    codes = integer.forward_codes(ref.X_test)
    for c, e in zip(codes, expected_codes, strict=True):
        np.testing.assert_array_equal(c, e)
    assert [args[1].shape[1] for args in calls] == [64, 128, 64]   # one call per layer
    np.testing.assert_array_equal(integer.predict(ref.X_test), expected)

    # ... and the predictions really are the kernel's output: corrupt it, and they change
    def corrupting(*args):
        real(*args)
        args[-2][...] = 0  # y, the 8-bit output (the last argument is threads)

    monkeypatch.setattr(_kernels, "gemm_packed_requant", corrupting)
    assert np.mean(integer.predict(ref.X_test) == expected) < 0.5


@pytest.mark.parametrize("requantization", ["tflite_double", "tflite_single"])
def test_fixed_point_requantization_runs_integer_gemm_and_matches_reference(
        ref, static8, monkeypatch, requantization):
    integer = convert_to_integer(static8, requantization=requantization)
    float_codes = convert_to_integer(static8).forward_codes(ref.X_test)

    def gone(*args, **kwargs):
        raise AssertionError("the float-requantizing kernel was used")

    monkeypatch.setattr(_kernels, "gemm_packed_requant", gone)
    calls = _counting(monkeypatch, "gemm_packed")
    codes = integer.forward_codes(ref.X_test)
    assert len(calls) == 3
    # layer by layer, the NumPy reference of the same fixed-point layer (fed the same codes)
    x = integer.quantize_input(ref.X_test)
    for layer, c in zip(integer.layers, codes, strict=True):
        np.testing.assert_array_equal(c, layer.reference(x, requantization))
        x = c
    # the two conventions differ by at most one step at the first layer (same input)
    assert np.abs(codes[0].astype(int) - float_codes[0].astype(int)).max() <= 1
    assert integer.accuracy(ref.X_test, ref.y_test) >= ref.float_accuracy - 0.01


def test_integer_accuracy_within_one_point_of_float_at_8_bits():
    for seed in (1, 2, 3):
        r = train_reference_model(seed)
        integer = convert_to_integer(static_ptq(r.model, r.X_calib))
        assert integer.accuracy(r.X_test, r.y_test) >= r.float_accuracy - 0.01


def test_integer_input_saturates_instead_of_wrapping(static8):
    integer = convert_to_integer(static8)
    x = np.zeros((2, 64), F32)
    x[0, 0], x[1, 0] = 50.0, -50.0
    q = integer.quantize_input(x)
    assert q[0, 0] == 127 and q[1, 0] == -128


def test_integer_model_bad_input(ref, static8):
    integer = convert_to_integer(static8)
    with pytest.raises(TypeError):
        integer(ref.X_test.astype(np.int64))
    with pytest.raises(ValueError):
        integer(ref.X_test[:, :10])
    with pytest.raises(ValueError):
        integer(np.full((2, 64), np.inf, F32))
    with pytest.raises(ValueError):
        integer.accuracy(ref.X_test, ref.y_test[:5])
    with pytest.raises(ValueError):
        IntegerModel(integer.layers, integer.names[:2])
    with pytest.raises(ValueError):
        IntegerModel(integer.layers[::-1], integer.names)   # codes do not chain
    with pytest.raises(TypeError):
        IntegerModel([1, 2], ["a", "b"])
    last = integer.layers[-1]
    uint8_out = int_matmul.QuantizedLinear(
        last.weight_q, last.bias_q, last.input_qparams, last.weight_qparams,
        affine.QParams(scale=0.1, zero_point=0, qmin=0, qmax=255))
    with pytest.raises(ValueError, match="int8 codes"):
        IntegerModel(integer.layers[:-1] + [uint8_out], integer.names)
    with pytest.raises(ValueError):
        IntegerModel(integer.layers, integer.names, requantization="double")
    with pytest.raises(ValueError):
        convert_to_integer(weight_only_ptq(ref.model))
    with pytest.raises(ValueError):
        convert_to_integer(dynamic_ptq(ref.model), requantization="tflite_double")
    with pytest.raises(TypeError):
        convert_to_integer(ref.model)
    with pytest.raises(ValueError, match="ptq_model must be built by dynamic_ptq"):
        DynamicIntegerModel(static8)
    with pytest.raises(TypeError, match="ptq_model must be a PTQModel built by dynamic_ptq"):
        DynamicIntegerModel(ref.model)


# --------------------------------------------------------------------------- fake quant vs integer


def test_fake_quant_and_integer_differ_only_next_to_ties(ref):
    for bits in (8, 4):
        m = static_ptq(ref.model, ref.X_calib, weight_bits=bits, activation_bits=bits)
        integer = convert_to_integer(m)
        c = compare_fake_quant_integer(m, integer, ref.X_test, ref.y_test)
        assert c.prediction_disagreements == int(np.sum(m.predict(ref.X_test)
                                                        != integer.predict(ref.X_test)))
        assert c.integer_accuracy == integer.accuracy(ref.X_test, ref.y_test)
        assert c.fake_quant_accuracy == m.accuracy(ref.X_test, ref.y_test)
        assert sum(c.code_mismatches.values()) > 0
        for name in integer.names:
            assert c.max_code_difference[name] <= 1
            assert c.direct_mismatches[name] <= c.code_mismatches[name]
            # every mismatch of a layer's own making sits within half a bias step of a tie
            assert c.max_tie_distance[name] <= c.half_bias_step[name] + 1e-4
        assert np.all(c.fake_quant_margin_steps <= 2)
        # rounding the bias in the simulation too removes (nearly) every mismatch
        m32 = static_ptq(ref.model, ref.X_calib, weight_bits=bits, activation_bits=bits,
                         int32_bias=True)
        c32 = compare_fake_quant_integer(m32, convert_to_integer(m32), ref.X_test)
        assert sum(c32.code_mismatches.values()) < sum(c.code_mismatches.values()) / 5
        assert max(c32.max_tie_distance.values()) < 1e-3
        assert c32.fake_quant_accuracy is None


def test_comparison_detects_a_broken_integer_model(ref, static8):
    integer = convert_to_integer(static8)
    layers = list(integer.layers)
    bad = layers[1]
    layers[1] = int_matmul.QuantizedLinear(bad.weight_q, bad.bias_q + np.int32(3000),
                                           bad.input_qparams, bad.weight_qparams,
                                           bad.output_qparams, bad.activation)
    c = compare_fake_quant_integer(static8, IntegerModel(layers, integer.names), ref.X_test)
    assert c.max_tie_distance["fc2+act2"] > c.half_bias_step["fc2+act2"]
    assert c.code_mismatches["fc2+act2"] > 1000


def test_comparison_bad_input(ref, static8):
    integer = convert_to_integer(static8)
    with pytest.raises(TypeError):
        compare_fake_quant_integer(weight_only_ptq(ref.model), integer, ref.X_test)
    with pytest.raises(TypeError):
        compare_fake_quant_integer(static8, static8, ref.X_test)
    with pytest.raises(ValueError):
        compare_fake_quant_integer(static8, IntegerModel(integer.layers[:1], ["a"]), ref.X_test)


# --------------------------------------------------------------------------- size


def test_model_size_counts_packed_bytes(ref):
    n_w = sum(ref.model[n].weight.size for n in ("fc1", "fc2", "fc3"))
    n_b = sum(ref.model[n].bias.size for n in ("fc1", "fc2", "fc3"))
    fl = model_size(ref.model)
    assert (fl.weights, fl.biases, fl.total) == (4 * n_w, 4 * n_b, 4 * (n_w + n_b))
    for bits in (8, 4, 2):
        m = static_ptq(ref.model, ref.X_calib, weight_bits=bits, activation_bits=8)
        size = model_size(m)
        if bits == 8:
            real = sum(q.astype(np.int8).nbytes for q, _ in m.weights.values())
        else:
            real = sum(pack_int(q, bits).size for q, _ in m.weights.values())
        assert size.weights == real
        assert size.biases == 4 * n_b
        assert size.scales == 4 * (128 + 64 + 10) + 4 * 4       # per-channel + 4 activations
        assert size.zero_points == 4                              # activation zero points only
        assert model_size(convert_to_integer(m)) == size
    pt = model_size(weight_only_ptq(ref.model, bits=8, per_channel=False))
    assert (pt.scales, pt.zero_points) == (12, 0)
    asym = model_size(weight_only_ptq(ref.model, bits=8, symmetric=False))
    assert asym.zero_points == 128 + 64 + 10
    assert fl.total / model_size(static_ptq(ref.model, ref.X_calib)).total > 3.5
    with pytest.raises(TypeError):
        model_size("model")


# --------------------------------------------------------------------------- folding


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), out_f=st.integers(1, 9), in_f=st.integers(1, 9),
       with_bias=st.booleans())
def test_fold_batch_norm_equals_linear_then_batch_norm(seed, out_f, in_f, with_bias):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out_f, in_f))
    b = rng.normal(size=out_f) if with_bias else None
    gamma, beta = rng.normal(size=out_f), rng.normal(size=out_f)
    mean, var = rng.normal(size=out_f), rng.uniform(0, 3, size=out_f)
    x = rng.normal(size=(11, in_f))
    z = x @ w.T + (0 if b is None else b)
    bn = gamma * (z - mean) / np.sqrt(var + 1e-5) + beta
    wf, bf = fold_batch_norm(w, b, gamma, beta, mean, var)
    np.testing.assert_allclose(x @ wf.T + bf, bn, rtol=1e-10, atol=1e-10)
    w32, _ = fold_batch_norm(w.astype(F32), b, gamma, beta, mean, var)
    assert w32.dtype == F32


@pytest.mark.parametrize("args, error", [
    ((np.ones(3), None, np.ones(3), np.ones(3), np.ones(3), np.ones(3)), ValueError),
    ((np.ones((3, 2), np.int64), None, np.ones(3), np.ones(3), np.ones(3), np.ones(3)),
     TypeError),
    ((np.full((3, 2), np.nan), None, np.ones(3), np.ones(3), np.ones(3), np.ones(3)),
     ValueError),
    ((np.ones((3, 2), np.float32), None, np.full(3, 1e300), np.ones(3), np.ones(3), np.ones(3)),
     ValueError),
    ((np.ones((3, 2)), None, np.ones(2), np.ones(3), np.ones(3), np.ones(3)), ValueError),
    ((np.ones((3, 2)), None, np.ones(3), np.ones(3), np.ones(3), -np.ones(3)), ValueError),
    ((np.ones((3, 2)), None, np.ones(3), np.ones(3), np.full(3, np.nan), np.ones(3)),
     ValueError),
    ((np.ones((3, 2)), None, np.ones(3), np.array(["a"] * 3), np.ones(3), np.ones(3)),
     TypeError),
])
def test_fold_batch_norm_bad_input(args, error):
    with pytest.raises(error):
        fold_batch_norm(*args)
    with pytest.raises(ValueError):
        fold_batch_norm(np.ones((3, 2)), None, np.ones(3), np.ones(3), np.ones(3), np.ones(3),
                        eps=0.0)


# --------------------------------------------------------------------------- the orderings the
# chapter asserts (on seed 0), checked here on other seeds


def test_per_tensor_below_per_channel_below_qat_at_2_bits():
    qat = pytest.importorskip("qcourse.qat", reason="the qat chapter's module is not there yet")
    for seed in (1, 2):
        r = train_reference_model(seed)
        pt = static_ptq(r.model, r.X_calib, weight_bits=2, activation_bits=2,
                        per_channel=False).accuracy(r.X_test, r.y_test)
        pc = static_ptq(r.model, r.X_calib, weight_bits=2, activation_bits=2,
                        per_channel=True).accuracy(r.X_test, r.y_test)
        q = qat.qat_finetune(r.model, r.X_train, r.y_train, bits=2, act_bits=2, epochs=5,
                             seed=seed, progress=False)
        qa = nn.accuracy(q, r.X_test, r.y_test)
        assert pt + 0.05 < pc < qa - 0.2, (seed, pt, pc, qa)


def test_drop_grows_from_8_to_4_to_2_bits():
    for seed in (1, 2, 3):
        r = train_reference_model(seed)
        drop = {b: r.float_accuracy - static_ptq(r.model, r.X_calib, weight_bits=b,
                                                 activation_bits=b).accuracy(r.X_test, r.y_test)
                for b in (8, 4, 2)}
        assert drop[8] <= 0.01 and drop[8] <= drop[4] + 0.005 < drop[2] and drop[2] > 0.10


def test_modes_order_at_2_bits():
    for seed in (1, 2, 3, 4):
        r = train_reference_model(seed)
        acc = {
            "weight_only": weight_only_ptq(r.model, bits=2),
            "dynamic_row": dynamic_ptq(r.model, weight_bits=2, activation_bits=2, per_row=True),
            "dynamic": dynamic_ptq(r.model, weight_bits=2, activation_bits=2),
            "static": static_ptq(r.model, r.X_calib, weight_bits=2, activation_bits=2),
        }
        a = {k: m.accuracy(r.X_test, r.y_test) for k, m in acc.items()}
        assert a["weight_only"] > a["dynamic_row"] > a["dynamic"] > a["static"], (seed, a)


def test_relu6_quantizes_better_than_relu_at_8_and_7_bits_on_average():
    gain = {8: [], 7: []}
    for seed in (3, 4, 5):
        for bits in (8, 7):
            sqnr = {}
            for act in ("relu", "relu6"):
                r = train_reference_model(seed, activation=act)
                m = static_ptq(r.model, r.X_calib, weight_bits=bits, activation_bits=bits,
                               per_channel=False)
                sqnr[act] = sqnr_db(r.model(r.X_test), m(r.X_test))
            gain[bits].append(sqnr["relu6"] - sqnr["relu"])
    assert np.mean(gain[8]) > 0.5 and np.mean(gain[7]) > 0.5, gain


def test_inception_table_is_the_published_one():
    t = INCEPTION_V3_RELU6_TABLE
    assert t["relu6"] == {"float": 78.4, 8: 75.4, 7: 75.0}
    assert t["relu"] == {"float": 78.3, 8: 74.2, 7: 73.7}


def test_weight_only_ptq_names_its_own_argument(ref):
    # weight_only_ptq's argument is `bits`; the message used to say "weight_bits", the name
    # the shared helper has in dynamic_ptq and static_ptq.
    for bad, error in ((0, ValueError), (9, ValueError), (4.0, TypeError),
                       ({"fc1": 8}, ValueError)):
        with pytest.raises(error, match=r"^bits") as info:
            weight_only_ptq(ref.model, bits=bad)
        assert "weight_bits" not in str(info.value)
    with pytest.raises(ValueError, match=r"^weight_bits must be an int in \[2, 8\]"):
        static_ptq(ref.model, ref.X_calib, weight_bits=1)
